"""What MLflow tracking costs the default run: alternating rounds of `python -m mprun`, each in a fresh process,
with tracking=none and with the default MLflow tracking (the sqlite store; and a local `mlflow server`).

The figure is training throughput: summary.json's samples_per_s (the median epoch after the first). Each round runs
every arm once, in an order that rotates from round to round, so that the arms share whatever else loads the
machine; the ratio arm/none is taken within a round, and its median over rounds gets a bootstrap interval. Process
wall times (start-up included) are recorded beside it. The result goes to bench/results/tracking_overhead.json.

    .venv/bin/python bench/tracking_overhead.py                  # 5 rounds, sqlite and server
    .venv/bin/python bench/tracking_overhead.py --before /tmp/old   # and the same arms of another checkout's mprun,
                                                                     # in the same rounds (before/after a change)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import ROOT, at_least

ARMS = ("none", "sqlite", "server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path) -> tuple[str, subprocess.Popen]:
    """A local `mlflow server` on 127.0.0.1 with a sqlite backend, as tests/test_tracking_server.py starts one."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root}/server.db",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        cwd=root,
        stdout=open(root / "server.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).close()
            return uri, proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                sys.exit(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)


def session_cpu_s(sid: int) -> float:
    """CPU seconds used so far by the live processes of a session (the mlflow server and the workers it started),
    from /proc: what the server spends while a run trains beside it on the same cores."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[3]) == sid:  # field 6 of stat (session id), counted after the ")" that ends the name
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def run_once(
    arm: str, workdir: Path, n: int, uri: str | None, env: dict[str, str], extra: list[str], server_sid: int | None
) -> dict:
    """One default run in a fresh process; its summary's throughput and the process's wall time (and, for a server
    arm, the CPU time the server spent during it)."""
    tracking = {"none": ["tracking=none"], "sqlite": [], "server": [f"tracking.uri={uri}"]}[arm.split("@")[0]]
    run_dir = workdir / f"run{n}"
    # fp32, as the issue measured it, unless the overrides say otherwise: under precision=auto each arm's directory
    # would time fp32 against bf16 once and cache its own pick, and arms that picked differently are not comparable.
    cmd = [sys.executable, "-m", "mprun", "trainer.progress=off", "precision=fp32", f"hydra.run.dir={run_dir}",
           *tracking, *extra]  # fmt: skip
    served = arm.startswith("server") and server_sid is not None
    server_before = session_cpu_s(server_sid) if served else 0.0
    started, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    server_cpu = session_cpu_s(server_sid) - server_before if served else None
    if proc.returncode != 0:
        sys.exit(f"{arm} run failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    # CPU seconds of the whole process (all threads): what tracking costs, less disturbed by the machine's load
    cpu_s = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
    return {
        "samples_per_s": summary["samples_per_s"],
        "precision": summary["precision"],
        "process_wall_s": wall,
        "process_cpu_s": cpu_s,
        "run_wall_s": summary["wall_time_s"],
        "server_cpu_s": server_cpu,
    }


def bootstrap(values: list[float], draws: int = 10000, seed: int = 0) -> tuple[float, float]:
    """A 95% percentile-bootstrap interval of the median."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    return meds[int(0.025 * draws)], meds[int(0.975 * draws) - 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=at_least(1), default=5)
    ap.add_argument("--arms", default="none,sqlite,server", help="comma-separated, from " + ",".join(ARMS))
    ap.add_argument(
        "--before",
        type=Path,
        help="another checkout of mprun: its arms (name@before) run in the same "
        "rounds, each compared with its own tracking=none",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tracking_overhead.json")
    ap.add_argument("overrides", nargs="*", help="more overrides for every run (default: none: the default run)")
    args = ap.parse_args()
    arms = args.arms.split(",")
    if "none" not in arms or not set(arms) <= set(ARMS):
        ap.error(f"--arms must include none and be among {ARMS}")
    srcs = {"": ROOT} | ({"@before": args.before.resolve()} if args.before else {})
    arms = [arm + suffix for suffix in srcs for arm in arms]
    base = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    envs = {
        suffix: base | {"PYTHONPATH": os.pathsep.join(filter(None, [str(src), base.get("PYTHONPATH")]))}
        for suffix, src in srcs.items()
    }
    root = Path(tempfile.mkdtemp(prefix="tracking_overhead_"))
    workdirs = {arm: root / arm.replace("@", "-") for arm in arms}
    for d in workdirs.values():
        d.mkdir()
    uri, server = start_server(root) if any(a.startswith("server") for a in arms) else (None, None)
    sid = server.pid if server is not None else None  # start_new_session: the server leads its own session
    load_before = os.getloadavg()
    rounds: list[dict[str, dict]] = []
    try:
        for r in range(args.rounds):
            order = arms[r % len(arms) :] + arms[: r % len(arms)]
            rounds.append(
                {
                    arm: run_once(arm, workdirs[arm], r, uri, envs[arm[len(arm.split("@")[0]) :]], args.overrides, sid)
                    for arm in order
                }
            )
            print(
                f"round {r + 1}/{args.rounds}: "
                + ", ".join(
                    f"{a} {rounds[-1][a]['samples_per_s']:.0f}/s {rounds[-1][a]['process_wall_s']:.1f}s "
                    f"{rounds[-1][a]['process_cpu_s']:.1f} CPU s"
                    for a in arms
                ),
                flush=True,
            )
            result = summarize(
                rounds, arms, load_before, {suffix or "(this checkout)": str(src) for suffix, src in srcs.items()}
            )
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")  # after every round: a stopped bench keeps them
    except KeyboardInterrupt:
        print(f"stopped after {len(rounds)} complete round(s)")
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:  # its workers can take longer on a loaded machine
                os.killpg(server.pid, signal.SIGKILL)
    if not rounds:
        sys.exit("no complete round")
    print(f"\n{'arm':15s} {'samples/s':>10s} {'ratio to none [95% CI]':>26s} {'process wall s':>15s} {'CPU s':>6s}")
    for arm, a in result["arms"].items():
        low, high = a["ratio_ci95"]
        print(
            f"{arm:15s} {a['samples_per_s_median']:10.0f} {a['ratio_median']:8.3f} [{low:.3f}, {high:.3f}]"
            f"{'':6s} {a['process_wall_s_median']:11.1f} {a['process_cpu_s_median']:7.1f}"
        )
    print(f"\nwritten to {args.out}; runs in {root}")


def summarize(rounds: list[dict[str, dict]], arms: list[str], load_before: tuple, srcs: dict[str, str]) -> dict:
    """The rounds so far, and per arm: medians, and the ratio to the same checkout's tracking=none."""
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.platform()}",
        "src": srcs,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "load_avg_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "rounds": rounds,
        "arms": {},
    }
    for arm in arms:
        none = "none" + arm[len(arm.split("@")[0]) :]  # the same checkout's tracking=none
        ratios = [rd[arm]["samples_per_s"] / rd[none]["samples_per_s"] for rd in rounds]
        low, high = bootstrap(ratios)
        result["arms"][arm] = {
            "samples_per_s_median": statistics.median(rd[arm]["samples_per_s"] for rd in rounds),
            "ratio_median": statistics.median(ratios),
            "ratio_ci95": [low, high],
            "ratio_min_max": [min(ratios), max(ratios)],
            "process_wall_s_median": statistics.median(rd[arm]["process_wall_s"] for rd in rounds),
            "process_cpu_s_median": statistics.median(rd[arm]["process_cpu_s"] for rd in rounds),
        }
        server = [rd[arm]["server_cpu_s"] for rd in rounds if rd[arm].get("server_cpu_s") is not None]
        if server:
            result["arms"][arm]["server_cpu_s_median"] = statistics.median(server)
    return result


if __name__ == "__main__":
    main()

"""A team's tracking server for real: a throwaway PostgreSQL cluster, and `mlflow server` on it set up by the commands
of docs/tracking.md ("A team server"), run as written. Parallel sweeps, a torchrun job, and faults: the server
killed mid-run, PostgreSQL stopped under a running server, a wrong password or database. The same parallel load on a
fresh sqlite store too.

Without PostgreSQL (initdb, pg_ctl) these tests are skipped, saying how to install it; MPRUN_REQUIRE_POSTGRES=1 (set
by .ci/run) makes that a failure instead."""

from __future__ import annotations

import glob
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from helpers import ROOT, run_cli_here
from mlflow import MlflowClient
from test_distributed import torchrun
from test_tracking import parallel_jobs_share_a_new_dataset_and_an_experiment_tag
from test_tracking_server import ONE_THREAD, free_port, wait_until_up

pytestmark = pytest.mark.slow

# The cheapest job that still logs step metrics: 4 steps, logged at steps 2 and 4, one evaluation.
TINY = [
    "precision=fp32",
    "model=simple_mlp",
    "trainer.max_epochs=1",
    "trainer.max_steps=4",
    "trainer.log_every_steps=2",
]
STEP_KEYS = ("train/",)  # logged every log step: 2 points a TINY job; every other key once (fp32: no amp/*)


def _postgres_bin() -> Path | None:
    """The directory of initdb and pg_ctl: on the PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


@dataclass
class Postgres:
    """A PostgreSQL cluster on 127.0.0.1:port, owned by `owner` (the postgres user when the tests run as root, which
    initdb refuses), its superuser `postgres` with a password."""

    bin: Path
    dir: Path
    port: int
    password: str
    owner: str | None

    def _as_owner(self, *cmd: str) -> list[str]:
        return ["runuser", "-u", self.owner, "--", *cmd] if self.owner else list(cmd)

    def ctl(self, *args: str) -> None:
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.dir} -F"  # -F: no fsync, a throwaway cluster
        cmd = [str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w", "-o", opts]
        subprocess.run(self._as_owner(*cmd, *args), check=True, capture_output=True, timeout=60)

    def superuser_env(self) -> dict[str, str]:
        """libpq's variables for psql and createdb as the superuser, as `sudo -u postgres` is on a database host."""
        return {"PGHOST": "127.0.0.1", "PGPORT": str(self.port), "PGUSER": "postgres", "PGPASSWORD": self.password}


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    bin_dir = _postgres_bin()
    if bin_dir is None:
        why = "PostgreSQL not found (initdb, pg_ctl): apt-get install postgresql, or put its bin/ on the PATH"
        if os.environ.get("MPRUN_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{why} (MPRUN_REQUIRE_POSTGRES=1)")
        pytest.skip(why)
    owner = "postgres" if os.geteuid() == 0 else None
    # Not under pytest's tmp dir: its root is private to this user, and the cluster's owner must reach it.
    root = Path(tempfile.mkdtemp(prefix="mprun-pg-"))
    pg = Postgres(bin_dir, root, free_port(), secrets.token_hex(8), owner)
    try:
        (root / "pw").write_text(pg.password)
        if owner:
            shutil.chown(root, owner)
            shutil.chown(root / "pw", owner)
        initdb = [str(bin_dir / "initdb"), "-D", str(root / "data"), "-U", "postgres", "--pwfile", str(root / "pw")]
        subprocess.run(
            pg._as_owner(*initdb, "--auth=scram-sha-256", "-E", "UTF8", "--no-sync", "--no-instructions"),
            check=True,
            capture_output=True,
            timeout=120,
        )
        pg.ctl("start")
        yield pg
    finally:
        if (root / "data" / "postmaster.pid").exists():
            pg.ctl("-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


def team_setup_blocks() -> list[str]:
    """The bash blocks of docs/tracking.md's "A team server": the database, the server, every user."""
    text = (ROOT / "docs" / "tracking.md").read_text()
    section = text.split("## A team server", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(blocks) == 3, "the page's three blocks: database, server, every user"
    return blocks


def as_here(block: str, subs: dict[str, str]) -> str:
    """A block of the docs with its placeholders replaced by this test's values; each must be there."""
    for old, new in subs.items():
        assert old in block, f"docs/tracking.md's team set-up no longer has {old!r}"
        block = block.replace(old, new)
    return block


@pytest.fixture(scope="module")
def tools(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An environment whose `python` and `mlflow` are this interpreter's (a --target install has no bin/mlflow)."""
    bin_dir = tmp_path_factory.mktemp("bin")
    for name, run in (("python", ""), ("mlflow", " -m mlflow")):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {sys.executable}{run} "$@"\n')
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PYTEST_CURRENT_TEST")}
    return env | ONE_THREAD | {"PATH": f"{bin_dir}:{env['PATH']}"}


@dataclass
class Server:
    uri: str
    user_env: dict[str, str]  # a user's environment after the docs' last block
    start_cmd: str
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Start the server (again) and wait until it answers."""
        self.proc = subprocess.Popen(
            ["bash", "-c", self.start_cmd],
            env=self.env,
            stdout=open(self.log, "a"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_until_up(self.uri, self.proc, self.log)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def database(postgres: Postgres, tools: dict[str, str]) -> Postgres:
    """The docs' database block, run once on the cluster: the mlflow login and its database."""
    database, _, _ = team_setup_blocks()
    cmds = as_here(database, {"sudo -u postgres ": ""})  # sudo's part: the superuser's libpq variables here
    done = subprocess.run(["bash", "-euc", cmds], env=tools | postgres.superuser_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return postgres


def start_server(postgres: Postgres, env: dict[str, str], root: Path) -> Server:
    """The docs' server block on this cluster and a free port (not its pip line: no network here)."""
    _, server, user = team_setup_blocks()
    port = free_port()
    here = {"db-host:5432": f"127.0.0.1:{postgres.port}", "/srv/mlflow-artifacts": str(root / "artifacts")}
    lines = as_here(server, here | {"--port 5000": f"--port {port}"}).splitlines()
    assert lines[0].startswith("pip install"), "the install line comes first"
    start_cmd = "\n".join(["set -eu", *lines[1:]]).replace("mlflow server", "exec mlflow server")
    uri = f"http://127.0.0.1:{port}"
    user_env = dict(env)
    for name, value in re.findall(r"^export (\w+)=(\S+)", as_here(user, {"127.0.0.1:5000": f"127.0.0.1:{port}"}), re.M):
        user_env[name] = value
    assert user_env.get("MLFLOW_TRACKING_URI") == uri
    s = Server(uri, user_env, start_cmd, env, root / "server.log")
    s.start()
    return s


@pytest.fixture(scope="module")
def server(database: Postgres, tools: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The one server, set up as docs/tracking.md says, that every test here shares (one kills and restarts it)."""
    s = start_server(database, tools, tmp_path_factory.mktemp("server"))
    yield s
    s.kill()  # a throwaway: SIGTERM waited ~8 s for its 4 workers' open connections


def launch(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "mprun", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def three_sweeps_at_once(uri: str, cwds: list[Path], env: dict[str, str]) -> None:
    """Three 4-job joblib sweeps (4 workers each) started together into experiment "load" of uri."""
    procs = [
        launch(
            [
                "-m",
                "hydra/launcher=joblib",
                "hydra.launcher.n_jobs=4",
                "optimizer.lr=1e-3,2e-3,3e-3,4e-3",
                f"trainer.seed={i}",
                f"hydra.sweep.dir=outputs/multirun/sweep{i}",
                f"tracking.uri={uri}",
                "tracking.experiment=load",
                "trainer.progress=off",
                *TINY,
            ],
            cwd,
            env,
        )
        for i, cwd in enumerate(cwds)
    ]
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]


def assert_nothing_lost(client: MlflowClient) -> None:
    """3 sweep parents, each with 4 FINISHED children; every child with its metric points, once each, and its
    artifacts; every parent with its report."""
    (experiment,) = [e.experiment_id for e in client.search_experiments() if e.name == "load"]
    runs = client.search_runs([experiment], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("mprun.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in {p.info.run_id for p in parents}]
    assert (len(parents), len(children), len(runs)) == (3, 12, 15), "no run lost, none duplicated or stray"
    assert {p.info.status for p in parents} == {"FINISHED"}
    for parent in parents:
        jobs = [c for c in children if c.data.tags["mlflow.parentRunId"] == parent.info.run_id]
        assert sorted(int(c.data.tags["mprun.sweep_job"]) for c in jobs) == [0, 1, 2, 3]
        assert "report.md" in {a.path.split("/")[-1] for a in client.list_artifacts(parent.info.run_id, "report")}
    keys = set(children[0].data.metrics)
    assert {"train/loss", "val/acc", "perf/samples_per_s", "final/val_acc"} <= keys
    points = 0
    for child in children:
        run_id = child.info.run_id
        assert child.info.status == "FINISHED" and set(child.data.metrics) == keys
        for key in keys:
            steps = [m.step for m in client.get_metric_history(run_id, key)]
            assert sorted(steps) == ([2, 4] if key.startswith(STEP_KEYS) else [steps[0]]), (run_id, key, steps)
            points += len(steps)
        assert {"config_resolved.yaml", "summary.json", "checkpoints", "hydra"} <= {
            a.path for a in client.list_artifacts(run_id)
        }
        assert "checkpoints/final.pt" in {a.path for a in client.list_artifacts(run_id, "checkpoints")}
    per_run = sum(2 if k.startswith(STEP_KEYS) else 1 for k in keys)
    assert points == 12 * per_run


def test_three_parallel_sweeps_on_the_team_server_lose_nothing(server: Server, tmp_path: Path) -> None:
    """Three machines' sweeps at once: three launch directories, one server (MLFLOW_TRACKING_URI as the docs set
    it)."""
    three_sweeps_at_once(server.uri, [tmp_path / f"machine{i}" for i in range(3)], server.user_env)
    assert_nothing_lost(MlflowClient(server.uri))
    assert not list(tmp_path.glob("*/outputs/mlflow.db")), "nothing fell back to a local store"


def test_three_parallel_sweeps_on_a_fresh_sqlite_store_lose_nothing(tools: dict[str, str], tmp_path: Path) -> None:
    """The same load on one launch directory's default store, which none of the 15 processes finds made: the
    first creates it under the lock."""
    db = tmp_path / "outputs" / "mlflow.db"
    three_sweeps_at_once(f"sqlite:///{db}", [tmp_path] * 3, tools)
    assert_nothing_lost(MlflowClient(f"sqlite:///{db}"))


def test_a_torchrun_ddp_job_records_one_run_on_the_server(server: Server, tmp_path: Path) -> None:
    proc = torchrun(
        "trainer.strategy=ddp", "trainer.max_steps=4", f"tracking.uri={server.uri}", "tracking.experiment=ddp",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["strategy"] == "ddp x2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4]


def first_run(client: MlflowClient, experiment: str) -> str:
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run.info.run_id


def test_a_server_killed_mid_run_stops_or_falls_back_and_the_stopped_run_resumes(
    server: Server, tmp_path: Path
) -> None:
    """The team's server SIGKILLed while two runs train, and started again (servers keep no state of their own; the
    tests after this one use it): on_unreachable=fail stops with mprun's one line and a checkpoint, and once the
    server is back a resume continues the same run with every log step recorded once; on_unreachable=local trains on
    into the local store, and the run it left RUNNING on the server is closed by python -m mprun.close_stale."""
    epochs = 20  # ~4 s of training left (on a quiet machine) when both have printed epoch 1
    args = [f"tracking.uri={server.uri}", "precision=fp32", "model=simple_mlp", f"trainer.max_epochs={epochs}"]
    args += ["trainer.log_every_steps=2", "hydra.run.dir=outputs/run"]
    per_policy = ["trainer.progress=log", "tracking.on_unreachable={0}", "tracking.experiment={0}"]
    runs = {
        policy: launch([*args, *(a.format(policy) for a in per_policy)], tmp_path / policy, server.env)
        for policy in ("fail", "local")
    }
    try:
        for proc in runs.values():
            for line in proc.stdout:
                if "epoch 1/" in line:
                    break
        server.kill()  # the server dies while both are training
        outputs = {policy: proc.communicate(timeout=300)[0] for policy, proc in runs.items()}
    finally:
        for proc in runs.values():
            proc.kill()
        server.start()  # the same port: the URI in every config and checkpoint
    failed = outputs["fail"]
    assert runs["fail"].returncode == 1, failed[-3000:]
    assert f"mprun: error: MLflow store {server.uri} stopped accepting writes mid-run" in failed
    assert "tracking.on_unreachable=local" in failed and "Traceback" not in failed
    # Points the server never confirmed are kept for the resume, if any were pending (none when the kill lands just
    # after a flush; tests/test_tracking.py tests the keeping): the resume's history below has every log step once.
    kept = list((tmp_path / "fail" / "outputs" / "mlflow_unsent").glob("*.json"))
    assert ("metric points the store never confirmed are kept in" in failed) == bool(kept), failed[-3000:]
    assert list((tmp_path / "fail" / "outputs" / "run" / "checkpoints").glob("step-*.pt"))
    assert runs["local"].returncode == 0, outputs["local"][-3000:]
    local = MlflowClient(f"sqlite:///{tmp_path}/local/outputs/mlflow.db")
    (moved,) = local.search_runs([e.experiment_id for e in local.search_experiments()])
    assert moved.info.status == "FINISHED" and "final/val_acc" in moved.data.metrics
    assert moved.data.tags["mprun.intended_tracking_uri"].startswith(server.uri + " run ")

    client = MlflowClient(server.uri)
    stopped, left = first_run(client, "fail"), first_run(client, "local")
    assert client.get_run(stopped).info.status == client.get_run(left).info.status == "RUNNING"
    resumed = run_cli_here(*args, "trainer.resume=outputs/run", "trainer.progress=off", "tracking.experiment=fail",
                           cwd=tmp_path / "fail")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = client.get_run(stopped)
    assert run.info.status == "FINISHED" and run.data.tags["mprun.resumes"] == "1"
    steps = [m.step for m in client.get_metric_history(stopped, "train/loss")]
    assert sorted(steps) == list(range(2, epochs * 22 + 1, 2)), "every log step once: none lost, none twice"

    from mprun import close_stale

    time.sleep(1)
    close_stale.main(["--uri", server.uri, "--experiment", "local", "--idle", "1s"])
    run = client.get_run(left)
    assert run.info.status == "KILLED" and "close_stale" in run.data.tags["mprun.closed_by"]


def test_parallel_jobs_share_a_new_dataset_and_an_experiment_tag_on_postgresql(
    database: Postgres, tmp_path: Path
) -> None:
    """The races parallel sweeps on the team server meet, made to happen every time: in-process, on the database."""
    uri = f"postgresql+psycopg2://mlflow:change-me@127.0.0.1:{database.port}/mlflow"
    parallel_jobs_share_a_new_dataset_and_an_experiment_tag(uri, tmp_path)


@pytest.mark.parametrize(
    ("user_db", "says"),
    [
        ("mlflow:wrong@{host}/mlflow", 'password authentication failed for user "mlflow"'),
        ("mlflow:change-me@{host}/nosuch", 'database "nosuch" does not exist'),
    ],
)
def test_a_wrong_password_or_missing_database_is_one_line_before_training(
    database: Postgres, tmp_path: Path, user_db: str, says: str
) -> None:
    """A database store given directly: one line within seconds (MLflow's own store retries for ~100 s), the
    password not in it."""
    uri = "postgresql+psycopg2://" + user_db.format(host=f"127.0.0.1:{database.port}")
    start = time.monotonic()
    proc = run_cli_here(f"tracking.uri={uri}", *TINY, cwd=tmp_path)
    assert time.monotonic() - start < 15
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("mprun: error: cannot use MLflow tracking store postgresql+psycopg2://mlflow:***@")
    assert says in line and "wrong" not in line and "change-me" not in line
    assert not list(tmp_path.glob("outputs/*/*/checkpoints")), "no training"


def test_postgres_stopped_under_a_running_server(database: Postgres, server: Server, tmp_path: Path) -> None:
    """The shared server's database stopped while a run trains (last in this file: the other tests use it): the run
    stops with mprun's one line once a write fails or times out (MLflow's timeout, 3 s here) while the server's /health
    still answers; a run started meanwhile fails before training, naming the store behind the server; once PostgreSQL is
    back, the RUNNING run is closed by python -m mprun.close_stale."""
    fast = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "3", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    args = ["precision=fp32", "model=simple_mlp", "trainer.max_epochs=300", "trainer.log_every_steps=2"]
    proc = launch(
        [*args, "trainer.progress=log", "tracking.experiment=pgstop"], tmp_path / "run", server.user_env | fast
    )
    try:
        for line in proc.stdout:
            if "epoch 2/" in line:
                break
        database.ctl("-m", "fast", "stop")
        stopped = time.monotonic()
        out = proc.communicate(timeout=120)[0]
        took = time.monotonic() - stopped
        assert proc.returncode == 1, out[-3000:]
        assert f"mprun: error: MLflow store {server.uri} stopped accepting writes mid-run" in out, out[-3000:]
        assert "Traceback" not in out and took < 30, took
        print(f"the run stopped {took:.1f} s after PostgreSQL")

        (tmp_path / "late").mkdir()
        late = run_cli_here(*TINY, cwd=tmp_path / "late", env=server.user_env | fast)
        (line,) = late.stderr.strip().splitlines()
        assert late.returncode == 2 and line.startswith(f"mprun: error: cannot use MLflow tracking store {server.uri}")
        # the server hangs the request while it retries its connection (no answer in 3 s), or answers HTTP 500
        assert "the server answers, but" in line and "its database may be down" in line, line
    finally:
        proc.kill()
        database.ctl("start")
    client = MlflowClient(server.uri)
    run_id = first_run(client, "pgstop")
    assert client.get_run(run_id).info.status == "RUNNING"
    closer = subprocess.run(
        [sys.executable, "-m", "mprun.close_stale", run_id], env=server.user_env, capture_output=True, text=True
    )
    assert closer.returncode == 0 and f"closed KILLED  {run_id}" in closer.stdout, closer.stderr
    assert client.get_run(run_id).info.status == "KILLED"

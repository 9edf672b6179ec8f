"""python -m mprun.close_stale: close the MLflow runs left RUNNING by a process that could not close them.

A run stays RUNNING when nothing could reach its store to close it: the mlflow server or its database went away
mid-run (tracking.on_unreachable=fail), or the process was killed with SIGKILL or lost with its node. Named by id, or
found by how long they have recorded nothing (a sweep's parent counts as active while any of its jobs is), they are
closed KILLED and tagged mprun.closed_by. A later resume from their checkpoint reopens them as any resume does.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

from mprun.errors import ConfigError
from mprun.tracking.store import RecordedRun, Store
from mprun.tracking.uris import default_uri, shown

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def seconds(text: str) -> float:
    """'90s', '30m', '2h', '1d' (or a bare number of seconds) as seconds."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not found:
        raise argparse.ArgumentTypeError(f"{text!r} is no duration: a number with s, m, h or d, e.g. 30m")
    return float(found[1]) * UNITS[found[2] or "s"]


def idle_since(run: RecordedRun, runs: list[RecordedRun]) -> int:
    """When the run last showed life, ms since the epoch: its start or newest metric point, or a RUNNING child's
    (a sweep's parent records nothing itself while its jobs train)."""
    children = [r for r in runs if r.tags.get("mlflow.parentRunId") == run.run_id]
    return max([run.start_time, run.last_logged, *(idle_since(c, runs) for c in children)])


def stale(store: Store, experiment: str | None, idle_s: float, run_ids: list[str]) -> list[RecordedRun]:
    """The RUNNING runs to close: those named, or those idle for idle_s seconds or more."""
    if run_ids:
        found = [store.run(run_id) for run_id in run_ids]
        missing = [run_id for run_id, run in zip(run_ids, found) if run is None]
        if missing:
            raise ConfigError(f"no run {', '.join(missing)} in {shown(store.uri)}")
        return [run for run in found if run is not None and run.status == "RUNNING"]
    runs = store.running(experiment)
    now_ms = time.time() * 1000
    return [run for run in runs if now_ms - idle_since(run, runs) >= idle_s * 1000]


def main(argv: list[str] | None = None) -> None:
    """python -m mprun.close_stale [RUN_ID ...] [--idle 1h] [--experiment NAME] [--uri URI] [--dry-run]"""
    p = argparse.ArgumentParser(prog="python -m mprun.close_stale", description=__doc__.split("\n\n")[0])
    p.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="runs to close (if RUNNING), whatever their idle time")
    p.add_argument(
        "--uri",
        default=os.environ.get("MLFLOW_TRACKING_URI") or default_uri("outputs"),
        help="the tracking store (default: $MLFLOW_TRACKING_URI, else ./outputs/mlflow.db)",
    )
    p.add_argument("--experiment", help="only runs of this experiment (default: every experiment)")
    p.add_argument(
        "--idle",
        type=seconds,
        default=3600.0,
        help="close the RUNNING runs that have recorded nothing for this long: 90s, 30m, 2h, 1d (default 1h)",
    )
    p.add_argument("--dry-run", action="store_true", help="list them, close nothing")
    args = p.parse_args(argv)
    try:
        store = Store.existing(args.uri)
        runs = stale(store, args.experiment, args.idle, args.run_ids)
    except ConfigError as e:  # a user's mistake exits 2, as argparse's own and mprun's do
        p.exit(2, f"{p.prog}: error: {e}\n")
    for run in runs:
        why = "named" if args.run_ids else f"RUNNING with nothing recorded for {args.idle / 60:g} min or more"
        if args.dry_run:
            print(f"would close  {run.run_id}  {run.name or '-'}  ({why})")
            continue
        store.set_tags(run.run_id, {"mprun.closed_by": f"python -m mprun.close_stale ({why})"})
        store.close_run(run.run_id, "KILLED")
        print(f"closed KILLED  {run.run_id}  {run.name or '-'}  ({why})")
    if not runs:
        print(f"no stale RUNNING run in {shown(store.uri)}")


if __name__ == "__main__":
    main(sys.argv[1:])

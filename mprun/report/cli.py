"""The precision comparison report of a sweep: the recommendation, one row per precision (its seeds together), and
one row per job.

Written by the sweep itself at its end, or by `python -m mprun.report` (main) for any sweep in a store."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from mprun.errors import ConfigError
from mprun.report import groups as grouping
from mprun.report.notes import notes_for
from mprun.report.plots import plot
from mprun.report.rows import Row, close_running, collect
from mprun.report.tables import Report
from mprun.tracking.store import Store
from mprun.tracking.uris import default_uri


def write(
    parent_id: str, rows: list[Row], out_dir: Path, interrupted: bool = False, tolerance_pp: float = 0.0
) -> Report:
    """report.md with its plots in out_dir, for the collected rows of sweep parent_id (`interrupted`: the sweep was
    stopped, which its notes say, with how to finish it; `tolerance_pp`: the accuracy a precision may lose, in
    percentage points, and still be recommended)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = grouping.group(rows, tolerance_pp)
    notes = notes_for(rows, groups)
    if interrupted:
        notes.append(
            "The sweep was interrupted: jobs it had not started are not listed. To finish it, launch it again "
            "into its directory: the same command with hydra.sweep.dir=<its sweep dir> trainer.resume=auto "
            "(finished jobs keep their results, stopped ones continue, the rest start)."
        )
    report = Report(parent_id, rows, out_dir, notes, groups)
    (out_dir / "report.md").write_text(report.markdown(plot(groups, out_dir)))
    return report


def build(store: Store, parent_id: str, out_dir: Path, stop_running: bool = False, tolerance_pp: float = 0.0) -> Report:
    """Collect the children of parent_id and write report.md with its plots into out_dir.

    stop_running: mark children still RUNNING as KILLED first (the sweep was interrupted)."""
    rows = collect(store, parent_id)
    if stop_running:
        close_running(store, rows)
    return write(parent_id, rows, out_dir, interrupted=stop_running, tolerance_pp=tolerance_pp)


def find_parent(store: Store, what: str) -> str:
    """A parent run id as given, or the newest sweep parent in the experiment of that name."""
    experiment_id = store.find_experiment(what)
    if experiment_id is not None:
        newest = store.newest_sweep(experiment_id)
        if newest is None:
            raise ConfigError(f"experiment {what!r} has no sweep (no run tagged mprun.role=sweep)")
        return newest
    run = store.run(what)
    if run is None:
        raise ConfigError(f"{what!r} is neither a run id nor an experiment name in {store.uri}")
    if run.tags.get("mprun.role") != "sweep":
        raise ConfigError(f"run {what} is not a sweep's parent run (no mprun.role=sweep tag)")
    return what


def default_out(store: Store, parent_id: str) -> Path:
    """Where the report goes by default: next to the sweep it reports on (<sweep dir>/report, which the sweep itself
    wrote at its end), when that directory is on this machine; else outputs/reports/<parent id>."""
    run = store.run(parent_id)
    where = run.tags.get("mprun.sweep_dir") if run is not None else None
    if where and Path(where).is_dir():
        return Path(where) / "report"
    return Path("outputs") / "reports" / parent_id


def main(argv: list[str] | None = None) -> None:
    """python -m mprun.report <parent run id | experiment name>"""
    p = argparse.ArgumentParser(prog="python -m mprun.report", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", help="the sweep's parent run id, or an experiment name (its newest sweep)")
    p.add_argument(
        "--uri",
        default=os.environ.get("MLFLOW_TRACKING_URI") or default_uri("outputs"),
        help="tracking store (default: $MLFLOW_TRACKING_URI, else sqlite:///outputs/mlflow.db)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="directory for report.md and plots (default: the sweep's own <sweep dir>/report when it is on this "
        "machine, else outputs/reports/<parent id>)",
    )
    p.add_argument(
        "--tolerance-pp",
        type=float,
        default=0.0,
        help="what a precision may lose against fp32 and still be recommended, in the headline's unit: percentage "
        "points of accuracy, bits per byte for a language model (default 0: only within noise)",
    )
    p.add_argument("--no-log", action="store_true", help="do not log the report and its verdicts to the parent run")
    args = p.parse_args(argv)
    try:
        store = Store.existing(args.uri)
        parent_id = find_parent(store, args.sweep)
    except ConfigError as e:  # a user's mistake exits 2, as argparse's own and mprun's do
        p.exit(2, f"{p.prog}: error: {e}\n")
    if args.tolerance_pp < 0:
        p.exit(2, f"{p.prog}: error: --tolerance-pp must be >= 0, got {args.tolerance_pp}\n")
    report = build(store, parent_id, args.out or default_out(store, parent_id), tolerance_pp=args.tolerance_pp)
    if not args.no_log:
        store.log_artifact(parent_id, report.out_dir, "report")
        store.set_tags(parent_id, report.tags())
    print(report.console())

"""The precision comparison report of a sweep: one row per job, compared with its fp32 baseline.

Written at the end of every tracked multirun (into <sweep dir>/report/ and the parent run's
artifacts), or on demand:

    python -m mprun.report <parent run id | experiment name> [--uri URI] [--out DIR]

A job's baseline is the FINISHED fp32 job with the same other overrides: all but the precision option and
the settings that change nothing in fp32 (the loss scaler's, fp32_modules; precision.HALF_ONLY). Rows are read
back from the tracking store (tracking.Store), so the report shows what was recorded, nothing else.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mprun.errors import ConfigError, first_line

if TYPE_CHECKING:
    from mprun.tracking import Store

PRECISION_COLORS = {
    "fp32": "tab:blue",
    "tf32": "tab:cyan",
    "fp16": "tab:orange",
    "fp16_static": "tab:red",
    "fp16_unscaled": "tab:purple",
    "bf16": "tab:green",
}


@dataclass
class Row:
    """One sweep job as recorded in its MLflow child run."""

    num: int
    name: str
    run_id: str
    status: str  # MLflow status: FINISHED, FAILED, KILLED (RUNNING only while a sweep is live)
    precision: str  # the resolved precision, e.g. fp32 for precision=auto on a CPU
    requested: str  # the precision option its overrides asked for ("" if none: the default)
    detail: str
    others: tuple[str, ...]  # the job's overrides outside precision: what must match for a baseline
    metrics: dict[str, float]
    error: str = ""
    mem_kind: str = ""  # cuda_max_allocated, or process_peak_rss on the CPU
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    scale_curve: list[tuple[int, float]] = field(default_factory=list)
    baseline: Row | None = None

    def metric(self, key: str) -> float | None:
        value = self.metrics.get(key)
        return None if value is None else float(value)

    @property
    def colour(self) -> str:
        """Its precision option's colour in the plots (auto, or the default, by what it resolved to)."""
        return PRECISION_COLORS.get(self.requested) or PRECISION_COLORS.get(self.precision, "tab:gray")

    @property
    def diverged(self) -> bool:
        """Finished, but with a non-finite loss: it ran, and learned nothing usable."""
        loss = self.metric("final/train_loss")
        return self.status == "FINISHED" and loss is not None and not math.isfinite(loss)

    @property
    def failure(self) -> str:
        """Why the job did not finish; "" if it did (the error of a run that was resumed and finished is history)."""
        return self.error if self.status != "FINISHED" else ""

    @property
    def mark(self) -> str:
        if self.status != "FINISHED":
            return f"**{self.status}**"
        return "**DIVERGED**" if self.diverged else "ok"

    def worst_underflow(self) -> float | None:
        """The largest per-module share of gradients that would flush to zero in fp16 (precision.stats_every_steps)."""
        values = [v for k, v in self.metrics.items() if k.startswith("numerics/underflow/")]
        return max(values) if values else None

    def ratio(self, key: str) -> float | None:
        """This job's metric over its baseline's."""
        if self.baseline is None:
            return None
        mine, base = self.metric(key), self.baseline.metric(key)
        return mine / base if mine is not None and base else None

    def delta_acc(self) -> float | None:
        if self.baseline is None:
            return None
        mine, base = self.metric("final/val_acc"), self.baseline.metric("final/val_acc")
        return None if mine is None or base is None else mine - base


def _others(overrides: str) -> tuple[str, ...]:
    """What an fp32 baseline must share with the job: its overrides but the precision option and the settings that
    change nothing in fp32 (a clipping or on_nonfinite override stays: it changes fp32 runs too)."""
    from mprun.config import outcome_neutral  # imports torch: here, not at start-up
    from mprun.precision import HALF_ONLY

    def compared(o: str) -> bool:  # also not trainer.resume and the like: a requeued job's overrides add it
        name = o.split("=", 1)[0].lstrip("+~")
        group, _, key = name.partition(".")
        return not outcome_neutral(name) and (group != "precision" or bool(key) and key not in HALF_ONLY)

    return tuple(sorted(o for o in overrides.split() if compared(o)))


def _option(overrides: str) -> str | None:
    """The precision option a job asked for (precision=...), if its overrides name one."""
    picked = [o.split("=", 1)[1] for o in overrides.split() if o.lstrip("+~").startswith("precision=")]
    return picked[0] if picked else None


def collect(store: Store, parent_id: str, curves: bool = True) -> list[Row]:
    """The parent's child runs as rows, in job order, each linked to its fp32 baseline if there is one; with
    `curves`, each row also gets the loss (and loss scale) history to plot."""
    from mprun.precision import can_carry_loss_scale  # imports torch: here, not at start-up

    # A requeued sweep job without a checkpoint to resume ran anew: its newest run is the job's row.
    newest: dict[str, Any] = {}
    for run in sorted(store.children(parent_id), key=lambda r: r.start_time):
        newest[run.tags.get("mprun.sweep_job") or run.run_id] = run
    rows = []
    for run in newest.values():
        tags = run.tags
        overrides = tags.get("mprun.overrides", "")
        asked = _option(overrides) or ""
        row = Row(
            num=int(tags.get("mprun.sweep_job", -1)),
            name=run.name or run.run_id,
            run_id=run.run_id,
            status=run.status,
            precision=tags.get("precision") or f"{asked}?",  # a job that failed before resolving it
            requested=asked,
            detail=tags.get("precision_detail", ""),
            others=_others(overrides),
            metrics=dict(run.metrics),
            error=tags.get("error", ""),
            mem_kind=tags.get("peak_mem_kind", ""),
        )
        if curves and run.status != "FAILED":
            row.loss_curve = store.metric_history(run.run_id, "train/loss")
            if can_carry_loss_scale(row.precision):
                row.scale_curve = store.metric_history(run.run_id, "amp/loss_scale")
        rows.append(row)
    rows.sort(key=lambda r: r.num)
    baselines: dict[tuple[str, ...], Row] = {}
    from mprun.precision import is_baseline

    for r in rows:  # of several candidates, the first that asked for fp32 (not auto resolved to it), else the first
        if is_baseline(r.precision) and r.status == "FINISHED" and not r.diverged:
            held = baselines.get(r.others)
            if held is None or (not is_baseline(held.requested) and is_baseline(r.requested)):
                baselines[r.others] = r
    for r in rows:
        r.baseline = baselines.get(r.others)
    return rows


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:{spec}}{suffix}"


COLUMNS = [
    "job",
    "run",
    "precision",
    "status",
    "val acc",
    "Δ acc vs fp32",
    "samples/s",
    "speedup",
    "data wait",
    "peak MiB",
    "mem ratio",
    "skipped",
    "final scale",
    "fp16 grad underflow",
]


def table_rows(rows: list[Row]) -> list[list[str]]:
    """The report's table cells, one list per job."""
    from mprun.precision import can_carry_loss_scale  # imports torch: here, not at start-up

    out = []
    for r in rows:
        d = r.delta_acc()
        out.append(
            [
                str(r.num),
                r.name,
                r.precision,
                r.mark,
                _fmt(r.metric("final/val_acc"), ".4f"),
                _fmt(None if d is None else 100 * d, "+.2f", " pp"),
                _fmt(r.metric("final/samples_per_s"), ",.0f"),
                _fmt(r.ratio("final/samples_per_s"), ".2f", "×"),
                _fmt(r.metric("final/data_wait_frac"), ".0%"),
                _fmt(r.metric("final/peak_mem_mib"), ",.0f"),
                _fmt(r.ratio("final/peak_mem_mib"), ".2f", "×"),
                _fmt(r.metric("final/skipped_steps"), ".0f"),
                _fmt(r.metric("final/loss_scale"), "g") if can_carry_loss_scale(r.precision) else "—",
                _fmt(r.worst_underflow(), ".1%"),
            ]
        )
    return out


def _clip(line: str, width: int) -> str:
    return line if len(line) <= width else line[: width - 1] + "…"


@dataclass
class Report:
    parent_id: str
    rows: list[Row]
    out_dir: Path
    notes: list[str]

    def markdown(self, plots: list[str]) -> str:
        lines = [f"# Precision comparison: sweep {self.parent_id}", ""]
        lines += [f"- {n}" for n in self.notes] + [""]
        lines.append("| " + " | ".join(COLUMNS) + " |")
        lines.append("|" + "---|" * len(COLUMNS))
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in table_rows(self.rows)]
        failed = [r for r in self.rows if r.failure]
        if failed:
            lines += ["", "## Failed jobs", ""] + [f"- job {r.num} `{r.name}`: {r.failure}" for r in failed]
        lines += [""] + [f"![{p}]({p})" for p in plots]
        return "\n".join(lines) + "\n"

    def console(self) -> str:
        """The table as aligned plain text, for the end of a multirun."""
        cells = [COLUMNS] + table_rows(self.rows)
        widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
        text = ["", "── mprun sweep report " + "─" * 40]
        text += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
        text += self.notes
        failed = [r for r in self.rows if r.failure]
        text += [f"failed      job {r.num} {r.name}: {_clip(first_line(r.failure), 160)}" for r in failed]
        text += [f"report      {self.out_dir / 'report.md'}"]
        return "\n".join(text)


def notes_for(rows: list[Row]) -> list[str]:
    """The caveats a reader needs before reading the numbers."""
    from mprun.loop import INPUT_BOUND  # the threshold the runs warned at (imports torch: here, not at start-up)
    from mprun.precision import can_carry_loss_scale, computes_in_half, is_baseline

    notes = []
    if not rows:
        notes.append("No jobs recorded under this parent run.")
    elif not any(r.baseline for r in rows):
        # fp32 jobs that could not be one: failed (before it resolved its precision, it asked for fp32), stopped,
        # diverged
        unusable = [r for r in rows if (is_baseline(r.precision) or is_baseline(r.requested)) and r.mark != "ok"]
        notes.append(
            "No finished fp32 job to compare with: Δ acc, speedup and memory ratio are not computed. "
            + (
                f"The fp32 job {unusable[0].num} is {unusable[0].mark.strip('*')}."
                if unusable
                else "Add precision=fp32 to the sweep for a baseline."
            )
        )
    else:
        notes.append(
            "Baseline: the finished fp32 job with the same other overrides (loss-scaler settings aside; one "
            "that asked for precision=fp32 before one that auto resolved to it). Speedup = samples/s ÷ "
            "baseline's; mem ratio = peak memory ÷ baseline's."
        )
    cpu = [r for r in rows if r.mem_kind == "process_peak_rss"]
    if cpu:
        notes.append(
            "CPU jobs: peak memory is the process's peak resident set during the job (libraries included), "
            "not tensor memory; only GPU jobs measure tensor memory."
        )
    if any(computes_in_half(r.precision) for r in cpu):
        notes.append(
            "CPU jobs in fp16/bf16: a CPU without the AMX unit for that dtype emulates it (the run logged a "
            "warning if so), so their speed says nothing of a GPU's; measure speed on the GPU you will train "
            "on."
        )
    if any(not can_carry_loss_scale(r.precision) and r.worst_underflow() is not None for r in rows):
        notes.append(
            "fp16 grad underflow of a job that is not fp16: the share of its gradients that fp16 would flush "
            "to zero (what a loss scale is for); bf16 and fp32 keep them, having fp32's exponent range."
        )
    starved = [r.name for r in rows if (r.metric("final/data_wait_frac") or 0) > INPUT_BOUND]
    if starved:
        notes.append(
            f"Input-bound (waited for data more than {INPUT_BOUND:.0%} of training): {', '.join(starved)}. "
            "Their samples/s measure the input pipeline, so their speedup understates what the precision "
            "does; see the run logs' input-bound warning for what to change."
        )
    bad = [r for r in rows if r.mark != "ok"]
    if bad:
        notes.append(f"{len(bad)} of {len(rows)} jobs did not finish cleanly (marked in the table).")
    return notes


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path.name


def plot(rows: list[Row], out_dir: Path) -> list[str]:
    """loss.png, loss_scale.png (fp16 jobs) and perf.png; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    styles = ["-", "--", ":", "-."]
    drawn: dict[str, int] = {}  # colour -> lines drawn in it: colour says the precision option, each line its own style
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in rows:
        if r.loss_curve:
            steps, values = zip(*r.loss_curve, strict=True)
            nth = drawn[r.colour] = drawn.get(r.colour, -1) + 1
            ax.plot(steps, values, label=r.name, color=r.colour, alpha=0.85, linestyle=styles[nth % len(styles)])
    if ax.lines:
        ax.set(
            xlabel="optimizer step", ylabel="train loss (log-window mean)", title="Training loss by job", yscale="log"
        )
        ax.legend(fontsize="small")
        written.append(_save(fig, out_dir / "loss.png"))
    plt.close(fig)

    scaled = [r for r in rows if r.scale_curve]
    if scaled:
        fig, ax = plt.subplots(figsize=(8, 4))
        for r in scaled:
            steps, values = zip(*r.scale_curve, strict=True)
            ax.step(steps, values, where="post", label=r.name)
        ax.set(xlabel="optimizer step", ylabel="loss scale", title="fp16 loss scale", yscale="log")
        ax.legend(fontsize="small")
        written.append(_save(fig, out_dir / "loss_scale.png"))
        plt.close(fig)

    done = [r for r in rows if r.metric("final/samples_per_s") is not None]
    if done:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.5 * len(done) + 2))
        names = [r.name for r in done]
        colors = [r.colour for r in done]
        left.barh(names, [r.metric("final/samples_per_s") for r in done], color=colors)
        left.set(xlabel="samples/s", title="Throughput")
        right.barh(names, [r.metric("final/peak_mem_mib") or 0 for r in done], color=colors)
        right.set(xlabel="MiB", title="Peak memory")
        right.set_yticklabels([])
        for axis in (left, right):
            axis.invert_yaxis()
        written.append(_save(fig, out_dir / "perf.png"))
        plt.close(fig)
    return written


def close_running(store: Store, rows: list[Row]) -> None:
    """Close the jobs still RUNNING as KILLED, in the store and in their rows: the sweep was interrupted, and a worker
    killed mid-job could not close its own run."""
    for row in rows:
        if row.status == "RUNNING":
            store.close_run(row.run_id, "KILLED")
            row.status = "KILLED"  # as the store now has it (a RUNNING row is no baseline either way)


def write(parent_id: str, rows: list[Row], out_dir: Path, interrupted: bool = False) -> Report:
    """report.md with its plots in out_dir, for the collected rows of sweep parent_id (`interrupted`: the sweep was
    stopped, which its notes say, with how to finish it)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    notes = notes_for(rows)
    if interrupted:
        notes.append(
            "The sweep was interrupted: jobs it had not started are not listed. To finish it, launch it again "
            "into its directory: the same command with hydra.sweep.dir=<its sweep dir> trainer.resume=auto "
            "(finished jobs keep their results, stopped ones continue, the rest start)."
        )
    report = Report(parent_id, rows, out_dir, notes)
    (out_dir / "report.md").write_text(report.markdown(plot(rows, out_dir)))
    return report


def build(store: Store, parent_id: str, out_dir: Path, stop_running: bool = False) -> Report:
    """Collect the children of parent_id and write report.md with its plots into out_dir.

    stop_running: mark children still RUNNING as KILLED first (the sweep was interrupted)."""
    rows = collect(store, parent_id)
    if stop_running:
        close_running(store, rows)
    return write(parent_id, rows, out_dir, interrupted=stop_running)


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


def main(argv: list[str] | None = None) -> None:
    """python -m mprun.report <parent run id | experiment name>"""
    from mprun.tracking import Store, default_uri

    p = argparse.ArgumentParser(prog="python -m mprun.report", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", help="the sweep's parent run id, or an experiment name (its newest sweep)")
    p.add_argument(
        "--uri",
        default=os.environ.get("MLFLOW_TRACKING_URI") or default_uri("outputs"),
        help="tracking store (default: $MLFLOW_TRACKING_URI, else sqlite:///outputs/mlflow.db)",
    )
    p.add_argument("--out", type=Path, help="directory for report.md and plots (default: outputs/reports/<parent id>)")
    p.add_argument("--no-log", action="store_true", help="do not log the report to the parent run")
    args = p.parse_args(argv)
    try:
        if args.uri.startswith("sqlite:///") and not Path(args.uri[len("sqlite:///") :]).is_file():
            raise ConfigError(f"no MLflow store at {args.uri}; pass --uri or set MLFLOW_TRACKING_URI")
        store = Store(args.uri)
        parent_id = find_parent(store, args.sweep)
    except ConfigError as e:  # a user's mistake exits 2, as argparse's own and mprun's do
        p.exit(2, f"{p.prog}: error: {e}\n")
    report = build(store, parent_id, args.out or Path("outputs") / "reports" / parent_id)
    if not args.no_log:
        store.log_artifact(parent_id, report.out_dir, "report")
    print(report.console())


if __name__ == "__main__":
    main(sys.argv[1:])

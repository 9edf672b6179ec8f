"""A sweep's jobs as read back from the tracking store: one Row per child run, with its fp32 baseline."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mprun.config import outcome_neutral
from mprun.precision.names import HALF_ONLY, can_carry_loss_scale, is_baseline

if TYPE_CHECKING:
    from mprun.tracking.store import Store


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
    timed_epochs: int | None = None  # epochs its throughput is the median of (1: a single epoch, warm-up included)
    headline: str = "val_acc"  # what its task is judged on (mprun.report.groups.HEADLINES): val_bpb for a byte-level LM
    setting: tuple[str, ...] | None = None  # its overrides but the precision option (others keeps fewer); None: others
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    scale_curve: list[tuple[int, float]] = field(default_factory=list)
    baseline: Row | None = None
    best: tuple[str, float, int, int] | None = None  # its best checkpoint: (metric, score, epoch, step)

    def metric(self, key: str) -> float | None:
        value = self.metrics.get(key)
        return None if value is None else float(value)

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

    @property
    def single_epoch_speed(self) -> bool:
        """Whether its speedup rests on a single timed epoch (its own or its baseline's), warm-up included."""
        return 1 in (self.timed_epochs, self.baseline.timed_epochs if self.baseline else None)

    def delta(self, key: str) -> float | None:
        """This job's metric minus its baseline's."""
        if self.baseline is None:
            return None
        mine, base = self.metric(key), self.baseline.metric(key)
        return None if mine is None or base is None else mine - base


def _others(overrides: str) -> tuple[str, ...]:
    """What an fp32 baseline must share with the job: its overrides but the precision option and the settings that
    change nothing in fp32 (a clipping or on_nonfinite override stays: it changes fp32 runs too)."""

    def compared(o: str) -> bool:  # also not trainer.resume and the like: a requeued job's overrides add it
        name = o.split("=", 1)[0].lstrip("+~")
        group, _, key = name.partition(".")
        return not outcome_neutral(name) and (group != "precision" or bool(key) and key not in HALF_ONLY)

    return tuple(sorted(o for o in overrides.split() if compared(o)))


def _own(overrides: str) -> tuple[str, ...]:
    """A job's overrides but its precision option and the settings that change no outcome: what, with the option,
    makes its group (the seed aside, which mprun.report.groups takes out)."""

    def kept(o: str) -> bool:
        name = o.split("=", 1)[0].lstrip("+~")
        return name != "precision" and not outcome_neutral(name)

    return tuple(sorted(o for o in overrides.split() if kept(o)))


def _option(overrides: str) -> str | None:
    """The precision option a job asked for (precision=...), if its overrides name one."""
    picked = [o.split("=", 1)[1] for o in overrides.split() if o.lstrip("+~").startswith("precision=")]
    return picked[0] if picked else None


def collect(store: Store, parent_id: str, curves: bool = True) -> list[Row]:
    """The parent's child runs as rows, in job order, each linked to its fp32 baseline if there is one; with
    `curves`, each row also gets the loss (and loss scale) history to plot."""

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
            timed_epochs=int(tags["mprun.timed_epochs"]) if tags.get("mprun.timed_epochs", "").isdigit() else None,
            headline=tags.get("mprun.headline", "val_acc"),
            setting=_own(overrides),
            best=_best_of(tags),
        )
        if curves and run.status != "FAILED":
            row.loss_curve = store.metric_history(run.run_id, "train/loss")
            if can_carry_loss_scale(row.precision):
                row.scale_curve = store.metric_history(run.run_id, "amp/loss_scale")
        rows.append(row)
    rows.sort(key=lambda r: r.num)
    baselines: dict[tuple[str, ...], Row] = {}

    for r in rows:  # of several candidates, the first that asked for fp32 (not auto resolved to it), else the first
        if is_baseline(r.precision) and r.status == "FINISHED" and not r.diverged:
            held = baselines.get(r.others)
            if held is None or (not is_baseline(held.requested) and is_baseline(r.requested)):
                baselines[r.others] = r
    for r in rows:
        r.baseline = baselines.get(r.others)
    return rows


def _best_of(tags: dict[str, str]) -> tuple[str, float, int, int] | None:
    """A job's best checkpoint, from the tags its run records with checkpoints/best.pt (trainer.keep_best)."""
    try:
        return (tags["mprun.best_metric"], float(tags["mprun.best_score"]), int(tags["mprun.best_epoch"]),
                int(tags["mprun.best_step"]))  # fmt: skip
    except (KeyError, ValueError):
        return None


def close_running(store: Store, rows: list[Row]) -> None:
    """Close the jobs still RUNNING as KILLED, in the store and in their rows: the sweep was interrupted, and a worker
    killed mid-job could not close its own run."""
    for row in rows:
        if row.status == "RUNNING":
            store.close_run(row.run_id, "KILLED")
            row.status = "KILLED"  # as the store now has it (a RUNNING row is no baseline either way)

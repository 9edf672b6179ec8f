"""The precision comparison report of a sweep: the recommendation, one row per precision (its seeds together), and
one row per job.

Written at the end of every tracked multirun (into <sweep dir>/report/ and the parent run's
artifacts), or on demand:

    python -m mprun.report <parent run id | experiment name> [--uri URI] [--out DIR] [--tolerance-pp PP]

A job's baseline is the FINISHED fp32 job with the same other overrides: all but the precision option and
the settings that change nothing in fp32 (the loss scaler's, fp32_modules; precision.HALF_ONLY). Jobs that differ
only in trainer.seed form a group, compared with its fp32 group (mprun.groups). Rows are read back from the tracking
store (tracking.Store), so the report shows what was recorded, nothing else.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mprun import groups as grouping
from mprun.errors import ConfigError, first_line
from mprun.precision.names import HALF_ONLY, can_carry_loss_scale, computes_in_half, is_baseline, sweep_note

if TYPE_CHECKING:
    from mprun.tracking.store import Store

PRECISION_COLORS = {
    "fp32": "tab:blue",
    "tf32": "tab:cyan",
    "fp16": "tab:orange",
    "fp16_static": "tab:red",
    "fp16_unscaled": "tab:purple",
    "bf16": "tab:green",
    "bf16_pure": "tab:olive",
    "fp8": "tab:brown",
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
    timed_epochs: int | None = None  # epochs its throughput is the median of (1: a single epoch, warm-up included)
    headline: str = "val_acc"  # what its task is judged on (mprun.groups.HEADLINES): val_bpb for a byte-level LM
    setting: tuple[str, ...] | None = None  # its overrides but the precision option (others keeps fewer); None: others
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    scale_curve: list[tuple[int, float]] = field(default_factory=list)
    baseline: Row | None = None

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
    from mprun.config import outcome_neutral  # imports torch: here, not at start-up

    def compared(o: str) -> bool:  # also not trainer.resume and the like: a requeued job's overrides add it
        name = o.split("=", 1)[0].lstrip("+~")
        group, _, key = name.partition(".")
        return not outcome_neutral(name) and (group != "precision" or bool(key) and key not in HALF_ONLY)

    return tuple(sorted(o for o in overrides.split() if compared(o)))


def _own(overrides: str) -> tuple[str, ...]:
    """A job's overrides but its precision option and the settings that change no outcome: what, with the option,
    makes its group (the seed aside, which mprun.groups takes out)."""
    from mprun.config import outcome_neutral

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


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:{spec}}{suffix}"


COLUMNS = [
    "job",
    "run",
    "precision",
    "status",
    "{label}",
    "Δ {short} vs fp32",
    "{rate}",
    "speedup",
    "data wait",
    "peak MiB",
    "mem ratio",
    "param+state MiB",
    "skipped",
    "final scale",
    "fp16 grad underflow",
]


# Marks a speedup that rests on a single timed epoch (warm-up included): a run of one epoch, or one resumed into its
# last; its throughput includes start-up costs the other epochs' medians leave out.
SINGLE_EPOCH = "†"


def _rate(rows: list[Row]) -> tuple[str, str]:
    """The throughput to show, (metric, unit): tokens/s where every finished job measured it (language models; what
    their users compare), else samples/s. Speedups are the same either way: a job and its baseline share the
    sequence length."""
    done = [r for r in rows if r.mark == "ok"]
    if done and all(r.metric(grouping.TOKENS) for r in done):
        return grouping.TOKENS, "tokens/s"
    return grouping.THROUGHPUT, "samples/s"


def _named(templates: list[str], h: grouping.Headline, rate: str) -> list[str]:
    """Column titles named by a headline metric and a throughput unit: val acc, Δ acc vs fp32, samples/s (val bpb,
    Δ bpb, tokens/s for a language model)."""
    return [c.format(label=h.label, short=h.short, rate=rate) for c in templates]


def _with_mfu(rows: list[Row], cells: list[str], mfu: str, table: list[str] = COLUMNS) -> list[str]:
    """A row of `table`'s cells with the MFU one after the speedup, where a job measured it (a language model on a
    GPU: the share of the GPU's peak matmul rate in the run's dtype it reached); else as they are. Cells ahead of the
    table's columns (the group table's setting) are counted in."""
    if not any(r.metric(grouping.MFU) for r in rows):
        return cells
    at = len(cells) - len(table) + table.index("speedup") + 1
    return [*cells[:at], mfu, *cells[at:]]


def columns(rows: list[Row]) -> list[str]:
    """COLUMNS, named by the jobs' headline metric and throughput unit (and MFU where a job measured it)."""
    return _with_mfu(rows, _named(COLUMNS, grouping.headline_of(rows), _rate(rows)[1]), "MFU")


def table_rows(rows: list[Row]) -> list[list[str]]:
    """The report's table cells, one list per job."""

    h, (rate, _) = grouping.headline_of(rows), _rate(rows)
    out = []
    for r in rows:
        d = r.delta(h.key)
        out.append(
            [
                str(r.num),
                r.name,
                r.precision,
                r.mark,
                _fmt(r.metric(h.key), ".4f"),
                "—" if d is None or not math.isfinite(d) else f"{h.show(d, sign=True)} {h.unit}",
                _fmt(r.metric(rate), ",.0f"),
                _fmt(r.ratio(grouping.THROUGHPUT), ".2f", "×" + SINGLE_EPOCH * r.single_epoch_speed),
                _fmt(r.metric("final/data_wait_frac"), ".0%"),
                _fmt(r.metric("final/peak_mem_mib"), ",.0f"),
                _fmt(r.ratio("final/peak_mem_mib"), ".2f", "×"),
                _fmt(r.metric(grouping.STATE), ",.1f"),
                _fmt(r.metric("final/skipped_steps"), ".0f"),
                _fmt(r.metric("final/loss_scale"), "g") if can_carry_loss_scale(r.precision) else "—",
                _fmt(r.worst_underflow(), ".1%"),
            ]
        )
        out[-1] = _with_mfu(rows, out[-1], _fmt(r.metric(grouping.MFU), ".1%"))
    return out


GROUP_COLUMNS = [
    "precision",
    "seeds",
    "{label} (mean ± sd)",
    "Δ {short} vs fp32 (95% CI)",
    "verdict",
    "{rate} (median, min–max)",
    "speedup",
    "peak MiB",
    "mem ratio",
    "param+state MiB",
    "skipped",
]


def _spread(values: list[float], spec: str) -> str:
    """'7,355 (6,100–8,400)': the median, with the range when there are several values."""
    if not values:
        return "—"
    middle = f"{statistics.median(values):{spec}}"
    low, high = f"{min(values):{spec}}", f"{max(values):{spec}}"
    return middle if low == high else f"{middle} ({low}–{high})"


def group_columns(groups: list[grouping.Group]) -> list[str]:
    """GROUP_COLUMNS, with a setting column first when the sweep varied more than precision and seed."""
    rows = [r for g in groups for r in g.rows]
    named = _named(GROUP_COLUMNS, grouping.headline_of(rows), _rate(rows)[1])
    named = (["setting"] if any(grouping.setting(g, groups) for g in groups) else []) + named
    return _with_mfu(rows, named, "MFU", GROUP_COLUMNS)


def group_rows(groups: list[grouping.Group]) -> list[list[str]]:
    """The group table's cells, one list per group."""
    out = []
    settings = [grouping.setting(g, groups) for g in groups]
    rows = [r for g in groups for r in g.rows]
    rate = _rate(rows)[0]
    for g, setting in zip(groups, settings):
        values = g.values(g.headline.key)
        acc = grouping.mean_sd(values) if values else "—"
        seeds = str(len(g.used))
        if g.left_out:
            seeds += " (left out: " + ", ".join(f"job {r.num} {r.mark.strip('*')}" for r in g.left_out) + ")"
        cells = [
            g.label,
            seeds,
            acc,
            g.delta_text(),
            g.verdict,
            _spread(g.values(rate), ",.0f"),
            _fmt(g.ratio(grouping.THROUGHPUT), ".2f", "×" + SINGLE_EPOCH * any(r.single_epoch_speed for r in g.used)),
            _fmt(g.median(grouping.MEMORY), ",.0f"),
            _fmt(g.ratio(grouping.MEMORY), ".2f", "×"),
            _fmt(g.median(grouping.STATE), ",.1f"),
            _spread(g.values(grouping.SKIPPED), ".0f"),
        ]
        cells = ([setting or "—"] if any(settings) else []) + cells
        out.append(_with_mfu(rows, cells, _fmt(g.median(grouping.MFU), ".1%"), GROUP_COLUMNS))
    return out


def _clip(line: str, width: int) -> str:
    return line if len(line) <= width else line[: width - 1] + "…"


def _table(columns: list[str], cells: list[list[str]]) -> list[str]:
    """A markdown table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]


def _aligned(columns: list[str], cells: list[list[str]]) -> list[str]:
    """A table as aligned plain text, for a terminal: a column no row has a value in ("—") is left out (report.md
    keeps every column), e.g. the fp16 columns of a sweep without fp16, or Δ and speedup without an fp32 job."""
    kept = [i for i in range(len(columns)) if not cells or any(row[i] != "—" for row in cells)]
    rows = [[row[i] for i in kept] for row in (columns, *cells)]
    columns = rows[0]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]


@dataclass
class Report:
    parent_id: str
    rows: list[Row]
    out_dir: Path
    notes: list[str]
    groups: list[grouping.Group] = field(default_factory=list)

    @property
    def seeded(self) -> bool:
        """Whether some group has several jobs (seeds): then the group table says more than the job table."""
        return any(len(g.rows) > 1 for g in self.groups)

    def recommendation(self) -> list[str]:
        return grouping.recommendation(self.groups)

    def best(self) -> list[str]:
        return grouping.best_settings(self.groups)

    def tags(self) -> dict[str, str]:
        """What the parent run gets, to be read in the MLflow UI without opening the report."""
        best = {"mprun.best_setting": " | ".join(lines)[:5000]} if (lines := self.best()) else {}
        return {"mprun.recommendation": " | ".join(self.recommendation())[:5000], **best, **grouping.tags(self.groups)}

    def markdown(self, plots: list[str]) -> str:
        lines = [f"# Precision comparison: sweep {self.parent_id}", ""]
        lines += [f"**{line}**" for line in self.recommendation()] + [""]
        if best := self.best():
            lines += ["Best setting per precision, on the mean over its seeds:", ""]
            lines += [f"- {line}" for line in best] + [""]
        lines += ["## By precision (seeds together)", ""]
        lines += _table(group_columns(self.groups), group_rows(self.groups)) + [""]
        lines += [f"- {n}" for n in self.notes] + [""]
        lines += ["## By job", ""] + _table(columns(self.rows), table_rows(self.rows))
        failed = [r for r in self.rows if r.failure]
        if failed:
            lines += ["", "## Failed jobs", ""] + [f"- job {r.num} `{r.name}`: {r.failure}" for r in failed]
        lines += [""] + [f"![{p}]({p})" for p in plots]
        return "\n".join(lines) + "\n"

    def console(self) -> str:
        """The table as aligned plain text, for the end of a multirun: by precision when seeds were swept (the job
        table is in report.md), else by job."""
        text = ["", "── mprun sweep report " + "─" * 40]
        if self.seeded:
            text += _aligned(group_columns(self.groups), group_rows(self.groups))
        else:  # a status as a word, not markdown's **KILLED**
            text += _aligned(columns(self.rows), [[c.strip("*") for c in cells] for cells in table_rows(self.rows)])
        text += self.notes
        failed = [r for r in self.rows if r.failure]
        text += [f"failed      job {r.num} {r.name}: {_clip(first_line(r.failure), 160)}" for r in failed]
        text += [f"recommend   {line}" for line in self.recommendation()]
        text += [f"best        {line}" for line in self.best()]
        text += [f"report      {self.out_dir / 'report.md'}"]
        return "\n".join(text)


SLOW = 0.8  # a CPU half precision below this share of fp32's throughput is noted as having no fast path


def notes_for(rows: list[Row], groups: list[grouping.Group] | None = None) -> list[str]:
    """The caveats a reader needs before reading the numbers (groups: the rows' groups, if made already)."""
    from mprun.loop import INPUT_BOUND  # the threshold the runs warned at (imports torch: here, not at start-up)

    notes = []
    if not rows:
        notes.append("No jobs recorded under this parent run.")
    elif not any(r.baseline for r in rows):
        # fp32 jobs that could not be one: failed (before it resolved its precision, it asked for fp32), stopped,
        # diverged
        unusable = [r for r in rows if (is_baseline(r.precision) or is_baseline(r.requested)) and r.mark != "ok"]
        notes.append(
            f"No finished fp32 job to compare with: Δ {grouping.headline_of(rows).short}, speedup and "
            "memory ratio are not computed. "
            + (
                f"The fp32 job {unusable[0].num} is {unusable[0].mark.strip('*')}."
                if unusable
                else "Add precision=fp32 to the sweep for a baseline."
            )
        )
    else:
        notes.append(
            "Baseline: the finished fp32 job with the same other overrides (loss-scaler settings aside; one "
            "that asked for precision=fp32 before one that auto resolved to it). Speedup = throughput ÷ "
            "baseline's; mem ratio = peak memory ÷ baseline's."
        )
    cpu = [r for r in rows if r.mem_kind == "process_peak_rss"]
    if cpu:
        notes.append(
            "CPU jobs: peak memory is the process's peak resident set during the job (libraries included), "
            "not tensor memory, and says little about precision; only GPU jobs measure tensor memory. The "
            "memory plot shows parameter and optimizer-state bytes (param+state MiB) instead."
        )
    groups = grouping.group(rows) if groups is None else groups
    h = grouping.headline_of(rows)
    if any(len(g.rows) > 1 for g in groups):
        notes.append(
            f"By precision: the jobs that differ only in trainer.seed. {h.label} is their mean ± sample sd over the "
            f"finished jobs; Δ {h.short} is the difference from the fp32 group's mean with a 95% "
            "Welch t interval; "
            "'within noise' when that interval contains 0. Throughput and memory are medians over the seeds, "
            "speedup and mem ratio medians over the fp32 group's."
        )
    # Measured here, not assumed from the CPU's flags (some CPUs run bf16 faster than fp32): a half precision whose
    # every group ran clearly slower than fp32 (under SLOW: not the few percent runs differ by anyway).
    fastest: dict[str, float] = {}
    for g in groups:
        speedup = g.ratio(grouping.THROUGHPUT)
        if (
            computes_in_half(g.precision)
            and speedup is not None
            and any(r.mem_kind == "process_peak_rss" for r in g.used)
        ):
            fastest[g.precision] = max(speedup, fastest.get(g.precision, 0.0))
    for name, speedup in fastest.items():
        if speedup < SLOW:
            notes.append(
                f"On this CPU, {name} ran at {speedup:.2f}× fp32's throughput (measured in this sweep): the CPU "
                "has no fast path for that dtype, so its speed here says nothing of a GPU's; measure speed on the "
                "GPU you will train on."
            )
    notes += [n for n in (sweep_note(tag) for tag in dict.fromkeys(r.precision for r in rows)) if n]
    if any(not can_carry_loss_scale(r.precision) and r.worst_underflow() is not None for r in rows):
        notes.append(
            "fp16 grad underflow of a job that is not fp16: the share of its gradients that fp16 would flush "
            "to zero (what a loss scale is for); bf16 and fp32 keep them, having fp32's exponent range."
        )
    if any(r.single_epoch_speed and r.ratio(grouping.THROUGHPUT) is not None for r in rows):
        notes.append(
            f"{SINGLE_EPOCH} speedup from a single timed epoch (its job's or its baseline's), warm-up included "
            "(compilation, allocator and cache warm-up): run 2 epochs or more for a speedup that leaves them out."
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
        # Of those recorded: an interrupted sweep's unstarted jobs have no run ("1 of 1 jobs" in a 3-job sweep).
        started = f"the {len(rows)} job{'s' * (len(rows) != 1)} that started"
        notes.append(f"{len(bad)} of {started} did not finish cleanly (marked in the table).")
    return notes


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path.name


def _colour(g: grouping.Group) -> str:
    """Its precision option's colour (auto, or the default, by what it resolved to)."""
    return PRECISION_COLORS.get(g.option) or PRECISION_COLORS.get(g.precision, "tab:gray")


def _name(g: grouping.Group, groups: list[grouping.Group]) -> str:
    return " ".join(filter(None, (g.label, grouping.setting(g, groups))))


def _mean_curve(rows: list[Row]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps, mean, min and max of the rows' loss curves, at the steps they all logged."""
    curves = [dict(r.loss_curve) for r in rows if r.loss_curve]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    values = [[c[s] for c in curves] for s in steps]
    return steps, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def plot(groups: list[grouping.Group], out_dir: Path) -> list[str]:
    """loss.png (a mean curve per group, its seeds' range as a band), loss_scale.png (fp16 jobs) and perf.png (medians,
    with the seeds' range as error bars); returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    drawn: dict[str, int] = {}  # colour -> lines drawn in it: colour says the precision option, each line its own style
    curves = [(g, _mean_curve([r for r in g.rows if r.status != "FAILED"])) for g in groups]
    curves = [(g, c) for g, c in curves if c[0]]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (g, (steps, mean, low, high)) in enumerate(curves):
        nth = drawn[_colour(g)] = drawn.get(_colour(g), -1) + 1
        n = len([r for r in g.rows if r.loss_curve])
        label = _name(g, groups) + (f" (mean of {n})" if n > 1 else "")
        # Curves that coincide (fp16 with and without a loss scale, until the first overflow) hide each other: each
        # line has its own marker, placed at its own offset along the steps, so every line stays visible.
        every = max(1, len(steps) // 6)
        style = {"linestyle": styles[nth % len(styles)], "marker": markers[i % len(markers)], "markersize": 5}
        ax.plot(steps, mean, label=label, color=_colour(g), alpha=0.85, markevery=(i * every // len(curves), every),
                **style)  # fmt: skip
        if n > 1:
            ax.fill_between(steps, low, high, color=_colour(g), alpha=0.15, linewidth=0)
    if ax.lines:
        ax.set(
            xlabel="optimizer step",
            ylabel="train loss (log-window mean)",
            title="Training loss by precision",
            yscale="log",
        )
        ax.legend(fontsize="small")
        written.append(_save(fig, out_dir / "loss.png"))
    plt.close(fig)

    scaled = [r for g in groups for r in g.rows if r.scale_curve]
    if scaled:
        fig, ax = plt.subplots(figsize=(8, 4))
        for r in scaled:
            steps, values = zip(*r.scale_curve, strict=True)
            ax.step(steps, values, where="post", label=r.name)
        ax.set(xlabel="optimizer step", ylabel="loss scale", title="fp16 loss scale", yscale="log")
        ax.legend(fontsize="small")
        written.append(_save(fig, out_dir / "loss_scale.png"))
        plt.close(fig)

    done = [g for g in groups if g.values(grouping.THROUGHPUT)]
    if done:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.5 * len(done) + 2))
        names = [_name(g, groups) for g in done]
        colors = [_colour(g) for g in done]
        # A GPU's peak is tensor memory, which precision changes; a CPU's is the process's peak RSS (libraries,
        # allocator), which says little of it: there the bars show the parameter and optimizer-state bytes.
        gpu = all(r.mem_kind == "cuda_max_allocated" for g in done for r in g.used)
        memory = (grouping.MEMORY, "Peak GPU memory") if gpu else (grouping.STATE, "Parameters + optimizer state")
        rate = _rate([r for g in done for r in g.rows])
        for axis, key, title, unit in ((left, rate[0], "Throughput", rate[1]), (right, *memory, "MiB")):
            medians = [g.median(key) or 0 for g in done]
            spans = [g.values(key) or [0.0] for g in done]
            errors = [[m - min(v) for m, v in zip(medians, spans)], [max(v) - m for m, v in zip(medians, spans)]]
            axis.barh(names, medians, color=colors, xerr=errors, capsize=3)
            axis.set(xlabel=f"{unit} (median; bars: min–max over seeds)", title=title)
            axis.invert_yaxis()
        right.set_yticklabels([])
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
    from mprun.tracking.store import Store, default_uri

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


if __name__ == "__main__":
    main(sys.argv[1:])

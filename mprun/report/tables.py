"""The report's tables: by job and by precision (seeds together), as markdown and as aligned text; Report."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from mprun.errors import first_line
from mprun.precision.names import can_carry_loss_scale
from mprun.report import groups as grouping
from mprun.report.rows import Row
from mprun.training.config import BEST_METRICS


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


def rate_of(rows: list[Row]) -> tuple[str, str]:
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
    return _with_mfu(rows, _named(COLUMNS, grouping.headline_of(rows), rate_of(rows)[1]), "MFU")


def table_rows(rows: list[Row]) -> list[list[str]]:
    """The report's table cells, one list per job."""

    h, (rate, _) = grouping.headline_of(rows), rate_of(rows)
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
    named = _named(GROUP_COLUMNS, grouping.headline_of(rows), rate_of(rows)[1])
    named = (["setting"] if any(grouping.setting(g, groups) for g in groups) else []) + named
    return _with_mfu(rows, named, "MFU", GROUP_COLUMNS)


def group_rows(groups: list[grouping.Group]) -> list[list[str]]:
    """The group table's cells, one list per group."""
    out = []
    settings = [grouping.setting(g, groups) for g in groups]
    rows = [r for g in groups for r in g.rows]
    rate = rate_of(rows)[0]
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
        lines += best_checkpoints(self.rows)
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


def best_checkpoints(rows: list[Row]) -> list[str]:
    """report.md's list of each job's best checkpoint (trainer.keep_best), the sweep's best of each metric first."""
    kept = [r for r in rows if r.best is not None]
    if not kept:
        return []
    lines = ["", "## Best checkpoints", ""]
    for metric in dict.fromkeys(r.best[0] for r in kept):
        scored = [r for r in kept if r.best[0] == metric]
        top = (max if BEST_METRICS.get(metric, True) else min)(scored, key=lambda r: r.best[1])
        lines.append(f"The best {metric} of the sweep: job {top.num} `{top.name}` (run {top.run_id}).")
    lines.append("")
    lines += [
        f"- job {r.num} `{r.name}`: {r.best[0]} {r.best[1]:.4g} at epoch {r.best[2]}, step {r.best[3]}: "
        f"`checkpoints/best.pt` of run {r.run_id}"
        for r in kept
    ]
    return lines

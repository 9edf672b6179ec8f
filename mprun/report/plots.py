"""The report's plots: loss curves, loss scales, throughput and memory per precision (matplotlib, loaded when drawn)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Optional

from mprun.report import groups as grouping
from mprun.report.rows import Row
from mprun.report.tables import rate_of

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


def _plot_loss(plt: Any, groups: list[grouping.Group], out_dir: Path) -> Optional[str]:
    """Draw loss.png: a mean curve per group, its seeds' range as a band; returns its name, or None where no group
    has a curve."""
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
    written = None
    if ax.lines:
        ax.set(
            xlabel="optimizer step",
            ylabel="train loss (log-window mean)",
            title="Training loss by precision",
            yscale="log",
        )
        ax.legend(fontsize="small")
        written = _save(fig, out_dir / "loss.png")
    plt.close(fig)
    return written


def _plot_loss_scale(plt: Any, groups: list[grouping.Group], out_dir: Path) -> Optional[str]:
    """Draw loss_scale.png: each fp16 job's loss scale; returns its name, or None where no job has one."""
    scaled = [r for g in groups for r in g.rows if r.scale_curve]
    if not scaled:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    for r in scaled:
        steps, values = zip(*r.scale_curve, strict=True)
        ax.step(steps, values, where="post", label=r.name)
    ax.set(xlabel="optimizer step", ylabel="loss scale", title="fp16 loss scale", yscale="log")
    ax.legend(fontsize="small")
    written = _save(fig, out_dir / "loss_scale.png")
    plt.close(fig)
    return written


def _plot_perf(plt: Any, groups: list[grouping.Group], out_dir: Path) -> Optional[str]:
    """Draw perf.png: throughput and memory medians per group, the seeds' range as error bars; returns its name, or
    None where no group has a throughput."""
    done = [g for g in groups if g.values(grouping.THROUGHPUT)]
    if not done:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.5 * len(done) + 2))
    names = [_name(g, groups) for g in done]
    colors = [_colour(g) for g in done]
    # A GPU's peak is tensor memory, which precision changes; a CPU's is the process's peak RSS (libraries,
    # allocator), which says little of it: there the bars show the parameter and optimizer-state bytes.
    gpu = all(r.mem_kind == "cuda_max_allocated" for g in done for r in g.used)
    memory = (grouping.MEMORY, "Peak GPU memory") if gpu else (grouping.STATE, "Parameters + optimizer state")
    rate = rate_of([r for g in done for r in g.rows])
    for axis, key, title, unit in ((left, rate[0], "Throughput", rate[1]), (right, *memory, "MiB")):
        medians = [g.median(key) or 0 for g in done]
        spans = [g.values(key) or [0.0] for g in done]
        errors = [[m - min(v) for m, v in zip(medians, spans)], [max(v) - m for m, v in zip(medians, spans)]]
        axis.barh(names, medians, color=colors, xerr=errors, capsize=3)
        axis.set(xlabel=f"{unit} (median; bars: min–max over seeds)", title=title)
        axis.invert_yaxis()
    right.set_yticklabels([])
    written = _save(fig, out_dir / "perf.png")
    plt.close(fig)
    return written


def plot(groups: list[grouping.Group], out_dir: Path) -> list[str]:
    """loss.png (a mean curve per group, its seeds' range as a band), loss_scale.png (fp16 jobs) and perf.png (medians,
    with the seeds' range as error bars); returns the file names written."""
    # Imported here, not at the top: matplotlib loads only when a report is drawn.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): drawn to files, no display

    drawn = (_plot_loss(plt, groups, out_dir), _plot_loss_scale(plt, groups, out_dir), _plot_perf(plt, groups, out_dir))
    return [name for name in drawn if name]

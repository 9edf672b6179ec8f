"""Jobs that differ only in their seed, taken together: "does accuracy hold?" asked of a precision, not of one run.

A sweep over `trainer.seed` runs each setting several times. The jobs of one precision option and one setting of
everything else (the seed aside) form a group. A group is compared with the fp32 group of the same setting: the
difference of their mean validation accuracies, with a 95% Welch t interval (unequal variances; t quantile at
Welch-Satterthwaite degrees of freedom). The verdict says whether that interval rules out "no difference"; the
recommendation picks the fastest precision whose accuracy held. One seed per side gives no interval: the verdict
says so rather than guess.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mprun.precision.names import is_baseline

if TYPE_CHECKING:
    from mprun.report.rows import Row

SEED = "trainer.seed"
THROUGHPUT = "final/samples_per_s"
TOKENS = "final/tokens_per_s"  # a language model's throughput, in its users' unit
MFU = "final/mfu"  # a language model's model FLOPs utilization, on a GPU
MEMORY = "final/peak_mem_mib"
STATE = "final/param_state_mib"  # parameters and optimizer state: what a storage dtype (bf16_pure) changes
SKIPPED = "final/skipped_steps"
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Headline:
    """The metric a group is judged on: its task's (the run's mprun.headline tag), and how it reads."""

    name: str  # the summary's key: val_acc, val_bpb, val_loss
    higher_is_better: bool
    scale: float  # shown as value x scale: a fraction in percentage points
    unit: str
    digits: int

    @property
    def key(self) -> str:
        return f"final/{self.name}"

    @property
    def label(self) -> str:
        return self.name.replace("_", " ")

    @property
    def short(self) -> str:
        """What a difference of it is called: acc, bpb (Δ acc, Δ bpb)."""
        return self.name.removeprefix("val_")

    def show(self, value: float, sign: bool = False) -> str:
        return f"{self.scale * value:{'+' if sign else ''}.{self.digits}f}"


HEADLINES = {
    h.name: h
    for h in (
        Headline("val_acc", True, 100.0, "pp", 2),
        Headline("val_bpb", False, 1.0, "bits", 3),
        Headline("val_loss", False, 1.0, "nats", 3),
    )
}


def headline_of(rows: list[Row]) -> Headline:
    """What jobs are judged on: their task's headline metric (val acc; val bpb for a byte-level language model), as a
    finished job says it (one that failed before its task was known has no mprun.headline tag)."""
    said = next((r.headline for r in rows if r.mark == "ok"), rows[0].headline if rows else "")
    return HEADLINES.get(said, HEADLINES["val_acc"])


@dataclass(frozen=True)
class Delta:
    """mean(group) - mean(baseline), and the half-width of its 95% interval (None: a side has a single value)."""

    mean: float
    half: float | None

    @property
    def low(self) -> float:
        return self.mean - (self.half or 0.0)

    @property
    def high(self) -> float:
        return self.mean + (self.half or 0.0)


def welch(values: list[float], base: list[float]) -> Delta:
    """The difference of means with its Welch t interval at CONFIDENCE."""
    diff = statistics.fmean(values) - statistics.fmean(base)
    if len(values) < 2 or len(base) < 2:
        return Delta(diff, None)
    va, vb = statistics.variance(values) / len(values), statistics.variance(base) / len(base)
    if va + vb == 0:  # both sides identical within themselves (a deterministic CPU run repeated): no spread to test
        return Delta(diff, 0.0)
    df = (va + vb) ** 2 / (va**2 / (len(values) - 1) + vb**2 / (len(base) - 1))
    from scipy.stats import t  # scipy.stats: 0.6 s, when a report compares seeds

    return Delta(diff, float(t.ppf(0.5 + CONFIDENCE / 2, df)) * math.sqrt(va + vb))


def verdict(
    delta: Delta,
    n: int,
    n_base: int,
    tolerance: float,
    headline: Headline = HEADLINES["val_acc"],
    words: tuple[str, str] = ("within noise", "better"),
) -> str:
    """'within noise' when the interval holds 0, else 'better' or 'worse' by the headline's direction (or 'worse,
    within tolerance' when even its worse end is within `tolerance`, in the headline's shown unit); with fewer than 3
    seeds on a side, says so. `words` say the first two otherwise."""
    if delta.half is None:
        return "one seed: cannot tell noise from effect"
    gain = delta if headline.higher_is_better else Delta(-delta.mean, delta.half)
    if gain.low <= 0 <= gain.high:
        said = words[0]
    elif gain.low > 0:
        said = words[1]
    elif tolerance > 0 and gain.low * headline.scale >= -tolerance:
        said = f"worse, within the {tolerance:g} {headline.unit} tolerance"
    else:
        said = "worse"
    fewest = min(n, n_base)
    return said if fewest >= 3 else f"{said} (only {fewest} seeds: a rough interval)"


def held(said: str) -> bool:
    """Whether a verdict lets its precision be recommended: its accuracy is not shown to be worse than fp32's."""
    return said.startswith(("within noise", "better", "worse, within"))


@dataclass
class Group:
    """The jobs of one precision option and one setting of the other overrides, the seed aside."""

    option: str  # the precision option asked for (or the resolved precision if none was)
    own: tuple[str, ...]  # its jobs' overrides but the precision option and the seed: what makes it this group
    context: tuple[str, ...]  # those of them that change fp32 runs too: what its fp32 baseline group shares
    rows: list[Row] = field(default_factory=list)
    baseline: Group | None = None
    tolerance: float = 0.0  # what a precision may lose, in the headline's shown unit, and be recommended

    @property
    def precision(self) -> str:
        """What its jobs ran as (auto resolved), from a job that got that far."""
        resolved = [r.precision for r in self.rows if not r.precision.endswith("?")]
        return resolved[0] if resolved else self.rows[0].precision

    @property
    def label(self) -> str:
        if self.option == "auto" and self.precision != "auto":
            return f"auto→{self.precision}"
        return self.option

    @property
    def name(self) -> str:
        """Its label and what sets it apart from its fp32 baseline's setting: fp16 precision.fp32_modules=[h.1.mlp]."""
        return " ".join([self.label, *(o for o in self.own if o not in self.context)])

    @property
    def headline(self) -> Headline:
        return headline_of(self.rows)

    @property
    def used(self) -> list[Row]:
        """The jobs its statistics are over: finished, with a finite loss and a headline metric."""
        return [r for r in self.rows if r.mark == "ok" and r.metric(self.headline.key) is not None]

    @property
    def left_out(self) -> list[Row]:
        used = self.used
        return [r for r in self.rows if r not in used]

    def values(self, key: str) -> list[float]:
        return [v for v in (r.metric(key) for r in self.used) if v is not None and math.isfinite(v)]

    def median(self, key: str) -> float | None:
        values = self.values(key)
        return statistics.median(values) if values else None

    def ratio(self, key: str) -> float | None:
        """Its median of a metric over its baseline's."""
        if self.baseline is None:
            return None
        mine, base = self.median(key), self.baseline.median(key)
        return mine / base if mine is not None and base else None

    def delta(self) -> Delta | None:
        key = self.headline.key
        if self.baseline is None or self.baseline is self or not self.values(key) or not self.baseline.values(key):
            return None
        return welch(self.values(key), self.baseline.values(key))

    @property
    def verdict(self) -> str:
        if self.baseline is self:
            return "baseline"
        delta = self.delta()
        if delta is None:
            return "no fp32 group to compare with" if self.used else "no finished job"
        key = self.headline.key
        return verdict(delta, len(self.values(key)), len(self.baseline.values(key)), self.tolerance, self.headline)

    @property
    def delta_name(self) -> str:
        """Δacc, Δbpb."""
        return "Δ" + self.headline.short

    def delta_text(self) -> str:
        """'-0.09 ± 0.30 pp' (the interval's half-width), or '-0.09 pp' without one; bits or nats for a language
        model."""
        delta, h = self.delta(), self.headline
        if delta is None:
            return "—"
        spread = "" if delta.half is None else f" ± {h.show(delta.half)}"
        return f"{h.show(delta.mean, sign=True)}{spread} {h.unit}".replace("-", "−")

    def summary(self) -> str:
        """One line for the parent run's verdict/<precision> tag."""
        h = self.headline
        speedup, n, values = self.ratio(THROUGHPUT), len(self.used), self.values(h.key)
        seeds = f"{n} seed{'s' * (n != 1)}"
        if self.baseline is self:
            spread = f" ± {h.show(statistics.stdev(values))}" if len(values) > 1 else ""
            return f"baseline: {h.label} {h.show(statistics.fmean(values))}{spread}, {seeds}"
        speed = "" if speedup is None else f", {speedup:.2f}× fp32's throughput"
        return f"{self.verdict}: {self.delta_name} {self.delta_text()}{speed}, {seeds}"


def setting(g: Group, groups: list[Group]) -> str:
    """What sets g's setting apart from the other groups' (the overrides not common to all): "" if all share one."""
    return _apart(g.own, [h.own for h in groups])


def _apart(mine: tuple[str, ...], all_of: list[tuple[str, ...]]) -> str:
    common = set.intersection(*(set(a) for a in all_of))
    return " ".join(o for o in mine if o not in common)


def _no_seed(overrides: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(o for o in overrides if o.split("=", 1)[0].lstrip("+~") != SEED)


def group(rows: list[Row], tolerance: float = 0.0) -> list[Group]:
    """The rows' groups, in the order of their first jobs, each linked to the fp32 group of its setting: the one that
    asked for fp32 before one that auto resolved to it."""

    groups: dict[tuple[str, tuple[str, ...]], Group] = {}
    for r in rows:
        own = _no_seed(r.setting if r.setting is not None else r.others)
        key = (r.requested or r.precision, own)
        groups.setdefault(key, Group(key[0], own, _no_seed(r.others), tolerance=tolerance)).rows.append(r)
    baselines: dict[tuple[str, ...], Group] = {}
    for g in groups.values():
        if is_baseline(g.precision) and g.used:
            held_one = baselines.get(g.context)
            if held_one is None or (not is_baseline(held_one.option) and is_baseline(g.option)):
                baselines[g.context] = g
    for g in groups.values():
        g.baseline = baselines.get(g.context)
    return list(groups.values())


def recommendation(groups: list[Group]) -> list[str]:
    """One line per setting: the fastest precision whose accuracy held against fp32, or why fp32 stays; one line for
    all of them when they say the same."""
    labels = list(dict.fromkeys(g.label for g in groups))
    if len(labels) == 1:  # an LR grid at one precision, say: nothing to compare a precision with
        return [f"no precision to recommend: every job ran {labels[0]}; sweep precision=fp32,bf16 (say) to compare"]
    contexts = list(dict.fromkeys(g.context for g in groups))
    said = [_recommend([g for g in groups if g.context == context]) for context in contexts]
    if len(set(said)) == 1:
        return [f"all {len(contexts)} settings: {said[0]}" if len(contexts) > 1 else said[0]]
    return [f"{_apart(context, contexts)}: {line}" for context, line in zip(contexts, said)]


def _recommend(mine: list[Group]) -> str:
    """The recommendation for one setting's groups."""

    base = mine[0].baseline
    if base is None:
        return "no recommendation: no finished fp32 job to compare with (add precision=fp32)"
    others = [g for g in mine if not is_baseline(g.precision)]  # fp32 is what they are measured against
    faster = [g for g in others if held(g.verdict) and (g.ratio(THROUGHPUT) or 0) > 1]
    if faster:
        best = max(faster, key=lambda g: g.ratio(THROUGHPUT) or 0)
        memory = best.ratio(MEMORY)
        return (
            f"pick {best.name}: {best.ratio(THROUGHPUT):.2f}× fp32's throughput"
            + ("" if memory is None else f", {memory:.2f}× memory")
            + f", {best.delta_name} {best.delta_text()} ({best.verdict}, {len(best.used)} seeds)"
        )
    why = []
    for g in others:
        if held(g.verdict):
            why.append(f"{g.name} held its accuracy but ran at {g.ratio(THROUGHPUT) or 0:.2f}× fp32's throughput")
        elif g.verdict.startswith("one seed"):
            why.append(f"{g.name} has one seed: sweep {SEED}=1,2,3 to tell noise from effect")
        elif g.used:
            why.append(f"{g.name} is {g.verdict} ({g.delta_name} {g.delta_text()})")
        else:
            why.append(f"{g.name} has no finished job")
    return f"keep {base.label}: " + ("; ".join(why) or "nothing else was run")


def best_settings(groups: list[Group]) -> list[str]:
    """For each precision that ran at several settings (an LR grid, say), the setting with the best mean headline
    metric and the one after it: what the grid asks, and, one line per precision, whether its answer moves with the
    precision. Whether the best is clear of the next is said as a verdict is (Welch interval, or one seed). A setting
    that changes nothing in fp32 (precision.fp32_modules) is not one for fp32; tasks judged on different metrics
    (a sweep over datasets) are ranked apart."""

    lines = []
    for label, metric in dict.fromkeys((g.label, g.headline) for g in groups):
        ran: dict[tuple[str, ...], Group] = {}  # the first group of each setting that counts for this precision
        for g in groups:
            if g.label == label and g.headline == metric and g.values(metric.key):
                ran.setdefault(g.context if is_baseline(g.precision) else g.own, g)
        if len(ran) < 2:
            continue
        mean = {setting: statistics.fmean(g.values(metric.key)) for setting, g in ran.items()}
        (best, after) = sorted(ran, key=mean.__getitem__, reverse=metric.higher_is_better)[:2]
        a, b = ran[best].values(metric.key), ran[after].values(metric.key)
        said = (
            "tied"
            if mean[best] == mean[after]
            else verdict(welch(a, b), len(a), len(b), 0.0, metric, words=("within noise of it", "clear of it"))
        )
        best_name, after_name = (_apart(setting, list(ran)) or "the defaults" for setting in (best, after))
        lines.append(f"{label}: {best_name}, {metric.label} {mean_sd(a)} (next: {after_name}, {mean_sd(b)}; {said})")
    return lines


def mean_sd(values: list[float]) -> str:
    """'0.9861' or '0.9861 ± 0.0012': as the group table shows a headline."""
    return f"{statistics.fmean(values):.4f}" + (f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else "")


def tags(groups: list[Group]) -> dict[str, str]:
    """verdict/<precision> (and /<setting> when the sweep varied more than precision and seed) for the parent run."""
    out = {}
    for g in groups:
        key = "/".join(filter(None, ("verdict", g.label, setting(g, groups))))
        out[re.sub(r"[^\w\-. :/]", "_", key)[:250]] = g.summary()
    return out

"""The report's notes: what a reader needs to know to read its numbers (baselines, CPU speeds, single seeds, ...)."""

from __future__ import annotations

from mprun.precision.names import can_carry_loss_scale, computes_in_half, is_baseline, sweep_note
from mprun.report import groups as grouping
from mprun.report.rows import Row
from mprun.report.tables import SINGLE_EPOCH
from mprun.training.config import INPUT_BOUND

SLOW = 0.8  # a CPU half precision below this share of fp32's throughput is noted as having no fast path


def notes_for(rows: list[Row], groups: list[grouping.Group] | None = None) -> list[str]:
    """The caveats a reader needs before reading the numbers (groups: the rows' groups, if made already)."""
    groups = grouping.group(rows) if groups is None else groups
    notes = [_baseline_note(rows)]
    if any(r.mem_kind == "process_peak_rss" for r in rows):
        notes.append(
            "CPU jobs: peak memory is the process's peak resident set during the job (libraries included), "
            "not tensor memory, and says little about precision; only GPU jobs measure tensor memory. The "
            "memory plot shows parameter and optimizer-state bytes (param+state MiB) instead."
        )
    if any(len(g.rows) > 1 for g in groups):
        h = grouping.headline_of(rows)
        notes.append(
            f"By precision: the jobs that differ only in trainer.seed. {h.label} is their mean ± sample sd over the "
            f"finished jobs; Δ {h.short} is the difference from the fp32 group's mean with a 95% "
            "Welch t interval; "
            "'within noise' when that interval contains 0. Throughput and memory are medians over the seeds, "
            "speedup and mem ratio medians over the fp32 group's."
        )
    notes += _slow_on_this_cpu(groups)
    notes += [n for n in (sweep_note(tag) for tag in dict.fromkeys(r.precision for r in rows)) if n]
    notes += _measurement_notes(rows)
    bad = [r for r in rows if r.mark != "ok"]
    if bad:
        # Of those recorded: an interrupted sweep's unstarted jobs have no run ("1 of 1 jobs" in a 3-job sweep).
        started = f"the {len(rows)} job{'s' * (len(rows) != 1)} that started"
        notes.append(f"{len(bad)} of {started} did not finish cleanly (marked in the table).")
    return notes


def _baseline_note(rows: list[Row]) -> str:
    """What the speedups and Δs are measured against, or why there is nothing to measure them against."""
    if not rows:
        return "No jobs recorded under this parent run."
    if any(r.baseline for r in rows):
        return (
            "Baseline: the finished fp32 job with the same other overrides (loss-scaler settings aside; one "
            "that asked for precision=fp32 before one that auto resolved to it). Speedup = throughput ÷ "
            "baseline's; mem ratio = peak memory ÷ baseline's."
        )
    # fp32 jobs that could not be one: failed (before it resolved its precision, it asked for fp32), stopped, diverged
    unusable = [r for r in rows if (is_baseline(r.precision) or is_baseline(r.requested)) and r.mark != "ok"]
    return (
        f"No finished fp32 job to compare with: Δ {grouping.headline_of(rows).short}, speedup and "
        "memory ratio are not computed. "
        + (
            f"The fp32 job {unusable[0].num} is {unusable[0].mark.strip('*')}."
            if unusable
            else "Add precision=fp32 to the sweep for a baseline."
        )
    )


def _slow_on_this_cpu(groups: list[grouping.Group]) -> list[str]:
    """A note for each half precision whose every CPU group ran clearly slower than fp32 (under SLOW: not the few
    percent runs differ by anyway). Measured here, not assumed from the CPU's flags: some CPUs run bf16 faster."""
    fastest: dict[str, float] = {}
    for g in groups:
        speedup = g.ratio(grouping.THROUGHPUT)
        if (
            computes_in_half(g.precision)
            and speedup is not None
            and any(r.mem_kind == "process_peak_rss" for r in g.used)
        ):
            fastest[g.precision] = max(speedup, fastest.get(g.precision, 0.0))
    return [
        f"On this CPU, {name} ran at {speedup:.2f}× fp32's throughput (measured in this sweep): the CPU "
        "has no fast path for that dtype, so its speed here says nothing of a GPU's; measure speed on the "
        "GPU you will train on."
        for name, speedup in fastest.items()
        if speedup < SLOW
    ]


def _measurement_notes(rows: list[Row]) -> list[str]:
    """Caveats about what some jobs measured: fp16 underflow of other dtypes, single-epoch speeds, input-bound jobs."""
    notes = []
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
    return notes

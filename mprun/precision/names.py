"""The precision options, and what a run's recorded precision means. Imports no torch: the sweep report and the
config's schema read them."""

from __future__ import annotations

from enum import Enum
from typing import Optional


class PrecisionName(Enum):
    auto = "auto"
    fp32 = "fp32"
    tf32 = "tf32"
    fp16 = "fp16"
    bf16 = "bf16"
    bf16_pure = "bf16_pure"  # bf16 weights, gradients and optimizer state; no fp32 master copy, no autocast
    fp8 = "fp8"  # torchao float8 matmuls in the chosen Linear layers, bf16 autocast elsewhere

    @property
    def half(self) -> bool:
        """Whether it computes in a float narrower than 32 bits (fp16, bf16, bf16_pure, fp8)."""
        return self not in (PrecisionName.auto, PrecisionName.fp32, PrecisionName.tf32)

    @property
    def matmul_dtype(self) -> str:
        """The dtype its matmuls run in, for peak-FLOP/s tables: 'fp8', 'bf16', 'fp16', 'tf32' or 'fp32'."""
        return "bf16" if self is PrecisionName.bf16_pure else self.value

    @property
    def scales_loss(self) -> bool:
        """Whether a run of it can carry a loss scale: only fp16 lacks the exponent range to do without."""
        return self is PrecisionName.fp16


def resolved_name(tag: str) -> Optional[PrecisionName]:
    """A recorded precision (a run's `precision` tag, e.g. 'fp16') as a PrecisionName; None if it is no precision."""
    try:
        return PrecisionName(tag)
    except ValueError:
        return None


def computes_in_half(tag: str) -> bool:
    """Whether a run recorded with this precision tag computed in a 16-bit float (its CPU speed may be emulated)."""
    name = resolved_name(tag)
    return name is not None and name.half


def is_baseline(tag: str) -> bool:
    """Whether a run recorded with this precision tag (or that asked for this precision option) is the fp32 reference
    a sweep compares the others with: no autocast, no TF32."""
    return resolved_name(tag) is PrecisionName.fp32


def can_carry_loss_scale(tag: str) -> bool:
    """Whether a run recorded with this precision tag can have had a loss scale (its scale curve and final scale
    mean something); a non-fp16 run's fp16 underflow statistic is what fp16 would lose, not what it lost."""
    name = resolved_name(tag)
    return name is not None and name.scales_loss


# What a sweep report's reader needs to know of a precision that autocast alone does not explain.
_SWEEP_NOTES = {
    PrecisionName.bf16_pure: "bf16_pure: weights, gradients and optimizer state stored in bf16 (no fp32 master copy, "
    "no autocast), updates stochastically rounded unless precision.stochastic_rounding=false; param+state MiB is "
    "what that saves, about half of an autocast job's with Adam(W).",
    PrecisionName.fp8: "fp8: torchao float8 matmuls in the Linear layers its run tag fp8_modules lists, bf16 "
    "autocast elsewhere (convolutions stay bf16); on a CPU the float8 matmuls are emulated, so only a GPU's speed "
    "means anything.",
}


def sweep_note(tag: str) -> str:
    """The sweep report's note on runs recorded with this precision tag ('' when it needs none)."""
    name = resolved_name(tag)
    return _SWEEP_NOTES.get(name, "") if name is not None else ""


# The settings that change nothing in an fp32 run: the cast and the loss scaler (the collapse policy judges skipped
# steps, which an fp32 baseline has none of, and all-zero gradients, which leave no fp32 baseline to compare with).
# The sweep report compares a job with the fp32 job that differs from it only in these and the precision option;
# the others (clipping, on_nonfinite, statistics) apply to fp32 too.
HALF_ONLY = frozenset(
    {
        "dtype",
        "loss_scale",
        "init_scale",
        "growth_factor",
        "backoff_factor",
        "growth_interval",
        "min_loss_scale",
        "max_skip_rate",
        "collapse_patience",
        "on_collapse",
        "fp32_modules",
        "fp8_recipe",
        "fp8_skip",
        "fp8_min_features",
        "fp8_fsdp_all_gather",
        "stochastic_rounding",
    }
)

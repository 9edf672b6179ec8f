"""The precision group's schema: its defaults, and the checks that run before anything is built. Imports no torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import List, Optional

from mprun.errors import require
from mprun.precision.names import PrecisionName


class NonFinite(Enum):
    stop = "stop"  # checked at log steps (no extra sync): stop the run with a diagnosis
    skip = "skip"  # check every step and skip a non-finite one (GradScaler pinned at 1.0: one sync per step)


class Action(Enum):
    stop = "stop"
    warn = "warn"


class Trace(Enum):
    off = "off"
    first = "first"  # trace the first non-finite batch only
    every = "every"


class Fp8Recipe(Enum):
    tensorwise = "tensorwise"  # one scale per tensor: the fastest (cuBLAS), and the only one with fp8 all-gather
    rowwise = "rowwise"  # a scale per row (CUTLASS): more accurate with outliers
    rowwise_with_gw_hp = "rowwise_with_gw_hp"  # rowwise, with the weight gradient's matmul kept in bf16


class LossScale(Enum):
    dynamic = "dynamic"  # GradScaler: back off on overflow, grow after growth_interval clean steps
    static = "static"  # fixed scale (init_scale); an overflowing step is skipped, the scale never changes
    none = "none"  # no scaling: reproduces fp16 gradient underflow


@dataclass
class PrecisionConfig:
    dtype: PrecisionName = PrecisionName.auto
    # Only fp16 uses a loss scale; with dtype=auto it applies if auto resolves to fp16.
    loss_scale: LossScale = LossScale.dynamic
    init_scale: float = 65536.0
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    # Clipping always sees unscaled gradients. At most one of the two.
    grad_clip_norm: Optional[float] = None
    grad_clip_value: Optional[float] = None
    # Glob patterns over qualified module names run outside autocast, in float32 (e.g. ["*norm*", "head"]).
    fp32_modules: List[str] = field(default_factory=list)
    # A non-finite loss with no scaler to skip the step (fp32, tf32, bf16, fp16 unscaled): stop or skip.
    on_nonfinite: NonFinite = NonFinite.stop
    # Collapse: the dynamic scale at or below the floor, or (any scaler: dynamic, static, on_nonfinite=skip)
    # more than max_skip_rate of the steps skipped in collapse_patience consecutive log windows, or (any precision)
    # every gradient exactly zero at collapse_patience consecutive log steps while the loss is not: nothing trains.
    min_loss_scale: float = 1.0
    max_skip_rate: float = 0.5
    collapse_patience: int = 3
    on_collapse: Action = Action.stop
    # Re-run a non-finite batch with hooks to name the first module that produced inf/NaN.
    trace_nonfinite: Trace = Trace.first
    # Every N steps: per-module fp16 underflow/overflow of gradients and activation maxima (0: off).
    stats_every_steps: int = 0
    # fp8 only. Which Linear layers become torchao Float8Linear: those with both sizes divisible by 16, the smaller
    # at least fp8_min_features (below it the casts cost more than the fp8 matmul saves), and none that an fp8_skip
    # glob matches (null: the output layer, i.e. the last Linear).
    fp8_recipe: Fp8Recipe = Fp8Recipe.tensorwise
    fp8_skip: Optional[List[str]] = None
    fp8_min_features: int = 512
    fp8_fsdp_all_gather: bool = False  # FSDP2 all-gathers the float8 weights (tensorwise only)
    # bf16_pure only: the optimizer stores its bf16 results with stochastic rounding (false: round to nearest).
    stochastic_rounding: bool = True

    def __post_init__(self) -> None:
        require(self.init_scale > 0, f"init_scale={self.init_scale} must be > 0")
        require(self.growth_factor > 1, f"growth_factor={self.growth_factor} must be > 1")
        require(0 < self.backoff_factor < 1, f"backoff_factor={self.backoff_factor} must be in (0, 1)")
        require(self.growth_interval >= 1, f"growth_interval={self.growth_interval} must be >= 1")
        require(self.min_loss_scale >= 0, f"min_loss_scale={self.min_loss_scale} must be >= 0")
        require(0 < self.max_skip_rate <= 1, f"max_skip_rate={self.max_skip_rate} must be in (0, 1]")
        require(self.collapse_patience >= 1, f"collapse_patience={self.collapse_patience} must be >= 1")
        require(self.stats_every_steps >= 0, f"stats_every_steps={self.stats_every_steps} must be >= 0 (0: off)")
        require(self.fp8_min_features >= 0, f"fp8_min_features={self.fp8_min_features} must be >= 0")
        for key in ("grad_clip_norm", "grad_clip_value"):
            value = getattr(self, key)
            require(value is None or value > 0, f"{key}={value} must be > 0 (or null to disable)")
        require(
            self.grad_clip_norm is None or self.grad_clip_value is None,
            "grad_clip_norm and grad_clip_value are both set; choose one",
        )
        require(
            self.loss_scale is LossScale.none or self.dtype in (PrecisionName.fp16, PrecisionName.auto),
            f"loss_scale={self.loss_scale.value} applies to fp16 only; {self.dtype.value} needs "
            "precision.loss_scale=none",
        )

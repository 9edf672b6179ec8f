"""One precision object: autocast, loss scaling, unscale -> clip -> step -> update, and AMP telemetry.

The training loop never asks which dtype it runs in. For fp32/tf32/bf16 the GradScaler is
disabled, so scale/unscale_/step/update become pass-throughs and the loop stays branch-free.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, ContextManager, Iterable, List, Optional

import torch
from torch import nn

from mprun import hardware
from mprun.errors import ConfigError, require

log = logging.getLogger(__name__)


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

# fp8 runs what it does not swap under bf16 autocast; bf16_pure has no autocast (its weights are bf16).
_AUTOCAST_DTYPE = {
    PrecisionName.fp16: torch.float16,
    PrecisionName.bf16: torch.bfloat16,
    PrecisionName.fp8: torch.bfloat16,
}
# The autocast precision whose probe speaks for a CPU run's matmuls: bf16_pure's are bf16 ones.
_PROBED = {
    PrecisionName.fp16: PrecisionName.fp16,
    PrecisionName.bf16: PrecisionName.bf16,
    PrecisionName.bf16_pure: PrecisionName.bf16,
}


# precision=auto on a CPU takes a half dtype only if its measured step is this much faster than fp32's (a tie, or
# noise, keeps fp32's numerics), and only if its loss on the probe batch agrees with fp32's within LOSS_AGREEMENT
# (relative): a dtype that changes the model's output that much is not the same training.
AUTO_MIN_SPEEDUP = 1.1
LOSS_AGREEMENT = 0.02

# Measures on the run's own model: {dtype name: torch dtype} -> mprun.probe.measure's result.
Measure = Callable[[dict[str, torch.dtype]], dict[str, Any]]


def resolve(
    requested: PrecisionName, device: torch.device, measure: Optional[Measure] = None
) -> tuple[PrecisionName, str]:
    """Map `auto` to what this device really runs fast, and reject what it cannot run; returns (name, why). On a CPU,
    `measure` times the candidates on the run's model (mprun.probe); without it, the CPU's AMX units decide."""
    if device.type == "cuda":
        name, major, minor = hardware.gpu_capability(device)
        if requested is PrecisionName.auto:
            if major >= 8:
                return PrecisionName.bf16, f"{name} (sm_{major}{minor}) has bf16 tensor cores"
            if major == 7:
                return PrecisionName.fp16, f"{name} (sm_{major}{minor}) has fp16 but no bf16 tensor cores"
            return PrecisionName.fp32, f"{name} (sm_{major}{minor}) has no fast half precision"
        if requested in (PrecisionName.bf16, PrecisionName.bf16_pure) and major < 8:
            raise ConfigError(
                f"precision={requested.value} is not supported by {name} (sm_{major}{minor}); "
                "choose precision=fp16 (with loss scaling), tf32 or fp32"
            )
        if requested is PrecisionName.fp8 and (major, minor) < (8, 9):
            raise ConfigError(
                f"precision=fp8 needs float8 tensor cores (Ada or Hopper, sm_89+); {name} is sm_{major}{minor}. "
                f"Use precision=bf16{'' if major >= 8 else ' (Ampere+) or fp16'}"
            )
        if requested is PrecisionName.tf32 and major < 8:
            raise ConfigError(
                f"precision=tf32 needs an Ampere or newer GPU; {name} is sm_{major}{minor}. Use fp32 or fp16"
            )
        return requested, "requested"
    # CPU
    if requested is PrecisionName.tf32:  # TF32 is a GPU tensor-core format: a CPU computes in full fp32
        return requested, "requested; on a CPU tf32 runs as plain fp32"
    if requested is PrecisionName.auto:
        if measure is not None:
            # fp16 only where the CPU has a unit for it (AMX-FP16): elsewhere it is emulated, and needs a loss scale.
            names = [PrecisionName.bf16] + ([PrecisionName.fp16] if "amx_fp16" in hardware.cpu_amx_units() else [])
            return pick_measured(measure({n.value: _AUTOCAST_DTYPE[n] for n in names}))
        if "amx_bf16" in hardware.cpu_amx_units():
            return PrecisionName.bf16, "CPU has AMX-BF16"
        return PrecisionName.fp32, "CPU without fast bf16 (autocast would be emulated and slower)"
    if requested is PrecisionName.fp8:
        log.warning(
            "precision=fp8 on a CPU: torch._scaled_mm runs float8 matmuls in emulation, correct but slower than bf16. "
            "Useful to test the fp8 path; fp8 pays on Ada/Hopper GPUs, on transformer-sized Linear layers."
        )
        return requested, "requested; on a CPU float8 matmuls are emulated"
    autocast = _PROBED.get(requested)
    if autocast is not None:
        probed = autocast.value
        if measure is not None:
            times = measure({probed: _AUTOCAST_DTYPE[autocast]})
            speedup = times["fp32"]["ms"] / times[probed]["ms"]
            if speedup < 1:
                log.warning(
                    "precision=%s: %s autocast measured %.2fx fp32's speed on this CPU for this model (%s): correct, "
                    "but slower (emulated here). Useful for numerics experiments; precision=auto picks the fastest.",
                    requested.value,
                    probed,
                    speedup,
                    _timings(times),
                )
            return requested, (
                f"requested; {probed} autocast measured {speedup:.2f}x fp32's speed on this CPU ({_timings(times)})"
            )
        if f"amx_{probed}" not in hardware.cpu_amx_units():
            log.warning(
                "precision=%s on a CPU without AMX-%s may run in emulation: correct, but possibly much slower than "
                "fp32 (see docs/precision.md). Useful for numerics experiments; measure before relying on it for "
                "speed.",
                requested.value,
                probed.upper(),
            )
    return requested, "requested"


def _timings(times: dict[str, Any]) -> str:
    """'fp32 7.68 ms/step, bf16 4.19 ms/step (cached)': a probe's result in words."""
    steps = ", ".join(
        f"{k} failed: {v['error']}" if "error" in v else f"{k} {v['ms']:.3g} ms/step"
        for k, v in times.items()
        if isinstance(v, dict)
    )
    return steps + ("; from the cache" if times.get("cached") else "")


def pick_measured(times: dict[str, Any]) -> tuple[PrecisionName, str]:
    """precision=auto on a CPU, from a probe: the fastest half dtype at least AUTO_MIN_SPEEDUP x fp32's speed whose
    loss agrees with fp32's; else fp32. The reason gives the timings."""
    base = times["fp32"]
    fits = [
        (base["ms"] / t["ms"], name)
        for name, t in times.items()
        if name != "fp32"
        and isinstance(t, dict)
        and math.isfinite(t["loss"])
        and abs(t["loss"] - base["loss"]) <= LOSS_AGREEMENT * max(1.0, abs(base["loss"]))
    ]
    speedup, name = max(fits, default=(1.0, "fp32"))
    if name != "fp32" and speedup >= AUTO_MIN_SPEEDUP:
        return PrecisionName(name), f"measured on this CPU: {speedup:.2f}x fp32's speed ({_timings(times)})"
    return PrecisionName.fp32, (
        f"measured on this CPU: no half dtype {AUTO_MIN_SPEEDUP}x faster with a loss within {LOSS_AGREEMENT:.0%} of "
        f"fp32's ({_timings(times)})"
    )


# What to try after a numerics stop made of inf/NaN values, by the precision the run used: half precision has its
# own remedies; fp32 and tf32 (fp32's range) overflow only when the training itself diverges.
_STOP_HINT = {
    PrecisionName.fp16: " Try bf16 (fp32's exponent range, no scaler), a lower learning rate, gradient clipping, or "
    "precision.fp32_modules for the module the tracer names.",
    PrecisionName.bf16: " bf16 has fp32's exponent range, so this is rarely a range problem: try a lower learning "
    "rate, gradient clipping, or precision.fp32_modules for the module the tracer names, and precision=fp32 to "
    "compare.",
}
_FP32_STOP_HINT = (
    " fp32 overflows only when training diverges: try a lower learning rate or gradient clipping "
    "(precision.grad_clip_norm)."
)

# Why a scale that never backs off keeps skipping, by the loss scaling in force (dynamic explains itself).
_FIXED_SCALE = {
    LossScale.static: " (fixed by precision.loss_scale=static: lower precision.init_scale, or use dynamic)",
    LossScale.none: " (pinned by precision.on_nonfinite=skip: these steps had inf/NaN gradients)",
}


class Precision:
    """Owns autocast, the (possibly disabled) GradScaler, the optimizer step and AMP telemetry, and answers every
    question other modules have about the precision in force. Building one changes no global state: the run applies
    `math_flags()` (and puts the caller's back after)."""

    def __init__(self, cfg: PrecisionConfig, device: torch.device, measure: Optional[Measure] = None) -> None:
        self.cfg = cfg
        self.device = device
        self.name, self.reason = resolve(cfg.dtype, device, measure)
        self.autocast_dtype = _AUTOCAST_DTYPE.get(self.name)
        self.loss_scale = cfg.loss_scale if self.name.scales_loss else LossScale.none
        if cfg.dtype is PrecisionName.auto and cfg.loss_scale is LossScale.static and not self.name.scales_loss:
            # Not an error, as precision=fp32 with it is: auto's pick depends on the machine, and the same command
            # is fp16 with that scale on a Volta GPU. The default (dynamic) goes unsaid.
            log.warning(
                "precision.loss_scale=static dropped: auto resolved to %s (%s), which has no loss scale",
                self.name.value,
                self.reason,
            )
        # on_nonfinite=skip without a loss scale: a GradScaler pinned at 1.0 finds and skips non-finite steps.
        self.skip_mode = self.loss_scale is LossScale.none and cfg.on_nonfinite is NonFinite.skip
        self.dynamic_scaling = self.loss_scale is LossScale.dynamic
        self._pinned = (
            float(cfg.init_scale) if self.loss_scale is LossScale.static else (1.0 if self.skip_mode else None)
        )
        self.scaler = torch.amp.GradScaler(
            device.type,
            init_scale=1.0 if self.skip_mode else cfg.init_scale,
            growth_factor=cfg.growth_factor,
            backoff_factor=cfg.backoff_factor,
            growth_interval=cfg.growth_interval,
            enabled=self.loss_scale is not LossScale.none or self.skip_mode,
        )
        # Telemetry. Whether the scaler skipped a step is known on the device (its found_inf); it is
        # counted there and read at log steps, so no step waits for the host. Fused optimizers skip an
        # overflowing step on the device too (GradScaler calls their step() either way).
        self.skipped_steps = 0
        self.steps_since_overflow = 0
        self.growth_events = 0
        self.backoff_events = 0
        self._skips = torch.zeros((), dtype=torch.float64, device=device)  # device twins of the two above
        self._clean = torch.zeros((), dtype=torch.float64, device=device)
        # 1.0 if the last step was applied, 0.0 if the scaler skipped it (always 1.0 without a scaler). A device
        # tensor: the loop leaves a skipped step's non-finite loss out of its means without reading it.
        self.applied = torch.ones((), device=device)
        self._scale_seen = self.scale_value()  # the scale at the last refresh: growth events follow from it
        self._window = [0, 0]  # [skipped, attempted] steps of the current log window, as of the last refresh
        self._window_steps = 0  # attempted steps since the last telemetry()
        self.fp8_modules: list[str] = []  # the Linear layers transform() made Float8Linear
        self._after_step: Optional[Callable[[], None]] = None  # fp8 all-gather: the next forward's weight scales

    def transform(self, module: nn.Module, fp32_modules: list[str]) -> None:
        """The model transform beyond autocast, applied after the model is built and before compile, DDP or FSDP2:
        fp8 swaps Linear layers for torchao's Float8Linear, bf16_pure stores everything in bf16. `fp32_modules`: the
        modules precision.fp32_modules keeps in fp32."""
        if self.name is PrecisionName.fp8:
            from mprun import fp8

            cfg = self.cfg
            self.fp8_modules = fp8.convert(
                module,
                cfg.fp8_recipe.value,
                None if cfg.fp8_skip is None else list(cfg.fp8_skip),
                cfg.fp8_min_features,
                cfg.fp8_fsdp_all_gather,
                tuple(fp32_modules),
            )
            if cfg.fp8_fsdp_all_gather:
                self._after_step = lambda: fp8.precompute_scales(module)
        elif self.name is PrecisionName.bf16_pure:
            from mprun import bf16_pure

            if fp32_modules:
                raise ConfigError(
                    "precision.fp32_modules does not apply to precision=bf16_pure, which stores every weight in bf16; "
                    "use precision=bf16 (autocast, fp32 weights) to keep modules in fp32"
                )
            bf16_pure.cast(module)

    def optimizer_target(self, target: str) -> str:
        """The optimizer class to build for the configured one (a class path): bf16_pure with stochastic rounding
        swaps torch's SGD/Adam/AdamW for the same update stored with stochastic rounding."""
        if self.name is PrecisionName.bf16_pure and self.cfg.stochastic_rounding:
            from mprun import bf16_pure

            return bf16_pure.optimizer_target(target)
        return target

    def math_flags(self) -> dict[str, bool]:
        """The TF32 flags this precision runs with, for hardware.set_math_flags. cuDNN convolutions default to TF32 in
        torch, so true fp32 turns that off; under fp16/bf16 the fp32 leftovers keep torch's default (cuDNN TF32 on),
        as a hand-written torch.amp loop would."""
        return {"tf32_matmul": self.name is PrecisionName.tf32, "cudnn_tf32": self.name is not PrecisionName.fp32}

    @property
    def can_skip_steps(self) -> bool:
        """Whether a step can be skipped: there is a loss scale (dynamic or static), or on_nonfinite=skip's scaler
        pinned at 1.0 finds and skips non-finite steps. Without, every step is applied, inf/NaN or not."""
        return self.scaler.is_enabled()

    def fsdp_policy(self, fp32_modules: list[str]) -> Any:
        """FSDP2's MixedPrecisionPolicy for this precision: parameters in the autocast dtype (fp32 when there is
        none), gradients reduced in fp32. A precision that needs a GradScaler is refused: each rank's GradScaler
        finds inf/NaN in its own shard only, so ranks would skip different steps and their replicas drift apart."""
        if self.can_skip_steps:
            why = (
                "fp16 loss scaling"
                if self.loss_scale is not LossScale.none
                else f"precision.on_nonfinite=skip ({self.name.value})"
            )
            fix = (
                "use precision=bf16 or fp32 with fsdp, or trainer.strategy=ddp for fp16"
                if self.loss_scale is not LossScale.none
                else "use precision.on_nonfinite=stop with fsdp, or trainer.strategy=ddp to skip such steps"
            )
            raise ConfigError(
                f"trainer.strategy=fsdp with {why} is not supported by mprun: skipping a step needs a grad scaler "
                f"whose inf/NaN check all ranks agree on, which FSDP2's sharded gradients do not have; {fix}"
            )
        if fp32_modules:
            raise ConfigError(
                "precision.fp32_modules with trainer.strategy=fsdp is not supported by mprun (FSDP2 casts every "
                "parameter to the policy's dtype); use trainer.strategy=ddp"
            )
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=self.autocast_dtype, reduce_dtype=torch.float32)

    def stop_hint(self) -> str:
        """What to try after a stop made of inf/NaN values, for this precision."""
        return _STOP_HINT.get(self.name, _FP32_STOP_HINT)

    def fixed_scale_note(self) -> str:
        """Why a scale that never backs off keeps skipping steps ('' for a dynamic scale, which explains itself)."""
        return _FIXED_SCALE.get(self.loss_scale, "")

    def zero_gradient_hint(self, scale: float) -> str:
        """What to try when no gradient reaches the parameters, by the precision and loss scale in force."""
        if not self.name.scales_loss:
            return (
                f" In {self.name.value} (fp32's exponent range) this is not underflow: check that the loss depends on "
                "the parameters (a detached tensor, dead ReLUs)"
            )
        return {
            LossScale.none: " Without a loss scale fp16 flushes gradients below 6e-8 to zero: use precision=fp16 "
            "(dynamic loss scale) or bf16",
            LossScale.static: f" The fixed loss scale {scale:g} does not lift these gradients into fp16's range: "
            "raise precision.init_scale, or use precision=fp16 (dynamic loss scale), or bf16",
            LossScale.dynamic: f" The dynamic loss scale ({scale:g}) grows only after precision.growth_interval clean "
            "steps: a higher precision.init_scale lifts these gradients sooner; bf16 needs no scale",
        }[self.loss_scale]

    @property
    def description(self) -> str:
        """Human-readable resolved precision, e.g. 'fp16 (dynamic loss scale)', 'fp16 (static loss scale 128)': a
        fixed scale is precision.init_scale, which only fp16_static sets (128); loss_scale=static on fp16 keeps the
        dynamic scaler's starting 65536, so the scale in force is named."""
        if self.name is PrecisionName.fp8:
            return (
                f"fp8 ({self.cfg.fp8_recipe.value} scaling in {len(self.fp8_modules)} Linear layers, bf16 autocast "
                "elsewhere)"
            )
        if self.name is PrecisionName.bf16_pure:
            rounding = "stochastic rounding" if self.cfg.stochastic_rounding else "round-to-nearest updates"
            return f"bf16_pure (bf16 weights and optimizer state, {rounding})"
        if self.name.scales_loss:
            if self.loss_scale is LossScale.none:
                return "fp16 (no loss scale)"
            if self.loss_scale is LossScale.static:
                return f"fp16 (static loss scale {self.cfg.init_scale:g})"
            return f"fp16 ({self.loss_scale.value} loss scale)"
        return self.name.value

    def policy(self, fp32_modules: list[str]) -> list[str]:
        """What this run does to its numbers beyond the dtype and the loss scale, in words: clipping, the modules kept
        in fp32, skipping non-finite steps. Empty when none of it is set."""
        cfg, said = self.cfg, []
        if cfg.grad_clip_norm is not None:
            said.append(f"gradients clipped to norm {cfg.grad_clip_norm:g} (after unscaling)")
        if cfg.grad_clip_value is not None:
            said.append(f"gradients clipped to ±{cfg.grad_clip_value:g} (after unscaling)")
        if fp32_modules:
            said.append(f"in fp32: {', '.join(fp32_modules)}")
        if cfg.on_nonfinite is NonFinite.skip:
            said.append("non-finite steps skipped")
        return said

    def autocast(self) -> ContextManager:
        """Autocast context for forward + loss; a no-op context for fp32/tf32."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of the (scaled) loss. Under accumulation the scale must stay fixed until step()."""
        self.scaler.scale(loss).backward()

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        params: Iterable[torch.Tensor],
        want_norm: bool,
        inspect: Optional[Callable[[], None]] = None,
    ) -> Optional[torch.Tensor]:
        """unscale -> clip -> step -> update. Returns the grad norm, or None when nobody asked for it.

        The norm is computed only when asked (at log steps) or when clipping needs it, so most steps pay
        nothing for it. No host sync: with the fused optimizers mprun builds, GradScaler hands found_inf
        to the kernel, which skips an overflowing update on the device; telemetry counts it there too.
        """
        self.scaler.unscale_(optimizer)  # grads are now true grads: clipping and norms see unscaled values
        if inspect is not None:
            inspect()  # numerics statistics read the true gradients here
        norm = None
        if self.cfg.grad_clip_norm is not None or self.cfg.grad_clip_value is not None or want_norm:
            params = [p for p in params if p.grad is not None]  # only when something reads the grads
        if self.cfg.grad_clip_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip_norm, foreach=True)
        elif want_norm:
            norm = total_norm([p.grad for p in params])
        if self.cfg.grad_clip_value is not None:
            torch.nn.utils.clip_grad_value_(params, self.cfg.grad_clip_value, foreach=True)
        self.scaler.step(optimizer)
        if self.scaler.is_enabled():
            found = self._found_inf(optimizer)
            self.applied = 1 - found
            self._skips += found
            self._clean.add_(1).mul_(self.applied)
        else:
            self.steps_since_overflow += 1  # nothing can overflow a step without a scaler
        # Static scaling (and skip mode's 1.0): GradScaler cannot have growth_factor=1, so the scale is pinned after
        # every update.
        self.scaler.update(self._pinned)
        if self._after_step is not None:
            self._after_step()
        self._window_steps += 1
        return norm

    def _found_inf(self, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """GradScaler's record of this step's inf/NaN check (1.0: found, the step skipped), between step()
        and update(). torch has no public accessor; this state has kept its shape since torch 1.6."""
        try:
            per_device = self.scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        except (AttributeError, KeyError) as e:
            raise RuntimeError(
                f"torch {torch.__version__}: GradScaler no longer keeps found_inf_per_device where "
                "mprun reads it; skipped-step telemetry needs updating for this torch"
            ) from e
        return sum(per_device.values())

    def last_step_skipped(self) -> bool:
        """Whether the scaler skipped the last step. A host sync: for on_nonfinite=skip, which pays one per step."""
        return not bool(self.applied.item())

    def _refresh(self) -> None:
        """Bring the host counters up to date from the device (one host sync: log steps, checkpoints, the end)."""
        new = 0
        if self.scaler.is_enabled():
            skipped, self.steps_since_overflow = (int(v) for v in torch.stack([self._skips, self._clean]).tolist())
            new, self.skipped_steps = skipped - self.skipped_steps, skipped
        self._window = [self._window[0] + new, self._window[1] + self._window_steps]
        self._window_steps = 0
        scale = self.scale_value()
        if self.dynamic_scaling:
            # Every skip multiplied the scale by the backoff factor; what else moved it were growths.
            # GradScaler counts neither, so they follow from the scale (the scaler's own factors: a
            # resumed checkpoint's win over the config).
            self.backoff_events += new
            if scale > 0 and self._scale_seen > 0:
                moved = math.log(scale / self._scale_seen) - new * math.log(self.scaler.get_backoff_factor())
                self.growth_events += max(0, round(moved / math.log(self.scaler.get_growth_factor())))
        self._scale_seen = scale

    def telemetry(self) -> dict[str, float]:
        """amp/* metrics for the log window that ends now (one host sync). None without a scaler: an fp32, bf16 or
        fp8 run's scale is 1 and nothing is ever skipped, six flat lines in every chart view."""
        self._refresh()
        skipped, steps = self._window
        self._window = [0, 0]
        if not self.can_skip_steps:
            return {}
        return {
            "amp/loss_scale": self._scale_seen,
            "amp/skipped_steps": self.skipped_steps,
            "amp/skip_rate": skipped / steps if steps else 0.0,
            "amp/steps_since_overflow": self.steps_since_overflow,
            "amp/growth_events": self.growth_events,
            "amp/backoff_events": self.backoff_events,
        }

    def scale_value(self) -> float:
        """Current loss scale (1.0 without a scaler). A host sync: call at log intervals only."""
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0

    COUNTERS = ("skipped_steps", "steps_since_overflow", "growth_events", "backoff_events")

    def counters(self) -> dict[str, int]:
        """The cumulative telemetry counters, for summaries (one host sync)."""
        self._refresh()
        return {k: getattr(self, k) for k in self.COUNTERS}

    def state_dict(self) -> dict:
        """Scaler state plus telemetry counters, for checkpoints."""
        counters = self.counters()
        return {
            "name": self.name.value,
            "loss_scale": self.loss_scale.value,
            "scaler": self.scaler.state_dict(),
            **counters,
            "_window": list(self._window),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore scaler state and counters. The scaler state carries a loss scale only from a loss-scaled run
        to a loss-scaled run. Across that line the counters carry over and the scale is dropped (to no loss
        scale) or started fresh at init_scale (from none), with a warning. A scaler that only detects
        non-finite steps (on_nonfinite=skip, pinned at 1.0) holds no loss scale to hand on."""
        for key in self.COUNTERS:
            setattr(self, key, int(state.get(key, 0)))
        self._window = list(state.get("_window", [0, 0]))
        self._window_steps = 0
        self._skips.fill_(self.skipped_steps)
        self._clean.fill_(self.steps_since_overflow)
        saved = LossScale(state.get("loss_scale", LossScale.none.value))
        if saved is not LossScale.none and self.loss_scale is not LossScale.none:
            # A fixed scale is the configured one, whatever scale the checkpoint's run had reached or was given.
            scaler = state["scaler"] if self._pinned is None else {**state["scaler"], "scale": self._pinned}
            self.scaler.load_state_dict(scaler)
        elif saved is not LossScale.none:
            log.warning(
                "checkpoint was %s with a loss scale; %s has none, its scale dropped",
                state.get("name"),
                self.description,
            )
        elif self.loss_scale is not LossScale.none:
            log.warning(
                "checkpoint was %s without a loss scale; %s starts its scale fresh at %g",
                state.get("name"),
                self.description,
                self.cfg.init_scale,
            )
        self._scale_seen = self.scale_value()


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm over all gradients, as a device tensor (no sync)."""
    if not grads:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(grads, foreach=True)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))

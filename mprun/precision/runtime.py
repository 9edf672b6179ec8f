"""One precision object: autocast, loss scaling, unscale -> clip -> step -> update, and AMP telemetry.

The training loop never asks which dtype it runs in. For fp32/tf32/bf16 the GradScaler is
disabled, so scale/unscale_/step/update become pass-throughs and the loop stays branch-free.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Callable, ContextManager, Iterable, Optional

import torch
from torch import nn

from mprun.errors import ConfigError
from mprun.precision import bf16_pure, fp8
from mprun.precision.auto import _AUTOCAST_DTYPE, Measure, resolve
from mprun.precision.config import LossScale, NonFinite, PrecisionConfig
from mprun.precision.names import PrecisionName

log = logging.getLogger("mprun.precision")


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
        from torch.distributed.fsdp import MixedPrecisionPolicy  # 0.5 s to import: FSDP runs only

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

"""precision=bf16_pure: weights, gradients and optimizer state stored in bfloat16, with no fp32 master copy.

Two parts. The model transform casts every parameter and buffer to bf16 and converts floating inputs on the way in
(and the logits back to fp32 on the way out, so the loss and its softmax run in fp32). The optimizers do their
arithmetic in fp32, one parameter at a time, and write the result back to bf16 with stochastic rounding.

Why stochastic rounding: bf16 keeps 8 significant bits, so a weight near 1.0 moves only by steps of 2^-7. An update
smaller than half of that rounds back to the same weight every time, and training stalls. Rounding up with a
probability equal to the fraction dropped makes the stored weight right on average, so small updates still add up.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from torch.utils._pytree import tree_map

# Only the top 16 bits of an fp32 word survive in bf16; the low 16 bits are what rounding drops.
_LOW_BITS = 1 << 16


def round_stochastic(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16, rounding away from zero with probability (dropped low bits) / 2^16: unbiased in expectation.
    The bit trick works on the int32 view: keep the top 16 bits, and add one unit of them when a uniform 16-bit draw
    falls below the dropped bits. inf and NaN keep their top bits and stay inf/NaN."""
    bits = x.float().contiguous().view(torch.int32)
    draw = torch.randint(0, _LOW_BITS, bits.shape, device=bits.device, dtype=torch.int32)
    kept = bits & -_LOW_BITS  # 0xFFFF0000 as a signed int32
    up = (draw < (bits & (_LOW_BITS - 1))) & torch.isfinite(x)
    return torch.where(up, kept + _LOW_BITS, kept).view(torch.float32).to(torch.bfloat16)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 DTensor (a view: writing it writes the parameter), or the tensor itself. The
    update is elementwise, so each rank updates its own shard."""
    return t.to_local() if hasattr(t, "to_local") else t


def _store(target: torch.Tensor, value: torch.Tensor, stochastic: bool) -> None:
    """Write an fp32 result into a (bf16) tensor: stochastically rounded, or round-to-nearest."""
    target = _local(target)
    target.copy_(round_stochastic(value) if stochastic and target.dtype == torch.bfloat16 else value)


class _PerParameter(torch.optim.Optimizer):
    """Shared machinery: fp32 arithmetic per parameter (one parameter's fp32 copies at a time, so the peak memory
    stays near the bf16 storage), results stored back with stochastic rounding when asked. The state dict has the
    layout of torch's own optimizers, so a checkpoint moves between them."""

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], stochastic_rounding: bool) -> None:
        defaults.pop("fused", None)  # mprun's fused-kernel request: these step one parameter at a time
        defaults.pop("foreach", None)
        super().__init__(params, {**defaults, "stochastic_rounding": stochastic_rounding})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, self.state[p], group)
        return loss

    def _update(self, p: torch.Tensor, state: dict, group: dict) -> None:
        raise NotImplementedError


class SGD(_PerParameter):
    """torch.optim.SGD's update (momentum, nesterov, L2 weight decay; no dampening) for bf16 parameters."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        stochastic_rounding: bool = True,
        **kernels: Any,
    ) -> None:
        super().__init__(
            params,
            {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "nesterov": nesterov, **kernels},
            stochastic_rounding,
        )

    def _update(self, p: torch.Tensor, state: dict, group: dict) -> None:
        sr = group["stochastic_rounding"]
        w, g = _local(p).float(), _local(p.grad).float()
        if group["weight_decay"]:
            g = g.add(w, alpha=group["weight_decay"])
        if group["momentum"]:
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = _local(state["momentum_buffer"]).float().mul_(group["momentum"]).add_(g)
            _store(state["momentum_buffer"], buf, sr)
            g = g.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
        _store(p, w.add_(g, alpha=-group["lr"]), sr)


class Adam(_PerParameter):
    """torch.optim.Adam's update (L2 weight decay in the gradient), or AdamW's (decoupled) with decoupled=True, for
    bf16 parameters. Both moments are stored in the parameter's dtype."""

    decoupled = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        stochastic_rounding: bool = True,
        **kernels: Any,
    ) -> None:
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, **kernels}
        super().__init__(params, defaults, stochastic_rounding)

    def _update(self, p: torch.Tensor, state: dict, group: dict) -> None:
        sr, lr, (beta1, beta2) = group["stochastic_rounding"], group["lr"], group["betas"]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = float(state["step"])
        w, g = _local(p).float(), _local(p.grad).float()
        if group["weight_decay"]:
            if self.decoupled:
                w.mul_(1 - lr * group["weight_decay"])
            else:
                g = g.add(w, alpha=group["weight_decay"])
        m = _local(state["exp_avg"]).float().lerp_(g, 1 - beta1)
        v = _local(state["exp_avg_sq"]).float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
        _store(state["exp_avg"], m, sr)
        _store(state["exp_avg_sq"], v, sr)
        denom = (v / (1 - beta2**t)).sqrt_().add_(group["eps"])
        _store(p, w.addcdiv_(m, denom, value=-lr / (1 - beta1**t)), sr)


class AdamW(Adam):
    """torch.optim.AdamW's update (decoupled weight decay) for bf16 parameters."""

    decoupled = True


# torch's optimizer classes -> the bf16 ones with the same update and arguments.
REPLACES = {"torch.optim.SGD": SGD, "torch.optim.Adam": Adam, "torch.optim.AdamW": AdamW}


def optimizer_target(target: str) -> str:
    """The class path of the bf16 optimizer that does what `target` does (a torch.optim class path)."""
    from mprun.errors import ConfigError

    cls = REPLACES.get(target)
    if cls is None:
        raise ConfigError(
            f"precision=bf16_pure has no stochastic-rounding version of {target}; use optimizer=sgd, adam or adamw, "
            "or precision.stochastic_rounding=false"
        )
    return f"{__name__}.{cls.__name__}"


def _to_bf16(value: Any) -> Any:
    return value.to(torch.bfloat16) if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _to_fp32(value: Any) -> Any:
    return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def cast(module: nn.Module) -> None:
    """Store every parameter and buffer in bf16, take floating inputs in bf16 and give floating outputs in fp32 (the
    logits: the loss, its softmax and the metrics then run in fp32, as under autocast). Integer inputs (token ids)
    pass unchanged."""
    module.to(torch.bfloat16)
    module.register_forward_pre_hook(lambda _, args, kwargs: (tree_map(_to_bf16, args), kwargs), with_kwargs=True)
    module.register_forward_hook(lambda _, args, out: tree_map(_to_fp32, out))

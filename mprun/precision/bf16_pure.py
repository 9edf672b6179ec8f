"""precision=bf16_pure: weights, gradients and optimizer state stored in bfloat16, with no fp32 master copy.

Two parts. The model transform casts every parameter and buffer to bf16 and converts floating inputs on the way in
(and the logits back to fp32 on the way out, so the loss and its softmax run in fp32). The optimizers do their
arithmetic in fp32, one parameter at a time, and write the result back to bf16 with stochastic rounding.

Why stochastic rounding: bf16 keeps 8 significant bits, so a weight near 1.0 moves only by steps of 2^-7. An update
smaller than half of that rounds back to the same weight every time, and training stalls. Rounding up with a
probability equal to the fraction dropped makes the stored weight right on average, so small updates still add up.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_map

from mprun.distributed import local_shard
from mprun.errors import ConfigError

# Only the top 16 bits of an fp32 word survive in bf16; the low 16 bits are what rounding drops.
_LOW_BITS = 1 << 16


def _round_bits(bits: torch.Tensor) -> None:
    """Stochastic rounding in place, on the int32 view of fp32 values, leaving values that bf16 holds exactly: add a
    uniform 16-bit draw, then clear the low 16 bits. The sum carries into the kept bits exactly when the draw exceeds
    2^16 minus the dropped bits. The sign bit is apart from the magnitude, so negatives round away from zero too; inf
    stays inf (its low bits are zero), as does torch's NaN, and the largest floats may round up to inf, as rounding
    up does."""
    bits.add_(torch.randint_like(bits, 0, _LOW_BITS)).bitwise_and_(-_LOW_BITS)


# fp32 working copies are made for this many elements at a time (64 MiB a list): the step's extra memory stays
# bounded, which is bf16_pure's point, while a chunk's tensors go through one multi-tensor (foreach) kernel.
CHUNK_ELEMENTS = 1 << 24


class _Working:
    """fp32 copies of a list of tensors (bf16 parameters, gradients or state), in one flat buffer: the update runs
    on the list with foreach kernels, and stochastic rounding on the buffer with three."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.targets = [local_shard(t) for t in tensors]
        self.flat = torch.empty(sum(t.numel() for t in self.targets), dtype=torch.float32,
                                device=self.targets[0].device)  # fmt: skip
        self.views = [v.view_as(t) for v, t in zip(self.flat.split([t.numel() for t in self.targets]), self.targets)]
        torch._foreach_copy_(self.views, self.targets)

    def store(self, stochastic: bool) -> None:
        """Write the (updated) fp32 values back: stochastically rounded into bf16 targets, else round to nearest."""
        if stochastic and self.targets[0].dtype == torch.bfloat16:
            _round_bits(self.flat.view(torch.int32))  # now exact in bf16: the copy below only drops zero bits
        torch._foreach_copy_(self.targets, self.views)


def _chunks(params: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """The parameters in runs of at most CHUNK_ELEMENTS elements (a larger one alone), of one dtype and device."""
    chunk: list[torch.Tensor] = []
    size = 0
    for p in params:
        n = local_shard(p).numel()
        if chunk and (size + n > CHUNK_ELEMENTS or (p.dtype, p.device) != (chunk[0].dtype, chunk[0].device)):
            yield chunk
            chunk, size = [], 0
        chunk.append(p)
        size += n
    if chunk:
        yield chunk


class _Bf16Optimizer(torch.optim.Optimizer):
    """Shared machinery: the update in fp32 on working copies of a chunk of parameters at a time, the results
    stored back with stochastic rounding when asked. The state dict has the layout of torch's own optimizers, so a
    checkpoint moves between them."""

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], stochastic_rounding: bool) -> None:
        defaults.pop("fused", None)  # mprun's fused-kernel request: these run foreach kernels on fp32 copies
        defaults.pop("foreach", None)
        super().__init__(params, {**defaults, "stochastic_rounding": stochastic_rounding})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for chunk in _chunks([p for p in group["params"] if p.grad is not None]):
                self._update(chunk, [self.state[p] for p in chunk], group)
        return loss

    def _update(self, params: list[torch.Tensor], states: list[dict], group: dict) -> None:
        raise NotImplementedError


class SGD(_Bf16Optimizer):
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

    def _update(self, params: list[torch.Tensor], states: list[dict], group: dict) -> None:
        sr, momentum = group["stochastic_rounding"], group["momentum"]
        w = _Working(params)
        g = _Working([p.grad for p in params]).views
        if group["weight_decay"]:
            g = torch._foreach_add(g, w.views, alpha=group["weight_decay"])
        if momentum:
            for p, state in zip(params, states):
                state.setdefault("momentum_buffer", torch.zeros_like(p))
            buf = _Working([state["momentum_buffer"] for state in states])
            torch._foreach_mul_(buf.views, momentum)
            torch._foreach_add_(buf.views, g)
            g = torch._foreach_add(g, buf.views, alpha=momentum) if group["nesterov"] else buf.views
            buf.store(sr)
        torch._foreach_add_(w.views, g, alpha=-group["lr"])
        w.store(sr)


class Adam(_Bf16Optimizer):
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

    def _update(self, params: list[torch.Tensor], states: list[dict], group: dict) -> None:
        sr, lr, (beta1, beta2) = group["stochastic_rounding"], group["lr"], group["betas"]
        for p, state in zip(params, states):
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)  # on the host: reading it costs no sync
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
        t = [float(state["step"]) for state in states]
        w = _Working(params)
        g = _Working([p.grad for p in params]).views
        if group["weight_decay"]:
            if self.decoupled:
                torch._foreach_mul_(w.views, 1 - lr * group["weight_decay"])
            else:
                g = torch._foreach_add(g, w.views, alpha=group["weight_decay"])
        m = _Working([state["exp_avg"] for state in states])
        v = _Working([state["exp_avg_sq"] for state in states])
        torch._foreach_lerp_(m.views, g, 1 - beta1)
        torch._foreach_mul_(v.views, beta2)
        torch._foreach_addcmul_(v.views, g, g, value=1 - beta2)
        denom = torch._foreach_div(v.views, [1 - beta2**n for n in t])
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_addcdiv_(w.views, m.views, denom, [-lr / (1 - beta1**n) for n in t])
        m.store(sr)
        v.store(sr)
        w.store(sr)


class AdamW(Adam):
    """torch.optim.AdamW's update (decoupled weight decay) for bf16 parameters."""

    decoupled = True


# torch's optimizer classes -> the bf16 ones with the same update and arguments.
REPLACES = {"torch.optim.SGD": SGD, "torch.optim.Adam": Adam, "torch.optim.AdamW": AdamW}


def optimizer_target(target: str) -> str:
    """The class path of the bf16 optimizer that does what `target` does (a torch.optim class path)."""
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

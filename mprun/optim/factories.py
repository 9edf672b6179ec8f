"""The fused optimizer kernels, and the LR-scheduler factories the scheduler schemas point at.

Schedulers count attempted optimizer steps: the loop calls scheduler.step() after every step,
including one the loss scaler skipped (as a torch.amp loop does; knowing would cost a host sync).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

# The fused kernels DTensor has a sharding rule for (FSDP2's parameters are DTensors): none for fused SGD
# (aten._fused_sgd_), which under FSDP runs with foreach kernels instead.
FUSED_ON_DTENSOR = ("torch.optim.Adam", "torch.optim.AdamW")


def implementation(target: str = "", sharded: bool = False) -> dict:
    """One fused kernel per optimizer step, on CUDA and on the CPU. Fused optimizers also take
    GradScaler's found_inf and skip an overflowing step on the device: no host sync per step, and
    the same code path on the CPU (where the tests run) as on a GPU. Build them through prepare().
    `target`: the optimizer's class path; `sharded`: its parameters are FSDP2's DTensors, where an optimizer
    without a fused DTensor kernel uses foreach (multi-tensor) kernels instead."""
    return {"foreach": True} if sharded and target not in FUSED_ON_DTENSOR else {"fused": True}


def prepare(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Zeroed momentum buffers for fused SGD. On its first step fused SGD allocates the buffers with
    empty_like and lets the kernel fill them; when the loss scaler skips that step (an overflow at the
    initial scale is routine) the kernel writes nothing, and the next steps treat uninitialised memory
    as momentum (parameters of ~1e28 measured on the CPU). Starting from zeros is exact: the first
    real step then computes momentum * 0 + grad = grad, which is what SGD's first step stores
    (mprun's SGD has no dampening)."""
    if isinstance(optimizer, torch.optim.SGD):
        for group in optimizer.param_groups:
            if group.get("fused") and group["momentum"] and not group["dampening"]:
                for p in group["params"]:
                    optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
    return optimizer


def _with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int, shape: Callable[[int], float]) -> LRScheduler:
    # One LambdaLR instead of SequentialLR: a single multiplier, a single state_dict, no chaining quirks.
    # warmup_steps steps climb linearly (never at 0: that step would be wasted); the shape starts at step warmup_steps
    # with the full rate, reached on exactly that step and held for it alone.
    def factor(step: int) -> float:
        return min(1.0, (step + 1) / (warmup_steps + 1)) * shape(max(0, step - warmup_steps))

    return LambdaLR(optimizer, factor)


def constant(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> LRScheduler:
    """Constant LR after optional warmup."""
    return _with_warmup(optimizer, warmup_steps, lambda step: 1.0)


def cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> LRScheduler:
    """Cosine decay to min_lr_ratio * lr over the steps after warmup."""
    span = max(1, total_steps - warmup_steps)
    return _with_warmup(
        optimizer,
        warmup_steps,
        lambda step: min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(step, span) / span)),
    )


def step(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, step_size: int, gamma: float
) -> LRScheduler:
    """Multiply LR by gamma every step_size optimizer steps after warmup."""
    return _with_warmup(optimizer, warmup_steps, lambda step: gamma ** (step // step_size))


def onecycle(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    pct_start: float,
    div_factor: float,
    final_div_factor: float,
) -> LRScheduler:
    """torch's OneCycleLR curve peaking at the configured lr (cosine rise from lr/div_factor, cosine fall to
    lr/div_factor/final_div_factor, no momentum cycling); warmup_steps, if set, fixes the rise length.

    Written as a LambdaLR, like the other schedules, so its state is the step count alone: a run resumed with a
    longer max_steps follows the longer curve, where OneCycleLR's saved state keeps the old length and fails past it."""
    if warmup_steps:
        pct_start = min(0.99, warmup_steps / max(1, total_steps))
    total = max(2, total_steps)
    peak = pct_start * total - 1  # the step at which the lr peaks (OneCycleLR's end of the first phase)
    low, final = 1 / div_factor, 1 / (div_factor * final_div_factor)

    def anneal(start: float, end: float, pct: float) -> float:
        return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)

    def factor(step: int) -> float:
        step = min(step, total)
        if step <= peak:
            return anneal(low, 1.0, step / peak if peak > 0 else 1.0)
        return anneal(1.0, final, (step - peak) / (total - 1 - peak))

    return LambdaLR(optimizer, factor)

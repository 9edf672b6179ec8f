"""Underflow/overflow statistics: per unit (a top-level module; a ModuleList: per block), the share of gradient
elements that are zero or inf in float16 at the current scale, and the largest activation against float16's 65504."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from mprun.numerics.trace import tensors_in

FP16_MAX = 65504.0


def stat_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules statistics are kept for: the top-level children, except that a container without a forward of
    its own (a ModuleList or ModuleDict: a transformer's blocks) stands for its children (h.0, h.1, ...)."""
    units = []
    for name, child in model.named_children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            units += [(f"{name}.{n}", m) for n, m in child.named_children()]
        else:
            units.append((name, child))
    return units


def _group(name: str, units: list[str]) -> str:
    """A parameter's unit (stat_units): the longest unit name it sits under."""
    return max((u for u in units if name.startswith(f"{u}.")), key=len, default=name.split(".", 1)[0])


@contextlib.contextmanager
def watch_activations(model: nn.Module, into: dict[str, float]) -> Iterator[None]:
    """Record each unit's (stat_units) largest |output| during the forward passes inside the block."""

    def hook(name: str):
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            for t in tensors_in(output):
                if t.is_floating_point() and t.numel():
                    into[name] = max(into.get(name, 0.0), t.detach().abs().max().float().item())

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in stat_units(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def gradient_stats(model: nn.Module, scale: float) -> dict[str, dict[str, float]]:
    """Per unit (stat_units): share of gradient elements that are 0 (underflow) or inf (overflow) once multiplied
    by the loss scale and cast to float16, rounding as the cast rounds (2**-25 and below flush to 0, from 65520
    up to inf). Exact zeros (dead ReLUs) count as underflow too. Reads unscaled gradients; one sync in all.
    Under FSDP each rank holds a shard of every gradient (a DTensor): shards are counted, then summed over ranks."""
    counts: dict[str, torch.Tensor] = {}  # per group: [underflow, overflow, elements] on the device
    mesh = None
    units = [n for n, _ in stat_units(model)]
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        grad = p.grad.detach()
        if hasattr(grad, "to_local"):  # a DTensor: this rank's shard
            mesh, grad = grad.device_mesh, grad.to_local()
        h = (grad.float() * scale).half()
        c = torch.stack([(h == 0).sum(), torch.isinf(h).sum(), torch.tensor(h.numel(), device=h.device)])
        group = _group(name, units)
        counts[group] = counts[group] + c if group in counts else c
    if not counts:
        return {}
    totals = torch.stack(list(counts.values()))
    if mesh is not None:  # every rank of an FSDP run has the same groups: one collective over the shards
        torch.distributed.all_reduce(totals, group=mesh.get_group())
    return {k: {"underflow": u / n, "overflow": o / n} for k, (u, o, n) in zip(counts, totals.tolist())}  # the sync


@dataclass
class Stats:
    """Collected statistics over a run: the latest values per module, for the end-of-run table."""

    latest: dict[str, dict[str, float]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)  # unit name (stat_units) -> its class, for the table

    def metrics(self, grads: dict[str, dict[str, float]], acts: dict[str, float], model: nn.Module) -> dict[str, float]:
        self.kinds = self.kinds or {name: type(m).__name__ for name, m in stat_units(model)}
        out = {}
        for mod, a in acts.items():  # first: every top-level module, in the order the forward pass ran them
            self.latest.setdefault(mod, {})["act_absmax"] = a
            out[f"numerics/act_absmax/{mod}"] = a
        for mod, v in grads.items():
            self.latest.setdefault(mod, {}).update(v)
            out[f"numerics/underflow/{mod}"] = v["underflow"]
            out[f"numerics/overflow/{mod}"] = v["overflow"]
        return out

    def table(self) -> str:
        """Markdown: the last measured statistics per module."""
        rows = [
            "| module | grad underflow in fp16 | grad overflow in fp16 | largest activation (abs) | vs 65504 |",
            "|---|---|---|---|---|",
        ]
        for mod, v in self.latest.items():
            a, u, o = (
                v.get("act_absmax"),
                v.get("underflow"),
                v.get("overflow"),
            )  # None where it was not measured: a module without parameters has no gradients
            rows.append(
                f"| {mod} ({self.kinds.get(mod, '?')}) | {'—' if u is None else f'{100 * u:.2f}%'} | "
                f"{'—' if o is None else f'{100 * o:.4f}%'} | {'—' if a is None else f'{a:.4g}'} | "
                f"{'—' if a is None else f'{a / FP16_MAX:.1e}×'} |"
            )
        return "\n".join(rows) + "\n"

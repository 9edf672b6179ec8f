"""The NaN tracer: re-run the offending batch with hooks and name the first module whose output or gradient went
non-finite, with its dtype and input ranges."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from mprun.data.loaders import Batch
from mprun.tasks import CLASSIFICATION, Task


def _range(t: Any) -> Optional[dict[str, Any]]:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
        return None
    x = t.detach().float()
    finite = x[torch.isfinite(x)]
    return {
        "dtype": str(t.dtype).replace("torch.", ""),
        "shape": list(t.shape),
        "min": finite.min().item() if finite.numel() else None,
        "max": finite.max().item() if finite.numel() else None,
        "absmax": finite.abs().max().item() if finite.numel() else None,
        "nonfinite": int((~torch.isfinite(x)).sum().item()),
    }


def tensors_in(value: Any) -> list[torch.Tensor]:
    # Leaves only: rebuilding the structure (tree_map) fails for an LSTM's PackedSequence output.
    return [v for v in tree_leaves(value) if isinstance(v, torch.Tensor)]


def _nonfinite(value: Any) -> bool:
    return any(t.is_floating_point() and not torch.isfinite(t).all() for t in tensors_in(value))


def _hook_leaves(model: nn.Module, report: dict[str, Any]) -> list[Any]:
    """Hook every module so that `report` records the first leaf whose output (forward) or input gradient
    (backward) is non-finite; returns the hooks' handles."""
    names = {m: n or "<model>" for n, m in model.named_modules()}

    def on_forward(module: nn.Module, inputs: Any, output: Any) -> None:
        if report["forward"] is None and _nonfinite(output) and not list(module.children()):
            report["forward"] = {
                "module": names[module],
                "type": type(module).__name__,
                "inputs": [r for r in map(_range, tensors_in(inputs)) if r],
                "output": [r for r in map(_range, tensors_in(output)) if r],
            }

    def on_backward(module: nn.Module, grad_input: Any, grad_output: Any) -> None:
        if report["backward"] is None and _nonfinite(grad_input) and not list(module.children()):
            report["backward"] = {
                "module": names[module],
                "type": type(module).__name__,
                "grad_output": [r for r in map(_range, tensors_in(grad_output)) if r],
                "grad_input": [r for r in map(_range, tensors_in(grad_input)) if r],
            }

    handles = [m.register_forward_hook(on_forward) for m in model.modules()]
    handles += [m.register_full_backward_hook(on_backward) for m in model.modules() if not list(m.children())]
    return handles


def trace_nonfinite(model: nn.Module, batch: Batch, precision: Any, task: Task = CLASSIFICATION) -> dict[str, Any]:
    """Re-run one batch forward and backward with hooks on every module; report the first module whose
    output (forward) or input gradient (backward, in the order backward reaches them) is non-finite.

    The model's parameters, buffers (BatchNorm statistics), gradients and the RNG are left as found."""
    x, y = batch
    saved_buffers = {k: v.clone() for k, v in model.named_buffers()}
    saved_grads = {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}
    report: dict[str, Any] = {
        "forward": None,
        "backward": None,
        "nonfinite_params": [n for n, p in model.named_parameters() if not torch.isfinite(p).all()],
    }
    # Backward hooks cannot see through in-place ops (ReLU(inplace=True) edits the hooked output): off while tracing.
    inplace = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    for m in inplace:
        m.inplace = False
    # The re-run draws random numbers (dropout): the RNG of the CPU and of the batch's GPU are put back after it.
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        handles = _hook_leaves(model, report)
        try:
            with precision.autocast():
                loss = task.loss(model(x), y)
            report["loss"] = loss.item()
            model.zero_grad(set_to_none=True)
            # "hook fires on outputs" for a first layer whose input needs no grad: expected
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                (loss * precision.scale_value()).backward()
        finally:
            for h in handles:
                h.remove()
            for m in inplace:
                m.inplace = True
            with torch.no_grad():
                for k, v in model.named_buffers():
                    v.copy_(saved_buffers[k])
            for n, p in model.named_parameters():
                p.grad = saved_grads[n]
    return report


def describe_trace(report: dict[str, Any]) -> str:
    """One line a person can act on."""
    parts = []
    if report.get("nonfinite_params"):
        parts.append(f"parameters already non-finite: {report['nonfinite_params'][:5]}")
    fwd, bwd = report.get("forward"), report.get("backward")
    if fwd:
        rng = fwd["inputs"][0] if fwd["inputs"] else {}
        parts.append(
            f"first non-finite output in forward: {fwd['module']} ({fwd['type']}, {fwd['output'][0]['dtype']}; "
            f"input range [{rng.get('min')}, {rng.get('max')}])"
        )
    if bwd:
        parts.append(f"first non-finite gradient in backward: {bwd['module']} ({bwd['type']})")
    if not parts:
        parts.append("re-running the batch gave finite outputs and gradients (the problem did not reproduce)")
    return "; ".join(parts)

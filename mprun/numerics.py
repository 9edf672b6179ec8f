"""Numerics: catch mixed-precision trouble early and say what it is.

- fp32 islands: `precision.fp32_modules` globs run the matching modules outside autocast, in float32.
- Policy: a non-finite loss without a scaler (fp32/bf16), and a collapsing fp16 loss scale, stop the
  run (or warn) with a diagnosis instead of training on with a useless model.
- The NaN tracer re-runs the offending batch with hooks and names the first module whose output or
  gradient went non-finite, with its dtype and input ranges.
- Underflow/overflow statistics: per top-level module (a ModuleList: per block), the share of gradient elements
  that are zero or inf in float16 at the current scale, and the largest activation against float16's 65504.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from mprun.data.loaders import Batch
from mprun.errors import NumericsError
from mprun.tasks import CLASSIFICATION, Task

log = logging.getLogger(__name__)
FP16_MAX = 65504.0


# ---------------------------------------------------------------- fp32 islands


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


def _tensors(value: Any) -> list[torch.Tensor]:
    # Leaves only: rebuilding the structure (tree_map) fails for an LSTM's PackedSequence output.
    return [v for v in tree_leaves(value) if isinstance(v, torch.Tensor)]


def _nonfinite(value: Any) -> bool:
    return any(t.is_floating_point() and not torch.isfinite(t).all() for t in _tensors(value))


def trace_nonfinite(model: nn.Module, batch: Batch, precision: Any, task: Task = CLASSIFICATION) -> dict[str, Any]:
    """Re-run one batch forward and backward with hooks on every module; report the first module whose
    output (forward) or input gradient (backward, in the order backward reaches them) is non-finite.

    The model's parameters, buffers (BatchNorm statistics), gradients and the RNG are left as found."""
    x, y = batch
    saved_buffers = {k: v.clone() for k, v in model.named_buffers()}
    saved_grads = {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}
    names = {m: n or "<model>" for n, m in model.named_modules()}
    report: dict[str, Any] = {
        "forward": None,
        "backward": None,
        "nonfinite_params": [n for n, p in model.named_parameters() if not torch.isfinite(p).all()],
    }

    def on_forward(module: nn.Module, inputs: Any, output: Any) -> None:
        if report["forward"] is None and _nonfinite(output) and not list(module.children()):
            report["forward"] = {
                "module": names[module],
                "type": type(module).__name__,
                "inputs": [r for r in map(_range, _tensors(inputs)) if r],
                "output": [r for r in map(_range, _tensors(output)) if r],
            }

    def on_backward(module: nn.Module, grad_input: Any, grad_output: Any) -> None:
        if report["backward"] is None and _nonfinite(grad_input) and not list(module.children()):
            report["backward"] = {
                "module": names[module],
                "type": type(module).__name__,
                "grad_output": [r for r in map(_range, _tensors(grad_output)) if r],
                "grad_input": [r for r in map(_range, _tensors(grad_input)) if r],
            }

    # Backward hooks cannot see through in-place ops (ReLU(inplace=True) edits the hooked output): off while tracing.
    inplace = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    for m in inplace:
        m.inplace = False
    # The re-run draws random numbers (dropout): the RNG of the CPU and of the batch's GPU are put back after it.
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        handles = [m.register_forward_hook(on_forward) for m in model.modules()]
        handles += [m.register_full_backward_hook(on_backward) for m in model.modules() if not list(m.children())]
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


# ---------------------------------------------------------------- underflow / overflow statistics


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
            for t in _tensors(output):
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


# ---------------------------------------------------------------- policy


class _Problem(NamedTuple):
    kind: str  # warned once per kind
    action: str  # stop or warn
    text: str  # what happened (and, where its remedy is its own, what to try)
    nonfinite: bool = True  # made of inf/NaN values: traced, and a stop ends with the precision's remedies for those


class Guard:
    """Watches each log window's numbers and applies the precision config's policy.

    Stops are raised as NumericsError (the run ends FAILED with the diagnosis); warnings are logged
    once per kind. Everything here runs at log steps on numbers already synced, so it adds no sync."""

    def __init__(self, precision: Any, task: Task = CLASSIFICATION) -> None:
        self.precision = precision
        self.task = task  # what the tracer's re-run computes as the loss
        self.cfg = precision.cfg
        self.high_skip_windows = 0
        self.zero_grad_windows = 0  # log steps in a row whose gradients were all exactly zero
        self.warned: set[str] = set()
        self.traces: list[dict[str, Any]] = []
        self.stats = Stats() if self.cfg.stats_every_steps else None

    def state_dict(self) -> dict[str, Any]:
        """What the policy has seen so far, for checkpoints: a resumed run keeps counting toward collapse_patience,
        warns no twice, and traces no more than trace_nonfinite allows."""
        return {
            "high_skip_windows": self.high_skip_windows,
            "zero_grad_windows": self.zero_grad_windows,
            "warned": sorted(self.warned),
            "traces": self.traces,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.high_skip_windows = int(state.get("high_skip_windows", 0))
        self.zero_grad_windows = int(state.get("zero_grad_windows", 0))
        self.warned = set(state.get("warned", []))
        self.traces = list(state.get("traces", []))

    def stats_due(self, step: int) -> bool:
        """Whether step (1-based) collects underflow/overflow statistics."""
        return self.stats is not None and step % self.cfg.stats_every_steps == 0

    def _tracing(self) -> bool:
        mode = self.cfg.trace_nonfinite.value
        return not (mode == "off" or (mode == "first" and self.traces))

    def _trace(self, model: nn.Module, batches: list[Batch], step: int, why: str) -> Optional[dict]:
        """Trace the step's micro-batches (several under gradient accumulation) until one reproduces the problem."""
        if not self._tracing():
            return None
        for batch in batches:
            found = trace_nonfinite(model, batch, self.precision, self.task)
            if found["forward"] or found["backward"] or found["nonfinite_params"]:
                break
        report = {"step": step, "why": why, **found}
        report["summary"] = describe_trace(report)
        self.traces.append(report)
        log.warning("NaN tracer at step %d (%s): %s", step, why, report["summary"])
        return report

    def after_step(self, model: nn.Module, batches: list[Batch], step: int) -> None:
        """A step skipped without a real loss scale (on_nonfinite=skip) had non-finite gradients: trace it."""
        # The per-step sync skip mode pays, and only while there is still something to trace.
        if self.precision.skip_mode and self._tracing() and self.precision.last_step_skipped():
            self._trace(model, batches, step, "non-finite gradients, step skipped")

    def check(self, metrics: dict[str, float], model: nn.Module, batches: list[Batch], step: int) -> None:
        """Apply the policy to one log window's metrics."""
        p, cfg = self.precision, self.cfg
        problems: list[_Problem] = []
        if not p.can_skip_steps and not math.isfinite(metrics["train/loss"]):
            problems.append(
                _Problem(
                    "nonfinite_loss",
                    "stop",
                    f"non-finite training loss ({metrics['train/loss']}) in "
                    f"{p.description}, which has no loss scaler to skip such steps",
                )
            )
        if p.can_skip_steps:  # dynamic, static, or skip mode's scale pinned at 1.0
            scale, rate = metrics["amp/loss_scale"], metrics["amp/skip_rate"]
            self.high_skip_windows = self.high_skip_windows + 1 if rate > cfg.max_skip_rate else 0
            if p.dynamic_scaling and scale <= cfg.min_loss_scale:
                problems.append(
                    _Problem(
                        "scale_floor",
                        cfg.on_collapse.value,
                        f"loss scale collapsed to {scale:g} (floor precision.min_loss_scale={cfg.min_loss_scale:g}) "
                        f"after {metrics['amp/skipped_steps']:.0f} skipped steps",
                    )
                )
            elif self.high_skip_windows >= cfg.collapse_patience:
                problems.append(
                    _Problem(
                        "skip_rate",
                        cfg.on_collapse.value,
                        f"over {cfg.max_skip_rate:.0%} of steps skipped in each of the last {self.high_skip_windows} "
                        f"log windows ({rate:.0%} in the latest; precision.max_skip_rate={cfg.max_skip_rate:g}); "
                        f"loss scale {scale:g}{p.fixed_scale_note()}",
                    )
                )
        # Gradients all exactly zero while the loss is not: nothing trains (in fp16, typically underflow).
        zero = metrics.get("train/grad_norm") == 0.0 and metrics["train/loss"] > 0
        self.zero_grad_windows = self.zero_grad_windows + 1 if zero else 0
        if self.zero_grad_windows >= cfg.collapse_patience:
            scale = metrics.get("amp/loss_scale", 1.0)
            problems.append(
                _Problem(
                    "zero_gradients",
                    cfg.on_collapse.value,
                    f"every gradient was exactly zero at each of the last {self.zero_grad_windows} log steps "
                    f"while the training loss was {metrics['train/loss']:.4g}: nothing trains."
                    + p.zero_gradient_hint(scale),
                    nonfinite=False,
                )
            )
        for kind, action, text, nonfinite in problems:
            if action == "stop":
                report = {"step": step, "diagnosis": text, "metrics": metrics}
                # The NaN tracer names where inf/NaN first appeared: for problems made of non-finite values only.
                trace = (
                    (self._trace(model, batches, step, text) or (self.traces[-1] if self.traces else None))
                    if nonfinite
                    else None
                )
                if trace:
                    report["trace"] = trace
                hint = p.stop_hint() if nonfinite else ""
                raise NumericsError(
                    f"step {step}: {text}."
                    + (f" NaN tracer at step {trace['step']}: {trace['summary']}." if trace else "")
                    + hint,
                    report,
                )
            if kind not in self.warned:  # once per kind
                self.warned.add(kind)
                log.warning("step %d: %s (precision.on_collapse=warn: training goes on)", step, text)

"""The numerics policy: a non-finite loss without a scaler (fp32/bf16) and a collapsing fp16 loss scale stop the run (or
warn) with a diagnosis instead of training on with a useless model."""

from __future__ import annotations

import logging
import math
from typing import Any, NamedTuple, Optional

from torch import nn

from mprun.data.loaders import Batch
from mprun.errors import NumericsError
from mprun.numerics.stats import Stats
from mprun.numerics.trace import describe_trace, trace_nonfinite
from mprun.tasks import CLASSIFICATION, Task

log = logging.getLogger(__name__)


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

    def _scaler_problems(self, metrics: dict[str, float]) -> list[_Problem]:
        """The window's loss-scaling problems: a non-finite loss without a scaler, a collapsing loss scale, or too
        many skipped steps (counted toward collapse_patience)."""
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
        return problems

    def _zero_gradient_problems(self, metrics: dict[str, float]) -> list[_Problem]:
        """The window's zero-gradient problem, once collapse_patience log steps in a row had only zero gradients."""
        cfg = self.cfg
        # Gradients all exactly zero while the loss is not: nothing trains (in fp16, typically underflow).
        zero = metrics.get("train/grad_norm") == 0.0 and metrics["train/loss"] > 0
        self.zero_grad_windows = self.zero_grad_windows + 1 if zero else 0
        if self.zero_grad_windows < cfg.collapse_patience:
            return []
        scale = metrics.get("amp/loss_scale", 1.0)
        return [
            _Problem(
                "zero_gradients",
                cfg.on_collapse.value,
                f"every gradient was exactly zero at each of the last {self.zero_grad_windows} log steps "
                f"while the training loss was {metrics['train/loss']:.4g}: nothing trains."
                + self.precision.zero_gradient_hint(scale),
                nonfinite=False,
            )
        ]

    def _stop_error(
        self, problem: _Problem, *, metrics: dict[str, float], model: nn.Module, batches: list[Batch], step: int
    ) -> NumericsError:
        """The NumericsError that stops the run for `problem`, with the diagnosis and, where traced, the trace."""
        text, nonfinite = problem.text, problem.nonfinite
        report = {"step": step, "diagnosis": text, "metrics": metrics}
        # The NaN tracer names where inf/NaN first appeared: for problems made of non-finite values only.
        trace = (
            (self._trace(model, batches, step, text) or (self.traces[-1] if self.traces else None))
            if nonfinite
            else None
        )
        if trace:
            report["trace"] = trace
        hint = self.precision.stop_hint() if nonfinite else ""
        return NumericsError(
            f"step {step}: {text}."
            + (f" NaN tracer at step {trace['step']}: {trace['summary']}." if trace else "")
            + hint,
            report,
        )

    def check(self, metrics: dict[str, float], model: nn.Module, batches: list[Batch], step: int) -> None:
        """Apply the policy to one log window's metrics."""
        problems = self._scaler_problems(metrics) + self._zero_gradient_problems(metrics)
        for problem in problems:
            if problem.action == "stop":
                raise self._stop_error(problem, metrics=metrics, model=model, batches=batches, step=step)
            if problem.kind not in self.warned:  # once per kind
                self.warned.add(problem.kind)
                log.warning("step %d: %s (precision.on_collapse=warn: training goes on)", step, problem.text)

"""The training loop: fit -> train_epoch -> train_step, plus evaluate. Built objects in, results out.

Host syncs are confined to log steps, evaluation and epoch ends. Between them the loss is
accumulated on the device, and whether the loss scaler skipped a step is counted on the device
(fused optimizers skip it there), so no step waits for the host. The one exception is asked for:
precision.on_nonfinite=skip without a loss scale reads every step's outcome to trace it.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from dataclasses import dataclass
from itertools import islice
from typing import Iterable, Iterator, Optional

import torch
from torch import nn

from mprun import numerics
from mprun.checkpoint import unwrap, user_module
from mprun.data.loaders import Batch, Loader, TimedLoader
from mprun.distributed import SINGLE, World
from mprun.interrupts import GracefulStop
from mprun.precision.runtime import Precision
from mprun.progress import Progress
from mprun.tasks import CLASSIFICATION, Task
from mprun.tracking.base import Tracker
from mprun.training import measure
from mprun.training.config import TrainerConfig
from mprun.training.memory import reset_peak_memory
from mprun.training.state import (
    Checkpointer,
    FitResult,
    KeepBest,
    Training,
    TrainState,
    finished,
    planned_epochs,
    planned_steps,
)

log = logging.getLogger(__name__)


def _to_device(batch: Batch, device: torch.device, channels_last: bool) -> Batch:
    x, y = batch
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def _chunks(batches: Iterable[Batch], size: int) -> Iterator[list[Batch]]:
    it = iter(batches)
    while chunk := list(islice(it, size)):
        yield chunk


def train_step(
    model: nn.Module,
    micro_batches: list[Batch],
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    *,
    want_norm: bool,
    stats: Optional[dict] = None,
    task: Task = CLASSIFICATION,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Forward/backward over the micro-batches, then one optimizer step: (mean loss, grad norm or None); the task
    says what the loss is. With `stats` (a dict), also record activation maxima and fp16 gradient under/overflow."""
    total = torch.zeros((), device=micro_batches[0][0].device)
    plain = user_module(model)  # hooks and statistics see the user's module names, not DDP's or compile's wrapper
    if stats is not None:
        # Compiled code never calls forward hooks added after compilation (dynamo does not guard on them),
        # so a statistics step runs the model eagerly; DDP's wrapper stays, gradients are still all-reduced.
        model = unwrap(model)
    no_sync = getattr(model, "no_sync", None)  # DDP: all-reduce gradients on the last micro-batch only
    for i, (x, y) in enumerate(micro_batches):
        accumulate = no_sync() if no_sync is not None and i < len(micro_batches) - 1 else contextlib.nullcontext()
        watch = (
            numerics.watch_activations(plain, stats.setdefault("acts", {}))
            if stats is not None
            else contextlib.nullcontext()
        )
        with precision.autocast(), watch, accumulate:
            loss = task.loss(model(x), y)
        # Averaging over micro-batches makes the accumulated gradient equal one big batch's. The loss
        # scale must not change between micro-batches, which holds because update() runs only in step().
        precision.backward(loss / len(micro_batches))
        total += loss.detach()
    inspect = None
    if stats is not None:  # the scale this step's gradients were computed at, applied to the true gradients
        scale = precision.scale_value()
        inspect = lambda: stats.update(grads=numerics.gradient_stats(plain, scale))  # noqa: E731
    norm = precision.step(optimizer, model.parameters(), want_norm, inspect)
    optimizer.zero_grad(set_to_none=True)
    return total / len(micro_batches), norm


@dataclass
class _Pass:
    """One pass over the training data and what each of its steps reads and writes besides the batch."""

    run: Training
    cfg: TrainerConfig
    state: TrainState
    tracker: Tracker
    progress: Progress
    guard: Optional[numerics.Guard]
    loss: torch.Tensor  # [loss sum, steps counted] stays on the device: no sync per step
    last_step: int  # its window is logged however short: a run shorter than one has one

    def sync(self) -> None:
        """The device accumulator into state (averaged over ranks): at log steps, checkpoints and stops."""
        world = self.run.world
        self.state.epoch_loss_sum, self.state.epoch_loss_steps = (v / world.size for v in world.sum(self.loss.tolist()))

    def mean(self) -> float:
        """The pass's mean loss so far, synced."""
        self.sync()
        return _mean(self.state.epoch_loss_sum, self.state.epoch_loss_steps)

    def step(self, micro: list[Batch]) -> None:
        """Train one optimizer step on the micro-batches, count it, and log at log steps."""
        run, cfg, state, guard = self.run, self.cfg, self.state, self.guard
        micro = [_to_device(b, run.device, cfg.channels_last) for b in micro]
        at_log_step = (state.step + 1) % cfg.log_every_steps == 0 or state.step + 1 == self.last_step
        stats = {} if guard is not None and guard.stats_due(state.step + 1) else None
        loss, norm = train_step(
            run.model, micro, run.optimizer, run.precision, want_norm=at_log_step, stats=stats, task=run.data.task
        )
        lr = run.scheduler.get_last_lr()[0]  # the rate this step used (a host float): logged, not the next step's
        # Every attempted step advances the schedule, skipped or not, as in a torch.amp loop: holding it
        # for skipped steps would mean reading each step's outcome on the host (a sync per step).
        run.scheduler.step()
        if guard is not None:
            guard.after_step(unwrap(run.model), micro, state.step + 1)
        if stats:
            grads, acts = stats.get("grads", {}), stats.get("acts", {})
            self.tracker.log_metrics(guard.stats.metrics(grads, acts, user_module(run.model)), state.step + 1)
        state.step += 1
        state.batch_in_epoch += len(micro)
        state.samples += sum(len(y) for _, y in micro)
        # A step the scaler skipped with a non-finite loss stays out of the means (a gradient overflow with a
        # finite loss counts as usual); without a scaler every step is applied, so a NaN loss still shows.
        kept = (run.precision.applied > 0) | torch.isfinite(loss)
        self.loss += torch.stack([torch.where(kept, loss, 0.0), kept.to(loss.dtype)])
        self.progress.advance(len(micro))
        if at_log_step:
            self.log_window(lr, norm, micro)

    def log_window(self, lr: float, norm: Optional[torch.Tensor], micro: list[Batch]) -> None:
        """Log the window since the last log step: its mean loss, the LR, the precision's telemetry, the grad norm."""
        state = self.state
        self.sync()  # sync point, once per log interval
        metrics = {
            "train/loss": _mean(
                state.epoch_loss_sum - state.logged_loss_sum, state.epoch_loss_steps - state.logged_loss_steps
            ),
            "train/lr": lr,
            **self.run.precision.telemetry(),
        }
        if norm is not None:  # under FSDP a DTensor: the norm over every rank's shards, the same on every rank
            metrics["train/grad_norm"] = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
        self.tracker.log_metrics(metrics, state.step)
        self.progress.show({"loss": metrics["train/loss"], "scale": metrics.get("amp/loss_scale", 1.0)})
        state.logged_loss_sum, state.logged_loss_steps = state.epoch_loss_sum, state.epoch_loss_steps
        if self.guard is not None:
            self.guard.check(metrics, unwrap(self.run.model), micro, state.step)  # may stop the run with a diagnosis


def train_epoch(
    run: Training,
    loader: Loader,
    cfg: TrainerConfig,
    state: TrainState,
    *,
    tracker: Tracker,
    progress: Progress,
    stop: Optional[GracefulStop] = None,
    checkpoint: Optional[Checkpointer] = None,
    guard: Optional[numerics.Guard] = None,
) -> Optional[float]:
    """One pass over the training data (the rest of it, when resumed mid-epoch): the epoch's mean loss,
    or None if a stop signal ended it early (state then says exactly where, for the checkpoint)."""
    run.model.train()
    loader.set_epoch(state.epoch, state.batch_in_epoch)
    loss = torch.tensor([state.epoch_loss_sum, state.epoch_loss_steps], device=run.device)
    this = _Pass(run, cfg, state, tracker, progress, guard, loss, planned_steps(cfg, len(loader)))
    for micro in _chunks(loader, cfg.grad_accum_steps):
        # First the end of the run (a stop signal that arrived during the last step does not make a finished run
        # an interrupted one). It ends mid-epoch: the position stays in state, so raising max_steps and resuming
        # continues this epoch where it stopped.
        if cfg.max_steps > 0 and state.step >= cfg.max_steps:
            return this.mean()
        # Under torchrun the ranks agree on stopping at log boundaries, so all stop after the same step.
        if (
            stop is not None
            and (run.world.size == 1 or state.step % cfg.log_every_steps == 0)
            and run.world.any(stop.requested)
        ):
            this.sync()
            return None
        this.step(micro)
        if checkpoint is not None and cfg.checkpoint_every_steps and state.step % cfg.checkpoint_every_steps == 0:
            this.sync()
            checkpoint(state)
    mean = this.mean()
    state.batch_in_epoch = 0
    state.epoch_loss_sum = state.epoch_loss_steps = state.logged_loss_sum = state.logged_loss_steps = 0.0
    return mean


def _mean(loss_sum: float, steps: float) -> float:
    """A mean loss over the counted steps; NaN when there are none (every step skipped with a non-finite loss)."""
    return loss_sum / steps if steps else float("nan")


def evaluate(
    model: nn.Module,
    loader: Loader,
    precision: Precision,
    device: torch.device,
    *,
    channels_last: bool = False,
    world: World = SINGLE,
    task: Task = CLASSIFICATION,
) -> dict[str, float]:
    """The task's validation metrics (loss, acc, and a language model's ppl and bpb) under the run's autocast. Each
    rank evaluates its share of the set (the loader is sharded); one host sync and one all-reduce at the end."""
    model.eval()
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # the task's [loss sum, correct, targets]
    left = loader.real_samples()  # past these, the share is padding (every rank runs as many batches)
    with torch.no_grad():
        for batch in loader:
            x, y = _to_device(batch, device, channels_last)
            with precision.autocast():
                logits = model(x)
            keep = min(len(y), left)  # the padding sits at the end of the share
            logits, y, left = logits[:keep], y[:keep], left - keep
            if keep:
                sums += task.sums(logits, y)
    model.train()
    return task.metrics(*world.sum(sums.tolist()))  # the sync


def evaluate_run(run: Training, cfg: TrainerConfig) -> dict[str, float]:
    """evaluate() on the run's own model, validation data, precision and ranks."""
    return evaluate(
        run.model,
        run.data.val,
        run.precision,
        run.device,
        channels_last=cfg.channels_last,
        world=run.world,
        task=run.data.task,
    )


def _validate(run: Training, cfg: TrainerConfig, result: FitResult) -> dict[str, float]:
    """Evaluate into `result`; returns the val/ metrics."""
    val = evaluate_run(run, cfg)
    result.val_loss, result.val_acc = val.pop("loss"), val.pop("acc")
    result.val_extra = val
    return {"val/loss": result.val_loss, "val/acc": result.val_acc, **{f"val/{k}": v for k, v in val.items()}}


def fit(
    run: Training,
    cfg: TrainerConfig,
    tracker: Tracker,
    state: Optional[TrainState] = None,
    *,
    stop: Optional[GracefulStop] = None,
    checkpoint: Optional[Checkpointer] = None,
    guard: Optional[numerics.Guard] = None,
    best: Optional[KeepBest] = None,
) -> FitResult:
    """Train for max_epochs (or max_steps) from `state`, evaluating every eval_every_epochs and at the end;
    `checkpoint(state)` is called every checkpoint_every_steps steps and checkpoint_every_epochs epochs; `best` keeps
    the best evaluation's."""
    state, result, world = state or TrainState(), FitResult(), run.world
    progress = Progress.create(cfg.progress.value, planned_epochs(cfg, len(run.data.train)), len(run.data.train))
    train = TimedLoader(run.data.train)
    warned = False  # about an input-bound run: once
    reset_peak_memory(run.device)
    clock = measure.Clock(state, run.device)
    try:
        while not finished(state, cfg):
            running = state.epoch  # the epoch under way (0-based); it stays the count when max_steps ends it midway
            progress.start_epoch(running)
            before, samples_before, from_start = state.train_time_s, state.samples, state.batch_in_epoch == 0
            clock.start()
            train_loss = train_epoch(
                run, train, cfg, state, tracker=tracker, progress=progress, stop=stop,
                checkpoint=clock.paused(checkpoint), guard=guard,
            )  # fmt: skip
            clock.stop()
            if train_loss is None:  # an agreed stop: some rank got the signal
                result.interrupted = (stop.signum or signal.SIGTERM) if stop is not None else None
                break
            waited = world.max(train.take())  # the hungriest rank holds the others up
            samples, whole = state.samples - samples_before, from_start and state.batch_in_epoch == 0
            metrics = measure.epoch_perf(run, result, state.train_time_s - before, samples, waited, whole)
            result.train_loss = train_loss
            state.epoch += state.batch_in_epoch == 0  # a completed pass; max_steps may end one midway
            done = finished(state, cfg)
            if not warned and measure.input_bound(result, samples > 0, done) and world.is_main:
                measure.warn_input_bound(result.epoch_waits[-1], train, result.epoch_rates[-1])
                warned = True
            if (state.epoch % cfg.eval_every_epochs == 0 and state.batch_in_epoch == 0) or done:
                metrics.update(_validate(run, cfg, result))
            tracker.log_metrics(metrics, state.step)  # before best.pt's checkpoint tag says the step is recorded
            if best is not None:
                best.offer(state, metrics)
            progress.end_epoch(running + 1, {"train_loss": result.train_loss, **metrics})
            if checkpoint is not None and cfg.checkpoint_every_epochs and not done:  # the final checkpoint follows
                if state.epoch % cfg.checkpoint_every_epochs == 0:
                    checkpoint(state)
            if stop is not None and world.any(stop.requested):  # arrived during the epoch's last step or evaluation
                # After the last epoch's evaluation training is complete: the run finishes as such (the caller still
                # stops when it is recorded); otherwise it is interrupted, to be resumed.
                result.interrupted = None if done else stop.signum or signal.SIGTERM
                break
    finally:
        progress.close()  # the bar too, when a stop signal or an error ends an epoch early
    return measure.summarized(result, run)

"""Where training stands and what it was given: the progress counters a checkpoint keeps (TrainState), the built
objects the loop trains with (Training), what fit returns (FitResult), and the steps and epochs a run plans."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch
from torch import nn

from mprun.data.loaders import DataBundle
from mprun.distributed import World
from mprun.precision.runtime import Precision
from mprun.training.config import TrainerConfig


@dataclass
class TrainState:
    """Progress counters: what a checkpoint needs to know where training stands, down to the batch.

    The in-epoch sums are kept so that a run resumed mid-epoch logs the same epoch and window means
    as one that never stopped."""

    epoch: int = 0
    step: int = 0
    samples: int = 0
    batch_in_epoch: int = 0  # micro-batches of the current epoch already trained on
    # This epoch's loss summed over its steps, and their number (the device accumulator, synced). A step the
    # loss scaler skipped because its loss was inf or NaN adds neither: one such step would otherwise turn
    # every later train/loss of the epoch into NaN.
    epoch_loss_sum: float = 0.0
    epoch_loss_steps: float = 0.0
    logged_loss_sum: float = 0.0  # the two as of the last log step
    logged_loss_steps: float = 0.0
    train_time_s: float = 0.0  # seconds spent training so far, over every segment of a resumed run
    # The best evaluation so far (trainer.keep_best's metric), where checkpoints/best.pt was taken: a resumed run
    # keeps comparing against it.
    best_metric: str = ""  # what best_score is a value of: a resume with another trainer.keep_best starts over
    best_score: Optional[float] = None
    best_step: int = -1
    best_epoch: int = -1


Checkpointer = Callable[["TrainState"], None]  # writes a checkpoint of training as it stands


@dataclass
class KeepBest:
    """trainer.keep_best: the metric whose best evaluation so far is kept (checkpoints/best.pt), and the writer."""

    metric: str  # val/acc, val/loss, ...
    maximize: bool
    write: Checkpointer

    def offer(self, state: TrainState, metrics: Mapping[str, float]) -> bool:
        """Write the best checkpoint if this evaluation beats the best so far (a tie keeps the earlier one; a
        non-finite score never counts); returns whether it did."""
        score = metrics.get(self.metric)
        if score is None or not math.isfinite(score):
            return False
        best = state.best_score if state.best_metric == self.metric else None
        if best is not None and not (score > best if self.maximize else score < best):
            return False
        state.best_metric, state.best_score = self.metric, float(score)
        state.best_step, state.best_epoch = state.step, state.epoch
        self.write(state)
        return True


@dataclass
class Training:
    """The built objects the loop trains with (mprun.build.Components adds what the run around it needs)."""

    model: nn.Module  # what the loop calls: DDP-wrapped, FSDP-sharded and/or compiled as configured
    data: DataBundle
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    precision: Precision
    device: torch.device
    world: World


@dataclass
class FitResult:
    val_loss: float = float("nan")
    val_acc: float = float("nan")
    val_extra: dict[str, float] = field(default_factory=dict)  # the task's other val metrics (ppl, bpb), by name
    train_loss: float = float("nan")
    samples_per_s: float = float("nan")
    peak_mem_mib: float = 0.0
    param_state_mib: float = float("nan")  # parameters plus optimizer state (the fullest rank's shard)
    data_wait_frac: float = float("nan")  # share of training time spent waiting for the next batch
    epoch_time_s: float = float("nan")
    # One entry per epoch trained in this process, in order. An epoch time is None for a partial pass (resumed
    # midway, or cut by max_steps): it trained, and was timed for its rate, but is no epoch's time.
    epoch_times: list[Optional[float]] = field(default_factory=list)
    epoch_rates: list[float] = field(default_factory=list)
    epoch_waits: list[float] = field(default_factory=list)  # data_wait_frac per epoch
    interrupted: Optional[int] = None  # the signal that stopped training before it was done, if any


def finished(state: TrainState, cfg: TrainerConfig) -> bool:
    """Whether training has reached max_epochs or max_steps."""
    return state.epoch >= cfg.max_epochs or (cfg.max_steps > 0 and state.step >= cfg.max_steps)


def steps_per_epoch(cfg: TrainerConfig, batches_per_epoch: int) -> int:
    return -(-batches_per_epoch // cfg.grad_accum_steps)


def planned_steps(cfg: TrainerConfig, batches_per_epoch: int) -> int:
    """Optimizer steps the run will attempt: the LR schedule's length."""
    total = steps_per_epoch(cfg, batches_per_epoch) * cfg.max_epochs
    return min(total, cfg.max_steps) if cfg.max_steps > 0 else total


def planned_epochs(cfg: TrainerConfig, batches_per_epoch: int) -> int:
    """Epochs the run goes through: max_steps may end it before max_epochs, in the middle of one."""
    return -(-planned_steps(cfg, batches_per_epoch) // max(1, steps_per_epoch(cfg, batches_per_epoch)))

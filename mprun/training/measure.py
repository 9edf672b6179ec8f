"""What fit measures of each epoch and of the run: training time (a clock that evaluation and checkpoint writes stop),
throughput, the data wait and whether it makes the run input-bound, peak memory; medians over the epochs."""

from __future__ import annotations

import logging
import statistics
import time
from typing import Optional

import torch

from mprun.data.loaders import Loader
from mprun.training.config import INPUT_BOUND
from mprun.training.memory import param_state_mib, peak_memory_mib
from mprun.training.state import Checkpointer, FitResult, Training, TrainState

log = logging.getLogger(__name__)


def steady_median(values: list[Optional[float]]) -> float:
    """The median of per-epoch numbers (None: not measured in that epoch) without the process's first epoch
    (warm-up: compilation, worker start-up) when a later one was measured; NaN (not measured) for none. The warm-up
    is the first epoch trained, measured or not, so every median leaves out the same epoch."""
    later = [v for v in values[1:] if v is not None]
    steady = later or [v for v in values[:1] if v is not None]
    return statistics.median(steady) if steady else float("nan")


class Clock:
    """Training time, added to state.train_time_s: evaluation and checkpoint writes are not training."""

    def __init__(self, state: TrainState, device: torch.device) -> None:
        self.state, self.device, self.since = state, device, 0.0

    def start(self) -> None:
        self.since = time.perf_counter()

    def stop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the queued GPU work is training time
        self.state.train_time_s += time.perf_counter() - self.since

    def paused(self, checkpoint: Optional[Checkpointer]) -> Optional[Checkpointer]:
        """`checkpoint` with the clock stopped around it (the checkpoint records the time so far)."""
        if checkpoint is None:
            return None

        def write(state: TrainState) -> None:
            self.stop()
            checkpoint(state)
            self.start()

        return write


def epoch_perf(run: Training, result: FitResult, seconds: float, samples: int, waited: float, whole: bool) -> dict:
    """The epoch's perf/ metrics, appending its rate, wait and time to `result` when it trained `samples` (a
    resumed epoch with nothing left trains none). `whole`: a pass from the epoch's start to its end."""
    world = run.world
    result.param_state_mib = world.max(param_state_mib(run.model, run.optimizer))
    metrics = {
        "perf/peak_mem_mib": world.max(peak_memory_mib(run.device)),  # the fullest rank's
        "perf/param_state_mib": result.param_state_mib,
    }
    if samples:
        result.epoch_rates.append(samples * world.size / seconds)  # all ranks' samples
        result.epoch_waits.append(waited / seconds)
        metrics.update({"perf/samples_per_s": result.epoch_rates[-1], "perf/data_wait_frac": result.epoch_waits[-1]})
        result.epoch_times.append(seconds if whole else None)  # a resumed or max_steps-cut pass is no epoch's time
        if whole:
            metrics["perf/epoch_time_s"] = seconds
    return metrics


def input_bound(result: FitResult, trained: bool, done: bool) -> bool:
    """Whether the epoch just trained waited for data past INPUT_BOUND. Judged like the throughput: the first epoch
    (worker start-up) only when it is the only one."""
    return trained and result.epoch_waits[-1] > INPUT_BOUND and (len(result.epoch_waits) > 1 or done)


def warn_input_bound(frac: float, loader: Loader, rate: float) -> None:
    """Say that the input pipeline is the bottleneck, and what to change."""
    log.warning(
        "input-bound: the training loop waited for data %.0f%% of the epoch (%s; %.0f samples/s). Faster input: %s",
        100 * frac,
        loader.describe(),
        rate,
        loader.remedy(),
    )


def summarized(result: FitResult, run: Training) -> FitResult:
    """`result` with the run's figures: medians over epochs, leaving out the first (warm-up, compilation) when there
    are others, and the peak memory. No epoch timed in this process (stopped in its first, or resumed with nothing
    left to train): not measured."""
    result.samples_per_s = steady_median(result.epoch_rates)
    result.data_wait_frac = steady_median(result.epoch_waits)
    result.epoch_time_s = steady_median(result.epoch_times)
    result.peak_mem_mib = run.world.max(peak_memory_mib(run.device))
    return result

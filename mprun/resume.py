"""Resuming a run: what its checkpoint holds, loading it into freshly built components, and saying why a
checkpoint does not fit (the settings that differ). The file format itself is mprun.checkpoint's."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mprun import checkpoint, config, distributed
from mprun.checkpoint import unwrap
from mprun.config import RunConfig
from mprun.errors import ConfigError
from mprun.summary import FINAL_METRICS
from mprun.tracking.base import Tracker
from mprun.training.config import TrainerConfig
from mprun.training.loop import evaluate_run
from mprun.training.state import TrainState

if TYPE_CHECKING:
    from mprun.build import Components
    from mprun.numerics import Guard

log = logging.getLogger("mprun")


def checkpoint_state(
    parts: Components, state: TrainState, cfg: RunConfig, tracker: Tracker, guard: Guard
) -> dict[str, Any]:
    """Everything needed to continue: unwrapped model, optimizer, schedule, scaler, numerics policy, RNG,
    progress (down to the batch), config, and the tracking run to continue."""
    model_sd, optim_sd = distributed.state_dicts(unwrap(parts.module), parts.optimizer, parts.strategy)
    return {
        "model": model_sd,
        "optimizer": optim_sd,
        "scheduler": parts.scheduler.state_dict(),
        "precision": parts.precision.state_dict(),
        "numerics": guard.state_dict(),
        "rng": checkpoint.rng_state(),
        "progress": dataclasses.asdict(state),
        "config": cfg.resolved,
        "tracking": {"run_id": tracker.run_id or ""},
        "world_size": parts.world.size,
    }


def restore(parts: Components, ckpt: dict[str, Any], path: Path, cfg: RunConfig) -> TrainState:
    """Load a checkpoint into freshly built components; returns where training stands."""
    before = config.flatten(ckpt.get("config", {}))
    now = config.flatten(cfg.resolved)
    changed = [
        f"{k}: {before.get(k)!r} -> {now.get(k)!r}"
        for k in sorted(set(before) | set(now))
        if before.get(k) != now.get(k) and not config.outcome_neutral(k)
    ]
    try:
        distributed.load_state_dicts(
            unwrap(parts.module), parts.optimizer, parts.strategy, ckpt["model"], ckpt["optimizer"]
        )
    except (RuntimeError, ValueError, KeyError) as e:
        # what shapes the state dicts first: the model, the optimizer, then the dataset (classes, channels, size)
        order = ("model.", "optimizer._target_", "dataset.")
        shaping = sorted(changed, key=lambda c: next((i for i, k in enumerate(order) if c.startswith(k)), len(order)))
        why = (
            f"its settings differ: {'; '.join(shaping[:4])}"
            if before and changed
            else "made with a different model, dataset or optimizer?"
        )
        detail = " ".join(str(e).split()) or type(e).__name__  # torch's message is several lines; the keys come after
        raise ConfigError(
            f"trainer.resume: checkpoint {path} does not fit this model/optimizer ({why}): {detail[:300]}"
        ) from e
    parts.scheduler.load_state_dict(ckpt["scheduler"])
    parts.precision.load_state_dict(ckpt["precision"])
    if changed:
        log.warning(
            "resuming with settings that differ from the checkpoint's (optimizer, schedule and scaler "
            "state come from the checkpoint): %s",
            "; ".join(changed[:10]),
        )
    try:
        state = TrainState(**ckpt["progress"])
    except TypeError as e:  # a progress record of another mprun version
        raise ConfigError(
            f"trainer.resume: {path} was written by an mprun (version {ckpt.get('mprun_version')}) whose "
            f"progress record this one cannot read ({e}); start a fresh run"
        ) from e
    saved_world = int(ckpt.get("world_size", 1))
    if state.batch_in_epoch and saved_world != parts.world.size:
        raise ConfigError(
            f"trainer.resume: {path} was written mid-epoch by {saved_world} rank(s); its data position "
            f"means nothing to {parts.world.size}. Resume with {saved_world}, or from an end-of-epoch checkpoint"
        )
    log.info("resuming from %s: %s", path, position(state, int(cfg.trainer.max_epochs), len(parts.data.train)))
    return state


def position(state: TrainState, epochs: int, batches: int) -> str:
    """Where a checkpoint left training, counted as the progress lines count: epochs from 1 of `epochs`, batches of
    the epoch from 1 of `batches` (micro-batches, as the bar counts them), and optimizer steps."""
    if state.batch_in_epoch:
        return (
            f"in epoch {state.epoch + 1}/{epochs}, after batch {state.batch_in_epoch}/{batches} "
            f"(step {state.step}); it goes on with batch {state.batch_in_epoch + 1}"
        )
    return f"after epoch {state.epoch}/{epochs} (step {state.step}); it goes on with epoch {state.epoch + 1}"


def completed_summary(
    ckpt: dict[str, Any], path: Path, state: TrainState, parts: Components, trainer: TrainerConfig
) -> dict[str, Any]:
    """A resume with nothing left to train (a requeued job that had finished, `trainer.resume=auto`): nothing is
    trained, logged or rewritten, so the run's results stand (re-logging them from zero steps would record NaN).
    Returns the results the final checkpoint carries, or else those of the summary.json beside it in its run
    directory when that records the same step; a checkpoint with neither (one written at the last step by
    checkpoint_every_steps, copied elsewhere) has its model evaluated, so a sweeper (Optuna) still gets the run's
    validation score."""
    results = dict(ckpt.get("summary") or _summary_beside(path, state))
    if not results:
        val = evaluate_run(parts, trainer)
        results = {**{f"val_{k}": v for k, v in val.items()}, "epochs": state.epoch, "steps": state.step}
    results.update({k: float("nan") for k in FINAL_METRICS if results.get(k) is None})  # not measured
    print(
        f"mprun: nothing to train: {path} is at epoch {state.epoch}, step {state.step}, where this configuration "
        "ends (raise trainer.max_epochs or trainer.max_steps to train on); its run and files are left as they are",
        flush=True,
    )
    return {**results, "interrupted": None, "stop_signal": None}


def _summary_beside(path: Path, state: TrainState) -> dict[str, Any]:
    """The summary.json of the run directory a checkpoint sits in (<run dir>/checkpoints/<name>.pt), if it records
    this checkpoint's step: final checkpoints written before they carried their results have it there."""
    summary = path.parent.parent / "summary.json"
    if path.parent.name != "checkpoints" or not summary.is_file():
        return {}
    results = json.loads(summary.read_text())
    return results if results.get("steps") == state.step and not results.get("interrupted") else {}

"""One experiment end to end: validate, build, track, fit, checkpoint, summarize.

The tracking run is opened only after everything is built, so bad input never creates a run,
and once open it is always closed: FINISHED, FAILED (with the error as a tag) or KILLED.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from omegaconf import DictConfig, OmegaConf

import mprun
from mprun import build, checkpoint, config, distributed, numerics, precision
from mprun.build import Components
from mprun.checkpoint import unwrap
from mprun.errors import ConfigError
from mprun.interrupts import GracefulStop
from mprun.loop import FitResult, TrainState, device_name, finished, fit
from mprun.sweep import JobInfo
from mprun.tracking import CHECKPOINT_STEP_TAG, NullTracker, Tracker

log = logging.getLogger("mprun")


def flatten(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: MLflow params are flat."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(mprun.__file__).parent, capture_output=True, text=True, timeout=5
        ).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(parts: Components) -> dict[str, str]:
    """Where and how this run ran: what makes two runs' numbers comparable or not."""
    device = parts.device
    return {
        "git_commit": _git_commit(),
        "host": socket.gethostname(),
        "device": device_name(device),
        "torch_version": torch.__version__,
        "cuda_version": str(torch.version.cuda),
        "precision": parts.precision.name.value,
        "precision_detail": f"{parts.precision.description}: {parts.precision.reason}",
        "mprun_version": mprun.__version__,
        "fp32_modules": ",".join(parts.fp32_modules) or "none",
        "strategy": f"{parts.strategy.value} x{parts.world.size}",
    }


def checkpoint_state(parts: Components, state: TrainState, cfg: DictConfig, tracker: Tracker,
                     guard: numerics.Guard) -> dict[str, Any]:
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
        "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        "tracking": {"run_id": tracker.run_id or ""},
        "world_size": parts.world.size,
    }


def restore(parts: Components, ckpt: dict[str, Any], path: Path, cfg: DictConfig) -> TrainState:
    """Load a checkpoint into freshly built components; returns where training stands."""
    before = flatten(ckpt.get("config", {}))
    now = flatten(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    changed = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now))
               if before.get(k) != now.get(k) and not config.outcome_neutral(k)]
    try:
        distributed.load_state_dicts(unwrap(parts.module), parts.optimizer, parts.strategy, ckpt["model"], ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        # what shapes the state dicts first: the model, the optimizer, then the dataset (classes, channels, size)
        order = ("model.", "optimizer._target_", "dataset.")
        shaping = sorted(changed, key=lambda c: next((i for i, k in enumerate(order) if c.startswith(k)), len(order)))
        why = (f"its settings differ: {'; '.join(shaping[:4])}" if before and changed
               else "made with a different model, dataset or optimizer?")
        detail = " ".join(str(e).split()) or type(e).__name__  # torch's message is several lines; the keys come after
        raise ConfigError(f"trainer.resume: checkpoint {path} does not fit this model/optimizer ({why}): "
                          f"{detail[:300]}") from e
    parts.scheduler.load_state_dict(ckpt["scheduler"])
    parts.precision.load_state_dict(ckpt["precision"])
    if changed:
        log.warning("resuming with settings that differ from the checkpoint's (optimizer, schedule and scaler "
                    "state come from the checkpoint): %s", "; ".join(changed[:10]))
    try:
        state = TrainState.from_dict(ckpt["progress"])
    except TypeError as e:  # a progress record of another mprun version
        raise ConfigError(f"trainer.resume: {path} was written by an mprun (version {ckpt.get('mprun_version')}) whose "
                          f"progress record this one cannot read ({e}); start a fresh run") from e
    saved_world = int(ckpt.get("world_size", 1))
    if state.batch_in_epoch and saved_world != parts.world.size:
        raise ConfigError(f"trainer.resume: {path} was written mid-epoch by {saved_world} rank(s); its data position "
                          f"means nothing to {parts.world.size}. Resume with {saved_world}, or from an end-of-epoch checkpoint")
    log.info("resuming from %s: epoch %d, step %d, batch %d of the epoch", path, state.epoch, state.step, state.batch_in_epoch)
    return state


def summary_dict(result: FitResult, parts: Components, state: TrainState, tracker: Tracker, wall_s: float) -> dict[str, Any]:
    """The end-of-run numbers, as written to summary.json."""
    return {
        "val_acc": result.val_acc,
        "val_loss": result.val_loss,
        "train_loss": result.train_loss,
        "samples_per_s": result.samples_per_s,
        "data_wait_frac": result.data_wait_frac,
        "input": parts.data.train.describe(),
        "peak_mem_mib": result.peak_mem_mib,
        "peak_mem_kind": "cuda_max_allocated" if parts.device.type == "cuda" else "process_peak_rss",
        "precision": parts.precision.name.value,
        "precision_detail": f"{parts.precision.description}: {parts.precision.reason}",
        "loss_scale": parts.precision.scale_value(),
        "loss_scaling": parts.precision.loss_scale.value,  # dynamic, static or none
        **parts.precision.counters(),
        "epochs": state.epoch,
        "steps": state.step,
        "train_time_s": state.train_time_s,  # every segment of a resumed run
        "epoch_time_s": result.epoch_time_s,
        "timed_epochs": len(result.epoch_rates),  # epochs timed in this process; the first is left out when others are
        "wall_time_s": wall_s,
        "device": str(parts.device),
        "mlflow_run_id": tracker.run_id,
    }


# Summary numbers also logged as metrics: the MLflow UI compares runs on them, the sweep report reads them.
FINAL_METRICS = ("val_acc", "val_loss", "train_loss", "samples_per_s", "data_wait_frac", "peak_mem_mib", "loss_scale",
                 "skipped_steps", "train_time_s", "epoch_time_s")


def json_text(obj: Any) -> str:
    """Strict JSON for the files mprun writes (summary.json, diagnosis.json, nan_traces.json): a number that is NaN
    or infinite (not measured, or what went wrong) becomes null, since bare NaN breaks most JSON readers."""
    def strict(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, Mapping):
            return {k: strict(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [strict(v) for v in x]
        return x

    return json.dumps(strict(obj), indent=2, default=str, allow_nan=False)


def print_summary(s: Mapping[str, Any], run_dir: Path, tracker: Tracker, job: Optional[JobInfo]) -> None:
    """Human-readable closing block on stdout."""
    mem = "GPU tensors, peak allocated" if s["peak_mem_kind"] == "cuda_max_allocated" else "process peak RSS"
    stopped = []
    if s.get("interrupted"):  # numbers not measured before the stop (NaN) are printed as such
        # A sweep job continues with its sweep: the sweep command with trainer.resume=<this job's dir> would
        # resume every job of the sweep from this one's checkpoint.
        again = (f"launch the sweep again into its directory: the same command with hydra.sweep.dir={job.sweep_dir} "
                 "trainer.resume=auto" if job else f"run the same command with trainer.resume={run_dir}")
        stopped = [f"stopped     by {signal.Signals(s['interrupted']).name} after step {s['steps']}, before the end: "
                   f"{run_dir / 'checkpoints' / 'interrupted.pt'}; to continue, {again}"]
    lines = [
        "",
        "── mprun summary " + "─" * 44,
        *stopped,
        f"val/acc     {s['val_acc']:.4f}   (val/loss {s['val_loss']:.4f})",
        _throughput_line(s),
        f"input       waited for data {s['data_wait_frac']:.0%} of training time  ({s['input']})",
        f"peak memory {s['peak_mem_mib']:,.0f} MiB  ({mem})",
        f"precision   {s['precision_detail']}",
        _scale_line(s),
        f"time        {s['train_time_s']:.1f} s training in all, {s['wall_time_s']:.1f} s in this process (since start), "
        f"{s['steps']} steps on {s['device']}",
        f"run dir     {run_dir}",
        *tracker.describe(),
    ]
    print("\n".join(lines), flush=True)


def _throughput_line(s: Mapping[str, Any]) -> str:
    """The summary's throughput line, saying which epochs its median is over."""
    n = s.get("timed_epochs", 0)
    if not n:
        return "throughput  not measured (no epoch was timed in this process)"
    over = {1: "one epoch, warm-up included", 2: "the second epoch; the first (warm-up) left out"}.get(
        n, f"median of {n - 1} epochs; the first (warm-up) left out")
    return f"throughput  {s['samples_per_s']:,.0f} samples/s  ({over})"


def _scale_line(s: Mapping[str, Any]) -> str:
    """The summary's loss-scale line: what the scaler did, or that there was none."""
    scaling = s.get("loss_scaling", "dynamic")
    skipped = f"skipped steps {s['skipped_steps']}"
    if scaling == "dynamic":
        return (f"loss scale  {s['loss_scale']:g}   {skipped}   growth/backoff events {s['growth_events']}/"
                f"{s['backoff_events']}   steps since overflow {s['steps_since_overflow']}")
    if scaling == "static":
        return f"loss scale  {s['loss_scale']:g} (static)   {skipped}"
    # No loss scale; with precision.on_nonfinite=skip a scaler pinned at 1.0 still skips non-finite steps.
    return "loss scale  none" + (f"   {skipped} (non-finite, on_nonfinite=skip)" if s["skipped_steps"] else "")


def _log_numerics(guard: numerics.Guard, run_dir: Path, tracker: Tracker) -> None:
    """NaN traces and the underflow/overflow table, as files in the run dir and artifacts."""
    out = run_dir / "numerics"
    if guard.traces:
        out.mkdir(parents=True, exist_ok=True)
        (out / "nan_traces.json").write_text(json_text(guard.traces))
    if guard.stats is not None and guard.stats.latest:
        out.mkdir(parents=True, exist_ok=True)
        (out / "stats.md").write_text("# fp16 numerics, last measurement per module\n\n" + guard.stats.table())
        print("\n" + guard.stats.table(), flush=True)
    if out.is_dir():
        tracker.log_artifact(out, "numerics")


def run(cfg: DictConfig, started: float | None = None, job: Optional[JobInfo] = None) -> dict[str, Any]:
    """Run one experiment from a composed config; returns the summary dict. `job`: its place in a sweep."""
    with precision.process_flags_restored():
        return _run(cfg, started if started is not None else time.perf_counter(), job)


def _run(cfg: DictConfig, started: float, job: Optional[JobInfo]) -> dict[str, Any]:
    run_dir = Path(cfg.paths.run_dir).absolute()
    try:
        checked = config.validate(cfg)
        trainer = checked["trainer"]
        world = distributed.start(trainer.strategy, trainer.device.value != "cpu" and torch.cuda.is_available())
        # Only rank 0 tracks. The store is reached now, so a bad URI fails before any data or model work.
        tracker = build.tracker(cfg) if world.is_main else NullTracker()
        parts = build.components(cfg, checked, world)
        resume_from = checkpoint.resume_path(checked["trainer"].resume, run_dir)
        resumed = checkpoint.load(resume_from) if resume_from else None
        state = restore(parts, resumed, resume_from, cfg) if resumed else TrainState()
    except Exception as e:
        if job is not None and os.environ.get("RANK", "0") == "0":
            job.record_failure(e)  # a sweep shows the failed job beside its siblings (once, not per rank)
        distributed.stop()
        raise
    try:
        if resumed and finished(state, trainer):
            return _already_complete(resume_from, state)
        return _track_and_train(cfg, checked, parts, tracker, run_dir, state, resumed, job, started)
    finally:
        distributed.stop()  # every exit: success, error, signal


def _already_complete(path: Path, state: TrainState) -> dict[str, Any]:
    """A resume with nothing left to train (a requeued job that had finished, `trainer.resume=auto`): nothing is
    trained, logged or rewritten, so the run's results stand (re-logging them from zero steps would record NaN);
    returns the run's summary.json."""
    previous = path.parent.parent / "summary.json"  # <run dir>/checkpoints/<name>.pt
    summary = json.loads(previous.read_text()) if previous.is_file() else {}
    summary.update({k: float("nan") for k in FINAL_METRICS if summary.get(k) is None})  # null: not measured
    print(f"mprun: nothing to train: {path} is at epoch {state.epoch}, step {state.step}, where this configuration "
          "ends (raise trainer.max_epochs or trainer.max_steps to train on); its run and files are left as they are",
          flush=True)
    return {**summary, "interrupted": None, "stop_signal": None}


def _track_and_train(cfg: DictConfig, checked: dict[str, Any], parts: Components, tracker: Tracker, run_dir: Path,
                     state: TrainState, resumed: Optional[dict], job: Optional[JobInfo], started: float) -> dict[str, Any]:
    """Open (or continue) the tracking run, then train under signal handling."""
    log.info("precision %s (%s); device %s; %d optimizer steps planned",
             parts.precision.description, parts.precision.reason, parts.device, parts.total_steps)
    tags = {**run_tags(parts), **(job.tags() if job else {})}
    previous_run = resumed["tracking"]["run_id"] if resumed and "tracking" in resumed else ""
    if previous_run:  # kept by a new run too, when the old one cannot be continued
        tags.update({"mprun.resumed_from_run": previous_run, "mprun.resumed_from_step": str(state.step)})
    guard = numerics.Guard(parts.precision)
    if resumed:
        guard.load_state_dict(resumed.get("numerics", {}))
        checkpoint.restore_rng(resumed["rng"])  # last: building the model and data drew random numbers
    # The handlers are installed before the run opens and stay until it is closed: a signal at any point
    # in between stops training gracefully instead of killing the process with the run RUNNING.
    with GracefulStop() as stop:
        if not (previous_run and tracker.resume(previous_run, state.step)):
            tracker.start(flatten(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)), tags, job.name if job else None)
        return _train_and_close(cfg, checked, parts, tracker, run_dir, state, guard, stop, started, job)


def _train_and_close(cfg: DictConfig, checked: dict[str, Any], parts: Components, tracker: Tracker, run_dir: Path,
                     state: TrainState, guard: numerics.Guard, stop: GracefulStop, started: float,
                     job: Optional[JobInfo]) -> dict[str, Any]:
    """Fit, checkpoint and log artifacts; always close the tracking run with the right status."""
    status = "FAILED"
    trainer = checked["trainer"]
    ckpts = checkpoint.Checkpoints(run_dir / "checkpoints", trainer.keep_last)
    main = parts.world.is_main

    def save(name: str, s: TrainState) -> Optional[Path]:
        contents = checkpoint_state(parts, s, cfg, tracker, guard)  # every rank: under FSDP this gathers the shards
        if not main:
            return None  # only rank 0 writes
        path = ckpts.save(name, contents)
        tracker.set_tags({CHECKPOINT_STEP_TAG: str(s.step)})  # a later resume from an older checkpoint branches
        return path

    try:
        if main:  # the config first: a run that fails or is stopped still shows what it ran
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            tracker.log_artifact(run_dir / "config_resolved.yaml")
            if (run_dir / ".hydra").is_dir():
                tracker.log_artifact(run_dir / ".hydra", "hydra")
        result = fit(parts.model, parts.data, parts.optimizer, parts.scheduler, parts.precision, tracker,
                     trainer, parts.device, state, stop, lambda s: save(ckpts.periodic_name(s.step), s), guard, parts.world)
        ckpt = save(ckpts.INTERRUPTED if result.interrupted else ckpts.FINAL, state)
        summary = summary_dict(result, parts, state, tracker, time.perf_counter() - started)
        summary["interrupted"] = result.interrupted
        if not main:  # the other ranks trained; rank 0 records
            status = "KILLED" if result.interrupted else "FINISHED"
            return {**summary, "stop_signal": result.interrupted or stop.signum}
        _log_numerics(guard, run_dir, tracker)
        (run_dir / "summary.json").write_text(json_text(summary))
        if not result.interrupted:  # an interrupted run's numbers are not final: its resumption logs them
            tracker.log_metrics({f"final/{k}": float(summary[k]) for k in FINAL_METRICS}, state.step)
        tracker.set_tags({"peak_mem_kind": summary["peak_mem_kind"]})
        tracker.log_artifact(run_dir / "summary.json")
        if tracker.log_checkpoint:
            tracker.log_artifact(ckpt, "checkpoints")
        status = "KILLED" if result.interrupted else "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException as e:
        try:
            tracker.set_tags({"error": f"{type(e).__name__}: {e}"})
            if isinstance(e, numerics.NumericsError) and main:
                tracker.set_tags({"diagnosis": e.diagnosis})
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "diagnosis.json").write_text(json_text(e.report))
                tracker.log_artifact(run_dir / "diagnosis.json")
                _log_numerics(guard, run_dir, tracker)
        except Exception:  # noqa: BLE001 - the store may be what failed; the original error matters more
            log.exception("could not record the error in the tracking run")
        raise
    finally:
        tracker.end(status)
    if main:
        print_summary(summary, run_dir, tracker, job)
    # A signal that came once training was complete (during its last step, its evaluation or the recording) left
    # the run finished, but the process still stops with it: a sweep starts no further job.
    return {**summary, "stop_signal": result.interrupted or stop.signum}

"""One experiment end to end: validate, build, resume, track, fit, checkpoint, summarize.

The tracking run is opened only after everything is built, so bad input never creates a run,
and once open it is always closed: FINISHED, FAILED (with the error as a tag) or KILLED.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

import mprun
from mprun import build, checkpoint, config, distributed, guest, hardware, numerics, resume, summary
from mprun.build import Components
from mprun.config import RunConfig
from mprun.data.loaders import DataBundle
from mprun.errors import NumericsError
from mprun.interrupts import GracefulStop
from mprun.summary import json_text
from mprun.sweep import JobInfo
from mprun.tracking.base import CHECKPOINT_STEP_TAG, DatasetRecord, NullTracker, Tracker
from mprun.tracking.source import git_commit
from mprun.training.config import BEST_METRICS, TrainerConfig
from mprun.training.loop import fit
from mprun.training.state import KeepBest, TrainState, finished

log = logging.getLogger("mprun")


def run_tags(parts: Components) -> dict[str, str]:
    """Where and how this run ran: what makes two runs' numbers comparable or not."""
    cuda = {"cuda_version": str(torch.version.cuda)} if parts.device.type == "cuda" else {}  # a CPU run has none
    return {
        "git_commit": git_commit(Path(mprun.__file__).parent) or "unknown",  # mprun's own
        "host": socket.gethostname(),
        "device": hardware.device_name(parts.device),
        "torch_version": torch.__version__,
        **cuda,
        "precision": parts.precision.name.value,
        "task": parts.data.task.name,
        "mprun.headline": f"val_{parts.data.task.headline}",  # what a sweep report judges the run on
        "precision_detail": f"{parts.precision.description}: {parts.precision.reason}",
        "mprun_version": mprun.__version__,
        "fp32_modules": ",".join(parts.fp32_modules) or "none",
        **({"fp8_modules": ",".join(parts.precision.fp8_modules)} if parts.precision.fp8_modules else {}),
        "strategy": f"{parts.strategy.value} x{parts.world.size}",
    }


# How a dataset is served, not what it holds: left out of the digest that identifies its data.
_SERVING = ("_target_", "_partial_", "batch_size", "num_workers", "prefetch_factor", "on_device", "download")


def dataset_records(cfg: RunConfig, data: DataBundle) -> list[DatasetRecord]:
    """The run's dataset, for MLflow's dataset tracking: its training and evaluation splits. The digest is a text
    corpus's own sha256 where mprun reads one, else a hash of the settings that decide the data (the files' root,
    the split, the shapes), with the split's name, so runs on the same data share it; the source is the file or
    folder, or the builder."""
    settings = cfg.resolved["dataset"]
    where = settings.get("root") or settings.get("path")
    source = str(Path(str(where)).expanduser().resolve()) if where else str(settings["_target_"])
    decides = {k: v for k, v in settings.items() if k not in _SERVING}
    digest = (
        data.source.get("corpus.sha256")
        or hashlib.sha256(json.dumps([data.name, decides], sort_keys=True, default=str).encode()).hexdigest()[:16]
    )
    # One digest per split: MLflow keeps one input per dataset (name and digest), whatever its context tag.
    return [
        DatasetRecord(data.name, hashlib.sha256(f"{digest}:{context}".encode()).hexdigest()[:16], source, context)
        for context in ("training", "evaluation")
    ]


@dataclass
class _Run:
    """One run's built pieces and where it writes, from the moment its tracking run may open."""

    cfg: RunConfig
    trainer: TrainerConfig
    parts: Components
    tracker: Tracker
    run_dir: Path
    job: Optional[JobInfo]
    started: float  # perf_counter() at the process's (or sweep job's) start: the summary's wall time

    def log_numerics(self, guard: numerics.Guard) -> None:
        """NaN traces and the underflow/overflow table, as files in the run dir and artifacts."""
        out = self.run_dir / "numerics"
        if guard.traces:
            out.mkdir(parents=True, exist_ok=True)
            (out / "nan_traces.json").write_text(json_text(guard.traces))
        if guard.stats is not None and guard.stats.latest:
            out.mkdir(parents=True, exist_ok=True)
            (out / "stats.md").write_text("# fp16 numerics, last measurement per module\n\n" + guard.stats.table())
            print("\n" + guard.stats.table(), flush=True)
        if out.is_dir():
            self.tracker.log_artifact(out, "numerics")


def run(cfg: RunConfig | DictConfig, started: float | None = None, job: Optional[JobInfo] = None) -> dict[str, Any]:
    """Run one experiment; returns the summary dict. `cfg`: the validated config (config.validate), or a composed one,
    validated here first. `job`: its place in a sweep. The process-global math flags the run sets are put back as
    they were when it ends."""
    composed = cfg.composed if isinstance(cfg, RunConfig) else cfg
    with hardware.math_flags_restored():
        try:
            return _run(cfg, started if started is not None else time.perf_counter(), job)
        except Exception as e:  # raised in a project's own model or dataset: its frames, without mprun's
            explained = guest.explained(e, {g: composed[g].get("_target_") for g in ("model", "dataset")})
            if explained is None:
                raise
            raise explained from e


def _run(cfg: RunConfig | DictConfig, started: float, job: Optional[JobInfo]) -> dict[str, Any]:
    try:
        cfg = cfg if isinstance(cfg, RunConfig) else config.validate(cfg)
        build.check_task(cfg)
        trainer, run_dir = cfg.trainer, Path(cfg.paths.run_dir).absolute()
        world = distributed.start(trainer.strategy, trainer.device.value != "cpu" and torch.cuda.is_available())
        # Only rank 0 tracks. The store is reached now, so a bad URI fails before any data or model work.
        tracker = build.tracker(cfg.composed.tracking, cfg.paths.output_root) if world.is_main else NullTracker()
        parts = build.components(cfg, world)
        # trainer.resume, else the directory of the run MLFLOW_RUN_ID continues, where mprun checkpointed it (rank 0
        # asks the store; the ranks see the same environment, so only a run with the variable pays the collective)
        wanted = "MLFLOW_RUN_ID" in os.environ and not trainer.resume
        resume_spec = trainer.resume or (world.from_main(tracker.resume_dir) if wanted else None)
        resume_from = checkpoint.resume_path(resume_spec, run_dir)
        resumed = checkpoint.load(resume_from) if resume_from else None
        state = resume.restore(parts, resumed, resume_from, cfg) if resumed else TrainState()
        if resumed and world.is_main:
            checkpoint.carry_best(resume_from, run_dir / "checkpoints", state.best_score is not None)
    except Exception as e:
        if job is not None:
            job.record_failure(e)  # a sweep shows the failed job beside its siblings
        distributed.stop()
        raise
    try:
        if resumed and finished(state, trainer):
            summary = resume.completed_summary(resumed, resume_from, state, parts, trainer)
        else:
            summary = _track_and_train(_Run(cfg, trainer, parts, tracker, run_dir, job, started), state, resumed)
        world.barrier()  # a finished rank waits for rank 0's recording: no rank leaves the group under another
        return summary
    finally:
        distributed.stop()  # every exit: success, error, signal


def _track_and_train(r: _Run, state: TrainState, resumed: Optional[dict]) -> dict[str, Any]:
    """Open (or continue) the tracking run, then train under signal handling."""
    p = r.parts.precision
    log.info(
        "precision %s (%s); device %s; %d optimizer steps planned",
        p.description,
        p.reason,
        r.parts.device,
        r.parts.total_steps,
    )
    tags = {**run_tags(r.parts), "mprun.run_dir": str(r.run_dir), **(r.job.tags() if r.job else {})}
    previous_run = resumed["tracking"]["run_id"] if resumed and "tracking" in resumed else ""
    if previous_run:  # kept by a new run too, when the old one cannot be continued
        tags.update({"mprun.resumed_from_run": previous_run, "mprun.resumed_from_step": str(state.step)})
    guard = numerics.Guard(p, r.parts.data.task)
    if resumed:
        guard.load_state_dict(resumed.get("numerics", {}))
        checkpoint.restore_rng(resumed["rng"])  # last: building the model and data drew random numbers
    # The handlers are installed before the run opens and stay until it is closed: a signal at any point
    # in between stops training gracefully instead of killing the process with the run RUNNING.
    with GracefulStop() as stop:
        continued = bool(previous_run) and r.tracker.resume(previous_run, state.step)
        if continued:  # its checkpoints are written here from now on (MLFLOW_RUN_ID finds them by this tag)
            r.tracker.set_tags({"mprun.run_dir": str(r.run_dir)})
        if not continued:
            params = config.logged_params(r.cfg.resolved)
            params.update(r.parts.data.source)  # what the data was made from (a corpus's Python and digest)
            # what the data decided for the model: its callable's arguments that no config key set
            params.update({f"model.from_data.{k}": v for k, v in r.parts.model_inputs.items()})
            r.tracker.start(params, tags, r.job.name if r.job else None, dataset_records(r.cfg, r.parts.data))
        r.tracker.watch_system(gpu=r.parts.device.type == "cuda", continued=continued)
        return _train_and_close(r, state, guard, stop)


class _Saver:
    """Writes a run's checkpoints: every rank gathers (under FSDP the shards), rank 0 writes and tags the step."""

    def __init__(self, r: _Run, guard: numerics.Guard) -> None:
        self.r, self.guard = r, guard
        self.ckpts = checkpoint.Checkpoints(r.run_dir / "checkpoints", r.trainer.keep_last)

    def __call__(self, name: str, s: TrainState, results: Optional[dict[str, Any]] = None) -> Optional[Path]:
        """Write checkpoint `name` at `s`; `results`: the run's, which the final checkpoint carries (a resume that
        finds it done reports them). Returns its path on rank 0."""
        r = self.r
        contents = resume.checkpoint_state(r.parts, s, r.cfg, r.tracker, self.guard)
        if results is not None:
            contents["summary"] = results
        if not r.parts.world.is_main:
            return None  # only rank 0 writes
        path = self.ckpts.save(name, contents)
        r.tracker.flush()  # the store gets every metric up to this step before the checkpoint's tag says it is there
        r.tracker.set_tags({CHECKPOINT_STEP_TAG: str(s.step)})  # a later resume from an older checkpoint branches
        return path

    def periodic(self, s: TrainState) -> None:
        self(self.ckpts.periodic_name(s.step), s)

    def best(self, s: TrainState) -> None:
        """checkpoints/best.pt at the best evaluation so far, with its score and step as the run's tags."""
        if self(self.ckpts.BEST, s) is not None:
            self.r.tracker.set_tags(best_tags(s, self.r.parts.keep_best))

    def kept_best(self) -> Optional[KeepBest]:
        """trainer.keep_best's keeper, writing through this saver; None when it is off."""
        metric = self.r.parts.keep_best
        return None if metric is None else KeepBest(metric, BEST_METRICS[metric], self.best)


def best_tags(s: TrainState, metric: str) -> dict[str, str]:
    """The best checkpoint's record in the run's tags: which metric, its score, and where in training it was."""
    return {
        "mprun.best_metric": metric,
        "mprun.best_score": f"{s.best_score:.6g}",
        "mprun.best_step": str(s.best_step),
        "mprun.best_epoch": str(s.best_epoch),
    }


def _best_record(r: _Run, state: TrainState, save: _Saver) -> Optional[dict[str, Any]]:
    """The best checkpoint's record for summary.json: metric, score, epoch, step and file; None without one."""
    where = save.ckpts.directory / save.ckpts.BEST
    if r.parts.keep_best is None or state.best_score is None or state.best_metric != r.parts.keep_best:
        return None
    if not where.is_file():  # resumed from a directory whose best.pt was of training past the checkpoint
        return None
    return {"metric": r.parts.keep_best, "score": state.best_score, "epoch": state.best_epoch, "step": state.best_step,
            "checkpoint": str(where)}  # fmt: skip


def _record_config(r: _Run) -> None:
    """The resolved config (and Hydra's files) first: a run that fails or is stopped still shows what it ran."""
    r.run_dir.mkdir(parents=True, exist_ok=True)
    (r.run_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(r.cfg.composed, resolve=True))
    r.tracker.log_artifact(r.run_dir / "config_resolved.yaml")
    if (r.run_dir / ".hydra").is_dir():
        r.tracker.log_artifact(r.run_dir / ".hydra", "hydra")


def _record_results(r: _Run, results: dict[str, Any], guard: numerics.Guard, ckpt: Optional[Path], step: int) -> None:
    """Rank 0's record of a run that trained: numerics files, summary.json, final metrics, tags, artifacts, model."""
    tracker, interrupted = r.tracker, results["interrupted"]
    r.log_numerics(guard)
    (r.run_dir / "summary.json").write_text(json_text(results))
    if not interrupted:  # an interrupted run's numbers are not final: its resumption logs them
        tracker.log_metrics(summary.final_metrics(results), step)
    # How many epochs the throughput is the median of: the report marks a speedup that rests on one.
    tracker.set_tags({"peak_mem_kind": results["peak_mem_kind"], "mprun.timed_epochs": str(results["timed_epochs"])})
    tracker.log_artifact(r.run_dir / "summary.json")
    best = results.get("best")
    if tracker.log_checkpoint:
        tracker.log_artifact(ckpt, "checkpoints")
        if best:
            tracker.log_artifact(Path(best["checkpoint"]), "checkpoints")
    # Not under FSDP: its module holds this rank's shards; the checkpoint has the whole weights.
    if not interrupted and r.parts.strategy is not distributed.Strategy.fsdp:
        tracker.log_model(_logged_module(r, best), r.parts.data.example_batch()[0])


def _logged_module(r: _Run, best: Optional[dict[str, Any]]) -> torch.nn.Module:
    """The module tracking.log_model logs: the trained one, or with log_model=best a copy holding best.pt's weights."""
    if getattr(r.cfg.tracking, "log_model", False) != "best" or not best:
        return r.parts.module
    module = copy.deepcopy(r.parts.module)
    module.load_state_dict(checkpoint.load(Path(best["checkpoint"]))["model"])
    return module


def _record_error(r: _Run, e: BaseException, guard: numerics.Guard) -> None:
    """The error as a tag, and a numerics failure's diagnosis as a tag and a file; never raises."""
    try:
        r.tracker.set_tags({"error": f"{type(e).__name__}: {e}"})
        if isinstance(e, NumericsError) and r.parts.world.is_main:
            r.tracker.set_tags({"diagnosis": e.diagnosis})
            r.run_dir.mkdir(parents=True, exist_ok=True)
            (r.run_dir / "diagnosis.json").write_text(json_text(e.report))
            r.tracker.log_artifact(r.run_dir / "diagnosis.json")
            r.log_numerics(guard)
    except Exception:  # the store may be what failed; the original error matters more
        log.exception("could not record the error in the tracking run")


def _train_and_close(r: _Run, state: TrainState, guard: numerics.Guard, stop: GracefulStop) -> dict[str, Any]:
    """Fit, checkpoint and log artifacts; always close the tracking run with the right status."""
    status = "FAILED"
    save, main = _Saver(r, guard), r.parts.world.is_main
    try:
        if main:
            _record_config(r)
        result = fit(
            r.parts, r.trainer, r.tracker, state, stop=stop, guard=guard, checkpoint=save.periodic,
            best=save.kept_best(),
        )  # fmt: skip
        results = summary.build(result, r.parts, state, r.tracker, time.perf_counter() - r.started)
        # in the final checkpoint's copy too: a resume that finds it done says where
        results["run_dir"] = str(r.run_dir)
        results["best"] = _best_record(r, state, save)
        results["interrupted"] = result.interrupted
        if result.interrupted:
            ckpt = save(save.ckpts.INTERRUPTED, state)
        else:
            ckpt = save(save.ckpts.FINAL, state, results)
        results["wall_time_s"] = time.perf_counter() - r.started  # the checkpoint write included
        if main:  # the other ranks trained; rank 0 records
            _record_results(r, results, guard, ckpt, state.step)
        status = "KILLED" if result.interrupted else "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException as e:
        _record_error(r, e, guard)
        raise
    finally:
        r.tracker.end(status)
    if main:
        summary.print_summary(results, r.run_dir, r.tracker, r.job)
    # A signal that came once training was complete (during its last step, its evaluation or the recording) left
    # the run finished, but the process still stops with it: a sweep starts no further job.
    return {**results, "stop_signal": result.interrupted or stop.signum}

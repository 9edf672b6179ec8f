"""Multirun bookkeeping: one MLflow parent run per sweep, every job a child of it, a report at the end.

Hydra calls `SweepCallback.on_multirun_start` in the launching process before any job starts. It opens
the tracking store once (under a file lock: parallel first writers of a fresh sqlite store race),
opens the parent run and writes <sweep dir>/mlflow_sweep.json. Each job, in whatever process the
launcher gives it (in-process, a reused joblib worker, a SLURM node), reads that file to attach
itself to the parent; nothing about the sweep lives in module state of a job process.

The sweep is closed exactly once: by on_multirun_end when the sweeper returns, or by `close_active`
when it does not (a job failed and the sweeper re-raised it, Ctrl-C, a crash), so the parent run is
never left RUNNING.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ValueType
from hydra.errors import OverrideParseException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from mprun import report
from mprun.tracking.config import MlflowConfig
from mprun.tracking.store import record_failed_run

log = logging.getLogger("mprun")
SWEEP_FILE = "mlflow_sweep.json"


def _key(override: str) -> str:
    """'+optimizer.lr=0.01' -> 'optimizer.lr'."""
    return override.split("=", 1)[0].lstrip("+~")


@dataclass(frozen=True)
class JobInfo:
    """Where a multirun job sits in its sweep: enough to name it and attach it to the parent run."""

    sweep_dir: Path
    num: int
    overrides: tuple[str, ...]  # this job's task overrides, e.g. ('precision=fp16', 'optimizer.lr=0.01')
    parent: dict[str, Any]  # mlflow_sweep.json: parent_run_id, uri, experiment_id, varied; {} if untracked

    @property
    def varied(self) -> list[str]:
        """The overrides this job varied in its sweep (all of its overrides when that is not known)."""
        varied = set(self.parent.get("varied", ()))
        return [o for o in self.overrides if _key(o) in varied] or list(self.overrides)

    @property
    def name(self) -> str:
        """What this job varied, short enough for MLflow's runs list: 'fp16 lr=0.01' for precision=fp16
        optimizer.lr=0.01 (the full overrides are the run's mprun.overrides tag)."""
        return short_name(self.varied) or f"job {self.num}"

    def tags(self) -> dict[str, str]:
        """Run tags linking the job to its sweep; mlflow.parentRunId nests it under the parent in the UI."""
        tags = {
            "mprun.sweep_dir": str(self.sweep_dir),
            "mprun.sweep_job": str(self.num),
            "mprun.overrides": " ".join(self.overrides),
        }
        if self.parent.get("parent_run_id"):
            tags["mlflow.parentRunId"] = self.parent["parent_run_id"]
        return tags

    def record_failure(self, error: BaseException) -> None:
        """A FAILED child run for a job that failed before it had a run of its own (e.g. bad input): once, by rank 0
        of a multi-process job."""
        if self.parent.get("parent_run_id") and os.environ.get("RANK", "0") == "0":
            record_failed_run(
                self.parent["uri"],
                self.parent["experiment_id"],
                self.name,
                {**self.tags(), "error": f"{type(error).__name__}: {error}"},
            )


def short_name(overrides: list[str]) -> str:
    """Overrides as a short run name: a config group's choice by its option alone ('precision=fp16' -> 'fp16'), a
    value by its last key ('optimizer.lr=0.01' -> 'lr=0.01'), unless two of them end alike, which keep their whole
    keys. Spaces between."""
    keys = [_key(o) for o in overrides]
    last = [k.rsplit(".", 1)[-1] for k in keys]
    parts = []
    for override, key, end in zip(overrides, keys, last):
        value = override.split("=", 1)[1] if "=" in override else override
        if "." not in key and "/" not in key:  # a group: its option says it all (precision=fp16 -> fp16)
            parts.append(value)
        else:
            parts.append(f"{end if last.count(end) == 1 else key}={value}")
    return " ".join(parts)


def current_job() -> JobInfo | None:
    """The running job's place in its sweep, or None outside a multirun (a single run)."""
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode is not RunMode.MULTIRUN:
        return None
    sweep_dir = Path(hc.sweep.dir).absolute()
    file = sweep_dir / SWEEP_FILE
    parent = json.loads(file.read_text()) if file.is_file() else {}
    return JobInfo(sweep_dir, int(hc.job.num), tuple(hc.overrides.task), parent)


# What the numeric settings of Hydra's launchers and sweepers must be: their config schemas check types only, and a
# bad value failed in joblib, submitit, Optuna or Hydra's sweeper once the sweep had started, as a traceback
# (n_jobs=0, n_trials=0, max_batch_size=0), or as jobs that never ran (a negative timeout_min).
Rule = tuple[Callable[[Any], bool], str]  # a test of a value, and what it must be, in words


def _at_least(low: int, unit: str = "") -> Rule:
    return (lambda v: v >= low), f">= {low}{unit}"


def _above(low: int, unit: str = "") -> Rule:
    return (lambda v: v > low), f"> {low}{unit}"


_RANGES: dict[str, Rule] = {
    "hydra.launcher.n_jobs": (
        lambda v: v != 0,
        "a number of parallel jobs: N > 0, or -1 for one per CPU (-2 all but one, ...)",
    ),
    "hydra.launcher.timeout": _above(0, " (seconds)"),
    "hydra.launcher.timeout_min": _above(0, " (minutes)"),
    "hydra.launcher.nodes": _at_least(1),
    "hydra.launcher.tasks_per_node": _at_least(1),
    "hydra.launcher.cpus_per_task": _at_least(1),
    "hydra.launcher.cpus_per_gpu": _at_least(1),
    "hydra.launcher.gpus_per_node": _at_least(0),
    "hydra.launcher.gpus_per_task": _at_least(0),
    "hydra.launcher.signal_delay_s": _at_least(0),
    "hydra.launcher.max_num_timeout": _at_least(0),
    "hydra.launcher.mem_gb": _at_least(0),  # SLURM's --mem=0: all of the node's memory
    "hydra.launcher.array_parallelism": _at_least(1),
    "hydra.sweeper.max_batch_size": _at_least(1, " (jobs per batch), or null for all at once"),
    "hydra.sweeper.n_trials": _at_least(1),
    "hydra.sweeper.n_jobs": _at_least(1, " (trials at a time)"),
    "hydra.sweeper.max_failure_rate": ((lambda v: 0 <= v <= 1), "in [0, 1]"),
}
SLURM_COMMANDS = ("sbatch", "srun")  # what submitit's SLURM executor submits with and checks for


def launch_problem(cfg: DictConfig) -> str:
    """Why the multirun could not launch its jobs ("" if nothing is seen), checked before anything is created: a
    launcher or sweeper setting out of range, a sweep value list that cannot be expanded (range(0,1,0)) or is empty,
    or a SLURM launcher on a machine without SLURM."""
    for key, (ok, rule) in _RANGES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not ok(value):
            return f"{key}={value} must be {rule}"
    try:
        parsed = OverridesParser.create().parse_overrides(sweep_lines(cfg))
    except OverrideParseException as e:  # a preset's list: the command line's were parsed when Hydra composed
        return str(e).replace("\n", "; ")
    for override in parsed:
        # choice and range lists: glob() needs Hydra's config loader to expand, and Hydra checks its options itself
        if override.value_type in (ValueType.CHOICE_SWEEP, ValueType.RANGE_SWEEP):
            try:
                values = list(override.sweep_string_iterator())
            except Exception as e:  # noqa: BLE001 - a grammar function's own error (ValueError, TypeError)
                return f"{override.input_line}: {e}"
            if not values:
                return f"{override.input_line} gives no values: the sweep would run no job"
    launcher = cfg.hydra.launcher
    if str(launcher.get("_target_", "")).endswith(".SlurmLauncher"):
        missing = [c for c in SLURM_COMMANDS if shutil.which(c) is None]
        if missing:
            choice = cfg.hydra.runtime.choices.get("hydra/launcher")
            return (
                f"hydra/launcher={choice} submits the jobs to SLURM, and {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not on this machine's PATH: launch the sweep where SLURM is "
                "(a login node), or try it here first with hydra/launcher=submitit_local (the same jobs, as local "
                "processes)"
            )
    return ""


def sweep_lines(cfg: DictConfig) -> list[str]:
    """A multirun's overrides as its sweeper reads them: the command line's, then hydra.sweeper.params' (a preset's
    lists, experiment=lr_sweep; Optuna's search space)."""
    params = cfg.hydra.sweeper.get("params") or {}
    return [*cfg.hydra.overrides.task, *(f"{k}={v}" for k, v in params.items())]


def varied_keys(cfg: DictConfig) -> list[str]:
    """The keys a sweep varies: its sweep overrides (a=1,2), on the command line and in hydra.sweeper.params."""
    parsed = OverridesParser.create().parse_overrides(sweep_lines(cfg))
    return list(dict.fromkeys(o.key_or_group for o in parsed if o.is_sweep_override()))


class Sweep:
    """The parent run of one multirun, from its opening to the report."""

    def __init__(self, cfg: DictConfig) -> None:
        from mprun import build  # torch and friends load only once a tracked sweep really starts

        self.cfg = cfg
        self.sweep_dir = Path(cfg.hydra.sweep.dir).absolute()
        self.tracker = build.tracker(cfg.tracking, cfg.paths.output_root)
        self.varied = varied_keys(cfg)
        params = cfg.hydra.sweeper.get("params")
        params = OmegaConf.to_container(params) if params is not None else {}
        spec = " ".join([*cfg.hydra.overrides.task, *(f"{k}={v}" for k, v in params.items())])
        launcher = cfg.hydra.launcher.get("_target_", "").rsplit(".", 1)[-1]
        previous = self._previous(cfg)
        if previous and self.tracker.resume(previous, 0):
            log.info("sweep %s: resuming its jobs (trainer.resume) under its parent run %s", self.sweep_dir, previous)
            self._close_stale_children(previous)
        else:
            self.tracker.start(
                {
                    "sweep.overrides": spec,
                    "sweep.params": json.dumps(params),
                    "sweep.launcher": launcher,
                    "sweep.sweeper": cfg.hydra.sweeper.get("_target_", "").rsplit(".", 1)[-1],
                },
                {
                    "mprun.role": "sweep",
                    "mprun.sweep_dir": str(self.sweep_dir),
                    "mprun.preset": str(cfg.hydra.runtime.choices.get("experiment") or "none"),
                },
                run_name=f"sweep {spec}"[:250],
            )
        # The jobs could not find the parent without its file: close it rather than leave it RUNNING.
        with self.tracker.closed_on_error():
            self.sweep_dir.mkdir(parents=True, exist_ok=True)
            (self.sweep_dir / SWEEP_FILE).write_text(
                json.dumps(
                    {
                        "parent_run_id": self.tracker.run_id,
                        "uri": self.tracker.uri,
                        "experiment_id": self.tracker.experiment_id,
                        "varied": self.varied,
                    },
                    indent=2,
                )
            )
        log.info("sweep %s: MLflow parent run %s", self.sweep_dir, self.tracker.run_id)

    def _close_stale_children(self, parent_id: str) -> None:
        """Jobs of the earlier launch still RUNNING were killed with it (kill -9, a lost node) before they could close
        their runs: KILLED now. A job that resumes from a checkpoint reopens its own run; one without starts anew."""
        store = self.tracker.store
        for run in store.children(parent_id, running_only=True):
            why = "the requeued sweep: its process had ended without closing it"
            store.set_tags(run.run_id, {"mprun.closed_by": why})
            store.close_run(run.run_id, "KILLED")

    def _previous(self, cfg: DictConfig) -> str | None:
        """The parent run of this sweep directory's earlier launch in the same store, when this launch resumes its
        jobs (trainer.resume: a requeued sweep); its jobs continue their own runs, which are that parent's children."""
        file = self.sweep_dir / SWEEP_FILE
        if not cfg.trainer.get("resume") or not file.is_file():
            return None
        previous = json.loads(file.read_text())
        return previous.get("parent_run_id") if previous.get("uri") == self.tracker.uri else None

    def close(self, interrupted: bool, completed: bool = True) -> int:
        """Report, then close the parent: KILLED if interrupted, FAILED if any job failed or the multirun ended
        before its jobs were done (`completed` false: e.g. a sweep value Hydra rejected), else FINISHED.
        Returns how many jobs did not finish."""
        status, unfinished, jobs = ("KILLED" if interrupted else "FAILED"), 0, 0  # until the report says otherwise
        try:
            rows = report.collect(self.tracker.store, self.tracker.run_id)  # the one search for the sweep's jobs
            # No job recorded (Hydra rejected a sweep value before any ran, or a signal came first): no report,
            # whose empty table would follow Hydra's error as if it were the outcome.
            if rows:
                if interrupted:
                    report.close_running(self.tracker.store, rows)
                rep = report.write(
                    self.tracker.run_id,
                    rows,
                    self.sweep_dir / "report",
                    interrupted=interrupted,
                    tolerance_pp=self.cfg.report.tolerance_pp,
                )
                jobs, unfinished = len(rows), sum(row.status != "FINISHED" for row in rows)
                self.tracker.log_artifact(rep.out_dir, "report")
                self.tracker.set_tags(rep.tags())
                print(rep.console(), flush=True)
            if not interrupted:
                status = "FAILED" if unfinished or not completed else "FINISHED"
            if not completed and not interrupted and not unfinished:  # no failed job to explain the FAILED
                self.tracker.set_tags({"error": "the multirun ended before its jobs ran (its console output says why)"})
            self.tracker.set_tags({"mprun.jobs": str(jobs), "mprun.jobs_unfinished": str(unfinished)})
        except KeyboardInterrupt:  # a signal while the report is built: the sweep was stopped, not failed
            status = "KILLED"
            raise
        finally:
            self.tracker.end(status)
        return unfinished


_ACTIVE: Sweep | None = None  # the sweep this launching process opened and has not closed yet


def close_active(interrupted: bool, completed: bool = True) -> None:
    """Close the open sweep, if this process has one (idempotent)."""
    global _ACTIVE
    sweep, _ACTIVE = _ACTIVE, None
    if sweep is not None:
        sweep.close(interrupted, completed)


class SweepCallback(Callback):
    """Hydra callback (conf/mprun.yaml: hydra.callbacks.mprun_sweep) that brackets every multirun."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _ACTIVE
        if config.tracking.get("_target_") != MlflowConfig._target_:
            log.info("sweep without tracking (tracking=none): no parent run and no report")
            return
        try:
            _ACTIVE = Sweep(config)
        except Exception as e:  # noqa: BLE001 - Hydra would turn it into a warning; say plainly what it means
            log.error("sweep: no MLflow parent run (%s: %s); each job still tracks itself", type(e).__name__, e)
        finally:
            # MLFLOW_RUN_ID names the parent run: the jobs never continue it, even when the parent could not open
            os.environ.pop("MLFLOW_RUN_ID", None)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        close_active(interrupted=False)

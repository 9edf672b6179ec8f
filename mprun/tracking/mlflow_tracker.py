"""MlflowTracker: the Tracker the runner uses with MLflow. It composes a Store, a BatchedWriter (metric batches
written off the training thread) and Failover (tracking.on_unreachable: what happens when the store goes away)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from mprun.errors import ConfigError, TrackingLost, first_line
from mprun.tracking import logged_model
from mprun.tracking.base import CHECKPOINT_STEP_TAG, DatasetRecord, Tracker
from mprun.tracking.config import MlflowConfig, SystemMetrics, Unreachable
from mprun.tracking.failover import Failover
from mprun.tracking.metric_writer import BatchedWriter, MetricBatch
from mprun.tracking.source import env_tags, experiment_choice, source_tags
from mprun.tracking.store import RecordedRun, Store
from mprun.tracking.uris import default_uri, is_database, shown

log = logging.getLogger("mprun.tracking")
T = TypeVar("T")


class MlflowTracker(Tracker):
    """MLflow tracking: runs in a Store, metric batches buffered and written in flushes by a BatchedWriter (a write
    that fails is noticed at the next log call or flush), and a store that cannot be reached handled by the Failover
    policy."""

    def __init__(
        self,
        output_root: str,
        uri: str | None,
        experiment: str | None,
        run_name: str | None,
        log_checkpoint: bool,
        *,
        on_unreachable: Unreachable = Unreachable.fail,
        flush_every_s: float = MlflowConfig.flush_every_s,
        system_metrics: SystemMetrics = SystemMetrics.auto,
        system_metrics_every_s: float = MlflowConfig.system_metrics_every_s,
        log_model: bool | str = False,
        register_model: str | None = None,
    ) -> None:
        # A new store's schema migrations print a dozen INFO lines (alembic) and two of MLflow's own ("Creating
        # initial MLflow database tables..."); a first run's output is mprun's.
        for name in ("alembic", "mlflow.store.db.utils"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.output_root = Path(output_root).absolute()
        self.run_name = run_name
        self.experiment, self.experiment_wanted = experiment_choice(experiment)  # a name, an id, or both
        self.env_tags = env_tags()  # $MLFLOW_TAGS: a bad one fails here, before anything is recorded
        self.log_checkpoint = log_checkpoint
        self.failover = Failover(on_unreachable, default_uri(output_root))
        self._started: tuple | None = None  # (params, tags, name, datasets): to reopen the run in the local store
        self._writer = BatchedWriter(flush_every_s)
        self._dropped: list[str] = []  # metric batches a store that still answered failed to write
        self.system_metrics, self.system_metrics_every_s = system_metrics, system_metrics_every_s
        self._monitor: Any = None  # MLflow's SystemMetricsMonitor, while it samples
        self.model_logged, self.register_model = log_model or register_model is not None, register_model
        self.continuing_id = os.environ.get("MLFLOW_RUN_ID") or None  # a run to continue, as MLflow's clients do
        self.failover.open(uri or os.environ.get("MLFLOW_TRACKING_URI") or self.failover.local_uri, self._connect)
        self.continuing = self._run_to_continue()

    def _connect(self, uri: str) -> None:
        if self.failover.intended and self.experiment is None:  # the local fallback has no experiment of that id
            self.experiment, self.experiment_wanted = "mprun", None
        self.store, self.experiment_id = Store.open(
            uri,
            self.experiment,
            self.output_root / "mlartifacts",
            experiment_id=self.experiment_wanted,
            continuing=self.continuing_id,
        )
        # By name from now on: a run the failover moves to the local store goes to the same experiment's name there.
        self.experiment, self.experiment_wanted = self.store.experiment_name(self.experiment_id), None

    def _run_to_continue(self) -> RecordedRun | None:
        """The run $MLFLOW_RUN_ID names, checked before anything is recorded: it exists, in this run's experiment."""
        wanted = self.continuing_id
        if wanted is None:
            return None
        run = self.store.run(wanted)
        if run is None or run.deleted:
            raise ConfigError(
                f"MLFLOW_RUN_ID={wanted}: no {'such run' if run is None else 'live run (it was deleted)'} in "
                f"{shown(self.uri)}; unset it to start a new run"
            )
        if run.experiment_id != self.experiment_id:
            raise ConfigError(
                f"MLFLOW_RUN_ID={wanted} is a run of experiment {run.experiment_id}, not of {self.experiment!r} "
                f"(id {self.experiment_id}), which tracking.experiment or MLFLOW_EXPERIMENT_NAME/_ID chose: unset "
                "those to continue it in its own experiment"
            )
        return run

    def _taken(self) -> None:
        """The run MLFLOW_RUN_ID names is this process's now: no later run here (a sweep's jobs) takes it too."""
        self.continuing = None
        os.environ.pop("MLFLOW_RUN_ID", None)

    def resume_dir(self) -> str | None:
        run = self.continuing
        if run is None or CHECKPOINT_STEP_TAG not in run.tags:  # mprun never checkpointed it: it trains afresh
            return None
        where = run.tags.get("mprun.run_dir", "")
        if not where or not (Path(where) / "checkpoints").is_dir():
            raise ConfigError(
                f"MLFLOW_RUN_ID={run.run_id}: mprun checkpointed that run in {where or 'a directory it did not record'}"
                ", which this machine does not have; pass trainer.resume=<a copy of one of its checkpoints>"
            )
        return where

    @property
    def uri(self) -> str:
        """The store the run is in (the local one, once the failover moved it there)."""
        return self.store.uri

    def start(
        self,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        run_name: str | None = None,
        datasets: Sequence[DatasetRecord] = (),
    ) -> None:
        # $MLFLOW_TAGS first: a tag mprun sets itself keeps mprun's value
        tags = {**self.env_tags, **source_tags(), **tags}
        if self.failover.intended:
            tags = {**tags, "mprun.intended_tracking_uri": self.failover.intended}
        params = {k: shown(v) if isinstance(v, str) else v for k, v in params.items()}  # tracking.uri's password
        self._started = (params, tags, run_name, datasets)
        if self.continuing is not None:
            self._continue_afresh(params, tags, datasets)
            return
        # tracking.run_name names the study: a sweep's parent and jobs keep what tells them apart after it.
        name = ": ".join(n for n in (self.run_name, run_name) if n) or None
        self.run_id = self.store.create_run(self.experiment_id, name, tags)
        with self.closed_on_error():
            self.store.log_params(self.run_id, params)
            self.store.log_datasets(self.run_id, datasets)

    def _continue_afresh(
        self, params: Mapping[str, Any], tags: Mapping[str, str], datasets: Sequence[DatasetRecord]
    ) -> None:
        """Train from the start into the run MLFLOW_RUN_ID names (one a job script opened for it, say): its params
        must agree with this run's, since MLflow keeps a param's first value."""
        run = self.continuing
        if CHECKPOINT_STEP_TAG in run.tags:  # training afresh would log a second history over the same steps
            raise ConfigError(
                f"MLFLOW_RUN_ID={run.run_id} was trained by mprun up to step {run.tags[CHECKPOINT_STEP_TAG]}: resume "
                f"from its checkpoint (trainer.resume={run.tags.get('mprun.run_dir') or '<its run dir>'}), or unset "
                "MLFLOW_RUN_ID to start a new run"
            )
        clash = [f"{k}={run.params[k]} (here {v})" for k, v in params.items() if run.params.get(k, str(v)) != str(v)]
        if clash:
            raise ConfigError(
                f"MLFLOW_RUN_ID={run.run_id} has other values for params this run sets: {', '.join(clash[:3])}; "
                "MLflow keeps a param's first value, so start a new run (unset MLFLOW_RUN_ID)"
            )
        self._taken()
        self.run_id = run.run_id
        self.store.reopen(run.run_id)
        with self.closed_on_error():
            self.store.set_tags(run.run_id, tags)
            self.store.log_params(run.run_id, {k: v for k, v in params.items() if k not in run.params})
            self.store.log_datasets(run.run_id, datasets)
        log.info("continuing MLflow run %s (MLFLOW_RUN_ID)", run.run_id)

    @contextlib.contextmanager
    def closed_on_error(self) -> Any:
        """Around the rest of opening a run (params, tags, files its users need): the run exists now, so an error or a
        second Ctrl-C here closes it (FAILED / KILLED) instead of leaving it RUNNING; the caller, which never got a
        run to close, sees the error."""
        try:
            yield
        except BaseException as e:
            try:
                self.store.set_tags(self.run_id, {"error": f"{type(e).__name__}: {e}"})
                self.store.close_run(self.run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            except Exception:  # the store may be what failed; the original error matters more
                log.exception("could not close MLflow run %s after a failed start", self.run_id)
            self.run_id = None
            raise

    def resume(self, run_id: str, step: int) -> bool:
        if self.continuing is not None and run_id != self.continuing.run_id:
            raise ConfigError(
                f"MLFLOW_RUN_ID={self.continuing.run_id}, but the checkpoint continues MLflow run {run_id}: unset "
                "MLFLOW_RUN_ID, or resume from a checkpoint of that run"
            )
        run = self.store.run(run_id)
        if run is None:
            log.warning("the checkpoint's MLflow run %s is not in %s: starting a new run", run_id, shown(self.uri))
            return False
        if run.deleted:  # MLflow refuses to reopen it
            log.warning("the checkpoint's MLflow run %s was deleted in %s: starting a new run", run_id, shown(self.uri))
            return False
        later = int(run.tags.get(CHECKPOINT_STEP_TAG, -1))
        if later > step and self.continuing is not None:
            raise ConfigError(
                f"MLFLOW_RUN_ID={run_id} has gone on past this checkpoint (step {step}) to step {later}: resume from "
                "its newest checkpoint, or unset MLFLOW_RUN_ID to branch into a new run"
            )
        if later > step:  # continuing would log a second history over the steps the run has already recorded
            log.warning(
                "MLflow run %s has gone on past this checkpoint (step %d) to one at step %d, so the resume "
                "branches from it into a new run (tagged mprun.resumed_from_run)",
                run_id,
                step,
                later,
            )
            return False
        self._taken()
        self.run_id = run_id
        self.store.reopen(run_id)
        self._send_kept(run_id, step)
        with self.closed_on_error():
            resumes = int(run.tags.get("mprun.resumes", "0")) + 1
            self.set_tags({"mprun.resumes": str(resumes), f"mprun.resume_{resumes}_step": str(step)})
            # What ended the run before is history now: kept under another name, so that a resumed run that finishes
            # is not reported as failed (the sweep report lists the runs with an error tag).
            for key in ("error", "diagnosis"):
                if key in run.tags:
                    self.set_tags({f"mprun.resume_{resumes}_after_{key}": run.tags[key]})
                    self.store.delete_tag(run_id, key)
        log.info("continuing MLflow run %s from step %d", run_id, step)
        return True

    def _move(self, error: BaseException, failed: list[MetricBatch]) -> None:
        """The store failed a call and no longer answers: raise TrackingLost, or (on_unreachable=local) continue in a
        new run in the local store, whose buffer gets the metric batches the lost store never confirmed."""
        unsent = [*failed, *self._writer.unsent()]
        try:
            local = self.failover.move(self.uri, self.run_id, error)
        except TrackingLost:
            self._keep(unsent)
            raise
        self._connect(local)
        params, tags, name, datasets = self._started or ({}, {}, None, ())
        self.start(params, tags, name, datasets)
        for batch in unsent:
            self._writer.add(batch)

    def _kept(self, run_id: str) -> Path:
        """Where the metric points of a run that lost its store are kept for its resume."""
        return self.output_root / "mlflow_unsent" / f"{run_id}.json"

    def _keep(self, batches: list[MetricBatch]) -> None:
        """The run lost its store (on_unreachable=fail): the points it never confirmed go to a file, which a resume of
        the run sends first; else the steps between the last confirmed flush and the checkpoint the resume starts from
        would be missing from its history."""
        if not batches or self.run_id is None:
            return
        kept = self._kept(self.run_id)
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text(json.dumps([{"step": b.step, "values": dict(b.values), "ms": b.timestamp_ms} for b in batches]))
        points = sum(len(b.values) for b in batches)
        log.warning(
            "%d metric points the store never confirmed are kept in %s: a resume of the run sends them", points, kept
        )

    def _send_kept(self, run_id: str, step: int) -> None:
        """A resumed run: queue the points its lost store never confirmed, up to the checkpoint's step (training
        logs the later ones again)."""
        kept = self._kept(run_id)
        if not kept.is_file():
            return
        batches = [MetricBatch(b["step"], b["values"], b["ms"]) for b in json.loads(kept.read_text())]
        sent = [batch for batch in batches if batch.step <= step]
        for batch in sent:
            self._writer.add(batch)
        kept.unlink()
        log.info("sending the %d kept metric steps of run %s up to step %d", len(sent), run_id, step)

    def _call(self, fn: Callable[[], Any]) -> Any:
        """A synchronous store call, redone on the local store if the failover moved the run there."""
        if self.failover.lost:
            return None
        try:
            return fn()
        except Exception as e:  # any failure of the store; the policy decides
            if self.store.answers():
                raise  # the store answers: the call's own error
            self._move(e, [])
            return fn()  # fn reads self.store / self.run_id, which now point at the local store

    def _settle(self, wait: bool) -> bool:
        """Check the background metric writes (all of them, waiting, with `wait`); True if it queued more. A flush of
        several steps that failed while the store still answers (a locked sqlite store, a server error) is written
        again one step at a time; one step's write that fails so loses that step's metrics, said in the log and
        tagged on the run at its end: one failed write must not end a training, nor keep its run from being closed.
        A store that no longer answers gets the on_unreachable policy."""
        failed = self._writer.failed(wait)
        for i, (batches, error) in enumerate(failed):
            if not self.store.answers():  # raises, or buffers them for the local store
                self._move(error, [b for bs, _ in failed[i:] for b in bs])
                return True
            if len(batches) > 1:
                for batch in batches:
                    self._writer.submit(self._write(), [batch])
                continue
            self._dropped.append(f"step {batches[0].step}: {type(error).__name__}: {str(error)[:200]}")
            log.warning("MLflow: metrics of %s were not recorded", self._dropped[-1])
        return any(len(batches) > 1 for batches, _ in failed)

    def _write(self) -> Callable[[list[MetricBatch]], None]:
        """What writes a flush: to the store and run of now (a move to the local store changes both)."""
        return partial(self.store.log_metrics, self.run_id)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self.failover.lost:
            return
        self._settle(wait=False)
        self._writer.add(MetricBatch.now(metrics, step))
        if self._writer.due():  # off the training thread; one write of all the steps since the last
            self._writer.flush(self._write())

    def flush(self) -> None:
        """Write every metric logged so far and wait: at a checkpoint (training is paused for it anyway), so that
        the store has the metrics of every step the checkpoint covers; and at the end."""
        for _ in range(6):  # each pass may queue more: a failed flush split into steps, a move's re-sent batches
            if self.run_id is None or self.failover.lost:
                return
            self._writer.flush(self._write())
            if not self._settle(wait=True):
                return

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._call(lambda: self.store.log_artifact(self.run_id, path, artifact_path))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._call(lambda: self.store.set_tags(self.run_id, tags))

    def log_model(self, model: Any, example: Any) -> None:
        if not self.model_logged:
            return
        ready = logged_model.prepare(model, example)
        self._call(lambda: logged_model.record(self.store, self.experiment_id, self.run_id, ready, self.register_model))

    def watch_system(self, gpu: bool, continued: bool) -> None:
        if self.system_metrics is SystemMetrics.off or (self.system_metrics is SystemMetrics.auto and not gpu):
            return
        try:  # psutil (and nvidia-ml-py for GPUs) are mprun's dependencies; a broken install costs the metrics only
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor  # only when asked for
        except ImportError as e:
            log.warning("tracking.system_metrics: not recorded (%s)", first_line(e, type(e).__name__))
            return
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # its start/stop INFO lines: noise here
        self._monitor = SystemMetricsMonitor(
            self.run_id, self.system_metrics_every_s, resume_logging=continued, tracking_uri=self.uri
        )
        self._monitor.start()

    def end(self, status: str) -> None:
        if self.run_id is None:
            return
        try:
            try:
                if self._monitor is not None:  # its last samples written before the run closes
                    self._monitor.finish()
                    self._monitor = None
                self.flush()
                if self._dropped:
                    first = self._dropped[0]
                    self.set_tags({"mprun.metrics_not_recorded": f"{len(self._dropped)} batch(es), first {first}"})
            finally:  # whatever failed above, the run is closed if the store takes it
                self._call(lambda: self.store.close_run(self.run_id, status))
        finally:
            self._writer.close()
            if self.failover.lost:
                log.error(
                    "MLflow run %s in %s could not be closed: it stays RUNNING there until a resume "
                    "(trainer.resume=<run dir>) continues it, or `python -m mprun.close_stale --uri %s %s` closes it",
                    self.run_id,
                    shown(self.uri),
                    shlex.quote(shown(self.uri)),
                    self.run_id,
                )

    def describe(self) -> list[str]:
        ui = Path(sys.executable).with_name("mlflow")
        # Quoted where needed, so that it can be pasted as is: a path with a space split into two arguments.
        store = shlex.quote(shown(self.uri))  # with its password, if any, left for the reader to fill in
        cmd = f"{shlex.quote(str(ui)) if ui.exists() else 'mlflow'} ui --backend-store-uri {store}"
        # MLflow 3's UI opens an experiment as GenAI unless the link (or the browser's last choice) says otherwise
        run = f"#/experiments/{self.experiment_id}/runs/{self.run_id}?workflowType=machine_learning"
        lines = [f"MLflow run  {self.run_id} (experiment {self.experiment_id}) in {shown(self.uri)}"]
        if self.uri.startswith("sqlite:") or is_database(self.uri):
            lines.append(f"MLflow UI   {cmd} --port 5000")
            lines.append(f"            then open http://127.0.0.1:5000/{run}")
        else:
            lines.append(f"MLflow UI   {self.uri.rstrip('/')}/{run}")
        return lines

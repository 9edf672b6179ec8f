"""Experiment tracking behind a small interface: MLflow, or nothing. Only this module imports mlflow.

MlflowTracker uses MlflowClient with explicit run ids, never the fluent API's process-global
"active run", so a worker process that runs several jobs cannot leak a run from one into the next.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shlex
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Optional

from omegaconf import MISSING

from mprun.errors import ConfigError, TrackingLost, first_line
from mprun.interrupts import deferred_signals

log = logging.getLogger(__name__)


# The step of the newest checkpoint a run has written. A resume from an older one (the run was resumed before, or
# a branch from an earlier step) starts a new run instead of logging the steps from there a second time.
CHECKPOINT_STEP_TAG = "mprun.checkpoint_step"


class Unreachable(Enum):
    fail = "fail"  # stop with a clear error (before training; or mid-run, when the server goes away)
    local = "local"  # keep training and log to the local sqlite store instead


@dataclass
class TrackingConfig:
    _target_: str = MISSING
    _partial_: bool = True


@dataclass
class MlflowConfig(TrackingConfig):
    _target_: str = "mprun.tracking.MlflowTracker"
    # null: $MLFLOW_TRACKING_URI if set, else sqlite at <output_root>/mlflow.db
    uri: Optional[str] = None
    experiment: str = "mprun"
    run_name: Optional[str] = None
    log_checkpoint: bool = True  # checkpoints can be large: false keeps them only in the run directory
    # A store that cannot be reached, at start or mid-run: fail (clear error), or local (keep training,
    # log to sqlite:///<output_root>/mlflow.db, tagging the run with the intended store).
    on_unreachable: Unreachable = Unreachable.fail


@dataclass
class NoTrackingConfig(TrackingConfig):
    _target_: str = "mprun.tracking.NullTracker"


class Tracker:
    """What the runner needs from a tracker. The base class tracks nothing."""

    run_id: Optional[str] = None
    log_checkpoint: bool = False  # whether checkpoints are uploaded as artifacts

    def start(self, params: Mapping[str, Any], tags: Mapping[str, str], run_name: Optional[str] = None) -> None:
        """Open a run and record params and tags; run_name names it unless the config names it."""

    def resume(self, run_id: str, step: int) -> bool:
        """Reopen an earlier run to continue it (a resumed training); False if this store lacks it."""
        return False

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue metrics for one step; written without blocking training."""

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        """Copy a file or directory into the run's artifacts."""

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Add or overwrite run tags."""

    def end(self, status: str) -> None:
        """Close the run as FINISHED, FAILED or KILLED."""

    def describe(self) -> list[str]:
        """Lines for the end-of-run summary: where the run is and how to look at it."""
        return []


class NullTracker(Tracker):
    """tracking=none: nothing is recorded."""

    def __init__(self, output_root: str = "outputs") -> None:
        pass

    def describe(self) -> list[str]:
        return ["tracking    off (tracking=none)"]


def unusable(uri: str, why: str) -> ConfigError:
    """The error for a tracking store that cannot be used."""
    why = first_line(why, "unknown error")
    return ConfigError(
        f"cannot use MLflow tracking store {uri}: {why[:300]}. Fix tracking.uri / MLFLOW_TRACKING_URI, or run with tracking=none"
    )


def probe_server(uri: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds on a tracking server that does not answer: MLflow's own client retries with
    backoff for minutes (measured: 4 min 13 s against a closed port) before giving up."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        pass  # it answered: auth or routing is MLflow's business, checked by the first real request
    except (urllib.error.URLError, OSError) as e:
        raise unusable(uri, f"no answer from the server ({getattr(e, 'reason', e)})") from e


def default_uri(output_root: str) -> str:
    """sqlite database in the output root, as an absolute path so it does not depend on the cwd."""
    return f"sqlite:///{Path(output_root).absolute() / 'mlflow.db'}"


def store_lock(uri: str) -> ContextManager:
    """A file lock beside a sqlite store for its first use: MLflow creates the tables on first open,
    and parallel first openers race (most of them fail). Other backends need no lock."""
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    from filelock import FileLock

    db = Path(uri[len("sqlite:///") :])
    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(f"{db}.lock", timeout=300)


def record_failed_run(uri: str, experiment_id: str, run_name: str, tags: Mapping[str, str]) -> Optional[str]:
    """A FAILED run for a job that failed before its own run existed (bad input in one sweep job), so the
    failure shows up beside its siblings. Returns the run id, or None if the store itself is unusable."""
    from mlflow import MlflowClient

    try:
        client = MlflowClient(tracking_uri=uri)
        run_id = client.create_run(experiment_id, run_name=run_name, tags={k: str(v)[:5000] for k, v in tags.items()}).info.run_id
        client.set_terminated(run_id, "FAILED")
        return run_id
    except Exception:  # noqa: BLE001 - the job's own error is what gets reported; this is best effort
        log.exception("could not record the failed job in %s", uri)
        return None


def _succeeded(future: Any) -> bool:
    """A background write that completed without error."""
    return future.done() and not future.cancelled() and future.exception() is None


class MlflowTracker(Tracker):
    """MLflow tracking through MlflowClient. Metric batches are written by one background thread
    (in order, off the training thread); a write that fails is noticed at the next log call."""

    def __init__(self, output_root: str, uri: Optional[str], experiment: str, run_name: Optional[str], log_checkpoint: bool,
                 on_unreachable: Unreachable = Unreachable.fail) -> None:
        logging.getLogger("alembic").setLevel(logging.WARNING)  # schema migrations print a dozen INFO lines
        from concurrent.futures import ThreadPoolExecutor

        self.output_root = Path(output_root).absolute()
        self.run_name = run_name
        self.experiment = experiment
        self.log_checkpoint = log_checkpoint
        self.on_unreachable = Unreachable(on_unreachable)
        self.fallback_from: Optional[str] = None  # "<uri> run <id>" once logging moved to the local store
        self._started: Optional[tuple] = None  # (params, tags, name): to reopen the run locally
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="mprun-mlflow")
        self._pending: list = []  # (future, metric batch) writes not yet confirmed
        self._dropped: list[str] = []  # metric batches a store that still answered failed to write
        self._lost = False  # the store went away and the policy is fail: nothing more is sent
        uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(output_root)
        if uri.startswith(("http://", "https://")):
            # MLflow's client retries a dead server for minutes (measured 4 min 13 s); a few seconds
            # is enough to tell. Explicit environment settings still win.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
            logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # one line per retry otherwise
        try:
            self._connect(uri)
        except ConfigError as e:
            if self.on_unreachable is Unreachable.fail or uri == default_uri(output_root):
                raise
            log.warning("%s\ntracking.on_unreachable=local: logging to %s instead", e, default_uri(output_root))
            self.fallback_from = uri
            self._connect(default_uri(output_root))

    def _connect(self, uri: str) -> None:
        from mlflow import MlflowClient

        self.uri = uri
        if uri.startswith(("http://", "https://")):
            probe_server(uri)
        # A new sqlite store gets its tables now, in several migrations: a Ctrl-C in between left a store that
        # every later run failed on ("duplicate column name"), so signals wait until the store is whole.
        with store_lock(uri), deferred_signals():
            try:
                self.client = MlflowClient(tracking_uri=uri)
            except Exception as e:  # noqa: BLE001 - a URI MLflow cannot parse or has no driver for
                raise unusable(uri, str(e)) from e
            self.experiment_id = self._experiment(self.experiment)

    def _experiment(self, name: str) -> str:
        """Get or create the experiment; any failure here means the store is unreachable or unusable."""
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.get_experiment_by_name(name)
            if found is not None:
                return found.experiment_id
            location = None
            if self.uri.startswith("sqlite:"):
                # A local store keeps artifacts beside it, not in ./mlruns of whatever the cwd is.
                location = (self.output_root / "mlartifacts").as_uri()
            try:
                return self.client.create_experiment(name, artifact_location=location)
            except MlflowException:
                found = self.client.get_experiment_by_name(name)  # created meanwhile by a parallel job
                if found is None:
                    raise
                return found.experiment_id
        except Exception as e:  # noqa: BLE001 - every backend raises its own types; all mean "cannot track"
            raise unusable(self.uri, str(e)) from e

    def start(self, params: Mapping[str, Any], tags: Mapping[str, str], run_name: Optional[str] = None) -> None:
        from mlflow.entities import Param

        if self.fallback_from:
            tags = {**tags, "mprun.intended_tracking_uri": self.fallback_from}
        self._started = (params, tags, run_name)
        # tracking.run_name names the study: a sweep's parent and jobs keep what tells them apart after it.
        name = ": ".join(n for n in (self.run_name, run_name) if n) or None
        # Unnamed, MLflow draws a name with Python's `random`, which the run has just seeded: every run with the
        # same seed got the same name. The draw gets fresh entropy, and the experiment's random state is kept.
        state = random.getstate()
        random.seed()
        try:
            run = self.client.create_run(self.experiment_id, run_name=name, tags=dict(tags))
        finally:
            random.setstate(state)
        self.run_id = run.info.run_id
        with self.closed_on_error():
            items = [Param(k, str(v)[:6000]) for k, v in params.items()]
            for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
                self.client.log_batch(self.run_id, params=items[i : i + 100])

    @contextlib.contextmanager
    def closed_on_error(self) -> Any:
        """Around the rest of opening a run (params, tags, files its users need): the run exists now, so an error or a
        second Ctrl-C here closes it (FAILED / KILLED) instead of leaving it RUNNING; the caller, which never got a
        run to close, sees the error."""
        try:
            yield
        except BaseException as e:
            try:
                self.client.set_tag(self.run_id, "error", f"{type(e).__name__}: {e}"[:5000])
                self.client.set_terminated(self.run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            except Exception:  # noqa: BLE001 - the store may be what failed; the original error matters more
                log.exception("could not close MLflow run %s after a failed start", self.run_id)
            self.run_id = None
            raise

    def resume(self, run_id: str, step: int) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            log.warning("the checkpoint's MLflow run %s is not in %s: starting a new run", run_id, self.uri)
            return False
        if run.info.lifecycle_stage == "deleted":  # MLflow refuses to reopen it
            log.warning("the checkpoint's MLflow run %s was deleted in %s: starting a new run", run_id, self.uri)
            return False
        later = int(run.data.tags.get(CHECKPOINT_STEP_TAG, -1))
        if later > step:  # continuing would log a second history over the steps the run has already recorded
            log.warning("MLflow run %s has gone on past this checkpoint (step %d) to one at step %d, so the resume "
                        "branches from it into a new run (tagged mprun.resumed_from_run)", run_id, step, later)
            return False
        self.run_id = run_id
        self.client.update_run(run_id, status="RUNNING")
        with self.closed_on_error():
            resumes = int(run.data.tags.get("mprun.resumes", "0")) + 1
            self.set_tags({"mprun.resumes": str(resumes), f"mprun.resume_{resumes}_step": str(step)})
            # What ended the run before is history now: kept under another name, so that a resumed run that finishes
            # is not reported as failed (the sweep report lists the runs with an error tag).
            for key in ("error", "diagnosis"):
                if key in run.data.tags:
                    self.set_tags({f"mprun.resume_{resumes}_after_{key}": run.data.tags[key]})
                    self.client.delete_tag(run_id, key)
        log.info("continuing MLflow run %s from step %d", run_id, step)
        return True

    def _reachable(self) -> bool:
        """After a failed call: does the store still answer? (Only a remote server can go away.)"""
        if not self.uri.startswith(("http://", "https://")):
            return True
        try:
            probe_server(self.uri)
            return True
        except ConfigError:
            return False

    def _store_lost(self, error: BaseException) -> None:
        """The store failed a call and no longer answers: raise TrackingLost (fail) or move this run to the local
        store (local)."""
        unsent = [batch for f, batch in self._pending if not _succeeded(f)]
        for f, _ in self._pending:
            f.cancel()  # queued writes to a dead store would each spend their retries
        self._pending = []
        lost = f"MLflow store {self.uri} stopped accepting writes mid-run ({type(error).__name__}: {str(error)[:200]})"
        if self.on_unreachable is Unreachable.fail or self.fallback_from:
            self._lost = True
            raise TrackingLost(f"{lost}. Resume from the run's last checkpoint with trainer.resume=<run dir>, "
                               "or set tracking.on_unreachable=local to keep training and log locally") from error
        local = default_uri(str(self.output_root))
        log.warning("%s\ntracking.on_unreachable=local: continuing in a new run in %s", lost, local)
        self.fallback_from = f"{self.uri} run {self.run_id}"
        self._connect(local)
        params, tags, name = self._started or ({}, {}, None)
        self.start(params, tags, name)
        for batch in unsent:  # what the dead store never confirmed goes to the new run
            self._send(batch)

    def _call(self, fn: Callable[[], Any]) -> Any:
        """A synchronous store call, redone on the local store if the policy moved the run there."""
        if self._lost:
            return None
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - any failure of the store; the policy decides
            if self._reachable():
                raise  # the store answers: the call's own error
            self._store_lost(e)
            return fn()  # fn reads self.client / self.run_id, which now point at the local store

    def _settle(self, wait: bool) -> None:
        """Check the background metric writes (all of them, waiting, with `wait`). A write that failed while the store
        still answers (a locked sqlite store, a server error) loses its batch, said in the log and tagged on the run
        at its end: one failed write must not end a training, nor keep its run from being closed. A store that no
        longer answers gets the on_unreachable policy."""
        if wait:
            from concurrent.futures import wait as wait_all

            wait_all([f for f, _ in self._pending])
        for f, batch in self._pending:
            error = f.exception() if f.done() and not f.cancelled() else None
            if error is not None:
                if not self._reachable():
                    self._store_lost(error)  # raises, or moves the unsent batches to the local store
                    return
                self._dropped.append(f"step {batch[0].step if batch else '?'}: {type(error).__name__}: {str(error)[:200]}")
                log.warning("MLflow: metrics of %s were not recorded", self._dropped[-1])
        self._pending = [(f, b) for f, b in self._pending if not f.done()]

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        if self._lost:
            return
        self._settle(wait=False)
        now = get_current_time_millis()
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._send(batch)

    def _send(self, batch: list) -> None:
        """Queue one metric batch for the writer thread (one sqlite write costs ~13 ms: off the training thread)."""
        self._pending.append((self._writer.submit(self.client.log_batch, self.run_id, metrics=batch), batch))

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        if Path(path).is_dir():
            self._call(lambda: self.client.log_artifacts(self.run_id, str(path), artifact_path))
        else:
            self._call(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self._call(lambda: self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()]))

    def end(self, status: str) -> None:
        if self.run_id is None:
            return
        try:
            try:
                for _ in range(2):  # a second pass for what a move to the local store re-sent
                    if self._lost:
                        break
                    self._settle(wait=True)
                if self._dropped:
                    self.set_tags({"mprun.metrics_not_recorded": f"{len(self._dropped)} batch(es), first {self._dropped[0]}"})
            finally:  # whatever failed above, the run is closed if the store takes it
                self._call(lambda: self.client.set_terminated(self.run_id, status))
        finally:
            self._writer.shutdown(wait=False, cancel_futures=True)
            if self._lost:
                log.error("MLflow run %s in %s could not be closed: it stays RUNNING there until closed by hand "
                          "(MlflowClient(uri).set_terminated(run_id, 'FAILED'))", self.run_id, self.uri)

    def describe(self) -> list[str]:
        ui = Path(sys.executable).with_name("mlflow")
        # Quoted where needed, so that it can be pasted as is: a path with a space split into two arguments.
        cmd = f"{shlex.quote(str(ui)) if ui.exists() else 'mlflow'} ui --backend-store-uri {shlex.quote(self.uri)}"
        lines = [f"MLflow run  {self.run_id} (experiment {self.experiment_id}) in {self.uri}"]
        if self.uri.startswith(("sqlite:", "postgresql", "mysql")):
            lines.append(f"MLflow UI   {cmd} --port 5000")
            lines.append(f"            then open http://127.0.0.1:5000/#/experiments/{self.experiment_id}/runs/{self.run_id}")
        else:
            lines.append(f"MLflow UI   {self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}")
        return lines

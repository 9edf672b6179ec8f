"""Experiment tracking behind a small interface: MLflow, or nothing. Only this module imports mlflow.

MlflowTracker uses MlflowClient with explicit run ids, never the fluent API's process-global
"active run", so a worker process that runs several jobs cannot leak a run from one into the next.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Mapping, Optional

from omegaconf import MISSING

from mprun.errors import ConfigError

log = logging.getLogger(__name__)


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


@dataclass
class NoTrackingConfig(TrackingConfig):
    _target_: str = "mprun.tracking.NullTracker"


class Tracker:
    """What the runner needs from a tracker. The base class tracks nothing."""

    run_id: Optional[str] = None
    log_checkpoint: bool = False  # whether checkpoints are uploaded as artifacts

    def start(self, params: Mapping[str, Any], tags: Mapping[str, str], run_name: Optional[str] = None) -> None:
        """Open a run and record params and tags; run_name names it unless the config names it."""

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
    why = why.strip().splitlines()[0] if why.strip() else "unknown error"
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


class MlflowTracker(Tracker):
    """MLflow tracking through MlflowClient; metrics go out in batches, asynchronously."""

    def __init__(self, output_root: str, uri: Optional[str], experiment: str, run_name: Optional[str], log_checkpoint: bool) -> None:
        logging.getLogger("alembic").setLevel(logging.WARNING)  # schema migrations print a dozen INFO lines
        import mlflow
        from mlflow import MlflowClient

        self._mlflow = mlflow
        self.uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(output_root)
        self.output_root = Path(output_root).absolute()
        self.run_name = run_name
        self.log_checkpoint = log_checkpoint
        self._pending: list = []  # async metric writes not yet confirmed
        if self.uri.startswith(("http://", "https://")):
            probe_server(self.uri)
        with store_lock(self.uri):
            self.client = MlflowClient(tracking_uri=self.uri)
            self.experiment_id = self._experiment(experiment)

    def _experiment(self, name: str) -> str:
        """Get or create the experiment; any failure here means the store is unreachable or unusable."""
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
            except self._mlflow.exceptions.MlflowException:
                found = self.client.get_experiment_by_name(name)  # created meanwhile by a parallel job
                if found is None:
                    raise
                return found.experiment_id
        except Exception as e:  # noqa: BLE001 - every backend raises its own types; all mean "cannot track"
            raise unusable(self.uri, str(e)) from e

    def start(self, params: Mapping[str, Any], tags: Mapping[str, str], run_name: Optional[str] = None) -> None:
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment_id, run_name=self.run_name or run_name, tags=dict(tags))
        self.run_id = run.info.run_id
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        # One sqlite write costs ~13 ms here; asynchronous batches keep it off the training thread.
        self._pending.append(self.client.log_batch(self.run_id, metrics=batch, synchronous=False))

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        if Path(path).is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def end(self, status: str) -> None:
        if self.run_id is None:
            return
        try:
            # Wait on this client's own writes: mlflow.flush_async_logging() would go through the
            # fluent API's global default store and create ./mlflow.db in the working directory.
            for op in self._pending:
                op.wait()
            self._pending.clear()
        finally:
            self.client.set_terminated(self.run_id, status)

    def describe(self) -> list[str]:
        ui = Path(sys.executable).with_name("mlflow")
        cmd = f"{ui if ui.exists() else 'mlflow'} ui --backend-store-uri {self.uri}"
        lines = [f"MLflow run  {self.run_id} (experiment {self.experiment_id}) in {self.uri}"]
        if self.uri.startswith(("sqlite:", "postgresql", "mysql")):
            lines.append(f"MLflow UI   {cmd} --port 5000")
            lines.append(f"            then open http://127.0.0.1:5000/#/experiments/{self.experiment_id}/runs/{self.run_id}")
        else:
            lines.append(f"MLflow UI   {self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}")
        return lines

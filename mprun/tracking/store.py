"""One MLflow tracking store: Store, the only code that talks to MlflowClient (experiments, runs, searches, params,
datasets, metrics, tags, artifacts). Reaching it (probes, the first openers' lock) is reach.py's."""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mprun.errors import ConfigError
from mprun.interrupts import deferred_signals
from mprun.tracking.base import DatasetRecord
from mprun.tracking.metric_writer import MetricBatch
from mprun.tracking.reach import probe_database, probe_server, store_lock
from mprun.tracking.uris import is_database, is_remote, shown, sqlite_path, unusable

log = logging.getLogger("mprun.tracking")


# The experiment's kind, which MLflow 3.17's UI read to open it as model training (a run link's workflowType decides in
# 3.18: MlflowTracker.describe).
KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"


# A database's words for an insert that broke a unique key: PostgreSQL, sqlite, MySQL.
_DUPLICATE_KEY = re.compile(r"duplicate key value|UNIQUE constraint failed|Duplicate entry", re.IGNORECASE)


def lost_a_race(e: Exception) -> bool:
    """Did a write lose to a parallel job's? MLflow gets or creates a row that jobs share (an experiment's dataset,
    or tag) with two statements, a look-up and an insert: a parallel job of the experiment can insert the same row
    in between, and this insert then breaks the unique key (the call is rolled back whole)."""
    return bool(_DUPLICATE_KEY.search(str(e)))


@dataclass(frozen=True)
class RecordedRun:
    """A run as the store has it."""

    run_id: str
    name: str  # "" if unnamed
    status: str  # RUNNING, FINISHED, FAILED, KILLED
    start_time: int  # ms since the epoch
    tags: Mapping[str, str]
    metrics: Mapping[str, float]  # the latest value of each
    deleted: bool = False
    last_logged: int = 0  # ms since the epoch of its newest metric point (0: none yet)
    experiment_id: str = ""
    params: Mapping[str, str] = field(default_factory=dict)


def _recorded(run: Any) -> RecordedRun:
    """An mlflow Run as a RecordedRun."""
    info = run.info
    return RecordedRun(
        info.run_id,
        info.run_name or "",
        info.status,
        info.start_time or 0,
        dict(run.data.tags),
        dict(run.data.metrics),
        info.lifecycle_stage == "deleted",
        # The latest points' own timestamps: RunData keeps the Metric objects, not only their values.
        max((m.timestamp for m in getattr(run.data, "_metric_objs", [])), default=0),
        info.experiment_id,
        dict(run.data.params),
    )


class Store:
    """One MLflow tracking store, by URI: its experiments, runs and artifacts."""

    def __init__(self, uri: str) -> None:
        """Connect to the store at uri (a new sqlite store gets its tables here: see `open` for a first use)."""
        from mlflow import MlflowClient  # mlflow: 1.2 s, when the store is used

        self.uri = uri
        try:
            self._client = MlflowClient(tracking_uri=uri)
        except Exception as e:  # a URI MLflow cannot parse or has no driver for
            raise unusable(uri, str(e)) from e

    @classmethod
    def open(
        cls,
        uri: str,
        experiment: str | None,
        local_artifacts: Path,
        *,
        experiment_id: str | None = None,
        continuing: str | None = None,
    ) -> tuple[Store, str]:
        """Connect for a run, and get or create its experiment by name, or take an existing one by id (with both,
        they must agree): (store, experiment id). A server that does not answer fails in seconds. A new sqlite store
        gets its tables now, in several migrations: parallel first openers take turns, and signals wait until the
        store is whole (a Ctrl-C in between left a store that every later run failed on, "duplicate column name").
        With neither a name nor an id, the experiment is that of the run `continuing` names, if the store has it,
        else `mprun`."""
        cls.probe(uri)
        with store_lock(uri), deferred_signals():
            store = cls(uri)
            if experiment is None and experiment_id is None:
                found = store.run(continuing) if continuing else None
                if found is not None:
                    return store, found.experiment_id
                experiment = "mprun"
            if experiment is None:
                return store, store.existing_experiment(experiment_id)
            found = store.experiment(experiment, local_artifacts)
            if experiment_id is not None and experiment_id != found:
                raise ConfigError(
                    f"MLFLOW_EXPERIMENT_ID={experiment_id} does not match experiment {experiment!r} (id {found}) "
                    "that MLFLOW_EXPERIMENT_NAME names: unset one of them"
                )
            return store, found

    @classmethod
    def existing(cls, uri: str) -> Store:
        """Connect to a store that must exist already, to read what runs left there (the report, close_stale): a
        sqlite file that is not there is an error naming it, not a new empty store; a server or database that
        cannot be used fails in seconds."""
        db = sqlite_path(uri)
        if db is not None and not db.is_file():
            raise ConfigError(f"no MLflow store at {uri}; pass --uri or set MLFLOW_TRACKING_URI")
        cls.probe(uri)
        return cls(uri)

    @staticmethod
    def probe(uri: str) -> None:
        """Fail in seconds, with the reason, on a server or database store that cannot be used."""
        if is_remote(uri):
            # MLflow's client retries a dead server for minutes (measured 4 min 13 s); a few seconds
            # is enough to tell. Explicit environment settings still win.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
            logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # one line per retry otherwise
            probe_server(uri)
        elif is_database(uri):
            probe_database(uri)

    def answers(self) -> bool:
        """After a failed call: does the store still answer? (Only a remote server can go away.)"""
        if not is_remote(self.uri):
            return True
        try:
            probe_server(self.uri)
            return True
        except ConfigError:
            return False

    def experiment(self, name: str, local_artifacts: Path) -> str:
        """The id of the experiment of that name, created if new (a sqlite store's keeps its artifacts in
        local_artifacts); any failure here means the store is unreachable or unusable."""
        from mlflow.exceptions import MlflowException  # mlflow: 1.2 s, when the store is used

        try:
            found = self._client.get_experiment_by_name(name)
            if found is not None:
                if KIND_TAG not in found.tags:  # one made before mprun set it, or by hand: a kind said by nobody
                    try:
                        self._client.set_experiment_tag(found.experiment_id, KIND_TAG, TRAINING_KIND)
                    except MlflowException as e:
                        if not lost_a_race(e):  # else a parallel job set the same tag
                            raise
                return found.experiment_id
            # A local store keeps artifacts beside it, not in ./mlruns of whatever the cwd is.
            location = local_artifacts.as_uri() if self.uri.startswith("sqlite:") else None
            try:
                return self._client.create_experiment(name, artifact_location=location, tags={KIND_TAG: TRAINING_KIND})
            except MlflowException:
                found = self._client.get_experiment_by_name(name)  # created meanwhile by a parallel job
                if found is None:
                    raise
                return found.experiment_id
        except Exception as e:  # every backend raises its own types; all mean "cannot track"
            raise unusable(self.uri, str(e)) from e

    def existing_experiment(self, experiment_id: str) -> str:
        """The id of an active experiment that must exist (MLFLOW_EXPERIMENT_ID's)."""
        from mlflow.exceptions import MlflowException  # mlflow: 1.2 s, when the store is used

        try:
            found = self._client.get_experiment(experiment_id)
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise unusable(self.uri, str(e)) from e
            found = None
        if found is None or found.lifecycle_stage != "active":
            raise ConfigError(
                f"MLFLOW_EXPERIMENT_ID={experiment_id}: no {'such' if found is None else 'active'} experiment in "
                f"{shown(self.uri)}; set MLFLOW_EXPERIMENT_NAME (created when new) or tracking.experiment instead"
            )
        return found.experiment_id

    def experiment_name(self, experiment_id: str) -> str:
        """The name of the experiment with that id."""
        return self._client.get_experiment(experiment_id).name

    def find_experiment(self, name: str) -> str | None:
        """The id of the experiment of that name; None if there is none."""
        found = self._client.get_experiment_by_name(name)
        return None if found is None else found.experiment_id

    def running(self, experiment: str | None = None) -> list[RecordedRun]:
        """Every RUNNING run, in the named experiment or in all of them."""
        if experiment is None:
            ids = [e.experiment_id for e in self._client.search_experiments(max_results=50000)]
        else:
            found = self.find_experiment(experiment)
            ids = [] if found is None else [found]
        runs: list[RecordedRun] = []
        for i in range(0, len(ids), 100):  # MLflow searches at most 100 experiments at a time
            runs += [
                _recorded(r)
                for r in self._client.search_runs(ids[i : i + 100], "attributes.status = 'RUNNING'", max_results=50000)
            ]
        return runs

    def create_run(self, experiment_id: str, name: str | None, tags: Mapping[str, str]) -> str:
        """A new RUNNING run; returns its id."""
        # Unnamed, MLflow draws a name with Python's `random`, which the run has just seeded: every run with the
        # same seed got the same name. The draw gets fresh entropy, and the experiment's random state is kept.
        state = random.getstate()
        random.seed()
        from mlflow.exceptions import MlflowException  # mlflow: 1.2 s, when the store is used

        try:
            tags = {k: str(v)[:5000] for k, v in tags.items()}
            return self._client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
        except MlflowException as e:
            if e.error_code != "PERMISSION_DENIED":
                raise
            user = os.environ.get("MLFLOW_TRACKING_USERNAME")
            raise ConfigError(
                f"user {user!r} is not allowed to write in experiment {experiment_id} of {shown(self.uri)} (HTTP 403: "
                "MLflow's READ permission only): ask for EDIT on it, or choose an experiment of your own "
                "(tracking.experiment=<a new name>)"
            ) from None
        finally:
            random.setstate(state)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Record params (values as text, cut to MLflow's limit)."""
        from mlflow.entities import Param  # mlflow: 1.2 s, when the store is used

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self._client.log_batch(run_id, params=items[i : i + 100])

    def log_datasets(self, run_id: str, datasets: Sequence[DatasetRecord]) -> None:
        """Record the datasets as the run's inputs (MLflow's dataset tracking), one call for all."""
        from mlflow.entities import Dataset, DatasetInput, InputTag  # mlflow: 1.2 s, when the store is used
        from mlflow.exceptions import MlflowException  # mlflow: 1.2 s, when the store is used

        inputs = [
            DatasetInput(
                Dataset(d.name, d.digest, "local", json.dumps({"uri": d.source})),
                tags=[InputTag("mlflow.data.context", d.context)],
            )
            for d in datasets
        ]
        if not inputs:
            return
        for attempt in range(3):
            try:
                self._client.log_inputs(run_id, datasets=inputs)
                return
            except MlflowException as e:
                if attempt == 2 or not lost_a_race(e):  # else the dataset is there now: logging again links it
                    raise

    def create_logged_model(self, experiment_id: str, name: str, run_id: str) -> str:
        """A new MLflow logged model of this run (the UI's Models column), its artifacts to come; returns its id."""
        return self._client.create_logged_model(experiment_id, name=name, source_run_id=run_id).model_id

    def log_metrics(self, run_id: str, batches: list[MetricBatch]) -> None:
        """Record several steps' metrics in one call: one transaction of a sqlite store, one request to a server
        (MLflow's client splits more than 1,000 points into requests of 1,000)."""
        from mlflow.entities import Metric  # mlflow: 1.2 s, when the store is used

        metrics = [Metric(k, v, b.timestamp_ms, b.step) for b in batches for k, v in b.values.items()]
        self._client.log_batch(run_id, metrics=metrics)

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        """Add or overwrite tags (values cut to MLflow's limit)."""
        from mlflow.entities import RunTag  # mlflow: 1.2 s, when the store is used

        self._client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def delete_tag(self, run_id: str, key: str) -> None:
        self._client.delete_tag(run_id, key)

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        """Copy a file, or a directory's contents, into the run's artifacts (under artifact_path)."""
        if Path(path).is_dir():
            self._client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(run_id, str(path), artifact_path)

    def reopen(self, run_id: str) -> None:
        """Mark a closed run RUNNING again, to continue it."""
        self._client.update_run(run_id, status="RUNNING")

    def close_run(self, run_id: str, status: str) -> None:
        """End a run as FINISHED, FAILED or KILLED."""
        self._client.set_terminated(run_id, status)

    def run(self, run_id: str) -> RecordedRun | None:
        """The run with that id; None if the store has none (or it is no run id at all)."""
        from mlflow.exceptions import MlflowException  # mlflow: 1.2 s, when the store is used

        try:
            return _recorded(self._client.get_run(run_id))
        except MlflowException:
            return None

    def children(self, parent_id: str, running_only: bool = False) -> list[RecordedRun]:
        """The runs nested under parent_id (a sweep's jobs), in one search; with running_only, those still RUNNING."""
        experiment_id = self._client.get_run(parent_id).info.experiment_id
        query = f"tags.`mlflow.parentRunId` = '{parent_id}'"
        if running_only:
            query += " and attributes.status = 'RUNNING'"
        return [_recorded(r) for r in self._client.search_runs([experiment_id], query, max_results=10000)]

    def newest_sweep(self, experiment_id: str) -> str | None:
        """The id of the newest sweep parent run (tagged mprun.role=sweep) in the experiment; None if it has none."""
        runs = self._client.search_runs(
            [experiment_id], "tags.`mprun.role` = 'sweep'", order_by=["attributes.start_time DESC"], max_results=1
        )
        return runs[0].info.run_id if runs else None

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """Every recorded (step, value) of one metric."""
        return [(m.step, m.value) for m in self._client.get_metric_history(run_id, key)]


def record_failed_run(uri: str, experiment_id: str, run_name: str, tags: Mapping[str, str]) -> str | None:
    """A FAILED run for a job that failed before its own run existed (bad input in one sweep job), so the
    failure shows up beside its siblings. Returns the run id, or None if the store itself is unusable."""
    try:
        store = Store(uri)
        run_id = store.create_run(experiment_id, run_name, tags)
        store.close_run(run_id, "FAILED")
        return run_id
    except Exception:  # the job's own error is what gets reported; this is best effort
        log.exception("could not record the failed job in %s", uri)
        return None

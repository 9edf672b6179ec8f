"""Experiment tracking behind a small interface: MLflow, or nothing. Only this module imports mlflow.

Four pieces: `Store` is one MLflow tracking store (connect, runs, searches, artifacts), and the only code that talks
to MlflowClient; `metric_writer.BatchedWriter` writes metric batches off the training thread; `Failover` is the
tracking.on_unreachable policy; `MlflowTracker` composes them into the `Tracker` the runner uses.

The store is used with explicit run ids, never MLflow's fluent API and its process-global "active run", so a worker
process that runs several jobs cannot leak a run from one into the next.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shlex
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from mprun.errors import ConfigError, TrackingLost, first_line
from mprun.interrupts import deferred_signals
from mprun.metric_writer import BatchedWriter, MetricBatch
from mprun.schema import Buildable

log = logging.getLogger(__name__)
T = TypeVar("T")

# MLflow's usage telemetry, off unless the user turned it on: its background thread sets and unsets the
# _MLFLOW_TELEMETRY_SESSION_ID environment variable, and when that happens while requests scans the environment for
# proxies (every request to a server), the request fails with KeyError('_MLFLOW_TELEMETRY_SESSION_ID'). Seen as a
# sweep job failing in a 3 x 4 parallel load against an mlflow server (mlflow 3.17.2). Set before mlflow is imported:
# only this module imports it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


# The step of the newest checkpoint a run has written. A resume from an older one (the run was resumed before, or
# a branch from an earlier step) starts a new run instead of logging the steps from there a second time.
CHECKPOINT_STEP_TAG = "mprun.checkpoint_step"


# MLflow's UI (3.x) opens an experiment by its kind: without one it inferred GenAI and showed an empty traces
# overview. The UI reads this experiment tag; custom_model_development is its kind for model training (read from
# the UI bundle of mlflow 3.17.2: the tag key "mlflow.experimentKind", CUSTOM_MODEL_DEVELOPMENT).
KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"


class Unreachable(Enum):
    fail = "fail"  # stop with a clear error (before training; or mid-run, when the server goes away)
    local = "local"  # keep training and log to the local sqlite store instead


class SystemMetrics(Enum):
    auto = "auto"  # on for a GPU run (utilisation and memory are what one asks of it), off on a CPU
    on = "on"
    off = "off"


@dataclass
class MlflowConfig(Buildable):
    _target_: str = "mprun.tracking.MlflowTracker"
    # null: $MLFLOW_TRACKING_URI if set, else sqlite at <output_root>/mlflow.db
    uri: str | None = None
    experiment: str = "mprun"
    run_name: str | None = None
    log_checkpoint: bool = True  # checkpoints can be large: false keeps them only in the run directory
    # The trained model as an MLflow model (the UI's Models column; mlflow.pytorch.load_model("runs:/<id>/model")),
    # with a signature and an input example; register_model=<name> also registers it in the model registry.
    log_model: bool = False
    register_model: str | None = None
    # A store that cannot be reached, at start or mid-run: fail (clear error), or local (keep training,
    # log to sqlite:///<output_root>/mlflow.db, tagging the run with the intended store).
    on_unreachable: Unreachable = Unreachable.fail
    # Metric points are buffered and written together once the oldest has waited this long (and at checkpoints and
    # the end): what a UI shows lags by about this much, and what a kill -9 can lose. 0: a write per log step.
    flush_every_s: float = 5.0
    # MLflow's own system metrics (system/*: CPU, memory, disk, network, and each GPU's utilisation and memory),
    # sampled every system_metrics_every_s on a thread of MLflow's.
    system_metrics: SystemMetrics = SystemMetrics.auto
    system_metrics_every_s: float = 10.0

    def __post_init__(self) -> None:
        if self.flush_every_s < 0:
            raise ConfigError(f"flush_every_s={self.flush_every_s} must be >= 0")
        if not self.system_metrics_every_s > 0:
            raise ConfigError(f"system_metrics_every_s={self.system_metrics_every_s} must be > 0")
        if not (self.experiment or "").strip():  # MLflow's own error for it blamed the store
            raise ConfigError("experiment: must name an MLflow experiment (default: mprun), got an empty name")


@dataclass
class NoTrackingConfig(Buildable):
    _target_: str = "mprun.tracking.NullTracker"


@dataclass(frozen=True)
class DatasetRecord:
    """A dataset a run used, for MLflow's dataset tracking (the UI's Datasets column): one per split it used."""

    name: str
    digest: str
    source: str  # where it was read from: a file or directory, or how it was made
    context: str  # "training" or "evaluation" (MLflow's mlflow.data.context tag)


class Tracker:
    """What the runner needs from a tracker. The base class tracks nothing."""

    run_id: str | None = None
    log_checkpoint: bool = False  # whether checkpoints are uploaded as artifacts
    store: Store | None = None  # where its runs are, for reading them back (a sweep, its report); None: nowhere

    def start(
        self,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        run_name: str | None = None,
        datasets: Sequence[DatasetRecord] = (),
    ) -> None:
        """Open a run and record params, tags and the datasets it uses; run_name names it unless the config names
        it."""

    def resume(self, run_id: str, step: int) -> bool:
        """Reopen an earlier run to continue it (a resumed training); False if this store lacks it."""
        return False

    def log_model(self, model: Any, example: Any) -> None:
        """Record the trained model (a plain nn.Module) as an MLflow model, with a signature and an input example
        (a batch of inputs), as configured."""

    def watch_system(self, gpu: bool, continued: bool) -> None:
        """Record the machine's system metrics while the run lasts, as configured (auto: on a GPU); continued: the run
        was resumed, so their steps go on from its last."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue metrics for one step; written without blocking training."""

    def flush(self) -> None:
        """Write the metrics queued so far and wait for them (before a checkpoint records its step)."""

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
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


def shown(uri: str) -> str:
    """A store URI as it may be printed, logged or recorded: a password in it (postgresql://user:PASSWORD@host/db)
    replaced by ***. Params, tags, logs and messages are read by everyone who can read the store."""
    return re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", uri)


def unusable(uri: str, why: str) -> ConfigError:
    """The error for a tracking store that cannot be used."""
    why = first_line(why, "unknown error")
    return ConfigError(
        f"cannot use MLflow tracking store {shown(uri)}: {why[:300]}. "
        "Fix tracking.uri / MLFLOW_TRACKING_URI, or run with tracking=none"
    )


def is_remote(uri: str) -> bool:
    """A tracking server (as opposed to a database or a directory): the only kind of store that can go away."""
    return uri.startswith(("http://", "https://"))


def is_database(uri: str) -> bool:
    """A database server as the store (MLflow's SQLAlchemy store, without an mlflow server in between)."""
    return uri.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "mysql", "mssql")


def probe_server(uri: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds on a tracking server that does not answer, or whose own store (its database) does not: MLflow's
    client retries with backoff for minutes (measured: 4 min 13 s against a closed port) before giving up. The
    server's /health answers without touching its database (measured: OK while its PostgreSQL was stopped), so a
    request that reads the store follows, with MLflow's request timeout: a stopped database hangs it (the server
    retries its connection for ~100 s), a broken one answers 5xx."""
    import urllib.error
    import urllib.request

    base = uri.rstrip("/")
    try:
        urllib.request.urlopen(f"{base}/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return  # it answered: auth or routing is MLflow's business, checked by the first real request
    except (urllib.error.URLError, OSError) as e:
        raise unusable(uri, f"no answer from the server ({getattr(e, 'reason', e)})") from e
    wait = float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT") or 15)
    behind = "its database may be down or refusing it: see the server's log"
    try:
        urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/search?max_results=1", timeout=wait).close()
    except urllib.error.HTTPError as e:
        if e.code >= 500:  # 4xx: it answered (a login, a proxy's rules), which the first real request reports
            raise unusable(uri, f"the server answers, but reading its store failed (HTTP {e.code}): {behind}") from e
    except (urllib.error.URLError, OSError) as e:
        why = f"the server answers, but a request that reads its store got no answer in {wait:g} s: {behind}"
        raise unusable(uri, why) from e


def probe_database(uri: str, timeout_s: int = 5) -> None:
    """Fail at once on a database store that refuses the connection (a wrong password, a missing database, no
    server): MLflow's SQLAlchemy store retries for ~100 s (10 tries with backoff) before saying why."""
    import sqlalchemy

    args = {"connect_timeout": timeout_s} if uri.startswith(("postgresql", "mysql")) else {}
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=args)
    except ImportError as e:  # the driver: psycopg2 for postgresql://, from the server extra
        raise unusable(uri, f"{e} (its driver: pip install -e '.[server]' for PostgreSQL)") from e
    except Exception as e:  # a URI SQLAlchemy cannot parse
        raise unusable(uri, str(e)) from e
    try:
        engine.connect().close()
    except Exception as e:  # every driver raises its own types; the driver's message says why
        raise unusable(uri, str(getattr(e, "orig", None) or e)) from e
    finally:
        engine.dispose()


def default_uri(output_root: str) -> str:
    """sqlite database in the output root, as an absolute path so it does not depend on the cwd."""
    return f"sqlite:///{Path(output_root).absolute() / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// store; None for any other store."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """A file lock beside a sqlite store for its first use: MLflow creates the tables on first open,
    and parallel first openers race (most of them fail). Other backends need no lock. A store in a directory
    this process cannot write (read-only, another user's) is an error that says so: a run must write to it."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    from filelock import FileLock

    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(f"{db}.lock", timeout=300)
        lock.acquire()
    except OSError as e:
        raise unusable(uri, f"cannot write in {db.parent} ({e.strerror or e})") from e
    try:
        if db.exists() and not os.access(db, os.W_OK):  # sqlite would fail on the run's first write, in a traceback
            raise unusable(uri, f"{db} is read-only")
        yield
    finally:
        lock.release()


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
    )


class Store:
    """One MLflow tracking store, by URI: its experiments, runs and artifacts."""

    def __init__(self, uri: str) -> None:
        """Connect to the store at uri (a new sqlite store gets its tables here: see `open` for a first use)."""
        from mlflow import MlflowClient

        self.uri = uri
        try:
            self._client = MlflowClient(tracking_uri=uri)
        except Exception as e:  # a URI MLflow cannot parse or has no driver for
            raise unusable(uri, str(e)) from e

    @classmethod
    def open(cls, uri: str, experiment: str, local_artifacts: Path) -> tuple[Store, str]:
        """Connect for a run, and get or create its experiment: (store, experiment id). A server that does not
        answer fails in seconds. A new sqlite store gets its tables now, in several migrations: parallel first
        openers take turns, and signals wait until the store is whole (a Ctrl-C in between left a store that every
        later run failed on, "duplicate column name")."""
        cls.probe(uri)
        with store_lock(uri), deferred_signals():
            store = cls(uri)
            return store, store.experiment(experiment, local_artifacts)

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
        from mlflow.exceptions import MlflowException

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
        try:
            tags = {k: str(v)[:5000] for k, v in tags.items()}
            return self._client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
        finally:
            random.setstate(state)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Record params (values as text, cut to MLflow's limit)."""
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self._client.log_batch(run_id, params=items[i : i + 100])

    def log_datasets(self, run_id: str, datasets: Sequence[DatasetRecord]) -> None:
        """Record the datasets as the run's inputs (MLflow's dataset tracking), one call for all."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.exceptions import MlflowException

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
        from mlflow.entities import Metric

        metrics = [Metric(k, v, b.timestamp_ms, b.step) for b in batches for k, v in b.values.items()]
        self._client.log_batch(run_id, metrics=metrics)

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        """Add or overwrite tags (values cut to MLflow's limit)."""
        from mlflow.entities import RunTag

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
        from mlflow.exceptions import MlflowException

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


class Failover:
    """tracking.on_unreachable: what happens when the store cannot be used, at the start or mid-run."""

    def __init__(self, policy: Unreachable, local_uri: str) -> None:
        self.policy = Unreachable(policy)
        self.local_uri = local_uri  # the local sqlite store that `local` moves to
        self.intended: str | None = None  # once on the local store: the store (and run) it was meant for
        self.lost = False  # the store went away and the policy is fail: nothing more is sent

    def open(self, uri: str, connect: Callable[[str], T]) -> T:
        """connect(uri); when that store cannot be used and the policy is local, connect(the local store)."""
        try:
            return connect(uri)
        except ConfigError as e:
            if self.policy is Unreachable.fail or uri == self.local_uri:
                raise
            log.warning("%s\ntracking.on_unreachable=local: logging to %s instead", e, self.local_uri)
            self.intended = shown(uri)
            return connect(self.local_uri)

    def move(self, uri: str, run_id: str | None, error: BaseException) -> str:
        """The store at uri stopped answering while run_id was open: raise TrackingLost (fail, or the run is on the
        local store already), or return the local store's uri to continue in (local)."""
        why = f"{type(error).__name__}: {str(error)[:200]}"
        lost = f"MLflow store {shown(uri)} stopped accepting writes mid-run ({why})"
        if self.policy is Unreachable.fail or self.intended:
            self.lost = True
            raise TrackingLost(
                f"{lost}. Resume from the run's last checkpoint with trainer.resume=<run dir>, "
                "or set tracking.on_unreachable=local to keep training and log locally"
            ) from error
        log.warning("%s\ntracking.on_unreachable=local: continuing in a new run in %s", lost, self.local_uri)
        self.intended = f"{shown(uri)} run {run_id}"
        return self.local_uri


def _pins(*packages: str) -> list[str]:
    """package==version for those of these installed here."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in packages:
        try:
            pins.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return pins


class MlflowTracker(Tracker):
    """MLflow tracking: runs in a Store, metric batches buffered and written in flushes by a BatchedWriter (a write
    that fails is noticed at the next log call or flush), and a store that cannot be reached handled by the Failover
    policy."""

    def __init__(
        self,
        output_root: str,
        uri: str | None,
        experiment: str,
        run_name: str | None,
        log_checkpoint: bool,
        on_unreachable: Unreachable = Unreachable.fail,
        flush_every_s: float = MlflowConfig.flush_every_s,
        system_metrics: SystemMetrics = SystemMetrics.auto,
        system_metrics_every_s: float = MlflowConfig.system_metrics_every_s,
        log_model: bool = False,
        register_model: str | None = None,
    ) -> None:
        # A new store's schema migrations print a dozen INFO lines (alembic) and two of MLflow's own ("Creating
        # initial MLflow database tables..."); a first run's output is mprun's.
        for name in ("alembic", "mlflow.store.db.utils"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.output_root = Path(output_root).absolute()
        self.run_name = run_name
        self.experiment = experiment
        self.log_checkpoint = log_checkpoint
        self.failover = Failover(on_unreachable, default_uri(output_root))
        self._started: tuple | None = None  # (params, tags, name, datasets): to reopen the run in the local store
        self._writer = BatchedWriter(flush_every_s)
        self._dropped: list[str] = []  # metric batches a store that still answered failed to write
        self.system_metrics, self.system_metrics_every_s = system_metrics, system_metrics_every_s
        self._monitor: Any = None  # MLflow's SystemMetricsMonitor, while it samples
        self.model_logged, self.register_model = log_model or register_model is not None, register_model
        self.failover.open(uri or os.environ.get("MLFLOW_TRACKING_URI") or self.failover.local_uri, self._connect)

    def _connect(self, uri: str) -> None:
        self.store, self.experiment_id = Store.open(uri, self.experiment, self.output_root / "mlartifacts")

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
        if self.failover.intended:
            tags = {**tags, "mprun.intended_tracking_uri": self.failover.intended}
        params = {k: shown(v) if isinstance(v, str) else v for k, v in params.items()}  # tracking.uri's password
        self._started = (params, tags, run_name, datasets)
        # tracking.run_name names the study: a sweep's parent and jobs keep what tells them apart after it.
        name = ": ".join(n for n in (self.run_name, run_name) if n) or None
        self.run_id = self.store.create_run(self.experiment_id, name, tags)
        with self.closed_on_error():
            self.store.log_params(self.run_id, params)
            self.store.log_datasets(self.run_id, datasets)

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
        run = self.store.run(run_id)
        if run is None:
            log.warning("the checkpoint's MLflow run %s is not in %s: starting a new run", run_id, shown(self.uri))
            return False
        if run.deleted:  # MLflow refuses to reopen it
            log.warning("the checkpoint's MLflow run %s was deleted in %s: starting a new run", run_id, shown(self.uri))
            return False
        later = int(run.tags.get(CHECKPOINT_STEP_TAG, -1))
        if later > step:  # continuing would log a second history over the steps the run has already recorded
            log.warning(
                "MLflow run %s has gone on past this checkpoint (step %d) to one at step %d, so the resume "
                "branches from it into a new run (tagged mprun.resumed_from_run)",
                run_id,
                step,
                later,
            )
            return False
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
        import copy

        import mlflow
        import mlflow.pytorch
        import torch
        from mlflow.models import Model, infer_signature

        # A CPU copy in eval mode: what is logged loads on a machine without the run's GPU, and predicts.
        plain = copy.deepcopy(model).cpu().eval()
        x = example.detach().cpu()
        with torch.no_grad():
            y = plain(x)
        signature = infer_signature(x.numpy(), y.float().numpy())
        mlflow.set_tracking_uri(self.uri)  # Model.log's own client reads the process's tracking URI

        # MLflow's default format is pt2, torch.export's traced graph, which loads without mprun's code; torch.export
        # cannot trace every model (an LSTM's packed batch), and a failed Model.log leaves a half-made model behind,
        # so a trial export on a copy (a failed one can leave fake tensors on what it traced) decides first.
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.export.export(copy.deepcopy(plain), (x,))
            form: dict[str, Any] = {"pip_requirements": _pins("torch")}
        except Exception as e:  # noqa: BLE001 - torch.export fails in many ways on what it cannot trace
            log.warning(
                "tracking.log_model: torch.export could not trace the model (%s); it is logged as a pickle, which "
                "carries mprun's code and loads where its packages are installed",
                first_line(e, type(e).__name__),
            )
            form = {
                "serialization_format": "pickle",
                "code_paths": [str(Path(__file__).resolve().parent)],
                "pip_requirements": _pins("torch", "numpy", "omegaconf", "timm", "torchvision"),
            }

        def record() -> None:
            # Made here, in the run's experiment: Model.log alone makes it in the process's active one ("Default").
            made = self.store.create_logged_model(self.experiment_id, "model", self.run_id)
            Model.log(
                artifact_path=None,
                name="model",
                flavor=mlflow.pytorch,
                run_id=self.run_id,
                model_id=made,
                registered_model_name=self.register_model,
                pytorch_model=plain,
                signature=signature,
                input_example=x.numpy(),
                **form,  # requirements stated, not inferred: inference loads the model in a fresh Python (seconds)
            )

        self._call(record)

    def watch_system(self, gpu: bool, continued: bool) -> None:
        if self.system_metrics is SystemMetrics.off or (self.system_metrics is SystemMetrics.auto and not gpu):
            return
        try:  # psutil (and nvidia-ml-py for GPUs) are mprun's dependencies; a broken install costs the metrics only
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
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
        run = f"#/experiments/{self.experiment_id}/runs/{self.run_id}"
        lines = [f"MLflow run  {self.run_id} (experiment {self.experiment_id}) in {shown(self.uri)}"]
        if self.uri.startswith("sqlite:") or is_database(self.uri):
            lines.append(f"MLflow UI   {cmd} --port 5000")
            lines.append(f"            then open http://127.0.0.1:5000/{run}")
        else:
            lines.append(f"MLflow UI   {self.uri.rstrip('/')}/{run}")
        return lines

"""The tracking pieces on their own: the store, the batched metric writer, the failover policy, a sweep's close."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

from mprun import sweep
from mprun.cli import CONFIG_DIR, PRIMARY
from mprun.errors import ConfigError, TrackingLost
from mprun.tracking.config import Unreachable
from mprun.tracking.failover import Failover
from mprun.tracking.metric_writer import BatchedWriter, MetricBatch
from mprun.tracking.mlflow_tracker import MlflowTracker
from mprun.tracking.store import Store, record_failed_run
from mprun.tracking.uris import unusable

ROOT = Path(__file__).resolve().parent.parent


def test_only_tracking_imports_mlflow() -> None:
    """Sweeps, the report and the runner use the Tracker and the Store, never MLflow itself."""
    importing = re.compile(r"^\s*(import mlflow|from mlflow[. ])", re.MULTILINE)
    importers = [p for p in sorted((ROOT / "mprun").rglob("*.py")) if importing.search(p.read_text())]
    assert [p.relative_to(ROOT / "mprun").as_posix() for p in importers] == [
        "tracking/logged_model.py",
        "tracking/mlflow_tracker.py",
        "tracking/store.py",
    ]


def test_the_writer_writes_in_order_and_reports_each_failure_once() -> None:
    written, gate = [], threading.Event()

    def write(batches: list[MetricBatch]) -> None:
        gate.wait(10)
        if batches[0].step == 2:
            raise OSError("database is locked")
        written.extend(b.step for b in batches)

    writer = BatchedWriter(interval_s=5.0)
    for step in range(1, 5):
        writer.submit(write, [MetricBatch.now({"loss": step}, step)])
    assert writer.failed() == []  # nothing done yet: the first write waits at the gate
    gate.set()
    (failed,) = writer.failed(wait=True)
    assert written == [1, 3, 4] and [b.step for b in failed[0]] == [2] and str(failed[1]) == "database is locked"
    assert writer.failed(wait=True) == []  # reported once
    writer.close()


def test_the_writer_buffers_steps_until_the_oldest_has_waited_the_interval() -> None:
    """Each log step was its own write (a sqlite transaction, ~9 ms of CPU and the GIL taken from training); the
    steps are written together once the oldest has waited interval_s, or when flushed."""
    now, writes = [0.0], []
    writer = BatchedWriter(interval_s=5.0, clock=lambda: now[0])
    for step in (10, 20, 30):
        now[0] += 1.0
        writer.add(MetricBatch.now({"loss": 1.0}, step))
        assert not writer.due()  # the oldest has waited 0, 1, 2 s
    now[0] += 3.0
    assert writer.due()  # the oldest (step 10) has waited 5 s
    writer.flush(lambda batches: writes.append([b.step for b in batches]))
    assert writer.failed(wait=True) == [] and writes == [[10, 20, 30]] and not writer.due()
    writer.add(MetricBatch.now({"loss": 1.0}, 40))
    assert not writer.due()  # the window starts at the oldest buffered step, not at the last flush
    writer.flush(lambda batches: writes.append([b.step for b in batches]))
    writer.flush(lambda batches: writes.append("an empty flush writes nothing"))
    assert writer.failed(wait=True) == [] and writes == [[10, 20, 30], [40]]
    writer.close()


def test_the_writer_hands_back_what_a_lost_store_never_confirmed() -> None:
    gate = threading.Event()
    writer = BatchedWriter(interval_s=5.0)
    for step in range(3):
        writer.submit(lambda batches: gate.wait(10), [MetricBatch.now({"loss": 1.0}, step)])
    writer.add(MetricBatch.now({"loss": 1.0}, 3))
    unsent = writer.unsent()  # the first is in flight, the others are cancelled, the last is still buffered
    gate.set()
    assert [b.step for b in unsent] == [0, 1, 2, 3] and writer.failed(wait=True) == []
    writer.flush(lambda batches: pytest.fail("the buffer was handed back"))
    writer.close()


def metric_writes(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The steps of each MLflow log_batch call that carries metrics, from now on."""
    calls: list[list[int]] = []
    real = MlflowClient.log_batch

    def counted(self, run_id, metrics=(), *args, **kwargs):
        if metrics:
            calls.append(sorted({m.step for m in metrics}))
        return real(self, run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", counted)
    return calls


def test_a_run_writes_its_metrics_in_few_flushes_and_loses_none(tmp_path: Path, monkeypatch) -> None:
    """The default run logged 23 steps in 23 writes; they are buffered, written at a flush (a checkpoint) and at the
    end, every step and name kept."""
    tracker = MlflowTracker(str(tmp_path), None, "mprun", None, False)
    tracker.start({}, {})
    writes = metric_writes(monkeypatch)
    for step in range(10, 240, 10):
        tracker.log_metrics({"train/loss": 1.0 / step, "train/lr": 0.1}, step)
        if step == 120:
            tracker.flush()  # a checkpoint: the store has every step so far
            assert writes == [list(range(10, 130, 10))]
            assert len(tracker.store.metric_history(tracker.run_id, "train/loss")) == 12
    tracker.end("FINISHED")
    assert writes == [list(range(10, 130, 10)), list(range(130, 240, 10))]
    history = tracker.store.metric_history(tracker.run_id, "train/loss")
    assert history == [(s, pytest.approx(1.0 / s)) for s in range(10, 240, 10)]
    assert len(tracker.store.metric_history(tracker.run_id, "train/lr")) == 23


def test_flush_every_s_zero_writes_each_step_at_once(tmp_path: Path, monkeypatch) -> None:
    tracker = MlflowTracker(str(tmp_path), None, "mprun", None, False, flush_every_s=0)
    tracker.start({}, {})
    writes = metric_writes(monkeypatch)
    for step in (1, 2, 3):
        tracker.log_metrics({"train/loss": 1.0}, step)
    tracker.end("FINISHED")
    assert writes == [[1], [2], [3]]


def test_a_failed_flush_is_written_again_step_by_step_losing_only_the_step_that_fails(
    tmp_path: Path, monkeypatch
) -> None:
    """A store that still answers refused a flush because of one step ('database is locked' hit it, or a value it
    rejects): the other steps of that flush are written, and only that step is reported lost."""
    tracker = MlflowTracker(str(tmp_path), None, "mprun", None, False)
    tracker.start({}, {})
    real = MlflowClient.log_batch

    def refuses_step_2(self, run_id, metrics=(), *args, **kwargs):
        if any(m.step == 2 for m in metrics):
            raise OSError("database is locked")
        return real(self, run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", refuses_step_2)
    for step in (1, 2, 3):
        tracker.log_metrics({"train/loss": float(step)}, step)
    tracker.end("FINISHED")
    run = tracker.store.run(tracker.run_id)
    assert tracker.store.metric_history(tracker.run_id, "train/loss") == [(1, 1.0), (3, 3.0)]
    assert run.status == "FINISHED" and run.tags["mprun.metrics_not_recorded"].startswith("1 batch(es), first step 2")


def test_flush_every_s_must_not_be_negative(make_cfg) -> None:
    from mprun import config

    with pytest.raises(ConfigError, match="flush_every_s=-1.0 must be >= 0"):
        config.validate(make_cfg("tracking.flush_every_s=-1", tracking="mlflow"))


def test_failover_at_the_start(tmp_path: Path) -> None:
    def connect(uri: str) -> str:
        if uri == "http://gone":
            raise unusable(uri, "no answer from the server")
        if uri == "http://wrong-experiment":  # a mistake about what is in a store that works: no fallback
            raise ConfigError("MLFLOW_EXPERIMENT_ID=987: no such experiment in http://wrong-experiment")
        return uri

    with pytest.raises(ConfigError):
        Failover(Unreachable.fail, "sqlite:///local.db").open("http://gone", connect)
    local = Failover(Unreachable.local, "sqlite:///local.db")
    assert local.open("http://gone", connect) == "sqlite:///local.db" and local.intended == "http://gone"
    assert Failover(Unreachable.local, "sqlite:///local.db").open("http://up", connect) == "http://up"
    with pytest.raises(ConfigError, match="no such experiment"):
        Failover(Unreachable.local, "sqlite:///local.db").open("http://wrong-experiment", connect)


def test_failover_mid_run() -> None:
    error = OSError("connection refused")
    failing = Failover(Unreachable.fail, "sqlite:///local.db")
    with pytest.raises(TrackingLost, match="tracking.on_unreachable=local"):
        failing.move("http://gone", "r1", error)
    assert failing.lost
    local = Failover(Unreachable.local, "sqlite:///local.db")
    assert local.move("http://gone", "r1", error) == "sqlite:///local.db" and not local.lost
    assert local.intended == "http://gone run r1"
    with pytest.raises(TrackingLost):  # the local store is the last resort
        local.move("sqlite:///local.db", "r2", error)


def test_a_store_lost_mid_run_keeps_what_it_never_confirmed_and_the_resume_sends_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """on_unreachable=fail: the metric points a store that stopped answering never confirmed go to
    <output_root>/mlflow_unsent/<run id>.json, and a resume from a checkpoint sends those up to its step first (the
    training logs the later ones again). test_postgres.py's SIGKILLed server gets here only when the kill lands while
    points are pending, not when a flush has just gone through."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = MlflowTracker(str(tmp_path), uri, "mprun", None, False, flush_every_s=3600)
    tracker.start({}, {})
    tracker.log_metrics({"train/loss": 1.0}, 1)
    tracker.flush()  # step 1 is confirmed; 2-4 wait in the buffer when the store goes away
    for step in (2, 3, 4):
        tracker.log_metrics({"train/loss": float(step)}, step)

    def refused(*args, **kwargs):
        raise OSError("connection refused")

    monkeypatch.setattr(MlflowClient, "log_batch", refused)
    monkeypatch.setattr(Store, "answers", lambda self: False)  # a server gone, as Store.answers would find it
    with pytest.raises(TrackingLost, match="stopped accepting writes mid-run"):
        tracker.flush()
    kept = tmp_path / "mlflow_unsent" / f"{tracker.run_id}.json"
    assert [batch["step"] for batch in json.loads(kept.read_text())] == [2, 3, 4]
    assert f"3 metric points the store never confirmed are kept in {kept}" in caplog.text
    monkeypatch.undo()  # the store is back

    resumed = MlflowTracker(str(tmp_path), uri, "mprun", None, False)
    assert resumed.resume(tracker.run_id, 3)  # a checkpoint at step 3
    resumed.end("FINISHED")
    assert sorted(resumed.store.metric_history(tracker.run_id, "train/loss")) == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert not kept.exists()


def test_a_new_store_is_made_without_migration_chatter(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A first run's output is mprun's: the new store's schema migrations log a dozen INFO lines (alembic) and two of
    MLflow's own ("Creating initial MLflow database tables...")."""
    caplog.set_level(logging.INFO)
    handler = caplog.handler
    mlflow_logger = logging.getLogger("mlflow")  # MLflow's loggers do not propagate to the root: listen on its own
    mlflow_logger.addHandler(handler)
    try:
        MlflowTracker(str(tmp_path), None, "mprun", None, False)
    finally:
        mlflow_logger.removeHandler(handler)
    assert (tmp_path / "mlflow.db").is_file()
    assert not [r.getMessage() for r in caplog.records if r.name.startswith(("alembic", "mlflow.store"))]


def test_the_store_answers_what_sweeps_and_the_report_ask(tmp_path: Path) -> None:
    store, experiment = Store.open(f"sqlite:///{tmp_path}/mlflow.db", "study", tmp_path / "mlartifacts")
    assert Store.open(store.uri, "study", tmp_path / "mlartifacts")[1] == experiment
    assert store.find_experiment("study") == experiment and store.find_experiment("nothing") is None
    assert store.newest_sweep(experiment) is None
    parent = store.create_run(experiment, "sweep", {"mprun.role": "sweep"})
    done = store.create_run(experiment, "job 0", {"mlflow.parentRunId": parent, "mprun.sweep_job": "0"})
    running = store.create_run(experiment, "job 1", {"mlflow.parentRunId": parent, "mprun.sweep_job": "1"})
    store.log_metrics(done, [MetricBatch(3, {"train/loss": 0.5}, 1000), MetricBatch(1, {"train/loss": 0.9}, 1000)])
    store.close_run(done, "FINISHED")
    failed = record_failed_run(store.uri, experiment, "job 2", {"mlflow.parentRunId": parent, "error": "x" * 9000})
    assert store.newest_sweep(experiment) == parent
    children = {r.run_id: r for r in store.children(parent)}
    assert set(children) == {done, running, failed}
    assert children[done].status == "FINISHED" and children[done].metrics == {"train/loss": 0.5}
    assert children[failed].status == "FAILED" and len(children[failed].tags["error"]) == 5000
    assert [r.run_id for r in store.children(parent, running_only=True)] == [running]
    assert sorted(store.metric_history(done, "train/loss")) == [(1, 0.9), (3, 0.5)]
    assert store.run(done).name == "job 0" and store.run("no-such-run") is None
    (tmp_path / "report.md").write_text("# report")
    store.log_artifact(parent, tmp_path / "report.md", "report")
    assert [a.path for a in MlflowClient(store.uri).list_artifacts(parent, "report")] == ["report/report.md"]


def test_closing_a_sweep_searches_its_runs_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sweep.close searched the store for the sweep's runs twice: once to see whether any job was recorded, then
    again to build the report."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            PRIMARY,
            overrides=[f"paths.root_dir={tmp_path}", f"hydra.sweep.dir={tmp_path}/sweep", "precision=fp32"],
            return_hydra_config=True,
        )
    parent = sweep.Sweep(cfg)
    for num, precision in enumerate(("fp32", "bf16")):
        job = MlflowTracker(cfg.paths.output_root, None, "mprun", None, False)
        job.start(
            {},
            {
                "mlflow.parentRunId": parent.tracker.run_id,
                "mprun.sweep_job": str(num),
                "mprun.overrides": f"precision={precision}",
                "precision": precision,
            },
            f"precision={precision}",
        )
        job.log_metrics({"train/loss": 1.0, "final/val_acc": 0.5, "final/train_loss": 1.0}, 1)
        job.end("FINISHED")
    searches = []
    real = MlflowClient.search_runs
    monkeypatch.setattr(MlflowClient, "search_runs", lambda self, *a, **k: searches.append(a) or real(self, *a, **k))
    assert parent.close(interrupted=False) == 0
    assert len(searches) == 1, searches
    assert (tmp_path / "sweep" / "report" / "report.md").read_text().count("| ok |") == 2


def test_an_experiment_made_without_a_kind_is_marked_as_model_training(tmp_path: Path) -> None:
    """An experiment created before (or outside) mprun has no mlflow.experimentKind; MLflow 3's UI then guesses, and
    guessed GenAI. A kind someone set is left alone."""
    from mlflow import MlflowClient

    from mprun.tracking.store import Store

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    plain = client.create_experiment("plain")
    chosen = client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    for name in ("plain", "chosen"):
        Store.open(uri, name, tmp_path / "artifacts")
    assert client.get_experiment(plain).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"


def test_a_run_records_its_dataset_for_the_ui_datasets_column(make_cfg, tmp_path: Path, mlflow_client) -> None:
    """MLflow's dataset tracking: the training and evaluation splits, named, with a digest that the same data keeps
    (a batch size does not change it, a split does) and the source it was read from."""
    from mprun.experiment import run

    def inputs(*overrides: str) -> list[tuple[str, str, str, str]]:
        summary = run(make_cfg("trainer.max_epochs=1", "trainer.max_steps=2", *overrides, tracking="mlflow"))
        found = mlflow_client.get_run(summary["mlflow_run_id"]).inputs
        context = "mlflow.data.context"
        return [
            (d.dataset.name, d.dataset.digest, d.dataset.source, {t.key: t.value for t in d.tags}[context])
            for d in found.dataset_inputs
        ]

    first = inputs()
    assert sorted(c for *_, c in first) == ["evaluation", "training"]
    assert {(n, s) for n, _, s, _ in first} == {("digits", '{"uri": "mprun.data.images.digits"}')}
    digests = {d for _, d, _, _ in first}
    assert len(digests) == 2  # one per split: MLflow keeps one input per name and digest
    assert {d for _, d, _, _ in inputs("dataset.batch_size=32")} == digests
    assert not {d for _, d, _, _ in inputs("dataset.val_fraction=0.3")} & digests


@contextlib.contextmanager
def another_job_writes_first(write: Callable[[], object]) -> Iterator[None]:
    """`write` (a parallel job's) runs just before this process's next database write: between MLflow's look-up of
    a shared row and its insert, where a race between jobs puts it."""
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    pending = [write]

    def first(*_: object) -> None:
        if pending:
            pending.pop()()

    event.listen(Session, "before_flush", first)
    try:
        yield
    finally:
        event.remove(Session, "before_flush", first)
    assert not pending, "the other job's write did not come between"


def parallel_jobs_share_a_new_dataset_and_an_experiment_tag(uri: str, tmp_path: Path) -> None:
    """MLflow gets or creates the rows jobs share (an experiment's dataset, its kind tag) with a look-up and then an
    insert: a parallel job inserting the same row in between broke the insert's unique key, and the job failed
    (seen on PostgreSQL, 3 sweeps at once). Here the other job's insert comes exactly there, every time."""
    from mprun.tracking.base import DatasetRecord

    store, experiment = Store.open(uri, "dataset-race", tmp_path / "mlartifacts")
    first, second = (store.create_run(experiment, f"job {i}", {}) for i in range(2))
    data = [DatasetRecord("digits", "d1g35t", "mprun.data.images.digits", "training")]
    with another_job_writes_first(lambda: store.log_datasets(first, data)):
        store.log_datasets(second, data)
    client = MlflowClient(uri)
    inputs = [client.get_run(r).inputs.dataset_inputs for r in (first, second)]
    assert [[i.dataset.digest for i in run] for run in inputs] == [["d1g35t"], ["d1g35t"]]

    made = client.create_experiment("made-elsewhere")  # no kind tag: the first job to open it sets one
    with another_job_writes_first(lambda: Store(uri).experiment("made-elsewhere", tmp_path)):
        assert Store(uri).experiment("made-elsewhere", tmp_path) == made
    assert client.get_experiment(made).tags["mlflow.experimentKind"] == "custom_model_development"


def test_parallel_jobs_share_a_new_dataset_and_an_experiment_tag(tmp_path: Path) -> None:
    parallel_jobs_share_a_new_dataset_and_an_experiment_tag(f"sqlite:///{tmp_path}/mlflow.db", tmp_path)  # and PG


def test_system_metrics_are_recorded_when_on_and_by_default_only_on_a_gpu(
    make_cfg, tmp_path: Path, mlflow_client
) -> None:
    """MLflow's own system metrics (tracking.system_metrics): auto leaves a CPU run without them; on samples the
    machine every system_metrics_every_s and writes what it sampled before the run closes."""
    from mprun.experiment import run

    def recorded(*overrides: str) -> set[str]:
        summary = run(make_cfg("trainer.max_epochs=4", *overrides, tracking="mlflow"))
        metrics = mlflow_client.get_run(summary["mlflow_run_id"]).data
        return {k for k in metrics.metrics if k.startswith("system/")}

    assert not recorded()  # auto, on a CPU
    on = recorded("tracking.system_metrics=on", "tracking.system_metrics_every_s=0.1")
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= on, on


def test_system_metrics_every_s_must_be_positive(make_cfg) -> None:
    from mprun.config import validate

    with pytest.raises(ConfigError, match=r"system_metrics_every_s=0.0 must be > 0"):
        validate(make_cfg("tracking=mlflow", "tracking.system_metrics_every_s=0"))


def test_the_trained_model_is_an_mlflow_model_that_loads_runs_and_registers(make_cfg, tmp_path: Path) -> None:
    """tracking.log_model: the trained weights as an MLflow pytorch model with a signature and an input example,
    loaded back with mlflow.pytorch.load_model; register_model also puts it in the registry. Off by default."""
    import mlflow
    import mlflow.pytorch
    import torch

    from mprun import checkpoint
    from mprun.experiment import run
    from mprun.models.vision import SimpleCNN

    uri = f"sqlite:///{tmp_path}/outputs/mlflow.db"
    plain = run(make_cfg("trainer.max_epochs=1", "trainer.max_steps=2", tracking="mlflow"))
    summary = run(
        make_cfg(
            "trainer.max_epochs=1",
            "trainer.max_steps=2",
            "tracking.register_model=digits-cnn",
            f"paths.run_dir={tmp_path}/logged",
            tracking="mlflow",
        )
    )
    try:
        mlflow.set_tracking_uri(uri)
        experiment = MlflowClient(uri).get_run(summary["mlflow_run_id"]).info.experiment_id
        every = [e.experiment_id for e in MlflowClient(uri).search_experiments()]  # "Default" too: it went there
        models = mlflow.search_logged_models(experiment_ids=every, output_format="list")
        assert [(m.name, m.source_run_id, m.experiment_id) for m in models] == [
            ("model", summary["mlflow_run_id"], experiment)
        ]
        assert plain["mlflow_run_id"] != summary["mlflow_run_id"]  # the default run logged none
        # MLflow's default format, pt2 (torch.export): a traced graph that loads without mprun's classes.
        loaded = mlflow.pytorch.load_model(models[0].model_uri)
        trained = SimpleCNN(in_chans=1, image_size=(8, 8), num_classes=10).eval()
        trained.load_state_dict(checkpoint.load(tmp_path / "logged" / "checkpoints" / "final.pt")["model"])
        x = torch.randn(3, 1, 8, 8)
        torch.testing.assert_close(loaded(x), trained(x))  # the trained weights, in eval mode, any batch size
        info = mlflow.models.get_model_info(models[0].model_uri)
        assert tuple(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 1, 8, 8)
        (version,) = MlflowClient(uri).search_model_versions("name='digits-cnn'")
        assert version.run_id == summary["mlflow_run_id"]
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.parametrize("why", ["directory", "file"])
def test_a_store_this_process_cannot_write_is_one_line_before_anything_runs(tmp_path: Path, monkeypatch, why) -> None:
    """A read-only sqlite store gave 48 lines from filelock (its directory read-only) or from SQLAlchemy at the
    run's first insert (the file read-only). This suite runs as root, which the permission bits do not stop, so
    the refusals are the operating system's as a non-root user meets them (both seen so, as the postgres user)."""
    import os

    import filelock
    from helpers import run_cli_here

    store = tmp_path / "shared" / "mlflow.db"
    Store(f"sqlite:///{store}")  # a store with its tables, as a team's would be
    if why == "directory":

        def refused(self, *args, **kwargs):
            raise PermissionError(13, "Permission denied", f"{store}.lock")

        monkeypatch.setattr(filelock.FileLock, "acquire", refused)
        said = f"cannot write in {store.parent} (Permission denied)"
    else:
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == store else real(p, mode))
        said = f"{store} is read-only"
    ended = run_cli_here(f"tracking.uri=sqlite:///{store}", "trainer.max_epochs=1", cwd=tmp_path)
    assert ended.returncode == 2 and "Traceback" not in ended.stderr, ended.stderr[-2000:]
    (line,) = [x for x in ended.stderr.splitlines() if x.startswith("mprun: error:")]
    assert said in line and "or run with tracking=none" in line
    assert not list((tmp_path / "outputs").glob("20*"))  # no run directory

"""The tracking pieces on their own: the store, the batched metric writer, the failover policy, a sweep's close."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

from mprun import sweep
from mprun.cli import CONFIG_DIR
from mprun.errors import ConfigError
from mprun.metric_writer import BatchedWriter, MetricBatch
from mprun.tracking import Failover, MlflowTracker, Store, TrackingLost, Unreachable, record_failed_run

ROOT = Path(__file__).resolve().parent.parent


def test_only_tracking_imports_mlflow() -> None:
    """Sweeps, the report and the runner use the Tracker and the Store, never MLflow itself."""
    importing = re.compile(r"^\s*(import mlflow|from mlflow[. ])", re.MULTILINE)
    assert [p.name for p in sorted((ROOT / "mprun").glob("*.py")) if importing.search(p.read_text())] == ["tracking.py"]


def test_the_writer_writes_in_order_and_reports_each_failure_once() -> None:
    written, gate = [], threading.Event()

    def write(batch: MetricBatch) -> None:
        gate.wait(10)
        if batch.step == 2:
            raise OSError("database is locked")
        written.append(batch.step)

    writer = BatchedWriter()
    for step in range(1, 5):
        writer.submit(write, MetricBatch.now({"loss": step}, step))
    assert writer.failed() == []  # nothing done yet: the first write waits at the gate
    gate.set()
    (failed,) = writer.failed(wait=True)
    assert written == [1, 3, 4] and failed[0].step == 2 and str(failed[1]) == "database is locked"
    assert writer.failed(wait=True) == []  # reported once
    writer.close()


def test_the_writer_hands_back_what_a_lost_store_never_confirmed() -> None:
    gate = threading.Event()
    writer = BatchedWriter()
    for step in range(3):
        writer.submit(lambda batch: gate.wait(10), MetricBatch.now({"loss": 1.0}, step))
    unsent = writer.unsent()  # the first is in flight, the others are cancelled
    gate.set()
    assert [b.step for b in unsent] == [0, 1, 2] and writer.failed(wait=True) == []
    writer.close()


def test_failover_at_the_start(tmp_path: Path) -> None:
    def connect(uri: str) -> str:
        if uri == "http://gone":
            raise ConfigError("cannot use MLflow tracking store http://gone")
        return uri

    with pytest.raises(ConfigError):
        Failover(Unreachable.fail, "sqlite:///local.db").open("http://gone", connect)
    local = Failover(Unreachable.local, "sqlite:///local.db")
    assert local.open("http://gone", connect) == "sqlite:///local.db" and local.intended == "http://gone"
    assert Failover(Unreachable.local, "sqlite:///local.db").open("http://up", connect) == "http://up"


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


def test_the_store_answers_what_sweeps_and_the_report_ask(tmp_path: Path) -> None:
    store, experiment = Store.open(f"sqlite:///{tmp_path}/mlflow.db", "study", tmp_path / "mlartifacts")
    assert Store.open(store.uri, "study", tmp_path / "mlartifacts")[1] == experiment
    assert store.find_experiment("study") == experiment and store.find_experiment("nothing") is None
    assert store.newest_sweep(experiment) is None
    parent = store.create_run(experiment, "sweep", {"mprun.role": "sweep"})
    done = store.create_run(experiment, "job 0", {"mlflow.parentRunId": parent, "mprun.sweep_job": "0"})
    running = store.create_run(experiment, "job 1", {"mlflow.parentRunId": parent, "mprun.sweep_job": "1"})
    store.log_metrics(done, MetricBatch(3, {"train/loss": 0.5}, 1000))
    store.log_metrics(done, MetricBatch(1, {"train/loss": 0.9}, 1000))
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
        cfg = compose("config", overrides=[f"paths.root_dir={tmp_path}", f"hydra.sweep.dir={tmp_path}/sweep",
                                           "precision=fp32"], return_hydra_config=True)
    parent = sweep.Sweep(cfg)
    for num, precision in enumerate(("fp32", "bf16")):
        job = MlflowTracker(cfg.paths.output_root, None, "mprun", None, False)
        job.start({}, {"mlflow.parentRunId": parent.tracker.run_id, "mprun.sweep_job": str(num),
                       "mprun.overrides": f"precision={precision}", "precision": precision}, f"precision={precision}")
        job.log_metrics({"train/loss": 1.0, "final/val_acc": 0.5, "final/train_loss": 1.0}, 1)
        job.end("FINISHED")
    searches = []
    real = MlflowClient.search_runs
    monkeypatch.setattr(MlflowClient, "search_runs", lambda self, *a, **k: searches.append(a) or real(self, *a, **k))
    assert parent.close(interrupted=False) == 0
    assert len(searches) == 1, searches
    assert (tmp_path / "sweep" / "report" / "report.md").read_text().count("| ok |") == 2

"""Against a real `mlflow server` on 127.0.0.1 (a random free port), started and stopped here; and a dead one. A server
that dies mid-run, on the team set-up (PostgreSQL behind it), is in test_postgres.py."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from helpers import run_cli_here
from mlflow import MlflowClient

MLFLOW = [sys.executable, "-m", "mlflow"]  # not bin/mlflow: a --target install (the GPU machine's) has no scripts
# Two trainings share the CI machine's 2 cores in one test: one thread each, or they slow each other ~25x.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(uri: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    """Until the mlflow server at uri answers /health; the test fails with its log if it ends or takes too long."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                pytest.fail(f"mlflow server did not start: {log.read_text()[-3000:]}")
            time.sleep(0.3)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen]]:
    root = tmp_path_factory.mktemp("server")
    port = free_port()
    proc = subprocess.Popen(
        [
            *MLFLOW,
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root}/server.db",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        cwd=root,
        stdout=open(root / "server.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    wait_until_up(uri, proc, root / "server.log")
    yield uri, proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_runs_metrics_and_artifacts_arrive(server: tuple[str, subprocess.Popen], tmp_path: Path) -> None:
    uri, _ = server
    proc = run_cli_here(f"tracking.uri={uri}", "model=simple_mlp", "trainer.max_epochs=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 2
    assert {"train/loss", "final/val_acc"} <= set(run.data.metrics)
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config_resolved.yaml", "summary.json", "checkpoints", "hydra"} <= top
    assert not (tmp_path / "outputs" / "mlflow.db").exists()  # nothing fell back to the local store


def _dom(browser: str, url: str, profile: Path) -> str:
    """The page at url as headless Chromium renders it (a fresh profile: MLflow keeps the last view in localStorage)."""
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
         "--virtual-time-budget=20000", "--dump-dom", url],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow
def test_the_printed_ui_link_opens_the_model_training_view_in_a_browser(
    server: tuple[str, subprocess.Popen], tmp_path: Path
) -> None:
    """MLflow 3.18's UI shows an experiment's runs as GenAI evaluations unless told otherwise: the link mprun prints
    opens the Model training view (the run page under Runs), where the same page without its parameter does not."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        why = "no headless browser: apt-get install chromium"
        if os.environ.get("MPRUN_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{why} (MPRUN_REQUIRE_BROWSER=1)")
        pytest.skip(why)
    uri, _ = server
    proc = run_cli_here(f"tracking.uri={uri}", "model=simple_mlp", "trainer.max_steps=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    link = next(line.split("MLflow UI", 1)[1].strip() for line in proc.stdout.splitlines() if "MLflow UI" in line)
    assert link.startswith(f"{uri}/#/experiments/") and link.endswith("?workflowType=machine_learning")
    shown = _dom(browser, link, tmp_path / "profile")
    assert ">Runs<" in shown and ">Evaluations<" not in shown, shown[-3000:]
    bare = _dom(browser, link.split("?")[0], tmp_path / "profile-bare")
    assert ">Evaluations<" in bare  # what the parameter is for: without it, the GenAI view


def test_unreachable_at_start_with_local_option_trains_and_logs_locally(tmp_path: Path, mlflow_client) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    proc = run_cli_here(
        f"tracking.uri={dead}",
        "tracking.on_unreachable=local",
        "model=simple_mlp",
        "trainer.max_steps=3",
        "trainer.max_epochs=1",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tracking.on_unreachable=local: logging to sqlite" in proc.stdout + proc.stderr
    client = mlflow_client
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED" and run.data.tags["mprun.intended_tracking_uri"] == dead

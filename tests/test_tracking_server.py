"""Against a real `mlflow server` on 127.0.0.1 (a random free port), started and stopped here; and a dead one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from conftest import run_cli_here
from mlflow import MlflowClient

MLFLOW = [sys.executable, "-m", "mlflow"]  # not bin/mlflow: a --target install (the GPU machine's) has no scripts
# Two trainings share the CI machine's 2 cores in one test: one thread each, or they slow each other ~25x.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
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
    assert {"train/loss", "amp/loss_scale", "final/val_acc"} <= set(run.data.metrics)
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config_resolved.yaml", "summary.json", "checkpoints", "hydra"} <= top
    assert not (tmp_path / "outputs" / "mlflow.db").exists()  # nothing fell back to the local store


@pytest.mark.slow
def test_a_server_that_dies_mid_run_stops_or_falls_back_per_option(
    server: tuple[str, subprocess.Popen], tmp_path: Path
) -> None:
    uri, server_proc = server
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | ONE_THREAD
    args = [
        sys.executable,
        "-m",
        "mprun",
        f"tracking.uri={uri}",
        "model=simple_mlp",
        "trainer.max_epochs=30",
        "trainer.progress=log",
        "trainer.log_every_steps=2",
    ]
    runs = {
        policy: subprocess.Popen(
            [*args, f"tracking.on_unreachable={policy}"],
            cwd=tmp_path / policy,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for policy in ("fail", "local")
        if (tmp_path / policy).mkdir() is None
    }
    try:
        for proc in runs.values():
            for line in proc.stdout:
                if "epoch 1/" in line:
                    break
        os.killpg(server_proc.pid, signal.SIGKILL)  # the server dies while both are training
        server_proc.wait(timeout=30)
        outputs = {policy: proc.communicate(timeout=300)[0] for policy, proc in runs.items()}
    finally:
        for proc in runs.values():
            proc.kill()
    failed = outputs["fail"]
    assert runs["fail"].returncode == 1, failed[-3000:]
    assert "mprun: error: MLflow store " + uri in failed and "stopped accepting writes mid-run" in failed
    assert "tracking.on_unreachable=local" in failed and "Traceback" not in failed
    assert list((tmp_path / "fail" / "outputs").glob("*/*/checkpoints/step-*.pt")), (
        "the last epoch checkpoint is there to resume from"
    )

    assert runs["local"].returncode == 0, outputs["local"][-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/local/outputs/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    assert run.data.tags["mprun.intended_tracking_uri"].startswith(uri + " run ")
    assert len(client.get_metric_history(run.info.run_id, "val/acc")) >= 1
    assert "final/val_acc" in run.data.metrics


def test_unreachable_at_start_with_local_option_trains_and_logs_locally(tmp_path: Path) -> None:
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
    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED" and run.data.tags["mprun.intended_tracking_uri"] == dead

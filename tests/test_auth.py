"""Against a throwaway `mlflow server --app-name basic-auth` on 127.0.0.1 (the [server] extra installs what its auth
app needs), shared by the module: what a user sees without credentials, with a wrong password, with the right ones,
with READ permission only, and with credentials in the URI."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
from helpers import run_cli_here
from mlflow import MlflowClient
from test_tracking_server import MLFLOW, free_port, wait_until_up

ADMIN, ADMIN_PASSWORD = "admin", "admin-password-for-tests"
READER, READER_PASSWORD = "reader", "reader-password-for-tests"
SHORT = ("model=simple_mlp", "trainer.max_epochs=1", "trainer.max_steps=2", "trainer.progress=off")


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The server, its admin (MLFLOW_AUTH_ADMIN_PASSWORD), and a user with MLflow's default READ permission only."""
    root = tmp_path_factory.mktemp("auth")
    (root / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{root}/users.db\nadmin_username = {ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = os.environ | {
        "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"),
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "a-key-for-this-test-only",
    }
    port = free_port()
    proc = subprocess.Popen(
        [*MLFLOW, "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/store.db", "--artifacts-destination", str(root / "artifacts")],
        cwd=root, env=env, stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    wait_until_up(uri, proc, root / "server.log")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
        mp.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
        from mlflow.server.auth.client import AuthServiceClient

        AuthServiceClient(uri).create_user(READER, READER_PASSWORD)
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def _runs(uri: str, monkeypatch: pytest.MonkeyPatch) -> list:
    with monkeypatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
        mp.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
        client = MlflowClient(uri)
        return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def _one_line(proc, *said: str) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("mprun: error: ") and all(s in line for s in said), line
    return line


@pytest.mark.slow
@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({}, "wants a user name and password (HTTP 401): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
        ({"MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": "not-it"}, f"refused user '{ADMIN}'"),
    ],
    ids=["no-credentials", "wrong-password"],
)
def test_without_the_right_credentials_one_line_names_the_variables(
    auth_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict, said: str
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    before = len(_runs(auth_server, monkeypatch))
    proc = run_cli_here(f"tracking.uri={auth_server}", *SHORT, cwd=tmp_path, env=env)
    _one_line(proc, said, "MLFLOW_TRACKING_PASSWORD")
    assert "not-it" not in proc.stdout + proc.stderr
    assert len(_runs(auth_server, monkeypatch)) == before  # no run
    assert not list((tmp_path / "outputs").glob("20*"))  # no run directory


@pytest.mark.slow
def test_with_the_right_credentials_a_run_and_a_sweep_finish(
    auth_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD}
    proc = run_cli_here("-m", f"tracking.uri={auth_server}", "tracking.experiment=team", "precision=fp32,bf16", *SHORT,
                        cwd=tmp_path, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    with monkeypatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
        mp.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
        client = MlflowClient(auth_server)
        runs = client.search_runs([client.get_experiment_by_name("team").experiment_id])
        assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
        (parent,) = [r for r in runs if r.data.tags.get("mprun.role") == "sweep"]
        assert "report/report.md" in {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert ADMIN_PASSWORD not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_user_with_read_permission_only_is_told_before_training(
    auth_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The experiment exists (the admin's); MLflow's default permission lets others read it, not write in it."""
    admin = {"MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert run_cli_here(f"tracking.uri={auth_server}", "tracking.experiment=owned", *SHORT, cwd=tmp_path / "a",
                        env=admin).returncode == 0  # fmt: skip
    before = len(_runs(auth_server, monkeypatch))
    reader = {"MLFLOW_TRACKING_USERNAME": READER, "MLFLOW_TRACKING_PASSWORD": READER_PASSWORD}
    proc = run_cli_here(f"tracking.uri={auth_server}", "tracking.experiment=owned", *SHORT, cwd=tmp_path / "b",
                        env=reader)  # fmt: skip
    _one_line(proc, f"user '{READER}' is not allowed to write in experiment", "ask for EDIT")
    assert "train_loss" not in proc.stdout  # before training
    assert len(_runs(auth_server, monkeypatch)) == before
    assert not list((tmp_path / "b" / "outputs").glob("20*"))


@pytest.mark.slow
def test_credentials_in_the_uri_are_one_line_naming_the_variables(auth_server: str, tmp_path: Path) -> None:
    """urllib took `user:password@` for part of the host name: the error was a DNS one."""
    host = auth_server.removeprefix("http://")
    proc = run_cli_here(f"tracking.uri=http://{ADMIN}:{ADMIN_PASSWORD}@{host}", *SHORT, cwd=tmp_path)
    line = _one_line(proc, "carries a user name and password", "MLFLOW_TRACKING_USERNAME")
    assert ADMIN_PASSWORD not in line and "Name or service" not in line
    assert not list((tmp_path / "outputs").glob("20*"))

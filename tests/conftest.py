"""Tests compose the real conf/ with Hydra's compose API, then shrink it (few steps, tmp dirs).

A fresh interpreter costs ~8 s of imports here, so tests call mprun in this process (`run(compose(...))`, or the
command line's own entry point through `run_cli_here`) unless the process is what they test (signals, kill -9,
torchrun, process-based launchers, a closed stdout): those start one through `run_cli` and are marked slow."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from helpers import restore_environment
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mprun import config
from mprun.cli import CONFIG_DIR, PRIMARY

config.register()


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist runs the suite on one worker per core (addopts: -n auto). Each worker and the processes its tests
    # start get their share of the cores: torch's default of one thread per core, in every worker, oversubscribes
    # them, and OpenMP threads that wait on each other for a core can make a step many times slower.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        share = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(share)
        torch.set_num_threads(share)
    config.addinivalue_line(
        "markers",
        "slow: starts processes of its own (signals, kill -9, torchrun, launchers, a "
        "server) or takes over ~10 s; `pytest -m 'not slow'` leaves these out",
    )


@pytest.fixture(autouse=True)
def environment_restored() -> Iterator[None]:
    """The process environment as each test found it: mprun sets variables in the process that runs it (MLflow's
    HTTP retries), and in-process runs would hand them on to later tests and the processes they start."""
    saved = dict(os.environ)
    yield
    restore_environment(saved)


class StoreClient:
    """An MlflowClient of one sqlite store, made at its first use: making one creates the store's file and tables,
    which a test's run must still find missing."""

    def __init__(self, uri: str) -> None:
        self.uri, self._client = uri, None

    def __getattr__(self, name: str) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.uri)
        return getattr(self._client, name)


@pytest.fixture
def mlflow_client(tmp_path: Path) -> StoreClient:
    """A client of the default MLflow store of runs written under tmp_path (paths.root_dir=tmp_path)."""
    return StoreClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """compose(overrides) of the real config, writing only under tmp_path, tracking off unless asked."""

    def make(*overrides: str, tracking: str = "none") -> DictConfig:
        base = [
            f"paths.root_dir={tmp_path}",
            f"paths.run_dir={tmp_path}/run",
            f"tracking={tracking}",
            "trainer.progress=off",
            # Not auto: on a CPU auto times fp32 against bf16 and takes the faster, which timing noise can flip from
            # run to run; a test's numbers must not depend on it. Tests of auto ask for precision=auto.
            "precision=fp32",
        ]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose(PRIMARY, overrides=base + list(overrides))

    return make

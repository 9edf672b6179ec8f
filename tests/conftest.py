"""Tests compose the real conf/ with Hydra's compose API, then shrink it (few steps, tmp dirs).

A fresh interpreter costs ~8 s of imports here, so tests call mprun in this process (`run(compose(...))`, or the
command line's own entry point through `run_cli_here`) unless the process is what they test (signals, kill -9,
torchrun, process-based launchers, a closed stdout): those start one through `run_cli` and are marked slow."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mprun import config
from mprun.cli import CONFIG_DIR, PRIMARY

ROOT = Path(__file__).resolve().parent.parent
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
    _restore_environment(saved)


def _restore_environment(saved: dict[str, str]) -> None:
    for key in set(os.environ) - set(saved):
        del os.environ[key]
    for key, value in saved.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


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


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m mprun ARGS` as a user would, in cwd."""
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the default store, unless env says
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "mprun", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


@dataclass
class Ended:
    """How a command ended: what subprocess.CompletedProcess says of one, for run_cli_here."""

    returncode: int
    stdout: str
    stderr: str


def run_cli_here(*args: str, cwd: Path, env: dict | None = None) -> Ended:
    """`python -m mprun ARGS` in cwd, in this process: the entry point `mprun.__main__.main` with sys.argv set, its
    exit code, stdout and stderr. What it and Hydra set for the process (signal handlers, logging, Hydra's
    singletons, cwd, environment) is put back afterwards. Sweeps run their jobs here too (Hydra's basic launcher)."""
    from mprun.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    root = logging.getLogger()
    root_level, root_handlers = root.level, root.handlers[:]
    environ = dict(os.environ)
    path = list(sys.path)  # the command line puts its launch directory on it
    code: int | str | None = None
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.setattr(sys, "argv", ["mprun", *args])
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default store, unless env says
        for key, value in (env or {}).items():
            mp.setenv(key, value)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                main()
        except SystemExit as e:
            code = e.code
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
            for handler in root.handlers[:]:  # Hydra's console and <job>.log handlers
                if handler not in root_handlers:
                    root.removeHandler(handler)
                    handler.close()
            for handler in root_handlers:
                if handler not in root.handlers:
                    root.addHandler(handler)
            root.setLevel(root_level)
            GlobalHydra.instance().clear()
            HydraConfig.instance().cfg = None  # else the next in-process run would see this one's job
            sys.path[:] = path
    _restore_environment(environ)
    if isinstance(code, str):  # as Python ends a process on SystemExit("message")
        err.write(code + "\n")
        code = 1
    return Ended(code or 0, out.getvalue(), err.getvalue())


def run_statuses(db: Path) -> list[str]:
    """Statuses of every MLflow run in a sqlite store (none if the store was never created)."""
    if not db.exists():
        return []
    with sqlite3.connect(db) as con:
        return [row[0] for row in con.execute("select status from runs")]

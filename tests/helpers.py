"""What tests share besides fixtures: running mprun's command line (in this process or in a fresh one) and reading
a store's run statuses. Tests import it as `from helpers import ...` (pytest puts tests/ on sys.path)."""

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

import pytest
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

ROOT = Path(__file__).resolve().parent.parent


def restore_environment(saved: dict[str, str]) -> None:
    for key in set(os.environ) - set(saved):
        del os.environ[key]
    for key, value in saved.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


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
    restore_environment(environ)
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

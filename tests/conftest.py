"""Tests compose the real conf/ with Hydra's compose API, then shrink it (few steps, tmp dirs)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mprun import config
from mprun.cli import CONFIG_DIR

ROOT = Path(__file__).resolve().parent.parent
config.register()


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """compose(overrides) of the real config, writing only under tmp_path, tracking off unless asked."""

    def make(*overrides: str, tracking: str = "none") -> DictConfig:
        base = [
            f"paths.root_dir={tmp_path}",
            f"paths.run_dir={tmp_path}/run",
            f"tracking={tracking}",
            "trainer.progress=off",
        ]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose("config", overrides=base + list(overrides))

    return make


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m mprun ARGS` as a user would, in cwd."""
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the default store, unless env says
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "mprun", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def run_statuses(db: Path) -> list[str]:
    """Statuses of every MLflow run in a sqlite store (none if the store was never created)."""
    if not db.exists():
        return []
    with sqlite3.connect(db) as con:
        return [row[0] for row in con.execute("select status from runs")]

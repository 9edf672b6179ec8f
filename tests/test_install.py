"""mprun as an installed tool: a built wheel, installed outside the checkout, runs from any directory with nothing of
the checkout on sys.path (the venv's dependencies, the wheel's mprun and its conf/)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

from mprun import configdirs


@pytest.mark.slow  # a wheel build and three fresh interpreters
def test_a_built_wheel_runs_the_default_experiment_and_a_project_from_other_directories(tmp_path: Path) -> None:
    # No build isolation where this venv has a setuptools that builds it (pyproject's requirement): no download.
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(wheels), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("mprun-*.whl")
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )

    def files(top: Path) -> list[Path]:
        return sorted(p.relative_to(top) for p in top.rglob("*") if p.is_file())

    assert files(site / "mprun" / "conf") == files(configdirs.SHIPPED)  # every config file, at every depth
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PYTHONPATH")}
    env["PYTHONPATH"] = str(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def mprun(*args: str, cwd: Path, script: bool = False) -> subprocess.CompletedProcess:
        command = [str(site / "bin" / "mprun")] if script else [sys.executable, "-m", "mprun"]
        return subprocess.run([*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)

    where = subprocess.run(
        [sys.executable, "-c", "import sys, mprun.cli; print(mprun.cli.__file__); print(mprun.cli.CONFIG_DIR); "
         "print(*sys.path, sep='\\n')"],
        cwd=elsewhere, env=env, capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert where[0].startswith(str(site)) and where[1] == str(site / "mprun" / "conf")
    assert not [p for p in where[2:] if p and Path(p).resolve() == ROOT]
    default = mprun("trainer.max_steps=5", cwd=elsewhere)
    assert default.returncode == 0, default.stderr[-3000:]
    assert "── mprun summary" in default.stdout and f"run dir     {elsewhere}/outputs/" in default.stdout
    # A project of one's own, run by the installed `mprun` script: its conf/ and its package, from its directory.
    project = tmp_path / "project"
    shutil.copytree(ROOT / "docs" / "example-project", project, ignore=shutil.ignore_patterns("outputs", "__pycache__"))
    mine = mprun("model=wide", "dataset=blobs", "precision=bf16", "trainer.max_steps=5", cwd=project, script=True)
    assert mine.returncode == 0, mine.stderr[-3000:]
    assert "model mylab.nets.Wide: passed in_features=16, num_classes=4 from dataset=blobs" in mine.stdout

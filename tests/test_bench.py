"""The GPU benchmark's harness runs end to end (on the CPU, tiny): both paths train and are reported.
No speed is asserted here: speed is the benchmark's job, on a GPU. The scripts run as a user runs them: a process
each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def gpu_step(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu_step.py"),
            "--device",
            "cpu",
            "--models",
            "simple_cnn",
            "--modes",
            "eager",
            "--image",
            "16",
            "--batch",
            "8",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--rounds",
            "2",
            "--out",
            str(out),
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_gpu_step_harness_runs_on_cpu_and_slices_add_up(tmp_path: Path) -> None:
    proc = gpu_step(tmp_path, "--precisions", "fp32,fp16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_step.json").read_text())
    assert [(c["precision"], c["mode"]) for c in result["cells"]] == [("fp32", "eager"), ("fp16", "eager")]
    assert all(c["hand_img_s"] > 0 and c["mprun_img_s"] > 0 for c in result["cells"])
    assert "| simple_cnn | fp16 | eager |" in (tmp_path / "gpu_step.md").read_text()
    assert all(c["hand_finite"] and c["mprun_finite"] for c in result["cells"])
    # A second slice joins the first, skipping what is measured; a spent budget stops it after its first cell.
    proc = gpu_step(tmp_path, "--precisions", "fp32,tf32,bf16", "--budget-s", "1e-9")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already measured on cpu" in proc.stdout and "simple_cnn fp32 eager" in proc.stdout.splitlines()[0]
    assert "not run: simple_cnn tf32 eager" in proc.stdout  # bf16 first: the targets need it more
    result = json.loads((tmp_path / "gpu_step.json").read_text())
    assert [c["precision"] for c in result["cells"]] == ["fp32", "fp16", "bf16"]
    assert "| simple_cnn | bf16 | eager |" in (tmp_path / "gpu_step.md").read_text()
    # The same command again finishes the slice.
    proc = gpu_step(tmp_path, "--precisions", "fp32,tf32,bf16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [c["precision"] for c in json.loads((tmp_path / "gpu_step.json").read_text())["cells"]] == [
        "fp32",
        "tf32",
        "fp16",
        "bf16",
    ]
    # Other settings measure other things: the earlier cells are not merged with them.
    proc = gpu_step(tmp_path, "--precisions", "fp32", "--steps", "3")
    assert proc.returncode == 0 and "not merged" in proc.stdout, proc.stderr[-3000:]
    assert [c["precision"] for c in json.loads((tmp_path / "gpu_step.json").read_text())["cells"]] == ["fp32"]


@pytest.mark.slow
def test_gpu_step_has_a_language_model_cell_with_tokens_per_second(tmp_path: Path) -> None:
    """The GPT cell (gpt2_small on a GPU; the tiny model=gpt here): windows of pycode, both paths, tokens/s."""
    proc = gpu_step(tmp_path, "--models", "gpt", "--precisions", "bf16", "--block", "16", "--batch", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (c,) = json.loads((tmp_path / "gpu_step.json").read_text())["cells"]
    assert c["model"] == "gpt" and c["tokens_s"] == pytest.approx(16 * c["mprun_img_s"])
    assert c["mfu"] is None and c["hand_finite"] and c["mprun_finite"]  # no peak for a CPU
    assert "| gpt | bf16 | eager |" in (tmp_path / "gpu_step.md").read_text()


@pytest.mark.slow
def test_loader_bench_runs_on_a_generated_imagefolder(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "loader.py"),
            "--make-imagefolder",
            str(tmp_path / "imgs"),
            "--images",
            "120",
            "--classes",
            "3",
            "--size",
            "48x32",
            "--workers",
            "0,1",
            "--warmup",
            "1",
            "--steps",
            "4",
            "--out",
            str(tmp_path),
            "dataset=imagefolder",
            f"dataset.root={tmp_path / 'imgs'}",
            "dataset.image_size=16",
            "dataset.batch_size=4",
            "model=simple_cnn",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "imgs" / "val").rglob("*.jpg"))) == 12  # every 10th image of each class
    result = json.loads((tmp_path / "loader.json").read_text())
    assert [r["workers"] for r in result["loader"]] == [0, 1]
    assert all(r["samples_per_s"] > 0 for r in result["loader"])
    assert result["step"]["samples_per_s"] > 0 and 0 <= result["run"]["data_wait_frac"] <= 1
    assert "(auto)" in result["run"]["input"]
    md = (tmp_path / "loader.md").read_text()
    assert "| step (synthetic, on the device) |" in md
    keeps_up = [r["workers"] for r in result["loader"] if r["samples_per_s"] >= result["step"]["samples_per_s"]]
    assert (f"keeps up from {min(keeps_up)} workers on" if keeps_up else "does not keep up") in result["verdict"]


@pytest.mark.slow
def test_loader_bench_refuses_an_in_memory_dataset(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "loader.py"), "--out", str(tmp_path), "dataset=digits"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "measures datasets read from disk" in proc.stderr


@pytest.mark.slow
def test_the_gpu_session_plans_one_call_in_priority_order_within_its_budget(tmp_path: Path) -> None:
    """bench/gpu_session.sh is one call of at most 8 minutes: its dry run (no GPU needed) lists the GPU-only tests
    first, then the cells in the order the fp8/bf16_pure issue ranks them; by the planning estimates the resnet50 and
    vit_b16 fp8 cells fit the budget, and what does not is marked as left for the next call."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", "bench/gpu_session.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "plan, budget 480 s:" and lines[1].startswith("1. GPU-only tests")
    cells = [line.split()[0] for line in lines if "~" in line and line.split()[0].count(":") == 2]
    assert cells == [
        "resnet50:fp32:eager", "resnet50:bf16:compiled", "resnet50:fp16:compiled",
        "vit_b16:bf16:compiled", "vit_b16:fp8:compiled",
        "gpt2_small:bf16:compiled", "gpt2_small:fp8:compiled",
        "resnet50:bf16:eager", "resnet50:bf16_pure:eager", "vit_b16:bf16:eager", "vit_b16:bf16_pure:eager",
    ]  # fmt: skip
    fits = [line.split()[0] for line in lines if "~" in line and ":" in line and "past the budget" not in line]
    assert fits[:5] == cells[:5]
    assert lines[-1].startswith("estimated total") and "(estimates, not measurements)" in lines[-1]
    wrong = subprocess.run(["bash", "bench/gpu_session.sh", "checks"], cwd=ROOT, capture_output=True, text=True)
    assert wrong.returncode == 2 and wrong.stderr.strip() == "usage: bash bench/gpu_session.sh [--dry-run]"

"""The GPU benchmark's harness runs end to end (on the CPU, tiny): both paths train and are reported.
No speed is asserted here: speed is the benchmark's job, on a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_step_harness_runs_on_cpu(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_step.py"), "--device", "cpu", "--models", "simple_cnn",
         "--precisions", "fp32,fp16", "--modes", "eager", "--image", "16", "--batch", "8", "--steps", "2",
         "--warmup", "1", "--rounds", "2", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_step.json").read_text())
    assert [(c["precision"], c["mode"]) for c in result["cells"]] == [("fp32", "eager"), ("fp16", "eager")]
    assert all(c["hand_img_s"] > 0 and c["mprun_img_s"] > 0 for c in result["cells"])
    assert "| simple_cnn | fp16 | eager |" in (tmp_path / "gpu_step.md").read_text()

"""CPU step time: mprun's loop vs. a bare torch loop on the same model, data and optimizer.

Guards against a measured trap: importing scikit-learn or mlflow into a training process once made a
small CNN's CPU step 10-20x slower (two OpenMP runtimes fighting over 2 cores). Each path runs in its
own fresh process, so the bare loop imports nothing but torch while mprun's imports what a real run
does (hydra, mlflow, its data path). Rounds alternate the two; the median per-step time is reported.

    python bench/cpu_step.py [--rounds 6] [--epochs 6] [--out bench/results]

Goal (issue 2): mprun / bare <= 1.2.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from common import at_least

ROOT = Path(__file__).resolve().parent.parent


def bare(epochs: int) -> list[float]:
    """Hand-written loop: only torch and the model class. Returns seconds per step, per epoch."""
    import torch
    import torch.nn.functional as F

    from mprun.models.vision import SimpleCNN  # the same module mprun trains; imports only torch

    torch.manual_seed(0)
    x, y = torch.randn(1437, 1, 8, 8), torch.randint(0, 10, (1437,))  # digits' train split shape
    model = SimpleCNN(1, (8, 8), 10)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    per_step = []
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        steps = len(x) // 64
        start = time.perf_counter()
        for i in range(steps):
            idx = perm[i * 64 : (i + 1) * 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        per_step.append((time.perf_counter() - start) / steps)
    return per_step


def mprun_loop(epochs: int) -> list[float]:
    """mprun's own path: compose conf/, build with MLflow tracking on, run train_epoch."""
    from common import compose

    from mprun import build, config
    from mprun.progress import Progress
    from mprun.training.loop import train_epoch
    from mprun.training.state import TrainState

    cfg = compose([f"trainer.max_epochs={epochs}"], tracking=True)
    checked = config.validate(cfg)
    tracker = build.tracker(cfg.tracking, cfg.paths.output_root)  # imports mlflow, as a real run does
    parts = build.components(checked)
    tracker.start({}, {})
    state, per_step = TrainState(), []
    for epoch in range(epochs):
        state.epoch = epoch
        before = state.step
        start = time.perf_counter()
        train_epoch(
            parts,
            parts.data.train,
            checked.trainer,
            state,
            tracker=tracker,
            progress=Progress(epochs, 0, enabled=False),
        )
        per_step.append((time.perf_counter() - start) / (state.step - before))
    tracker.end("FINISHED")
    return per_step


def child(kind: str, epochs: int) -> float:
    """Median seconds per step of one path, in a fresh interpreter; the first epoch is warm-up."""
    code = (
        f"import json,sys; sys.path.insert(0,{str(ROOT / 'bench')!r}); import cpu_step; "
        f"print(json.dumps(cpu_step.{kind}({epochs})))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    per_step = json.loads(out.strip().splitlines()[-1])
    return statistics.median(per_step[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=at_least(1), default=6)
    ap.add_argument("--epochs", type=at_least(2), default=6, help="per child; the first is warm-up")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    rows = {"bare": [], "mprun": []}
    for r in range(args.rounds):
        for kind in ("bare", "mprun_loop") if r % 2 == 0 else ("mprun_loop", "bare"):
            t = child(kind, args.epochs)
            rows["bare" if kind == "bare" else "mprun"].append(t)
            print(f"round {r + 1}: {kind:10s} {t * 1000:.2f} ms/step", flush=True)
    b, m = statistics.median(rows["bare"]), statistics.median(rows["mprun"])
    result = {
        "benchmark": "cpu_step",
        "date": str(date.today()),
        "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
        "python": platform.python_version(),
        "torch": __import__("torch").__version__,
        "model": "simple_cnn",
        "dataset": "digits (8x8), batch 64",
        "optimizer": "adamw",
        "bare_ms_per_step": b * 1000,
        "mprun_ms_per_step": m * 1000,
        "ratio": m / b,
        "goal": "ratio <= 1.2",
        "rounds": args.rounds,
        "epochs_per_round": args.epochs,
        "raw_s": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu_step.json").write_text(json.dumps(result, indent=2))
    table = (
        f"| path | ms/step (median) |\n|---|---|\n| bare torch loop | {b * 1000:.2f} |\n"
        f"| mprun | {m * 1000:.2f} |\n| **ratio mprun/bare** | **{m / b:.3f}** (goal <= 1.2) |\n"
    )
    (args.out / "cpu_step.md").write_text(
        f"CPU step time, {result['date']}, {result['machine']}, torch {result['torch']}: "
        f"`python bench/cpu_step.py --rounds {args.rounds} --epochs {args.epochs}`\n\n{table}"
    )
    print(table)
    sys.exit(0 if m / b <= 1.2 else 1)


if __name__ == "__main__":
    main()

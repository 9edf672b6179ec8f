"""GPU throughput and memory: mprun's training loop vs. a minimal hand-written torch.amp loop (issue 5).

Same model architecture, batch, on-GPU synthetic data and precision in both paths, alternating rounds
in one process; CUDA events time each round after warm-up, the median round counts.
  (a) hand: autocast + GradScaler(enabled=fp16) + fused SGD + zero_grad(set_to_none), nothing else;
  (b) mprun: the model, optimizer and Precision built from conf/ by mprun.build, trained by
      mprun.loop.train_epoch (its real hot path, log-step syncs included).

    python bench/gpu_step.py                                   # the full matrix (more than one 10-minute call)
    python bench/gpu_step.py --models resnet50 --modes eager   # one slice, merged into the results so far
    python bench/gpu_step.py --budget-s 480 ...                # start no cell that would end after 8 minutes
    python bench/gpu_step.py --device cpu --models simple_cnn --image 32 --batch 8 --steps 2 --rounds 1  # harness check
    python bench/gpu_step.py --cells vit_b16:bf16:compiled,vit_b16:fp8:compiled --dry-run  # the plan, not run

fp8 cells run torchao's Float8Linear in both paths (mprun's model transform builds both models); bf16_pure cells
compare mprun's stochastic-rounding optimizer with a hand loop's plain bf16 SGD (round to nearest): the cost of the
rounding is in the ratio.

Matrix: resnet50 (batch 256, channels_last) and vit_b16 (batch 128) x fp32, tf32, fp16, bf16 x eager,
compiled, the cells the targets need first; `--models gpt2_small` (batch 16 windows of --block 1024 bytes of
dataset=pycode, on the device) adds the language-model cells, with tokens/s and MFU (mprun.hardware's peak table).
Writes <out>/gpu_step.json and gpu_step.md after every cell, so
a slice cut short keeps what it measured; cells measured earlier on the same device and torch version are
kept and not measured again (--redo does), so the same command run again finishes a slice, and slices run
in separate calls add up to one table. A path whose weights end non-finite is flagged.
Targets (H100): mprun/hand >= 0.98
in every cell; resnet50 bf16 compiled >= 5,500 img/s; bf16 peak memory <= 0.55x fp32.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
from common import ROOT, at_least, compose

BATCH = {"resnet50": 256, "vit_b16": 128, "gpt2_small": 16}
CHANNELS_LAST = {"resnet50": True}
LANGUAGE_MODELS = ("gpt", "gpt2_small")  # trained on dataset=pycode windows; the others on synthetic images


def data_overrides(model: str, batch: int, args: argparse.Namespace) -> list[str]:
    """The cell's dataset: batch * steps samples a round, on the device."""
    if model in LANGUAGE_MODELS:
        return [
            "dataset=pycode",
            f"dataset.block_size={args.block}",
            f"dataset.windows_per_epoch={batch * args.steps}",
            f"dataset.val_windows={batch}",
        ]
    return [
        "dataset=synthetic",
        "dataset.on_device=true",
        f"dataset.shape=[3,{args.image},{args.image}]",
        f"dataset.num_samples={batch * args.steps}",
        f"dataset.val_samples={batch}",
    ]


def components(model: str, precision: str, compiled: bool, args: argparse.Namespace):
    """mprun's own build of one cell: config composed from conf/, objects from mprun.build."""
    from mprun import build, config

    batch = args.batch or BATCH.get(model, 64)
    cfg = compose(
        [
            f"model={model}",
            f"precision={precision}",
            "optimizer=sgd",
            "optimizer.lr=0.01",
            "scheduler=none",
            *data_overrides(model, batch, args),
            f"dataset.batch_size={batch}",
            f"trainer.device={args.device}",
            f"trainer.compile={str(compiled).lower()}",
            f"trainer.channels_last={str(CHANNELS_LAST.get(model, False)).lower()}",
            f"trainer.log_every_steps={args.steps}",
        ]
    )
    checked = config.validate(cfg)
    return build.components(checked), checked.trainer, batch


def hand_loop(parts, compiled: bool, channels_last: bool):
    """The reference: what a careful person writes by hand with torch.amp."""
    device = parts.device
    dtype = parts.precision.autocast_dtype
    from mprun.optim.factories import prepare

    # An fp8 cell's module already has its Float8Linear layers and a bf16_pure one its bf16 weights (mprun.build's
    # model transform): autocast below is bf16 for fp8 and off for bf16_pure, whose hooks cast the inputs.
    model = torch.compile(parts.module) if compiled else parts.module
    # As conf/optimizer/sgd. prepare() zeroes fused SGD's momentum buffers, as mprun does: torch allocates them
    # uninitialised, and an fp16 first step that overflows would leave the reference training on garbage (and NaN
    # steps, which the fused kernel skips, would make it look faster).
    opt = prepare(torch.optim.SGD(parts.module.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, fused=True))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)

    def epoch() -> None:
        for x, y in parts.data.train:
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = F.cross_entropy(model(x).flatten(0, -2), y.flatten())  # (N, T, V) logits too
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)

    return epoch


def mprun_loop(parts, trainer):
    from mprun.progress import Progress
    from mprun.tracking.base import NullTracker
    from mprun.training.loop import train_epoch
    from mprun.training.state import TrainState

    state, tracker, progress = TrainState(), NullTracker(), Progress(1, 0, enabled=False)

    def epoch() -> None:
        train_epoch(parts, parts.data.train, trainer, state, tracker=tracker, progress=progress)

    return epoch


def timed(fn, device: torch.device) -> tuple[float, float]:
    """(seconds, peak MiB above the memory in use before) for one call of fn."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000, (torch.cuda.max_memory_allocated(device) - base) / 2**20
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t, float("nan")


def cell(model: str, precision: str, compiled: bool, args: argparse.Namespace) -> dict:
    """Both paths for one (model, precision, mode): warm up, then alternate timed rounds."""
    mine, trainer, batch = components(model, precision, compiled, args)
    theirs, _, _ = components(model, precision, compiled, args)  # a separate model instance for the hand loop
    paths = {"hand": hand_loop(theirs, compiled, CHANNELS_LAST.get(model, False)), "mprun": mprun_loop(mine, trainer)}
    for fn in paths.values():
        for _ in range(args.warmup):
            fn()  # compilation, cuDNN autotuning, allocator warm-up
    times: dict[str, list[float]] = {k: [] for k in paths}
    mems: dict[str, list[float]] = {k: [] for k in paths}
    for r in range(args.rounds):
        for name in ("hand", "mprun") if r % 2 == 0 else ("mprun", "hand"):
            seconds, mib = timed(paths[name], mine.device)
            times[name].append(seconds)
            mems[name].append(mib)
    samples = batch * args.steps
    block = mine.data.context  # a language model's window: tokens per sample
    out = {
        "model": model,
        "precision": precision,
        "mode": "compiled" if compiled else "eager",
        "batch": batch,
        "date": str(date.today()),
    }
    for name, parts in (("hand", theirs), ("mprun", mine)):
        out[f"{name}_img_s"] = samples / statistics.median(times[name])  # images, or windows
        out[f"{name}_peak_mib"] = max(mems[name])
        # A path whose weights went non-finite timed skipped or NaN steps, not training: its number is flagged.
        out[f"{name}_finite"] = all(bool(torch.isfinite(p).all()) for p in parts.module.parameters())
    out["ratio"] = out["mprun_img_s"] / out["hand_img_s"]
    if block:
        from mprun.hardware import mfu

        out["tokens_s"] = out["mprun_img_s"] * block
        parameters = sum(p.numel() for p in mine.module.parameters())
        out["mfu"] = mfu(parameters, out["tokens_s"], mine.device, mine.precision.name.matmul_dtype)
    tokens = f"  {out['tokens_s']:,.0f} tokens/s" if block else ""
    print(
        f"{model:9s} {precision:5s} {out['mode']:8s} hand {out['hand_img_s']:9.1f} img/s  "
        f"mprun {out['mprun_img_s']:9.1f} "
        f"img/s  ratio {out['ratio']:.3f}  peak MiB hand {out['hand_peak_mib']:.0f} mprun {out['mprun_peak_mib']:.0f}"
        f"{tokens}"
        f"{'' if out['hand_finite'] and out['mprun_finite'] else '  NON-FINITE WEIGHTS'}",
        flush=True,
    )
    del mine, theirs, paths
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def table(cells: list[dict]) -> str:
    fp32 = {(c["model"], c["mode"]): c["mprun_peak_mib"] for c in cells if c["precision"] == "fp32"}
    lines = [
        "| model | precision | mode | hand samples/s | mprun samples/s | mprun/hand | peak MiB (mprun) | vs fp32 | "
        "tokens/s (mprun) | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        base = fp32.get((c["model"], c["mode"]))
        rel = f"{c['mprun_peak_mib'] / base:.2f}×" if base else "—"
        bad = [n for n in ("hand", "mprun") if not c.get(f"{n}_finite", True)]
        flag = f" (non-finite weights: {', '.join(bad)})" if bad else ""
        lines.append(
            f"| {c['model']} | {c['precision']} | {c['mode']} | {c['hand_img_s']:,.0f} | {c['mprun_img_s']:,.0f} | "
            f"{c['ratio']:.3f}{flag} | {c['mprun_peak_mib']:,.0f} | {rel} | "
            f"{_tokens(c)} |"
        )
    return "\n".join(lines) + "\n"


def _tokens(c: dict) -> str:
    """A language-model cell's tokens/s and MFU columns; dashes for an image model, "not known" for a GPU the peak
    table lacks."""
    if "tokens_s" not in c:
        return "— | —"
    return f"{c['tokens_s']:,.0f} | " + (f"{c['mfu']:.1%}" if c.get("mfu") else "no peak known")


def key(c: dict) -> tuple[str, str, str]:
    return c["model"], c["precision"], c["mode"]


# Within a model, the cells the targets need most come first, so a slice cut short still has them: the fp32
# baseline, bf16 (its memory ratio) and compiled bf16 (the throughput target), then the rest.
PRIORITY = [
    ("eager", "fp32"),
    ("eager", "bf16"),
    ("compiled", "bf16"),
    ("compiled", "fp8"),
    ("eager", "bf16_pure"),
    ("eager", "fp16"),
    ("eager", "tf32"),
    ("compiled", "fp16"),
    ("compiled", "tf32"),
    ("compiled", "fp32"),
]


def priority(t: tuple[str, str, str]) -> tuple[int, int]:
    m, p, mode = t
    models = list(BATCH)
    return (
        models.index(m) if m in models else len(models),
        PRIORITY.index((mode, p)) if (mode, p) in PRIORITY else len(PRIORITY),
    )


# What makes two slices' cells comparable, besides GPU and torch.
SETTINGS = ("batch", "image", "block", "steps", "warmup", "rounds")


def earlier(path: Path, device: str, args: argparse.Namespace) -> list[dict]:
    """The cells of an earlier result file, if it was measured on this device, with this torch and these settings."""
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    same = (old.get("device"), old.get("torch")) == (device, torch.__version__) and all(
        old.get("args", {}).get(k) == str(getattr(args, k)) for k in SETTINGS
    )
    if not same:
        print(f"{path}: measured on another GPU, torch or settings: not merged (its cells are replaced)", flush=True)
    return old["cells"] if same else []


def write(out: Path, cells: list[dict], device: str, args: argparse.Namespace) -> str:
    """gpu_step.json and gpu_step.md for these cells, each file replaced whole (never half-written)."""
    models, precisions = list(BATCH), ["fp32", "tf32", "fp16", "bf16", "bf16_pure", "fp8"]
    cells = sorted(
        cells,
        key=lambda c: (
            models.index(c["model"]) if c["model"] in models else len(models),
            c["model"],
            c["mode"] != "eager",
            precisions.index(c["precision"]),
        ),
    )
    dates = sorted({c["date"] for c in cells})
    result = {
        "benchmark": "gpu_step",
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "args": {k: str(v) for k, v in vars(args).items() if k != "out"},
        "cells": cells,
    }
    md = (
        f"mprun vs hand-written torch.amp loop, {', '.join(dates)}, {device}, torch {torch.__version__}, "
        f"synthetic data on "
        f"the device, SGD, {args.steps} steps a round, median of {args.rounds} alternating rounds after {args.warmup} "
        f"warm-up: `python bench/gpu_step.py` (slices by --models/--precisions/--modes). "
        f"Peak MiB: allocated above what "
        f"was resident before the round (both paths' weights and optimizer state)\n\n" + table(cells)
    )
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("gpu_step.json", json.dumps(result, indent=2)), ("gpu_step.md", md)):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)
    return md


# Planning estimates of one cell's seconds on an H100/H200 (both paths: build, warm-up, 5 rounds of 20 steps), for
# --dry-run's plan; not measurements. Compilation dominates a compiled cell (two models compiled); the --budget-s
# guard uses the longest cell actually measured, not these.
ESTIMATE_S = {"eager": 25.0, "compiled": 75.0}


def plan(todo: list[tuple[str, ...]], budget_s: float) -> str:
    """The cells, in order, with estimated seconds and a running total; those past the budget are marked."""
    lines, total = [], 0.0
    for m, p, mode in todo:
        total += ESTIMATE_S.get(mode, 75.0)
        over = "  (past the budget: left for the next call)" if budget_s and total > budget_s else ""
        lines.append(f"{m}:{p}:{mode}  ~{ESTIMATE_S.get(mode, 75.0):.0f} s  (total ~{total:.0f} s){over}")
    return "\n".join(lines + [f"estimated total ~{total:.0f} s for {len(todo)} cells (estimates, not measurements)"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50,vit_b16")
    ap.add_argument("--precisions", default="fp32,tf32,fp16,bf16")
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=at_least(0), default=0, help="0: 256 for resnet50, 128 for vit_b16")
    ap.add_argument("--image", type=at_least(1), default=224)
    ap.add_argument("--block", type=at_least(1), default=1024, help="a language model's window, in bytes")
    ap.add_argument("--steps", type=at_least(1), default=20, help="steps per timed round")
    ap.add_argument("--warmup", type=at_least(0), default=2, help="untimed rounds per path")
    ap.add_argument("--rounds", type=at_least(1), default=5, help="timed rounds per path (alternating)")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=0,
        help="start no cell (after the first) that would end past this many seconds, judged by the longest "
        "cell so far (0: no limit)",
    )
    ap.add_argument(
        "--redo", action="store_true", help="measure cells again that --out already holds for this GPU and torch"
    )
    ap.add_argument(
        "--cells",
        default="",
        help="model:precision:mode,... measured in this order (instead of --models x --precisions x --modes)",
    )
    ap.add_argument("--dry-run", action="store_true", help="print the cells it would measure and their estimated time")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    from mprun.hardware import device_name

    # A dry run plans on any machine: without the GPU it cannot know which cells the results already hold.
    device = device_name(torch.device(args.device)) if not args.dry_run or torch.cuda.is_available() else "no GPU here"
    cells = {key(c): c for c in earlier(args.out / "gpu_step.json", device, args)}
    asked = (
        [tuple(c.split(":")) for c in args.cells.split(",")]
        if args.cells
        else [
            (m, p, mode)
            for m in args.models.split(",")
            for mode in args.modes.split(",")
            for p in args.precisions.split(",")
        ]
    )
    # Cells measured in an earlier slice are not measured again (unless --redo), so a slice that a budget or a
    # time limit cut short is finished by running the same command again. --cells keeps its own order.
    todo = [t for t in asked if args.redo or t not in cells]
    if not args.cells:
        todo.sort(key=priority)
    if args.dry_run:
        print(plan(todo, args.budget_s))
        return
    if len(todo) < len(asked):
        print(
            f"already measured on {device}, torch {torch.__version__} (--redo measures again): "
            f"{', '.join(' '.join(t) for t in asked if t not in todo)}",
            flush=True,
        )
    start, longest = time.perf_counter(), 0.0
    for i, (m, p, mode) in enumerate(todo):
        # A cell is not started unless it would end within the budget, judged by the longest cell so far.
        if i and args.budget_s and time.perf_counter() - start + longest > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s: not run: {', '.join(' '.join(t) for t in todo[i:])}", flush=True)
            break
        began = time.perf_counter()
        c = cell(m, p, mode == "compiled", args)
        c["seconds"] = time.perf_counter() - began
        longest = max(longest, c["seconds"])
        cells[key(c)] = c
        # after every cell: a slice cut short keeps what it measured
        write(args.out, list(cells.values()), device, args)
    print(write(args.out, list(cells.values()), device, args) if cells else "nothing measured")


if __name__ == "__main__":
    main()

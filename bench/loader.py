"""Does the input pipeline keep up? Loader-only samples/s against the training step's (issue 5).

For a dataset read from disk (imagefolder, or cifar10/mnist where present) and the model, batch and
precision given as mprun overrides, three measurements, each after warm-up:
  loader  mprun's train loader for that dataset alone, per dataset.num_workers value: batches
          drawn and copied to the device, nothing trained;
  step    mprun's train_epoch on synthetic data of the same shape already on the device: the pace
          the model trains at when input costs nothing;
  run     mprun's train_epoch on the real loader (dataset.num_workers as configured, auto by default),
          with the share of time the loop waited for data (what a run logs as perf/data_wait_frac).
The loader keeps up where its samples/s reach the step's. Writes <out>/loader.json and loader.md.

    python bench/loader.py dataset=imagefolder dataset.root=/data/imagenette model=resnet50 precision=bf16 \\
        trainer.channels_last=true dataset.batch_size=256
    python bench/loader.py --make-imagefolder /tmp/imgs dataset=imagefolder dataset.root=/tmp/imgs model=resnet18
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from common import ROOT, at_least, compose, sync

from mprun import build, config
from mprun.data.loaders import TimedLoader, usable_cores
from mprun.hardware import device_name, resolve_device
from mprun.progress import Progress
from mprun.tracking.base import NullTracker
from mprun.training.config import INPUT_BOUND, TrainerConfig
from mprun.training.loop import train_epoch
from mprun.training.state import TrainState


def make_imagefolder(root: Path, images: int, classes: int, size: tuple[int, int], seed: int = 0) -> None:
    """root/{train,val}/<class>/*.jpg: photo-sized JPEGs (smooth colour fields plus grain, quality 90),
    so decoding and resizing cost about what real photos cost. 10% of the images go to val."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(images):
        split = "val" if (i // classes) % 10 == 9 else "train"  # every class in both splits
        d = root / split / f"class_{i % classes:03d}"
        d.mkdir(parents=True, exist_ok=True)
        coarse = rng.uniform(0, 255, (h // 32 + 1, w // 32 + 1, 3)).astype(np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
        pixels = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(d / f"{i:06d}.jpg", quality=90)


class Window:
    """Passes batches through and clocks the steady part of an epoch: from the moment the loop asks for
    batch `start` to the moment it asks for batch `end` (the device synced at both marks, so queued GPU
    work is inside the window), with the seconds `timed` waited for data in between."""

    def __init__(self, timed: TimedLoader, start: int, end: int, device: torch.device) -> None:
        self.timed, self.start, self.end, self.device = timed, start, end, device
        self.seconds = self.waited = 0.0

    def _mark(self) -> tuple[float, float]:
        sync(self.device)
        return time.perf_counter(), self.timed.waited

    def __iter__(self) -> Iterator:
        it = iter(self.timed)
        for i in range(len(self.timed)):
            if i == self.start:
                t0, w0 = self._mark()
            if i == self.end:
                t1, w1 = self._mark()
                self.seconds, self.waited = t1 - t0, w1 - w0
                return
            yield next(it)
        raise RuntimeError(f"the loader has {len(self.timed)} batches; the window needs {self.end}")

    # the rest of the Loader protocol, for train_epoch
    def __len__(self) -> int:
        return len(self.timed)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.timed.set_epoch(epoch, skip_batches)


def train_rate(overrides: list[str], warmup: int, steps: int) -> dict:
    """samples/s of mprun's train_epoch over `steps` steps after `warmup`, and the share spent waiting for data."""
    cfg = compose(overrides)
    checked = config.validate(cfg)
    parts = build.components(checked)
    trainer: TrainerConfig = checked.trainer
    batch = cfg.dataset.batch_size
    timed = TimedLoader(parts.data.train)
    window = Window(timed, warmup, warmup + steps, parts.device)
    train_epoch(parts, window, trainer, TrainState(), tracker=NullTracker(), progress=Progress(1, 0, enabled=False))
    if not window.seconds:
        raise SystemExit(f"bench/loader.py: training stopped before batch {warmup + steps} (trainer.max_steps?)")
    return {
        "samples_per_s": steps * batch / window.seconds,
        "data_wait_frac": window.waited / window.seconds,
        "input": parts.data.train.describe(),
    }


def loader_rate(overrides: list[str], workers: int, warmup: int, batches: int) -> dict:
    """samples/s of the train loader alone with this many workers (first `warmup` batches untimed)."""
    cfg = compose(overrides + [f"dataset.num_workers={workers}"])
    checked = config.validate(cfg)
    trainer: TrainerConfig = checked.trainer
    device = resolve_device(trainer.device)
    data = build.dataset(checked, trainer.seed, device)
    loader = data.train
    loader.set_epoch(0)
    it = iter(loader)
    start = time.perf_counter()
    for _ in range(warmup):  # worker start-up, first prefetch
        next(it)
    first = time.perf_counter() - start
    start, seen = time.perf_counter(), 0
    for _ in range(batches):
        x, y = next(it)
        x.to(device, non_blocking=True), y.to(device, non_blocking=True)  # as the loop copies them
        seen += len(y)
    sync(device)
    seconds = time.perf_counter() - start
    del it, loader, data  # ends the worker processes
    return {"workers": workers, "samples_per_s": seen / seconds, "warmup_s": first}


def step_overrides(overrides: list[str], shape: list[int], classes: int, batch: int, samples: int) -> list[str]:
    """The same run on synthetic data of the same shape, generated on the device."""
    kept = [o for o in overrides if not o.lstrip("+~").startswith("dataset")]
    return kept + [
        "dataset=synthetic",
        "dataset.on_device=true",
        f"dataset.shape=[{','.join(map(str, shape))}]",
        f"dataset.num_classes={classes}",
        f"dataset.batch_size={batch}",
        f"dataset.num_samples={samples}",
        f"dataset.val_samples={batch}",
    ]


def default_workers() -> str:
    counts, n = [0], 1
    while n <= usable_cores():
        counts.append(n)
        n *= 2
    return ",".join(map(str, counts))


def table(result: dict) -> str:
    step = result["step"]["samples_per_s"]
    lines = ["| path | workers | samples/s | ÷ step | waited for data |", "|---|---|---|---|---|"]
    for r in result["loader"]:
        lines.append(
            f"| loader only | {r['workers']} | {r['samples_per_s']:,.0f} | {r['samples_per_s'] / step:.2f}× | — |"
        )
    lines.append(f"| step (synthetic, on the device) | — | {step:,.0f} | 1.00× | — |")
    run = result["run"]
    lines.append(
        f"| run (real loader) | {run['input']} | {run['samples_per_s']:,.0f} | {run['samples_per_s'] / step:.2f}× | "
        f"{run['data_wait_frac']:.0%} |"
    )
    return "\n".join(lines) + "\n"


def verdict(result: dict) -> str:
    """Whether the loader keeps up, and whether the real run reaches the step's pace (and if not, why)."""
    step, run = result["step"]["samples_per_s"], result["run"]
    enough = [r["workers"] for r in result["loader"] if r["samples_per_s"] >= step]
    if enough:
        said = f"The loader keeps up from {min(enough)} workers on (loader-only samples/s >= the step's)."
    else:
        best = max(result["loader"], key=lambda r: r["samples_per_s"])
        said = (
            f"The loader does not keep up: at best {best['samples_per_s']:,.0f} samples/s ({best['workers']} workers) "
            f"against the step's {step:,.0f}. More workers (if cores allow), images stored near the training size "
            f"(less decoding and resizing) or a faster decoder would raise it."
        )
    said += (
        f" The real run trains at {run['samples_per_s'] / step:.2f}× the step's pace and waits for data "
        f"{run['data_wait_frac']:.0%} of the time"
    )
    if run["samples_per_s"] < 0.9 * step and run["data_wait_frac"] <= INPUT_BOUND:
        said += (
            ": the gap is not waiting for batches, so the loader workers are slowing the step itself (they "
            "share the CPU cores, and on a CPU-trained run the cores the step computes on)"
        )
    return said + "."


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="mprun overrides: dataset=..., model=..., precision=..., trainer.*")
    ap.add_argument("--workers", default=default_workers(), help="num_workers values for the loader-only path")
    ap.add_argument("--warmup", type=at_least(0), default=5, help="untimed batches/steps first")
    ap.add_argument("--steps", type=at_least(1), default=30, help="timed batches/steps")
    ap.add_argument(
        "--make-imagefolder", type=Path, help="first write a generated imagefolder here (if it is not there)"
    )
    ap.add_argument("--images", type=at_least(1), default=2000, help="with --make-imagefolder: how many images")
    ap.add_argument("--classes", type=at_least(1), default=10, help="with --make-imagefolder")
    ap.add_argument("--size", default="500x375", help="with --make-imagefolder: WxH (ImageNet's typical photo size)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    if args.make_imagefolder and not (args.make_imagefolder / "train").is_dir():
        w, h = map(int, args.size.split("x"))
        make_imagefolder(args.make_imagefolder, args.images, args.classes, (w, h))
    cfg = compose(args.overrides)
    if "num_workers" not in cfg.dataset:
        raise SystemExit(
            f"bench/loader.py measures datasets read from disk (imagefolder, cifar10, mnist, ...); "
            f"the configured dataset ({cfg.dataset._target_}) is held in memory"
        )
    checked = config.validate(cfg)
    trainer = checked.trainer
    probe = build.dataset(checked, 0, torch.device("cpu"))
    shape, classes, batch = list(probe.example().shape[1:]), probe.num_classes, int(cfg.dataset.batch_size)
    if len(probe.train) < args.warmup + args.steps + 1:
        raise SystemExit(
            f"bench/loader.py: the train set has {len(probe.train)} batches of {batch}; --warmup "
            f"{args.warmup} + --steps {args.steps} need {args.warmup + args.steps + 1}. Lower them or use more data."
        )
    del probe

    loader = [loader_rate(args.overrides, int(w), args.warmup, args.steps) for w in args.workers.split(",")]
    for r in loader:
        print(f"loader only, num_workers={r['workers']}: {r['samples_per_s']:,.0f} samples/s", flush=True)
    step = train_rate(
        step_overrides(args.overrides, shape, classes, batch, batch * (args.warmup + args.steps + 1)),
        args.warmup,
        args.steps,
    )
    print(f"step (synthetic on the device): {step['samples_per_s']:,.0f} samples/s", flush=True)
    run = train_rate(args.overrides, args.warmup, args.steps)
    print(
        f"run (real loader, {run['input']}): {run['samples_per_s']:,.0f} samples/s, "
        f"waited for data {run['data_wait_frac']:.0%}",
        flush=True,
    )

    device = resolve_device(trainer.device)
    name = device_name(device)
    result = {
        "benchmark": "loader",
        "date": str(date.today()),
        "device": name,
        "cores": usable_cores(),
        "torch": torch.__version__,
        "overrides": args.overrides,
        "shape": shape,
        "batch": batch,
        "warmup": args.warmup,
        "steps": args.steps,
        "loader": loader,
        "step": step,
        "run": run,
    }
    result["verdict"] = verdict(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loader.json").write_text(json.dumps(result, indent=2))
    md = (
        f"Input pipeline vs training step, {result['date']}, {name}, {usable_cores()} cores, torch {result['torch']}, "
        f"batch {batch}, input {'x'.join(map(str, shape))}: "
        f"`python bench/loader.py --warmup {args.warmup} --steps {args.steps} "
        f"--workers {args.workers} {' '.join(args.overrides)}`\n\n" + table(result) + "\n" + result["verdict"] + "\n"
    )
    (args.out / "loader.md").write_text(md)
    print("\n" + md)


if __name__ == "__main__":
    main()

"""How fast each autocast dtype trains this model on this CPU, measured: what precision=auto picks from on a CPU,
and what decides whether an explicit bf16 or fp16 run is warned of emulation.

A flag list cannot say it: AVX512-BF16 without AMX trained the default CNN 1.8x faster in bf16 than in fp32, while
an AVX2-only CPU ran bf16 about 10x slower. So a few forward and backward passes of the run's own model on one of its
own batches are timed per dtype, on a copy of the model (the run's weights, buffers and random state are untouched).
The result is kept per (CPU, torch, threads, model, batch) in a JSON file under the outputs root, so a sweep, or the
same command again, measures once.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mprun.data.loaders import Batch
from mprun.tasks import Task

log = logging.getLogger(__name__)

CACHE_FILE = ".mprun_cpu_probe.json"  # under the outputs root
STEPS = 3  # timed steps per dtype, after one untimed (oneDNN builds its kernels on the first)
GIVE_UP = 3.0  # a dtype whose untimed step took this many times fp32's untimed step is not timed further


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _key(model: nn.Module, batch: Batch, dtypes: list[str]) -> str:
    """What the timings depend on: the CPU, torch, its threads, the model's code and shapes, the batch's shape."""
    shapes = ",".join(f"{n}:{tuple(p.shape)}" for n, p in model.named_parameters())
    x, _ = batch
    parts = [cpu_name(), torch.__version__, str(torch.get_num_threads()), type(model).__qualname__, shapes]
    parts += [f"{tuple(x.shape)}:{x.dtype}", ",".join(dtypes)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def _step(model: nn.Module, batch: Batch, task: Task, dtype: torch.dtype | None) -> tuple[float, float]:
    """One forward and backward pass in this autocast dtype (None: fp32): (seconds, loss)."""
    x, y = batch
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = task.loss(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start, float(loss.detach())


def _time_all(model: nn.Module, batch: Batch, task: Task, dtypes: dict[str, torch.dtype]) -> dict[str, Any]:
    """The median milliseconds of a training pass per dtype (fp32 first), and each one's loss. After one untimed
    pass each, the timed passes alternate between the dtypes, so a burst of other work on the machine falls on all of
    them alike instead of on whichever was being timed (a cached pick outlives the burst). A dtype whose untimed pass
    took GIVE_UP times fp32's, or that fails, is not timed further."""
    candidates: dict[str, torch.dtype | None] = {"fp32": None, **dtypes}
    found: dict[str, Any] = {}
    times: dict[str, list[float]] = {}
    for name, dtype in candidates.items():
        torch.manual_seed(0)
        try:
            seconds, loss = _step(model, batch, task, dtype)
        except RuntimeError as e:  # an op this CPU cannot run in the dtype: a candidate that lost, not a crash
            found[name] = {"ms": float("inf"), "loss": float("nan"), "steps": 0, "error": str(e).splitlines()[0]}
            model.zero_grad(set_to_none=True)
            continue
        found[name] = {"ms": seconds * 1e3, "loss": loss, "steps": 1}
        if dtype is None or seconds <= GIVE_UP * found["fp32"]["ms"] / 1e3:  # else far slower: one pass says enough
            times[name] = []
    for _ in range(STEPS):
        for name in times:
            torch.manual_seed(0)
            times[name].append(_step(model, batch, task, candidates[name])[0])
    for name, taken in times.items():
        found[name] = {**found[name], "ms": statistics.median(taken) * 1e3, "steps": STEPS}
    return found


def measure(
    model: nn.Module, batch: Batch, task: Task, dtypes: dict[str, torch.dtype], cache_dir: Path | None
) -> dict[str, Any]:
    """{"fp32": {"ms", "loss", "steps"}, "bf16": {...}, ..., "cached": bool}: fp32 and each autocast dtype given,
    timed on a copy of the model in training mode, on this batch; read from cache_dir's file when measured before."""
    key = _key(model, batch, list(dtypes))
    path = cache_dir / CACHE_FILE if cache_dir is not None else None
    cache: dict[str, Any] = {}
    if path is not None and path.is_file():
        try:
            cache = json.loads(path.read_text())
        except (OSError, ValueError):
            cache = {}  # unreadable: measured again and written whole
    if key in cache:
        return {**cache[key], "cached": True}
    probe = copy.deepcopy(model).train()
    with torch.random.fork_rng(devices=[]):  # dropout draws here leave the run's random state as it was
        found = _time_all(probe, batch, task, dtypes)
    del probe
    if path is not None:
        try:
            latest = json.loads(path.read_text()) if path.is_file() else {}  # a parallel job may have added keys
        except (OSError, ValueError):
            latest = {}
        latest[key] = found
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(latest, indent=1))
        tmp.replace(path)  # whole or not at all
    return {**found, "cached": False}

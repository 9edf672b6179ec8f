"""Checkpoints: the unwrapped model plus everything needed to continue, written atomically."""

from __future__ import annotations

import os
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mprun import __version__
from mprun.errors import ConfigError


def unwrap(model: nn.Module) -> nn.Module:
    """The module under torch.compile's wrapper (still DDP-wrapped under DDP), so state_dict keys carry no
    `_orig_mod.` prefix and its forward runs eagerly."""
    return getattr(model, "_orig_mod", model)


def user_module(model: nn.Module) -> nn.Module:
    """The user's module under both torch.compile's and DDP's wrappers: its names are the model's own."""
    inner = unwrap(model)
    return inner.module if isinstance(inner, torch.nn.parallel.DistributedDataParallel) else inner


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states, in types that torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back the RNG states rng_state() captured (CUDA only if both sides have it)."""
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, state: dict[str, Any]) -> Path:
    """Write to a temp file in the same directory, fsync, then rename: a crash never leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({**state, "mprun_version": __version__}, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        tmp.unlink(missing_ok=True)  # a torn temp file is no checkpoint
        # A second Ctrl-C inside torch.save raises there, and the zip writer's cleanup then fails on the torn file
        # ("unexpected pos"), hiding the interrupt: the interrupt is what ends the run, as it would anywhere else.
        cause = e.__context__
        while cause is not None and not isinstance(cause, KeyboardInterrupt):
            cause = cause.__context__
        if cause is not None and not isinstance(e, KeyboardInterrupt):
            raise cause from None
        raise
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with weights_only=True (never executes code); a damaged file gives a clear error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    # torch.load does not check the zip records' CRC-32s: a flipped byte in tensor data loads silently
    # (measured: 64 zeroed bytes turned a sum of 1000 into 984). testzip() reads every record and checks
    # them. It catches damage and naive edits, not a forger who recomputes the CRCs.
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ConfigError(f"checkpoint {path} is unreadable (truncated, corrupt or not a checkpoint): {e}") from e
    if bad is not None:
        raise ConfigError(f"checkpoint {path} is damaged or tampered with: record {bad} fails its CRC-32 check")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # zip, pickle and unpickler errors all mean "unreadable"
        raise ConfigError(f"checkpoint {path} is unreadable (truncated, corrupt or not a checkpoint): {e}") from e


class Checkpoints:
    """A run's checkpoints/ directory: periodic step-<N>.pt files (the newest keep_last kept), best.pt at the best
    evaluation so far (trainer.keep_best), and final.pt or interrupted.pt at the end (final.pt replaces the
    interrupted.pt a resume in place continued)."""

    FINAL, INTERRUPTED, BEST = "final.pt", "interrupted.pt", "best.pt"

    def __init__(self, directory: Path, keep_last: int) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last

    def save(self, name: str, state: dict[str, Any]) -> Path:
        """Write one checkpoint atomically, then drop periodic ones beyond keep_last."""
        path = save(self.directory / name, state)
        if name == self.FINAL:  # the run ended: what it was interrupted at is history, and as large as the model
            (self.directory / self.INTERRUPTED).unlink(missing_ok=True)
        self.prune()
        return path

    def periodic_name(self, step: int) -> str:
        return f"step-{step:09d}.pt"

    def prune(self) -> None:
        """Delete periodic checkpoints beyond keep_last, and temp files a killed writer left behind."""
        periodic = sorted(self.directory.glob("step-*.pt"))
        for old in periodic[: max(0, len(periodic) - self.keep_last)]:
            old.unlink(missing_ok=True)
        for tmp in self.directory.glob(".*.tmp-*"):
            if not tmp.name.endswith(f".tmp-{os.getpid()}"):
                tmp.unlink(missing_ok=True)


def carry_best(resumed_from: Path, directory: Path, has_best: bool) -> None:
    """A run resumed into another directory takes the best.pt beside its checkpoint along (`has_best`: the checkpoint
    carries a best so far): best.pt is written only when an evaluation beats that best, so without it the new
    directory would have none until one does. The one beside the checkpoint is that best when it is no newer than
    the checkpoint; a newer one is a later best, of training past it, and stays where it is."""
    old, new = Path(resumed_from).parent / Checkpoints.BEST, Path(directory) / Checkpoints.BEST
    if not has_best or not old.is_file() or new.exists() or old.resolve() == new.resolve():
        return
    if old.stat().st_mtime_ns > Path(resumed_from).stat().st_mtime_ns:
        return
    new.parent.mkdir(parents=True, exist_ok=True)
    tmp = new.with_name(f".{new.name}.tmp-{os.getpid()}")
    shutil.copy2(old, tmp)
    os.replace(tmp, new)  # never a torn best.pt


def newest(directory: Path) -> Path | None:
    """The most recently written checkpoint in a directory, if any."""
    found = [p for p in Path(directory).glob("*.pt") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def resume_path(spec: str | None, run_dir: Path) -> Path | None:
    """trainer.resume -> the checkpoint to load: a file; a run directory's newest; or, for `auto`,
    this run directory's newest (None if it has none yet: a first start)."""
    if not spec:
        return None
    if spec == "auto":
        return newest(Path(run_dir) / "checkpoints")
    path = Path(spec)
    if path.is_dir():
        found = newest(path / "checkpoints") or newest(path)
        if found is None:
            raise ConfigError(f"trainer.resume={spec}: no checkpoint (*.pt) in {path} or {path / 'checkpoints'}")
        return found
    if not path.is_file():
        raise ConfigError(
            f"trainer.resume={spec}: no such file or directory (give a .pt file, a run directory, or auto)"
        )
    return path

"""Checkpoints: the unwrapped model plus everything needed to continue, written atomically."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mprun import __version__
from mprun.errors import ConfigError


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile's wrapper, so state_dict keys carry no `_orig_mod.` prefix."""
    return getattr(model, "_orig_mod", model)


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


def save(path: Path, state: dict[str, Any]) -> Path:
    """Write to a temp file in the same directory, fsync, then rename: a crash never leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save({**state, "mprun_version": __version__}, f)
        f.flush()
        os.fsync(f.fileno())
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
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - zip, pickle and unpickler errors all mean "unreadable"
        raise ConfigError(f"checkpoint {path} is unreadable (truncated, corrupt or not a checkpoint): {e}") from e

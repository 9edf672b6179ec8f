"""What the benchmarks share: mprun's config composed as a run composes it, quiet, untracked, in a temp dir."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parent.parent


def compose(overrides: list[str], tracking: bool = False) -> DictConfig:
    """conf/ with these overrides (later ones win), writing under a fresh temp dir, progress off."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from mprun import config
    from mprun.cli import CONFIG_DIR, PRIMARY

    config.register()
    base = [f"paths.root_dir={tempfile.mkdtemp()}", "paths.run_dir=${paths.root_dir}/run", "trainer.progress=off"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(PRIMARY, overrides=base + ([] if tracking else ["tracking=none"]) + overrides)


def sync(device: torch.device) -> None:
    """Wait for the queued GPU work: host clocks read after this include it."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int >= low, else a short usage error (not a traceback from an empty median later)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum, {low}")
        return value

    return parse

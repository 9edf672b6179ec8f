"""Progress display: a tqdm bar on a terminal, plain log lines elsewhere (CI, files, sweeps)."""

from __future__ import annotations

import logging
import sys
from typing import Any, Mapping

from tqdm import tqdm

log = logging.getLogger("mprun")


def _label(key: str) -> str:
    """val/loss -> val_loss, perf/samples_per_s -> samples_per_s: distinct names, as a user would type them."""
    return key.removeprefix("perf/").replace("/", "_")


def _number(value: float) -> str:
    """4 significant digits, but 10,250 rather than 1.025e+04."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _fmt(values: Mapping[str, float]) -> str:
    return "  ".join(f"{_label(k)}={_number(v)}" for k, v in values.items())


class Progress:
    """Log lines per epoch. Subclass BarProgress adds a live bar."""

    def __init__(self, epochs: int, batches: int, enabled: bool = True) -> None:
        self.epochs, self.batches, self.enabled = epochs, batches, enabled

    @staticmethod
    def create(mode: str, epochs: int, batches: int) -> "Progress":
        """mode: auto | bar | log | off."""
        if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
            return BarProgress(epochs, batches)
        return Progress(epochs, batches, enabled=mode != "off")

    def start_epoch(self, epoch: int) -> None:
        """An epoch begins (0-based)."""

    def advance(self, n: int) -> None:
        """n more batches are done."""

    def show(self, values: Mapping[str, float]) -> None:
        """Latest values at a log step."""

    def end_epoch(self, epoch: int, values: Mapping[str, float]) -> None:
        """An epoch ended (1-based: the epoch that ran, whole or cut short by max_steps) with these values."""
        if self.enabled:
            log.info("epoch %d/%d  %s", epoch, self.epochs, _fmt(values))

    def close(self) -> None:
        """Training ended."""


class BarProgress(Progress):
    """tqdm bar per epoch, updated only with values the loop already synced at log steps."""

    bar: Any = None  # the open epoch's bar

    def start_epoch(self, epoch: int) -> None:
        self.close()
        self.bar = tqdm(total=self.batches, desc=f"epoch {epoch + 1}/{self.epochs}", leave=False, dynamic_ncols=True)

    def advance(self, n: int) -> None:
        self.bar.update(n)

    def show(self, values: Mapping[str, float]) -> None:
        self.bar.set_postfix_str(_fmt(values), refresh=False)

    def end_epoch(self, epoch: int, values: Mapping[str, float]) -> None:
        self.close()
        super().end_epoch(epoch, values)

    def close(self) -> None:
        """Close the open bar, if any: at an epoch's end, and when a stop signal or an error ends it early."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

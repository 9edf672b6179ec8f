"""The base of every buildable group's schema (model, dataset, optimizer, scheduler, tracking).

Each option's dataclass states its defaults once; its YAML file in conf/ states only what makes it that option.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING


@dataclass
class Buildable:
    """What hydra.utils.instantiate builds: `_target_`, called later with what only the run knows (parameters,
    the device, the dataset's shape), hence `_partial_`."""

    _target_: str = MISSING
    _partial_: bool = True

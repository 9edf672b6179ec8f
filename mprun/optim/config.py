"""The optimizer and scheduler groups' schemas. Imports no torch.

Schedulers count attempted optimizer steps: the loop calls scheduler.step() after every step, including one the loss
scaler skipped (as a torch.amp loop does; knowing would cost a host sync).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from mprun.errors import require
from mprun.schema import Buildable


@dataclass
class OptimizerConfig(Buildable):
    lr: float = 1e-3
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        require(self.lr > 0, f"lr={self.lr} must be > 0")
        require(self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0")


@dataclass
class SGDConfig(OptimizerConfig):
    _target_: str = "torch.optim.SGD"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4  # the usual L2 for SGD-trained CNNs
    nesterov: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 <= self.momentum < 1, f"momentum={self.momentum} must be in [0, 1)")
        require(not self.nesterov or self.momentum > 0, "nesterov=true needs momentum > 0")


@dataclass
class AdamConfig(OptimizerConfig):
    _target_: str = "torch.optim.Adam"
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"betas={list(self.betas)} must be two values in [0, 1)",
        )
        require(self.eps > 0, f"eps={self.eps} must be > 0")


@dataclass
class AdamWConfig(AdamConfig):
    _target_: str = "torch.optim.AdamW"
    lr: float = 3e-3  # the default run (simple_cnn on digits) reaches 0.95+ val acc in 10 epochs with it
    weight_decay: float = 0.01


@dataclass
class SchedulerConfig(Buildable):
    warmup_steps: int = 0  # linear warmup from 0 over this many optimizer steps

    def __post_init__(self) -> None:
        require(self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0")


@dataclass
class ConstantConfig(SchedulerConfig):
    _target_: str = "mprun.optim.factories.constant"


@dataclass
class CosineConfig(SchedulerConfig):
    _target_: str = "mprun.optim.factories.cosine"
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")


@dataclass
class StepConfig(SchedulerConfig):
    _target_: str = "mprun.optim.factories.step"
    step_size: int = 1000  # optimizer steps between decays
    gamma: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.step_size >= 1, f"step_size={self.step_size} must be >= 1")
        require(0 < self.gamma <= 1, f"gamma={self.gamma} must be in (0, 1]")


@dataclass
class OneCycleConfig(SchedulerConfig):
    _target_: str = "mprun.optim.factories.onecycle"
    pct_start: float = 0.3  # used when warmup_steps is 0
    div_factor: float = 25.0
    final_div_factor: float = 1e4

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 < self.pct_start < 1, f"pct_start={self.pct_start} must be in (0, 1)")
        require(self.div_factor > 0, f"div_factor={self.div_factor} must be > 0 (the rate starts at lr / div_factor)")
        require(
            self.final_div_factor > 0,
            f"final_div_factor={self.final_div_factor} must be > 0 "
            "(the rate ends at lr / div_factor / final_div_factor)",
        )

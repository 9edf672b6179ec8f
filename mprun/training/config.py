"""The trainer group's schema: epochs and steps, device, seed, logging, checkpoints, resume, strategy. Imports no
torch."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional

from mprun.errors import require

# Waiting for data more than this share of an epoch means the input pipeline, not the model, sets the pace: a
# pipeline that keeps up shows a few percent at most (the first batch of each epoch). The loop warns past it, and the
# report notes the jobs past it.
INPUT_BOUND = 0.10


# The validation metrics trainer.keep_best can follow, and whether more is better. A language model's ppl and bpb
# exist for language models only (build checks the metric against the task).
BEST_METRICS = {"val/acc": True, "val/loss": False, "val/ppl": False, "val/bpb": False}


class DeviceName(Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Strategy(Enum):
    single = "single"  # one process
    ddp = "ddp"  # DistributedDataParallel: a full replica per rank, gradients all-reduced
    fsdp = "fsdp"  # FSDP2 fully_shard: parameters, gradients and optimizer state sharded over ranks


class ProgressMode(Enum):
    auto = "auto"  # a bar on a terminal, log lines otherwise
    bar = "bar"
    log = "log"
    off = "off"


@dataclass
class TrainerConfig:
    max_epochs: int = 10
    max_steps: int = -1  # optimizer steps (taken or skipped) across all epochs; -1: no limit
    grad_accum_steps: int = 1
    device: DeviceName = DeviceName.auto
    seed: int = 0
    eval_every_epochs: int = 1
    log_every_steps: int = 10
    channels_last: bool = False
    compile: bool = False
    # cuDNN times its convolution algorithms for each new input shape and keeps the fastest (as timm's and
    # torchvision's reference training scripts do); false: the same algorithms every run, for reproducibility.
    cudnn_benchmark: bool = True
    progress: ProgressMode = ProgressMode.auto
    # Periodic checkpoints in <run dir>/checkpoints/ (0: off); final.pt / interrupted.pt are always written.
    checkpoint_every_steps: int = 0
    checkpoint_every_epochs: int = 1
    keep_last: int = 2  # periodic checkpoints kept; older ones are deleted
    # checkpoints/best.pt holds training at the evaluation with the best value of this metric: auto (the task's
    # headline: val/acc, or a language model's val/bpb or val/loss), one of BEST_METRICS, or none
    keep_best: str = "auto"
    # Continue from a checkpoint: a .pt file, a run directory (its newest checkpoint), or auto (this run
    # directory's newest, or a fresh start if it has none: the pattern for preempted, requeued jobs).
    resume: Optional[str] = None
    # single process, or under torchrun: ddp (DistributedDataParallel) / fsdp (FSDP2 fully_shard)
    strategy: Strategy = Strategy.single

    def __post_init__(self) -> None:
        require(self.max_epochs >= 1, f"max_epochs={self.max_epochs} must be >= 1")
        require(
            self.max_steps == -1 or self.max_steps >= 1, f"max_steps={self.max_steps} must be >= 1, or -1 for no limit"
        )
        require(self.grad_accum_steps >= 1, f"grad_accum_steps={self.grad_accum_steps} must be >= 1")
        require(self.eval_every_epochs >= 1, f"eval_every_epochs={self.eval_every_epochs} must be >= 1")
        require(self.log_every_steps >= 1, f"log_every_steps={self.log_every_steps} must be >= 1")
        require(
            self.checkpoint_every_steps >= 0,
            f"checkpoint_every_steps={self.checkpoint_every_steps} must be >= 0 (0: off)",
        )
        require(
            self.checkpoint_every_epochs >= 0,
            f"checkpoint_every_epochs={self.checkpoint_every_epochs} must be >= 0 (0: off)",
        )
        require(self.keep_last >= 1, f"keep_last={self.keep_last} must be >= 1")
        choices = ["auto", *BEST_METRICS, "none"]
        require(self.keep_best in choices, f"keep_best={self.keep_best}: choose one of {', '.join(choices)}")

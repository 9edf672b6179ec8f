"""torch.distributed for mprun: DDP and FSDP2 (fully_shard), launched by torchrun. Nothing home-made.

    torchrun --nproc_per_node=N -m mprun trainer.strategy=ddp ...

Every rank builds the same model and data; the data is sharded by rank (the per-epoch order is the same
on every rank, each takes every world-th sample, as DistributedSampler does). Only rank 0 tracks and
writes checkpoints. Metrics are averaged over ranks at log steps, each rank evaluates its share of the
validation set, and a stop signal is agreed on at log steps, so every rank stops after the same step.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mprun.errors import ConfigError
from mprun.training.config import Strategy

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the job. A single process is rank 0 of 1."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _reduce(self, values: list[float], op: str) -> list[float]:
        """Host numbers reduced elementwise over ranks with ReduceOp.<op>, in one collective (every rank calls it)."""
        if self.size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
        return t.tolist()

    def sum(self, values: list[float]) -> list[float]:
        """Host numbers summed elementwise over ranks (a collective)."""
        return self._reduce(values, "SUM")

    def max(self, value: float) -> float:
        """The largest of a host number over ranks (a collective)."""
        return self._reduce([value], "MAX")[0]

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any (a collective)."""
        return self.max(float(flag)) > 0

    def barrier(self) -> None:
        """Wait until every rank is here (a collective)."""
        if self.size > 1:
            dist.barrier()

    def from_main(self, make: Callable[[], T]) -> T:
        """make() on rank 0, its result given to every rank (a collective): a decision the ranks must share."""
        if self.size == 1:
            return make()
        box = [make() if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


SINGLE = World()


def start(strategy: Strategy, want_cuda: bool) -> World:
    """Join the process group torchrun set up (env:// rendezvous); a single process needs none."""
    if strategy is Strategy.single:
        return SINGLE
    if "RANK" not in os.environ:
        _from_submitit()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ConfigError(
            f"trainer.strategy={strategy.value} needs torchrun to start the processes: "
            f"torchrun --nproc_per_node=N -m mprun trainer.strategy={strategy.value} ..."
        )
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        if want_cuda:
            torch.cuda.set_device(world.local_rank)
        # gloo reduces CPU tensors (World's host-number collectives), so CUDA jobs get both backends.
        dist.init_process_group("cpu:gloo,cuda:nccl" if want_cuda else "gloo")
    return world


def _from_submitit() -> None:
    """Inside a multi-task submitit job (hydra/launcher=slurm with tasks_per_node > 1, or submitit_local),
    the tasks are the ranks: export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from SLURM's view of them."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return
    # submitit comes with the SLURM launcher's extra: only jobs it started get here
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    if JobEnvironment().num_tasks > 1:
        # Keep every GPU visible: the device is chosen by LOCAL_RANK, as under torchrun.
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def stop() -> None:
    """Leave the process group (every exit path: success, error, signal)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(
    module: nn.Module, strategy: Strategy, device: torch.device, precision: Any, fp32_modules: list[str]
) -> nn.Module:
    """The module as the strategy trains it (precision: the resolved Precision). Checkpoints hold the plain module."""
    if strategy is Strategy.ddp:
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    if strategy is Strategy.fsdp:
        from torch.distributed.fsdp import fully_shard  # 0.5 s to import: FSDP runs only

        policy = precision.fsdp_policy(fp32_modules)  # refuses what FSDP2 cannot shard correctly
        for unit in fsdp_units(module):  # shard each block, then the root
            fully_shard(unit, mp_policy=policy)
        fully_shard(module, mp_policy=policy)
        return module
    return module


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 DTensor (a view: writing it writes the sharded tensor), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def fsdp_units(module: nn.Module, largest: float = 0.1) -> list[nn.Module]:
    """The blocks FSDP shards one by one (each gathered only while it runs): the top-level children, except that a
    child holding more than `largest` of the model's parameters is split into its own children, recursively. A
    ViT's `blocks`, a ConvNeXt or Swin stage, torchvision's ViT encoder each held 65-98% of the model: sharded
    whole, nearly all of it was gathered at once, and FSDP saved no memory. Leftover parameters stay with the root,
    and so do blocks that share a parameter with another block (a language model's token embedding and its tied
    output layer): FSDP2 manages each parameter in one group only."""

    def size(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters() if p.requires_grad)

    limit, units = largest * size(module), []

    def split(parent: nn.Module) -> None:
        for child in parent.children():
            if size(child) > limit and any(True for _ in child.children()):
                split(child)
            elif size(child):
                units.append(child)

    split(module)
    owners: dict[int, int] = {}  # parameter -> how many units hold it
    for unit in units:
        for p in unit.parameters():
            owners[id(p)] = owners.get(id(p), 0) + 1
    return [u for u in units if all(owners[id(p)] == 1 for p in u.parameters())]


def state_dicts(module: nn.Module, optimizer: torch.optim.Optimizer, strategy: Strategy) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state, as a single process would have it. Under FSDP this
    gathers the shards: a collective, so every rank calls it (only rank 0 then writes the file)."""
    if strategy is not Strategy.fsdp:
        return module.state_dict(), optimizer.state_dict()
    # 0.6 s to import: FSDP runs only
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_state_dicts(
    module: nn.Module, optimizer: torch.optim.Optimizer, strategy: Strategy, model_sd: dict, optim_sd: dict
) -> None:
    """Load full model and optimizer state into a (possibly sharded) module and its optimizer."""
    if strategy is not Strategy.fsdp:
        module.load_state_dict(model_sd)
        optimizer.load_state_dict(optim_sd)
        return
    # 0.6 s to import: FSDP runs only
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        module,
        optimizer,
        model_state_dict=model_sd,
        optim_state_dict=optim_sd,
        options=StateDictOptions(full_state_dict=True),
    )

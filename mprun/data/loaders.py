"""Loaders with a deterministic per-epoch order, and DataBundle, what the loop and the model builder know of a dataset.

In-memory datasets are served by TensorLoader: whole-batch index_select on tensors that can live on the GPU, with no
per-sample __getitem__ or collate. Datasets on disk use torch's DataLoader (EpochDataLoader) with pinned memory and
persistent workers. TimedLoader measures how long the training loop waits for its next batch: the test of whether
the input pipeline keeps up.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

import numpy as np
import torch

from mprun.tasks import CLASSIFICATION, Task

log = logging.getLogger("mprun.data")

Batch = tuple[torch.Tensor, torch.Tensor]


class Loader(Protocol):
    def __iter__(self) -> Iterator[Batch]: ...
    def __len__(self) -> int: ...
    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Order the next pass by (seed, epoch) and start it after skip_batches batches (a resumed epoch)."""

    def shard(self, rank: int, world: int) -> None:
        """Keep every world-th sample of each epoch's order, starting at rank (DistributedSampler's split; see
        EpochBatches)."""

    def real_samples(self) -> int:
        """This rank's samples in one pass, not counting the padding an evaluation shard ends with."""

    def describe(self) -> str:
        """What serves the batches, in words (for the summary and the input-bound warning)."""

    def remedy(self) -> str:
        """What would make this loader faster, for the input-bound warning."""

    def smallest_batch(self) -> int:
        """The fewest samples a batch of this rank's pass holds (a kept ragged tail, a share smaller than a batch)."""


@dataclass
class DataBundle:
    """What the loop and the model builder need to know about a dataset."""

    name: str
    train: Loader
    val: Loader
    in_chans: int
    image_size: tuple[int, int]
    num_classes: int  # a language model's: its vocabulary (the classes of each next-token prediction)
    task: Task = CLASSIFICATION
    context: int = 0  # a language model's window length (dataset.block_size)
    vocab_size: int = 0  # token inputs: the ids are below this (0: image inputs)
    source: dict[str, str] = field(default_factory=dict)  # what the data was made from, recorded as params

    def model_inputs(self) -> dict[str, Any]:
        """What a model is built for: the fields its task names (an image classifier's input channels, image size
        and classes; a text classifier's vocabulary and classes; a language model's vocabulary and context)."""
        return {key: getattr(self, key) for key in self.task.inputs}

    def facts(self, example: torch.Tensor) -> dict[str, Any]:
        """What the data decides that a project's model may take, by name (mprun passes each one its signature
        names): a classifier's num_classes, input_shape and in_features, and an image's in_chans and image_size; a
        text classifier's vocab_size; a language model's vocab_size and block_size (its window). `example`: a batch
        of inputs."""
        if self.task.per_position:
            return {"vocab_size": self.vocab_size, "block_size": self.context}
        shape = tuple(example.shape[1:])
        out: dict[str, Any] = {"num_classes": self.num_classes, "input_shape": shape}
        if self.vocab_size:
            return {**out, "vocab_size": self.vocab_size}
        out["in_features"] = int(np.prod(shape))
        if len(shape) == 3:
            out.update(in_chans=shape[0], image_size=shape[1:])
        return out

    def example_batch(self) -> Batch:
        """The first validation batch: for checking that a model fits, and for timing it (mprun.precision.probe)."""
        return next(iter(self.val))

    def example(self) -> torch.Tensor:
        """Two input samples, for checking that a model fits."""
        return self.example_batch()[0][:2]


def batch_count(samples: int, batch_size: int, drop_last: bool) -> int:
    """Batches in one pass: a ragged last batch counts unless it is dropped."""
    return samples // batch_size if drop_last else -(-samples // batch_size)


def rank_positions(n: int, rank: int, world: int, size: int) -> torch.Tensor:
    """The `size` positions in one pass's order of n samples that this rank takes: every world-th, from
    rank. Past the end of the order they wrap around to its start, as DistributedSampler pads; that
    padding sits at the end of a share, and evaluate() leaves it out of its sums."""
    return torch.arange(rank, rank + size * world, world) % max(1, n)


def real_count(n: int, rank: int, world: int, size: int) -> int:
    """How many of rank_positions(n, rank, world, size) are samples rather than padding."""
    return min(size, len(range(rank, n, world)))


class EpochBatches(torch.utils.data.Sampler[list[int]]):
    """This rank's batches of sample indices, pass by pass: the one place that decides them, for both
    TensorLoader and the DataLoader (its batch_sampler). The order depends on (seed, epoch) alone, as
    RandomSampler with a seeded generator draws it, so a run can be replayed; each rank takes its share
    (rank_positions); a resumed pass starts after its first skip batches without loading them; training
    drops a ragged last batch (a size-1 batch breaks BatchNorm) unless it is the only one."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int) -> None:
        # A batch larger than the split holds the split: the same one batch per pass, without an evaluation padded
        # out to batch_size (batch_size=100000 on digits spent 19 s and 4.7 GB padding 360 validation samples).
        if batch_size > n > 0 and shuffle:
            log.warning(
                "dataset.batch_size=%d is larger than the training split (%d samples): each pass is one batch of %d",
                batch_size,
                n,
                n,
            )
        batch_size = min(batch_size, n) if n > 0 else batch_size
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.epoch, self.skip = 0, 0
        self.rank, self.world = 0, 1

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches

    def shard(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def share(self) -> int:
        """Positions per rank in one pass, the same on every rank. Training (it shuffles) drops the tail
        that does not divide, so every rank takes as many steps. Evaluation keeps every sample and pads
        each share up to whole batches: every rank runs as many batches (FSDP's forward is a collective),
        all of one shape (a ragged last batch would cost a compiled model a dynamic-shape recompile)."""
        if self.shuffle:
            return self.n // self.world
        return -(-self.n // (self.world * self.batch_size)) * self.batch_size

    def real_samples(self) -> int:
        return real_count(self.n, self.rank, self.world, self.share())

    def __len__(self) -> int:
        """Batches in a full pass, the same on every rank."""
        share = self.share()
        return batch_count(share, self.batch_size, drop_last=self.shuffle and share >= self.batch_size)

    def smallest(self) -> int:
        """The fewest samples one of the pass's batches holds: its last (the whole share when it is one batch)."""
        return min(self.batch_size, self.share() - (len(self) - 1) * self.batch_size)

    def order(self) -> torch.Tensor:
        """This rank's samples in the current epoch's order (a CPU tensor)."""
        order = (
            torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
            if self.shuffle
            else torch.arange(self.n)
        )
        return order[rank_positions(self.n, self.rank, self.world, self.share())]

    def split(self, order: torch.Tensor) -> Iterator[torch.Tensor]:
        """`order` (on any device) cut into the next pass's batches; a skip applies to that pass only."""
        skip, self.skip = self.skip, 0
        for i in range(skip, len(self)):
            yield order[i * self.batch_size : (i + 1) * self.batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        return (idx.tolist() for idx in self.split(self.order()))


class Batched:
    """A loader whose batches an EpochBatches decides: the Loader calls about order and sharding go to it."""

    batches: EpochBatches

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.batches.set_epoch(epoch, skip_batches)

    def shard(self, rank: int, world: int) -> None:
        self.batches.shard(rank, world)

    def real_samples(self) -> int:
        return self.batches.real_samples()

    def smallest_batch(self) -> int:
        return self.batches.smallest()

    def __len__(self) -> int:
        return len(self.batches)


class TensorLoader(Batched):
    """Batches from in-memory tensors: one index_select per batch, in a seeded per-epoch order."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0):
        self.x, self.y = x, y
        self.batches = EpochBatches(len(x), batch_size, shuffle, seed)

    def describe(self) -> str:
        return f"in-memory tensors on {self.x.device}"

    def remedy(self) -> str:
        if self.x.is_pinned():  # host tensors pinned for a GPU: each batch crosses PCIe
            return "keep the tensors on the training device (dataset=synthetic: dataset.on_device=true)"
        # On the training device already (tensors for a GPU are pinned unless they live on it): the wait is the
        # gather, one index_select a batch.
        return (
            f"nothing in the input pipeline: the tensors are on the training device ({self.x.device.type}) and a "
            "batch is one index_select; it is a large share because the training step itself is small (a larger "
            "dataset.batch_size or model makes it a smaller one)"
        )

    def __iter__(self) -> Iterator[Batch]:
        # One copy of the order per pass: a copy from pageable host memory waits for the GPU's queued work.
        for idx in self.batches.split(self.batches.order().to(self.x.device)):
            yield _gather(self.x, idx), _gather(self.y, idx)


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t[idx] as a new tensor. Pinning belongs to an allocation, so rows taken from pinned host tensors are gathered
    into pinned memory (torch's caching host allocator: no cudaHostAlloc per batch), or the non_blocking copy to the
    GPU would come from pageable memory and not overlap."""
    if not t.is_pinned():
        return t.index_select(0, idx)
    return torch.index_select(t, 0, idx, out=torch.empty((len(idx), *t.shape[1:]), dtype=t.dtype, pin_memory=True))


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. what SLURM granted), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def auto_workers() -> int:
    """Loader processes for one rank: the usable cores, shared among the ranks on the node, one left
    for the training process itself; at least 1, at most 8 (beyond that, decoding rarely speeds up
    and each worker holds its own copy of the dataset object)."""
    per_rank = usable_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, per_rank - 1))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's random transforms in one epoch (distinct for index < 2**31 and epoch < 10**6)."""
    return ((seed * 1_000_003 + epoch) * 2**31 + index) % 2**63


class SeededSamples(torch.utils.data.Dataset):
    """A dataset whose random transforms (augmentation: torchvision's draw from torch's CPU RNG) are seeded by (seed,
    epoch, index): a sample is augmented the same way whichever worker loads it, however many workers there are,
    and after a resume (the workers' own RNG streams depend on all three). Its keys are the (epoch, index) pairs
    EpochKeys hands out. The process's RNG state is put back after each sample, which matters with no workers
    (microseconds a sample, against milliseconds to decode an image)."""

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> object:
        epoch, index = key
        state = torch.default_generator.get_state()
        torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))  # torch.manual_seed: CUDA's too
        try:
            return self.dataset[index]
        finally:
            torch.default_generator.set_state(state)


class EpochKeys(torch.utils.data.Sampler[list[tuple[int, int]]]):
    """EpochBatches' batches as (epoch, index) keys for SeededSamples."""

    def __init__(self, batches: EpochBatches) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.batches.epoch
        return ([(epoch, i) for i in batch] for batch in self.batches)


class EpochDataLoader(Batched):
    """torch DataLoader whose batches (EpochBatches) and random transforms (SeededSamples) depend only on the seed,
    the epoch and the sample, so a run can be replayed, resumed exactly, and run with any number of workers."""

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        batch_size: int,
        num_workers: str,
        prefetch_factor: int,
        shuffle: bool,
        seed: int,
        device: torch.device,
    ):
        self.batches = EpochBatches(len(dataset), batch_size, shuffle, seed)
        self.workers = auto_workers() if num_workers == "auto" else int(num_workers)
        self.setting = f"{self.workers} worker{'s' * (self.workers != 1)}" + (
            " (auto)" if num_workers == "auto" else ""
        )
        self.prefetch = prefetch_factor if self.workers > 0 else 0
        self.loader = torch.utils.data.DataLoader(
            SeededSamples(dataset, seed),
            # drawn in this process at each iter(): order, shard, skip, ragged batch
            batch_sampler=EpochKeys(self.batches),
            # Its own generator for the workers' base seed, which it draws at each iter(): drawn from the global RNG,
            # it would shift the training's random numbers (dropout) differently after a resume.
            generator=torch.Generator().manual_seed(seed),
            num_workers=self.workers,
            pin_memory=device.type == "cuda",  # pinned pages make the non_blocking H2D copy truly async
            persistent_workers=self.workers > 0,  # no worker start-up (process spawn, dataset copy) per epoch
            prefetch_factor=self.prefetch or None,
        )

    def remedy(self) -> str:
        return (
            f"raise dataset.num_workers (this process may use {usable_cores()} cores), store images near the "
            "training size so decoding and resizing cost less, keep the data on local disk; "
            "`python bench/loader.py` measures loader vs step speed"
        )

    def describe(self) -> str:
        where = "in the training process" if self.workers == 0 else f"{self.setting}, prefetch {self.prefetch} each"
        return f"DataLoader, {where}{', pinned memory' if self.loader.pin_memory else ''}"

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.loader)


class TimedLoader:
    """A loader that adds up the seconds the training loop spent waiting for its next batch. Where the
    input pipeline keeps up, a batch is ready (prefetched by workers, or an index_select on the device)
    and the wait is near zero; where it does not, the loop and the GPU idle here. Host clock only: on a
    GPU the loop runs ahead of the device and blocks at its sync points, not here, so a GPU-bound run
    shows no wait."""

    def __init__(self, loader: Loader) -> None:
        self.loader, self.waited = loader, 0.0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.loader.set_epoch(epoch, skip_batches)

    def shard(self, rank: int, world: int) -> None:
        self.loader.shard(rank, world)

    def real_samples(self) -> int:
        return self.loader.real_samples()

    def smallest_batch(self) -> int:
        return self.loader.smallest_batch()

    def describe(self) -> str:
        return self.loader.describe()

    def remedy(self) -> str:
        return self.loader.remedy()

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        start = time.perf_counter()
        it = iter(self.loader)  # a DataLoader starts fetching here (and its workers, the first time)
        self.waited += time.perf_counter() - start
        while True:
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                self.waited += time.perf_counter() - start
            yield batch

    def take(self) -> float:
        """Seconds waited since the last take()."""
        waited, self.waited = self.waited, 0.0
        return waited

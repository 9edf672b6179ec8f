"""A project's own dataset: a callable, named by `_target_`, that returns (train, val) map-style datasets.

An item is `(input, label)`, a label being an integer class; or, for a language model, a 1-D tensor of token ids
(the model reads all but the last and predicts each next one) or a pair of such tensors (input, target). mprun works
out the task, the classes (or the vocabulary) and the input shape from the items, checks them, and serves the splits
with its own loaders: a seeded order per epoch (so exact resume holds), dataset.batch_size, workers and DDP shards. A
TensorDataset is served from memory, one index_select per batch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from mprun import guest
from mprun.data.config import UserDatasetConfig
from mprun.data.loaders import DataBundle, EpochDataLoader, TensorLoader
from mprun.errors import ConfigError, require
from mprun.tasks import CLASSIFICATION, LANGUAGE_MODEL, TEXT_CLASSIFICATION, Task

log = logging.getLogger("mprun")

_TASKS = {t.name: t for t in (CLASSIFICATION, TEXT_CLASSIFICATION, LANGUAGE_MODEL)}
_SCAN_NOTE = 50_000  # items read one by one to find the labels: past this, say how to skip it


def _describe(obj: Any) -> str:
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return f"a {type(obj).__name__} of {obj.dtype} and shape {tuple(obj.shape)}"
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of {len(obj)}: ({', '.join(_describe(o) for o in obj[:3])})"
    return f"a {type(obj).__name__}"


def _label(value: Any) -> Optional[int]:
    """An integer class label as an int; None if `value` is not one."""
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    return None


def _tokens(value: Any) -> bool:
    """Whether `value` is a 1-D tensor of integer token ids."""
    return isinstance(value, torch.Tensor) and value.ndim == 1 and not value.is_floating_point() and len(value) > 0


def _unwrapped(item: Any) -> Any:
    """An item as its parts: a 1-tuple (a TensorDataset of one tensor of token windows) is its one tensor."""
    return item[0] if isinstance(item, (tuple, list)) and len(item) == 1 else item


def _kind(item: Any, where: str) -> str:
    """What an item is: 'pair' (input, label), 'tokens' (one window of ids) or 'lm_pair' (input and target ids)."""
    item = _unwrapped(item)
    if _tokens(item):
        return "tokens"
    if isinstance(item, (tuple, list)) and len(item) == 2:
        x, y = item
        if isinstance(x, (torch.Tensor, np.ndarray)) and _label(y) is not None:
            return "pair"
        if _tokens(x) and _tokens(y) and len(x) == len(y):
            return "lm_pair"
        if isinstance(y, (float, np.floating)) or (isinstance(y, torch.Tensor) and y.is_floating_point()):
            raise ConfigError(f"dataset: {where} has a label of {_describe(y)}; labels are integer class indices")
    raise ConfigError(
        f"dataset: {where} is {_describe(item)}; mprun trains on (input, label) pairs (a tensor and an integer "
        "class), or, for a language model, 1-D tensors of token ids"
    )


class _Items(Dataset):
    """A user's split as (input, target) tensors: a window of tokens becomes its input and its next tokens, token
    ids and labels become int64 (cross-entropy's targets), a float64 input float32 (mprun's storage dtype; autocast
    decides the compute dtype)."""

    def __init__(self, dataset: Dataset, kind: str) -> None:
        self.dataset, self.kind = dataset, kind

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _as_tensors(self.dataset[index], self.kind)


def _as_tensors(item: Any, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One item as _Items serves it: (input, target) tensors."""
    item = _unwrapped(item)
    if kind == "tokens":
        ids = torch.as_tensor(item).long()
        return ids[:-1], ids[1:]
    x, y = (torch.as_tensor(part) for part in item)
    if kind == "lm_pair" or _tokens(x):
        return x.long(), y.long()
    return (x.float() if x.dtype == torch.float64 else x), y.long()


def _scan(dataset: Dataset, kind: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's targets (labels, or a language model's token ids) and its inputs' token ids (a text classifier's;
    empty for other inputs): for the classes, the vocabulary and their range. From a TensorDataset's tensors, or a
    `targets` attribute (torchvision's datasets have one) where no target_transform changes it; else read item by
    item, each checked to be of item 0's kind and shape (a split's items are batched together)."""
    first = _as_tensors(dataset[0], kind)[0]
    tokens_in = kind == "pair" and _tokens(first)
    if isinstance(dataset, TensorDataset):
        if kind != "pair":
            return torch.cat([t.flatten() for t in dataset.tensors]), torch.empty(0)
        return dataset.tensors[-1], dataset.tensors[0].flatten() if tokens_in else torch.empty(0)
    known = getattr(dataset, "targets", None)
    if kind == "pair" and not tokens_in and known is not None and getattr(dataset, "target_transform", None) is None:
        try:
            targets = torch.as_tensor(known)
        except (TypeError, ValueError, RuntimeError):
            targets = None
        if (
            targets is not None
            and targets.ndim == 1
            and len(targets) == len(dataset)
            and not targets.is_floating_point()
        ):
            return targets, torch.empty(0)
    if len(dataset) > _SCAN_NOTE:
        log.info("reading the %d items of the %s split for their labels and shapes", len(dataset), split)
    targets, inputs = [], []
    for i in range(len(dataset)):
        item, where = dataset[i], f"item {i} of the {split} split"  # read once: an item may be decoded from disk
        if _kind(item, where) != kind:
            raise ConfigError(f"dataset: {where} is {_describe(item)}, unlike item 0 ({kind})")
        x, y = _as_tensors(item, kind)
        if x.shape != first.shape:
            raise ConfigError(
                f"dataset: {where} has an input of shape {tuple(x.shape)}, item 0 {tuple(first.shape)}: the items of "
                "a split are batched together, so they share one shape (pad token inputs to one length)"
            )
        targets.append(y.flatten())
        if tokens_in:
            inputs.append(x.flatten())
    return torch.cat(targets), torch.cat(inputs) if inputs else torch.empty(0)


def _range(values: torch.Tensor, given: Optional[int], key: str, split: str, what: str) -> int:
    """The count of classes (or tokens): `given`, or the largest value + 1; every value must be in [0, count)."""
    low, high = int(values.min()), int(values.max())
    count = given or high + 1
    if low < 0 or high >= count:
        bad = low if low < 0 else high
        set_by = f"dataset.{key}={given}" if given else f"{count} {what}"
        raise ConfigError(
            f"dataset: {what[:-1]} {bad} in the {split} split is out of range for {set_by} (0 to {count - 1})"
        )
    return count


def _scanned(splits: Any, path: str) -> tuple[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The items' kind, checked to be one across the splits, and each split's scan (_scan), each split checked to
    be a non-empty map-style Dataset."""
    kinds, scans = [], []
    for split, dataset in zip(("train", "val"), splits):
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise ConfigError(
                f"dataset: the {split} split from {path} is {_describe(dataset)}, not a map-style Dataset (len() and "
                "[i]): mprun draws a seeded order of indices each epoch, which exact resume needs"
            )
        require(len(dataset) > 0, f"dataset: the {split} split from {path} is empty")
        kinds.append(_kind(dataset[0], f"item 0 of the {split} split"))
        scans.append(_scan(dataset, kinds[-1], split))
    if kinds[0] != kinds[1]:
        raise ConfigError(f"dataset: the train split's items are {kinds[0]}, the val split's {kinds[1]}")
    return kinds[0], scans


def _counts(found: Task, targets: torch.Tensor, inputs: torch.Tensor, spec: UserDatasetConfig) -> tuple[int, int]:
    """The count of classes and the vocabulary's size (0 where the inputs are not token ids), checked against the
    targets and inputs of both splits."""
    if found.per_position:
        classes = vocab = _range(targets, spec.vocab_size, "vocab_size", "train or val", "tokens")
    else:
        classes = _range(targets, spec.num_classes, "num_classes", "train or val", "labels")
        vocab = _range(inputs, spec.vocab_size, "vocab_size", "train or val", "tokens") if len(inputs) else 0
        require(
            classes >= 2, "dataset: every label is 0; a classifier needs two classes or more (or dataset.num_classes)"
        )
    return classes, vocab


def bundle(
    splits: Any,
    spec: UserDatasetConfig,
    *,
    name: str,
    task: Optional[str],
    seed: int,
    device: torch.device,
    roots: tuple[Path, ...],
) -> DataBundle:
    """The DataBundle of what a user's dataset callable returned, checked; `name`: its option, `task`: model.task,
    where the model names one; `roots`: where the user's code is (guest.roots_of)."""
    path = spec._target_
    if not (isinstance(splits, (tuple, list)) and len(splits) == 2):
        raise ConfigError(f"dataset._target_={path} returned {_describe(splits)}; it must return (train, val) datasets")
    kind, scans = _scanned(splits, path)
    x = _as_tensors(splits[0][0], kind)[0]
    found = _task(kind, x, task)
    targets, inputs = (torch.cat([scan[i] for scan in scans]) for i in (0, 1))
    classes, vocab = _counts(found, targets, inputs, spec)
    train, val = (_loader(s, kind, spec, shuffle, seed, device) for s, shuffle in zip(splits, (True, False)))
    # One batch now, so that items torch cannot batch (or a dataset that fails past its first items) fail here
    # with the dataset named, not at the first step.
    guest.call("dataset", path, lambda: next(iter(val)), roots)
    shape = tuple(x.shape)
    chans, size = (shape[0], shape[1:]) if len(shape) == 3 else (1, (1, shape[0])) if len(shape) == 1 else (0, (0, 0))
    return DataBundle(
        name,
        train,
        val,
        chans,
        tuple(size),
        classes,
        task=found,
        context=shape[0] if found.per_position else 0,
        vocab_size=vocab,
        source={
            "data.task": found.name,
            "data.train_samples": str(len(splits[0])),
            "data.val_samples": str(len(splits[1])),
            "data.input_shape": str(list(shape)),
            ("data.vocab_size" if found.per_position else "data.num_classes"): str(classes),
        },
    )


def _task(kind: str, x: torch.Tensor, named: Optional[str]) -> Task:
    """The task the items make: token windows a language model, integer token inputs with a label a text classifier,
    any other input with a label a classifier; model.task chooses between the two that labelled tokens allow."""
    found = LANGUAGE_MODEL if kind != "pair" else TEXT_CLASSIFICATION if _tokens(x) else CLASSIFICATION
    if named is None or named == found.name:
        return found
    if {named, found.name} == {CLASSIFICATION.name, TEXT_CLASSIFICATION.name} and _tokens(x):
        return _TASKS[named]
    raise ConfigError(
        f"model.task={named}: the dataset's items make a {found.name} task "
        f"({'token windows' if kind != 'pair' else f'inputs of {x.dtype} with a label'})"
    )


def _loader(
    dataset: Dataset, kind: str, spec: UserDatasetConfig, shuffle: bool, seed: int, device: torch.device
) -> Any:
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == (1 if kind == "tokens" else 2):
        x, y = (dataset.tensors[0][:, :-1], dataset.tensors[0][:, 1:]) if kind == "tokens" else dataset.tensors
        if kind != "pair" or (x.ndim == 2 and not x.is_floating_point()):  # token ids, as _Items makes them
            x = x.long()
        elif x.dtype == torch.float64:
            x = x.float()
        return TensorLoader(x.to(device), y.long().to(device), spec.batch_size, shuffle, seed)
    return EpochDataLoader(
        _Items(dataset, kind), spec.batch_size, spec.num_workers, spec.prefetch_factor, shuffle, seed, device
    )

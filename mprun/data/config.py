"""The dataset group's schemas: every option's defaults and checks, and the keys mprun keeps for itself in a
project's own dataset. Imports no torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Optional

from omegaconf import MISSING

from mprun.errors import require
from mprun.schema import Buildable


@dataclass
class DatasetConfig(Buildable):
    TASK = "classification"  # what its DataBundle's task is (mprun.tasks); a class attribute, not a setting
    batch_size: int = 64

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")


@dataclass
class DigitsConfig(DatasetConfig):
    _target_: str = "mprun.data.images.digits"
    val_fraction: float = 0.2
    split_seed: int = 0  # fixed, so the validation set is the same across a seed sweep

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 < self.val_fraction < 1, f"val_fraction={self.val_fraction} must be in (0, 1)")


@dataclass
class SyntheticConfig(DatasetConfig):
    _target_: str = "mprun.data.images.synthetic"
    num_samples: int = 2048
    val_samples: int = 256
    shape: List[int] = field(default_factory=lambda: [3, 32, 32])
    num_classes: int = 10
    on_device: bool = True  # generate straight into GPU memory: measures the step, not the input pipeline

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.num_samples >= 1 and self.val_samples >= 1, "num_samples and val_samples must be >= 1")
        require(
            len(self.shape) == 3 and min(self.shape) >= 1, f"shape={list(self.shape)} must be [channels, height, width]"
        )
        require(self.num_classes >= 2, f"num_classes={self.num_classes} must be >= 2")


class VisionName(Enum):
    mnist = "mnist"
    fashion_mnist = "fashion_mnist"
    cifar10 = "cifar10"
    cifar100 = "cifar100"


@dataclass
class LoaderConfig(DatasetConfig):
    num_workers: str = "auto"  # auto: auto_workers(); a count; 0: load in the training process
    prefetch_factor: int = 2  # batches each worker keeps ready

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.num_workers == "auto" or self.num_workers.isdigit(),
            f"num_workers={self.num_workers} must be a count >= 0, "
            "or auto (one per core this rank can spare, at most 8)",
        )
        require(self.prefetch_factor >= 1, f"prefetch_factor={self.prefetch_factor} must be >= 1")


@dataclass
class VisionConfig(LoaderConfig):
    _target_: str = "mprun.data.images.torchvision_dataset"
    name: VisionName = MISSING
    root: str = MISSING
    download: bool = False
    batch_size: int = 128


@dataclass
class ImageFolderConfig(LoaderConfig):
    _target_: str = "mprun.data.images.image_folder"
    root: str = MISSING
    train_dir: str = "train"
    val_dir: str = "val"
    image_size: int = 224

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.image_size >= 1, f"image_size={self.image_size} must be >= 1")


@dataclass
class WindowsConfig(DatasetConfig):
    TASK = "language_model"
    batch_size: int = 32
    block_size: int = 64  # bytes a model reads per window (its context)
    windows_per_epoch: int = 2048  # training windows drawn per epoch: what "an epoch" means for a corpus
    val_windows: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("block_size", "windows_per_epoch", "val_windows"):
            require(getattr(self, key) >= 1, f"{key}={getattr(self, key)} must be >= 1")


@dataclass
class PyCodeConfig(WindowsConfig):
    _target_: str = "mprun.data.text.pycode"
    val_every_nth_file: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.val_every_nth_file >= 2, f"val_every_nth_file={self.val_every_nth_file} must be >= 2")


class Level(Enum):
    bytes = "bytes"  # 256 tokens, one per byte: val/bpb is the loss in bits
    chars = "chars"  # one token per distinct character of the text (nanoGPT's shakespeare_char)


@dataclass
class TextFileConfig(WindowsConfig):
    _target_: str = "mprun.data.text.textfile"
    path: str = MISSING  # a UTF-8 text file, or a directory of *.txt files (read in sorted order)
    level: Level = Level.bytes
    val_fraction: float = 0.1  # the text's last tenth is validation

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 < self.val_fraction < 1, f"val_fraction={self.val_fraction} must be in (0, 1)")


class Tokenizer(Enum):
    words = "words"  # the training split's max_vocab - 2 most frequent words, <pad> and <unk>
    bytes = "bytes"  # UTF-8 bytes (ids 2 to 257): nothing to build, nothing unknown


@dataclass
class TextFolderConfig(DatasetConfig):
    TASK = "text_classification"
    _target_: str = "mprun.data.textfolder.textfolder"
    root: str = MISSING  # the folder holding train_dir and val_dir
    train_dir: str = "train"
    val_dir: str = "test"  # aclImdb's name for its held-out split
    tokenizer: Tokenizer = Tokenizer.words
    max_vocab: int = 20_000  # words kept, <pad> and <unk> included
    max_len: int = 256  # tokens kept from the start of each text

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.max_vocab >= 3, f"max_vocab={self.max_vocab} must be >= 3 (<pad>, <unk> and one word)")
        require(self.max_len >= 1, f"max_len={self.max_len} must be >= 1")


@dataclass
class UserDatasetConfig(LoaderConfig):
    """dataset: a project's callable that returns (train, val). Its YAML has no schema: the keys below are mprun's
    (DATASET_KEYS), every other key goes to the callable."""

    _target_: str = MISSING
    _partial_: bool = False
    num_classes: Optional[int] = None  # None: the largest label + 1, over both splits
    vocab_size: Optional[int] = None  # token inputs; None: the largest token id + 1, over both splits
    kwargs: dict[str, Any] = field(default_factory=dict)
    TASK = None  # known once the items are seen

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_classes is not None:
            require(self.num_classes >= 2, f"num_classes={self.num_classes} must be >= 2")
        if self.vocab_size is not None:
            require(self.vocab_size >= 2, f"vocab_size={self.vocab_size} must be >= 2")


DATASET_KEYS = ("_target_", "_partial_", "batch_size", "num_workers", "prefetch_factor", "num_classes", "vocab_size")

"""Text corpora for language models, offline by construction.

dataset=pycode: the Python standard library's own .py source, read from the running interpreter's installation
(tests and site-packages left out), as bytes: a 256-token vocabulary, no tokenizer to train, and val/bpb is the loss
in bits. Files are taken in sorted order; every val_every_nth_file-th file is validation, so the split is by file
(no window straddles both). The Python version and a digest of the corpus are recorded as params: two Pythons'
libraries are different corpora.

Batches are windows of block_size + 1 bytes (input and next-byte target). Training draws windows_per_epoch random
windows per epoch, from a generator seeded by (seed, epoch), so a resumed run sees the same windows; validation is a
fixed, evenly spaced set of val_windows windows, the same for every run and precision.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sysconfig
from pathlib import Path
from typing import Iterator

import torch

from mprun.data.config import Level
from mprun.data.loaders import Batch, Batched, DataBundle, EpochBatches
from mprun.errors import ConfigError
from mprun.tasks import BYTE_LANGUAGE_MODEL, LANGUAGE_MODEL

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


class WindowLoader(Batched):
    """Windows of a byte corpus held in memory: (N, block_size) inputs and their next bytes as targets."""

    def __init__(self, tokens: torch.Tensor, block: int, windows: int, batch_size: int, train: bool, seed: int = 0):
        if len(tokens) < block + 2:
            raise ConfigError(
                f"the {'training' if train else 'validation'} text ({len(tokens)} bytes) is shorter than "
                f"one window of dataset.block_size={block} + 1"
            )
        self.tokens, self.block, self.train, self.seed = tokens, block, train, seed
        self.last_start = len(tokens) - block - 1
        self.batches = EpochBatches(windows, batch_size, shuffle=train, seed=seed)
        self.fixed = torch.linspace(0, self.last_start, windows).long()  # validation's windows

    def starts(self) -> torch.Tensor:
        """Each window's first byte, this epoch: drawn by (seed, epoch) for training, fixed for validation."""
        if not self.train:
            return self.fixed
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.batches.epoch + 1)
        return torch.randint(0, self.last_start + 1, (self.batches.n,), generator=generator)

    def __iter__(self) -> Iterator[Batch]:
        starts, span = self.starts(), torch.arange(self.block + 1)
        for idx in self.batches.split(self.batches.order()):
            window = self.tokens[(starts[idx][:, None] + span).to(self.tokens.device)].long()
            yield window[:, :-1], window[:, 1:]

    def describe(self) -> str:
        return f"windows of {self.block} bytes from {len(self.tokens):,} bytes in memory"

    def remedy(self) -> str:
        return "nothing in the input pipeline: windows are sliced from a tensor in memory; the model sets the pace"


def stdlib_files() -> list[Path]:
    """The standard library's .py files in sorted order, without its tests and installed packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("test"))
        found += [Path(dirpath, f) for f in filenames if f.endswith(".py") and not f.startswith("test_")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def pycode(
    *,
    batch_size: int,
    block_size: int,
    windows_per_epoch: int,
    val_windows: int,
    val_every_nth_file: int,
    seed: int,
    device: torch.device,
) -> DataBundle:
    """The standard library's source as a byte-level language-modelling corpus."""
    files = stdlib_files()
    if len(files) < val_every_nth_file:
        raise ConfigError(f"dataset=pycode: found {len(files)} .py files under {sysconfig.get_paths()['stdlib']}")
    splits: dict[bool, list[bytes]] = {True: [], False: []}
    digest = hashlib.sha256()
    for i, path in enumerate(files):
        text = path.read_bytes()
        digest.update(text)
        splits[i % val_every_nth_file == 0].append(text)
    val, train = (torch.frombuffer(bytearray(b"".join(splits[v])), dtype=torch.uint8) for v in (True, False))
    return DataBundle(
        "pycode",
        WindowLoader(train.to(device), block_size, windows_per_epoch, batch_size, True, seed),
        WindowLoader(val.to(device), block_size, val_windows, batch_size, False),
        1,
        (1, block_size),
        256,
        task=BYTE_LANGUAGE_MODEL,
        context=block_size,
        vocab_size=256,
        source={
            "corpus.python": platform.python_version(),
            "corpus.files": str(len(files)),
            "corpus.bytes": str(len(train) + len(val)),
            "corpus.sha256": digest.hexdigest()[:16],
        },
    )


def _read_text(path: str) -> tuple[str, list[Path]]:
    """The UTF-8 text at `path` (a file, or a directory's *.txt files in sorted order), and the files read."""
    where = Path(path).expanduser()
    files = sorted(where.rglob("*.txt")) if where.is_dir() else [where]
    if not where.exists() or not files:
        raise ConfigError(
            f"dataset.path={path}: {'no *.txt files in that directory' if where.exists() else 'no such file'}"
        )
    parts = []
    for file in files:
        data = file.read_bytes()
        try:
            parts.append(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"dataset.path={path}: {file} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    return "".join(parts), files


def textfile(
    *,
    batch_size: int,
    block_size: int,
    windows_per_epoch: int,
    val_windows: int,
    path: str,
    level: Level,
    val_fraction: float,
    seed: int,
    device: torch.device,
) -> DataBundle:
    """A user's own text as a language-modelling corpus: bytes (val/bpb), or characters (a vocabulary of the text's
    own characters). The end of the text is validation."""
    text, files = _read_text(path)
    if level is Level.bytes:
        tokens, vocab, task = (
            torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8),
            256,
            BYTE_LANGUAGE_MODEL,
        )
    else:
        chars = sorted(set(text))
        index = {c: i for i, c in enumerate(chars)}
        tokens = torch.tensor([index[c] for c in text], dtype=torch.int32)
        vocab, task = len(chars), LANGUAGE_MODEL
    cut = int(len(tokens) * (1 - val_fraction))
    return DataBundle(
        "textfile",
        WindowLoader(tokens[:cut].to(device), block_size, windows_per_epoch, batch_size, True, seed),
        WindowLoader(tokens[cut:].to(device), block_size, val_windows, batch_size, False),
        1,
        (1, block_size),
        vocab,
        task=task,
        context=block_size,
        vocab_size=vocab,
        source={
            "corpus.files": str(len(files)),
            "corpus.tokens": str(len(tokens)),
            "corpus.sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()[:16],
        },
    )

"""dataset=textfolder: text classification from a folder in the IMDB (aclImdb) layout,
train/<label>/*.txt and test/<label>/*.txt.

The classes are the label folders found in both splits, in sorted order (aclImdb's train/unsup, which has no test
twin, is left out). The tokenizer is built from the training split alone: UTF-8 bytes, or a vocabulary of the
max_vocab - 2 most frequent lower-cased words and punctuation marks, with <pad> (id 0) and <unk> (id 1). Each text is
cut to its first max_len tokens; a batch is padded with 0 to its longest text, and models find each text's length from
the padding (model=lstm packs them).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path
from typing import Iterator

import torch

from mprun.data.config import Tokenizer
from mprun.data.loaders import Batch, DataBundle, TensorLoader, _gather
from mprun.errors import ConfigError
from mprun.tasks import TEXT_CLASSIFICATION

PAD, UNK = 0, 1
WORD = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")  # lower-cased words, numbers and single punctuation marks


class TokenLoader(TensorLoader):
    """Token ids held in memory, padded with 0 to the split's longest text; each batch is cut to its own longest."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0) -> None:
        super().__init__(x, y, batch_size, shuffle, seed)
        self.lengths = (x != PAD).sum(dim=1).cpu()  # on the host: a batch's width costs no device sync

    def __iter__(self) -> Iterator[Batch]:
        for idx in self.batches.split(self.batches.order()):
            width = max(1, int(self.lengths[idx].max()))
            idx = idx.to(self.x.device)
            yield _gather(self.x, idx)[:, :width], _gather(self.y, idx)

    def describe(self) -> str:
        return f"padded token ids in memory on {self.x.device}"


def _labelled_files(root: Path, train_dir: str, val_dir: str) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """The classes (label folders in both splits) and each split's (file, class) pairs, in sorted order."""
    layout = f"the aclImdb layout: {train_dir}/<label>/*.txt and {val_dir}/<label>/*.txt"
    if not root.is_dir():
        raise ConfigError(f"dataset.root={root}: no such directory ({layout})")
    for split in (train_dir, val_dir):
        if not (root / split).is_dir():
            raise ConfigError(f"dataset.root={root} has no {split}/ folder ({layout})")
    found = [{d.name for d in (root / split).iterdir() if d.is_dir()} for split in (train_dir, val_dir)]
    classes = sorted(found[0] & found[1])
    if len(classes) < 2:
        raise ConfigError(
            f"dataset.root={root}: {len(classes)} label folder(s) in both {train_dir}/ and {val_dir}/ "
            f"({', '.join(classes) or 'none'}); text classification needs at least 2 ({layout})"
        )
    files: dict[str, list[tuple[Path, int]]] = {}
    for split in (train_dir, val_dir):
        files[split] = []
        for label, name in enumerate(classes):
            texts = sorted((root / split / name).glob("*.txt"))
            if not texts:
                raise ConfigError(f"dataset.root={root}: {split}/{name}/ holds no *.txt files")
            files[split] += [(t, label) for t in texts]
    return classes, files


def _read(path: Path, root: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"dataset.root={root}: {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None


class Vocabulary:
    """Text to token ids: bytes, or the training split's most frequent words."""

    def __init__(self, tokenizer: Tokenizer, train_texts: list[str], max_vocab: int) -> None:
        self.tokenizer = tokenizer
        if tokenizer is Tokenizer.bytes:
            self.size, self.index = 258, {}
            return
        counts = Counter(w for text in train_texts for w in WORD.findall(text.lower()))
        words = [w for w, _ in counts.most_common(max_vocab - 2)]
        self.index = {w: i + 2 for i, w in enumerate(words)}
        self.size = len(words) + 2

    def encode(self, text: str, max_len: int) -> list[int]:
        """The text's first max_len ids; an empty text is one <unk>, so that every text has a length."""
        if self.tokenizer is Tokenizer.bytes:
            ids = [b + 2 for b in text.encode("utf-8")[:max_len]]
        else:
            ids = [self.index.get(w, UNK) for w in WORD.findall(text.lower())[:max_len]]
        return ids or [UNK]


def _padded(encoded: list[list[int]], labels: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.zeros(len(encoded), max(len(ids) for ids in encoded), dtype=torch.long)
    for row, ids in enumerate(encoded):
        x[row, : len(ids)] = torch.tensor(ids)
    return x.to(device), torch.tensor(labels).to(device)


def textfolder(
    *,
    batch_size: int,
    root: str,
    train_dir: str,
    val_dir: str,
    tokenizer: Tokenizer,
    max_vocab: int,
    max_len: int,
    seed: int,
    device: torch.device,
) -> DataBundle:
    """A folder of labelled texts as token-id sequences for a text classifier."""
    where = Path(root).expanduser()
    classes, files = _labelled_files(where, train_dir, val_dir)
    digest = hashlib.sha256()
    texts: dict[str, list[str]] = {}
    for split, pairs in files.items():
        texts[split] = [_read(path, where) for path, _ in pairs]
        for (path, label), text in zip(pairs, texts[split]):
            digest.update(f"{split}/{classes[label]}/{path.name}\0{text}\0".encode())
    vocab = Vocabulary(tokenizer, texts[train_dir], max_vocab)
    (xt, yt), (xv, yv) = (
        _padded([vocab.encode(t, max_len) for t in texts[s]], [label for _, label in files[s]], device)
        for s in (train_dir, val_dir)
    )
    return DataBundle(
        "textfolder",
        TokenLoader(xt, yt, batch_size, True, seed),
        TokenLoader(xv, yv, batch_size, False),
        1,
        (1, max_len),
        len(classes),
        task=TEXT_CLASSIFICATION,
        vocab_size=vocab.size,
        source={
            "corpus.classes": ",".join(classes),
            "corpus.files": str(len(files[train_dir]) + len(files[val_dir])),
            "corpus.vocab": str(vocab.size),
            "corpus.sha256": digest.hexdigest()[:16],
        },
    )

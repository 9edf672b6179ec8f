"""Text classification: model=lstm on dataset=textfolder (the aclImdb layout), and model=lstm as a language model."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch

from mprun import checkpoint
from mprun.data.config import Tokenizer
from mprun.data.textfolder import PAD, UNK, Vocabulary
from mprun.errors import ConfigError
from mprun.experiment import run
from mprun.models.lstm import LSTM

FILLER = "the a movie film plot actor scene was is it this that and of to in story ending music camera".split()
SENTIMENT = {"pos": "great wonderful superb brilliant moving".split(), "neg": "awful boring terrible dull weak".split()}


def make_folder(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """An aclImdb-style folder: reviews of 5 to 60 filler words with 1 to 3 words of their label's sentiment at random
    places, so that lengths vary and the label must be found anywhere in the text."""
    rng = random.Random(seed)
    for split, n in per_class.items():
        for label, words in SENTIMENT.items():
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                text = [rng.choice(FILLER) for _ in range(rng.randint(5, 60))]
                for _ in range(rng.randint(1, 3)):
                    text.insert(rng.randrange(len(text) + 1), rng.choice(words))
                (folder / f"{i}_{rng.randint(1, 10)}.txt").write_text(" ".join(text) + ".", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = make_folder(tmp_path_factory.mktemp("imdb") / "aclImdb", {"train": 300, "test": 100})
    (root / "train" / "unsup").mkdir()  # aclImdb's unlabelled reviews: no test twin, so not a class
    (root / "train" / "unsup" / "0_0.txt").write_text("no label here", encoding="utf-8")
    return root


LSTM_TEXT = ["model=lstm", "model.bidirectional=true", "dataset.batch_size=32", "optimizer.lr=0.01"]


def test_an_lstm_classifies_a_generated_textfolder_above_95_percent(make_cfg, folder: Path) -> None:
    summary = run(make_cfg("dataset=textfolder", f"dataset.root={folder}", *LSTM_TEXT, "trainer.max_epochs=4"))
    assert summary["task"] == "text_classification" and summary["val_acc"] >= 0.95, summary["val_acc"]
    assert summary["tokens_per_s"] is None  # texts are not windows: samples/s is the throughput


def test_the_classes_the_vocabulary_and_the_batches(make_cfg, folder: Path) -> None:
    """Classes are the label folders of both splits; the vocabulary is the training split's; each batch is padded
    with 0 to its own longest text."""
    from hydra.utils import instantiate

    cfg = make_cfg("dataset=textfolder", f"dataset.root={folder}", "dataset.max_vocab=10", "dataset.batch_size=8")
    data = instantiate(cfg.dataset, _convert_="all")(seed=0, device=torch.device("cpu"))
    assert data.source["corpus.classes"] == "neg,pos" and data.num_classes == 2 and data.vocab_size == 10
    assert data.source["corpus.files"] == str(800)
    widths = set()
    for x, y in data.train:
        assert x.dtype == torch.long and y.shape == (8,)
        widths.add(x.shape[1])
        assert (x != PAD).sum(dim=1).max() == x.shape[1]  # cut to the batch's longest, no column of padding only
        assert x.max() < 10
    assert len(widths) > 1
    assert data.model_inputs() == {"vocab_size": 10, "num_classes": 2}


def test_the_tokenizers() -> None:
    words = Vocabulary(Tokenizer.words, ["Good good film!", "good plot"], max_vocab=4)
    assert words.size == 4 and words.encode("GOOD film, bad", max_len=10) == [2, 3, UNK, UNK]
    assert words.encode("", max_len=10) == [UNK]  # an empty text keeps a length of 1
    raw = Vocabulary(Tokenizer.bytes, [], max_vocab=3)
    assert raw.size == 258 and raw.encode("dö", max_len=2) == [ord("d") + 2, 0xC3 + 2]


def test_the_lstm_packs_padded_texts_so_padding_changes_nothing() -> None:
    torch.manual_seed(0)
    model = LSTM(20, num_classes=3, bidirectional=True).eval()
    short = torch.tensor([[5, 6, 7]])
    padded = torch.tensor([[5, 6, 7, 0, 0, 0]])
    torch.testing.assert_close(model(short), model(padded))


def test_statistics_and_the_nan_tracer_see_inside_a_packed_lstm(make_cfg, folder: Path, tmp_path: Path) -> None:
    """The LSTM's output is a PackedSequence and a tuple: the statistics hooks and the tracer read its tensors (the
    statistics used to rebuild the output's structure, which a PackedSequence refuses)."""
    from mprun import numerics
    from mprun.precision.config import LossScale, PrecisionConfig
    from mprun.precision.names import PrecisionName
    from mprun.precision.runtime import Precision
    from mprun.tasks import TEXT_CLASSIFICATION

    run(
        make_cfg(
            "dataset=textfolder",
            f"dataset.root={folder}",
            *LSTM_TEXT,
            "precision.stats_every_steps=5",
            "trainer.max_epochs=1",
            "trainer.max_steps=5",
        )
    )
    assert "| lstm (LSTM) |" in (tmp_path / "run" / "numerics" / "stats.md").read_text()
    model = LSTM(30, num_classes=2, bidirectional=True)
    with torch.no_grad():
        model.lstm.weight_hh_l0_reverse.fill_(float("nan"))
    texts = torch.tensor([[5, 6, 7, 0], [8, 9, 10, 11]])
    report = numerics.trace_nonfinite(
        model,
        (texts, torch.tensor([0, 1])),
        Precision(PrecisionConfig(dtype=PrecisionName.bf16, loss_scale=LossScale.none), torch.device("cpu")),
        TEXT_CLASSIFICATION,
    )
    assert report["forward"]["module"] == "lstm" and report["nonfinite_params"] == ["lstm.weight_hh_l0_reverse"]


def test_an_lstm_language_model_trains_on_pycode_in_every_autocast_dtype(make_cfg) -> None:
    """The LSTM as an LM; on the CPU, fp16 autocast has no oneDNN LSTM kernel unpacked, and the packed path runs."""
    lm = ["dataset=pycode", "model=lstm", "model.hidden=32", "model.embed=16", "dataset.block_size=16"]
    lm += ["dataset.windows_per_epoch=128", "dataset.val_windows=32", "dataset.batch_size=16", "optimizer.lr=0.02"]
    for precision in ("fp32", "bf16", "fp16"):
        summary = run(make_cfg(*lm, f"precision={precision}", "trainer.max_epochs=2"))
        # Below a uniform guess over 256 bytes (8 bits): it learned something
        assert summary["task"] == "language_model" and summary["val_bpb"] < 7.0, (precision, summary["val_bpb"])


def test_an_lstm_classifier_resumed_mid_epoch_ends_bit_identical(make_cfg, folder: Path, tmp_path: Path) -> None:
    # scheduler=none: a stop by max_steps would otherwise shorten the stopped run's schedule
    common = ["dataset=textfolder", f"dataset.root={folder}", *LSTM_TEXT, "trainer.max_epochs=2", "scheduler=none"]
    run(make_cfg(*common, f"paths.run_dir={tmp_path / 'full'}"))
    run(make_cfg(*common, "trainer.max_steps=7", f"paths.run_dir={tmp_path / 'part'}"))
    run(make_cfg(*common, f"trainer.resume={tmp_path / 'part'}", f"paths.run_dir={tmp_path / 'r'}"))
    a = checkpoint.load(tmp_path / "full" / "checkpoints" / "final.pt")["model"]
    b = checkpoint.load(tmp_path / "r" / "checkpoints" / "final.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "make,needle",
    [
        (lambda root: root, "no such directory"),
        (lambda root: make_folder(root, {"train": 2}), "has no test/ folder"),
        (
            lambda root: make_folder(root, {"train": 2, "test": 2}) and _remove(root / "test" / "neg"),
            "1 label folder(s) in both train/ and test/ (pos); text classification needs at least 2",
        ),
        (
            lambda root: make_folder(root, {"train": 2, "test": 2}) and _empty(root / "test" / "neg"),
            "test/neg/ holds no *.txt files",
        ),
    ],
    ids=["missing", "no test split", "one class", "empty split"],
)
def test_a_textfolder_that_cannot_be_classified_is_a_clear_error(make_cfg, tmp_path: Path, make, needle) -> None:
    root = tmp_path / "data"
    make(root)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        run(make_cfg("dataset=textfolder", f"dataset.root={root}", "model=lstm", "trainer.max_epochs=1"))


def _remove(folder: Path) -> Path:
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    return folder


def _empty(folder: Path) -> Path:
    for f in folder.iterdir():
        f.unlink()
    return folder


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["dataset=textfolder", "dataset.root=.", "model=gpt"], "cannot serve dataset=textfolder"),
        (["model=lstm"], "cannot serve dataset=digits: the dataset is a classification task"),
        (["dataset=pycode", "model=lstm", "model.bidirectional=true"], "model.bidirectional=true would let"),
    ],
    ids=["gpt on labelled texts", "lstm on images", "bidirectional lm"],
)
def test_an_lstm_or_textfolder_mismatch_is_a_clear_error(make_cfg, overrides, needle) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        run(make_cfg(*overrides, "trainer.max_epochs=1"))


def test_an_lstm_that_torch_export_cannot_trace_is_logged_as_a_pickle_that_loads(
    make_cfg, folder: Path, tmp_path: Path
) -> None:
    """tracking.log_model: torch.export cannot trace the packed LSTM, so the model is logged in MLflow's pickle
    format, carrying mprun's code, instead of failing the run."""
    import mlflow
    import mlflow.pytorch

    summary = run(
        make_cfg(
            "dataset=textfolder",
            f"dataset.root={folder}",
            *LSTM_TEXT,
            "trainer.max_epochs=1",
            "trainer.max_steps=2",
            "tracking.log_model=true",
            tracking="mlflow",
        )  # fmt: skip
    )
    try:
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/outputs/mlflow.db")
        (model,) = mlflow.search_logged_models(experiment_ids=["1"], output_format="list")
        assert model.source_run_id == summary["mlflow_run_id"]
        loaded = mlflow.pytorch.load_model(model.model_uri)
        assert isinstance(loaded, LSTM) and loaded(torch.tensor([[5, 6, 7, 0]])).shape == (1, 2)
    finally:
        mlflow.set_tracking_uri(None)

"""Language models: model=gpt on dataset=pycode (the standard library's source as bytes), through the same loop,
precision options, tracking and resume as the image classifiers."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from mprun import checkpoint
from mprun.errors import ConfigError
from mprun.experiment import run
from mprun.tasks import BYTE_LANGUAGE_MODEL, CLASSIFICATION

# A GPT small enough for a few CPU steps: 1 block, 32 wide, windows of 16 bytes.
TINY_LM = [
    "dataset=pycode",
    "model=gpt",
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=16",
    "dataset.block_size=16",
    "dataset.batch_size=16",
    "dataset.windows_per_epoch=128",
    "dataset.val_windows=64",
    "scheduler=none",
    "trainer.log_every_steps=4",
]


def test_a_gpt_learns_bytes_of_python_and_reports_bits_per_byte(make_cfg, tmp_path: Path, mlflow_client) -> None:
    """The task owns the loss and the metrics: val/loss in nats per byte, val/bpb = loss / ln 2, val/ppl, next-byte
    accuracy; tokens/s beside samples/s (a sample is a window); the corpus's Python and digest as params."""
    summary = run(make_cfg(*TINY_LM, "trainer.max_epochs=3", tracking="mlflow"))
    assert summary["task"] == "language_model"
    assert summary["val_bpb"] == pytest.approx(summary["val_loss"] / math.log(2))
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]))
    assert summary["val_bpb"] < 7.0  # below a uniform guess over 256 bytes (8 bits): it learned something
    assert summary["tokens_per_s"] == pytest.approx(16 * summary["samples_per_s"])
    r = mlflow_client.get_run(summary["mlflow_run_id"])
    assert {"val/bpb", "val/ppl", "val/loss", "val/acc", "final/val_bpb", "final/tokens_per_s"} <= set(r.data.metrics)
    assert r.data.params["corpus.python"] and len(r.data.params["corpus.sha256"]) == 16


def test_mfu_is_six_flops_per_parameter_per_token_over_the_gpus_peak(monkeypatch) -> None:
    from mprun import hardware

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    gpu = torch.device("cuda", 0)
    assert hardware.mfu(124_000_000, 100_000, gpu, "bf16") == pytest.approx(6 * 124e6 * 1e5 / 989.4e12)
    assert hardware.mfu(124_000_000, 100_000, gpu, "fp32") == pytest.approx(6 * 124e6 * 1e5 / 66.9e12)
    assert hardware.mfu(124_000_000, None, gpu, "bf16") is None  # an image model has no tokens
    assert hardware.mfu(124_000_000, 100_000, torch.device("cpu"), "bf16") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert hardware.mfu(124_000_000, 100_000, gpu, "bf16") is None  # not in the table: not guessed


def test_the_tasks_loss_and_metrics() -> None:
    logits = torch.randn(2, 5, 7)
    target = torch.randint(0, 7, (2, 5))
    loss = BYTE_LANGUAGE_MODEL.loss(logits, target)
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits.reshape(10, 7), target.reshape(10)).item())
    loss_sum, correct, count = BYTE_LANGUAGE_MODEL.sums(logits, target).tolist()
    assert count == 10 and loss_sum == pytest.approx(10 * loss.item(), rel=1e-6)
    metrics = BYTE_LANGUAGE_MODEL.metrics(loss_sum, correct, count)
    assert metrics["bpb"] == pytest.approx(loss.item() / math.log(2), rel=1e-6)
    assert CLASSIFICATION.output_shape(torch.zeros(4, 3, 8, 8), 10) == (4, 10)
    assert BYTE_LANGUAGE_MODEL.output_shape(torch.zeros(4, 16, dtype=torch.long), 256) == (4, 16, 256)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["model=gpt"], "GPT cannot serve dataset=digits: the dataset is a classification task"),
        (["dataset=pycode", "model=simple_cnn"], "cannot serve dataset=pycode: the dataset is a language_model task"),
        (
            ["dataset=pycode", "model=gpt", "dataset.block_size=256"],
            "dataset.block_size=256 is longer than model.block_size=64",
        ),
        (["dataset=pycode", "model=gpt", "model.n_embd=100", "model.n_head=3"], "n_embd=100 must be divisible by"),
    ],
    ids=["gpt on images", "cnn on text", "window past the positions", "heads"],
)
def test_a_model_and_dataset_that_do_not_fit_are_a_clear_error(make_cfg, tmp_path: Path, overrides, needle) -> None:
    with pytest.raises(ConfigError, match=needle):
        run(make_cfg(*overrides, "trainer.max_epochs=1", tracking="mlflow"))
    assert not (tmp_path / "run").exists() or not (tmp_path / "run" / "summary.json").exists()
    if "cannot serve" in needle:  # found from the configs, before the store is reached or the corpus read
        assert not (tmp_path / "outputs" / "mlflow.db").exists()


def test_a_language_model_resumed_mid_epoch_ends_bit_identical(make_cfg, tmp_path: Path) -> None:
    """Training windows are drawn by (seed, epoch): a run stopped mid-epoch and resumed sees the same bytes."""
    full = run(make_cfg(*TINY_LM, "trainer.max_epochs=2", f"paths.run_dir={tmp_path / 'full'}"))
    run(make_cfg(*TINY_LM, "trainer.max_epochs=2", "trainer.max_steps=5", f"paths.run_dir={tmp_path / 'part'}"))
    resumed = run(
        make_cfg(*TINY_LM, "trainer.max_epochs=2", f"trainer.resume={tmp_path / 'part'}", f"paths.run_dir={tmp_path}/r")
    )
    a = checkpoint.load(tmp_path / "full" / "checkpoints" / "final.pt")["model"]
    b = checkpoint.load(tmp_path / "r" / "checkpoints" / "final.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["val_bpb"] == full["val_bpb"] and resumed["steps"] == full["steps"] == 16


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_language_models_match_fp32_within_a_twentieth_of_a_bit(make_cfg, precision: str) -> None:
    """Same seed, same steps: autocast's val bpb within 0.05 bits of fp32's on the CPU."""
    base = run(make_cfg(*TINY_LM, "trainer.max_epochs=2", "precision=fp32"))
    half = run(make_cfg(*TINY_LM, "trainer.max_epochs=2", f"precision={precision}"))
    assert abs(half["val_bpb"] - base["val_bpb"]) < 0.05, (half["val_bpb"], base["val_bpb"])


def test_a_users_own_text_file_trains_at_the_byte_or_character_level(make_cfg, tmp_path: Path) -> None:
    """dataset=textfile: any UTF-8 text; chars gives a vocabulary of the text's own characters (and no bpb)."""
    text = tmp_path / "book.txt"
    text.write_text("the quick brown fox jumps over the lazy dög. " * 400, encoding="utf-8")
    common = [
        o for o in TINY_LM if not o.startswith("dataset=")
    ]  # the GPT and window settings, on this file instead of pycode
    chars = run(
        make_cfg("dataset=textfile", f"dataset.path={text}", "dataset.level=chars", *common, "trainer.max_epochs=3")
    )
    assert "val_bpb" not in chars and chars["val_acc"] > 0.5  # 30 distinct characters, a repeated sentence
    raw = run(make_cfg("dataset=textfile", f"dataset.path={tmp_path}", *common, "trainer.max_epochs=1"))
    assert raw["val_bpb"] == pytest.approx(raw["val_loss"] / math.log(2))  # bytes: ö is two tokens


@pytest.mark.parametrize(
    "content,needle",
    [(None, "no such file"), (b"\xff\xfe not text", "is not UTF-8 text (byte 0: invalid start byte)")],
    ids=["missing", "not utf-8"],
)
def test_a_text_file_that_is_missing_or_not_utf8_is_a_clear_error(make_cfg, tmp_path: Path, content, needle) -> None:
    path = tmp_path / "book.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        run(make_cfg("dataset=textfile", f"dataset.path={path}", "model=gpt", "trainer.max_epochs=1"))


def test_an_fp16_overflow_in_a_feed_forward_is_caught_named_and_fixed(make_cfg) -> None:
    """The transformer numerics story: block 1's feed-forward activations past 65504 are inf in fp16; the loss
    scale collapses and the run stops with the NaN tracer naming the module. Keeping it in fp32, or bf16, trains."""
    from mprun.errors import NumericsError

    story = [*TINY_LM, "model.n_layer=2", "model.ff_gain=1e5", "model.ff_gain_block=1", "trainer.max_epochs=4"]
    with pytest.raises(NumericsError, match=r"first non-finite output in forward: h\.1\.mlp\.gain \(Gain, float16"):
        run(make_cfg(*story, "precision=fp16"))
    kept = run(make_cfg(*story, "precision=fp16", "precision.fp32_modules=[h.1.mlp]"))
    assert kept["skipped_steps"] <= 1 and math.isfinite(kept["val_loss"])  # at most the first step's scale probe
    assert math.isfinite(run(make_cfg(*story, "precision=bf16"))["val_loss"])

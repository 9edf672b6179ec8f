"""The input pipeline: worker defaults, the data-wait clock, and the input-bound warning in a real run."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from mprun.data import loaders as data
from mprun.errors import ConfigError
from mprun.experiment import run


class Slow:
    """Batches that each take `delay` seconds to arrive."""

    def __init__(self, n: int, delay: float) -> None:
        self.n, self.delay = n, delay

    def __iter__(self):
        for _ in range(self.n):
            time.sleep(self.delay)
            yield torch.zeros(2, 1), torch.zeros(2, dtype=torch.long)

    def __len__(self) -> int:
        return self.n


def test_timed_loader_adds_up_the_wait_for_each_batch_and_nothing_else() -> None:
    timed = data.TimedLoader(Slow(4, 0.05))
    for _ in timed:
        time.sleep(0.1)  # the consumer's own work is not waiting
    waited = timed.take()
    assert 0.19 <= waited < 0.5  # 0.2 s of waiting; 0.6 s if the consumer's time were counted too
    assert timed.take() == 0.0  # take() starts a new count


@pytest.mark.parametrize("cores,local_world,expected", [(2, 1, 1), (16, 1, 8), (16, 2, 7), (64, 8, 7), (4, 8, 1)])
def test_auto_workers_share_the_usable_cores_among_local_ranks(monkeypatch, cores, local_world, expected) -> None:
    monkeypatch.setattr(data, "usable_cores", lambda: cores)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    assert data.auto_workers() == expected


def test_auto_workers_is_the_default_and_says_so(make_cfg, tmp_path, monkeypatch) -> None:
    from PIL import Image

    monkeypatch.setattr(data, "usable_cores", lambda: 3)  # auto: 3 - 1 for the training process = 2

    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / "imgs" / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(tmp_path / "imgs" / split / cls / f"{i}.png")
    summary = run(
        make_cfg(
            "dataset=imagefolder",
            f"dataset.root={tmp_path}/imgs",
            "dataset.image_size=16",
            "dataset.batch_size=2",
            "trainer.max_epochs=1",
        )
    )
    assert "DataLoader, 2 workers (auto), prefetch 2 each" in summary["input"]


def test_negative_num_workers_is_rejected_naming_the_choices(make_cfg) -> None:
    with pytest.raises(ConfigError, match=r"num_workers=-1 must be a count >= 0, or auto"):
        run(make_cfg("dataset=cifar10", "dataset.num_workers=-1"))


def test_a_starved_run_logs_its_wait_and_warns_once(make_cfg, monkeypatch, caplog) -> None:
    """digits with every training batch delayed 100 ms: the loop spends most of its time waiting."""
    original = data.TensorLoader.__iter__

    def slow(self):
        for batch in original(self):
            if self.batches.shuffle:  # training batches only
                time.sleep(0.1)  # ~20x the MLP's step on an idle 2-core machine; 50 ms gave 23% on a loaded one
            yield batch

    monkeypatch.setattr(data.TensorLoader, "__iter__", slow)
    with caplog.at_level(logging.WARNING, logger="mprun"):
        summary = run(make_cfg("trainer.max_epochs=3", "model=simple_mlp"))  # epochs 2 and 3 could warn
    assert summary["data_wait_frac"] > 0.3  # ~0.95 on an idle machine; a loaded one trains slower
    warnings = [r.getMessage() for r in caplog.records if "input-bound" in r.getMessage()]
    assert len(warnings) == 1, warnings
    # The tensors are on the training device already: it used to advise moving them there.
    assert "in-memory tensors on cpu" in warnings[0] and "the tensors are on the training device (cpu)" in warnings[0]


def test_a_fed_run_waits_little_and_does_not_warn(make_cfg, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="mprun"):
        summary = run(make_cfg("trainer.max_epochs=2"))
    assert 0 <= summary["data_wait_frac"] < 0.10
    assert not [r for r in caplog.records if "input-bound" in r.getMessage()]


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="pinned memory needs a GPU (bench/gpu_session.sh checks runs this)"
)
def test_host_side_synthetic_batches_are_pinned(make_cfg) -> None:
    """dataset.on_device=false keeps synthetic data pinned on the host; each batch taken from it must be pinned too
    (index_select alone allocates pageable memory), so the non_blocking copy to the GPU overlaps."""
    from mprun import build
    from mprun.config import validate

    cfg = make_cfg("dataset=synthetic", "dataset.on_device=false", "dataset.shape=[3,8,8]", "dataset.num_samples=64")
    data = build.dataset(validate(cfg), 0, torch.device("cuda"))
    for x, y in (*data.train, *data.val):
        assert x.is_pinned() and y.is_pinned() and x.device.type == "cpu"


def test_a_batch_larger_than_the_training_split_is_capped_with_one_warning(make_cfg, caplog) -> None:
    """batch_size=100000 on digits was accepted: validation was padded to 100,000 samples (4.7 GB, 19 s)."""
    from mprun import build
    from mprun.config import validate

    cfg = make_cfg("dataset.batch_size=100000")
    validate(cfg)
    with caplog.at_level("WARNING", logger="mprun.data"):
        data = build.dataset(validate(cfg), 0, torch.device("cpu"))
    assert caplog.messages == [
        "dataset.batch_size=100000 is larger than the training split (1438 samples): each pass is one batch of 1438"
    ]
    assert len(data.train) == 1 and data.train.smallest_batch() == 1438
    assert len(data.val) == 1 and sum(len(y) for _, y in data.val) == 359  # no padding past the split

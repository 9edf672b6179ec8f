"""precision=auto on a CPU measures: the candidates are timed on the run's own model, the fastest whose loss agrees
with fp32's is picked, the result is kept per outputs root, and an explicit bf16/fp16 is warned of only when it
measured slower."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from mprun.experiment import run
from mprun.precision import probe
from mprun.precision.auto import pick_measured, resolve
from mprun.precision.names import PrecisionName
from mprun.tasks import CLASSIFICATION

CPU = torch.device("cpu")


def times(fp32: float, bf16: float, loss: float = 2.30, bf16_loss: float = 2.30) -> dict:
    return {"fp32": {"ms": fp32, "loss": loss, "steps": 3}, "bf16": {"ms": bf16, "loss": bf16_loss, "steps": 3}}


@pytest.mark.parametrize(
    "measured,picked",
    [
        (times(7.68, 4.19), "bf16"),  # AVX512-BF16 without AMX: 1.8x faster, same loss
        (times(4.0, 40.0), "fp32"),  # AVX2 only: emulated, 10x slower
        (times(7.68, 7.2), "fp32"),  # 1.07x: within what noise moves, fp32's numerics kept
        (times(7.68, 4.19, bf16_loss=2.50), "fp32"),  # faster, but the loss moved 9%: not the same training
        (times(7.68, 4.19, bf16_loss=float("nan")), "fp32"),
    ],
    ids=["faster", "emulated", "a tie", "loss disagrees", "nan loss"],
)
def test_auto_picks_the_fastest_half_dtype_whose_loss_agrees(measured: dict, picked: str) -> None:
    name, why = pick_measured(measured)
    assert name is PrecisionName(picked)
    assert why.startswith("measured on this CPU") and f"fp32 {measured['fp32']['ms']:.3g} ms/step" in why


def test_an_explicit_half_dtype_is_warned_of_only_when_it_measured_slower(caplog) -> None:
    for bf16_ms, warned in ((40.0, True), (4.0, False)):
        caplog.clear()
        name, why = resolve(PrecisionName.bf16, CPU, lambda dtypes, ms=bf16_ms: times(8.0, ms))
        assert name is PrecisionName.bf16 and "measured" in why
        assert ("slower" in caplog.text) is warned, caplog.text


def test_the_probe_times_a_copy_and_leaves_the_model_and_random_state_alone(tmp_path: Path, monkeypatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Dropout(0.5), nn.Linear(32, 10))
    batch = (torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    found = probe.measure(model, batch, CLASSIFICATION, {"bf16": torch.bfloat16}, tmp_path)
    assert found["cached"] is False and set(found) == {"fp32", "bf16", "cached"}
    assert all(found[k]["ms"] > 0 and found[k]["loss"] > 0 for k in ("fp32", "bf16"))
    assert abs(found["bf16"]["loss"] - found["fp32"]["loss"]) < 0.05  # same weights, same batch, same dropout
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items()) and model[1].weight.grad is None
    # Measured once per (CPU, torch, threads, model, batch) under the outputs root.
    timed = []
    monkeypatch.setattr(probe, "_time_all", lambda *a: timed.append(a) or {"fp32": {"ms": 1.0, "loss": 1.0}})
    again = probe.measure(model, batch, CLASSIFICATION, {"bf16": torch.bfloat16}, tmp_path)
    assert again["cached"] is True and again["fp32"] == found["fp32"] and not timed
    probe.measure(model, (batch[0][:8], batch[1][:8]), CLASSIFICATION, {"bf16": torch.bfloat16}, tmp_path)
    assert len(timed) == 1  # another batch shape is another measurement
    assert len(json.loads((tmp_path / probe.CACHE_FILE).read_text())) == 2


def test_a_dtype_far_slower_than_fp32_is_not_timed_further(monkeypatch) -> None:
    """An emulated dtype can be 10x slower on a large model: one untimed step past GIVE_UP x fp32 says enough."""
    clock = iter([0.0, 1.0] + [0.0, 50.0] + [0.0, 1.0] * 3)  # fp32: 1 s steps; bf16's untimed step: 50 s
    monkeypatch.setattr(probe.time, "perf_counter", lambda: next(clock))
    model = nn.Linear(4, 2)
    found = probe.measure(model, (torch.randn(3, 4), torch.tensor([0, 1, 0])), CLASSIFICATION,
                          {"bf16": torch.bfloat16}, None)  # fmt: skip
    assert found["fp32"] == pytest.approx({"ms": 1000.0, "loss": found["fp32"]["loss"], "steps": 3})
    assert found["bf16"]["steps"] == 1 and found["bf16"]["ms"] == pytest.approx(50_000.0)


def test_a_dtype_the_model_cannot_run_in_loses_instead_of_crashing_the_run() -> None:
    class HalfRefused(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.is_autocast_enabled("cpu"):
                raise RuntimeError("some op: not implemented for 'BFloat16'\nmore detail")
            return super().forward(x)

    found = probe.measure(HalfRefused(4, 2), (torch.randn(3, 4), torch.tensor([0, 1, 0])), CLASSIFICATION,
                          {"bf16": torch.bfloat16}, None)  # fmt: skip
    assert found["bf16"]["error"] == "some op: not implemented for 'BFloat16'"
    name, why = pick_measured(found)
    assert name is PrecisionName.fp32 and "bf16 failed: some op" in why


def test_a_default_run_says_what_auto_measured_and_a_second_run_reuses_it(make_cfg, tmp_path: Path) -> None:
    first = run(make_cfg("precision=auto", "trainer.max_epochs=1", "trainer.max_steps=2"))
    assert first["precision_detail"].startswith(f"{first['precision']}: measured on this CPU")
    assert "fp32" in first["precision_detail"] and "bf16" in first["precision_detail"]
    assert (tmp_path / "outputs" / probe.CACHE_FILE).is_file()
    second = run(
        make_cfg("precision=auto", "trainer.max_epochs=1", "trainer.max_steps=2", f"paths.run_dir={tmp_path}/again")
    )
    assert second["precision"] == first["precision"] and second["precision_detail"].endswith("from the cache)")


def test_the_timed_passes_alternate_between_the_dtypes(monkeypatch) -> None:
    """fp32's passes were all timed before bf16's: a burst of other work during one block (a server starting beside
    the run) made fp32 look 25x slower than bf16 once, and the cached pick kept it. Alternating shares such bursts."""
    order = []
    monkeypatch.setattr(probe, "_step", lambda model, batch, task, dtype: order.append(dtype) or (1.0, 1.0))
    found = probe.measure(nn.Linear(4, 2), (torch.randn(3, 4), torch.tensor([0, 1, 0])), CLASSIFICATION,
                          {"bf16": torch.bfloat16}, None)  # fmt: skip
    assert order == [None, torch.bfloat16] * (1 + probe.STEPS)  # untimed passes, then the timed ones in turn
    assert found["fp32"]["steps"] == found["bf16"]["steps"] == probe.STEPS

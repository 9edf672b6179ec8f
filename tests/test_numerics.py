"""Numerics: fp32 islands, the NaN tracer, the stop/skip/collapse policy, underflow statistics, and
the loss-scaling story (fp16 without scaling stalls on a model built to underflow; scaling or bf16 fix it)."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from mprun import build
from mprun.config import validate
from mprun.errors import ConfigError, NumericsError
from mprun.experiment import run
from mprun.numerics import Guard, gradient_stats, trace_nonfinite
from mprun.precision.config import LossScale, PrecisionConfig
from mprun.precision.names import PrecisionName
from mprun.precision.runtime import Precision

UNDERFLOWS = ["model=simple_mlp", "model.grad_scale=1e-6"]  # logits' gradients x 1e-6: below fp16's 6e-8


def test_fp32_modules_run_outside_autocast(make_cfg) -> None:
    cfg = make_cfg("model=simple_mlp", "precision=bf16", "precision.fp32_modules=[5]")
    parts = build.components(validate(cfg))
    assert parts.fp32_modules == ["5"]
    dtypes = {}
    for name in ("3", "5"):
        parts.module.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: dtypes.__setitem__(name, o.dtype)
        )
    with parts.precision.autocast():
        parts.model(parts.data.example())
    assert dtypes == {"3": torch.bfloat16, "5": torch.float32}


def test_fp32_modules_are_recorded_and_a_pattern_matching_nothing_is_an_error(
    make_cfg, tmp_path: Path, mlflow_client
) -> None:
    summary = run(
        make_cfg(
            "model=simple_mlp",
            "precision=bf16",
            "precision.fp32_modules=['[35]']",
            "trainer.max_steps=2",
            "trainer.max_epochs=1",
            tracking="mlflow",
        )
    )
    r = mlflow_client.get_run(summary["mlflow_run_id"])
    assert r.data.tags["fp32_modules"] == "3,5" and r.data.params["precision.fp32_modules"] == "['[35]']"
    with pytest.raises(ConfigError, match=r"fp32_modules: \['head'\] match no module"):
        run(make_cfg("model=simple_mlp", "precision.fp32_modules=[head]"))


class Blowup(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1e5  # beyond float16's 65504 for any |x| > 0.66


def test_nan_tracer_names_the_injected_overflow_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(encoder=nn.Linear(16, 32), blowup=Blowup(), act=nn.ReLU(), head=nn.Linear(32, 4)))
    precision = Precision(PrecisionConfig(dtype=PrecisionName.fp16, loss_scale=LossScale.none), torch.device("cpu"))
    x, y = torch.randn(8, 16) * 4, torch.randint(0, 4, (8,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = trace_nonfinite(model, (x, y), precision)
    assert report["forward"]["module"] == "blowup"
    assert report["forward"]["output"][0]["dtype"] == "float16" and report["forward"]["output"][0]["nonfinite"] > 0
    assert report["forward"]["inputs"][0]["dtype"] == "float16" and report["forward"]["inputs"][0]["absmax"] > 0.66
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is left as found
    assert all(p.grad is None for p in model.parameters())


def test_the_tracer_finds_the_bad_micro_batch_under_accumulation() -> None:
    """With grad_accum_steps > 1 the non-finite micro-batch may be any of the step's; tracing only the first
    reported "did not reproduce". The RNG the re-runs' dropout draws from is left as found."""
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            encoder=nn.Linear(16, 32), drop=nn.Dropout(0.1), blowup=Blowup(), act=nn.ReLU(), head=nn.Linear(32, 4)
        )
    )
    precision = Precision(PrecisionConfig(dtype=PrecisionName.fp16, loss_scale=LossScale.none), torch.device("cpu"))
    y = torch.randint(0, 4, (8,))
    clean, bad = (torch.randn(8, 16) * 1e-4, y), (torch.randn(8, 16) * 4, y)
    rng = torch.get_rng_state()
    with pytest.raises(NumericsError) as err:
        Guard(precision).check({"train/loss": float("nan")}, model, [clean, bad], step=3)
    assert err.value.report["trace"]["forward"]["module"] == "blowup"
    assert torch.equal(torch.get_rng_state(), rng)


def test_fp16_statistics_round_as_the_cast_rounds() -> None:
    """Underflow is what float16 flushes to 0 (2**-25 and below, exact zeros too), overflow what becomes inf (from
    65520): a fixed threshold at the smallest subnormal and the largest finite value counted half of each wrongly."""
    model = nn.Sequential(nn.Linear(8, 1, bias=False))
    model[0].weight.grad = torch.tensor([[0.0, 2.0**-25, 3.1e-8, 2.0**-24, 1.0, 65519.0, 65520.0, 1e6]])
    stats = gradient_stats(model, scale=1.0)
    assert stats == {"0": {"underflow": 2 / 8, "overflow": 2 / 8}}
    assert gradient_stats(model, scale=2.0) == {
        "0": {"underflow": 1 / 8, "overflow": 3 / 8}
    }  # 2**-24 is kept, 65519*2 is not


def test_collapsing_scale_stops_the_run_failed_with_a_diagnosis(make_cfg, tmp_path: Path, mlflow_client) -> None:
    # grad_scale=1e30 overflows float16 at any scale: the dynamic scale halves every step toward the floor.
    with pytest.raises(NumericsError, match=r"loss scale collapsed.* Try bf16 \(fp32's exponent range"):
        run(
            make_cfg(
                "model=simple_mlp",
                "model.grad_scale=1e30",
                "precision=fp16",
                "trainer.log_every_steps=5",
                "precision.collapse_patience=100",
                "trainer.max_epochs=3",
                tracking="mlflow",
            )
        )
    client = mlflow_client
    (r,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert r.info.status == "FAILED"
    assert (
        "loss scale collapsed" in r.data.tags["diagnosis"]
        and "floor precision.min_loss_scale=1" in r.data.tags["diagnosis"]
    )
    # The config is recorded when the run starts: a stopped run shows what it ran (it used to have none).
    assert {"diagnosis.json", "config_resolved.yaml"} <= {a.path for a in client.list_artifacts(r.info.run_id)}
    report = json.loads((tmp_path / "run" / "diagnosis.json").read_text())
    assert (
        report["metrics"]["amp/loss_scale"] <= 1.0 and report["trace"]["backward"]["module"] == "6"
    )  # the GradScale layer


def test_collapse_patience_counts_on_across_a_resume(make_cfg, tmp_path: Path) -> None:
    """The windows already seen are in the checkpoint: a run resumed after 2 of 3 bad windows stops after the 3rd,
    at the step an uninterrupted run stops (a requeued job no longer restarts the count)."""
    collapsing = [
        "model=simple_mlp",
        "model.grad_scale=1e30",
        "precision=fp16",
        "trainer.log_every_steps=5",
        "trainer.max_epochs=3",
    ]
    with pytest.raises(NumericsError, match="each of the last 3 log windows") as whole:
        run(make_cfg(*collapsing, "paths.run_dir=" + str(tmp_path / "whole")))
    run(make_cfg(*collapsing, "trainer.max_steps=10", "paths.run_dir=" + str(tmp_path / "part")))
    with pytest.raises(NumericsError, match="each of the last 3 log windows") as resumed:
        run(make_cfg(*collapsing, f"trainer.resume={tmp_path / 'part'}", "paths.run_dir=" + str(tmp_path / "rest")))
    assert resumed.value.report["step"] == whole.value.report["step"] == 15


def test_collapse_policy_warn_trains_on(make_cfg, caplog) -> None:
    summary = run(
        make_cfg(
            "model=simple_mlp",
            "model.grad_scale=1e30",
            "precision=fp16",
            "precision.on_collapse=warn",
            "trainer.log_every_steps=5",
            "trainer.max_steps=30",
            "trainer.max_epochs=3",
        )
    )
    assert summary["skipped_steps"] == 30
    assert "over 50% of steps skipped in each of the last 3 log windows (100% in the latest" in caplog.text
    assert "loss scale collapsed" in caplog.text


def test_collapse_warnings_come_once_per_kind(caplog) -> None:
    """Skip rates that differ from window to window still warn once (the key used to be the rate's text)."""
    from mprun.precision.config import Action

    guard = Guard(Precision(PrecisionConfig(dtype=PrecisionName.fp16, on_collapse=Action.warn), torch.device("cpu")))
    for step, rate in enumerate([0.6, 0.7, 0.8, 0.9, 0.8], start=1):
        guard.check(
            {"train/loss": 1.0, "amp/loss_scale": 1024.0, "amp/skip_rate": rate, "amp/skipped_steps": step},
            nn.Identity(),
            [],
            step,
        )
    assert caplog.text.count("log windows") == 1 and "(80% in the latest" in caplog.text


def test_a_stop_says_which_step_its_nan_trace_is_from() -> None:
    """With trace_nonfinite=first a later stop reuses the first trace: it read as if traced at the stop's step."""
    guard = Guard(Precision(PrecisionConfig(dtype=PrecisionName.fp32, loss_scale=LossScale.none), torch.device("cpu")))
    guard.load_state_dict({"traces": [{"step": 3, "summary": "first non-finite output in forward: 2 (Linear)"}]})
    with pytest.raises(
        NumericsError, match=r"^step 15: .* NaN tracer at step 3: first non-finite output in forward: 2"
    ):
        guard.check({"train/loss": float("nan")}, nn.Identity(), [], 15)


def test_a_static_scale_that_skips_every_step_stops(make_cfg) -> None:
    """A fixed scale that overflows every step trains nothing; it used to finish 'ok' (the check was dynamic-only)."""
    with pytest.raises(
        NumericsError, match=r"over 50% of steps .* loss scale 1e\+30 \(fixed by precision.loss_scale=static"
    ):
        run(
            make_cfg(
                "model=simple_mlp",
                "precision=fp16_static",
                "precision.init_scale=1e30",
                "trainer.log_every_steps=5",
                "trainer.max_epochs=1",
            )
        )


def test_nonfinite_loss_without_a_scaler_stops_with_a_trace(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(NumericsError, match="non-finite training loss") as err:
        run(
            make_cfg(
                "model=simple_mlp",
                "precision=fp32",
                "optimizer=sgd",
                "optimizer.lr=1e12",
                "scheduler=none",
                "trainer.log_every_steps=5",
                "trainer.max_epochs=2",
            )
        )
    assert err.value.report["trace"]["summary"] in str(err.value)
    assert "fp32 overflows only when training diverges" in str(err.value) and "bf16" not in str(err.value)
    # Strict JSON: the NaN loss is null (json.dumps wrote a bare NaN, which most JSON readers reject).
    for name in ("numerics/nan_traces.json", "diagnosis.json"):
        text = (tmp_path / "run" / name).read_text()
        json.loads(text, parse_constant=lambda c, name=name: pytest.fail(f"{name} holds a bare {c}"))
    assert json.loads(text)["trace"]["loss"] is None


def test_nonfinite_skip_policy_skips_the_bad_steps_and_finishes(make_cfg, tmp_path: Path) -> None:
    summary = run(
        make_cfg(
            "model=simple_mlp",
            "precision=fp32",
            "precision.on_nonfinite=skip",
            "optimizer=sgd",
            "optimizer.lr=1e12",
            "scheduler=none",
            "trainer.max_steps=20",
            "trainer.max_epochs=1",
        )
    )
    assert 0 < summary["skipped_steps"] < 20 and summary["loss_scale"] == 1.0
    traces = json.loads((tmp_path / "run" / "numerics" / "nan_traces.json").read_text())
    assert len(traces) == 1 and traces[0]["why"].startswith("non-finite gradients")  # trace_nonfinite=first


def _story(make_cfg, tmp_path: Path, precision: str) -> tuple[dict, dict]:
    # precision.on_collapse=warn as in experiment=loss_scaling: the unscaled job trains on, at chance, to compare.
    summary = run(
        make_cfg(
            *UNDERFLOWS,
            f"precision={precision}",
            "precision.stats_every_steps=11",
            "precision.on_collapse=warn",
            "trainer.max_epochs=4",
            f"paths.run_dir={tmp_path / precision}",
            tracking="mlflow",
        )
    )
    r = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db").get_run(summary["mlflow_run_id"])
    return summary, r.data.metrics


@pytest.mark.slow  # three runs of 4 epochs
def test_loss_scaling_story(make_cfg, tmp_path: Path, caplog) -> None:
    unscaled, m_unscaled = _story(make_cfg, tmp_path, "fp16_unscaled")
    assert caplog.text.count("nothing trains") == 1 and "Without a loss scale fp16 flushes gradients" in caplog.text
    dynamic, m_dynamic = _story(make_cfg, tmp_path, "fp16")
    bf16, _ = _story(make_cfg, tmp_path, "bf16")
    # fp16 without scaling: every first-layer gradient flushes to zero, and the model stays at chance.
    assert m_unscaled["numerics/underflow/1"] > 0.99 and unscaled["val_acc"] < 0.2
    # Dynamic scaling lifts the same gradients into fp16's range: it learns.
    assert m_dynamic["numerics/underflow/1"] < 0.5 and dynamic["val_acc"] > 0.8
    assert bf16["val_acc"] > 0.8  # bf16 has fp32's exponent range: no scaler needed
    assert "grad underflow in fp16" in (tmp_path / "fp16_unscaled" / "numerics" / "stats.md").read_text()


@pytest.mark.parametrize(
    "precision,hint",
    [
        (
            ["precision=fp16_unscaled"],
            "Without a loss scale fp16 flushes gradients below 6e-8 to zero: use precision=fp16",
        ),
        (
            ["precision=fp16_static", "precision.init_scale=1e-4"],
            "The fixed loss scale 0.0001 does not lift these gradients",
        ),
    ],
)
def test_gradients_that_all_underflow_stop_the_run_saying_what_to_change(
    make_cfg, tmp_path: Path, mlflow_client, precision, hint
) -> None:
    """Every gradient flushed to zero: the run finished 'ok' at chance accuracy, with no word of it."""
    with pytest.raises(
        NumericsError,
        match=r"step 15: every gradient was exactly zero at each of the last 3 log steps "
        r"while the training loss was 2\.\d+: nothing trains\. " + hint,
    ) as stop:
        run(make_cfg(*UNDERFLOWS, *precision, "trainer.log_every_steps=5", "trainer.max_epochs=2", tracking="mlflow"))
    assert "trace" not in stop.value.report  # nothing non-finite to trace
    client = mlflow_client
    (r,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert r.info.status == "FAILED" and "nothing trains" in r.data.tags["diagnosis"]


def _window(guard: Guard, step: int, loss: float, norm: float) -> None:
    guard.check({"train/loss": loss, "train/grad_norm": norm, "amp/loss_scale": 1.0}, nn.Identity(), [], step)


def test_zero_gradients_count_in_a_row_while_the_loss_is_not_zero() -> None:
    fp32 = Precision(PrecisionConfig(dtype=PrecisionName.fp32, loss_scale=LossScale.none), torch.device("cpu"))
    guard = Guard(fp32)
    for step, (loss, norm) in enumerate([(2.0, 0.0), (2.0, 0.0), (2.0, 1e-3), (2.0, 0.0), (2.0, 0.0)], start=1):
        _window(guard, step, loss, norm)  # a window with a gradient starts the count again
    for step in range(6, 10):
        _window(guard, step, 0.0, 0.0)  # a loss of exactly 0 has nothing left to learn: not a problem
    _window(guard, 10, 2.0, 0.0)
    _window(guard, 11, 2.0, 0.0)
    restored = Guard(fp32)  # the count is in the checkpoint, like collapse_patience's skip windows
    restored.load_state_dict(guard.state_dict())
    with pytest.raises(
        NumericsError, match=r"In fp32 \(fp32's exponent range\) this is not underflow: check that the loss"
    ):
        _window(restored, 12, 2.0, 0.0)


def test_statistics_with_gradient_accumulation(make_cfg, tmp_path: Path) -> None:
    summary = run(
        make_cfg(
            *UNDERFLOWS,
            "precision=fp16",
            "precision.stats_every_steps=2",
            "trainer.grad_accum_steps=2",
            "trainer.max_steps=4",
            "trainer.max_epochs=1",
        )
    )
    assert summary["steps"] == 4
    table = (tmp_path / "run" / "numerics" / "stats.md").read_text()
    assert "| 1 (Linear) |" in table  # module names and classes, not a wrapper's
    # A markdown table: every row has the header's cells (a '|' inside the header's text used to add two).
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + 7 and {line.count("|") for line in rows} == {6}  # simple_mlp: 7 top-level modules

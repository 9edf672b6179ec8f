"""Precision beyond autocast: precision=bf16_pure (bf16 weights and optimizer state, stochastic rounding) and
precision=fp8 (torchao Float8Linear, emulated on the CPU), through the real config and loop."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import run_cli_here, run_statuses

from mprun import checkpoint, hardware
from mprun.errors import ConfigError, NumericsError
from mprun.experiment import run
from mprun.models.vision import SimpleCNN, SimpleMLP
from mprun.precision import bf16_pure
from mprun.precision.auto import resolve
from mprun.precision.names import PrecisionName

# An MLP with two 64x64 hidden layers on digits (8x8 = 64 inputs): Linear layers fp8 can take, at a size a CPU trains
# in a second. The threshold is lowered to them: its default (512) is for GPU-sized layers.
FP8_MLP = ["model=simple_mlp", "model.hidden=64", "precision.fp8_min_features=16"]


def round_stochastic(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 as the bf16 optimizers store their results."""
    bits = x.clone().view(torch.int32)
    bf16_pure._round_bits(bits)
    return bits.view(torch.float32).to(torch.bfloat16)


def test_stochastic_rounding_is_right_on_average_and_round_to_nearest_is_not() -> None:
    x = torch.full((200_000,), 1 + 2**-10)  # a quarter of the way from 1.0 to the next bf16 number (1 + 2^-7)
    rounded = round_stochastic(x).float()
    assert set(rounded.unique().tolist()) == {1.0, 1 + 2**-7}
    assert rounded.mean().item() == pytest.approx(1 + 2**-10, abs=2e-5)
    assert x.to(torch.bfloat16).float().unique().tolist() == [1.0]
    # Negative values round away from zero the same way; inf and NaN stay what they are.
    assert round_stochastic(-x).float().mean().item() == pytest.approx(-(1 + 2**-10), abs=2e-5)
    special = round_stochastic(torch.tensor([float("inf"), float("-inf"), float("nan")]))
    assert special[0].item() == float("inf") and special[1].item() == float("-inf") and special[2].isnan()


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_the_bf16_optimizers_do_torchs_update(name: str) -> None:
    """On fp32 parameters, with nothing to round, each does exactly what the torch optimizer it stands for does."""
    torch.manual_seed(0)
    kwargs = {"lr": 0.05, "weight_decay": 0.1} | ({"momentum": 0.9, "nesterov": True} if name == "SGD" else {})
    ours_p = torch.randn(8, 4, requires_grad=True)
    theirs_p = ours_p.detach().clone().requires_grad_(True)
    ours = getattr(bf16_pure, name)([ours_p], stochastic_rounding=False, **kwargs)
    theirs = getattr(torch.optim, name)([theirs_p], **kwargs)
    for _ in range(5):
        grad = torch.randn(8, 4)
        for p, opt in ((ours_p, ours), (theirs_p, theirs)):
            p.grad = grad.clone()
            opt.step()
    torch.testing.assert_close(ours_p, theirs_p, rtol=1e-5, atol=1e-6)
    assert ours.state_dict()["state"][0].keys() == theirs.state_dict()["state"][0].keys()


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_bf16_updates_below_half_an_ulp_stall_without_stochastic_rounding_and_add_up_with_it(name: str) -> None:
    """Weights at 1.0 in bf16 (a step of 2^-7 there) and 100 updates of 1e-3 each, a quarter of that step: round to
    nearest puts every one back to 1.0; stochastic rounding lands on 0.9 on average, where fp32 lands."""
    torch.manual_seed(0)
    landed = {}
    for sr in (False, True):
        p = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        opt = getattr(bf16_pure, name)([p], lr=1e-3, stochastic_rounding=sr)
        for _ in range(100):
            p.grad = torch.ones_like(p)  # SGD moves by lr * 1; Adam's normalised step is lr too
            opt.step()
        landed[sr] = p.float().mean().item()
    assert landed[False] == 1.0  # stalled
    assert landed[True] == pytest.approx(0.9, abs=0.005)


def test_bf16_pure_halves_the_parameter_and_optimizer_bytes_and_trains_as_well_as_bf16(make_cfg, tmp_path) -> None:
    """The default run (simple_cnn on digits, AdamW): fp32 weights with two fp32 moments are 12 bytes a parameter,
    bf16_pure's are 6; the accuracy stays within a point of bf16 autocast's."""
    auto = run(make_cfg("precision=bf16", f"paths.run_dir={tmp_path}/bf16"))
    pure = run(make_cfg("precision=bf16_pure", f"paths.run_dir={tmp_path}/pure"))
    assert pure["param_state_mib"] == pytest.approx(auto["param_state_mib"] / 2, rel=1e-9)
    assert pure["param_state_mib"] == pytest.approx(pure["parameters"] * 6 / 2**20, rel=1e-9)
    assert abs(pure["val_acc"] - auto["val_acc"]) <= 0.01 and pure["val_acc"] > 0.95
    assert pure["precision_detail"].startswith("bf16_pure (bf16 weights and optimizer state, stochastic rounding)")
    # Its checkpoint holds bf16 weights under the plain model's names: an fp32 model loads and runs them.
    weights = checkpoint.load(tmp_path / "pure" / "checkpoints" / "final.pt")["model"]
    assert {w.dtype for w in weights.values() if w.is_floating_point()} == {torch.bfloat16}
    plain = SimpleCNN(1, (8, 8), 10)
    plain.load_state_dict(weights)
    assert plain(torch.randn(2, 1, 8, 8)).dtype == torch.float32


def test_a_bf16_pure_run_resumes_exactly(make_cfg, tmp_path: Path) -> None:
    """The optimizer's moments are bf16 and its rounding draws random numbers: a run stopped mid-epoch and resumed
    ends bit for bit where the uninterrupted run ends (the checkpoint carries both)."""
    common = ["precision=bf16_pure", "model=simple_mlp", "scheduler=none", "trainer.max_epochs=2"]
    run(make_cfg(*common, f"paths.run_dir={tmp_path}/full"))
    run(make_cfg(*common, "trainer.max_steps=30", f"paths.run_dir={tmp_path}/part"))
    run(make_cfg(*common, f"trainer.resume={tmp_path}/part", f"paths.run_dir={tmp_path}/rest"))
    a = checkpoint.load(tmp_path / "full" / "checkpoints" / "final.pt")
    b = checkpoint.load(tmp_path / "rest" / "checkpoints" / "final.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    moments = [v for s in b["optimizer"]["state"].values() for k, v in s.items() if k.startswith("exp_avg")]
    assert moments and {m.dtype for m in moments} == {torch.bfloat16}


@pytest.mark.slow  # ~18 s: two GPT runs, fp8's emulated on the CPU
def test_fp8_trains_like_bf16_and_records_the_layers_it_swapped(make_cfg, tmp_path: Path, mlflow_client) -> None:
    bf16 = run(make_cfg(*FP8_MLP, "precision=bf16", f"paths.run_dir={tmp_path}/bf16"))
    fp8 = run(make_cfg(*FP8_MLP, "precision=fp8", f"paths.run_dir={tmp_path}/fp8", tracking="mlflow"))
    assert fp8["fp8_modules"] == 2 and bf16["fp8_modules"] == 0  # the two hidden layers; the output layer stays
    assert abs(fp8["val_acc"] - bf16["val_acc"]) <= 0.02 and fp8["val_acc"] > 0.9
    client = mlflow_client
    r = client.get_run(fp8["mlflow_run_id"])
    assert r.data.tags["fp8_modules"] == "1,3" and r.data.tags["precision"] == "fp8"
    loss = [m.value for m in sorted(client.get_metric_history(r.info.run_id, "train/loss"), key=lambda m: m.step)]
    assert loss[-1] < loss[0] / 4
    # Float8Linear keeps its weights as plain fp32 parameters of the same names: the unconverted model loads them.
    weights = checkpoint.load(tmp_path / "fp8" / "checkpoints" / "final.pt")["model"]
    plain = SimpleMLP(1, (8, 8), 10, hidden=64)
    plain.load_state_dict(weights)
    assert all(type(w) is torch.Tensor and w.dtype == torch.float32 for w in weights.values())


def test_an_fp8_run_resumes_and_its_numerics_tools_see_the_float8_layers(make_cfg, tmp_path: Path) -> None:
    """Checkpoint, resume, per-module statistics and the NaN tracer with Float8Linear modules in the model."""
    common = [*FP8_MLP, "precision=fp8", "scheduler=none", "trainer.max_epochs=2", "precision.stats_every_steps=10"]
    full = run(make_cfg(*common, f"paths.run_dir={tmp_path}/full"))
    run(make_cfg(*common, "trainer.max_steps=30", f"paths.run_dir={tmp_path}/part"))
    rest = run(make_cfg(*common, f"trainer.resume={tmp_path}/part", f"paths.run_dir={tmp_path}/rest"))
    a = checkpoint.load(tmp_path / "full" / "checkpoints" / "final.pt")["model"]
    b = checkpoint.load(tmp_path / "rest" / "checkpoints" / "final.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a) and rest["val_acc"] == full["val_acc"]
    assert "| 1 (Float8Linear) |" in (tmp_path / "full" / "numerics" / "stats.md").read_text()
    # A learning rate that blows the run up: the numerics guard stops it and the tracer names the first module to
    # produce inf/NaN, hooks and all on the Float8Linear layers.
    with pytest.raises(NumericsError) as stopped:
        run(make_cfg(*common, "optimizer.lr=1e6", f"paths.run_dir={tmp_path}/nan"))
    trace = stopped.value.report["trace"]
    assert trace["forward"]["module"] == "1" and trace["forward"]["type"] == "Float8Linear"


@pytest.mark.parametrize(
    ("gpu", "says"),
    [(("Tesla V100-SXM2-16GB", 7, 0), "Use precision=bf16 (Ampere+) or fp16"), (("NVIDIA A100", 8, 0), "bf16")],
)
def test_fp8_on_a_gpu_without_float8_tensor_cores_names_bf16(monkeypatch, gpu: tuple, says: str) -> None:
    monkeypatch.setattr(hardware, "gpu_capability", lambda device: gpu)
    with pytest.raises(ConfigError, match=r"precision=fp8 needs float8 tensor cores .*sm_89") as e:
        resolve(PrecisionName.fp8, torch.device("cuda"))
    assert says in str(e.value)
    monkeypatch.setattr(hardware, "gpu_capability", lambda device: ("NVIDIA H200", 9, 0))
    assert resolve(PrecisionName.fp8, torch.device("cuda"))[0] is PrecisionName.fp8
    monkeypatch.setattr(hardware, "gpu_capability", lambda device: ("NVIDIA H200", 9, 0))
    assert resolve(PrecisionName.auto, torch.device("cuda"))[0] is PrecisionName.bf16  # auto never picks fp8


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["precision=fp8"], "precision=fp8: no Linear layer of this model qualifies for float8 (12: the output layer"),
        ([*FP8_MLP, "precision=fp8", "precision.fp8_skip=[head*]"], "precision.fp8_skip: ['head*'] match no module"),
        ([*FP8_MLP, "precision=fp8", "precision.fp8_min_features=128"], "1: 64x64 below precision.fp8_min_features"),
        (["precision=bf16_pure", "precision.loss_scale=dynamic"], "loss_scale=dynamic applies to fp16 only"),
        (
            [*FP8_MLP, "precision=fp8", "precision.fp8_recipe=rowwise", "precision.fp8_fsdp_all_gather=true"],
            "precision.fp8_fsdp_all_gather=true needs precision.fp8_recipe=tensorwise",
        ),
        (["precision=bf16_pure", "precision.fp32_modules=[0]"], "does not apply to precision=bf16_pure"),
    ],
)
def test_bad_low_precision_input_is_one_line_and_leaves_no_run(tmp_path: Path, overrides: list, message: str) -> None:
    ended = run_cli_here(*overrides, "trainer.max_epochs=1", "trainer.progress=off", cwd=tmp_path)
    assert ended.returncode == 2, ended.stderr[-2000:]
    (line,) = [x for x in ended.stderr.splitlines() if x.startswith("mprun: error:")]
    assert message in line and "Traceback" not in ended.stderr
    assert "RUNNING" not in run_statuses(tmp_path / "outputs" / "mlflow.db")


def test_an_unknown_fp8_recipe_gets_hydras_list_of_the_valid_ones(tmp_path: Path) -> None:
    ended = run_cli_here("precision=fp8", "precision.fp8_recipe=nonsense", cwd=tmp_path)
    assert ended.returncode != 0 and "Traceback" not in ended.stderr
    assert "Invalid value 'nonsense', expected one of [tensorwise, rowwise, rowwise_with_gw_hp]" in ended.stderr
    assert not (tmp_path / "outputs").exists()


def test_fp8_without_torchao_names_the_install_command(make_cfg, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"precision=fp8 needs torchao .*pip install 'torchao>=0.18'"):
        run(make_cfg(*FP8_MLP, "precision=fp8"))


def test_the_sweep_report_shows_what_bf16_pure_saves_and_says_what_fp8_swapped(tmp_path: Path, monkeypatch) -> None:
    """A CPU's peak memory is the process's RSS, which says little of precision: the report's memory bars show the
    parameter and optimizer-state bytes there (they showed peak RSS), the table has them as a column, and a note says
    what bf16_pure and fp8 are."""
    from test_sweep import _row

    from mprun import report
    from mprun.report import groups

    rows = [
        _row(0, "fp32", val_acc=0.9, samples_per_s=100.0, peak_mem_mib=700.0, param_state_mib=1.2),
        _row(1, "bf16_pure", val_acc=0.9, samples_per_s=90.0, peak_mem_mib=690.0, param_state_mib=0.6),
        _row(2, "fp8", val_acc=0.9, samples_per_s=50.0, peak_mem_mib=710.0, param_state_mib=1.2),
    ]
    for r in rows:
        r.mem_kind = "process_peak_rss"
    drawn = {}

    def save(fig, path: Path) -> str:
        drawn[path.name] = (fig.axes[1].get_title(), [bar.get_width() for bar in fig.axes[1].patches])
        return path.name

    monkeypatch.setattr("mprun.report.plots._save", save)
    report.plot(groups.group(rows), tmp_path)
    assert drawn["perf.png"] == ("Parameters + optimizer state", [1.2, 0.6, 1.2])
    assert [c[report.columns(rows).index("param+state MiB")] for c in report.table_rows(rows)] == ["1.2", "0.6", "1.2"]
    notes = report.notes_for(rows)
    assert any(n.startswith("bf16_pure: weights, gradients and optimizer state stored in bf16") for n in notes)
    assert any(n.startswith("fp8: torchao float8 matmuls in the Linear layers its run tag fp8_modules") for n in notes)


def test_fp8_with_a_torchao_too_old_names_the_upgrade(make_cfg, monkeypatch) -> None:
    import torchao

    monkeypatch.setattr(torchao, "__version__", "0.9.0")
    with pytest.raises(ConfigError, match=r"needs torchao >= 0.18, found 0.9.0; upgrade with: pip install 'torchao"):
        run(make_cfg(*FP8_MLP, "precision=fp8"))

"""The precision object and the loop's step logic, on the CPU (torch's CPU autocast and GradScaler do fp16).
MPRUN_TEST_DEVICE=cuda runs the same tests on a GPU (bench/gpu_session.sh checks does), except those about CPUs."""

from __future__ import annotations

import copy
import os
import re
import warnings

import pytest
import torch
from torch import nn

from mprun.data.loaders import DataBundle, TensorLoader
from mprun.distributed import SINGLE
from mprun.errors import ConfigError
from mprun.hardware import math_flags_restored, set_math_flags
from mprun.optim.factories import constant, implementation, prepare
from mprun.precision.auto import resolve
from mprun.precision.config import LossScale, NonFinite, PrecisionConfig
from mprun.precision.names import PrecisionName
from mprun.precision.runtime import Precision
from mprun.progress import Progress
from mprun.tracking.base import Tracker
from mprun.training.config import TrainerConfig
from mprun.training.loop import train_epoch, train_step
from mprun.training.state import Training, TrainState

CPU = torch.device("cpu")
DEVICE = torch.device(os.environ.get("MPRUN_TEST_DEVICE", "cpu"))


def fp16(**kw) -> Precision:
    return Precision(PrecisionConfig(dtype=PrecisionName.fp16, **kw), DEVICE)


def on_device(model: nn.Module, *tensors: torch.Tensor):
    return model.to(DEVICE), *(t.to(DEVICE) for t in tensors)


class InfOnSteps(nn.Module):
    """Linear model whose weight gradient becomes inf on chosen (0-based) backward calls."""

    def __init__(self, bad_steps: set[int]):
        super().__init__()
        self.fc = nn.Linear(4, 3, device=DEVICE)
        self.calls, self.bad = 0, bad_steps
        self.fc.weight.register_hook(self._hook)

    def _hook(self, grad: torch.Tensor) -> torch.Tensor:
        bad = self.calls in self.bad
        self.calls += 1
        return grad * float("inf") if bad else grad

    def forward(self, x):
        return self.fc(x)


def training(model: nn.Module, opt: torch.optim.Optimizer, sched, precision: Precision) -> Training:
    """The loop's built objects for a model on DEVICE; the batches come from the loader train_epoch is given, the
    task (classification) from the bundle."""
    data = DataBundle("test", None, None, 1, (4, 1), 3)
    return Training(
        model=model, data=data, optimizer=opt, scheduler=sched, precision=precision, device=DEVICE, world=SINGLE
    )


def run_epoch(model: nn.Module, precision: Precision, steps: int, log_every: int = 1):
    torch.manual_seed(0)
    x, y = torch.randn(steps * 8, 4, device=DEVICE), torch.randint(0, 3, (steps * 8,), device=DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, **implementation())  # fused, as mprun builds it
    sched = constant(opt, total_steps=steps, warmup_steps=0)
    cfg = TrainerConfig(log_every_steps=log_every)
    state = TrainState()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_epoch(
            training(model, opt, sched, precision),
            TensorLoader(x, y, 8, shuffle=True),
            cfg,
            state,
            tracker=Tracker(),
            progress=Progress(1, steps, enabled=False),
        )
    return sched, state, caught


class NanLogitsOnSteps(InfOnSteps):
    """Its logits (so its loss) are NaN on chosen (0-based) steps, its weight gradient inf on others; keeps its
    logits."""

    def __init__(self, nan_steps: set[int], inf_grad_steps: set[int] = frozenset()):
        super().__init__(set(inf_grad_steps))
        self.nan_steps, self.seen = nan_steps, []

    def forward(self, x):
        logits = self.fc(x) * float("nan") if len(self.seen) in self.nan_steps else self.fc(x)
        self.seen.append(logits.detach())
        return logits


class Recorder(Tracker):
    def __init__(self) -> None:
        self.logged: list[dict] = []

    def log_metrics(self, metrics, step: int) -> None:
        self.logged.append(dict(metrics))


def epoch_on(model: nn.Module, precision: Precision, x: torch.Tensor, y: torch.Tensor) -> tuple[float, list[float]]:
    """One epoch of 6 steps of 8 samples in order, logging every 2: (the epoch's mean loss, the logged train/loss)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, **implementation())
    tracker = Recorder()
    run = training(model, opt, constant(opt, total_steps=6, warmup_steps=0), precision)
    mean = train_epoch(
        run,
        TensorLoader(x, y, 8, shuffle=False),
        TrainerConfig(log_every_steps=2),
        TrainState(),
        tracker=tracker,
        progress=Progress(1, 6, enabled=False),
    )
    return mean, [m["train/loss"] for m in tracker.logged]


def test_a_skipped_steps_nan_loss_stays_out_of_the_loss_means() -> None:
    """The scaler skips a step whose loss is NaN; that loss must not turn the rest of the epoch's train/loss
    (or its mean) into NaN. A skipped step with a finite loss counts; a NaN loss without a scaler still shows."""
    torch.manual_seed(0)
    x, y = torch.randn(48, 4, device=DEVICE), torch.randint(0, 3, (48,), device=DEVICE)
    model, precision = NanLogitsOnSteps({1}), fp16(init_scale=1024.0)
    mean, logged = epoch_on(model, precision, x, y)
    assert precision.counters()["skipped_steps"] == 1
    loss = [
        torch.nn.functional.cross_entropy(logits.float(), y[8 * i : 8 * i + 8]).item()
        for i, logits in enumerate(model.seen)
    ]
    assert logged == pytest.approx(
        [loss[0], (loss[2] + loss[3]) / 2, (loss[4] + loss[5]) / 2], rel=1e-5
    )  # step 1 left out
    assert mean == pytest.approx((loss[0] + sum(loss[2:])) / 5, rel=1e-5)
    # A step skipped for a gradient overflow has a finite loss: it counts as usual.
    model, precision = NanLogitsOnSteps(set(), inf_grad_steps={1}), fp16(init_scale=1024.0)
    mean, logged = epoch_on(model, precision, x, y)
    assert precision.counters()["skipped_steps"] == 1
    loss = [
        torch.nn.functional.cross_entropy(logits.float(), y[8 * i : 8 * i + 8]).item()
        for i, logits in enumerate(model.seen)
    ]
    assert logged == pytest.approx([sum(loss[i : i + 2]) / 2 for i in (0, 2, 4)], rel=1e-5) and mean == pytest.approx(
        sum(loss) / 6, rel=1e-5
    )
    # Without a scaler nothing skips the step: its NaN loss stays visible (numerics.Guard stops the run on it).
    model, precision = (
        NanLogitsOnSteps({1}),
        Precision(PrecisionConfig(dtype=PrecisionName.fp32, loss_scale=LossScale.none), DEVICE),
    )
    mean, logged = epoch_on(model, precision, x, y)
    assert torch.isnan(torch.tensor([mean, logged[0]])).all()


def test_dynamic_scaling_skips_the_update_and_backs_off() -> None:
    model = InfOnSteps({0})
    before = [p.detach().clone() for p in model.parameters()]
    precision = fp16(init_scale=1024.0, growth_interval=3)
    sched, state, caught = run_epoch(model, precision, steps=1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the fused kernel skipped the update
    assert precision.counters()["skipped_steps"] == 1
    assert precision.scale_value() == 512.0  # backoff_factor 0.5
    assert sched.last_epoch == 1  # attempted steps drive the schedule, as in a torch.amp loop
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]


def test_dynamic_scale_grows_after_growth_interval_clean_steps() -> None:
    precision = fp16(init_scale=1024.0, growth_interval=3)
    sched, state, caught = run_epoch(InfOnSteps({0}), precision, steps=4)
    # step 0 overflowed (1024 -> 512), steps 1-3 are clean: after 3 clean steps the scale doubles.
    assert precision.counters()["skipped_steps"] == 1
    assert precision.scale_value() == 1024.0
    assert sched.last_epoch == 4
    # The telemetry agrees with what the scaler did: one backoff, one growth.
    assert (precision.backoff_events, precision.growth_events, precision.steps_since_overflow) == (1, 1, 3)
    assert state.step == 4
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]


def test_static_scaling_skips_but_never_moves() -> None:
    precision = fp16(loss_scale=LossScale.static, init_scale=128.0, growth_interval=1)
    sched, _, _ = run_epoch(InfOnSteps({1}), precision, steps=4)
    assert precision.counters()["skipped_steps"] == 1
    assert precision.scale_value() == 128.0  # no backoff on overflow, no growth with growth_interval=1
    assert precision.backoff_events == precision.growth_events == 0
    assert sched.last_epoch == 4


@pytest.mark.parametrize(
    "saved", [dict(loss_scale=LossScale.dynamic), dict(loss_scale=LossScale.static, init_scale=8.0)]
)
def test_a_resumed_static_scale_is_the_configured_one(saved: dict) -> None:
    # A dynamic run's reached scale (65536 here), or an old fixed scale, is not what the resumed run asked for.
    resumed = fp16(loss_scale=LossScale.static, init_scale=128.0)
    resumed.load_state_dict(fp16(**saved).state_dict())
    assert resumed.scale_value() == 128.0
    run_epoch(on_device(nn.Linear(4, 3))[0], resumed, steps=2)
    assert resumed.scale_value() == 128.0


def test_fp16_without_loss_scaling_has_no_scaler() -> None:
    precision = fp16(loss_scale=LossScale.none)
    assert not precision.scaler.is_enabled()
    assert precision.scale_value() == 1.0


def test_unscaled_fp16_step_with_inf_is_taken() -> None:
    # Without a scaler nothing checks for inf: the step happens (issue 4 adds a policy for this).
    precision = fp16(loss_scale=LossScale.none)
    _, state, _ = run_epoch(InfOnSteps({0}), precision, steps=1)
    assert precision.counters()["skipped_steps"] == 0


def test_clipping_sees_unscaled_gradients() -> None:
    torch.manual_seed(0)
    model, x, y = on_device(
        nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)),
        torch.randn(32, 16) * 10,
        torch.randint(0, 4, (32,)),
    )
    ref = copy.deepcopy(model)
    max_norm = 0.05

    # fp32 reference: plain backward + clip_grad_norm_ + SGD.
    ref_opt = torch.optim.SGD(ref.parameters(), lr=1.0)
    nn.functional.cross_entropy(ref(x), y).backward()
    ref_norm = nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    ref_opt.step()
    assert ref_norm > 10 * max_norm  # clipping really acts

    precision = fp16(init_scale=2.0**12, grad_clip_norm=max_norm)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    _, norm = train_step(model, [(x, y)], opt, precision, want_norm=True)
    assert not precision.last_step_skipped()
    assert norm.item() == pytest.approx(ref_norm.item(), rel=2e-2)  # the unscaled norm, not 4096x it
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-2, atol=2e-3)


def test_clip_by_value_sees_unscaled_gradients() -> None:
    torch.manual_seed(0)
    model, x, y = on_device(nn.Linear(8, 2), torch.randn(16, 8), torch.randint(0, 2, (16,)))
    before = model.weight.detach().clone()
    precision = fp16(init_scale=2.0**12, grad_clip_value=1e-3)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    _, _ = train_step(model, [(x, y)], opt, precision, want_norm=False)
    assert not precision.last_step_skipped()
    # With lr=1 each weight moves by exactly its clipped gradient: at most 1e-3, and not 1e-3 / 4096.
    delta = (model.weight.detach() - before).abs()
    assert delta.max().item() == pytest.approx(1e-3, rel=1e-3)


def test_gradient_accumulation_equals_one_big_batch() -> None:
    torch.manual_seed(0)
    model, x, y = on_device(
        nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)), torch.randn(16, 6), torch.randint(0, 3, (16,))
    )
    big = copy.deepcopy(model)
    fp32 = Precision(PrecisionConfig(dtype=PrecisionName.fp32, loss_scale=LossScale.none), DEVICE)
    opt_a = torch.optim.SGD(model.parameters(), lr=0.5)
    opt_b = torch.optim.SGD(big.parameters(), lr=0.5)
    loss_a, _ = train_step(model, [(x[:8], y[:8]), (x[8:], y[8:])], opt_a, fp32, want_norm=False)
    loss_b, _ = train_step(big, [(x, y)], opt_b, fp32, want_norm=False)
    torch.testing.assert_close(loss_a, loss_b)
    for p, q in zip(model.parameters(), big.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # summation order differs; a wrong average is 2x off


def test_auto_is_fp32_on_a_cpu_without_amx(monkeypatch) -> None:
    monkeypatch.setattr("mprun.hardware.cpu_amx_units", set)
    name, why = resolve(PrecisionName.auto, CPU)
    assert name is PrecisionName.fp32 and "CPU" in why


def test_auto_is_bf16_on_a_cpu_with_amx(monkeypatch) -> None:
    monkeypatch.setattr("mprun.hardware.cpu_amx_units", lambda: {"amx_bf16"})
    assert resolve(PrecisionName.auto, CPU)[0] is PrecisionName.bf16


@pytest.mark.parametrize(
    "units,emulated", [(set(), ["bf16", "fp16"]), ({"amx_bf16"}, ["fp16"]), ({"amx_bf16", "amx_fp16"}, [])]
)
def test_half_precision_the_cpu_has_no_amx_unit_for_warns(monkeypatch, caplog, units: set, emulated: list) -> None:
    # Sapphire Rapids has AMX-BF16 but no AMX-FP16: fp16 autocast there is emulated like on any other CPU.
    monkeypatch.setattr("mprun.hardware.cpu_amx_units", lambda: units)
    for name in ("bf16", "fp16"):
        caplog.clear()
        assert resolve(PrecisionName(name), CPU)[0] is PrecisionName(name)
        assert ("emulation" in caplog.text) is (name in emulated)


@pytest.mark.parametrize("leftover", ["legacy", "set_float32_matmul_precision"])
@pytest.mark.parametrize("name,matmul,cudnn", [("fp32", False, False), ("tf32", True, True), ("bf16", False, True)])
def test_tf32_flags_are_set_every_run(name: str, matmul: bool, cudnn: bool, leftover: str) -> None:
    with math_flags_restored():
        if leftover == "legacy":  # a previous job's leftovers
            torch.backends.cuda.matmul.allow_tf32 = not matmul
        else:  # the caller's own, through the API torch's docs recommend (it sets cuBLAS and oneDNN)
            torch.set_float32_matmul_precision("highest" if matmul else "high")
        torch.backends.cudnn.allow_tf32 = not cudnn
        p = Precision(PrecisionConfig(dtype=PrecisionName(name), loss_scale=LossScale.none), DEVICE)
        set_math_flags(**p.math_flags(), cudnn_benchmark=True)
        assert torch.backends.cuda.matmul.allow_tf32 is matmul
        assert torch.get_float32_matmul_precision() == ("high" if matmul else "highest")  # readable: no mixed state
        assert torch.backends.cudnn.allow_tf32 is cudnn


def _tf32_state() -> tuple:
    """Every TF32 setting a caller could look at: the legacy flags (None where torch refuses to read them) and, on
    torch >= 2.9, each backend's own."""

    def read(flag):
        try:
            return flag()
        except RuntimeError:  # torch's answer to a mix of its legacy and new TF32 APIs
            return None

    b = torch.backends
    legacy = (
        read(torch.get_float32_matmul_precision),
        read(lambda: b.cuda.matmul.allow_tf32),
        read(lambda: b.cudnn.allow_tf32),
    )
    return legacy + tuple(
        getattr(k, "fp32_precision", None) for k in (b.cuda.matmul, b.mkldnn.matmul, b.cudnn.conv, b.cudnn.rnn)
    )


@pytest.mark.parametrize("caller", ["legacy", "set_float32_matmul_precision", "per_backend"])
@pytest.mark.parametrize("name", ["fp32", "tf32", "bf16"])
def test_a_run_puts_back_the_callers_tf32_settings_as_set(caller: str, name: str) -> None:
    """A caller's legacy allow_tf32=True came back with oneDNN set to tf32 too; a caller's per-backend
    cuda.matmul.fp32_precision='tf32' came back as 'ieee'."""
    b = torch.backends
    if caller == "per_backend" and not hasattr(b.cuda.matmul, "fp32_precision"):
        pytest.skip("torch < 2.9 has no per-backend TF32 settings")
    with math_flags_restored():  # this test's own changes do not outlive it
        if caller == "legacy":
            b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = True, False
        elif caller == "set_float32_matmul_precision":
            torch.set_float32_matmul_precision("high")
        else:
            b.cuda.matmul.fp32_precision = "tf32"
        before = _tf32_state()
        with math_flags_restored():
            p = Precision(PrecisionConfig(dtype=PrecisionName(name), loss_scale=LossScale.none), DEVICE)
            set_math_flags(**p.math_flags(), cudnn_benchmark=False)
        after = _tf32_state()
        # Each backend's setting as the caller left it; a legacy flag the caller could read reads the same (one torch
        # could not read, after a mix of its APIs, may read again).
        assert after[3:] == before[3:]
        assert [a for a, b in zip(after[:3], before[:3]) if b is not None] == [b for b in before[:3] if b is not None]


def test_the_cpus_amx_units_are_read_from_its_flags(monkeypatch) -> None:
    import io

    import mprun.hardware

    monkeypatch.setattr(mprun.hardware.platform, "system", lambda: "Linux")
    monkeypatch.setattr(
        mprun.hardware, "open", lambda *a, **k: io.StringIO("flags : fpu amx_bf16 amx_tile amx_fp16\n"), raising=False
    )
    assert mprun.hardware.cpu_amx_units() == {"amx_bf16", "amx_fp16"}  # the file used to be read once per unit


def test_autocast_dtype_follows_precision() -> None:
    model, x = on_device(nn.Linear(4, 4), torch.randn(2, 4))
    with fp16().autocast():
        assert model(x).dtype == torch.float16
    with Precision(PrecisionConfig(dtype=PrecisionName.bf16, loss_scale=LossScale.none), DEVICE).autocast():
        assert model(x).dtype == torch.bfloat16
    with Precision(PrecisionConfig(dtype=PrecisionName.fp32, loss_scale=LossScale.none), DEVICE).autocast():
        assert model(x).dtype == torch.float32


def test_telemetry_skip_rate_is_per_log_window() -> None:
    precision = fp16(init_scale=1024.0, growth_interval=100)
    run_epoch(InfOnSteps({0, 2}), precision, steps=4, log_every=1000)  # the loop never reads the window
    t = precision.telemetry()
    assert t["amp/skip_rate"] == 0.5 and t["amp/skipped_steps"] == 2 and t["amp/steps_since_overflow"] == 1
    assert t["amp/loss_scale"] == 256.0 and t["amp/backoff_events"] == 2 and t["amp/growth_events"] == 0
    assert precision.telemetry()["amp/skip_rate"] == 0.0  # a new, empty window


def test_telemetry_growth_matches_the_scaler_over_many_steps() -> None:
    precision = fp16(init_scale=8.0, growth_interval=2)
    run_epoch(InfOnSteps({3, 4}), precision, steps=12, log_every=1000)
    # The scale the scaler really holds equals init * growth^events * backoff^events.
    t = precision.telemetry()
    assert t["amp/loss_scale"] == 8.0 * 2.0 ** t["amp/growth_events"] * 0.5 ** t["amp/backoff_events"]
    assert t["amp/backoff_events"] == 2 and t["amp/growth_events"] == 4


def test_counters_round_trip_through_the_checkpoint_state() -> None:
    precision = fp16(init_scale=1024.0, growth_interval=2)
    run_epoch(InfOnSteps({1}), precision, steps=5)
    restored = fp16(init_scale=1024.0, growth_interval=2)
    restored.load_state_dict(precision.state_dict())
    assert (
        restored.counters()
        == precision.counters()
        == {"skipped_steps": 1, "steps_since_overflow": 3, "growth_events": 1, "backoff_events": 1}
    )
    assert restored.scale_value() == precision.scale_value()
    # and the restored object goes on counting from there: one more skip, one more backoff
    run_epoch(InfOnSteps({0}), restored, steps=1)
    assert restored.counters() == {
        "skipped_steps": 2,
        "steps_since_overflow": 0,
        "growth_events": 1,
        "backoff_events": 2,
    }


def test_a_loss_scaled_step_reads_nothing_back_to_the_host(monkeypatch) -> None:
    """fp16 with dynamic scaling and the fused optimizer: between log steps no tensor is read on the host
    (each read is a GPU sync); the only read in this epoch is its loss sum and applied-step count at its end."""
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **kw):
            reads.append(_name)
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    precision = fp16(init_scale=1024.0, growth_interval=2)
    run_epoch(InfOnSteps({2}), precision, steps=6, log_every=1000)
    monkeypatch.undo()
    assert reads == ["tolist"]  # the epoch-end [loss sum, applied steps]
    assert precision.counters()["skipped_steps"] == 1


def test_fused_sgd_momentum_survives_a_skipped_first_step() -> None:
    """Fused SGD allocates its momentum buffers uninitialised on the first step; a skipped first step
    left them so (parameters of ~1e28 after two more steps). mprun's optimizers start from zeros."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 4, device=DEVICE), torch.randint(0, 3, (16,), device=DEVICE)
    results = []
    for build in (
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),  # the unfused reference
        lambda ps: prepare(torch.optim.SGD(ps, lr=0.1, momentum=0.9, **implementation())),
    ):
        torch.manual_seed(1)
        model = InfOnSteps({0})
        opt, precision = build(list(model.parameters())), fp16(init_scale=1024.0)
        for _ in range(3):
            junk = torch.full((64,), 1e30, device=DEVICE)  # a dirty block for an uninitialised buffer to land in
            del junk
            train_step(model, [(x, y)], opt, precision, want_norm=False)
        assert precision.counters()["skipped_steps"] == 1
        results.append([p.detach().clone() for p in model.parameters()])
    for fused, reference in zip(results[1], results[0]):
        torch.testing.assert_close(fused, reference)


def test_growth_events_follow_the_scalers_own_factor_after_a_resume() -> None:
    precision = fp16(init_scale=1024.0, growth_interval=2)  # growth_factor 2
    run_epoch(InfOnSteps(set()), precision, steps=1)
    resumed = fp16(
        init_scale=1024.0, growth_interval=2, growth_factor=4.0
    )  # the config changed; the scaler's state wins
    resumed.load_state_dict(precision.state_dict())
    run_epoch(InfOnSteps(set()), resumed, steps=3, log_every=1000)
    assert resumed.scale_value() == 1024.0 * 2**2  # grew twice, by the checkpoint's factor 2
    assert resumed.counters()["growth_events"] == 2


def test_cpu_descriptions_say_what_runs() -> None:
    """Unscaled fp16 reads 'no loss scale' (it read 'none loss scale'); tf32 on a CPU says it is plain fp32; an int
    init_scale from the Python API pins a static scale (update() needs a float)."""
    cpu = torch.device("cpu")
    assert (
        Precision(PrecisionConfig(dtype=PrecisionName.fp16, loss_scale=LossScale.none), cpu).description
        == "fp16 (no loss scale)"
    )
    assert "plain fp32" in Precision(PrecisionConfig(dtype=PrecisionName.tf32, loss_scale=LossScale.none), cpu).reason
    p = Precision(PrecisionConfig(dtype=PrecisionName.fp16, loss_scale=LossScale.static, init_scale=128), cpu)
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    p.backward(w.sum())
    p.step(opt, [w], want_norm=False)
    assert p.scale_value() == 128.0


def test_building_a_precision_changes_no_process_flag() -> None:
    """The run applies the math flags (and puts the caller's back); building a Precision touches none of them."""
    with math_flags_restored():
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = False
        for name in ("fp32", "tf32", "bf16"):
            Precision(PrecisionConfig(dtype=PrecisionName(name), loss_scale=LossScale.none), DEVICE)
            assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == ("high", False), name


@pytest.mark.parametrize(
    "kw,why",
    [
        (dict(dtype=PrecisionName.fp16), "fp16 loss scaling"),
        (dict(dtype=PrecisionName.fp16, loss_scale=LossScale.static), "fp16 loss scaling"),
        (
            dict(dtype=PrecisionName.bf16, loss_scale=LossScale.none, on_nonfinite=NonFinite.skip),
            "precision.on_nonfinite=skip (bf16)",
        ),
    ],
)
def test_fsdp_refuses_every_precision_that_can_skip_steps(kw: dict, why: str) -> None:
    """bf16 with on_nonfinite=skip enabled a GradScaler under FSDP2 whose found-inf no rank agreed on."""
    p = Precision(PrecisionConfig(**kw), CPU)
    assert p.can_skip_steps
    with pytest.raises(ConfigError, match=f"trainer.strategy=fsdp with {re.escape(why)}"):
        p.fsdp_policy([])


def test_fsdp_shards_a_precision_that_never_skips_in_its_compute_dtype() -> None:
    bf16 = Precision(PrecisionConfig(dtype=PrecisionName.bf16, loss_scale=LossScale.none), CPU)
    policy = bf16.fsdp_policy([])
    assert policy.param_dtype is torch.bfloat16 and policy.reduce_dtype is torch.float32
    fp32 = Precision(PrecisionConfig(dtype=PrecisionName.fp32, loss_scale=LossScale.none), CPU)
    assert fp32.fsdp_policy([]).param_dtype is None
    with pytest.raises(ConfigError, match="fp32_modules with trainer.strategy=fsdp"):
        bf16.fsdp_policy(["head"])


def test_a_stop_that_ends_an_epoch_early_closes_its_progress_bar() -> None:
    """BarProgress closed its bar only at an epoch's end: a stop signal (or an error) mid-epoch left it open."""
    from tqdm import tqdm

    from mprun.training.config import ProgressMode
    from mprun.training.loop import fit

    class Requested:  # a GracefulStop whose signal has arrived
        requested, signum = True, 15

    model = nn.Linear(4, 3, device=DEVICE)
    x, y = torch.randn(32, 4, device=DEVICE), torch.randint(0, 3, (32,), device=DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = training(model, opt, constant(opt, total_steps=4, warmup_steps=0), fp16(loss_scale=LossScale.none))
    run.data = DataBundle("t", TensorLoader(x, y, 8, shuffle=True), TensorLoader(x, y, 8, shuffle=False), 1, (4,), 3)
    open_before = len(tqdm._instances)
    result = fit(run, TrainerConfig(max_epochs=1, progress=ProgressMode.bar), Tracker(), stop=Requested())
    assert result.interrupted == 15
    assert len(tqdm._instances) == open_before


def test_a_static_loss_scale_names_the_scale_in_force(make_cfg) -> None:
    """precision=fp16 precision.loss_scale=static keeps init_scale's 65536 (the dynamic scaler's start), not
    fp16_static's 128: the description the console and the summary show says which."""
    from mprun.config import validate

    def described(*overrides: str) -> str:
        return Precision(validate(make_cfg(*overrides)).precision, torch.device("cpu")).description

    assert described("precision=fp16", "precision.loss_scale=static") == "fp16 (static loss scale 65536)"
    assert described("precision=fp16_static") == "fp16 (static loss scale 128)"
    assert described("precision=fp16") == "fp16 (dynamic loss scale)"


def test_auto_says_when_it_drops_an_explicit_static_loss_scale(make_cfg, caplog) -> None:
    """precision=fp32 with loss_scale=static is an error; under auto, which resolved to a dtype without a scaler, the
    setting was dropped without a word. Now a warning says so (auto's pick depends on the machine)."""
    from mprun.config import validate

    cfg = validate(make_cfg("precision=auto", "precision.loss_scale=static", "trainer.device=cpu")).precision
    with caplog.at_level("WARNING", logger="mprun.precision"):
        p = Precision(cfg, torch.device("cpu"))
    assert not p.name.scales_loss  # on a CPU auto picks bf16 or fp32
    assert [m for m in caplog.messages if m.startswith("precision.loss_scale=static dropped: auto resolved to ")]
    caplog.clear()
    with caplog.at_level("WARNING", logger="mprun.precision"):
        Precision(validate(make_cfg("precision=auto")).precision, torch.device("cpu"))
    assert not [m for m in caplog.messages if "dropped" in m]  # the default, dynamic, goes unsaid

"""Few-step runs of the real config: every precision, model, dataset, optimizer and scheduler option."""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from mprun import checkpoint
from mprun.errors import ConfigError
from mprun.experiment import run

SHORT = ["trainer.max_steps=3", "trainer.max_epochs=1", "trainer.log_every_steps=1"]
TINY_IMAGES = [
    "dataset=synthetic",
    "dataset.shape=[3,32,32]",
    "dataset.num_samples=8",
    "dataset.val_samples=4",
    "dataset.batch_size=4",
]


@pytest.mark.parametrize("precision", ["auto", "fp32", "tf32", "fp16", "fp16_static", "bf16", "bf16_pure"])
def test_every_precision_trains(make_cfg, precision: str, capsys) -> None:
    summary = run(make_cfg(f"precision={precision}", *SHORT))
    assert summary["steps"] == 3
    assert 0.0 <= summary["val_acc"] <= 1.0
    if precision == "auto":  # on a CPU auto times the candidates on this model: fp32 or bf16, whichever won
        assert summary["precision"] in ("fp32", "bf16") and "measured on this CPU" in summary["precision_detail"]
    else:
        assert summary["precision"] == {"fp16_static": "fp16"}.get(precision, precision)
    if precision == "fp16_static":
        assert summary["loss_scale"] == 128.0
    # The summary's loss-scale line says what the scaler did, and that there was none without one.
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("loss scale")]
    scale_line = {
        "fp16": "loss scale  65536   skipped steps 0   growth/backoff events 0/0   steps since overflow 3",
        "fp16_static": "loss scale  128 (static)   skipped steps 0",
    }.get(precision, "loss scale  none")
    assert line == scale_line


def test_fp16_without_scaling_trains(make_cfg) -> None:
    summary = run(make_cfg("precision=fp16", "precision.loss_scale=none", *SHORT))
    assert summary["loss_scale"] == 1.0


@pytest.mark.parametrize(
    "model",
    [
        ["model=simple_mlp"],
        ["model=simple_cnn"],
        ["model=resnet18"],
        ["model=resnet50"],
        pytest.param(["model=vit_b16"], marks=pytest.mark.slow),  # 86M parameters: ~1 GB of checkpoint
        ["model=timm", "model.name=convnext_atto"],
        ["model=timm", "model.name=levit_128s"],  # takes img_size without a patch_embed.img_size: was rejected at 32x32
        ["model=torchvision", "model.name=resnet18"],
        pytest.param(["model=torchvision", "model.name=vit_b_16"], marks=pytest.mark.slow),
    ],
    ids=lambda m: m[-1].split("=")[-1],
)
def test_models_adapt_to_the_dataset(make_cfg, model: list[str]) -> None:
    # 3x32x32 synthetic images, 7 classes: each model must adapt channels, size and classes.
    summary = run(
        make_cfg(*model, *TINY_IMAGES, "dataset.num_classes=7", "trainer.max_steps=1", "trainer.max_epochs=1")
    )
    assert summary["steps"] == 1


ONE_CHANNEL_IMAGES = [
    "dataset=synthetic",
    "dataset.shape=[1,32,32]",
    "dataset.num_samples=8",
    "dataset.val_samples=4",
    "dataset.batch_size=4",
]  # convnext shrinks 8x8 digits to nothing


@pytest.mark.parametrize(
    "model,data",
    [
        (["model=torchvision", "model.name=resnet18"], []),  # digits: 1x8x8
        (["model=resnet18"], []),
        (["model=timm", "model.name=convnext_atto"], ONE_CHANNEL_IMAGES),
        (["model=simple_cnn"], []),
    ],
    ids=["torchvision-resnet18", "timm-resnet18", "timm-convnext_atto", "simple_cnn"],
)
def test_models_adapt_input_channels(make_cfg, tmp_path: Path, model: list[str], data: list[str]) -> None:
    """On 1-channel images the model trained takes 1 channel: torchvision's first conv is rebuilt for it, timm and
    mprun's own models are built for it (the first convolution's weight in the checkpoint is [out, 1, kh, kw])."""
    run(make_cfg(*model, *data, "trainer.max_steps=1", "trainer.max_epochs=1"))
    weights = checkpoint.load(tmp_path / "run" / "checkpoints" / "final.pt")["model"]
    first_conv = next(w for w in weights.values() if w.dim() == 4)
    assert first_conv.shape[1] == 1, {k: tuple(w.shape) for k, w in weights.items() if w.dim() == 4}


def test_model_dataset_mismatch_is_a_clear_error(make_cfg) -> None:
    with pytest.raises(ConfigError, match="vit_base_patch16_224.*digits"):
        run(make_cfg("model=vit_b16", *SHORT))


@pytest.mark.parametrize(
    "overrides",
    [["dataset.batch_size=1"], ["dataset=synthetic", "dataset.shape=[1,8,8]", "dataset.num_samples=1"]],
    ids=["batch_size=1", "a one-sample training set"],
)  # it passed the check, then failed mid-run
def test_a_batch_of_one_under_batchnorm_is_a_clear_error(make_cfg, overrides: list[str]) -> None:
    # resnet18 shrinks 8x8 inputs to 1x1 before its last BatchNorms: one value per channel in training.
    with pytest.raises(
        ConfigError, match=r"resnet18 cannot train on dataset=\w+ .* in batches of 1 \(dataset.batch_size"
    ):
        run(make_cfg("model=resnet18", *overrides, *SHORT))


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["model=resnet18", "+model.kwargs.num_classes=5"], "num_classes"),
        (["model=resnet18", "+model.kwargs.in_chans=3"], "in_chans"),
        (["model=torchvision", "model.name=resnet18", "+model.kwargs.num_classes=5"], "num_classes"),
        (["model=torchvision", "model.name=resnet18", "+model.kwargs.in_chans=3"], "in_chans"),
    ],
)
def test_model_kwargs_that_mprun_sets_are_a_clear_error(make_cfg, overrides: list[str], key: str) -> None:
    """They ended in a TypeError traceback: "got multiple values for keyword argument 'num_classes'"."""
    with pytest.raises(ConfigError, match=rf"model.kwargs.{key} is set by mprun \(the dataset's"):
        run(make_cfg(*overrides, *SHORT))


def test_a_model_with_auxiliary_outputs_is_a_clear_error_and_the_fix_works(make_cfg) -> None:
    googlenet = [
        "model=torchvision",
        "model.name=googlenet",
        *TINY_IMAGES,
        "trainer.max_steps=1",
        "trainer.max_epochs=1",
    ]
    with pytest.raises(
        ConfigError, match=r"googlenet returns GoogLeNetOutputs in training.*\+model.kwargs.aux_logits=false"
    ):
        run(make_cfg(*googlenet))
    assert run(make_cfg(*googlenet, "+model.kwargs.aux_logits=false"))["steps"] == 1


def test_the_fit_check_leaves_batchnorm_statistics_as_found() -> None:
    from mprun.models.fit import check_fits
    from mprun.models.vision import SimpleCNN

    model = SimpleCNN(1, (8, 8), 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_fits(model, torch.randn(2, 1, 8, 8) * 5 + 3, 64, 10, "simple_cnn", "digits")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("scheduler", ["none", "cosine", "step", "onecycle"])
def test_optimizers_and_schedulers(make_cfg, optimizer: str, scheduler: str) -> None:
    summary = run(make_cfg(f"optimizer={optimizer}", f"scheduler={scheduler}", "scheduler.warmup_steps=2", *SHORT))
    assert summary["steps"] == 3


def test_a_failed_metric_write_loses_that_batch_not_the_run(
    make_cfg, tmp_path: Path, mlflow_client, monkeypatch
) -> None:
    """One background write that the store refuses while it still answers ('database is locked' with parallel
    jobs on one sqlite file) used to re-raise at every later call: the training crashed and its run stayed RUNNING.
    Now the batch is reported lost (log, tag) and the run finishes and is closed."""
    from mlflow import MlflowClient as Client
    from mlflow.exceptions import MlflowException

    real = Client.log_batch

    def flaky(self, run_id, metrics=(), *args, **kwargs):
        if any(m.step == 5 for m in metrics):
            raise MlflowException("database is locked")
        return real(self, run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(Client, "log_batch", flaky)
    summary = run(
        make_cfg(
            "model=simple_mlp",
            "trainer.max_steps=10",
            "trainer.max_epochs=1",
            "trainer.log_every_steps=5",
            tracking="mlflow",
        )
    )
    r = mlflow_client.get_run(summary["mlflow_run_id"])
    assert r.info.status == "FINISHED" and r.data.metrics["final/val_acc"] == summary["val_acc"]
    assert "step 5: MlflowException" in r.data.tags["mprun.metrics_not_recorded"]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()], ids=["error", "second Ctrl-C"])
def test_a_run_that_fails_while_opening_is_closed(
    make_cfg, tmp_path: Path, mlflow_client, monkeypatch, error: BaseException
) -> None:
    """The run exists once created: a failure while its params are recorded closes it (it used to stay RUNNING)."""
    from mlflow import MlflowClient as Client

    real = Client.log_batch

    def failing(self, run_id, metrics=(), params=(), *args, **kwargs):
        if params:
            raise error
        return real(self, run_id, metrics, params, *args, **kwargs)

    monkeypatch.setattr(Client, "log_batch", failing)
    with pytest.raises(type(error)):
        run(make_cfg("model=simple_mlp", "trainer.max_steps=2", "trainer.max_epochs=1", tracking="mlflow"))
    client = mlflow_client
    (r,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert r.info.status == ("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED") and "error" in r.data.tags


def test_train_lr_is_the_rate_each_step_used(make_cfg, tmp_path: Path, mlflow_client) -> None:
    """train/lr at step s is the rate step s trained with (it used to be the next step's: step 1 of a 2-step warmup
    showed the full rate)."""
    from mprun.optim.factories import cosine

    summary = run(
        make_cfg(
            "model=simple_mlp",
            "optimizer=sgd",
            "optimizer.lr=0.1",
            "scheduler=cosine",
            "scheduler.warmup_steps=2",
            "trainer.max_steps=6",
            "trainer.max_epochs=1",
            "trainer.log_every_steps=1",
            tracking="mlflow",
        )
    )
    history = mlflow_client.get_metric_history(summary["mlflow_run_id"], "train/lr")
    sched = cosine(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), 6, 2, 0.0)
    used = []
    for _ in range(6):
        used.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
    assert [m.value for m in history] == pytest.approx(used) and used[0] == pytest.approx(0.1 / 3)


def test_cosine_warmup_schedule(make_cfg) -> None:
    from mprun.optim.factories import cosine

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine(opt, total_steps=12, warmup_steps=2, min_lr_ratio=0.1)
    lrs = []
    for _ in range(12):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:2] == pytest.approx([1 / 3, 2 / 3])  # 2 warmup steps, linear
    assert (
        lrs[2] == pytest.approx(1.0) and lrs[3] < 1.0 and lrs[-1] < 0.2
    )  # the peak for one step, then down toward 0.1
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:]))


@pytest.mark.parametrize(
    "total,warmup,pct_start", [(12, 0, 0.3), (40, 5, 0.3), (7, 0, 0.25), (2, 0, 0.3), (10, 1, 0.3)]
)
def test_onecycle_follows_torchs_curve(total: int, warmup: int, pct_start: float) -> None:
    from mprun.optim.factories import onecycle

    def lrs(sched) -> list[float]:
        out = []
        for _ in range(total):
            out.append(sched.get_last_lr()[0])
            sched.optimizer.step()
            sched.step()
        return out + sched.get_last_lr()  # after the last step too (torch's curve rises again there)

    def sgd() -> torch.optim.SGD:
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)

    ours = lrs(onecycle(sgd(), total, warmup, pct_start, div_factor=25.0, final_div_factor=1e4))
    pct = min(0.99, warmup / total) if warmup else pct_start
    if pct * total == 1:  # torch divides 0 by 0 there (its rise ends at step 0); ours peaks at once
        assert ours[0] == pytest.approx(0.5)
        return
    theirs = lrs(
        torch.optim.lr_scheduler.OneCycleLR(
            sgd(),
            max_lr=0.5,
            total_steps=total,
            pct_start=pct,
            div_factor=25.0,
            final_div_factor=1e4,
            cycle_momentum=False,
        )
    )
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-15)


def test_a_onecycle_run_resumes_with_a_longer_max_steps(make_cfg, tmp_path: Path) -> None:
    """OneCycleLR's saved state fixes the old length ("Tried to step 11 times"): the schedule is rebuilt from the
    config."""
    common = ["model=simple_mlp", "scheduler=onecycle", "trainer.max_epochs=1"]
    run(make_cfg(*common, "trainer.max_steps=10", "paths.run_dir=" + str(tmp_path / "part")))
    resumed = run(
        make_cfg(
            *common,
            "trainer.max_steps=20",
            f"trainer.resume={tmp_path / 'part'}",
            "paths.run_dir=" + str(tmp_path / "rest"),
        )
    )
    assert resumed["steps"] == 20


def test_synthetic_dataset(make_cfg) -> None:
    summary = run(make_cfg(*TINY_IMAGES, *SHORT))
    assert summary["steps"] == 2  # 8 samples / batch 4 = 2 steps in the one epoch


def test_imagefolder_dataset(make_cfg, tmp_path: Path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            d = tmp_path / "imgs" / split / cls
            d.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (40, 30), color).save(d / f"{i}.png")
    summary = run(
        make_cfg(
            "dataset=imagefolder",
            f"dataset.root={tmp_path}/imgs",
            "dataset.image_size=32",
            "dataset.batch_size=4",
            "dataset.num_workers=0",
            *SHORT,
        )
    )
    assert summary["steps"] == 2


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "cifar100"])
def test_missing_torchvision_dataset_names_path_and_flag(make_cfg, tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError) as e:
        run(make_cfg(f"dataset={name}", *SHORT))
    assert str(tmp_path / "data") in str(e.value) and "dataset.download=true" in str(e.value)


def test_missing_imagefolder_is_a_clear_error(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a directory"):
        run(make_cfg("dataset=imagefolder", f"dataset.root={tmp_path}/nothing", *SHORT))


def test_gradient_accumulation_run(make_cfg) -> None:
    summary = run(make_cfg("trainer.grad_accum_steps=4", "trainer.max_steps=2", "trainer.max_epochs=1"))
    assert summary["steps"] == 2


def math_flags() -> tuple[str, bool, bool]:
    return torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark


@pytest.mark.parametrize(
    "precision,benchmark,inside", [("tf32", True, ("high", True, True)), ("fp32", False, ("highest", False, False))]
)
def test_a_run_sets_its_math_flags_and_gives_the_caller_back_its_own(
    make_cfg, monkeypatch, precision: str, benchmark: bool, inside: tuple
) -> None:
    # Process-global flags: an earlier job's (or the caller's) must not leak into a run, nor the run's out of it.
    import mprun.experiment

    seen, fit = [], mprun.experiment.fit
    monkeypatch.setattr("mprun.experiment.fit", lambda *a, **k: (seen.append(math_flags()), fit(*a, **k))[1])
    defaults = math_flags()
    torch.set_float32_matmul_precision("highest" if inside[0] == "high" else "high")
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = not inside[1], not benchmark
    caller = math_flags()
    try:
        run(
            make_cfg(
                f"precision={precision}",
                "trainer.channels_last=true",
                f"trainer.cudnn_benchmark={str(benchmark).lower()}",
                *SHORT,
            )
        )
        assert seen == [inside]
        assert math_flags() == caller
    finally:
        torch.set_float32_matmul_precision(defaults[0])
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = defaults[1:]


def test_compiled_run_checkpoints_the_plain_module_and_collects_statistics(make_cfg, tmp_path: Path) -> None:
    run(
        make_cfg(
            "model=simple_mlp",
            "trainer.compile=true",
            "precision.stats_every_steps=2",
            "trainer.max_steps=2",
            "trainer.max_epochs=1",
        )
    )
    state = checkpoint.load(tmp_path / "run" / "checkpoints" / "final.pt")
    assert not any(k.startswith("_orig_mod.") for k in state["model"])
    # Compiled code skips forward hooks added after compilation; the statistics step ran eagerly, so every
    # top-level module has its activation maximum, and those with parameters their gradient figures.
    table = (tmp_path / "run" / "numerics" / "stats.md").read_text().splitlines()
    rows = {
        r[0]: r[1:]
        for r in ([c.strip() for c in line.split("|")[1:-1]] for line in table if line.startswith("| "))
        if r[0] != "module"
    }
    assert list(rows) == ["0 (Flatten)", "1 (Linear)", "2 (ReLU)", "3 (Linear)", "4 (ReLU)", "5 (Linear)"]
    assert all(r[2] != "—" for r in rows.values())
    assert rows["1 (Linear)"][0].endswith("%") and rows["0 (Flatten)"][0] == "—"  # no parameters, so no gradients


def test_final_checkpoint_contents(make_cfg, tmp_path: Path) -> None:
    run(make_cfg("precision=fp16", *SHORT))
    state = checkpoint.load(tmp_path / "run" / "checkpoints" / "final.pt")
    assert {"model", "optimizer", "scheduler", "precision", "rng", "progress", "config", "mprun_version"} <= set(state)
    assert state["progress"]["step"] == 3
    assert state["precision"]["scaler"]["scale"] > 0
    assert state["config"]["precision"]["dtype"] == "fp16"


def test_mlflow_run_records_params_tags_metrics_artifacts(make_cfg, tmp_path: Path, mlflow_client) -> None:
    # simple_mlp: the default CNN's two epochs in CPU-emulated fp16 took ~30 s, and nothing here depends on the model
    summary = run(
        make_cfg(
            "model=simple_mlp", "precision=fp16", "trainer.max_epochs=2", "trainer.log_every_steps=5", tracking="mlflow"
        )
    )
    client = mlflow_client
    r = client.get_run(summary["mlflow_run_id"])
    assert r.info.status == "FINISHED"
    assert r.data.params["precision.dtype"] == "fp16"
    assert r.data.params["optimizer.lr"] == "0.003"
    assert r.data.params["trainer.max_epochs"] == "2"
    # What a user varies, not every run's own directory or Hydra's plumbing: those made every run "differ" in the
    # compare view. The whole config is the config_resolved.yaml artifact.
    assert not [k for k in r.data.params if k.startswith("paths.") or k.endswith(("._target_", "._partial_"))]
    # Opened in the UI as model training (MLflow 3's UI inferred GenAI for an experiment without a kind).
    assert client.get_experiment(r.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    for tag in ("git_commit", "host", "device", "torch_version", "precision"):
        assert tag in r.data.tags, tag
    assert "cuda_version" not in r.data.tags  # a CPU run: it said "None" (or the CUDA torch was built with)
    assert r.data.tags["precision"] == "fp16"
    expected = {
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "val/loss",
        "val/acc",
        "perf/samples_per_s",
        "perf/epoch_time_s",
        "perf/peak_mem_mib",
        "perf/data_wait_frac",
        "perf/param_state_mib",
        "amp/loss_scale",
        "amp/skipped_steps",
        "amp/skip_rate",
        "amp/steps_since_overflow",
        "amp/growth_events",
        "amp/backoff_events",
    }
    assert expected <= set(r.data.metrics)
    assert len(client.get_metric_history(r.info.run_id, "val/acc")) == 2  # one per epoch
    assert r.data.metrics["val/acc"] == pytest.approx(summary["val_acc"])
    top = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"config_resolved.yaml", "summary.json", "checkpoints"} <= top
    local = Path(client.download_artifacts(r.info.run_id, "summary.json", str(tmp_path)))
    assert json.loads(local.read_text())["mlflow_run_id"] == r.info.run_id
    # The experiment's artifacts live beside the store, never in ./mlruns of the cwd.
    assert (tmp_path / "outputs" / "mlartifacts").is_dir()


@pytest.mark.parametrize(
    "error,status",
    [(RuntimeError("exploded mid-training"), "FAILED"), (KeyboardInterrupt(), "KILLED")],
    ids=["exception", "ctrl-c"],
)
def test_run_that_dies_is_closed_with_its_status(
    make_cfg, tmp_path: Path, mlflow_client, monkeypatch, error, status
) -> None:
    def die(*a, **k):
        raise error

    monkeypatch.setattr("mprun.experiment.fit", die)
    with pytest.raises(type(error)):
        run(make_cfg(*SHORT, tracking="mlflow"))
    client = mlflow_client
    (r,) = client.search_runs([client.get_experiment_by_name("mprun").experiment_id])
    assert r.info.status == status
    if status == "FAILED":
        assert "exploded mid-training" in r.data.tags["error"]


def test_tracking_uri_override_wins(make_cfg, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/env.db")
    summary = run(make_cfg(*SHORT, f"tracking.uri=sqlite:///{tmp_path}/override.db", tracking="mlflow"))
    assert MlflowClient(f"sqlite:///{tmp_path}/override.db").get_run(summary["mlflow_run_id"])
    assert not (tmp_path / "env.db").exists()


def test_tracking_env_var_wins_over_default(make_cfg, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/env.db")
    summary = run(make_cfg(*SHORT, tracking="mlflow"))
    assert MlflowClient(f"sqlite:///{tmp_path}/env.db").get_run(summary["mlflow_run_id"])
    assert not (tmp_path / "outputs" / "mlflow.db").exists()


def test_only_a_run_with_a_loss_scaler_logs_amp_metrics(make_cfg, tmp_path: Path, mlflow_client) -> None:
    """fp16's scale, skips and growth/backoff events are logged every log step; a run without a scaler logs none."""
    fp16 = run(make_cfg("model=simple_mlp", "precision=fp16", "trainer.max_steps=4", "trainer.log_every_steps=2",
                        "trainer.max_epochs=1", f"paths.run_dir={tmp_path}/fp16", tracking="mlflow"))  # fmt: skip
    bf16 = run(make_cfg("model=simple_mlp", "precision=bf16", "trainer.max_steps=4", "trainer.log_every_steps=2",
                        "trainer.max_epochs=1", f"paths.run_dir={tmp_path}/bf16", tracking="mlflow"))  # fmt: skip
    client = mlflow_client
    amp = {s["precision"]: sorted(k for k in client.get_run(s["mlflow_run_id"]).data.metrics if k.startswith("amp/"))
           for s in (fp16, bf16)}  # fmt: skip
    assert amp["bf16"] == []
    assert amp["fp16"] == ["amp/backoff_events", "amp/growth_events", "amp/loss_scale", "amp/skip_rate",
                           "amp/skipped_steps", "amp/steps_since_overflow"]  # fmt: skip
    assert len(client.get_metric_history(fp16["mlflow_run_id"], "amp/loss_scale")) == 2


def test_a_run_shorter_than_one_log_window_logs_its_training_metrics(make_cfg, tmp_path: Path, mlflow_client) -> None:
    """3 steps with log_every_steps=10: train/* and amp/* used to be missing from MLflow altogether."""
    summary = run(make_cfg("model=simple_mlp", "trainer.max_steps=3", "trainer.max_epochs=1", tracking="mlflow"))
    client = mlflow_client
    for key in ("train/loss", "train/lr", "train/grad_norm"):
        assert [m.step for m in client.get_metric_history(summary["mlflow_run_id"], key)] == [3], key
    (loss,) = client.get_metric_history(summary["mlflow_run_id"], "train/loss")
    assert loss.value == pytest.approx(summary["train_loss"])  # the window is the whole (partial) epoch


@pytest.mark.parametrize(
    "epochs,said",
    [
        (1, "(one epoch, warm-up included)"),
        (2, "(the second epoch; the first (warm-up) left out)"),
        (3, "(median of 2 epochs; the first (warm-up) left out)"),
    ],
)
def test_per_epoch_speed_figures_share_one_median_and_say_which(
    make_cfg, tmp_path: Path, mlflow_client, capsys, epochs, said
) -> None:
    """final/epoch_time_s used to be the median over every epoch, warm-up included, beside a samples/s without it; and
    a one-epoch run's summary said its throughput was a median over epochs with the first one excluded."""
    summary = run(make_cfg("model=simple_mlp", f"trainer.max_epochs={epochs}", tracking="mlflow"))
    client = mlflow_client
    history = {
        key: [m.value for m in client.get_metric_history(summary["mlflow_run_id"], f"perf/{key}")]
        for key in ("epoch_time_s", "samples_per_s", "data_wait_frac")
    }
    for key, values in history.items():
        assert len(values) == epochs and summary[key] == pytest.approx(
            statistics.median(values[-(epochs - 1 or 1) :])
        ), key
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("throughput")]
    assert line.endswith(f"samples/s  {said}")


def test_an_epoch_cut_short_by_max_steps_has_a_rate_but_no_epoch_time(make_cfg, tmp_path: Path, mlflow_client) -> None:
    """max_steps=30 at 22 batches an epoch: the 8-batch second pass became final/epoch_time_s."""
    summary = run(make_cfg("model=simple_mlp", "trainer.max_epochs=2", "trainer.max_steps=30", tracking="mlflow"))
    client = mlflow_client
    times, rates = (
        client.get_metric_history(summary["mlflow_run_id"], f"perf/{k}") for k in ("epoch_time_s", "samples_per_s")
    )
    assert [m.step for m in times] == [22] and [m.step for m in rates] == [22, 30]
    assert summary["epoch_time_s"] == times[0].value and summary["timed_epochs"] == 2


def test_step_checkpoint_writes_are_not_timed_as_training(make_cfg, monkeypatch) -> None:
    """Writing a checkpoint is not training: 2 writes of 3 s within the epoch used to cut its samples/s."""
    real = checkpoint.Checkpoints.save

    def slow(self, name, state):
        time.sleep(3.0 if name.startswith("step-") else 0.0)
        return real(self, name, state)

    monkeypatch.setattr(checkpoint.Checkpoints, "save", slow)
    summary = run(
        make_cfg("model=simple_mlp", "trainer.max_steps=10", "trainer.max_epochs=1", "trainer.checkpoint_every_steps=4")
    )
    assert summary["train_time_s"] < 3.0  # 10 steps of a small MLP: well under 2 s even on a busy machine; was over 6 s
    assert summary["wall_time_s"] > 6.0  # the writes did happen


def test_logged_train_loss_is_the_mean_over_each_log_window(make_cfg, tmp_path: Path, mlflow_client) -> None:
    # 22 steps in one epoch, logged every 5 steps and at the last (steps 21-22). Each logged value is the mean over
    # its own window: values fall as the model learns (cumulative sums would grow), and the epoch mean lies among them.
    summary = run(make_cfg("trainer.max_epochs=1", "trainer.log_every_steps=5", "scheduler=none", tracking="mlflow"))
    client = mlflow_client
    history = sorted(client.get_metric_history(summary["mlflow_run_id"], "train/loss"), key=lambda m: m.step)
    assert [m.step for m in history] == [5, 10, 15, 20, 22]
    windows = [m.value for m in history]
    assert windows[0] > windows[-1] > 0
    assert min(windows) < summary["train_loss"] < max(windows)


def test_the_printed_mlflow_ui_command_can_be_pasted_with_a_space_in_the_path(tmp_path: Path) -> None:
    import shlex

    from mprun.tracking.mlflow_tracker import MlflowTracker

    tracker = MlflowTracker(str(tmp_path / "my runs"), None, "Default", None, False)
    (line,) = [line for line in tracker.describe() if line.startswith("MLflow UI")]
    args = shlex.split(line.removeprefix("MLflow UI"))  # what a shell makes of it
    assert args[1:4] == ["ui", "--backend-store-uri", f"sqlite:///{tmp_path}/my runs/mlflow.db"], args


def test_epoch_lines_count_the_epochs_max_steps_leaves(make_cfg, caplog) -> None:
    """30 steps of 22-step epochs: the second epoch, cut short, was logged as "epoch 1/10" a second time."""
    import logging

    with caplog.at_level(logging.INFO, logger="mprun"):
        run(make_cfg("model=simple_mlp", "trainer.max_steps=30", "trainer.progress=log"))
    lines = [r.getMessage().split("  ")[0] for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert lines == ["epoch 1/2", "epoch 2/2"]


def test_epoch_lines_name_train_and_val_apart_and_print_rates_as_plain_numbers(caplog) -> None:
    """`loss=` stood for both val/loss and the train loss's neighbour, and throughput printed as 1.025e+04."""
    from mprun.progress import Progress

    with caplog.at_level(logging.INFO, logger="mprun"):
        Progress(3, 10).end_epoch(
            1, {"train_loss": 0.5, "perf/samples_per_s": 10250.4, "val/loss": 0.0364, "val/acc": 0.99164}
        )
    assert caplog.messages == ["epoch 1/3  train_loss=0.5  samples_per_s=10,250  val_loss=0.0364  val_acc=0.9916"]


def test_the_summary_says_the_precision_policy_in_force(make_cfg, capsys) -> None:
    """A bf16 run with grad_clip_norm said nothing of clipping on the console: clipping, fp32 modules and skipping
    are the summary's policy line (and summary.json's precision_policy); a run with none of them has no such line."""
    short = ["model=simple_mlp", "trainer.max_steps=2", "trainer.max_epochs=1"]
    set_ = run(make_cfg(*short, "precision=bf16", "precision.grad_clip_norm=1.0", "precision.fp32_modules=[4]",
                        "precision.on_nonfinite=skip"))  # fmt: skip
    said = "gradients clipped to norm 1 (after unscaling); in fp32: 4; non-finite steps skipped"
    assert set_["precision_policy"] == said
    assert f"policy      {said}" in capsys.readouterr().out.splitlines()
    plain = run(make_cfg(*short, "precision=bf16"))
    assert plain["precision_policy"] == "" and "policy " not in capsys.readouterr().out

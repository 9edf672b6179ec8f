"""torchrun on the CPU (gloo, 2 processes): DDP equals one process with the same global batch; one
MLflow run; checkpoint and resume under DDP; an FSDP2 (fully_shard, bf16) smoke run; clear errors. The set-up errors
that need no second rank are raised in this process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, run_cli, run_cli_here, run_statuses
from mlflow import MlflowClient

from mprun import checkpoint
from mprun.errors import ConfigError
from mprun.experiment import run

COMMON = [
    "precision=fp32",  # the tests compare processes' numbers: auto would time each process's own probe
    "model=simple_mlp",
    "scheduler=none",
    "trainer.max_epochs=1",
    "trainer.log_every_steps=1",
    "trainer.progress=off",
    "precision.stats_every_steps=6",
]


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "mprun",
            *COMMON,
            *args,
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process at batch 64, and DDP on 2 ranks at 32 each: the same global batch, 12 steps."""
    cwd = tmp_path_factory.mktemp("ddp")
    single = run_cli_here(
        *COMMON, "trainer.max_steps=12", "dataset.batch_size=64", "hydra.run.dir=outputs/single", cwd=cwd
    )
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = torchrun(
        "trainer.strategy=ddp", "trainer.max_steps=12", "dataset.batch_size=32", "hydra.run.dir=outputs/ddp", cwd=cwd
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    return cwd


def _history(client: MlflowClient, strategy: str, key: str = "train/loss") -> list[float]:
    (run,) = [r for r in client.search_runs(["1"]) if r.data.tags.get("strategy") == strategy]
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


@pytest.mark.slow
def test_ddp_matches_one_process_with_the_same_global_batch_and_records_one_run(runs: Path) -> None:
    client = MlflowClient(f"sqlite:///{runs}/outputs/mlflow.db")
    strategies = sorted(r.data.tags["strategy"] for r in client.search_runs(["1"]))
    assert strategies == ["ddp x2", "single x1"]  # rank 1 recorded nothing
    single, ddp = _history(client, "single x1"), _history(client, "ddp x2")
    assert len(single) == len(ddp) == 12
    assert max(abs(a - b) for a, b in zip(single, ddp)) < 1e-5
    # Each rank evaluated its half of the 359 validation samples (one rank's share padded); the sums over
    # ranks give the single process's figures.
    assert _history(client, "ddp x2", "val/acc") == _history(client, "single x1", "val/acc")
    # fp16 statistics name the user's modules, not DDP's wrapper ("module")
    assert len(_history(client, "ddp x2", "numerics/underflow/1")) == 2 and not _history(
        client, "ddp x2", "numerics/underflow/module"
    )
    assert "| 1 (Linear) |" in (runs / "outputs" / "ddp" / "numerics" / "stats.md").read_text()  # was '| 1 (?) |'
    assert _history(client, "ddp x2", "val/loss") == pytest.approx(_history(client, "single x1", "val/loss"), abs=1e-5)


def _one_process_and_two_ranks(tmp_path: Path, overrides: list[str], batch: int) -> MlflowClient:
    """The same training as one process at `batch` ("single x1") and as 2 gloo DDP ranks at half of it each
    ("ddp x2"), both recorded in tmp_path's store."""
    single = run_cli_here(
        *COMMON, *overrides, f"dataset.batch_size={batch}", "hydra.run.dir=outputs/single", cwd=tmp_path
    )
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = torchrun(*overrides, "trainer.strategy=ddp", f"dataset.batch_size={batch // 2}", "hydra.run.dir=outputs/ddp",
                   cwd=tmp_path)  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    return MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")


@pytest.mark.slow
def test_a_language_model_under_ddp_matches_one_process_at_the_same_global_batch(tmp_path: Path) -> None:
    """2 gloo ranks at 16 windows each train the GPT as one process does at 32: the same windows, the same losses."""
    lm = ["dataset=pycode", "model=gpt", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
          "dataset.block_size=16", "model.block_size=16", "dataset.val_windows=64", "trainer.max_steps=6"]  # fmt: skip
    client = _one_process_and_two_ranks(tmp_path, lm, batch=32)
    one, two = _history(client, "single x1"), _history(client, "ddp x2")
    assert len(one) == len(two) == 6 and max(abs(a - b) for a, b in zip(one, two)) < 1e-5
    assert _history(client, "ddp x2", "val/bpb") == pytest.approx(_history(client, "single x1", "val/bpb"), abs=1e-5)


@pytest.mark.slow
def test_a_projects_own_model_and_dataset_under_ddp_match_one_process(tmp_path: Path) -> None:
    """docs/example-project's model and dataset (a project's conf/ and package in the launch directory) on 2 gloo
    ranks at 32 samples each train as one process does at 64."""
    shutil.copytree(ROOT / "docs" / "example-project", tmp_path, dirs_exist_ok=True)
    client = _one_process_and_two_ranks(tmp_path, ["model=wide", "dataset=blobs", "trainer.max_steps=6"], batch=64)
    one, two = _history(client, "single x1"), _history(client, "ddp x2")
    assert len(one) == len(two) == 6 and max(abs(a - b) for a, b in zip(one, two)) < 1e-5
    assert _history(client, "ddp x2", "val/acc") == _history(client, "single x1", "val/acc")


@pytest.mark.slow
def test_an_lstm_text_classifier_under_ddp_matches_one_process_at_the_same_global_batch(tmp_path: Path) -> None:
    """Packed texts under DDP: each rank pads its batches to its own longest text, which changes nothing."""
    from test_textfolder import make_folder

    root = make_folder(tmp_path / "texts", {"train": 32, "test": 8})
    text = ["dataset=textfolder", f"dataset.root={root}", "model=lstm", "model.bidirectional=true",
            "model.hidden=32", "trainer.max_steps=4"]  # fmt: skip
    client = _one_process_and_two_ranks(tmp_path, text, batch=16)
    one, two = _history(client, "single x1"), _history(client, "ddp x2")
    assert len(one) == len(two) == 4 and max(abs(a - b) for a, b in zip(one, two)) < 1e-5
    assert _history(client, "ddp x2", "val/acc") == _history(client, "single x1", "val/acc")


def _decide_on_rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from mprun.distributed import World

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        got = World(rank, 2).from_main(lambda: {"picked by": rank})  # what each rank alone would decide differs
        Path(out, f"{rank}.txt").write_text(str(got))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_take_rank_zeros_decision(tmp_path: Path) -> None:
    """precision=auto's probe is timed on rank 0 and every rank takes its result: ranks must not pick different
    dtypes from their own noisy timings."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_decide_on_rank, args=(port, str(tmp_path)), nprocs=2)
    assert [(tmp_path / f"{r}.txt").read_text() for r in (0, 1)] == ["{'picked by': 0}"] * 2


@pytest.mark.parametrize("world", [2, 3, 4, 16])
def test_evaluation_shards_cover_every_sample_once_in_as_many_full_batches_on_every_rank(world: int) -> None:
    from mprun.data.loaders import EpochDataLoader, TensorLoader

    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    real, lengths = [], set()
    for rank in range(world):
        loader = TensorLoader(x, y, batch_size=3, shuffle=False)
        loader.shard(rank, world)
        assert {len(b) for _, b in loader} == {3}  # one shape: a compiled model compiles evaluation once
        labels = torch.cat([b for _, b in loader]).tolist()
        files = EpochDataLoader(
            torch.utils.data.TensorDataset(x, y), 3, "0", 2, shuffle=False, seed=0, device=torch.device("cpu")
        )
        files.shard(rank, world)
        assert torch.cat([b for _, b in files]).tolist() == labels  # the DataLoader path takes the same batches
        lengths |= {len(loader), len(files)}
        real += labels[: loader.real_samples()]
    assert sorted(real) == list(range(10)) and len(lengths) == 1  # FSDP needs the same batch count everywhere


def test_both_loaders_keep_a_ranks_only_batch_when_its_share_is_smaller_than_a_batch() -> None:
    # 100 samples, batch 64, 2 ranks: 50 each. Dropping the ragged batch would train nothing (the DataLoader
    # path did); both loaders keep it, and agree on the order.
    from mprun.data.loaders import EpochDataLoader, TensorLoader

    x, y = torch.arange(100.0)[:, None], torch.arange(100)
    tensors = TensorLoader(x, y, 64, shuffle=True, seed=3)
    files = EpochDataLoader(
        torch.utils.data.TensorDataset(x, y), 64, "0", 2, shuffle=True, seed=3, device=torch.device("cpu")
    )
    for loader in (tensors, files):
        loader.shard(1, 2)
        loader.set_epoch(2)
    batches = [[b.tolist() for _, b in loader] for loader in (tensors, files)]
    assert len(tensors) == len(files) == 1 and batches[0] == batches[1] and len(batches[0][0]) == 50


def test_evaluate_leaves_a_shards_padding_out() -> None:
    from mprun.data.loaders import TensorLoader
    from mprun.precision.config import LossScale, PrecisionConfig
    from mprun.precision.names import PrecisionName
    from mprun.precision.runtime import Precision
    from mprun.training.loop import evaluate

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    loader = TensorLoader(x, y, batch_size=2, shuffle=False)
    loader.shard(1, 3)  # samples 1, 4, 7, then sample 0 again: padding up to whole batches of 2
    fp32 = Precision(PrecisionConfig(dtype=PrecisionName.fp32, loss_scale=LossScale.none), torch.device("cpu"))
    val = evaluate(model, loader, fp32, torch.device("cpu"))
    loss, acc = val["loss"], val["acc"]
    mine = torch.tensor([1, 4, 7])
    with torch.no_grad():
        logits = model(x[mine])
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits, y[mine]).item(), rel=1e-6)
    assert acc == pytest.approx((logits.argmax(1) == y[mine]).double().mean().item())


@pytest.mark.slow
def test_ddp_checkpoint_and_resume(runs: Path) -> None:
    first = torchrun(
        "trainer.strategy=ddp", "trainer.max_steps=6", "dataset.batch_size=32", "hydra.run.dir=outputs/ddp_a", cwd=runs
    )
    assert first.returncode == 0, first.stderr[-3000:]
    rest = torchrun(
        "trainer.strategy=ddp",
        "trainer.max_steps=12",
        "dataset.batch_size=32",
        "hydra.run.dir=outputs/ddp_b",
        f"trainer.resume={runs}/outputs/ddp_a",
        cwd=runs,
    )
    assert rest.returncode == 0, rest.stderr[-3000:]
    resumed = checkpoint.load(runs / "outputs" / "ddp_b" / "checkpoints" / "final.pt")
    single = checkpoint.load(runs / "outputs" / "single" / "checkpoints" / "final.pt")
    assert resumed["progress"]["step"] == 12
    for k, v in single["model"].items():
        torch.testing.assert_close(resumed["model"][k], v, atol=1e-5, rtol=1e-4)


def check_fsdp_run(cwd: Path) -> None:
    """The run's checkpoint holds whole fp32 tensors, not a rank's shard (nor bf16 copies); one run, recorded by
    rank 0."""
    state = checkpoint.load(cwd / "outputs" / "fsdp" / "checkpoints" / "final.pt")
    assert state["model"]["1.weight"].shape == (256, 64) and state["model"]["1.weight"].dtype == torch.float32
    client = MlflowClient(f"sqlite:///{cwd}/outputs/mlflow.db")
    (run,) = client.search_runs(["1"])
    assert run.info.status == "FINISHED" and run.data.tags["strategy"] == "fsdp x2"


@pytest.mark.slow
def test_fsdp2_bf16_smoke_run_checkpoints_full_tensors(tmp_path: Path) -> None:
    """bf16 parameters in compute, with SGD: fused SGD has no DTensor kernel, and it failed on its first step. (AdamW,
    the default, trains under FSDP in the statistics test below.)"""
    proc = torchrun(
        "trainer.strategy=fsdp",
        "precision=bf16",
        "trainer.max_steps=4",
        "dataset.batch_size=32",
        "optimizer=sgd",
        "hydra.run.dir=outputs/fsdp",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_fsdp_run(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "precision", "dtype"),
    [
        ("ddp", ["precision=bf16_pure"], torch.bfloat16),
        ("fsdp", ["precision=bf16_pure"], torch.bfloat16),
        # torchao's float8 all-gather, its weight scales computed after each optimizer step
        (
            "fsdp",
            ["precision=fp8", "model.hidden=64", "precision.fp8_min_features=16", "precision.fp8_fsdp_all_gather=true"],
            torch.float32,
        ),  # fmt: skip
    ],
)
def test_bf16_pure_and_fp8_train_on_two_ranks(
    tmp_path: Path, mlflow_client, strategy: str, precision: list, dtype
) -> None:
    """One run, a falling loss, and a checkpoint of whole plain tensors in the storage dtype (bf16_pure: bf16;
    fp8: fp32 weights, not torchao's float8 wrapper tensors)."""
    proc = torchrun(f"trainer.strategy={strategy}", *precision, "trainer.max_steps=8", "dataset.batch_size=32",
                    "hydra.run.dir=outputs/two", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = checkpoint.load(tmp_path / "outputs" / "two" / "checkpoints" / "final.pt")["model"]
    assert all(type(w) is torch.Tensor and w.dtype == dtype for w in weights.values())
    assert weights["1.weight"].shape[1] == 64  # whole, not a rank's shard of the rows
    client = mlflow_client
    (r,) = client.search_runs(["1"])
    assert r.info.status == "FINISHED" and r.data.tags["strategy"] == f"{strategy} x2"
    loss = _history(client, f"{strategy} x2")
    assert len(loss) == 8 and loss[-1] < loss[0]


@pytest.mark.slow
def test_fsdp2_trains_a_gpt_with_tied_embeddings_and_checkpoints_whole_tensors(tmp_path: Path, mlflow_client) -> None:
    """A language model under FSDP2: blocks sharded one by one, the tied embedding and output layer in the root."""
    proc = torchrun(
        "trainer.strategy=fsdp",
        "dataset=pycode",
        "model=gpt",
        "model.n_layer=2",
        "dataset.windows_per_epoch=256",
        "trainer.max_steps=4",
        "hydra.run.dir=outputs/fsdp",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = checkpoint.load(tmp_path / "outputs" / "fsdp" / "checkpoints" / "final.pt")["model"]
    assert state["wte.weight"].shape == (256, 128) and torch.equal(state["wte.weight"], state["lm_head.weight"])
    (run,) = mlflow_client.search_runs(["1"])
    assert (
        run.info.status == "FINISHED" and run.data.tags["strategy"] == "fsdp x2" and "final/val_bpb" in run.data.metrics
    )


@pytest.mark.slow
def test_fsdp2_statistics_count_every_shard_of_every_gradient(runs: Path, tmp_path: Path, mlflow_client) -> None:
    """Under FSDP a gradient is a DTensor holding this rank's shard: statistics must count it (DTensor has no
    tolist)."""
    proc = torchrun(
        "trainer.strategy=fsdp",
        "precision=fp32",
        "trainer.max_steps=6",
        "dataset.batch_size=32",
        "hydra.run.dir=outputs/fsdp",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_fsdp_run(tmp_path)  # with AdamW (the default optimizer)
    fsdp = mlflow_client
    single = MlflowClient(f"sqlite:///{runs}/outputs/mlflow.db")
    for key in ("numerics/underflow/1", "numerics/underflow/3", "numerics/underflow/5"):
        # the shares over both ranks' shards are the whole gradient's, as one process at the same global batch has it
        (shards,), (whole, _) = _history(fsdp, "fsdp x2", key), _history(single, "single x1", key)
        assert shards == pytest.approx(whole, abs=1e-3), key


@pytest.mark.slow
@pytest.mark.parametrize(
    ("bad", "said"),
    [("optimizer.lr=-1", "mprun: error: optimizer"), ("optimizer.lrr=1", "Could not override 'optimizer.lrr'")],
    ids=["mprun-validation", "hydra-composition"],
)
def test_a_config_error_under_torchrun_is_said_once_by_rank_zero(tmp_path: Path, bad: str, said: str) -> None:
    """Every rank finds the same mistake; rank 0 says it, the others exit with the same code, quietly."""
    proc = torchrun("trainer.strategy=ddp", bad, cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.count(said) == 1, proc.stderr[-3000:]
    assert proc.stderr.count("mprun: error:") == 1, proc.stderr[-3000:]


def test_ddp_without_torchrun_is_a_clear_error(make_cfg, tmp_path: Path, monkeypatch) -> None:
    """A plain `python -m mprun trainer.strategy=ddp` (no torchrun, no submitit tasks): a user's mistake, before any
    tracking run (the command line shows a ConfigError as one line and exit 2)."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match="trainer.strategy=ddp needs torchrun"):
        run(make_cfg("trainer.strategy=ddp", "trainer.max_steps=1", tracking="mlflow"))
    assert not (tmp_path / "outputs" / "mlflow.db").exists()


@pytest.mark.parametrize(
    "family,name",
    [
        ("timm", "vit_base_patch16_224"),
        ("timm", "convnext_base"),
        ("timm", "swin_base_patch4_window7_224"),
        ("torchvision", "vit_b_16"),
        ("torchvision", "resnet50"),
    ],
)
def test_fsdp_units_are_blocks_not_stages(family: str, name: str) -> None:
    """A timm ViT keeps its 12 transformer blocks in one Sequential (85.1M of 85.8M parameters); ConvNeXt and Swin
    stages and torchvision's ViT encoder hold 65-98%. Sharded whole, nearly all of it was gathered at once. No unit
    may hold more than a tenth of the model, unless it is a single layer."""
    import timm
    import torchvision

    from mprun.distributed import fsdp_units

    with torch.device("meta"):  # shapes only: no memory, no init time
        model = timm.create_model(name) if family == "timm" else torchvision.models.get_model(name)
    total = sum(p.numel() for p in model.parameters())
    units = fsdp_units(model)
    assert all(sum(p.numel() for p in u.parameters()) <= total / 10 or not list(u.children()) for u in units)
    unit_ids = {id(u) for u in units}
    assert all(id(m) not in unit_ids for u in units for m in u.modules() if m is not u)  # none inside another
    if name == "vit_base_patch16_224":
        names = {id(m): n for n, m in model.named_modules()}
        assert sorted(names[id(u)] for u in units if names[id(u)].startswith("blocks.")) == sorted(
            f"blocks.{i}" for i in range(12)
        )


def test_fsdp_shards_a_gpt_per_block_and_keeps_tied_embeddings_with_the_root() -> None:
    """FSDP2 manages a parameter in one group only: the token embedding and the output layer that shares its weight
    were sharded as two units, and fully_shard refused the second ("shared with a parameter already managed")."""
    from mprun.distributed import fsdp_units
    from mprun.models.gpt import GPT

    with torch.device("meta"):
        model = GPT(256, 64, n_layer=12, n_head=12, n_embd=768, block_size=1024)
    names = {id(m): n for n, m in model.named_modules()}
    units = [names[id(u)] for u in fsdp_units(model)]
    assert [u for u in units if u.startswith("h.")] == [f"h.{i}" for i in range(12)]
    assert "wte" not in units and "lm_head" not in units  # tied: the root's


@pytest.mark.parametrize(
    "precision,why",
    [
        (["precision=fp16"], "fp16 loss scaling"),
        (["precision=bf16", "precision.on_nonfinite=skip"], "precision.on_nonfinite=skip \\(bf16\\)"),
    ],
    ids=["fp16", "bf16-skip"],
)
def test_fsdp_refuses_a_precision_that_can_skip_steps(make_cfg, monkeypatch, precision: list[str], why: str) -> None:
    """Found when the model is sharded, so inside a process group: here a one-rank gloo group, as torchrun's
    environment sets it up. The error leaves the group (a rank that stays in it hangs the others)."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:  # a free port for the group's store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for var, value in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=f"^trainer.strategy=fsdp with {why} is not supported"):
        run(make_cfg(*COMMON, "trainer.strategy=fsdp", *precision, "trainer.max_steps=1"))
    assert not dist.is_initialized()


@pytest.mark.slow
def test_fsdp_refuses_bf16_with_on_nonfinite_skip_on_every_rank(tmp_path: Path) -> None:
    """Each rank's GradScaler sees only its own gradient shards, so ranks could skip different steps: a precision that
    needs one (fp16's loss scale, or bf16 with on_nonfinite=skip, whose scaler was enabled under FSDP2) is refused on
    every rank before training, with no run left open."""
    proc = torchrun(
        "trainer.strategy=fsdp", "precision=bf16", "precision.on_nonfinite=skip", "trainer.max_steps=1", cwd=tmp_path
    )
    why = "precision.on_nonfinite=skip (bf16)"
    assert proc.returncode != 0
    assert f"mprun: error: trainer.strategy=fsdp with {why} is not supported by mprun" in proc.stderr
    assert 'File "' + str(Path(checkpoint.__file__).parent) not in proc.stderr  # torchrun's own report only
    assert run_statuses(tmp_path / "outputs" / "mlflow.db") == []


@pytest.mark.slow
def test_a_sweep_job_can_be_a_multi_process_ddp_job_through_submitit(tmp_path: Path, mlflow_client) -> None:
    # The same path as hydra/launcher=slurm_multigpu, on this machine: submitit starts 2 tasks per job.
    env = {"OMP_NUM_THREADS": "1"}
    proc = run_cli(
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.tasks_per_node=2",
        "trainer.strategy=ddp",
        *COMMON,
        "trainer.max_steps=4",
        "dataset.batch_size=32",
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow_client
    runs = client.search_runs(["1"])
    (child,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert child.info.status == "FINISHED" and child.data.tags["strategy"] == "ddp x2"
    assert len(runs) == 2  # the sweep's parent and one child: rank 1 recorded nothing


def test_slurm_multigpu_preset_composes(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    from mprun.cli import CONFIG_DIR, PRIMARY

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            PRIMARY, overrides=["hydra/launcher=slurm_multigpu", "trainer.strategy=ddp"], return_hydra_config=True
        )
    assert cfg.hydra.launcher.tasks_per_node == cfg.hydra.launcher.gpus_per_node == 4
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and cfg.trainer.strategy.value == "ddp"


def test_peak_memory_is_the_fullest_ranks() -> None:
    """Every rank measures its own peak; the run records the largest (it recorded rank 0's, which under FSDP or an
    uneven model split is not the one that runs out of memory first)."""
    from torch import nn

    from mprun.data.loaders import DataBundle, TensorLoader
    from mprun.distributed import World
    from mprun.optim.factories import constant
    from mprun.precision.config import LossScale, PrecisionConfig
    from mprun.precision.names import PrecisionName
    from mprun.precision.runtime import Precision
    from mprun.tracking.base import Tracker
    from mprun.training.config import ProgressMode, TrainerConfig
    from mprun.training.loop import fit
    from mprun.training.state import Training

    class AnotherRankIsFuller(World):  # one process: every collective but max is the identity
        def max(self, value: float) -> float:
            return max(value, 1e7)

    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    data = DataBundle("t", TensorLoader(x, y, 8, shuffle=True), TensorLoader(x, y, 8, shuffle=False), 1, (4,), 3)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fp32 = Precision(PrecisionConfig(dtype=PrecisionName.fp32, loss_scale=LossScale.none), torch.device("cpu"))
    run = Training(
        model=model,
        data=data,
        optimizer=opt,
        scheduler=constant(opt, total_steps=2, warmup_steps=0),
        precision=fp32,
        device=torch.device("cpu"),
        world=AnotherRankIsFuller(),
    )
    result = fit(run, TrainerConfig(max_epochs=1, progress=ProgressMode.off), Tracker())
    assert result.peak_mem_mib == 1e7

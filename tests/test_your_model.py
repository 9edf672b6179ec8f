"""A project's own model and dataset: docs/example-project (a package and its conf/, exactly as docs/your-model.md
shows them), copied to a temporary launch directory and run there in this process, as `python -m mprun` would run
from it; the cases of bad user code come from a second package the tests write beside it."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import ROOT, run_cli_here, run_statuses

import mprun
from mprun import checkpoint
from mprun.errors import ConfigError

EXAMPLE = ROOT / "docs" / "example-project"
SHORT = ("trainer.max_epochs=2", "trainer.progress=off")

BADLAB = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset

NOT_CALLABLE = 3


def returns_a_dict(num_classes: int):
    return {"num_classes": num_classes}


class RaisesInInit(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        raise ValueError("hidden must be even")


class FiveLogits(nn.Module):
    def __init__(self, in_features: int):
        super().__init__()
        self.fc = nn.Linear(in_features, 5)

    def forward(self, x):
        return self.fc(x)


class FailsInEvaluation(nn.Module):
    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x):
        if not self.training:
            raise RuntimeError("no evaluation in this model")
        return self.fc(x)


def _x(n):
    return torch.randn(n, 16)


def negative_labels():
    return TensorDataset(_x(8), torch.arange(8) - 1), TensorDataset(_x(4), torch.arange(4))


def empty_val():
    return TensorDataset(_x(8), torch.arange(8) % 2), TensorDataset(_x(0), torch.arange(0))


def strings():
    return ["a", "b"], ["c"]


def float_labels():
    return TensorDataset(_x(8), torch.rand(8)), TensorDataset(_x(4), torch.rand(4))


def numpy_items():
    """A plain list of (float64 array, numpy int32) items: served by a DataLoader, the inputs cast to float32 and the
    labels to int64 (cross-entropy refuses int32 targets)."""
    import numpy as np

    rng = np.random.default_rng(0)
    make = lambda n: [(rng.normal(size=16) + i % 3, np.int32(i % 3)) for i in range(n)]  # noqa: E731
    return make(90), make(30)


def window_tensor():
    """A TensorDataset of one int32 tensor of windows: its items are 1-tuples."""
    t = torch.randint(0, 40, (64, 17), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    return TensorDataset(t), TensorDataset(t[:16])


def ragged():
    return [(torch.randn(12 if i == 0 else 16), i % 2) for i in range(8)], [(torch.randn(16), 0), (torch.randn(16), 1)]


def windows():
    """Token windows for a language model: 1-D id tensors of 17 tokens (16 to read, 16 to predict)."""
    g = torch.Generator().manual_seed(0)
    make = lambda n: [torch.randint(0, 50, (17,), generator=g) for _ in range(n)]  # noqa: E731
    return make(64), make(16)


class TinyLM(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, width: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.zeros(block_size, width))
        self.out = nn.Linear(width, vocab_size)

    def forward(self, x):
        return self.out(self.embed(x) + self.pos[: x.shape[1]])
'''


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """docs/example-project in a launch directory of its own, with badlab beside mylab. run_cli_here runs the command
    line's entry point in this process, in that directory."""
    where = tmp_path_factory.mktemp("project")
    shutil.copytree(EXAMPLE, where, dirs_exist_ok=True, ignore=shutil.ignore_patterns("outputs", "__pycache__"))
    (where / "badlab.py").write_text(textwrap.dedent(BADLAB))
    (where / "nslab").mkdir()  # a namespace package: no __init__.py
    (where / "nslab" / "nets.py").write_text(
        "from torch import nn\n\n\nclass Raises(nn.Module):\n    def __init__(self, num_classes: int):\n"
        "        raise ValueError('from a namespace package')\n"
    )
    yield where  # not on sys.path: the command line puts its launch directory there, as `python -m` would
    for name in [m for m in sys.modules if m.split(".")[0] in ("mylab", "badlab")]:
        del sys.modules[name]


def line_of(project: Path, text: str) -> int:
    """The line of badlab.py that holds `text`."""
    return next(i for i, line in enumerate((project / "badlab.py").read_text().splitlines(), 1) if text in line)


def mprun_here(project: Path, tmp_path: Path, *args: str):
    """`python -m mprun ARGS` in the project, writing under tmp_path."""
    return run_cli_here(*args, f"paths.root_dir={tmp_path}", cwd=project)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An outputs root for the untracked runs of this file: the CPU probe that an explicit bf16 or fp16 run makes is
    cached there, so it is measured once."""
    return tmp_path_factory.mktemp("shared")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_example_project_trains_under_each_precision(project: Path, shared: Path, tmp_path, precision: str) -> None:
    done = mprun_here(project, shared, "model=wide", "dataset=blobs", f"precision={precision}", "tracking=none",
                      f"hydra.run.dir={tmp_path}", *SHORT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["precision"] == precision and summary["val_acc"] > 0.5  # 4 classes: chance is 0.25


def test_the_example_project_records_what_the_data_decided(project: Path, tmp_path: Path, mlflow_client) -> None:
    done = mprun_here(project, tmp_path, "model=wide", "dataset=blobs", "precision=fp32", *SHORT)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = mlflow_client.search_runs(["1"])
    # What mprun passed to Wide is recorded: the data decided in_features (16) and num_classes (4), the YAML hidden.
    params = run.data.params
    assert params["model.from_data.in_features"] == "16" and params["model.from_data.num_classes"] == "4"
    assert params["model.hidden"] == "128" and params["dataset.n"] == "2000" and params["data.task"] == "classification"
    assert run.data.tags["precision"] == "fp32" and run.info.status == "FINISHED"
    assert run.data.metrics["final/val_acc"] > 0.5


def test_a_sweep_over_the_projects_model_compares_precisions_over_seeds(project: Path, tmp_path: Path) -> None:
    done = mprun_here(project, tmp_path, "-m", "model=wide", "dataset=blobs", "precision=fp32,bf16", "trainer.seed=1,2",
                      *SHORT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "── mprun sweep report" in done.stdout
    # Read back from Python: the same report, its groups the two precisions over two seeds each.
    report = mprun.load_report("mprun", uri=f"sqlite:///{tmp_path}/outputs/mlflow.db", out=tmp_path / "again")
    assert sorted((g.precision, len(g.rows)) for g in report.groups) == [("bf16", 2), ("fp32", 2)]
    assert report.recommendation() and (tmp_path / "again" / "report.md").is_file()


def test_fp8_and_bf16_pure_train_the_projects_linear_layers(project: Path, shared: Path) -> None:
    fp8 = mprun_here(project, shared, "model=wide", "dataset=blobs", "precision=fp8", "precision.fp8_min_features=16",
                     "tracking=none", "trainer.max_steps=10")  # fmt: skip
    assert fp8.returncode == 0, fp8.stderr[-3000:]
    assert "tensorwise scaling in 2 Linear layers" in fp8.stdout  # body.0 and body.2; the head stays bf16
    pure = mprun_here(project, shared, "model=wide", "dataset=blobs", "precision=bf16_pure", "tracking=none",
                      "trainer.max_steps=10")  # fmt: skip
    assert pure.returncode == 0, pure.stderr[-3000:]


def test_fp32_modules_and_the_nan_tracer_name_the_projects_modules(
    project: Path, tmp_path: Path, mlflow_client
) -> None:
    kept = mprun_here(project, tmp_path, "model=wide", "dataset=blobs", "precision=bf16",
                      "precision.fp32_modules=[head]", "trainer.max_epochs=1")  # fmt: skip
    assert kept.returncode == 0, kept.stderr[-3000:]
    (run,) = mlflow_client.search_runs(["1"])
    assert run.data.tags["fp32_modules"] == "head"
    diverged = mprun_here(project, tmp_path, "model=wide", "dataset=blobs", "optimizer=sgd", "optimizer.lr=1e12",
                          "scheduler=none", "tracking=none", "hydra.run.dir=" + str(tmp_path / "nan"))  # fmt: skip
    assert diverged.returncode == 1 and "non-finite training loss" in diverged.stderr
    trace = json.loads((tmp_path / "nan" / "diagnosis.json").read_text())["trace"]
    assert trace["forward"]["module"].split(".")[0] in ("body", "head")  # Wide's own names


def test_the_projects_model_resumes_exactly(project: Path, tmp_path: Path) -> None:
    common = ("model=wide", "dataset=blobs", "scheduler=none", "tracking=none", "trainer.max_epochs=2")
    full = mprun_here(project, tmp_path, *common, f"hydra.run.dir={tmp_path / 'full'}")
    part = mprun_here(project, tmp_path, *common, "trainer.max_steps=30", f"hydra.run.dir={tmp_path / 'part'}")
    rest = mprun_here(project, tmp_path, *common, f"trainer.resume={tmp_path / 'part'}")
    assert full.returncode == part.returncode == rest.returncode == 0, rest.stderr[-3000:]
    a = checkpoint.load(tmp_path / "full" / "checkpoints" / "final.pt")["model"]
    b = checkpoint.load(tmp_path / "part" / "checkpoints" / "final.pt")["model"]  # resumed in its own directory
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_projects_language_model_on_its_own_token_windows(project: Path, tmp_path: Path, mlflow_client) -> None:
    done = mprun_here(project, tmp_path, "model=wide", "dataset=blobs", "model._target_=badlab.TinyLM", "~model.hidden",
                      "dataset._target_=badlab.windows", "~dataset.n", "dataset.batch_size=16", *SHORT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = mlflow_client.search_runs(["1"])
    assert run.data.tags["task"] == "language_model" and run.data.tags["mprun.headline"] == "val_loss"
    assert (
        run.data.params["model.from_data.vocab_size"] == "50" and run.data.params["model.from_data.block_size"] == "16"
    )


def test_a_list_of_numpy_items_is_served_by_a_dataloader(project: Path, shared: Path, tmp_path: Path) -> None:
    done = mprun_here(project, shared, "model=wide", "dataset=blobs", "dataset._target_=badlab.numpy_items",
                      "~dataset.n", "dataset.num_workers=0", "dataset.batch_size=16", "tracking=none",
                      f"hydra.run.dir={tmp_path}", *SHORT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "passed in_features=16, num_classes=3 from dataset=blobs" in done.stdout
    assert "DataLoader, in the training process" in done.stdout  # not the in-memory TensorDataset path
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["task"] == "classification" and summary["steps"] == 2 * (90 // 16)


def test_a_tensordataset_of_int32_token_windows_trains_a_language_model(project: Path, shared: Path, tmp_path) -> None:
    done = mprun_here(project, shared, "model=wide", "dataset=blobs", "model._target_=badlab.TinyLM", "~model.hidden",
                      "dataset._target_=badlab.window_tensor", "~dataset.n", "dataset.batch_size=16", "tracking=none",
                      f"hydra.run.dir={tmp_path}", *SHORT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "passed vocab_size=40, block_size=16 from dataset=blobs" in done.stdout
    assert "in-memory tensors" in done.stdout  # served by index_select, not a DataLoader


# Each row of the table: what the user wrote, and the one line (or the user's frames) mprun answers with.
BAD = {
    "not importable": (["model._target_=mylab.nope.Wide"], 2, "model._target_=mylab.nope.Wide: cannot import it: "
                       "AttributeError: module 'mylab' has no attribute 'nope'"),
    "no such package": (["model._target_=nolab.Wide"], 2, "model._target_=nolab.Wide: cannot import it: "
                        "ModuleNotFoundError: No module named 'nolab'"),
    "not callable": (["model._target_=badlab.NOT_CALLABLE"], 2, "model._target_=badlab.NOT_CALLABLE is of type int, "
                     "not a class or function to call"),
    "no nn.Module": (["model._target_=badlab.returns_a_dict", "~model.hidden"], 2,
                     "model._target_=badlab.returns_a_dict returned dict, not a torch.nn.Module"),
    "unknown argument": (["model.width=3"], 2, "model.width: mylab.nets.Wide takes no argument 'width'; its "
                         "parameters: in_features, num_classes, hidden, depth"),
    "a target over one of mprun's options": (["model=simple_cnn", "model._target_=mylab.nets.Wide"], 2, "model.width: "
                                             "mylab.nets.Wide takes no argument 'width'; its parameters: in_features, "
                                             "num_classes, hidden, depth"),
    "a missing argument": (["model._target_=badlab.TinyLM", "~model.hidden"], 2, "model.vocab_size: badlab.TinyLM needs"
                           " an argument 'vocab_size', which neither the config nor the data gives"),
    "logits of the wrong width": (["model._target_=badlab.FiveLogits", "~model.hidden"], 2,
                                  "model=wide outputs shape (5,), dataset=blobs needs (4,) (4 classes; a model of your "
                                  "own gets num_classes from the data"),
    "labels out of range": (["dataset.num_classes=3"], 2, "dataset: label 3 in the train or val split is out of range "
                            "for dataset.num_classes=3 (0 to 2)"),
    "negative labels": (["dataset._target_=badlab.negative_labels", "~dataset.n"], 2,
                        "dataset: label -1 in the train or val split is out of range"),
    "an empty split": (["dataset._target_=badlab.empty_val", "~dataset.n"], 2,
                       "dataset: the val split from badlab.empty_val is empty"),
    "items that are not (input, label)": (["dataset._target_=badlab.strings", "~dataset.n"], 2,
                                          "dataset: item 0 of the train split is a str; mprun trains on (input, label) "
                                          "pairs"),
    "float labels": (["dataset._target_=badlab.float_labels", "~dataset.n"], 2,
                     "dataset: item 0 of the train split has a label of a Tensor of torch.float32 and shape (); labels "
                     "are integer class indices"),
    "a model.task the data cannot serve": (["model.task=language_model"], 2, "model.task=language_model: the "
                                           "dataset's items make a classification task"),
    "items of different shapes": (["dataset._target_=badlab.ragged", "~dataset.n"], 2,
                                  "dataset: item 1 of the train split has an input of shape (16,), item 0 (12,): the "
                                  "items of a split are batched together, so they share one shape"),
    "a non-integer batch size": (["dataset.batch_size=many"], 2, "dataset.batch_size=many: must be an integer"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_user_code_is_one_line_naming_the_key(project: Path, tmp_path: Path, case: str) -> None:
    """Untracked: each of these fails before a tracking run could open (a failure in the middle of a tracked run is
    test_a_failure_in_the_users_code_mid_run_closes_the_run_failed)."""
    overrides, code, message = BAD[case]
    done = mprun_here(project, tmp_path, "model=wide", "dataset=blobs", *overrides, "tracking=none")
    assert done.returncode == code, done.stderr[-3000:]
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"mprun: error: {message}"), done.stderr
    assert not list((tmp_path / "outputs").glob("20*"))  # no run directory


def test_the_users_own_exception_shows_the_users_frames_not_mpruns(project: Path, tmp_path: Path) -> None:
    done = mprun_here(project, tmp_path, "model=wide", "dataset=blobs", "model._target_=badlab.RaisesInInit",
                      "~model.hidden")  # fmt: skip
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[0] == "mprun: error: model._target_=badlab.RaisesInInit raised ValueError: hidden must be even"
    assert lines[1] == f'  File "{project / "badlab.py"}", line {line_of(project, "hidden must be even")}, in __init__'
    assert 'raise ValueError("hidden must be even")' in lines[2] and len(lines) == 3  # no frame of mprun's or torch's
    assert not list((tmp_path / "outputs").glob("20*"))  # nothing was written: no run directory is left


def test_a_namespace_packages_frames_are_the_users_too(project: Path, tmp_path: Path) -> None:
    done = mprun_here(project, tmp_path, "model=wide", "dataset=blobs", "model._target_=nslab.nets.Raises",
                      "~model.hidden", "tracking=none")  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.splitlines()[:2] == [
        "mprun: error: model._target_=nslab.nets.Raises raised ValueError: from a namespace package",
        f'  File "{project / "nslab" / "nets.py"}", line 6, in __init__',
    ]


def test_a_failure_in_the_users_code_mid_run_closes_the_run_failed(project: Path, tmp_path: Path) -> None:
    done = mprun_here(project, tmp_path, "model=wide", "dataset=blobs", "model._target_=badlab.FailsInEvaluation",
                      "~model.hidden", "trainer.max_epochs=1")  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.startswith("mprun: error: your code raised RuntimeError: no evaluation in this model "
                                  "(model._target_=badlab.FailsInEvaluation)")  # fmt: skip
    assert f'File "{project / "badlab.py"}", line {line_of(project, "no evaluation")}, in forward' in done.stderr
    assert str(Path(mprun.__file__).parent) not in done.stderr and "Traceback" not in done.stderr
    assert run_statuses(tmp_path / "outputs" / "mlflow.db") == ["FAILED"]


def test_pretrained_weights_that_cannot_be_downloaded_are_one_line(tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1: no network wait
    done = run_cli_here("model=timm", "model.name=resnet18", "model.pretrained=true", f"paths.root_dir={tmp_path}",
                        cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith("mprun: error: model.name=resnet18: its pretrained weights cannot be downloaded")
    assert "+model.kwargs.pretrained_cfg_overlay.file=" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not list((tmp_path / "outputs").glob("20*")) and run_statuses(tmp_path / "outputs" / "mlflow.db") == []


def test_the_projects_options_are_listed_and_one_that_replaces_mpruns_says_so(project: Path, tmp_path: Path) -> None:
    helped = run_cli_here("--help", cwd=project)
    assert helped.returncode == 0
    groups = dict(
        line.split(": ", 1) for line in helped.stdout.splitlines() if line.startswith(("model: ", "dataset: "))
    )
    assert "wide" in groups["model"].split(", ") and "blobs" in groups["dataset"].split(", ")
    replaced = tmp_path / "conf" / "model"
    replaced.mkdir(parents=True)
    (replaced / "simple_cnn.yaml").write_text("_target_: mylab.nets.Wide\nhidden: 32\n")
    (tmp_path / "mylab").symlink_to(project / "mylab")
    done = run_cli_here("model=simple_cnn", "tracking=none", "trainer.max_epochs=1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"mprun: {replaced / 'simple_cnn.yaml'} replaces mprun's own model=simple_cnn" in done.stderr
    assert "model mylab.nets.Wide: passed in_features=64, num_classes=10 from dataset=digits" in done.stdout
    # Hydra's --config-dir names another directory instead: then the launch directory's conf/ is not searched.
    other = run_cli_here("--config-dir", str(project / "conf"), "model=wide", "dataset=blobs", "tracking=none",
                         "trainer.max_epochs=1", cwd=tmp_path)  # fmt: skip
    assert other.returncode == 0 and "replaces mprun's own" not in other.stderr, other.stderr[-3000:]


def test_the_python_api_runs_an_experiment_and_returns_its_summary(project: Path, tmp_path: Path) -> None:
    root = logging.getLogger()
    handlers = root.handlers[:]
    summary = mprun.run(["model=wide", "dataset=blobs", "precision=bf16", "tracking=none", f"paths.root_dir={tmp_path}",
                         *SHORT], config_dir=project / "conf")  # fmt: skip
    run_dir = Path(summary["run_dir"])
    assert json.loads((run_dir / "summary.json").read_text()) == summary and summary["precision"] == "bf16"
    assert (run_dir / "mprun.log").is_file() and (run_dir / ".hydra" / "overrides.yaml").is_file()
    with pytest.raises(ConfigError, match=r"^dataset.batch_size=0 must be >= 1$"):
        mprun.run(["model=wide", "dataset=blobs", "dataset.batch_size=0", f"paths.root_dir={tmp_path / 'bad'}"],
                  config_dir=project / "conf")  # fmt: skip
    assert not list((tmp_path / "bad" / "outputs").glob("20*"))
    with pytest.raises(ConfigError, match="config_dir=.*: not a directory"):
        mprun.run([], config_dir=tmp_path / "nowhere")
    # Hydra's own refusals are ConfigErrors too, and the caller's logging is as it was.
    with pytest.raises(ConfigError, match="Could not find 'model/nope'"):
        mprun.run(["model=nope"], config_dir=project / "conf")
    with pytest.raises(ConfigError, match="^trainer.epochs: unknown key; did you mean trainer.max_epochs"):
        mprun.run(["trainer.epochs=3"], config_dir=project / "conf")
    assert root.handlers == handlers

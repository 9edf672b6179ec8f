"""Checkpoints and resume: periodic saves, exact continuation after a real SIGTERM, damaged files, kill -9."""

from __future__ import annotations

import logging
import os
import re
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from mprun import checkpoint
from mprun.errors import ConfigError
from mprun.experiment import run

ROOT = Path(__file__).resolve().parent.parent


def test_periodic_checkpoints_keep_the_last_k(make_cfg, tmp_path: Path) -> None:
    run(
        make_cfg(
            "trainer.checkpoint_every_steps=2",
            "trainer.keep_last=2",
            "trainer.max_steps=9",
            "trainer.max_epochs=1",
            "model=simple_mlp",
        )
    )
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["best.pt", "final.pt", "step-000000006.pt", "step-000000008.pt"]  # best.pt: trainer.keep_best
    state = checkpoint.load(tmp_path / "run" / "checkpoints" / "step-000000008.pt")
    assert {
        "model",
        "optimizer",
        "scheduler",
        "precision",
        "rng",
        "progress",
        "config",
        "mprun_version",
        "tracking",
    } <= set(state)
    assert state["progress"]["step"] == 8 and state["progress"]["batch_in_epoch"] == 8
    assert {"python", "numpy", "torch"} <= set(state["rng"])


def test_epoch_checkpoints_by_default(make_cfg, tmp_path: Path) -> None:
    run(make_cfg("trainer.max_epochs=3", "model=simple_mlp"))
    # every epoch but the last (final.pt covers it), keep_last=2
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["best.pt", "final.pt", "step-000000022.pt", "step-000000044.pt"]


def test_the_resume_message_counts_epochs_and_batches_as_the_progress_lines_do(make_cfg, tmp_path, caplog) -> None:
    """It said 'epoch 1, step 30, batch 8 of the epoch' for a run stopped in the second epoch, which the epoch lines
    call 'epoch 2/2': epochs counted from 0 in one place and from 1 in the other."""
    common = ["model=simple_mlp", "scheduler=none", "trainer.max_epochs=2", "trainer.progress=log"]
    run(make_cfg(*common, "trainer.max_steps=30", "paths.run_dir=" + str(tmp_path / "part")))
    with caplog.at_level("INFO", logger="mprun"):
        run(make_cfg(*common, f"trainer.resume={tmp_path / 'part'}", "paths.run_dir=" + str(tmp_path / "rest")))
    (said,) = [m for m in caplog.messages if m.startswith("resuming from")]
    assert said.endswith(": in epoch 2/2, after batch 8/22 (step 30); it goes on with batch 9"), said
    assert "epoch 2/2" in " ".join(m for m in caplog.messages if m.startswith("epoch "))
    from mprun.resume import position
    from mprun.training.state import TrainState

    assert position(TrainState(epoch=1, step=22), 2, 22) == "after epoch 1/2 (step 22); it goes on with epoch 2"


@pytest.mark.slow  # three runs, 88 steps of the CNN
def test_resume_in_process_mid_epoch_equals_uninterrupted(make_cfg, tmp_path: Path) -> None:
    # A constant LR: a schedule spans the planned steps, which max_steps changes.
    common = ["model=simple_cnn", "scheduler=none", "trainer.max_epochs=2", "trainer.log_every_steps=5"]
    full = run(make_cfg(*common, "paths.run_dir=" + str(tmp_path / "full")))
    # The same run stopped by max_steps in the middle of epoch 1, then resumed with the full budget.
    run(make_cfg(*common, "trainer.max_steps=30", "paths.run_dir=" + str(tmp_path / "part")))
    resumed = run(make_cfg(*common, f"trainer.resume={tmp_path / 'part'}", "paths.run_dir=" + str(tmp_path / "rest")))
    a = checkpoint.load(tmp_path / "full" / "checkpoints" / "final.pt")["model"]
    b = checkpoint.load(tmp_path / "rest" / "checkpoints" / "final.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["val_acc"] == full["val_acc"] and resumed["train_loss"] == full["train_loss"]
    assert resumed["steps"] == full["steps"] == 44


@pytest.mark.slow
def test_sigterm_then_resume_is_bit_identical_to_an_uninterrupted_run(make_cfg, tmp_path: Path, mlflow_client) -> None:
    """A real process gets a real SIGTERM mid-epoch; `trainer.resume=auto` in its run directory continues it. The
    uninterrupted run and the resumption need no process of their own: they run here, into the same store."""
    # precision=fp32 in the process too (make_cfg sets it here): auto's timed pick could differ between them
    args = ["trainer.max_epochs=3", "trainer.progress=log", "trainer.log_every_steps=5", "precision=fp32"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}

    run(make_cfg(*args, f"paths.run_dir={tmp_path}/outputs/straight", tracking="mlflow"))
    cut = subprocess.Popen(
        [sys.executable, "-m", "mprun", *args, "hydra.run.dir=outputs/cut"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in cut.stdout:  # into the second epoch, then a few steps more
            if "epoch 1/" in line:
                break
        time.sleep(0.3)
        cut.send_signal(signal.SIGTERM)
        out, _ = cut.communicate(timeout=120)
    finally:
        cut.kill()
    assert cut.returncode == 143, out[-2000:]
    stopped = checkpoint.load(tmp_path / "outputs" / "cut" / "checkpoints" / "interrupted.pt")["progress"]
    assert 22 <= stopped["step"] < 66
    run(make_cfg(*args, f"paths.run_dir={tmp_path}/outputs/cut", "trainer.resume=auto", tracking="mlflow"))

    a = checkpoint.load(tmp_path / "outputs" / "straight" / "checkpoints" / "final.pt")
    b = checkpoint.load(tmp_path / "outputs" / "cut" / "checkpoints" / "final.pt")
    assert not (tmp_path / "outputs" / "cut" / "checkpoints" / "interrupted.pt").exists()  # final.pt replaced it
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(
        torch.equal(x, y) for x, y in zip(a["optimizer"]["state"][0].values(), b["optimizer"]["state"][0].values())
    )
    client = mlflow_client
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}  # the cut run was continued, not duplicated
    (cut_run,) = [r for r in runs if r.data.tags.get("mprun.resumes") == "1"]
    (straight_run,) = [r for r in runs if r is not cut_run]
    assert cut_run.data.tags["mprun.resume_1_step"] == str(stopped["step"])
    for key in (
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "val/loss",
        "val/acc",
        "final/val_acc",
        "final/train_loss",
    ):
        hist = [
            sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, key))
            for r in (straight_run, cut_run)
        ]
        assert hist[0] == hist[1], key


def test_an_augmented_imagefolder_run_resumes_exactly_with_any_number_of_workers(make_cfg, tmp_path: Path) -> None:
    """RandomResizedCrop and flips draw from RNGs seeded by (seed, epoch, sample). They drew from each worker's own
    stream, which depends on the worker count and restarts at a resume: an interrupted run with 2 workers ended
    with other weights than an uninterrupted one (and 0 vs 2 workers differed too)."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / "imgs" / split / cls).mkdir(parents=True)
            for i in range(6):
                pixels = torch.randint(0, 256, (24, 24, 3), generator=gen, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(tmp_path / "imgs" / split / cls / f"{i}.png")
    common = [
        "dataset=imagefolder",
        f"dataset.root={tmp_path}/imgs",
        "dataset.image_size=16",
        "dataset.batch_size=4",
        "model=simple_cnn",
        "scheduler=none",
        "trainer.max_epochs=2",
    ]  # 3 steps an epoch
    run(make_cfg(*common, "dataset.num_workers=0", "paths.run_dir=" + str(tmp_path / "full")))
    run(make_cfg(*common, "dataset.num_workers=2", "trainer.max_steps=4", "paths.run_dir=" + str(tmp_path / "part")))
    run(
        make_cfg(
            *common,
            "dataset.num_workers=2",
            f"trainer.resume={tmp_path / 'part'}",
            "paths.run_dir=" + str(tmp_path / "rest"),
        )
    )
    a = checkpoint.load(tmp_path / "full" / "checkpoints" / "final.pt")["model"]
    b = checkpoint.load(tmp_path / "rest" / "checkpoints" / "final.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_runs_training_time_counts_every_segment(make_cfg, tmp_path: Path) -> None:
    """train_time_s was the last segment's alone. The checkpoint carries the time so far (1000 s here, written in)."""
    common = ["model=simple_mlp", "trainer.max_epochs=1"]
    part = run(make_cfg(*common, "trainer.max_steps=10", "paths.run_dir=" + str(tmp_path / "part")))
    ckpt = tmp_path / "part" / "checkpoints" / "final.pt"
    state = checkpoint.load(ckpt)
    assert state["progress"]["train_time_s"] == part["train_time_s"] > 0
    state["progress"]["train_time_s"] = 1000.0
    checkpoint.save(ckpt, state)
    rest = run(make_cfg(*common, f"trainer.resume={ckpt}", "paths.run_dir=" + str(tmp_path / "rest")))
    assert 1000.0 < rest["train_time_s"] < 1000.0 + rest["wall_time_s"]
    # A resumed epoch's segment is no whole pass: no epoch time (it is not the segment's time passed off as one).
    assert rest["epoch_time_s"] != rest["epoch_time_s"] and rest["timed_epochs"] == 1


def test_a_resumed_runs_speed_medians_leave_out_the_same_warm_up_epoch(make_cfg, tmp_path: Path, mlflow_client) -> None:
    """Resumed mid-epoch, the process's warm-up is the rest of that epoch. samples/s left it out; epoch_time_s, which
    has no time for a partial pass, left out the next (whole) epoch instead, so the two were medians of other epochs."""
    common = ["model=simple_mlp", "trainer.max_epochs=4"]
    run(make_cfg(*common, "trainer.max_steps=10", tracking="mlflow"))  # 10 of the first epoch's 22 steps
    rest = run(make_cfg(*common, f"trainer.resume={tmp_path / 'run'}", tracking="mlflow"))
    client = mlflow_client
    times, rates = (
        {m.step: m.value for m in client.get_metric_history(rest["mlflow_run_id"], f"perf/{k}")}
        for k in ("epoch_time_s", "samples_per_s")
    )
    assert sorted(times) == [44, 66, 88] and sorted(rates) == [10, 22, 44, 66, 88] and rest["timed_epochs"] == 4
    assert rest["epoch_time_s"] == statistics.median(times[s] for s in (44, 66, 88))
    assert rest["samples_per_s"] == statistics.median(rates[s] for s in (44, 66, 88))


def test_a_failed_run_resumed_to_the_end_is_not_reported_failed(
    make_cfg, tmp_path: Path, mlflow_client, monkeypatch
) -> None:
    """The error tag of the crash stayed on the run that the resume then finished, and the sweep report listed a
    FINISHED job as failed. It is kept as mprun.resume_<k>_after_error."""
    from mprun.training import loop

    real, calls = loop.train_step, []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 8:
            raise RuntimeError("crash")
        return real(*args, **kwargs)

    common = [
        "model=simple_mlp",
        "trainer.max_epochs=1",
        "trainer.max_steps=12",
        "trainer.checkpoint_every_steps=5",
        "trainer.resume=auto",
    ]
    monkeypatch.setattr(loop, "train_step", crashing)
    with pytest.raises(RuntimeError, match="crash"):
        run(make_cfg(*common, tracking="mlflow"))
    monkeypatch.setattr(loop, "train_step", real)
    summary = run(make_cfg(*common, tracking="mlflow"))
    r = mlflow_client.get_run(summary["mlflow_run_id"])
    assert r.info.status == "FINISHED" and r.data.tags["mprun.resume_1_step"] == "5"
    assert "error" not in r.data.tags and r.data.tags["mprun.resume_1_after_error"] == "RuntimeError: crash"


def test_resume_auto_without_a_checkpoint_starts_fresh(make_cfg) -> None:
    summary = run(make_cfg("trainer.resume=auto", "trainer.max_steps=2", "trainer.max_epochs=1"))
    assert summary["steps"] == 2


def test_resuming_a_finished_run_changes_nothing(make_cfg, tmp_path: Path, mlflow_client, capsys) -> None:
    """A requeued job that had already finished (trainer.resume=auto finds final.pt) trains nothing; it used to
    log final/val_acc=NaN and samples/s 0 over the real results, and rewrite summary.json so."""
    args = ("model=simple_mlp", "trainer.max_epochs=1")
    first = run(make_cfg(*args, tracking="mlflow"))
    summary_file = tmp_path / "run" / "summary.json"
    written = summary_file.read_text()
    again = run(make_cfg(*args, "trainer.resume=auto", tracking="mlflow"))
    assert "mprun: nothing to train" in capsys.readouterr().out
    assert again["val_acc"] == first["val_acc"] and again["steps"] == first["steps"] and again["interrupted"] is None
    assert summary_file.read_text() == written
    client = mlflow_client
    (r,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert r.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(r.info.run_id, "final/val_acc")] == [first["val_acc"]]


@pytest.mark.parametrize("which", ["final.pt", "step-000000005.pt"])
def test_a_finished_checkpoint_resumed_from_anywhere_returns_the_runs_results(make_cfg, tmp_path: Path, which) -> None:
    """The results came from <checkpoint>/../../summary.json: a checkpoint copied elsewhere gave an all-NaN summary,
    whose val_acc the CLI hands to a sweeper (Optuna). The final checkpoint carries them; one at the last step without
    them (a periodic checkpoint) has its model evaluated."""
    args = ("model=simple_mlp", "trainer.max_steps=5", "trainer.checkpoint_every_steps=5", "trainer.keep_last=1")
    first = run(make_cfg(*args, f"paths.run_dir={tmp_path / 'first'}"))
    elsewhere = tmp_path / "elsewhere" / "x.pt"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes((tmp_path / "first" / "checkpoints" / which).read_bytes())
    again = run(make_cfg(*args, f"trainer.resume={elsewhere}", f"paths.run_dir={tmp_path / 'again'}"))
    assert again["val_acc"] == pytest.approx(first["val_acc"]) and again["val_loss"] == pytest.approx(first["val_loss"])
    if which == "final.pt":
        assert again["samples_per_s"] == first["samples_per_s"] and again["steps"] == 5


def test_a_final_checkpoint_without_its_results_takes_them_from_its_run_directory(make_cfg, tmp_path: Path) -> None:
    """A final.pt that carries no results (written by an mprun before checkpoints carried them) still returns the
    run's recorded numbers from <run dir>/summary.json, not a fresh evaluation's NaN throughput."""
    args = ("model=simple_mlp", "trainer.max_steps=5")
    first = run(make_cfg(*args))
    final = tmp_path / "run" / "checkpoints" / "final.pt"
    contents = checkpoint.load(final)
    del contents["summary"]
    checkpoint.save(final, contents)
    again = run(make_cfg(*args, "trainer.resume=auto"))
    assert again["samples_per_s"] == pytest.approx(first["samples_per_s"]) and again["val_acc"] == first["val_acc"]


def test_resuming_from_an_epochs_last_batch_times_no_empty_epoch(make_cfg, tmp_path: Path, mlflow_client) -> None:
    """A step checkpoint at the epoch's last batch leaves nothing of that epoch to train; the resumed run used to
    time it anyway: a perf/samples_per_s of 0 at step 22 (and half the time 'waiting for data')."""
    common = [
        "model=simple_mlp",
        "trainer.max_epochs=2",
        "trainer.checkpoint_every_steps=22",  # 22 batches an epoch
        "trainer.checkpoint_every_epochs=0",
    ]
    run(make_cfg(*common, "trainer.max_steps=30", "paths.run_dir=" + str(tmp_path / "part")))
    at_end = tmp_path / "part" / "checkpoints" / "step-000000022.pt"
    assert checkpoint.load(at_end)["progress"]["batch_in_epoch"] == 22
    summary = run(
        make_cfg(*common, f"trainer.resume={at_end}", "paths.run_dir=" + str(tmp_path / "rest"), tracking="mlflow")
    )
    rates = mlflow_client.get_metric_history(summary["mlflow_run_id"], "perf/samples_per_s")
    assert [m.step for m in rates] == [44] and rates[0].value > 0 and summary["samples_per_s"] == rates[0].value
    # (No assertion on the input-bound warning: this tiny MLP can wait for its in-memory batches >10% of an epoch
    # on a loaded machine, a true warning, so asserting its absence made this test flaky.)


def test_resuming_a_run_deleted_in_mlflow_starts_a_new_one(make_cfg, tmp_path: Path, mlflow_client) -> None:
    """MLflow refuses to reopen a deleted run; the resume used to end in its traceback."""
    first = run(make_cfg("model=simple_mlp", "trainer.max_epochs=1", tracking="mlflow"))
    client = mlflow_client
    client.delete_run(first["mlflow_run_id"])
    again = run(make_cfg("model=simple_mlp", "trainer.max_epochs=2", "trainer.resume=auto", tracking="mlflow"))
    assert again["mlflow_run_id"] != first["mlflow_run_id"] and again["epochs"] == 2
    assert client.get_run(again["mlflow_run_id"]).info.status == "FINISHED"


@pytest.mark.slow  # three tracked runs
def test_resuming_an_old_checkpoint_again_branches_into_a_new_run(make_cfg, tmp_path: Path, mlflow_client) -> None:
    """The same `trainer.resume=<dir>` run twice: the second resume used to reopen the run the first one had
    finished and log steps 31..44 into it a second time. It branches into a new run now; the first is untouched."""
    common = ["model=simple_mlp", "scheduler=none", "trainer.max_epochs=2", "trainer.log_every_steps=5"]
    run(make_cfg(*common, "trainer.max_steps=30", "paths.run_dir=" + str(tmp_path / "part"), tracking="mlflow"))
    resume = f"trainer.resume={tmp_path / 'part'}"
    first = run(make_cfg(*common, resume, "paths.run_dir=" + str(tmp_path / "rest"), tracking="mlflow"))
    client = mlflow_client
    history = [(m.step, m.value) for m in client.get_metric_history(first["mlflow_run_id"], "train/loss")]
    assert [s for s, _ in history] == [5, 10, 15, 20, 25, 30, 35, 40, 44]
    assert client.get_run(first["mlflow_run_id"]).data.tags["mprun.checkpoint_step"] == "44"
    # best.pt came along into the new run directory (or a better evaluation there wrote its own)
    assert first["best"] and Path(first["best"]["checkpoint"]) == tmp_path / "rest" / "checkpoints" / "best.pt"
    assert checkpoint.load(first["best"]["checkpoint"])["progress"]["best_step"] == first["best"]["step"]

    again = run(make_cfg(*common, resume, "paths.run_dir=" + str(tmp_path / "again"), tracking="mlflow"))
    assert again["mlflow_run_id"] != first["mlflow_run_id"] and again["steps"] == 44
    assert [(m.step, m.value) for m in client.get_metric_history(first["mlflow_run_id"], "train/loss")] == history
    branch = client.get_run(again["mlflow_run_id"])
    assert branch.info.status == "FINISHED"
    assert branch.data.tags["mprun.resumed_from_run"] == first["mlflow_run_id"]
    assert branch.data.tags["mprun.resumed_from_step"] == "30"
    assert [m.step for m in client.get_metric_history(again["mlflow_run_id"], "train/loss")] == [35, 40, 44]
    assert again["val_acc"] == first["val_acc"]  # the same continuation, bit for bit on the CPU


@pytest.mark.parametrize("during", ["last step", "final evaluation"])
def test_a_signal_once_training_is_done_finishes_the_run(
    make_cfg, tmp_path: Path, mlflow_client, monkeypatch, during: str
) -> None:
    """Ctrl-C during the last step (max_steps ending mid-epoch) or the final evaluation: the work is done, so the
    run is recorded FINISHED with final.pt and final/* metrics (it used to be KILLED with interrupted.pt, and
    resuming it then said "nothing to train", leaving it without results), and the signal is still returned."""
    from mprun.training import loop

    target = "train_step" if during == "last step" else "evaluate"
    real, calls = getattr(loop, target), []

    def signalled(*args, **kwargs):
        calls.append(1)
        if target == "evaluate" or len(calls) == 5:
            signal.raise_signal(signal.SIGINT)  # reaches GracefulStop's handler, as a real Ctrl-C does
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, target, signalled)
    summary = run(make_cfg("model=simple_mlp", "trainer.max_epochs=1", "trainer.max_steps=5", tracking="mlflow"))
    assert summary["stop_signal"] == signal.SIGINT and summary["interrupted"] is None and summary["steps"] == 5
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["best.pt", "final.pt"]
    client = mlflow_client
    (r,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert r.info.status == "FINISHED" and r.data.metrics["final/val_acc"] == summary["val_acc"]


@pytest.mark.parametrize(
    "spec,needle", [("/nonexistent/x.pt", "no such file or directory"), ("{tmp}", "no checkpoint")]
)
def test_resume_from_nothing_is_a_clear_error(make_cfg, tmp_path: Path, spec: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        run(make_cfg(f"trainer.resume={spec.format(tmp=tmp_path)}", "trainer.max_steps=2"))


def test_resume_into_another_model_is_a_clear_error(make_cfg, tmp_path: Path) -> None:
    run(make_cfg("model=simple_mlp", "trainer.max_steps=2", "trainer.max_epochs=1"))
    with pytest.raises(ConfigError, match="does not fit this model") as error:  # 4 more differences in the dataset
        run(
            make_cfg(
                "model=simple_cnn",
                "dataset=synthetic",
                "dataset.shape=[1,8,8]",
                f"trainer.resume={tmp_path / 'run'}",
                "paths.run_dir=" + str(tmp_path / "b"),
            )
        )
    # what differs, the model first, and torch's detail past its first line (which ended in a colon, the keys cut off)
    assert (
        "its settings differ: model._target_: 'mprun.models.vision.SimpleMLP' -> 'mprun.models.vision.SimpleCNN'"
        in str(error.value)
    )
    assert "Missing key(s) in state_dict:" in str(error.value) and "\n" not in str(error.value)


def test_fp16_checkpoint_resumed_in_bf16_drops_the_scaler_with_a_warning(make_cfg, tmp_path: Path, caplog) -> None:
    run(make_cfg("precision=fp16", "model=simple_mlp", "trainer.max_steps=3", "trainer.max_epochs=2"))
    with caplog.at_level(logging.WARNING):
        summary = run(
            make_cfg(
                "precision=bf16",
                "model=simple_mlp",
                "trainer.max_steps=5",
                "trainer.max_epochs=2",
                f"trainer.resume={tmp_path / 'run'}",
                "paths.run_dir=" + str(tmp_path / "b"),
            )
        )
    assert "its scale dropped" in caplog.text and "precision.dtype: 'fp16' -> 'bf16'" in caplog.text
    assert summary["steps"] == 5 and summary["loss_scale"] == 1.0


def test_a_skip_mode_checkpoint_resumed_in_fp16_starts_the_loss_scale_fresh(make_cfg, tmp_path: Path, caplog) -> None:
    """on_nonfinite=skip keeps a GradScaler pinned at 1.0 to detect bad steps; that 1.0 is no loss scale. Loaded into
    fp16 it made the resumed run's scale 1.0, which the collapse check stopped at once."""
    run(
        make_cfg(
            "precision=fp32",
            "precision.loss_scale=none",
            "precision.on_nonfinite=skip",
            "model=simple_mlp",
            "trainer.max_steps=3",
            "trainer.max_epochs=2",
        )
    )
    with caplog.at_level(logging.WARNING):
        summary = run(
            make_cfg(
                "precision=fp16",
                "model=simple_mlp",
                "trainer.max_steps=25",
                "trainer.max_epochs=2",
                f"trainer.resume={tmp_path / 'run'}",
                "paths.run_dir=" + str(tmp_path / "b"),
            )
        )
    assert "starts its scale fresh at 65536" in caplog.text
    assert summary["steps"] == 25 and summary["loss_scale"] >= 1024  # 65536, less a few backoffs


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_truncated_tampered_and_malicious_checkpoints_fail_clearly(tmp_path: Path) -> None:
    good = checkpoint.save(tmp_path / "good.pt", {"model": {"w": torch.ones(1000)}})
    raw = good.read_bytes()
    truncated = _write(tmp_path / "truncated.pt", raw[: len(raw) // 2])
    tampered = bytearray(raw)
    at = raw.find(b"\x00\x00\x80\x3f" * 16)  # inside the tensor's data: torch.load alone would not notice
    tampered[at + 400 : at + 464] = b"\x00" * 64
    flipped = _write(tmp_path / "tampered.pt", bytes(tampered))
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, evil)
    for bad in (truncated, flipped, evil):
        with pytest.raises(ConfigError, match="unreadable|damaged or tampered"):
            checkpoint.load(bad)
    assert not marker.exists(), "weights_only=True must never run code from a checkpoint"
    assert torch.equal(checkpoint.load(good)["model"]["w"], torch.ones(1000))


WRITER = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from mprun import checkpoint
    path = Path(sys.argv[1])
    i = 0
    while True:
        i += 1
        checkpoint.save(path, {"i": i, "w": torch.full((4_000_000,), float(i))})  # 16 MB per write
        print(i, flush=True)
""")


@pytest.mark.slow
def test_kill_9_during_a_write_leaves_the_previous_checkpoint_loadable(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    for delay in (0.05, 0.13, 0.31, 0.47, 0.7):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert proc.stdout.readline()  # one complete write exists
        time.sleep(delay)  # then die somewhere in a later write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = checkpoint.load(path)
        assert torch.equal(state["w"], torch.full((4_000_000,), float(state["i"])))
    # A torn temp file may be left; the next save in that directory clears it away.
    checkpoint.Checkpoints(tmp_path, keep_last=1).save("other.pt", {"i": 0})
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_a_signal_inside_a_checkpoint_write_ends_the_run_as_an_interrupt_and_leaves_no_torn_file(
    tmp_path: Path, monkeypatch
) -> None:
    """A second Ctrl-C arriving inside torch.save: torch's zip writer then failed in its cleanup ('unexpected pos'),
    and that RuntimeError, not the interrupt, ended the run: a traceback and exit 1 instead of KILLED and 130."""
    from mprun.interrupts import StopNow

    def torn_save(obj, f) -> None:
        try:
            f.write(b"half a checkpoint")
            raise StopNow(signal.SIGINT)  # the second signal's handler, mid-write
        finally:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 12878912 vs 12878864")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(StopNow):
        checkpoint.save(tmp_path / "interrupted.pt", {"step": 1})
    assert list(tmp_path.iterdir()) == []  # neither the checkpoint nor its temp file


# A constant rate of 0.02 for simple_mlp: val/acc peaks at epoch 3 of 4 (seed 0, fp32), so the last epoch is not the
# best. Each test asserts that much before relying on it.
BEST_NOT_LAST = ("model=simple_mlp", "scheduler=none", "optimizer.lr=0.02")


def _val_acc_by_step(client, run_id: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, "val/acc")}


def test_best_pt_is_the_best_evaluations_and_survives_a_resume(make_cfg, tmp_path: Path, mlflow_client) -> None:
    """trainer.keep_best (auto: val/acc here) keeps checkpoints/best.pt at the evaluation with the best score, tagged
    with its step and score; resumed, the run keeps comparing with the best so far (its checkpoint state), so a worse
    later epoch does not take its place."""
    args = BEST_NOT_LAST
    run(make_cfg(*args, "trainer.max_epochs=3", tracking="mlflow"))
    run(make_cfg(*args, "trainer.max_epochs=4", "trainer.resume=auto", tracking="mlflow"))
    (r,) = mlflow_client.search_runs([e.experiment_id for e in mlflow_client.search_experiments()])
    accs = _val_acc_by_step(mlflow_client, r.info.run_id)
    assert len(accs) == 4
    step = max(accs, key=lambda s: (accs[s], -s))  # the first of the best
    assert step != max(accs), "precondition: the last epoch is not the best, or the resume would not be tested"
    best = checkpoint.load(tmp_path / "run" / "checkpoints" / "best.pt")["progress"]
    assert (best["step"], best["best_step"], best["best_score"]) == (step, step, accs[step])
    tags = r.data.tags
    assert (tags["mprun.best_metric"], int(tags["mprun.best_step"])) == ("val/acc", step)
    assert float(tags["mprun.best_score"]) == pytest.approx(accs[step], rel=1e-5)
    arts = {a.path for a in mlflow_client.list_artifacts(r.info.run_id, "checkpoints")}
    assert "checkpoints/best.pt" in arts


def test_log_model_best_logs_the_best_checkpoints_weights(make_cfg, tmp_path: Path, mlflow_client) -> None:
    import mlflow.pytorch

    summary = run(make_cfg(*BEST_NOT_LAST, "trainer.max_epochs=4", "tracking.log_model=best", tracking="mlflow"))
    assert summary["best"]["step"] < summary["steps"]  # the best is not the final model, so the two differ
    (r,) = mlflow_client.search_runs([e.experiment_id for e in mlflow_client.search_experiments()])
    mlflow.set_tracking_uri(mlflow_client.tracking_uri)
    logged = mlflow.pytorch.load_model(f"runs:/{r.info.run_id}/model").state_dict()
    best = checkpoint.load(tmp_path / "run" / "checkpoints" / "best.pt")["model"]
    final = checkpoint.load(tmp_path / "run" / "checkpoints" / "final.pt")["model"]
    assert all(torch.equal(logged[k], best[k]) for k in best)
    assert not all(torch.equal(logged[k], final[k]) for k in final)


@pytest.mark.parametrize(
    ("overrides", "said"),
    [
        (["trainer.keep_best=val/bpb"], "trainer.keep_best=val/bpb: dataset=digits (classification) has no such"),
        (["trainer.keep_best=acc"], "keep_best=acc: choose one of auto, val/acc"),
        (["trainer.keep_best=none", "tracking.log_model=best"], "tracking.log_model=best logs the best checkpoint"),
        (["tracking.log_model=last"], "log_model=last: choose true"),
    ],
)
def test_a_wrong_keep_best_is_a_config_error(make_cfg, overrides: list[str], said: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(said)):
        run(make_cfg("model=simple_mlp", "trainer.max_steps=1", *overrides, tracking="mlflow"))


def test_a_tie_keeps_the_earlier_best_and_a_nan_never_counts() -> None:
    from mprun.training.state import KeepBest, TrainState

    written = []
    keep = KeepBest("val/loss", maximize=False, write=lambda s: written.append(s.step))
    state = TrainState(step=10, best_metric="val/loss", best_score=0.5, best_step=5)  # from the checkpoint
    assert not keep.offer(state, {"val/loss": 0.5}) and not keep.offer(state, {"val/loss": float("nan")})
    assert not keep.offer(state, {"val/loss": 0.7}) and written == []
    assert keep.offer(state, {"val/loss": 0.4}) and written == [10] and state.best_step == 10
    # a best of another metric (the run before kept val/acc's) is no bar: the first evaluation is the best so far
    state = TrainState(step=20, best_metric="val/acc", best_score=0.1)
    assert keep.offer(state, {"val/loss": 0.9}) and (state.best_metric, state.best_score) == ("val/loss", 0.9)

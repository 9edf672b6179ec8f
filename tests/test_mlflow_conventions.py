"""MLflow as its users know it: the source tags of the UI's Source and User columns, MLflow's environment variables
(MLFLOW_EXPERIMENT_NAME, MLFLOW_EXPERIMENT_ID, MLFLOW_TAGS), and the printed UI link. In process, on the default
sqlite store under tmp_path; the link is opened in a browser in test_tracking_server.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, run_cli_here

from mprun.errors import ConfigError
from mprun.experiment import run
from mprun.tracking.source import COMMAND_ENV, remember_command

SHORT = ("model=simple_mlp", "trainer.max_epochs=1", "trainer.max_steps=2")


def _runs(client, experiment: str) -> list:
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r}: {[e.name for e in client.search_experiments()]}"
    return client.search_runs([found.experiment_id])


def test_a_run_records_where_it_came_from_in_mlflows_source_tags(
    make_cfg, mlflow_client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From a script (mprun.run): the script is the entry point; the launch directory's commit (this checkout) and the
    user are MLflow's own tags, so the UI's Source and User columns show them."""
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv(COMMAND_ENV, raising=False)
    monkeypatch.setattr(sys, "argv", ["/home/me/study/train.py", "--fast"])
    run(make_cfg(*SHORT, tracking="mlflow"))
    (r,) = _runs(mlflow_client, "mprun")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    tags = r.data.tags
    assert (tags["mlflow.source.name"], tags["mlflow.source.type"]) == ("train.py", "LOCAL")
    assert tags["mlflow.source.git.commit"] == head and len(head) == 40
    assert tags["mprun.command"] == "/home/me/study/train.py --fast"
    assert tags["mlflow.user"] and r.info.user_id == tags["mlflow.user"]


def test_the_command_line_is_the_source_and_its_passwords_are_hidden(tmp_path: Path, mlflow_client) -> None:
    """From the command line: `mprun` is the entry point and the command line is a tag; outside a git work tree
    there is no commit to name."""
    proc = run_cli_here(*SHORT, "trainer.progress=off", "precision=fp32", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (r,) = _runs(mlflow_client, "mprun")
    assert r.data.tags["mlflow.source.name"] == "mprun"
    assert r.data.tags["mprun.command"].startswith("mprun model=simple_mlp trainer.max_epochs=1")
    assert "mlflow.source.git.commit" not in r.data.tags
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(COMMAND_ENV, raising=False)
        remember_command(["mprun", "tracking.uri=postgresql://me:s3cret@db:5432/mlflow"])
        assert os.environ[COMMAND_ENV] == "mprun tracking.uri=postgresql://me:***@db:5432/mlflow"


def test_mlflows_experiment_and_tags_variables_choose_the_experiment_and_add_tags(
    make_cfg, mlflow_client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "team-vision")
    monkeypatch.setenv("MLFLOW_TAGS", '{"team": "vision", "ticket": 42, "precision": "mine"}')
    run(make_cfg(*SHORT, tracking="mlflow"))
    (r,) = _runs(mlflow_client, "team-vision")
    assert (r.data.tags["team"], r.data.tags["ticket"]) == ("vision", "42")
    assert r.data.tags["precision"] == "fp32"  # a tag mprun sets keeps mprun's value
    # tracking.experiment, when set, wins over the variables
    run(make_cfg(*SHORT, "tracking.experiment=mine", tracking="mlflow"))
    assert len(_runs(mlflow_client, "mine")) == 1
    # MLFLOW_EXPERIMENT_ID alone: that existing experiment
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")
    team = mlflow_client.get_experiment_by_name("team-vision").experiment_id
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", team)
    run(make_cfg(*SHORT, tracking="mlflow"))
    assert len(_runs(mlflow_client, "team-vision")) == 2


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"MLFLOW_EXPERIMENT_ID": "987"}, "MLFLOW_EXPERIMENT_ID=987: no such experiment in"),
        ({"MLFLOW_EXPERIMENT_NAME": "a", "MLFLOW_EXPERIMENT_ID": "0"}, "does not match experiment 'a'"),
        ({"MLFLOW_TAGS": "team=vision"}, "MLFLOW_TAGS is not JSON"),
        ({"MLFLOW_TAGS": '["vision"]'}, "MLFLOW_TAGS must be a JSON object"),
        ({"MLFLOW_RUN_ID": "0" * 32}, f"MLFLOW_RUN_ID={'0' * 32}: no such run in"),
    ],
    ids=["unknown-id", "name-and-id-disagree", "tags-not-json", "tags-not-an-object", "unknown-run"],
)
def test_a_wrong_mlflow_variable_is_one_line_and_leaves_no_run(tmp_path: Path, mlflow_client, env, said) -> None:
    proc = run_cli_here(*SHORT, "trainer.progress=off", cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("mprun: error: ") and said in line, line
    assert not [r for e in mlflow_client.search_experiments() for r in mlflow_client.search_runs([e.experiment_id])]
    assert not list((tmp_path / "outputs").glob("20*"))  # no run directory


def test_a_sweep_and_its_jobs_go_to_the_experiment_the_variables_name(tmp_path: Path, mlflow_client) -> None:
    env = {"MLFLOW_EXPERIMENT_NAME": "sweeps", "MLFLOW_TAGS": '{"team": "vision"}'}
    proc = run_cli_here("-m", "precision=fp32,bf16", *SHORT, "trainer.progress=off", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = _runs(mlflow_client, "sweeps")
    assert len(runs) == 3 and {r.data.tags.get("mprun.role") for r in runs} >= {"sweep"}
    assert {r.data.tags["team"] for r in runs} == {"vision"}
    assert mlflow_client.get_experiment_by_name("mprun") is None


def test_the_printed_ui_link_opens_mlflows_model_training_view(tmp_path: Path) -> None:
    """MLflow 3's UI opens an experiment as GenAI unless the link says workflowType=machine_learning."""
    proc = run_cli_here(*SHORT, "trainer.progress=off", cwd=tmp_path)
    link = next(line.split("open ", 1)[1] for line in proc.stdout.splitlines() if "then open http" in line)
    assert link.startswith("http://127.0.0.1:5000/#/experiments/") and link.endswith("?workflowType=machine_learning")


def test_mlflow_run_id_continues_that_run_from_its_checkpoint(
    make_cfg, mlflow_client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As trainer.resume would: the run's own run directory (its mprun.run_dir tag) holds the checkpoint to go on
    from, and the run goes on, with no second run."""
    first = run(make_cfg(*SHORT[:1], "trainer.max_epochs=2", tracking="mlflow"))
    (r,) = _runs(mlflow_client, "mprun")
    # Each continuation runs in a directory of its own (as a new command's would), and the next one finds the newest
    for epochs, run_dir in ((3, "run2"), (4, "run3")):
        monkeypatch.setenv("MLFLOW_RUN_ID", r.info.run_id)
        again = run(make_cfg(*SHORT[:1], f"trainer.max_epochs={epochs}", f"paths.run_dir={tmp_path / run_dir}",
                             tracking="mlflow"))  # fmt: skip
        assert again["epochs"] == epochs and again["steps"] == first["steps"] * epochs // 2
        assert "MLFLOW_RUN_ID" not in os.environ  # taken: a later run in this process starts its own
    (same,) = _runs(mlflow_client, "mprun")
    assert same.info.run_id == r.info.run_id and same.info.status == "FINISHED"
    assert same.data.tags["mprun.run_dir"] == str(tmp_path / "run3")
    assert len(mlflow_client.get_metric_history(r.info.run_id, "val/acc")) == 4


def test_mlflow_run_id_of_a_run_a_job_script_opened_gets_the_training(make_cfg, mlflow_client, monkeypatch) -> None:
    """The pattern of pipelines: a script opens a run (with its own tags and params) and hands its id over."""
    run(make_cfg(*SHORT, "tracking.experiment=pipeline", tracking="mlflow"))  # the experiment, with a run of its own
    exp = mlflow_client.get_experiment_by_name("pipeline").experiment_id
    opened = mlflow_client.create_run(exp, run_name="nightly", tags={"pipeline": "nightly"}).info.run_id
    mlflow_client.log_param(opened, "stage", "train")
    monkeypatch.setenv("MLFLOW_RUN_ID", opened)
    run(make_cfg(*SHORT, tracking="mlflow"))  # no experiment chosen: the run's own
    got = mlflow_client.get_run(opened)
    assert got.info.status == "FINISHED" and got.info.run_name == "nightly"
    assert got.data.params["stage"] == "train" and got.data.params["optimizer.lr"]
    assert got.data.tags["pipeline"] == "nightly" and "final/val_acc" in got.data.metrics
    assert len(_runs(mlflow_client, "pipeline")) == 2
    # Its params now stand: a run with another learning rate cannot go into it (MLflow keeps a param's first value)
    monkeypatch.setenv("MLFLOW_RUN_ID", mlflow_client.create_run(exp).info.run_id)
    mlflow_client.log_param(os.environ["MLFLOW_RUN_ID"], "optimizer.lr", "5")
    with pytest.raises(ConfigError, match=r"has other values for params this run sets: optimizer\.lr=5 \(here"):
        run(make_cfg(*SHORT, tracking="mlflow"))


def test_mlflow_run_id_in_a_sweep_is_the_parent_of_its_jobs(tmp_path: Path, mlflow_client) -> None:
    """A sweep's jobs cannot all continue one run: the sweep's parent run is the one MLFLOW_RUN_ID names, and the
    jobs are its children."""
    exp = mlflow_client.create_experiment("mprun")
    opened = mlflow_client.create_run(exp, run_name="study").info.run_id
    env = {"MLFLOW_RUN_ID": opened}
    proc = run_cli_here("-m", "precision=fp32,bf16", *SHORT, "trainer.progress=off", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = {r.info.run_id: r for r in _runs(mlflow_client, "mprun")}
    assert len(runs) == 3 and runs[opened].data.tags["mprun.role"] == "sweep"
    assert runs[opened].info.status == "FINISHED"
    assert sorted(r.data.tags.get("mlflow.parentRunId") for i, r in runs.items() if i != opened) == [opened] * 2


def test_mlflow_run_id_of_another_experiment_than_the_chosen_one_is_an_error(make_cfg, mlflow_client, monkeypatch):
    run(make_cfg(*SHORT, "tracking.experiment=mine", tracking="mlflow"))  # makes the store
    other = mlflow_client.create_run(mlflow_client.create_experiment("theirs")).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", other)
    with pytest.raises(ConfigError, match=f"MLFLOW_RUN_ID={other} is a run of experiment .*, not of 'mine'"):
        run(make_cfg(*SHORT, "tracking.experiment=mine", tracking="mlflow"))
    assert mlflow_client.get_run(other).info.status == "RUNNING"  # left as its owner has it
    assert len(_runs(mlflow_client, "mine")) == 1

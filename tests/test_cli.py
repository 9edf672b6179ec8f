"""`python -m mprun` as a user runs it: the default experiment, bad input, and Ctrl-C / SIGTERM. The command line's
entry point runs in this process (run_cli_here) unless the process itself is under test (signals, a closed stdout)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import run_cli, run_cli_here, run_statuses
from mlflow import MlflowClient

from mprun import checkpoint
from mprun.errors import ConfigError
from mprun.experiment import run


@pytest.mark.slow  # 10 epochs: ~30 s of training
def test_default_run_reaches_095(tmp_path: Path, mlflow_client) -> None:
    """The default experiment, as `python -m mprun` with no arguments runs it: accurate, reported, recorded."""
    started = time.perf_counter()
    proc = run_cli_here(cwd=tmp_path)
    wall = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    (summary_file,) = (tmp_path / "outputs").glob("*/*/summary.json")
    summary = json.loads(summary_file.read_text())
    assert summary["val_acc"] >= 0.95
    # auto on a CPU times fp32 and bf16 on this model and says so
    assert summary["precision"] in ("fp32", "bf16") and "measured on this CPU" in summary["precision_detail"]
    out = proc.stdout
    for needle in ("val/acc", "samples/s", "peak memory", "precision", "MLflow run", "mlflow ui --backend-store-uri"):
        assert needle in out, needle
    assert run_statuses(tmp_path / "outputs" / "mlflow.db") == ["FINISHED"]
    # The store is where the summary says, and the UI command points at it.
    run_id = summary["mlflow_run_id"]
    client = mlflow_client
    assert client.get_run(run_id).info.status == "FINISHED"
    hydra_files = {Path(a.path).name for a in client.list_artifacts(run_id, "hydra")}
    assert {"config.yaml", "hydra.yaml", "overrides.yaml"} <= hydra_files
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    print(f"default run: {wall:.1f} s wall, val_acc {summary['val_acc']:.4f}")


def test_help_lists_the_groups_a_user_can_choose_and_how_to_run(tmp_path: Path) -> None:
    """--help's group list is the choices of conf/ (the schemas, which no one picks, used to be listed as
    `schema/model: ...` groups beside them); its header and footer say how to run mprun."""
    proc = run_cli_here("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    groups = proc.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    listed = {line.split(":")[0]: line.split(": ")[1].split(", ") for line in groups.splitlines()[2:] if line}
    conf = Path(__file__).parents[1] / "conf"
    assert listed == {
        d.name: sorted(f.stem for f in d.glob("*.yaml")) for d in conf.iterdir() if d.is_dir() and d.name != "hydra"
    }
    assert proc.stdout.startswith("mprun: ") and "python -m mprun -m precision=fp32,fp16,bf16" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("unbuffered", ["1", ""], ids=["PYTHONUNBUFFERED", "buffered"])
def test_help_into_a_closed_pipe_exits_quietly(tmp_path: Path, unbuffered: str) -> None:
    """`mprun --help | head -1`: the reader is gone by the time the help is printed, which was a BrokenPipeError
    traceback; now the exit code of a process SIGPIPE ended (141) and nothing on stderr. Buffered, the help is only
    written (and the error raised) when Python flushes stdout at exit; unbuffered, in Hydra's print."""
    env = {**os.environ, "PYTHONUNBUFFERED": unbuffered}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mprun", "--help"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    proc.stdout.close()  # before the imports are done, so the help's print always finds the pipe closed
    assert proc.wait(timeout=120) == 128 + signal.SIGPIPE
    assert proc.stderr.read() == ""


@pytest.mark.slow
@pytest.mark.parametrize("code,ends", [(0, 141), (2, 2), (130, 130)], ids=["ok", "error", "interrupted"])
def test_a_lost_stdout_reader_keeps_the_runs_exit_code(tmp_path: Path, code: int, ends: int) -> None:
    """`mprun ... | tee log`, then Ctrl-C: tee is gone before mprun has stopped gracefully; its exit 130 (a requeue
    script's cue) came out as 141. Only a run with no other end than its lost output ends as SIGPIPE. mprun.cli is
    replaced by a stub that prints (buffered) and exits with the code."""
    script = f"""
import select, sys, time, types
def main():
    poller = select.poll()
    poller.register(1, select.POLLOUT)
    for _ in range(1000):  # until the test has closed the reading end
        if poller.poll(0)[0][1] & select.POLLERR:
            break
        time.sleep(0.01)
    print("x" * 100)
    sys.exit({code})
sys.modules["mprun.cli"] = types.SimpleNamespace(main=main)
from mprun.__main__ import main as mprun_main
mprun_main()
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": ""},
    )
    proc.stdout.close()
    assert proc.wait(timeout=120) == ends
    assert proc.stderr.read() == ""


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_torch_imports_is_one_line(tmp_path: Path, sig: signal.Signals) -> None:
    """The imports take seconds: a Ctrl-C in them printed a traceback from inside torch, and a SIGTERM ended the
    process without a word. The signal is made to land in the import deterministically: a finder sends it to its
    own process when mprun.cli is looked up, and waits for the handler."""
    script = f"""
import os, sys, time
class Signal:
    def find_spec(self, name, path=None, target=None):
        if name == "mprun.cli":
            os.kill(os.getpid(), {int(sig)})
            time.sleep(5)
sys.meta_path.insert(0, Signal())
from mprun.__main__ import main
main()
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stderr) == (128 + sig, f"mprun: interrupted ({sig.name})\n")


def test_a_sweep_preset_is_a_multirun_without_dash_m(tmp_path: Path) -> None:
    """Hydra ignores hydra.sweeper.params in a single run, so `experiment=amp_benchmark` quietly made one run at auto
    precision; the presets set hydra.mode=MULTIRUN, and hydra.mode=RUN still makes the one run."""
    args = ["experiment=amp_benchmark", "model=simple_mlp", "trainer.max_steps=1", "tracking=none"]
    swept = run_cli_here(*args, "precision=fp32,bf16", "trainer.seed=0", cwd=tmp_path)  # one seed
    assert swept.returncode == 0, swept.stderr
    assert sorted(p.name for p in tmp_path.glob("outputs/multirun/*/*/*") if p.is_dir()) == ["0", "1"]
    single = run_cli_here(*args, "hydra.mode=RUN", "hydra.run.dir=outputs/one", cwd=tmp_path)
    assert single.returncode == 0 and (tmp_path / "outputs" / "one" / "summary.json").is_file(), single.stderr


# Bad input that Hydra finds while composing the command line, or that mprun finds in what Hydra composed (the model's
# name as the command line gave it): the command line's own handling, so through its entry point.
CLI_BAD_INPUTS = [
    (["precision=fp17"], ["precision/fp17", "fp16_static", "bf16"]),
    (["trainer.max_epochs=abc"], ["trainer.max_epochs", "abc"]),
    # Hydra suggests '+trainer.epochs=3' (which mprun rejects too): the last line names the keys trainer takes.
    (
        ["trainer.epochs=3"],
        [
            "epochs",
            "TrainerConfig",
            "mprun: error: trainer.epochs: unknown key; did you mean trainer.max_epochs? trainer takes channels_last,",
        ],
    ),
    (["trainr.max_epochs=3"], ["mprun: error: trainr: unknown key; did you mean trainer? the config takes dataset,"]),
    # A typo gets the key it most likely meant: a close spelling, or an abbreviation either way.
    (
        ["optimizer.learning_rate=0.1"],
        ["mprun: error: optimizer.learning_rate: unknown key; did you mean optimizer.lr?"],
    ),
    (["optimizer.wd=0.1"], ["mprun: error: optimizer.wd: unknown key; did you mean optimizer.weight_decay?"]),
    (
        ["tracking=none", "tracking.experiment=x"],
        ["mprun: error: tracking.experiment: unknown key; tracking takes no keys"],
    ),
    (
        ["model=vit_b16"],
        ["mprun: error: model=vit_b16 model.name=vit_base_patch16_224 cannot train on dataset=digits"],
    ),  # was model=vit_base...
]


def check_short_and_clear(proc, needles: list[str], cwd: Path) -> None:
    """Exit 2, as argparse ends on a user's mistake, whether Hydra or mprun finds it; a few lines naming the problem,
    no traceback; no MLflow run left RUNNING."""
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err}"
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) <= 20, err  # Hydra lists a group's options, one a line (precision has 9)
    assert "RUNNING" not in run_statuses(cwd / "outputs" / "mlflow.db")


@pytest.mark.parametrize("args,needles", CLI_BAD_INPUTS, ids=[" ".join(a) for a, _ in CLI_BAD_INPUTS])
def test_bad_input_on_the_command_line_is_short_clear_and_leaves_no_running_run(
    tmp_path: Path, args: list[str], needles: list[str]
) -> None:
    """The command line's handling of a mistake in it (Hydra's message, mprun's line naming the valid keys)."""
    check_short_and_clear(run_cli_here(*args, "trainer.max_epochs=1", cwd=tmp_path), needles, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,needles",
    [CLI_BAD_INPUTS[2], (["optimizer.lr=-1"], ["optimizer.lr=-1.0 must be > 0"])],
    ids=["hydra's", "mprun's"],
)
def test_bad_input_ends_a_real_process_with_exit_2_and_one_line(
    tmp_path: Path, args: list[str], needles: list[str]
) -> None:
    """As a user starts it, in a process of its own: exit 2, and stderr ends in the one `mprun: error:` line, with no
    traceback, whether Hydra finds the mistake or mprun does (a ConfigError, as the in-process tests below raise)."""
    proc = run_cli(*args, "trainer.max_epochs=1", cwd=tmp_path)
    check_short_and_clear(proc, needles, tmp_path)
    assert proc.stderr.strip().splitlines()[-1].startswith("mprun: error: "), proc.stderr


# Bad values that mprun finds before it builds anything: a ConfigError, which the command line shows as one line and
# exit 2 (the tests above). No MLflow run is created, and no run directory.
BAD_VALUES = [
    (["optimizer.lr=-1"], ["optimizer.lr=-1.0 must be > 0"]),
    (["trainer.grad_accum_steps=0"], ["trainer.grad_accum_steps=0 must be >= 1"]),
    (["precision=fp16", "precision.init_scale=0"], ["precision.init_scale=0.0 must be > 0"]),
    (["precision=fp16_static", "precision.init_scale=-1"], ["precision.init_scale"]),
    (["trainer.device=cuda"], ["trainer.device=cuda", "cpu or auto"]),
    (["dataset=cifar10"], ["cifar-10-batches-py", "dataset.download=true"]),
    (["model=timm", "model.name=resnet5O"], ["resnet5O", "resnet50"]),
    (["tracking.uri=http://127.0.0.1:9"], ["127.0.0.1:9", "tracking=none"]),
    (
        ["tracking.uri=localhost:5000"],
        ["cannot use MLflow tracking store localhost:5000", "tracking=none"],
    ),  # was a traceback
    (
        ["tracking.uri=postgresql://u:p@127.0.0.1:9/db"],
        ["cannot use MLflow tracking store postgresql://", "tracking=none"],
    ),
    # It blamed the store ("Fix tracking.uri").
    (["tracking.experiment="], ["tracking.experiment: must name an MLflow experiment (default: mprun)"]),
    # "Structured config of type `ImageFolderConfig` has missing mandatory value: root": the key as typed.
    (["dataset=imagefolder"], ["dataset.root: missing mandatory value; set it on the command line (dataset.root=...)"]),
    (["model=timm"], ["model.name: missing mandatory value"]),
]


@pytest.mark.parametrize("args,needles", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_bad_input_is_short_clear_and_creates_no_run(
    make_cfg, tmp_path: Path, monkeypatch, args: list[str], needles: list[str]
) -> None:
    """A ConfigError naming the key and what to do, before an MLflow run or a run directory exists."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # trainer.device=cuda on a machine without a GPU
    with pytest.raises(ConfigError) as error:
        run(make_cfg(*args, "trainer.max_epochs=1", tracking="mlflow"))
    for needle in needles:
        assert needle in str(error.value), f"{needle!r} not in:\n{error.value}"
    assert len(str(error.value).strip().splitlines()) <= 16, error.value
    assert run_statuses(tmp_path / "outputs" / "mlflow.db") == [] and not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_checkpoints_and_marks_run_killed(tmp_path: Path, sig: int, code: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mprun", "trainer.max_epochs=100000", "trainer.progress=log"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in proc.stdout:  # wait until training is really under way
            if "epoch 1/" in line:
                break
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, out[-2000:]
    assert run_statuses(tmp_path / "outputs" / "mlflow.db") == ["KILLED"]
    (ckpt,) = (tmp_path / "outputs").glob("*/*/checkpoints/interrupted.pt")
    from mprun.checkpoint import load

    step = load(ckpt)["progress"]["step"]
    assert step > 0
    # The summary says the run stopped, where its checkpoint is and how to continue (it read like a finished run).
    assert f"stopped     by {signal.Signals(sig).name} after step {step}, before the end: {ckpt}" in out, out[-2000:]
    assert f"trainer.resume={ckpt.parent.parent}" in out


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_second_signal_stops_at_once_and_still_marks_killed(tmp_path: Path, sig: signal.Signals, code: int) -> None:
    # Long steps on the CPU, so that the second Ctrl-C arrives mid-step: a wide batch through a 12.6M-parameter MLP
    # (its checkpoint is 150 MB; 200M parameters at the default batch took as long and wrote 2 GB twice).
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mprun",
            "model=simple_mlp",
            "model.hidden=1024",
            "model.depth=12",
            "dataset.batch_size=1024",
            "trainer.max_epochs=100000",
            "trainer.progress=log",
            "trainer.log_every_steps=1",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in proc.stdout:
            if "optimizer steps planned" in line:
                break
        time.sleep(1.0)
        proc.send_signal(sig)
        time.sleep(0.05)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    # Both signals may land while one long torch call runs, and Python then runs the handler once (signals
    # coalesce): the graceful stop. Either way: exit 128+signal (a second SIGTERM used to exit 130, like Ctrl-C),
    # no traceback ("mprun: interrupted (SIGTERM)" when stopped at once).
    assert proc.returncode == code and "Traceback" not in out, out[-2000:]
    assert run_statuses(tmp_path / "outputs" / "mlflow.db") == ["KILLED"], out[-2000:]


def test_a_second_signal_unwinds_with_its_own_exit_code(monkeypatch) -> None:
    """The second signal's exception carries the signal through pickling (a joblib worker hands it to its parent;
    it failed to rebuild there) to the exit code: 143 for SIGTERM, not Ctrl-C's 130."""
    import pickle

    from mprun import cli
    from mprun.__main__ import main as mprun_main
    from mprun.interrupts import GracefulStop, StopNow

    with GracefulStop() as stop:
        stop._handle(signal.SIGTERM, None)  # the first: a graceful stop is requested
        with pytest.raises(StopNow) as second:
            stop._handle(signal.SIGTERM, None)
    again = pickle.loads(pickle.dumps(second.value))
    assert isinstance(again, KeyboardInterrupt) and again.signum == signal.SIGTERM and str(again) == "SIGTERM"

    def interrupted(primary: str) -> None:
        raise again

    monkeypatch.setattr(cli, "_main", interrupted)
    handlers = {s: signal.getsignal(s) for s in GracefulStop.SIGNALS}
    try:
        with pytest.raises(SystemExit) as end:
            mprun_main()
    finally:  # main installs its handlers for the process: this one is pytest's
        for s, handler in handlers.items():
            signal.signal(s, handler)
    assert end.value.code == 143


def test_signals_wait_for_the_store_to_be_whole(tmp_path: Path, monkeypatch) -> None:
    """A new sqlite store gets its tables in several migrations; a Ctrl-C in between left a store every later run
    failed on. A signal while the tracker opens the store reaches its handler once the store is whole."""
    from mprun.tracking.mlflow_tracker import MlflowTracker
    from mprun.tracking.store import Store

    experiment = Store.experiment

    def interrupted(self, *args):
        os.kill(os.getpid(), signal.SIGINT)  # arrives while the store is being set up
        time.sleep(0.05)
        return experiment(self, *args)

    monkeypatch.setattr(Store, "experiment", interrupted)
    # Ctrl-C's handler as an interactive shell's job has it: a suite started with '&' from a script inherits SIGINT
    # ignored (POSIX), and Python then installs none, so the signal this test sends went nowhere.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            MlflowTracker(str(tmp_path), None, "mprun", None, False)
    finally:
        signal.signal(signal.SIGINT, previous)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_experiment_by_name("mprun") is not None  # the set-up ran to its end before the signal


def test_unnamed_runs_get_distinct_names_and_run_name_prefixes_a_sweeps(tmp_path: Path, mlflow_client) -> None:
    """MLflow names an unnamed run with Python's `random`, which the run had just seeded: every run with the
    default seed was called the same. tracking.run_name named a sweep's parent and every job alike."""
    for _ in range(2):
        assert (
            run_cli_here("model=simple_mlp", "trainer.max_steps=2", "trainer.max_epochs=1", cwd=tmp_path).returncode
            == 0
        )
    proc = run_cli_here(
        "-m",
        "precision=fp32,bf16",
        "tracking.run_name=study",
        "model=simple_mlp",
        "trainer.max_steps=2",
        "trainer.max_epochs=1",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    client = mlflow_client
    names = sorted(r.info.run_name for r in client.search_runs([e.experiment_id for e in client.search_experiments()]))
    singles = [n for n in names if not n.startswith("study")]
    assert len(singles) == 2 and singles[0] != singles[1], names
    assert [n for n in names if n.startswith("study")] == [
        "study: bf16",
        "study: fp32",
        "study: sweep precision=fp32,bf16 tracking.run_name=study "
        "model=simple_mlp trainer.max_steps=2 trainer.max_epochs=1",
    ]


def test_bad_input_leaves_no_run_directory_and_a_failed_run_leaves_its_error_in_the_log(tmp_path: Path) -> None:
    """Hydra creates the run directory (.hydra/, an empty mprun.log) before mprun sees the config: after an hour of
    typos, most run directories were such leftovers. A run that fails later keeps its directory, and its log now
    ends with the error the console showed."""
    bad = run_cli_here("optimizer.lr=-1", cwd=tmp_path)
    assert bad.returncode == 2 and "optimizer.lr=-1.0 must be > 0" in bad.stderr
    assert not [p for p in (tmp_path / "outputs").rglob("*")], "no run directory, no date directory"
    stopped = run_cli_here(
        "model=simple_mlp",
        "model.grad_scale=1e30",  # overflows fp16 at any scale: the loss scale collapses, a NumericsError
        "precision=fp16",
        "precision.collapse_patience=100",
        "trainer.log_every_steps=5",
        "tracking=none",
        "trainer.progress=off",
        cwd=tmp_path,
    )
    assert stopped.returncode == 1 and "mprun: stopped: step 20: loss scale collapsed" in stopped.stderr
    (log,) = (tmp_path / "outputs").rglob("mprun.log")
    assert log.read_text().splitlines()[-1].endswith(stopped.stderr.strip().splitlines()[-1])


def test_cfg_resolve_prints_the_config_without_a_traceback(tmp_path: Path) -> None:
    """`--cfg job --resolve` ended in 47 lines of InterpolationValidationError: paths.run_dir is Hydra's output dir,
    which a command that runs nothing does not have."""
    shown = run_cli_here("--cfg", "job", "--resolve", cwd=tmp_path)
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
    assert "run_dir: null" in shown.stdout and "output_root: ./outputs" in shown.stdout


@pytest.mark.parametrize(
    "args,what",
    [(["hydra.run.dir=/dev/null/x"], "run"), (["-m", "paths.output_root=/dev/null/o"], "sweep")],
    ids=["run", "sweep"],
)
def test_an_output_dir_that_cannot_be_created_is_one_line(tmp_path: Path, args: list[str], what: str) -> None:
    """Hydra creates the directory before mprun runs, and its OSError came out as a traceback."""
    ended = run_cli_here(*args, "trainer.max_steps=1", cwd=tmp_path)
    assert ended.returncode == 2 and "Traceback" not in ended.stderr, ended.stderr
    assert (
        ended.stderr.strip().splitlines()[-1].startswith(f"mprun: error: cannot create the {what} directory /dev/null/")
        and "/dev/null is not a directory" in ended.stderr
    )
    assert not (tmp_path / "outputs").exists()


def test_resuming_a_run_directory_continues_in_it(tmp_path: Path) -> None:
    """trainer.resume=<run dir> resumed into a new timestamped directory: interrupted.pt stayed in the old one and
    final.pt landed in the new one, for one MLflow run. Now the run goes on in its own directory."""
    first = run_cli_here("trainer.max_steps=5", "tracking=none", "trainer.progress=off", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    (run_dir,) = (tmp_path / "outputs").glob("*/*")
    again = run_cli_here(
        "trainer.max_steps=10", f"trainer.resume={run_dir}", "tracking=none", "trainer.progress=off", cwd=tmp_path
    )
    assert again.returncode == 0, again.stderr
    assert list((tmp_path / "outputs").glob("*/*")) == [run_dir]
    assert checkpoint.load(run_dir / "checkpoints" / "final.pt")["progress"]["step"] == 10
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 10


@pytest.mark.parametrize("args", [["--help"], ["optimizer.lr=-1"]], ids=["help", "a bad value"])
def test_help_and_a_bad_value_import_no_torch(tmp_path: Path, args: list[str]) -> None:
    """The config's schemas, its validation, --help and every config error import no torch: they answer in a fraction
    of the seconds torch takes to import (docs/benchmarks.md, "The command line's answers")."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mprun", *args], cwd=tmp_path, capture_output=True, text=True
    )
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "mprun.cli" in imported and "hydra" in imported  # the measurement saw the imports
    assert "torch" not in imported, sorted(m for m in imported if m.startswith("mprun"))
    assert done.returncode == (0 if args == ["--help"] else 2)
    assert args == ["--help"] or "mprun: error: optimizer.lr=-1.0 must be > 0" in done.stderr

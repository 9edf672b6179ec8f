"""Multiruns as users run them: MLflow parent/child runs, parallel launchers, the report, the presets. Sweeps run in
this process through the command line's entry point (Hydra's basic launcher runs the jobs here too), except those of
the process-based launchers and those that are sent a signal."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_cli, run_cli_here, run_statuses
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

from mprun import report
from mprun.cli import CONFIG_DIR, PRIMARY
from mprun.tracking.store import RecordedRun, Store

TINY = ["model=simple_mlp", "trainer.max_epochs=1", "trainer.max_steps=4", "trainer.log_every_steps=2"]


def store(cwd: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{cwd}/outputs/mlflow.db")


def sweep_runs(cwd: Path) -> tuple:
    """(parent run, [child runs]) of the only sweep in cwd's default store."""
    client = store(cwd)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    (parent,) = [r for r in runs if r.data.tags.get("mprun.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1, "every other run is a child of the sweep"
    return parent, sorted(children, key=lambda r: int(r.data.tags["mprun.sweep_job"]))


@pytest.mark.slow
def test_joblib_workers_run_job_after_job_and_nest_every_one(tmp_path: Path) -> None:
    """4 jobs on 2 joblib workers, so each worker runs a job after another: module state must not leak from one to
    the next. (Many first openers of a fresh store at once: test_postgres.py's 3 x 4 sqlite load, 15 processes.)"""
    proc = run_cli(
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "optimizer.lr=1e-3,3e-3",
        "trainer.log_every_steps=1,2",
        *TINY[:3],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    parent, children = sweep_runs(tmp_path)
    assert parent.info.status == "FINISHED"
    assert [c.info.status for c in children] == ["FINISHED"] * 4
    assert [c.data.tags["mprun.sweep_job"] for c in children] == [str(n) for n in range(4)]
    assert {c.info.run_name for c in children} == {
        f"lr={lr} log_every_steps={n}" for lr in ("0.001", "0.003") for n in (1, 2)
    }
    sweep_dir = Path(parent.data.tags["mprun.sweep_dir"])
    assert all(c.data.tags["mprun.sweep_dir"] == str(sweep_dir) for c in children)
    assert (sweep_dir / "report" / "report.md").is_file()
    # The log interval does not change training: same lr, same numbers, whichever worker ran it after whatever.
    by_lr: dict[str, set] = {}
    for c in children:
        m = c.data.metrics
        by_lr.setdefault(c.data.params["optimizer.lr"], set()).add((m["final/train_loss"], m["final/val_loss"]))
    assert all(len(results) == 1 for results in by_lr.values()), by_lr


@pytest.fixture(scope="module")
def precision_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real 6-job sweep (precision x lr), shared by the report tests."""
    cwd = tmp_path_factory.mktemp("sweep")
    proc = run_cli_here("-m", "precision=fp32,fp16,bf16", "optimizer.lr=1e-3,3e-3", *TINY, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mprun sweep report" in proc.stdout
    return cwd


@pytest.mark.slow  # the shared 6-job sweep
def test_report_numbers_are_the_child_runs_metrics(precision_sweep: Path) -> None:
    parent, children = sweep_runs(precision_sweep)
    assert parent.info.status == "FINISHED" and len(children) == 6
    client = store(precision_sweep)
    rep = report.build(Store(client.tracking_uri), parent.info.run_id, precision_sweep / "again")
    cells = {cell[1]: cell for cell in report.table_rows(rep.rows)}
    by_name = {c.info.run_name: c for c in children}
    for name, child in by_name.items():
        m, prec = child.data.metrics, child.data.tags["precision"]
        base = by_name[name.replace(prec, "fp32", 1)].data.metrics  # 'fp16 lr=0.003' -> 'fp32 lr=0.003'
        cell = cells[name]
        assert cell[2] == prec and cell[3] == "ok"
        assert cell[4] == f"{m['final/val_acc']:.4f}"
        assert cell[5] == f"{100 * (m['final/val_acc'] - base['final/val_acc']):+.2f} pp"
        assert cell[6] == f"{m['final/samples_per_s']:,.0f}"
        # TINY runs one epoch: a speedup from a single timed epoch, warm-up included, is marked so
        assert cell[7] == f"{m['final/samples_per_s'] / base['final/samples_per_s']:.2f}×†"
        assert cell[8] == f"{m['final/data_wait_frac']:.0%}"
        assert cell[9] == f"{m['final/peak_mem_mib']:,.0f}"
        assert cell[10] == f"{m['final/peak_mem_mib'] / base['final/peak_mem_mib']:.2f}×"
        assert cell[11] == f"{m['final/param_state_mib']:,.1f}"
        assert cell[12] == f"{m['final/skipped_steps']:.0f}"
        assert cell[13] == (f"{m['final/loss_scale']:g}" if prec == "fp16" else "—")
    md = (rep.out_dir / "report.md").read_text()
    assert md.count("| ok |") == 6
    # Each job's best checkpoint (trainer.keep_best: val/acc), and which job's is the sweep's best
    best = {c.info.run_name: float(c.data.tags["mprun.best_score"]) for c in children}
    assert md.count("`checkpoints/best.pt` of run") == 6
    named = md.split("The best val/acc of the sweep: job ", 1)[1].split("`")[1]
    assert best[named] == max(best.values())
    assert {"loss.png", "loss_scale.png", "perf.png"} <= {p.name for p in rep.out_dir.iterdir()}
    # The report of the sweep itself went to the parent run's artifacts.
    assert "report/report.md" in {a.path for a in client.list_artifacts(parent.info.run_id, "report")}


@pytest.mark.slow  # the shared 6-job sweep
def test_report_on_demand_by_experiment_name_or_parent_id(precision_sweep: Path, monkeypatch, capsys) -> None:
    """`python -m mprun.report <experiment name | parent run id>` in the sweep's launch directory: the default
    store; a name that is neither is a user's mistake, exit 2 as in argparse and mprun (it was 1)."""
    parent, _ = sweep_runs(precision_sweep)
    monkeypatch.chdir(precision_sweep)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sweep_report = Path(parent.data.tags["mprun.sweep_dir"]) / "report" / "report.md"
    for what in ("mprun", parent.info.run_id):
        sweep_report.unlink()
        report.main([what, "--no-log"])
        out = capsys.readouterr().out
        assert "fp16 lr=0.003" in out
        # Next to the sweep it reports on (it went to outputs/reports/<id>, wherever the command ran), and said.
        assert sweep_report.is_file() and f"report      {sweep_report}" in out
    with pytest.raises(SystemExit) as bad:
        report.main(["no-such-thing"])
    assert bad.value.code == 2
    assert capsys.readouterr().err.startswith(
        "python -m mprun.report: error: 'no-such-thing' is neither a run id nor an experiment name"
    )


def _row(num: int, precision: str, status: str = "FINISHED", **metrics: float) -> report.Row:
    return report.Row(
        num,
        f"precision={precision}",
        f"r{num}",
        status,
        precision,
        precision,
        "",
        ("optimizer.lr=0.1",),
        {f"final/{k}": v for k, v in metrics.items()},
    )


def test_every_loss_curve_is_drawn_apart(tmp_path: Path, monkeypatch) -> None:
    """fp16, fp16_static and fp16_unscaled all resolve to fp16: they were drawn in one colour and one line style."""
    drawn = {}
    monkeypatch.setattr(
        "mprun.report.plots._save",
        lambda fig, path: (
            drawn.setdefault(path.name, [(line.get_color(), line.get_linestyle()) for line in fig.axes[0].lines])
            and path.name
        ),
    )
    rows = []
    for num, (option, resolved) in enumerate(
        [
            ("fp16", "fp16"),
            ("fp16_static", "fp16"),
            ("fp16_unscaled", "fp16"),
            ("bf16", "bf16"),
            ("auto", "bf16"),
            ("fp32", "fp32"),
        ]
    ):
        row = _row(num, resolved)
        row.requested, row.loss_curve = option, [(1, 2.0), (2, 1.0)]
        rows.append(row)
    from mprun.report import groups

    report.plot(groups.group(rows), tmp_path)
    assert len(set(drawn["loss.png"])) == len(rows)
    assert drawn["loss.png"][4] == ("tab:green", "--")  # auto drawn as what it ran, beside bf16


def test_curves_that_coincide_stay_visible_by_their_markers(tmp_path: Path, monkeypatch) -> None:
    """fp16 with and without a loss scale train alike until the first overflow: their lines lay on top of each
    other and only the last drawn showed. Each line now has its own marker, at its own offset along the steps."""
    drawn = {}

    def save(fig, path: Path) -> str:
        drawn[path.name] = [(line.get_marker(), line.get_markevery()) for line in fig.axes[0].lines]
        return path.name

    monkeypatch.setattr("mprun.report.plots._save", save)
    rows = []
    for num, option in enumerate(["fp16", "fp16_static", "fp16_unscaled"]):
        row = _row(num, "fp16")
        row.requested, row.loss_curve = option, [(step, 1.0 / step) for step in range(1, 31)]  # the same curve
        rows.append(row)
    from mprun.report import groups

    report.plot(groups.group(rows), tmp_path)
    marks = drawn["loss.png"]
    assert len({m for m, _ in marks}) == 3  # three markers
    assert [every for _, every in marks] == [(0, 5), (1, 5), (3, 5)]  # at steps 0, 5, ...; 1, 6, ...; 3, 8, ...


def test_a_speedup_from_a_single_timed_epoch_is_marked_as_such() -> None:
    rows = [_row(0, "fp32", val_acc=0.9, samples_per_s=100.0), _row(1, "bf16", val_acc=0.9, samples_per_s=150.0)]
    rows[1].baseline = rows[0]
    speedup = report.columns(rows).index("speedup")
    rows[0].timed_epochs = rows[1].timed_epochs = 3
    assert [c[speedup] for c in report.table_rows(rows)] == ["—", "1.50×"]
    assert not [n for n in report.notes_for(rows) if n.startswith("† speedup")]
    rows[0].timed_epochs = 1  # the baseline's throughput is one epoch, warm-up included
    assert [c[speedup] for c in report.table_rows(rows)] == ["—", "1.50×†"]
    assert [n for n in report.notes_for(rows) if n.startswith("† speedup from a single timed epoch")]


def test_the_baseline_shares_clipping_and_prefers_an_explicit_fp32() -> None:
    """A precision.* override that changes fp32 runs too (clipping) picks the fp32 job with the same value; the
    scaler's settings do not matter; of two fp32 jobs, the one that asked for fp32 beats auto resolved to fp32.
    Before, every precision.* override was ignored and the last fp32 job won: fp16 at clip 0.1 was compared
    with fp32 at clip 10."""
    from types import SimpleNamespace as NS

    def child(num: int, overrides: str, resolved: str) -> RecordedRun:
        tags = {"mprun.sweep_job": str(num), "mprun.overrides": overrides, "precision": resolved}
        return RecordedRun(f"r{num}", overrides, "FINISHED", num, tags, {"final/val_acc": 0.5, "final/train_loss": 0.1})

    runs = [
        child(0, "precision=auto precision.grad_clip_norm=0.1", "fp32"),
        child(1, "precision=fp32 precision.grad_clip_norm=0.1", "fp32"),
        child(2, "precision=fp16 precision.grad_clip_norm=0.1 precision.init_scale=128", "fp16"),
        child(3, "precision=fp32 precision.grad_clip_norm=10", "fp32"),
        child(4, "precision=fp16 precision.grad_clip_norm=10 trainer.resume=auto", "fp16"),
    ]  # a requeued job
    rows = report.collect(NS(children=lambda parent_id: runs), "parent", curves=False)
    assert [r.baseline.num for r in rows] == [1, 1, 1, 3, 3]


def test_report_without_an_fp32_baseline_says_so_instead_of_dividing(tmp_path: Path) -> None:
    rows = [
        _row(0, "fp16", val_acc=0.9, samples_per_s=100.0, peak_mem_mib=10.0, skipped_steps=2, loss_scale=512.0),
        _row(1, "bf16", val_acc=0.8, samples_per_s=120.0, peak_mem_mib=9.0, skipped_steps=0, loss_scale=1.0),
        _row(2, "fp32", status="FAILED"),
    ]
    notes = [n for n in report.notes_for(rows) if n.startswith("No finished fp32 job")]
    assert notes and notes[0].endswith("The fp32 job 2 is FAILED.")  # it said "Add precision=fp32 to the sweep"
    assert [n for n in report.notes_for(rows[:2]) if n.endswith("Add precision=fp32 to the sweep for a baseline.")]
    before = _row(3, "fp32?", status="FAILED")  # failed before it resolved its precision (collect's "fp32?")
    before.requested = "fp32"
    diverged = _row(4, "fp32", train_loss=float("nan"))
    for row, said in ((before, "The fp32 job 3 is FAILED."), (diverged, "The fp32 job 4 is DIVERGED.")):
        assert [n for n in report.notes_for([*rows[:2], row]) if n.endswith(said)], said
    cells = report.table_rows(rows)
    assert [c[5] for c in cells] == ["—", "—", "—"] and [c[7] for c in cells] == ["—", "—", "—"]
    assert cells[0][13] == "512" and cells[2][3] == "**FAILED**"


def test_input_bound_jobs_are_named_in_the_notes() -> None:
    rows = [
        _row(0, "fp32", val_acc=0.9, samples_per_s=100.0, peak_mem_mib=10.0, data_wait_frac=0.02),
        _row(1, "bf16", val_acc=0.9, samples_per_s=105.0, peak_mem_mib=9.0, data_wait_frac=0.6),
    ]
    rows[1].baseline = rows[0]
    assert [c[8] for c in report.table_rows(rows)] == ["2%", "60%"]
    starved = [n for n in report.notes_for(rows) if n.startswith("Input-bound")]
    assert len(starved) == 1 and "precision=bf16" in starved[0] and "precision=fp32" not in starved[0]


def test_cpu_half_precision_notes_come_from_measured_speed_and_underflow_is_explained() -> None:
    """A half precision is called slow on a CPU only when it measured slower than fp32 in the sweep: this project's
    AVX512-BF16 CPU runs bf16 faster than fp32, and a flag list said "emulated" of it."""
    rows = [
        _row(0, "fp32", val_acc=0.9, samples_per_s=100.0),
        _row(1, "bf16", val_acc=0.9, samples_per_s=180.0),
        _row(2, "fp16", val_acc=0.9, samples_per_s=20.0),
    ]
    for r in rows:
        r.requested = ""
    assert not [n for n in report.notes_for(rows) if n.startswith(("On this CPU", "fp16 grad underflow"))]
    for r in rows:
        r.mem_kind, r.metrics["numerics/underflow/1"] = "process_peak_rss", 1.0  # bf16: 100% "in fp16 terms"
    notes = report.notes_for(rows)
    assert [n for n in notes if n.startswith("On this CPU")] == [
        "On this CPU, fp16 ran at 0.20× fp32's throughput (measured in this sweep): the CPU has no fast path for "
        "that dtype, so its speed here says nothing of a GPU's; measure speed on the GPU you will train on."
    ]
    assert [n for n in notes if n.startswith("fp16 grad underflow of a job that is not fp16")]


def test_diverged_job_is_marked(tmp_path: Path) -> None:
    rows = [
        _row(0, "fp32", val_acc=0.9, train_loss=0.1, samples_per_s=1.0, peak_mem_mib=1.0),
        _row(1, "fp16", val_acc=0.1, train_loss=float("nan"), samples_per_s=2.0, peak_mem_mib=1.0),
    ]
    rows[1].baseline = rows[0]
    assert report.table_rows(rows)[1][3] == "**DIVERGED**"
    assert report.table_rows(rows)[1][7] == "2.00×"


def test_an_unwritable_sweep_dir_leaves_no_parent_running(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("not a directory")
    proc = run_cli_here("-m", "precision=fp32,bf16", f"hydra.sweep.dir={tmp_path}/a_file/sweep", *TINY, cwd=tmp_path)
    assert proc.returncode == 2 and "cannot create the sweep directory" in proc.stderr
    assert run_statuses(tmp_path / "outputs" / "mlflow.db") == []  # found before the parent run opened


def test_a_failing_job_is_marked_and_the_others_finish(tmp_path: Path) -> None:
    proc = run_cli_here("-m", "optimizer.lr=-1,1e-3", "precision=fp32,bf16", *TINY, cwd=tmp_path)
    assert proc.returncode != 0  # the sweep says it had a failure...
    # ...in one line naming the first failed job, not a traceback
    assert "mprun: error: optimizer.lr=-1.0 must be > 0 (job 0: optimizer.lr=-1,precision=fp32)" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    parent, children = sweep_runs(tmp_path)  # ...after every other job ran
    status = {c.info.run_name: c.info.status for c in children}
    assert status == {
        "lr=-1 fp32": "FAILED",
        "lr=-1 bf16": "FAILED",
        "lr=0.001 fp32": "FINISHED",
        "lr=0.001 bf16": "FINISHED",
    }
    failed = [c for c in children if c.info.status == "FAILED"]
    assert all("optimizer.lr=-1.0 must be > 0" in c.data.tags["error"] for c in failed)
    assert parent.info.status == "FAILED" and "error" not in parent.data.tags  # the failed jobs say why
    md = (Path(parent.data.tags["mprun.sweep_dir"]) / "report" / "report.md").read_text()
    assert md.count("**FAILED**") == 2 and "## Failed jobs" in md
    table = proc.stdout[proc.stdout.index("mprun sweep report") :]
    assert "**" not in table  # markdown's bold is for report.md, not a terminal
    assert "2 of the 4 jobs that started did not finish cleanly" in table
    failed_lines = [line for line in proc.stdout.splitlines() if line.startswith("failed      job ")]
    assert len(failed_lines) == 2 and all("optimizer.lr=-1.0 must be > 0" in line for line in failed_lines)


def test_a_sweep_value_hydra_rejects_closes_the_parent_failed(tmp_path: Path) -> None:
    """Hydra checks each job's overrides after the parent run is open; it used to be closed FINISHED with 0 jobs."""
    proc = run_cli_here("-m", "precision=fp32,fp17", *TINY, cwd=tmp_path)
    assert proc.returncode != 0 and "fp17" in proc.stderr
    parent, children = sweep_runs(tmp_path)
    assert parent.info.status == "FAILED" and "ended before its jobs ran" in parent.data.tags["error"]
    # no empty report ("No jobs recorded") after Hydra's error, as if it were the outcome
    assert "mprun sweep report" not in proc.stdout and not list(tmp_path.glob("outputs/multirun/*/*/report"))


def test_a_requeued_sweep_continues_its_parent_and_leaves_finished_jobs_alone(tmp_path: Path) -> None:
    """The same sweep launched again into its directory with trainer.resume=auto (a requeue): one parent run, the
    finished jobs untouched (no second set of children, no NaN results), the report still lists every job."""
    args = ["-m", "precision=fp32,bf16", "hydra.sweep.dir=outputs/sw", "trainer.resume=auto", *TINY]
    assert run_cli_here(*args, cwd=tmp_path).returncode == 0
    first_parent, first_children = sweep_runs(tmp_path)
    again = run_cli_here(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("mprun: nothing to train") == 2
    parent, children = sweep_runs(tmp_path)  # asserts a single parent
    assert parent.info.run_id == first_parent.info.run_id and parent.info.status == "FINISHED"
    assert [c.info.run_id for c in children] == [c.info.run_id for c in first_children]
    assert [c.data.metrics["final/val_acc"] for c in children] == [
        c.data.metrics["final/val_acc"] for c in first_children
    ]
    assert (tmp_path / "outputs" / "sw" / "report" / "report.md").read_text().count("| ok |") == 2


def test_a_requeued_sweep_closes_the_runs_its_killed_launch_left_running(tmp_path: Path, mlflow_client) -> None:
    """A job killed with kill -9 before its first checkpoint leaves its run RUNNING; the requeue runs the job anew.
    The stale run used to stay RUNNING for good, and the report listed the job twice and closed the parent FAILED."""
    import shutil

    args = ["-m", "precision=fp32,bf16", "hydra.sweep.dir=outputs/sw", "trainer.resume=auto", *TINY]
    assert run_cli_here(*args, cwd=tmp_path).returncode == 0
    _, (killed, _) = sweep_runs(tmp_path)
    client = mlflow_client
    client.update_run(killed.info.run_id, status="RUNNING")  # as kill -9 leaves it...
    shutil.rmtree(tmp_path / "outputs" / "sw" / "0" / "checkpoints")  # ...before any checkpoint
    again = run_cli_here(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    parent, children = sweep_runs(tmp_path)
    stale = client.get_run(killed.info.run_id)
    assert stale.info.status == "KILLED" and "requeued sweep" in stale.data.tags["mprun.closed_by"]
    assert parent.info.status == "FINISHED" and "RUNNING" not in run_statuses(tmp_path / "outputs" / "mlflow.db")
    assert (tmp_path / "outputs" / "sw" / "report" / "report.md").read_text().count("| ok |") == 2  # one row a job


def signal_sweep(cwd: Path, args: list[str], when: str, sig: int, inherit_ignored: bool = False) -> tuple[int, str]:
    """Start `python -m mprun -m ARGS`, send `sig` once a line containing `when` appears: (exit code, output).
    inherit_ignored: start it with `sig` ignored, as a shell script's `cmd &` starts a job with SIGINT."""
    ignore = (lambda: signal.signal(sig, signal.SIG_IGN)) if inherit_ignored else None
    proc = subprocess.Popen(
        [sys.executable, "-m", "mprun", "-m", *args, "trainer.progress=log"],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=ignore,
    )
    try:
        for line in proc.stdout:
            if when in line:
                break
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, out


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig,inherit_ignored", [(signal.SIGTERM, False), (signal.SIGINT, True)], ids=["SIGTERM", "SIGINT-inherited-ignored"]
)
def test_a_signal_between_jobs_closes_the_parent_killed(tmp_path: Path, sig: int, inherit_ignored: bool) -> None:
    """A signal outside a job's training (here while the second job is being set up: Hydra announces it, then mprun
    imports timm for the sweep's first timm model, ~5 s, and builds) unwinds as an interrupt. SIGTERM used to end the
    process at once with the parent RUNNING (later: exit 143 without a word); a SIGINT that a script's `mprun &`
    started ignored went unheard until training installed its handlers, so set-up ran on."""
    code, out = signal_sweep(
        tmp_path,
        [
            "model=simple_mlp,resnet18",
            "trainer.max_epochs=1",
            "trainer.max_steps=4",
            "dataset=synthetic",
            "dataset.shape=[3,16,16]",
            "dataset.num_samples=16",
        ],
        "#1 : model=resnet18",
        sig,
        inherit_ignored,
    )
    assert code == 128 + sig, out[-2000:]
    assert out.rstrip().endswith(f"mprun: interrupted ({signal.Signals(sig).name})"), out[-2000:]
    parent, children = sweep_runs(tmp_path)
    assert parent.info.status == "KILLED"
    assert "RUNNING" not in run_statuses(tmp_path / "outputs" / "mlflow.db")


def test_a_signal_while_the_report_is_built_closes_the_parent_killed(monkeypatch, tmp_path: Path) -> None:
    """The report is built after the last job (on_multirun_end); a Ctrl-C there closed the parent FAILED."""
    from types import SimpleNamespace as NS

    from mprun import sweep

    ended = []
    parent = object.__new__(sweep.Sweep)
    parent.sweep_dir = tmp_path
    parent.tracker = NS(store=None, run_id="parent", end=ended.append)
    parent.cfg = NS(report=NS(tolerance_pp=0.0))

    def write(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "collect", lambda *args, **kwargs: [_row(0, "fp32")])
    monkeypatch.setattr(report, "write", write)
    with pytest.raises(KeyboardInterrupt):
        parent.close(interrupted=False)
    assert ended == ["KILLED"]


@pytest.mark.slow
def test_ctrl_c_ends_the_sweep_with_parent_and_job_killed(tmp_path: Path) -> None:
    code, out = signal_sweep(
        tmp_path, ["precision=fp32,bf16", "model=simple_mlp", "trainer.max_epochs=100000"], "epoch 1/", signal.SIGINT
    )
    assert code == 130, out[-2000:]
    parent, children = sweep_runs(tmp_path)
    assert parent.info.status == "KILLED"
    assert [c.info.status for c in children] == ["KILLED"]  # the second job never started
    assert "The sweep was interrupted: jobs it had not started are not listed" in out
    assert "1 of the 1 job that started did not finish cleanly" in out and "**KILLED**" not in out  # "1 of 1 jobs"
    # The stopped job's summary says how to continue: the sweep, not `trainer.resume=<job dir>`, which would resume
    # every job of the sweep from this one's checkpoint.
    assert (
        f"to continue, launch the sweep again into its directory: the same command with "
        f"hydra.sweep.dir={parent.data.tags['mprun.sweep_dir']} trainer.resume=auto"
    ) in out


@pytest.mark.slow
def test_submitit_local_launcher_runs_the_sweep(tmp_path: Path) -> None:
    proc = run_cli("-m", "hydra/launcher=submitit_local", "precision=fp32,bf16", *TINY, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parent, children = sweep_runs(tmp_path)
    assert parent.info.status == "FINISHED"
    assert [c.info.status for c in children] == ["FINISHED", "FINISHED"]


def test_slurm_preset_composes_onto_submitit(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            PRIMARY, overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.gpus_per_node == 1 and launcher.partition == "gpu" and launcher.tasks_per_node == 1


NO_SLURM = (
    "hydra/launcher=slurm submits the jobs to SLURM, and sbatch and srun are not on this machine's PATH: launch the "
    "sweep where SLURM is (a login node), or try it here first with hydra/launcher=submitit_local (the same jobs, as "
    "local processes)"
)


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        (
            "hydra/launcher=joblib hydra.launcher.n_jobs=0",
            "hydra.launcher.n_jobs=0 must be a number of parallel jobs: N > 0, or -1 for one per CPU (-2 all but one, "
            "...)",
        ),
        (
            "hydra/launcher=submitit_local hydra.launcher.timeout_min=-5",
            "hydra.launcher.timeout_min=-5 must be > 0 (minutes)",
        ),
        (
            "hydra/launcher=slurm_multigpu hydra.launcher.tasks_per_node=0",
            "hydra.launcher.tasks_per_node=0 must be >= 1",
        ),
        ("hydra/launcher=slurm", NO_SLURM),
        ("experiment=lr_search hydra.sweeper.n_trials=0", "hydra.sweeper.n_trials=0 must be >= 1"),
        (
            "hydra.sweeper.max_batch_size=0",
            "hydra.sweeper.max_batch_size=0 must be >= 1 (jobs per batch), or null for all at once",
        ),
        ("optimizer.lr=range(0,1,0)", "optimizer.lr=range(0,1,0): range() arg 3 must not be zero"),
        ("optimizer.lr=range(1,0)", "optimizer.lr=range(1,0) gives no values: the sweep would run no job"),
    ],
    ids=[
        "joblib-n_jobs",
        "submitit-timeout",
        "slurm-tasks",
        "slurm-missing",
        "optuna-n_trials",
        "max_batch_size",
        "range-step-0",
        "range-empty",
    ],
)
def test_launcher_settings_that_cannot_start_the_jobs_are_one_line_before_anything_is_made(
    tmp_path: Path, settings: str, says: str
) -> None:
    """joblib's n_jobs=0, a SLURM launcher without SLURM, Optuna's n_trials=0, a zero batch size or range step ended
    in tracebacks after the sweep's directory and its parent run (closed FAILED) were made; a negative submitit
    timeout in jobs that never produced a result; an empty range in a parent run of no jobs, exit 0."""
    (tmp_path / "bin").mkdir()
    ended = run_cli_here(
        "-m", "precision=fp32,bf16", *settings.split(), *TINY, cwd=tmp_path, env={"PATH": str(tmp_path / "bin")}
    )
    assert ended.returncode == 2 and ended.stderr.strip().splitlines() == [f"mprun: error: {says}"], ended.stderr
    assert not (tmp_path / "outputs").exists()


def test_what_can_start_is_let_through_and_a_presets_lists_are_checked_too() -> None:
    """glob() sweeps (expanded by Hydra's config loader, which the check has not) start; mem_gb=0 is SLURM's 'all
    of the node's memory'; a preset's lists in hydra.sweeper.params are checked like the command line's."""
    from omegaconf import open_dict

    from mprun.sweep import launch_problem

    def problem(*overrides: str, sweep: str = "", params: dict | None = None) -> str:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(PRIMARY, overrides=list(overrides), return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.sweeper.params = {**(cfg.hydra.sweeper.params or {}), **(params or {})}
            cfg.hydra.overrides.task = [*overrides, *filter(None, [sweep])]  # as a multirun's command line
        return launch_problem(cfg)

    assert problem(sweep="precision=glob(fp*)") == ""
    assert problem("experiment=lr_sweep", params={"optimizer.lr": "choice()"}).startswith(
        "Error parsing override 'optimizer.lr=choice()'; ValueError while evaluating 'choice()': empty choice"
    )
    assert problem("hydra/launcher=submitit_local", "hydra.launcher.mem_gb=0") == ""
    assert problem("experiment=lr_sweep") == ""
    empty = problem("experiment=lr_sweep", params={"optimizer.lr": "range(1,0)"})
    assert empty == "optimizer.lr=range(1,0) gives no values: the sweep would run no job"


def test_a_slurm_launcher_is_let_through_where_slurm_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mprun.sweep import launch_problem

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(PRIMARY, overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    monkeypatch.setenv("PATH", str(tmp_path))
    for name in ("sbatch", "srun"):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    assert launch_problem(cfg) == ""
    (tmp_path / "srun").unlink()
    assert "and srun is not on this machine's PATH" in launch_problem(cfg)


PRESETS = {
    # Run names are short (a group's option alone, a value by its last key); the full overrides are a tag.
    "amp_benchmark": [f"{p} seed={s}" for p in ("fp32", "fp16", "bf16") for s in (1, 2, 3)],
    "lm_precision": [f"{p} seed={s}" for p in ("fp32", "fp16", "bf16") for s in (1, 2, 3)],
    "fp16_overflow": [f"{p} fp32_modules={m}" for p in ("fp32", "fp16", "bf16") for m in ("[]", "[h.1.mlp]")],
    "loss_scaling": ["fp16", "fp16_static", "fp16_unscaled", "bf16"],
    "lr_sweep": [f"lr={lr}" for lr in ("0.0001", "0.0003", "0.001", "0.003", "0.01")],
    "lr_search": None,  # Optuna picks the values
}


@pytest.mark.parametrize(
    "preset",
    [
        pytest.param(p, marks=pytest.mark.slow) if p in ("lr_sweep", "lm_precision", "fp16_overflow") else p
        for p in PRESETS
    ],
)
def test_every_experiment_preset_runs(tmp_path: Path, preset: str) -> None:
    shrink = ["trainer.max_epochs=1", "trainer.max_steps=2"]
    # amp_benchmark's resnet18 under CPU-emulated bf16 takes ~16 s per step here: shrink the model too.
    extra = {
        "lr_search": ["hydra.sweeper.n_trials=2"],
        "amp_benchmark": ["model=simple_mlp"],
        "lm_precision": ["model.n_layer=1", "dataset.val_windows=32"],
        "fp16_overflow": ["model.n_layer=2", "dataset.val_windows=32"],
    }.get(preset, [])
    proc = run_cli_here("-m", f"experiment={preset}", *shrink, *extra, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parent, children = sweep_runs(tmp_path)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["mprun.preset"] == preset
    names = [c.info.run_name for c in children]
    if PRESETS[preset] is not None:
        assert names == PRESETS[preset]
    else:
        assert len(names) == 2 and all(n.startswith("lr=") for n in names)
    assert all(c.info.status == "FINISHED" for c in children)


def _seeded(precision: str, accs: list[float], speed: float, option: str | None = None, **context: str) -> list:
    """Made-up finished jobs of one precision, one per seed."""
    rows = []
    for seed, acc in enumerate(accs, 1):
        row = _row(seed, precision, val_acc=acc, train_loss=0.1, samples_per_s=speed * (1 + seed / 100))
        row.requested = option or precision
        row.others = tuple(sorted([f"trainer.seed={seed}", *(f"{k}={v}" for k, v in context.items())]))
        row.metrics["final/peak_mem_mib"] = 100.0
        rows.append(row)
    return rows


def test_verdicts_on_made_up_numbers() -> None:
    """Identical groups are within noise; a clear shift is worse (or better); one seed a side gets no interval and
    says so; two seeds say their interval is rough; a tolerance admits a small loss."""
    from mprun.report import groups

    fp32 = [0.9916, 0.9944, 0.9916]

    def verdict_of(accs: list[float], tolerance: float = 0.0) -> str:
        made = groups.group(_seeded("fp32", fp32, 100.0) + _seeded("bf16", accs, 140.0), tolerance)
        return made[1].verdict

    assert verdict_of(fp32) == "within noise"
    assert verdict_of([0.9800, 0.9810, 0.9790]) == "worse"
    assert verdict_of([0.9990, 0.9995, 0.9992]) == "better"
    assert verdict_of([0.9800, 0.9810, 0.9790], tolerance=2.0) == "worse, within the 2 pp tolerance"
    assert verdict_of([0.99]) == "one seed: cannot tell noise from effect"
    assert verdict_of([0.9916, 0.9944]) == "within noise (only 2 seeds: a rough interval)"


def test_the_welch_interval_is_scipys() -> None:
    """The interval is Welch's t interval as scipy computes it from the raw values."""
    from scipy import stats

    from mprun.report.groups import welch

    a, b = [0.91, 0.93, 0.92, 0.95], [0.90, 0.94, 0.89]
    delta = welch(a, b)
    expected = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert delta.low == pytest.approx(expected.low) and delta.high == pytest.approx(expected.high)
    assert welch([0.5, 0.5], [0.5, 0.5]).half == 0.0 and welch([0.5], [0.4, 0.6]).half is None


def test_the_recommendation_is_the_fastest_precision_that_held() -> None:
    from mprun import report
    from mprun.report import groups

    fp32 = _seeded("fp32", [0.9916, 0.9944, 0.9916], 100.0)
    bf16 = _seeded("bf16", [0.9944, 0.9930, 0.9944], 140.0)
    fp16 = _seeded("fp16", [0.9500, 0.9510, 0.9490], 180.0)  # fastest, but it lost accuracy
    made = groups.group(fp32 + bf16 + fp16)
    [line] = groups.recommendation(made)
    assert line.startswith("pick bf16: 1.40× fp32's throughput, 1.00× memory, Δacc +0.14 ± ") and line.endswith(
        " pp (within noise, 3 seeds)"
    )
    [line] = groups.recommendation(groups.group(fp32 + fp16))
    assert line.startswith("keep fp32: fp16 is worse (Δacc −4.25 ± ")
    [line] = groups.recommendation(groups.group(fp32[:1] + bf16[:1]))
    assert line == "keep fp32: bf16 has one seed: sweep trainer.seed=1,2,3 to tell noise from effect"
    # A failed seed is left out of its group's figures, and its row says which job it was.
    failed = _row(9, "bf16?", status="FAILED")
    failed.requested, failed.others = "bf16", ("trainer.seed=4",)
    made = groups.group(fp32 + bf16 + [failed])
    assert len(made) == 2 and len(made[1].used) == 3
    cells = report.group_rows(made)
    assert cells[1][:2] == ["bf16", "3 (left out: job 9 FAILED)"]
    assert cells[0][2] == "0.9925 ± 0.0016" and cells[0][4] == "baseline"
    assert cells[1][5:7] == ["143 (141–144)", "1.40×"]
    assert groups.tags(made) == {
        "verdict/fp32": made[0].summary(),
        "verdict/bf16": made[1].summary(),
    } and made[1].summary().startswith("within noise: Δacc +0.14 ± ")


def test_settings_other_than_the_seed_get_their_own_groups_and_lines() -> None:
    from mprun.report import groups

    rows = []
    for lr, speed in (("0.001", 150.0), ("0.01", 120.0)):
        rows += _seeded("fp32", [0.99, 0.98, 0.99], 100.0, **{"optimizer.lr": lr})
        rows += _seeded("bf16", [0.99, 0.98, 0.99], speed, **{"optimizer.lr": lr})
    made = groups.group(rows)
    assert [(g.label, g.context) for g in made] == [
        ("fp32", ("optimizer.lr=0.001",)),
        ("bf16", ("optimizer.lr=0.001",)),
        ("fp32", ("optimizer.lr=0.01",)),
        ("bf16", ("optimizer.lr=0.01",)),
    ]
    assert [line.split(": pick")[0] for line in groups.recommendation(made)] == [
        "optimizer.lr=0.001",
        "optimizer.lr=0.01",
    ]
    assert "verdict/bf16/optimizer.lr_0.01" in groups.tags(made)


def test_a_grid_names_each_precisions_best_setting_and_whether_it_is_clear_of_the_next(tmp_path: Path) -> None:
    """An LR grid asks which LR is best, and (experiment=lr_sweep) whether that moves with the precision: each
    precision's best setting, on the mean over its seeds, with the next one and whether the best is clear of it."""
    from mprun.report import groups

    rows = []
    for lr, fp32, bf16 in (("0.001", 0.90, 0.97), ("0.01", 0.99, 0.96), ("0.1", 0.95, 0.80)):
        rows += _seeded("fp32", [fp32, fp32 - 0.002, fp32 + 0.002], 100.0, **{"optimizer.lr": lr})
        rows += _seeded("bf16", [bf16, bf16 - 0.02, bf16 + 0.02], 150.0, **{"optimizer.lr": lr})
    made = groups.group(rows)
    assert groups.best_settings(made) == [
        "fp32: optimizer.lr=0.01, val acc 0.9900 ± 0.0020 (next: optimizer.lr=0.1, 0.9500 ± 0.0020; clear of it)",
        "bf16: optimizer.lr=0.001, val acc 0.9700 ± 0.0200 (next: optimizer.lr=0.01, 0.9600 ± 0.0200; within noise "
        "of it)",
    ]
    assert len(groups.recommendation(made)) == 3  # the precision comparison stays one line per setting
    built = report.Report("p", rows, tmp_path, [], made)
    assert [line for line in built.console().splitlines() if line.startswith("best")] == [
        f"best        {line}" for line in groups.best_settings(made)
    ]
    assert built.tags()["mprun.best_setting"] == " | ".join(groups.best_settings(made))
    assert "- bf16: optimizer.lr=0.001, val acc 0.9700" in built.markdown([])
    # A language model's best is the fewest bits; one seed a side cannot tell the best from the next.
    lm = [row for lr in ("0.001", "0.01") for row in _seeded("fp32", [0.5], 100.0, **{"optimizer.lr": lr})]
    for row, bpb in zip(lm, (3.1, 2.9)):
        row.headline, row.metrics["final/val_bpb"] = "val_bpb", bpb
    assert groups.best_settings(groups.group(lm)) == [
        "fp32: optimizer.lr=0.01, val bpb 2.9000 (next: optimizer.lr=0.001, 3.1000; one seed: cannot tell noise from "
        "effect)"
    ]
    tie = [row for lr in ("0.003", "0.01") for row in _seeded("bf16", [0.9916], 100.0, **{"optimizer.lr": lr})]
    assert groups.best_settings(groups.group(tie))[0].endswith("(next: optimizer.lr=0.01, 0.9916; tied)")
    # A job that overrode nothing of what the others did ran the defaults.
    partly = _seeded("fp32", [0.9], 100.0) + _seeded("fp32", [0.95], 100.0, **{"optimizer.lr": "0.01"})
    assert "(next: the defaults, 0.9000; " in groups.best_settings(groups.group(partly))[0]
    # A sweep over tasks ranks each task's settings on its own metric (it crashed on the missing one).
    mixed = [row for lr in ("0.001", "0.01") for row in _seeded("fp32", [0.9], 100.0, **{"optimizer.lr": lr})]
    for row in lm:
        row.others = (*row.others, "dataset=pycode")
    assert [line.split(",")[1].split()[:2] for line in groups.best_settings(groups.group(mixed + lm))] == [
        ["val", "acc"],
        ["val", "bpb"],
    ]
    # fp32 with and without precision.fp32_modules is the same training: no fp32 line from it.
    modules = []
    for setting in ("[]", "[h.1.mlp]"):
        for precision, acc in (("fp32", 0.9), ("fp16", 0.9 if setting == "[]" else 0.95)):
            for r in _seeded(precision, [acc], 100.0):
                r.setting, r.others = (f"precision.fp32_modules={setting}", r.others[0]), (r.others[0],)
                modules.append(r)
    assert [line.split(":")[0] for line in groups.best_settings(groups.group(modules))] == ["fp16"]
    # One setting per precision: no grid, no line; the tags and the report say nothing of it.
    plain = groups.group(_seeded("fp32", [0.99, 0.98], 100.0) + _seeded("bf16", [0.99, 0.98], 150.0))
    assert groups.best_settings(plain) == []
    assert "mprun.best_setting" not in report.Report("p", [], tmp_path, [], plain).tags()


def test_the_console_table_leaves_out_columns_no_job_has_a_value_in(tmp_path: Path) -> None:
    """An LR grid in bf16 printed Δ acc, speedup and mem ratio columns of dashes (no fp32 job), and every sweep
    without fp16 its two fp16 columns; report.md keeps them all."""
    from mprun.report import groups

    rows = [row for lr in ("0.001", "0.01") for row in _seeded("bf16", [0.9], 100.0, **{"optimizer.lr": lr})]
    built = report.Report("p", rows, tmp_path, [], groups.group(rows))
    header = built.console().splitlines()[2].split("  ")
    assert [c.strip() for c in header if c.strip()] == [
        "job",
        "run",
        "precision",
        "status",
        "val acc",
        "samples/s",
        "peak MiB",
    ]  # these made-up jobs record no param+state MiB or skipped steps either
    assert "| Δ acc vs fp32 |" in built.markdown([]) and "| fp16 grad underflow |" in built.markdown([])
    fp16 = _row(9, "fp16", val_acc=0.9, samples_per_s=90.0, loss_scale=1024.0)
    built = report.Report("p", [*rows, fp16], tmp_path, [], groups.group([*rows, fp16]))
    assert "final scale" in built.console().splitlines()[2]


def test_a_sweep_without_a_precision_to_compare_says_so_once() -> None:
    """An LR grid at one precision said 'no recommendation' (or 'keep fp32: nothing else was run') once per LR; a
    grid whose settings all say the same says it once."""
    from mprun.report import groups

    def grid(*precisions: str) -> list:
        rows = []
        for precision in precisions:
            for lr in ("0.001", "0.01", "0.1"):
                rows += _seeded(precision, [0.9], 100.0, **{"optimizer.lr": lr})
        return rows

    for precision in ("bf16", "fp32"):
        assert groups.recommendation(groups.group(grid(precision))) == [
            f"no precision to recommend: every job ran {precision}; sweep precision=fp32,bf16 (say) to compare"
        ]
    assert groups.recommendation(groups.group(grid("bf16", "fp16"))) == [
        "all 3 settings: no recommendation: no finished fp32 job to compare with (add precision=fp32)"
    ]
    assert groups.recommendation(groups.group(grid("fp32", "bf16"))) == [
        "all 3 settings: keep fp32: bf16 has one seed: sweep trainer.seed=1,2,3 to tell noise from effect"
    ]


def test_a_seeded_sweep_reports_one_row_per_precision_and_a_recommendation(tmp_path: Path) -> None:
    """precision=fp32,bf16 x trainer.seed=1,2,3: the console's table is by precision with n = 3, and the parent run
    carries the recommendation and a verdict per precision."""
    proc = run_cli_here("-m", "precision=fp32,bf16", "trainer.seed=1,2,3", *TINY, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parent, children = sweep_runs(tmp_path)
    assert len(children) == 6
    table = proc.stdout[proc.stdout.index("mprun sweep report") :]
    header, fp32, bf16 = table.splitlines()[1:4]
    assert header.split()[:2] == ["precision", "seeds"]
    assert fp32.split()[:2] == ["fp32", "3"] and "baseline" in fp32
    assert bf16.split()[:2] == ["bf16", "3"] and " pp " in bf16
    recommended = [line for line in table.splitlines() if line.startswith("recommend")]
    assert len(recommended) == 1 and recommended[0].split()[1] in ("pick", "keep")
    tags = parent.data.tags
    assert tags["mprun.recommendation"] == recommended[0].split(None, 1)[1]
    assert tags["verdict/bf16"].endswith(", 3 seeds") and tags["verdict/fp32"].startswith("baseline: val acc ")
    md = (Path(tags["mprun.sweep_dir"]) / "report" / "report.md").read_text()
    assert "## By precision (seeds together)" in md and "## By job" in md and "Welch t interval" in md
    # Each job says one line on the console (its 13-line summary block goes to its log), the report the rest.
    jobs = [line for line in proc.stdout.splitlines() if line.startswith("job ")]
    assert [line.split(":")[0] for line in jobs] == [
        f"job {n} {p} seed={s}" for n, (p, s) in enumerate((p, s) for p in ("fp32", "bf16") for s in (1, 2, 3))
    ]
    assert "── mprun summary" not in proc.stdout
    assert "── mprun summary" in (Path(tags["mprun.sweep_dir"]) / "0" / "mprun.log").read_text()


def test_a_language_model_group_is_judged_on_bits_per_byte_where_lower_is_better() -> None:
    """A run's mprun.headline tag says what its task is judged on: val_bpb, lower better, in bits."""
    from mprun.report import groups

    def lm(precision: str, bpbs: list[float], speed: float) -> list:
        rows = _seeded(precision, [0.5] * len(bpbs), speed)
        for row, bpb in zip(rows, bpbs):
            row.headline, row.metrics["final/val_bpb"] = "val_bpb", bpb
        return rows

    fp32 = lm("fp32", [3.40, 3.42, 3.41], 100.0)
    made = groups.group(fp32 + lm("bf16", [3.30, 3.31, 3.29], 150.0) + lm("fp16", [3.60, 3.61, 3.62], 160.0))
    assert [g.verdict for g in made] == ["baseline", "better", "worse"]  # fewer bits is better
    # A job that failed before its task was known has no mprun.headline tag: its group still goes by bits.
    early = _row(9, "bf16?", status="FAILED")
    early.requested, early.others = "bf16", ("trainer.seed=4",)
    made = groups.group([*fp32, early, *lm("bf16", [3.30, 3.31, 3.29], 150.0)])
    assert made[1].headline.name == "val_bpb" and made[1].verdict == "better"
    assert made[1].delta_text().startswith("−0.110 ± ") and made[1].delta_text().endswith(" bits")
    [line] = groups.recommendation(made)
    assert line.startswith("pick bf16: 1.50× fp32's throughput, 1.00× memory, Δbpb −0.110 ± ")
    from mprun import report

    assert report.group_columns(made)[2:4] == ["val bpb (mean ± sd)", "Δ bpb vs fp32 (95% CI)"]


def test_the_job_table_shows_the_tasks_headline_metric_and_throughput_unit() -> None:
    """A language-model sweep's job table showed val acc (next-token accuracy) and its Δ in pp, while its group table
    and verdicts go by val bpb; and samples/s (sequences), where its users count tokens/s."""
    from mprun.report import groups

    for headline, values, tokens, shown in (
        ("val_acc", (0.9916, 0.9944), None, ["val acc", "Δ acc vs fp32", "samples/s", "0.9944", "+0.28 pp", "150"]),
        ("val_bpb", (3.41, 3.30), 64, ["val bpb", "Δ bpb vs fp32", "tokens/s", "3.3000", "-0.110 bits", "9,600"]),
    ):
        rows = [_row(0, "fp32", samples_per_s=100.0), _row(1, "bf16", samples_per_s=150.0)]
        for row, value in zip(rows, values):
            row.headline, row.metrics[f"final/{headline}"] = headline, value
            if tokens:
                row.metrics["final/tokens_per_s"] = tokens * row.metrics["final/samples_per_s"]
        rows[1].baseline = rows[0]
        assert report.columns(rows)[4:7] + report.table_rows(rows)[1][4:7] == shown
        assert report.table_rows(rows)[1][7] == "1.50×"  # the same speedup either way
        assert report.group_columns(groups.group(rows))[5] == f"{shown[2]} (median, min–max)"
        assert "MFU" not in report.columns(rows) + report.group_columns(groups.group(rows))
        rows[1].metrics[f"final/{headline}"] = float("nan")  # a diverged job: no Δ to show
        assert report.table_rows(rows)[1][4:6] == ["—", "—"]
    # A language model on a GPU measures its MFU: a column after the speedup, in both tables.
    for row, mfu in zip(rows, (0.31, 0.42)):
        row.metrics["final/mfu"] = mfu
    assert report.columns(rows)[7:9] == ["speedup", "MFU"] and report.table_rows(rows)[1][7:9] == ["1.50×", "42.0%"]
    made = groups.group(rows)
    assert report.group_columns(made)[6:8] == ["speedup", "MFU"] and report.group_rows(made)[1][6:8] == [
        "1.50×",
        "42.0%",
    ]


def test_precision_settings_that_change_nothing_in_fp32_split_groups_but_share_the_fp32_baseline() -> None:
    """precision.fp32_modules changes fp16 and bf16 runs, not fp32: fp16 with and without it are two groups, each
    judged against fp32 (they were one 'two-seed' group); an fp32 job with it is never the pick."""
    from mprun.report import groups

    rows = []
    for modules in ("[]", "[h.1.mlp]"):
        for precision, speed in (("fp32", 100.0), ("fp16", 150.0)):
            made = _seeded(precision, [0.99, 0.98, 0.99], speed if modules == "[]" else speed * 1.1)
            for r in made:
                r.setting = (f"precision.fp32_modules={modules}", r.others[0])  # the seed; others keep neither
                r.others = (r.others[0],)
            rows += made
    made = groups.group(rows)
    assert [(g.label, g.own, len(g.rows)) for g in made] == [
        ("fp32", ("precision.fp32_modules=[]",), 3),
        ("fp16", ("precision.fp32_modules=[]",), 3),
        ("fp32", ("precision.fp32_modules=[h.1.mlp]",), 3),
        ("fp16", ("precision.fp32_modules=[h.1.mlp]",), 3),
    ]
    assert {id(g.baseline) for g in made} == {id(made[0])}
    [line] = groups.recommendation(made)
    assert line.startswith("pick fp16 precision.fp32_modules=[h.1.mlp]: 1.65× fp32's throughput")


def test_a_jobs_run_name_is_short_and_its_overrides_stay_whole_in_a_tag() -> None:
    """MLflow's runs list cut 'precision=fp16,optimizer.lr=0.01' off; 'fp16 lr=0.01' says the same."""
    from mprun.sweep import JobInfo, short_name

    assert short_name(["precision=fp16", "optimizer.lr=0.01"]) == "fp16 lr=0.01"
    assert short_name(["model=resnet18", "+trainer.seed=3"]) == "resnet18 seed=3"
    # Two keys that end alike keep their whole keys, so the name still tells them apart.
    assert short_name(["optimizer.lr=0.1", "scheduler.lr=0.2"]) == "optimizer.lr=0.1 scheduler.lr=0.2"
    job = JobInfo(Path("/s"), 3, ("precision=fp16", "optimizer.lr=0.01", "trainer.max_epochs=1"),
                  {"varied": ["precision", "optimizer.lr"]})  # fmt: skip
    assert job.name == "fp16 lr=0.01" and job.varied == ["precision=fp16", "optimizer.lr=0.01"]
    assert job.tags()["mprun.overrides"] == "precision=fp16 optimizer.lr=0.01 trainer.max_epochs=1"

"""`python -m mprun` / `mprun`: Hydra composes conf/, then one experiment runs per job."""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # wall time in the summary counts from here: imports included

import atexit  # noqa: E402
import gc  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.errors import CompactHydraException, ConfigCompositionException, OverrideParseException  # noqa: E402
from hydra.experimental.callback import Callback  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from mprun import config, configdirs, sweep  # noqa: E402
from mprun.errors import ConfigError, MprunError, NumericsError, UserCodeError  # noqa: E402
from mprun.tracking.source import remember_command  # noqa: E402

log = logging.getLogger("mprun")
config.register()
# Python's shutdown collects garbage over every object still alive: with torch and MLflow imported, 1.4-1.7 s of
# CPU in each mprun process (a launcher, each sweep worker, each torchrun rank), for nothing, since the process is
# ending. Freezing them first (at exit, so no run's garbage is kept) skips it: docs/benchmarks.md, "Process exit".
atexit.register(gc.freeze)
# Absolute, so Hydra reads it as a directory: under `python -m` a relative path is taken as a module.
CONFIG_DIR = str(configdirs.SHIPPED)
PRIMARY = configdirs.PRIMARY
LOG_FILE = "mprun.log"  # Hydra's job log in the run directory (hydra.job.name=mprun)


class JobFailed(CompactHydraException):
    """A sweep job's failure that mprun has explained. Hydra still marks the job failed, runs the other jobs and
    ends the multirun with exit code 1, but prints this message where it would print a traceback."""


def _creatable(path: Path) -> str:
    """Why `path` cannot be created as a directory ("" if it can): its nearest existing ancestor must be a writable
    directory."""
    path = path.absolute()
    if path.is_dir():
        return "" if os.access(path, os.W_OK) else f"{path} is not writable"
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is not a directory"
            return "" if os.access(parent, os.W_OK | os.X_OK) else f"{parent} is not writable"
    return ""


class StartCheck(Callback):
    """Hydra callback (conf/mprun.yaml: hydra.callbacks.mprun_start_check): what would fail once a run or sweep
    started, checked before Hydra creates its directory (before mprun's task runs, before a sweep's parent run): the
    directory can be created (Hydra's OSError came out as a traceback), and a sweep's launcher and sweeper can start
    its jobs (joblib's, submitit's, Optuna's and Hydra's own errors did). Hydra turns an exception from a callback
    into a warning and goes on, so a problem ends the process here: one line, exit 2."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._stop_if(_directory_problem(config.hydra.run.dir, "run"))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._stop_if(_directory_problem(config.hydra.sweep.dir, "sweep") or sweep.launch_problem(config))

    @staticmethod
    def _stop_if(problem: str) -> None:
        if problem:
            print(f"mprun: error: {problem}", file=sys.stderr, flush=True)
            raise StartRefused(problem)


class StartRefused(SystemExit):
    """StartCheck's refusal: exit 2 on the command line (Hydra turns a callback's Exception into a warning, a
    SystemExit it lets through); mprun.run raises it as a ConfigError."""

    def __init__(self, problem: str) -> None:
        super().__init__(2)
        self.problem = problem


def _directory_problem(where: str, what: str) -> str:
    """Why the run's or sweep's directory cannot be created, as the error says it ("" if it can)."""
    why = _creatable(Path(str(where)))
    if not why:
        return ""
    return (
        f"cannot create the {what} directory {where}: {why}; set hydra.{what}.dir, or paths.output_root, to a "
        "writable place"
    )


def _main(primary: str) -> None:
    """Hydra's app over `primary`, the first of the config directories (configdirs.search_order)."""
    hydra.main(version_base="1.3", config_path=primary, config_name=PRIMARY)(_task)()


def _under_torchrun() -> bool:
    """Whether this process is one of several ranks torchrun started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _other_rank() -> bool:
    """Under torchrun, a rank other than 0: what is wrong with the config is rank 0's to say; the others exit with the
    same code, quietly."""
    return os.environ.get("RANK", "0") != "0"


_held: list[Any] = []  # an other rank's stderr, set aside (main) until its config has composed
RANK_ZERO_GRACE_S = 10.0  # how long an other rank waits for rank 0 to say the config error they share


def _quiet_on_signals(code: int) -> None:
    """Under torchrun, on a rank that is ending with an error: the SIGTERM torchrun sends once another rank has ended
    ends this one at once, quietly and with the same code, instead of as a traceback from wherever it arrived."""
    if _under_torchrun():
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, lambda *_: os._exit(code))


def _wait_for_rank_zero(code: int) -> None:
    """An other rank with the config error that rank 0 has too: rank 0 says it, and torchrun ends this rank when rank
    0 exits. Exiting first instead would get rank 0 killed before it had said anything."""
    _quiet_on_signals(code)
    time.sleep(RANK_ZERO_GRACE_S)
    sys.exit(code)


def _speak(replay: bool) -> None:
    """Give back the stderr main set aside, if it did; `replay`: with what was written to it meanwhile."""
    if _held:
        held, sys.stderr = sys.stderr, _held.pop()
        if replay:
            sys.stderr.write(held.getvalue())


def _task(cfg: DictConfig) -> float:
    _speak(replay=False)  # composed, as on rank 0, which has said what composing said; now each rank speaks
    job = sweep.current_job()
    try:
        try:
            checked = config.validate(cfg)  # imports no torch: a mistyped value is answered before torch loads
        except ConfigError as e:
            if job is not None:
                job.record_failure(e)
            if _other_rank():
                _wait_for_rank_zero(2)  # every rank finds the same mistake in the config: rank 0 says it
            raise
        from mprun.experiment import run  # torch and the rest, once the config is known to be good

        summary = run(checked, STARTED if job is None else time.perf_counter(), job)
    except MprunError as e:  # explained failures: one short line, no traceback
        message = f"mprun: {'stopped' if isinstance(e, NumericsError) else 'error'}: {e}"
        if job is not None:
            # Raising lets Hydra mark this job failed and run the rest of the sweep; exiting would end it.
            log.error("%s", message)
            raise JobFailed(f"{message} (job {job.num}: {','.join(job.varied)})") from e  # whole keys
        _quiet_on_signals(2 if isinstance(e, ConfigError) else 1)
        print(message, file=sys.stderr, flush=True)
        # The user's code failing before anything was written leaves nothing either; but under torchrun the other
        # ranks are setting up in the same run directory (Hydra's log file, .hydra/), and removing it under them
        # would crash them: there it stays, its log ending with the error.
        clean = isinstance(e, (ConfigError, UserCodeError)) and not _under_torchrun()
        leave_a_record(message, bad_input=clean, output_root=Path(cfg.paths.output_root))
        sys.exit(2 if isinstance(e, ConfigError) else 1)  # a user's mistake exits 2, like argparse
    if summary["stop_signal"]:
        if not summary["interrupted"]:
            print(
                f"mprun: {signal.Signals(summary['stop_signal']).name} arrived after training was complete: "
                "the run finished and is recorded; stopping",
                file=sys.stderr,
                flush=True,
            )
        sys.exit(128 + summary["stop_signal"])  # the shell convention: 130 for SIGINT, 143 for SIGTERM
    return summary["val_acc"]


def leave_a_record(message: str, bad_input: bool, output_root: Path) -> None:
    """After a failed run: a run directory that holds only what Hydra put there before mprun ran (`.hydra/`, the
    log) is bad input's leftover, and goes, with the date directory above it if that is left empty; any other keeps
    its log, which now ends with the error."""
    if not HydraConfig.initialized():
        return
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    files = [LOG_FILE] if (run_dir / LOG_FILE).is_file() else []
    if bad_input and run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".hydra", *files}:
        for handler in logging.getLogger().handlers[:]:  # Hydra's handler of the log about to go
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == run_dir:
                logging.getLogger().removeHandler(handler)
                handler.close()
        shutil.rmtree(run_dir, ignore_errors=True)
        parent = run_dir.parent
        while parent.is_relative_to(output_root.absolute()) and parent != output_root.absolute():
            try:
                parent.rmdir()  # only if empty
            except OSError:
                break
            parent = parent.parent
        return
    from mprun.summary import write_to_log_file  # imports torch (training.state): a bad value's answer does not

    write_to_log_file(message, logging.ERROR)  # the file only: the console has had it


def main() -> None:
    """Run the Hydra app; a multirun's parent run is closed however it ends. The process's signal handling and
    exit codes for signals are mprun.__main__'s. A conf/ in the launch directory is searched before mprun's own
    (configdirs), and the launch directory is importable: a project's models and datasets live there."""
    code = None
    try:
        if _other_rank():  # until the config composes (Hydra's own errors too): rank 0 says what is wrong with it
            _held.append(sys.stderr)
            sys.stderr = io.StringIO()
        remember_command(sys.argv)
        cwd = Path.cwd()
        primary, sys.argv[1:], project = configdirs.search_order(sys.argv[1:], cwd)
        for note in configdirs.replacement_notes(project) if project else []:
            print(note, file=sys.stderr, flush=True)
        configdirs.launch_dir_importable(cwd)
        _main(primary)
    except BaseException as e:
        # Hydra ends a multirun early with an exception (a failed job re-raised after its batch, a bad sweep
        # value) or an exit (Ctrl-C, SIGTERM); on_multirun_end then never runs, so the parent is closed here.
        code = e.code if isinstance(e, SystemExit) else None
        sweep.close_active(interrupted=isinstance(e, KeyboardInterrupt) or code in (130, 143), completed=False)
        if isinstance(e, SystemExit) and isinstance(
            e.__context__, (ConfigCompositionException, OverrideParseException)
        ):
            # Hydra has said why the command line does not compose: a user's mistake, like mprun's own
            code = 2
            if _other_rank():
                _wait_for_rank_zero(2)
            _quiet_on_signals(2)
            unknown = config.unknown_override(e.__context__)
            if unknown:  # Hydra's message suggests adding the key with '+', which mprun then rejects: say what is valid
                print(f"mprun: error: {unknown}", file=sys.stderr, flush=True)
            sys.exit(2)
        raise
    finally:
        _speak(replay=code != 2)  # held back for a config error only: anything else this rank says still shows

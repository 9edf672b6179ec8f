"""mprun from Python (a notebook, a script): run one experiment in this process, and read a sweep's report.

    import mprun
    summary = mprun.run(["model=wide", "dataset=blobs", "precision=bf16"])   # a project's ./conf is searched first
    report = mprun.load_report("mprun")                                   # the newest sweep of experiment "mprun"

`run` composes the config as the command line does (Hydra's own search path: the project's conf/ before mprun's)
and runs the experiment through Hydra's job runner, so the run directory, its .hydra/ and mprun.log are those of a
`python -m mprun` run. Bad input raises mprun.errors.ConfigError, with the message the command line prints.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra._internal.hydra import Hydra
from hydra._internal.utils import create_config_search_path
from hydra.core.config_search_path import SearchPathQuery
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig

from mprun import config, configdirs, experiment
from mprun.cli import StartRefused, leave_a_record
from mprun.errors import ConfigError, MprunError, UserCodeError
from mprun.report import Report, build, default_out, find_parent
from mprun.tracking.store import Store
from mprun.tracking.uris import default_uri

config.register()


def run(overrides: Sequence[str] = (), *, config_dir: Optional[str | Path] = None) -> dict[str, Any]:
    """Run one experiment in this process, as `python -m mprun OVERRIDES` would; return its summary (the contents of
    its summary.json). config_dir: a project's conf/, searched before mprun's own (default: ./conf, if there is
    one). While it runs, the current directory and the one holding config_dir are importable, as the command line's
    launch directory is: a project's package sits beside its conf/. Bad input, Hydra's included, raises ConfigError.
    The process's logging and sys.path are put back afterwards. A sweep (-m) is the command line's."""
    if isinstance(overrides, str):
        raise TypeError("overrides is a list of strings: mprun.run(['precision=bf16', 'model=wide'])")
    project = Path(config_dir) if config_dir is not None else configdirs.project_dir(Path.cwd())
    if project is not None and not project.is_dir():
        raise ConfigError(f"config_dir={project}: not a directory")
    search = create_config_search_path(str((project or configdirs.SHIPPED).resolve()))
    if project is not None:  # the project's options first, mprun's after: the command line's order
        search.prepend("command-line", f"file://{configdirs.SHIPPED}", anchor=SearchPathQuery(provider="schema"))
    saved_path, root = list(sys.path), logging.getLogger()
    saved_logging = root.level, root.handlers[:]
    for where in [Path.cwd()] + ([project.resolve().parent] if project is not None else []):
        configdirs.launch_dir_importable(where)
    GlobalHydra.instance().clear()
    try:
        hydra = Hydra.create_main_hydra2(task_name="mprun", config_search_path=search)
        return hydra.run(configdirs.PRIMARY, _task, list(overrides)).return_value
    except StartRefused as e:
        raise ConfigError(e.problem) from None
    except HydraException as e:  # the command line's own: an unknown option or key, a bad override
        raise ConfigError(config.unknown_override(e) or str(e).strip()) from None
    finally:
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None  # the next compose() or run() must not see this run's job
        sys.path[:] = saved_path
        for handler in root.handlers[:]:  # Hydra's console and mprun.log handlers
            if handler not in saved_logging[1]:
                root.removeHandler(handler)
                handler.close()
        for handler in saved_logging[1]:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(saved_logging[0])


def _task(cfg: DictConfig) -> dict[str, Any]:
    try:
        summary = experiment.run(cfg, time.perf_counter())
        summary.pop("stop_signal", None)  # the command line's exit code; `interrupted` says what it means here
        return summary
    except MprunError as e:
        # as the command line leaves it: no run directory of bad input, the error at the end of a kept log
        clean = isinstance(e, (ConfigError, UserCodeError))
        leave_a_record(f"mprun: error: {e}", bad_input=clean, output_root=Path(cfg.paths.output_root))
        raise


def load_report(
    sweep: str = "mprun", *, uri: Optional[str] = None, out: Optional[str | Path] = None, tolerance_pp: float = 0.0
) -> Report:
    """The comparison report of a sweep: `sweep` is its parent run id, or an experiment name (its newest sweep); the
    store is `uri`, else $MLFLOW_TRACKING_URI, else ./outputs/mlflow.db. report.md and its plots are written to `out`
    (default: the sweep's own report directory); nothing is logged to the parent run. The Report has the jobs
    (`rows`), the precisions with their seeds together (`groups`), `recommendation()`, `best()` and `console()`."""
    store = Store.existing(uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri("outputs"))
    parent = find_parent(store, sweep)
    return build(store, parent, Path(out) if out else default_out(store, parent), tolerance_pp=tolerance_pp)

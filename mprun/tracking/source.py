"""Where a run came from, in MLflow's own source tags (the UI's Source and User columns), and what a team's job scripts
say through MLflow's environment variables (MLFLOW_TAGS; the experiment's are the tracker's). Imports no mlflow."""

from __future__ import annotations

import getpass
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

from mprun.errors import ConfigError
from mprun.tracking.uris import shown

# The command line as the launching process saw it: a sweep's jobs run in other processes (joblib's workers, SLURM
# jobs), which inherit the environment but not sys.argv.
COMMAND_ENV = "MPRUN_COMMAND"


def remember_command(argv: list[str]) -> None:
    """Record the command line that started mprun (the CLI calls this once), for its runs' source tags."""
    os.environ.setdefault(COMMAND_ENV, shown(shlex.join(["mprun", *argv[1:]])))  # a URI's password hidden


def git_commit(directory: Path) -> Optional[str]:
    """The commit checked out in the git work tree that holds `directory`; None outside one (or without git)."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def source_tags() -> dict[str, str]:
    """MLflow's source tags for a run started in this process: the entry point (the `mprun` command, or the script
    that called mprun.run), the launch directory's git commit where there is one, the command line and the user."""
    command = os.environ.get(COMMAND_ENV)
    entry = "mprun" if command else Path(sys.argv[0]).name or "python"
    tags = {
        "mlflow.source.name": entry,
        "mlflow.source.type": "JOB" if "SLURM_JOB_ID" in os.environ else "LOCAL",
        "mprun.command": command or shown(shlex.join(sys.argv)),
    }
    commit = git_commit(Path.cwd())
    if commit:
        tags["mlflow.source.git.commit"] = commit
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container's)
        pass
    return tags


def experiment_choice(configured: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """(name, id) of the experiment a run goes to: tracking.experiment when set; else $MLFLOW_EXPERIMENT_NAME (created
    when new; with $MLFLOW_EXPERIMENT_ID too, the two must agree), else the experiment $MLFLOW_EXPERIMENT_ID names;
    (None, None) when nothing chooses one: then the run $MLFLOW_RUN_ID names decides, or it is `mprun`
    (Store.open). MLflow's fluent API reads the variables alike."""
    if configured is not None:
        return configured, None
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or None, os.environ.get("MLFLOW_EXPERIMENT_ID") or None


def env_tags() -> dict[str, str]:
    """The tags of $MLFLOW_TAGS, a JSON object (as the Transformers MLflow callback reads it)."""
    text = os.environ.get("MLFLOW_TAGS")
    if not text:
        return {}
    example = """'{"team": "vision", "ticket": "ML-42"}'"""
    try:
        tags = json.loads(text)
    except json.JSONDecodeError as e:
        wanted = f"give an object of tag names to values, e.g. {example}"
        raise ConfigError(f"MLFLOW_TAGS is not JSON ({e}); {wanted}") from None
    if not isinstance(tags, dict):
        raise ConfigError(f"MLFLOW_TAGS must be a JSON object of tag names to values, e.g. {example}; got {text}")
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in tags.items()}

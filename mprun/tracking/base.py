"""The tracking interface the runner uses (Tracker), and tracking=none (NullTracker)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mprun.tracking.store import Store

# The step of the newest checkpoint a run has written. A resume from an older one (the run was resumed before, or
# a branch from an earlier step) starts a new run instead of logging the steps from there a second time.
CHECKPOINT_STEP_TAG = "mprun.checkpoint_step"


@dataclass(frozen=True)
class DatasetRecord:
    """A dataset a run used, for MLflow's dataset tracking (the UI's Datasets column): one per split it used."""

    name: str
    digest: str
    source: str  # where it was read from: a file or directory, or how it was made
    context: str  # "training" or "evaluation" (MLflow's mlflow.data.context tag)


class Tracker:
    """What the runner needs from a tracker. The base class tracks nothing."""

    run_id: str | None = None
    log_checkpoint: bool = False  # whether checkpoints are uploaded as artifacts
    store: Store | None = None  # where its runs are, for reading them back (a sweep, its report); None: nowhere

    def start(
        self,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        run_name: str | None = None,
        datasets: Sequence[DatasetRecord] = (),
    ) -> None:
        """Open a run and record params, tags and the datasets it uses; run_name names it unless the config names
        it."""

    def resume(self, run_id: str, step: int) -> bool:
        """Reopen an earlier run to continue it (a resumed training); False if this store lacks it."""
        return False

    def resume_dir(self) -> str | None:
        """The run directory whose checkpoints training continues from when nothing else says (trainer.resume): that of
        the run MLFLOW_RUN_ID names, where mprun has checkpointed it; None otherwise."""
        return None

    def log_model(self, model: Any, example: Any) -> None:
        """Record the trained model (a plain nn.Module) as an MLflow model, with a signature and an input example
        (a batch of inputs), as configured."""

    def watch_system(self, gpu: bool, continued: bool) -> None:
        """Record the machine's system metrics while the run lasts, as configured (auto: on a GPU); continued: the run
        was resumed, so their steps go on from its last."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue metrics for one step; written without blocking training."""

    def flush(self) -> None:
        """Write the metrics queued so far and wait for them (before a checkpoint records its step)."""

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Copy a file or directory into the run's artifacts."""

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Add or overwrite run tags."""

    def end(self, status: str) -> None:
        """Close the run as FINISHED, FAILED or KILLED."""

    def describe(self) -> list[str]:
        """Lines for the end-of-run summary: where the run is and how to look at it."""
        return []


class NullTracker(Tracker):
    """tracking=none: nothing is recorded."""

    def __init__(self, output_root: str = "outputs") -> None:
        pass

    def describe(self) -> list[str]:
        return ["tracking    off (tracking=none)"]

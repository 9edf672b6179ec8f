"""The tracking group's schemas: MLflow or nothing. Imports neither torch nor mlflow."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from mprun.errors import ConfigError
from mprun.schema import Buildable


class Unreachable(Enum):
    fail = "fail"  # stop with a clear error (before training; or mid-run, when the server goes away)
    local = "local"  # keep training and log to the local sqlite store instead


class SystemMetrics(Enum):
    auto = "auto"  # on for a GPU run (utilisation and memory are what one asks of it), off on a CPU
    on = "on"
    off = "off"


@dataclass
class MlflowConfig(Buildable):
    _target_: str = "mprun.tracking.mlflow_tracker.MlflowTracker"
    # null: $MLFLOW_TRACKING_URI if set, else sqlite at <output_root>/mlflow.db
    uri: str | None = None
    # null: $MLFLOW_EXPERIMENT_NAME, else the experiment $MLFLOW_EXPERIMENT_ID names, else mprun (tracking/source.py)
    experiment: str | None = None
    run_name: str | None = None
    log_checkpoint: bool = True  # checkpoints can be large: false keeps them only in the run directory
    # The trained model as an MLflow model (the UI's Models column; mlflow.pytorch.load_model("runs:/<id>/model")),
    # with a signature and an input example; register_model=<name> also registers it in the model registry.
    # true: the trained model; best: the best evaluation's (checkpoints/best.pt, trainer.keep_best); false: none.
    log_model: Any = False  # a bool or "best", which a structured config cannot type: checked below
    register_model: str | None = None
    # A store that cannot be reached, at start or mid-run: fail (clear error), or local (keep training,
    # log to sqlite:///<output_root>/mlflow.db, tagging the run with the intended store).
    on_unreachable: Unreachable = Unreachable.fail
    # Metric points are buffered and written together once the oldest has waited this long (and at checkpoints and
    # the end): what a UI shows lags by about this much, and what a kill -9 can lose. 0: a write per log step.
    flush_every_s: float = 5.0
    # MLflow's own system metrics (system/*: CPU, memory, disk, network, and each GPU's utilisation and memory),
    # sampled every system_metrics_every_s on a thread of MLflow's.
    system_metrics: SystemMetrics = SystemMetrics.auto
    system_metrics_every_s: float = 10.0

    def __post_init__(self) -> None:
        if self.log_model not in (True, False, "best"):
            raise ConfigError(f"log_model={self.log_model}: choose true (the trained model), best or false")
        if self.flush_every_s < 0:
            raise ConfigError(f"flush_every_s={self.flush_every_s} must be >= 0")
        if not self.system_metrics_every_s > 0:
            raise ConfigError(f"system_metrics_every_s={self.system_metrics_every_s} must be > 0")
        if self.experiment is not None and not self.experiment.strip():  # MLflow's own error blamed the store
            raise ConfigError("experiment: must name an MLflow experiment (default: mprun), got an empty name")


@dataclass
class NoTrackingConfig(Buildable):
    _target_: str = "mprun.tracking.base.NullTracker"

"""The trained model as an MLflow model (tracking.log_model): a CPU copy with a signature and an input example, in
torch.export's format where the model traces, else as a pickle that carries mprun's code. Loaded when a run logs its
model (mlflow.pytorch, torch)."""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from mprun.errors import first_line
from mprun.tracking.store import Store

log = logging.getLogger("mprun.tracking")


def _pins(*packages: str) -> list[str]:
    """package==version for those of these installed here."""
    pins = []
    for name in packages:
        try:
            pins.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return pins


@dataclass
class Ready:
    """A model made ready to log: its CPU copy, an input example, its signature and how it is saved."""

    plain: Any
    example: Any
    signature: Any
    form: dict[str, Any]


def prepare(model: Any, example: Any) -> Ready:
    """A CPU copy of the model in eval mode (what is logged loads on a machine without the run's GPU, and predicts),
    its signature from one batch, and its format."""
    # the tracker itself stays torch-free (the sweep's parent process uses it): torch and mlflow load here
    import torch
    from mlflow.models import infer_signature

    plain = copy.deepcopy(model).cpu().eval()
    x = example.detach().cpu()
    with torch.no_grad():
        y = plain(x)
    signature = infer_signature(x.numpy(), y.float().numpy())
    # MLflow's default format is pt2, torch.export's traced graph, which loads without mprun's code; torch.export
    # cannot trace every model (an LSTM's packed batch), and a failed Model.log leaves a half-made model behind,
    # so a trial export on a copy (a failed one can leave fake tensors on what it traced) decides first.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.export.export(copy.deepcopy(plain), (x,))
        form: dict[str, Any] = {"pip_requirements": _pins("torch")}
    except Exception as e:  # noqa: BLE001 - torch.export fails in many ways on what it cannot trace
        log.warning(
            "tracking.log_model: torch.export could not trace the model (%s); it is logged as a pickle, which "
            "carries mprun's code and loads where its packages are installed",
            first_line(e, type(e).__name__),
        )
        form = {
            "serialization_format": "pickle",
            "code_paths": [str(Path(__file__).resolve().parents[1])],  # the mprun package
            "pip_requirements": _pins("torch", "numpy", "omegaconf", "timm", "torchvision"),
        }
    return Ready(plain, x, signature, form)


def record(store: Store, experiment_id: str, run_id: str, ready: Ready, register_model: str | None) -> None:
    """Log the model to the run (and register it under `register_model`, if given)."""
    import mlflow  # mlflow: 1.2 s, when a model is logged
    import mlflow.pytorch
    from mlflow.models import Model

    mlflow.set_tracking_uri(store.uri)  # Model.log's own client reads the process's tracking URI
    # Made here, in the run's experiment: Model.log alone makes it in the process's active one ("Default").
    made = store.create_logged_model(experiment_id, "model", run_id)
    Model.log(
        artifact_path=None,
        name="model",
        flavor=mlflow.pytorch,
        run_id=run_id,
        model_id=made,
        registered_model_name=register_model,
        pytorch_model=ready.plain,
        signature=ready.signature,
        input_example=ready.example.numpy(),
        **ready.form,  # requirements stated, not inferred: inference loads the model in a fresh Python (seconds)
    )

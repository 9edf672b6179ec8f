"""Config schemas registered in Hydra's ConfigStore, and validation of a composed config.

The schema is in code, the values in conf/*.yaml. Types and unknown keys are checked by
OmegaConf while Hydra composes; ranges and cross-field rules run in each schema's
__post_init__ when `validate` converts the config to dataclass instances, before any tensor exists.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from mprun import guest
from mprun.data import config as data
from mprun.errors import ConfigError, first_line
from mprun.models import config as models
from mprun.optim import config as optim
from mprun.precision.config import PrecisionConfig
from mprun.tracking.config import MlflowConfig, NoTrackingConfig
from mprun.training.config import TrainerConfig

# Settings that change where and how a run is recorded or continued, not what it computes: a resume may change them
# without a warning, and the sweep report pairs a job with its fp32 baseline whatever they are.
OUTCOME_NEUTRAL = ("paths", "trainer.resume", "trainer.progress", "tracking", "report", "hydra")


def flatten(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: a resolved config as flat keys (MLflow params, resume's differences)."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def logged_params(resolved: Mapping[str, Any]) -> dict[str, Any]:
    """The MLflow params of a run: the resolved config, flattened, less what differs between runs without being a
    choice (paths.*: every run's directory) and Hydra's plumbing (_target_, _partial_). The whole config stays the
    run's config_resolved.yaml artifact."""
    return {
        k: v
        for k, v in flatten(resolved).items()
        if not k.startswith("paths.") and k.rsplit(".", 1)[-1] not in ("_target_", "_partial_")
    }


def outcome_neutral(key: str) -> bool:
    """Whether a config key (or override key) is one of OUTCOME_NEUTRAL or under one."""
    return any(key == k or key.startswith(k + ".") for k in OUTCOME_NEUTRAL)


@dataclass
class PathsConfig:
    root_dir: str = "."
    data_dir: str = MISSING
    output_root: str = MISSING  # run dirs, sweeps and the default MLflow store live here
    run_dir: Optional[str] = MISSING  # this run's directory (Hydra's output dir); null under --cfg, which runs nothing


@dataclass
class ReportConfig:
    """How a sweep's report judges its precisions (mprun.report, mprun.report.groups)."""

    tolerance_pp: float = 0.0  # accuracy vs fp32 (percentage points) a precision may lose and still be recommended

    def __post_init__(self) -> None:
        if not self.tolerance_pp >= 0:
            raise ConfigError(f"tolerance_pp: must be >= 0 (percentage points), got {self.tolerance_pp}")


def _open() -> DictConfig:
    """model and dataset stay open to new keys (Hydra closes the rest of the config): a project's own YAML has no
    schema, and `dataset.batch_size=32` or `model.hidden=256` must set a key its file leaves to a default. `validate`
    rejects a key that an option's schema, or the user's callable, does not take."""
    return OmegaConf.create({}, flags={"struct": False})


@dataclass
class Config:
    model: Any = dataclasses.field(default_factory=_open)
    dataset: Any = dataclasses.field(default_factory=_open)
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    precision: PrecisionConfig = MISSING
    trainer: TrainerConfig = MISSING
    tracking: Any = MISSING
    paths: PathsConfig = MISSING
    report: ReportConfig = dataclasses.field(default_factory=ReportConfig)


# Schemas are root configs, not config groups: a group is a choice on the command line, and --help lists every
# group's options. A YAML option extends one with `- /<name>@_here_`, e.g. `- /model_simple_cnn_schema@_here_`.
SCHEMAS: dict[str, type] = {
    "config_schema": Config,
    "model_simple_mlp_schema": models.SimpleMLPConfig,
    "model_simple_cnn_schema": models.SimpleCNNConfig,
    "model_timm_schema": models.TimmModelConfig,
    "model_torchvision_schema": models.TorchvisionModelConfig,
    "model_gpt_schema": models.GPTConfig,
    "model_lstm_schema": models.LSTMConfig,
    "dataset_digits_schema": data.DigitsConfig,
    "dataset_synthetic_schema": data.SyntheticConfig,
    "dataset_torchvision_schema": data.VisionConfig,
    "dataset_imagefolder_schema": data.ImageFolderConfig,
    "dataset_pycode_schema": data.PyCodeConfig,
    "dataset_textfile_schema": data.TextFileConfig,
    "dataset_textfolder_schema": data.TextFolderConfig,
    "optimizer_sgd_schema": optim.SGDConfig,
    "optimizer_adam_schema": optim.AdamConfig,
    "optimizer_adamw_schema": optim.AdamWConfig,
    "scheduler_none_schema": optim.ConstantConfig,
    "scheduler_cosine_schema": optim.CosineConfig,
    "scheduler_step_schema": optim.StepConfig,
    "scheduler_onecycle_schema": optim.OneCycleConfig,
    "precision_schema": PrecisionConfig,
    "trainer_schema": TrainerConfig,
    "tracking_mlflow_schema": MlflowConfig,
    "tracking_none_schema": NoTrackingConfig,
    "paths_schema": PathsConfig,
}


def resumed_run_dir(resume: Any, default: str) -> str:
    """hydra.run.dir (conf/mprun.yaml): the run directory trainer.resume names, so that a resumed run goes on where
    it was (its interrupted.pt and its final.pt in one place); else `default`, a new timestamped directory."""
    path = Path(str(resume)) if resume and resume != "auto" else None
    return str(path) if path is not None and (path / ".hydra").is_dir() else default


def register() -> None:
    """Put every schema in Hydra's ConfigStore, and mprun's resolvers in OmegaConf (idempotent)."""
    cs = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        cs.store(name=name, node=node)
    OmegaConf.register_new_resolver("mprun_run_dir", resumed_run_dir, replace=True)


def _initials(key: str) -> str:
    return "".join(word[:1] for word in key.split("_"))


def _likely(key: str, keys: list[str]) -> str | None:
    """The key a typo most likely meant: a close spelling (difflib), an abbreviation either way (learning_rate for
    lr, wd for weight_decay), or one that starts the other."""
    close = difflib.get_close_matches(key, keys, n=1)
    if close:
        return close[0]
    for matches in (
        lambda k: _initials(key) == k or _initials(k) == key,
        lambda k: len(min(k, key, key=len)) >= 3 and (k.startswith(key) or key.startswith(k)),
    ):
        found = [k for k in keys if matches(k)]
        if len(found) == 1:
            return found[0]
    return None


def _unknown_key(where: str, key: str, allowed: Any) -> str:
    """'trainer.epoch: unknown key; did you mean trainer.epochs? trainer takes channels_last, ...' (where:
    'trainer.', or '' at the top)."""
    keys = sorted(str(k) for k in allowed if not str(k).startswith("_"))
    likely = _likely(key, keys)
    hint = f"did you mean {where}{likely}? " if likely else ""
    return f"{where}{key}: unknown key; {hint}{where.rstrip('.') or 'the config'} takes {', '.join(keys) or 'no keys'}"


def _known(keys: Any, allowed: Any, where: str) -> None:
    """Hydra's `+key=value` adds a key even to a schema that has no such field, and OmegaConf.to_object then drops
    it without a word: a typo'd `+trainer.max_epoch=3` ran with the default. Such a key is an error."""
    unknown = [k for k in keys if k not in allowed]
    if unknown:
        raise ConfigError(_unknown_key(where, unknown[0], allowed))


def unknown_override(error: BaseException) -> Optional[str]:
    """For a command line Hydra could not compose because it overrides a key the schema lacks (`trainer.epochs=3`):
    the key and the keys its group takes. Hydra's own message only suggests `+trainer.epochs=3`, which fails too."""
    while error is not None and not isinstance(error, OmegaConfBaseException):
        error = error.__cause__ or error.__context__
    node, key = getattr(error, "parent_node", None), getattr(error, "full_key", None)
    if not isinstance(error, (ConfigAttributeError, ConfigKeyError)) or node is None or not key:
        return None
    kind = getattr(error, "object_type", None)
    allowed = kind.__dataclass_fields__ if dataclasses.is_dataclass(kind) else node.keys()
    where, _, name = key.rpartition(".")
    return _unknown_key(f"{where}." if where else "", name, allowed)


@dataclass(frozen=True)
class RunConfig:
    """A validated config, the one object a run, its builder and resume take: each group as its typed schema (a
    project's own model or dataset as guest.UserModelConfig / UserDatasetConfig), and the composed config it was
    validated from, which is what Hydra instantiates and what a run records (params, config_resolved.yaml, its
    checkpoints)."""

    model: Any
    dataset: Any
    optimizer: Any
    scheduler: Any
    precision: PrecisionConfig
    trainer: TrainerConfig
    tracking: Any
    paths: PathsConfig
    report: ReportConfig
    composed: DictConfig

    @functools.cached_property
    def resolved(self) -> dict[str, Any]:
        """The composed config with every interpolation resolved, enums as their names: what a run records."""
        return OmegaConf.to_container(self.composed, resolve=True, enum_to_str=True)


def validate(cfg: DictConfig) -> RunConfig:
    """Check keys, ranges and cross-field rules group by group; returns the typed config."""
    _known(cfg.keys(), Config.__dataclass_fields__, "")
    checked = {}
    for group in Config.__dataclass_fields__:
        if group in _USER_BUILT and _users(cfg[group]):
            checked[group] = _user_built(group, cfg[group])
            continue
        try:
            checked[group] = OmegaConf.to_object(cfg[group])
        except ConfigError as e:
            raise ConfigError(f"{group}.{e}") from None
        except MissingMandatoryValue as e:  # OmegaConf names the schema class and the bare key
            key = e.full_key if e.full_key.startswith(f"{group}.") else f"{group}.{e.full_key}"
            raise ConfigError(f"{key}: missing mandatory value; set it on the command line ({key}=...)") from None
        except OmegaConfBaseException as e:
            raise ConfigError(f"{group}: {first_line(e)}") from None
        _known(cfg[group].keys(), [f.name for f in dataclasses.fields(checked[group])], f"{group}.")
    return RunConfig(**checked, composed=cfg)


_USER_BUILT = ("model", "dataset")  # groups whose option may be a project's own YAML, schema-less, by _target_


def _users(node: DictConfig) -> bool:
    """Whether a model or dataset option is built by a project's own callable: its YAML has no schema, or its
    `_target_` is not mprun's (`model._target_=mylab.nets.Wide` over one of mprun's options)."""
    return OmegaConf.get_type(node) is dict or not str(node.get("_target_", "")).startswith("mprun.")


def _user_built(group: str, node: DictConfig) -> Any:
    """A project's own model or dataset YAML (no schema): mprun's keys checked and kept, the rest for its callable."""
    values = OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    if "_target_" not in values:
        raise ConfigError(
            f"{group}._target_: missing; a {group} of your own names the callable that builds it "
            f"(_target_: mylab.{'nets.Wide' if group == 'model' else 'data.blobs'}), or choose one of mprun's {group}s"
        )
    if group == "model":
        task = values.pop("task", None)
        tasks = ("classification", "text_classification", "language_model")
        if task is not None and task not in tasks:
            raise ConfigError(f"model.task={task}: must be one of {', '.join(tasks)}")
        target = values.pop("_target_")
        values.pop("_partial_", None)
        return guest.UserModelConfig(target, task, values)
    own = {k: values.pop(k) for k in data.DATASET_KEYS if k in values}
    for key in ("batch_size", "prefetch_factor", "num_classes", "vocab_size"):
        value = own.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ConfigError(f"dataset.{key}={value}: must be an integer")
    if "num_workers" in own:
        own["num_workers"] = str(own["num_workers"])
    try:
        return data.UserDatasetConfig(**own, kwargs=values)
    except ConfigError as e:
        raise ConfigError(f"dataset.{e}") from None

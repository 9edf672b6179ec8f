"""Turns a composed config into built objects. The only module that calls hydra.utils.instantiate."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mprun import distributed, guest
from mprun.config import RunConfig
from mprun.data import user as userdata
from mprun.data.config import UserDatasetConfig
from mprun.data.loaders import DataBundle
from mprun.distributed import SINGLE, World
from mprun.errors import ConfigError, MprunError
from mprun.hardware import resolve_device, set_math_flags
from mprun.models.fit import check_fits
from mprun.optim.factories import implementation, prepare
from mprun.precision import probe
from mprun.precision.islands import keep_fp32
from mprun.precision.runtime import Precision
from mprun.tracking.base import Tracker
from mprun.training.config import Strategy
from mprun.training.state import Training, planned_steps

log = logging.getLogger("mprun")


@dataclass
class Components(Training):
    """Everything a run trains with: what the loop needs (Training) and what the run around it needs."""

    module: nn.Module  # the plain module: what checkpoints hold
    total_steps: int
    fp32_modules: list[str]  # modules precision.fp32_modules matched, kept out of autocast
    strategy: Strategy
    model_inputs: dict[str, Any]  # what the data decided and mprun passed to the model's callable
    keep_best: Optional[str]  # the val/ metric whose best evaluation checkpoints/best.pt keeps; None: off


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def tracker(tracking: DictConfig, output_root: str) -> Tracker:
    """The tracker a tracking group configures, already connected to its store (a bad store fails here, before
    training): a run's, or a sweep's parent run's."""
    return instantiate(tracking, _convert_="all")(output_root=output_root)


def dataset(config: RunConfig, seed: int, device: torch.device) -> DataBundle:
    """The configured dataset and its loaders: one of mprun's, or a project's own (data/user.py), for the task that
    model.task names, where a project's model names one."""
    spec = config.dataset
    if not isinstance(spec, UserDatasetConfig):
        return instantiate(config.composed.dataset, _convert_="all")(seed=seed, device=device)
    splits, _ = _user_call("dataset", spec._target_, spec.kwargs, {}, user_roots(config))
    task = getattr(config.model, "task", None)
    return userdata.bundle(
        splits, spec, name=_option(config, "dataset"), task=task, seed=seed, device=device, roots=user_roots(config)
    )


def user_roots(config: RunConfig) -> tuple[Path, ...]:
    """Where the project's own code of this config lives (its model's and dataset's packages)."""
    return guest.roots_of([config.model._target_, config.dataset._target_])


def _user_call(
    key: str, path: str, kwargs: dict[str, Any], facts: dict[str, Any], roots: tuple[Path, ...]
) -> tuple[Any, dict[str, Any]]:
    """A project's callable, called with its config keys (nested `_target_`s built) and the facts its signature asks
    for; returns what it returned and the facts passed."""
    target = guest.locate(key, path)
    passed = guest.arguments(key, path, target, kwargs, facts)
    built = guest.call(key, path, lambda: instantiate(OmegaConf.create(kwargs), _convert_="all"), roots)
    return guest.call(key, path, lambda: guest.invoke(target, {**built, **passed}), roots), passed


def _model(config: RunConfig, data: DataBundle, example: torch.Tensor) -> tuple[nn.Module, dict[str, Any]]:
    """The configured model, and what the data decided for it: a schema's builder takes its task's inputs; a
    project's callable takes each fact of the data its signature names."""
    spec = config.model
    if not isinstance(spec, guest.UserModelConfig):
        inputs = data.model_inputs()
        return instantiate(config.composed.model, _convert_="all")(**inputs), inputs
    module, passed = _user_call("model", spec._target_, spec.kwargs, data.facts(example), user_roots(config))
    if not isinstance(module, nn.Module):
        raise ConfigError(f"model._target_={spec._target_} returned {type(module).__name__}, not a torch.nn.Module")
    given = ", ".join(f"{k}={v}" for k, v in passed.items()) or "nothing"
    log.info("model %s: passed %s from dataset=%s", spec._target_, given, data.name)
    return module, passed


def components(config: RunConfig, world: World = SINGLE) -> Components:
    """Device, precision, data, model, optimizer and schedule, in the order each needs the last."""
    trainer, cfg = config.trainer, config.composed
    device = resolve_device(trainer.device, world.local_rank)
    seed_everything(trainer.seed)
    data = dataset(config, trainer.seed, device)
    check_task(config, data.task.name)
    keep_best = _best_metric(config, data)
    data.train.shard(world.rank, world.size)
    data.val.shard(world.rank, world.size)  # each rank evaluates its share; evaluate() sums over ranks
    batch = tuple(t.to(device) for t in data.example_batch())
    module, inputs, fp32_modules = _placed_model(config, data, batch, device)
    # On a CPU, auto (and the emulation warning of an explicit bf16/fp16) go by this model's measured speed: rank 0
    # measures (and keeps the result under the outputs root), and every rank takes its result, so all pick alike.
    precision = Precision(
        config.precision,
        device,
        lambda dtypes: world.from_main(
            lambda: probe.measure(module, batch, data.task, dtypes, Path(cfg.paths.output_root))
        ),
    )
    # Process-global: set by every run, never inherited (experiment.run puts the caller's back afterwards).
    set_math_flags(**precision.math_flags(), cudnn_benchmark=trainer.cudnn_benchmark)
    # Low precision beyond autocast (fp8's Float8Linear, bf16_pure's bf16 storage) before compile, DDP and FSDP2.
    precision.transform(module, fp32_modules)
    # DDP wraps the module; FSDP2 shards it in place (before the optimizer sees its parameters).
    wrapped = distributed.wrap(module, trainer.strategy, device, precision, fp32_modules)
    target = precision.optimizer_target(cfg.optimizer._target_)
    kernels = implementation(target, trainer.strategy is Strategy.fsdp)
    optimizer = prepare(instantiate(cfg.optimizer, _target_=target, _convert_="all")(module.parameters(), **kernels))
    total = planned_steps(trainer, len(data.train))
    scheduler = instantiate(cfg.scheduler, _convert_="all")(optimizer=optimizer, total_steps=total)
    return Components(
        model=torch.compile(wrapped) if trainer.compile else wrapped,
        data=data,
        optimizer=optimizer,
        scheduler=scheduler,
        precision=precision,
        device=device,
        world=world,
        module=module,
        total_steps=total,
        fp32_modules=fp32_modules,
        strategy=trainer.strategy,
        model_inputs=inputs,
        keep_best=keep_best,
    )


def _best_metric(config: RunConfig, data: DataBundle) -> Optional[str]:
    """trainer.keep_best as a val/ metric of the data's task: auto is the task's headline."""
    wanted = config.trainer.keep_best
    if wanted == "none":
        if getattr(config.tracking, "log_model", False) == "best":
            raise ConfigError("tracking.log_model=best logs the best checkpoint: set trainer.keep_best (not none)")
        return None
    metric, has = (f"val/{data.task.headline}" if wanted == "auto" else wanted), data.task.val_metrics()
    if metric.removeprefix("val/") not in has:
        raise ConfigError(
            f"trainer.keep_best={wanted}: dataset={data.name} ({data.task.name}) has no such metric; choose one of "
            f"{', '.join(f'val/{m}' for m in has)}, auto or none"
        )
    return metric


def _placed_model(
    config: RunConfig, data: DataBundle, batch: tuple[torch.Tensor, ...], device: torch.device
) -> tuple[nn.Module, dict[str, Any], list[str]]:
    """The model built for the data, its fp32 islands marked, on the device and checked against a batch: (module,
    what the data decided for it, the modules kept in fp32)."""
    model_name = _model_label(config)
    try:
        module, inputs = _model(config, data, batch[0])
    except MprunError:
        raise
    except (AssertionError, ValueError, RuntimeError) as e:  # e.g. a ViT patch larger than the image
        given = ", ".join(f"{k}={v}" for k, v in data.model_inputs().items())
        raise ConfigError(f"{model_name} cannot be built for dataset={data.name} ({given}): {e}") from e
    # Model transforms before moving/compiling: fp32 islands run outside autocast.
    wanted = config.precision.fp32_modules
    fp32_modules = keep_fp32(module, wanted, device.type) if wanted else []
    memory_format = torch.channels_last if config.trainer.channels_last else torch.preserve_format
    module = module.to(device, memory_format=memory_format)
    check_fits(
        module,
        batch[0][:2],
        data.train.smallest_batch(),
        data.num_classes,
        model_name,
        data.name,
        task=data.task,
        roots=user_roots(config),
    )
    return module, inputs, fp32_modules


def check_task(config: RunConfig, task: str | None = None) -> None:
    """The model can serve the dataset's task: checked from their configs, before the store is reached or the data
    read; a project's own dataset has its task from its items (`task`), once they are read."""
    task, served = task or config.dataset.TASK, config.model.TASKS
    if task is not None and task not in served:
        chosen = HydraConfig.get().runtime.choices.get("dataset") if HydraConfig.initialized() else None
        data = chosen or config.dataset._target_.rsplit(".", 1)[-1]
        raise ConfigError(
            f"{_model_label(config)} cannot serve dataset={data}: the dataset is a {task} task and the model serves "
            f"{', '.join(served)} (language models: model=gpt or lstm; text classifiers: model=lstm; image "
            "classifiers: model=simple_cnn, resnet18, ...)"
        )


def _model_label(config: RunConfig) -> str:
    """The model as the command line names it, for errors: `model=vit_b16 model.name=vit_base_patch16_224`,
    `model=timm model.name=resnet5O`, `model=simple_cnn`. A config Hydra's CLI did not compose (tests, a script's
    compose()) has no choices: `model.name=...`, or else the class its _target_ builds."""
    chosen = HydraConfig.get().runtime.choices.get("model") if HydraConfig.initialized() else None
    name = getattr(config.model, "name", None)
    parts = ([f"model={chosen}"] if chosen else []) + ([f"model.name={name}"] if name and name != chosen else [])
    return " ".join(parts) or f"model {config.model._target_.rsplit('.', 1)[-1]}"


def _option(config: RunConfig, group: str) -> str:
    """The option the command line chose for a group (`blobs`), or the last part of its _target_."""
    chosen = HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None
    return chosen or str(getattr(config, group)._target_).rsplit(".", 1)[-1]

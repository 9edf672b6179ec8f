"""Turns a composed config into built objects. The only module that calls hydra.utils.instantiate."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from mprun import distributed, models, numerics, probe
from mprun.data import DataBundle
from mprun.distributed import SINGLE, Strategy, World
from mprun.errors import ConfigError
from mprun.hardware import resolve_device, set_math_flags
from mprun.loop import TrainerConfig, Training, planned_steps
from mprun.optim import implementation, prepare
from mprun.precision import Precision, PrecisionConfig
from mprun.tracking import Tracker


@dataclass
class Components(Training):
    """Everything a run trains with: what the loop needs (Training) and what the run around it needs."""

    module: nn.Module  # the plain module: what checkpoints hold
    total_steps: int
    fp32_modules: list[str]  # modules precision.fp32_modules matched, kept out of autocast
    strategy: Strategy


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def tracker(cfg: DictConfig) -> Tracker:
    """The configured tracker, already connected to its store (a bad store fails here, before training)."""
    return instantiate(cfg.tracking, _convert_="all")(output_root=cfg.paths.output_root)


def dataset(cfg: DictConfig, seed: int, device: torch.device) -> DataBundle:
    """The configured dataset and its loaders."""
    return instantiate(cfg.dataset, _convert_="all")(seed=seed, device=device)


def components(cfg: DictConfig, checked: dict[str, Any], world: World = SINGLE) -> Components:
    """Device, precision, data, model, optimizer and schedule, in the order each needs the last."""
    trainer: TrainerConfig = checked["trainer"]
    device = resolve_device(trainer.device, world.local_rank)
    wanted: PrecisionConfig = checked["precision"]
    seed_everything(trainer.seed)
    data = dataset(cfg, trainer.seed, device)
    data.train.shard(world.rank, world.size)
    data.val.shard(world.rank, world.size)  # each rank evaluates its share; evaluate() sums over ranks
    model_name = _model_label(cfg)
    inputs = data.model_inputs()
    try:
        module: nn.Module = instantiate(cfg.model, _convert_="all")(**inputs)
    except ConfigError:
        raise
    except (AssertionError, ValueError, RuntimeError) as e:  # e.g. a ViT patch larger than the image
        given = ", ".join(f"{k}={v}" for k, v in inputs.items())
        raise ConfigError(f"{model_name} cannot be built for dataset={data.name} ({given}): {e}") from e
    # Model transforms before moving/compiling: fp32 islands run outside autocast.
    fp32_modules = numerics.keep_fp32(module, wanted.fp32_modules, device.type) if wanted.fp32_modules else []
    memory_format = torch.channels_last if trainer.channels_last else torch.preserve_format
    module = module.to(device, memory_format=memory_format)
    batch = tuple(t.to(device) for t in data.example_batch())
    models.check_fits(
        module,
        batch[0][:2],
        data.train.smallest_batch(),
        data.num_classes,
        model_name,
        data.name,
        task=data.task,
    )
    # On a CPU, auto (and the emulation warning of an explicit bf16/fp16) go by this model's measured speed: rank 0
    # measures (and keeps the result under the outputs root), and every rank takes its result, so all pick alike.
    precision = Precision(
        wanted,
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
    model = torch.compile(wrapped) if trainer.compile else wrapped
    return Components(
        model=model,
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
    )


def check_task(cfg: DictConfig, checked: dict[str, Any]) -> None:
    """The model can serve the dataset's task: checked from their configs, before the store is reached or the data
    read."""
    task, served = checked["dataset"].TASK, checked["model"].TASKS
    if task not in served:
        chosen = HydraConfig.get().runtime.choices.get("dataset") if HydraConfig.initialized() else None
        data = chosen or cfg.dataset.get("_target_", "?").rsplit(".", 1)[-1]
        raise ConfigError(
            f"{_model_label(cfg)} cannot serve dataset={data}: the dataset is a {task} task and the model serves "
            f"{', '.join(served)} (language models: model=gpt or lstm; text classifiers: model=lstm; image "
            "classifiers: model=simple_cnn, resnet18, ...)"
        )


def _model_label(cfg: DictConfig) -> str:
    """The model as the command line names it, for errors: `model=vit_b16 model.name=vit_base_patch16_224`,
    `model=timm model.name=resnet5O`, `model=simple_cnn`. A config Hydra's CLI did not compose (tests, a script's
    compose()) has no choices: `model.name=...`, or else the class its _target_ builds."""
    chosen = HydraConfig.get().runtime.choices.get("model") if HydraConfig.initialized() else None
    name = cfg.model.get("name")
    parts = ([f"model={chosen}"] if chosen else []) + ([f"model.name={name}"] if name and name != chosen else [])
    return " ".join(parts) or f"model {cfg.model.get('_target_', '?').rsplit('.', 1)[-1]}"

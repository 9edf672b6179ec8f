"""Whether a built model fits its data: one tiny forward pass in training mode, before the first step."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mprun.errors import ConfigError, first_line, require
from mprun.guest import user_frames
from mprun.tasks import CLASSIFICATION, Task


def check_fits(
    model: nn.Module,
    example: torch.Tensor,
    smallest_batch: int,
    num_classes: int,
    model_name: str,
    dataset_name: str,
    *,
    task: Task = CLASSIFICATION,
    roots: tuple[Path, ...] = (),
) -> None:
    """Run one tiny forward pass in training mode, as the first step will, so that a model/dataset/batch
    mismatch fails now, naming them (model_name as the command line does: `model=vit_b16 model.name=...`), not
    mid-epoch. Buffers (BatchNorm's running statistics) are left as found.
    smallest_batch: the fewest samples a training batch holds (1 makes BatchNorm fail where 2 work). roots: where
    a project's own model code lives; a failure in it shows its frames below the line."""
    example = torch.cat([example, example])[: min(2, smallest_batch)]  # a batch of 1 only when training has one
    buffers = [(b, b.clone()) for b in model.buffers()]
    was_training = model.training
    model.train()
    try:
        with torch.no_grad():
            out = model(example)
    except (RuntimeError, ValueError, AssertionError, TypeError) as e:
        first = first_line(e, type(e).__name__)
        batch = (
            " in batches of 1 (dataset.batch_size, or a training set, or a rank's share of it, that leaves one "
            "sample for a batch)"
            if len(example) == 1
            else ""
        )
        frames = user_frames(e, roots)
        raise ConfigError(
            f"{model_name} cannot train on dataset={dataset_name} inputs of shape {tuple(example.shape[1:])}{batch}: "
            f"{first}" + (f"\n{frames}" if frames else "")
        ) from e
    finally:
        model.train(was_training)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    require(
        isinstance(out, torch.Tensor),
        f"{model_name} returns {type(out).__name__} in training, not a tensor of logits (auxiliary heads?); "
        "mprun trains models that return logits: turn the extra outputs off through model.kwargs "
        "(torchvision googlenet "
        "and inception_v3: +model.kwargs.aux_logits=false)",
    )
    expected = task.output_shape(example, num_classes)
    what = "vocab_size" if task.per_position else "num_classes"
    require(
        tuple(out.shape) == expected,
        f"{model_name} outputs shape {tuple(out.shape[1:])}, dataset={dataset_name} needs {expected[1:]} "
        f"({num_classes} {'tokens' if task.per_position else 'classes'}; a model of your own gets {what} from the "
        "data where its signature has a parameter of that name)",
    )

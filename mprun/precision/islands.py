"""fp32 islands: modules that precision.fp32_modules names run outside autocast, in float32 (a model transform)."""

from __future__ import annotations

import fnmatch
import functools
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from mprun.errors import ConfigError


def keep_fp32(model: nn.Module, patterns: list[str], device_type: str) -> list[str]:
    """Run the modules whose qualified names match any glob outside autocast, in float32.
    Returns the names wrapped. A pattern that matches nothing is an error (most likely a typo)."""
    names = [n for n, _ in model.named_modules() if n]
    empty = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if empty:
        raise ConfigError(
            f"precision.fp32_modules: {empty} match no module of this model; its modules are named like "
            f"{names[:8]}{' ...' if len(names) > 8 else ''}"
        )
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    outermost = [n for n in chosen if not any(n.startswith(f"{c}.") for c in chosen)]  # a parent covers its children
    for name in outermost:
        _run_in_fp32(model.get_submodule(name), device_type)
    return outermost


def _to_fp32(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float32:
        return value.float()
    return value


def _run_in_fp32(module: nn.Module, device_type: str) -> None:
    forward = module.forward

    @functools.wraps(forward)
    def fp32_forward(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type, enabled=False):
            return forward(*tree_map(_to_fp32, args), **tree_map(_to_fp32, kwargs))

    module.forward = fp32_forward  # an instance attribute: state_dict and checkpoints are unchanged


# ---------------------------------------------------------------- NaN tracer

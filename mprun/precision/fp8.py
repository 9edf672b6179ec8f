"""precision=fp8: torchao's float8 training as a model transform (torchtitan's order: after the model is built, before
compile, DDP or FSDP2). Chosen nn.Linear layers become torchao Float8Linear, whose matmuls cast their operands to
float8 with dynamic scales; everything else runs under bf16 autocast. Weights stay fp32 parameters of the same names,
so a checkpoint loads into the unconverted model.
"""

from __future__ import annotations

import fnmatch
import logging
from typing import Any, Optional

from torch import nn

from mprun.errors import ConfigError

INSTALL = "pip install 'torchao>=0.18'"
MIN_TORCHAO = (0, 18)


def _torchao() -> Any:
    """torchao's float8 package, or a one-line error naming the install command."""
    try:
        import torchao  # only fp8 runs load it (an optional extra)
        from torchao import float8
    except ImportError as e:
        raise ConfigError(f"precision=fp8 needs torchao ({e}); install it with: {INSTALL}") from e
    found = tuple(int(p) for p in torchao.__version__.split("+")[0].split(".")[:2] if p.isdigit())
    if found < MIN_TORCHAO:
        raise ConfigError(f"precision=fp8 needs torchao >= 0.18, found {torchao.__version__}; upgrade with: {INSTALL}")
    return float8


def import_quietly() -> Any:
    """torchao's float8 package; its import logs a torch deprecation warning (an Enum registered as a pytree
    constant) that says nothing to a user, so torch's pytree logger is quiet while it loads."""
    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)
    try:
        return _torchao()
    finally:
        pytree_log.setLevel(level)


def choose(
    module: nn.Module, skip: Optional[list[str]], min_features: int, fp32: tuple[str, ...] = ()
) -> tuple[list[str], dict[str, str]]:
    """The Linear layers to convert, and why each other Linear stays: (names, {name: reason}). `skip` is a list of
    globs over qualified module names; None skips the output layer (the last Linear), where fp8 costs accuracy most.
    A glob that matches no module is an error. `fp32`: the modules precision.fp32_modules keeps in fp32 (and what is
    inside them)."""
    linears = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    names = [n for n, _ in module.named_modules() if n]
    output = linears[-1][0] if linears else None
    if skip is None:
        skip = [output] if output is not None else []
    else:
        empty = [p for p in skip if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if empty:
            raise ConfigError(
                f"precision.fp8_skip: {empty} match no module of this model; its Linear layers are "
                f"{[n for n, _ in linears][:8]}{' ...' if len(linears) > 8 else ''}"
            )
    chosen: list[str] = []
    left: dict[str, str] = {}
    for name, linear in linears:
        if any(name == f or name.startswith(f"{f}.") for f in fp32):
            left[name] = "precision.fp32_modules"
        elif any(fnmatch.fnmatchcase(name, p) for p in skip):
            left[name] = (
                "the output layer, which precision.fp8_skip=null keeps" if name == output else "precision.fp8_skip"
            )
        elif linear.in_features % 16 or linear.out_features % 16:
            left[name] = f"{linear.in_features}x{linear.out_features} not divisible by 16"
        elif min(linear.in_features, linear.out_features) < min_features:
            left[name] = f"{linear.in_features}x{linear.out_features} below precision.fp8_min_features={min_features}"
        else:
            chosen.append(name)
    return chosen, left


def convert(
    module: nn.Module,
    recipe: str,
    skip: Optional[list[str]],
    min_features: int,
    all_gather: bool,
    fp32: tuple[str, ...] = (),
) -> list[str]:
    """Swap the chosen Linear layers for Float8Linear in place; returns their names. None chosen is an error that
    lists each Linear and why it stayed."""
    chosen, left = choose(module, skip, min_features, fp32)
    if not chosen:
        why = "; ".join(f"{n}: {r}" for n, r in left.items()) or "the model has no nn.Linear"
        raise ConfigError(
            f"precision=fp8: no Linear layer of this model qualifies for float8 ({why}). fp8 swaps Linear layers "
            "only (convolutions stay bf16): use precision=bf16, or lower precision.fp8_min_features / change "
            "precision.fp8_skip"
        )
    if all_gather and recipe != "tensorwise":
        raise ConfigError(
            f"precision.fp8_fsdp_all_gather=true needs precision.fp8_recipe=tensorwise (torchao's float8 all-gather "
            f"has one scale per tensor), not {recipe}"
        )
    float8 = import_quietly()
    config = (
        float8.Float8LinearConfig(enable_fsdp_float8_all_gather=True)  # tensorwise, with the float8 all-gather
        if all_gather
        else float8.Float8LinearConfig.from_recipe_name(recipe)
    )
    wanted = set(chosen)
    float8.convert_to_float8_training(module, module_filter_fn=lambda _, name: name in wanted, config=config)
    return chosen


def precompute_scales(module: nn.Module) -> None:
    """After each optimizer step under FSDP2's float8 all-gather: one all-reduce computes every float8 weight's scale
    for the next forward (torchao's recommended order)."""
    import_quietly().precompute_float8_dynamic_scale_for_fsdp(module)

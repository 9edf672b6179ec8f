"""A user's code as a guest: a model or dataset that a project's config names by `_target_`.

mprun imports the callable, checks its signature against the config's keys, passes what the data decides only where
the signature asks for it by name, checks what it returns, and names the config key that brought it when any of that
fails. When the user's own code raises, the error shows the user's frames (their file and line), not mprun's.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import re
import sys
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from mprun.errors import ConfigError, MprunError, UserCodeError, first_line

_MPRUN = Path(__file__).resolve().parent


@dataclass
class UserModelConfig:
    """model: a project's callable (a class or a factory) that returns a torch.nn.Module. Its YAML has no schema:
    every key but `_target_` and `task` goes to the callable."""

    _target_: str
    task: Optional[str] = None  # the task the model is for, where the data allows more than one
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def TASKS(self) -> tuple[str, ...]:
        return (self.task,) if self.task else ("classification", "text_classification", "language_model")


# What mprun keeps for itself in a user model's YAML: not passed to the callable.
MODEL_KEYS = ("_target_", "_partial_", "task")


def locate(key: str, path: Any) -> Any:
    """The object a `_target_` names, imported: `mylab.nets.Wide`, `mylab.nets.make_wide`. An import failure is one
    line naming the key and the error; an error raised by the user's module as it imports shows its frames."""
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(
            f"{key}._target_: must name a class or function as a dotted path (mylab.nets.Wide), got {path!r}"
        )
    parts = path.split(".")
    try:
        for i in range(len(parts), 0, -1):
            name = ".".join(parts[:i])
            try:
                found: Any = importlib.import_module(name)
            except ModuleNotFoundError as e:
                if e.name and (name == e.name or name.startswith(e.name + ".")):
                    continue  # this prefix is not a module: try the shorter one
                raise
            for attr in parts[i:]:
                found = getattr(found, attr)
            return found
        raise ModuleNotFoundError(f"No module named {parts[0]!r}", name=parts[0])
    except MprunError:
        raise
    except Exception as e:
        frames = user_frames(e, roots_of([path]))
        if frames:
            raise UserCodeError(f"{key}._target_={path}: importing it raised {_said(e)}", frames) from e
        hint = ""
        if isinstance(e, ModuleNotFoundError) and e.name == parts[0]:
            hint = f" (a project's package is found in the launch directory {Path.cwd()}, or wherever it is installed)"
        raise ConfigError(f"{key}._target_={path}: cannot import it: {_said(e)}{hint}") from e


def arguments(key: str, path: str, target: Any, given: Iterable[str], facts: dict[str, Any]) -> dict[str, Any]:
    """What mprun passes to `target` besides the config's keys: each fact of the data that its signature names and
    the config does not set. A config key that the signature does not take, or a required parameter that neither
    gives, is one line naming the key and the callable's parameters."""
    if not callable(target):
        raise ConfigError(f"{key}._target_={path} is of type {type(target).__name__}, not a class or function to call")
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):  # a builtin without a signature: pass the config's keys alone
        return {}
    named = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    given = set(given)
    for name in sorted(given):
        if name not in named and not takes_any:
            raise ConfigError(
                f"{key}.{name}: {path} takes no argument {name!r}; its parameters: {', '.join(named) or 'none'}"
            )
    passed = {n: facts[n] for n in named if n in facts and n not in given}
    for name in named:
        if params[name].default is params[name].empty and name not in given and name not in passed:
            raise ConfigError(
                f"{key}.{name}: {path} needs an argument {name!r}, which neither the config nor the data gives: set "
                f"{key}.{name}=...; the data gives {', '.join(sorted(facts)) or 'nothing'}, where a parameter has "
                "that name"
            )
    return passed


def invoke(target: Any, arguments: dict[str, Any]) -> Any:
    """target(**arguments), its leading positional-only parameters passed by position."""
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return target(**arguments)
    rest, positional = dict(arguments), []
    for p in params:
        if p.kind is not p.POSITIONAL_ONLY or p.name not in rest:
            break
        positional.append(rest.pop(p.name))
    return target(*positional, **rest)


def call(key: str, path: str, build: Callable[[], Any], roots: tuple[Path, ...]) -> Any:
    """build() (the user's callable with its arguments); an exception from the user's own code shows its frames."""
    try:
        return build()
    except MprunError:
        raise
    except Exception as e:
        frames = user_frames(e, roots)
        if frames:
            raise UserCodeError(f"{key}._target_={path} raised {_said(e)}", frames) from e
        raise ConfigError(f"{key}._target_={path} failed: {_said(e)}") from e


def roots_of(targets: Iterable[Any]) -> tuple[Path, ...]:
    """Where the user's code is: the package (or module) of each `_target_` that is neither mprun's nor one of the
    libraries mprun depends on (a `_target_: torch.nn.Linear` makes torch no one's own code), found without importing
    anything new."""
    roots: list[Path] = []
    for target in targets:
        top = target.split(".", 1)[0] if isinstance(target, str) else ""
        if top and top != "mprun" and top not in _libraries():
            roots += _location(top)
    return tuple(roots)


def _location(top: str) -> list[Path]:
    """The directories of a top-level package (a namespace package's several), or the file of a module."""
    module = sys.modules.get(top)
    if module is not None:
        paths = list(getattr(module, "__path__", None) or []) or [getattr(module, "__file__", None)]
    else:
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):  # __main__ without a spec (a notebook), a parent that fails to import
            return []
        if spec is None:
            return []
        paths = list(spec.submodule_search_locations or []) or [spec.origin if spec.has_location else None]
    return [Path(p).resolve() for p in paths if p]


@functools.cache
def _libraries() -> frozenset[str]:
    """The top-level import names of the distributions mprun requires (torch, hydra, mlflow, ...)."""
    try:
        required = {re.split(r"[\s;<>=!~\[]", r, maxsplit=1)[0] for r in metadata.requires("mprun") or []}
    except metadata.PackageNotFoundError:  # run from a checkout without an install (PYTHONPATH)
        return frozenset()
    wanted = {_canonical(r) for r in required}
    return frozenset(
        top for top, dists in metadata.packages_distributions().items() if any(_canonical(d) in wanted for d in dists)
    )


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _is_users(filename: str, roots: tuple[Path, ...]) -> bool:
    path = Path(filename).resolve()
    return any(path == root or root in path.parents for root in roots)


def user_frames(error: BaseException, roots: tuple[Path, ...]) -> str:
    """The frames of `error` (and of the errors it came from) that are in the user's code, formatted as Python's
    traceback formats them; "" when none is."""
    if not roots:
        return ""
    seen, chain = set(), []
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    for e in reversed(chain):  # the innermost error's frames: where the user's code raised
        frames = [f for f in traceback.extract_tb(e.__traceback__) if _is_users(f.filename, roots)]
        if frames:
            return "".join(traceback.format_list(frames)).rstrip("\n")
    return ""


def explained(error: BaseException, targets: dict[str, Any]) -> Optional[UserCodeError]:
    """For an error that escaped a run: a UserCodeError showing the user's frames, if the user's code (a model or
    dataset, `targets`: {group: its _target_}) is where it was raised; None if it is not (an error of mprun's own).
    The message names the target whose code raised (the innermost of the user's frames)."""
    if isinstance(error, MprunError):
        return None
    frames = user_frames(error, roots_of(targets.values()))
    if not frames:
        return None
    innermost = frames.rsplit('File "', 1)[-1].split('"', 1)[0]
    where = [f"{group}._target_={t}" for group, t in targets.items() if _is_users(innermost, roots_of([t]))]
    return UserCodeError(f"your code raised {_said(error)} ({', '.join(where)})", frames)


def _said(error: BaseException) -> str:
    return f"{type(error).__name__}: {first_line(error, '(no message)')}"

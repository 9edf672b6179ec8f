"""Where configs come from: mprun's own conf/, and a project's conf/ in the launch directory, searched first.

A wheel ships conf/ inside the package (mprun/conf); a checkout, or an editable install of one, has it beside the
package. A project's `./conf/model/wide.yaml` is `model=wide`, and a project file with the path of one of mprun's
(`./conf/model/simple_cnn.yaml`) replaces it. Hydra searches its primary config directory before a `--config-dir`,
so the project's directory is the primary one and mprun's follows it; mprun's primary config is `mprun.yaml`, not
`config.yaml`, so that a project's own Hydra app config does not replace it by accident. A command line that names
a `--config-dir` itself keeps Hydra's meaning: mprun's conf/ first, that directory after it.
Imports nothing heavy: --help and errors need no torch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

_PACKAGE = Path(__file__).resolve().parent
SHIPPED = _PACKAGE / "conf" if (_PACKAGE / "conf").is_dir() else _PACKAGE.parent / "conf"
_FLAGS = ("--config-dir", "-cd")
PRIMARY = "mprun"  # conf/mprun.yaml


def project_dir(cwd: Path) -> Optional[Path]:
    """The launch directory's conf/, if it has one that is not mprun's own (a checkout run from its root)."""
    here = (cwd / "conf").resolve()
    return here if here.is_dir() and here != SHIPPED else None


def given_dir(argv: list[str]) -> Optional[str]:
    """The directory a command line's --config-dir (-cd) names, if it names one."""
    for i, arg in enumerate(argv):
        if arg in _FLAGS and i + 1 < len(argv):
            return argv[i + 1]
        for flag in _FLAGS:
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
    return None


def search_order(argv: list[str], cwd: Path) -> tuple[str, list[str], Optional[Path]]:
    """The primary config directory and the command line (without the program name) that put a project's conf/
    before mprun's: (its directory, argv with mprun's as --config-dir, it) where the launch directory has one and
    the command line names no --config-dir; else (mprun's, argv, None)."""
    if given_dir(argv) is None:
        found = project_dir(cwd)
        if found is not None:
            return str(found), ["--config-dir", str(SHIPPED), *argv], found
    return str(SHIPPED), argv, None


def replaced(project: Path) -> list[str]:
    """The project's config files that replace one of mprun's with other contents, as paths under conf/."""
    out = []
    for path in sorted(project.rglob("*.yaml")):
        rel = path.relative_to(project)
        shipped = SHIPPED / rel
        if shipped.is_file() and shipped.read_bytes() != path.read_bytes():
            out.append(rel.as_posix())
    return out


def replacement_notes(project: Path) -> list[str]:
    """One line per project file that replaces one of mprun's: a user option of the same name wins."""
    notes = []
    for rel in replaced(project):
        group, _, option = rel[: -len(".yaml")].rpartition("/")
        what = f"{group}={option}" if group else f"its primary config {rel}"
        notes.append(f"mprun: {project / rel} replaces mprun's own {what}")
    return notes


def launch_dir_importable(cwd: Path) -> None:
    """Put the launch directory on sys.path, as `python -m mprun` does and the `mprun` script does not: a project's
    package beside its conf/ (`_target_: mylab.nets.Wide`) imports either way."""
    where = str(cwd.resolve())
    if where not in (os.path.abspath(p or ".") for p in sys.path):
        sys.path.insert(0, where)

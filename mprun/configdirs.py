"""Where configs come from: mprun's own conf/, and a project's conf/ in the launch directory, searched first.

A wheel ships conf/ inside the package (mprun/conf); a checkout, or an editable install of one, has it beside the
package. A project's `./conf/model/wide.yaml` is `model=wide`, and a project file with the path of one of mprun's
(`./conf/model/simple_cnn.yaml`) replaces it: Hydra's `--config-dir`, which mprun adds for the launch directory's
conf/ unless the command line names a directory itself. Imports nothing heavy: --help and errors need no torch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

_PACKAGE = Path(__file__).resolve().parent
SHIPPED = _PACKAGE / "conf" if (_PACKAGE / "conf").is_dir() else _PACKAGE.parent / "conf"
_FLAGS = ("--config-dir", "-cd")


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


def with_project(argv: list[str], cwd: Path) -> tuple[list[str], Optional[Path]]:
    """argv (without the program name) with the launch directory's conf/ as Hydra's --config-dir, unless it names
    one itself; and the project directory that is searched first, if any."""
    given = given_dir(argv)
    if given is not None:
        return argv, Path(given).resolve()
    found = project_dir(cwd)
    return (["--config-dir", str(found), *argv], found) if found else (argv, None)


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

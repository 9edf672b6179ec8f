"""The package's shape, checked: each kind of decision has one home, interfaces stay narrow, nothing is dead.
These read mprun/'s source (no training), so they cost a fraction of a second."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

import mprun

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mprun"
SOURCES = sorted(PACKAGE.rglob("*.py"))  # subpackages included


def _module(path: Path) -> str:
    """mprun/precision/auto.py -> mprun.precision.auto; a package's __init__.py is the package."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _public_functions(tree: ast.Module) -> list[tuple[str, ast.FunctionDef]]:
    """(qualified name, node) of module-level functions and class methods not named with a leading underscore."""
    found = [(f.name, f) for f in tree.body if isinstance(f, ast.FunctionDef)]
    for cls in (c for c in tree.body if isinstance(c, ast.ClassDef) and not c.name.startswith("_")):
        found += [(f"{cls.name}.{f.name}", f) for f in cls.body if isinstance(f, ast.FunctionDef)]
    return [(name, f) for name, f in found if not name.rsplit(".", 1)[-1].startswith("_")]


def test_only_tracking_imports_mlflow() -> None:
    """tracking/ says it is the only importer of mlflow: the rest of mprun goes through its Tracker and Store."""
    importers = set()
    for path in SOURCES:
        for node in ast.walk(_tree(path)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if any(n == "mlflow" or n.startswith("mlflow.") for n in names):
                importers.add(_module(path))
    assert importers == {"mprun.tracking.store", "mprun.tracking.mlflow_tracker", "mprun.tracking.logged_model"}


def test_every_mprun_exception_type_is_defined_in_errors() -> None:
    """errors.py says it defines mprun's exception types; the CLI turns exactly those (MprunError) into one line."""
    from mprun import errors

    defined = {}
    for path in SOURCES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ClassDef) and any(
                isinstance(b, ast.Name) and b.id.endswith(("Error", "Exception", "Lost")) for b in node.bases
            ):
                defined[node.name] = path.name
    # interrupts.StopNow is a KeyboardInterrupt (a signal, not an error); cli.JobFailed is Hydra's way to end a job.
    assert {k: v for k, v in defined.items() if v != "errors.py" and k != "JobFailed"} == {}
    assert all(
        issubclass(getattr(errors, k), errors.MprunError)
        for k, v in defined.items()
        if v == "errors.py" and k != "MprunError"
    )


def test_no_precision_name_is_compared_outside_precision() -> None:
    """Other modules ask the Precision object (can_skip_steps, fsdp_policy, stop_hint, ...) instead."""
    pattern = re.compile(
        r"""\.name\.value\s*[!=]=|[!=]=\s*["'](fp16|bf16|fp32|tf32|fp8|bf16_pure)["']|"""
        r"""["'](fp16|bf16|fp32|tf32|fp8|bf16_pure)["']\s*[!=]=|"""
        r"""in \(["'](fp16|bf16)"""
    )
    offenders = [
        f"{p.name}:{i}: {line.strip()}"
        for p in SOURCES
        if p.parent.name != "precision"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


@pytest.mark.parametrize("path", SOURCES, ids=[_module(p) for p in SOURCES])
def test_no_public_function_takes_more_than_seven_positional_parameters(path: Path) -> None:
    """Long positional lists want a built object (Training, Components) and keyword-only options; a constructor
    counts too."""
    tree = _tree(path)
    inits = [
        (f"{c.name}.__init__", f)
        for c in tree.body
        if isinstance(c, ast.ClassDef)
        for f in c.body
        if isinstance(f, ast.FunctionDef) and f.name == "__init__"
    ]
    wide = []
    for name, f in _public_functions(tree) + inits:
        positional = [a.arg for a in f.args.posonlyargs + f.args.args if a.arg not in ("self", "cls")]
        if len(positional) > 7:
            wide.append(f"{name}: {len(positional)}")
    assert wide == []


def _references(path: Path, modules: set[str]) -> tuple[set[tuple[str, str]], set[str], dict[str, str]]:
    """What a file refers to: (module, name) pairs it resolves through its imports (`from m import f`, `m.f`, a
    _target_ string, a bare name of its own module), the attribute names it reads on other objects, and, for a
    package's __init__, the names it re-exports (name -> the module they come from)."""
    own = _module(path) if path.is_relative_to(PACKAGE) else ""
    tree = _tree(path)
    aliases: dict[str, str] = {}  # a local name -> the mprun module it is
    resolved: set[tuple[str, str]] = set()
    exported: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update({a.asname or a.name: a.name for a in node.names if a.name in modules and a.asname})
        elif isinstance(node, ast.ImportFrom) and node.module in modules:
            for a in node.names:
                if f"{node.module}.{a.name}" in modules:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                elif path.name == "__init__.py" and node.module.startswith(own + "."):
                    exported[a.asname or a.name] = node.module
                else:
                    resolved.add((node.module, a.name))
    attributes = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            base = node.value
            dotted = ast.unparse(base) if isinstance(base, (ast.Name, ast.Attribute)) else ""
            if aliases.get(dotted, dotted) in modules:
                resolved.add((aliases.get(dotted, dotted), node.attr))
            else:
                attributes.add(node.attr)
        elif isinstance(node, ast.Name) and own:
            resolved.add((own, node.id))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value:
            resolved.add(tuple(node.value.rsplit(".", 1)))  # a _target_
    return resolved, attributes, exported


def test_no_public_function_or_method_is_dead() -> None:
    """Every public function is referred to from mprun/ or bench/ through its own module (an import, `module.f`, a
    config's _target_, a package's re-export that is itself used), or is mprun's Python API; every public method is
    called by name somewhere (an object's type is not known from the source), or implements a base class's method
    (Hydra's Callback hooks, the Tracker interface)."""
    modules = {_module(p) for p in SOURCES}
    files = SOURCES + sorted((ROOT / "bench").glob("*.py")) + sorted((ROOT / "conf").rglob("*.yaml"))
    resolved: set[tuple[str, str]] = set()
    attributes: set[str] = set()
    exported: dict[tuple[str, str], str] = {}
    for path in files:
        if path.suffix == ".yaml":  # a _target_ in a config file
            resolved |= {tuple(t.rsplit(".", 1)) for t in re.findall(r"_target_:\s*([\w.]+)", path.read_text())}
            continue
        found, read, reexports = _references(path, modules)
        resolved |= found
        attributes |= read
        exported |= {(_module(path), name): origin for name, origin in reexports.items()}
    resolved |= {(exported[ref], ref[1]) for ref in list(resolved) if ref in exported}
    resolved |= {("mprun.api", name) for name in mprun.__all__}  # the Python API: users call it
    dead = []
    for path in SOURCES:
        module = importlib.import_module(_module(path))
        for name, _ in _public_functions(_tree(path)):
            owner, _, attr = name.rpartition(".")
            if not owner:
                if (_module(path), name) not in resolved:
                    dead.append(f"{_module(path)}:{name}")
                continue
            if attr in attributes or (_module(path), attr) in resolved:
                continue
            cls = getattr(module, owner)  # a method a base class declares is called through the base
            if not any(attr in vars(base) for base in cls.__mro__[1:]):
                dead.append(f"{_module(path)}:{name}")
    assert dead == []


def test_the_wheel_lists_every_subpackage() -> None:
    """pyproject lists the packages (conf/ ships as mprun.conf through package-dir, which find cannot see): a
    subpackage missing there would be missing from the wheel."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {_module(p) for p in PACKAGE.rglob("__init__.py")}
    assert found | {"mprun.conf"} == listed


def _imports(path: Path) -> set[str]:
    """The mprun modules a module imports when it is imported: module-level imports, not those under
    `if TYPE_CHECKING:` (annotations only) or inside functions (deferred)."""
    modules = {_module(p) for p in SOURCES}
    found = set()
    for node in _tree(path).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            continue
        for n in ast.walk(node) if isinstance(node, (ast.Import, ast.ImportFrom, ast.If, ast.Try)) else []:
            if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("mprun"):
                found |= {f"{n.module}.{a.name}" if f"{n.module}.{a.name}" in modules else n.module for a in n.names}
            elif isinstance(n, ast.Import):
                found |= {a.name for a in n.names if a.name.startswith("mprun")}
    return (found & modules) - {_module(path)}


def test_no_import_cycles() -> None:
    """Rooms import downwards: no module reaches itself through the modules it imports."""
    graph = {_module(p): _imports(p) for p in SOURCES}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        for dep in sorted(graph[module]):
            if dep in path:
                cycles.append(" -> ".join([*path[path.index(dep) :], dep]))
            elif dep not in done:
                visit(dep, [*path, dep])
        done.add(module)

    done: set[str] = set()
    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert cycles == []


@pytest.mark.parametrize("path", SOURCES, ids=[_module(p) for p in SOURCES])
def test_no_module_is_over_400_lines(path: Path) -> None:
    """A module over ~400 lines is usually two rooms (STYLE.md)."""
    assert len(path.read_text().splitlines()) <= 400


@pytest.mark.parametrize("path", SOURCES, ids=[_module(p) for p in SOURCES])
def test_no_function_is_over_60_lines(path: Path) -> None:
    """A function over 60 lines (its docstring included) is several steps that want names of their own."""
    long = [
        f"{f.name} (line {f.lineno}): {f.end_lineno - f.lineno + 1}"
        for f in ast.walk(_tree(path))
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f.end_lineno - f.lineno + 1 > 60
    ]
    assert long == []


# What a function may import inside itself, and why: a package whose import costs time that most runs or answers do
# not need to pay, and mprun's own modules that bring torch to the side of the line that has none.
DEFERRED = {
    "torch": "the FSDP and checkpoint parts (0.5 s each), and torch where the module itself is torch-free",
    "torchvision": "an image dataset or model that asks for it",
    "timm": "a timm model",
    "torchao": "fp8",
    "transformers": "a Hugging Face model",
    "matplotlib": "the report's plots",
    "scipy": "the report's seed comparison",
    "mlflow": "1.2 s: only when a store is used",
    "sqlalchemy": "a database store's probe",
    "submitit": "the SLURM launcher's extra",
    "mprun.api": "`import mprun` stays light: hydra and torch load with mprun.run",
    "mprun.cli": "after the signal handlers: a signal while Hydra and the config load is handled",
    "mprun.experiment": "torch: --help and a bad value answer without it",
    "mprun.build": "torch: a sweep's callbacks load with the config",
    "mprun.summary": "torch: a bad value's clean-up runs without it",
}


@pytest.mark.parametrize("path", SOURCES, ids=[_module(p) for p in SOURCES])
def test_function_level_imports_defer_something_heavy_and_say_why(path: Path) -> None:
    """An import inside a function is only for what DEFERRED lists, with a comment on its line or the line above."""
    lines = path.read_text().splitlines()
    wrong = []
    for f in ast.walk(_tree(path)):
        if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(f):
            if isinstance(node, ast.ImportFrom):
                names = [node.module if node.module != "mprun" else f"mprun.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                known = name in DEFERRED or name.split(".", 1)[0] in DEFERRED
                said = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
                if not (known and (said or _first_of_a_run(lines, node.lineno))):
                    wrong.append(f"{f.name} (line {node.lineno}): {name}")
    assert wrong == []


def _first_of_a_run(lines: list[str], lineno: int) -> bool:
    """Whether the import at `lineno` continues a block of imports whose first line gives the reason."""
    i = lineno - 2
    while i >= 0 and lines[i].strip().startswith(("import ", "from ")):
        if "#" in lines[i] or lines[i - 1].strip().startswith("#"):
            return True
        i -= 1
    return False

"""mprun: a declarative, config-driven experiment runner for mixed-precision training.

From Python: `mprun.run([...overrides])` runs one experiment and returns its summary; `mprun.load_report(name)` reads
a sweep's comparison report (mprun.api).
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_report", "run"]


def __getattr__(name: str) -> Any:
    # `import mprun` stays light (the CLI's --help, `mprun.__version__`): the API and Hydra load on first use.
    if name in __all__:
        from mprun import api  # hydra and torch load here, on first use

        return getattr(api, name)
    raise AttributeError(f"module 'mprun' has no attribute {name!r}")

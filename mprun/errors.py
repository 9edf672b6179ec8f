"""The one exception type for a user's mistake: shown as a short message, never a traceback."""


class ConfigError(ValueError):
    """Bad user input (config value, missing data, unusable device): message names the key and the valid choices."""


def first_line(text: object, default: str = "") -> str:
    """The first line of a (possibly multi-line) message, for one-line errors; `default` when it is empty."""
    stripped = str(text).strip()
    return stripped.splitlines()[0] if stripped else default


def require(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless ok."""
    if not ok:
        raise ConfigError(message)


class NumericsError(RuntimeError):
    """The numerics policy stopped the run; `report` says why and what was seen."""

    def __init__(self, diagnosis: str, report: dict) -> None:
        super().__init__(diagnosis)
        self.diagnosis = diagnosis
        self.report = report

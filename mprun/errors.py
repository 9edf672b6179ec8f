"""mprun's error types: every error mprun explains itself derives from MprunError, which the CLI prints as one short
line (exit 2 for a user's mistake, 1 otherwise), never a traceback. No other module defines an error; the two other
exception types are not errors: interrupts.StopNow is a stop signal (a KeyboardInterrupt), cli.JobFailed is how
Hydra is told that a sweep job failed with an error already explained."""


class MprunError(Exception):
    """An error mprun has explained: its message says what happened and what to do."""


class ConfigError(MprunError, ValueError):
    """Bad user input (config value, missing data, unusable device): message names the key and the valid choices."""


class StoreUnusable(ConfigError):
    """A tracking store that cannot be reached or used (a dead server, a refused database, a read-only file): what
    tracking.on_unreachable=local falls back from. A mistake about what is in a store that works is a ConfigError."""


class NumericsError(MprunError, RuntimeError):
    """The numerics policy stopped the run; `report` says why and what was seen."""

    def __init__(self, diagnosis: str, report: dict) -> None:
        super().__init__(diagnosis)
        self.diagnosis = diagnosis
        self.report = report


class UserCodeError(MprunError):
    """The user's own code (a model or dataset named by `_target_`) raised: the message names the key, and `frames`
    are the user's frames, shown below it without mprun's."""

    def __init__(self, message: str, frames: str) -> None:
        super().__init__(f"{message}\n{frames}")
        self.frames = frames


class TrackingLost(MprunError, RuntimeError):
    """The tracking store went away mid-run and tracking.on_unreachable=fail says stop."""


def first_line(text: object, default: str = "") -> str:
    """The first line of a (possibly multi-line) message, for one-line errors; `default` when it is empty."""
    stripped = str(text).strip()
    return stripped.splitlines()[0] if stripped else default


def require(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless ok."""
    if not ok:
        raise ConfigError(message)

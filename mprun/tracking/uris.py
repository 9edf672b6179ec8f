"""Tracking store URIs: how one is shown (a password hidden), what kind of store it names, the default one."""

from __future__ import annotations

import re
from pathlib import Path

from mprun.errors import StoreUnusable, first_line


def shown(uri: str) -> str:
    """A store URI as it may be printed, logged or recorded: a password in it (postgresql://user:PASSWORD@host/db)
    replaced by ***. Params, tags, logs and messages are read by everyone who can read the store."""
    return re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", uri)


def unusable(uri: str, why: str) -> StoreUnusable:
    """The error for a tracking store that cannot be used."""
    why = first_line(why, "unknown error")
    return StoreUnusable(
        f"cannot use MLflow tracking store {shown(uri)}: {why[:300]}. "
        "Fix tracking.uri / MLFLOW_TRACKING_URI, or run with tracking=none"
    )


def is_remote(uri: str) -> bool:
    """A tracking server (as opposed to a database or a directory): the only kind of store that can go away."""
    return uri.startswith(("http://", "https://"))


def is_database(uri: str) -> bool:
    """A database server as the store (MLflow's SQLAlchemy store, without an mlflow server in between)."""
    return uri.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "mysql", "mssql")


def default_uri(output_root: str) -> str:
    """sqlite database in the output root, as an absolute path so it does not depend on the cwd."""
    return f"sqlite:///{Path(output_root).absolute() / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// store; None for any other store."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None

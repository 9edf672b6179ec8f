"""Reaching a tracking store: probes that fail in seconds where MLflow's client would retry for minutes, and the lock
with which the first openers of a new sqlite store take turns."""

from __future__ import annotations

import base64
import contextlib
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator

from filelock import FileLock

from mprun.errors import ConfigError
from mprun.tracking.uris import shown, sqlite_path, unusable


def probe_server(uri: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds on a tracking server that does not answer, or whose own store (its database) does not: MLflow's
    client retries with backoff for minutes (measured: 4 min 13 s against a closed port) before giving up. The
    server's /health answers without touching its database (measured: OK while its PostgreSQL was stopped), so a
    request that reads the store follows, with MLflow's request timeout: a stopped database hangs it (the server
    retries its connection for ~100 s), a broken one answers 5xx."""
    base = uri.rstrip("/")
    if urllib.parse.urlsplit(base).password is not None:  # urllib took user:password@ for a host name (a DNS error)
        raise ConfigError(
            f"tracking.uri {shown(uri)} carries a user name and password: give the server's address alone, and the "
            "credentials in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, which MLflow's client sends and "
            "mprun never records"
        )
    try:
        urllib.request.urlopen(f"{base}/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return  # it answered: auth or routing is MLflow's business, checked by the first real request
    except (urllib.error.URLError, OSError) as e:
        raise unusable(uri, f"no answer from the server ({getattr(e, 'reason', e)})") from e
    wait = float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT") or 15)
    behind = "its database may be down or refusing it: see the server's log"
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/experiments/search?max_results=1", headers=_credentials())
    try:
        urllib.request.urlopen(request, timeout=wait).close()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise ConfigError(_refused(uri, e.code)) from None
        if e.code >= 500:  # 4xx: it answered (a login, a proxy's rules), which the first real request reports
            raise unusable(uri, f"the server answers, but reading its store failed (HTTP {e.code}): {behind}") from e
    except (urllib.error.URLError, OSError) as e:
        why = f"the server answers, but a request that reads its store got no answer in {wait:g} s: {behind}"
        raise unusable(uri, why) from e


def _credentials() -> dict[str, str]:
    """The HTTP basic-auth header MLflow's client sends, from the same variables."""
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if not user or password is None:
        return {}
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def _refused(uri: str, code: int) -> str:
    """Why an authenticated server refused to let this process read its experiments, and what to set."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if code == 403:
        return f"MLflow tracking server {shown(uri)} does not let user {user!r} read its experiments (HTTP 403)"
    if not _credentials():
        return (
            f"MLflow tracking server {shown(uri)} wants a user name and password (HTTP 401): set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        )
    return (
        f"MLflow tracking server {shown(uri)} refused user {user!r}: authentication failed (HTTP 401); check "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    )


def probe_database(uri: str, timeout_s: int = 5) -> None:
    """Fail at once on a database store that refuses the connection (a wrong password, a missing database, no
    server): MLflow's SQLAlchemy store retries for ~100 s (10 tries with backoff) before saying why."""
    import sqlalchemy  # 0.2 s: only a database store is probed with it

    args = {"connect_timeout": timeout_s} if uri.startswith(("postgresql", "mysql")) else {}
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=args)
    except ImportError as e:  # the driver: psycopg2 for postgresql://, from the server extra
        raise unusable(uri, f"{e} (its driver: pip install -e '.[server]' for PostgreSQL)") from e
    except Exception as e:  # a URI SQLAlchemy cannot parse
        raise unusable(uri, str(e)) from e
    try:
        engine.connect().close()
    except Exception as e:  # every driver raises its own types; the driver's message says why
        raise unusable(uri, str(getattr(e, "orig", None) or e)) from e
    finally:
        engine.dispose()


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """A file lock beside a sqlite store for its first use: MLflow creates the tables on first open,
    and parallel first openers race (most of them fail). Other backends need no lock. A store in a directory
    this process cannot write (read-only, another user's) is an error that says so: a run must write to it."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(f"{db}.lock", timeout=300)
        lock.acquire()
    except OSError as e:
        raise unusable(uri, f"cannot write in {db.parent} ({e.strerror or e})") from e
    try:
        if db.exists() and not os.access(db, os.W_OK):  # sqlite would fail on the run's first write, in a traceback
            raise unusable(uri, f"{db} is read-only")
        yield
    finally:
        lock.release()

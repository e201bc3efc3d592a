"""The MLflow tracking store, opened once per process under a lock.

MLflow creates (and upgrades) a sqlite store's tables the first time a process touches it, with
no lock of its own: two processes doing that at once on a new ``mlflow.db`` — two `spinemri tune`
workers started together, `mlflow run` next to a test polling the store — break each other's
migration (``table experiments already exists``, ``CircularDependencyError``). Every spinemri
command that uses MLflow first calls :func:`open_tracking_store`, which does that first touch
while holding an exclusive lock on a file next to the database.
"""

from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path
from typing import Iterator

import mlflow

from spinemri.errors import UserError
from spinemri.redact import redact
from spinemri.tracking.runs import reap_dead_runs

LOCK_SUFFIX = ".spinemri-lock"


@contextlib.contextmanager
def exclusive_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing) for the block."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for any other store or an in-memory one."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


REACH_TIMEOUT_S = 5.0  # seconds: connect, then the answer; MLflow alone retries for minutes


def check_server(uri: str, timeout: float = REACH_TIMEOUT_S) -> None:
    """Refuse, within ``timeout`` seconds, a tracking server that does not answer (MLflow's own client retries a
    refused connection for minutes before it says so). Any HTTP answer will do: the store's own calls say more."""
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except requests.RequestException as exc:
        reason = type(exc).__name__
        raise UserError(f"cannot reach the MLflow tracking server at {redact(uri)} ({reason} within {timeout:g} s); "
                        "start it, or set MLFLOW_TRACKING_URI to a server that is up or to a "
                        "sqlite:///path/mlflow.db store") from None


def open_tracking_store(uri: str | None = None, *, reap: bool = True) -> str:
    """Create or upgrade the tracking store's tables now, one process at a time; returns the URI.

    Only local sqlite stores need the lock; a server or a PostgreSQL store is opened as is. With
    ``reap``, runs left RUNNING by spinemri processes of this host that have died are then marked
    FAILED (:func:`spinemri.tracking.runs.reap_dead_runs`).
    """
    uri = uri or mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        check_server(uri)
    database = sqlite_path(uri)
    if database is not None and not database.parent.is_dir():
        raise UserError(f"the MLflow store {uri} cannot be created: its folder {database.parent} does not exist; "
                        f"create it (mkdir -p {database.parent}) or point MLFLOW_TRACKING_URI at another "
                        "sqlite:///path/mlflow.db")
    with contextlib.ExitStack() as stack:
        if database is not None:
            try:
                stack.enter_context(exclusive_lock(f"{database}{LOCK_SUFFIX}"))
            except OSError:  # a read-only folder: no process can create tables there anyway
                pass
        try:
            client = mlflow.MlflowClient(uri)  # a new sqlite store's tables are created here: under the lock
            client.search_experiments(max_results=1)
        except Exception as exc:  # noqa: BLE001 - MLflow, SQLAlchemy and HTTP errors of every kind
            raise UserError(redact(f"cannot open the MLflow store {uri} ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0][:300] if str(exc) else ''}); check "
                                   "MLFLOW_TRACKING_URI and that its server or database is up")) from None
    if reap:
        reap_dead_runs(client)
    return uri

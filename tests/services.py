"""Real servers for the tests: a PostgreSQL cluster in a temp folder, an MLflow tracking server on it, and an
Orthanc PACS with its DICOMweb plugin.

Each starts on 127.0.0.1 and a free port and is stopped (its process group) when the context ends.
PostgreSQL refuses to run as root: as root, the cluster's folder is given to the ``postgres`` user
and the server runs as that user (``runuser``), as Debian's package sets it up.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bindir() -> Path | None:
    """The folder with initdb and pg_ctl: $SPINEMRI_PG_BINDIR, PATH, Debian's and Homebrew's places."""
    candidates = [os.environ.get("SPINEMRI_PG_BINDIR", "")]
    on_path = shutil.which("initdb")
    candidates.append(str(Path(on_path).parent) if on_path else "")
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    candidates += sorted(glob.glob("/opt/homebrew/opt/postgresql*/bin"), reverse=True)
    candidates += sorted(glob.glob("/usr/local/opt/postgresql*/bin"), reverse=True)
    for folder in filter(None, candidates):
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    return None


class Postgres:
    """One running cluster: ``url(database)`` is a SQLAlchemy URL, ``create_database`` makes one."""

    def __init__(self, port: int, user: str = "postgres"):
        self.port, self.user = port, user

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres",
                             autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@contextlib.contextmanager
def postgres_server():
    """Yield a :class:`Postgres` on a fresh cluster in a new temp folder (short: it holds the server's socket),
    removed afterwards; skip the test where PostgreSQL is absent."""
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL (initdb, pg_ctl) not found: `make test` installs it on Debian/Ubuntu as root; "
                    "elsewhere install PostgreSQL or set SPINEMRI_PG_BINDIR")
    folder = Path(tempfile.mkdtemp(prefix="spinemri-pg-"))
    data, log = folder / "pgdata", folder / "postgres.log"
    as_user: list[str] = []
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                    "--no-sync", "-E", "UTF8"], check=True, capture_output=True)
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    started = subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log),
                              "-w", "-t", "60", "start"], capture_output=True, text=True)
    if started.returncode:
        log_text = log.read_text() if log.exists() else ""
        raise RuntimeError(f"PostgreSQL did not start: {started.stderr}\n{log_text[-2000:]}")
    try:
        yield Postgres(port)
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts: Path, log: Path):
    """Yield the URL of an ``mlflow server`` on ``backend_uri`` that proxies artifacts to ``artifacts``."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # Without MLflow's GenAI job consumers (seven more processes): it starts in about half the time
    # and stops in seconds instead of about 20 on two busy cores.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(mlflow_cli), "server", "--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts),
             "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with DIRECT.open(f"{url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - started > 180:
                raise RuntimeError(f"mlflow server did not answer /health within 180 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@contextlib.contextmanager
def orthanc_server():
    """Yield a running :class:`spinemri.pacs.orthanc.Orthanc` with an empty storage in a new temp folder, removed
    afterwards; skip the test where Orthanc or its DICOMweb plugin is absent."""
    from spinemri.pacs.orthanc import find_orthanc, local_orthanc

    if find_orthanc() is None:
        pytest.skip("Orthanc with its DICOMweb plugin not found: `make test` installs them (orthanc, "
                    "orthanc-dicomweb) on Debian/Ubuntu as root; elsewhere install them or set SPINEMRI_ORTHANC "
                    "and SPINEMRI_ORTHANC_DICOMWEB")
    with local_orthanc() as server:
        yield server

"""Start a real `mlflow models serve` process for a registered model and talk to it over HTTP."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

# Straight to 127.0.0.1, whatever proxy the environment (or an earlier test) configured.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_model(model_uri: str, tracking_uri: str, log: Path, extra_env: dict | None = None):
    """Yield (url, process) once the server answers /ping; stop its process group afterwards."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    # `mlflow models serve` downloads the model into a temporary folder it never removes: keep it in the test's.
    tmp = log.parent / f"{log.stem}-tmp"
    tmp.mkdir(exist_ok=True)
    env.update(MLFLOW_TRACKING_URI=tracking_uri, TMPDIR=str(tmp),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", **(extra_env or {}))
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(mlflow_cli), "models", "serve", "-m", model_uri, "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    started, last_error = time.monotonic(), None
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"mlflow models serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with DIRECT.open(f"{url}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except (OSError, http.client.HTTPException) as exc:
                last_error = exc
            if time.monotonic() - started > 300:
                pytest.fail(f"mlflow models serve on port {port} did not answer /ping within 300 s (last error: "
                            f"{last_error!r}):\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        print(f"server answered /ping {time.monotonic() - started:.1f} s after start")
        yield url, process
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def post(url: str, payload, timeout: float = 60) -> tuple[int, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        with DIRECT.open(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def group_rss(pgid: int) -> int:
    """Resident bytes of every process in the process group (the server and its workers)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # field 5 of stat: the process group
            total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")  # field 24: resident pages
    return total


class PeakRss:
    """Samples the process group's resident memory every 20 ms while the block runs; ``peak`` in bytes."""

    def __init__(self, pgid: int):
        self.pgid, self.peak, self._stop = pgid, 0, threading.Event()

    def __enter__(self) -> "PeakRss":
        self.idle = group_rss(self.pgid)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, group_rss(self.pgid))
            time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, group_rss(self.pgid))



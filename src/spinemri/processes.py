"""Processes and what they leave behind: worker pools that die with their parent, and staging
folders that the next run can tell from work in progress.

A command killed with SIGKILL runs no cleanup. Two things make that safe: every worker process asks
the kernel to end it when its parent dies (Linux's parent-death signal; elsewhere a watcher thread),
and every folder built atomically is staged under a name that records the host and process that
build it, so that a later command removes the staging folders of processes that no longer exist.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Iterator

from spinemri.errors import WorkerDied

_PR_SET_PDEATHSIG = 1


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, but belongs to someone else
        return True
    return True


def die_with_parent(parent: int) -> None:
    """End this process as soon as ``parent`` (the process that started it) dies, however it dies.

    Called first thing in a worker process (a pool's initializer). On Linux the kernel sends SIGKILL
    when the parent exits; elsewhere a daemon thread checks the parent every half second.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
        else:
            if os.getppid() != parent:  # the parent died before the request took effect
                os._exit(1)
            return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """A process pool whose workers end when this process ends, even by SIGKILL.

    Workers are started fresh ("spawn", as on macOS), never forked: a fork copies a process that
    may hold TensorFlow's threads and gigabytes of heap, and such a child can die at random (a lock
    held by a thread it lacks) or be killed for the memory its copy-on-write pages take.
    On an error (or Ctrl-C) in the block, work not yet started is cancelled rather than finished.
    """
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=die_with_parent, initargs=(os.getpid(),))
    try:
        yield pool
    except BrokenProcessPool as error:
        pool.shutdown(wait=True, cancel_futures=True)
        raise WorkerDied(
            f"a worker process ended abruptly ({workers} were started). The usual causes: the machine ran out "
            "of memory (use fewer workers), the worker was killed, or a Python script that starts workers is "
            "missing its `if __name__ == \"__main__\":` guard (workers are started fresh and import the main "
            "script, so an unguarded script starts its work again in each of them). With one worker "
            "(--workers 1) everything runs in this process.") from error
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


# --- this process, as recorded on what it creates ------------------------------------------------

HOST = socket.gethostname()


def process_id() -> str:
    """'<host>:<pid>:<start time>' of this process: names it on runs and trials, unlike a pid that is reused."""
    return f"{HOST}:{os.getpid()}:{_start_time(os.getpid())}"


def process_gone(identity: str) -> bool:
    """True when the process named by :func:`process_id` ran on this host and no longer exists.

    A process on another host is never declared gone: it cannot be checked from here.
    """
    parts = identity.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != HOST or not parts[1].isdigit():
        return False
    pid, started = int(parts[1]), parts[2]
    if not pid_alive(pid):
        return True
    return started not in ("", "?") and _start_time(pid) not in ("?", started)  # the pid now names another process


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), '?' where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        return fields[19].decode()
    except (OSError, IndexError):
        return "?"


# --- staging folders ------------------------------------------------------------------------------

_STAGING = re.compile(r"^\.?(?P<name>.+)\.partial-(?P<host>.+)-(?P<pid>\d+)-(?P<token>[0-9a-f]{6})$")


def staging_path(final: Path) -> Path:
    """Where to build ``final`` before renaming it into place: a hidden sibling naming this process."""
    return final.with_name(f".{final.name}.partial-{HOST}-{os.getpid()}-{uuid.uuid4().hex[:6]}")


def remove_stale_staging(folder: Path) -> list[Path]:
    """Remove the staging folders in ``folder`` whose building process (on this host) has died.

    Returns what was removed. Staging folders of live processes, and of other hosts sharing the
    folder, are left alone.
    """
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _STAGING.match(entry.name)
        if match and match["host"] == HOST and not pid_alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed

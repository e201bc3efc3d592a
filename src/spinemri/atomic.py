"""Output files that appear whole or not at all: written beside their target, then renamed into place."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import pandas as pd

from spinemri.processes import staging_path


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """A hidden path beside ``target`` to write to; renamed onto ``target`` when the block succeeds.

    On an error (or Ctrl-C) the partial file is removed and ``target`` is left as it was. A file left
    by a process killed with SIGKILL is named after that process (spinemri.processes.staging_path).
    """
    target = Path(target)
    partial = staging_path(target)
    try:
        yield partial
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def write_csv(frame: pd.DataFrame, path: str | Path, **kwargs) -> None:
    """``frame.to_csv(path, index=False)``, atomically."""
    with atomic_path(path) as partial:
        frame.to_csv(partial, index=False, **kwargs)

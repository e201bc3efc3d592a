"""Output files that appear whole or not at all: written beside their target, then renamed into place."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd

from spinemri.processes import staging_path


def check_target(out: str | Path, *, overwrite: bool, error: Callable[[str], Exception], label: str, what: str
                 ) -> Path:
    """The output file ``out``, if it may be written: its folder exists, it is no folder, and it does not
    exist yet (or ``overwrite``). ``label`` names it in a message (``--out x.csv``), ``what`` is what to
    give instead of a folder; ``error`` makes the command's error from a message."""
    out = Path(out)
    if not out.parent.is_dir():
        raise error(f"{label}: the folder {out.parent} does not exist; create it first or choose another path")
    if out.is_dir():
        raise error(f"{label} is a folder; give {what}")
    if out.exists() and not overwrite:
        raise error(f"{label} already exists; choose another path or pass --overwrite (it is then replaced only "
                    "once the new file is complete)")
    return out


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

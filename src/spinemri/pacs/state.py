"""What a worker remembers between passes: the last day a server was searched to, and the date window
of the next pass.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from pathlib import Path

OVERLAP = dt.timedelta(days=1)  # a study acquired before midnight may reach the PACS after the next day's first pass


STATE_DIR_ENV = "SPINEMRI_PACS_STATE"


def state_path(url: str) -> Path:
    """Where a worker remembers the date of its last complete pass against ``url``."""
    root = Path(os.environ.get(STATE_DIR_ENV) or Path.home() / ".cache" / "spinemri" / "pacs")
    return root / f"{hashlib.sha256(url.rstrip('/').encode()).hexdigest()[:16]}.json"


def last_pass(url: str) -> dt.date | None:
    path = state_path(url)
    try:
        return dt.date.fromisoformat(json.loads(path.read_text())["last_pass"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remember_pass(url: str, day: dt.date) -> None:
    path = state_path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    staging.write_text(json.dumps({"last_pass": day.isoformat()}))
    staging.replace(path)


def window_start(last: dt.date | None, today: dt.date, days: int | None) -> dt.date:
    """The first StudyDate of a pass without --since: the day before the last complete pass's remembered date
    (studies acquired before midnight reach the PACS after the day's first pass; those already reported cost one
    query each), or the last ``days`` days, today included, on the first pass."""
    if last is None:
        return _first_of_last(days, today)
    return min(last, today) - OVERLAP


def to_remember(today: dt.date, result, days: int | None = None) -> dt.date:
    """The date a complete pass (``result``: its worker.PassResult) leaves for the next: today, or the date of a
    study worth another try while that date is within the last ``days`` days (7), so that a study failing again
    and again holds the window that long, not for ever."""
    return max(min(today, result.retry_from), _first_of_last(days, today)) if result.retry_from else today


def _first_of_last(days: int | None, today: dt.date) -> dt.date:
    """The first day of the last ``days`` days (7), today included."""
    return today - dt.timedelta(days=max((days or 7) - 1, 0))

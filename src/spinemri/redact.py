"""Credentials stay out of what spinemri prints and logs: URLs appear with their password masked.

An Optuna storage or tracking URI such as ``postgresql://alice:s3cret@db:5432/optuna`` is shown and
logged as ``postgresql://alice:***@db:5432/optuna``; a ``password=`` query parameter likewise.
"""

from __future__ import annotations

import re
from typing import Any

_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^\s:/@]*):(?P<secret>[^\s@/]+)@")
_QUERY = re.compile(r"(?P<key>[?&;](?:password|passwd|pwd|token|secret)=)[^&;\s]+", re.IGNORECASE)


def redact(text: Any) -> str:
    """``text`` with every URL password (``scheme://user:PASSWORD@``, ``?password=``) replaced by ***."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))
    return _QUERY.sub(lambda m: f"{m['key']}***", text)


def redact_values(value: Any) -> Any:
    """A copy of nested dicts and lists whose strings are redacted (what a run logs of a config)."""
    if isinstance(value, dict):
        return {k: redact_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_values(v) for v in value]
    return redact(value) if isinstance(value, str) else value

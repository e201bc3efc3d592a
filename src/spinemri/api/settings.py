"""An experiment's settings as a command gives them: the experiment file, then its flags, then ``--set KEY=VALUE``,
validated, with a refused value's error naming the flag or ``--set`` that gave it."""

from __future__ import annotations

import re

from spinemri.config import SHORTCUTS, ExperimentConfig, load_experiment, parse_override, resolve_experiment
from spinemri.errors import ConfigError


def experiment_config(experiment: str, flags: dict, settings, shortcuts: dict[str, str] | None = None
                      ) -> ExperimentConfig:
    """The experiment with the flags given and --set KEY=VALUE applied, validated.

    ``flags`` are short names: with ``shortcuts`` they are translated to config keys here, else
    load_experiment translates them (SHORTCUTS). A bad value's error names the flag it came from.
    """
    given = {k: v for k, v in flags.items() if v not in (None, "")}
    key_of = shortcuts or SHORTCUTS
    changes, origin = {}, {}  # config key -> value, and the flag or --set that gave it (the last one wins)
    for name, value in given.items():
        key = shortcuts[name] if shortcuts else name
        changes[key], origin[key_of.get(name, name)] = value, f"--{name.replace('_', '-')} {value}"
    for item in settings:
        if item.strip():  # MLproject passes --set ''
            key, value = parse_override(item)
            changes[key], origin[SHORTCUTS.get(key, key)] = value, f"--set {item.strip()}"
    try:
        return load_experiment(experiment, changes)
    except ConfigError as exc:
        raise ConfigError(_with_origin(str(exc), changes, origin, key_of, experiment)) from None


def _with_origin(message: str, changes: dict, origin: dict[str, str], key_of: dict[str, str],
                 experiment: str = "") -> str:
    """A settings error with where the refused value came from: the flag or --set whose setting the message names
    and whose value it quotes, else the experiment file (a message about the file itself already names it)."""
    unknown = re.match(r"unknown setting '([^']+)'", message)
    if unknown:
        sources = [source for key, source in origin.items() if key == unknown.group(1)]
        return f"{message} (from {', '.join(sources)})" if sources else message
    if not re.search(r"[;,] got ", message):  # not a refused value (a YAML syntax error, an unknown experiment)
        return message
    values = {key_of.get(k, k): v for k, v in changes.items()}
    named = [key for key in origin if key in message or f"{key.rsplit('.', 1)[-1]} " in message]
    quoted = [key for key in named if repr(values.get(key)) in message or str(values.get(key)) in message]
    sources = [origin[key] for key in (quoted or named)]
    if sources:
        return f"{message} (from {', '.join(sources)})"
    try:
        return f"{message} (in {resolve_experiment(experiment)})" if experiment else message
    except ConfigError:
        return message

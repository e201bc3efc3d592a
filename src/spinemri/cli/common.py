"""What every command shares: errors a user can cause as one clear message, settings checked at start, the
tracking store opened, interrupts, and flags derived from the config's settings.
"""

from __future__ import annotations

import functools
import os
import sys

import click

from spinemri.config import setting_help
from spinemri.errors import UserError
from spinemri.redact import redact


def exit_on_interrupt(command):
    """Ctrl-C or `kill` during training: the run is already marked KILLED; leave at once.

    A plain interpreter shutdown can wait forever on tf.data worker threads that are blocked in a
    Python callback, so the process ends with os._exit(130) after flushing its output.
    """
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            click.echo("interrupted: the MLflow run is marked KILLED", err=True)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
    return wrapper


def user_errors(command):
    """Turn the errors a user can cause into one clear message and exit status 1, no traceback."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            raise click.ClickException(redact(str(exc))) from None
    return wrapper


def settings_checked(command):
    """A command that reads images: every setting spinemri takes from the environment is checked at its start
    (within :func:`user_errors`: a bad one is one clear message naming the variable)."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from spinemri.data.environment import check_environment

        check_environment()
        return command(*args, **kwargs)
    return wrapper


def tracked(command):
    """A command that uses the MLflow store: create or upgrade its tables first, one process at a time,
    and mark FAILED the runs of dead spinemri processes."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from spinemri.tracking.store import open_tracking_store

        open_tracking_store()
        return command(*args, **kwargs)
    return wrapper


def setting_options(shortcuts: dict[str, str], *names: str):
    """Flags for config settings: ``--arch`` for SHORTCUTS["arch"] (model.arch), with the setting's help.

    Each flag's default is None: a flag left out keeps the experiment's value. ``--img-size`` is also
    accepted as ``--img_size``, the form ``mlflow run -P img_size=96`` passes it in.
    """
    def decorate(command):
        for name in reversed(names):
            spellings = dict.fromkeys((f"--{name.replace('_', '-')}", f"--{name}"))
            command = click.option(*spellings, name, default=None, help=setting_help(shortcuts[name]))(command)
        return command
    return decorate


SET_OPTION = click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
                          help="Any other setting as a dotted key, e.g. --set train.freeze_epochs=2 "
                               "--set model.dropout=0.5 (docs/experiments.md lists them).")

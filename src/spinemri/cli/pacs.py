"""`spinemri pacs`: the worker that reports the studies a PACS holds.
"""

from __future__ import annotations

import sys

import click

from spinemri.cli.common import settings_checked, tracked, user_errors
from spinemri.quiet import start_tensorflow


@click.command()
@click.option("--url", required=True, help="The DICOMweb server's root, e.g. http://127.0.0.1:8042/dicom-web "
              "(basic auth from SPINEMRI_PACS_USER and SPINEMRI_PACS_PASSWORD).")
@click.option("--model", "model_uri", default="models:/spinemri-study@champion", show_default=True,
              help="A registered study model (spinemri package-study), models:/NAME@ALIAS or models:/NAME/VERSION.")
@click.option("--once", is_flag=True, help="One pass over the studies there, then exit (default: poll).")
@click.option("--poll-seconds", default=60.0, show_default=True, type=click.FloatRange(min=1),
              help="Between passes, without --once.")
@click.option("--since", type=click.DateTime(["%Y-%m-%d", "%Y%m%d"]), default=None,
              help="Studies from this StudyDate on [default: from the day before the last complete pass, or the "
              "last --days days on the first pass].")
@click.option("--until", type=click.DateTime(["%Y-%m-%d", "%Y%m%d"]), default=None, help="... up to this StudyDate.")
@click.option("--days", default=7, show_default=True, type=click.IntRange(min=1),
              help="The first pass's window without --since: the last DAYS days, today included; and how long a "
              "study that failed for a reason that may pass (a partial transfer, a server error) is taken again.")
@click.option("--all-dates", is_flag=True, help="Every MR study on the server, whatever its date.")
@click.option("--retry-for", default=300.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds to keep retrying (with backoff) a server that refuses connections or answers 5xx.")
@click.option("--timeout", default=60.0, show_default=True, type=click.FloatRange(min=1),
              help="Seconds one request may wait for the server to connect or to send the next bytes (and, per "
                   "megabyte of the answer, for all of it).")
@click.option("--max-pages", default=100, show_default=True, type=click.IntRange(min=1),
              help="Pages of 100 studies one pass reads of the study search at most; the rest wait for the next "
                   "pass.")
@user_errors
@settings_checked
@tracked
def pacs(url, model_uri, once, poll_seconds, since, until, days, all_dates, retry_for, timeout, max_pages) -> None:
    """Grade new MR studies of a DICOMweb server and store each one's findings back as a DICOM SR.

    Finds MR studies with QIDO-RS, fetches the series the study model reads with WADO-RS (series
    types from the images), runs the model and stores a Comprehensive SR (TID 1500) with STOW-RS:
    per condition and level the grade, its three probabilities and the site on its source image. A
    study is reported once per model version. Log lines name studies by a digest of their UID,
    never by a patient attribute.
    """
    import logging

    start_tensorflow()
    from spinemri.pacs.server import Settings
    from spinemri.pacs.worker import work

    if all_dates and (since or until):
        raise click.UsageError("--all-dates takes every date; leave out --since and --until")
    if since and until and since > until:
        raise click.UsageError(f"--since {since:%Y-%m-%d} is after --until {until:%Y-%m-%d}; swap them")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    settings = Settings(url=url, model_uri=model_uri, since=since.date() if since else None,
                        until=until.date() if until else None, retry_for=retry_for, timeout=timeout,
                        max_pages=max_pages)
    work(settings, once=once, poll_seconds=poll_seconds, days=days, every_date=all_dates, echo=click.echo)

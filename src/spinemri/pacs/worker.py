"""`spinemri pacs`: MR studies pulled from a DICOMweb server, graded, and their findings stored back as DICOM SR.

One pass (:func:`run_pass`):

    QIDO-RS: the MR studies of a date window -> per study: is its report by this model version already
    there (QIDO, by the report's SOP Instance UID)? -> each MR series' type from one instance's metadata
    (WADO-RS metadata, :mod:`spinemri.data.series_types`) -> the series the models read, streamed to a
    temporary folder one instance at a time (WADO-RS) -> the study model (predict) -> a Comprehensive SR
    (:mod:`spinemri.pacs.report`) -> STOW-RS

A study is reported once per model version: the report's UIDs come from the study's UID and the model's
name and version, so a second pass, or a second worker on the same studies, finds the report and skips
the study, or stores an instance the server already holds. A server that refuses connections or
answers 5xx is retried with exponential backoff for ``retry_for`` seconds; a study it cut off is left
without a report and taken again on the next pass. A study whose files are incomplete or do not decode
gets a log line and no report. Log lines and the MLflow run name a study by a digest of its UID
(:func:`spinemri.pacs.study.study_key`), never by a patient or study attribute.

    server   settings, the client, retries through an outage, the study search
    study    one study fetched, graded and reported
    state    the date window each pass searches
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
import datetime as dt
from pathlib import Path
import time
import traceback
from typing import Callable
import warnings

import pandas as pd

from spinemri.data.series_types import site_rules
from spinemri.errors import ConfigError, ImageReadError, StudyError
from spinemri.pacs.server import (DEFAULT_MODEL, PacsUnavailable, ServerAnswer, Settings, check_url, client_for,
    date_text, log, reason_of, search_studies, study_date, value_of)
from spinemri.pacs.state import last_pass, remember_pass, to_remember, window_start
from spinemri.pacs.study import PartialStudy, process_study, study_key
from spinemri.redact import redact

# A pass's pacs/studies.csv: per study its status, reason, the report's SOP Instance UID, the rows graded from
# the prior and the findings referred (empty for a model without referral thresholds)
STUDY_COLUMNS = ("study", "status", "reason", "report", "from_prior", "referred")


@dataclass
class PassResult:
    """What one pass did: per study (by :func:`study_key`) its status and reason."""

    found: int = 0
    rows: list[dict] = field(default_factory=list)
    # The earliest StudyDate of a study that failed for a reason that may pass (a partial transfer, an unexpected
    # error): the next pass's window starts there. A malformed study would fail again and holds nothing.
    retry_from: dt.date | None = None

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.rows)


def load_study_model(uri: str):
    """(StudyPredictor, registered name, version) of a registered study model (models:/NAME@ALIAS or
    models:/NAME/VERSION): the report names the model's version, so it must be a registered one."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from spinemri.tracking.artifacts import load_pyfunc

    path = uri[len("models:/"):] if uri.startswith("models:/") else ""
    name, _, version = path.partition("/")
    name, _, alias = name.partition("@")
    if not name or (not alias and not version.isdigit()):
        raise ConfigError(f"--model {uri}: give a registered study model, models:/NAME@ALIAS or models:/NAME/VERSION "
                          f"(the report names its version), e.g. {DEFAULT_MODEL}")
    client = mlflow.MlflowClient()
    try:
        version = client.get_model_version_by_alias(name, alias).version if alias else version
        model = load_pyfunc(f"models:/{name}/{version}")
    except MlflowException as exc:
        raise ConfigError(f"--model {uri}: {exc.message.splitlines()[0]}; register one with "
                          "`spinemri package-study` or name another") from None
    predictor = getattr(model.unwrap_python_model(), "predictor", None)
    if predictor is None:
        raise ConfigError(f"--model {uri} is not a study model (spinemri package-study logs one)")
    # Unattended: a file over a size limit drops its series to the prior (with the reason), not the study.
    return dataclasses.replace(predictor, oversized="prior"), name, str(version)


def run_pass(settings: Settings, predictor, model_name: str, model_version: str) -> PassResult:
    """Every MR study of the window: reported, skipped (already reported), unread (no series of a type the
    models read) or failed, with its reason."""
    client = client_for(settings)
    filters = {"ModalitiesInStudy": "MR"}
    if settings.since or settings.until:
        filters["StudyDate"] = f"{date_text(settings.since)}-{date_text(settings.until)}"
    studies = search_studies(settings, client, filters)
    result = PassResult(found=len(studies))
    log.info("%d MR stud%s found", len(studies), "y" if len(studies) == 1 else "ies")
    for k, found in enumerate(studies):
        uid = value_of(found, "study")
        if not uid:  # counted, not dropped: the pass says how many answers it could not use
            row = {"study": f"answer-{k + 1}", "status": "failed",
                   "reason": "malformed: a study search result without a StudyInstanceUID"}
            result.rows.append(row)
            log.info("study %s: failed (%s)", row["study"], row["reason"])
            continue
        row, transient = {"study": study_key(uid)}, False
        try:
            with warnings.catch_warnings():  # pydicom's and highdicom's warnings quote the study's values
                warnings.simplefilter("ignore")
                row.update(process_study(settings, client, uid, predictor, model_name, model_version))
        except PacsUnavailable:
            raise
        except (PartialStudy, ServerAnswer) as exc:
            row.update(status="failed", reason=reason_of(exc))
            transient = getattr(exc, "transient", True)
        except (StudyError, ImageReadError) as exc:  # spinemri's own messages, which name no header value
            row.update(status="failed", reason=reason_of(exc))
        except Exception as exc:  # noqa: BLE001 - one study's surprise must not stop an unattended worker
            # Where, not what: a library's message may quote a header value of the study.
            where = traceback.extract_tb(exc.__traceback__)[-1]
            row.update(status="failed", reason=f"unexpected {type(exc).__name__} at {Path(where.filename).name}:"
                                               f"{where.lineno}")
            transient = True
        if transient:
            day = study_date(found)
            if day is not None:
                result.retry_from = min(day, result.retry_from or day)
        result.rows.append(row)
        log.info("study %s: %s%s", row["study"], row["status"], f" ({row['reason']})" if row.get("reason") else "")
    return result


def work(settings: Settings, *, once: bool, poll_seconds: float, days: int | None, every_date: bool,
         echo: Callable[[str], None] = print) -> list[PassResult]:
    """Passes until stopped (``once``: one). The window: ``settings.since``/``until`` if given, every date with
    ``every_date``, else from :func:`window_start`."""
    import mlflow

    from spinemri.tracking.runs import ending_run, start_run

    check_url(settings.url)
    site_rules()  # a site's series rules that do not load stop the worker now, not every study
    predictor, name, version = load_study_model(settings.model_uri)
    echo(f"model {name} v{version}; DICOMweb server {redact(settings.url)}")
    results = []
    while True:
        today = dt.date.today()
        window = settings
        if not every_date and settings.since is None:
            window = dataclasses.replace(settings, since=window_start(last_pass(settings.url), today, days),
                                         until=None)
        started = time.perf_counter()
        start_run(run_name=f"pacs-{today:%Y%m%d}", tags={"role": "pacs", "model": f"{name}/{version}",
                                                          "dicomweb": redact(settings.url)})
        with ending_run():
            mlflow.log_params({"model_uri": settings.model_uri, "model_version": version,
                               "since": date_text(window.since) or "any", "until": date_text(window.until) or "any"})
            try:
                result = run_pass(window, predictor, name, version)
            except PacsUnavailable as exc:
                mlflow.set_tag("fail_reason", str(exc))
                if once:
                    raise
                echo(f"warning: {exc}")
                result = None
            if result is not None:
                mlflow.log_metrics({"studies_found": result.found, "reported": result.count("reported"),
                                    "skipped": result.count("skipped"), "unread": result.count("unread"),
                                    "failed": result.count("failed"),
                                    "seconds": round(time.perf_counter() - started, 2)})
                mlflow.log_text(pd.DataFrame(result.rows, columns=list(STUDY_COLUMNS)).to_csv(index=False),
                                "pacs/studies.csv")
                if not every_date and settings.since is None:
                    remember_pass(settings.url, to_remember(today, result, days))
                echo(f"pass: {result.found} MR studies, {result.count('reported')} reported, "
                     f"{result.count('skipped')} already reported, "
                     + (f"{result.count('unread')} of no series type the models read, " if result.count("unread") else "")
                     + f"{result.count('failed')} failed")
                results.append(result)
        if once:
            return results
        time.sleep(poll_seconds)

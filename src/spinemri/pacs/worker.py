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
(:func:`study_key`), never by a patient or study attribute.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import traceback
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

import pandas as pd
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from spinemri.data.dicom import read_header, series_order
from spinemri.data.schema import SERIES_DESCRIPTIONS
from spinemri.data.series_types import header_keywords, series_type, site_rules
from spinemri.data.studies import Study, StudySeries
from spinemri.errors import ConfigError, ImageReadError, ImageTooLarge, StudyError, UserError
from spinemri.pacs.dicomweb import AnswerTooLarge, DicomWeb, MalformedAnswer
from spinemri.pacs.report import report_uids, structured_report
from spinemri.redact import redact

log = logging.getLogger("spinemri.pacs")
T = TypeVar("T")

DEFAULT_MODEL = "models:/spinemri-study@champion"
USER_ENV, PASSWORD_ENV = "SPINEMRI_PACS_USER", "SPINEMRI_PACS_PASSWORD"
MAX_BACKOFF_S = 30.0
OUTAGE = {429, 502, 503, 504}  # the server, or a proxy in front of it, is away or busy: retried for retry_for
RESOURCE_ATTEMPTS = 3  # another 5xx this many times in a row is about one request (a file the server cannot send)
SERIES_ATTEMPTS = 3  # downloads of a series that keeps coming short before its study counts as partial
TAGS = {"study": "0020000D", "series": "0020000E", "instance": "00080018", "modality": "00080060",
        "instances": "00201209", "sop_class": "00080016", "date": "00080020", "patient": "00100020"}
OVERLAP = dt.timedelta(days=1)  # a study acquired before midnight may reach the PACS after the next day's first pass


class PacsUnavailable(UserError):
    """The DICOMweb server did not answer for ``retry_for`` seconds."""


class PartialStudy(StudyError):
    """A series kept coming with fewer instances than the server lists: worth another try on the next pass."""


class ServerAnswer(StudyError):
    """The server answered one request of a study with an error: that study fails, the pass goes on.
    ``transient``: a 5xx, worth another try on the next pass; a 4xx (the study gone, a request it refuses) is not."""

    def __init__(self, message: str, status: int, transient: bool):
        super().__init__(message)
        self.status, self.transient = status, transient


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


@dataclass(frozen=True)
class Settings:
    url: str
    model_uri: str = DEFAULT_MODEL
    since: dt.date | None = None  # the first StudyDate of the window (None: every date)
    until: dt.date | None = None
    retry_for: float = 300.0
    timeout: float = 60.0
    workdir: str | None = None
    max_pages: int = 100  # QIDO-RS pages of PAGE studies one pass reads at most


def study_key(study_uid: str) -> str:
    """A study's name in logs and MLflow: the first 12 hex digits of the SHA-256 of its Study Instance UID."""
    return hashlib.sha256(study_uid.encode()).hexdigest()[:12]


def check_url(url: str) -> None:
    """Refuse a --url that is not an http(s) address before anything starts."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        parts, port_ok = None, False
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise ConfigError(f"--url {redact(url)!r} is not an http(s) address; give the DICOMweb server's root, "
                          "e.g. http://127.0.0.1:8042/dicom-web")


# Libraries whose log lines quote UIDs, header values or request paths (which hold UIDs), and decoders that log
# tracebacks: silenced with every logger below them (a child logger inherits the level, not the disabled flag).
QUIET_LOGGERS = ("highdicom", "pydicom", "pylibjpeg", "openjpeg", "libjpeg", "rle", "urllib3", "requests")


def quiet_libraries() -> None:
    """No line from :data:`QUIET_LOGGERS` or their children reaches the worker's output."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and name.split(".")[0] in QUIET_LOGGERS:
            logger.setLevel(logging.CRITICAL + 1)


def client_for(settings: Settings) -> DicomWeb:
    """The DICOMweb client for ``settings.url``, with basic auth from SPINEMRI_PACS_USER/SPINEMRI_PACS_PASSWORD."""
    import requests

    quiet_libraries()
    session = requests.Session()
    if os.environ.get(USER_ENV):
        session.auth = (os.environ[USER_ENV], os.environ.get(PASSWORD_ENV, ""))
    return DicomWeb(settings.url, session, timeout=settings.timeout)


def with_retry(settings: Settings, what: str, call: Callable[[], T]) -> T:
    """``call()``, retried with exponential backoff (1 s, 2 s, ... at most 30 s) while the server refuses
    connections, times out, cuts a transfer or answers 429/502/503/504, for at most ``settings.retry_for``
    seconds (then :class:`PacsUnavailable`). Any other 5xx, three times running, and any 4xx are the answer to
    this request (:class:`ServerAnswer`); 401 and 403 are about every request (:class:`PacsUnavailable`)."""
    import requests

    deadline, delay, errors = time.monotonic() + settings.retry_for, 1.0, 0
    while True:
        try:
            return call()
        except (requests.ConnectionError, requests.Timeout, requests.HTTPError,
                requests.exceptions.ChunkedEncodingError) as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status in (401, 403):
                raise PacsUnavailable(f"{redact(settings.url)} refused {what} (HTTP {status}): set {USER_ENV} and "
                                      f"{PASSWORD_ENV} to an account that may read and store studies") from None
            if status is not None and status < 500 and status != 429:
                raise ServerAnswer(f"the server answered {what} with HTTP {status}", status, transient=False) from None
            if status is not None and status not in OUTAGE:
                errors += 1
                if errors >= RESOURCE_ATTEMPTS:
                    raise ServerAnswer(f"the server answered {what} with HTTP {status}, {errors} times running "
                                       "(taken again on the next pass)", status, transient=True) from None
            reason = f"HTTP {status}" if status else type(exc).__name__
            if time.monotonic() + delay > deadline:
                raise PacsUnavailable(f"{redact(settings.url)} did not answer {what} for {settings.retry_for:g} s "
                                      f"({reason}); the studies left are taken on the next pass") from None
            log.warning("%s: %s failed (%s); retrying in %.0f s", redact(settings.url), what, reason, delay)
            time.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_S)


def load_study_model(uri: str):
    """(StudyPredictor, registered name, version) of a registered study model (models:/NAME@ALIAS or
    models:/NAME/VERSION): the report names the model's version, so it must be a registered one."""
    import mlflow
    from mlflow.exceptions import MlflowException

    path = uri[len("models:/"):] if uri.startswith("models:/") else ""
    name, _, version = path.partition("/")
    name, _, alias = name.partition("@")
    if not name or (not alias and not version.isdigit()):
        raise ConfigError(f"--model {uri}: give a registered study model, models:/NAME@ALIAS or models:/NAME/VERSION "
                          f"(the report names its version), e.g. {DEFAULT_MODEL}")
    client = mlflow.MlflowClient()
    try:
        version = client.get_model_version_by_alias(name, alias).version if alias else version
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Add type hints to the `predict` method")
            model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    except MlflowException as exc:
        raise ConfigError(f"--model {uri}: {exc.message.splitlines()[0]}; register one with "
                          "`spinemri package-study` or name another") from None
    predictor = getattr(model.unwrap_python_model(), "predictor", None)
    if predictor is None:
        raise ConfigError(f"--model {uri} is not a study model (spinemri package-study logs one)")
    # Unattended: a file over a size limit drops its series to the prior (with the reason), not the study.
    return dataclasses.replace(predictor, oversized="prior"), name, str(version)


def run_pass(settings: Settings, predictor, model_name: str, model_version: str) -> PassResult:
    """Every MR study of the window: reported, skipped (already reported), or failed with its reason."""
    client = client_for(settings)
    filters = {"ModalitiesInStudy": "MR"}
    if settings.since or settings.until:
        filters["StudyDate"] = f"{_date(settings.since)}-{_date(settings.until)}"
    studies = _search_studies(settings, client, filters)
    result = PassResult(found=len(studies))
    log.info("%d MR stud%s found", len(studies), "y" if len(studies) == 1 else "ies")
    for k, found in enumerate(studies):
        uid = _value(found, "study")
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
                row.update(_process(settings, client, uid, predictor, model_name, model_version))
        except PacsUnavailable:
            raise
        except (PartialStudy, ServerAnswer) as exc:
            row.update(status="failed", reason=_reason(exc))
            transient = getattr(exc, "transient", True)
        except (StudyError, ImageReadError) as exc:  # spinemri's own messages, which name no header value
            row.update(status="failed", reason=_reason(exc))
        except Exception as exc:  # noqa: BLE001 - one study's surprise must not stop an unattended worker
            # Where, not what: a library's message may quote a header value of the study.
            where = traceback.extract_tb(exc.__traceback__)[-1]
            row.update(status="failed", reason=f"unexpected {type(exc).__name__} at {Path(where.filename).name}:"
                                               f"{where.lineno}")
            transient = True
        if transient:
            day = _study_date(found)
            if day is not None:
                result.retry_from = min(day, result.retry_from or day)
        result.rows.append(row)
        log.info("study %s: %s%s", row["study"], row["status"], f" ({row['reason']})" if row.get("reason") else "")
    return result


PAGE = 100  # studies per QIDO-RS page
PROGRESS_PAGES = 10  # a line every this many pages of a long search


def _search_studies(settings, client, filters: dict) -> list[dict]:
    """Every study matching ``filters``, page by page (limit/offset), at most ``settings.max_pages`` pages (the
    rest wait for the next pass, and a line says so). A server that ignores the offset answers with studies
    already seen; one that mishandles it (Orthanc 1.10 answers nothing past the first page) answers with an
    empty page. After full pages, either is checked with one search without paging. Answers without a
    StudyInstanceUID are kept, for the pass to count."""
    found: dict[str, dict] = {}
    unnamed: list[dict] = []
    offset = pages = 0

    def search(**paging) -> list[dict]:
        try:
            return with_retry(settings, "the study search (QIDO-RS)", lambda: client.search_for_studies(
                search_filters=filters, **paging))
        except (ServerAnswer, MalformedAnswer, AnswerTooLarge) as exc:  # no study can be found: the pass is off
            raise PacsUnavailable(f"{redact(settings.url)}: {exc}") from None

    def add(items) -> int:
        added = 0
        for item in items:
            uid = _value(item, "study")
            if uid is None:
                unnamed.append(item)
            elif uid not in found:
                found[uid] = item
                added += 1
        return added

    while True:
        page = search(limit=PAGE, offset=offset)
        pages += 1
        new = add(page)
        if offset and not new:  # the page after full ones added nothing: the end, or paging that does not work
            add(search(limit=PAGE * settings.max_pages))
        if len(page) < PAGE or not new:
            return list(found.values()) + unnamed
        if pages % PROGRESS_PAGES == 0:
            log.info("study search: %d pages, %d studies so far", pages, len(found))
        if pages >= settings.max_pages:
            log.warning("study search stopped after %d pages (%d studies; --max-pages): the rest are taken on the "
                        "next pass", pages, len(found))
            return list(found.values()) + unnamed
        offset += len(page)


def _process(settings, client, study_uid, predictor, model_name, model_version) -> dict:
    _, sop_uid = report_uids(study_uid, model_name, model_version)
    if _reported(settings, client, study_uid, sop_uid):
        return dict(status="skipped", reason=f"reported by {model_name} v{model_version} already")
    series = with_retry(settings, "the series search (QIDO-RS)",
                        lambda: client.search_for_series(study_uid, search_filters={"Modality": "MR"}))
    workdir = Path(tempfile.mkdtemp(prefix="spinemri-pacs-", dir=settings.workdir))
    try:
        study, skipped = _fetch(settings, client, study_uid, series, workdir)
        if not study.series:  # every MR series is of a type no model reads: nothing to grade, nothing to report
            return dict(status="skipped", reason=f"none of its {len(skipped)} MR series is of a type the models read "
                                                 f"({', '.join(SERIES_DESCRIPTIONS)}): {'; '.join(skipped)}")
        prediction = predictor.predict(study)
        missing_types = [d for d in SERIES_DESCRIPTIONS if d not in {s.description for s in study.series}]
        files = {s.series_id: s.files for s in study.series}
        headers: dict[int, dict[int, Path]] = {}  # only the series the model graded a site on (they decoded)
        sources, missing = {}, {}
        for site in prediction.sites.itertuples(index=False):
            if site.source == "model":
                series_id = int(site.series_id)
                if series_id not in headers:
                    headers[series_id] = {int(read_header(p).InstanceNumber): p for p in files[series_id]}
                sources[site.row_id] = read_header(headers[series_id][int(site.instance_number)])
            else:
                lacking = next((d for d in missing_types if site.reason == f"no {d} series"), None)
                if lacking:
                    missing[site.row_id] = lacking
        report = structured_report(prediction.rows, prediction.sites, sources, _patient_header(study),
                                   model_name=model_name, model_version=model_version, missing=missing)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    try:
        with_retry(settings, "storing the report (STOW-RS)", lambda: client.store_instances([report]))
    except ServerAnswer as exc:
        if exc.status != 409:  # 409 Conflict: the server holds this report already (another worker stored it)
            raise
        return dict(status="skipped", reason=f"reported by {model_name} v{model_version} already (HTTP 409)")
    reason = f"{25 - prediction.from_prior} rows from the model, {prediction.from_prior} from the prior"
    why = sorted({_no_paths(r) for r, src in zip(prediction.sites["reason"], prediction.sites["source"])
                  if src == "prior" and not r.startswith("no ")})  # beyond missing series: unreadable ones, ...
    if why:
        reason += f" ({'; '.join(why[:3])})"
    if missing_types:
        reason += f"; no {', '.join(missing_types)} series"
    if skipped:
        reason += f"; {len(skipped)} series skipped ({'; '.join(skipped)})"
    return dict(status="reported", reason=reason, report=sop_uid, from_prior=prediction.from_prior)


def _no_paths(reason: str) -> str:
    """A reason without the worker's temporary file paths (a file is 'a file')."""
    return re.sub(r"\S*spinemri-pacs-\S+?\.dcm", "a file", str(reason))


def _patient_header(study: Study) -> Dataset:
    """The header the report copies its patient and study attributes from: the first file of the study that reads
    (a series over a size limit has none)."""
    for series in study.series:
        for path in series.files:
            try:
                return read_header(path)
            except ImageReadError:
                break  # the next series
    raise StudyError("malformed: no file of the study has a readable header")


def _reported(settings, client, study_uid: str, sop_uid: str) -> bool:
    found = with_retry(settings, "the report search (QIDO-RS)", lambda: client.search_for_instances(
        study_instance_uid=study_uid, search_filters={"SOPInstanceUID": sop_uid}))
    return any(_value(item, "instance") == sop_uid for item in found)


def _fetch(settings, client, study_uid: str, series: list[dict], workdir: Path) -> tuple[Study, list[str]]:
    """The study's series of the types the models read, on disk; and what the other MR series are."""
    kept, skipped, patients = [], [], set()
    for item in sorted(series, key=lambda s: _value(s, "series") or ""):
        series_uid = _value(item, "series")
        if series_uid is None or _value(item, "modality") not in ("MR", None):
            continue
        metadata = with_retry(settings, "the series metadata (WADO-RS)",
                              lambda: client.retrieve_series_metadata(study_uid, series_uid, keep=(TAGS["patient"],)))
        if not isinstance(metadata, list):
            raise StudyError("malformed: a series' metadata is not DICOM JSON")
        if not metadata:
            raise StudyError("a series has no instances")
        kind = series_type(_header(metadata[0]))
        if kind.description is None:
            skipped.append(kind.reason.removeprefix("skipped: ").split(";")[0])
            continue
        series_id = zlib.crc32(series_uid.encode())
        folder = workdir / str(series_id)
        folder.mkdir()

        def download() -> list[Path]:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            # In the transfer syntax the server holds (compressed or not): no transcoding on a server that may lack
            # the codec (Orthanc cannot write JPEG 2000). The files are written as they come, unparsed: spinemri's
            # readers check what each declares before decoding it.
            return client.save_series(study_uid, series_uid, folder)

        for _ in range(SERIES_ATTEMPTS):  # a stream cut short (a server going down mid-series) is fetched again
            files = with_retry(settings, "the series (WADO-RS)", download)
            if len(files) == len(metadata):
                break
            log.warning("a series of study %s came with %d of its %d instances; fetching it again",
                        study_key(study_uid), len(files), len(metadata))
        else:
            raise PartialStudy(f"a series came with {len(files)} of its {len(metadata)} instances, {SERIES_ATTEMPTS} "
                               "times (a partial study; taken again on the next pass)")
        try:
            numbers = [n for n, *_ in series_order(files)]  # every file can be placed in its series
        except ImageTooLarge:  # kept: the predictor grades it from the prior and says why
            kept.append(StudySeries(series_id, kind.description, tuple(files), kind.reason))
            continue
        except ImageReadError as exc:
            raise StudyError(f"malformed: a {kind.description} file {exc.reason}") from None
        if len(set(numbers)) < len(numbers):  # a site could not name the image it lies on
            raise StudyError(f"malformed: a {kind.description} series repeats InstanceNumbers "
                             f"({len(numbers) - len(set(numbers))} of its {len(numbers)} files)")
        patients.update(_value(m, "patient") for m in metadata if _value(m, "patient"))
        kept.append(StudySeries(series_id, kind.description, tuple(files), kind.reason))
    if len(patients) > 1:  # one Study Instance UID filed under two patients: one report cannot name both
        raise StudyError(f"malformed: the series of this study name {len(patients)} different patients (PatientID)")
    if not kept and not skipped:
        raise StudyError("the study has no MR series")
    return Study(study_key(study_uid), tuple(kept)), skipped


def _header(metadata) -> Dataset:
    """The attributes :func:`series_type` reads, as a pydicom header, from a WADO-RS metadata object. Metadata
    that is not DICOM JSON is a malformed study; the message quotes no value (it may be a patient's)."""
    wanted = {f"{tag_for_keyword(k):08X}" for k in header_keywords()}
    try:
        return Dataset.from_json({tag: value for tag, value in metadata.items() if tag.upper() in wanted})
    except Exception:  # noqa: BLE001 - pydicom raises ValueError, TypeError, KeyError, ... on bad JSON
        raise StudyError("malformed: a series' metadata is not DICOM JSON") from None


def _value(item, name: str) -> str | None:
    """One attribute's first value in a DICOM JSON object, as text; None where it is absent or not DICOM JSON."""
    element = item.get(TAGS[name]) if isinstance(item, dict) else None
    values = element.get("Value") if isinstance(element, dict) else None
    if not isinstance(values, list) or not values or values[0] is None or isinstance(values[0], (dict, list)):
        return None
    return str(values[0])


def _date(day: dt.date | None) -> str:
    return day.strftime("%Y%m%d") if day else ""


def _study_date(item: dict) -> dt.date | None:
    try:
        return dt.datetime.strptime(str(_value(item, "date")), "%Y%m%d").date()
    except ValueError:
        return None


def _reason(exc: Exception) -> str:
    if isinstance(exc, ImageReadError):
        return f"malformed: a file {exc.reason}"
    return str(exc).splitlines()[0][:300]


# --- the worker: passes, state, MLflow ---------------------------------------------------------

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


def to_remember(today: dt.date, result: PassResult, days: int | None = None) -> dt.date:
    """The date a complete pass leaves for the next: today, or the date of a study worth another try while that
    date is within the last ``days`` days (7), so that a study failing again and again holds the window that long,
    not for ever."""
    return max(min(today, result.retry_from), _first_of_last(days, today)) if result.retry_from else today


def _first_of_last(days: int | None, today: dt.date) -> dt.date:
    """The first day of the last ``days`` days (7), today included."""
    return today - dt.timedelta(days=max((days or 7) - 1, 0))


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
                               "since": _date(window.since) or "any", "until": _date(window.until) or "any"})
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
                                    "skipped": result.count("skipped"), "failed": result.count("failed"),
                                    "seconds": round(time.perf_counter() - started, 2)})
                mlflow.log_text(pd.DataFrame(result.rows, columns=["study", "status", "reason", "report", "from_prior"])
                                .to_csv(index=False), "pacs/studies.csv")
                if not every_date and settings.since is None:
                    remember_pass(settings.url, to_remember(today, result, days))
                echo(f"pass: {result.found} MR studies, {result.count('reported')} reported, "
                     f"{result.count('skipped')} already reported, {result.count('failed')} failed")
                results.append(result)
        if once:
            return results
        time.sleep(poll_seconds)

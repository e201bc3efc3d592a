"""The worker's side of a DICOMweb server: its settings, a client, retries with backoff through an outage,
and the study search (QIDO-RS) paged within --max-pages.
"""

from __future__ import annotations

from dataclasses import dataclass
import datetime as dt
import logging
import os
import time
from typing import Callable, TypeVar

from spinemri.errors import ConfigError, ImageReadError, StudyError, UserError
from spinemri.pacs.dicomweb import AnswerTooLarge, DicomWeb, MalformedAnswer
from spinemri.redact import redact

log = logging.getLogger("spinemri.pacs")


T = TypeVar("T")


DEFAULT_MODEL = "models:/spinemri-study@champion"


USER_ENV, PASSWORD_ENV = "SPINEMRI_PACS_USER", "SPINEMRI_PACS_PASSWORD"


MAX_BACKOFF_S = 30.0


OUTAGE = {429, 502, 503, 504}  # the server, or a proxy in front of it, is away or busy: retried for retry_for


RESOURCE_ATTEMPTS = 3  # another 5xx this many times in a row is about one request (a file the server cannot send)


TAGS = {"study": "0020000D", "series": "0020000E", "instance": "00080018", "modality": "00080060",
        "instances": "00201209", "sop_class": "00080016", "date": "00080020", "patient": "00100020"}


class PacsUnavailable(UserError):
    """The DICOMweb server did not answer for ``retry_for`` seconds."""


class ServerAnswer(StudyError):
    """The server answered one request of a study with an error: that study fails, the pass goes on.
    ``transient``: a 5xx, worth another try on the next pass; a 4xx (the study gone, a request it refuses) is not."""

    def __init__(self, message: str, status: int, transient: bool):
        super().__init__(message)
        self.status, self.transient = status, transient


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
QUIET_LOGGERS = ("highdicom", "pydicom", "pylibjpeg", "openjpeg", "libjpeg", "rle", "urllib3", "requests", "tensorflow",
                 "absl", "keras")


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
        except (requests.exceptions.TooManyRedirects, requests.exceptions.InvalidSchema,
                requests.exceptions.InvalidURL, requests.exceptions.MissingSchema) as exc:
            # A redirect the worker will not follow (a loop, another scheme, a bad address): the server is
            # misconfigured for every request; where it pointed is not repeated.
            raise PacsUnavailable(f"{redact(settings.url)} answered {what} with a redirect the worker does not "
                                  f"follow ({type(exc).__name__}); point --url at the DICOMweb root itself") from None
        except requests.exceptions.ContentDecodingError:
            raise ServerAnswer(f"the server answered {what} with a body its Content-Encoding does not decode",
                               None, transient=True) from None
        except requests.RequestException as exc:
            raise ServerAnswer(f"the server's answer to {what} could not be read ({type(exc).__name__})", None,
                               transient=True) from None


PAGE = 100  # studies per QIDO-RS page


PROGRESS_PAGES = 10  # a line every this many pages of a long search


def search_studies(settings, client, filters: dict) -> list[dict]:
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
            uid = value_of(item, "study")
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


def value_of(item, name: str) -> str | None:
    """One attribute's first value in a DICOM JSON object, as text; None where it is absent or not DICOM JSON."""
    element = item.get(TAGS[name]) if isinstance(item, dict) else None
    values = element.get("Value") if isinstance(element, dict) else None
    if not isinstance(values, list) or not values or values[0] is None or isinstance(values[0], (dict, list)):
        return None
    return str(values[0])


def date_text(day: dt.date | None) -> str:
    return day.strftime("%Y%m%d") if day else ""


def study_date(item: dict) -> dt.date | None:
    try:
        return dt.datetime.strptime(str(value_of(item, "date")), "%Y%m%d").date()
    except ValueError:
        return None


def reason_of(exc: Exception) -> str:
    if isinstance(exc, ImageReadError):
        return f"malformed: a file {exc.reason}"
    return str(exc).splitlines()[0][:300]

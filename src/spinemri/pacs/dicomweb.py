"""A bounded DICOMweb client: what `spinemri pacs` asks a server, and nothing it may answer unbounded.

QIDO-RS searches and WADO-RS metadata come back as DICOM JSON; WADO-RS series as a multipart stream of
DICOM files; STOW-RS takes the report. A server is not trusted with the worker's memory or time:

- every answer is read as a stream, with a byte budget counted as it arrives (after HTTP decompression),
  and a JSON answer is parsed only once it is complete and within ``SPINEMRI_MAX_ANSWER_MB``;
- a JSON answer must be a list of DICOM JSON objects, of at most ``max_entries`` items (a search page,
  a series' instances); anything else is a :class:`MalformedAnswer`;
- a series' files are written to disk part by part as they stream, never parsed here: each within
  ``SPINEMRI_MAX_STUDY_FILE_MB``, the series within ``SPINEMRI_MAX_STUDY_MB``. Decoding them — a deflated
  data set, a slice that declares gigabytes — is left to spinemri's own readers, which check the declared
  size first (:mod:`spinemri.data.limits`);
- every request has a connect and read timeout and a deadline for the whole answer: a server that
  trickles bytes is cut off like one that hangs.

Errors are requests' own (connection, timeout, HTTP status), for the caller's retry policy, or
:class:`MalformedAnswer` / :class:`AnswerTooLarge`. No message quotes a UID or an answer's content.
"""

from __future__ import annotations

import io
import json
import re
import time
import uuid
from pathlib import Path
from typing import Iterator, Mapping

from spinemri.data import limits
from spinemri.errors import StudyError

CHUNK = 1 << 16
MAX_HEADER_BYTES = 16 << 10  # the headers of one part of a multipart answer


class MalformedAnswer(StudyError):
    """The server answered with something that is not what DICOMweb promises (not JSON, not a list, ...)."""


class AnswerTooLarge(StudyError):
    """The server's answer is over a size limit."""


class DicomWeb:
    """The requests `spinemri pacs` makes of the DICOMweb server at ``url`` (its root, e.g. .../dicom-web)."""

    def __init__(self, url: str, session, timeout: float = 60.0):
        self.url = url.rstrip("/")
        self.session = session
        self.timeout = float(timeout)

    # --- QIDO-RS and WADO-RS metadata: DICOM JSON ---

    def search_for_studies(self, search_filters: Mapping[str, str], limit: int | None = None,
                           offset: int | None = None) -> list[dict]:
        params = dict(search_filters)
        if limit is not None:
            params.update(limit=str(limit), offset=str(offset or 0))
        return self._json("/studies", params, "the study search", max_entries=limit)

    def search_for_series(self, study_uid: str, search_filters: Mapping[str, str]) -> list[dict]:
        return self._json(f"/studies/{study_uid}/series", dict(search_filters), "the series search",
                          max_entries=limits.STUDY_FILES.value)

    def search_for_instances(self, study_instance_uid: str, search_filters: Mapping[str, str]) -> list[dict]:
        return self._json(f"/studies/{study_instance_uid}/instances", dict(search_filters), "the report search",
                          max_entries=limits.STUDY_FILES.value)

    def retrieve_series_metadata(self, study_uid: str, series_uid: str, keep: tuple[str, ...] = ()) -> list[dict]:
        """The metadata of a series' instances: the first whole, of the others only the tags ``keep`` names
        (what a series' type is read from, and what every instance must agree on)."""
        def slim(k: int, item):
            return item if k == 0 or not isinstance(item, dict) else {t: item[t] for t in keep if t in item}

        return self._json(f"/studies/{study_uid}/series/{series_uid}/metadata", {}, "the series metadata",
                          max_entries=limits.STUDY_FILES.value, slim=slim)

    def _json(self, path: str, params: dict, what: str, max_entries: int | None, slim=None) -> list:
        """A JSON list, read within ``SPINEMRI_MAX_ANSWER_MB`` and parsed one entry at a time: at most
        ``max_entries`` are parsed, each passed through ``slim(index, entry)`` before the next is read."""
        with self._get(path, params, "application/dicom+json") as response:
            if response.status_code == 204:  # "no content": nothing matched
                return []
            body = b"".join(self._read(response, limits.ANSWER_BYTES, what))
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedAnswer(f"the server answered {what} with something that is not JSON (not UTF-8 text, "
                                  f"{limits.human_size(len(body))})") from None
        del body
        return _entries(text, what, max_entries, slim)

    # --- WADO-RS: a series as DICOM files ---

    def save_series(self, study_uid: str, series_uid: str, folder: Path) -> list[Path]:
        """The series' instances, in the transfer syntax the server holds, written to ``folder`` as
        ``00000.dcm``, ... as they stream; a part the stream cut short is not kept."""
        accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
        files: list[Path] = []
        with self._get(f"/studies/{study_uid}/series/{series_uid}", {}, accept) as response:
            boundary = _boundary(response.headers.get("Content-Type", ""))
            chunks = self._read(response, limits.STUDY_BYTES, "the series")
            for k, part in enumerate(_parts(chunks, boundary)):
                if k >= limits.STUDY_FILES.value:
                    raise AnswerTooLarge(f"the series has more parts than {limits.STUDY_FILES.describe()}")
                path = folder / f"{k:05d}.dcm"
                written = 0
                with open(path, "wb") as out:
                    for piece in part:
                        written += len(piece)
                        if written > limits.STUDY_FILE_BYTES.value:
                            raise AnswerTooLarge(f"a file of a series is over {limits.STUDY_FILE_BYTES.describe()}")
                        out.write(piece)
                if part.complete:
                    files.append(path)
                else:
                    path.unlink(missing_ok=True)
        return files

    # --- STOW-RS ---

    def store_instances(self, datasets) -> None:
        """Store DICOM data sets (pydicom) on the server; an HTTP error status is raised as requests'."""
        import pydicom

        boundary = uuid.uuid4().hex
        body = io.BytesIO()
        for dataset in datasets:
            encoded = io.BytesIO()
            pydicom.dcmwrite(encoded, dataset, enforce_file_format=True)
            body.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
            body.write(encoded.getvalue())
            body.write(b"\r\n")
        body.write(f"--{boundary}--\r\n".encode())
        headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                   "Accept": "application/dicom+json"}
        response = self.session.post(f"{self.url}/studies", data=body.getvalue(), headers=headers,
                                     timeout=(self.timeout, self.timeout))
        try:
            response.raise_for_status()
        finally:
            response.close()

    # --- the one GET every request makes ---

    def _get(self, path: str, params: dict, accept: str):
        response = self.session.get(f"{self.url}{path}", params=params or None, headers={"Accept": accept},
                                    timeout=(self.timeout, self.timeout), stream=True)
        if response.status_code >= 400:
            response.close()
            response.raise_for_status()
        return response

    def _read(self, response, budget: limits.Limit, what: str) -> Iterator[bytes]:
        """The answer's bytes as they arrive, within ``budget`` and within the deadline of one timeout per
        answer megabyte on top of the first (a trickling server is cut off like a hanging one)."""
        import requests
        import urllib3

        started, total = time.monotonic(), 0
        while True:
            # read1: what has arrived, at most a chunk; a server trickling bytes cannot hold one read open
            try:
                chunk = response.raw.read1(CHUNK, decode_content=True)
            except urllib3.exceptions.DecodeError:  # as requests' own reading of a body names them
                raise requests.exceptions.ContentDecodingError(f"{what}: the body does not decode") from None
            except urllib3.exceptions.ReadTimeoutError:
                raise requests.Timeout(f"{what}: no byte within the read timeout") from None
            except (urllib3.exceptions.ProtocolError, urllib3.exceptions.SSLError, OSError):
                raise requests.exceptions.ChunkedEncodingError(f"{what}: the transfer was cut") from None
            if not chunk:
                return
            total += len(chunk)
            if total > budget.value:
                raise AnswerTooLarge(f"the server's answer to {what} is over {budget.describe()}")
            if time.monotonic() - started > self.timeout * (1 + total / limits.MB):
                raise requests.Timeout(f"{what} took longer than its deadline")
            yield chunk


_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"\s*")


def _entries(text: str, what: str, max_entries: int | None, slim) -> list:
    """The items of a JSON array, decoded one by one (``raw_decode``), so that no more than ``max_entries`` are
    ever built; MalformedAnswer for anything that is not one JSON array."""
    def malformed(detail: str) -> MalformedAnswer:
        return MalformedAnswer(f"the server answered {what} with {detail}, not a list of DICOM JSON objects")

    at = _SPACE.match(text).end()
    if at == len(text):
        return []
    if text[at] != "[":
        try:
            found = type(_DECODER.raw_decode(text, at)[0]).__name__
        except (ValueError, RecursionError):
            found = None
        raise malformed(f"a JSON {found}" if found else f"something that is not JSON ({len(text):,} characters)")
    items, at = [], _SPACE.match(text, at + 1).end()
    if text.startswith("]", at):
        if text[at + 1:].strip():
            raise malformed("JSON that does not parse (more after the list)")
        return items
    while True:
        if max_entries is not None and len(items) >= max_entries:
            raise AnswerTooLarge(f"the server answered {what} with more than the {max_entries:,} entries it may send")
        try:
            item, at = _DECODER.raw_decode(text, at)
        except ValueError:
            raise malformed("JSON that does not parse") from None
        except RecursionError:
            raise malformed("JSON nested too deeply to parse") from None
        items.append(slim(len(items), item) if slim else item)
        at = _SPACE.match(text, at).end()
        if text.startswith("]", at) and not text[at + 1:].strip():
            return items
        if not text.startswith(",", at):
            raise malformed("JSON that does not parse")
        at = _SPACE.match(text, at + 1).end()


def _boundary(content_type: str) -> bytes:
    match = re.search(r'boundary="?([^";]+)"?', content_type, flags=re.IGNORECASE)
    if not match or not content_type.lower().startswith("multipart/related"):
        raise MalformedAnswer("the server answered a series request with something that is not a multipart "
                              "stream of DICOM files")
    return match.group(1).strip().encode()


class _Part:
    """One part's body as it streams: iterate it once; ``complete`` once its closing delimiter was read."""

    def __init__(self, stream: "_Multipart"):
        self.stream, self.complete = stream, False

    def __iter__(self) -> Iterator[bytes]:
        yield from self.stream.body(self)


class _Multipart:
    """A multipart/related stream read incrementally: parts, their headers skipped, their bodies in pieces."""

    def __init__(self, chunks: Iterator[bytes], boundary: bytes):
        self.chunks, self.buffer = chunks, bytearray(b"\r\n")  # the first delimiter has no CRLF before it
        self.delimiter = b"\r\n--" + boundary
        self.ended = False

    def _more(self) -> bool:
        chunk = next(self.chunks, None)
        if chunk is None:
            return False
        self.buffer += chunk
        return True

    def skip_to_delimiter(self) -> bool:
        while True:
            at = self.buffer.find(self.delimiter)
            if at >= 0:
                del self.buffer[:at + len(self.delimiter)]
                return True
            del self.buffer[:max(0, len(self.buffer) - len(self.delimiter))]
            if not self._more():
                return False

    def next_part(self) -> _Part | None:
        while len(self.buffer) < 2:
            if not self._more():
                return None
        if self.buffer.startswith(b"--"):  # the closing delimiter
            self.ended = True
            return None
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            if len(self.buffer) > MAX_HEADER_BYTES:
                raise MalformedAnswer("a part of the server's series stream has headers over 16 KB")
            if not self._more():
                return None
        del self.buffer[:end + 4]
        return _Part(self)

    def body(self, part: _Part) -> Iterator[bytes]:
        keep = len(self.delimiter)
        while True:
            at = self.buffer.find(self.delimiter)
            if at >= 0:
                yield bytes(self.buffer[:at])
                del self.buffer[:at + len(self.delimiter)]
                part.complete = True
                return
            if len(self.buffer) > keep:
                yield bytes(self.buffer[:-keep])
                del self.buffer[:-keep]
            if not self._more():
                return  # the stream ended inside this part: it is incomplete


def _parts(chunks: Iterator[bytes], boundary: bytes) -> Iterator[_Part]:
    stream = _Multipart(iter(chunks), boundary)
    if not stream.skip_to_delimiter():
        return
    while (part := stream.next_part()) is not None:
        yield part
        if not part.complete:
            for _ in part:  # a part the caller did not read through
                pass
        if not part.complete:
            return

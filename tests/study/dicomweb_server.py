"""A small, real, hostile DICOMweb server on 127.0.0.1 for the worker's tests: each ``mode`` answers as a broken or
malicious server would (not JSON, not a list, junk entries, hanging, endless pages, answers of hundreds of MB)."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
import time
from urllib.parse import parse_qs, urlsplit

STUDY = "1.2.826.0.1.3680043.10.999.1"
SERIES = "1.2.826.0.1.3680043.10.999.2"
MODES = ("not_json", "dict", "junk", "hang", "endless", "big_search", "big_metadata", "empty", "deep", "two_arrays",
         "drip", "bad_gzip", "redirect_loop", "redirect_file", "many_parts")


def _study(uid: str) -> dict:
    return {"0020000D": {"vr": "UI", "Value": [uid]}, "00080020": {"vr": "DA", "Value": ["20260101"]}}


class _Handler(http.server.BaseHTTPRequestHandler):
    server: "_Server"

    def log_message(self, *args):  # quiet
        pass

    def _send(self, body: bytes, status: int = 200, content_type: str = "application/dicom+json",
              headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _drip(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            for start in range(0, len(body), 20):
                if self.server.stop.is_set():
                    return
                self.wfile.write(body[start:start + 20])
                self.wfile.flush()
                time.sleep(0.5)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _parts(self, count: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", 'multipart/related; type="application/dicom"; boundary=b')
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            block = b"--b\r\nContent-Type: application/dicom\r\n\r\n\r\n" * 1000
            for _ in range(count // 1000):
                if self.server.stop.is_set():
                    return
                self._chunk(block)
            self._chunk(b"--b--\r\n")
            self._chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _stream(self, head: bytes, item: bytes, count: int, tail: bytes) -> None:
        """A chunked answer of ``head``, ``count`` times ``item`` (comma separated) and ``tail``, written lazily."""
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            self._chunk(head)
            block = b",".join([item] * 4096)
            sent = 0
            while sent < count:
                n = min(4096, count - sent)
                self._chunk((b"," if sent else b"") + (block if n == 4096 else b",".join([item] * n)))
                sent += n
                if self.server.stop.is_set():
                    return
            self._chunk(tail)
            self._chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading: what a bounded client does

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")

    def do_GET(self):  # noqa: N802 - the name http.server calls
        mode = self.server.mode
        self.server.requests += 1
        path = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(path.query).items()}
        if mode == "hang":
            deadline = time.monotonic() + self.server.hang_s
            while time.monotonic() < deadline and not self.server.stop.is_set():
                time.sleep(0.1)
            return self._send(b"[]")
        if mode == "redirect_loop":
            return self._redirect(self.path)
        if mode == "redirect_file":
            return self._redirect("file:///etc/passwd")
        if mode == "many_parts" and "/series/" in path.path:  # a million empty parts
            return self._parts(1_000_000)
        if path.path.endswith("/studies"):
            if mode == "deep":  # nested deeper than Python's parser goes
                return self._send(b"[" * 200_000 + b"]" * 200_000)
            if mode == "two_arrays":
                return self._send(b"[] []")
            if mode == "drip":  # 20 bytes every half second, announced by Content-Length
                return self._drip(b"[" + b" " * 2_000_000 + b"]")
            if mode == "bad_gzip":
                return self._send(b"this is not gzip", headers={"Content-Encoding": "gzip"})
            if mode == "not_json":
                return self._send(b"<html>Service temporarily moved</html>", content_type="text/html")
            if mode == "dict":
                return self._send(b'{"a": 1}')
            if mode == "junk":
                return self._send(b'[1, "x", {"a": 1}]')
            if mode == "endless":  # every page full of new studies
                offset, limit = int(query.get("offset", 0)), int(query.get("limit", 100))
                return self._send(json.dumps([_study(f"{STUDY}.{offset + k}") for k in range(limit)]).encode())
            if mode == "big_search":  # 400 MB of studies
                item = json.dumps(_study(STUDY + ".7" * 20)).encode()
                return self._stream(b"[", item, (400 << 20) // len(item), b"]")
            if mode == "big_metadata":
                return self._send(json.dumps([_study(STUDY)]).encode())
            return self._send(b"[]")
        if path.path.endswith("/instances"):  # the report search: nothing reported yet
            return self._send(b"[]")
        if path.path.endswith("/series"):
            return self._send(json.dumps([{"0020000E": {"vr": "UI", "Value": [SERIES]},
                                           "00080060": {"vr": "CS", "Value": ["MR"]}}]).encode())
        if path.path.endswith("/metadata"):  # a million entries
            return self._stream(b"[", b"{}", 1_000_000, b"]")
        return self._send(b"[]")


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, mode: str, hang_s: float):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.mode, self.hang_s, self.requests, self.stop = mode, hang_s, 0, threading.Event()


@contextlib.contextmanager
def hostile_dicomweb(mode: str, hang_s: float = 30.0):
    """Yields (its DICOMweb root URL, the server) for one of :data:`MODES`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}")
    server = _Server(mode, hang_s)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web", server
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()

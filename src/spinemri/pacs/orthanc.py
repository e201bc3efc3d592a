"""A local Orthanc PACS with its DICOMweb plugin, for trying `spinemri pacs` (``make pacs-demo``) and for the tests.

Orthanc runs as its own process on 127.0.0.1 and a free port, with a configuration and storage in a
temporary folder, no DICOM (DIMSE) port, no remote access and no authentication. ``stop()`` and
``start()`` restart it on the same port and storage. The binary and the plugin are found on PATH and
in Debian's places (``apt-get install orthanc orthanc-dicomweb``), or named by SPINEMRI_ORTHANC and
SPINEMRI_ORTHANC_DICOMWEB.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from spinemri.errors import UserError

PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins", "/opt/homebrew/share/orthanc/plugins",
               "/usr/local/share/orthanc/plugins")
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1, never through a proxy


def find_orthanc() -> tuple[str, str] | None:
    """(the Orthanc binary, its DICOMweb plugin), or None where either is missing."""
    binary = os.environ.get("SPINEMRI_ORTHANC") or shutil.which("Orthanc") or (
        "/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
    plugin = os.environ.get("SPINEMRI_ORTHANC_DICOMWEB") or next(
        (str(p) for d in PLUGIN_DIRS for p in sorted(Path(d).glob("libOrthancDicomWeb.*"))), None)
    return (binary, plugin) if binary and plugin else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """A running Orthanc: ``url`` (its REST API and web interface), ``dicomweb`` (the DICOMweb root)."""

    def __init__(self, binary: str, plugin: str, folder: Path):
        self.binary, self.folder, self.port = binary, folder, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "spinemri", "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "index"),
            "HttpPort": self.port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}))
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        with open(self.folder / "orthanc.log", "ab") as log:
            self.process = subprocess.Popen([self.binary, str(self.config)], stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        started = time.monotonic()
        while True:
            if self.process.poll() is not None:
                raise UserError(f"Orthanc exited with status {self.process.returncode}:\n{self.log()[-3000:]}")
            with contextlib.suppress(OSError):
                with _DIRECT.open(f"{self.url}/system", timeout=5) as response:
                    if response.status == 200:
                        return
            if time.monotonic() - started > timeout:
                raise UserError(f"Orthanc did not answer {self.url}/system within {timeout:g} s:\n{self.log()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def log(self) -> str:
        path = self.folder / "orthanc.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def upload(self, path: str | Path) -> None:
        """Store one DICOM file through Orthanc's own REST API (POST /instances)."""
        request = urllib.request.Request(f"{self.url}/instances", data=Path(path).read_bytes(), method="POST",
                                         headers={"Content-Type": "application/dicom"})
        with _DIRECT.open(request, timeout=60) as response:
            response.read()

    def get(self, path: str):
        with _DIRECT.open(f"{self.url}{path}", timeout=60) as response:
            return json.loads(response.read())

    def file(self, instance: str) -> bytes:
        """The DICOM file of an instance (by Orthanc's id)."""
        with _DIRECT.open(f"{self.url}/instances/{instance}/file", timeout=60) as response:
            return response.read()

    def reports(self) -> dict[str, list[bytes]]:
        """{StudyInstanceUID: the files of the study's SR instances}."""
        found: dict[str, list[bytes]] = {}
        for study in self.get("/studies"):
            uid = self.get(f"/studies/{study}")["MainDicomTags"]["StudyInstanceUID"]
            for series in self.get(f"/studies/{study}/series"):
                if series["MainDicomTags"].get("Modality") == "SR":
                    found.setdefault(uid, []).extend(self.file(i) for i in series["Instances"])
        return found


@contextlib.contextmanager
def local_orthanc(folder: str | Path | None = None) -> Iterator[Orthanc]:
    """A running Orthanc on a new storage in ``folder`` (default: a temporary folder, removed afterwards)."""
    found = find_orthanc()
    if found is None:
        raise UserError("Orthanc and its DICOMweb plugin were not found: install them (Debian/Ubuntu: apt-get install "
                        "orthanc orthanc-dicomweb) or set SPINEMRI_ORTHANC and SPINEMRI_ORTHANC_DICOMWEB")
    root = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="spinemri-orthanc-"))
    root.mkdir(parents=True, exist_ok=True)
    server = Orthanc(*found, root)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        if folder is None:
            shutil.rmtree(root, ignore_errors=True)

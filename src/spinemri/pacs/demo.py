"""`make pacs-demo`: the PACS loop on a local Orthanc, for a person to watch.

Starts Orthanc with its DICOMweb plugin (:mod:`spinemri.pacs.orthanc`), uploads a few phantom studies
with a made-up patient identity and clinical series names, runs ``spinemri pacs --once`` against it
(the command a site runs), reads back each study's DICOM SR and prints its findings. With ``--keep``
Orthanc stays up until Ctrl-C, to browse the studies and their reports in its web interface.

    python -m spinemri.pacs.demo --data data/phantom [--studies 2] [--keep]
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pydicom

from spinemri.data.schema import PROBABILITY_COLUMNS
from spinemri.data.studies import find_studies
from spinemri.pacs.orthanc import local_orthanc
from spinemri.pacs.report import read_report

CLINICAL = {"Sagittal T1": "T1_TSE_SAG", "Sagittal T2/STIR": "T2_TSE_SAG", "Axial T2": "t2_tse_tra"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/phantom", help="a phantom (spinemri data synth) or RSNA-layout folder")
    parser.add_argument("--studies", type=int, default=2, help="how many of its studies to upload")
    parser.add_argument("--model", default="models:/spinemri-study@champion")
    parser.add_argument("--keep", action="store_true", help="keep Orthanc running until Ctrl-C")
    args = parser.parse_args(argv)
    studies = [s for s in find_studies(args.data) if {x.description for x in s.series} >= set(CLINICAL)][:args.studies]
    if not studies:
        sys.exit(f"{args.data} holds no study with all three series types; run `make demo` first")
    with tempfile.TemporaryDirectory() as state, local_orthanc() as orthanc:
        print(f"Orthanc {orthanc.get('/system')['Version']} with DICOMweb at {orthanc.dicomweb}", flush=True)
        today = dt.date.today().strftime("%Y%m%d")
        for k, study in enumerate(studies):
            for series in study.series:
                for path in series.files:
                    ds = pydicom.dcmread(path)
                    ds.PatientName, ds.PatientID, ds.StudyDate = f"Demo^Patient{k + 1}", f"DEMO-{k + 1}", today
                    ds.SeriesDescription = CLINICAL.get(series.description or "", ds.get("SeriesDescription", ""))
                    buffer = io.BytesIO()
                    ds.save_as(buffer)
                    _upload_bytes(orthanc, buffer.getvalue())
            print(f"uploaded study {study.study_id} as Demo^Patient{k + 1}: "
                  f"{sum(len(s.files) for s in study.series)} files, {len(study.series)} series", flush=True)
        command = [sys.executable, "-m", "spinemri", "pacs", "--url", orthanc.dicomweb, "--once", "--all-dates",
                   "--model", args.model]
        print("$ spinemri pacs --url", orthanc.dicomweb, "--once --all-dates", flush=True)
        started = time.perf_counter()
        done = subprocess.run(command, env={**os.environ, "SPINEMRI_PACS_STATE": state})
        if done.returncode:
            sys.exit(done.returncode)
        print(f"(the pass took {time.perf_counter() - started:.1f} s)")
        for uid, files in orthanc.reports().items():
            for data in files:
                ds = pydicom.dcmread(io.BytesIO(data))
                findings = read_report(ds)
                print(f"\n{ds.PatientName}: {ds.SeriesDescription}, {len(findings)} findings "
                      f"({(findings['source'] == 'model').sum()} from the model)")
                table = findings[["condition", "level", "grade", *PROBABILITY_COLUMNS, "source"]]
                with pd.option_context("display.width", 160, "display.precision", 3):
                    print(table.to_string(index=False))
        if args.keep:
            print(f"\nOrthanc's web interface: {orthanc.url}/app/explorer.html (Ctrl-C stops it)", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass


def _upload_bytes(orthanc, data: bytes) -> None:
    with tempfile.NamedTemporaryFile(suffix=".dcm") as handle:
        handle.write(data)
        handle.flush()
        orthanc.upload(Path(handle.name))


if __name__ == "__main__":
    main()

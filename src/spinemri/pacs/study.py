"""One study through the worker: is it reported already, its series' types from their metadata, the series
the models read fetched to a temporary folder (WADO-RS), graded, and its report stored (STOW-RS).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
import re
import shutil
import tempfile
import zlib

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from spinemri.data.dicom import read_header, series_order
from spinemri.data.schema import SERIES_DESCRIPTIONS
from spinemri.data.series_types import header_keywords, series_type
from spinemri.data.studies import Study, StudySeries
from spinemri.errors import ImageReadError, ImageTooLarge, StudyError
from spinemri.pacs.report import report_uids, structured_report
from spinemri.pacs.server import TAGS, ServerAnswer, log, value_of, with_retry

SERIES_ATTEMPTS = 3  # downloads of a series that keeps coming short before its study counts as partial


class PartialStudy(StudyError):
    """A series kept coming with fewer instances than the server lists: worth another try on the next pass."""


def study_key(study_uid: str) -> str:
    """A study's name in logs and MLflow: the first 12 hex digits of the SHA-256 of its Study Instance UID."""
    return hashlib.sha256(study_uid.encode()).hexdigest()[:12]


def process_study(settings, client, study_uid, predictor, model_name, model_version) -> dict:
    _, sop_uid = report_uids(study_uid, model_name, model_version)
    if _reported(settings, client, study_uid, sop_uid):
        return dict(status="skipped", reason=f"reported by {model_name} v{model_version} already")
    series = with_retry(settings, "the series search (QIDO-RS)",
                        lambda: client.search_for_series(study_uid, search_filters={"Modality": "MR"}))
    workdir = Path(tempfile.mkdtemp(prefix="spinemri-pacs-", dir=settings.workdir))
    try:
        study, skipped = _fetch(settings, client, study_uid, series, workdir)
        if not study.series:  # every MR series is of a type no model reads: nothing to grade, nothing to report
            return dict(status="unread", reason=f"none of its {len(skipped)} MR series is of a type the models read "
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
    referred = int(prediction.sites["refer"].sum()) if "refer" in prediction.sites else None
    if referred is not None:
        reason += f", {referred} referred"
    why = sorted({_no_paths(r) for r, src in zip(prediction.sites["reason"], prediction.sites["source"])
                  if src == "prior" and not r.startswith("no ")})  # beyond missing series: unreadable ones, ...
    if why:
        reason += f" ({'; '.join(why[:3])})"
    if missing_types:
        reason += f"; no {', '.join(missing_types)} series"
    if skipped:
        reason += f"; {len(skipped)} series skipped ({'; '.join(skipped)})"
    return dict(status="reported", reason=reason, report=sop_uid, from_prior=prediction.from_prior, referred=referred)


def _no_paths(reason: str) -> str:
    """A reason without the worker's temporary paths (a file is 'a file', a series folder 'a series')."""
    reason = re.sub(r"[^\s'\"(]*spinemri-pacs-[^\s'\"]*?\.dcm", "a file", str(reason))
    return re.sub(r"[^\s'\"(]*spinemri-pacs-[^\s'\",;:)]*", "a series", reason)


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
    return any(value_of(item, "instance") == sop_uid for item in found)


def _fetch(settings, client, study_uid: str, series: list[dict], workdir: Path) -> tuple[Study, list[str]]:
    """The study's series of the types the models read, on disk; and what the other MR series are."""
    kept, skipped, patients = [], [], set()
    for item in sorted(series, key=lambda s: value_of(s, "series") or ""):
        series_uid = value_of(item, "series")
        if series_uid is None or value_of(item, "modality") not in ("MR", None):
            continue
        metadata = with_retry(settings, "the series metadata (WADO-RS)",
                              lambda: client.retrieve_series_metadata(study_uid, series_uid, keep=(TAGS["patient"],)))
        if not isinstance(metadata, list):
            raise StudyError("malformed: a series' metadata is not DICOM JSON")
        if not metadata:
            raise StudyError("a series has no instances")
        kind = series_type(metadata_header(metadata[0]))
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
        patients.update(value_of(m, "patient") for m in metadata if value_of(m, "patient"))
        kept.append(StudySeries(series_id, kind.description, tuple(files), kind.reason))
    if len(patients) > 1:  # one Study Instance UID filed under two patients: one report cannot name both
        raise StudyError(f"malformed: the series of this study name {len(patients)} different patients (PatientID)")
    if not kept and not skipped:
        raise StudyError("the study has no MR series")
    return Study(study_key(study_uid), tuple(kept)), skipped


def metadata_header(metadata) -> Dataset:
    """The attributes :func:`series_type` reads, as a pydicom header, from a WADO-RS metadata object. Metadata
    that is not DICOM JSON is a malformed study; the message quotes no value (it may be a patient's)."""
    wanted = {f"{tag_for_keyword(k):08X}" for k in header_keywords()}
    try:
        return Dataset.from_json({tag: value for tag, value in metadata.items() if tag.upper() in wanted})
    except Exception:  # noqa: BLE001 - pydicom raises ValueError, TypeError, KeyError, ... on bad JSON
        raise StudyError("malformed: a series' metadata is not DICOM JSON") from None

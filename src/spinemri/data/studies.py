"""A study as spinemri reads it: its series, each with a series type and its DICOM files.

``find_studies`` reads them from a dataset folder (the RSNA layout, or ``<study>/<series>/*.dcm``)
and ``study_from_zip`` from an uploaded archive, which is unpacked within the limits of
:mod:`spinemri.data.limits`. A series' type comes from the dataset's series-descriptions CSV, else
from its images (:mod:`spinemri.data.series_types`: the RSNA names, else plane, contrast and description).
"""

from __future__ import annotations

import io
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from pydicom.dataset import Dataset

from spinemri.data import limits, schema
from spinemri.data.dicom import read_header
from spinemri.data.tables import CheckReport, read_csv
from spinemri.data.series_types import NOT_MR, SeriesType, series_type
from spinemri.errors import ImageReadError, ImageTooLarge, StudyError


@dataclass(frozen=True)
class StudySeries:
    series_id: int
    description: str | None  # a series type; None: skipped (a localizer, DWI, ... or nothing a rule takes)
    files: tuple[Path, ...]
    reason: str = ""  # where the type came from (the series CSV, or the rule and header values that decided)


@dataclass(frozen=True)
class Study:
    study_id: str
    series: tuple[StudySeries, ...]


def find_studies(data_dir: str | Path, study_ids: Sequence | None = None) -> list[Study]:
    """Studies of an RSNA-layout folder (``train_images/`` or ``test_images/``), or a folder of study
    folders. Series types come from ``*_series_descriptions.csv`` when present, else from each series'
    first file (:func:`header_type`)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise StudyError(f"{root} is not a folder; pass a dataset folder (with train_images/ or test_images/) "
                         "or a folder of <study_id>/<series_id>/*.dcm")
    images = next((root / d for d in (schema.IMAGES_DIR, schema.TEST_IMAGES_DIR) if (root / d).is_dir()), root)
    descriptions = series_descriptions(root)
    folders = sorted((p for p in images.iterdir() if p.is_dir()), key=lambda p: p.name)
    if study_ids:
        wanted = [str(s) for s in study_ids]
        present = {p.name for p in folders}
        missing = [s for s in wanted if s not in present]
        if missing:
            raise StudyError(f"{images} has no study folder {', '.join(missing[:5])}; "
                             f"{len(present)} studies are there (e.g. {', '.join(sorted(present)[:3])})")
        folders = [images / s for s in wanted]
    if not folders:
        raise StudyError(f"{images} holds no study folders (<study_id>/<series_id>/*.dcm)")
    return [_study(folder, descriptions) for folder in folders]


def _study(folder: Path, descriptions: Mapping) -> Study:
    series = []
    for series_folder in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = tuple(sorted(series_folder.glob("*.dcm")))
        try:
            series_id = int(series_folder.name)
        except ValueError:  # a stable number for a named folder (str hashes change from run to run)
            series_id = zlib.crc32(series_folder.name.encode())
        listed = descriptions.get((folder.name, series_id))
        if listed is not None:
            series.append(StudySeries(series_id, listed, files, "listed in the series descriptions CSV"))
        elif files:
            found = header_type(files[0])
            series.append(StudySeries(series_id, found.description, files, found.reason))
        else:
            series.append(StudySeries(series_id, None, files, "no .dcm files"))
    return Study(folder.name, tuple(series))


def header_type(path: Path, header: Dataset | None = None) -> SeriesType:
    """The series type of the series ``path`` belongs to, from its header (:func:`series_types.series_type`)."""
    try:
        header = read_header(path) if header is None else header
    except ImageTooLarge:
        raise
    except ImageReadError as exc:
        return SeriesType(None, "unreadable", f"skipped: {exc.path} {exc.reason}")
    return series_type(header)


def series_descriptions(root: str | Path) -> dict[tuple[str, int], str]:
    """``{(study_id, series_id): series_description}`` from a dataset folder's train_ and test_ series CSVs
    (neither is required: an empty dict without them)."""
    found: dict[tuple[str, int], str] = {}
    for name in (schema.SERIES_CSV, schema.TEST_SERIES_CSV):
        path = Path(root) / name
        if path.is_file():
            table = read_csv(path, required=list(schema.SERIES_COLUMNS))
            found.update({(str(s), int(se)): str(d) for s, se, d in
                          table[list(schema.SERIES_COLUMNS)].itertuples(index=False)})
    return found


def check_studies(path: str | Path) -> CheckReport:
    """A folder of unlabelled studies: each series' type (from the series CSV, else its images) and why."""
    report = CheckReport(str(path), "studies")
    try:
        studies = find_studies(path)
    except (StudyError, ImageTooLarge) as exc:
        report.problems.append(str(exc))
        return report
    report.series = [{"study_id": study.study_id, "series_id": s.series_id, "files": len(s.files),
                      "type": s.description or "skipped", "why": s.reason}
                     for study in studies for s in study.series]
    types = Counter(row["type"] for row in report.series)
    report.summary = {"studies": len(studies), "series": len(report.series),
                      "series_per_type": dict(sorted(types.items()))}
    for study in studies:
        missing = [d for d in schema.SERIES_DESCRIPTIONS if d not in {s.description for s in study.series}]
        if missing:
            report.warnings.append(f"study {study.study_id} has no {' and no '.join(missing)} series: its rows read "
                                   "from them fall back to the prior")
    return report


def study_from_zip(data: bytes, study_id: str | None, workdir: Path, name: str = "study_zip_b64") -> Study:
    """Unpack a zip of one study's DICOM files (any folder layout) and group them by series.

    Series are grouped by SeriesInstanceUID; the series id is the folder name when numeric, else
    the SeriesNumber. The study id is ``study_id``, else the archive's single top folder. Members
    are streamed to ``workdir`` with a running byte count, never read whole into memory; the
    archive is refused as soon as it exceeds the limits of :mod:`spinemri.data.limits`.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
        raise StudyError(f"{name} is not a zip archive ({exc}); zip the study's DICOM files and "
                         "base64-encode the archive") from None
    members = [m for m in archive.infolist() if not m.is_dir() and not Path(m.filename).name.startswith(".")]
    if not members:
        raise StudyError(f"{name}: the archive holds no files")
    _check_declared(members, name)
    groups: dict[str, list[Path]] = {}
    meta: dict[str, tuple[int, str | None]] = {}
    unpacked = 0
    for k, member in enumerate(members):
        target = workdir / f"{k:06d}.dcm"
        unpacked += _extract(archive, member, target, unpacked, name)
        try:
            header = read_header(target)
        except ImageTooLarge as exc:
            raise StudyError(f"{name}: {member.filename} {exc.reason}") from None
        except ImageReadError:
            continue  # not DICOM (a README, a DICOMDIR without pixels, ...)
        uid = str(header.get("SeriesInstanceUID", "") or Path(member.filename).parent)
        parent = Path(member.filename).parent.name
        series_id = int(parent) if parent.isdigit() else int(header.get("SeriesNumber", 0) or 0)
        groups.setdefault(uid, []).append(target)
        meta.setdefault(uid, (series_id, header_type(target, header)))
    if not groups:
        raise StudyError(f"{name}: none of the {len(members)} files in the archive is a DICOM file")
    if study_id in (None, ""):
        tops = {Path(m.filename).parts[0] for m in members if len(Path(m.filename).parts) > 1}
        study_id = tops.pop() if len(tops) == 1 else "study"
    not_mr = [meta[uid][1].reason for uid in groups if meta[uid][1].rule == NOT_MR]
    if len(not_mr) == len(groups):  # a CT or radiograph study: nothing a lumbar MR model may grade
        kinds = ", ".join(sorted({r.removeprefix("skipped: Modality ").split(",")[0] for r in not_mr}))
        raise StudyError(f"{name}: the study holds no MR series ({len(not_mr)} series of Modality {kinds}); "
                         "spinemri grades lumbar-spine MR studies")
    series = [StudySeries(meta[uid][0], meta[uid][1].description, tuple(paths), meta[uid][1].reason)
              for uid, paths in groups.items()]
    return Study(str(study_id), tuple(sorted(series, key=lambda s: s.series_id)))


def _check_declared(members: Sequence[zipfile.ZipInfo], name: str) -> None:
    """Refuse an archive whose directory already declares too many files or bytes."""
    if len(members) > limits.STUDY_FILES.value:
        raise StudyError(f"{name}: the archive holds {len(members):,} files, over {limits.STUDY_FILES.describe()}")
    biggest = max(members, key=lambda m: m.file_size)
    if biggest.file_size > limits.STUDY_FILE_BYTES.value:
        raise StudyError(f"{name}: {biggest.filename} unpacks to {limits.human_size(biggest.file_size)}, over "
                         f"{limits.STUDY_FILE_BYTES.describe()}")
    total = sum(m.file_size for m in members)
    if total > limits.STUDY_BYTES.value:
        raise StudyError(f"{name}: the archive unpacks to {limits.human_size(total)}, over {limits.STUDY_BYTES.describe()}")


def _extract(archive: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path, unpacked: int, name: str) -> int:
    """Stream one member to ``target`` in 1 MB chunks, counting bytes against the limits; returns its size."""
    label = f"{name}: {member.filename}"
    written = 0
    try:
        with archive.open(member) as source, open(target, "wb") as out:
            while chunk := source.read(1 << 20):
                written += len(chunk)
                if written > limits.STUDY_FILE_BYTES.value:
                    raise StudyError(f"{label} unpacks to more than {limits.human_size(limits.STUDY_FILE_BYTES.value)}, "
                                     f"over {limits.STUDY_FILE_BYTES.describe()}")
                if unpacked + written > limits.STUDY_BYTES.value:
                    raise StudyError(f"{name}: the archive unpacks to more than "
                                     f"{limits.human_size(limits.STUDY_BYTES.value)}, over {limits.STUDY_BYTES.describe()}")
                out.write(chunk)
    except NotImplementedError as exc:
        raise StudyError(f"{label} uses a compression method this server cannot unpack ({exc}); zip the study "
                         "with the standard 'deflate' or 'store' method") from None
    except RuntimeError as exc:  # zipfile's word for an encrypted member
        if "encrypted" in str(exc) or member.flag_bits & 0x1:
            raise StudyError(f"{label} is encrypted; send the study's files unencrypted") from None
        raise StudyError(f"{label} cannot be unpacked ({exc})") from None
    except zipfile.BadZipFile as exc:
        raise StudyError(f"{label} is damaged ({exc}); zip the study again") from None
    except (zlib.error, EOFError) as exc:
        raise StudyError(f"{label} is damaged: its compressed data ends early or is corrupt ({exc}); "
                         "zip the study again") from None
    return written

"""A study's 25 findings as a DICOM Comprehensive SR: a TID 1500 measurement report, built with highdicom.

One measurement group per condition and level. Each holds the grade (a coded qualitative evaluation,
the most probable of the three), the three probabilities (numeric measurements without unit), where
the grade came from (the model, or the prior where nothing could be seen), for a model with referral
thresholds whether the finding is referred at them (a qualitative evaluation coded SNOMED CT Yes or No,
spinemri.metrics.operating) and, for a prior row whose series type the study lacks, that series type.
A graded row is a planar ROI group (TID 1410) whose region is the site: a POINT on the source image,
referenced by its SOP Instance UID. A prior row is an image-level group (TID 1501). The algorithm identification holds the registered model's name and
version; the observer is a device named after it.

The concepts are coded in a local scheme (``99SPINEMRI``, as DICOM allows for codes no standard
scheme has). Spatial coordinates follow DICOM: (0, 0) is the top-left corner of the top-left pixel,
so a site at pixel (x, y) (column, row; a pixel's centre is its whole number) is written at
(x + 0.5, y + 0.5).

The report's Series and SOP Instance UIDs are derived from the study's UID and the model's name and
version (:func:`report_uids`): a second report of the same study by the same model version has the
same UIDs, which a PACS stores once.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Mapping

import numpy as np
import pandas as pd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from spinemri.data.schema import CONDITION_NAMES, CONDITIONS, LEVELS, PROBABILITY_COLUMNS, SEVERITIES, SERIES_DESCRIPTIONS

SCHEME = "99SPINEMRI"
MANUFACTURER = "spinemri"
PIXEL_CENTRE = 0.5  # DICOM SCOORD of a pixel's centre, from its whole-number index


def _code(value: str, meaning: str):
    import highdicom as hd

    return hd.sr.CodedConcept(value, SCHEME, meaning)


CONDITION_CODES = dict(zip(CONDITIONS, ("SCS", "LNFN", "RNFN", "LSS", "RSS")))
LEVEL_CODES = {level: level.replace("/", "-") for level in LEVELS}
SEVERITY_CODES = dict(zip(SEVERITIES, ("NORMAL-MILD", "MODERATE", "SEVERE")))
SERIES_CODES = dict(zip(SERIES_DESCRIPTIONS, ("SAG-T1", "SAG-T2-STIR", "AX-T2")))
SEVERITY, SOURCE, MISSING = ("SEVERITY", "Severity"), ("GRADE-SOURCE", "Grade source"), \
    ("MISSING-SERIES", "Series type not in the study")
REFER = ("REFER", "Referred at the model's operating point")
SOURCES = {"model": ("MODEL", "Graded by the model at the site"), "prior": ("PRIOR", "Prior: nothing could be seen")}
PROBABILITY = {column: (f"P-{SEVERITY_CODES[s]}", f"Probability of {s}") for column, s in zip(PROBABILITY_COLUMNS,
                                                                                               SEVERITIES)}


def report_uids(study_uid: str, model_name: str, model_version: str) -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) of the report of ``study_uid`` by one model version."""
    parts = ["spinemri-sr", study_uid, model_name, str(model_version)]
    return generate_uid(entropy_srcs=[*parts, "series"]), generate_uid(entropy_srcs=[*parts, "instance"])


def structured_report(rows: pd.DataFrame, sites: pd.DataFrame, sources: Mapping[str, Dataset], study: Dataset, *,
                      model_name: str, model_version: str, missing: Mapping[str, str] | None = None) -> Dataset:
    """The Comprehensive SR of one study's prediction.

    ``rows`` and ``sites`` are a :class:`spinemri.serving.study_predictor.StudyPrediction`'s (25 rows each, in
    the same order); ``sources`` maps a site's ``row_id`` to the header of the image it lies on;
    ``study`` is the header of any image of the study (its patient and study identity go into the
    report); ``missing`` maps a prior row's ``row_id`` to the series type the study lacks.
    """
    import highdicom as hd

    missing = missing or {}
    series_uid, sop_uid = report_uids(study.StudyInstanceUID, model_name, model_version)
    algorithm = hd.sr.AlgorithmIdentification(name=model_name, version=str(model_version))
    groups = []
    for (_, row), (_, site) in zip(rows.iterrows(), sites.iterrows()):
        condition, level = _condition_level(str(row["row_id"]))
        probabilities = [float(row[c]) for c in PROBABILITY_COLUMNS]
        grade = SEVERITIES[int(np.argmax(probabilities))]
        evaluations = [hd.sr.QualitativeEvaluation(_code(*SEVERITY), _code(SEVERITY_CODES[grade], grade)),
                       hd.sr.QualitativeEvaluation(_code(*SOURCE), _code(*SOURCES[str(site["source"])]))]
        if "refer" in site.index and not pd.isna(site["refer"]):
            answer = codes.SCT.Yes if bool(site["refer"]) else codes.SCT.No
            evaluations.append(hd.sr.QualitativeEvaluation(_code(*REFER), hd.sr.CodedConcept.from_code(answer)))
        lacking = missing.get(str(row["row_id"]))
        if lacking:
            evaluations.append(hd.sr.QualitativeEvaluation(_code(*MISSING), _code(SERIES_CODES[lacking], lacking)))
        measurements = [hd.sr.Measurement(name=_code(*PROBABILITY[c]), value=p,
                                          unit=hd.sr.CodedConcept("1", "UCUM", "no units"), algorithm_id=algorithm)
                        for c, p in zip(PROBABILITY_COLUMNS, probabilities)]
        common = dict(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=generate_uid(entropy_srcs=[sop_uid, condition, level]),
                identifier=f"{CONDITION_NAMES[condition]} {level}"),
            finding_type=_code(CONDITION_CODES[condition], CONDITION_NAMES[condition]),
            finding_sites=[hd.sr.FindingSite(_code(LEVEL_CODES[level], f"Intervertebral level {level}"))],
            algorithm_id=algorithm, measurements=measurements, qualitative_evaluations=evaluations)
        source = sources.get(str(row["row_id"])) if site["source"] == "model" else None
        if source is not None:
            region = hd.sr.ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POINT,
                graphic_data=np.array([[float(site["x"]) + PIXEL_CENTRE, float(site["y"]) + PIXEL_CENTRE]]),
                source_image=hd.sr.SourceImageForRegion.from_source_image(source))
            groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(referenced_region=region, **common))
        else:
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(**common))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=["spinemri-device", model_name, str(model_version)]),
            name=f"{model_name} {model_version}"[:64], manufacturer_name=MANUFACTURER, model_name=model_name[:64]))
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_code("LSPINE-MR", "MRI of the lumbar spine"),
        imaging_measurements=groups)
    study = _with_identity(study)
    evidence = [study, *{ds.SOPInstanceUID: ds for ds in sources.values()
                         if ds.SOPInstanceUID != study.SOPInstanceUID}.values()]
    return hd.sr.ComprehensiveSR(
        evidence=evidence, content=content, series_instance_uid=series_uid, series_number=9900,
        sop_instance_uid=sop_uid, instance_number=1, manufacturer=MANUFACTURER,
        series_description=f"spinemri {model_name} v{model_version}"[:64], is_complete=True, is_final=False)


IDENTITY = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
            "StudyTime", "ReferringPhysicianName")  # the report copies them from the study (type 2: present, may be empty)


VALID = {"PatientBirthDate": r"\d{8}", "StudyDate": r"\d{8}", "StudyTime": r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?",
         "PatientSex": r"[MFO]"}  # what highdicom accepts; a value that is not left empty (type 2) in the report


def _with_identity(study: Dataset) -> Dataset:
    """The study header with every patient and study attribute the report copies present: empty where absent,
    or where the source's value is not valid DICOM (a date written 1950-07-14, a sex written Male)."""
    copy = Dataset(study)
    for keyword in IDENTITY:
        raw = copy[keyword].value if keyword in copy else ""
        text = raw.decode("latin-1", "replace") if isinstance(raw, bytes) else str(raw if raw is not None else "")
        if keyword not in copy or (keyword in VALID and not _valid(keyword, text.strip())):
            setattr(copy, keyword, "")
    return copy


def _valid(keyword: str, text: str) -> bool:
    if not text:
        return True
    if not re.fullmatch(VALID[keyword], text):
        return False
    if keyword.endswith("Date"):
        try:
            dt.datetime.strptime(text, "%Y%m%d")
        except ValueError:
            return False
    if keyword == "StudyTime":
        hh, mm, ss = int(text[:2]), int(text[2:4] or 0), int(text[4:6] or 0)
        return hh < 24 and mm < 60 and ss < 61
    return True


def read_report(ds: Dataset) -> pd.DataFrame:
    """The findings of a report :func:`structured_report` wrote, one row per condition and level: condition,
    level, grade, the three probabilities, source, refer (True or False; None where the report says
    nothing of referral), missing (series type), and where graded the site (sop_instance_uid, x, y in
    pixel indices)."""
    import highdicom as hd

    report = hd.sr.ComprehensiveSR.from_dataset(ds)
    rows = []
    for group in [*report.content.get_planar_roi_measurement_groups(),
                  *report.content.get_image_measurement_groups()]:
        condition = next(k for k, v in CONDITION_CODES.items() if v == group.finding_type.value)
        level = next(k for k, v in LEVEL_CODES.items() if v == group.finding_sites[0].value.value)
        values = {e.name.value: e.value for e in group.get_qualitative_evaluations()}
        row = dict(condition=condition, level=level, grade=values[SEVERITY[0]].meaning,
                   source=next(k for k, v in SOURCES.items() if v[0] == values[SOURCE[0]].value),
                   refer=_answer(values[REFER[0]]) if REFER[0] in values else None,
                   missing=values[MISSING[0]].meaning if MISSING[0] in values else "",
                   sop_instance_uid="", x=np.nan, y=np.nan)
        for measurement in group.get_measurements():
            column = next(c for c, (code, _) in PROBABILITY.items() if code == measurement.name.value)
            row[column] = float(measurement.value)
        roi = getattr(group, "roi", None)
        if roi is not None:
            (x, y), = roi.value
            source = roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            row.update(sop_instance_uid=str(source), x=float(x) - PIXEL_CENTRE,
                       y=float(y) - PIXEL_CENTRE)
        rows.append(row)
    order = {(c, lv): k for k, (c, lv) in enumerate((c, lv) for c in CONDITIONS for lv in LEVELS)}
    return pd.DataFrame(rows).sort_values(["condition", "level"], key=lambda s: s.map(
        {c: order.get((c, LEVELS[0]), 0) for c in CONDITIONS} if s.name == "condition" else
        {lv: k for k, lv in enumerate(LEVELS)})).reset_index(drop=True)


def _answer(value) -> bool:
    """A coded SNOMED CT Yes or No as True or False."""
    for code, answer in ((codes.SCT.Yes, True), (codes.SCT.No, False)):
        if (value.value, value.scheme_designator) == (code.value, code.scheme_designator):
            return answer
    raise ValueError(f"a referral is coded SCT Yes or No, got {value.scheme_designator} {value.value} ({value.meaning})")


def _condition_level(row_id: str) -> tuple[str, str]:
    """'<study>_<condition>_<l4_l5>' -> (condition, 'L4/L5')."""
    for condition in CONDITIONS:
        marker = f"_{condition}_"
        if marker in row_id:
            level = row_id.split(marker, 1)[1].upper().replace("_", "/")
            if level in LEVELS:
                return condition, level
    raise ValueError(f"row_id {row_id!r} names no condition and level")

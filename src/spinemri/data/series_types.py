"""A series' type from its images when its SeriesDescription is not one of the RSNA names.

Clinical scanners name series as their sites configured them ("T2_TSE_SAG", "SAG T2 FSE",
"t2_tse_tra", "STIR_SAG", ...) or not at all, so the type is read from what the header measures:

* the **plane**, from ImageOrientationPatient: the slice normal's largest component (left-right:
  sagittal, head-foot: axial, front-back: coronal), when that component is at least
  ``PLANE_COSINE`` (a tilt of up to about 37 degrees); the description's "sag", "ax"/"tra", "cor"
  where the header has no orientation. An orientation that is not two perpendicular unit vectors is
  not read;
* the **contrast**, from RepetitionTime, EchoTime, InversionTime and ScanningSequence (thresholds
  in ``CONTRAST``; a gradient echo's timing is not read, and zero or negative times count as
  missing); the description's "stir", "t2", "t1", ... where those are missing. A description
  that names two planes, or both T1 and T2, is not guessed from;
* the description, ProtocolName and ImageType, for the series that are recognised and skipped:
  localizers and scouts, diffusion (DWI, ADC), contrast-enhanced and reformatted series.

:data:`RULES` is the table that turns these into a type: the first rule that matches decides, either
a series type (one of ``schema.SERIES_DESCRIPTIONS``) or ``skip``. A site adds rules of its own in a
YAML file named by the environment variable ``SPINEMRI_SERIES_RULES`` (a list of mappings with the
fields of :class:`SeriesRule`); they are tried before these, and the file is read once per process.
Every answer says why (:class:`SeriesType.reason`), which ``spinemri data check`` prints for each
series.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from spinemri.data import schema
from spinemri.errors import ConfigError

SKIP = "skip"
PLANES = ("sagittal", "coronal", "axial")  # the slice normal along x (left-right), y (front-back), z (head-foot)
CONTRASTS = ("t1", "t2", "stir", "pd", "flair", "t2star")
PLANE_COSINE = 0.8  # the normal's largest component: at least this (a tilt of at most ~37 degrees), or "oblique"
PERPENDICULAR = 0.1  # |cos| between the row and column directions above this: the orientation is not read
RULES_ENV = "SPINEMRI_SERIES_RULES"
NOT_MR = "not MR"  # the rule name of a series skipped for its Modality

# Contrast from the sequence's timing (ms). Inversion recovery (IR in ScanningSequence, or an
# InversionTime): STIR below STIR_MAX_TI, FLAIR above FLAIR_MIN_TI, T1-weighted IR between. Without IR:
# short TR and TE is T1, long TR and long TE is T2, long TR and short TE is proton density.
CONTRAST = dict(STIR_MAX_TI=300.0, FLAIR_MIN_TI=1500.0, T1_MAX_TR=1000.0, T1_MAX_TE=40.0, LONG_TR=1500.0,
                T2_MIN_TE=60.0, PD_MAX_TE=40.0)

# Words of a description (lower case) that name a plane or a contrast: the fallback where the
# header does not measure it.
PLANE_WORDS = {"sagittal": r"\bsag|sag\b|_sag|sag_", "axial": r"\bax|\btra|ax\b|tra\b|_ax|_tra",
               "coronal": r"\bcor(onal)?\b|_cor(onal)?\b|\bcor(onal)?_"}
CONTRAST_WORDS = {"stir": r"stir|tirm|\bir\b", "flair": r"flair", "t2star": r"t2 ?\*|\bmedic\b|\bmerge\b|\bgre\b",
                  "t2": r"t2(?!\d)", "t1": r"t1(?!\d)", "pd": r"\bpd"}  # (T11, T12: thoracic levels)
ABSENT = {"", "none", "no", "n/a", "na", "0"}  # a tag of evidence with one of these values counts as absent
REASON_TEXT = 80  # characters of a description quoted in a reason


@dataclass(frozen=True)
class SeriesRule:
    """One row of the table. The evidence (``description``, ``image_type``, ``tags``) matches when any of
    its entries does (a rule without evidence: always); ``plane`` and ``contrast``, where given, must
    also hold. ``result`` is a series type or ``skip``; ``why`` is the reason a skip gives."""

    name: str
    result: str
    description: tuple[str, ...] = ()  # regular expressions searched in SeriesDescription and ProtocolName
    image_type: tuple[str, ...] = ()  # values of ImageType, e.g. LOCALIZER
    tags: tuple[str, ...] = ()  # DICOM keywords whose presence (non-empty) is the evidence
    plane: str | None = None
    contrast: str | None = None
    why: str = ""

    def __post_init__(self) -> None:
        problems = []
        if self.result != SKIP and self.result not in schema.SERIES_DESCRIPTIONS:
            problems.append(f"result must be {SKIP!r} or one of {', '.join(schema.SERIES_DESCRIPTIONS)}, "
                            f"got {self.result!r}")
        if self.plane is not None and self.plane not in (*PLANES, "oblique"):
            problems.append(f"plane must be one of {', '.join(PLANES)}, oblique, got {self.plane!r}")
        if self.contrast is not None and self.contrast not in CONTRASTS:
            problems.append(f"contrast must be one of {', '.join(CONTRASTS)}, got {self.contrast!r}")
        if not (self.description or self.image_type or self.tags or self.plane or self.contrast):
            problems.append("it tests nothing (give description, image_type, tags, plane or contrast), so it would "
                            "take every series")
        for tag in self.tags:
            if tag_for_keyword(tag) is None:
                problems.append(f"tags: {tag!r} is not a DICOM keyword (e.g. ContrastBolusAgent)")
        for pattern in self.description:
            try:
                re.compile(pattern)
            except re.error as exc:
                problems.append(f"description pattern {pattern!r} is not a regular expression ({exc})")
        if problems:
            raise ConfigError(f"series rule {self.name!r}: " + "; ".join(problems))


RULES: tuple[SeriesRule, ...] = (
    SeriesRule("localizer", SKIP, why="a localizer or scout",
               image_type=("LOCALIZER",),
               description=(r"scout", r"locali[sz]er", r"\bloc\b", r"survey", r"3[ -]?pl(ane)?\b", r"tri[ -]?pilot",
                            r"\bpilot")),
    SeriesRule("diffusion", SKIP, why="diffusion-weighted (DWI, ADC)",
               image_type=("DIFFUSION", "ADC", "TRACEW", "FA"), tags=("DiffusionBValue",),
               description=(r"dwi", r"diff", r"\badc\b", r"trace", r"\bdti\b")),
    SeriesRule("contrast-enhanced", SKIP, why="contrast-enhanced",
               tags=("ContrastBolusAgent",),
               description=(r"\+ ?c\b", r"\bc\+", r"\bpost\b(?![ -]?op)", r"gad", r"\bgd\b",
                            r"(?<!pre)(?<!pre[ -])(?<!non)(?<!non[ -])(?<!w/o )(?<!without )contrast", r"\bce\b")),
    SeriesRule("reformatted", SKIP, why="a reformat or projection, not an acquired series",
               image_type=("MPR", "REFORMATTED", "PROJECTION IMAGE", "MIP"),
               description=(r"\bmpr\b", r"reformat", r"\bmip\b")),
    SeriesRule("sagittal STIR", schema.SAGITTAL_T2, plane="sagittal", contrast="stir"),
    SeriesRule("sagittal T2", schema.SAGITTAL_T2, plane="sagittal", contrast="t2"),
    SeriesRule("sagittal T1", schema.SAGITTAL_T1, plane="sagittal", contrast="t1"),
    SeriesRule("axial T2", schema.AXIAL_T2, plane="axial", contrast="t2"),
)


@dataclass(frozen=True)
class SeriesType:
    """What a series was taken for: a series type or None (skipped), the rule that decided, and why."""

    description: str | None
    rule: str
    reason: str


@dataclass(frozen=True)
class Features:
    """What one header says about its series."""

    text: str  # SeriesDescription and ProtocolName, lower case
    plane: str | None
    plane_from: str
    contrast: str | None
    contrast_from: str
    image_type: frozenset[str]
    tags: frozenset[str]


def series_type(ds: Dataset, rules: tuple[SeriesRule, ...] | None = None) -> SeriesType:
    """The type of the series a header (any file of it) belongs to; see the module docstring. A series whose
    Modality is given and is not MR (a CT, a radiograph) is skipped whatever its description says."""
    modality = re.sub(r"[^A-Z0-9]", "", _text(ds.get("Modality")).upper())[:8]
    if modality and modality != "MR":
        return SeriesType(None, NOT_MR, f"skipped: Modality {modality}, not MR")
    description = _text(ds.get("SeriesDescription"))
    exact = {d.lower(): d for d in schema.SERIES_DESCRIPTIONS}.get(description.lower())
    if exact:
        return SeriesType(exact, "RSNA name", f"SeriesDescription is {exact!r}")
    features = header_features(ds)
    seen = f"plane {features.plane or 'unknown'} ({features.plane_from}), contrast " \
           f"{features.contrast or 'unknown'} ({features.contrast_from})"
    for rule in (site_rules() if rules is None else ()) + (RULES if rules is None else rules):
        evidence = _evidence(rule, features)
        if evidence is None:
            continue
        if rule.result == SKIP:
            return SeriesType(None, rule.name, f"skipped: {rule.why or rule.name} ({evidence}); {seen}")
        return SeriesType(rule.result, rule.name, f"{seen}{'; ' + evidence if evidence != 'always' else ''}")
    return SeriesType(None, "no rule", f"skipped: {seen}, which no rule takes"
                      + (f"; description {description[:REASON_TEXT]!r}" if description else "; no SeriesDescription"))


def header_features(ds: Dataset) -> Features:
    text = " ".join(_text(ds.get(k)) for k in ("SeriesDescription", "ProtocolName")).strip().lower()
    plane, plane_from = _plane(ds.get("ImageOrientationPatient"))
    if plane is None:
        plane, plane_from = _from_words(PLANE_WORDS, text, plane_from)
    contrast, contrast_from = _contrast(ds)
    said, _ = _from_words(CONTRAST_WORDS, text, "")
    if contrast is None:
        contrast, contrast_from = _from_words(CONTRAST_WORDS, text, contrast_from)
    elif said is not None and said != contrast:
        contrast_from += f"; the description says {said}"
    image_type = frozenset(str(v).strip().upper() for v in _values(ds.get("ImageType")))
    tags = frozenset(k for k in _evidence_tags() if _text(ds.get(k)).lower() not in ABSENT)
    return Features(text, plane, plane_from, contrast, contrast_from, image_type, tags)


def _from_words(words: dict[str, str], text: str, otherwise: str) -> tuple[str | None, str]:
    """The one plane or contrast a description names; None where it names none, or two that exclude each
    other (STIR, FLAIR and T2* descriptions often say T2 as well, so the first of those wins over T2)."""
    named = [name for name, pattern in words.items() if re.search(pattern, text)]
    if not named:
        return None, otherwise
    header = f", not the header: {otherwise}" if otherwise else ""
    also_t2 = {"t2"} if named[0] in ("stir", "flair", "t2star") else set()
    if set(named[1:]) - also_t2:
        return None, f"the description names {' and '.join(named)}{header}"
    return named[0], f"the description says {named[0]}{header}"


def _evidence(rule: SeriesRule, f: Features) -> str | None:
    """Why ``rule`` matches ``f`` (a short phrase), or None."""
    if rule.plane is not None and rule.plane != f.plane:
        return None
    if rule.contrast is not None and rule.contrast != f.contrast:
        return None
    if not (rule.description or rule.image_type or rule.tags):
        return "always"
    for pattern in rule.description:
        found = re.search(pattern, f.text, re.IGNORECASE)
        if found:
            return f"the description has {found.group(0)!r}"
    for value in rule.image_type:
        if value.upper() in f.image_type:
            return f"ImageType has {value.upper()}"
    for tag in rule.tags:
        if tag in f.tags:
            return f"the header has {tag}"
    return None


def _plane(orientation) -> tuple[str | None, str]:
    values = _values(orientation)
    if not values:
        return None, "no ImageOrientationPatient"
    try:
        cosines = np.asarray([float(v) for v in values], float)
    except (TypeError, ValueError, OverflowError):
        return None, "ImageOrientationPatient unreadable"
    if cosines.shape != (6,):
        return None, f"ImageOrientationPatient has {cosines.size} values, not 6"
    rows, columns = cosines[:3], cosines[3:]
    with np.errstate(all="ignore"):
        lengths = np.array([np.linalg.norm(rows), np.linalg.norm(columns)])
        if not (np.isfinite(cosines).all() and np.isfinite(lengths).all() and (lengths > 0.5).all()
                and (lengths < 2).all()):
            return None, "ImageOrientationPatient unreadable (not two unit vectors)"
        rows, columns = rows / lengths[0], columns / lengths[1]
    if abs(float(rows @ columns)) > PERPENDICULAR:
        return None, "ImageOrientationPatient unreadable (rows and columns not perpendicular)"
    normal = np.abs(np.cross(rows, columns))
    normal /= np.linalg.norm(normal)
    axis = int(np.argmax(normal))
    if normal[axis] < PLANE_COSINE:
        return "oblique", f"slice normal {np.round(normal, 2).tolist()} leans more than 37 degrees off every axis"
    return PLANES[axis], f"slice normal {normal[axis]:.2f} along {('left-right', 'front-back', 'head-foot')[axis]}"


def _contrast(ds: Dataset) -> tuple[str | None, str]:
    tr, te, ti = (_number(ds.get(k)) for k in ("RepetitionTime", "EchoTime", "InversionTime"))
    sequence = {str(v).strip().upper() for v in _values(ds.get("ScanningSequence"))}
    c = CONTRAST
    if "IR" in sequence or ti is not None:
        if ti is None:
            return None, "inversion recovery without a positive InversionTime"
        label = "stir" if ti < c["STIR_MAX_TI"] else "flair" if ti > c["FLAIR_MIN_TI"] else "t1"
        return label, f"inversion recovery, TI {ti:g} ms"
    if "GR" in sequence and "SE" not in sequence:
        return None, "a gradient echo (its timing does not tell T1 from T2*)"
    if tr is None or te is None:
        return None, "no positive RepetitionTime/EchoTime"
    timing = f"TR {tr:g} ms, TE {te:g} ms"
    if tr < c["T1_MAX_TR"] and te < c["T1_MAX_TE"]:
        return "t1", timing
    if tr >= c["LONG_TR"] and te >= c["T2_MIN_TE"]:
        return "t2", timing
    if tr >= c["LONG_TR"] and te < c["PD_MAX_TE"]:
        return "pd", timing
    return None, f"{timing}: neither T1, T2 nor PD timing"


def _values(value) -> list:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (list, tuple)) or hasattr(value, "__iter__") and not isinstance(
        value, (str, bytes)) else [value]


def _number(value) -> float | None:
    """A time in ms: positive and finite, else None (anonymisers zero what they remove)."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if np.isfinite(number) and number > 0 else None


def _text(value) -> str:
    """A string attribute as text; a multi-valued one joined with backslashes, as DICOM writes it."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return "\\".join(str(v).strip() for v in _values(value)).strip() if not isinstance(value, str) else value.strip()


def header_keywords() -> tuple[str, ...]:
    """The header attributes :func:`series_type` reads (a DICOMweb client asks for no more)."""
    return ("SeriesDescription", "ProtocolName", "ImageOrientationPatient", "RepetitionTime", "EchoTime",
            "InversionTime", "ScanningSequence", "ImageType", *sorted(_evidence_tags()))


def _evidence_tags() -> frozenset[str]:
    return frozenset(t for rule in site_rules() + RULES for t in rule.tags)


def site_rules() -> tuple[SeriesRule, ...]:
    """The rules of the YAML file named by ``SPINEMRI_SERIES_RULES``, if set (tried before :data:`RULES`)."""
    path = os.environ.get(RULES_ENV, "").strip()
    return load_rules(path) if path else ()


@functools.lru_cache(maxsize=8)
def load_rules(path: str) -> tuple[SeriesRule, ...]:
    """Rules from a YAML list of mappings with :class:`SeriesRule`'s fields; every error names the file and rule."""
    file = Path(path)
    if not file.is_file():
        what = "a folder, not a file" if file.is_dir() else "no such file"
        raise ConfigError(f"{RULES_ENV}={path}: {what}; point it at a YAML list of series rules "
                          "(see docs/data.md) or unset it")
    try:
        entries = yaml.safe_load(file.read_text())
    except OSError as exc:
        raise ConfigError(f"{RULES_ENV}={path}: cannot be read ({exc.strerror}); check its permissions") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{RULES_ENV}={path} is not a text file; point it at a YAML list of series rules") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{RULES_ENV}={path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: expected a list of rules (- name: ..., result: ...), got {type(entries).__name__}")
    fields = {f.name for f in dataclasses.fields(SeriesRule)}
    rules = []
    for k, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            raise ConfigError(f"{path} rule {k}: expected a mapping with keys {', '.join(sorted(fields))}")
        unknown = sorted(map(str, set(entry) - fields))
        if unknown or "name" not in entry or "result" not in entry:
            others = ", ".join(sorted(fields - {"name", "result"}))
            raise ConfigError(f"{path} rule {k}: " + (f"unknown key(s) {', '.join(unknown)}; " if unknown else "")
                              + f"a rule has name and result, and any of {others}")
        values = dict(entry)
        for key in ("description", "image_type", "tags"):
            value = values.get(key, [])
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{path} rule {k}: {key} must be a string or a list of strings, got {value!r}")
            values[key] = tuple(value)
        for key in ("name", "result", "why", "plane", "contrast"):
            if key in values and values[key] is not None and not isinstance(values[key], str):
                raise ConfigError(f"{path} rule {k}: {key} must be a string, got {values[key]!r}")
        try:
            rules.append(SeriesRule(**values))
        except ConfigError as exc:
            raise ConfigError(f"{path} rule {k}: {exc}") from None
    return tuple(rules)

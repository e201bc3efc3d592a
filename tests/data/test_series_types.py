"""Series types read from the images: phantom studies with clinical or no descriptions, series that
are skipped, pydicom's real MR files, the timing table, and a site's own rules."""

from __future__ import annotations

import json

import pandas as pd
import pydicom
import pytest
from click.testing import CliRunner
from pydicom.data import get_testdata_file

from spinemri.cli import main
from spinemri.data import schema
from spinemri.data.schema import AXIAL_T2, SAGITTAL_T1, SAGITTAL_T2
from spinemri.data.series_types import RULES_ENV, load_rules, series_type
from spinemri.data.studies import find_studies
from spinemri.errors import ConfigError

CLINICAL = {  # what scanners write, per type: Siemens, GE, Philips-like spellings
    SAGITTAL_T2: ["T2_TSE_SAG", "SAG T2 FSE", "STIR_SAG", "t2_tse_sag_384"],
    SAGITTAL_T1: ["T1_TSE_SAG", "SAG T1 FSE", "t1_tse_sag"],
    AXIAL_T2: ["t2_tse_tra", "AX T2 FRFSE", "T2W_TSE_AX"],
}


def _rewrite(folder, **tags):
    for path in folder.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        for keyword, value in tags.items():
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(path)


@pytest.mark.parametrize("spelling", ["clinical", "removed"])
def test_phantom_series_are_typed_from_their_images(phantom_dir, phantom_copy, spelling):
    truth = pd.read_csv(phantom_dir / schema.SERIES_CSV).set_index("series_id")["series_description"]
    (phantom_copy / schema.SERIES_CSV).unlink()
    images = phantom_copy / schema.IMAGES_DIR
    for k, (series_id, kind) in enumerate(truth.items()):
        folder = next(images.glob(f"*/{series_id}"))
        names = CLINICAL[kind]
        _rewrite(folder, SeriesDescription=names[k % len(names)] if spelling == "clinical" else None)
    studies = find_studies(phantom_copy)
    typed = {s.series_id: s for study in studies for s in study.series}
    assert {k: s.description for k, s in typed.items()} == truth.to_dict()
    stir = [s for s in typed.values() if "inversion recovery" in s.reason]
    assert stir and all(s.description == SAGITTAL_T2 for s in stir), "the phantom's STIR series read as STIR"
    assert all("plane sagittal" in s.reason for s in typed.values() if s.description != AXIAL_T2)


def test_localizer_dwi_contrast_and_coronal_series_are_skipped_saying_what_they_are(phantom_dir, tmp_path):
    study = find_studies(phantom_dir)[0]
    target = tmp_path / "studies" / study.study_id
    for s in study.series:
        (target / str(s.series_id)).mkdir(parents=True)
        for path in s.files:
            (target / str(s.series_id) / path.name).write_bytes(path.read_bytes())
    sagittal = next(s for s in study.series if s.description == SAGITTAL_T1)
    axial = next(s for s in study.series if s.description == AXIAL_T2)
    extra = {
        "901": (axial, dict(SeriesDescription="3-plane loc", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])),
        "902": (axial, dict(SeriesDescription="DWI b800 ax", DiffusionBValue=800)),
        "903": (sagittal, dict(SeriesDescription="T1_TSE_SAG +C", ContrastBolusAgent="gadobutrol")),
        "904": (sagittal, dict(SeriesDescription="COR T2", ImageOrientationPatient=[1, 0, 0, 0, 0, -1],
                               RepetitionTime=3200, EchoTime=100)),
        "905": (sagittal, dict(SeriesDescription="PD_TSE_SAG", RepetitionTime=3000, EchoTime=25)),
    }
    for series_id, (source, tags) in extra.items():
        folder = target / series_id
        folder.mkdir()
        for path in source.files[:3]:
            (folder / path.name).write_bytes(path.read_bytes())
        _rewrite(folder, **tags)
    [found] = find_studies(tmp_path / "studies")
    by_id = {str(s.series_id): s for s in found.series}
    assert {by_id[str(s.series_id)].description for s in study.series} == {SAGITTAL_T1, SAGITTAL_T2, AXIAL_T2}
    reasons = {k: by_id[k].reason for k in extra}
    assert all(by_id[k].description is None and reasons[k].startswith("skipped") for k in extra), reasons
    assert "a localizer or scout" in reasons["901"]
    assert "diffusion" in reasons["902"]
    assert "contrast-enhanced" in reasons["903"]
    assert "plane coronal" in reasons["904"] and "which no rule takes" in reasons["904"]
    assert "contrast pd" in reasons["905"]

    result = CliRunner().invoke(main, ["data", "check", str(tmp_path / "studies"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["layout"] == "studies"
    rows = {str(r["series_id"]): r for r in report["series"]}
    assert rows["902"]["type"] == "skipped" and "diffusion" in rows["902"]["why"]
    assert report["summary"]["series_per_type"]["skipped"] == len(extra)
    text = CliRunner().invoke(main, ["data", "check", str(tmp_path / "studies")]).output
    assert f"series {found.study_id}/901 (3 files): skipped - skipped: a localizer" in text


@pytest.mark.parametrize("name,expected,why", [
    ("MR_small.dcm", AXIAL_T2, "TR 4000 ms, TE 240 ms"),  # axial, long TR and TE
    ("MR2_UNCR.dcm", SAGITTAL_T1, "slice normal 0.82 along left-right"),  # 35 degrees oblique, TR 350, TE 27
    ("MR-SIEMENS-DICOM-WithOverlays.dcm", None, "contrast-enhanced"),  # t1_vibe_fs_tra_bh_dyn, an MPR
    ("emri_small.dcm", None, "no ImageOrientationPatient"),  # no geometry, no timing
])
def test_pydicoms_real_mr_files(name, expected, why):
    found = series_type(pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True))
    assert found.description == expected, found
    assert why in found.reason


def _header(**tags):
    ds = pydicom.Dataset()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


SAG, AX = [0, 1, 0, 0, 0, -1], [1, 0, 0, 0, 1, 0]


@pytest.mark.parametrize("tags,expected,why", [
    (dict(ImageOrientationPatient=SAG, ScanningSequence=["SE", "IR"], InversionTime=160, RepetitionTime=4000,
          EchoTime=40), SAGITTAL_T2, "inversion recovery, TI 160 ms"),
    (dict(ImageOrientationPatient=SAG, ScanningSequence="IR", InversionTime=2500, RepetitionTime=9000,
          EchoTime=100), None, "contrast flair"),
    (dict(ImageOrientationPatient=SAG, InversionTime=850, RepetitionTime=2000, EchoTime=10), SAGITTAL_T1,
     "TI 850 ms"),
    (dict(ImageOrientationPatient=AX, RepetitionTime=600, EchoTime=12), None, "contrast t1"),  # axial T1
    (dict(ImageOrientationPatient=[0.7071, -0.7071, 0, 0.4082, 0.4082, -0.8165], RepetitionTime=3000, EchoTime=100),
     None, "oblique"),
    (dict(SeriesDescription="SAG T2 FSE"), SAGITTAL_T2, "the description says sagittal"),  # no header values
    (dict(SeriesDescription="ax t2"), AXIAL_T2, "the description says t2"),
    (dict(SeriesDescription="sagittal t2/stir"), SAGITTAL_T2, "SeriesDescription is 'Sagittal T2/STIR'"),
    # What the header cannot be trusted for is not read: the description decides, or the series is skipped.
    (dict(ImageOrientationPatient=[0, 1, 0, 0, 0, "NaN"], RepetitionTime=3000, EchoTime=100), None,
     "ImageOrientationPatient unreadable"),
    (dict(ImageOrientationPatient=[1e308, 1e308, 0, 0, 1e308, 1e308], RepetitionTime=3000, EchoTime=100), None,
     "ImageOrientationPatient unreadable"),
    (dict(ImageOrientationPatient=[0, 1, 0, 0, 0.999, 0.045], RepetitionTime=3000, EchoTime=100), None,
     "not perpendicular"),
    (dict(ImageOrientationPatient=[0, 1, 0, 0, 0], SeriesDescription="T2 SAG"), SAGITTAL_T2, "has 5 values"),
    (dict(ImageOrientationPatient=[0, 1, 0, 0.7071, 0, -0.7071], RepetitionTime=3000, EchoTime=100), None,
     "oblique"),  # 45 degrees between sagittal and axial
    (dict(ImageOrientationPatient=SAG, RepetitionTime=0, EchoTime=0, SeriesDescription="SAG T2 TSE"), SAGITTAL_T2,
     "the description says t2"),  # timing zeroed by an anonymiser
    (dict(ImageOrientationPatient=SAG, ScanningSequence="IR", InversionTime=-5, RepetitionTime=4000, EchoTime=40),
     None, "inversion recovery without a positive InversionTime"),
    (dict(ImageOrientationPatient=SAG, ScanningSequence="GR", RepetitionTime=600, EchoTime=20,
          SeriesDescription="SAG T2* MEDIC"), None, "a gradient echo"),
    (dict(SeriesDescription="SAG T1 T2"), None, "the description names t2 and t1"),
    (dict(SeriesDescription="SAG AX T2"), None, "the description names sagittal and axial"),
    (dict(SeriesDescription="SAG T2 T11-L2"), SAGITTAL_T2, "the description says t2"),  # T11: a level
    (dict(SeriesDescription="STIR T2 SAG"), SAGITTAL_T2, "the description says stir"),
    (dict(ImageOrientationPatient=SAG, RepetitionTime=500, EchoTime=10, SeriesDescription="SAG T2 TSE"), SAGITTAL_T1,
     "TR 500 ms, TE 10 ms; the description says t2"),  # the timing decides; the conflict is said
    (dict(ImageOrientationPatient=SAG, RepetitionTime=500, EchoTime=10, SeriesDescription="SAG T1 PRE CONTRAST"),
     SAGITTAL_T1, "contrast t1"),
    (dict(ImageOrientationPatient=SAG, RepetitionTime=4000, EchoTime=100, SeriesDescription="SAG T2 POST-OP"),
     SAGITTAL_T2, "contrast t2"),
    (dict(ImageOrientationPatient=SAG, RepetitionTime=500, EchoTime=10, ContrastBolusAgent="NONE"), SAGITTAL_T1,
     "contrast t1"),
    (dict(ImageOrientationPatient=SAG, RepetitionTime=500, EchoTime=10, SeriesDescription="SAG T1 POST GAD"), None,
     "contrast-enhanced"),
])
def test_the_timing_and_plane_table(tags, expected, why):
    found = series_type(_header(**tags))
    assert found.description == expected, found
    assert why in found.reason, found.reason


def test_a_site_adds_rules_of_its_own(tmp_path, monkeypatch):
    rules = tmp_path / "site.yaml"
    rules.write_text("- name: dixon\n  result: skip\n  description: [dixon]\n  why: a Dixon water or fat image\n"
                     "- name: our sagittal t2\n  result: Sagittal T2/STIR\n  description: ['^lsp_s_t2$']\n")
    monkeypatch.setenv(RULES_ENV, str(rules))
    dixon = series_type(_header(SeriesDescription="t2_tse_dixon_sag_W", ImageOrientationPatient=SAG,
                                RepetitionTime=3000, EchoTime=100))
    assert dixon.description is None and "a Dixon water or fat image" in dixon.reason
    ours = series_type(_header(SeriesDescription="LSP_S_T2"))
    assert ours.description == SAGITTAL_T2 and ours.rule == "our sagittal t2"


@pytest.mark.parametrize("text,message", [
    ("- name: x\n  result: Coronal T2\n", "rule 1: series rule 'x': result must be 'skip' or one of"),
    ("- name: x\n  result: skip\n  colour: red\n", "rule 1: unknown key(s) colour"),
    ("- name: x\n  result: skip\n  description: ['(']\n", "is not a regular expression"),
    ("- name: x\n  result: skip\n  plane: diagonal\n", "plane must be one of"),
    ("name: x\n", "expected a list of rules"),
    ("- [1, 2]\n", "rule 1: expected a mapping"),
    ("- name: x\n  result: skip\n  description: 5\n", "rule 1: description must be a string or a list of strings"),
    ("- name: x\n  result: skip\n  tags: [NotAKeyword]\n", "'NotAKeyword' is not a DICOM keyword"),
    ("- name: x\n  result: skip\n", "it tests nothing"),
    ("- name: x\n  result: skip\n  1: y\n", "rule 1: unknown key(s) 1"),
    ("- name: [x]\n  result: skip\n  plane: axial\n", "rule 1: name must be a string"),
])
def test_a_bad_rules_file_is_named_with_its_rule_and_the_fix(tmp_path, text, message):
    path = tmp_path / f"rules-{abs(hash(text))}.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="rule|list") as raised:
        load_rules(str(path))
    assert message in str(raised.value) and str(path) in str(raised.value)
    with pytest.raises(ConfigError, match="no such file"):
        load_rules(str(tmp_path / "absent.yaml"))

"""De-identified exports (PS3.15 Annex E, longitudinal dates modified) of the real DICOM sets the project has.

For each set: the export's own residual-identifier check is clean, and checked again here independently; each
patient's dates move by one shift and times stay; UIDs map one-to-one and consistently; private attributes are
gone; pixel data are byte-identical; and the analyzers find the same on the copy as on the source.
"""

from __future__ import annotations

import csv
import shutil
from datetime import date
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.tag import Tag

from core.errors import ConfigurationError, ImageDataError
from devtools.evaluate import evaluate
from devtools.samples import load_sample
from dicom_io.deidentify import (
    BurnedInAnnotationError,
    DeidentificationKey,
    SourceIdentifiers,
    action_for,
    deidentify_export,
    residual_identifiers,
)
from dicom_io.projection import read_projection
from dicom_io.volume import assemble_volume
from imaging_cds.cli import main
from models.registry import get_analyzer

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
SETS = {
    "head-ct-ge": SHARED / "ct" / "head_ge",
    "calcium-phantom-ct": SHARED / "ct" / "qrm_calcium_phantom",
    "brain-mr-tcia": SHARED / "mr" / "brain_tcia_pgbm",
    "mammograms-cbis-ddsm": SHARED / "mg" / "cbis_ddsm",
    "chest-cr-rsna": SHARED / "cr" / "rsna_pneumonia",
    "abdomen-ct-no-uids": ROOT / "tests" / "data" / "ct" / "abdomen_totalseg" / "example_ct_dicom",
}
KEY = DeidentificationKey(b"steward key for the tests, 32 b!")
UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")


def _day(text: str) -> date:
    return date(int(text[:4]), int(text[4:6]), int(text[6:8]))


def _top_level(dataset: Dataset, vr: str) -> dict[str, str]:
    return {e.keyword: str(e.value) for e in dataset if vr == e.VR and e.value and not e.tag.is_private}


@pytest.mark.parametrize("name", sorted(SETS))
def test_a_shared_dicom_set_exports_clean_with_dates_moved_per_patient_and_pixels_untouched(
    name: str, tmp_path: Path
) -> None:
    report = deidentify_export([SETS[name]], tmp_path / "export", key=KEY)  # raises if its own check finds anything
    assert report.instances == len(report.written) > 0

    shifts: dict[str, set[int]] = {}
    uids: dict[str, str] = {}
    source = SourceIdentifiers()
    for original_path, exported_path in report.written.items():
        original, exported = dcmread(original_path), dcmread(tmp_path / "export" / exported_path)
        source.add_source(original)
        assert (
            exported.PatientIdentityRemoved == "YES" and exported.LongitudinalTemporalInformationModified == "MODIFIED"
        )
        codes = {c.CodeValue for c in exported.DeidentificationMethodCodeSequence}
        assert codes == {"113100", "113107"}  # Basic Profile; Retain Longitudinal ... Modified Dates Option
        assert not [e for e in exported.iterall() if e.tag.is_private]
        assert exported.PixelData == original.PixelData  # byte for byte, whatever the transfer syntax
        assert exported.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        # Dates: one shift per patient, never zero; the birth date is gone; times of day are kept.
        before, after = _top_level(original, "DA"), _top_level(exported, "DA")
        for keyword, value in before.items():
            if keyword == "PatientBirthDate":
                assert not after.get(keyword)
                continue
            shifts.setdefault(str(exported.PatientID), set()).add((_day(after[keyword]) - _day(value)).days)
        assert _top_level(original, "TM") == _top_level(exported, "TM")
        # UIDs: the same source UID always becomes the same new UID, and no two become one.
        for keyword in UID_KEYWORDS:
            if original.get(keyword):
                assert uids.setdefault(original.get(keyword), exported.get(keyword)) == exported.get(keyword)
                assert exported.get(keyword) != original.get(keyword)
        if exported.get("SOPInstanceUID"):
            assert exported.file_meta.MediaStorageSOPInstanceUID == exported.SOPInstanceUID
    assert len(set(uids.values())) == len(uids)
    for patient, moved in shifts.items():
        assert len(moved) == 1 and next(iter(moved)) <= -366, (patient, moved)
    # The residual check, run again here on what was kept, searched for the source's identifiers and found none.
    assert source.values and residual_identifiers(tmp_path / "export", source) == []
    assert not list(tmp_path.glob(".export.partial-*"))


def test_a_patients_studies_keep_their_interval_and_their_pseudonym_across_exports(tmp_path: Path) -> None:
    """Two visits of one patient, exported in separate runs with the steward's key, still line up."""
    study3 = SETS["brain-mr-tcia"] / "Study3"
    first_visit = study3 / "26401-T1prereg-52906"
    follow_up = tmp_path / "follow-up"  # the same patient's later study: its header moved 120 days, new study UID
    follow_up.mkdir()
    for path in sorted((study3 / "11_HCropVolume").iterdir()):
        dataset = dcmread(path)
        for element in dataset.iterall():
            if element.VR == "DA" and element.value:
                element.value = f"{date.fromordinal(_day(str(element.value)).toordinal() + 120):%Y%m%d}"
        dataset.StudyInstanceUID = "1.2.826.0.1.3680043.10.543.7"
        dataset.save_as(follow_up / path.name)
    one = deidentify_export([first_visit], tmp_path / "one", key=KEY)
    two = deidentify_export([follow_up], tmp_path / "two", key=KEY)
    a = dcmread(tmp_path / "one" / next(iter(one.written.values())))
    b = dcmread(tmp_path / "two" / next(iter(two.written.values())))
    assert a.PatientID == b.PatientID and a.PatientName == b.PatientName  # one patient, one pseudonym
    assert (_day(b.StudyDate) - _day(a.StudyDate)).days == 120  # the interval a longitudinal study needs
    assert a.FrameOfReferenceUID == b.FrameOfReferenceUID  # the shared frame of reference still shared
    assert a.StudyInstanceUID != b.StudyInstanceUID
    other = deidentify_export(
        [first_visit], tmp_path / "other-key", key=DeidentificationKey(b"another steward's key, 32 bytes!")
    )
    c = dcmread(tmp_path / "other-key" / next(iter(other.written.values())))
    assert c.PatientID != a.PatientID and c.StudyInstanceUID != a.StudyInstanceUID  # another key: not linkable


def test_the_analyzers_find_the_same_on_the_de_identified_copy(tmp_path: Path) -> None:
    # ct-bone on the abdominal CT (the TotalSegmentator scan as the project's DICOM series).
    source = tmp_path / "abdomen"
    source.mkdir()
    for index, dataset in enumerate(load_sample("abdomen")):
        dataset.save_as(source / f"{index:03d}.dcm", enforce_file_format=True)
    report = deidentify_export([source], tmp_path / "abdomen-export", key=KEY)
    original = assemble_volume(dcmread(p) for p in sorted(source.iterdir())).to_image_input()
    copy = assemble_volume(dcmread(tmp_path / "abdomen-export" / p) for p in report.written.values()).to_image_input()
    bone = get_analyzer("ct-bone")
    bone.check_input(copy)
    found, found_on_copy = bone.analyze(original), bone.analyze(copy)
    assert [(m.key, m.value) for m in found.measurements] == [(m.key, m.value) for m in found_on_copy.measurements]
    assert found.category == found_on_copy.category and found.conclusion == found_on_copy.conclusion
    assert any(m.key == "l1_trabecular_hu" for m in found.measurements)

    # cxr-pneumonia on the RSNA radiograph.
    radiograph = SETS["chest-cr-rsna"] / "rsna_cxr_unlabelled.dcm"
    report = deidentify_export([radiograph], tmp_path / "cxr-export", key=KEY)
    copy_path = tmp_path / "cxr-export" / report.written[radiograph.resolve()]
    cxr = get_analyzer("cxr-pneumonia")
    cxr.check_input(read_projection(copy_path))  # view and body part survive: the input guard still accepts it
    on_source, on_copy = cxr.analyze(read_projection(radiograph)), cxr.analyze(read_projection(copy_path))
    assert on_source.probability == on_copy.probability and on_source.category == on_copy.category

    # The abdominal series whose UIDs an earlier anonymiser stripped is refused the same way, before and after.
    no_uids = SETS["abdomen-ct-no-uids"]
    report = deidentify_export([no_uids], tmp_path / "no-uids", key=KEY)
    with pytest.raises(ImageDataError, match="lack StudyInstanceUID") as before:
        assemble_volume(dcmread(p) for p in sorted(no_uids.iterdir()))
    with pytest.raises(ImageDataError, match="lack StudyInstanceUID") as after:
        assemble_volume(dcmread(tmp_path / "no-uids" / p) for p in report.written.values())
    assert before.value.message == after.value.message


def test_evaluate_runs_on_a_de_identified_export_and_scores_each_case_as_on_the_source(tmp_path: Path) -> None:
    dataset = tmp_path / "cases"
    dataset.mkdir()
    shutil.copy(SETS["chest-cr-rsna"] / "rsna_cxr_unlabelled.dcm", dataset / "rsna.dcm")
    shutil.copy(SETS["mammograms-cbis-ddsm"] / "P_00173_LEFT_CC_benign_mass_case.dcm", dataset / "mammogram.dcm")
    with (dataset / "labels.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["file", "label"], ["rsna.dcm", "1"], ["mammogram.dcm", "0"]])
    deidentify_export([dataset], tmp_path / "export", key=KEY)
    rows = list(csv.DictReader((tmp_path / "export" / "labels.csv").open()))
    assert [r["label"] for r in rows] == ["1", "0"] and all(r["file"].startswith("ANON-") for r in rows)
    on_source = evaluate("cxr-pneumonia", dataset)
    on_export = evaluate("cxr-pneumonia", tmp_path / "export")
    assert list(on_export.scores) == list(on_source.scores) and dict(on_export.refused) == dict(on_source.refused)
    assert main(["evaluate", "cxr-pneumonia", "--dataset", str(tmp_path / "export")]) == 0


def test_an_instance_marked_with_burned_in_annotation_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    marked = tmp_path / "in"
    marked.mkdir()
    dataset = dcmread(SETS["chest-cr-rsna"] / "rsna_cxr_unlabelled.dcm")
    dataset.BurnedInAnnotation = "YES"
    dataset.save_as(marked / "cr.dcm")
    shutil.copy(SETS["mammograms-cbis-ddsm"] / "P_00173_LEFT_CC_benign_mass_case.dcm", marked / "mg.dcm")
    with pytest.raises(BurnedInAnnotationError, match="BurnedInAnnotation = YES"):
        deidentify_export([marked], tmp_path / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no export, no partial folder


def test_the_residual_check_finds_a_planted_name_and_says_where_without_repeating_it(tmp_path: Path) -> None:
    mr = SETS["brain-mr-tcia"] / "Study1"
    report = deidentify_export([mr], tmp_path / "export", key=KEY)
    source = SourceIdentifiers()
    original_path, exported = next(iter(report.written.items()))
    original = dcmread(original_path)
    source.add_source(original)
    leaked = dcmread(tmp_path / "export" / exported)
    leaked.ImageComments = f"reviewed for {original.PatientName}"  # what a careless tool could add afterwards
    leaked.save_as(tmp_path / "export" / exported)
    findings = residual_identifiers(tmp_path / "export", source)
    assert [(f.where, f.kind) for f in findings] == [("ImageComments", "name")]
    assert str(original.PatientName) not in repr(findings)


def test_the_profile_table_is_the_standards(tmp_path: Path) -> None:
    """Spot checks against PS3.15 Table E.1-1: what is removed, emptied, remapped or kept."""
    assert action_for(Tag("PatientName")) == "Z" and action_for(Tag("StudyInstanceUID")) == "U"
    assert action_for(Tag("StudyDescription")) == "X" and action_for(Tag("InstitutionName")) == "Z"
    assert action_for(Tag(0x6000, 0x3000)) == "X"  # overlay data, a repeating group
    for kept in ("PixelSpacing", "ImagePositionPatient", "RescaleSlope", "ConvolutionKernel", "BodyPartExamined"):
        assert action_for(Tag(kept)) is None


def test_the_command_line_exports_and_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key_file = tmp_path / "steward.key"
    key_file.write_text("c3Rld2FyZCBrZXkgZm9yIHRoZSB0ZXN0cywgMzIgYiE=\n")  # base64 of KEY's 32 bytes
    key_file.chmod(0o600)
    output = tmp_path / "export"
    assert (
        main(["deidentify", str(SETS["mammograms-cbis-ddsm"]), "--output", str(output), "--key-file", str(key_file)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "2 instance(s) of 2 patient(s)" in printed and "check: clean" in printed and KEY.key_id in printed
    assert main(["deidentify", str(SETS["mammograms-cbis-ddsm"]), "--output", str(output)]) == 1
    assert "exists already" in capsys.readouterr().err
    with pytest.raises(ConfigurationError, match="does not exist"):
        deidentify_export([tmp_path / "missing"], tmp_path / "x")

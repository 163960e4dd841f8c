"""Bone analyzer on real CT volumes: the TotalSegmentator abdomen (T11-L5 + sacrum in view, 3 mm) and the two
pyradiomics chest CTs (5 mm slices, thoracic spine), plus a real head CT that has no spine."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest

from core.errors import UnsuitableInputError
from models.base import ImageInput
from models.bone import BoneAnalyzer, attenuation_category, genant_grade, measure_trabecular_roi
from models.spine import Vertebra, _rib_transition, find_spine, identify_levels, split_vertebrae

CT = Path(__file__).parent / "data" / "ct"


def load_nifti(path: Path) -> ImageInput:
    """NIfTI RAS+ (i -> patient right... +x = Right, +y = Anterior, +z = Superior) to (slices, rows, cols) with rows
    anterior -> posterior and columns right -> left, slice 0 inferior."""
    image = nib.load(str(path))
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    data = np.asarray(image.dataobj, dtype=np.float32).transpose(2, 1, 0)[:, ::-1, ::-1]
    zooms = image.header.get_zooms()
    return ImageInput(np.ascontiguousarray(data), (float(zooms[2]), float(zooms[1]), float(zooms[0])), "CT")


def load_nrrd(path: Path) -> ImageInput:
    """NRRD in left-posterior-superior space, (x, y, z) order, positive diagonal: already the project's frame."""
    data, header = nrrd.read(str(path))
    assert header["space"] == "left-posterior-superior"
    step = np.diag(header["space directions"])
    assert (step > 0).all()
    volume = np.ascontiguousarray(data.transpose(2, 1, 0).astype(np.float32))
    return ImageInput(volume, (float(step[2]), float(step[1]), float(step[0])), "CT")


@pytest.fixture(scope="module")
def abdomen_result():
    image = load_nifti(CT / "abdomen_totalseg" / "example_ct.nii.gz")
    analyzer = BoneAnalyzer()
    analyzer.check_input(image)
    return analyzer.analyze(image)


@pytest.fixture(scope="module")
def lung2_result():
    image = load_nrrd(CT / "chest_pyradiomics" / "lung2_image.nrrd")
    analyzer = BoneAnalyzer()
    analyzer.check_input(image)
    return analyzer.analyze(image)


def test_abdomen_l1_identified_from_the_last_rib_and_in_physiological_range(abdomen_result):
    l1 = abdomen_result.measurement("l1_trabecular_hu")
    assert l1.unit == "[hnsf'U]"
    assert 50.0 <= l1.value <= 300.0
    assert abdomen_result.category.code in {"normal", "low", "osteoporosis-likely"}
    # Filed in whole HU, as the thresholds are stated: the value, the sentence and the category agree.
    assert l1.value == round(l1.value)
    assert f"L1 trabecular attenuation {l1.value:.0f} HU" in abdomen_result.conclusion
    assert abdomen_result.category == attenuation_category(l1.value)
    # FHIR's referenceRange.low is inclusive and 160 HU is already low: the normal range starts at 161 HU, and the
    # interpretation agrees with it.
    assert l1.reference_low == 161.0 and attenuation_category(161.0).code == "normal"
    assert l1.interpretation == ("N" if l1.value >= l1.reference_low else "L")
    assert "Pickhardt" in abdomen_result.category.rule
    assert any("T12 = lowest vertebra with a rib" in w for w in abdomen_result.warnings)


def test_abdomen_l1_heights_are_lumbar_sized_and_graded_at_3mm(abdomen_result):
    for key in ("anterior_height_mm", "middle_height_mm", "posterior_height_mm"):
        m = abdomen_result.measurement(key)
        assert m.unit == "mm"
        assert 20.0 <= m.value <= 35.0, (key, m.value)
    loss = abdomen_result.measurement("height_loss_percent").value
    grade = abdomen_result.measurement("genant_grade").value
    assert grade == genant_grade(loss)
    assert any("uncertain by about +/- 3 mm" in w for w in abdomen_result.warnings)


def test_abdomen_overlays_are_png_sagittal_and_axial(abdomen_result):
    titles = [e.title for e in abdomen_result.explanations]
    assert any("sagittal" in t.lower() for t in titles) and any("Axial" in t for t in titles)
    for explanation in abdomen_result.explanations:
        assert explanation.png.startswith(b"\x89PNG")


def test_abdomen_l1_roi_sits_in_cancellous_bone_in_front_of_the_canal():
    image = load_nifti(CT / "abdomen_totalseg" / "example_ct.nii.gz")
    spacing = (3.0, 3.0, 3.0)
    track = find_spine(image.array, spacing)
    levels = identify_levels(image.array, spacing, track, split_vertebrae(track))
    l1 = next(v for v in levels.vertebrae if v.level == "L1")
    roi = measure_trabecular_roi(image.array, spacing, track, l1)
    assert roi.untrusted_reason() is None
    assert roi.inside_fraction >= 0.8
    assert 0.0 < roi.mean_hu < 400.0
    assert roi.sd_hu < 60.0  # the bone island in L1 is left out, as a reader placing the ROI would
    assert l1.anterior_row * track.stride < roi.center_row < l1.posterior_row * track.stride
    assert roi.area_mm2 >= 100.0


def test_lung2_chest_ct_does_not_claim_a_level_and_applies_no_threshold(lung2_result):
    assert lung2_result.category.code == "level-not-identified"
    assert not lung2_result.category.abnormal
    with pytest.raises(KeyError, match="l1_trabecular_hu"):
        lung2_result.measurement("l1_trabecular_hu")
    hu = lung2_result.measurement("vertebral_trabecular_hu")
    assert 0.0 <= hu.value <= 350.0  # cancellous bone of a thoracic body, not cortex or soft tissue
    assert "could not be identified" in hu.note
    with pytest.raises(KeyError, match="genant_grade"):
        lung2_result.measurement("genant_grade")
    for key in ("anterior_height_mm", "middle_height_mm", "posterior_height_mm", "height_loss_percent"):
        with pytest.raises(KeyError, match=key):
            lung2_result.measurement(key)
    assert any("heights and fracture grade not reported: 5.0 mm slices" in w for w in lung2_result.warnings)


def test_lung1_says_l1_is_not_in_view_and_withholds_an_untrustworthy_attenuation():
    image = load_nrrd(CT / "chest_pyradiomics" / "lung1_image.nrrd")
    result = BoneAnalyzer().analyze(image)
    assert result.category.code == "level-not-identified"
    assert not result.category.abnormal
    assert "L1 is not in view" in result.conclusion
    keys = {m.key for m in result.measurements}
    assert not any(k.endswith("_trabecular_hu") and k != "vertebral_trabecular_hu" for k in keys)
    if "vertebral_trabecular_hu" in keys:
        assert 0.0 <= result.measurement("vertebral_trabecular_hu").value <= 350.0
    else:
        assert any("Trabecular attenuation withheld" in w for w in result.warnings)


def _column(flags: list[bool], complete_bottom: bool = True) -> list[Vertebra]:
    return [Vertebra(10.0 * i, 10.0 * (i + 1), complete_bottom or i > 0, 0.0, 30.0) for i in range(len(flags))]


def test_rib_transition_labels_t12_and_l1_only_at_a_clean_junction():
    flags = [False, False, False, True, True]  # bottom to top: L3 L2 L1 T12 T11
    labels, note = _rib_transition(_column(flags), flags)
    assert labels is not None and labels[3] == "T12" and labels[2] == "L1" and labels[0] == "L3"
    assert "T12 = lowest vertebra with a rib" in note
    flags = [True, False, False, False, True]  # an iliac wing flagged far below does not move the junction
    labels, _ = _rib_transition(_column(flags), flags)
    assert labels is not None and labels[3] == "L1"


def test_rib_transition_refuses_a_missed_rib_and_says_when_l1_is_below_the_scan():
    flags = [True, False, True, True]  # a rib-free vertebra between rib-bearing ones
    labels, note = _rib_transition(_column(flags), flags)
    assert labels is None and "clean transition" in note
    flags = [False, True, True, True]  # only the partial bottom vertebra is rib-free
    labels, note = _rib_transition(_column(flags, complete_bottom=False), flags)
    assert labels is None and "L1 is not in view" in note
    labels, note = _rib_transition(_column([True, True]), [True, True])
    assert labels is None and "L1 is not in view" in note


def test_head_ct_is_refused_because_no_spine_is_in_view():
    files = sorted((CT / "head_ge").glob("*.dcm"))
    datasets = sorted((pydicom.dcmread(f) for f in files), key=lambda d: float(d.ImagePositionPatient[2]))
    volume = np.stack(
        [d.pixel_array.astype(np.float32) * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in datasets]
    )
    spacing = (float(datasets[0].SliceThickness), *map(float, datasets[0].PixelSpacing))
    with pytest.raises(UnsuitableInputError, match="No spine found"):
        BoneAnalyzer().check_input(ImageInput(volume, spacing, "CT"))


def test_non_ct_flat_and_uncalibrated_inputs_are_refused():
    analyzer = BoneAnalyzer()
    volume = np.zeros((20, 64, 64), dtype=np.float32)
    with pytest.raises(UnsuitableInputError, match="reads CT; this series is MR"):
        analyzer.check_input(ImageInput(volume, (3.0, 1.0, 1.0), "MR"))
    with pytest.raises(UnsuitableInputError, match="3-D CT volume"):
        analyzer.check_input(ImageInput(volume[0], (1.0, 1.0), "CT"))
    raw = np.random.default_rng(0).uniform(0, 4000, (20, 64, 64)).astype(np.float32)
    with pytest.raises(UnsuitableInputError, match="calibrated Hounsfield units"):
        analyzer.check_input(ImageInput(raw, (3.0, 1.0, 1.0), "CT"))


def test_published_thresholds():
    assert attenuation_category(160.0).code == "low"
    assert attenuation_category(161.0).code == "normal"
    assert attenuation_category(110.0).code == "osteoporosis-likely"
    assert [genant_grade(x) for x in (10.0, 19.9, 20.0, 25.0, 30.0, 40.0, 41.0)] == [0, 0, 1, 1, 2, 2, 3]


def test_every_reported_measurement_has_a_code_in_the_project_codesystem(abdomen_result, lung2_result):
    """The FHIR Observations of bone results must be codable: every key is defined in the shipped CodeSystem."""
    from fhir_adapters.terminology import load_codesystem

    defined = {concept["code"] for concept in load_codesystem("measurement")["concept"]}
    reported = {m.key for result in (abdomen_result, lung2_result) for m in result.measurements}
    assert reported <= defined, f"undefined measurement codes: {sorted(reported - defined)}"

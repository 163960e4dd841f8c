"""Bone analyzer on real CT volumes: the TotalSegmentator abdomen (T11-L5 + sacrum in view, 3 mm) and the two
pyradiomics chest CTs (5 mm slices, thoracic spine), plus a real head CT that has no spine."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest

from imaging_cds.errors import UnsuitableInputError
from models.base import ImageInput
from models.bone import BoneAnalyzer, attenuation_category, genant_grade

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


def test_chest_ct_without_landmarks_reports_unidentified_level_and_no_fracture_grade(lung2_result):
    assert lung2_result.category.code == "level-not-identified"
    assert not lung2_result.category.abnormal
    with pytest.raises(KeyError, match="l1_trabecular_hu"):
        lung2_result.measurement("l1_trabecular_hu")
    hu = lung2_result.measurement("vertebral_trabecular_hu")
    assert 50.0 <= hu.value <= 300.0
    assert "could not be identified" in hu.note
    with pytest.raises(KeyError, match="genant_grade"):
        lung2_result.measurement("genant_grade")
    assert any("too coarse for Genant grading" in w for w in lung2_result.warnings)


def test_lung1_chest_ct_does_not_guess_a_level():
    image = load_nrrd(CT / "chest_pyradiomics" / "lung1_image.nrrd")
    result = BoneAnalyzer().analyze(image)
    assert result.category.code == "level-not-identified"
    assert "L1 could not be identified" in result.conclusion


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

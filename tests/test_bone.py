"""Bone analyzer on real CT volumes: the TotalSegmentator abdomen (T11-L5 + sacrum in view, 3 mm) and the two
pyradiomics chest CTs (5 mm slices, thoracic spine), plus a real head CT that has no spine."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest
from PIL import Image
from scipy import ndimage

from core.errors import UnsuitableInputError
from models.base import AnalysisResult, ImageInput
from models.bone import (
    HEIGHT_LINES,
    BodyHeights,
    BoneAnalyzer,
    attenuation_category,
    genant_grade,
    implausible_heights_reason,
    measure_heights,
    measure_trabecular_roi,
)
from models.spine import (
    MAX_BODIES_PER_SEGMENT,
    SpineTrack,
    Vertebra,
    _labels_from,
    _rib_transition,
    find_spine,
    identify_levels,
    split_vertebrae,
    vertebral_spacing,
)

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


MANUAL_L1_HEIGHTS_MM = {"anterior": 27.0, "middle": 29.1, "posterior": 33.3}
"""L1 of example_ct read by hand (this project, for issue 22), the reference for the analyzer's heights.

Method: the mid-sagittal image through the centre of the L1 body - its left-right centre on the mid-body axial
slice 98 is column 63 (the body spans columns 57-69) - as the mean of columns 61-65 (15 mm), shown at W 500 / L 200,
enlarged 20x with cubic interpolation. The six points of quantitative morphometry were placed on the disc surface
of each end plate (where the dark disc meets the bright end plate, checked against the pixel values): anterior
just inside the anterior cortex (row 57-57.5), middle at mid-depth (row 62.5), posterior just inside the posterior
cortex (row 66.5), in slice coordinates (slice 0 most inferior, 3 mm apart):

    superior end plate  anterior 103.5   middle 102.4   posterior 102.5
    inferior end plate  anterior  94.5   middle  92.7   posterior  91.4

The superior end plate is nearly level; the inferior one slopes down by about 3 slices from front to back, so the
body is an anterior wedge: heights 27.0 / 29.1 / 33.3 mm (point to point), anterior 19 % shorter than posterior.
The bone island sits in the anterior half just under the superior end plate (slices 98-102, rows 60-63, columns
62-66). End plates at 3 mm are blurred over a slice: each point is uncertain by about half a slice.
"""


def test_abdomen_l1_heights_agree_with_a_manual_reading_within_the_slice_thickness(abdomen_result):
    measured = {name: abdomen_result.measurement(f"{name}_height_mm") for name in ("anterior", "middle", "posterior")}
    for name, reference in MANUAL_L1_HEIGHTS_MM.items():
        assert measured[name].unit == "mm"
        assert abs(measured[name].value - reference) <= 3.0, (name, measured[name].value, reference)
    # the shape a reader sees: the anterior height is the shortest, an anterior wedge
    assert measured["anterior"].value < measured["middle"].value < measured["posterior"].value
    loss = abdomen_result.measurement("height_loss_percent").value
    assert loss == pytest.approx(100 * (1 - measured["anterior"].value / measured["posterior"].value), abs=0.2)
    assert 10.0 <= loss < 20.0  # the manual reading's 19 %, within the slice thickness: Genant grade 0
    grade = abdomen_result.measurement("genant_grade").value
    assert grade == genant_grade(loss) == 0
    assert f"L1 height loss {loss:.0f}% (anterior wedge shape, Genant grade 0)" in abdomen_result.conclusion
    assert any("uncertain by about +/- 3 mm" in w for w in abdomen_result.warnings)


def test_the_key_image_shows_the_three_measuring_lines_with_their_heights(abdomen_result):
    sagittal = next(e for e in abdomen_result.explanations if "sagittal" in e.title.lower())
    image = np.asarray(Image.open(io.BytesIO(sagittal.png)).convert("RGB")).astype(int)
    magenta = (image[..., 0] > 200) & (image[..., 1] < 80) & (image[..., 2] > 150)  # render.MAGENTA
    columns = np.flatnonzero(magenta.sum(axis=0) >= 40)  # vertical lines of at least 40 px in the enlarged panel
    groups = np.split(columns, np.flatnonzero(np.diff(columns) > 3) + 1) if columns.size else []
    assert len(groups) == 3  # anterior, middle, posterior
    heights = [abdomen_result.measurement(f"{n}_height_mm").value for n in ("anterior", "middle", "posterior")]
    lengths = [int(magenta[:, g].any(axis=1).sum()) for g in groups]
    # drawn end plate to end plate: the lines' lengths are in the heights' proportions (tilt cosine aside)
    ratios = np.array(lengths) / np.array(heights)
    assert ratios.max() / ratios.min() < 1.1


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


def test_lung1_says_l1_is_not_in_view_and_files_no_untrustworthy_attenuation():
    image = load_nrrd(CT / "chest_pyradiomics" / "lung1_image.nrrd")
    result = BoneAnalyzer().analyze(image)
    assert result.category.code == "level-not-identified"
    assert not result.category.abnormal
    assert "L1 is not in view" in result.conclusion
    keys = {m.key for m in result.measurements}
    assert not any(k.endswith("_trabecular_hu") and k != "vertebral_trabecular_hu" for k in keys)
    if "vertebral_trabecular_hu" in keys:  # the ROI was moved off the heterogeneous mid-body slice
        assert 0.0 <= result.measurement("vertebral_trabecular_hu").value <= 350.0
        assert result.measurement("trabecular_roi_sd_hu").value <= 60.0  # cancellous bone, not end plate or cortex
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


def wedge_phantom(
    anterior_mm: float, posterior_mm: float, trabecular_hu: float, island: bool, slice_mm: float = 3.0
) -> ImageInput:
    """A synthetic vertebra between two discs, built at 0.25 mm along z and sampled into ``slice_mm`` slices.

    Body 30 mm deep (rows 20-50 at 1 mm) and 32 mm wide; the inferior end plate slopes down 6 mm from front to back,
    the superior one is level 6 mm lower at the front than at the back by ``anterior_mm - posterior_mm``; end plates
    1.5 mm of 600 HU cortex, discs 80 HU, and optionally a 900 HU bone island just under the superior end plate in
    the anterior third - the situation of the real L1 above, with every height known.
    """
    fine_dz, rows, columns = 0.25, 64, 64
    z = np.arange(0.0, 120.0, fine_dz)[:, None]  # mm, along the 3 mm slices' axis
    depth = np.arange(rows)[None, :].astype(float)
    t = np.clip((depth - 20.0) / 30.0, 0.0, 1.0)  # 0 at the anterior wall, 1 at the posterior wall
    inferior = 40.0 - 6.0 * t
    superior = inferior + anterior_mm + (posterior_mm - anterior_mm) * t
    sagittal = np.full(z.shape[:1] + depth.shape[1:], 80.0)  # disc and surroundings
    inside = (z >= inferior) & (z <= superior) & (depth >= 20) & (depth <= 50)
    sagittal[inside] = trabecular_hu
    plate = inside & ((z - inferior < 1.5) | (superior - z < 1.5))
    sagittal[plate] = 600.0
    for centre in (inferior - 10.0, superior + 10.0):  # the neighbours' end plates bound the discs
        sagittal[(np.abs(z - centre) < 0.75) & (depth >= 20) & (depth <= 50)] = 600.0
    if island:
        sagittal[(superior - z > 1.5) & (superior - z < 6.0) & (depth >= 25) & (depth <= 30)] = 900.0
    # a CT slice's sensitivity profile is close to a Gaussian whose FWHM is the nominal slice thickness
    blurred = ndimage.gaussian_filter1d(sagittal, slice_mm / 2.355 / fine_dz, axis=0, mode="nearest")
    step = round(slice_mm / fine_dz)
    slices = blurred[step // 2 :: step]  # slice k centred at (k + 0.5) * slice_mm
    volume = np.repeat(slices[:, :, None], columns, axis=2).astype(np.float32)
    volume[:, :, :16] = volume[:, :, 48:] = -100.0  # the body is 32 mm wide
    return ImageInput(volume, (slice_mm, 1.0, 1.0), "CT")


PHANTOMS = [(24.0, 30.0, 90.0, True), (30.0, 30.0, 200.0, False), (30.0, 24.0, 120.0, False)]
"""(anterior, posterior height, cancellous HU, bone island): an osteoporotic anterior wedge with an island under its
superior end plate (like the real L1), a normal body, and a posterior (crush) deformity."""


def phantom_heights(anterior_mm: float, posterior_mm: float, hu: float, island: bool, slice_mm: float) -> np.ndarray:
    phantom = wedge_phantom(anterior_mm, posterior_mm, hu, island, slice_mm)
    nz = phantom.array.shape[0]
    track = SpineTrack(
        stride=1, pixel_mm=1.0, slice_mm=slice_mm, column=np.full(nz, 32), canal_row=np.full(nz, 55),
        posterior_row=np.full(nz, 50.0), anterior_row=np.full(nz, 20.0), sagittal=phantom.array[:, :, 32],
        canal_score=np.ones(nz),
    )  # fmt: skip
    # the discs where a core profile finds them: their centres at mid-depth, in slice coordinates
    inferior_disc = (40.0 - 3.0 - 5.0) / slice_mm - 0.5
    superior_disc = (40.0 - 3.0 + 0.5 * (anterior_mm + posterior_mm) + 5.0) / slice_mm - 0.5
    body = Vertebra(inferior_disc, superior_disc, True, 20.0, 50.0)
    heights = measure_heights(phantom.array, phantom.spacing, track, body)
    assert heights is not None
    return np.array([heights.anterior_mm, heights.middle_mm, heights.posterior_mm])


@pytest.mark.parametrize(("anterior_mm", "posterior_mm", "hu", "island"), PHANTOMS)
def test_heights_of_a_known_vertebra_are_recovered_on_thin_slices(
    anterior_mm: float, posterior_mm: float, hu: float, island: bool
) -> None:
    """The method away from any real file: on 1 mm slices tilted and wedged end plates, cancellous bone barely
    denser than the disc (osteoporosis) and a bone island under an end plate still give every height within 1 mm."""
    truth = anterior_mm + (posterior_mm - anterior_mm) * np.array(HEIGHT_LINES)  # where the three lines stand
    np.testing.assert_allclose(phantom_heights(anterior_mm, posterior_mm, hu, island, 1.0), truth, atol=1.0)


@pytest.mark.parametrize(("anterior_mm", "posterior_mm", "hu", "island"), PHANTOMS)
def test_on_3mm_slices_heights_are_the_visible_edges_within_about_a_slice(
    anterior_mm: float, posterior_mm: float, hu: float, island: bool
) -> None:
    """At 3 mm a 1.5 mm end plate is blurred over a whole slice: the edge a reader (and the analyzer) sees lies up to
    about 2 mm outside the physical plate, depending on where the plate falls in its slice, so heights run long by up
    to ~4 mm (the card says so); the deformity's direction is still right."""
    truth = anterior_mm + (posterior_mm - anterior_mm) * np.array(HEIGHT_LINES)
    measured = phantom_heights(anterior_mm, posterior_mm, hu, island, 3.0)
    assert np.all(measured >= truth - 1.0) and np.all(measured <= truth + 4.0), (measured, truth)
    if anterior_mm != posterior_mm:
        assert (measured[0] < measured[2]) == (anterior_mm < posterior_mm)


# --- The same abdomen moved along the table by a fraction of a slice, as a re-scan of the same patient samples it:
# what is filed must not depend on where the slices fall. Before this, at 0.5 mm below and 2.5 mm above the original
# position the vertebra split missed three discs and took the sacrum with the bodies above it for one "vertebra",
# whose heights (137 / 136 / 140 mm) were filed with a Genant grade.

SHIFTS_MM = (-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5)

MANUAL_L1_POSTERIOR_MM = 33.3
"""This patient's tallest L1 height read by hand (tests/test_bone.py, MANUAL_L1_HEIGHTS_MM)."""

PLAUSIBLE_MAX_HEIGHT_MM = 40.0
"""More than a fifth taller than this patient's L1 read by hand: adjacent lumbar bodies of one spine differ by a
few millimetres, so a longer "body height" on this scan is several bodies (or a body and a disc) taken as one."""


@pytest.fixture(scope="module")
def shifted_results() -> dict[float, AnalysisResult]:
    image = load_nifti(CT / "abdomen_totalseg" / "example_ct.nii.gz")
    analyzer = BoneAnalyzer()
    results = {}
    for dz in SHIFTS_MM:
        array = image.array
        if dz:  # linear interpolation between slices, as a scan started dz mm further along the table samples it
            array = ndimage.shift(image.array, (dz / image.spacing[0], 0, 0), order=1, mode="nearest")
        shifted = dataclasses.replace(image, array=array)
        analyzer.check_input(shifted)
        results[dz] = analyzer.analyze(shifted)
    return results


def test_no_implausible_body_height_is_filed_wherever_the_slices_fall(shifted_results):
    for dz, result in shifted_results.items():
        keys = {m.key for m in result.measurements}
        heights = [result.measurement(f"{n}_height_mm").value for n in ("anterior", "middle", "posterior")
                   if f"{n}_height_mm" in keys]  # fmt: skip
        assert all(h <= PLAUSIBLE_MAX_HEIGHT_MM for h in heights), (dz, heights)
        if heights:
            assert len(heights) == 3 and "genant_grade" in keys
        else:  # nothing measured: the reader is told why, and no fracture grade stands without heights
            assert "genant_grade" not in keys and "height_loss_percent" not in keys
            assert any("heights" in w.lower() and "not" in w.lower() for w in result.warnings), (dz, result.warnings)


def test_l1_is_identified_from_the_last_rib_wherever_the_slices_fall(shifted_results):
    # before: only at 4 of these 9 positions, and at 3 of those the body labelled L1 was L2
    for dz, result in shifted_results.items():
        assert any("T12 = lowest vertebra with a rib" in w for w in result.warnings), (dz, result.warnings)
        assert 0.0 <= result.measurement("l1_trabecular_hu").value <= 350.0
        # the same body each time: the ROI's slice, taken back to the unshifted scan's slice coordinates, lies
        # between L1's end plates as read by hand (inferior 91.4-94.5, superior 102.4-103.5; MANUAL_L1_HEIGHTS_MM)
        axial = next(e for e in result.explanations if e.slice_index is not None)
        assert axial.slice_index is not None
        assert 94.5 < axial.slice_index - dz / 3.0 < 102.4, (dz, axial.slice_index)
        assert abs(result.measurement("anterior_height_mm").value - MANUAL_L1_HEIGHTS_MM["anterior"]) <= 3.0


def test_the_unshifted_scan_keeps_its_l1_figures(shifted_results):
    result = shifted_results[0.0]
    assert result.measurement("l1_trabecular_hu").value == 102.0
    assert [round(result.measurement(f"{n}_height_mm").value, 1) for n in ("anterior", "middle", "posterior")] == [
        26.9, 28.3, 32.0,
    ]  # fmt: skip


def test_vertebral_spacing_is_the_columns_period_despite_a_spurious_dip_and_a_missed_disc():
    slice_mm, period = 3.0, 12  # 36 mm from disc to disc, as lumbar bodies on 3 mm slices
    z = np.arange(110)
    profile = 200.0 - 120.0 * (np.abs(((z + 3) % period) - period / 2) > period / 2 - 1.5)
    profile[40:44] = 110.0  # a dark basivertebral plexus inside one body
    profile[[z for z in range(110) if (z + 3) % period in (0, 1, 11)][6:9]] = 200.0  # one disc not seen
    assert vertebral_spacing(profile, slice_mm) == pytest.approx(period * slice_mm)
    assert vertebral_spacing(np.full(110, 150.0), slice_mm) is None  # no periodicity, no yardstick


def test_levels_are_not_counted_across_a_segment_that_spans_several_bodies():
    spacing = 36.0
    lengths = [3 * spacing, spacing, spacing, spacing, spacing]  # bottom to top: sacrum+L5 merged, L4 ... L1
    bounds = np.concatenate([[0.0], np.cumsum(lengths)]) / 3.0
    column = [Vertebra(bounds[i], bounds[i + 1], True, 0.0, 30.0, slice_mm=3.0, spacing_mm=spacing) for i in range(5)]
    assert column[0].bodies > MAX_BODIES_PER_SEGMENT and column[0].spans_several and not column[0].single_body
    labels = _labels_from(4, "L1", column)
    assert labels == {4: "L1", 3: "L2", 2: "L3", 1: "L4"}  # the merged segment is neither L5 nor S1


def test_a_height_longer_than_the_spines_own_vertebral_spacing_is_refused_with_a_reason():
    body = Vertebra(10.0, 22.0, True, 20.0, 50.0, slice_mm=3.0, spacing_mm=36.0)
    sagittal = np.zeros((40, 80), dtype=np.float32)

    def heights(mm: float) -> BodyHeights:
        return BodyHeights(mm, mm, mm, (24.0, 35.0, 46.0), ((10.0, 20.0),) * 3, sagittal, 40)

    assert implausible_heights_reason(heights(28.0), body) is None
    reason = implausible_heights_reason(heights(137.0), body)
    assert reason is not None and "137 mm" in reason and "36 mm" in reason and "different bodies" in reason

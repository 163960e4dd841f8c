"""The hippocampus analyzer: real HippoCrop DICOM in, volumes in the adult range, the nomogram read faithfully, the
card's validation figures recomputed by ``imaging-cds evaluate`` from the shipped weights, refusals with reasons."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from core.errors import ConfigurationError, ImageDataError, UnsuitableInputError
from devtools.evaluate import assess_segmentation, load_msd_hippocampus, nifti_image_input
from devtools.samples import load_sample
from dicom_io.volume import assemble_volume
from imaging_cds.cli import main
from models.base import ImageInput, PatientContext
from models.hippocampus import (
    ADULT_RANGE_ML,
    HippocampusAnalyzer,
    crop_geometry,
    from_network_frame,
    to_network_frame,
)
from models.hippocampus_nomogram import AGES, WOMEN_RIGHT_MM3, compare, percentile_of
from models.registry import get_analyzer, get_card
from models.training.digitise_nomogram import percentile_table
from models.training.train_hippocampus import labelled_case_ids, read_case, subject_of, subject_split

REPO = Path(__file__).resolve().parents[1]
SHARED_MR = REPO.parent / "shared" / "data" / "mr"
MSD = SHARED_MR / "hippocampus_msd"
THICK_T1 = SHARED_MR / "brain_tcia_pgbm" / "Study3" / "26401-T1prereg-52906"


@pytest.fixture(scope="module")
def analyzer() -> HippocampusAnalyzer:
    built = get_analyzer("mr-hippocampus")
    assert isinstance(built, HippocampusAnalyzer)
    return built


def hippocrop(name: str) -> ImageInput:
    """A HippoCrop DICOM series assembled exactly as the pipeline assembles it."""
    return assemble_volume(load_sample(name)).to_image_input()


# ------------------------------------------------------------------------------------------------ orientation


def test_a_hippocrop_series_reaches_the_network_as_the_training_crops_are_stored() -> None:
    """The DICOM crops were written from the training crops' frame (NIfTI RAS) into LPS DICOM (rows posterior,
    columns to the patient's left, slices superior); reading the geometry back must undo exactly that, which the
    HippoCrop tool's own reader does by flipping each slice both ways and transposing it."""
    datasets = sorted(load_sample("hippocrop-1"), key=lambda ds: int(ds.InstanceNumber))
    image = assemble_volume(datasets).to_image_input()
    geometry = crop_geometry(np.asarray(image.direction), image.spacing)
    in_frame = to_network_frame(image.array, geometry, mirror=False)
    tools_reading = np.stack([np.flip(ds.pixel_array).T for ds in datasets], axis=2)
    np.testing.assert_array_equal(in_frame, tools_reading)
    assert geometry.obliquity == 0.0 and geometry.spacing == (1.0, 1.0, 1.0)
    back = from_network_frame(in_frame, geometry, mirror=True)
    np.testing.assert_array_equal(to_network_frame(back, geometry, mirror=True), in_frame)


def test_a_training_crop_read_as_nifti_is_already_in_the_network_frame() -> None:
    case = read_case(MSD, labelled_case_ids(MSD)[0])
    image = nifti_image_input(case.image, case.affine, "MR")
    geometry = crop_geometry(np.asarray(image.direction), image.spacing)
    assert geometry.order == (0, 1, 2) and geometry.flip == (False, False, False)
    # the labels agree with that frame: the anterior hippocampus (1) lies anterior (higher axis 1) of the posterior
    anterior, posterior = (np.nonzero(case.labels == value)[1].mean() for value in (1, 2))
    assert anterior > posterior


def test_the_validation_split_keeps_both_hippocampi_of_a_subject_together() -> None:
    case_ids = labelled_case_ids(MSD)
    validation = set(subject_split(case_ids))
    assert 0.15 < len(validation) / len(case_ids) < 0.25
    for case_id in case_ids:
        partner = case_id + 1 if case_id % 2 else case_id - 1
        if partner in case_ids:
            assert (case_id in validation) == (partner in validation), (case_id, partner)
    assert {subject_of(c) for c in validation}.isdisjoint({subject_of(c) for c in case_ids if c not in validation})
    card = get_card("mr-hippocampus")
    assert card.validation["cases"] == sorted(validation)


# ------------------------------------------------------------------------------------------------ nomogram


def test_the_shipped_nomogram_is_the_published_chart_read_exactly() -> None:
    chart = (MSD / "nomogram_fem_right.svg").read_text(encoding="utf-8")
    assert percentile_table(chart) == WOMEN_RIGHT_MM3
    # the chart's own grid: 50th percentile of women's right hippocampus about 3,850 mm3 at 52, about 3,670 at 71
    assert 3800 < WOMEN_RIGHT_MM3[50.0][0] < 3900 and 3600 < WOMEN_RIGHT_MM3[50.0][-1] < 3700


def test_a_volume_on_a_percentile_curve_reads_as_that_percentile() -> None:
    age = 60
    index = AGES.index(age)
    for percentile in (5.0, 25.0, 50.0, 90.0):
        value, position = percentile_of(WOMEN_RIGHT_MM3[percentile][index], age)
        assert value == pytest.approx(percentile, abs=1e-6)
        assert position.startswith("at the ")
    assert percentile_of(WOMEN_RIGHT_MM3[2.5][index] - 1, age) == (None, "below the 2.5th percentile")
    assert percentile_of(WOMEN_RIGHT_MM3[97.5][index] + 1, age) == (None, "above the 97.5th percentile")


def test_the_nomogram_applies_only_to_women_aged_52_to_71_and_the_right_side() -> None:
    woman_of_60 = PatientContext(60, "female")
    assert WOMEN_RIGHT_MM3[5.0][AGES.index(60)] == 3131  # mm3: the lower limit of normal is filed as 3.14 mL
    assert compare(3.13, woman_of_60, "right").below_fifth
    at_limit = compare(3.14, woman_of_60, "right")
    assert at_limit.applies and not at_limit.below_fifth and at_limit.fifth_percentile_ml == 3.14
    assert "women only" in compare(3.0, PatientContext(60, "male"), "right").reason
    assert "right hippocampus" in compare(3.0, PatientContext(60, "female"), "left").reason
    assert "ages 52-71" in compare(3.0, PatientContext(45, "female"), "right").reason
    assert "age or sex" in compare(3.0, PatientContext(), "right").reason


# ------------------------------------------------------------------------------------------------ the analyzer


@pytest.fixture(scope="module")
def crop_results(analyzer: HippocampusAnalyzer) -> dict[str, Any]:
    """The three real HippoCrop series, analysed as a 60-year-old woman's (the crops carry no age or sex)."""
    results = {}
    for name in ("hippocrop-1", "hippocrop-2", "hippocrop-3"):
        image = replace(hippocrop(name), patient=PatientContext(60, "female"))
        analyzer.check_input(image)
        results[name] = analyzer.analyze(image)
    return results


def test_real_hippocrop_volumes_lie_in_the_adult_range_and_add_up(crop_results: dict[str, Any]) -> None:
    for result in crop_results.values():
        anterior = result.measurement("right_hippocampus_anterior_volume_ml").value
        posterior = result.measurement("right_hippocampus_posterior_volume_ml").value
        total = result.measurement("right_hippocampus_volume_ml")
        assert ADULT_RANGE_ML[0] <= total.value <= ADULT_RANGE_ML[1], total
        assert anterior + posterior == pytest.approx(total.value, abs=0.011)
        assert 0.25 < anterior / total.value < 0.75  # the head is about half the hippocampus in the MSD labels
        assert total.unit == "mL" and total.reference_low is not None  # the 5th percentile for a 60-year-old woman
        assert result.category.code in ("within-normal-range", "atrophy-suspected")
        assert any("Laterality" in w for w in result.warnings)  # the crops do not say which side they show


def test_key_images_are_coronal_and_sagittal_pngs(crop_results: dict[str, Any]) -> None:
    for result in crop_results.values():
        titles = [e.title for e in result.explanations]
        assert [t.split()[0] for t in titles] == ["Coronal", "Sagittal"]
        assert all(e.png.startswith(b"\x89PNG") for e in result.explanations)


def test_without_age_and_sex_no_percentile_is_claimed(analyzer: HippocampusAnalyzer) -> None:
    result = analyzer.analyze(hippocrop("hippocrop-1"))
    assert result.category.code == "no-normative-reference" and not result.category.abnormal
    assert "age or sex" in result.conclusion
    assert all(not m.key.endswith("_percentile") for m in result.measurements)


def test_a_left_crop_is_mirrored_into_the_training_orientation(analyzer: HippocampusAnalyzer) -> None:
    """A crop recorded as the left hippocampus, stored as a left one (mirror image of the right), segments the
    same as the right-hand original and is reported as the left."""
    right = hippocrop("hippocrop-2")
    geometry = crop_geometry(np.asarray(right.direction), right.spacing)
    mirrored = np.flip(right.array, axis=geometry.order[0])  # the right-left axis of the input array
    left = replace(right, array=np.ascontiguousarray(mirrored), attributes={**right.attributes, "Laterality": "L"})
    volumes_right = analyzer.segment(right).volumes_ml
    segmentation_left = analyzer.segment(left)
    assert segmentation_left.side == "left" and segmentation_left.side_source == "DICOM Laterality"
    assert segmentation_left.volumes_ml == volumes_right
    result = analyzer.report(left, segmentation_left)
    assert result.measurement("left_hippocampus_volume_ml").value == pytest.approx(volumes_right["total"], abs=0.006)


# ------------------------------------------------------------------------------------------------ refusals


def test_ct_is_refused_naming_the_modality(analyzer: HippocampusAnalyzer) -> None:
    ct = replace(hippocrop("hippocrop-1"), modality="CT", attributes={"Modality": "CT"})
    with pytest.raises(UnsuitableInputError, match="reads brain MRI; this series is CT"):
        analyzer.check_input(ct)


def test_mr_of_another_body_part_is_refused_naming_it(analyzer: HippocampusAnalyzer) -> None:
    crop = hippocrop("hippocrop-1")
    knee = replace(crop, attributes={**crop.attributes, "BodyPartExamined": "KNEE"})
    with pytest.raises(UnsuitableInputError, match="BodyPartExamined is KNEE"):
        analyzer.check_input(knee)


def test_the_5mm_t1_is_refused_as_too_thick_for_volumetry(analyzer: HippocampusAnalyzer) -> None:
    t1 = assemble_volume(pydicom.dcmread(p) for p in sorted(THICK_T1.glob("*.dcm"))).to_image_input()
    with pytest.raises(UnsuitableInputError, match=r"slices are 5\.0 mm thick, 6\.5 mm apart.*at most 1\.5 mm") as e:
        analyzer.check_input(t1)
    assert "3-D T1" in e.value.remedy


def test_a_whole_brain_field_of_view_is_refused_saying_what_to_send(analyzer: HippocampusAnalyzer) -> None:
    # plumbing of the field-of-view guard: a 1 mm volume the size of a head (no whole-brain 1 mm T1 is held here)
    crop = hippocrop("hippocrop-1")
    head = replace(crop, array=np.zeros((176, 240, 256), dtype=np.float32))
    with pytest.raises(UnsuitableInputError, match="whole-brain series") as e:
        analyzer.check_input(head)
    assert "HippoCrop" in e.value.remedy


def test_a_volume_of_unknown_orientation_is_refused(analyzer: HippocampusAnalyzer) -> None:
    with pytest.raises(UnsuitableInputError, match="orientation is not known"):
        analyzer.check_input(replace(hippocrop("hippocrop-1"), direction=None))


def test_a_single_shoulder_mr_slice_cannot_become_a_volume() -> None:
    from pydicom.data import get_testdata_file

    shoulder = pydicom.dcmread(get_testdata_file("MR2_UNCR.dcm"))
    with pytest.raises(ImageDataError, match="at least two slices"):
        assemble_volume([shoulder])


# ------------------------------------------------------------------------------------------------ validation


def run_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(list(argv))
    return status, out.getvalue()


def test_evaluate_recomputes_the_cards_dice_and_volume_agreement(tmp_path: Path) -> None:
    """`imaging-cds evaluate` on the validation split, through the analyzer's own path, gives the card's figures."""
    out = tmp_path / "assessment.json"
    status, stdout = run_cli(
        "evaluate", "mr-hippocampus", "--dataset", str(MSD), "--split", "validation", "--json", str(out)
    )
    assert status == 0 and "Dice, anterior hippocampus" in stdout
    assessment = json.loads(out.read_text())
    card = get_card("mr-hippocampus")
    assert assessment["cases"]["scored"] == len(card.validation["cases"])
    assert assessment["cases"]["refused_by_input_guard"] == 0
    for name, published in card.figures.items():
        measured = assessment["figures"][name]
        tolerance = 0.002 if name.startswith("dice") else 0.01  # thread count may move a borderline voxel
        for key in ("value", "ci95_low", "ci95_high"):
            assert measured[key] == pytest.approx(published[key], abs=tolerance), (name, key)
    target = next(t for t in card.extra["targets"] if t["figure"] == "dice_mean")
    assert target["met"] == (assessment["figures"]["dice_mean"]["value"] >= 0.88)


def test_a_segmentation_set_names_its_splits_and_refuses_a_classifier() -> None:
    with pytest.raises(ConfigurationError, match=r"no split 'test'.*validation, training, all"):
        load_msd_hippocampus(MSD, "test")
    with pytest.raises(ConfigurationError, match="us-breast does not segment"):
        assess_segmentation(get_analyzer("us-breast"), load_msd_hippocampus(MSD, "validation"), limit=1)

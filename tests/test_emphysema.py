"""CT emphysema analyzer: physics on a phantom, refusals, and the figures on two real chest CTs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from lung_support import chest_phantom, load_pyradiomics_ct
from PIL import Image

from core.errors import UnsuitableInputError
from models.base import AnalysisResult, Analyzer, ImageInput
from models.emphysema import EmphysemaAnalyzer, categorize, measure_emphysema, zone_percentages
from models.registry import get_analyzer


def _analyze(image: ImageInput) -> AnalysisResult:
    analyzer = EmphysemaAnalyzer()
    analyzer.check_input(image)
    return analyzer.analyze(image)


def _phantom_input(lung_hu: float, **attributes: str) -> ImageInput:
    phantom = chest_phantom(lung_hu)
    return ImageInput(phantom.hu, phantom.spacing, "CT", attributes)


def test_the_registry_builds_it_and_it_implements_the_interface() -> None:
    analyzer = get_analyzer("ct-emphysema")
    assert isinstance(analyzer, EmphysemaAnalyzer)
    assert isinstance(analyzer, Analyzer)
    assert analyzer.requirements.modalities == ("CT",)


def test_air_filled_lungs_read_as_all_low_attenuation() -> None:
    result = _analyze(_phantom_input(-1000.0))
    assert result.measurement("laa950_percent").value == pytest.approx(100.0)
    assert result.measurement("laa950_percent").interpretation == "H"
    lung_ml = result.measurement("lung_volume_ml").value
    assert result.measurement("low_attenuation_volume_ml").value == pytest.approx(lung_ml)
    assert result.category.code == "severe" and result.category.abnormal
    assert "Gevenois" in result.category.rule


def test_lungs_at_minus_850_hu_have_no_low_attenuation() -> None:
    result = _analyze(_phantom_input(-850.0))
    laa = result.measurement("laa950_percent")
    assert laa.value == 0.0 and laa.interpretation == "N" and laa.unit == "%"
    assert result.measurement("lung_volume_ml").value == pytest.approx(1980.4, rel=0.001)
    assert result.category.code == "none" and not result.category.abnormal
    assert "no emphysema" in result.conclusion
    # No low attenuation in the lower half: the ratio is undefined and left out rather than invented.
    with pytest.raises(KeyError, match="upper_lower_zone_ratio"):
        result.measurement("upper_lower_zone_ratio")


def test_upper_zone_predominant_emphysema_is_described_as_such() -> None:
    phantom = chest_phantom(-850.0)
    hu = phantom.hu
    top = np.flatnonzero(phantom.lungs.any(axis=(1, 2)))
    middle = (top[0] + top[-1] + 1) // 2
    columns = np.arange(hu.shape[2])
    upper_holes = phantom.lungs.copy()
    upper_holes[:middle] = False
    upper_holes &= (columns % 4 == 0)[None, None, :]
    lower_holes = phantom.lungs.copy()
    lower_holes[middle:] = False
    lower_holes &= (columns % 20 == 0)[None, None, :]
    hu[upper_holes | lower_holes] = -1000.0
    result = _analyze(ImageInput(hu, phantom.spacing, "CT", {}))
    upper = result.measurement("laa950_upper_zone_percent").value
    lower = result.measurement("laa950_lower_zone_percent").value
    assert upper == pytest.approx(25.0, abs=1.5) and lower == pytest.approx(5.0, abs=1.0)
    assert result.measurement("upper_lower_zone_ratio").value == pytest.approx(upper / lower, rel=0.01)
    assert result.category.code == "moderate"
    assert "upper-zone predominant" in result.conclusion and "centrilobular" in result.conclusion
    laa = result.measurement("laa950_percent").value
    # The sentence a clinician reads quotes the values the Observations file, to the same digits.
    assert f"makes up {laa:g}% of" in result.conclusion
    assert f"(upper half {upper:g}%, lower half {lower:g}%)" in result.conclusion


def test_a_share_that_is_filed_as_5_percent_is_classified_as_reaching_the_cut_off() -> None:
    """4.9975 % is filed as 5.0 %: the category, the interpretation and the sentence follow the filed value."""
    phantom = chest_phantom(-850.0)
    voxel_ml = float(np.prod(phantom.spacing)) / 1000.0
    lung_ml = _analyze(ImageInput(phantom.hu, phantom.spacing, "CT", {})).measurement("lung_volume_ml").value
    holes = round(0.049975 * lung_ml / voxel_ml)  # lung_volume_ml is filed to 0.1 mL: +/- 0.5 of a hole
    hu = phantom.hu.copy()
    deep = np.flatnonzero(phantom.lungs & np.roll(phantom.lungs, 3, axis=2) & np.roll(phantom.lungs, -3, axis=2))
    hu.flat[deep[:: len(deep) // holes][:holes]] = -1000.0  # scattered single voxels well inside the lungs
    result = _analyze(ImageInput(hu, phantom.spacing, "CT", {}))
    laa = result.measurement("laa950_percent")
    assert laa.value == 5.0
    assert laa.interpretation == "H" and result.category.code == "mild" and result.category.abnormal
    # FHIR's referenceRange.high is inclusive: the normal range ends at the last filed value below 5 %.
    assert laa.reference_high == 4.99 and laa.value > laa.reference_high
    assert "makes up 5% of" in result.conclusion and "under the 5% cut-off" not in result.conclusion


def test_soft_tissue_without_lungs_is_refused() -> None:
    phantom = chest_phantom(with_lungs=False)
    with pytest.raises(UnsuitableInputError, match="lungs are not in the field of view"):
        EmphysemaAnalyzer().check_input(ImageInput(phantom.hu, phantom.spacing, "CT", {}))


def test_non_ct_is_refused() -> None:
    phantom = chest_phantom()
    with pytest.raises(UnsuitableInputError, match="modality 'MR'"):
        EmphysemaAnalyzer().check_input(ImageInput(phantom.hu, phantom.spacing, "MR", {}))


def test_a_single_slice_is_refused() -> None:
    with pytest.raises(UnsuitableInputError, match="needs a CT volume"):
        EmphysemaAnalyzer().check_input(ImageInput(np.zeros((512, 512), np.float32), (0.7, 0.7), "CT", {}))


def test_raw_stored_values_without_rescale_are_refused() -> None:
    phantom = chest_phantom()
    raw = phantom.hu + 1024.0  # what a reader that forgot RescaleIntercept -1024 would hand over
    with pytest.raises(UnsuitableInputError, match="Hounsfield units"):
        EmphysemaAnalyzer().check_input(ImageInput(raw, phantom.spacing, "CT", {}))


def test_slices_thicker_than_10_mm_are_refused() -> None:
    phantom = chest_phantom(slices=20, slice_mm=12.0)
    with pytest.raises(UnsuitableInputError, match="12 mm thick"):
        EmphysemaAnalyzer().check_input(ImageInput(phantom.hu, phantom.spacing, "CT", {}))


def test_thick_slices_and_a_sharp_kernel_are_flagged() -> None:
    result = _analyze(_phantom_input(-850.0, SliceThickness="5", ConvolutionKernel="B70f"))
    joined = " ".join(result.warnings)
    assert "5 mm thick" in joined and "underestimate" in joined
    assert "'B70f' looks sharp" in joined


def test_thin_slices_with_a_standard_kernel_raise_no_acquisition_warning() -> None:
    phantom = chest_phantom(-850.0, slices=160, slice_mm=1.25)
    result = _analyze(ImageInput(phantom.hu, phantom.spacing, "CT", {"ConvolutionKernel": "STANDARD"}))
    assert not any("thick" in w or "kernel" in w for w in result.warnings), result.warnings
    assert result.measurement("lung_volume_ml").value == pytest.approx(1979.0, rel=0.01)


def test_categories_follow_the_published_cut_off_and_the_stated_bands() -> None:
    assert [categorize(v).code for v in (0.0, 4.99, 5.0, 9.9, 10.0, 19.9, 20.0)] == [
        "none",
        "none",
        "mild",
        "mild",
        "moderate",
        "moderate",
        "severe",
    ]
    assert "project convention" in categorize(12.0).rule
    assert "COPDGene" in categorize(1.0).rule


def test_zones_split_the_lung_extent_in_halves_with_a_shared_middle_slice() -> None:
    lung = np.array([0, 100, 100, 100, 0])  # three lung slices: the middle one counts half to each zone
    low = np.array([0, 0, 50, 100, 0])
    upper, lower = zone_percentages(lung, low)
    assert upper == pytest.approx(100.0 * (100 + 25) / 150)
    assert lower == pytest.approx(100.0 * 25 / 150)


def test_lung2_real_chest_ct_is_not_emphysematous(data_dir: Path) -> None:
    hu, spacing = load_pyradiomics_ct(data_dir, "lung2_image")
    result = _analyze(ImageInput(hu, spacing, "CT", {"SliceThickness": "5"}))
    lung_ml = result.measurement("lung_volume_ml").value
    laa = result.measurement("laa950_percent").value
    assert 2500 < lung_ml < 8000, "adult lungs, apex to bases in view"
    # 0.25% with trachea, bronchi and stomach gas excluded (a plain threshold mask that keeps them reads ~2%).
    assert 0.05 < laa < 2.0
    assert result.category.code == "none"
    # laa is rounded to 0.01 percentage points, hence the tolerance.
    assert result.measurement("low_attenuation_volume_ml").value == pytest.approx(lung_ml * laa / 100, rel=0.03)
    assert not any("beyond the scanned range" in w for w in result.warnings)
    assert any("5 mm thick" in w for w in result.warnings)
    assert f"{lung_ml / 1000:.2f} L" in result.conclusion
    assert f"makes up {laa:g}% of" in result.conclusion  # the filed value, not a second rounding of it


def test_lung2_explanations_show_upper_middle_and_lower_zones(data_dir: Path) -> None:
    hu, spacing = load_pyradiomics_ct(data_dir, "lung2_image")
    result = _analyze(ImageInput(hu, spacing, "CT", {}))
    assert [e.title.rsplit(" ", 2)[-2] for e in result.explanations] == ["upper", "middle", "lower"]
    upper, middle, lower = (e.slice_index if e.slice_index is not None else -1 for e in result.explanations)
    # The lungs span slices 5-57 (counted from the feet); each image comes from its own third of that span.
    assert upper >= 40 and 23 <= middle < 40 and 5 <= lower < 23
    for explanation in result.explanations:
        assert explanation.kind == "overlay"
        image = Image.open(io.BytesIO(explanation.png))
        assert image.format == "PNG" and image.mode == "RGB" and image.width > 200


def test_lung1_partial_scan_reports_plausible_figures_and_says_the_bases_are_cut(data_dir: Path) -> None:
    hu, spacing = load_pyradiomics_ct(data_dir, "lung1_image")
    result = _analyze(ImageInput(hu, spacing, "CT", {}))
    assert 2000 < result.measurement("lung_volume_ml").value < 8000
    assert 1.0 < result.measurement("laa950_percent").value < 5.0
    assert result.category.code == "none"
    assert any("lung base extends beyond the scanned range" in w for w in result.warnings)


def test_other_analyzers_read_the_filed_figures_from_measure_emphysema() -> None:
    """The pure function a nodule (Brock) or heart analyzer calls gives the values the report files."""
    phantom = chest_phantom(-1000.0)
    measured = measure_emphysema(phantom.hu, phantom.spacing)
    result = _analyze(ImageInput(phantom.hu, phantom.spacing, "CT", {}))
    assert measured.laa950_percent == result.measurement("laa950_percent").value == 100.0
    assert round(measured.lung_volume_ml, 1) == result.measurement("lung_volume_ml").value
    assert measured.category == result.category and measured.category.code == "severe"
    assert measured.emphysema_present
    assert np.array_equal(measured.lungs.mask, phantom.lungs)
    healthy = chest_phantom(-850.0)
    assert not measure_emphysema(healthy.hu, healthy.spacing).emphysema_present


def test_measure_emphysema_refuses_a_volume_without_lungs() -> None:
    phantom = chest_phantom(with_lungs=False)
    with pytest.raises(UnsuitableInputError, match="lungs are not in the field of view") as refused:
        measure_emphysema(phantom.hu, phantom.spacing)
    assert refused.value.remedy == "Choose a chest CT series that covers the lungs."

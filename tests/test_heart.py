"""ct-heart on real data: the QRM phantom's known calcium masses (through `imaging-cds evaluate`, against the card),
the heart and great vessels of the two real chest CTs, and the scans it must refuse or report as incomplete."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from core.errors import UnsuitableInputError
from devtools.samples import load_sample
from dicom_io.volume import assemble_volume
from imaging_cds.cli import main
from models.base import AnalysisResult, ImageInput
from models.calcium import score_calcium
from models.cards import load_card
from models.followup import Repeatability, followup_spec
from models.heart import CAC_DRS, HeartAnalyzer
from models.registry import get_analyzer

REPO = Path(__file__).resolve().parents[1]
PHANTOM = REPO.parent / "shared" / "data" / "ct" / "qrm_calcium_phantom" / "Large_rep1"
CARD = REPO / "models" / "cards" / "ct-heart.json"


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(argv))
    return status, out.getvalue(), err.getvalue()


def chest_input(name: str, slices: slice = slice(None)) -> ImageInput:
    image = assemble_volume(load_sample(name)).to_image_input()
    if slices != slice(None):
        image = ImageInput(np.ascontiguousarray(image.array[slices]), image.spacing, image.modality, image.attributes)
    return image


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("phantom") / "phantom.json"
    status, stdout, stderr = run_cli("evaluate", "ct-heart", "--dataset", str(PHANTOM), "--json", str(out))
    assert status == 0, stderr
    return {"table": stdout, "json": json.loads(out.read_text())}


@pytest.fixture(scope="module")
def analyzer() -> HeartAnalyzer:
    built = get_analyzer("ct-heart")
    assert isinstance(built, HeartAnalyzer)
    return built


@pytest.fixture(scope="module")
def lung2(analyzer: HeartAnalyzer) -> tuple[ImageInput, AnalysisResult]:
    image = chest_input("lung2")
    analyzer.check_input(image)
    return image, analyzer.analyze(image)


@pytest.fixture(scope="module")
def lung1(analyzer: HeartAnalyzer) -> tuple[ImageInput, AnalysisResult]:
    image = chest_input("lung1")
    analyzer.check_input(image)
    return image, analyzer.analyze(image)


def values(result: AnalysisResult) -> dict[str, float]:
    return {m.key: m.value for m in result.measurements}


# ---------------------------------------------------------------------------------------------------------------
# the scoring core on the real phantom


def test_evaluate_recomputes_the_phantom_figures_published_in_the_card(phantom_run: dict[str, Any]) -> None:
    published = json.loads(CARD.read_text())["validation"]["phantom"]
    recomputed = phantom_run["json"]
    assert recomputed["calibration"]["mg_per_cm3_per_hu"] == pytest.approx(
        published["calibration"]["mg_per_cm3_per_hu"]
    )
    for ours, card in zip(recomputed["inserts"], published["inserts"], strict=True):
        assert ours["insert"] == card["insert"]
        for key in ("project_agatston", "project_mass_mg", "project_volume_mm3", "authors_agatston", "authors_mass_mg"):
            assert ours[key] == pytest.approx(card[key], abs=0.05), (ours["insert"], key)
    assert recomputed["goals"] == published["goals"]


def test_agatston_agrees_with_the_authors_and_mass_beats_their_agatston_mass(phantom_run: dict[str, Any]) -> None:
    """Issue 19's goals on the large and medium inserts (a 1 mm insert is below CT resolution)."""
    rows = {r["insert"]: r for r in phantom_run["json"]["inserts"]}
    for size in ("large", "medium"):
        for density in ("low", "medium", "high"):
            row = rows[f"{size} {density} density"]
            assert abs(row["project_agatston"] - row["authors_agatston"]) <= 0.10 * row["authors_agatston"]
            ours = abs(row["project_mass_mg"] - row["known_mass_mg"])
            theirs = abs(row["authors_mass_mg"] - row["known_mass_mg"])
            assert ours < theirs, row
    # the calibration comes from the phantom's own rods: 200 mg HA/cm3 reads about 275 HU above water at 120 kV
    assert 0.65 <= phantom_run["json"]["calibration"]["mg_per_cm3_per_hu"] <= 0.80
    assert "Agatston within 10 %" in phantom_run["table"] and "known mg" in phantom_run["table"]


def test_a_phantom_scan_is_refused_for_an_analyzer_that_does_not_score_calcium() -> None:
    status, _out, err = run_cli("evaluate", "ct-emphysema", "--dataset", str(PHANTOM))
    assert status != 0 and "calcium" in err


# ---------------------------------------------------------------------------------------------------------------
# anatomy on the two real chest CTs


def test_lung2_aortic_calcium_is_found_and_kept_out_of_the_coronary_score(
    analyzer: HeartAnalyzer, lung2: tuple[ImageInput, AnalysisResult]
) -> None:
    image, result = lung2
    found = analyzer._findings(image)
    heart, aorta, root = (found.vessels.heart_region(), found.vessels.aorta_region(), found.vessels.root_region())
    assert found.coronary is not None and found.aortic is not None
    by_key = values(result)
    # the calcified aorta of this scan: hundreds of aortic calcium voxels along the arch and descending wall
    assert by_key["tac_agatston"] > 1000 and found.aortic.lesion_count >= 5
    coronary = found.coronary.weights_in(image.array.shape) > 0
    aortic = found.aortic.weights_in(image.array.shape) > 0
    assert heart is not None and aorta is not None and root is not None
    assert not (coronary & aortic).any()
    assert not (coronary & aorta).any() and not (coronary & root).any()
    # every aortic calcification lies in the aortic wall territory, outside the coronary territory
    assert not (aortic & heart).any()
    # the coronary calcium this scan shows (left main, LAD and circumflex around the root) is scored as such
    assert result.category.code in ("cac-drs-2", "cac-drs-3") and result.category.abnormal
    assert by_key["cac_agatston"] >= 100 and by_key["cac_volume_mm3"] > 0 and by_key["cac_mass_mg"] > 0


SHIFTS_MM = (-0.5, 1.0, 2.5)
"""lung2 as a re-scan would sample it with the patient lying this far along the table: every 5 mm slice falls
between two of the original ones (on main, -0.5 mm read an 18 mm structure as the ascending aorta and 1.0 mm lost it
together with the coronary territory)."""


def repeatability(key: str) -> Repeatability:
    """The scan-rescan repeatability the card's followup section gives measurement ``key``."""
    spec = followup_spec(load_card("ct-heart"))
    assert spec is not None
    found = spec.measurements[key].repeatability
    assert found is not None
    return found


@pytest.fixture(scope="module")
def lung2_shifted(analyzer: HeartAnalyzer, lung2: tuple[ImageInput, AnalysisResult]) -> dict[float, AnalysisResult]:
    image, _ = lung2
    out = {}
    for shift in SHIFTS_MM:
        moved = ndimage.shift(image.array, (shift / image.spacing[0], 0.0, 0.0), order=1, mode="nearest")
        out[shift] = analyzer.analyze(ImageInput(moved, image.spacing, image.modality, image.attributes))
    return out


def test_lung2_moved_along_the_table_keeps_its_ascending_aorta_and_coronary_category(
    lung2: tuple[ImageInput, AnalysisResult], lung2_shifted: dict[float, AnalysisResult]
) -> None:
    """A follow-up scan never samples the patient at the same slice positions: the aortic root, and with it the
    coronary territory, must be found wherever the slices fall, and the CAC-DRS category must not depend on it."""
    _, unshifted = lung2
    before = values(unshifted)
    quint = repeatability("ascending_aorta_diameter_mm")
    for shift, result in lung2_shifted.items():
        after = values(result)
        assert "ascending_aorta_diameter_mm" in after, (shift, result.warnings)
        low, high = quint.band(before["ascending_aorta_diameter_mm"])  # the card's +/-5 mm (Quint 2013)
        assert low <= after["ascending_aorta_diameter_mm"] <= high, shift
        assert "cac_agatston" in after, shift
        assert result.category.code == unshifted.category.code, (shift, after["cac_agatston"])


def test_on_5_mm_slices_a_sub_slice_shift_alone_moves_the_cac_beyond_the_gated_repeatability_so_it_is_not_judged(
    lung2: tuple[ImageInput, AnalysisResult], lung2_shifted: dict[float, AnalysisResult]
) -> None:
    """Why the card gives no CAC verdict on slices thicker than 3 mm: partial volume lowers the calcium peaks by an
    amount that depends on where the slices fall, and the Agatston weights and the 130 HU area follow."""
    image, unshifted = lung2
    sevrukov = repeatability("cac_agatston")
    assert sevrukov.verdict_up_to_slice_mm is not None
    assert image.spacing[0] > sevrukov.verdict_up_to_slice_mm
    low, high = sevrukov.band(values(unshifted)["cac_agatston"])
    assert any(not low <= values(r)["cac_agatston"] <= high for r in lung2_shifted.values())


@pytest.mark.parametrize("case", ["lung1", "lung2"])
def test_aortic_and_pulmonary_diameters_lie_in_adult_ranges(case: str, request: pytest.FixtureRequest) -> None:
    """Adult CT reference: ascending aorta about 25-40 mm, descending 20-30 mm (Framingham means 23-34 mm), pulmonary
    trunk 20-30 mm with a PA:aorta ratio below 1 (neither scan is of a patient known to have aortic disease)."""
    _image, result = request.getfixturevalue(case)
    by_key = values(result)
    assert 25 <= by_key["ascending_aorta_diameter_mm"] <= 42
    assert 20 <= by_key["descending_aorta_diameter_mm"] <= 32
    assert 18 <= by_key["pulmonary_trunk_diameter_mm"] <= 34
    assert 0.6 <= by_key["pa_aorta_ratio"] <= 1.2
    interpretations = {m.key: m.interpretation for m in result.measurements}
    assert interpretations["descending_aorta_diameter_mm"] == "N"
    assert interpretations["ascending_aorta_diameter_mm"] == "N"


def test_every_measured_structure_is_drawn_in_a_key_image(lung2: tuple[ImageInput, AnalysisResult]) -> None:
    _image, result = lung2
    titles = " ".join(e.title for e in result.explanations)
    for structure in ("Coronary calcium", "ascending aorta", "descending aorta", "pulmonary trunk"):
        assert structure in titles
    if "aortic_arch_diameter_mm" in values(result):
        assert "aortic arch" in titles
    for explanation in result.explanations:
        assert explanation.png.startswith(b"\x89PNG") and explanation.slice_index is not None


def test_the_report_states_the_non_gated_and_thick_slice_caveats_with_the_correction(
    lung2: tuple[ImageInput, AnalysisResult],
) -> None:
    _image, result = lung2
    warnings = " ".join(result.warnings)
    assert "Non-gated" in warnings and "SCCT/STR 2016" in warnings
    assert "x 1.67" in warnings and "Ohnesorge 2002" in warnings
    cac = next(m for m in result.measurements if m.key == "cac_agatston")
    assert "CAC-DRS" in cac.note and cac.interpretation in ("H", "HH")
    mass = next(m for m in result.measurements if m.key == "cac_mass_mg")
    assert "McCollough 2007" in mass.note and "approximate" in mass.note
    drs = int(result.category.code[-1])
    assert CAC_DRS[drs][0] in result.conclusion


def test_lung1_says_the_bottom_of_the_heart_is_outside_the_scan(lung1: tuple[ImageInput, AnalysisResult]) -> None:
    _image, result = lung1
    assert any("base of the heart" in w for w in result.warnings)
    assert "score may be incomplete" in result.conclusion


def test_a_chest_ct_cut_above_the_heart_says_which_measurements_it_could_not_make(analyzer: HeartAnalyzer) -> None:
    """The upper 40 % of lung2 (the arch and the top of the ascending aorta gone): no root, so no coronary score."""
    image = chest_input("lung2", slice(0, 33))
    analyzer.check_input(image)
    result = analyzer.analyze(image)
    by_key = values(result)
    assert "cac_agatston" not in by_key and result.category.code == "not-assessable"
    not_measured = next(w for w in result.warnings if w.startswith("Not measured:"))
    assert "ascending aorta" in not_measured and "heart" in not_measured
    assert "descending_aorta_diameter_mm" in by_key  # what is in view is still measured


# ---------------------------------------------------------------------------------------------------------------
# refusals


def test_a_head_ct_is_refused_because_it_shows_no_lungs(analyzer: HeartAnalyzer, data_dir: Path) -> None:
    """The real GE head CT (its uneven gaps make the volume reader refuse it, so its slices are stacked here)."""
    datasets = sorted(
        (pydicom.dcmread(f) for f in (data_dir / "ct" / "head_ge").glob("*.dcm")),
        key=lambda d: float(d.ImagePositionPatient[2]),
    )
    volume = np.stack(
        [d.pixel_array.astype(np.float32) * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in datasets]
    )
    spacing = (float(datasets[0].SliceThickness), *map(float, datasets[0].PixelSpacing))
    with pytest.raises(UnsuitableInputError, match="lung") as caught:
        analyzer.check_input(ImageInput(volume, spacing, "CT", {"SliceThickness": str(datasets[0].SliceThickness)}))
    assert "chest" in caught.value.remedy


def test_an_mr_is_refused_naming_the_modality(analyzer: HeartAnalyzer) -> None:
    image = chest_input("lung2")
    mr = ImageInput(image.array, image.spacing, "MR", {"Modality": "MR"})
    with pytest.raises(UnsuitableInputError, match="'MR'"):
        analyzer.check_input(mr)


def test_slices_thicker_than_5_mm_are_refused(analyzer: HeartAnalyzer) -> None:
    image = chest_input("lung2")
    thick = ImageInput(image.array[::2], (10.0, *image.spacing[1:]), "CT", {"SliceThickness": "10"})
    with pytest.raises(UnsuitableInputError, match="10 mm thick"):
        analyzer.check_input(thick)


def test_the_scoring_functions_are_the_ones_the_phantom_validation_calls() -> None:
    """The analyzer scores through models.calcium.score_calcium, the function evaluate calls per insert."""
    import devtools.calcium_phantom as phantom
    import models.heart as heart

    assert heart.score_calcium is score_calcium and phantom.score_calcium is score_calcium

"""ct-lung-nodules: ``imaging-cds evaluate`` recomputes the card's figures from the shipped weights and real data.

The LIDC figures (size agreement, type kappa, suspicion AUC, detection in context) are recomputed on the shared
LIDC-IDRI volumes of interest, split by patient exactly as the training script split them; the whole-CT detection
on the pyradiomics lung1 and lung2 chest CTs, which no part of the analyzer was trained on. The card is what a
clinician reads, so every number in it must come back when the command is run.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.errors import UnsuitableInputError
from imaging_cds.cli import main
from models.base import ImageInput
from models.nodules.analyzer import SHAPE_LIMITS, THIN_SLICE_MM, ShapeLimits
from models.registry import get_analyzer, get_card

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct"
LIDC = SHARED / "lidc_nodule_vois"
WHOLE_CTS = SHARED / "chest_pyradiomics"


def _evaluate(dataset: Path, out: Path) -> tuple[str, dict[str, Any]]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = main(["evaluate", "ct-lung-nodules", "--dataset", str(dataset), "--json", str(out)])
    assert status == 0
    return stdout.getvalue(), json.loads(out.read_text())


def test_evaluate_recomputes_every_lidc_figure_of_the_card(tmp_path: Path) -> None:
    printed, assessment = _evaluate(LIDC, tmp_path / "lidc.json")
    card = get_card("ct-lung-nodules")
    assert card.figures, "the card publishes no figures"
    for name, figure in card.figures.items():
        assert assessment["figures"][name] == pytest.approx(figure, abs=1e-9), name
    # Patients held out of training only, and the split the card names.
    details = assessment["details"]
    assert details["test_patients"] == card.validation["lidc_assessment"]["test_patients"]
    assert "size_bias_mm_solid" in printed and "suspicion_auc" in printed and "type_kappa" in printed
    assert details["type"]["confusion"] == card.validation["lidc_assessment"]["type"]["confusion"]
    # The shape limits the analyzer applies are the ones 99 % of the training and validation nodules keep within.
    limits = details["shape_limits"]
    assert limits == card.validation["lidc_assessment"]["shape_limits"]
    for thickness, name in ((THIN_SLICE_MM, "as_acquired"), (5.0, "thick_5mm")):
        assert SHAPE_LIMITS[thickness] == ShapeLimits(**{k: v for k, v in limits[name].items() if k != "n"})


def test_evaluate_recomputes_whole_ct_detection_and_both_lesions_are_found(tmp_path: Path) -> None:
    printed, assessment = _evaluate(WHOLE_CTS, tmp_path / "scans.json")
    detection = assessment["details"]["whole_ct_detection"]
    assert detection == get_card("ct-lung-nodules").validation["whole_ct_detection"]
    for name in ("lung1", "lung2"):
        assert detection[name]["lesion_found"], f"{name}: the labelled lesion was missed"
        assert detection[name]["slice_thickness_mm"] == 5.0
    assert detection["lung1"]["lesion"]["lung_rads"] == "4A"  # a solid 8-15 mm nodule
    assert "lung1 (5 mm slices): labelled lesion found" in printed
    assert f"({detection['lung2']['false_positives_uncapped']} before the list's cap)" in printed


def test_input_outside_what_the_analyzer_was_built_for_is_refused_with_the_reason() -> None:
    analyzer = get_analyzer("ct-lung-nodules")
    volume = np.full((30, 64, 64), 40.0, dtype=np.float32)
    with pytest.raises(UnsuitableInputError, match="modality 'MR'") as refused:
        analyzer.check_input(ImageInput(volume, (1.0, 1.0, 1.0), "MR"))
    assert "chest CT" in refused.value.remedy
    with pytest.raises(UnsuitableInputError, match="2-D image"):
        analyzer.check_input(ImageInput(volume[0], (1.0, 1.0), "CT"))
    with pytest.raises(UnsuitableInputError, match="12 mm thick"):
        analyzer.check_input(ImageInput(volume, (12.0, 0.7, 0.7), "CT"))
    with pytest.raises(UnsuitableInputError, match="Hounsfield"):
        analyzer.check_input(ImageInput(volume + 1024.0, (1.0, 1.0, 1.0), "CT"))

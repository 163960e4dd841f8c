"""The assessment harness: `imaging-cds evaluate` recomputes the pneumonia model's card figures from the real
PneumoniaMNIST test split, its table agrees with models.metrics, and live review / feedback figures are read."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydicom.data import get_testdata_file

from cds.feedback import FeedbackStore, parse_feedback
from core.errors import ConfigurationError
from devtools.evaluate import assess, benchmark_input, evaluate, format_table, load_npz
from imaging_cds.cli import main
from models import metrics
from models.base import filed_probability
from models.bundle import BundleAnalyzer
from models.medmnist import medmnist_input
from models.registry import get_analyzer, register_bundle, unregister_bundle
from smart_launch.reviews import ReviewLog

REPO = Path(__file__).resolve().parents[1]
NPZ = REPO / "tests" / "data" / "medmnist" / "pneumoniamnist_28_reconstructed.npz"
CARD = REPO / "models" / "cards" / "cxr-pneumonia.json"
BUNDLES = REPO / "models" / "bundles"


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(argv))
    return status, out.getvalue(), err.getvalue()


def live_stores(folder: Path) -> tuple[Path, Path]:
    """Real feedback and review stores, written through their own modules' public API."""
    feedback_db, review_db = folder / "feedback.sqlite", folder / "reviews.sqlite"
    store = FeedbackStore(feedback_db)
    cards = [
        {"uuid": f"card-{i}", "indicator": "warning", "source": {"label": "imaging-cds cxr-pneumonia"}}
        for i in range(3)
    ]
    store.record_issued("imaging-cds-patient-view", cards)
    body = {
        "feedback": [
            {"card": "card-0", "outcome": "accepted", "acceptedSuggestions": [{"id": "s-0"}]},
            {
                "card": "card-1",
                "outcome": "overridden",
                "overrideReason": {"reason": {"code": "disagree-with-ai", "system": "http://example.org/reasons"}},
            },
        ]
    }
    store.record_feedback("imaging-cds-patient-view", parse_feedback(body), client_iss=None)
    log = ReviewLog(review_db)
    log.record("DiagnosticReport/1", "cxr-pneumonia", "1.0.0", "accepted")
    log.record("DiagnosticReport/2", "cxr-pneumonia", "1.0.0", "accepted")
    log.record("DiagnosticReport/3", "cxr-pneumonia", "1.0.0", "rejected", rejection_kind="entered-in-error")
    log.record("DiagnosticReport/4", "ct-emphysema", "1.0.0", "accepted")
    log.close()
    return feedback_db, review_db


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One CLI run over all 624 test images of the built-in analyzer (the test recomputes; it reads no card)."""
    folder = tmp_path_factory.mktemp("evaluate")
    feedback_db, review_db = live_stores(folder)
    out = folder / "assessment.json"
    status, stdout, stderr = run_cli(
        "evaluate", "cxr-pneumonia", "--dataset", str(NPZ), "--json", str(out),
        "--feedback-db", str(feedback_db), "--review-db", str(review_db),
    )  # fmt: skip
    assert status == 0, stderr
    return {"table": stdout, "json": json.loads(out.read_text())}


@pytest.fixture(scope="module")
def pneumonia_bundle() -> Iterator[BundleAnalyzer]:
    torch.set_num_threads(1)  # as `imaging-cds evaluate` does by default
    """The packaged bundle (same probabilities as the built-in, see test_bundle.py) for the quicker checks."""
    registration = json.loads((BUNDLES / "bundles.json").read_text())["bundles"][0]
    name = register_bundle(BUNDLES / registration["path"], sha256_pins=registration["sha256"])
    analyzer = get_analyzer(name)
    assert isinstance(analyzer, BundleAnalyzer)
    yield analyzer
    unregister_bundle(name)


def test_evaluate_reproduces_the_card_figures_on_the_official_test_split(full_run: dict[str, Any]) -> None:
    result = full_run["json"]
    cases = result["cases"]
    assert cases["scored"] + cases["refused_by_input_guard"] == 624
    # The feature-space guard refuses what lies beyond 99.5 % of the validation images: a handful of test images
    # (the test split is shifted from validation), each with its reason; the rest are scored.
    assert 0 <= cases["refused_by_input_guard"] <= 0.02 * 624
    assert all("does not resemble the paediatric frontal chest" in reason for reason in cases["refusal_reasons"])
    assert cases["with_finding"] <= 390 and cases["without_finding"] <= 234
    card = json.loads(CARD.read_text())
    published = card["validation"]["figures"]
    assert result["operating_threshold"] == filed_probability(card["validation"]["operating_threshold"])  # 0.678
    # The harness goes through the deployed path (input guard, enlargement, the analyzer's own resize and
    # intensity mapping), the card's figures through the training script's tensor path: they agree closely,
    # and every recomputed figure lies inside the card's 95% interval.
    assert result["figures"]["auc"]["value"] == pytest.approx(published["auc"]["value"], abs=0.01)
    for name in ("auc", "accuracy", "sensitivity", "specificity", "false_positive_rate", "false_negative_rate"):
        value = result["figures"][name]["value"]
        assert published[name]["ci95_low"] <= value <= published[name]["ci95_high"], name
        assert abs(value - published[name]["value"]) <= 0.03, name


def test_the_table_names_the_figures_clinicians_ask_for_and_the_data_they_come_from(full_run: dict[str, Any]) -> None:
    table = full_run["table"]
    for label in (
        "Recognition rate (sensitivity)",
        "Specificity",
        "Misdiagnosis rate (false-positive rate)",
        "Missed-diagnosis rate (false-negative rate)",
        "AUC (area under the ROC curve)",
        "Accuracy",
        "95% confidence interval",
    ):
        assert label in table
    assert "the benchmark's own 28x28 images" in table and "not clinical DICOM" in table
    cases = full_run["json"]["cases"]
    assert (
        f"Cases scored: {cases['scored']} ({cases['with_finding']} with the finding, {cases['without_finding']} "
        f"without); refused by the input guard: {cases['refused_by_input_guard']}." in table
    )
    timing = full_run["json"]["analysis_seconds_per_study"]
    assert 0 < timing["mean"] <= timing["p95"] and timing["torch_threads"] == 1
    assert "Analysis time per study on this machine: mean" in table


def test_live_review_and_feedback_figures_are_reported_per_analyzer(full_run: dict[str, Any]) -> None:
    live = full_run["json"]["live"]
    assert live["cds_feedback"]["cards_issued"] == 3
    assert (live["cds_feedback"]["accepted"], live["cds_feedback"]["overridden"]) == (1, 1)
    assert live["cds_feedback"]["override_reasons"] == {"disagree-with-ai": 1}
    assert live["clinician_review"] == {"reviewed": 3, "accepted": 2, "rejected": 1, "acceptance_rate": 2 / 3}
    assert "CDS Hooks cards: 3 issued, 1 accepted, 1 overridden; acceptance 50.0 %." in full_run["table"]
    assert (
        "Clinician review (SMART app): 3 reports reviewed, 2 accepted, 1 rejected; acceptance 66.7 %."
        in (full_run["table"])
    )


def test_the_analyzer_sees_the_benchmark_pixels_after_the_enlargement(pneumonia_bundle: BundleAnalyzer) -> None:
    """The guard needs >= 64 px; the analyzer's own 8-bit MedMNIST reduction undoes the enlargement: exactly for
    nearly every pixel, within one grey level for all but a few in a thousand."""
    with np.load(NPZ) as data:
        images = data["test_images"][:20]
    errors = []
    for image in images:
        case = benchmark_input(image, pneumonia_bundle)
        assert case.array.shape == (84, 84) and case.modality == "CR"
        assert case.attributes == {"Modality": "CR", "BodyPartExamined": "CHEST"}
        pneumonia_bundle.check_input(case)
        seen = np.rint(medmnist_input(case.array) * 255.0).astype(int)
        errors.append(np.abs(seen - image.astype(int)))
    error = np.concatenate([e.ravel() for e in errors])
    assert np.mean(error == 0) >= 0.85 and np.mean(error <= 1) >= 0.99


def test_evaluate_reproduces_the_breast_ultrasound_card_figures(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    assessment = evaluate("us-breast", NPZ.with_name("breastmnist_28.npz"), json_out=tmp_path / "breast.json")
    assert (assessment.labels.size, int(assessment.labels.sum())) == (156, 42)  # label 0 = malignant
    published = json.loads((REPO / "models" / "cards" / "us-breast.json").read_text())["validation"]["figures"]
    for name in ("auc", "accuracy", "sensitivity", "specificity"):
        assert abs(assessment.figures[name].value - published[name]["value"]) <= 0.03, name


def test_the_table_agrees_with_models_metrics_on_the_same_scores(pneumonia_bundle: BundleAnalyzer) -> None:
    assessment = assess(pneumonia_bundle, load_npz(NPZ, "test", pneumonia_bundle), limit=150, samples=500)
    assert assessment.labels.size == 150 and assessment.score == "probability"
    expected = metrics.assess_binary(assessment.labels, assessment.scores, assessment.threshold, samples=500)
    assert assessment.figures == expected
    counts = assessment.confusion
    tp, fn = counts["true_positive"], counts["false_negative"]
    fp, tn = counts["false_positive"], counts["true_negative"]
    assert assessment.figures["sensitivity"].value == pytest.approx(tp / (tp + fn))
    assert assessment.figures["false_positive_rate"].value == pytest.approx(fp / (fp + tn))
    assert assessment.figures["false_negative_rate"].value == pytest.approx(1 - tp / (tp + fn))
    table = format_table(assessment)
    assert "Operating threshold: 0.6780 on the probability as filed (0.1 %)" in table  # the fitted 0.67768, as called
    assert "Live figures: no live figures yet." in table


def test_real_dicom_cases_are_read_and_an_unsuitable_one_is_counted_as_refused(
    pneumonia_bundle: BundleAnalyzer, tmp_path: Path, data_dir: Path
) -> None:
    chest = get_testdata_file("RG1_UNCI.dcm")
    assert chest is not None
    shutil.copy(chest, tmp_path / "chest.dcm")
    shutil.copy(data_dir / "mg" / "P_00173_LEFT_CC_benign_mass_case.dcm", tmp_path / "mammogram.dcm")
    (tmp_path / "labels.csv").write_text("file,label\nchest.dcm,1\nmammogram.dcm,0\n")
    status, stdout, _ = run_cli("evaluate", pneumonia_bundle.name, "--dataset", str(tmp_path))
    assert status == 0
    assert "2 DICOM cases listed in labels.csv" in stdout
    assert "Cases scored: 1 (1 with the finding, 0 without); refused by the input guard: 1." in stdout
    assert "refused 1x: cxr-pneumonia-bundle reads CR/DX images; this image is modality MG." in stdout


def test_an_unknown_analyzer_fails_with_did_you_mean() -> None:
    status, _, stderr = run_cli("evaluate", "cxr-pneumona", "--dataset", str(NPZ))
    assert status == 1
    assert "Unknown analyzer 'cxr-pneumona'. Did you mean 'cxr-pneumonia'?" in stderr


def test_a_dataset_without_labels_or_split_fails_clearly(pneumonia_bundle: BundleAnalyzer, tmp_path: Path) -> None:
    unlabelled = tmp_path / "unlabelled.npz"
    np.savez(unlabelled, test_images=np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(
        ConfigurationError, match=r"unlabelled\.npz has no labels for split 'test'.*needs the true label"
    ):
        load_npz(unlabelled, "test", pneumonia_bundle)
    with pytest.raises(ConfigurationError, match=r"has no split 'validation'.*--split: test, train, val"):
        load_npz(NPZ, "validation", pneumonia_bundle)
    with pytest.raises(ConfigurationError, match=r"has no labels\.csv"):
        evaluate(pneumonia_bundle.name, tmp_path)
    status, _, stderr = run_cli("evaluate", pneumonia_bundle.name, "--dataset", str(NPZ), "--feedback-db", "/absent")
    assert status == 1 and "Feedback database /absent does not exist" in stderr

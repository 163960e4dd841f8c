"""The assessment figures on small cases whose values can be worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models import metrics

# Four cases: two without the finding (scores 0.1, 0.4), two with it (0.35, 0.8).
LABELS = np.array([0, 0, 1, 1])
SCORES = np.array([0.1, 0.4, 0.35, 0.8])


def test_auc_counts_correctly_ordered_pairs() -> None:
    # Pairs (positive, negative): 0.35>0.1 yes, 0.35>0.4 no, 0.8>0.1 yes, 0.8>0.4 yes -> 3/4.
    assert metrics.roc_auc(LABELS, SCORES) == pytest.approx(0.75, abs=1e-12)


def test_auc_counts_a_tie_as_half_a_pair() -> None:
    assert metrics.roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5, abs=1e-12)
    assert math.isnan(metrics.roc_auc([1, 1], [0.2, 0.9]))


def test_rates_at_a_threshold_match_the_confusion_table() -> None:
    # At 0.5 only 0.8 is called positive: TP 1, FN 1, TN 2, FP 0.
    assert metrics.confusion_counts(LABELS, SCORES, 0.5) == (1, 0, 2, 1)
    assert metrics.sensitivity(LABELS, SCORES, 0.5) == 0.5  # recognition rate
    assert metrics.specificity(LABELS, SCORES, 0.5) == 1.0
    assert metrics.false_positive_rate(LABELS, SCORES, 0.5) == 0.0  # misdiagnosis rate
    assert metrics.false_negative_rate(LABELS, SCORES, 0.5) == 0.5  # missed-diagnosis rate
    assert metrics.accuracy(LABELS, SCORES, 0.5) == 0.75


def test_a_score_equal_to_the_threshold_is_called_positive() -> None:
    assert metrics.confusion_counts([1], [0.35], 0.35) == (1, 0, 0, 0)


def test_expected_calibration_error_of_four_cases() -> None:
    # Bins: 0.2 (label 0) -> |0.2-0|; 0.7 (1) -> 0.3; 0.9 and 0.95 (1, 1) -> |0.925-1|. Weighted by 1/4, 1/4, 2/4.
    ece = metrics.expected_calibration_error([0, 1, 1, 1], [0.2, 0.7, 0.9, 0.95])
    assert ece == pytest.approx(0.25 * 0.2 + 0.25 * 0.3 + 0.5 * 0.075, abs=1e-12)


def test_perfectly_calibrated_probabilities_have_zero_ece() -> None:
    assert metrics.expected_calibration_error([0, 1, 0, 1], [0.55, 0.55, 0.55, 0.55]) == pytest.approx(0.05)
    assert metrics.expected_calibration_error([0, 1], [0.0, 1.0]) == 0.0


def test_temperature_scaling_recovers_the_observed_rate() -> None:
    # Four identical logits of 2 with three positives: the NLL is minimal where sigmoid(2 / T) = 0.75,
    # i.e. T = 2 / ln(3).
    temperature = metrics.fit_temperature([1, 1, 1, 0], [2.0, 2.0, 2.0, 2.0])
    assert temperature == pytest.approx(2.0 / math.log(3.0), rel=1e-4)


def test_temperature_scaling_keeps_the_ranking() -> None:
    logits = np.array([-3.0, -0.5, 0.2, 4.0])
    temperature = metrics.fit_temperature([0, 1, 0, 1], logits)
    assert metrics.roc_auc([0, 1, 0, 1], logits / temperature) == metrics.roc_auc([0, 1, 0, 1], logits)


def test_youden_threshold_separates_separable_cases() -> None:
    threshold = metrics.youden_threshold([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9])
    assert threshold == pytest.approx(0.45)  # the middle of the gap between 0.2 and 0.7
    assert metrics.sensitivity([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9], threshold) == 1.0
    assert metrics.specificity([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9], threshold) == 1.0


def test_max_accuracy_threshold_on_the_four_cases() -> None:
    # 3/4 is reached at 0.225 (0.35, 0.4, 0.8 positive) and at 0.6 (only 0.8 positive): midpoint 0.4125.
    threshold = metrics.max_accuracy_threshold(LABELS, SCORES)
    assert threshold == pytest.approx(0.4125)


def test_bootstrap_interval_is_seeded_and_brackets_the_estimate() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.clip(labels * 0.3 + rng.random(300) * 0.7, 0, 1)
    first = metrics.bootstrap_ci(labels, scores, metrics.roc_auc, samples=500, seed=3)
    second = metrics.bootstrap_ci(labels, scores, metrics.roc_auc, samples=500, seed=3)
    assert first == second
    assert first.ci_low < first.value < first.ci_high
    assert first.value == pytest.approx(metrics.roc_auc(labels, scores))


def test_assessment_table_for_a_perfect_model_has_degenerate_intervals() -> None:
    table = metrics.assess_binary([0, 0, 0, 1, 1, 1], [0.0, 0.1, 0.2, 0.8, 0.9, 1.0], 0.5, samples=200)
    assert table["auc"].as_dict() == {"value": 1.0, "ci95_low": 1.0, "ci95_high": 1.0}
    assert table["sensitivity"].value == 1.0
    assert table["false_negative_rate"].value == 0.0
    assert table["false_positive_rate"].ci_high == 0.0


def test_labels_other_than_zero_or_one_are_refused() -> None:
    with pytest.raises(ValueError, match="labels must be 0"):
        metrics.roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="3 labels but 2 scores"):
        metrics.accuracy([0, 1, 1], [0.1, 0.2], 0.5)


def test_bland_altman_bias_and_limits_of_agreement_follow_their_definition() -> None:
    reference = np.array([3.0, 3.2, 2.8, 3.5, 3.1, 2.9])
    measured = reference + np.array([0.1, -0.05, 0.2, 0.0, 0.05, 0.1])
    agreement = metrics.bland_altman(reference, measured, [1, 1, 2, 2, 3, 3])
    differences = measured - reference
    spread = 1.96 * differences.std(ddof=1)
    assert agreement.bias.value == pytest.approx(differences.mean())
    assert agreement.lower_limit.value == pytest.approx(differences.mean() - spread)
    assert agreement.upper_limit.value == pytest.approx(differences.mean() + spread)
    assert agreement.bias.ci_low <= agreement.bias.value <= agreement.bias.ci_high
    assert set(agreement.as_figures("total_volume_ml")) == {
        "total_volume_ml_bias",
        "total_volume_ml_lower_limit_of_agreement",
        "total_volume_ml_upper_limit_of_agreement",
    }


def test_the_cluster_bootstrap_draws_whole_subjects() -> None:
    # subject 7 has three crops, subject 9 one: a resample of two subjects holds 6, 4 or 2 crops, never always 4
    sizes = metrics.cluster_bootstrap([0.0, 0.0, 0.0, 1.0], [7, 7, 7, 9], lambda v: float(len(v)), samples=400)
    assert (sizes.ci_low, sizes.value, sizes.ci_high) == (2.0, 4.0, 6.0)

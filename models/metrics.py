"""Binary classification figures that clinicians and regulators ask for, with seeded bootstrap 95% CIs.

Pure numpy/scipy functions: labels ``y_true`` are 0/1 with 1 = the finding (pneumonia, malignancy), scores
are probabilities of the finding. Vocabulary used in the cards and the assessment table:

- sensitivity = recognition rate = TP / (TP + FN)
- specificity = TN / (TN + FP)
- false-positive rate = misdiagnosis rate = FP / (FP + TN) = 1 - specificity
- false-negative rate = missed-diagnosis rate = FN / (FN + TP) = 1 - sensitivity

Confidence intervals are percentile bootstrap intervals over cases with a fixed seed, so the same data always
gives the same interval (a card figure must be reproducible by a test).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize_scalar
from scipy.stats import rankdata

DEFAULT_BOOTSTRAP_SAMPLES = 2000
DEFAULT_SEED = 20231


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap 95% confidence interval."""

    value: float
    ci_low: float
    ci_high: float

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "ci95_low": self.ci_low, "ci95_high": self.ci_high}


def _as_binary(y_true: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(y_true).reshape(-1)
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != values.shape:
        raise ValueError(f"{labels.size} labels but {values.size} scores; give one score per case.")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (no finding) or 1 (finding).")
    return labels.astype(np.int64), values


def confusion_counts(y_true: ArrayLike, scores: ArrayLike, threshold: float) -> tuple[int, int, int, int]:
    """``(tp, fp, tn, fn)`` when a score >= ``threshold`` is called positive."""
    labels, values = _as_binary(y_true, scores)
    called = values >= threshold
    tp = int(np.sum(called & (labels == 1)))
    fp = int(np.sum(called & (labels == 0)))
    tn = int(np.sum(~called & (labels == 0)))
    fn = int(np.sum(~called & (labels == 1)))
    return tp, fp, tn, fn


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else float("nan")


def sensitivity(y_true: ArrayLike, scores: ArrayLike, threshold: float) -> float:
    """Recognition rate: the share of cases with the finding that the model calls positive."""
    tp, _, _, fn = confusion_counts(y_true, scores, threshold)
    return _ratio(tp, tp + fn)


def specificity(y_true: ArrayLike, scores: ArrayLike, threshold: float) -> float:
    _, fp, tn, _ = confusion_counts(y_true, scores, threshold)
    return _ratio(tn, tn + fp)


def false_positive_rate(y_true: ArrayLike, scores: ArrayLike, threshold: float) -> float:
    """Misdiagnosis rate: the share of cases without the finding that the model calls positive."""
    _, fp, tn, _ = confusion_counts(y_true, scores, threshold)
    return _ratio(fp, fp + tn)


def false_negative_rate(y_true: ArrayLike, scores: ArrayLike, threshold: float) -> float:
    """Missed-diagnosis rate: the share of cases with the finding that the model calls negative."""
    tp, _, _, fn = confusion_counts(y_true, scores, threshold)
    return _ratio(fn, fn + tp)


def accuracy(y_true: ArrayLike, scores: ArrayLike, threshold: float) -> float:
    tp, fp, tn, fn = confusion_counts(y_true, scores, threshold)
    return _ratio(tp + tn, tp + fp + tn + fn)


def roc_auc(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties); NaN when one class is absent."""
    labels, values = _as_binary(y_true, scores)
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = rankdata(values)
    rank_sum = float(ranks[labels == 1].sum())
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def expected_calibration_error(y_true: ArrayLike, probabilities: ArrayLike, bins: int = 10) -> float:
    """ECE of the probability of the finding: ``sum_b n_b/N * |mean(p_b) - observed rate_b|``.

    Equal-width bins over [0, 1]; a probability of exactly 1 falls in the last bin.
    """
    labels, values = _as_binary(y_true, probabilities)
    if values.size == 0:
        return float("nan")
    index = np.minimum((values * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            total += members.sum() / values.size * abs(values[members].mean() - labels[members].mean())
    return float(total)


def sigmoid(logits: ArrayLike) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * x)))


def binary_nll(y_true: ArrayLike, logits: ArrayLike) -> float:
    """Mean negative log-likelihood of 0/1 labels under ``sigmoid(logits)`` (numerically stable)."""
    labels, values = _as_binary(y_true, logits)
    return float(np.mean(np.logaddexp(0.0, values) - labels * values))


def fit_temperature(y_true: ArrayLike, logits: ArrayLike) -> float:
    """Temperature ``T`` minimising the NLL of ``sigmoid(logits / T)`` (Guo et al., ICML 2017).

    Fitted on validation logits only; dividing by ``T`` leaves the ranking (AUC) and a threshold expressed
    on the logit scale unchanged, it only makes the probabilities honest.
    """
    labels, values = _as_binary(y_true, logits)
    result = minimize_scalar(
        lambda log_t: binary_nll(labels, values / np.exp(log_t)), bounds=(-4.0, 4.0), method="bounded"
    )
    return float(np.exp(result.x))


def youden_threshold(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Score threshold maximising sensitivity + specificity - 1 (Youden's J).

    When several thresholds reach the maximum (common on a well-separated validation split, where a whole
    gap between the classes is optimal) the midpoint of the lowest and highest of them is returned, so the
    operating point sits in the middle of the gap rather than at one class's edge.
    """
    return _best_threshold(y_true, scores, lambda tp, fp, tn, fn: _ratio(tp, tp + fn) + _ratio(tn, tn + fp))


def max_accuracy_threshold(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Score threshold maximising accuracy (ties: the midpoint of the tying thresholds, as above)."""
    return _best_threshold(y_true, scores, lambda tp, fp, tn, fn: (tp + tn) / (tp + fp + tn + fn))


def _best_threshold(y_true: ArrayLike, scores: ArrayLike, objective: Callable[[int, int, int, int], float]) -> float:
    labels, values = _as_binary(y_true, scores)
    distinct = np.unique(values)
    candidates = np.concatenate(([distinct[0] - 1e-6], (distinct[1:] + distinct[:-1]) / 2.0, [distinct[-1] + 1e-6]))
    objectives = np.array([objective(*confusion_counts(labels, values, float(c))) for c in candidates])
    best = candidates[objectives >= np.nanmax(objectives) - 1e-12]
    return float((best.min() + best.max()) / 2.0)


def bootstrap_ci(
    y_true: ArrayLike,
    scores: ArrayLike,
    statistic: Callable[[np.ndarray, np.ndarray], float],
    samples: int = DEFAULT_BOOTSTRAP_SAMPLES,
    seed: int = DEFAULT_SEED,
) -> Estimate:
    """Point estimate and percentile 95% CI from ``samples`` case resamples (NaN resamples are dropped)."""
    labels, values = _as_binary(y_true, scores)
    rng = np.random.default_rng(seed)
    point = float(statistic(labels, values))
    draws = rng.integers(0, labels.size, size=(samples, labels.size))
    replicates = np.array([statistic(labels[d], values[d]) for d in draws], dtype=np.float64)
    replicates = replicates[np.isfinite(replicates)]
    if replicates.size == 0:
        return Estimate(point, float("nan"), float("nan"))
    low, high = np.percentile(replicates, [2.5, 97.5])
    return Estimate(point, float(low), float(high))


def assess_binary(
    y_true: ArrayLike,
    probabilities: ArrayLike,
    threshold: float,
    samples: int = DEFAULT_BOOTSTRAP_SAMPLES,
    seed: int = DEFAULT_SEED,
) -> dict[str, Estimate]:
    """The assessment table: AUC, accuracy, sensitivity, specificity, FPR, FNR and ECE, each with a 95% CI."""
    labels, values = _as_binary(y_true, probabilities)
    statistics: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
        "auc": roc_auc,
        "accuracy": lambda y, p: accuracy(y, p, threshold),
        "sensitivity": lambda y, p: sensitivity(y, p, threshold),
        "specificity": lambda y, p: specificity(y, p, threshold),
        "false_positive_rate": lambda y, p: false_positive_rate(y, p, threshold),
        "false_negative_rate": lambda y, p: false_negative_rate(y, p, threshold),
        "expected_calibration_error": expected_calibration_error,
    }
    return {name: bootstrap_ci(labels, values, fn, samples, seed) for name, fn in statistics.items()}


# ---------------------------------------------------------------------------------------------------------------
# Segmentation and measurement agreement: per-case values with a bootstrap over subjects.


def cluster_bootstrap(
    values: ArrayLike,
    clusters: ArrayLike,
    statistic: Callable[[np.ndarray], float],
    samples: int = DEFAULT_BOOTSTRAP_SAMPLES,
    seed: int = DEFAULT_SEED,
) -> Estimate:
    """Point estimate and percentile 95% CI of ``statistic`` over per-case ``values``, resampling whole clusters.

    Cases of one subject (two hippocampi of one person) are not independent; resampling subjects, not cases,
    keeps the interval honest. ``values`` may be ``(N,)`` or ``(N, k)`` (rows are cases).
    """
    data = np.asarray(values, dtype=np.float64)
    groups = np.asarray(clusters).reshape(-1)
    if data.shape[0] != groups.size:
        raise ValueError(f"{data.shape[0]} values but {groups.size} cluster ids; give one per case.")
    unique, index = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(index == k) for k in range(unique.size)]
    rng = np.random.default_rng(seed)
    point = float(statistic(data))
    replicates = []
    for draw in rng.integers(0, unique.size, size=(samples, unique.size)):
        replicates.append(statistic(data[np.concatenate([members[k] for k in draw])]))
    finite = np.asarray(replicates, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return Estimate(point, float("nan"), float("nan"))
    low, high = np.percentile(finite, [2.5, 97.5])
    return Estimate(point, float(low), float(high))


@dataclass(frozen=True)
class BlandAltman:
    """Agreement of a measurement with its reference (Bland & Altman, Lancet 1986;1:307-310).

    ``bias`` is the mean of (measured - reference); the 95% limits of agreement are ``bias +/- 1.96 SD`` of the
    differences. Each carries a bootstrap 95% CI over subjects.
    """

    bias: Estimate
    lower_limit: Estimate
    upper_limit: Estimate
    cases: int

    def as_figures(self, prefix: str) -> dict[str, dict[str, float]]:
        return {
            f"{prefix}_bias": self.bias.as_dict(),
            f"{prefix}_lower_limit_of_agreement": self.lower_limit.as_dict(),
            f"{prefix}_upper_limit_of_agreement": self.upper_limit.as_dict(),
        }


def bland_altman(
    reference: ArrayLike,
    measured: ArrayLike,
    clusters: ArrayLike,
    samples: int = DEFAULT_BOOTSTRAP_SAMPLES,
    seed: int = DEFAULT_SEED,
) -> BlandAltman:
    """Bias and 95% limits of agreement of ``measured`` against ``reference``, with subject-bootstrap CIs."""
    differences = np.asarray(measured, dtype=np.float64) - np.asarray(reference, dtype=np.float64)

    def lower(d: np.ndarray) -> float:
        return float(d.mean() - 1.96 * d.std(ddof=1))

    def upper(d: np.ndarray) -> float:
        return float(d.mean() + 1.96 * d.std(ddof=1))

    return BlandAltman(
        bias=cluster_bootstrap(differences, clusters, lambda d: float(d.mean()), samples, seed),
        lower_limit=cluster_bootstrap(differences, clusters, lower, samples, seed),
        upper_limit=cluster_bootstrap(differences, clusters, upper, samples, seed),
        cases=int(differences.size),
    )

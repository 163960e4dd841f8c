"""The nodule analyzer's validation figures, computed the same way by the training script and ``imaging-cds evaluate``.

Every figure is measured through the analyzer's own functions (the same segmentation, measurement, candidate
stage, network and suspicion model the pipeline runs), on real data:

* **size** on every LIDC volume of interest (the measurement is rule-based, so no patient was used to fit it):
  Bland-Altman agreement of the Lung-RADS mean diameter with the consensus ``diameter_mm``, for solid and subsolid
  nodules (by the radiologists' texture rating) separately; beside it, for context, the same agreement of the
  reference's own consensus mask measured the same way;
* **type** on the test patients (the two type cut-offs are fitted on the training patients): confusion matrix
  and Cohen's kappa against the radiologists' texture rating;
* **suspicion** on the test patients: AUC against the radiologists' malignancy rating (4-5 against 1-2, 3 left
  out);
* **detection in context** on the test patients' volumes of interest, as acquired and thickened to 5 mm slices:
  the share of nodules with a candidate inside the consensus mask that the network accepts and the analyzer's
  segmentation keeps (shaped like a nodule), and the false positives per crop;
* **shape limits** (``shape_limits``) on the training and validation patients: what 99 % of nodules show of a
  nodule's shape, the limits the analyzer applies;
* **detection on whole CTs** (``scan_detection``): whether each labelled lesion was found, and the false positives.

Confidence intervals are percentile bootstraps over patients (2000 resamples, seed 20231): nodules of one patient
are not independent, so patients, not nodules, are resampled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models import metrics
from models.nodules.analyzer import has_nodule_proportions, is_nodule_like, shape_limits_at
from models.nodules.detect import Candidate, find_candidates
from models.nodules.measure import (
    NoduleMeasures,
    TypeRule,
    axial_diameters,
    measure_nodule,
    segment_nodule,
)
from models.nodules.network import NoduleModels, candidate_features, sample_patches, suspicion_features
from models.training.chest_scans import LabelledScan
from models.training.lidc_vois import Voi, VoiRecord, iter_vois, thicken

TYPES = ("solid", "part-solid", "ground-glass")
SIZE_GOAL_BIAS_MM = 0.5
SIZE_GOAL_LIMIT_MM = 1.5
"""Issue #18's size goal: |bias| <= 0.5 mm and 95 % of nodules within +/- 1.5 mm (the Lung-RADS growth step)."""


@dataclass(frozen=True)
class MeasuredVoi:
    record: VoiRecord
    measures: NoduleMeasures | None
    reference_mean_mm: float  # the consensus mask itself, measured as Lung-RADS measures


def measure_voi(voi: Voi, type_rule: TypeRule | None = None) -> MeasuredVoi:
    """Segment from the consensus mask's centre (where a reader would click) and measure, as the analyzer does."""
    seed = voi.seed()
    nodule = segment_nodule(voi.hu, voi.spacing, seed)
    measures = measure_nodule(voi.hu, voi.spacing, nodule, type_rule) if nodule is not None else None
    reference = axial_diameters(voi.mask, (voi.spacing[1], voi.spacing[2])).mean_mm
    return MeasuredVoi(voi.record, measures, reference)


SHAPE_KEPT = 0.99
"""The shape limits keep this share of the LIDC training and validation nodules at each thickness, each on its own."""


def shape_limits(root: Path) -> dict[str, Any]:
    """What 99 % of nodules show of a nodule's shape, as acquired and at 5 mm (:data:`SHAPE_LIMITS`).

    Each training and validation nodule is segmented from its consensus centre and measured, as acquired (1-2.5 mm
    slices) and thickened to 5 mm. The limits are the 1st percentiles of its compact share, of its craniocaudal
    extent over its long axis, of its short axis over its long axis and of the lung share around it, and the 99th
    percentile of the wall share around it.
    The test patients are not read: the analyzer's :data:`models.nodules.analyzer.SHAPE_LIMITS` are these values,
    and the test patients then measure what the rules cost (``detection_in_context``).
    """
    shapes: dict[str, list[tuple[float, float, float, float, float]]] = {"as_acquired": [], "thick_5mm": []}
    for voi in iter_vois(root, ("train", "val")):
        for name, version in (("as_acquired", voi), ("thick_5mm", thicken(voi))):
            if version is None:
                continue
            nodule = segment_nodule(version.hu, version.spacing, version.seed())
            if nodule is None:
                continue
            measures = measure_nodule(version.hu, version.spacing, nodule)
            shapes[name].append(
                (
                    nodule.compact_share,
                    measures.craniocaudal_mm / measures.diameters.long_mm,
                    measures.diameters.short_mm / measures.diameters.long_mm,
                    nodule.surface_lung_share,
                    nodule.surface_wall_share,
                )
            )
    out: dict[str, Any] = {}
    for name, values in shapes.items():
        if values:
            table = np.array(values)
            low = np.quantile(table, 1.0 - SHAPE_KEPT, axis=0)
            high = np.quantile(table, SHAPE_KEPT, axis=0)
            out[name] = {
                "n": len(values),
                "compact_share": round(float(low[0]), 3),
                "height_ratio": round(float(low[1]), 3),
                "axis_ratio": round(float(low[2]), 3),
                "surface_lung_share": round(float(low[3]), 3),
                "surface_wall_share": round(float(high[4]), 3),
            }
    return out


def patient_bootstrap(
    patients: Sequence[str],
    statistic: Callable[[np.ndarray], float],
    samples: int = metrics.DEFAULT_BOOTSTRAP_SAMPLES,
    seed: int = metrics.DEFAULT_SEED,
) -> metrics.Estimate:
    """``statistic`` of item indices, with a percentile 95 % CI from resampling patients (not items)."""
    names = np.asarray(patients)
    unique, inverse = np.unique(names, return_inverse=True)
    members = [np.flatnonzero(inverse == k) for k in range(unique.size)]
    point = float(statistic(np.arange(names.size)))
    rng = np.random.default_rng(seed)
    replicates = []
    for _ in range(samples):
        chosen = rng.integers(0, unique.size, size=unique.size)
        replicates.append(statistic(np.concatenate([members[k] for k in chosen])))
    values = np.asarray(replicates, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return metrics.Estimate(point, float("nan"), float("nan"))
    low, high = np.percentile(values, [2.5, 97.5])
    return metrics.Estimate(point, float(low), float(high))


def bland_altman(differences: np.ndarray, patients: Sequence[str]) -> dict[str, Any]:
    """Bias, 95 % limits of agreement and the share within +/- 1.5 mm, each with a patient-bootstrap CI."""
    d = np.asarray(differences, dtype=np.float64)

    def bias(i: np.ndarray) -> float:
        return float(d[i].mean())

    def low(i: np.ndarray) -> float:
        return float(d[i].mean() - 1.96 * d[i].std(ddof=1)) if i.size > 1 else float("nan")

    def high(i: np.ndarray) -> float:
        return float(d[i].mean() + 1.96 * d[i].std(ddof=1)) if i.size > 1 else float("nan")

    def within(i: np.ndarray) -> float:
        return float(np.mean(np.abs(d[i]) <= SIZE_GOAL_LIMIT_MM))

    return {
        "n": int(d.size),
        "bias_mm": patient_bootstrap(patients, bias).as_dict(),
        "loa_low_mm": patient_bootstrap(patients, low).as_dict(),
        "loa_high_mm": patient_bootstrap(patients, high).as_dict(),
        "within_1_5_mm": patient_bootstrap(patients, within).as_dict(),
    }


def size_agreement(measured: Sequence[MeasuredVoi]) -> dict[str, Any]:
    """Bland-Altman of the mean diameter against ``diameter_mm``, solid and subsolid apart (see the module doc)."""
    out: dict[str, Any] = {"failed_segmentations": sum(1 for m in measured if m.measures is None)}
    for group, textures in (("solid", ("solid",)), ("subsolid", ("part-solid", "ground-glass"))):
        chosen = [m for m in measured if m.measures is not None and m.record.texture in textures]
        patients = [m.record.patient_id for m in chosen]
        ours = np.array([m.measures.mean_diameter_mm for m in chosen if m.measures is not None])
        reference = np.array([m.record.diameter_mm for m in chosen])
        consensus = np.array([m.reference_mean_mm for m in chosen])
        out[group] = {
            "analyzer_vs_diameter_mm": bland_altman(ours - reference, patients),
            "consensus_mask_vs_diameter_mm": bland_altman(consensus - reference, patients),
        }
        goal = out[group]["analyzer_vs_diameter_mm"]
        out[group]["goal_met"] = bool(
            abs(goal["bias_mm"]["value"]) <= SIZE_GOAL_BIAS_MM and goal["within_1_5_mm"]["value"] >= 0.95
        )
    return out


def cohen_kappa(truth: Sequence[str], predicted: Sequence[str], classes: Sequence[str] = TYPES) -> float:
    index = {c: k for k, c in enumerate(classes)}
    table = np.zeros((len(classes), len(classes)))
    for t, p in zip(truth, predicted, strict=True):
        table[index[t], index[p]] += 1
    total = table.sum()
    if total == 0:
        return float("nan")
    observed = np.trace(table) / total
    expected = float((table.sum(axis=0) * table.sum(axis=1)).sum()) / total**2
    return float((observed - expected) / (1.0 - expected)) if expected < 1.0 else float("nan")


def type_agreement(measured: Sequence[MeasuredVoi]) -> dict[str, Any]:
    """Confusion matrix (rows: radiologists' texture, columns: analyzer) and Cohen's kappa with a patient CI."""
    chosen = [m for m in measured if m.measures is not None]
    truth = [m.record.texture for m in chosen]
    predicted = [m.measures.nodule_type for m in chosen if m.measures is not None]
    matrix = {t: {p: 0 for p in TYPES} for t in TYPES}
    for t, p in zip(truth, predicted, strict=True):
        matrix[t][p] += 1
    kappa = patient_bootstrap(
        [m.record.patient_id for m in chosen],
        lambda i: cohen_kappa([truth[k] for k in i], [predicted[k] for k in i]),
    )
    return {"n": len(chosen), "confusion": matrix, "kappa": kappa.as_dict()}


def suspicion_scores(measured: Sequence[MeasuredVoi], models: NoduleModels) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Labels (rating 4-5 = 1, 1-2 = 0; 3 left out), the model's probabilities, and the patients."""
    labels, scores, patients = [], [], []
    for m in measured:
        if m.measures is None or m.record.malignancy == 3:
            continue
        labels.append(1 if m.record.malignancy >= 4 else 0)
        scores.append(float(models.suspicion.probability(suspicion_features(m.measures))[0]))
        patients.append(m.record.patient_id)
    return np.asarray(labels), np.asarray(scores), patients


def suspicion_agreement(measured: Sequence[MeasuredVoi], models: NoduleModels) -> dict[str, Any]:
    labels, scores, patients = suspicion_scores(measured, models)
    auc = patient_bootstrap(patients, lambda i: metrics.roc_auc(labels[i], scores[i]))
    threshold = models.suspicion_threshold
    sensitivity = patient_bootstrap(patients, lambda i: metrics.sensitivity(labels[i], scores[i], threshold))
    specificity = patient_bootstrap(patients, lambda i: metrics.specificity(labels[i], scores[i], threshold))
    return {
        "n": int(labels.size),
        "suspicious": int(labels.sum()),
        "patients": len(set(patients)),
        "auc": auc.as_dict(),
        "sensitivity": sensitivity.as_dict(),
        "specificity": specificity.as_dict(),
        "threshold": threshold,
    }


@dataclass
class CandidateSet:
    """The candidate stage's output on one crop with what the network needs and the truth, for training or scoring."""

    patches: np.ndarray
    features: np.ndarray
    inside: np.ndarray  # bool: the candidate's centre lies in the consensus mask
    outside: np.ndarray  # bool: it lies clear of the mask (at least 2 voxels away in-plane, 1 slice)
    candidates: list[Candidate] = field(default_factory=list)


def voi_candidates(voi: Voi) -> CandidateSet:
    """Candidates of one crop exactly as :func:`models.nodules.detect.find_candidates` finds them in a whole CT.

    The crop stands in for the lungs: its aerated voxels are the lung. Candidates whose five planes would reach
    beyond the crop's first or last slice are left out: their patches would be cut where a whole CT is not.
    """
    from scipy import ndimage

    labels = (voi.hu < -400.0).astype(np.uint8)
    candidates = find_candidates(voi.hu, voi.spacing, labels)
    depth = voi.hu.shape[0]
    kept = [
        c
        for c in candidates
        if c.centre[0] - 0.75 * c.radius_mm / voi.spacing[0] >= -0.5
        and c.centre[0] + 0.75 * c.radius_mm / voi.spacing[0] <= depth - 0.5
    ]
    near = ndimage.binary_dilation(voi.mask, structure=np.ones((3, 5, 5), dtype=bool))
    patches = sample_patches(voi.hu, voi.spacing, [c.centre for c in kept], [c.radius_mm for c in kept])
    features = candidate_features(
        [c.radius_mm for c in kept], [c.lung_surround for c in kept], [c.dense_surround for c in kept]
    )
    inside = np.array([bool(voi.mask[c.centre]) for c in kept], dtype=bool)
    outside = np.array([not bool(near[c.centre]) for c in kept], dtype=bool)
    return CandidateSet(patches, features, inside, outside, kept)


def scan_candidates(scan: LabelledScan) -> CandidateSet:
    """Candidates of a whole CT as the analyzer finds them; inside = in the labelled lesion, outside = clear of it."""
    from scipy import ndimage

    from models.lung import segment_lungs

    spacing = (float(scan.image.spacing[0]), float(scan.image.spacing[1]), float(scan.image.spacing[2]))
    lungs = segment_lungs(scan.image.array, spacing)
    candidates = find_candidates(scan.image.array, spacing, lungs.labels, lungs.box)
    near = ndimage.binary_dilation(scan.label, structure=np.ones((3, 5, 5), dtype=bool))
    patches = sample_patches(
        scan.image.array, spacing, [c.centre for c in candidates], [c.radius_mm for c in candidates]
    )
    features = candidate_features(
        [c.radius_mm for c in candidates], [c.lung_surround for c in candidates], [c.dense_surround for c in candidates]
    )
    inside = np.array([bool(scan.label[c.centre]) for c in candidates], dtype=bool)
    outside = np.array([not bool(near[c.centre]) for c in candidates], dtype=bool)
    return CandidateSet(patches, features, inside, outside, candidates)


def voi_detection(vois: Iterable[Voi], models: NoduleModels) -> dict[str, Any]:
    """Detection in context on crops as acquired and thickened to 5 mm (see the module docstring)."""
    rows: dict[str, list[tuple[str, bool, int]]] = {"as_acquired": [], "thick_5mm": []}
    for voi in vois:
        for name, version in (("as_acquired", voi), ("thick_5mm", thicken(voi))):
            if version is None:
                continue
            found = voi_candidates(version)
            probability = models.nodule_probabilities(found.patches, found.features)
            accepted = _kept_by_segmentation(version, found, probability >= models.candidate_threshold)
            rows[name].append(
                (voi.record.patient_id, bool((accepted & found.inside).any()), int((accepted & found.outside).sum()))
            )
    out: dict[str, Any] = {}
    for name, items in rows.items():
        if not items:
            continue
        patients = [p for p, _, _ in items]
        hits = np.array([h for _, h, _ in items], dtype=np.float64)
        false = np.array([f for _, _, f in items], dtype=np.float64)
        out[name] = {
            "n": len(items),
            "sensitivity": patient_bootstrap(patients, _mean_of(hits)).as_dict(),
            "false_positives_per_crop": patient_bootstrap(patients, _mean_of(false)).as_dict(),
        }
    return out


def _kept_by_segmentation(voi: Voi, found: CandidateSet, accepted: np.ndarray) -> np.ndarray:
    """The ``accepted`` candidates the analyzer's segmentation keeps: a nodule is segmented there, shaped like one."""
    limits = shape_limits_at(voi.spacing[0])
    kept = accepted.copy()
    for index in np.flatnonzero(accepted):
        candidate = found.candidates[index]
        nodule = segment_nodule(voi.hu, voi.spacing, candidate.centre, radius_mm=candidate.radius_mm)
        kept[index] = (
            nodule is not None
            and is_nodule_like(nodule, limits)
            and has_nodule_proportions(measure_nodule(voi.hu, voi.spacing, nodule), limits)
        )
    return kept


def scan_detection(analyzer: Any, scans: Iterable[LabelledScan]) -> dict[str, Any]:
    """Whole CTs with a labelled lesion: was it reported, and how many other nodules (false positives) were.

    A reported nodule is the lesion when its centre lies in the label or at least 30 % of its voxels do. The report
    lists at most :data:`models.nodules.analyzer.MAX_REPORTED` nodules, so the false positives are also counted
    with that cap lifted: every nodule the detector accepts. ``analyzer`` is a
    :class:`models.nodules.analyzer.LungNoduleAnalyzer` (passed in: building one needs the shipped weights, which
    the training script writes).
    """
    out: dict[str, Any] = {}
    for scan in scans:
        # The network that never saw this scan (the shipped model averages two, each trained on one whole CT).
        detector = analyzer.held_out(scan.name)
        detector.check_input(scan.image)
        nodules = detector.find_nodules(scan.image)
        hits = [nodule for nodule in nodules if _is_lesion(nodule, scan.label)]
        accepted = detector.find_nodules(scan.image, limit=None)
        reference = axial_diameters(scan.label, (scan.image.spacing[1], scan.image.spacing[2]))
        lesion: dict[str, Any] = {"label_mean_diameter_mm": reference.mean_mm}
        if hits:
            best = hits[0]
            lesion.update(
                {
                    "reported_as": best.number,
                    "mean_diameter_mm": best.measures.mean_diameter_mm,
                    "nodule_type": best.measures.nodule_type,
                    "lung_rads": best.lung_rads.code,
                }
            )
        out[scan.name] = {
            "network": detector.models.description,
            "slice_thickness_mm": scan.image.spacing[0],
            "lesion_found": bool(hits),
            "nodules_reported": len(nodules),
            "false_positives": len(nodules) - len(hits),
            "nodules_accepted_uncapped": len(accepted),
            "false_positives_uncapped": sum(not _is_lesion(nodule, scan.label) for nodule in accepted),
            "lesion": lesion,
        }
    if out:
        per_scan = list(out.values())
        out["false_positives_per_scan"] = float(np.mean([v["false_positives"] for v in per_scan]))
        out["false_positives_per_scan_uncapped"] = float(np.mean([v["false_positives_uncapped"] for v in per_scan]))
    return out


def _is_lesion(nodule: Any, label: np.ndarray) -> bool:
    """Whether a reported nodule is the labelled lesion: its centre in the label, or 30 % of its voxels."""
    seg = nodule.segmentation
    inside = np.count_nonzero(label[seg.box()] & seg.mask)
    centre = tuple(round(v) for v in nodule.measures.centroid)
    return bool(label[centre] or inside >= 0.3 * np.count_nonzero(seg.mask))


def _mean_of(values: np.ndarray) -> Callable[[np.ndarray], float]:
    return lambda i: float(values[i].mean())


def assess_lidc(root: Path, models: NoduleModels) -> dict[str, Any]:
    """Every LIDC figure of the card (see the module docstring)."""
    measured_all: list[MeasuredVoi] = []
    test_vois: list[Voi] = []
    for voi in iter_vois(root):
        measured_all.append(measure_voi(voi, models.type_rule))
        if voi.record.split == "test":
            test_vois.append(voi)
    test = [m for m in measured_all if m.record.split == "test"]
    return {
        "dataset": str(root),
        "nodules": len(measured_all),
        "test_nodules": len(test),
        "test_patients": len({m.record.patient_id for m in test}),
        "size": size_agreement(measured_all),
        "type": type_agreement(test),
        "suspicion": suspicion_agreement(test, models),
        "detection_in_context": voi_detection(test_vois, models),
        "shape_limits": shape_limits(root),
    }


def card_figures(assessment: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The headline numbers as a card's ``validation.figures`` (metric -> value with its 95 % CI)."""
    figures: dict[str, dict[str, float]] = {}
    size = assessment.get("size", {})
    for group in ("solid", "subsolid"):
        block = size.get(group, {}).get("analyzer_vs_diameter_mm")
        if block:
            figures[f"size_bias_mm_{group}"] = block["bias_mm"]
            figures[f"size_loa_low_mm_{group}"] = block["loa_low_mm"]
            figures[f"size_loa_high_mm_{group}"] = block["loa_high_mm"]
            figures[f"size_within_1_5_mm_{group}"] = block["within_1_5_mm"]
    if "type" in assessment:
        figures["type_kappa"] = assessment["type"]["kappa"]
    if "suspicion" in assessment:
        figures["suspicion_auc"] = assessment["suspicion"]["auc"]
    for name, block in assessment.get("detection_in_context", {}).items():
        figures[f"detection_sensitivity_{name}"] = block["sensitivity"]
        figures[f"detection_false_positives_per_crop_{name}"] = block["false_positives_per_crop"]
    return {k: {key: float(v) for key, v in value.items()} for k, value in figures.items() if not _nan(value)}


def _nan(value: dict[str, float]) -> bool:
    return any(not math.isfinite(float(v)) for v in value.values())

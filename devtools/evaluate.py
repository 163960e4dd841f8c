"""The assessment harness: run an analyzer on a labelled dataset and print the figures clinicians ask for.

Every case goes through the analyzer's normal path, ``check_input`` then ``analyze``, exactly as in
production, so the figures describe what a clinician would see (the input guard included: refused cases are
counted and reported, not scored). The table gives, at the analyzer's operating threshold, recognition rate
(sensitivity), specificity, misdiagnosis rate (false-positive rate), missed-diagnosis rate (false-negative
rate), AUC, accuracy and calibration error, each with a seeded bootstrap 95% confidence interval
(:mod:`models.metrics`), plus the mean and 95th-percentile analysis time per study on this machine. The same
figures are written as JSON in the shape a model card's ``validation.figures`` takes.

Datasets:

* a MedMNIST-style ``.npz`` with ``<split>_images`` and ``<split>_labels``. Its 28x28 images are the
  benchmark's own, not clinical DICOM: each is enlarged to the smallest size the input guard accepts, in a way
  the analyzer's own reduction undoes (to within a grey level), and wrapped as an :class:`ImageInput` of the analyzer's
  modality (the output says so);
* a folder with ``labels.csv`` (columns ``file,label``): each ``file`` is a DICOM projection image, or a
  folder holding one DICOM series (a volume), read exactly as the pipeline reads them;
* a segmentation set in the Medical Segmentation Decathlon layout (``images/`` and ``labels/`` of NIfTI files),
  for analyzers that segment (``mr-hippocampus``): Dice per label against the expert labels and agreement of the
  volumes (Bland-Altman bias and 95% limits of agreement), with bootstrap CIs over subjects, on the split the
  model card names (``--split validation``).

Lesion analyzers (``ct-lung-nodules``) are assessed on lesion datasets instead (:func:`evaluate_lesions`):

* the LIDC-IDRI nodule volumes of interest (a folder with ``metadata.csv``, ``image/`` and ``nodule_mask/``):
  size agreement (Bland-Altman), type agreement (kappa), suspicion AUC and detection in context, exactly as the
  training script measured them for the card (:mod:`models.training.assess_nodules`);
* whole CTs with a labelled lesion (a folder of ``<name>_image.nrrd`` + ``<name>_label.nrrd``): whether each
  lesion was found and how many false positives each scan gave.

Live figures, when their stores exist: CDS Hooks feedback (accepted / overridden per analyzer, from
:mod:`cds.feedback`) and clinician review acceptance (from :func:`smart_launch.reviews.review_figures`).
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import ConfigurationError, UnsuitableInputError
from models import metrics
from models.base import Analyzer, ImageInput, filed_probability

BENCHMARK_MIN_SIDE = 64
"""Smallest side the projection input guard accepts (``models.cxr_pneumonia.MIN_SIDE_PIXELS``)."""

MEDMNIST_POSITIVE_LABEL = {"pneumoniamnist": 1, "breastmnist": 0}
"""Label value meaning "finding present" (MedMNIST v2 INFO: pneumonia = 1; BreastMNIST malignant = 0)."""

FIGURES = (
    ("sensitivity", "Recognition rate (sensitivity)", True),
    ("specificity", "Specificity", True),
    ("false_positive_rate", "Misdiagnosis rate (false-positive rate)", True),
    ("false_negative_rate", "Missed-diagnosis rate (false-negative rate)", True),
    ("auc", "AUC (area under the ROC curve)", False),
    ("accuracy", "Accuracy", True),
    ("expected_calibration_error", "Expected calibration error", False),
)
"""(key in models.metrics.assess_binary, label, shown as a percentage)."""


@dataclass(frozen=True)
class LabelledCase:
    """One case: the analyzer input, its label (1 = finding present) and a non-identifying case id."""

    case_id: str
    image: ImageInput
    label: int


@dataclass(frozen=True)
class LabelledDataset:
    """Cases to assess, described in words for the report (what they are, where they came from)."""

    name: str
    description: str
    size: int
    cases: Iterable[LabelledCase]


@dataclass
class Assessment:
    """Everything the harness measured; ``as_dict`` is the JSON written for the card."""

    analyzer: str
    version: str
    dataset: str
    dataset_description: str
    threshold: float
    score: str
    labels: np.ndarray
    scores: np.ndarray
    figures: dict[str, metrics.Estimate]
    seconds_per_study: np.ndarray
    refused: Counter[str] = field(default_factory=Counter)
    live: dict[str, Any] = field(default_factory=dict)
    bootstrap_samples: int = metrics.DEFAULT_BOOTSTRAP_SAMPLES
    seed: int = metrics.DEFAULT_SEED
    torch_threads: int | None = None

    @property
    def confusion(self) -> dict[str, int]:
        tp, fp, tn, fn = metrics.confusion_counts(self.labels, self.scores, self.threshold)
        return {"true_positive": tp, "false_positive": fp, "true_negative": tn, "false_negative": fn}

    def as_dict(self) -> dict[str, Any]:
        times = self.seconds_per_study
        return {
            "analyzer": {"name": self.analyzer, "version": self.version},
            "dataset": {"name": self.dataset, "description": self.dataset_description},
            "cases": {
                "scored": int(self.labels.size),
                "with_finding": int(self.labels.sum()),
                "without_finding": int(self.labels.size - self.labels.sum()),
                "refused_by_input_guard": int(sum(self.refused.values())),
                "refusal_reasons": dict(self.refused),
            },
            "operating_threshold": self.threshold,
            "score": self.score,
            "figures": {name: estimate.as_dict() for name, estimate in self.figures.items()},
            "confusion": self.confusion,
            "analysis_seconds_per_study": {
                "mean": float(times.mean()) if times.size else None,
                "p95": float(np.percentile(times, 95)) if times.size else None,
                "torch_threads": self.torch_threads,
                "note": "check_input + analyze on this machine, explanation images included",
            },
            "bootstrap": {"samples": self.bootstrap_samples, "seed": self.seed, "interval": "percentile 95%"},
            "live": self.live,
        }


# ---------------------------------------------------------------------------------------------------------------
# Datasets


def positive_label_for(path: Path) -> int:
    """The label that means "finding present" for a known MedMNIST file, else 1."""
    stem = path.name.lower()
    for prefix, label in MEDMNIST_POSITIVE_LABEL.items():
        if stem.startswith(prefix):
            return label
    return 1


@lru_cache(maxsize=8)
def _reduction_inverse(size: int, factor: int) -> np.ndarray:
    """Inverse of how the MedMNIST reduction by ``factor`` mixes neighbouring pixels along one axis.

    MedMNIST-style analyzers reduce their input with Pillow's anti-aliased bilinear filter
    (:func:`models.medmnist.reduce_like_medmnist`); on a ``factor``-times pixel-repeated image that is a fixed,
    well-conditioned linear mix of each pixel with its neighbours (1/9 from each side at 3x).
    """
    from PIL import Image

    blocks = np.repeat(np.eye(size, dtype=np.float32), factor, axis=1)
    mixing = np.stack(
        [np.asarray(Image.fromarray(row[None, :]).resize((size, 1), Image.Resampling.BILINEAR))[0] for row in blocks]
    )
    return np.asarray(np.linalg.inv(mixing.astype(np.float64)))


def benchmark_input(image: np.ndarray, analyzer: Analyzer) -> ImageInput:
    """Wrap one small 8-bit benchmark image as the analyzer's input, so that the analyzer sees (almost) its pixels.

    The input guard refuses images under 64 pixels a side, so the image is enlarged by an integer factor (pixel
    repetition), as presentation values 0..1 (grey level / 255). Square images are first pre-compensated for the
    neighbour mixing of the analyzer's own reduction, so that it returns the benchmark's grey levels: exactly for
    about 9 pixels in 10, within one grey level for all but a few in 1,000 (the analyzer rounds to 8 bits, and
    a pre-compensated value beyond black or white is clipped). Modality and body part are the first the analyzer
    lists; no view position is claimed, so a chest analyzer warns that it assumes a frontal view.
    """
    array = np.asarray(image, dtype=np.float64) / 255.0
    factor = max(1, math.ceil(BENCHMARK_MIN_SIDE / min(array.shape)))
    if factor > 1 and array.shape[0] == array.shape[1]:
        inverse = _reduction_inverse(array.shape[0], factor)
        array = np.clip(inverse.T @ array @ inverse, 0.0, 1.0)
    enlarged = np.repeat(np.repeat(array, factor, axis=0), factor, axis=1).astype(np.float32)
    requirements = analyzer.requirements
    modality = requirements.modalities[0]
    attributes = {"Modality": modality}
    if requirements.body_parts:
        attributes["BodyPartExamined"] = requirements.body_parts[0]
    return ImageInput(array=enlarged, spacing=(1.0, 1.0), modality=modality, attributes=attributes)


def load_npz(path: Path, split: str, analyzer: Analyzer, positive_label: int | None = None) -> LabelledDataset:
    """A MedMNIST-style split as labelled cases (images wrapped by :func:`benchmark_input`)."""
    if not path.is_file():
        raise ConfigurationError(f"Dataset {path} does not exist.", remedy="Give the path of an .npz or a folder.")
    with np.load(path) as data:
        keys = sorted(data.files)
        splits = sorted({k.rsplit("_", 1)[0] for k in keys if k.endswith(("_images", "_labels"))})
        if f"{split}_images" not in keys:
            raise ConfigurationError(
                f"Dataset {path.name} has no split {split!r} (no '{split}_images' array).",
                remedy=f"Choose one of its splits with --split: {', '.join(splits) or 'none found'}.",
            )
        if f"{split}_labels" not in keys:
            raise ConfigurationError(
                f"Dataset {path.name} has no labels for split {split!r} (no '{split}_labels' array; it holds "
                f"{', '.join(keys)}).",
                remedy="The assessment needs the true label of every case; use a labelled dataset.",
            )
        images = np.asarray(data[f"{split}_images"])
        raw_labels = np.asarray(data[f"{split}_labels"]).reshape(-1)
    if images.ndim == 4 and images.shape[-1] in (1, 3):  # MedMNIST colour sets: (N, H, W, C) -> luminance
        images = images.mean(axis=-1)
    if images.shape[0] != raw_labels.size:
        raise ConfigurationError(
            f"Dataset {path.name} split {split}: {images.shape[0]} images but {raw_labels.size} labels.",
            remedy="Repair the dataset file.",
        )
    positive = positive_label_for(path) if positive_label is None else positive_label
    labels = (raw_labels == positive).astype(np.int64)
    factor = max(1, math.ceil(BENCHMARK_MIN_SIDE / min(images.shape[1:3])))

    def cases() -> Iterator[LabelledCase]:
        for index in range(images.shape[0]):
            yield LabelledCase(f"{split}[{index}]", benchmark_input(images[index], analyzer), int(labels[index]))

    side = f"{images.shape[1]}x{images.shape[2]}"
    description = (
        f"{path.name}, split {split}: {images.shape[0]} of the benchmark's own {side} images (label {positive} = "
        f"finding), not clinical DICOM; each enlarged {factor}x to pass the input guard (pixel repetition, "
        f"pre-compensated so the analyzer's own reduction restores the benchmark pixels to within a grey level), "
        f"wrapped as modality "
        f"{analyzer.requirements.modalities[0]}"
    )
    return LabelledDataset(f"{path.name} ({split})", description, images.shape[0], cases())


def _read_case(path: Path) -> ImageInput:
    from pydicom import dcmread

    if path.is_dir():
        from dicom_io.volume import assemble_volume

        return assemble_volume(dcmread(p) for p in sorted(path.iterdir()) if p.is_file()).to_image_input()
    from dicom_io.projection import read_projection

    return read_projection(path)


def load_labels_csv(folder: Path, positive_label: int | None = None) -> LabelledDataset:
    """A folder of DICOM cases with ``labels.csv`` (``file,label``; label 1 = finding unless told otherwise)."""
    table = folder / "labels.csv"
    if not table.is_file():
        raise ConfigurationError(
            f"Dataset folder {folder} has no labels.csv.",
            remedy="Add labels.csv with the columns file,label (one row per case) to assess on DICOM files.",
        )
    with table.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"file", "label"} <= set(rows[0]):
        raise ConfigurationError(
            f"{table.name} in {folder.name} needs the columns file,label and at least one row.", remedy="Fix it."
        )
    positive = 1 if positive_label is None else positive_label
    for number, row in enumerate(rows, start=2):
        if not (folder / row["file"]).exists() or not row["label"].strip().lstrip("-").isdigit():
            raise ConfigurationError(
                f"{table.name} line {number}: file {row['file']!r} missing or label {row['label']!r} not an integer.",
                remedy="Every row needs an existing file and an integer label.",
            )

    def cases() -> Iterator[LabelledCase]:
        for row in rows:
            label = int(int(row["label"]) == positive)
            yield LabelledCase(row["file"], _read_case(folder / row["file"]), label)

    description = f"{folder.name}: {len(rows)} DICOM cases listed in labels.csv (label {positive} = finding)"
    return LabelledDataset(folder.name, description, len(rows), cases())


def load_dataset(path: Path, split: str, analyzer: Analyzer, positive_label: int | None = None) -> LabelledDataset:
    if path.is_dir():
        return load_labels_csv(path, positive_label)
    return load_npz(path, split, analyzer, positive_label)


# ---------------------------------------------------------------------------------------------------------------
# Assessment


def operating_threshold(analyzer: Analyzer) -> float | None:
    """The analyzer's own probability threshold (trained models expose ``threshold``); None for rule-based."""
    value = getattr(analyzer, "threshold", None)
    return float(value) if isinstance(value, int | float) else None


def assess(
    analyzer: Analyzer,
    dataset: LabelledDataset,
    *,
    samples: int = metrics.DEFAULT_BOOTSTRAP_SAMPLES,
    seed: int = metrics.DEFAULT_SEED,
    limit: int | None = None,
) -> Assessment:
    """Run every case through ``check_input`` + ``analyze`` and compute the assessment table.

    The score is the analyzer's probability as filed (0.1 %), at its operating threshold at that precision:
    the call the analyzer makes (:func:`models.base.at_or_above_threshold`). An analyzer without probabilities
    (a rule-based one) is scored by its category (abnormal = 1) at threshold 0.5, and its AUC is then that
    of a single operating point.
    """
    threshold = operating_threshold(analyzer)
    labels: list[int] = []
    scores: list[float] = []
    seconds: list[float] = []
    refused: Counter[str] = Counter()
    score_kind = "probability"
    for count, case in enumerate(dataset.cases):
        if limit is not None and count >= limit:
            break
        started = time.perf_counter()
        try:
            analyzer.check_input(case.image)
        except UnsuitableInputError as exc:
            refused[exc.message[:160]] += 1
            continue
        result = analyzer.analyze(case.image)
        seconds.append(time.perf_counter() - started)
        if result.probability is not None and threshold is not None:
            scores.append(filed_probability(result.probability))
        else:
            score_kind = "category (abnormal = 1)"
            scores.append(1.0 if result.category.abnormal else 0.0)
        labels.append(case.label)
    if not labels:
        raise _none_accepted(analyzer.name, dataset.size, dataset.name, refused)
    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(scores, dtype=np.float64)
    cut = filed_probability(threshold) if score_kind == "probability" and threshold is not None else 0.5
    return Assessment(
        analyzer=analyzer.name,
        version=analyzer.version,
        dataset=dataset.name,
        dataset_description=dataset.description,
        threshold=cut,
        score=score_kind,
        labels=y,
        scores=p,
        figures=metrics.assess_binary(y, p, cut, samples=samples, seed=seed),
        seconds_per_study=np.asarray(seconds),
        refused=refused,
        bootstrap_samples=samples,
        seed=seed,
    )


# ---------------------------------------------------------------------------------------------------------------
# Segmentation sets: Dice and volume agreement


@dataclass(frozen=True)
class SegmentationCase:
    """One crop with its expert labels (on the image's own array) and the subject it belongs to."""

    case_id: str
    subject: int
    image: ImageInput
    labels: np.ndarray


@dataclass(frozen=True)
class SegmentationDataset:
    name: str
    description: str
    size: int
    cases: Iterable[SegmentationCase]


SEGMENTATION_SPLITS = ("validation", "training", "all")


def is_segmentation_set(path: Path) -> bool:
    return path.is_dir() and (path / "images").is_dir() and (path / "labels").is_dir()


def nifti_image_input(array: np.ndarray, affine: np.ndarray, modality: str) -> ImageInput:
    """A NIfTI volume as an analyzer input: the array as stored, voxel sizes and the LPS direction of each axis.

    NIfTI affines map voxels to RAS; DICOM, and :attr:`ImageInput.direction`, use LPS (x and y change sign).
    """
    lps = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    axes = lps / spacing
    direction = tuple((float(axes[0, k]), float(axes[1, k]), float(axes[2, k])) for k in range(3))
    return ImageInput(
        array=np.asarray(array, dtype=np.float32),
        spacing=tuple(float(v) for v in spacing),
        modality=modality,
        attributes={"Modality": modality},
        direction=direction,
    )


def load_msd_hippocampus(folder: Path, split: str) -> SegmentationDataset:
    """The MSD Task04 hippocampus crops of one split, the subject split of the model's training script."""
    from models.training.train_hippocampus import labelled_case_ids, read_case, subject_of, subject_split

    if split not in SEGMENTATION_SPLITS:
        raise ConfigurationError(
            f"Segmentation set {folder.name} has no split {split!r}.",
            remedy=f"Choose one of: {', '.join(SEGMENTATION_SPLITS)} (validation: the model card's held-out subjects).",
        )
    case_ids = labelled_case_ids(folder)
    if not case_ids:
        raise ConfigurationError(
            f"Segmentation set {folder} holds no image with a label of the same name.",
            remedy="Give the folder that holds images/ and labels/ (NIfTI, MSD layout).",
        )
    validation = set(subject_split(case_ids))
    chosen = {
        "validation": [c for c in case_ids if c in validation],
        "training": [c for c in case_ids if c not in validation],
        "all": case_ids,
    }[split]

    def cases() -> Iterator[SegmentationCase]:
        for case_id in chosen:
            case = read_case(folder, case_id)
            yield SegmentationCase(
                str(case_id), subject_of(case_id), nifti_image_input(case.image, case.affine, "MR"), case.labels
            )

    subjects = len({subject_of(c) for c in chosen})
    description = (
        f"{folder.name}, split {split}: {len(chosen)} expert-labelled crops of {subjects} subjects "
        "(NIfTI, MSD layout; subjects as in the training script)"
    )
    return SegmentationDataset(f"{folder.name} ({split})", description, len(chosen), cases())


@dataclass
class SegmentationAssessment:
    """Dice and volume agreement of a segmenting analyzer; ``as_dict`` is the JSON written for the card."""

    analyzer: str
    version: str
    dataset: str
    dataset_description: str
    figures: dict[str, dict[str, float]]
    rows: list[dict[str, float]]
    seconds_per_study: np.ndarray
    refused: Counter[str] = field(default_factory=Counter)
    torch_threads: int | None = None

    def as_dict(self) -> dict[str, Any]:
        times = self.seconds_per_study
        return {
            "analyzer": {"name": self.analyzer, "version": self.version},
            "dataset": {"name": self.dataset, "description": self.dataset_description},
            "cases": {
                "scored": len(self.rows),
                "refused_by_input_guard": int(sum(self.refused.values())),
                "refusal_reasons": dict(self.refused),
            },
            "figures": self.figures,
            "per_case": self.rows,
            "analysis_seconds_per_study": {
                "mean": float(times.mean()) if times.size else None,
                "p95": float(np.percentile(times, 95)) if times.size else None,
                "torch_threads": self.torch_threads,
                "note": "check_input + segmentation + findings on this machine, key images included",
            },
            "bootstrap": {
                "samples": metrics.DEFAULT_BOOTSTRAP_SAMPLES,
                "seed": metrics.DEFAULT_SEED,
                "interval": "percentile 95%, resampling subjects",
            },
        }


def assess_segmentation(
    analyzer: Analyzer, dataset: SegmentationDataset, *, limit: int | None = None
) -> SegmentationAssessment:
    """Run every crop through ``check_input``, the analyzer's segmentation and its findings, as ``analyze`` does,
    and score the segmentation against the expert labels in the network's frame."""
    from models.hippocampus_net import case_figures, summarise_figures

    segment = getattr(analyzer, "segment", None)
    report = getattr(analyzer, "report", None)
    if segment is None or report is None:
        raise ConfigurationError(
            f"{analyzer.name} does not segment, and {dataset.name} is a segmentation set.",
            remedy="Assess it on a labelled classification set (an .npz or a folder with labels.csv).",
        )
    rows: list[dict[str, float]] = []
    subjects: list[int] = []
    seconds: list[float] = []
    refused: Counter[str] = Counter()
    for count, case in enumerate(dataset.cases):
        if limit is not None and count >= limit:
            break
        started = time.perf_counter()
        try:
            analyzer.check_input(case.image)
            segmentation = segment(case.image)
            report(case.image, segmentation)
        except UnsuitableInputError as exc:
            refused[exc.message[:160]] += 1
            continue
        seconds.append(time.perf_counter() - started)
        reference = segmentation.network_frame(case.labels)
        rows.append({"case": float(case.case_id), **case_figures(reference, segmentation.labels)})
        subjects.append(case.subject)
    if not rows:
        raise _none_accepted(analyzer.name, dataset.size, dataset.name, refused)
    return SegmentationAssessment(
        analyzer=analyzer.name,
        version=analyzer.version,
        dataset=dataset.name,
        dataset_description=dataset.description,
        figures=summarise_figures(rows, subjects),
        rows=rows,
        seconds_per_study=np.asarray(seconds),
        refused=refused,
    )


SEGMENTATION_FIGURES = (
    ("dice_anterior", "Dice, anterior hippocampus"),
    ("dice_posterior", "Dice, posterior hippocampus"),
    ("dice_mean", "Dice, mean of the two labels"),
    ("dice_whole", "Dice, whole hippocampus"),
    ("total_volume_ml_bias", "Total volume bias (model - expert), mL"),
    ("total_volume_ml_lower_limit_of_agreement", "  lower 95% limit of agreement, mL"),
    ("total_volume_ml_upper_limit_of_agreement", "  upper 95% limit of agreement, mL"),
    ("anterior_volume_ml_bias", "Anterior volume bias, mL"),
    ("posterior_volume_ml_bias", "Posterior volume bias, mL"),
)


def format_segmentation_table(assessment: SegmentationAssessment) -> str:
    data = assessment.as_dict()
    lines = [
        f"Assessment of {assessment.analyzer} {assessment.version}",
        f"Data: {assessment.dataset_description}.",
        f"Crops scored: {data['cases']['scored']}; refused by the input guard: "
        f"{data['cases']['refused_by_input_guard']}.",
    ]
    for reason, count in assessment.refused.most_common(3):
        lines.append(f"  refused {count}x: {reason}")
    lines += ["", f"{'Figure':<46}{'Value':>9}   95% confidence interval"]
    for key, label in SEGMENTATION_FIGURES:
        f = assessment.figures[key]
        lines.append(f"{label:<46}{f['value']:>9.3f}   {f['ci95_low']:.3f} to {f['ci95_high']:.3f}")
    timing = data["analysis_seconds_per_study"]
    if timing["mean"] is not None:
        lines.append(
            f"Analysis time per crop on this machine: mean {1000 * timing['mean']:.0f} ms, p95 "
            f"{1000 * timing['p95']:.0f} ms (input check, segmentation and findings, key images included"
            + (f"; torch threads {assessment.torch_threads}" if assessment.torch_threads else "")
            + ")."
        )
    lines.append("Intervals: percentile bootstrap over subjects (a subject's crops drawn together), 2000 resamples.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Live figures from clinical use


def feedback_figures(db_path: Path, analyzer: str) -> dict[str, Any]:
    """CDS Hooks feedback on this analyzer's cards (accepted / overridden), from the service's SQLite store."""
    if not db_path.is_file():
        raise ConfigurationError(
            f"Feedback database {db_path} does not exist.", remedy="Give the CDS service's feedback SQLite file."
        )
    from cds.feedback import FeedbackStore

    figures = FeedbackStore(db_path).analyzer_figures().get(analyzer)
    if figures is None or (figures.cards_issued == 0 and figures.responded == 0):
        return {}
    return {
        "cards_issued": figures.cards_issued,
        "accepted": figures.accepted,
        "overridden": figures.overridden,
        "acceptance_rate": figures.acceptance_rate,
        "override_rate": figures.override_rate,
        "override_reasons": dict(figures.override_reasons),
    }


def review_figures(db_path: Path, analyzer: str) -> dict[str, Any]:
    """Clinician review decisions on this analyzer's reports (SMART app review log); empty before any."""
    if not db_path.is_file():
        raise ConfigurationError(
            f"Review database {db_path} does not exist.", remedy="Give the SMART app's review SQLite file."
        )
    from smart_launch.reviews import review_figures as read_review_figures

    figures = read_review_figures(db_path).get(analyzer)
    if figures is None or figures.reviewed == 0:
        return {}
    return {
        "reviewed": figures.reviewed,
        "accepted": figures.accepted,
        "rejected": figures.rejected,
        "acceptance_rate": figures.acceptance_rate,
    }


def live_figures(analyzer: str, feedback_db: Path | None, review_db: Path | None) -> dict[str, Any]:
    live: dict[str, Any] = {}
    if feedback_db is not None:
        live["cds_feedback"] = feedback_figures(feedback_db, analyzer)
    if review_db is not None:
        live["clinician_review"] = review_figures(review_db, analyzer)
    return live


# ---------------------------------------------------------------------------------------------------------------
# Presentation


def _format(value: float, percent: bool) -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{100.0 * value:.1f} %" if percent else f"{value:.3f}"


def format_table(assessment: Assessment | SegmentationAssessment) -> str:
    """The plain-text assessment table (what ``imaging-cds evaluate`` prints)."""
    if isinstance(assessment, SegmentationAssessment):
        return format_segmentation_table(assessment)
    data = assessment.as_dict()
    cases = data["cases"]
    lines = [
        f"Assessment of {assessment.analyzer} {assessment.version}",
        f"Data: {assessment.dataset_description}.",
        f"Cases scored: {cases['scored']} ({cases['with_finding']} with the finding, "
        f"{cases['without_finding']} without); refused by the input guard: {cases['refused_by_input_guard']}.",
    ]
    for reason, count in assessment.refused.most_common(3):
        lines.append(f"  refused {count}x: {reason}")
    scored = "probability as filed (0.1 %)" if assessment.score == "probability" else assessment.score
    lines.append(f"Operating threshold: {assessment.threshold:.4f} on the {scored} (>= threshold = positive).")
    lines.append("")
    lines.append(f"{'Figure':<46}{'Value':>9}   95% confidence interval")
    for key, label, percent in FIGURES:
        estimate = assessment.figures[key]
        interval = f"{_format(estimate.ci_low, percent)} to {_format(estimate.ci_high, percent)}"
        lines.append(f"{label:<46}{_format(estimate.value, percent):>9}   {interval}")
    confusion = assessment.confusion
    lines.append(
        f"Counts: {confusion['true_positive']} true positive, {confusion['false_positive']} false positive, "
        f"{confusion['true_negative']} true negative, {confusion['false_negative']} false negative."
    )
    timing = data["analysis_seconds_per_study"]
    if timing["mean"] is not None:
        lines.append(
            f"Analysis time per study on this machine: mean {1000 * timing['mean']:.0f} ms, "
            f"p95 {1000 * timing['p95']:.0f} ms (input check + analysis, explanation images included"
            + (f"; torch threads {assessment.torch_threads}" if assessment.torch_threads else "")
            + ")."
        )
    lines.append(
        f"Intervals: percentile bootstrap, {assessment.bootstrap_samples} case resamples, seed {assessment.seed}."
    )
    lines.append("")
    lines.extend(format_live(assessment.live))
    return "\n".join(lines)


def format_live(live: Mapping[str, Any]) -> list[str]:
    if not any(live.values()):
        return ["Live figures: no live figures yet."]
    lines = ["Live figures from clinical use:"]
    feedback = live.get("cds_feedback")
    if feedback:
        rate = feedback["acceptance_rate"]
        shown = "n/a (no responses yet)" if rate is None else f"{100 * rate:.1f} %"
        lines.append(
            f"  CDS Hooks cards: {feedback['cards_issued']} issued, {feedback['accepted']} accepted, "
            f"{feedback['overridden']} overridden; acceptance {shown}."
        )
        for reason, count in sorted(feedback["override_reasons"].items()):
            lines.append(f"    override reason {reason}: {count}")
    review = live.get("clinician_review")
    if review:
        lines.append(
            f"  Clinician review (SMART app): {review['reviewed']} reports reviewed, {review['accepted']} accepted, "
            f"{review['rejected']} rejected; acceptance {100 * review['acceptance_rate']:.1f} %."
        )
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Lesion datasets


def is_lesion_dataset(path: Path) -> bool:
    """A LIDC volume-of-interest folder or a folder of labelled whole CTs (see the module docstring)."""
    from models.training.chest_scans import is_labelled_scan_folder

    lidc = (path / "metadata.csv").is_file() and (path / "nodule_mask").is_dir()
    return lidc or is_labelled_scan_folder(path)


@dataclass
class LesionAssessment:
    """What :func:`evaluate_lesions` measured; ``figures`` has the card's ``validation.figures`` shape."""

    analyzer: str
    version: str
    dataset: str
    details: dict[str, Any]
    figures: dict[str, dict[str, float]]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "analyzer": {"name": self.analyzer, "version": self.version},
            "dataset": self.dataset,
            "figures": self.figures,
            "details": self.details,
            "seconds": round(self.seconds, 1),
        }


def evaluate_lesions(
    analyzer_name: str, dataset_path: Path, *, json_out: Path | None = None, torch_threads: int | None = 1
) -> LesionAssessment:
    """Assess a lesion analyzer on a lesion dataset through the registry's analyzer (card and weights checked)."""
    from models.registry import get_analyzer
    from models.training import assess_nodules
    from models.training.chest_scans import is_labelled_scan_folder, read_labelled_scans

    analyzer = get_analyzer(analyzer_name)
    models = getattr(analyzer, "models", None)
    if models is None or not hasattr(analyzer, "find_nodules"):
        raise ConfigurationError(
            f"{analyzer_name} does not list lesions, so it cannot be assessed on {dataset_path.name}.",
            remedy="Assess ct-lung-nodules on lesion datasets; other analyzers on labelled cases (.npz, labels.csv).",
        )
    if torch_threads is not None:
        import torch

        torch.set_num_threads(torch_threads)
    started = time.perf_counter()
    if is_labelled_scan_folder(dataset_path):
        details = {"whole_ct_detection": assess_nodules.scan_detection(analyzer, read_labelled_scans(dataset_path))}
        figures: dict[str, dict[str, float]] = {}
    else:
        details = assess_nodules.assess_lidc(dataset_path, models)
        figures = assess_nodules.card_figures(details)
    assessment = LesionAssessment(
        analyzer.name, analyzer.version, str(dataset_path), details, figures, time.perf_counter() - started
    )
    if json_out is not None:
        json_out.write_text(json.dumps(assessment.as_dict(), indent=2) + "\n", encoding="utf-8")
    return assessment


def format_lesion_table(assessment: LesionAssessment) -> str:
    """The plain-text lesion assessment (what ``imaging-cds evaluate`` prints for a lesion dataset)."""
    lines = [f"Assessment of {assessment.analyzer} {assessment.version}", f"Data: {assessment.dataset}.", ""]
    details = assessment.details
    for name, scan in details.get("whole_ct_detection", {}).items():
        if isinstance(scan, dict):
            found = "found" if scan["lesion_found"] else "MISSED"
            lines.append(
                f"{name} ({scan['slice_thickness_mm']:g} mm slices): labelled lesion {found}; "
                f"{scan['nodules_reported']} nodules reported, {scan['false_positives']} false positives "
                f"({scan['false_positives_uncapped']} before the list's cap)."
            )
    whole_ct = details.get("whole_ct_detection", {})
    if "false_positives_per_scan" in whole_ct:
        lines.append(
            f"False positives per scan: {whole_ct['false_positives_per_scan']:.1f} reported, "
            f"{whole_ct['false_positives_per_scan_uncapped']:.1f} before the cap."
        )
    for key, figure in assessment.figures.items():
        lines.append(f"{key:<52}{figure['value']:>9.3f}   95% CI {figure['ci95_low']:.3f} to {figure['ci95_high']:.3f}")
    if "type" in details:
        lines.append("Type (rows: radiologists' texture rating, columns: analyzer):")
        for truth, row in details["type"]["confusion"].items():
            lines.append(f"  {truth:<14}" + "".join(f"{k}={v:<5}" for k, v in row.items()))
    if assessment.figures:
        lines.append("Intervals: percentile bootstrap over patients, 2000 resamples, seed 20231.")
    lines.append(f"Time: {assessment.seconds:.0f} s on this machine.")
    return "\n".join(lines)


def evaluate(
    analyzer_name: str,
    dataset_path: Path,
    *,
    split: str | None = None,
    positive_label: int | None = None,
    feedback_db: Path | None = None,
    review_db: Path | None = None,
    json_out: Path | None = None,
    limit: int | None = None,
    torch_threads: int | None = 1,
) -> Assessment | SegmentationAssessment:
    """Build the analyzer through the registry (card and weights checked), assess it, attach live figures.

    ``torch_threads`` (default 1) is set before the run when the analyzer uses torch: one study at a time
    with batch size 1 runs many times faster single-threaded on a small shared machine than with torch's
    default intra-op threads, and the timing is reported with the thread count used.
    """
    import sys

    from models.registry import get_analyzer

    analyzer = get_analyzer(analyzer_name)
    threads = None
    if "torch" in sys.modules:
        import torch

        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        threads = torch.get_num_threads()
    if is_segmentation_set(dataset_path):
        dataset_split = load_msd_hippocampus(dataset_path, split or "validation")
        segmentation = assess_segmentation(analyzer, dataset_split, limit=limit)
        segmentation.torch_threads = threads
        if json_out is not None:
            json_out.write_text(json.dumps(segmentation.as_dict(), indent=2) + "\n", encoding="utf-8")
        return segmentation
    dataset = load_dataset(dataset_path, split or "test", analyzer, positive_label)
    live = live_figures(analyzer.name, feedback_db, review_db)  # a wrong path fails before the long run
    assessment = assess(analyzer, dataset, limit=limit)
    assessment.live = live
    assessment.torch_threads = threads
    if json_out is not None:
        json_out.write_text(json.dumps(assessment.as_dict(), indent=2) + "\n", encoding="utf-8")
    return assessment


def _none_accepted(analyzer: str, size: int, dataset: str, refused: Counter[str]) -> ConfigurationError:
    """The error of an assessment in which the analyzer refused every case, with the reasons it gave."""
    reasons = f" (refused: {', '.join(refused)})" if refused else ""
    return ConfigurationError(
        f"{analyzer} accepted none of the {size} cases of {dataset}{reasons}.",
        remedy="Assess the analyzer on data of the kind its model card lists under inputs accepted.",
    )

"""Pneumonia on a frontal chest radiograph: a small CNN ensemble trained on PneumoniaMNIST, with Grad-CAM.

The model saw 28x28 paediatric radiographs (Guangzhou Women and Children's Medical Center, patients aged
1-5 years; Kermany et al., Cell 2018) and nothing else. Two consequences drive this module:

* the input guard refuses what the model was never shown (not CR/DX, not chest, a lateral view, an image
  whose statistics cannot be a radiograph) instead of returning a confident number; and
* every result carries a warning that adult radiographs, other hospitals and other equipment are out of
  distribution: the score can then be wrong in either direction, and the calibration (fitted on paediatric
  validation images) does not hold.

Preprocessing repeats how MedMNIST built the training images: centre crop on the short edge, anti-aliased
resize to 28x28, then per-image standardisation inside the network. The probability is the temperature-scaled
ensemble output with test-time translation averaging; the category uses the operating threshold chosen on
the validation split. Numbers for the card come from :mod:`models.training.train_medmnist`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from skimage.transform import resize

from imaging_cds.errors import UnsuitableInputError
from models import render
from models.base import AnalysisResult, Category, Explanation, ImageInput, Measurement, SeriesRequirements
from models.networks import ShippedClassifier, load_shipped_classifier

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
CARD_DIR = Path(__file__).resolve().parent / "cards"

MIN_SIDE_PIXELS = 64
"""A radiograph shorter than this on any side is a thumbnail or an icon, not a diagnostic image."""

MAX_ASPECT_RATIO = 1.6
"""Long side / short side. The centre crop used in training then keeps at least 62 % of the long side."""

MIN_RELATIVE_CONTRAST = 0.02
"""The 1st-99th percentile spread must exceed this fraction of the full intensity range (else: blank image)."""

MAX_SATURATED_FRACTION = 0.5
"""More than this share of pixels at the minimum or maximum value means a blank, burnt-out or masked image."""

_DISPLAY_MAX_SIDE = 512

PAEDIATRIC_WARNING = (
    "Trained only on 28x28 paediatric chest radiographs (age 1-5 years) from one hospital (Guangzhou Women "
    "and Children's Medical Center): on adult radiographs, other hospitals or other equipment the output is "
    "out of distribution - the probability is not calibrated there and can be wrong in either direction. "
    "At 28x28 pixels small or subtle opacities are invisible to the model; it never replaces reading the image."
)


@dataclass(frozen=True)
class ImageStatistics:
    """Plausibility figures of a projection image (computed on the presentation values)."""

    rows: int
    columns: int
    aspect_ratio: float
    relative_contrast: float
    saturated_fraction: float


def image_statistics(array: np.ndarray) -> ImageStatistics:
    """Size, aspect ratio, robust contrast and saturation of a 2-D image (subsampled for speed)."""
    rows, columns = array.shape
    step = max(1, max(rows, columns) // 512)
    sample = np.asarray(array[::step, ::step], dtype=np.float64)
    low, high = float(sample.min()), float(sample.max())
    span = high - low
    p1, p99 = np.percentile(sample, [1, 99])
    saturated = float(np.mean((sample <= low) | (sample >= high))) if span > 0 else 1.0
    return ImageStatistics(
        rows=rows,
        columns=columns,
        aspect_ratio=max(rows, columns) / max(1, min(rows, columns)),
        relative_contrast=float((p99 - p1) / span) if span > 0 else 0.0,
        saturated_fraction=saturated,
    )


def check_projection_image(image: ImageInput, analyzer: str) -> ImageStatistics:
    """Refuse arrays that cannot be the single 2-D image a MedMNIST-trained model expects."""
    if image.array.ndim != 2:
        raise UnsuitableInputError(
            f"{analyzer} needs one 2-D image; got an array of shape {image.array.shape}.",
            remedy="Send a single-frame projection image, not a volume or a multi-frame object.",
        )
    stats = image_statistics(image.array)
    if min(stats.rows, stats.columns) < MIN_SIDE_PIXELS:
        raise UnsuitableInputError(
            f"{analyzer}: the image is only {stats.rows}x{stats.columns} pixels; at least "
            f"{MIN_SIDE_PIXELS} on each side are needed for a diagnostic image.",
            remedy="Send the original image, not a thumbnail.",
        )
    if stats.aspect_ratio > MAX_ASPECT_RATIO:
        raise UnsuitableInputError(
            f"{analyzer}: aspect ratio {stats.aspect_ratio:.2f} is far from square (limit {MAX_ASPECT_RATIO}); "
            "the model was trained on centre-cropped square images and would miss the image's edges.",
            remedy="Send the full, uncropped image as acquired.",
        )
    if stats.relative_contrast < MIN_RELATIVE_CONTRAST or stats.saturated_fraction > MAX_SATURATED_FRACTION:
        raise UnsuitableInputError(
            f"{analyzer}: the image is nearly constant or saturated (contrast {stats.relative_contrast:.3f}, "
            f"{stats.saturated_fraction:.0%} of pixels at the extremes); it cannot show anatomy.",
            remedy="Check the exposure and the stored pixel data; send a diagnostic image.",
        )
    return stats


def matches(value: str | None, accepted: Iterable[str]) -> bool:
    return value is not None and value.strip().upper() in {a.upper() for a in accepted}


def display_gray(array: np.ndarray) -> tuple[np.ndarray, float]:
    """The radiograph as uint8 for display (1st-99th percentile window), at most 512 px; returns the scale."""
    scale = min(1.0, _DISPLAY_MAX_SIDE / max(array.shape))
    shape = (max(1, round(array.shape[0] * scale)), max(1, round(array.shape[1] * scale)))
    small = resize(np.asarray(array, dtype=np.float32), shape, order=1, anti_aliasing=scale < 1, preserve_range=True)
    p1, p99 = np.percentile(small, [1, 99])
    return render.window(small, (p1 + p99) / 2.0, max(float(p99 - p1), 1e-6)), scale


def gradcam_overlay_png(array: np.ndarray, cam28: np.ndarray, caption: str) -> bytes:
    """Grad-CAM (28x28) upsampled onto the centre square the model saw, over the original image, as PNG.

    Grad-CAM maps of a globally pooled CNN are positive almost everywhere, so only the upper half of the map
    (values above its median, rescaled to 0..1) is coloured; the caption says so. Outside the centre square
    the model saw nothing, so nothing is drawn there.
    """
    gray, _ = display_gray(array)
    rows, columns = gray.shape
    side = min(rows, columns)
    top, left = (rows - side) // 2, (columns - side) // 2
    median, peak = float(np.median(cam28)), float(cam28.max())
    emphasised = np.clip((cam28 - median) / (peak - median), 0.0, 1.0) if peak > median else np.zeros_like(cam28)
    values = np.zeros((rows, columns), dtype=np.float32)
    values[top : top + side, left : left + side] = resize(emphasised, (side, side), order=1, preserve_range=True)
    values[values < 0.05] = 0.0  # leave the lower half of the map uncoloured so the anatomy stays readable
    return render.to_png(render.label(render.heatmap(gray, values, alpha=0.5), caption, font_size=13))


class PneumoniaAnalyzer:
    """Frontal chest radiograph (CR/DX) -> probability of pneumonia, category and Grad-CAM key image."""

    name = "cxr-pneumonia"
    version = "1.0.0"
    title = "Chest radiograph pneumonia classifier (PneumoniaMNIST-trained CNN ensemble)"
    requirements = SeriesRequirements(
        modalities=("CR", "DX"),
        body_parts=("CHEST",),
        description_keywords=("CHEST", "THORAX", "PA", "AP", "FRONTAL"),
        excluded_description_keywords=("LAT", "LATERAL"),
    )
    card_path = CARD_DIR / "cxr-pneumonia.json"

    ACCEPTED_BODY_PARTS = ("CHEST", "THORAX", "LUNG")
    FRONTAL_VIEWS = ("PA", "AP")

    def __init__(self, weights: Path | None = None, expected_sha256: str | None = None) -> None:
        self.weights = weights or WEIGHTS_DIR / "pneumonia_cnn.pt"
        self._classifier: ShippedClassifier = load_shipped_classifier(self.weights, expected_sha256)
        self.model_sha256 = self._classifier.sha256

    @property
    def threshold(self) -> float:
        """Operating threshold on the calibrated probability (chosen on the validation split)."""
        return self._classifier.threshold

    def check_input(self, image: ImageInput) -> None:
        modality = image.modality.upper()
        if modality not in self.requirements.modalities:
            raise UnsuitableInputError(
                f"{self.name} reads chest radiographs (CR or DX); this image is modality {modality or 'unknown'}.",
                remedy="Choose a frontal chest radiograph series; CT, mammography and other modalities are not "
                "supported by this model.",
            )
        body_part = image.attributes.get("BodyPartExamined")
        if body_part and not matches(body_part, self.ACCEPTED_BODY_PARTS):
            raise UnsuitableInputError(
                f"{self.name} reads chest radiographs; this image's BodyPartExamined is {body_part.strip()}.",
                remedy="Choose the chest radiograph of the study.",
            )
        view = image.attributes.get("ViewPosition")
        if view and view.strip() and not matches(view, self.FRONTAL_VIEWS):
            raise UnsuitableInputError(
                f"{self.name} was trained on frontal (PA/AP) views; this image's ViewPosition is {view.strip()} "
                "(lateral, oblique or decubitus).",
                remedy="Choose the frontal (PA or AP) image of the study.",
            )
        check_projection_image(image, self.name)

    def analyze(self, image: ImageInput) -> AnalysisResult:
        small = self._classifier.prepare(image.array)
        probability = self._classifier.probability(small)
        suspected = probability >= self.threshold
        threshold_percent = 100.0 * self.threshold
        category = Category(
            code="pneumonia-suspected" if suspected else "no-pneumonia-suspected",
            display="Pneumonia suspected" if suspected else "No pneumonia suspected",
            rule=(
                f"Calibrated ensemble probability >= {threshold_percent:.1f} %, the operating threshold that "
                "maximised Youden's J on the PneumoniaMNIST validation split (model card cxr-pneumonia)"
            ),
            abnormal=suspected,
        )
        measurement = Measurement(
            key="pneumonia_probability",
            display="Model probability of pneumonia",
            value=round(100.0 * probability, 1),
            unit="%",
            interpretation="A" if suspected else "N",
            reference_high=round(threshold_percent, 1),
            note=(
                "Temperature-scaled on paediatric validation images; not a calibrated risk for adults or other "
                "hospitals. Reference high = the model's operating threshold."
            ),
        )
        cam = self._classifier.gradcam(small)
        caption = (
            f"Pneumonia score {100.0 * probability:.1f} % (threshold {threshold_percent:.1f} %).\n"
            "Grad-CAM, upper half of the map: yellow = most influence.\n"
            "The model saw only the centre square, at 28x28 pixels."
        )
        explanation = Explanation(
            title="Grad-CAM heatmap of the pneumonia score",
            kind="heatmap",
            png=gradcam_overlay_png(image.array, cam, caption),
        )
        warnings = [PAEDIATRIC_WARNING]
        if not image.attributes.get("ViewPosition"):
            warnings.append("ViewPosition is not recorded; the model assumes a frontal (PA/AP) view.")
        if not image.attributes.get("BodyPartExamined"):
            warnings.append("BodyPartExamined is not recorded; the model assumes a chest radiograph.")
        conclusion = (
            f"{category.display}: model probability {100.0 * probability:.1f} % (operating threshold "
            f"{threshold_percent:.1f} %). Screening aid from a paediatric-trained 28x28 model; confirm on the image."
        )
        return AnalysisResult(
            analyzer=self.name,
            version=self.version,
            measurements=(measurement,),
            category=category,
            conclusion=conclusion,
            explanations=(explanation,),
            probability=probability,
            warnings=tuple(warnings),
        )

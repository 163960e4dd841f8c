"""What the trained 2-D classifiers share: the input guard for projection images, Grad-CAM rendering, and the
step from a calibrated probability to a finding.

The classifiers (``cxr-pneumonia``, ``us-breast``) differ in what they accept and what they warn about; how a
probability becomes a category at the validation-chosen threshold, a Measurement in percent and a Grad-CAM key
image is the same for both and lives here once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from core.errors import UnsuitableInputError
from models import render
from models.base import (
    AnalysisResult,
    Category,
    Explanation,
    ImageInput,
    Measurement,
    at_or_above_threshold,
    highest_normal,
    probability_percent,
)
from models.medmnist import centre_square
from models.shipped import ShippedClassifier

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
CARD_DIR = Path(__file__).resolve().parent / "cards"

MIN_SIDE_PIXELS = 64
"""A radiograph shorter than this on any side is a thumbnail or an icon, not a diagnostic image."""

MAX_ASPECT_RATIO = 3.0
"""Long side / short side. MedMNIST centre-cropped sources of (384-2,916) x (127-2,713) pixels, the smallest
square being 127x127 (MedMNIST v2 INFO; ``on_medmnist_plus.md``): the training radiographs themselves reached
about 384/127 = 3.0 : 1. Beyond that the square the model sees holds less than a third of the image."""

CROP_WARNING_FRACTION = 0.05
"""Warn when the centre square leaves out more than this share of the long side on each end."""

MIN_RELATIVE_CONTRAST = 0.02
"""The 1st-99th percentile spread must exceed this fraction of the full intensity range (else: blank image)."""

MAX_SATURATED_FRACTION = 0.5
"""More than this share of pixels at the minimum or maximum value means a blank, burnt-out or masked image."""

_DISPLAY_MAX_SIDE = 512


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
            f"{analyzer}: aspect ratio {stats.aspect_ratio:.2f} is beyond that of any image the model was trained "
            f"on (up to {MAX_ASPECT_RATIO:.1f} : 1); the centre square it reads would hold less than a third of "
            "the image.",
            remedy="Send the full, uncropped image as acquired.",
        )
    if stats.relative_contrast < MIN_RELATIVE_CONTRAST or stats.saturated_fraction > MAX_SATURATED_FRACTION:
        raise UnsuitableInputError(
            f"{analyzer}: the image is nearly constant or saturated (contrast {stats.relative_contrast:.3f}, "
            f"{stats.saturated_fraction:.0%} of pixels at the extremes); it cannot show anatomy.",
            remedy="Check the exposure and the stored pixel data; send a diagnostic image.",
        )
    return stats


def crop_warning(image: ImageInput, lost_region: tuple[str, str]) -> str | None:
    """A warning when the centre square the model reads leaves out a sizeable strip at each end of the long side.

    ``lost_region`` names, for a (tall, wide) image, what the two strips may hold, e.g. lung apices and bases.
    """
    rows, columns = image.array.shape[:2]
    _, _, side = centre_square(rows, columns)
    long_side = max(rows, columns)
    strip = (long_side - side) / 2.0 / long_side
    if strip <= CROP_WARNING_FRACTION:
        return None
    ends, region = ("top and bottom", lost_region[0]) if rows > columns else ("left and right", lost_region[1])
    return (
        f"The model reads only the centre square of this {rows}x{columns} image: the {ends} strips ({strip:.0%} of "
        f"the image's {'height' if rows > columns else 'width'} each) were not seen, and {region} may lie there."
    )


def check_resemblance(
    classifier: ShippedClassifier, image: ImageInput, analyzer: str, *, trained_on: str, remedy: str
) -> None:
    """Refuse an image the network itself places far from everything it was trained on.

    The distance is the Mahalanobis distance in the networks' feature space (:class:`models.networks.
    FeatureReference`, Lee et al. 2018); the limit is the distance that 99.5 % of the validation images stay
    within. A different body part, an inverted (negative) image or a picture that is not a radiograph lands
    far beyond it; a real radiograph of the trained kind stays inside.
    """
    reference = classifier.feature_reference
    if reference is None:
        return
    distance = classifier.feature_distance(classifier.prepare(image.array))
    if distance is not None and distance > reference.limit:
        raise UnsuitableInputError(
            f"{analyzer}: the image does not resemble {trained_on}: its distance from them in the model's feature "
            f"space is {distance:.1f}, beyond the {reference.limit:.1f} that {reference.limit_percentile:g} % of "
            "the validation images stay within (a different body part or view, an inverted image, or not a "
            "radiograph). The model's output would be meaningless.",
            remedy=remedy,
        )


def matches(value: str | None, accepted: Iterable[str]) -> bool:
    return value is not None and value.strip().upper() in {a.upper() for a in accepted}


def display_gray(array: np.ndarray) -> tuple[np.ndarray, float]:
    """The radiograph as uint8 for display (1st-99th percentile window), at most 512 px; returns the scale."""
    scale = min(1.0, _DISPLAY_MAX_SIDE / max(array.shape))
    shape = (max(1, round(array.shape[0] * scale)), max(1, round(array.shape[1] * scale)))
    small = _resize(np.asarray(array, dtype=np.float32), shape)
    p1, p99 = np.percentile(small, [1, 99])
    return render.window(small, (p1 + p99) / 2.0, max(float(p99 - p1), 1e-6)), scale


def _resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float32 image (anti-aliased when shrinking: Pillow's filter widens with the factor)."""
    resized = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32)).resize(
        (shape[1], shape[0]), Image.Resampling.BILINEAR
    )
    return np.asarray(resized, dtype=np.float32)


def gradcam_overlay_png(array: np.ndarray, cam28: np.ndarray, caption: str) -> bytes:
    """Grad-CAM (28x28) upsampled onto the centre square the model saw, over the original image, as PNG.

    Grad-CAM maps of a globally pooled CNN are positive almost everywhere, so only the upper half of the map
    (values above its median, rescaled to 0..1) is coloured; the caption says so. Outside the centre square
    the model saw nothing, so nothing is drawn there.
    """
    gray, _ = display_gray(array)
    top, left, side = centre_square(*gray.shape)
    rows, columns = gray.shape
    median, peak = float(np.median(cam28)), float(cam28.max())
    emphasised = np.clip((cam28 - median) / (peak - median), 0.0, 1.0) if peak > median else np.zeros_like(cam28)
    values = np.zeros((rows, columns), dtype=np.float32)
    values[top : top + side, left : left + side] = _resize(emphasised.astype(np.float32), (side, side))
    values[values < 0.05] = 0.0  # leave the lower half of the map uncoloured so the anatomy stays readable
    return render.to_png(render.label(render.heatmap(gray, values, alpha=0.5), caption, font_size=13))


@dataclass(frozen=True)
class FindingSpec:
    """How one classifier names its finding: the measurement, the two categories, the wording of the result."""

    finding: str  # "pneumonia", "malignancy"
    measurement_key: str
    positive: tuple[str, str]  # (category code, display) at or above the threshold
    negative: tuple[str, str]
    validation_split: str  # where the threshold and the temperature were fitted, e.g. "PneumoniaMNIST validation"
    card: str
    calibration_note: str
    caveat: str  # appended to the conclusion: what the result is and is not


def classify(
    classifier: ShippedClassifier,
    image: ImageInput,
    spec: FindingSpec,
    *,
    analyzer: str,
    version: str,
    warnings: tuple[str, ...],
) -> AnalysisResult:
    """Probability -> category at the operating threshold, the probability as a Measurement, Grad-CAM key image."""
    small = classifier.prepare(image.array)
    probability = classifier.probability(small)
    percent, threshold_percent = probability_percent(probability), probability_percent(classifier.threshold)
    suspected = at_or_above_threshold(probability, classifier.threshold)  # on the values as filed and read
    code, display = spec.positive if suspected else spec.negative
    category = Category(
        code=code,
        display=display,
        rule=(
            f"Calibrated ensemble probability >= {threshold_percent:.1f} %, the operating threshold that "
            f"maximised Youden's J on the {spec.validation_split} split (model card {spec.card})"
        ),
        abnormal=suspected,
    )
    measurement = Measurement(
        key=spec.measurement_key,
        display=f"Model probability of {spec.finding}",
        value=percent,
        unit="%",
        interpretation="A" if suspected else "N",
        reference_high=highest_normal(threshold_percent, 1),  # the last value called negative
        note=spec.calibration_note,
    )
    caption = (
        f"{spec.finding.capitalize()} score {percent:.1f} % (threshold {threshold_percent:.1f} %).\n"
        "Grad-CAM, upper half of the map: yellow = most influence.\n"
        "The model saw only the centre square, at 28x28 pixels."
    )
    explanation = Explanation(
        title=f"Grad-CAM heatmap of the {spec.finding} score",
        kind="heatmap",
        png=gradcam_overlay_png(image.array, classifier.gradcam(small), caption),
    )
    return AnalysisResult(
        analyzer=analyzer,
        version=version,
        measurements=(measurement,),
        category=category,
        conclusion=(
            f"{display}: model probability {percent:.1f} % (operating threshold "
            f"{threshold_percent:.1f} %). {spec.caveat}"
        ),
        explanations=(explanation,),
        probability=probability,
        warnings=warnings,
    )

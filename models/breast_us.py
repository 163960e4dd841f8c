"""Malignancy on a breast ultrasound image: a small CNN ensemble trained on BreastMNIST, with Grad-CAM.

BreastMNIST (MedMNIST v2) is the Breast Ultrasound Images dataset (Al-Dhabyani et al., Data in Brief 2020):
780 B-mode images of women aged 25-75 from one hospital in Cairo, resized to 28x28, labelled malignant vs
normal/benign (MedMNIST label 0 = malignant, 1 = normal or benign; this module's finding is *malignant*).
With 546 training images at 28x28 the model is a research-grade screening aid at best: the card states its
test figures and wide confidence intervals, and every result warns about the distribution it came from.
"""

from __future__ import annotations

from pathlib import Path

from core.errors import UnsuitableInputError
from models.base import AnalysisResult, ImageInput, SeriesRequirements
from models.projection_classifier import (
    CARD_DIR,
    WEIGHTS_DIR,
    FindingSpec,
    check_projection_image,
    classify,
    matches,
)
from models.shipped import ShippedClassifier, load_shipped_classifier

BREAST_US_WARNING = (
    "Trained only on 546 breast ultrasound images (28x28) from one hospital (Baheya Hospital, Cairo; women "
    "aged 25-75): on other scanners, presets or populations the output is out of distribution and its "
    "probability is not calibrated. At 28x28 pixels lesion margins and echo texture - the BI-RADS features - "
    "are largely lost. The model does not assign a BI-RADS category and never replaces reading the image."
)


MALIGNANCY = FindingSpec(
    finding="malignancy",
    measurement_key="malignancy_probability",
    positive=("malignancy-suspected", "Malignancy suspected"),
    negative=("malignancy-not-suspected", "Malignancy not suspected"),
    validation_split="BreastMNIST validation",
    card="us-breast",
    calibration_note=(
        "Temperature-scaled on the BreastMNIST validation split (78 images); not a calibrated clinical risk."
    ),
    caveat="Research-grade aid from a 28x28 model; confirm with BI-RADS reading.",
)


class BreastUltrasoundAnalyzer:
    """B-mode breast ultrasound image -> probability that the lesion is malignant, category, Grad-CAM."""

    name = "us-breast"
    version = "1.0.2"
    title = "Breast ultrasound malignancy classifier (BreastMNIST-trained CNN ensemble)"
    requirements = SeriesRequirements(modalities=("US",), body_parts=("BREAST",), description_keywords=("BREAST",))
    card_path = CARD_DIR / "us-breast.json"

    ACCEPTED_BODY_PARTS = ("BREAST",)

    def __init__(self, weights: Path | None = None, expected_sha256: str | None = None) -> None:
        self.weights = weights or WEIGHTS_DIR / "breast_cnn.pt"
        self._classifier: ShippedClassifier = load_shipped_classifier(self.weights, expected_sha256)
        self.model_sha256 = self._classifier.sha256

    @property
    def threshold(self) -> float:
        return self._classifier.threshold

    def check_input(self, image: ImageInput) -> None:
        modality = image.modality.upper()
        if modality != "US":
            raise UnsuitableInputError(
                f"{self.name} reads breast ultrasound (US); this image is modality {modality or 'unknown'}.",
                remedy="Choose a B-mode breast ultrasound image; mammograms (MG) and other modalities are not "
                "supported by this model.",
            )
        body_part = image.attributes.get("BodyPartExamined")
        if body_part and not matches(body_part, self.ACCEPTED_BODY_PARTS):
            raise UnsuitableInputError(
                f"{self.name} reads breast ultrasound; this image's BodyPartExamined is {body_part.strip()}.",
                remedy="Choose the breast ultrasound image of the study.",
            )
        check_projection_image(image, self.name)

    def analyze(self, image: ImageInput) -> AnalysisResult:
        warnings = [BREAST_US_WARNING]
        if not image.attributes.get("BodyPartExamined"):
            warnings.append("BodyPartExamined is not recorded; the model assumes a breast ultrasound image.")
        return classify(
            self._classifier, image, MALIGNANCY, analyzer=self.name, version=self.version, warnings=tuple(warnings)
        )

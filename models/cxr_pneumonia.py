"""Pneumonia on a frontal chest radiograph: a small CNN ensemble trained on PneumoniaMNIST, with Grad-CAM.

The model saw 28x28 paediatric radiographs (Guangzhou Women and Children's Medical Center, patients aged
1-5 years; Kermany et al., Cell 2018) and nothing else. Two consequences drive this module:

* the input guard refuses what the model was never shown (not CR/DX, not chest, a lateral view, an image
  whose statistics cannot be a radiograph, an image the network itself places far from all its training
  images) instead of returning a confident number, and accepts every shape the training radiographs had; and
* every result carries a warning that adult radiographs, other hospitals and other equipment are out of
  distribution: the score can then be wrong in either direction, and the calibration (fitted on paediatric
  validation images) does not hold.

Preprocessing is the MedMNIST recipe itself (:mod:`models.medmnist`): the 8-bit display image, its centre
square on the short edge, Pillow's anti-aliased bilinear reduction to 28x28; the network standardises each image.
The probability is the temperature-scaled ensemble output (with test-time translation averaging when it helped
on validation); the category uses the operating threshold chosen on the validation split. Numbers for the card
come from :mod:`models.training.train_medmnist`.
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
    check_resemblance,
    classify,
    crop_warning,
    matches,
)
from models.shipped import ShippedClassifier, load_shipped_classifier

PAEDIATRIC_WARNING = (
    "Trained only on 28x28 paediatric chest radiographs (age 1-5 years) from one hospital (Guangzhou Women "
    "and Children's Medical Center): on adult radiographs, other hospitals or other equipment the output is "
    "out of distribution - the probability is not calibrated there and can be wrong in either direction. "
    "At 28x28 pixels small or subtle opacities are invisible to the model; it never replaces reading the image."
)


PNEUMONIA = FindingSpec(
    finding="pneumonia",
    measurement_key="pneumonia_probability",
    positive=("pneumonia-suspected", "Pneumonia suspected"),
    negative=("no-pneumonia-suspected", "No pneumonia suspected"),
    validation_split="PneumoniaMNIST validation",
    card="cxr-pneumonia",
    calibration_note=(
        "Temperature-scaled on paediatric validation images; not a calibrated risk for adults or other "
        "hospitals. Reference high = the highest probability called negative, one 0.1 % step below the model's "
        "operating threshold."
    ),
    caveat="Screening aid from a paediatric-trained 28x28 model; confirm on the image.",
)


class PneumoniaAnalyzer:
    """Frontal chest radiograph (CR/DX) -> probability of pneumonia, category and Grad-CAM key image."""

    name = "cxr-pneumonia"
    version = "1.1.0"
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
        check_resemblance(
            self._classifier,
            image,
            self.name,
            trained_on="the paediatric frontal chest radiographs it was trained on",
            remedy="Check that this is the frontal chest radiograph, shown with the lungs dark (not inverted); "
            "otherwise choose another series.",
        )

    def analyze(self, image: ImageInput) -> AnalysisResult:
        warnings = [PAEDIATRIC_WARNING]
        cropped = crop_warning(image, ("the lung apices or costophrenic angles", "the lateral parts of the lungs"))
        if cropped:
            warnings.append(cropped)
        if not image.attributes.get("ViewPosition"):
            warnings.append("ViewPosition is not recorded; the model assumes a frontal (PA/AP) view.")
        if not image.attributes.get("BodyPartExamined"):
            warnings.append("BodyPartExamined is not recorded; the model assumes a chest radiograph.")
        return classify(
            self._classifier, image, PNEUMONIA, analyzer=self.name, version=self.version, warnings=tuple(warnings)
        )

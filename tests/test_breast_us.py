"""The breast ultrasound malignancy model: pinned weights, card figures, DICOM US in, refusals of other images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, UltrasoundImageStorage, generate_uid
from skimage.transform import resize

from core.errors import ConfigurationError, UnsuitableInputError
from dicom_io.projection import read_projection
from models import metrics
from models.base import Analyzer, at_or_above_threshold, filed_probabilities, filed_probability
from models.breast_us import BreastUltrasoundAnalyzer
from models.projection_classifier import WEIGHTS_DIR
from models.registry import get_analyzer
from models.shipped import load_shipped_classifier
from models.weights_io import sha256_of_file

WEIGHTS = WEIGHTS_DIR / "breast_cnn.pt"
CARD = Path(__file__).resolve().parents[1] / "models" / "cards" / "us-breast.json"


@pytest.fixture(scope="module")
def analyzer() -> BreastUltrasoundAnalyzer:
    return BreastUltrasoundAnalyzer()


@pytest.fixture(scope="module")
def test_split(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """BreastMNIST test images in [0, 1] and labels with 1 = malignant (MedMNIST stores 0 = malignant)."""
    with np.load(data_dir / "medmnist" / "breastmnist_28.npz") as data:
        images = data["test_images"].astype(np.float32) / 255.0
        malignant = (data["test_labels"].reshape(-1) == 0).astype(int)
    return images, malignant


def ultrasound_dicom(image28: np.ndarray, out: Path) -> Path:
    """A BreastMNIST image brought back to 280x280 and stored as a DICOM US image (8-bit MONOCHROME2)."""
    pixels = (resize(image28, (280, 280), order=1) * 255).round().astype(np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = UltrasoundImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined = "US", "BREAST"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(out, enforce_file_format=True)
    return out


def test_analyzer_is_registered_with_pinned_weights() -> None:
    analyzer = get_analyzer("us-breast")
    assert isinstance(analyzer, Analyzer) and isinstance(analyzer, BreastUltrasoundAnalyzer)
    card = json.loads(CARD.read_text())
    assert analyzer.model_sha256 == sha256_of_file(WEIGHTS) == card["weights"]["sha256"]
    assert WEIGHTS.stat().st_size < 5_000_000


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    copy = tmp_path / "breast_cnn.pt"
    shutil.copy(WEIGHTS, copy)
    copy.with_name("breast_cnn.pt.sha256").write_text("0" * 64 + "  breast_cnn.pt\n")
    with pytest.raises(
        ConfigurationError, match=f"breast_cnn.pt failed its integrity check: expected SHA-256 {'0' * 64}"
    ):
        BreastUltrasoundAnalyzer(weights=copy)


def test_test_split_figures_recomputed_from_the_weights_match_the_card(
    test_split: tuple[np.ndarray, np.ndarray],
) -> None:
    images, malignant = test_split
    assert images.shape == (156, 28, 28) and malignant.sum() == 42
    card = json.loads(CARD.read_text())
    figures, threshold = card["validation"]["figures"], filed_probability(card["validation"]["operating_threshold"])
    probability = filed_probabilities(load_shipped_classifier(WEIGHTS).probabilities(images))  # as the EHR holds
    assert metrics.roc_auc(malignant, probability) == pytest.approx(figures["auc"]["value"], abs=1e-6)
    assert metrics.accuracy(malignant, probability, threshold) == pytest.approx(figures["accuracy"]["value"], abs=1e-6)
    assert metrics.sensitivity(malignant, probability, threshold) == pytest.approx(
        figures["sensitivity"]["value"], abs=1e-6
    )
    assert figures["auc"]["value"] >= 0.85


def test_ultrasound_dicom_reproduces_the_28x28_result(
    analyzer: BreastUltrasoundAnalyzer, test_split: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    images = test_split[0]
    classifier = load_shipped_classifier(WEIGHTS)
    direct = classifier.probabilities(images)
    # the test case the model is surest is malignant, and the one it is surest is not
    for index in (int(np.argmax(direct)), int(np.argmin(direct))):
        image = read_projection(ultrasound_dicom(images[index], tmp_path / f"case{index}.dcm"))
        analyzer.check_input(image)
        result = analyzer.analyze(image)
        assert result.probability == pytest.approx(float(direct[index]), abs=0.1)
        assert result.category.abnormal == at_or_above_threshold(float(direct[index]), analyzer.threshold)
        assert result.measurement("malignancy_probability").unit == "%"
        assert any("Cairo" in w for w in result.warnings)
        assert result.explanations[0].png.startswith(b"\x89PNG")


def test_mammogram_and_chest_radiograph_are_refused(analyzer: BreastUltrasoundAnalyzer, data_dir: Path) -> None:
    with pytest.raises(UnsuitableInputError, match=r"reads breast ultrasound .*modality MG"):
        analyzer.check_input(read_projection(data_dir / "mg" / "P_00173_LEFT_CC_benign_mass_case.dcm"))
    with pytest.raises(UnsuitableInputError, match="modality CR"):
        analyzer.check_input(read_projection(data_dir / "cr" / "rsna_pneumonia" / "rsna_cxr_unlabelled.dcm"))

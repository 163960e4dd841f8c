"""The chest radiograph pneumonia model: pinned weights, card figures, real DICOM in, refusals of the wrong images."""

from __future__ import annotations

import copy
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from core.errors import ConfigurationError, UnsuitableInputError
from dicom_io.projection import projection_input, read_projection
from models import metrics
from models.base import Analyzer, ImageInput, at_or_above_threshold, filed_probabilities, filed_probability
from models.cxr_pneumonia import PneumoniaAnalyzer
from models.projection_classifier import WEIGHTS_DIR
from models.registry import get_analyzer
from models.shipped import load_shipped_classifier
from models.weights_io import sha256_of_file

WEIGHTS = WEIGHTS_DIR / "pneumonia_cnn.pt"
CARD = Path(__file__).resolve().parents[1] / "models" / "cards" / "cxr-pneumonia.json"


@pytest.fixture(scope="module")
def analyzer() -> PneumoniaAnalyzer:
    return PneumoniaAnalyzer()


@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads(CARD.read_text())


def analyse(analyzer: PneumoniaAnalyzer, image: ImageInput) -> float:
    analyzer.check_input(image)
    result = analyzer.analyze(image)
    assert result.probability is not None
    return result.probability


def rg1(syntax: str) -> ImageInput:
    path = get_testdata_file(f"RG1_{syntax}.dcm")
    assert path is not None
    return read_projection(path)


def secondary_capture_from_png(png: Path, out: Path) -> Path:
    """Wrap a chest X-ray PNG (NIH ChestX-ray14) as a DICOM Secondary Capture, as a scanning workstation does."""
    pixels = np.asarray(Image.open(png).convert("L"))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.ConversionType, ds.BodyPartExamined, ds.ViewPosition = "DX", "WSD", "CHEST", "PA"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.fixture(scope="module")
def nih_secondary_captures(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> list[Path]:
    folder = tmp_path_factory.mktemp("nih_sc")
    pngs = sorted((data_dir / "cr" / "nih_cxr14").glob("*.png"))
    return [secondary_capture_from_png(p, folder / f"{p.stem}.dcm") for p in pngs]


# --- weights and card ---------------------------------------------------------------------------------------------


def test_analyzer_is_registered_and_reports_its_pinned_weights(card: dict) -> None:
    analyzer = get_analyzer("cxr-pneumonia")
    assert isinstance(analyzer, Analyzer) and isinstance(analyzer, PneumoniaAnalyzer)
    pinned = (WEIGHTS.parent / "pneumonia_cnn.pt.sha256").read_text().split()[0]
    assert analyzer.model_sha256 == pinned == sha256_of_file(WEIGHTS) == card["weights"]["sha256"]
    assert WEIGHTS.stat().st_size < 5_000_000  # small enough to live in the repository


def test_tampered_weights_are_refused_with_both_hashes(tmp_path: Path) -> None:
    copy = tmp_path / "pneumonia_cnn.pt"
    shutil.copy(WEIGHTS, copy)
    shutil.copy(WEIGHTS.parent / "pneumonia_cnn.pt.sha256", tmp_path / "pneumonia_cnn.pt.sha256")
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    pinned = (tmp_path / "pneumonia_cnn.pt.sha256").read_text().split()[0]
    with pytest.raises(
        ConfigurationError,
        match=rf"pneumonia_cnn.pt failed its integrity check: expected SHA-256 {pinned}, got [0-9a-f]{{64}}",
    ):
        PneumoniaAnalyzer(weights=copy)


def test_weights_without_a_recorded_hash_are_refused(tmp_path: Path) -> None:
    copy = tmp_path / "pneumonia_cnn.pt"
    shutil.copy(WEIGHTS, copy)
    with pytest.raises(ConfigurationError, match="no recorded SHA-256"):
        PneumoniaAnalyzer(weights=copy)


def test_test_split_figures_recomputed_from_the_weights_match_the_card(card: dict, data_dir: Path) -> None:
    with np.load(data_dir / "medmnist" / "pneumoniamnist_28_reconstructed.npz") as data:
        images = data["test_images"].astype(np.float32) / 255.0
        labels = data["test_labels"].reshape(-1)  # 1 = pneumonia
    assert images.shape == (624, 28, 28)
    classifier = load_shipped_classifier(WEIGHTS)
    figures = card["validation"]["figures"]
    assert card["validation"]["operating_threshold"] == pytest.approx(classifier.threshold, abs=1e-12)
    # The figures describe the analyzer's calls: probabilities as filed, against the threshold as filed.
    probability = filed_probabilities(classifier.probabilities(images))
    threshold = filed_probability(classifier.threshold)
    assert metrics.roc_auc(labels, probability) == pytest.approx(figures["auc"]["value"], abs=1e-6)
    assert metrics.accuracy(labels, probability, threshold) == pytest.approx(figures["accuracy"]["value"], abs=1e-6)
    assert metrics.sensitivity(labels, probability, threshold) == pytest.approx(
        figures["sensitivity"]["value"], abs=1e-6
    )
    assert metrics.specificity(labels, probability, threshold) == pytest.approx(
        figures["specificity"]["value"], abs=1e-6
    )
    ece = metrics.expected_calibration_error(labels, probability)
    assert ece == pytest.approx(figures["expected_calibration_error"]["value"], abs=1e-6)
    # the card's claims a clinician will read first
    assert figures["auc"]["ci95_low"] <= figures["auc"]["value"] <= figures["auc"]["ci95_high"]
    assert figures["auc"]["value"] >= 0.97


@pytest.mark.parametrize(("probability", "filed", "suspected"), [(0.6046, 60.5, True), (0.6044, 60.4, False)])
def test_the_call_is_made_on_the_probability_as_filed_and_read(
    analyzer: PneumoniaAnalyzer, monkeypatch: pytest.MonkeyPatch, probability: float, filed: float, suspected: bool
) -> None:
    """0.6046 is below the fitted threshold 0.60531 but is filed and read as 60.5 %, the threshold as filed.

    A report saying "60.5 % (operating threshold 60.5 %)" must then say suspected, with A, and the normal range
    must end below it (FHIR's referenceRange.high is inclusive).
    """
    monkeypatch.setattr(analyzer._classifier, "threshold", 0.60531)
    monkeypatch.setattr(analyzer._classifier, "probability", lambda prepared: probability)
    result = analyzer.analyze(rg1("UNCR"))
    value = result.measurement("pneumonia_probability")
    assert (value.value, value.reference_high) == (filed, 60.4)
    assert value.interpretation == ("A" if suspected else "N") and result.category.abnormal is suspected
    assert result.category.code == ("pneumonia-suspected" if suspected else "no-pneumonia-suspected")
    assert f"model probability {filed:.1f} % (operating threshold 60.5 %)" in result.conclusion
    assert "Calibrated ensemble probability >= 60.5 %" in result.category.rule


# --- real DICOM in --------------------------------------------------------------------------------------------------


def test_rg1_in_each_transfer_syntax_is_analysed_with_close_probabilities(analyzer: PneumoniaAnalyzer) -> None:
    """pydicom-data's adult PA chest CR (15-bit MONOCHROME1, windowed): uncompressed, JPEG 2000 lossless and
    lossy, and the uncompressed copy of the lossy one - none refused, the lossless ones identical."""
    uncompressed = analyse(analyzer, rg1("UNCR"))
    assert analyse(analyzer, rg1("J2KR")) == pytest.approx(uncompressed, abs=1e-9)
    lossy = analyse(analyzer, rg1("J2KI"))
    assert analyse(analyzer, rg1("UNCI")) == pytest.approx(lossy, abs=1e-9)  # UNCI is J2KI decoded
    assert lossy == pytest.approx(uncompressed, abs=0.02)


def test_rsna_radiograph_gives_a_full_result(analyzer: PneumoniaAnalyzer, data_dir: Path) -> None:
    image = read_projection(data_dir / "cr" / "rsna_pneumonia" / "rsna_cxr_unlabelled.dcm")
    analyzer.check_input(image)
    result = analyzer.analyze(image)
    assert result.probability is not None and 0.0 <= result.probability <= 1.0
    value = result.measurement("pneumonia_probability")
    assert value.unit == "%" and value.value == pytest.approx(100 * result.probability, abs=0.05)
    assert result.category.abnormal == at_or_above_threshold(result.probability, analyzer.threshold)
    assert result.category.code in {"pneumonia-suspected", "no-pneumonia-suspected"}
    assert "Youden" in result.category.rule
    assert any("paediatric" in w and "Guangzhou" in w for w in result.warnings)
    heatmap = Image.open(io.BytesIO(result.explanations[0].png))
    assert heatmap.format == "PNG" and heatmap.width == 512  # the whole radiograph, downscaled for display
    assert result.explanations[0].kind == "heatmap"


def test_nih_pngs_wrapped_as_secondary_capture_are_analysed(
    analyzer: PneumoniaAnalyzer, nih_secondary_captures: list[Path]
) -> None:
    for path in nih_secondary_captures:
        image = read_projection(path)
        assert image.modality == "DX" and image.array.shape == (512, 512)
        analyzer.check_input(image)
        result = analyzer.analyze(image)
        assert result.probability is not None and 0.0 <= result.probability <= 1.0
        assert result.conclusion.startswith(result.category.display)


def test_radiographs_far_from_square_are_read_with_a_warning_about_the_cut_strips(
    analyzer: PneumoniaAnalyzer, data_dir: Path
) -> None:
    """Real radiographs cut to the shapes the issue's users sent (aspect 1.64 landscape, 1.28 portrait) are read,
    not refused; the result says which strips the centre square left out."""
    rsna = read_projection(data_dir / "cr" / "rsna_pneumonia" / "rsna_cxr_unlabelled.dcm")
    landscape = ImageInput(rsna.array[200:824, :], rsna.spacing, "CR", rsna.attributes)  # 624 x 1024
    analyzer.check_input(landscape)
    result = analyzer.analyze(landscape)
    assert result.probability is not None
    assert any("left and right strips (20% of the image's width each)" in w for w in result.warnings)
    assert any("lateral parts of the lungs" in w for w in result.warnings)
    portrait = ImageInput(rsna.array[:, 112:912], rsna.spacing, "CR", rsna.attributes)  # 1024 x 800
    analyzer.check_input(portrait)
    warnings = analyzer.analyze(portrait).warnings
    assert any("top and bottom strips (11% of the image's height each)" in w and "apices" in w for w in warnings)
    assert not any("strips" in w for w in analyzer.analyze(rsna).warnings)  # a square image loses nothing


def test_monochrome1_copy_gives_the_same_probability(analyzer: PneumoniaAnalyzer, data_dir: Path) -> None:
    original = pydicom.dcmread(data_dir / "cr" / "rsna_pneumonia" / "rsna_cxr_unlabelled.dcm")
    inverted = copy.deepcopy(original)
    inverted.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    inverted.PixelData = (255 - original.pixel_array).astype(np.uint8).tobytes()
    inverted.PhotometricInterpretation = "MONOCHROME1"
    assert analyse(analyzer, projection_input(inverted)) == pytest.approx(
        analyse(analyzer, projection_input(original)), abs=1e-5
    )


# --- refusals -------------------------------------------------------------------------------------------------------


def test_mammogram_is_refused(analyzer: PneumoniaAnalyzer, data_dir: Path) -> None:
    image = read_projection(data_dir / "mg" / "P_00173_LEFT_CC_benign_mass_case.dcm")
    with pytest.raises(UnsuitableInputError, match=r"reads chest radiographs .*modality MG"):
        analyzer.check_input(image)


def test_ct_and_mr_slices_are_refused(analyzer: PneumoniaAnalyzer, data_dir: Path) -> None:
    image = read_projection(data_dir / "ct" / "head_ge" / "01.dcm")
    with pytest.raises(UnsuitableInputError, match="modality CT"):
        analyzer.check_input(image)
    mr = get_testdata_file("MR_small.dcm")
    assert mr is not None
    with pytest.raises(UnsuitableInputError, match="modality MR"):
        analyzer.check_input(read_projection(mr))


def test_images_unlike_any_training_radiograph_are_refused_even_when_labelled_as_chest(
    analyzer: PneumoniaAnalyzer, data_dir: Path
) -> None:
    """When the header does not give it away, the image itself does: an extremity radiograph with no body part
    recorded and a chest radiograph shown inverted (a MONOCHROME1 image labelled MONOCHROME2) are farther from the
    training images in the network's feature space than 99.5 % of the validation images; a mammogram sent as a
    chest DX is mostly black background, which the image statistics catch first."""
    extremity = get_testdata_file("RG3_UNCR.dcm")
    assert extremity is not None
    dataset = pydicom.dcmread(extremity)
    del dataset.BodyPartExamined
    rsna = read_projection(data_dir / "cr" / "rsna_pneumonia" / "rsna_cxr_unlabelled.dcm")
    inverted = ImageInput(1.0 - rsna.array, rsna.spacing, "CR", rsna.attributes)
    for image in (projection_input(dataset), inverted):
        with pytest.raises(UnsuitableInputError, match=r"does not resemble the paediatric frontal chest radiog") as e:
            analyzer.check_input(image)
        assert "validation images stay within" in str(e.value) and "not inverted" in e.value.remedy
    mammogram = pydicom.dcmread(data_dir / "mg" / "P_00173_LEFT_CC_benign_mass_case.dcm")
    mammogram.Modality, mammogram.BodyPartExamined = "DX", "CHEST"
    with pytest.raises(UnsuitableInputError, match=r"nearly constant or saturated .*65% of pixels at the extremes"):
        analyzer.check_input(projection_input(mammogram))


def test_radiograph_of_another_body_part_is_refused(analyzer: PneumoniaAnalyzer) -> None:
    path = get_testdata_file("RG3_UNCR.dcm")  # a CR of an extremity
    assert path is not None
    with pytest.raises(UnsuitableInputError, match="BodyPartExamined is EXTREMITY"):
        analyzer.check_input(read_projection(path))


def test_lateral_view_is_refused(analyzer: PneumoniaAnalyzer, data_dir: Path) -> None:
    dataset = pydicom.dcmread(data_dir / "cr" / "rsna_pneumonia" / "rsna_cxr_unlabelled.dcm")
    dataset.ViewPosition = "LL"
    with pytest.raises(UnsuitableInputError, match=r"frontal .*ViewPosition is LL"):
        analyzer.check_input(projection_input(dataset))


def test_blank_and_strip_shaped_images_are_refused(analyzer: PneumoniaAnalyzer, data_dir: Path) -> None:
    radiograph = read_projection(data_dir / "cr" / "rsna_pneumonia" / "rsna_cxr_unlabelled.dcm")
    blank = ImageInput(np.full((1024, 1024), 40.0), (0.168, 0.168), "CR", radiograph.attributes)
    with pytest.raises(UnsuitableInputError, match="nearly constant or saturated"):
        analyzer.check_input(blank)
    strip = ImageInput(radiograph.array[:, 350:650], (0.168, 0.168), "CR", radiograph.attributes)
    with pytest.raises(UnsuitableInputError, match=r"aspect ratio 3\.41 is beyond that of any image the model was"):
        analyzer.check_input(strip)
    thumbnail = ImageInput(radiograph.array[::32, ::32], (5.4, 5.4), "CR", radiograph.attributes)
    with pytest.raises(UnsuitableInputError, match="only 32x32 pixels"):
        analyzer.check_input(thumbnail)

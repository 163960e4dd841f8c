"""Projection radiographs from real DICOM files become presentation-intensity arrays a reader would recognise."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian

from core.errors import ImageDataError
from dicom_io.projection import PROJECTION_ATTRIBUTES, projection_input, read_projection


def rg1(syntax: str) -> Path:
    """pydicom-data's adult PA chest CR (MONOCHROME1, 15-bit) in one of its transfer syntaxes."""
    path = get_testdata_file(f"RG1_{syntax}.dcm")
    assert path is not None, f"pydicom-data lacks RG1_{syntax}.dcm"
    return Path(path)


def lung_and_mediastinum(array: np.ndarray) -> tuple[float, float]:
    """Mean of a right-lung box and of a mediastinal box on a PA chest radiograph."""
    rows, columns = array.shape
    band = slice(int(rows * 0.35), int(rows * 0.55))
    lung = array[band, int(columns * 0.25) : int(columns * 0.35)].mean()
    mediastinum = array[band, int(columns * 0.47) : int(columns * 0.53)].mean()
    return float(lung), float(mediastinum)


def test_monochrome1_chest_is_inverted_so_lungs_are_dark() -> None:
    image = read_projection(rg1("UNCR"))
    assert image.attributes["PhotometricInterpretation"] == "MONOCHROME1"
    lung, mediastinum = lung_and_mediastinum(image.array)
    assert lung < 0.8 * mediastinum  # aerated lung is darker than the heart and spine once presented


def test_lossless_jpeg2000_decodes_to_the_same_image_as_uncompressed() -> None:
    uncompressed = read_projection(rg1("UNCR")).array
    lossless = read_projection(rg1("J2KR")).array
    np.testing.assert_array_equal(uncompressed, lossless)


def test_lossy_jpeg2000_stays_close_to_the_original() -> None:
    reference = read_projection(rg1("UNCI")).array
    lossy = read_projection(rg1("J2KI")).array
    assert reference.shape == lossy.shape == (1955, 1841)
    assert np.corrcoef(reference.ravel(), lossy.ravel())[0, 1] > 0.99


def test_monochrome1_copy_of_a_monochrome2_radiograph_gives_the_same_presentation(data_dir: Path) -> None:
    original = pydicom.dcmread(data_dir / "cr" / "rsna_pneumonia" / "rsna_cxr_unlabelled.dcm")
    pixels = original.pixel_array
    inverted = copy.deepcopy(original)
    inverted.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    inverted.PixelData = (255 - pixels).astype(np.uint8).tobytes()
    inverted.PhotometricInterpretation = "MONOCHROME1"
    np.testing.assert_allclose(projection_input(inverted).array, projection_input(original).array, atol=1e-3)


def test_window_in_the_header_is_applied(data_dir: Path) -> None:
    dataset = pydicom.dcmread(data_dir / "cr" / "rsna_pneumonia" / "rsna_cxr_unlabelled.dcm")
    stored = dataset.pixel_array
    dataset.WindowCenter, dataset.WindowWidth = 128, 64  # a narrow window: 96..160 spans the full output
    windowed = projection_input(dataset).array
    below, above = stored < 90, stored > 170
    assert np.ptp(windowed[below]) == 0 and np.ptp(windowed[above]) == 0  # clipped to the window's ends
    assert windowed[below].max() < windowed[above].min()


def test_pixel_spacing_and_its_source(data_dir: Path) -> None:
    rsna = read_projection(data_dir / "cr" / "rsna_pneumonia" / "rsna_cxr_unlabelled.dcm")
    assert rsna.spacing == pytest.approx((0.168, 0.168))
    assert rsna.attributes["SpacingSource"] == "patient"
    unknown = read_projection(rg1("UNCR"))  # stores PixelSpacing 0\0: not a usable spacing
    assert unknown.spacing == (1.0, 1.0) and unknown.attributes["SpacingSource"] == "unknown"


def test_only_non_identifying_attributes_travel_with_the_image(data_dir: Path) -> None:
    image = read_projection(data_dir / "cr" / "rsna_pneumonia" / "rsna_cxr_unlabelled.dcm")
    assert set(image.attributes) <= {*PROJECTION_ATTRIBUTES, "SpacingSource"}
    assert image.modality == "CR" and image.attributes["BodyPartExamined"] == "CHEST"
    assert image.attributes["ViewPosition"] == "PA"
    assert not {"PatientName", "PatientID", "PatientBirthDate"} & set(image.attributes)


def test_multi_frame_object_is_refused(data_dir: Path) -> None:
    dataset = pydicom.dcmread(data_dir / "cr" / "rsna_pneumonia" / "rsna_cxr_unlabelled.dcm")
    dataset.NumberOfFrames = 2
    with pytest.raises(ImageDataError, match="multi-frame"):
        projection_input(dataset)


def test_mammogram_with_rle_compression_decodes(data_dir: Path) -> None:
    image = read_projection(data_dir / "mg" / "P_00173_LEFT_CC_benign_mass_case.dcm")
    assert image.modality == "MG" and image.array.shape == (4432, 2864)

"""The MedMNIST recipe on real radiographs: a DICOM radiograph read by the project gives, pixel for pixel, the 28x28
image the MedMNIST recipe makes from the same pixels (MONOCHROME1, windows and bit depth included)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from dicom_io.projection import projection_input
from models.medmnist import display_8bit, medmnist_input, reduce_like_medmnist


def recipe(pixels: np.ndarray) -> np.ndarray:
    """MedMNIST v2's recipe written out on its own: an 8-bit greyscale image, its centre square on the short edge
    ("center-crop the images with a window size of length of the short edge"), resized to 28x28 by Pillow's
    anti-aliased bilinear filter, kept as 8-bit grey levels."""
    image = Image.fromarray(np.asarray(pixels, dtype=np.uint8))
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return np.asarray(square.resize((28, 28), Image.Resampling.BILINEAR))


def as_dicom(pixels: np.ndarray, **attributes: object) -> pydicom.Dataset:
    """Real pixels wrapped as a DX radiograph (MONOCHROME2 unless told otherwise), as a scanning workstation does."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


def project_28(dataset: pydicom.Dataset) -> np.ndarray:
    """The project's path: DICOM presentation values, then the analyzers' 28x28 input, back in grey levels."""
    return np.rint(medmnist_input(projection_input(dataset).array) * 255.0).astype(np.uint8)


@pytest.fixture(scope="module")
def nih(data_dir: Path) -> np.ndarray:
    """An adult PA chest radiograph (NIH ChestX-ray14), 8-bit, cut to a 512x400 portrait like a 14x17 in plate."""
    pixels = np.asarray(Image.open(data_dir / "cr" / "nih_cxr14" / "00000001_000.png").convert("L"))
    return np.ascontiguousarray(pixels[:, 56:456])


def test_an_8bit_radiograph_gives_exactly_the_recipes_28x28_image(nih: np.ndarray) -> None:
    expected = recipe(nih)
    np.testing.assert_array_equal(project_28(as_dicom(nih)), expected)
    np.testing.assert_array_equal(reduce_like_medmnist(nih), expected)
    assert expected.dtype == np.uint8 and 0 < expected.mean() < 255


def test_the_same_radiograph_stored_as_monochrome1_gives_the_same_28x28_image(nih: np.ndarray) -> None:
    stored_inverted = as_dicom((255 - nih).astype(np.uint8), PhotometricInterpretation="MONOCHROME1")
    np.testing.assert_array_equal(project_28(stored_inverted), recipe(nih))


def test_the_same_radiograph_at_12_bits_with_its_window_gives_the_same_28x28_image(nih: np.ndarray) -> None:
    """12-bit detector values (x 16) with the window that shows them as the 8-bit image did (LINEAR_EXACT,
    PS3.3 C.11.2.1.3.2: 0 -> black, 4080 -> white)."""
    deep = as_dicom(
        (nih.astype(np.uint16) * 16),
        BitsStored=12,
        HighBit=11,
        WindowCenter=2040,
        WindowWidth=4080,
        VOILUTFunction="LINEAR_EXACT",
    )
    np.testing.assert_array_equal(project_28(deep), recipe(nih))


def test_a_15bit_monochrome1_cr_gives_the_recipe_applied_to_its_windowed_display_image() -> None:
    """pydicom-data's RG1: a 1955x1841 CR, MONOCHROME1, 15 bits stored, window 15000/30000 (LINEAR)."""
    path = get_testdata_file("RG1_UNCR.dcm")
    assert path is not None
    dataset = pydicom.dcmread(path)
    stored = dataset.pixel_array.astype(np.float64)
    # PS3.3 C.11.2.1.2.1 LINEAR window onto 0..1, then MONOCHROME1: high stored values are dark
    windowed = np.clip((stored - (15000 - 0.5)) / (30000 - 1) + 0.5, 0.0, 1.0)
    display = np.rint((1.0 - windowed) * 255.0).astype(np.uint8)
    np.testing.assert_array_equal(project_28(dataset), recipe(display))
    assert display.shape == (1955, 1841)  # portrait: the recipe crops 57 rows from the top and 57 from the bottom


def test_a_colour_secondary_capture_is_read_by_its_luminance(nih: np.ndarray) -> None:
    grey = nih.astype(np.uint8)
    rgb = as_dicom(np.stack([grey, grey, grey], axis=-1), SamplesPerPixel=3, PhotometricInterpretation="RGB")
    rgb.PlanarConfiguration = 0
    np.testing.assert_array_equal(project_28(rgb), recipe(nih))


def test_display_values_are_the_8bit_export_of_the_presentation(nih: np.ndarray) -> None:
    presentation = projection_input(as_dicom(nih)).array
    assert presentation.dtype == np.float32 and presentation.min() >= 0.0 and presentation.max() <= 1.0
    np.testing.assert_array_equal(display_8bit(presentation), nih)
    brighter = copy.deepcopy(presentation) + 0.5  # out-of-range presentation values clip to white, never wrap
    assert display_8bit(brighter).max() == 255 and display_8bit(brighter).min() >= 127
    with pytest.raises(ValueError, match="2-D uint8"):
        reduce_like_medmnist(presentation)

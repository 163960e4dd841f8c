"""A projection radiograph (CR, DX, MG, US or a Secondary Capture) -> one 2-D :class:`ImageInput`.

The array an analyzer receives must look the way a radiologist sees the image, whatever the modality wrote:

1. decode the stored pixels (pydicom; JPEG, JPEG 2000 and RLE through the pylibjpeg plugins);
2. Modality LUT (rescale slope/intercept or a Modality LUT Sequence) to output units;
3. VOI LUT or the first window (``apply_voi_lut``), the default presentation the modality chose;
4. MONOCHROME1 (high values dark, as many CR plates store them) is inverted, so that a higher value is always
   brighter; a Presentation LUT Shape of INVERSE is honoured the same way;
5. colour Secondary Captures are reduced to luminance (ITU-R BT.601).

Only non-identifying acquisition attributes travel with the array (modality, body part, view...), never names,
IDs or dates. Spacing is PixelSpacing, else ImagerPixelSpacing (at the detector), else 1 mm with
``SpacingSource`` set to ``unknown`` so nothing downstream mistakes it for a measurement.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from core.errors import ImageDataError
from core.limits import DEFAULT_LIMITS, InputLimits
from dicom_io.header import (
    CONVERSION_ERRORS,
    check_image_size,
    header_floats,
    header_int,
    instance_uid,
    read_header,
)
from models.base import ImageInput

PROJECTION_ATTRIBUTES = (
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "ImageLaterality",
    "Laterality",
    "PhotometricInterpretation",
    "SOPClassUID",
    "Manufacturer",
    "ManufacturerModelName",
    "ConversionType",
    "PresentationIntentType",
    "StudyInstanceUID",
    "SeriesInstanceUID",
)
"""Attributes copied into :attr:`ImageInput.attributes`: acquisition facts and UIDs, never PHI."""

HEADER_KEYWORDS = (
    *PROJECTION_ATTRIBUTES,
    "SOPInstanceUID",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "PresentationLUTShape",
    "RescaleSlope",
    "RescaleIntercept",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
)
"""The header elements read here: read once up front, so a damaged one is refused in one place."""

_GREY = ("MONOCHROME1", "MONOCHROME2")
_LUMA = np.array([0.299, 0.587, 0.114])


def presentation_intensity(dataset: Dataset, *, limits: InputLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Decoded pixels as float32 presentation values (higher = brighter), shape ``(rows, columns)``; the
    header's claimed size is checked against ``limits`` before anything is decoded."""
    uid = instance_uid(dataset)
    read_header(dataset, HEADER_KEYWORDS, f"Instance {uid}")
    if header_int(dataset, "NumberOfFrames", 1, f"Instance {uid}") > 1:
        raise ImageDataError(
            f"Instance {uid} is a multi-frame object; a single projection image was expected.",
            remedy="Send the single-frame radiograph (one image per instance).",
        )
    check_image_size(dataset, label=f"Instance {uid}", limits=limits)
    try:
        stored = dataset.pixel_array
    except Exception as exc:  # pydicom raises plain errors for a missing decoder or corrupt data
        raise ImageDataError(
            f"Instance {uid} could not be decoded ({type(exc).__name__}: {exc}).",
            remedy="Check the transfer syntax is one pydicom can decode (install pylibjpeg plugins), or send it "
            "uncompressed.",
        ) from exc
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric in _GREY:
        try:
            values = apply_voi_lut(apply_modality_lut(stored, dataset), dataset).astype(np.float32)
        except CONVERSION_ERRORS as exc:  # a rescale, LUT or window that cannot be applied as written
            raise ImageDataError(
                f"Instance {uid}: its rescale or window values cannot be applied ({type(exc).__name__}).",
                remedy="The header is damaged; re-send the instance from the modality or the PACS.",
            ) from exc
        inverse = photometric == "MONOCHROME1"
        if str(dataset.get("PresentationLUTShape", "")).upper() == "INVERSE":
            inverse = not inverse
        if inverse:
            values = np.float32(values.max() + values.min()) - values
    elif stored.ndim == 3 and stored.shape[-1] == 3:
        # pydicom converts YBR to RGB by default, so three samples here are RGB
        values = (stored.astype(np.float64) @ _LUMA).astype(np.float32)
    else:
        raise ImageDataError(
            f"Instance {uid} has photometric interpretation {photometric} with pixel shape {stored.shape}.",
            remedy="Send a greyscale (MONOCHROME1/2) or RGB single-frame image.",
        )
    if values.ndim != 2:
        raise ImageDataError(
            f"Instance {uid} decoded to shape {values.shape}; a 2-D image was expected.",
            remedy="Send a single-frame projection radiograph.",
        )
    if not np.isfinite(values).all():  # an infinite rescale slope or window: no analyzer can read such an image
        raise ImageDataError(
            f"Instance {uid}: its rescale or window values turn the pixels into non-finite numbers.",
            remedy="The header is damaged; re-send the instance from the modality or the PACS.",
        )
    return values


def pixel_spacing_mm(dataset: Dataset) -> tuple[tuple[float, float], str]:
    """Row and column spacing and where they came from (``patient``, ``detector`` or ``unknown``)."""
    for keyword, source in (("PixelSpacing", "patient"), ("ImagerPixelSpacing", "detector")):
        value = header_floats(dataset, keyword, 2, f"Instance {instance_uid(dataset)}")
        if value is not None:
            row, column = value
            if row > 0 and column > 0:
                return (row, column), source
    return (1.0, 1.0), "unknown"


def projection_input(dataset: Dataset, *, limits: InputLimits = DEFAULT_LIMITS) -> ImageInput:
    """The analyzer input for one projection image (see the module docstring for each step)."""
    array = presentation_intensity(dataset, limits=limits)
    spacing, source = pixel_spacing_mm(dataset)
    attributes = {k: str(dataset.get(k)) for k in PROJECTION_ATTRIBUTES if dataset.get(k) not in (None, "")}
    attributes["SpacingSource"] = source
    modality = str(dataset.get("Modality", "")).upper() or "OT"
    return ImageInput(array=array, spacing=spacing, modality=modality, attributes=attributes)


def read_projection(path: Path | str) -> ImageInput:
    """Read a DICOM file from disk and return its analyzer input."""
    return projection_input(dcmread(path))

"""A projection radiograph (CR, DX, MG, US or a Secondary Capture) -> one 2-D :class:`ImageInput`.

The array an analyzer receives must look the way a radiologist sees the image, whatever the modality wrote. It
holds *presentation values* from 0 (black) to 1 (white) of the image's default presentation (DICOM PS3.3
C.11: Modality LUT, then VOI LUT, then Presentation LUT):

1. decode the stored pixels (pydicom; JPEG, JPEG 2000 and RLE through the pylibjpeg plugins);
2. Modality LUT (rescale slope/intercept or a Modality LUT Sequence) to output units;
3. VOI: a VOI LUT Sequence, else the first window (PS3.3 C.11.2.1.2: LINEAR, LINEAR_EXACT or SIGMOID), mapped
   onto 0..1 - the window's bottom is black and its top white, whatever the bit depth. Without either, an image
   of at most 8 stored bits is already a display image (its full stored range is 0..1, so an 8-bit Secondary
   Capture keeps its grey levels exactly); a deeper one is shown from its darkest to its brightest pixel, as a
   viewer does without a window;
4. MONOCHROME1 (high values dark, as many CR plates store them) is inverted within that range, so that a higher
   value is always brighter; a Presentation LUT Shape of INVERSE is honoured the same way;
5. colour Secondary Captures are reduced to luminance (ITU-R BT.601) of their 8-bit channels.

Only non-identifying acquisition attributes travel with the array (modality, body part, view...), never names,
IDs or dates. Spacing is PixelSpacing, else ImagerPixelSpacing (at the detector), else 1 mm with
``SpacingSource`` set to ``unknown`` so nothing downstream mistakes it for a measurement.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi

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
    "VOILUTSequence",
    "ModalityLUTSequence",
)
"""The header elements read here: read once up front, so a damaged one is refused in one place."""

_GREY = ("MONOCHROME1", "MONOCHROME2")
_LUMA = np.array([0.299, 0.587, 0.114])


def presentation_intensity(dataset: Dataset, *, limits: InputLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Decoded pixels as float32 presentation values, 0 black to 1 white, shape ``(rows, columns)``; the header's
    claimed size is checked against ``limits`` before anything is decoded."""
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
    if photometric in _GREY and stored.ndim == 2:
        try:
            values = _voi(apply_modality_lut(stored, dataset), dataset, uid)
        except CONVERSION_ERRORS as exc:  # a rescale, LUT or window that cannot be applied as written
            raise ImageDataError(
                f"Instance {uid}: its rescale or window values cannot be applied ({type(exc).__name__}).",
                remedy="The header is damaged; re-send the instance from the modality or the PACS.",
            ) from exc
        inverse = photometric == "MONOCHROME1"
        if str(dataset.get("PresentationLUTShape", "")).upper() == "INVERSE":
            inverse = not inverse
        values = (np.float32(1.0) - values) if inverse else values
    elif stored.ndim == 3 and stored.shape[-1] == 3:
        # pydicom converts YBR to RGB by default, so three samples here are RGB
        full_scale = float(2 ** header_int(dataset, "BitsStored", 8, f"Instance {uid}") - 1)
        values = np.clip((stored.astype(np.float64) @ _LUMA) / full_scale, 0.0, 1.0).astype(np.float32)
    else:
        raise ImageDataError(
            f"Instance {uid} has photometric interpretation {photometric} with pixel shape {stored.shape}; a 2-D "
            "projection image was expected.",
            remedy="Send a greyscale (MONOCHROME1/2) or RGB single-frame projection radiograph.",
        )
    if not np.isfinite(values).all():  # an infinite rescale slope or window: no analyzer can read such an image
        raise ImageDataError(
            f"Instance {uid}: its rescale or window values turn the pixels into non-finite numbers.",
            remedy="The header is damaged; re-send the instance from the modality or the PACS.",
        )
    return values


def _voi(values: np.ndarray, dataset: Dataset, uid: str) -> np.ndarray:
    """Modality values -> 0..1 through the VOI LUT, the first window, or the image's own range (module docstring)."""
    if "VOILUTSequence" in dataset:
        item = dataset.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2])
        return (apply_voi(values, dataset) / float(2**bits - 1)).clip(0.0, 1.0).astype(np.float32)
    if "WindowCenter" in dataset and "WindowWidth" in dataset:
        center, width = _first(dataset.WindowCenter), _first(dataset.WindowWidth)
        function = str(dataset.get("VOILUTFunction", "LINEAR")).upper()
        x = np.asarray(values, dtype=np.float64)
        if function == "SIGMOID" and width > 0:
            return (1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))).astype(np.float32)
        if function == "LINEAR_EXACT" and width > 0:
            return np.clip((x - center) / width + 0.5, 0.0, 1.0).astype(np.float32)
        if function == "LINEAR" and width >= 1:
            if width == 1:  # a threshold: below the centre black, at or above it white
                return (x >= center - 0.5).astype(np.float32)
            return np.clip((x - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0).astype(np.float32)
        raise ImageDataError(
            f"Instance {uid} has a window the standard does not allow (VOI LUT Function {function}, width {width}).",
            remedy="Correct Window Width (at least 1 for LINEAR, above 0 otherwise) or remove the window.",
        )
    bits = header_int(dataset, "BitsStored", 16, f"Instance {uid}")
    if bits <= 8 and "ModalityLUTSequence" not in dataset and "RescaleSlope" not in dataset:
        low, high = 0.0, float(2**bits - 1)
    else:
        low, high = float(np.min(values)), float(np.max(values))
    scale = high - low if high > low else 1.0
    return ((np.asarray(values, dtype=np.float64) - low) / scale).clip(0.0, 1.0).astype(np.float32)


def _first(value: object) -> float:
    """The first of a multi-valued window attribute (alternative windows), as a number."""
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0]
    return float(str(value))


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

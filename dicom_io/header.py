"""What a DICOM header claims about its image, read safely and checked against the limits before decoding.

A DICOM header is a claim from outside: ``Rows`` 60000 and ``Columns`` 60000 cost nothing to write and 14 GB to
decode into float32. :func:`check_image_size` reads the numbers (a value that is not a whole number is an
:class:`ImageDataError`, never an exception from deep inside a decoder) and refuses, before anything is
allocated, an image whose Rows x Columns x frames x samples passes ``limits.image_pixels`` or whose decoded form
passes ``limits.decoded_bytes`` (:func:`check_decoded_bytes`, which the volume assembly also applies to the whole
stack).
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from core.errors import ImageDataError
from core.limits import InputLimits, describe_bytes, too_large

FLOAT32_BYTES = 4
"""Analyzers receive float32 arrays: the decoded size of an image is its sample count times four."""


def header_int(ds: Dataset, keyword: str, default: int, label: str) -> int:
    """The whole-number value of ``keyword`` (``default`` when absent or empty), or :class:`ImageDataError`."""
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return default
        number = int(value)
        if number != float(value) or number < 0:
            raise ValueError(keyword)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ImageDataError(
            f"{label}: SOP Instance {ds.get('SOPInstanceUID', '?')} has a {keyword} that is not a whole number.",
            remedy="The header is damaged; re-send the instance from the modality or the PACS.",
        ) from exc
    return number


def check_decoded_bytes(count: int, *, what: str, limits: InputLimits) -> None:
    """Refuse ``what`` when decoding it would take more than ``limits.decoded_bytes``."""
    if count > limits.decoded_bytes:
        raise too_large(f"{what} would take {describe_bytes(count)} decoded; it", "decoded_bytes", limits.decoded_bytes)


def check_image_size(ds: Dataset, *, label: str, limits: InputLimits) -> int:
    """The number of samples the header claims (Rows x Columns x frames x samples per pixel), after checking it
    against ``limits.image_pixels`` and, decoded to float32, against ``limits.decoded_bytes``."""
    rows = header_int(ds, "Rows", 0, label)
    columns = header_int(ds, "Columns", 0, label)
    frames = max(1, header_int(ds, "NumberOfFrames", 1, label))
    samples = max(1, header_int(ds, "SamplesPerPixel", 1, label))
    if not rows or not columns:
        raise ImageDataError(
            f"{label}: SOP Instance {ds.get('SOPInstanceUID', '?')} has no Rows or Columns, so it holds no image.",
            remedy="Choose a series of images (not a structured report or presentation state).",
        )
    count = rows * columns * frames * samples
    what = f"{label}: SOP Instance {ds.get('SOPInstanceUID', '?')} ({rows} x {columns} x {frames} frame(s))"
    if count > limits.image_pixels:
        raise too_large(what, "image_pixels", limits.image_pixels, unit="samples")
    check_decoded_bytes(count * FLOAT32_BYTES, what=what, limits=limits)
    return count

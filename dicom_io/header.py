"""What a DICOM header claims about its image, read safely and checked against the limits before decoding.

A DICOM header is a claim from outside: ``Rows`` 60000 and ``Columns`` 60000 cost nothing to write and 14 GB to
decode into float32. :func:`check_image_size` reads the numbers (a value that is not a whole number is an
:class:`ImageDataError`, never an exception from deep inside a decoder) and refuses, before anything is
allocated, an image whose Rows x Columns x frames x samples passes ``limits.image_pixels`` or whose decoded form
passes ``limits.decoded_bytes`` (:func:`check_decoded_bytes`, which the volume assembly also applies to the whole
stack).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from typing import Any

from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError

from core.errors import ImageDataError
from core.limits import InputLimits, describe_bytes, too_large

FLOAT32_BYTES = 4
"""Analyzers receive float32 arrays: the decoded size of an image is its sample count times four."""

CONVERSION_ERRORS = (
    TypeError,
    ValueError,
    ArithmeticError,
    struct.error,
    IndexError,
    KeyError,
    NotImplementedError,  # pydicom, for a VR it does not know (a damaged VR field)
    BytesLengthException,  # pydicom, for a value whose length does not fit its VR
    InvalidDicomError,
)
"""What pydicom and Python raise when a damaged header value is read or converted (a value is converted from its
raw bytes the first time it is read, so these surface wherever a header is read, not when the file is parsed)."""


def _damaged(ds: Dataset, keyword: str, label: str, what: str) -> ImageDataError:
    return ImageDataError(
        f"{label}: SOP Instance {instance_uid(ds)} has a {keyword} that is {what}.",
        remedy="The header is damaged; re-send the instance from the modality or the PACS.",
    )


def instance_uid(ds: Dataset) -> str:
    """The SOP Instance UID for messages, or ``?`` when it cannot be read (never an exception)."""
    try:
        return str(ds.get("SOPInstanceUID", "?"))[:64]
    except CONVERSION_ERRORS:
        return "?"


def header_value(ds: Dataset, keyword: str, label: str) -> Any:
    """The value of ``keyword`` (``None`` when absent), or :class:`ImageDataError` when it cannot be read."""
    try:
        return ds.get(keyword)
    except CONVERSION_ERRORS as exc:
        raise _damaged(ds, keyword, label, "unreadable") from exc


def read_header(ds: Dataset, keywords: Iterable[str], label: str) -> None:
    """Read (and so convert from their raw bytes) the elements ``keywords`` of ``ds`` once, up front.

    pydicom converts an element the first time it is read and keeps the result; reading the elements a module
    relies on here turns a damaged one into an :class:`ImageDataError` in one place, and later reads of them
    cannot fail. It costs nothing extra: each is converted once either way.
    """
    for keyword in keywords:
        header_value(ds, keyword, label)


def header_int(ds: Dataset, keyword: str, default: int, label: str) -> int:
    """The whole-number value of ``keyword`` (``default`` when absent or empty), or :class:`ImageDataError`."""
    value = header_value(ds, keyword, label)
    if value is None or value == "":
        return default
    try:
        number = int(value)
        if number != float(value) or number < 0:
            raise ValueError(keyword)
    except CONVERSION_ERRORS as exc:
        raise _damaged(ds, keyword, label, "not a whole number") from exc
    return number


def header_floats(ds: Dataset, keyword: str, count: int, label: str) -> list[float] | None:
    """The ``count`` finite numbers of ``keyword`` (``None`` when absent or of another length), or
    :class:`ImageDataError` when they are not numbers."""
    value = header_value(ds, keyword, label)
    try:
        if value is None or len(value) != count:
            return None
        numbers = [float(v) for v in value]
    except CONVERSION_ERRORS as exc:
        raise _damaged(ds, keyword, label, "not a list of numbers") from exc
    if not all(math.isfinite(n) for n in numbers):
        raise _damaged(ds, keyword, label, "not finite")
    return numbers


def header_float(ds: Dataset, keyword: str, default: float, label: str) -> float:
    """The finite number of ``keyword`` (``default`` when absent, empty or zero-length), or
    :class:`ImageDataError`."""
    value = header_value(ds, keyword, label)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except CONVERSION_ERRORS as exc:
        raise _damaged(ds, keyword, label, "not a number") from exc
    if not math.isfinite(number):
        raise _damaged(ds, keyword, label, "not finite")
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
            f"{label}: SOP Instance {instance_uid(ds)} has no Rows or Columns, so it holds no image.",
            remedy="Choose a series of images (not a structured report or presentation state).",
        )
    count = rows * columns * frames * samples
    what = f"{label}: SOP Instance {instance_uid(ds)} ({rows} x {columns} x {frames} frame(s) x {samples} sample(s))"
    if count > limits.image_pixels:
        raise too_large(what, "image_pixels", limits.image_pixels, unit="samples")
    check_decoded_bytes(count * FLOAT32_BYTES, what=what, limits=limits)
    return count

"""Checks every CT analyzer makes before it measures: a calibrated axial volume of enough slices.

Analyzers of CT attenuation (emphysema, nodules, calcium) refuse the same inputs for the same reasons and say so
in the same words; what differs between them (why the modality matters, which region must be covered, how thin
the slices must be) is passed in.
"""

from __future__ import annotations

import numpy as np

from core.errors import UnsuitableInputError
from models.base import ImageInput


def check_ct_volume(
    image: ImageInput,
    analyzer: str,
    *,
    measures: str,
    min_slices: int,
    covers: str,
    remedy: str = "Choose an axial chest CT series.",
) -> None:
    """Refuse a series that is not CT, not a 3-D volume, too short to cover ``covers``, or without physical spacing.

    ``measures`` completes "<analyzer> ... on CT" in the modality error (``"finds lung nodules"``).
    """
    if image.modality.upper() != "CT":
        raise UnsuitableInputError(
            f"{analyzer} {measures} on CT; this series is modality {image.modality or 'unknown'!r}.",
            remedy=remedy,
        )
    if image.array.ndim != 3 or len(image.spacing) != 3:
        raise UnsuitableInputError(
            f"{analyzer} needs a CT volume (slices, rows, columns); got a {image.array.ndim}-D image.",
            remedy="Send the whole axial series, not a single slice or a projection.",
        )
    if image.array.shape[0] < min_slices:
        raise UnsuitableInputError(
            f"{analyzer} needs at least {min_slices} axial slices to cover {covers}; this series has "
            f"{image.array.shape[0]}.",
            remedy="Choose the full chest series rather than a partial or reformatted one.",
        )
    if any(s <= 0 for s in image.spacing):
        raise UnsuitableInputError(
            f"Voxel spacing {tuple(image.spacing)} mm is not physical.",
            remedy="Check PixelSpacing and slice positions in the series.",
        )


def slice_thickness_mm(image: ImageInput) -> float:
    """Reconstructed slice thickness: DICOM SliceThickness when given, else the slice spacing."""
    raw = image.attributes.get("SliceThickness", "")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = 0.0
    return value if value > 0 else float(image.spacing[0])


def check_hounsfield(hu: np.ndarray, analyzer: str) -> None:
    """Calibrated CT shows air near -1000 HU and soft tissue near 0 HU; raw stored values do not."""
    sample = np.ascontiguousarray(hu[::2, ::4, ::4])  # one strided read instead of four: half the time
    air = np.count_nonzero((sample > -1100) & (sample < -900))
    tissue = np.count_nonzero((sample > -100) & (sample < 200))
    if air < 0.001 * sample.size or tissue < 0.01 * sample.size:
        raise UnsuitableInputError(
            f"{analyzer}: the voxel values do not look like Hounsfield units (air {100 * air / sample.size:.2f}%, "
            f"soft tissue {100 * tissue / sample.size:.2f}% of voxels; expected air near -1000 and tissue near 0).",
            remedy="Apply RescaleSlope/RescaleIntercept before analysis, and use a CT reconstruction in HU.",
        )

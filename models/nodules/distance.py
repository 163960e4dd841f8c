"""Euclidean distance maps for the nodule search, computed without scipy's float64 copies of the grid.

:func:`scipy.ndimage.distance_transform_edt` finds, for every voxel, its nearest background voxel (the feature
transform: fast, in C), then turns those indices into distances through three float64 copies of the array's
coordinates: 24 bytes a voxel and, on the candidate grid of a 60-slice chest CT, three quarters of the time.
:func:`depth_mm` does the same arithmetic one axis at a time, in the same order, so its distances are those of
scipy to the last bit, and only for the True voxels (a few per cent of the candidate grid): the memory is that of
the feature transform and of the result.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def depth_mm(mask: np.ndarray, spacing: Sequence[float] | np.ndarray) -> np.ndarray:
    """Distance (mm, float64) from each True voxel of ``mask`` to the nearest False one; 0 on False voxels.

    Equal, voxel for voxel, to ``scipy.ndimage.distance_transform_edt(mask, sampling=spacing)``.
    """
    if len(spacing) != mask.ndim:
        raise ValueError(f"depth_mm needs one spacing per axis: {len(spacing)} for a {mask.ndim}-D mask.")
    nearest = ndimage.distance_transform_edt(mask, sampling=spacing, return_distances=False, return_indices=True)
    depth = np.zeros(mask.shape, dtype=np.float64)
    inside = np.flatnonzero(mask)  # a False voxel is its own nearest False voxel: distance 0
    if inside.size == 0:
        return depth
    squared = np.zeros(inside.size, dtype=np.float64)
    for axis, (position, mm) in enumerate(zip(np.unravel_index(inside, mask.shape), spacing, strict=True)):
        offset = (nearest[axis].reshape(-1)[inside] - position).astype(np.float64)
        offset *= float(mm)
        offset *= offset
        squared += offset
    depth.reshape(-1)[inside] = np.sqrt(squared)
    return depth

"""Binary morphology and local maxima by shifted whole-array operations, exactly as :mod:`scipy.ndimage` does them.

``ndimage.binary_dilation`` and ``binary_opening`` visit every pixel of the structuring element around every pixel
of the image, and ``ndimage.maximum_filter`` makes one pass per axis through a general-purpose line buffer. The
discs and boxes the analyzers use are small and symmetric, so the same results come from a few dozen numpy
operations on the whole array at once (several times faster on the arrays here). Each function states which
``ndimage`` call it reproduces, edge handling included; ``tests/test_morphology.py`` checks the equality on random
masks.

A disc is the union of its rows, each a horizontal segment centred on the disc's axis, so eroding by it is the AND,
over its rows, of the image eroded by that row's segment and shifted by the row's offset; dilating is the same with
OR.
"""

from __future__ import annotations

import math

import numpy as np


def disc_rows(radius: int) -> list[int]:
    """The half-widths of the rows of the disc ``i**2 + j**2 <= radius**2``, from row ``-radius`` to ``+radius``."""
    return [math.isqrt(radius * radius - i * i) for i in range(-radius, radius + 1)]


def rows_of(structure: np.ndarray) -> list[int]:
    """The half-widths of the rows of a 2-D structuring element of odd size that is symmetric and whose every row is
    one centred segment (a disc, a diamond, a square); raises ValueError for any other."""
    if structure.ndim != 2 or structure.shape[0] % 2 == 0 or structure.shape[1] % 2 == 0:
        raise ValueError(f"A structuring element of odd size is needed, got shape {structure.shape}.")
    half_widths = [segment_half_width(row) for row in structure]
    rebuilt = np.zeros(structure.shape, dtype=bool)
    centre = structure.shape[1] // 2
    for k, w in enumerate(half_widths):
        if w >= 0:
            rebuilt[k, centre - w : centre + w + 1] = True
    if not np.array_equal(rebuilt, structure.astype(bool)) or min(half_widths) < 0:
        raise ValueError("Each row of the structuring element must be one segment centred on its middle column.")
    return half_widths


def segment_half_width(row: np.ndarray) -> int:
    """How far a centred segment reaches either side of the middle of ``row`` (-1 when the row is empty)."""
    return (int(np.count_nonzero(row)) - 1) // 2


def dilate(mask: np.ndarray, half_widths: list[int]) -> np.ndarray:
    """``ndimage.binary_dilation`` of every slice of a ``(slices, rows, columns)`` mask by the symmetric element
    whose row at offset ``k - len(half_widths) // 2`` spans ``half_widths[k]`` pixels either side of its centre
    (the array's outside is background, as ``border_value=0``)."""
    return _by_rows(mask, half_widths, erode=False)


def erode(mask: np.ndarray, half_widths: list[int]) -> np.ndarray:
    """``ndimage.binary_erosion`` of every slice by the same element (the outside counts as background)."""
    return _by_rows(mask, half_widths, erode=True)


def open_by_disc(mask: np.ndarray, radius: int) -> np.ndarray:
    """``ndimage.binary_opening`` of every slice by the disc of ``radius`` pixels (``i**2 + j**2 <= radius**2``)."""
    rows = disc_rows(radius)
    return dilate(erode(mask, rows), rows)


def _by_rows(mask: np.ndarray, half_widths: list[int], *, erode: bool) -> np.ndarray:
    if mask.ndim != 3 or len(half_widths) % 2 == 0:
        raise ValueError("A (slices, rows, columns) mask and an odd number of rows are needed.")
    mask = np.asarray(mask, dtype=bool)
    columns = mask.shape[2]
    # the mask eroded (dilated) by each horizontal segment, grown one column either side at a time
    per_width = {0: mask}
    segment = mask.copy()
    for w in range(1, max(half_widths) + 1):
        if erode:
            segment[..., :-w] &= mask[..., w:]
            segment[..., max(0, columns - w) :] = False  # their neighbour w columns on is outside
            segment[..., w:] &= mask[..., :-w]
            segment[..., :w] = False
        else:
            segment[..., :-w] |= mask[..., w:]
            segment[..., w:] |= mask[..., :-w]
        if w in half_widths:
            per_width[w] = segment.copy()
    rows = mask.shape[1]
    out = np.full(mask.shape, erode, dtype=bool)
    radius = len(half_widths) // 2
    for k, width in enumerate(half_widths):
        offset = k - radius  # out[row] combines the segment's result at row + offset
        run = per_width[width]
        first, last = max(0, -offset), max(0, rows - max(0, offset))  # the rows whose neighbour is in the array
        if first < last:
            target = out[:, first:last]
            source = run[:, first + offset : last + offset]
            if erode:
                target &= source
            else:
                target |= source
        if erode:  # the other rows' neighbour at this offset is the background outside
            out[:, : min(first, rows)] = False
            out[:, last:] = False
    return out


def local_maximum(values: np.ndarray, reach: tuple[int, ...]) -> np.ndarray:
    """``ndimage.maximum_filter(values, size=2 * reach + 1)``: the maximum over the box of ``reach`` elements either
    side along each axis. The filter's default edge mode mirrors values that are already in the box, so the box is
    simply cut at the array's edge."""
    if len(reach) != values.ndim:
        raise ValueError(f"One reach per axis is needed: {values.ndim} axes, {len(reach)} reaches.")
    out = values.copy()
    for axis, steps in enumerate(reach):
        along = out.copy() if steps else out
        for step in range(1, steps + 1):
            ahead = [slice(None)] * values.ndim
            behind = [slice(None)] * values.ndim
            ahead[axis], behind[axis] = slice(step, None), slice(None, -step)
            np.maximum(out[tuple(behind)], along[tuple(ahead)], out=out[tuple(behind)])
            np.maximum(out[tuple(ahead)], along[tuple(behind)], out=out[tuple(ahead)])
    return out

"""models.morphology gives exactly what scipy.ndimage gives, edges included: the calcium territories and the vessel
search of ct-heart use it in place of ndimage, and their filed values must not change with the speed-up."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from models.morphology import dilate, disc_rows, erode, local_maximum, open_by_disc, rows_of

RNG = np.random.default_rng(20240519)
IN_PLANE_4 = np.zeros((3, 3, 3), dtype=bool)
IN_PLANE_4[1] = ndimage.generate_binary_structure(2, 1)


def blobs(slices: int, rows: int, columns: int) -> np.ndarray:
    """Smooth random blobs of random size (a mask with holes, thin parts and pixels on the array's edges)."""
    sigma = RNG.uniform(0.5, 4.0)
    field = ndimage.gaussian_filter(RNG.random((slices, rows, columns)), (0, sigma, sigma))
    return field > np.quantile(field, RNG.uniform(0.3, 0.8))


def in_plane(structure_2d: np.ndarray) -> np.ndarray:
    return structure_2d[None]


@pytest.mark.parametrize("radius", [1, 2, 3, 5, 7])
def test_opening_by_a_disc_is_ndimage_binary_opening(radius: int) -> None:
    disc = np.hypot(*np.ogrid[-radius : radius + 1, -radius : radius + 1]) <= radius
    for _ in range(60):
        mask = blobs(int(RNG.integers(1, 4)), *(int(n) for n in RNG.integers(1, 45, 2)))
        expected = ndimage.binary_opening(mask, structure=in_plane(disc))
        np.testing.assert_array_equal(open_by_disc(mask, radius), expected)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_repeated_four_connected_dilation_is_the_diamond(steps: int) -> None:
    diamond = [steps - abs(offset) for offset in range(-steps, steps + 1)]
    for _ in range(60):
        mask = RNG.random((2, *(int(n) for n in RNG.integers(1, 40, 2)))) > RNG.uniform(0.8, 0.99)
        expected = ndimage.binary_dilation(mask, structure=IN_PLANE_4, iterations=steps)
        np.testing.assert_array_equal(dilate(mask, diamond), expected)


@pytest.mark.parametrize(("ry", "rx"), [(1, 1), (2, 2), (4, 4), (2, 3), (3, 1)])
def test_erosion_and_dilation_by_an_ellipse_are_ndimage(ry: int, rx: int) -> None:
    rr, cc = np.ogrid[-ry : ry + 1, -rx : rx + 1]
    ellipse = (rr / ry) ** 2 + (cc / rx) ** 2 <= 1.0 + 1e-9
    rows = rows_of(ellipse)
    for _ in range(40):
        mask = blobs(2, *(int(n) for n in RNG.integers(1, 40, 2)))
        np.testing.assert_array_equal(dilate(mask, rows), ndimage.binary_dilation(mask, structure=in_plane(ellipse)))
        np.testing.assert_array_equal(erode(mask, rows), ndimage.binary_erosion(mask, structure=in_plane(ellipse)))


def test_disc_rows_are_the_rows_of_the_disc() -> None:
    for radius in range(1, 30):
        disc = np.hypot(*np.ogrid[-radius : radius + 1, -radius : radius + 1]) <= radius
        assert disc_rows(radius) == rows_of(disc)


def test_an_element_that_is_not_centred_segments_is_refused() -> None:
    with pytest.raises(ValueError, match="centred"):
        rows_of(np.array([[1, 0, 0], [1, 1, 1], [0, 0, 1]], dtype=bool))
    with pytest.raises(ValueError, match="odd size"):
        rows_of(np.ones((2, 3), dtype=bool))


def test_local_maximum_is_ndimage_maximum_filter_ties_and_edges_included() -> None:
    for trial in range(300):
        shape = tuple(int(n) for n in RNG.integers(1, 14, 3))
        values = RNG.random(shape).astype(np.float32)
        if trial % 2:
            values = np.round(values * 3).astype(np.float32)  # plateaus: ties between neighbours
        reach = tuple(int(n) for n in RNG.integers(0, 4, 3))
        expected = ndimage.maximum_filter(values, size=tuple(2 * r + 1 for r in reach))
        np.testing.assert_array_equal(local_maximum(values, reach), expected)

"""The calcium scoring core (models.calcium): Agatston's rules, the slice-spacing rescaling, volume and mass.

These are plumbing tests on small synthetic arrays (a known disc of known HU, nothing clinical); the scores of real
calcium are checked on the real QRM phantom scan in tests/test_heart.py, through the same functions.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from models.calcium import (
    MIN_LESION_AREA_MM2,
    MassCalibration,
    density_weight,
    score_calcium,
)

SPACING = (3.0, 0.5, 0.5)


def volume_with_disc(
    hu: float, radius_px: float, slices: tuple[int, ...] = (5,), background: float = 40.0
) -> np.ndarray:
    volume = np.full((11, 64, 64), background, dtype=np.float32)
    rr, cc = np.ogrid[:64, :64]
    disc = (rr - 32) ** 2 + (cc - 32) ** 2 <= radius_px**2
    for z in slices:
        volume[z][disc] = hu
    return volume


def everywhere(volume: np.ndarray) -> np.ndarray:
    return np.ones(volume.shape, dtype=bool)


@pytest.mark.parametrize(
    ("peak", "weight"),
    [(129.9, 0), (130.0, 1), (199.0, 1), (200.0, 2), (299.9, 2), (300.0, 3), (399.0, 3), (400.0, 4), (1500.0, 4)],
)
def test_density_weight_follows_agatstons_bands(peak: float, weight: int) -> None:
    assert density_weight(peak) == weight


def test_agatston_is_area_times_the_weight_of_the_peak() -> None:
    volume = volume_with_disc(250.0, 6.0)
    volume[5, 32, 32] = 450.0  # one brighter pixel makes the whole lesion weight 4
    score = score_calcium(volume, everywhere(volume), SPACING)
    area = float(np.count_nonzero(volume[5] >= 130.0)) * 0.25
    assert score.agatston_raw == pytest.approx(4 * area)
    assert score.slice_factor == 1.0 and score.agatston == score.agatston_raw
    assert score.volume_mm3 == pytest.approx(area * 3.0)
    assert score.lesion_count == 1 and score.lesions[0].peak_hu == 450.0


def test_a_speck_under_one_square_millimetre_is_not_a_lesion() -> None:
    volume = volume_with_disc(40.0, 1.0)
    volume[5, 30, 30:33] = 500.0  # 3 pixels of 0.25 mm2: 0.75 mm2
    assert MIN_LESION_AREA_MM2 > 3 * 0.25
    assert score_calcium(volume, everywhere(volume), SPACING).agatston == 0.0
    volume[5, 31, 30] = 500.0  # 4 pixels: exactly 1 mm2 counts
    assert score_calcium(volume, everywhere(volume), SPACING).agatston == pytest.approx(4.0)


def test_thick_slices_are_rescaled_to_the_3_mm_the_score_was_defined_on() -> None:
    volume = volume_with_disc(250.0, 6.0)
    three = score_calcium(volume, everywhere(volume), (3.0, 0.5, 0.5))
    five = score_calcium(volume, everywhere(volume), (5.0, 0.5, 0.5))
    assert five.agatston_raw == pytest.approx(three.agatston_raw)
    assert five.agatston == pytest.approx(three.agatston_raw * 5.0 / 3.0)


def test_calcium_outside_the_region_is_never_scored() -> None:
    volume = volume_with_disc(600.0, 6.0)
    region = np.zeros(volume.shape, dtype=bool)
    region[:, :, :32] = True  # the left half of the disc only
    half = score_calcium(volume, region, SPACING)
    whole = score_calcium(volume, everywhere(volume), SPACING)
    assert 0.4 * whole.agatston < half.agatston < 0.6 * whole.agatston
    assert not score_calcium(volume, np.zeros_like(region), SPACING).lesions


def test_one_lesion_across_slices_is_one_lesion_with_each_slice_scored() -> None:
    volume = volume_with_disc(350.0, 5.0, slices=(4, 5, 6))
    score = score_calcium(volume, everywhere(volume), SPACING)
    assert score.lesion_count == 1 and score.lesions[0].slices == (4, 5, 6)
    single = score_calcium(volume_with_disc(350.0, 5.0), everywhere(volume), SPACING)
    assert score.agatston == pytest.approx(3 * single.agatston)


def test_mass_is_conserved_when_blur_spreads_calcium_below_the_threshold() -> None:
    """The integrated mass of a blurred cylinder equals its mass before blurring; counting only >= 130 HU would not."""
    calibration = MassCalibration(0.8, "test factor")
    sharp = volume_with_disc(600.0, 4.0, slices=(4, 5, 6), background=40.0)
    truth = 0.8 / 1000.0 * (600.0 - 40.0) * float(np.count_nonzero(sharp > 100.0)) * 0.75  # mg
    blurred = ndimage.gaussian_filter(sharp, (0.6, 1.5, 1.5))
    score = score_calcium(blurred, everywhere(blurred), SPACING, calibration=calibration)
    assert score.mass_mg == pytest.approx(truth, rel=0.05)
    above = blurred >= 130.0
    threshold_only = 0.8 / 1000.0 * float((blurred[above] - 40.0).sum()) * 0.75
    assert threshold_only < 0.95 * truth  # what integrating over the partial-volume rim restores


def test_a_calibration_needs_a_calcium_insert_brighter_than_water() -> None:
    calibration = MassCalibration.from_inserts(310.0, 35.0, 200.0, description="rods")
    assert calibration.mg_per_cm3_per_hu == pytest.approx(200.0 / 275.0)
    assert "McCollough" in calibration.source
    with pytest.raises(ValueError, match="brighter than the water"):
        MassCalibration.from_inserts(30.0, 35.0, 200.0, description="rods")

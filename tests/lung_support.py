"""Helpers for the lung and emphysema tests: a geometric chest phantom (for plumbing only) and the real CTs.

The phantom is not anatomy: it checks that the pipeline counts what it should (air-filled lungs inside a
soft-tissue body, a trachea to remove, stomach gas to ignore). Clinical plausibility is checked on the real
chest CTs in ``tests/data/ct/chest_pyradiomics``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nrrd
import numpy as np

SOFT_TISSUE_HU = 40.0
AIR_HU = -1000.0


@dataclass(frozen=True)
class Phantom:
    hu: np.ndarray  # (slices, rows, columns), inferior to superior
    spacing: tuple[float, float, float]
    lungs: np.ndarray  # bool: the voxels that are lung by construction
    right_lung: np.ndarray  # bool: the lung at the lower column indices (patient right)
    airway: np.ndarray  # bool: trachea and main bronchi
    gas: np.ndarray  # bool: stomach gas under the left lung

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0


def chest_phantom(
    lung_hu: float = AIR_HU,
    *,
    with_lungs: bool = True,
    with_airway: bool = False,
    with_gas: bool = False,
    slices: int = 40,
    slice_mm: float = 5.0,
) -> Phantom:
    """An elliptic soft-tissue body (280 x 200 mm) in air, with two ellipsoid lungs (about 1 L each).

    1 mm pixels, 320 x 320; lungs centred 60 mm either side of the midline, 150 mm tall. The optional
    airway is a 9 mm radius trachea from the top slice to 150 mm, then two 6 mm-radius bronchi that move
    8 mm sideways per 5 mm slice until they open into the lungs. The optional gas is a 94 mL ellipsoid
    under and in front of the left lung base.
    """
    size, pixel = 320, 1.0
    z = (np.arange(slices, dtype=np.float32) + 0.5) * slice_mm
    y = (np.arange(size, dtype=np.float32) + 0.5) * pixel
    x = (np.arange(size, dtype=np.float32) + 0.5) * pixel
    zz, yy, xx = z[:, None, None], y[None, :, None], x[None, None, :]
    centre = size * pixel / 2.0

    body = ((xx - centre) / 140.0) ** 2 + ((yy - centre) / 100.0) ** 2 <= 1.0
    body = np.broadcast_to(body, (slices, size, size))
    hu = np.where(body, np.float32(SOFT_TISSUE_HU), np.float32(AIR_HU)).astype(np.float32)

    def ellipsoid(cx: float, cy: float, cz: float, ax: float, ay: float, az: float) -> np.ndarray:
        return ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 + ((zz - cz) / az) ** 2 <= 1.0

    empty = np.zeros(hu.shape, dtype=bool)
    right = ellipsoid(centre - 60, centre, 100, 45, 70, 75) if with_lungs else empty
    left = ellipsoid(centre + 60, centre, 100, 45, 70, 75) if with_lungs else empty
    lungs = right | left
    hu[lungs] = lung_hu

    airway = np.zeros(hu.shape, dtype=bool)
    if with_airway:
        rows2d, cols2d = y[:, None], x[None, :]
        for k, zc in enumerate(z):
            if zc >= 150:
                airway[k] = (cols2d - centre) ** 2 + (rows2d - centre) ** 2 <= 9.0**2
            elif zc > 120:
                shift = (150 - zc) / slice_mm * 8.0
                for cx in (centre - shift, centre + shift):
                    airway[k] |= (cols2d - cx) ** 2 + (rows2d - centre) ** 2 <= 6.0**2
        airway &= ~lungs
        hu[airway] = AIR_HU

    gas = ellipsoid(centre + 50, centre - 55, 15, 50, 30, 15) if with_gas else empty
    hu[gas] = AIR_HU
    return Phantom(
        hu=hu,
        spacing=(slice_mm, pixel, pixel),
        lungs=lungs,
        right_lung=right,
        airway=airway,
        gas=gas,
    )


def load_pyradiomics_ct(data_dir: Path, name: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A pyradiomics chest CT as (slices, rows, columns) float32 HU, inferior to superior, and its spacing.

    pynrrd returns (x, y, z); the files are LPS with a positive z step, so slice index already grows towards
    the head and only the transpose is needed. The assertion guards that assumption.
    """
    data, header = nrrd.read(str(data_dir / "ct" / "chest_pyradiomics" / f"{name}.nrrd"))
    directions = np.asarray(header["space directions"], dtype=np.float64)
    assert header["space"] == "left-posterior-superior" and directions[2, 2] > 0, "expected slices foot to head"
    assert np.allclose(directions, np.diag(np.diag(directions))), "expected an axis-aligned axial volume"
    hu = np.ascontiguousarray(data.transpose(2, 1, 0)).astype(np.float32)
    dx, dy, dz = (float(v) for v in np.diag(directions))
    return hu, (dz, dy, dx)

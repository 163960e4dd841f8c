"""Calcium scoring on CT: Agatston score, calcium volume and calcium mass of the calcium inside a region.

These functions know nothing about anatomy. They take a HU volume, its spacing and a boolean *region* (where
calcium may be counted: the coronary territory of a chest CT, the aortic wall, or a cylinder around one insert of a
calibration phantom) and score what lies inside. The heart analyzer and the phantom validation call exactly the
same functions, so the phantom figures describe the scores a patient gets.

Definitions, cited:

* **Agatston score** (Agatston AS, Janowitz WR, Hildner FJ, Zusmer NR, Viamonte M Jr, Detrano R. Quantification of
  coronary artery calcium using ultrafast computed tomography. J Am Coll Cardiol. 1990;15(4):827-832). On each axial
  slice, a lesion is a connected set (8-neighbourhood in the slice) of pixels at or above 130 HU with an area of at
  least 1 mm2; its score is its area (mm2) times a density weight from its peak HU on that slice: 1 for 130-199 HU,
  2 for 200-299, 3 for 300-399, 4 for 400 HU and above. The score is the sum over lesions and slices.
* **Slice spacing.** The score was defined on contiguous 3 mm slices: a lesion L mm long appears on about L/3
  slices. With another slice spacing the sum is rescaled by spacing / 3 mm, the "Agatston equivalent score" used for
  overlapping and non-3 mm reconstructions (Ohnesorge B, Flohr T, Fischbach R, et al. Reproducibility of coronary
  calcium quantification in repeat examinations with retrospectively ECG-gated multisection spiral CT. Eur Radiol.
  2002;12(6):1532-1540). Both the raw sum and the equivalent score are kept; at 3 mm they are the same number.
* **Calcium volume** (volume score; Callister TQ, Cooil B, Raya SP, Lippolis NJ, Russo DJ, Raggi P. Coronary artery
  disease: improved reproducibility of calcium scoring with an electron-beam CT volumetric method. Radiology.
  1998;208(3):807-814): the voxels of the scored lesions times the voxel volume, in mm3.
* **Calcium mass.** The hydroxyapatite (HA) calibration of McCollough et al. (McCollough CH, Ulzheimer S,
  Halliburton SS, Shanneik K, White RD, Kalender WA. Coronary artery calcium: a multi-institutional,
  multimanufacturer international standard for quantification at cardiac CT. Radiology. 2007;243(2):527-538):
  ``c_HA = rho_HA / (CT_HA - CT_water)`` in mg/cm3 per HU, from a calibration insert of known HA density scanned with
  the patient. The mass is then integrated over the lesion's partial-volume footprint rather than over its voxels
  above 130 HU only, following the integrated-intensity method (Black D, Ding H, Molloi S, et al. Integrated
  intensity-based technique for coronary artery calcium mass measurement: a phantom study. Med Phys. 2023;
  doi:10.1002/mp.16326): blurring spreads a small or faint calcification over neighbouring voxels and below the
  130 HU threshold, but it does not change the sum of its excess attenuation over the surrounding tissue. So
  ``mass = c_HA * sum(HU - background) * voxel volume`` over the lesion grown by :data:`MASS_MARGIN_MM` in-plane and
  by one slice above and below, with ``background`` the median HU of a shell around that footprint. Fat (below
  :data:`FAT_HU`) is left out of both the integral and the background: a calcified plaque sits in the vessel wall
  next to blood and wall tissue (about 40 HU), and counting the surrounding epicardial fat (about -100 HU) as
  "negative calcium" would bias the mass low.

Every step works inside the region's bounding box, so scoring costs time in proportion to the region, not the scan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from models.morphology import dilate, rows_of

CALCIUM_THRESHOLD_HU = 130.0
"""Agatston 1990: calcium is attenuation at or above 130 HU."""

MIN_LESION_AREA_MM2 = 1.0
"""Agatston 1990: a lesion must cover at least 1 mm2 on its slice (smaller specks are noise)."""

REFERENCE_SLICE_MM = 3.0
"""Agatston 1990 scored contiguous 3 mm slices; other spacings are rescaled to this (Ohnesorge 2002)."""

DENSITY_WEIGHT_FLOORS_HU = (130.0, 200.0, 300.0, 400.0)
"""Peak HU from which the Agatston density weight is 1, 2, 3 and 4."""

MASS_MARGIN_MM = 1.5
"""In-plane growth of a lesion for its mass integral: the CT point-spread (about 1 mm FWHM in-plane at standard
kernels) puts measurable excess attenuation up to about this far outside the 130 HU contour."""

BACKGROUND_SHELL_MM = 2.0
"""Width of the shell around the mass footprint whose median HU is the lesion's background."""

FAT_HU = -30.0
"""Below this a voxel is fat (or air); it neither holds calcium partial volume worth counting nor is it the tissue a
calcification replaces, so it is excluded from the mass integral and from the background."""

_IN_PLANE_8 = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE_8[1] = True
"""8-neighbourhood within a slice and nothing across slices: labels every slice's 2-D lesions in one call."""


def density_weight(peak_hu: float) -> int:
    """Agatston density weight (1-4) of a lesion with this peak HU on its slice; 0 below the threshold."""
    weight = 0
    for floor in DENSITY_WEIGHT_FLOORS_HU:
        if peak_hu >= floor:
            weight += 1
    return weight


@dataclass(frozen=True)
class MassCalibration:
    """Hydroxyapatite calibration for calcium mass (McCollough 2007): mg of HA per cm3 per HU.

    ``source`` says where the factor came from (a calibration insert in this scan, or a nominal value for the tube
    voltage), so that the reader of a mass knows how far to trust it.
    """

    mg_per_cm3_per_hu: float
    source: str

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mg_per_cm3_per_hu) and self.mg_per_cm3_per_hu > 0):
            raise ValueError(f"A mass calibration factor must be positive, got {self.mg_per_cm3_per_hu}.")

    @classmethod
    def from_inserts(
        cls, calcium_hu: float, water_hu: float, calcium_mg_per_cm3: float, *, description: str
    ) -> MassCalibration:
        """``c_HA = rho_HA / (CT_HA - CT_water)`` from a calibration insert of known density and a water insert."""
        if calcium_hu - water_hu <= 0:
            raise ValueError(
                f"The calcium insert ({calcium_hu:.0f} HU) must be brighter than the water insert ({water_hu:.0f} HU)."
            )
        factor = calcium_mg_per_cm3 / (calcium_hu - water_hu)
        return cls(
            factor,
            f"{description}: {calcium_mg_per_cm3:g} mg HA/cm3 insert {calcium_hu:.0f} HU, water insert "
            f"{water_hu:.0f} HU, c_HA = {factor:.3f} mg/cm3 per HU (McCollough 2007)",
        )


@dataclass(frozen=True)
class CalciumLesion:
    """One lesion: a 3-D connected set of calcium voxels (slices joined where they overlap in-plane).

    ``agatston`` is the raw per-slice sum of this lesion's 2-D parts (no slice-spacing rescaling); ``slices`` the
    slice indices it covers, ``peak_hu`` its highest voxel, ``centroid`` its centre in voxel coordinates of the
    whole volume (slice, row, column).
    """

    agatston: float
    volume_mm3: float
    mass_mg: float | None
    peak_hu: float
    slices: tuple[int, ...]
    centroid: tuple[float, float, float]
    voxels: int


@dataclass(frozen=True)
class CalciumScore:
    """The calcium inside one region, scored three ways.

    ``agatston`` is the score at the reference 3 mm spacing (``agatston_raw`` times ``slice_factor``, the Ohnesorge
    equivalent score); ``mask`` holds the scored voxels in the region's bounding box ``box`` and ``weights`` their
    Agatston density weight (1-4, per 2-D lesion), for key images.
    """

    agatston: float
    agatston_raw: float
    slice_factor: float
    volume_mm3: float
    mass_mg: float | None
    calibration: MassCalibration | None
    lesions: tuple[CalciumLesion, ...]
    box: tuple[slice, slice, slice]
    weights: np.ndarray
    pixel_mm2: float = 0.0

    @property
    def lesion_count(self) -> int:
        return len(self.lesions)

    def weights_in(self, shape: tuple[int, ...]) -> np.ndarray:
        """The density weights (uint8, 0 = no scored calcium) placed in an array of the whole volume's shape."""
        full = np.zeros(shape, dtype=np.uint8)
        full[self.box] = self.weights
        return full


def bounding_box(mask: np.ndarray, margin: tuple[int, int, int] = (0, 0, 0)) -> tuple[slice, slice, slice] | None:
    """The smallest box (one slice per axis) holding every True voxel, grown by ``margin``; None when empty."""
    spans = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        if hits.size == 0:
            return None
        spans.append(
            slice(max(int(hits[0]) - margin[axis], 0), min(int(hits[-1]) + 1 + margin[axis], mask.shape[axis]))
        )
    return spans[0], spans[1], spans[2]


def _shifted(box: tuple[slice, ...], by: tuple[int, ...]) -> tuple[slice, slice, slice]:
    z, r, c = (slice(b.start + d, b.stop + d) for b, d in zip(box, by, strict=True))
    return z, r, c


def _grown(box: tuple[slice, ...], margin: tuple[int, ...], shape: tuple[int, ...]) -> tuple[slice, slice, slice]:
    z, r, c = (slice(max(b.start - g, 0), min(b.stop + g, n)) for b, g, n in zip(box, margin, shape, strict=True))
    return z, r, c


def score_calcium(
    hu: np.ndarray,
    region: np.ndarray,
    spacing: tuple[float, float, float],
    *,
    calibration: MassCalibration | None = None,
    slice_spacing_mm: float | None = None,
    region_at: tuple[int, int, int] = (0, 0, 0),
) -> CalciumScore:
    """Agatston score, volume and (when ``calibration`` is given) mass of the calcium inside ``region``.

    ``hu`` is ``(slices, rows, columns)`` in HU, ``region`` a boolean array of the same shape, ``spacing`` (slice,
    row, column) in mm. ``slice_spacing_mm`` is the distance between slice centres when it differs from the voxel
    spacing given (it never does for volumes from :mod:`dicom_io.volume`); it sets the rescaling to 3 mm.
    A 2-D lesion counts when its area inside the region is at least 1 mm2; pixels of a lesion outside the region are
    never scored (they belong to another structure). The mass integral may look just outside the region, because
    a calcification's blur does.

    ``region`` may also be a part of such an array, whose first voxel lies at ``region_at`` in ``hu`` (the
    bounding box of a territory, say): it is then never copied into an array the size of the volume.
    """
    if hu.ndim != 3 or region.ndim != 3:
        raise ValueError(f"hu {hu.shape} and region {region.shape} must be 3-D.")
    if any(a < 0 or a + n > m for a, n, m in zip(region_at, region.shape, hu.shape, strict=True)):
        raise ValueError(f"A region of shape {region.shape} at {region_at} does not fit in hu {hu.shape}.")
    dz, dy, dx = (float(s) for s in spacing)
    pixel_mm2 = dy * dx
    voxel_mm3 = pixel_mm2 * dz
    factor = (slice_spacing_mm if slice_spacing_mm is not None else dz) / REFERENCE_SLICE_MM
    reach = MASS_MARGIN_MM + BACKGROUND_SHELL_MM
    margin = (1, math.ceil(reach / dy) + 1, math.ceil(reach / dx) + 1)
    occupied = bounding_box(region)
    if occupied is None:
        empty = np.zeros((0, 0, 0), dtype=np.uint8)
        return CalciumScore(
            0.0, 0.0, factor, 0.0, 0.0 if calibration else None, calibration, (), (slice(0, 0),) * 3, empty, pixel_mm2
        )
    # where the region lies in the volume, and that box grown by the margin the mass integral looks into
    placed = _shifted(occupied, region_at)
    box = _grown(placed, margin, hu.shape)
    local_hu = hu[box]
    calcium = local_hu >= CALCIUM_THRESHOLD_HU
    inside = np.zeros(calcium.shape, dtype=bool)
    inside[_shifted(placed, tuple(-b.start for b in box))] = region[occupied]
    calcium &= inside
    weights = np.zeros(calcium.shape, dtype=np.uint8)
    # Calcium is a few thousand voxels of a box of millions: label and measure inside the calcium's own bounding
    # box. Cropping keeps the raster order, so lesions are numbered (and listed) as in the whole box.
    found = bounding_box(calcium)
    if found is None:
        return CalciumScore(
            0.0, 0.0, factor, 0.0, 0.0 if calibration else None, calibration, (), box, weights, pixel_mm2
        )
    calcium = calcium[found]
    found_hu = local_hu[found]
    offset = np.array([f.start for f in found], dtype=np.intp)

    # 2-D lesions: label each slice in-plane (a 3-D label with a structuring element that has no z neighbours).
    labels_2d, count_2d = ndimage.label(calcium, structure=_IN_PLANE_8)
    # area and peak of every 2-D lesion from its voxels alone, not from the whole box
    numbers = labels_2d[calcium]
    areas = np.bincount(numbers, minlength=count_2d + 1)[1:] * pixel_mm2
    order = np.argsort(numbers, kind="stable")
    firsts = np.flatnonzero(np.diff(numbers[order], prepend=0))  # every number 1..count_2d labels some voxel
    peaks = np.maximum.reduceat(found_hu[calcium][order], firsts).astype(np.float64)
    kept = areas >= MIN_LESION_AREA_MM2 - 1e-9
    lesion_weight = np.array([density_weight(float(p)) for p in peaks], dtype=np.uint8) * kept
    table = np.zeros(count_2d + 1, dtype=np.uint8)
    table[1:] = lesion_weight
    found_weights = table[labels_2d]
    weights[found] = found_weights
    scored = found_weights > 0
    per_2d_score = areas * lesion_weight

    # 3-D lesions join the kept 2-D lesions that touch across slices: the unit a reader (and the mass) counts.
    labels_3d, _count_3d = ndimage.label(scored, structure=ndimage.generate_binary_structure(3, 3))
    lesions: list[CalciumLesion] = []
    integrator = None
    if calibration is not None:
        # the mass integral looks around each lesion, beyond the calcium's box: it works in the region's box
        box_labels = np.zeros(local_hu.shape, dtype=labels_3d.dtype)
        box_labels[found] = labels_3d
        integrator = _MassIntegrator(local_hu, dy, dx, voxel_mm3, calibration)
    total_mass = 0.0
    origin = np.array([b.start for b in box], dtype=np.float64)
    for number, where in enumerate(ndimage.find_objects(labels_3d), start=1):
        if where is None:
            continue
        voxels = labels_3d[where] == number
        members = np.unique(labels_2d[where][voxels])
        raw = float(per_2d_score[members - 1].sum())
        mass = None
        if integrator is not None:
            in_box = tuple(slice(w.start + f.start, w.stop + f.start) for w, f in zip(where, found, strict=True))
            mass = integrator.mass(box_labels, number, in_box)
            total_mass += mass
        zyx = np.argwhere(voxels) + (np.array([w.start for w in where]) + offset)
        centre = zyx.mean(axis=0) + origin
        lesions.append(
            CalciumLesion(
                agatston=raw,
                volume_mm3=float(zyx.shape[0]) * voxel_mm3,
                mass_mg=mass,
                peak_hu=float(found_hu[where][voxels].max()),
                slices=tuple(int(z) + box[0].start for z in np.unique(zyx[:, 0])),
                centroid=(float(centre[0]), float(centre[1]), float(centre[2])),
                voxels=int(zyx.shape[0]),
            )
        )
    raw_total = float(per_2d_score.sum())
    return CalciumScore(
        agatston=raw_total * factor,
        agatston_raw=raw_total,
        slice_factor=factor,
        volume_mm3=float(np.count_nonzero(scored)) * voxel_mm3,
        mass_mg=total_mass if calibration is not None else None,
        calibration=calibration,
        lesions=tuple(lesions),
        box=box,
        weights=weights,
        pixel_mm2=pixel_mm2,
    )


class _MassIntegrator:
    """The integrated mass of one lesion after another (module docstring: calcium mass).

    Each lesion's footprint is the lesion grown by :data:`MASS_MARGIN_MM` in-plane on its own slices and the
    slices above and below; a voxel already counted for an earlier lesion is not counted again. Everything is done
    in a small window around the lesion.
    """

    def __init__(
        self,
        hu: np.ndarray,
        dy: float,
        dx: float,
        voxel_mm3: float,
        calibration: MassCalibration,
    ):
        self.hu, self.voxel_mm3, self.calibration = hu, voxel_mm3, calibration
        self.claimed = np.zeros(hu.shape, dtype=bool)
        grow = (round(MASS_MARGIN_MM / dy), round(MASS_MARGIN_MM / dx))
        shell = (math.ceil(BACKGROUND_SHELL_MM / dy), math.ceil(BACKGROUND_SHELL_MM / dx))
        self.grow = rows_of(_disc(*grow))  # in-plane; the slices above and below are added after
        self.shell = rows_of(_disc(*shell))
        self.pad = (1, grow[0] + shell[0] + 1, grow[1] + shell[1] + 1)

    def mass(self, labels: np.ndarray, number: int, where: tuple[slice, ...]) -> float:
        """``c_HA * sum(HU - background) * voxel volume`` over the lesion's footprint, fat left out.

        The background is the median of the non-fat, non-calcium voxels in a :data:`BACKGROUND_SHELL_MM` shell
        around the footprint, outside the footprints already counted.
        """
        window = tuple(
            slice(max(w.start - p, 0), min(w.stop + p, n))
            for w, p, n in zip(where, self.pad, labels.shape, strict=True)
        )
        own = labels[window] == number
        grown = dilate(own, self.grow)
        footprint = grown.copy()
        footprint[1:] |= grown[:-1]
        footprint[:-1] |= grown[1:]
        footprint &= ~self.claimed[window]
        self.claimed[window] |= footprint
        values = self.hu[window]
        # the median ignores the few blurred voxels of a neighbouring calcification that fall in the shell
        shell = dilate(footprint, self.shell) & ~self.claimed[window]
        shell &= (values >= FAT_HU) & (values < CALCIUM_THRESHOLD_HU)
        background = float(np.median(values[shell])) if np.count_nonzero(shell) >= 8 else 0.0
        counted = footprint & (values >= FAT_HU)
        excess = float((values[counted].astype(np.float64) - background).sum())
        return self.calibration.mg_per_cm3_per_hu / 1000.0 * excess * self.voxel_mm3


def _disc(ry: int, rx: int) -> np.ndarray:
    rr, cc = np.ogrid[-ry : ry + 1, -rx : rx + 1]
    return np.asarray((rr / max(ry, 1)) ** 2 + (cc / max(rx, 1)) ** 2 <= 1.0 + 1e-9)

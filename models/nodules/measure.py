"""Segment one lung nodule around a seed point and measure it the way the guidelines measure.

Segmentation (in the spirit of Kostis WJ et al., IEEE Trans Med Imaging 2003;22:1259-1274, and Lassen BC et al.,
Phys Med Biol 2015;60:1307-1323: threshold region growing set from the nodule and its surrounding lung, chest wall
cut off by the convex hull of the lung, attached vessels detached by a morphological opening):

1. A region of interest around the seed, sized from a first estimate of the nodule's radius.
2. The threshold is the half-way value between the surrounding aerated lung (median HU of the lung voxels in the
   region) and the nodule's core (90th percentile within the core): a blurred step edge crosses its half-way value
   where the true edge is, so solid nodules (core about 0 HU) are cut near -430 HU and ground-glass nodules (core
   about -550 HU) near -700 HU, each at its own edge.
3. Juxtapleural nodules: the nodule may only grow inside the per-slice convex hull of the lung around it. The
   pleural surface is convex where it meets the chest wall, so the hull's edge runs along the pleura and cuts the
   nodule from the wall while keeping the part that bulges into the lung.
4. Juxtavascular nodules: an opening with a ball of 40 % of the nodule's radius (1 to 3 mm) removes the vessels
   thinner than the ball that touch the nodule, and only the piece holding the seed is kept. A nodule with a
   broad attachment to the mediastinum cannot be told from it this way; the segmentation is then flagged.

Measurement, as Lung-RADS v2022 and the Fleischner Society (Bankier AA et al., Radiology 2017;285:584-600) define
it: long axis = the longest diameter on an axial slice, short axis = the longest diameter perpendicular to it on
the same slice, on the slice where the long axis is longest; mean diameter = their average to 0.1 mm. Diameters are
measured on the convex outline of the nodule's pixels (pixel edges, not centres), as calipers placed on the
nodule's outer edge would. Volume counts the segmented voxels.

Composition: a solid component is present where voxels reach -300 HU and its size is measured at -130 HU (Scholten
ET et al., Eur Radiol 2015;25:488-496: -300 HU detected a solid component with 90 % sensitivity and 88 %
specificity; at -130 HU semi-automatic solid-component diameters agreed with manual ones). Calcification: voxels of
200 HU and more (Khan AN et al., Ann Thorac Med 2010;5:67-79; Siegelman SS et al., Radiology 1986;160:307-312 found
benign nodules above 164 HU); its pattern (diffuse, central, popcorn) decides whether it is a benign calcification
(Lung-RADS category 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from models.nodules.distance import depth_mm

NoduleType = Literal["solid", "part-solid", "ground-glass"]
Calcification = Literal["none", "diffuse", "central", "popcorn", "non-benign"]

AERATED_LUNG_HU = -400.0
"""Below this a voxel is aerated lung (the lung segmentation's threshold, models.lung.AIR_THRESHOLD_HU)."""
SOLID_COMPONENT_HU = -300.0
"""A solid component is present where voxels reach this value (Scholten et al. 2015)."""
SOLID_SIZE_HU = -130.0
"""The solid component is measured at this value (Scholten et al. 2015)."""
CALCIUM_HU = 200.0
"""Calcified voxels (Khan et al. 2010; Siegelman et al. 1986: benign nodules above 164 HU)."""
LOWEST_EDGE_HU = -750.0
"""The half-way threshold is never set below this: fainter than that is lung, not a ground-glass nodule."""
HIGHEST_EDGE_HU = -350.0
"""... nor above this, which would cut into the partial-volume rim of a dense nodule."""

BENIGN_CALCIFICATIONS: tuple[Calcification, ...] = ("diffuse", "central", "popcorn")
"""Calcification patterns Lung-RADS v2022 (category 1) and Fleischner 2017 call benign (concentric rings are also
benign; they are not told apart from diffuse calcification here)."""

_DIFFUSE_FRACTION = 0.25  # a fully calcified nodule's partial-volume rim stays below 200 HU: a quarter suffices
_CENTRAL_OFFSET = 0.33  # calcium's centre within a third of the radius from the nodule's centre
_CENTRAL_MIN_FRACTION = 0.05
_POPCORN_MIN_FOCI = 3
_MIN_CALCIFIED_MM3 = 2.0  # fewer calcified voxels than this are noise or a crossing vessel wall


@dataclass(frozen=True)
class AxialDiameters:
    """Long and short axis on one axial slice; endpoints are (row, column) in the volume's pixel grid."""

    long_mm: float
    short_mm: float
    slice_index: int
    long_axis: tuple[tuple[float, float], tuple[float, float]]
    short_axis: tuple[tuple[float, float], tuple[float, float]]

    @property
    def mean_mm(self) -> float:
        """Lung-RADS v2022 mean diameter: the average of long and short axis, to one decimal."""
        return round((self.long_mm + self.short_mm) / 2.0, 1)


@dataclass(frozen=True)
class NoduleSegmentation:
    """One nodule's voxels: ``mask`` covers the box starting at ``origin`` (slice, row, column) of the volume."""

    mask: np.ndarray
    origin: tuple[int, int, int]
    threshold_hu: float
    lung_hu: float
    vessels_detached: bool
    pleural_contact: bool
    uncertain: bool
    compact_share: float
    """The share of the structure the nodule belongs to (after the opening) that lies within twice its inscribed
    radius of its centre: 1 for a nodule that ends there, low for a vessel or airway wall running on beyond it."""
    surface_lung_share: float
    """The share of the voxels just outside the nodule (its face neighbours) that are aerated lung."""
    surface_wall_share: float
    """The share of those voxels that are tissue beyond the lung's outline (chest wall, mediastinum, diaphragm)."""

    def box(self) -> tuple[slice, slice, slice]:
        z, y, x = self.origin
        d, h, w = self.mask.shape
        return slice(z, z + d), slice(y, y + h), slice(x, x + w)


@dataclass(frozen=True)
class NoduleMeasures:
    """What Lung-RADS, Fleischner and Brock need to know about one nodule, measured on the image."""

    diameters: AxialDiameters
    volume_mm3: float
    nodule_type: NoduleType
    solid_share: float
    solid_component: AxialDiameters | None
    solid_volume_mm3: float
    calcification: Calcification
    calcified_fraction: float
    mean_hu: float
    centroid: tuple[float, float, float]
    sphericity: float
    craniocaudal_mm: float
    """Extent along the patient's long axis: the slices holding the nodule times the slice spacing."""

    @property
    def mean_diameter_mm(self) -> float:
        return self.diameters.mean_mm

    @property
    def solid(self) -> AxialDiameters | None:
        """The solid component's diameters, for a part-solid nodule (the one type whose solid part is measured)."""
        return self.solid_component if self.nodule_type == "part-solid" else None

    @property
    def solid_mean_diameter_mm(self) -> float:
        return self.solid.mean_mm if self.solid is not None else 0.0

    @property
    def benign_calcification(self) -> bool:
        return self.calcification in BENIGN_CALCIFICATIONS


def segment_nodule(
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    seed: tuple[int, int, int],
    *,
    lung: np.ndarray | None = None,
    radius_mm: float | None = None,
) -> NoduleSegmentation | None:
    """Segment the nodule around ``seed`` (slice, row, column); None when nothing denser than lung is there.

    ``lung`` is the aerated-lung mask of the whole volume (the lung segmentation); without it, voxels below
    -400 HU in the region are taken as lung (enough for a crop that lies inside the lungs).
    """
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    radius = radius_mm if radius_mm is not None else _estimate_radius(hu, spacing_arr, seed)
    if radius is None:
        return None
    half = np.ceil((2.0 * radius + 8.0) / spacing_arr).astype(int)
    half[0] = max(half[0], 1)
    lo = np.maximum(np.asarray(seed) - half, 0)
    hi = np.minimum(np.asarray(seed) + half + 1, hu.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    roi = np.asarray(hu[box], dtype=np.float32)
    local_seed = tuple(int(s - a) for s, a in zip(seed, lo, strict=True))
    aerated = (lung[box] if lung is not None else np.ones(roi.shape, dtype=bool)) & (roi < AERATED_LUNG_HU)
    if np.count_nonzero(aerated) < 10:
        return None
    lung_hu = float(np.median(roi[aerated]))
    core = roi[_ball(roi.shape, local_seed, max(radius * 0.5, float(spacing_arr[1:].max())), spacing_arr)]
    core_hu = float(np.percentile(core, 90)) if core.size else float(roi[local_seed])
    if core_hu <= lung_hu + 100.0:
        return None  # nothing denser than the lung around it
    threshold = float(np.clip((lung_hu + core_hu) / 2.0, LOWEST_EDGE_HU, HIGHEST_EDGE_HU))

    allowed = _pleura_bounded(aerated)
    dense = (roi >= threshold) & allowed
    inscribed = depth_mm(dense, spacing_arr)
    centre = _inscribed_centre(dense, inscribed, local_seed, spacing_arr, radius)
    if centre is None:
        return None
    # The nodule's own radius: the largest ball that fits in it, centred on the seed's local maximum.
    radius = float(inscribed[centre])
    opening_mm = float(np.clip(0.5 * radius, 1.0, 4.0))
    opened = _open(dense, spacing_arr, opening_mm, depth=inscribed)
    component = _component_at(opened, centre, spacing_arr, radius)
    whole = _component_at(dense, centre, spacing_arr, radius)
    if component is None:  # the opening removed a nodule thinner than the ball: keep it unopened
        component = whole
    if component is None:
        return None
    # A nodule is compact: nothing of it lies further than twice its inscribed radius (plus a voxel) from the
    # centre of that ball. What lies further is a vessel or wall the opening could not cut off.
    reach = _ball(roi.shape, centre, 2.0 * radius + float(spacing_arr.max()), spacing_arr)
    clipped = component & reach
    uncertain = bool(np.count_nonzero(clipped) < 0.9 * np.count_nonzero(component))
    structure = np.count_nonzero(component)
    component = _component_at(clipped, centre, spacing_arr, radius)
    if component is None:
        return None
    compact_share = np.count_nonzero(component) / structure
    around = _face_neighbours(component)
    around_count = max(int(np.count_nonzero(around)), 1)
    lung_share = np.count_nonzero(around & aerated) / around_count
    wall_share = np.count_nonzero(around & ~allowed & (roi >= threshold)) / around_count
    vessels_detached = bool(whole is not None and np.count_nonzero(whole) > 1.15 * np.count_nonzero(component))
    pleural_contact = _touches(component, ~allowed & (roi >= threshold))
    uncertain = uncertain or _touches_box_edge(component)
    return NoduleSegmentation(
        mask=component,
        origin=(int(lo[0]), int(lo[1]), int(lo[2])),
        threshold_hu=round(threshold, 1),
        lung_hu=round(lung_hu, 1),
        vessels_detached=vessels_detached,
        pleural_contact=pleural_contact,
        uncertain=uncertain,
        compact_share=round(float(compact_share), 3),
        surface_lung_share=round(float(lung_share), 3),
        surface_wall_share=round(float(wall_share), 3),
    )


def measure_nodule(
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    nodule: NoduleSegmentation,
    type_rule: TypeRule | None = None,
) -> NoduleMeasures:
    """Diameters, volume, type, solid component and calcification of a segmented nodule."""
    box = nodule.box()
    roi = np.asarray(hu[box], dtype=np.float32)
    mask = nodule.mask
    voxel_mm3 = float(np.prod(spacing))
    pixel = (float(spacing[1]), float(spacing[2]))
    diameters = axial_diameters(mask, pixel, nodule.origin)
    values = roi[mask]

    solid_presence = mask & (roi >= SOLID_COMPONENT_HU)
    solid_sized = mask & (roi >= SOLID_SIZE_HU)
    solid = axial_diameters(solid_sized, pixel, nodule.origin) if np.count_nonzero(solid_sized) else None
    solid_volume = float(np.count_nonzero(solid_sized)) * voxel_mm3
    solid_share = float(np.count_nonzero(solid_presence) / values.size)

    zz, yy, xx = np.nonzero(mask)
    centroid = (
        float(zz.mean()) + nodule.origin[0],
        float(yy.mean()) + nodule.origin[1],
        float(xx.mean()) + nodule.origin[2],
    )
    calcification, fraction = classify_calcification(roi, mask, spacing)
    volume = float(values.size) * voxel_mm3
    measures = NoduleMeasures(
        diameters=diameters,
        volume_mm3=round(volume, 1),
        nodule_type="solid",
        solid_share=round(solid_share, 3),
        solid_component=solid,
        solid_volume_mm3=round(solid_volume, 1),
        calcification=calcification,
        calcified_fraction=round(fraction, 3),
        mean_hu=round(float(values.mean()), 1),
        centroid=centroid,
        sphericity=round(_sphericity(mask, spacing, volume), 3),
        craniocaudal_mm=round(float(zz.max() - zz.min() + 1) * float(spacing[0]), 2),
    )
    return with_type_rule(measures, type_rule or TypeRule())


def with_type_rule(measures: NoduleMeasures, rule: TypeRule) -> NoduleMeasures:
    """The measures with the type decided by ``rule`` (nothing is re-segmented or re-measured)."""
    nodule_type = classify_type(measures.solid_share, rule)
    if nodule_type == "part-solid" and measures.solid_component is None:
        nodule_type = "ground-glass"  # a solid share too faint to measure at -130 HU
    return replace(measures, nodule_type=nodule_type)


@dataclass(frozen=True)
class TypeRule:
    """Solid / part-solid / ground-glass from the share of the nodule's voxels at -300 HU or more.

    -300 HU tells solid tissue from ground glass (Scholten et al. 2015). How large a share makes a nodule solid, and
    how small one leaves it ground-glass, has no published value for automatic segmentations (whose partial-volume
    rim is never fully solid), so the two cut-offs are fitted to the LIDC radiologists' texture ratings on the
    training patients by ``models.training.train_nodules`` and shipped with the weights; these defaults are only
    used by callers that have no weights.
    """

    ground_glass_below: float = 0.25
    solid_from: float = 0.6


def classify_type(solid_share: float, rule: TypeRule) -> NoduleType:
    """The nodule type from the share of its voxels at -300 HU or more (see :class:`TypeRule`)."""
    if solid_share < rule.ground_glass_below:
        return "ground-glass"
    if solid_share >= rule.solid_from:
        return "solid"
    return "part-solid"


def classify_calcification(
    roi: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float]
) -> tuple[Calcification, float]:
    """Calcification pattern and the calcified share of the nodule's volume (see the module docstring)."""
    calcified = mask & (roi >= CALCIUM_HU)
    count = int(np.count_nonzero(calcified))
    total = int(np.count_nonzero(mask))
    voxel_mm3 = float(np.prod(spacing))
    if total == 0 or count * voxel_mm3 < _MIN_CALCIFIED_MM3:
        return "none", 0.0
    fraction = count / total
    if fraction >= _DIFFUSE_FRACTION:
        return "diffuse", fraction
    scale = np.asarray(spacing, dtype=np.float64)
    centre = np.array([c.mean() for c in np.nonzero(mask)]) * scale
    calcium_centre = np.array([c.mean() for c in np.nonzero(calcified)]) * scale
    radius = (3.0 * total * voxel_mm3 / (4.0 * math.pi)) ** (1.0 / 3.0)
    foci, _ = ndimage.label(calcified, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(foci.ravel())[1:] * voxel_mm3
    if int(np.count_nonzero(sizes >= _MIN_CALCIFIED_MM3 / 2.0)) >= _POPCORN_MIN_FOCI:
        return "popcorn", fraction
    if fraction >= _CENTRAL_MIN_FRACTION and np.linalg.norm(calcium_centre - centre) <= _CENTRAL_OFFSET * radius:
        return "central", fraction
    return "non-benign", fraction


def axial_diameters(
    mask: np.ndarray, pixel_mm: tuple[float, float], origin: tuple[int, int, int] = (0, 0, 0)
) -> AxialDiameters:
    """Long and short axis on the axial slice where the long axis is longest (see the module docstring).

    The long axis is measured on every slice, the short axis only on the slice chosen.
    """
    best: tuple[int, float, _LongAxis] | None = None
    for k in np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)):
        measured = _long_axis(mask[k], pixel_mm)
        if measured is None:
            continue
        # A later slice must beat the chosen one's long axis as filed (0.01 mm) to replace it.
        if best is None or measured.length_mm > round(best[1], 2) + 1e-9:
            best = (int(k), measured.length_mm, measured)
    if best is None:
        raise ValueError("axial_diameters needs a non-empty mask.")
    chosen, long_mm, axis = best
    short_mm, short_axis = _short_axis(axis)
    offset = np.array([origin[1], origin[2]], dtype=np.float64)
    return AxialDiameters(
        long_mm=round(long_mm, 2),
        short_mm=round(short_mm, 2),
        slice_index=chosen + origin[0],
        long_axis=_shift(axis.ends, offset),
        short_axis=_shift(short_axis, offset),
    )


def _shift(
    segment: tuple[np.ndarray, np.ndarray], offset: np.ndarray
) -> tuple[tuple[float, float], tuple[float, float]]:
    a, b = segment
    return (float(a[0] + offset[0]), float(a[1] + offset[1])), (float(b[0] + offset[0]), float(b[1] + offset[1]))


@dataclass(frozen=True)
class _LongAxis:
    """The caliper long axis of one slice's pixels: its length, its ends (pixel coordinates) and the hull (mm)."""

    length_mm: float
    ends: tuple[np.ndarray, np.ndarray]
    hull: np.ndarray
    direction: np.ndarray
    scale: np.ndarray


def _long_axis(plane: np.ndarray, pixel_mm: tuple[float, float]) -> _LongAxis | None:
    """The longest distance between two points of the convex outline of the pixels' edges (mm)."""
    rows, cols = np.nonzero(plane)
    if rows.size == 0:
        return None
    scale = np.array(pixel_mm, dtype=np.float64)
    corners = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])
    points = (np.stack([rows, cols], axis=1)[:, None, :] + corners[None, :, :]).reshape(-1, 2) * scale
    try:
        hull = points[ConvexHull(points).vertices]
    except QhullError:
        hull = points
    distances = np.linalg.norm(hull[:, None, :] - hull[None, :, :], axis=-1)
    i, j = np.unravel_index(int(np.argmax(distances)), distances.shape)
    long_mm = float(distances[i, j])
    direction = (hull[j] - hull[i]) / long_mm
    return _LongAxis(long_mm, (hull[i] / scale, hull[j] / scale), hull, direction, scale)


def _short_axis(axis: _LongAxis) -> tuple[float, tuple[np.ndarray, np.ndarray]]:
    """The longest chord perpendicular to the long axis (mm) and its ends (pixel coordinates)."""
    direction = axis.direction
    normal = np.array([-direction[1], direction[0]])
    short_mm, positions = _longest_chord(axis.hull, axis.hull @ direction, axis.hull @ normal)
    base = direction * positions[0]
    ends = ((base + normal * positions[1]) / axis.scale, (base + normal * positions[2]) / axis.scale)
    return short_mm, ends


def _longest_chord(hull: np.ndarray, along: np.ndarray, across: np.ndarray) -> tuple[float, tuple[float, float, float]]:
    """The longest chord of the convex polygon ``hull`` perpendicular to the long axis.

    ``along`` / ``across`` are the vertices' coordinates along the long axis and its normal. A chord at position
    t along the axis runs between the polygon's two edges that cross t; the longest one lies at a vertex, so
    only the vertices' positions are tried. Returns its length and (t, low, high) in mm.
    """
    n = hull.shape[0]
    best = (0.0, (float(along.mean()), float(across.min()), float(across.max())))
    if n < 3:
        return float(across.max() - across.min()), best[1]
    order = np.arange(n)
    a0, a1 = along[order], along[(order + 1) % n]
    c0, c1 = across[order], across[(order + 1) % n]
    for t in along:
        crossing = (np.minimum(a0, a1) <= t + 1e-9) & (np.maximum(a0, a1) >= t - 1e-9)
        if not crossing.any():
            continue
        span = a1[crossing] - a0[crossing]
        with np.errstate(invalid="ignore", divide="ignore"):
            weight = np.where(np.abs(span) > 1e-12, (t - a0[crossing]) / span, 0.0)
        values = c0[crossing] + weight * (c1[crossing] - c0[crossing])
        flat = np.abs(span) <= 1e-12  # an edge lying along the chord: both its ends count
        values = np.concatenate([values, c1[crossing][flat]])
        length = float(values.max() - values.min())
        if length > best[0]:
            best = (length, (float(t), float(values.min()), float(values.max())))
    return best


def _estimate_radius(hu: np.ndarray, spacing: np.ndarray, seed: tuple[int, int, int]) -> float | None:
    """A first radius: the distance from the seed to the nearest voxel below -500 HU, at least one pixel."""
    half = np.ceil(25.0 / spacing).astype(int)
    lo = np.maximum(np.asarray(seed) - half, 0)
    hi = np.minimum(np.asarray(seed) + half + 1, hu.shape)
    roi = np.asarray(hu[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))])
    local = tuple(int(s - a) for s, a in zip(seed, lo, strict=True))
    dense = roi >= -500.0
    if not dense[local]:
        # A faint (ground-glass) nodule: use the lower threshold.
        dense = roi >= LOWEST_EDGE_HU + 100.0
        if not dense[local]:
            return None
    distance = depth_mm(dense, spacing)
    return float(max(distance[local], spacing[1:].max()))


def _inscribed_centre(
    dense: np.ndarray, inscribed: np.ndarray, seed: tuple[int, ...], spacing: np.ndarray, radius_mm: float
) -> tuple[int, int, int] | None:
    """The deepest voxel of the dense structure within ``radius_mm`` of the seed (its local maximum)."""
    near = _ball(dense.shape, seed, max(radius_mm, float(spacing.max())), spacing) & dense
    if not near.any():
        return None
    values = np.where(near, inscribed, -1.0)
    z, y, x = np.unravel_index(int(np.argmax(values)), values.shape)
    return int(z), int(y), int(x)


def _ball(shape: tuple[int, ...], centre: tuple[int, ...], radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    distance2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre, spacing, strict=True))
    return np.asarray(distance2 <= radius_mm**2)


def _pleura_bounded(aerated: np.ndarray) -> np.ndarray:
    """Per-slice convex hull of the aerated lung: where a nodule may lie (the chest wall is outside)."""
    allowed = np.zeros(aerated.shape, dtype=bool)
    for k in range(aerated.shape[0]):
        if np.count_nonzero(aerated[k]) >= 3:
            try:
                allowed[k] = convex_hull_2d(aerated[k])
            except QhullError:
                allowed[k] = aerated[k]
    return allowed


def convex_hull_2d(mask: np.ndarray) -> np.ndarray:
    """The pixels whose centres lie in the convex hull of ``mask``'s pixels, their edges included.

    The same pixels as :func:`skimage.morphology.convex_hull_image` with its defaults (the hull of the mid-points of
    every pixel's four edges, a pixel centre on the hull's edge counted in), computed from the first and last pixel
    of each row only (every other pixel, and its edges' mid-points, lies between theirs), and filled row by row as
    the run between the hull's left and right edges instead of testing every pixel against the polygon: every
    candidate's segmentation needs the hull of each of its slices. Points of the half-pixel lattice lie on an edge
    or at least 1/(2 |edge|) pixels from its line, so the tolerance decides nothing but the points on edges.
    """
    height, width = mask.shape
    rows = np.flatnonzero(mask.any(axis=1))
    first = mask[rows].argmax(axis=1)
    last = width - 1 - mask[rows, ::-1].argmax(axis=1)
    ends = np.concatenate([np.stack([rows, first], axis=1), np.stack([rows, last], axis=1)])
    # On a doubled grid every edge mid-point is a whole number: one integer key per point removes the repeats.
    doubled = (2 * ends[:, None, :] + _EDGE_MIDPOINTS_DOUBLED[None, :, :]).reshape(-1, 2)
    stride = 2 * max(height, width) + 2
    keys = np.unique((doubled[:, 0] + 1) * stride + (doubled[:, 1] + 1))
    hull = ConvexHull(np.stack([keys // stride - 1, keys % stride - 1], axis=1) / 2.0)
    # Edge i keeps the centres (r, c) with a_i r + b_i c + d_i <= tolerance. On each row that bounds c from above
    # (b_i > 0) or below (b_i < 0), or keeps or drops the whole row (b_i = 0): the hull is one run of each row.
    a, b, d = hull.equations[:, 0, None], hull.equations[:, 1, None], hull.equations[:, 2, None]
    slack = 1e-9 - d - a * np.arange(height, dtype=np.float64)[None, :]  # (edges, rows): b_i c <= slack
    safe_b = np.where(b == 0, 1.0, b)
    upper = np.where(b > 0, slack / safe_b, np.inf).min(axis=0)
    lower = np.where(b < 0, slack / safe_b, -np.inf).max(axis=0)
    rows_kept = np.asarray(np.where(b == 0, slack >= 0, True).all(axis=0))
    columns = np.arange(width, dtype=np.float64)[None, :]
    return (columns >= lower[:, None]) & (columns <= upper[:, None]) & rows_kept[:, None]


_EDGE_MIDPOINTS_DOUBLED = np.array([[-1, 0], [1, 0], [0, -1], [0, 1]])


def _open(mask: np.ndarray, spacing: np.ndarray, radius_mm: float, depth: np.ndarray | None = None) -> np.ndarray:
    """Opening with a ball of ``radius_mm`` (exact Euclidean, anisotropic voxels), via two distance transforms.

    ``depth`` is ``depth_mm(mask, spacing)`` when the caller has it. The dilation's distance transform runs only
    on the box that can be reached from the eroded voxels: nothing further than ``radius_mm`` from them is kept.
    """
    if not mask.any():
        return mask
    inner = (depth if depth is not None else depth_mm(mask, spacing)) > radius_mm
    if not inner.any():
        return inner
    reach = np.ceil(radius_mm / spacing).astype(int) + 1
    found = np.argwhere(inner)
    low = np.maximum(found.min(axis=0) - reach, 0)
    high = np.minimum(found.max(axis=0) + reach + 1, mask.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(low, high, strict=True))
    opened = np.zeros(mask.shape, dtype=bool)
    opened[box] = depth_mm(~inner[box], spacing) <= radius_mm
    return opened


def _component_at(mask: np.ndarray, seed: tuple[int, ...], spacing: np.ndarray, radius_mm: float) -> np.ndarray | None:
    """The connected component holding ``seed``, or the nearest one within ``radius_mm`` of it."""
    if not mask.any():
        return None
    labels, _ = ndimage.label(mask, structure=ndimage.generate_binary_structure(3, 2))
    label = labels[seed]
    if label == 0:
        nearest = _nearest_true(mask, seed, spacing, radius_mm)
        if nearest is None:
            return None
        label = labels[nearest]
    return np.asarray(labels == label)


def _nearest_true(
    mask: np.ndarray, seed: tuple[int, ...], spacing: np.ndarray, radius_mm: float
) -> tuple[int, int, int] | None:
    points = np.argwhere(mask)
    if points.size == 0:
        return None
    distance = np.linalg.norm((points - np.asarray(seed)) * spacing, axis=1)
    best = int(np.argmin(distance))
    if distance[best] > max(radius_mm, float(spacing.max())):
        return None
    z, y, x = (int(v) for v in points[best])
    return z, y, x


def _touches(mask: np.ndarray, other: np.ndarray) -> bool:
    """Does ``mask`` touch ``other`` in-plane (8-neighbourhood)?"""
    grown = ndimage.binary_dilation(mask, structure=np.array([[[1, 1, 1], [1, 1, 1], [1, 1, 1]]], dtype=bool))
    return bool((grown & other).any())


_FACES = ndimage.generate_binary_structure(3, 1)


def _face_neighbours(mask: np.ndarray) -> np.ndarray:
    """The voxels sharing a face with ``mask`` and not in it (the layer around it, within its array)."""
    grown: np.ndarray = ndimage.binary_dilation(mask, structure=_FACES)
    return grown & ~mask


def _touches_box_edge(mask: np.ndarray) -> bool:
    """A nodule reaching its region's in-plane edge has leaked into something larger (mediastinum, wall)."""
    return bool(mask[:, 0, :].any() or mask[:, -1, :].any() or mask[:, :, 0].any() or mask[:, :, -1].any())


def _sphericity(mask: np.ndarray, spacing: tuple[float, float, float], volume_mm3: float) -> float:
    """Volume over that of the sphere whose diameter is the nodule's longest extent (1 = a ball)."""
    points = np.argwhere(mask) * np.asarray(spacing)
    if points.shape[0] < 2:
        return 1.0
    extent = float(np.max(points.max(axis=0) - points.min(axis=0) + np.asarray(spacing)))
    return float(min(1.0, volume_mm3 / (math.pi / 6.0 * extent**3)))

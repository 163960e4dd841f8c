"""Find the heart and the great vessels on a non-contrast chest CT, and measure the vessels, without trained weights.

On a CT without contrast, blood, vessel wall and myocardium all read about 40 HU; what outlines the aorta, the
pulmonary artery and the heart is the fat and the lung around them, and the thin fat planes where they touch. The
method uses only that, the lungs the project already segments (:func:`models.lung.segment_lungs`) and the spine it
already tracks (:func:`models.spine.find_spine`):

1. **Mediastinal tissue.** On a grid of about 1.25 mm pixels, inside the lungs' convex hull (slice by slice) and
   outside the lungs, tissue is anything above -30 HU (fat is below), without the bones (connected structures above
   200 HU of 10 mL or more, marrow filled in).
2. **Round structures, two ways.** The distance to the nearest fat or lung peaks at the centre of every round
   structure that fat surrounds (cheap, used to follow the descending aorta and to seed the arch). Where vessels
   touch with only a blurred fat plane between them, a gradient Hough transform finds them instead: every pixel
   where attenuation steps down by at least 8 HU/mm votes for the centres that lie along its gradient, and a circle
   is kept when at least 55 % of its outline is seen (:class:`_Hough`).
3. **Descending aorta.** The longest chain of distance peaks beside the vertebral body on the patient's left
   (5-60 mm left of the spine's midline, from 40 mm in front of to 20 mm behind its front, radius 7-30 mm), at most
   :data:`MAX_STEP_MM` sideways per slice (one slice may be missed), measured about every 8 mm by the Hough circle
   at each peak. Where its sections turn elongated, the chain has entered the arch; where its top sections turn
   narrower than 0.75 times its median, it has run up into a branch of the arch, and they are dropped.
4. **Ascending aorta.** The longest chain of Hough circles in front of the vertebral bodies (25-120 mm) and
   within 70 mm right and 35 mm left of the spine, reaching up to within 3 cm of the arch's top (plus one slice: a
   chain bridges one missed slice, so its top is known to one slice) and climbing at most 6 mm per 5 mm (faster, it
   is turning into the arch); where it widens abruptly at its top it is the arch. Its lowest section is the aortic
   root, where the aorta merges with the heart.
5. **Aortic arch.** A distance peak midway between the two limbs, above the ascending aorta, measured by rays
   (:class:`_Measurer`); the arch runs in the slice there, so its width across is its diameter.
6. **Pulmonary trunk.** The widest Hough circle inside the mediastinum left of the ascending aorta on every slice
   from the root up to the arch, measured again by rays that take the aorta's outline as its edge where they touch.
7. **Diameters perpendicular to the centreline.** An oblique cut through a tube is an ellipse whose *short* axis
   is the tube's diameter perpendicular to its centreline. A Hough circle's diameter is the short axis of the
   ellipse fitted to its outline's edge points (Fitzgibbon 1999) when at least 80 % of the outline is seen, else the
   fitted circle's diameter; a ray measurement's is the smallest sum of two opposite rays that both ended on a real
   edge (a ray that runs into a touching structure is much longer than the rest and never gives the minimum). The
   2022 ACC/AHA guideline asks for outer-wall-to-outer-wall diameters perpendicular to the centreline; on a
   non-contrast scan wall and lumen are one, so the outer wall is what is measured.
8. **Calcium territories.** The aortic wall: the measured outlines plus 3 mm, on every slice followed, without the
   bones. The aortic root and valve: a cylinder of the root's radius plus 3 mm continued 20 mm down the root's axis
   (excluded from both scores). The heart (coronary territory): between the lungs, fat included (the coronary
   arteries run in the epicardial fat), in front of the vertebral bodies and the descending aorta, from the root down
   to where the space between the lungs shrinks below a quarter of its largest extent (the diaphragm); without
   bone, a strip along the front (costal cartilages), the hila (an opening by a 6 mm disc) and the aortic
   territories.

A structure that is not found, or whose measurement fails a plausibility check, is reported as not found with the
reason; no number is made up for it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from models.calcium import bounding_box
from models.lung import LungMask, segment_lungs
from models.morphology import dilate, local_maximum, open_by_disc
from models.spine import SpineTrack, find_spine

TISSUE_HU = -30.0
"""Above this: soft tissue, blood, wall or calcium; below: fat or air. The outer edge of a vessel without contrast."""

BONE_HU = 200.0
_BONE_MIN_ML = 10.0
"""Vertebrae, sternum and ribs form connected structures far larger than any calcified plaque."""

MAX_STEP_MM = 10.0
"""Largest sideways move of a vessel's centre between slices 5 mm apart that is still the same vessel."""

AORTIC_WALL_MARGIN_MM = 3.0
"""Beyond the measured outer wall: room for calcified wall and its blur in the aortic calcium territory."""

ROOT_LENGTH_MM = 20.0
"""How far below the lowest traced section of the ascending aorta the root and the aortic valve reach (sinuses and
annulus are about 2 cm long in adults)."""

HILUM_OPENING_MM = 6.0
"""Radius of the opening that trims the hila off the coronary territory."""

CHEST_WALL_STRIP_MM = 6.0
"""Width of the anterior border of the space between the lungs that is left out of the heart (costal cartilages)."""

HEART_END_FRACTION = 0.25
"""The heart ends (diaphragm) where the space between the lungs in front of the spine falls below this share of its
largest extent."""

_DESCENDING_SAMPLE_MM = 8.0
_ASCENDING_BELOW_ARCH_MM = 30.0
_ASCENDING_STEP_MM = 6.0  # per 5 mm of height: the ascending aorta leans about 30 degrees at most
_ASCENDING_SEARCH_MM = 90.0  # the ascending aorta is 5-8 cm long in adults: search that far below the arch
_RAY_STEP_DEG = 5.0
_MIN_EDGE_FRACTION = 0.5
_MIN_ARCH_EDGE_FRACTION = 0.3  # along the arch the rays run down the tube and only its sides give edges
_ROUND = 1.4  # long / short axis of a cut through a tube within about 45 degrees of its axis


@dataclass(frozen=True)
class Section:
    """One measured cross-section on one axial slice, in full-resolution pixel coordinates (row, column).

    ``diameter_mm`` is the short axis (the diameter perpendicular to the centreline), ``long_mm`` the long axis,
    ``angle`` the direction of the short axis in the image (radians; rows down, columns right). ``outline`` holds the
    end points of the rays that reached the outer wall, for drawing; ``edge_fraction`` their share of all rays.
    """

    slice_index: int
    centre: tuple[float, float]
    diameter_mm: float
    long_mm: float
    angle: float
    outline: tuple[tuple[float, float], ...]
    edge_fraction: float

    @property
    def round(self) -> bool:
        return self.long_mm <= _ROUND * self.diameter_mm


@dataclass(frozen=True)
class Vessel:
    """A traced vessel: its measured sections and, on every slice it was followed on, its centre (``path``, full-
    resolution pixels; a slice between two measured sections has a centre but no section of its own)."""

    name: str
    sections: tuple[Section, ...]
    path: dict[int, tuple[float, float]] = field(default_factory=dict)

    def centre(self, z: int) -> tuple[float, float] | None:
        section = self.at(z)
        return section.centre if section is not None else self.path.get(z)

    def widest(self) -> Section:
        return max(self.sections, key=lambda s: s.diameter_mm)

    def at(self, z: int) -> Section | None:
        return next((s for s in self.sections if s.slice_index == z), None)

    @property
    def slices(self) -> tuple[int, int]:
        return self.sections[0].slice_index, self.sections[-1].slice_index


@dataclass
class ChestVessels:
    """What was found. ``missing`` maps a structure to the reason it could not be found or measured.

    The calcium territories are kept on the detection grid (``stride`` times coarser in-plane) and brought to the
    volume's resolution on request, one at a time: three full-resolution masks would cost as much memory as the
    volume itself.
    """

    spine: SpineTrack
    shape: tuple[int, ...]
    stride: int
    descending: Vessel | None = None
    ascending: Vessel | None = None
    arch: Section | None = None
    pulmonary_trunk: Section | None = None
    heart_slices: tuple[int, int] | None = None
    heart_grid: np.ndarray | None = None  # where coronary calcium is counted
    aorta_grid: np.ndarray | None = None  # the thoracic aortic wall (ascending, arch, descending)
    root_grid: np.ndarray | None = None  # aortic root and valve, excluded from both scores
    missing: dict[str, str] = field(default_factory=dict)

    def heart_region(self) -> np.ndarray | None:
        """Where coronary calcium is counted (bool, the volume's shape)."""
        return _to_full(self.heart_grid, self.stride, self.shape) if self.heart_grid is not None else None

    def aorta_region(self) -> np.ndarray | None:
        """The thoracic aortic wall territory (bool, the volume's shape)."""
        return _to_full(self.aorta_grid, self.stride, self.shape) if self.aorta_grid is not None else None

    def root_region(self) -> np.ndarray | None:
        """The aortic root and valve, excluded from both calcium scores (bool, the volume's shape)."""
        return _to_full(self.root_grid, self.stride, self.shape) if self.root_grid is not None else None

    def part(self, which: str) -> tuple[np.ndarray, tuple[int, int, int]] | None:
        """A territory (``heart``, ``aorta`` or ``root``) at full resolution inside its bounding box (empty when the
        territory is), and where that box starts in the volume; None when it was not delimited. What scoring needs,
        without an array the size of the volume (:func:`models.calcium.score_calcium` takes ``region_at``)."""
        grid = {"heart": self.heart_grid, "aorta": self.aorta_grid, "root": self.root_grid}[which]
        return _to_full_part(grid, self.stride, self.shape) if grid is not None else None

    def plane(self, which: str, z: int) -> np.ndarray:
        """One slice of a territory (``heart``, ``aorta`` or ``root``) at full resolution, for key images."""
        grid = {"heart": self.heart_grid, "aorta": self.aorta_grid, "root": self.root_grid}[which]
        if grid is None:
            return np.zeros(self.shape[1:], dtype=bool)
        full = np.repeat(np.repeat(grid[z], self.stride, axis=0), self.stride, axis=1)
        return np.ascontiguousarray(full[: self.shape[1], : self.shape[2]])


@dataclass(frozen=True)
class _Peak:
    z: int
    row: float  # grid pixels
    col: float
    radius_mm: float


class _Grid:
    """The detection grid (about 1.25 mm pixels) and what is computed on it once."""

    def __init__(self, hu: np.ndarray, spacing: tuple[float, float, float], lungs: LungMask, spine: SpineTrack):
        self.stride = lungs.downsample if lungs.downsample > 0 else 1
        self.px = float(spacing[1]) * self.stride
        self.dz = float(spacing[0])
        self.values = hu[:, :: self.stride, :: self.stride]
        self.lung = lungs.mask[:, :: self.stride, :: self.stride]
        z, r, c = lungs.box
        self.box = (
            z,
            slice(r.start // self.stride, -(-r.stop // self.stride)),
            slice(c.start // self.stride, -(-c.stop // self.stride)),
        )
        self.spine_col = spine.column * spine.stride / self.stride
        self.spine_front = spine.anterior_row * spine.stride / self.stride  # nan where no vertebral body was seen
        self.between = _between(self.lung, self.box)
        self.bone = _bones(self.values, self.box, self.px * self.px * self.dz / 1000.0)
        self.tissue: np.ndarray = np.zeros(self.values.shape, dtype=bool)  # between the lungs, so inside their box
        self.tissue[self.box] = self.between[self.box] & ~self.lung[self.box] & ~self.bone[self.box]
        self.tissue[self.box] &= self.values[self.box] > TISSUE_HU
        # the distance peaks only seed the search (every candidate is measured again at full resolution), so they
        # are found on every other grid pixel: four times less work
        coarse = (
            self.box[0],
            slice(self.box[1].start, self.box[1].stop, 2),
            slice(self.box[2].start, self.box[2].stop, 2),
        )
        tissue = self.tissue[coarse]
        distance = np.zeros(tissue.shape, dtype=np.float32)
        for k in range(tissue.shape[0]):
            rows, cols = np.flatnonzero(tissue[k].any(axis=1)), np.flatnonzero(tissue[k].any(axis=0))
            if rows.size:
                # the tissue's box and the ring of background around it hold the nearest background of every
                # tissue pixel (any background farther out is farther away): the same distances, in less area
                ring = (slice(max(rows[0] - 1, 0), rows[-1] + 2), slice(max(cols[0] - 1, 0), cols[-1] + 2))
                distance[k][ring] = ndimage.distance_transform_edt(tissue[k][ring], sampling=2.0 * self.px)
        self.peaks = [
            _Peak(p.z + z.start, self.box[1].start + 2.0 * p.row, self.box[2].start + 2.0 * p.col, p.radius_mm)
            for p in _peaks(distance, 2.0 * self.px)
        ]
        self._gradients: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def gradients(self, z: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row and column gradient (HU/mm) and its magnitude on slice ``z`` inside the box, after a 1 mm smoothing
        with HU clipped to -200..200 (so that calcium and air do not dominate); computed once per slice."""
        if z not in self._gradients:
            plane = np.clip(self.values[z, self.box[1], self.box[2]], -200.0, 200.0).astype(np.float32)
            smooth = ndimage.gaussian_filter(plane, 1.0 / self.px)
            gr, gc = np.gradient(smooth)
            gr /= self.px
            gc /= self.px
            self._gradients[z] = (gr, gc, np.hypot(gr, gc))
        return self._gradients[z]

    def left_mm(self, z: int, col: float) -> float:
        """How far to the patient's left of the spine's midline (columns increase towards the patient's left)."""
        return (col - float(self.spine_col[z])) * self.px

    def ahead_mm(self, z: int, row: float) -> float:
        """How far in front of the vertebral body's anterior wall (rows increase towards the back); nan if unknown."""
        return (float(self.spine_front[z]) - row) * self.px


def find_chest_vessels(
    hu: np.ndarray, spacing: tuple[float, float, float], lungs: LungMask | None = None
) -> ChestVessels:
    """Locate the heart, aorta and pulmonary trunk of a chest CT (``(slices, rows, columns)``, inferior first)."""
    lungs = lungs if lungs is not None else segment_lungs(hu, spacing)
    spine = find_spine(hu, spacing)
    grid = _Grid(hu, spacing, lungs, spine)
    found = ChestVessels(spine=spine, shape=hu.shape, stride=grid.stride)
    measure = _Measurer(hu, spacing, grid.stride)

    descending, arch_limb = _trace_descending(grid)
    if descending is None:
        found.missing["descending aorta"] = "no round structure beside the spine could be followed over 3 slices"
    else:
        found.descending = descending
    top = descending.slices[1] + len(arch_limb) if descending is not None else None
    ascending = _trace_ascending(grid, top)
    if ascending is None:
        found.missing["ascending aorta"] = (
            "no round structure in front of the trachea could be followed from the level of the arch down"
        )
    else:
        found.ascending = ascending
    if descending is not None and ascending is not None:
        found.arch = _arch(grid, measure, ascending, descending, arch_limb)
    if found.arch is None:
        found.missing["aortic arch"] = (
            "not in view (the scan may end below it) or not traced between the ascending and descending aorta"
        )
    if ascending is not None:
        found.pulmonary_trunk = _pulmonary_trunk(grid, measure, ascending, found.arch)
        if found.pulmonary_trunk is None:
            found.missing["pulmonary trunk"] = (
                "no round structure left of the ascending aorta between the aortic root and the arch"
            )
    else:
        found.missing["pulmonary trunk"] = "it is found beside the ascending aorta, which was not found"
    _regions(found, grid)
    return found


# ---------------------------------------------------------------------------------------------------------------
# the detection grid


def _between(lung: np.ndarray, box: tuple[slice, slice, slice]) -> np.ndarray:
    """Inside the lungs' convex hull, slice by slice, within ``box`` (the lungs' bounding box on the grid).

    The hull of each slice's lung boundary points is filled as a polygon. Only the first and last boundary point
    of each row are handed to Qhull (a corner of the hull is always one of them), a few hundred points per slice
    rather than thousands.
    """
    out = np.zeros(lung.shape, dtype=bool)
    for z in range(box[0].start, box[0].stop):
        plane = lung[z, box[1], box[2]]
        if np.count_nonzero(plane) < 3:
            continue
        inner = plane.copy()
        inner[1:, :] &= plane[:-1, :]
        inner[:-1, :] &= plane[1:, :]
        inner[:, 1:] &= plane[:, :-1]
        inner[:, :-1] &= plane[:, 1:]
        edge = plane & ~inner
        rows = np.flatnonzero(edge.any(axis=1))
        first = edge[rows].argmax(axis=1)
        last = edge.shape[1] - 1 - edge[rows, ::-1].argmax(axis=1)
        two = first != last
        points = np.column_stack([np.concatenate([rows, rows[two]]), np.concatenate([first, last[two]])]).astype(
            np.float64
        )
        try:
            hull = ConvexHull(points)
        except QhullError:  # all boundary points on a line: no area between the lungs
            continue
        corners = [(float(c), float(r)) for r, c in points[hull.vertices]]
        canvas = Image.new("1", (plane.shape[1], plane.shape[0]), 0)
        ImageDraw.Draw(canvas).polygon(corners, fill=1, outline=1)
        out[z, box[1], box[2]] = np.asarray(canvas, dtype=bool) | edge
    return out


def _bones(grid: np.ndarray, box: tuple[slice, slice, slice], voxel_ml: float) -> np.ndarray:
    """Vertebrae, sternum and ribs inside ``box``: large connected structures above 200 HU, marrow filled per slice.

    Found on every other grid pixel (2.5 mm: bones are large) and brought back to the grid one pixel wider, which
    also covers their partial-volume rim.
    """
    bone = np.zeros(grid.shape, dtype=bool)
    coarse = (box[0], slice(box[1].start, box[1].stop, 2), slice(box[2].start, box[2].stop, 2))
    dense = grid[coarse] >= BONE_HU
    labels, count = ndimage.label(dense)
    if count == 0:
        return bone
    sizes = np.bincount(labels.ravel()) * voxel_ml * 4.0
    sizes[0] = 0.0
    local = (sizes >= _BONE_MIN_ML)[labels]
    # every slice's holes at once: an element with no neighbour across slices fills each slice on its own
    local = ndimage.binary_fill_holes(local, structure=_IN_PLANE_4)
    local = dilate(local, [1, 1, 1])  # the 3 x 3 square
    upsampled = np.repeat(np.repeat(local, 2, axis=1), 2, axis=2)
    target = bone[box]
    target[:] = upsampled[:, : target.shape[1], : target.shape[2]]
    return bone


def _peaks(distance: np.ndarray, px: float) -> list[_Peak]:
    """Centres of round structures: in-plane maxima of the distance to fat or lung, at least 6 mm deep.

    A flat top (several pixels at the same distance) is one structure: its pixels are merged into one peak.
    """
    size = max(3, round(9.0 / px) | 1)
    local = local_maximum(distance, (0, size // 2, size // 2))
    top = (distance == local) & (distance >= 6.0)
    labels, count = ndimage.label(top, structure=_IN_PLANE_8)
    if count == 0:
        return []
    z, r, c = np.nonzero(top)
    number = labels[z, r, c]
    pixels = np.bincount(number, minlength=count + 1)[1:]
    mean = [np.bincount(number, weights=axis, minlength=count + 1)[1:] / pixels for axis in (z, r, c)]
    depth = np.zeros(count + 1, dtype=np.float64)
    depth[number] = distance[z, r, c]  # a flat top has one value
    return [
        _Peak(round(float(a)), float(b), float(d), float(depth[k + 1]))
        for k, (a, b, d) in enumerate(zip(*mean, strict=True))
    ]


_IN_PLANE_8 = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE_8[1] = True


# ---------------------------------------------------------------------------------------------------------------
# full-resolution measurement


class _Measurer:
    """Rays from a centre to the outer wall on the full-resolution slice (module docstring, step 7)."""

    def __init__(self, hu: np.ndarray, spacing: tuple[float, float, float], stride: int):
        self.hu = hu
        self.px = float(spacing[1])
        self.stride = stride
        self.angles = np.deg2rad(np.arange(0.0, 360.0, _RAY_STEP_DEG))
        self.cache: dict[tuple[int, int, int], Section | None] = {}

    def at_peak(self, peak: _Peak, *, min_edges: float = _MIN_EDGE_FRACTION) -> Section | None:
        key = (peak.z, round(peak.row), round(peak.col))
        if key not in self.cache:
            self.cache[key] = self.section(peak.z, (peak.row * self.stride, peak.col * self.stride), peak.radius_mm)
        found = self.cache[key]
        return found if found is not None and found.edge_fraction >= min_edges else None

    def section(
        self,
        z: int,
        centre: tuple[float, float],
        radius_mm: float,
        *,
        prior_mm: float | None = None,
        exclude: tuple[tuple[tuple[float, float], float], ...] = (),
    ) -> Section | None:
        """Refit the centre twice to the rays that reached a real edge, then take the short and long axis.

        ``prior_mm`` is the radius expected from the neighbouring slice: rays are judged against it rather than
        against their own median, so that a vessel touching a larger one is not swallowed by it. ``exclude`` lists
        discs (centre, radius in pixels) of structures already measured: their outline is this one's edge.
        """
        for _ in range(2):
            rays = self._rays(z, centre, radius_mm, prior_mm, exclude)
            if rays is None:
                return None
            lengths, valid = rays
            if valid.sum() < 6:
                return None
            ends_r = centre[0] + np.sin(self.angles[valid]) * lengths[valid] / self.px
            ends_c = centre[1] + np.cos(self.angles[valid]) * lengths[valid] / self.px
            fitted = _fit_circle(ends_r, ends_c)
            if fitted is None:
                return None
            (row, col), radius_px = fitted
            moved = math.hypot(row - centre[0], col - centre[1])
            centre, radius_mm = (row, col), radius_px * self.px
            if moved * self.px < 0.5:
                break
        rays = self._rays(z, centre, radius_mm, prior_mm, exclude)
        if rays is None:
            return None
        lengths, valid = rays
        half = len(self.angles) // 2
        pairs = valid[:half] & valid[half:]
        if not pairs.any():
            return None
        sums = lengths[:half] + lengths[half:]
        short = int(np.argmin(np.where(pairs, sums, np.inf)))
        # the long axis is across the short one (an ellipse's axes are perpendicular); the median of the pairs within
        # 15 degrees of that direction keeps a bump where a neighbour touches from lengthening it
        offset = round(90.0 / _RAY_STEP_DEG)
        around = [(short + offset + k) % half for k in range(-3, 4)]
        usable = [sums[k] for k in around if pairs[k]]
        long_mm = float(np.median(usable)) if usable else float(sums[short])
        outline = tuple(
            (float(centre[0] + math.sin(t) * length / self.px), float(centre[1] + math.cos(t) * length / self.px))
            for t, length, ok in zip(self.angles, lengths, valid, strict=True)
            if ok
        )
        return Section(
            slice_index=z,
            centre=(float(centre[0]), float(centre[1])),
            diameter_mm=float(sums[short]),
            long_mm=max(long_mm, float(sums[short])),
            angle=float(self.angles[short]),
            outline=outline,
            edge_fraction=float(valid.mean()),
        )

    def _rays(
        self,
        z: int,
        centre: tuple[float, float],
        radius_mm: float,
        prior_mm: float | None,
        exclude: tuple[tuple[tuple[float, float], float], ...],
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Length (mm) of each ray to the -30 HU edge, and whether it ended on a real edge (not a touching organ)."""
        reach = (max(2.2 * radius_mm, radius_mm + 25.0)) / self.px
        r0, c0 = centre
        if not (0 <= r0 < self.hu.shape[1] and 0 <= c0 < self.hu.shape[2]):
            return None
        # smooth (0.6 mm Gaussian: noise down, edges kept) only the square the rays can reach
        margin = reach + 4
        top, left = max(0, int(r0 - margin)), max(0, int(c0 - margin))
        bottom, right = min(self.hu.shape[1], int(r0 + margin) + 1), min(self.hu.shape[2], int(c0 + margin) + 1)
        plane = ndimage.gaussian_filter(self.hu[z, top:bottom, left:right].astype(np.float32), 0.6 / self.px)
        step = 0.5
        steps = np.arange(0.0, reach, step)
        rows = (r0 - top) + np.sin(self.angles)[:, None] * steps[None, :]
        cols = (c0 - left) + np.cos(self.angles)[:, None] * steps[None, :]
        profile = ndimage.map_coordinates(plane, [rows.ravel(), cols.ravel()], order=1, mode="nearest").reshape(
            rows.shape
        )
        outside = profile < TISSUE_HU
        for (er, ec), radius_px in exclude:
            outside |= (rows - er) ** 2 + (cols - ec) ** 2 <= radius_px**2
        outside[:, : max(1, round(0.3 * radius_mm / self.px / step))] = False  # never stop inside the core
        hit = outside.any(axis=1)
        first = np.where(hit, outside.argmax(axis=1), len(steps) - 1)
        k = np.arange(len(self.angles))
        before = profile[k, np.maximum(first - 1, 0)]
        after = profile[k, first]
        span = np.where(before != after, before - after, 1.0)
        frac = np.clip((before - TISSUE_HU) / span, 0.0, 1.0)
        lengths = (np.maximum(first - 1, 0) + frac) * step * self.px
        lengths = np.where(hit, lengths, steps[-1] * self.px)
        if not hit.any():
            return None
        median = prior_mm if prior_mm is not None else float(np.median(lengths[hit]))
        # an oblique cut (an ellipse up to 1.5 times as long as wide) keeps its rays within 0.7-1.3 times their median;
        # a ray that ran on into a touching structure, or stopped at a fat fleck inside the wall, does not
        valid = hit & (lengths <= 1.3 * median) & (lengths >= 0.7 * median)
        return lengths, valid


def _fit_circle(rows: np.ndarray, cols: np.ndarray) -> tuple[tuple[float, float], float] | None:
    """Least-squares circle through points (Kasa's algebraic fit): centre and radius, or None if degenerate."""
    a = np.column_stack([rows, cols, np.ones_like(rows)])
    b = rows**2 + cols**2
    try:
        solution, *_ = np.linalg.lstsq(a, b, rcond=None)
    except np.linalg.LinAlgError:
        return None
    row, col = solution[0] / 2.0, solution[1] / 2.0
    squared = solution[2] + row**2 + col**2
    if not np.isfinite(squared) or squared <= 0:
        return None
    return (float(row), float(col)), float(math.sqrt(squared))


# ---------------------------------------------------------------------------------------------------------------
# circles by gradient Hough transform


@dataclass(frozen=True)
class Circle:
    """A circle found on one slice: centre (full-resolution pixels), diameter and how much of its outline is seen.

    ``coverage`` is the share of the outline (72 directions) where the attenuation steps down outwards at the circle
    (within 1.5 mm); ``short_mm`` / ``long_mm`` are the axes of the ellipse fitted to those edge points, the short
    one being the diameter perpendicular to the centreline of an obliquely cut tube.
    """

    slice_index: int
    centre: tuple[float, float]
    diameter_mm: float
    coverage: float
    short_mm: float
    long_mm: float
    angle: float  # direction of the short axis (radians, rows down, columns right)
    edges: tuple[tuple[float, float], ...]

    def section(self) -> Section:
        return Section(
            self.slice_index, self.centre, self.short_mm, self.long_mm, self.angle, self.edges, self.coverage
        )


class _Hough:
    """Circles on one slice by the gradient Hough transform (module docstring, step 2).

    Every pixel where attenuation changes steeply (at least :data:`_EDGE_HU_PER_MM` after a 1 mm smoothing, with
    HU clipped to -200..200 so that calcium and air do not dominate) votes, for each radius, for the centre that lies
    that far along its gradient, i.e. towards the brighter side: a vessel's outline votes for its own centre even
    where only a thin fat plane separates it from a neighbour. Votes are divided by the circumference, and a
    candidate is kept when at least :data:`_MIN_COVERAGE` of its outline is seen.
    """

    def __init__(self, grid: _Grid, z: int):
        self.grid = grid
        self.z = z
        self.offset = (grid.box[1].start, grid.box[2].start)
        self.gr, self.gc, self.magnitude = grid.gradients(z)

    def circles(
        self, rows: tuple[float, float], cols: tuple[float, float], radii_mm: np.ndarray, *, limit: int
    ) -> list[Circle]:
        """Candidates with centres in the grid rectangle ``rows`` x ``cols`` (grid pixels), best covered first."""
        px = self.grid.px
        shape = self.magnitude.shape
        r0, r1 = max(0, int(rows[0]) - self.offset[0]), min(shape[0], math.ceil(rows[1]) - self.offset[0])
        c0, c1 = max(0, int(cols[0]) - self.offset[1]), min(shape[1], math.ceil(cols[1]) - self.offset[1])
        if r1 <= r0 or c1 <= c0:
            return []
        reach = math.ceil(radii_mm.max() / px) + 2
        window = (
            slice(max(0, r0 - reach), min(shape[0], r1 + reach)),
            slice(max(0, c0 - reach), min(shape[1], c1 + reach)),
        )
        magnitude = self.magnitude[window]
        er, ec = np.nonzero(magnitude >= _EDGE_HU_PER_MM)
        if er.size == 0:
            return []
        ur = self.gr[window][er, ec] / magnitude[er, ec]
        uc = self.gc[window][er, ec] / magnitude[er, ec]
        er, ec = er + window[0].start - r0, ec + window[1].start - c0  # relative to the rectangle
        height, width = r1 - r0, c1 - c0
        # every edge pixel votes once per radius (rows: radii, columns: edge pixels)
        radii = radii_mm[:, None]
        cr = np.rint(er + ur * radii / px).astype(np.intp)
        cc = np.rint(ec + uc * radii / px).astype(np.intp)
        inside = (cr >= 0) & (cr < height) & (cc >= 0) & (cc < width)
        cells = (np.arange(len(radii_mm))[:, None] * height + cr) * width + cc
        counts = np.bincount(cells[inside], minlength=len(radii_mm) * height * width)
        circumference = (2.0 * math.pi * radii_mm / px)[:, None, None]
        votes = (counts.reshape(len(radii_mm), height, width) / circumference).astype(np.float32)
        votes = ndimage.gaussian_filter(votes, (0.7, 1.0, 1.0))
        peaks = (votes == local_maximum(votes, (1, 2, 2))) & (votes > 0.03)
        ks, rs, cs = np.nonzero(peaks)
        order = np.argsort(-votes[ks, rs, cs])[:limit] if ks.size > limit else np.argsort(-votes[ks, rs, cs])
        found = []
        for i in order:
            circle = self._measure(float(rs[i] + r0), float(cs[i] + c0), float(radii_mm[ks[i]]))
            if circle is not None:
                found.append(circle)
        return found

    def _measure(self, row: float, col: float, radius_mm: float) -> Circle | None:
        """Coverage of the outline, then an ellipse through its edge points (one per direction: the steepest)."""
        px = self.grid.px
        radial = (radius_mm + _OUTLINE_OFFSETS[None, :]) / px
        rr = row + _OUTLINE_SIN * radial
        cc = col + _OUTLINE_COS * radial
        i, j = np.rint(rr).astype(np.intp), np.rint(cc).astype(np.intp)
        rows, cols = self.magnitude.shape
        inside = (i >= 0) & (i < rows) & (j >= 0) & (j < cols)
        i, j = np.minimum(np.maximum(i, 0), rows - 1), np.minimum(np.maximum(j, 0), cols - 1)
        magnitude = np.where(inside, self.magnitude[i, j], 0.0)
        inward = -(self.gr[i, j] * _OUTLINE_SIN + self.gc[i, j] * _OUTLINE_COS)
        support = (magnitude >= _EDGE_HU_PER_MM) & (inward >= 0.7 * np.maximum(magnitude, 1e-6))
        seen = support.any(axis=1)
        coverage = float(np.count_nonzero(seen) / seen.size)
        if coverage < _MIN_COVERAGE:
            return None
        best = np.argmax(np.where(support, magnitude, -1.0), axis=1)
        k = np.flatnonzero(seen)
        edge_r, edge_c = rr[k, best[k]], cc[k, best[k]]
        stride = self.grid.stride
        full = tuple(zip((edge_r + self.offset[0]) * stride, (edge_c + self.offset[1]) * stride, strict=True))
        fitted = _fit_circle(edge_r, edge_c)
        if fitted is None:
            return None
        (fr, fc), fradius = fitted
        short, long, angle = 2.0 * fradius * px, 2.0 * fradius * px, 0.0
        # an ellipse needs most of the outline: fitted to a partial arc its short axis is unstable
        ellipse = _fit_ellipse(edge_r, edge_c) if coverage >= _ELLIPSE_COVERAGE else None
        if ellipse is not None:
            (er_, ec_), (a_axis, b_axis), theta = ellipse
            if 0.8 * fradius <= b_axis <= a_axis <= 1.8 * b_axis and a_axis <= 1.5 * fradius:
                fr, fc = er_, ec_
                short, long, angle = 2.0 * b_axis * px, 2.0 * a_axis * px, theta + math.pi / 2.0
        return Circle(
            slice_index=self.z,
            centre=((fr + self.offset[0]) * stride, (fc + self.offset[1]) * stride),
            diameter_mm=2.0 * fradius * px,
            coverage=coverage,
            short_mm=short,
            long_mm=long,
            angle=angle,
            edges=tuple(full),
        )


def _fit_ellipse(rows: np.ndarray, cols: np.ndarray) -> tuple[tuple[float, float], tuple[float, float], float] | None:
    """Direct least-squares ellipse (Fitzgibbon, Pilu and Fisher, IEEE TPAMI 1999;21:476-480).

    Returns the centre (row, column), the semi-axes (major, minor) and the direction of the major axis (radians,
    rows down, columns right), or None when the points do not define an ellipse.
    """
    if rows.size < 8:
        return None
    mean_r, mean_c = float(rows.mean()), float(cols.mean())
    x, y = cols - mean_c, rows - mean_r
    design = np.column_stack([x * x, x * y, y * y, x, y, np.ones_like(x)])
    scatter = design.T @ design
    constraint = np.zeros((6, 6))
    constraint[0, 2] = constraint[2, 0] = 2.0
    constraint[1, 1] = -1.0
    try:
        values, vectors = np.linalg.eig(np.linalg.solve(scatter, constraint))
    except np.linalg.LinAlgError:
        return None
    positive = [k for k in range(6) if np.isfinite(values[k]) and abs(values[k].imag) < 1e-9 and values[k].real > 0]
    if not positive:
        return None
    a, b, c, d, e, f = vectors[:, positive[0]].real
    quadratic = np.array([[a, b / 2.0], [b / 2.0, c]])
    try:
        centre = np.linalg.solve(quadratic, -np.array([d, e]) / 2.0)
    except np.linalg.LinAlgError:
        return None
    level = a * centre[0] ** 2 + b * centre[0] * centre[1] + c * centre[1] ** 2 + d * centre[0] + e * centre[1] + f
    eigenvalues, eigenvectors = np.linalg.eigh(quadratic)
    if np.any(-level / eigenvalues <= 0):
        return None
    semi = np.sqrt(-level / eigenvalues)  # along each eigenvector; the smaller eigenvalue gives the major axis
    major_k = int(np.argmax(semi))
    vx, vy = eigenvectors[:, major_k]
    return (
        (float(centre[1] + mean_r), float(centre[0] + mean_c)),
        (float(semi.max()), float(semi.min())),
        float(math.atan2(vy, vx)),
    )


_OUTLINE_ANGLES = np.deg2rad(np.arange(0.0, 360.0, 5.0))
_OUTLINE_SIN, _OUTLINE_COS = np.sin(_OUTLINE_ANGLES)[:, None], np.cos(_OUTLINE_ANGLES)[:, None]
_OUTLINE_OFFSETS = np.arange(-1.5, 1.51, 0.5)
"""A circle's outline is checked in 72 directions, within 1.5 mm of its radius."""

_EDGE_HU_PER_MM = 8.0
"""Steepest attenuation change that still marks an outline: a fat plane between two vessels, blurred by a 5 mm
slice, leaves a dip of a few tens of HU over a few millimetres."""
_MIN_COVERAGE = 0.55
_ELLIPSE_COVERAGE = 0.8
"""Hough circles measured per slice in the search for the pulmonary trunk: beside the aorta, the heart, the atria and
the hilar vessels also give circles, and one that fits inside the trunk may outvote it."""


# ---------------------------------------------------------------------------------------------------------------
# tracing the vessels


def _chains(
    sections: dict[int, list[Section]], px: float, dz: float, max_step_mm: float = MAX_STEP_MM
) -> list[list[Section]]:
    """Every maximal chain of sections on successive slices (one may be skipped) that move and change size little,
    longest first.

    ``px`` is the full-resolution pixel size: section centres are full-resolution pixels.
    """
    max_step = max_step_mm * dz / 5.0 / px
    best: dict[tuple[int, int], tuple[int, tuple[int, int] | None]] = {}
    for z in sorted(sections):
        for i, s in enumerate(sections[z]):
            length, parent = 1, None
            for gap in (1, 2):  # one slice may be missed (a fat plane blurred away on it)
                for j, q in enumerate(sections.get(z - gap, [])):
                    moved = math.hypot(s.centre[0] - q.centre[0], s.centre[1] - q.centre[1])
                    ratio = s.diameter_mm / q.diameter_mm
                    if moved <= gap * max_step and 0.75 <= ratio <= 1.33 and best[(z - gap, j)][0] + 1 > length:
                        length, parent = best[(z - gap, j)][0] + 1, (z - gap, j)
            best[(z, i)] = (length, parent)
    used: set[tuple[int, int]] = set()
    chains: list[list[Section]] = []
    for end in sorted(best, key=lambda k: (-best[k][0], -k[0])):
        if end in used:
            continue
        chain: list[Section] = []
        node: tuple[int, int] | None = end
        while node is not None and node not in used:
            used.add(node)
            chain.append(sections[node[0]][node[1]])
            node = best[node][1]
        chains.append(chain[::-1])
    return chains


def _trace_descending(grid: _Grid) -> tuple[Vessel | None, list[Section]]:
    """The descending aorta (module docstring, step 3) and, above its round part, the arch's posterior limb.

    The chain is followed on the distance peaks (cheap), then about every 8 mm (and on each of its top four slices)
    it is measured by the Hough circle nearest the peak (within 12 mm; radius within 8 mm of the peak's depth).
    """
    candidates: dict[int, list[_Peak]] = {}
    for p in grid.peaks:
        ahead = grid.ahead_mm(p.z, p.row)
        if 5.0 <= grid.left_mm(p.z, p.col) <= 60.0 and -20.0 <= ahead <= 40.0 and 7.0 <= p.radius_mm <= 30.0:
            candidates.setdefault(p.z, []).append(p)
    chain = _peak_chain(candidates, grid.px, grid.dz)
    if len(chain) < 3:
        return None, []
    sections: list[Section] = []
    reach = 12.0 / grid.px
    # the descending aorta changes slowly along its length: a section every 8 mm or so is enough to find its widest
    # part, and every slice near the top, where it turns into the arch
    every = max(1, round(_DESCENDING_SAMPLE_MM / grid.dz))
    for k, p in enumerate(chain):
        if k % every and k < len(chain) - 4:
            continue
        radii = np.arange(max(7.0, p.radius_mm - 8.0), p.radius_mm + 8.01, 1.0)
        circles = _Hough(grid, p.z).circles(
            (p.row - reach, p.row + reach), (p.col - reach, p.col + reach), radii, limit=2
        )
        circles = [c for c in circles if 14.0 <= c.short_mm <= 70.0]
        if circles:
            sections.append(max(circles, key=lambda c: c.coverage).section())
    # the aorta does not narrow abruptly: where the top of the chain turns much narrower than the rest, the peaks
    # have run up into a branch of the arch (left subclavian or common carotid artery, 8-15 mm), not the aorta
    typical = float(np.median([s.diameter_mm for s in sections])) if sections else 0.0
    while len(sections) > 3 and sections[-1].diameter_mm < 0.75 * typical:
        sections.pop()
    if len(sections) < 3:
        return None, []
    # the round part ends where the cut becomes elongated: above that the aorta turns forward into the arch
    round_part: list[Section] = []
    for section in sections:
        if not section.round and len(round_part) >= 3:
            break
        round_part.append(section)
    top = round_part[-1].slice_index
    path = {p.z: (p.row * grid.stride, p.col * grid.stride) for p in chain if p.z <= top}
    for below, above in itertools.pairwise(chain):  # a slice the chain bridged: midway between its neighbours
        if above.z - below.z == 2 and above.z <= top:
            path[below.z + 1] = (
                (below.row + above.row) / 2.0 * grid.stride,
                (below.col + above.col) / 2.0 * grid.stride,
            )
    return Vessel("descending aorta", tuple(round_part), path), sections[len(round_part) :]


def _peak_chain(candidates: dict[int, list[_Peak]], px: float, dz: float) -> list[_Peak]:
    """The longest chain of peaks on successive slices that move little and keep their size (dynamic programming).

    One slice may be missed, as in :func:`_chains`: where the left pulmonary artery or a node touches the aorta
    without a fat plane, its distance peak moves off the aorta's centre or merges with the neighbour's on that slice,
    and a chain that could not bridge it would end there, leaving the arch level far too low.
    """
    max_step = MAX_STEP_MM * dz / 5.0 / px
    best: dict[tuple[int, int], tuple[int, tuple[int, int] | None]] = {}
    for z in sorted(candidates):
        for i, p in enumerate(candidates[z]):
            length, parent = 1, None
            for gap in (1, 2):
                for j, q in enumerate(candidates.get(z - gap, [])):
                    moved = math.hypot(p.row - q.row, p.col - q.col)
                    ratio = p.radius_mm / q.radius_mm
                    if moved <= gap * max_step and 0.7 <= ratio <= 1.45 and best[(z - gap, j)][0] + 1 > length:
                        length, parent = best[(z - gap, j)][0] + 1, (z - gap, j)
            best[(z, i)] = (length, parent)
    if not best:
        return []
    node: tuple[int, int] | None = max(best, key=lambda k: (best[k][0], k[0]))
    chain: list[_Peak] = []
    while node is not None:
        chain.append(candidates[node[0]][node[1]])
        node = best[node][1]
    return chain[::-1]


def _trace_ascending(grid: _Grid, arch_top: int | None) -> Vessel | None:
    """The ascending aorta (module docstring, step 5): the longest chain of circles in front of the trachea that
    reaches up to the level of the arch; its lowest section is the aortic root."""
    top = arch_top if arch_top is not None else grid.box[0].stop - 1
    low = max(grid.box[0].start, top - math.ceil(_ASCENDING_SEARCH_MM / grid.dz))
    radii = np.arange(9.0, 32.5, 1.5)  # the fit to the outline, not the Hough radius, gives the diameter
    candidates: dict[int, list[Section]] = {}
    for z in range(low, top + 2):
        if z >= grid.values.shape[0] or not np.isfinite(grid.spine_front[z]):
            continue
        front, middle = grid.spine_front[z], grid.spine_col[z]
        rows = (front - 120.0 / grid.px, front - 25.0 / grid.px)
        cols = (middle - 70.0 / grid.px, middle + 35.0 / grid.px)
        circles = _Hough(grid, z).circles(rows, cols, radii, limit=5)
        candidates[z] = [c.section() for c in circles if 18.0 <= c.short_mm <= 70.0]
    # the ascending aorta climbs almost straight up; where the chain runs backwards fast it has entered the arch
    chains = [c for c in _chains(candidates, grid.px / grid.stride, grid.dz, _ASCENDING_STEP_MM) if len(c) >= 3]
    if arch_top is not None:
        # the ascending aorta reaches up to within about 3 cm of the arch's top; its top section may be missed like
        # any other (a chain bridges one missed slice), so the chain's end is known to one slice
        reach = _ASCENDING_BELOW_ARCH_MM + grid.dz
        chains = [c for c in chains if (arch_top - c[-1].slice_index) * grid.dz <= reach]
    if not chains:
        return None
    chain = max(chains, key=lambda c: (len(c), float(np.mean([s.diameter_mm for s in c]))))
    # where it curves into the arch the cut widens abruptly: those top sections are the arch, not the ascending aorta
    typical = float(np.median([s.diameter_mm for s in chain]))
    while len(chain) > 3 and chain[-1].diameter_mm > 1.2 * typical:
        chain = chain[:-1]
    return Vessel("ascending aorta", tuple(chain))


def _arch(
    grid: _Grid, measure: _Measurer, ascending: Vessel, descending: Vessel, limb: list[Section]
) -> Section | None:
    """The arch (module docstring, step 4): a tube section midway between the two limbs, above the ascending aorta.

    Candidates are distance peaks on the slices from just above the ascending aorta's last round section up to 2 cm
    above the top of the descending chain, lying between the limbs (20-80 % of the way from the ascending to the
    descending centre on that slice, within 20 mm of the line); they are measured by rays (the arch runs in the
    slice, so its width across is its diameter). The one nearest the middle of the arch is kept if its width is
    0.75-1.25 times the limbs' typical diameter (a wider cut has taken in a branch, a narrower one grazes the curve).
    """
    a = ascending.sections[-1]
    # the arch rises up to about 2 cm above where the traced limbs end
    top = max(s.slice_index for s in (*descending.sections, *limb)) + math.ceil(20.0 / grid.dz)
    ends = {s.slice_index: s for s in (*descending.sections, *limb)}
    typical = 0.5 * (
        float(np.median([s.diameter_mm for s in ascending.sections]))
        + float(np.median([s.diameter_mm for s in descending.sections]))
    )
    best: tuple[float, Section] | None = None
    for p in grid.peaks:
        if not a.slice_index < p.z <= top:
            continue
        d = ends.get(p.z) or descending.sections[-1]
        (ar, ac), (dr, dc) = a.centre, d.centre
        length = math.hypot(dr - ar, dc - ac)
        if length == 0:
            continue
        r, c = p.row * grid.stride, p.col * grid.stride
        t = ((r - ar) * (dr - ar) + (c - ac) * (dc - ac)) / length**2
        off = abs((r - ar) * (dc - ac) - (c - ac) * (dr - ar)) / length * measure.px
        if not (0.2 <= t <= 0.8 and off <= 20.0):
            continue
        section = measure.at_peak(p, min_edges=_MIN_ARCH_EDGE_FRACTION)
        if section is None or not 0.75 * typical <= section.diameter_mm <= 1.25 * typical:
            continue
        if best is None or abs(t - 0.5) < best[0]:
            best = (abs(t - 0.5), section)
    return best[1] if best else None


def _pulmonary_trunk(grid: _Grid, measure: _Measurer, ascending: Vessel, arch: Section | None) -> Section | None:
    """The pulmonary trunk (module docstring, step 6).

    Candidates are Hough circles inside the mediastinum left of the ascending aorta (centres 20-75 mm from its centre
    on that slice or the nearest one it was traced on, within 35 mm in front or behind) on every slice from the
    aortic root (the lowest section traced, where the aorta is still a round structure of its own) up to the arch,
    not only on those where the aorta itself was measured: the trunk is only a few centimetres long, and on 5 mm
    slices the one slice that shows it best need not be one that gave an aortic section. The trunk touches the
    aorta, so each is measured again by rays that take the aorta's outline (already measured) as the trunk's edge on
    that side; the widest trunk section is kept, the trunk being the widest part of the pulmonary arterial tree.
    Below the root the right ventricular outflow tract joins the heart and cannot be told from the trunk, so the
    search does not go there.
    """
    low, high = ascending.slices
    top = arch.slice_index if arch is not None else high + 1
    radii = np.arange(9.0, 25.5, 1.0)
    found: list[Section] = []
    for z in range(low, top):
        aorta = _nearest(ascending, z)
        assert aorta is not None
        row, col = aorta.centre[0] / grid.stride, aorta.centre[1] / grid.stride
        rows = (row - 35.0 / grid.px, row + 35.0 / grid.px)
        cols = (col + 20.0 / grid.px, col + 75.0 / grid.px)
        aorta_disc = (aorta.centre, aorta.diameter_mm / 2.0 / measure.px)
        for circle in _Hough(grid, z).circles(rows, cols, radii, limit=4):
            r, c = round(circle.centre[0] / grid.stride), round(circle.centre[1] / grid.stride)
            inside = 0 <= r < grid.tissue.shape[1] and 0 <= c < grid.tissue.shape[2] and bool(grid.tissue[z, r, c])
            apart = math.dist(circle.centre, aorta.centre) * measure.px
            if not inside or apart < 0.4 * (circle.diameter_mm + aorta.diameter_mm):
                continue
            radius = circle.diameter_mm / 2.0
            section = measure.section(z, circle.centre, radius, prior_mm=radius, exclude=(aorta_disc,))
            if (
                section is not None
                and section.edge_fraction >= _MIN_EDGE_FRACTION
                and 15.0 <= section.diameter_mm <= 50.0
            ):
                found.append(section)
    return max(found, key=lambda s: s.diameter_mm) if found else None


# ---------------------------------------------------------------------------------------------------------------
# regions for calcium scoring


def _regions(found: ChestVessels, grid: _Grid) -> None:
    """The coronary territory, the aortic wall territory and the aortic root/valve (module docstring, step 8).

    Every disc is drawn in the square that holds it, and the morphology runs inside the bounding box of what it
    changes, so the cost follows the size of the mediastinum rather than of the scan.
    """
    stride, px = grid.stride, grid.px
    plane_shape = grid.values.shape[1:]

    def disc(centre: tuple[float, float], radius_mm: float) -> tuple[tuple[slice, slice], np.ndarray]:
        """The pixels within ``radius_mm`` of ``centre`` (full-resolution pixels): a window of the slice and the
        disc inside it."""
        row, col = centre[0] / stride, centre[1] / stride
        reach = radius_mm / px
        r0, r1 = max(0, math.floor(row - reach)), min(plane_shape[0], math.ceil(row + reach) + 1)
        c0, c1 = max(0, math.floor(col - reach)), min(plane_shape[1], math.ceil(col + reach) + 1)
        rr, cc = np.arange(r0, max(r0, r1))[:, None], np.arange(c0, max(c0, c1))[None, :]
        return (slice(r0, max(r0, r1)), slice(c0, max(c0, c1))), np.asarray(
            (rr - row) ** 2 + (cc - col) ** 2 <= reach**2
        )

    def paint(target: np.ndarray, z: int, centre: tuple[float, float], radius_mm: float) -> None:
        window, inside = disc(centre, radius_mm)
        target[z][window] |= inside

    aorta = np.zeros(grid.values.shape, dtype=bool)
    for vessel in (found.descending, found.ascending):
        if vessel is None:
            continue
        for s in vessel.sections:
            paint(aorta, s.slice_index, s.centre, s.long_mm / 2.0 + AORTIC_WALL_MARGIN_MM)
        for z, centre in vessel.path.items():  # slices followed between measured sections
            if vessel.at(z) is None:
                nearest = _nearest(vessel, z)
                assert nearest is not None
                paint(aorta, z, centre, nearest.long_mm / 2.0 + AORTIC_WALL_MARGIN_MM)
    if found.arch is not None:
        s = found.arch
        labels, _ = ndimage.label(grid.tissue[s.slice_index])
        r, c = round(s.centre[0] / stride), round(s.centre[1] / stride)
        if labels[r, c]:
            tube = labels == labels[r, c]
            depth = ndimage.distance_transform_edt(tube, sampling=px)
            tube &= depth >= 0.25 * s.diameter_mm  # the tube, not thin attachments
            tube = ndimage.binary_dilation(tube, iterations=max(1, round((0.25 * s.diameter_mm + 3.0) / px)))
            for z in range(max(0, s.slice_index - 1), min(len(aorta), s.slice_index + 2)):
                aorta[z] |= tube
        paint(aorta, s.slice_index, s.centre, s.long_mm / 2.0 + AORTIC_WALL_MARGIN_MM)

    root = np.zeros(grid.values.shape, dtype=bool)
    heart = np.zeros(grid.values.shape, dtype=bool)
    if found.ascending is None:
        found.missing["heart"] = "the heart is delimited from the aortic root down, and the root was not found"
    else:
        sections = found.ascending.sections
        base = sections[0]
        if len(sections) >= 2:
            upper = sections[min(2, len(sections) - 1)]
            rise = upper.slice_index - base.slice_index
            slope = ((upper.centre[0] - base.centre[0]) / rise, (upper.centre[1] - base.centre[1]) / rise)
        else:
            slope = (0.0, 0.0)
        for k in range(0, math.ceil(ROOT_LENGTH_MM / grid.dz) + 1):
            z = base.slice_index - k
            if z < 0:
                break
            centre = (base.centre[0] - slope[0] * k, base.centre[1] - slope[1] * k)
            paint(root, z, centre, base.long_mm / 2.0 + AORTIC_WALL_MARGIN_MM)

        top = base.slice_index
        limit = np.where(np.isfinite(grid.spine_front), grid.spine_front, plane_shape[0])
        area = np.zeros(grid.values.shape[0])
        for z in range(0, top + 1):
            cut = int(min(max(limit[z], 0), plane_shape[0]))
            area[z] = np.count_nonzero(grid.between[z, :cut] & ~grid.lung[z, :cut])
        peak = float(area[: top + 1].max())
        bottom = 0
        for z in range(top, -1, -1):
            if area[z] < HEART_END_FRACTION * peak:
                bottom = z + 1
                break
        found.heart_slices = (bottom, top)
        heart[bottom : top + 1] = _heart_territory(found, grid, bottom, top, limit)
        heart[bottom : top + 1] &= ~aorta[bottom : top + 1] & ~root[bottom : top + 1]
        if bottom == 0 and area[0] >= HEART_END_FRACTION * peak:
            found.missing["base of the heart"] = (
                "the scan starts above the bottom of the heart: calcium in the lowest part of the coronary tree "
                "(distal right coronary and posterior descending arteries) may be missing"
            )

    found.heart_grid = heart
    # the descending aorta lies against the vertebral bodies: its wall territory must not reach into the bone
    wall = np.zeros(grid.values.shape, dtype=bool)
    box = bounding_box(aorta)
    if box is not None:
        # one in-plane step of dilation: the bone one pixel around the box is all that can reach into it
        grown = (box[0], *(slice(max(b.start - 1, 0), b.stop + 1) for b in box[1:]))
        near_bone = dilate(grid.bone[grown], [0, 1, 0])  # one 4-connected step
        inner = (
            slice(None),
            *(slice(b.start - g.start, b.stop - g.start) for b, g in zip(box[1:], grown[1:], strict=True)),
        )
        wall[box] = aorta[box] & ~root[box] & ~near_bone[inner]
    found.aorta_grid = wall
    found.root_grid = root


def _heart_territory(found: ChestVessels, grid: _Grid, bottom: int, top: int, limit: np.ndarray) -> np.ndarray:
    """The coronary territory on slices ``bottom..top`` (module docstring, step 8), before the aortic territories
    are taken out of it.

    Everything is computed inside the bounding box of the space between the lungs on those slices (grown by the
    bone margin): the territory lies within that space, and the opening of a set never reaches outside it.
    """
    px, stride = grid.px, grid.stride
    plane_shape = grid.values.shape[1:]
    out = np.zeros((top + 1 - bottom, *plane_shape), dtype=bool)
    between = grid.between[bottom : top + 1]
    box = bounding_box(between)
    if box is None:
        return out
    bone_steps = max(1, round(2.0 / px))
    rows = slice(max(box[1].start - bone_steps, 0), min(box[1].stop + bone_steps, plane_shape[0]))
    cols = slice(max(box[2].start - bone_steps, 0), min(box[2].stop + bone_steps, plane_shape[1]))
    window = (slice(bottom, top + 1), rows, cols)
    between = grid.between[window]
    # ``bone_steps`` in-plane 4-connected dilations: the diamond of that radius, one row at a time
    diamond = [bone_steps - abs(offset) for offset in range(-bone_steps, bone_steps + 1)]
    bone_margin = dilate(grid.bone[window], diamond)
    plane = between & ~grid.lung[window] & ~bone_margin
    # the costal cartilages and the sternum's margins (often calcified) line the front of the space between the
    # lungs: a strip along its anterior border is chest wall, not heart
    row_index = np.arange(rows.start, rows.stop)
    first = np.where(between.any(axis=1), between.argmax(axis=1) + rows.start, plane_shape[0])  # (slices, columns)
    plane &= ~(row_index[None, :, None] < first[:, None, :] + CHEST_WALL_STRIP_MM / px)
    # in front of the vertebral bodies
    cut = np.minimum(np.maximum(limit[bottom : top + 1], 0), plane_shape[0]).astype(int)
    plane &= row_index[None, :, None] < cut[:, None, None]
    rr, cc = row_index[:, None], np.arange(cols.start, cols.stop)[None, :]
    for k, z in enumerate(range(bottom, top + 1)):
        descending = _nearest(found.descending, z)
        if descending is not None and found.descending is not None:
            # on a slice it was not measured on (or below its lowest one) it is where it was followed, or last seen
            centre = found.descending.centre(z) or descending.centre
            row, col = centre[0] / stride, centre[1] / stride
            plane[k] &= ~((rr - row) ** 2 + (cc - col) ** 2 <= ((descending.long_mm / 2.0 + 5.0) / px) ** 2)
    # the hila (bronchi, pulmonary vessels, their calcified nodes and cartilage) reach into the space between the
    # lungs as narrow extensions; an opening by a 6 mm disc removes what is narrower than 12 mm and keeps the heart,
    # which is far wider
    # (the opening lies inside the set it opens, so it is done in that set's bounding box)
    inner = bounding_box(plane)
    if inner is not None:
        opened = open_by_disc(plane[inner], max(1, round(HILUM_OPENING_MM / px)))
        out[:, rows, cols][inner] = opened
    return out


_IN_PLANE_4 = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE_4[1] = ndimage.generate_binary_structure(2, 1)


def _nearest(vessel: Vessel | None, z: int) -> Section | None:
    """The vessel's section on slice ``z``, or on the nearest slice it was traced on."""
    if vessel is None or not vessel.sections:
        return None
    return min(vessel.sections, key=lambda s: abs(s.slice_index - z))


def _to_full(grid_mask: np.ndarray, stride: int, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour upsampling of a grid mask to the full volume's shape (only its bounding box is copied)."""
    full = np.zeros(shape, dtype=bool)
    part, (z0, r0, c0) = _to_full_part(grid_mask, stride, shape)
    full[z0 : z0 + part.shape[0], r0 : r0 + part.shape[1], c0 : c0 + part.shape[2]] = part
    return full


def _to_full_part(
    grid_mask: np.ndarray, stride: int, shape: tuple[int, ...]
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The grid mask's bounding box upsampled (nearest neighbour) to full resolution, cut at the volume's edge, and
    the full-resolution voxel where it starts (an empty array at the origin when the mask is empty)."""
    box = bounding_box(grid_mask)
    if box is None:
        return np.zeros((0, 0, 0), dtype=bool), (0, 0, 0)
    part = grid_mask[box]
    if stride > 1:
        part = np.repeat(np.repeat(part, stride, axis=1), stride, axis=2)
    r0, c0 = box[1].start * stride, box[2].start * stride
    rows, cols = min(part.shape[1], shape[1] - r0), min(part.shape[2], shape[2] - c0)
    return part[:, :rows, :cols], (box[0].start, r0, c0)

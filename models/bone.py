"""CT bone analyzer: opportunistic osteoporosis screening (L1 trabecular attenuation) and vertebral body heights.

On any chest or abdomen CT that shows the spine, with no trained weights:

* find the vertebral bodies and identify levels where it is reliable (:mod:`models.spine`: last rib-bearing
  vertebra = T12, or counting up from the sacrum); otherwise say so and guess nothing;
* measure trabecular attenuation in an elliptical ROI in the anterior two thirds of the body on its mid-body axial
  slice (the manual method of Pickhardt et al.), and classify with their thresholds;
* measure anterior, middle and posterior body heights on the mid-sagittal slab and grade height loss with the
  Genant semi-quantitative criteria, only when the slices are thin enough to support it.

Rules, cited:

* Pickhardt PJ, Pooler BD, Lauder T, Munoz del Rio A, Bruce RJ, Binkley N. Opportunistic screening for
  osteoporosis using abdominal computed tomography scans obtained for other indications. Ann Intern Med.
  2013;158(8):588-595. An L1 trabecular attenuation <= 160 HU was 90 % sensitive, and <= 110 HU more than 90 %
  specific, for DXA-defined osteoporosis; similar performance at T12-L5; intravenous contrast did not affect
  performance.
* Genant HK, Wu CY, van Kuijk C, Nevitt MC. Vertebral fracture assessment using a semiquantitative technique.
  J Bone Miner Res. 1993;8(9):1137-1148. Grade 0 < 20 % height reduction, grade 1 20-25 %, grade 2 25-40 %,
  grade 3 > 40 %.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from core.errors import UnsuitableInputError
from models import render
from models.base import (
    AnalysisResult,
    Category,
    Explanation,
    ImageInput,
    Interpretation,
    Measurement,
    SeriesRequirements,
    lowest_normal,
)
from models.spine import (
    BONE_HU,
    LevelIdentification,
    SpineTrack,
    Vertebra,
    detection_grid,
    find_spine,
    identify_levels,
    split_vertebrae,
    track_path,
)

PICKHARDT_SENSITIVE_HU = 160.0
PICKHARDT_SPECIFIC_HU = 110.0
PICKHARDT_RULE = (
    "Pickhardt PJ et al., Ann Intern Med 2013;158:588-595: L1 trabecular attenuation <= 160 HU is 90% sensitive, "
    "<= 110 HU >90% specific for DXA-defined osteoporosis."
)
GENANT_RULE = (
    "Genant HK et al., J Bone Miner Res 1993;8:1137-1148: height reduction <20% grade 0, 20-25% grade 1, "
    "25-40% grade 2, >40% grade 3."
)
MAX_SLICE_MM_FOR_GRADING = 3.0
"""Above this slice thickness an end plate's position is uncertain by more than ~10 % of a lumbar body height,
the same order as the 20 % Genant threshold, so no fracture grade is given."""

CONTRAST_AORTA_HU = 150.0
"""Unenhanced blood is ~40-60 HU; an aortic lumen well above 150 HU means intravenous contrast."""

_CORTEX_MARGIN_MM = 3.0
"""The ROI keeps this far inside the body outline, clear of the cortex and of partial volume with it."""

_ISLAND_HU = 500.0
"""No trabecular bone reaches this; pixels above it in the ROI are cortex or a bone island and are left out."""

TRABECULAR_RANGE_HU = (0.0, 350.0)
"""Plausible adult trabecular attenuation (fatty osteoporotic marrow near 0 HU, young dense bone up to ~300 HU)."""

MAX_ROI_SD_HU = 90.0
"""Cancellous bone in a Pickhardt-size ROI has an SD of about 20-60 HU; far above that, the mean is a mixture."""

HOMOGENEOUS_MAX_SD_HU = 60.0
"""Upper end of the SD of cancellous bone in a Pickhardt-size ROI (see :data:`MAX_ROI_SD_HU`): above it an ROI
holds a bone island, an end plate or a lesion, and a reader would move it."""

MIN_INSIDE_FRACTION = 0.8
MIN_ROI_MM2 = 50.0

_MEASURE_PREFERENCE = ("L1", "T12", "L2", "L3", "T11", "L4")
"""Pickhardt's thresholds are for L1; they reported similar performance at T12-L5, so the nearest level stands in."""


@dataclass(frozen=True)
class TrabecularRoi:
    """An elliptical ROI on one full-resolution axial slice."""

    slice_index: int
    center_row: float
    center_col: float
    semi_rows: float
    semi_cols: float
    mean_hu: float
    sd_hu: float
    pixels: int
    area_mm2: float
    inside_fraction: float  # share of the nominal ellipse inside the eroded body outline

    def untrusted_reason(self) -> str | None:
        """Why this ROI's mean cannot be read as trabecular attenuation, or None when it can.

        Adult trabecular bone lies between about 0 HU (fatty, severely osteoporotic) and about 350 HU (young,
        dense); a mean outside that, an ROI mostly outside the body outline, or a tiny ROI means the ellipse is on
        cortex, a sclerotic lesion, a disc or soft tissue, and a category from it would mislead.
        """
        if self.inside_fraction < MIN_INSIDE_FRACTION:
            return (
                f"the ROI could not be placed inside the cancellous bone (only {100 * self.inside_fraction:.0f}% "
                "of it inside the body outline)"
            )
        if self.area_mm2 < MIN_ROI_MM2:
            return f"the cancellous bone is too small for an ROI ({self.area_mm2:.0f} mm2)"
        if self.sd_hu > MAX_ROI_SD_HU:
            return (
                f"the ROI is heterogeneous (SD {self.sd_hu:.0f} HU): an end plate, a sclerotic or lytic focus or the "
                "cortex is inside it"
            )
        if not TRABECULAR_RANGE_HU[0] <= self.mean_hu <= TRABECULAR_RANGE_HU[1]:
            return (
                f"the ROI mean ({self.mean_hu:.0f} HU) is outside the range of adult trabecular bone "
                f"({TRABECULAR_RANGE_HU[0]:.0f}-{TRABECULAR_RANGE_HU[1]:.0f} HU): sclerosis, cortex or a disc"
            )
        return None


@dataclass(frozen=True)
class BodyHeights:
    """Anterior, middle and posterior heights (mm) and where they were measured (for the key image).

    ``sagittal`` is the mid-sagittal slab the heights were read on (slices x detection-grid rows), centred on the
    body itself; ``rows`` are its rows of the three measuring lines and ``spans`` the (inferior, superior) end-plate
    positions on each, in fractional slice coordinates.
    """

    anterior_mm: float
    middle_mm: float
    posterior_mm: float
    rows: tuple[float, float, float]
    spans: tuple[tuple[float, float], tuple[float, float], tuple[float, float]]
    sagittal: np.ndarray
    column: int  # detection-grid column the slab is centred on

    @property
    def loss_percent(self) -> float:
        """Height loss = 1 - shortest / tallest of the three heights (wedge, biconcave or crush pattern)."""
        heights = (self.anterior_mm, self.middle_mm, self.posterior_mm)
        return 100.0 * (1.0 - min(heights) / max(heights))

    @property
    def shape(self) -> str:
        """Genant's deformity shape named by the shortest height: anterior wedge, biconcave, or crush (posterior)."""
        heights = {
            "anterior wedge": self.anterior_mm,
            "biconcave": self.middle_mm,
            "crush (posterior)": self.posterior_mm,
        }
        return min(heights, key=lambda name: heights[name])


def genant_grade(loss_percent: float) -> int:
    """Genant semi-quantitative grade from percentage height reduction (Genant et al. 1993)."""
    if loss_percent < 20.0:
        return 0
    if loss_percent <= 25.0:
        return 1
    if loss_percent <= 40.0:
        return 2
    return 3


def attenuation_category(hu: float) -> Category:
    """Pickhardt 2013 categories for L1 (or T12-L5) trabecular attenuation."""
    if hu <= PICKHARDT_SPECIFIC_HU:
        return Category("osteoporosis-likely", "Osteoporosis likely (<= 110 HU)", PICKHARDT_RULE, True)
    if hu <= PICKHARDT_SENSITIVE_HU:
        return Category("low", "Low bone density, osteoporosis possible (111-160 HU)", PICKHARDT_RULE, True)
    return Category("normal", "Normal bone density (> 160 HU)", PICKHARDT_RULE, False)


def place_trabecular_roi(
    volume: np.ndarray, spacing: tuple[float, float, float], track: SpineTrack, vertebra: Vertebra
) -> TrabecularRoi:
    """The ROI on the mid-body slice, or, when that one is heterogeneous, on the most homogeneous central slice.

    A reader following Pickhardt places the ROI on a mid-body slice *clear of focal lesions and bone islands*;
    with 3 mm slices whether the mid-body slice cuts a bone island (partial volume keeps it below the 500 HU
    exclusion) depends on where the slices fall, and on the validation abdomen the L1 value moved from about
    100 HU to 121-129 HU with the table position. So when the mid-body ROI's SD is above that of cancellous bone
    (:data:`HOMOGENEOUS_MAX_SD_HU`), the slices of the body's middle half - clear of the end plates - are tried
    and the homogeneous one nearest mid-body is kept (moved no further than needed, as a reader would: not the
    lowest SD, which would prefer the dense bone under an end plate); its slice is shown on the axial key image.
    When none is homogeneous the mid-body ROI stands, with its warnings.
    """
    roi = measure_trabecular_roi(volume, spacing, track, vertebra)
    if roi.sd_hu <= HOMOGENEOUS_MAX_SD_HU:
        return roi
    quarter = 0.25 * (vertebra.superior_slice - vertebra.inferior_slice)
    central = range(math.ceil(vertebra.inferior_slice + quarter), math.floor(vertebra.superior_slice - quarter) + 1)
    tried = [measure_trabecular_roi(volume, spacing, track, vertebra, z) for z in central if z != roi.slice_index]
    homogeneous = [r for r in tried if r.sd_hu <= HOMOGENEOUS_MAX_SD_HU and r.untrusted_reason() is None]
    if not homogeneous:
        return roi
    centre = 0.5 * (vertebra.inferior_slice + vertebra.superior_slice)
    return min(homogeneous, key=lambda r: (abs(r.slice_index - centre), r.sd_hu))


def measure_trabecular_roi(
    volume: np.ndarray,
    spacing: tuple[float, float, float],
    track: SpineTrack,
    vertebra: Vertebra,
    slice_index: int | None = None,
) -> TrabecularRoi:
    """Mean and SD HU in an ellipse in the anterior two thirds of the body's cancellous bone, on its mid-body slice.

    Like Pickhardt's manual ROI, placed from the body's own outline rather than from the spine track: the body is
    the region enclosed by its cortex (bone > 200 HU, closed over 2 mm gaps, holes filled) in front of the posterior
    wall; it is eroded by 3 mm so the ROI keeps off the cortex, and the ellipse (semi-axes 30 % of the inner depth
    and 35 % of the inner width) is centred at 40 % of the inner depth from the front, i.e. in the anterior two
    thirds, in front of the basivertebral vein. Pixels outside the eroded body are not counted. ``inside`` says how
    much of the nominal ellipse lay inside the body: a low value means the outline was not found and the value is
    not trusted. ``slice_index`` overrides the mid-body slice.
    """
    z = vertebra.mid_slice if slice_index is None else slice_index
    image = volume[z].astype(np.float32)
    stride, px = track.stride, float(spacing[1])
    anterior = vertebra.anterior_row * stride
    posterior = vertebra.posterior_row * stride
    seed_row = round(anterior + 0.5 * (posterior - anterior))
    seed_col = round(float(track.column[z]) * stride)
    body = _body_outline(image, anterior, posterior, seed_row, seed_col, px)
    inner = ndimage.binary_erosion(body, iterations=max(1, round(_CORTEX_MARGIN_MM / px)))
    if inner.sum() * px * px < 100.0:  # less than 1 cm2 of cancellous bone: no outline, fall back to the track
        inner = body if body.sum() * px * px >= 100.0 else np.zeros_like(body)
    if inner.any():
        rows = np.flatnonzero(inner.any(axis=1))
        cols = np.flatnonzero(inner.any(axis=0))
        top, bottom, left, right = float(rows[0]), float(rows[-1]), float(cols[0]), float(cols[-1])
    else:  # nothing segmented: nominal placement from the sagittal walls, flagged by inside == 0
        top, bottom = anterior + 3.0 / px, posterior - 3.0 / px
        left, right = seed_col - 15.0 / px, seed_col + 15.0 / px
    depth, width = bottom - top, right - left
    center_row, center_col = top + 0.40 * depth, 0.5 * (left + right)
    semi_rows, semi_cols = max(2.0 / px, 0.30 * depth), max(3.0 / px, 0.35 * width)
    rr, cc = np.ogrid[: image.shape[0], : image.shape[1]]
    ellipse = ((rr - center_row) / semi_rows) ** 2 + ((cc - center_col) / semi_cols) ** 2 <= 1.0
    mask = ellipse & inner
    inside = float(mask.sum()) / max(1.0, float(ellipse.sum()))
    # a bone island (or a calcified end-plate fleck) is avoided by a reader placing the ROI: leave out pixels above
    # 500 HU and their immediate neighbours (partial volume), unless that would remove most of the ROI
    island = ndimage.binary_dilation(image > _ISLAND_HU, iterations=1)
    if (mask & ~island).sum() >= 0.5 * mask.sum():
        mask &= ~island
    values = image[mask if mask.any() else ellipse].astype(np.float64)
    return TrabecularRoi(
        z,
        center_row,
        center_col,
        semi_rows,
        semi_cols,
        float(values.mean()),
        float(values.std()),
        int(values.size),
        float(values.size) * px * float(spacing[2]),
        inside,
    )


def _body_outline(
    image: np.ndarray, anterior: float, posterior: float, seed_row: int, seed_col: int, px: float
) -> np.ndarray:
    """The vertebral body's cross-section on one axial slice.

    Cancellous bone is often only 60-200 HU and the cortex, blurred by partial volume at 3-5 mm, is not a closed
    ring above 200 HU, so the body is taken as tissue above 90 HU after 1.5 mm smoothing *or* cortex above 200 HU,
    inside a box from 3 mm in front of the anterior wall to 1.5 mm behind the posterior wall (so the canal and
    the neural arch are not included) and within 27 mm of the midline (half the widest lumbar body); closed over
    2 mm, holes filled, the component at the seed kept. Soft tissue (muscle, crura, unenhanced vessels) is below
    90 HU; a densely enhanced aorta touching the body can leak in, which the ROI's centring tolerates.
    """
    body = np.zeros(image.shape, dtype=bool)
    r0, r1 = max(0, round(anterior - 3.0 / px)), min(image.shape[0], round(posterior + 1.5 / px) + 1)
    reach = round(27.0 / px)
    c0, c1 = max(0, seed_col - reach), min(image.shape[1], seed_col + reach + 1)
    if r1 - r0 < 3 or c1 - c0 < 3:
        return body
    crop = image[r0:r1, c0:c1]
    smooth = ndimage.gaussian_filter(crop, 1.5 / px / 2.355)
    tissue = (smooth > 90.0) | (crop > BONE_HU)
    tissue = ndimage.binary_closing(tissue, iterations=max(1, round(2.0 / px)), border_value=0)
    tissue = ndimage.binary_fill_holes(tissue)
    labels, count = ndimage.label(tissue)
    if count == 0:
        return body
    seed_r, seed_c = min(max(seed_row - r0, 0), crop.shape[0] - 1), min(max(seed_col - c0, 0), crop.shape[1] - 1)
    keep = labels[seed_r, seed_c]
    if keep == 0:  # the seed fell in a dark core (fatty marrow): take the largest component instead
        keep = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    body[r0:r1, c0:c1] = labels == keep
    return body


HEIGHT_LINES = (0.15, 0.50, 0.85)
"""Measuring lines at these fractions of the body depth from its anterior wall: Genant's anterior, middle and
posterior heights, kept clear of the cortical walls (a line inside a wall follows the cortex, not the end plates)."""

_DISC_SEARCH_MM = 10.0
"""How far from the disc found on the body's core the disc is looked for on each measuring line: end plates are
tilted against the axial plane (lordosis, wedging) by up to ~25 degrees, which moves the disc by up to ~10 mm
between the middle and the walls of a 40 mm deep body."""

_FLANK_MM = 6.0
"""A disc is a dark band with bright bone (end plates) on both sides within this distance of its centre."""


_PEAK_MM = 10.0
"""The end plate is the first brightness maximum walking from the disc into the body, within this distance."""


def measure_heights(
    volume: np.ndarray, spacing: tuple[float, float, float], track: SpineTrack, vertebra: Vertebra
) -> BodyHeights | None:
    """Anterior, middle and posterior heights of a vertebral body, read on a mid-sagittal slab through its centre.

    The reading a radiologist makes (Genant 1993; the six points of quantitative morphometry) put on a profile:

    1. the slab (+/- 5 mm) is centred on the body's own left-right centre on its mid-body axial slice, not on the
       spine track, which follows the canal and spinous processes and can run off the body's midline;
    2. on each measuring line (:data:`HEIGHT_LINES`, a band +/- 1.5 mm wide) the discs above and below are found
       *on that line*, as the deepest dark band flanked by bright end plates within 10 mm of the disc found on the
       body's core - tilted or wedge-shaped end plates put the disc several slices apart at the front and back;
    3. each end plate's edge is where the profile, walking from the disc into the body, crosses halfway between
       the disc and the end plate's own brightness (its first maximum): the disc-bone interface where a reader
       puts the point, independent of how dense (or osteoporotic) the cancellous bone behind it is;
    4. lines are vertical in the scanner frame, so heights are multiplied by the cosine of the body's tilt
       (from its posterior wall).

    Returns None when the body is incomplete or an end plate cannot be found on a line.
    """
    if not (vertebra.complete and vertebra.single_body):
        return None
    grid, _, px = detection_grid(volume, spacing)
    dz = track.slice_mm
    column = _body_centre_column(volume, spacing, track, vertebra)
    half = max(1, round(5.0 / px))
    sagittal = grid[:, :, max(0, column - half) : column + half + 1].mean(axis=2, dtype=np.float64)
    nz = sagittal.shape[0]
    search = max(1, math.ceil(_DISC_SEARCH_MM / dz))
    lo = max(0, math.floor(vertebra.inferior_slice) - search)
    hi = min(nz - 1, math.ceil(vertebra.superior_slice) + search)
    if hi - lo < 4:
        return None
    zs = np.arange(math.floor(vertebra.inferior_slice), math.ceil(vertebra.superior_slice) + 1)
    walls = track.posterior_row[zs]
    ok = np.isfinite(walls)
    tilt = 0.0
    if ok.sum() >= 3:
        slope = np.polyfit(zs[ok] * dz, walls[ok] * px, 1)[0]
        tilt = math.atan(float(slope))
    a, p = vertebra.anterior_row, vertebra.posterior_row
    rows = tuple(a + f * (p - a) for f in HEIGHT_LINES)
    band = max(1, round(1.5 / px))
    reach = max(1, math.ceil(_PEAK_MM / dz))
    window = sagittal[lo : hi + 1]
    depth_rows = np.arange(max(band, math.floor(a)), min(sagittal.shape[1] - band, math.ceil(p) + 1))
    discs = []
    for expected in (vertebra.inferior_slice, vertebra.superior_slice):
        path = _disc_across_body(window, depth_rows, round(expected) - lo, search, band, dz, px)
        if path is None:
            return None
        discs.append(path)
    heights: list[float] = []
    spans: list[tuple[float, float]] = []
    for row in rows:
        r = round(row)
        profile = window[:, max(0, r - band) : r + band + 1].mean(axis=1)
        at = int(np.argmin(np.abs(depth_rows - r)))
        inferior, superior = _lowest_near(profile, discs[0][at]), _lowest_near(profile, discs[1][at])
        bottom = _end_plate_edge(profile, inferior, +1, reach)
        top = _end_plate_edge(profile, superior, -1, reach)
        if bottom is None or top is None or top - bottom < 2:
            return None
        spans.append((lo + bottom, lo + top))
        heights.append((top - bottom) * dz * math.cos(tilt))
    return BodyHeights(
        heights[0], heights[1], heights[2], (rows[0], rows[1], rows[2]), (spans[0], spans[1], spans[2]),
        sagittal.astype(np.float32), column,
    )  # fmt: skip


def _body_centre_column(
    volume: np.ndarray, spacing: tuple[float, float, float], track: SpineTrack, vertebra: Vertebra
) -> int:
    """Detection-grid column of the body's left-right centre on its mid-body slice (the track's when not found)."""
    z = vertebra.mid_slice
    stride, px = track.stride, float(spacing[1])
    seed_row = round((vertebra.anterior_row + 0.5 * (vertebra.posterior_row - vertebra.anterior_row)) * stride)
    seed_col = round(float(track.column[z]) * stride)
    body = _body_outline(
        volume[z].astype(np.float32), vertebra.anterior_row * stride, vertebra.posterior_row * stride, seed_row,
        seed_col, px,
    )  # fmt: skip
    if body.sum() * px * px < 100.0:
        return int(track.column[z])
    columns = np.flatnonzero(body.any(axis=0))
    return round(0.5 * (columns[0] + columns[-1]) / stride)


def _disc_across_body(
    window: np.ndarray, depth_rows: np.ndarray, expected: int, search: int, band: int, dz: float, px: float
) -> np.ndarray | None:
    """The disc's slice on every row across the body's depth, followed as one continuous dark band.

    On each row a disc is a dark sample with bright bone (end plates) on both sides within 6 mm; the band is
    followed from front to back by dynamic programming (:func:`models.spine.track_path`), moving at most as far
    per row as a 35-degree tilt allows. Why not the darkest point on each line alone: the basivertebral veins
    enter the back of the body at mid-height and make a dark notch there that a single line mistakes for a disc.
    """
    flank = max(1, round(_FLANK_MM / dz))
    candidates = np.arange(max(flank, expected - search), min(window.shape[0] - flank, expected + search + 1))
    if candidates.size == 0:
        return None
    score = np.zeros((depth_rows.size, candidates.size))
    for i, r in enumerate(depth_rows):
        profile = window[:, r - band : r + band + 1].mean(axis=1)
        for j, z in enumerate(candidates):
            flanks = min(profile[z - flank : z].max(), profile[z + 1 : z + 1 + flank].max())
            score[i, j] = max(0.0, flanks - profile[z])
    if score.max() <= 0:
        return None
    max_step = max(1, round(px * math.tan(math.radians(35.0)) / dz))
    return candidates[track_path(score / score.max(), max_step, 0.05)]


def _lowest_near(profile: np.ndarray, z: int) -> int:
    """The darkest sample within one slice of ``z`` (the followed band, on this line's own profile)."""
    lo, hi = max(0, z - 1), min(profile.size, z + 2)
    return lo + int(np.argmin(profile[lo:hi]))


def _end_plate_edge(profile: np.ndarray, disc: int, step: int, reach: int) -> float | None:
    """Fractional index of the disc-bone interface walking from ``disc`` by ``step``.

    The end plate is the first brightness maximum that rises at least halfway to the brightest sample within
    ``reach`` (so noise inside a thick disc is not taken for it); the interface is where the profile crosses
    halfway between the disc and that maximum, linearly interpolated.
    """
    span = [disc + step * k for k in range(1, reach + 1) if 0 <= disc + step * k < profile.size]
    if not span:
        return None
    floor = float(profile[disc])
    rise = float(max(profile[i] for i in span)) - floor
    if rise <= 0:
        return None
    peak = span[-1]
    for k, i in enumerate(span):
        following = span[k + 1] if k + 1 < len(span) else None
        if profile[i] - floor >= 0.5 * rise and (following is None or profile[following] < profile[i]):
            peak = i
            break
    level = 0.5 * (floor + float(profile[peak]))
    i = disc
    while profile[i + step] < level:
        i += step
    return float(i + step * (level - float(profile[i])) / (float(profile[i + step]) - float(profile[i])))


def aorta_hu(volume: np.ndarray, spacing: tuple[float, float, float], track: SpineTrack, vertebra: Vertebra) -> float:
    """Brightest 10 mm disc of soft tissue in front of and left of the vertebral body: the aortic lumen.

    Calcified plaque is thin and averages away in a 10 mm window; the body itself is excluded by keeping the
    window centres at least 7 mm in front of its anterior wall.
    """
    z = vertebra.mid_slice
    stride = track.stride
    px = float(spacing[1])
    front = vertebra.anterior_row * stride
    col = track.column[z] * stride
    r0, r1 = int(max(0, front - 50 / px)), int(max(0, front - 7 / px))
    c0, c1 = int(max(0, col - 25 / px)), int(min(volume.shape[2], col + 45 / px))
    if r1 - r0 < 3 or c1 - c0 < 3:
        return float("nan")
    pad = round(5 / px)
    region = volume[z, max(0, r0 - pad) : r1 + pad, max(0, c0 - pad) : c1 + pad]
    smooth = ndimage.uniform_filter(np.clip(region, -100.0, 400.0), size=max(3, round(10 / px)))
    return float(smooth[pad : pad + (r1 - r0), pad : pad + (c1 - c0)].max())


class BoneAnalyzer:
    """Opportunistic bone density (Pickhardt L1 HU) and vertebral body height analysis of chest/abdomen CT."""

    name = "ct-bone"
    version = "0.4.0"
    title = "CT opportunistic osteoporosis screening and vertebral body heights"
    requirements = SeriesRequirements(
        modalities=("CT",),
        min_instances=10,
        body_parts=("ABDOMEN", "CHEST", "SPINE", "LSPINE", "TSPINE", "PELVIS"),
        description_keywords=("abd", "chest", "thorax", "spine", "bone"),
        excluded_description_keywords=("scout", "localizer", "topogram", "mip", "lung"),
    )

    def check_input(self, image: ImageInput) -> None:
        """CT only, a 3-D volume of at least 10 slices over >= 40 mm, in calibrated HU, with a spine in view."""
        if image.modality.upper() != "CT":
            raise UnsuitableInputError(
                f"The bone analyzer reads CT; this series is {image.modality}.",
                remedy="Send a chest or abdomen CT series.",
            )
        if image.array.ndim != 3:
            raise UnsuitableInputError(
                f"The bone analyzer needs a 3-D CT volume; got a {image.array.ndim}-D image.",
                remedy="Send the whole axial series, not a single slice or a projection.",
            )
        slices = image.array.shape[0]
        extent = slices * float(image.spacing[0])
        if slices < 10 or extent < 40.0:
            raise UnsuitableInputError(
                f"The volume covers {extent:.0f} mm in {slices} slices; at least 10 slices over 40 mm are needed to "
                "see whole vertebral bodies.",
                remedy="Send the full axial series.",
            )
        sample = image.array[:: max(1, slices // 8), ::4, ::4]
        low, high = float(np.percentile(sample, 1)), float(np.percentile(sample, 99.9))
        if low > -800.0 or high < 300.0:
            raise UnsuitableInputError(
                f"Pixel values do not look like calibrated Hounsfield units (1st percentile {low:.0f}, 99.9th "
                f"{high:.0f}; air should be near -1000 HU and bone above 300 HU).",
                remedy="Apply RescaleSlope/RescaleIntercept when decoding the series.",
            )
        find_spine(image.array, _spacing3(image))  # raises UnsuitableInputError when no spine is seen

    def analyze(self, image: ImageInput) -> AnalysisResult:
        spacing = _spacing3(image)
        volume = image.array
        track = find_spine(volume, spacing)
        vertebrae = split_vertebrae(track)
        levels = identify_levels(volume, spacing, track, vertebrae)
        warnings: list[str] = [levels.note] if levels.method != "none" else []
        if levels.conflict:
            warnings.append("Rib and sacrum counts disagree: check the level labels before acting on them.")
        target = _choose_vertebra(levels)
        if target is None:
            return AnalysisResult(
                self.name,
                self.version,
                (),
                Category("not-assessable", "No complete vertebral body to measure", PICKHARDT_RULE, False),
                "A spine is in view but no complete vertebral body could be delimited; nothing was measured.",
                warnings=(levels.note,),
            )
        roi = place_trabecular_roi(volume, spacing, track, target)
        thin = track.slice_mm <= MAX_SLICE_MM_FOR_GRADING + 0.01
        heights = measure_heights(volume, spacing, track, target) if thin else None
        measurements, category, conclusion = self._summarise(levels, target, roi, heights, warnings, track)
        aorta = aorta_hu(volume, spacing, track, target)
        if np.isfinite(aorta) and aorta > CONTRAST_AORTA_HU:
            warnings.append(
                f"Intravenous contrast likely (aortic lumen about {aorta:.0f} HU): contrast raises trabecular "
                "attenuation somewhat; Pickhardt 2013 found it did not change the thresholds' performance."
            )
        if roi.sd_hu > 80.0 and roi.untrusted_reason() is None:
            warnings.append(
                f"Heterogeneous ROI (SD {roi.sd_hu:.0f} HU): a bone island, lesion or cortex may be inside it; "
                "check the axial overlay."
            )
        if track.slice_mm > 1.5:
            warnings.append(
                f"Slices are {track.slice_mm:.1f} mm: end-plate positions, hence body heights, are uncertain by about "
                f"+/- {track.slice_mm:.0f} mm, and disc boundaries are coarse."
            )
        explanations = (
            Explanation(
                "Mid-sagittal reformat: vertebral bodies, levels and measured heights",
                "overlay",
                _sagittal_png(track, levels, target, heights),
            ),
            Explanation(
                f"Axial slice through {target.label}: trabecular ROI",
                "overlay",
                _axial_png(volume, roi, target, spacing),
                slice_index=roi.slice_index,
            ),
        )
        return AnalysisResult(
            self.name, self.version, measurements, category, conclusion, explanations, warnings=tuple(warnings)
        )

    def _summarise(
        self,
        levels: LevelIdentification,
        target: Vertebra,
        roi: TrabecularRoi,
        heights: BodyHeights | None,
        warnings: list[str],
        track: SpineTrack,
    ) -> tuple[tuple[Measurement, ...], Category, str]:
        measurements: list[Measurement] = []
        identified = target.level is not None
        untrusted = roi.untrusted_reason()
        if untrusted is not None and not identified:
            category = Category(
                "level-not-identified", "L1 could not be identified; bone density not classified", PICKHARDT_RULE, False
            )
            conclusion = (
                f"L1 could not be identified ({levels.note}) No attenuation is reported for the lowest complete "
                f"vertebral body either: {untrusted}."
            )
            warnings.append(f"Trabecular attenuation withheld: {untrusted}; see the axial overlay.")
        elif untrusted is not None:
            category = Category(
                "not-assessable", "Trabecular attenuation not measurable reliably", PICKHARDT_RULE, False
            )
            conclusion = f"Bone density not assessed at {target.label}: {untrusted}. No threshold was applied."
            warnings.append(f"Trabecular attenuation withheld: {untrusted}; see the axial overlay.")
        elif identified:
            assert target.level is not None
            key = f"{target.level.lower()}_trabecular_hu"
            note = "" if target.level == "L1" else f"L1 not measurable; measured at {target.level} instead."
            # Whole HU, the precision of the published thresholds: the filed value, the sentence and the category
            # agree (never 110.4 HU filed as "low (111-160 HU)", nor "160 HU" in words next to "Normal (> 160 HU)").
            hu = float(round(roi.mean_hu))
            category = attenuation_category(hu)
            interpretation: Interpretation = "L" if category.abnormal else "N"
            measurements.append(
                Measurement(
                    key,
                    f"{target.level} trabecular attenuation",
                    hu,
                    "[hnsf'U]",
                    interpretation,
                    reference_low=lowest_normal(PICKHARDT_SENSITIVE_HU, 0),  # 161 HU: 160 and below are low
                    note=note,
                )
            )
            conclusion = f"{target.level} trabecular attenuation {hu:.0f} HU (SD {roi.sd_hu:.0f}): {category.display}."
        else:
            measurements.append(
                Measurement(
                    "vertebral_trabecular_hu",
                    "Trabecular attenuation, unidentified level",
                    float(round(roi.mean_hu)),
                    "[hnsf'U]",
                    note="Vertebral level could not be identified; Pickhardt L1 thresholds not applied.",
                )
            )
            category = Category(
                "level-not-identified",
                "L1 could not be identified; bone density not classified",
                PICKHARDT_RULE,
                False,
            )
            conclusion = (
                f"L1 could not be identified ({levels.note}) The lowest complete vertebral body in view measures "
                f"{roi.mean_hu:.0f} HU (SD {roi.sd_hu:.0f}), level unknown, so no osteoporosis threshold was applied."
            )
        if untrusted is None:
            measurements.append(
                Measurement(
                    "trabecular_roi_sd_hu", "Trabecular ROI standard deviation", round(roi.sd_hu, 1), "[hnsf'U]"
                )
            )
        if track.slice_mm > MAX_SLICE_MM_FOR_GRADING + 0.01:
            # End plates are located to about one slice: on thick slices the error is as large as the height loss
            # that separates Genant grades, so the heights themselves would mislead rather than inform.
            warnings.append(
                f"Vertebral body heights and fracture grade not reported: {track.slice_mm:.1f} mm slices locate the "
                f"end plates only to about +/- {track.slice_mm:.0f} mm (needs <= {MAX_SLICE_MM_FOR_GRADING:.0f} mm)."
            )
            return tuple(measurements), category, conclusion
        implausible = implausible_heights_reason(heights, target) if heights is not None else None
        if implausible is not None:
            warnings.append(f"Body heights of {target.label} not reported: {implausible}.")
            return tuple(measurements), category, conclusion
        if heights is None:
            warnings.append(
                f"Body heights of {target.label} not measured: its end plates could not both be found on the "
                "sagittal image (or the body is not wholly in view)."
            )
            return tuple(measurements), category, conclusion
        for key, display, value in (
            ("anterior_height_mm", "Anterior vertebral body height", heights.anterior_mm),
            ("middle_height_mm", "Middle vertebral body height", heights.middle_mm),
            ("posterior_height_mm", "Posterior vertebral body height", heights.posterior_mm),
        ):
            measurements.append(Measurement(key, f"{display} ({target.label})", round(value, 1), "mm"))
        loss = heights.loss_percent
        measurements.append(Measurement("height_loss_percent", f"Height loss ({target.label})", round(loss, 1), "%"))
        grade = genant_grade(loss)
        measurements.append(
            Measurement(
                "genant_grade",
                f"Genant semi-quantitative grade ({target.label})",
                float(grade),
                "1",
                "A" if grade > 0 else "N",
                note=GENANT_RULE,
            )
        )
        conclusion += f" {target.label} height loss {loss:.0f}% ({heights.shape} shape, Genant grade {grade})."
        if grade > 0:
            warnings.append(
                f"Possible vertebral fracture at {target.label} (Genant grade {grade}) from automated heights; "
                "confirm on sagittal images (physiological wedging and end-plate detection can mimic it)."
            )
        return tuple(measurements), category, conclusion


def implausible_heights_reason(heights: BodyHeights, vertebra: Vertebra) -> str | None:
    """Why these heights cannot be one body's, or None.

    A body's height, end plate to end plate, is shorter than the distance from one disc to the next along the same
    spine (that distance is the body plus a disc), so a height beyond the spine's own vertebral spacing means the
    end plates found belong to different bodies. The spacing is the column's periodicity
    (:func:`models.spine.vertebral_spacing`), not a population figure, so tall and short patients are judged alike.
    """
    tallest = max(heights.anterior_mm, heights.middle_mm, heights.posterior_mm)
    if math.isfinite(vertebra.spacing_mm) and tallest > vertebra.spacing_mm:
        return (
            f"a height of {tallest:.0f} mm is more than this spine's vertebra-to-vertebra spacing "
            f"({vertebra.spacing_mm:.0f} mm), so the end plates found belong to different bodies"
        )
    return None


def _spacing3(image: ImageInput) -> tuple[float, float, float]:
    if len(image.spacing) != 3:
        raise UnsuitableInputError("The bone analyzer needs a 3-D CT volume.", remedy="Send the whole axial series.")
    return (float(image.spacing[0]), float(image.spacing[1]), float(image.spacing[2]))


def _choose_vertebra(levels: LevelIdentification) -> Vertebra | None:
    """L1 if identified and complete, else the nearest identified level; with no levels, the lowest complete body
    that is not joined to the pelvis (in a chest CT the one nearest the thoracolumbar junction)."""
    # a segment spanning several bodies (a missed disc) or a fragment of one is not a vertebral body to measure
    complete = [v for v in levels.vertebrae if v.complete and v.single_body]
    by_level = {v.level: v for v in complete if v.level}
    for level in _MEASURE_PREFERENCE:
        if level in by_level:
            return by_level[level]
    labelled = [v for v in complete if v.level]
    if labelled:
        order = ("S1", "L5", "L4", "L3", "L2", "L1", *[f"T{n}" for n in range(12, 0, -1)], "C7", "C6")
        return min(labelled, key=lambda v: abs(order.index(v.level or "L1") - order.index("L1")))
    candidates = [v for v in complete if not v.pelvis_joined]
    return candidates[0] if candidates else None


def _sagittal_png(
    track: SpineTrack, levels: LevelIdentification, target: Vertebra, heights: BodyHeights | None
) -> bytes:
    """Mid-sagittal slab, superior up, anterior left, at isotropic display scale; every body outlined with its
    label, the measured one in a double outline. Beside it, the measured body enlarged on the slab its heights
    were read on, with the three measuring lines from end plate to end plate, so a reader can check each."""
    sagittal = heights.sagittal if heights is not None else track.sagittal
    scale_z = track.slice_mm / track.pixel_mm
    zoom = max(1.0, 400.0 / max(sagittal.shape[1], track.slices * scale_z))
    height = round(track.slices * scale_z * zoom)
    canvas = _sagittal_canvas(sagittal, scale_z, zoom, 400.0, 1800.0)
    draw = ImageDraw.Draw(canvas)

    def to_xy(row: float, slice_coord: float) -> tuple[float, float]:
        return row * zoom, height - (slice_coord + 0.5) * scale_z * zoom

    for v in levels.vertebrae:
        (x0, y0), (x1, y1) = to_xy(v.anterior_row, v.superior_slice), to_xy(v.posterior_row, v.inferior_slice)
        draw.rectangle([x0, y0, x1, y1], outline=render.CYAN, width=1)
        if v is target:
            draw.rectangle([x0 - 3, y0 - 3, x1 + 3, y1 + 3], outline=render.YELLOW, width=1)
        draw.text((x1 + 6, (y0 + y1) / 2 - 6), v.label if v.level else "?", fill=render.WHITE)
    panels = [np.asarray(canvas)]
    caption = "Sagittal, anterior left. Boxes: vertebral bodies with level (? = unidentified)."
    if heights is not None:
        panels.append(_heights_detail(track, target, heights))
        caption += (
            f"\nDouble box: {target.label}, enlarged on the right on the slab through its centre: end plate to end "
            f"plate, heights A {heights.anterior_mm:.1f} / M {heights.middle_mm:.1f} / P {heights.posterior_mm:.1f} mm"
        )
    rows = max(panel.shape[0] for panel in panels)
    padded = [np.pad(panel, ((0, rows - panel.shape[0]), (0, 8), (0, 0))) for panel in panels]
    return render.to_png(render.label(np.concatenate(padded, axis=1), caption, font_size=12))


def _sagittal_canvas(sagittal: np.ndarray, scale_z: float, zoom: float, level: float, width: float) -> Image.Image:
    """A sagittal slab (slices x rows) as an RGB image, superior up, at isotropic scale times ``zoom``."""
    gray = render.window(sagittal, level, width)
    size = (round(sagittal.shape[1] * zoom), round(sagittal.shape[0] * scale_z * zoom))
    image = Image.fromarray(gray).resize(size, Image.Resampling.BICUBIC).transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    return image.convert("RGB")


def _heights_detail(track: SpineTrack, target: Vertebra, heights: BodyHeights) -> np.ndarray:
    """The measured body and its neighbouring discs, enlarged (bone window), with each measuring line drawn from
    the inferior to the superior end-plate edge it found, end ticks, and its height."""
    scale_z = track.slice_mm / track.pixel_mm
    depth = target.posterior_row - target.anterior_row
    r0 = max(0, math.floor(target.anterior_row - 0.6 * depth))
    r1 = min(heights.sagittal.shape[1], math.ceil(target.posterior_row + 0.6 * depth))
    margin = 0.4 * (target.superior_slice - target.inferior_slice)
    z0 = max(0, math.floor(target.inferior_slice - margin))
    z1 = min(heights.sagittal.shape[0], math.ceil(target.superior_slice + margin) + 1)
    crop = heights.sagittal[z0:z1, r0:r1]
    zoom = 360.0 / max(crop.shape[1], crop.shape[0] * scale_z)
    canvas = _sagittal_canvas(crop, scale_z, zoom, 300.0, 1000.0)
    draw = ImageDraw.Draw(canvas)
    rows_px = canvas.height

    def to_xy(row: float, slice_coord: float) -> tuple[float, float]:
        return (row - r0 + 0.5) * zoom, rows_px - (slice_coord - z0 + 0.5) * scale_z * zoom

    values = (heights.anterior_mm, heights.middle_mm, heights.posterior_mm)
    for name, row, (bottom, top), value in zip("AMP", heights.rows, heights.spans, values, strict=True):
        (x, y_top), (_, y_bottom) = to_xy(row, top), to_xy(row, bottom)
        draw.line([x, y_top, x, y_bottom], fill=render.MAGENTA, width=2)
        for y in (y_top, y_bottom):
            draw.line([x - 5, y, x + 5, y], fill=render.YELLOW, width=2)
        draw.text((x - 4, y_top - 26), name, fill=render.WHITE)
        draw.text((x - 12, y_bottom + 6), f"{value:.1f}", fill=render.WHITE)
    return np.asarray(canvas)


def _axial_png(volume: np.ndarray, roi: TrabecularRoi, target: Vertebra, spacing: tuple[float, float, float]) -> bytes:
    """The measured axial slice (bone window), cropped around the body, with the ROI ellipse outlined."""
    image = volume[roi.slice_index]
    half = round(60.0 / float(spacing[1]))
    r0 = int(max(0, roi.center_row - half))
    c0 = int(max(0, roi.center_col - half))
    crop = image[r0 : r0 + 2 * half, c0 : c0 + 2 * half]
    gray = render.window(crop, 400.0, 1800.0)
    zoom = max(1, round(360 / max(crop.shape)))
    canvas = Image.fromarray(gray).resize((crop.shape[1] * zoom, crop.shape[0] * zoom), Image.Resampling.BILINEAR)
    canvas = canvas.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    cy, cx = (roi.center_row - r0) * zoom, (roi.center_col - c0) * zoom
    ry, rx = roi.semi_rows * zoom, roi.semi_cols * zoom
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], outline=render.YELLOW, width=2)
    caption = (
        f"Axial, {target.label}, anterior up, patient right on the left.\n"
        f"Ellipse: trabecular ROI, mean {roi.mean_hu:.0f} HU, SD {roi.sd_hu:.0f} HU, {roi.pixels} pixels"
    )
    return render.to_png(render.label(np.asarray(canvas), caption, font_size=12))

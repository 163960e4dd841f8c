"""Find the spine in a CT volume, split it into vertebral bodies and identify levels where that is reliable.

Everything here is a pure, deterministic function of a HU volume and its spacing (no trained weights). The
volume follows the project convention of :class:`models.base.ImageInput`: ``(slices, rows, columns)``, slice 0
most inferior, rows increasing towards posterior, columns increasing towards the patient's left.

The method is classical image analysis, and heuristic in places; each step says why it is done that way:

1. Work on a *detection grid* (in-plane stride so that pixels are about 1.2 mm): localising the spine does not
   need sub-millimetre pixels, and this keeps a 61 x 512 x 512 volume well under a second.
2. The spine's left-right position per slice is the column with the most bone (> 200 HU) in the posterior half
   of the body, searched in the central half of the body width, then made continuous along z by dynamic
   programming (the spine is a continuous column; ribs, pelvis and sternum are not at one position for long).
3. On a narrow mid-sagittal slab through that column, the spinal canal is the dark (CSF, < 80 HU) strip that has
   bone close in front (the vertebral body or disc margin) and close behind (the neural arch); it is tracked along
   z the same way. The canal is the landmark that separates vertebral bodies (in front) from posterior elements.
4. The vertebral body is the run of attenuating tissue directly in front of the canal; its depth is smoothed
   along z because single slices are noisy.
5. Intervertebral discs are minima of the mean attenuation across the body's core along z (no bone, no cortical
   end plates). With 3-5 mm slices a disc is one or two slices thick, so boundaries and heights are coarse:
   +/- one slice thickness.
6. Levels: T12 is the lowest vertebra with a rib articulating with it (a bone structure starting beside the
   vertebra and reaching far laterally, which lumbar transverse processes do not); L1 is the next one down. When
   the sacrum is in view (the body joined to the iliac bones through the sacral alae), counting up from S1 gives
   the levels too, and the two are cross-checked. Both assume the usual 12 rib pairs and 5 lumbar vertebrae;
   transitional anatomy (11 or 13 rib pairs, a lumbarised S1 or sacralised L5) shifts every label by one. When
   neither landmark is found, no level is guessed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from core.errors import UnsuitableInputError

BONE_HU = 200.0
"""Cortical / dense bone threshold; trabecular bone alone may be lower (50-250 HU), cortex is well above."""

CANAL_MAX_HU = 80.0
"""The canal holds CSF, cord and epidural fat (about -100..60 HU); anything brighter is not canal."""

_GRID_MM = 1.2
_LATERAL_BONE_MM = 20.0
_RIB_REACH_MM = 65.0
_SACRAL_REACH_MM = 65.0

MAX_BODIES_PER_SEGMENT = 1.5
"""A segment longer than this many vertebral spacings is nearer two bodies than one (adjacent thoracolumbar bodies
differ in height by far less than that), so it is not one body."""

MIN_BODIES_PER_SEGMENT = 0.5
"""A complete segment shorter than this many vertebral spacings is nearer no body than one: a fragment."""

LUMBAR_ORDER: tuple[str, ...] = ("S1", "L5", "L4", "L3", "L2", "L1", "T12", "T11", "T10", "T9", "T8", "T7")
"""Labels going up from the sacrum; T12 and below also going down from the last rib-bearing vertebra."""


@dataclass(frozen=True)
class SpineTrack:
    """Where the spine runs, per slice, on the detection grid (pixel ``pixel_mm``, in-plane ``stride``)."""

    stride: int
    pixel_mm: float
    slice_mm: float
    column: np.ndarray  # (slices,) detection-grid column of the spine midline
    canal_row: np.ndarray  # (slices,) detection-grid row of the canal centre
    posterior_row: np.ndarray  # (slices,) float, posterior wall of the body (nan where none)
    anterior_row: np.ndarray  # (slices,) float, anterior wall of the body (nan where none)
    sagittal: np.ndarray  # (slices, rows) mid-sagittal slab, mean HU over +/- 5 mm around ``column``
    canal_score: np.ndarray  # (slices,) 0..1 how canal-like the tracked point is

    @property
    def slices(self) -> int:
        return int(self.column.shape[0])


@dataclass(frozen=True)
class Vertebra:
    """One vertebral body between two disc minima; slice coordinates are fractional slice indices."""

    inferior_slice: float
    superior_slice: float
    complete: bool  # both discs bounding it are inside the volume
    anterior_row: float  # detection-grid rows at mid-body (median over its slices)
    posterior_row: float
    level: str | None = None
    rib_bearing: bool = False
    pelvis_joined: bool = False
    slice_mm: float = math.nan
    spacing_mm: float = math.nan  # the spine's own vertebra-to-vertebra spacing (nan: not found)

    @property
    def bodies(self) -> float:
        """Disc-to-disc length in vertebral spacings: about 1 for one body (nan when the spacing is unknown)."""
        return (self.superior_slice - self.inferior_slice) * self.slice_mm / self.spacing_mm

    @property
    def spans_several(self) -> bool:
        """Longer than one and a half vertebral spacings of its own spine: nearer two bodies than one, so a disc
        was missed and this is several bodies taken as one (in the pelvis often the sacrum and coccyx)."""
        return bool(self.bodies > MAX_BODIES_PER_SEGMENT)

    @property
    def part_of_body(self) -> bool:
        """Shorter than half a vertebral spacing: a fragment of a body split at a spurious minimum (only judged on
        complete segments; one cut by the scan's edge is short for that reason)."""
        return bool(self.complete and self.bodies < MIN_BODIES_PER_SEGMENT)

    @property
    def single_body(self) -> bool:
        """Neither several bodies nor part of one (or the spacing is unknown): counting levels across it is sound."""
        return not (self.spans_several or self.part_of_body)

    @property
    def mid_slice(self) -> int:
        return round((self.inferior_slice + self.superior_slice) / 2.0)

    @property
    def label(self) -> str:
        return self.level or "unidentified level"


@dataclass(frozen=True)
class LevelIdentification:
    """Levels given to the vertebrae, and how (or why not)."""

    vertebrae: tuple[Vertebra, ...]
    method: str  # "ribs", "sacrum", "ribs+sacrum", "none"
    note: str
    conflict: bool = False


def detection_grid(volume: np.ndarray, spacing: tuple[float, float, float]) -> tuple[np.ndarray, int, float]:
    """A strided view with about 1.2 mm pixels (no copy); returns (grid, stride, pixel_mm)."""
    stride = max(1, round(_GRID_MM / float(spacing[1])))
    return volume[:, ::stride, ::stride], stride, float(spacing[1]) * stride


def body_mask(grid: np.ndarray) -> np.ndarray:
    """Per slice, the largest connected region above -300 HU: the patient, without the table or clothing."""
    mask = np.zeros(grid.shape, dtype=bool)
    for z in range(grid.shape[0]):
        tissue = grid[z] > -300.0
        labels, count = ndimage.label(tissue)
        if count:
            sizes = np.bincount(labels.ravel())
            sizes[0] = 0
            mask[z] = labels == int(np.argmax(sizes))
    return mask


def track_path(score: np.ndarray, max_step: int, penalty: float) -> np.ndarray:
    """Dynamic programming: the position per row of ``score`` maximising total score minus ``penalty`` per pixel
    of movement, moving at most ``max_step`` pixels between rows. Why: the spine is continuous along z, so a
    path is far more robust than a per-slice maximum, which jumps to a rib or the pelvis."""
    rows, n = score.shape
    total = score[0].astype(np.float64)
    back = np.zeros((rows, n), dtype=np.int64)
    index = np.arange(n)
    for r in range(1, rows):
        best = np.full(n, -np.inf)
        arg = np.zeros(n, dtype=np.int64)
        for step in range(-max_step, max_step + 1):
            shifted = np.full(n, -np.inf)
            if step > 0:
                shifted[step:] = total[: n - step]
            elif step < 0:
                shifted[:step] = total[-step:]
            else:
                shifted[:] = total
            shifted -= penalty * abs(step)
            better = shifted > best
            best[better] = shifted[better]
            arg[better] = (index - step)[better]
        total = best + score[r]
        back[r] = arg
    path = np.zeros(rows, dtype=np.int64)
    path[-1] = int(np.argmax(total))
    for r in range(rows - 1, 0, -1):
        path[r - 1] = back[r, path[r]]
    return path


def find_spine(volume: np.ndarray, spacing: tuple[float, float, float]) -> SpineTrack:
    """Locate the spine midline, the canal and the vertebral body walls on every slice.

    Raises :class:`UnsuitableInputError` when no spinal canal with a vertebral body in front of it is found along
    most of the volume (a head, a limb, a phantom).
    """
    grid, stride, px = detection_grid(volume, spacing)
    dz = float(spacing[0])
    nz, _ny, nx = grid.shape
    body = body_mask(grid)
    max_step = max(1, round(dz * 0.7 / px))  # the spine drifts < ~0.7 mm per mm of z, even with scoliosis

    # 1. left-right position of the spine
    column_score = np.zeros((nz, nx), dtype=np.float32)
    extents: list[tuple[int, int] | None] = []
    for z in range(nz):
        rows = np.flatnonzero(body[z].any(axis=1))
        cols = np.flatnonzero(body[z].any(axis=0))
        if rows.size < 10 or cols.size < 10:
            extents.append(None)
            continue
        y0, y1, x0, x1 = rows[0], rows[-1], cols[0], cols[-1]
        extents.append((int(y0), int(y1)))
        posterior = (grid[z, (y0 + y1) // 2 : y1 + 1] > BONE_HU) & body[z, (y0 + y1) // 2 : y1 + 1]
        profile = ndimage.uniform_filter1d(posterior.sum(axis=0).astype(np.float32), max(3, round(20 / px)))
        # prior: the spine lies near the middle of the body outline (sd 10 % of its width); without it the
        # path drifts onto an iliac bone or a sacroiliac joint in the pelvis
        prior = np.exp(-0.5 * ((np.arange(nx) - 0.5 * (x0 + x1)) / (0.1 * (x1 - x0) + 1.0)) ** 2)
        profile = profile * prior
        lo, hi = int(x0 + 0.25 * (x1 - x0)), int(x1 - 0.25 * (x1 - x0))
        if profile.max() > 0:
            column_score[z, lo : hi + 1] = profile[lo : hi + 1] / profile.max()
    column = track_path(column_score, max_step, 0.05)

    # 2. mid-sagittal slab and the canal
    half = max(1, round(5.0 / px))
    sagittal = np.stack(
        [grid[z, :, max(0, column[z] - half) : column[z] + half + 1].mean(axis=1) for z in range(nz)]
    ).astype(np.float32)
    bright = ndimage.maximum_filter1d(sagittal, 3, axis=0)  # a disc slice borrows its neighbours' end plates
    near, far = max(1, round(3.0 / px)), round(14.0 / px)
    front = np.full_like(sagittal, -1000.0)
    behind = np.full_like(sagittal, -1000.0)
    for k in range(near, far + 1):
        front[:, k:] = np.maximum(front[:, k:], bright[:, :-k])
        behind[:, :-k] = np.maximum(behind[:, :-k], bright[:, k:])
    canal_like = np.clip(np.minimum(front, behind) - np.clip(sagittal, 0.0, None), 0.0, 600.0) / 600.0
    canal_like *= sagittal < CANAL_MAX_HU
    for z, ext in enumerate(extents):
        if ext is None:
            canal_like[z] = 0.0
        else:  # the canal lies in the posterior 70 % of the body outline
            canal_like[z, : int(ext[0] + 0.3 * (ext[1] - ext[0]))] = 0.0
            canal_like[z, ext[1] :] = 0.0
    canal = track_path(canal_like, max_step, 0.05)
    canal_score = canal_like[np.arange(nz), canal]

    # 3. vertebral body walls in front of the canal
    posterior_row, anterior_row = _body_walls(sagittal, canal, px)
    track = SpineTrack(stride, px, dz, column, canal, posterior_row, anterior_row, sagittal, canal_score)
    found = np.isfinite(anterior_row) & (canal_score > 0.15)
    if found.sum() < max(3, 0.4 * nz):
        raise UnsuitableInputError(
            f"No spine found: a spinal canal with a vertebral body in front of it was seen on {int(found.sum())} of "
            f"{nz} slices.",
            remedy="Send a chest or abdomen CT that includes the spine.",
        )
    return track


def _body_walls(sagittal: np.ndarray, canal: np.ndarray, px: float) -> tuple[np.ndarray, np.ndarray]:
    """Posterior and anterior wall rows of the vertebral body (or disc) in front of the canal, per slice.

    Walking forwards from the canal, the body starts where attenuation rises above a threshold halfway between
    soft tissue (~0-60 HU) and the body's own core, and ends where it falls below it for more than 6 mm (small
    dips inside the body - the basivertebral vein, osteoporotic trabecular bone - are bridged). Depth is then
    median-smoothed along z and capped at 60 mm, the largest adult lumbar body depth.
    """
    nz = sagittal.shape[0]
    smooth = ndimage.uniform_filter1d(sagittal, 3, axis=1)
    posterior = np.full(nz, np.nan)
    anterior = np.full(nz, np.nan)
    for z in range(nz):
        ahead = smooth[z, : canal[z] + 1][::-1]  # index k = k pixels in front of the canal centre
        if ahead.size < int(20 / px):
            continue
        threshold = max(70.0, 0.5 * float(np.median(ahead[int(3 / px) : int(25 / px)])))
        above = ahead >= threshold
        first = int(np.argmax(above[: int(14 / px)])) if above[: int(14 / px)].any() else -1
        if first < 0:
            continue
        last, gap = first, 0
        for k in range(first + 1, min(ahead.size, first + int(60 / px))):
            if above[k]:
                last, gap = k, 0
            else:
                gap += 1
                if gap * px > 6.0:
                    break
        posterior[z] = canal[z] - first
        anterior[z] = canal[z] - last
    depth = posterior - anterior
    valid = np.isfinite(depth)
    if valid.sum() >= 3:
        filled = np.interp(np.arange(nz), np.flatnonzero(valid), depth[valid])
        depth_smooth = ndimage.median_filter(filled, size=5, mode="nearest")
        anterior = np.where(valid, posterior - np.minimum(depth_smooth, 60.0 / px), np.nan)
    return posterior, anterior


def split_vertebrae(track: SpineTrack) -> list[Vertebra]:
    """Split the body column into vertebrae at disc minima of the core attenuation profile along z.

    The core is the middle 60 % of the body depth on the mid-sagittal slab. Discs (no bone, ~80-120 HU) and the
    dense end plates on either side make a dip; dips closer than 14 mm (shorter than any adult vertebra plus disc)
    are merged, keeping the deeper one. Segments touching the first or last slice are marked incomplete.
    """
    nz = track.slices
    filled = core_profile(track)
    if filled is None:
        return []
    spacing = vertebral_spacing(filled, track.slice_mm)
    min_gap = max(2, int(np.ceil(14.0 / track.slice_mm)))
    typical = spacing / track.slice_mm if spacing is not None else None
    observed = np.isfinite(_core_samples(track))
    minima = _merge_short_segments(filled, _disc_minima(filled, min_gap, observed), nz, typical)
    bounds = [0.0, *[float(m) for m in minima], float(nz - 1)]
    vertebrae: list[Vertebra] = []
    for i in range(len(bounds) - 1):
        lo, hi = bounds[i], bounds[i + 1]
        if (hi - lo) * track.slice_mm < 10.0:
            continue
        complete = i > 0 and i < len(bounds) - 2
        zs = np.arange(int(np.ceil(lo)), int(np.floor(hi)) + 1)
        ant = np.nanmedian(track.anterior_row[zs]) if np.isfinite(track.anterior_row[zs]).any() else np.nan
        post = np.nanmedian(track.posterior_row[zs]) if np.isfinite(track.posterior_row[zs]).any() else np.nan
        if not (np.isfinite(ant) and np.isfinite(post)) or (post - ant) * track.pixel_mm < 12.0:
            continue
        vertebrae.append(
            Vertebra(lo, hi, complete, float(ant), float(post), slice_mm=track.slice_mm, spacing_mm=spacing or math.nan)
        )
    return vertebrae


def core_profile(track: SpineTrack) -> np.ndarray | None:
    """Mean attenuation of the body's core (middle 60 % of its depth on the mid-sagittal slab) per slice, gaps
    interpolated; None when fewer than 3 slices have a body in front of a canal."""
    core = _core_samples(track)
    valid = np.isfinite(core)
    if valid.sum() < 3:
        return None
    return np.interp(np.arange(core.size), np.flatnonzero(valid), core[valid])


def _core_samples(track: SpineTrack) -> np.ndarray:
    """The body core's mean attenuation on the slices where a body is seen in front of a canal, nan elsewhere."""
    nz = track.slices
    core = np.full(nz, np.nan)
    for z in range(nz):
        if np.isnan(track.anterior_row[z]) or track.canal_score[z] <= 0.05:
            continue
        a, p = track.anterior_row[z], track.posterior_row[z]
        lo, hi = round(a + 0.2 * (p - a)), round(p - 0.2 * (p - a))
        if hi > lo:
            core[z] = float(track.sagittal[z, lo : hi + 1].mean())
    return core


def vertebral_spacing(profile: np.ndarray, slice_mm: float) -> float | None:
    """The spine's own vertebra-to-vertebra spacing (mm): the lag of the strongest autocorrelation peak of the core
    profile (the shortest lag whose peak comes close to the highest, so two periods are not taken for one).

    Bodies and discs alternate with a nearly constant period along a spine, so the period is a property of the
    whole column, not of any one split: a missed disc or a spurious minimum moves single segments but hardly the
    period, which makes it the yardstick to judge segments against (rather than their own median, which a run of
    fragments drags down). The slow trend (bone density changing along the spine, the pelvis) is removed first
    over 60 mm, longer than any vertebra plus disc. Lags from 15 mm (shorter than any adult vertebra plus disc)
    to half the profile are searched; None when there is no positive peak (too short a profile, no periodicity).
    McLeod P, Wyvill G. A smarter way to find pitch. Proc. International Computer Music Conference 2005:138-141.
    """
    n = profile.size
    trend = ndimage.uniform_filter1d(profile, max(3, round(60.0 / slice_mm)), mode="nearest")
    detrended = profile - trend
    shortest = max(2, math.ceil(15.0 / slice_mm))
    longest = n // 2
    if longest < shortest + 1 or not np.any(detrended):
        return None
    lags = np.arange(shortest - 1, longest + 2)
    corr = np.array([_correlation(detrended[:-k], detrended[k:]) for k in lags])
    peaks = [i for i in range(1, lags.size - 1) if corr[i] >= corr[i - 1] and corr[i] >= corr[i + 1] and corr[i] > 0]
    if not peaks:
        return None
    # a periodic signal correlates as well at two or three periods as at one: take the shortest lag whose peak is
    # close to the highest (the "key maximum" rule of McLeod and Wyvill's pitch detector, k = 0.8)
    highest = max(corr[i] for i in peaks)
    first = next(i for i in peaks if corr[i] >= 0.8 * highest)
    return float(lags[first]) * slice_mm


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = float(a.std()), float(b.std())
    if sa == 0.0 or sb == 0.0:
        return 0.0
    return float(np.mean((a - a.mean()) * (b - b.mean())) / (sa * sb))


def _disc_minima(profile: np.ndarray, min_gap: int, observed: np.ndarray | None = None) -> list[int]:
    """Local minima of ``profile`` that are lower than both neighbours' maxima by a margin, at least
    ``min_gap`` slices apart (the deeper one wins).

    ``observed`` marks the slices where the body core was actually seen (the rest of ``profile`` is interpolated,
    and held constant beyond the first and last seen slice). A flank lying mostly beyond those - the body past the
    disc is at the scan's edge where the canal track was lost - is no evidence against the disc, so the minimum is
    then judged on its other flank alone; otherwise whether the disc under the top or bottom body is found depends
    on where the slices fall (on the validation abdomen the T12/L1 disc was missed 1 mm up the table)."""
    n = profile.size
    seen = np.flatnonzero(observed) if observed is not None and observed.any() else np.array([0, n - 1])
    first_seen, last_seen = int(seen[0]), int(seen[-1])
    candidates: list[tuple[float, int]] = []
    for z in range(1, n - 1):
        if profile[z] <= profile[z - 1] and profile[z] <= profile[z + 1]:
            flanks = []
            below = np.arange(max(0, z - min_gap), z)
            above = np.arange(z + 1, min(n, z + 1 + min_gap))
            if (below < first_seen).sum() * 2 <= below.size:
                flanks.append(float(profile[below].max()))
            if (above > last_seen).sum() * 2 <= above.size:
                flanks.append(float(profile[above].max()))
            if not flanks:
                continue
            depth = min(flanks) - profile[z]
            if depth > 12.0:
                candidates.append((float(depth), z))
    chosen: list[int] = []
    for _, z in sorted(candidates, reverse=True):
        if all(abs(z - c) >= min_gap for c in chosen):
            chosen.append(z)
    return sorted(chosen)


def _merge_short_segments(profile: np.ndarray, minima: list[int], nz: int, typical: float | None = None) -> list[int]:
    """Drop spurious disc minima inside a body (a dark basivertebral plexus, low-density bone).

    Adjacent vertebrae differ little in height, so a segment shorter than 0.6 x the typical segment is merged
    with the neighbour that gives a merged length closest to the typical one (and no more than 1.3 x it); the
    shortest segment is handled first, until none is left. The typical length is the spine's own vertebral spacing
    (``typical``, in slices, from :func:`vertebral_spacing`) when known, else the median segment: a median drifts
    with the split it judges (a run of fragments makes fragments look typical), the period does not, so which
    minima survive no longer depends on where the slices happen to fall.
    """
    minima = sorted(minima)
    bounds = [0, *minima, nz - 1]
    while len(bounds) >= 4:
        lengths = np.diff(bounds)
        median = float(np.median(lengths[1:-1])) if len(lengths) > 2 else float(np.median(lengths))
        if typical is not None:
            median = typical
        order = np.argsort(lengths)
        merged = False
        for k in order:
            if lengths[k] >= 0.6 * median:
                break
            options = []
            if k > 0:  # merge with the segment below: drop bounds[k]
                options.append((abs(lengths[k] + lengths[k - 1] - median), k, lengths[k] + lengths[k - 1]))
            if k < len(lengths) - 1:  # merge with the segment above: drop bounds[k + 1]
                options.append((abs(lengths[k] + lengths[k + 1] - median), k + 1, lengths[k] + lengths[k + 1]))
            options = [o for o in options if o[2] <= 1.3 * median and 0 < o[1] < len(bounds) - 1]
            if options:
                bounds.pop(min(options)[1])
                merged = True
                break
        if not merged:
            break
    return bounds[1:-1]


def identify_levels(
    volume: np.ndarray, spacing: tuple[float, float, float], track: SpineTrack, vertebrae: list[Vertebra]
) -> LevelIdentification:
    """Give levels from the last rib-bearing vertebra (T12) and/or from the sacrum (S1); otherwise none."""
    if not vertebrae:
        return LevelIdentification((), "none", "No vertebral body could be delimited.")
    grid, _, px = detection_grid(volume, spacing)
    ribbed = _rib_bearing(grid, track, vertebrae, px)
    pelvic = _pelvis_joined(grid, track, vertebrae, px)
    vertebrae = [replace(v, rib_bearing=r, pelvis_joined=p) for v, r, p in zip(vertebrae, ribbed, pelvic, strict=True)]

    rib_labels, rib_note = _rib_transition(vertebrae, ribbed)

    sacrum_labels: dict[int, str] | None = None
    sacrum_note = "sacrum not in view or not recognised"
    joined = [i for i, p in enumerate(pelvic) if p]
    if joined:
        s1 = max(i for i in joined if all(pelvic[j] for j in range(min(joined), i + 1)))
        if not vertebrae[s1].single_body:
            sacrum_note = "the segment taken for S1 is not one body (a disc between it and L5 may be missed)"
        elif s1 + 1 < len(vertebrae) and not pelvic[s1 + 1]:
            sacrum_labels = _labels_from(s1, "S1", vertebrae)
            sacrum_note = "S1 = top of the bone joined to both iliac bones through the sacral alae; counted up"

    if rib_labels and sacrum_labels:
        agree = rib_labels == sacrum_labels
        labels = rib_labels
        method = "ribs+sacrum"
        note = f"{rib_note}; {sacrum_note}; " + (
            "both agree."
            if agree
            else "the two DISAGREE (possible transitional vertebra or 11/13 rib pairs): labels follow the ribs."
        )
        conflict = not agree
    elif rib_labels:
        labels, method, note, conflict = rib_labels, "ribs", f"{rib_note}; {sacrum_note}.", False
    elif sacrum_labels:
        labels, method, note, conflict = sacrum_labels, "sacrum", f"{sacrum_note}; {rib_note}.", False
    else:
        return LevelIdentification(
            tuple(vertebrae), "none", f"Levels not identified: {rib_note}, and {sacrum_note}. No level is guessed."
        )
    labelled = tuple(replace(v, level=labels.get(i)) for i, v in enumerate(vertebrae))
    return LevelIdentification(labelled, method, note[0].upper() + note[1:], conflict)


def _rib_transition(vertebrae: list[Vertebra], ribbed: list[bool]) -> tuple[dict[int, str] | None, str]:
    """T12 from the thoracolumbar transition, walking down from the top of the scan.

    Ribs are never below L1, so the walk stops at the first complete vertebra without a rib: that is L1 only if the
    vertebra above it carries a rib (T12) and the one below it, when in view, is also rib-free (L2). A single rib
    missed in the thorax therefore cannot create a false transition, and bone further down (an iliac wing beside
    the sacrum, which looks like a rib to the detector) is never reached. When ribs continue to the lowest vertebra
    in view, L1 is below the scan and nothing is labelled.
    """
    if not any(ribbed):
        return None, "no rib-bearing vertebra found"
    top = max(i for i, r in enumerate(ribbed) if r)
    for i in range(top - 1, -1, -1):
        if ribbed[i]:
            continue
        if not vertebrae[i].complete:  # only a partial vertebra at the scan's edge is rib-free
            return None, (
                "ribs articulate down to the lowest complete vertebra in view, so the thoracolumbar junction (T12/L1) "
                "is at or below the lower edge of the scan; L1 is not in view and thoracic levels are not counted"
            )
        if not ribbed[i + 1]:
            return None, "ribs did not give a clean transition (a rib-free vertebra lies between rib-bearing ones)"
        if i > 0 and ribbed[i - 1]:
            return None, (
                "ribs did not give a clean transition (a rib-free vertebra between rib-bearing ones: a rib missed or "
                "a vertebra mis-split)"
            )
        if not (vertebrae[i].single_body and vertebrae[i + 1].single_body):
            return None, (
                "the segments at the rib transition are not one vertebral body each (a disc missed or a body split), "
                "so T12 and L1 cannot be told from the ribs"
            )
        return _labels_from(
            i + 1, "T12", vertebrae
        ), "T12 = lowest vertebra with a rib articulating; L1 is the next one down"
    return None, (
        "ribs articulate down to the lowest vertebra in view, so the thoracolumbar junction (T12/L1) is below the "
        "scan; L1 is not in view and thoracic levels are not counted"
    )


def _labels_from(anchor: int, anchor_label: str, vertebrae: list[Vertebra]) -> dict[int, str]:
    """Labels for vertebra indices (0 = most inferior) given one anchored label, counted one segment per level.

    Counting is only sound through segments that are each one body: a segment spanning several bodies (a missed
    disc) or a fragment of one (a spurious split) would shift every label beyond it, so the count stops before it.
    """
    order = ("S1", "L5", "L4", "L3", "L2", "L1", *[f"T{n}" for n in range(12, 0, -1)], "C7", "C6")
    pos = order.index(anchor_label)
    lowest = anchor
    while lowest > 0 and vertebrae[lowest - 1].single_body:
        lowest -= 1
    highest = anchor
    while highest + 1 < len(vertebrae) and vertebrae[highest + 1].single_body:
        highest += 1
    labels: dict[int, str] = {}
    for i in range(lowest, highest + 1):
        k = pos + (i - anchor)
        if 0 <= k < len(order):
            labels[i] = order[k]
    return labels


def _lateral_bone(grid: np.ndarray, track: SpineTrack, px: float) -> tuple[np.ndarray, np.ndarray]:
    """Bone more than 20 mm lateral to the spine midline, and each voxel's lateral distance (mm)."""
    _nz, _ny, nx = grid.shape
    lateral_mm = np.abs(np.arange(nx)[None, :] - track.column[:, None]).astype(np.float32) * px  # (nz, nx)
    bone = grid > BONE_HU
    bone &= (lateral_mm >= _LATERAL_BONE_MM)[:, None, :]
    return bone, lateral_mm


def _rib_bearing(grid: np.ndarray, track: SpineTrack, vertebrae: list[Vertebra], px: float) -> list[bool]:
    """Which vertebrae have a rib articulating with them.

    Judged one vertebra at a time, on a slab from half a vertebral spacing below it to one slice above it (half a
    slice below when the spacing is unknown), so that ribs never merge into one structure with their neighbours or
    the scapula (which, labelled over the whole chest, made one giant component that had to be thrown away). In
    the slab, a rib is a connected bone structure (> 200 HU, more than 20 mm from the midline, from 40 mm in front
    of the canal backwards) whose medial end, its head at the costovertebral joint, lies within 40 mm of the
    midline *inside* the vertebra's own z-range, and which reaches at least 65 mm laterally; lumbar transverse
    processes stop short of that. Ribs run down as they run out from the head (the 12th steeply), hence the slab's
    reach below the body: cut off half a slice below it, the 12th rib of the validation abdomen reached 63 or
    69 mm inside the slab depending on where the 3 mm slices fell. A rib of the vertebra above only enters the
    slab laterally as it descends, so its medial end is at the slab's top and does not count. Bone plates (an
    iliac wing, the scapula) are excluded by their size per slice (> 8 cm2 in a slice).
    """
    bone, lateral_mm = _lateral_bone(grid, track, px)
    ny = grid.shape[1]
    rows = np.arange(ny)[None, :]
    keep_rows = rows >= (track.canal_row[:, None] - round(40.0 / px))  # from mid-body backwards
    bone &= keep_rows[:, :, None]
    pixel_cm2 = px * px / 100.0
    result: list[bool] = []
    for v in vertebrae:
        below = 0.5 * v.spacing_mm / v.slice_mm if math.isfinite(v.spacing_mm) else 0.5
        z0 = max(0, int(np.floor(v.inferior_slice - below)))
        z1 = min(grid.shape[0], int(np.ceil(v.superior_slice + 1.0)) + 1)
        labels, _count = ndimage.label(bone[z0:z1], structure=np.ones((3, 3, 3), dtype=bool))
        found = False
        for index, region in enumerate(ndimage.find_objects(labels), start=1):
            if region is None:
                continue
            zz, _, xx = np.nonzero(labels[region] == index)
            zz = zz + region[0].start + z0
            xx = xx + region[2].start
            dist = lateral_mm[zz, xx]
            if dist.min() > 40.0 or dist.max() < _RIB_REACH_MM:
                continue
            if zz.size * pixel_cm2 / max(1, np.unique(zz).size) > 8.0:
                continue
            head_z = float(zz[dist <= dist.min() + 5.0].mean())
            if v.inferior_slice - 0.5 <= head_z <= v.superior_slice + 0.5:
                found = True
                break
        result.append(found)
    return result


def _pelvis_joined(grid: np.ndarray, track: SpineTrack, vertebrae: list[Vertebra], px: float) -> list[bool]:
    """Which vertebrae are joined in the axial plane to bone reaching >= 65 mm lateral on both sides.

    At S1 the sacral alae carry the body out to the sacroiliac joints and the iliac bones; at L5 and above the
    transverse processes end well short of that. The bone mask is closed once so that a thin sacroiliac joint
    space does not split the sacrum from the ilium. Judged on the middle slices of each vertebra; a majority wins.
    """
    result: list[bool] = []
    nx = grid.shape[2]
    for v in vertebrae:
        zs = range(int(np.ceil(v.inferior_slice + 0.25)), int(np.floor(v.superior_slice - 0.25)) + 1)
        votes = []
        for z in zs:
            bone = ndimage.binary_closing(grid[z] > 150.0, iterations=max(1, round(4.5 / px)))
            labels, _ = ndimage.label(bone)
            row = round((v.anterior_row + v.posterior_row) / 2.0)
            col = int(track.column[z])
            window = labels[max(0, row - 3) : row + 4, max(0, col - 3) : col + 4]
            ids = np.unique(window[window > 0])
            if ids.size == 0:
                votes.append(False)
                continue
            cols = np.flatnonzero(np.isin(labels, ids).any(axis=0))
            left = (cols.max() - col) * px if cols.size else 0.0
            right = (col - cols.min()) * px if cols.size else 0.0
            votes.append(left >= _SACRAL_REACH_MM and right >= _SACRAL_REACH_MM and cols.max() < nx - 1)
        result.append(bool(votes) and sum(votes) * 2 > len(votes))
    return result

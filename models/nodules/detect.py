"""Nodule candidates in a chest CT: compact structures denser than lung, inside or against the lungs.

Classical cues only (no learning), tuned for sensitivity; the false-positive network
(:mod:`models.nodules.network`) then decides which candidates are nodules.

1. **Where to look.** The lungs from :func:`models.lung.segment_lungs` (vessels and intrapulmonary nodules are
   already inside: the mask fills in-plane holes), widened on each slice by a closing with a 25 mm disk, per lung.
   The closing fills the pleural surface's dents, so juxtapleural nodules and masses that push into the lung from
   the chest wall or mediastinum are searched too (a 25 mm disk reaches a dent up to 50 mm wide); it never crosses
   to the other lung and never leaves the lung's convex outline. The work is done on an in-plane grid of about
   1.25 mm (2 x 2 block means of the usual 0.6-0.8 mm pixels), inside the lungs' bounding box.
2. **Compact dense structures.** Voxels of at least -550 HU (:data:`DENSE_HU`: between aerated lung and solid
   tissue, low enough to take in the denser ground glass; an engineering choice for sensitivity: the segmentation
   sets each nodule's own edge later). The Euclidean distance to the nearest less dense voxel, in millimetres
   (anisotropic voxels handled exactly), peaks at the centre of every blob and along the axis of every vessel;
   each local peak of at least 1.5 mm (a structure of 3 mm or more across) is a candidate, and of two peaks closer
   than the larger one's radius only the larger is kept.
3. **Surroundings.** On a sphere of 1.5 radii plus 1 mm around each candidate, the share of aerated lung and the
   share of dense tissue are measured (64 directions). A nodule, juxtapleural or not, is mostly surrounded by lung;
   a piece of mediastinum, heart or liver that the closing reached is not: candidates with less than 40 % lung
   around them are dropped. A vessel is surrounded by lung too, but its shell also crosses the vessel twice: that
   share, with the patch itself, is what the network weighs.

Juxtavascular nodules are kept by construction: the distance peak at a nodule's centre does not depend on the
vessels touching it. Juxtapleural nodules are kept by the closing in step 1 and the 40 % rule in step 3 (a nodule
sitting on the pleura has about half its surroundings in lung).

Every candidate goes to the network (about 900 and 1,400 on the two 5 mm chest CTs), which is most of the
analysis time. Classical pre-filters that would send fewer were measured on the LIDC training and validation
crops (538 nodules; 499 found as acquired, 376 at 5 mm) and none came free: vessel-likeness from Hessian
eigenvalues at the candidate's scale (Li Q, Sone S, Doi K, Med Phys 2003;30:2040-2051; dot-likeness
|l3|/|l1| >= 0.1 at sigma = radius / sqrt 3) kept 30 % of the candidates but lost 2.8 % of the nodules as acquired
and 59 % at 5 mm (the crops end at the nodule's first and last slice, so its curvature across slices cannot be
judged on them); the same in-plane (>= 0.05 at radius / sqrt 2) kept 64 % and lost 1.0 % and 4.5 %; a distance-map
test for structures continuing beyond 1.5 radii on both sides in-plane kept 80 % and lost 1.2 % and 2.4 %; a
2 mm radius floor kept 26 % and lost 20 %.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from models.nodules.distance import depth_mm

DENSE_HU = -550.0
MIN_RADIUS_MM = 1.5
CLOSING_RADIUS_MM = 25.0
MIN_LUNG_SURROUND = 0.40
AERATED_HU = -400.0
_TARGET_PIXEL_MM = 1.25
_SHELL_DIRECTIONS = 64


@dataclass(frozen=True)
class Candidate:
    """A place that may hold a nodule: centre voxel (slice, row, column) of the full volume and its radius."""

    centre: tuple[int, int, int]
    radius_mm: float
    lung_surround: float
    dense_surround: float


def find_candidates(
    hu: np.ndarray, spacing: tuple[float, float, float], lung_labels: np.ndarray, box: tuple[slice, ...] | None = None
) -> list[Candidate]:
    """Candidates inside and against the lungs of ``hu`` (see the module docstring), largest radius first.

    ``lung_labels`` has ``hu``'s shape, 0 outside the lungs and one positive value per lung (or one for both);
    ``box`` is the lungs' bounding box (the whole volume when None).
    """
    dz, dy, dx = (float(s) for s in spacing)
    factor = max(1, round(_TARGET_PIXEL_MM / min(dy, dx)))
    margin = int(np.ceil(CLOSING_RADIUS_MM / min(dy, dx)))
    if box is None:
        box = tuple(slice(0, n) for n in hu.shape)
    z0, z1 = box[0].start, box[0].stop
    y0, y1 = max(box[1].start - margin, 0), min(box[1].stop + margin, hu.shape[1])
    x0, x1 = max(box[2].start - margin, 0), min(box[2].stop + margin, hu.shape[2])
    y1 = y0 + (y1 - y0) // factor * factor
    x1 = x0 + (x1 - x0) // factor * factor
    if z1 <= z0 or y1 <= y0 or x1 <= x0:
        return []
    coarse_spacing = (dz, dy * factor, dx * factor)
    coarse = _block_mean(hu[z0:z1, y0:y1, x0:x1], factor)
    labels = lung_labels[z0:z1, y0:y1:factor, x0:x1:factor]
    lungs = labels > 0
    region = lungs | _closed_per_lung(labels, coarse_spacing)
    dense = (coarse >= DENSE_HU) & region
    aerated = lungs & (coarse < AERATED_HU)
    del coarse  # not needed past this point: freed before the distance map, the step that needs the most memory
    near = _around(dense)
    if near is None:
        return []
    depth = depth_mm(dense[near], coarse_spacing)
    peaks = (depth >= MIN_RADIUS_MM) & (ndimage.maximum_filter(depth, size=(3, 3, 3)) == depth)
    points = np.argwhere(peaks) + np.array([s.start for s in near])
    if points.size == 0:
        return []
    radius = depth[peaks]
    del depth, peaks
    lung_share, dense_share = _surroundings(points, radius, np.asarray(coarse_spacing), aerated, dense)
    # Drop what is not surrounded by lung first: a large peak in the chest wall or mediastinum would otherwise
    # suppress the nodule peaks within its radius.
    keep = lung_share >= MIN_LUNG_SURROUND
    points, radius, lung_share, dense_share = points[keep], radius[keep], lung_share[keep], dense_share[keep]
    order = np.argsort(-radius, kind="stable")
    points, radius, lung_share, dense_share = points[order], radius[order], lung_share[order], dense_share[order]
    keep = _suppress(points, radius, np.asarray(coarse_spacing))
    points, radius, lung_share, dense_share = points[keep], radius[keep], lung_share[keep], dense_share[keep]
    out: list[Candidate] = []
    for (k, j, i), r, lung, dense_part in zip(points, radius, lung_share, dense_share, strict=True):
        centre = (int(k) + z0, int(j) * factor + factor // 2 + y0, int(i) * factor + factor // 2 + x0)
        out.append(Candidate(centre, round(float(r), 2), round(float(lung), 3), round(float(dense_part), 3)))
    return out


def _around(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The bounding box of ``mask``'s True voxels grown by one voxel (within the array); None when there are none.

    A distance map computed on this box equals the whole array's on every True voxel: everything outside the
    bounding box is False, and for a True voxel the nearest False voxel outside the grown box would have a nearer
    one on the box's outer layer. Everything the candidate search needs is inside it.
    """
    found = [
        np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis))) for axis in range(mask.ndim)
    ]
    if any(f.size == 0 for f in found):
        return None
    return tuple(slice(max(int(f[0]) - 1, 0), min(int(f[-1]) + 2, n)) for f, n in zip(found, mask.shape, strict=True))


def _block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    """In-plane ``factor`` x ``factor`` block means (float32): the coarse grid keeps a small nodule's contrast.

    Summed from strided views into one output array: no float32 copy of the volume, six times faster than a
    reshaped ``mean`` (the same values: HU sums are exact in float32).
    """
    if factor == 1:
        return np.asarray(volume, dtype=np.float32)
    d, h, w = volume.shape
    out = np.zeros((d, h // factor, w // factor), dtype=np.float32)
    for row in range(factor):
        for column in range(factor):
            out += volume[:, row : h - h % factor : factor, column : w - w % factor : factor]
    out /= factor * factor
    return out


def _closed_per_lung(labels: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Each lung closed slice by slice with a disk of :data:`CLOSING_RADIUS_MM`, on a grid four times as coarse.

    The grid is padded with the closing's radius of background first, so that what lies beyond the array's edge
    counts as outside the lungs (a crop's edge is not a concavity to fill).
    """
    step = 4
    coarse_spacing = (1e6, spacing[1] * step, spacing[2] * step)  # a huge slice step: the closing stays in-plane
    pad = int(np.ceil(CLOSING_RADIUS_MM / min(coarse_spacing[1:]))) + 1
    closed = np.zeros(labels.shape, dtype=bool)
    for value in np.unique(labels):
        if value == 0:
            continue
        low = np.pad(labels[:, ::step, ::step] == value, ((0, 0), (pad, pad), (pad, pad)))
        grown = depth_mm(~low, coarse_spacing) <= CLOSING_RADIUS_MM
        shut = depth_mm(grown, coarse_spacing) > CLOSING_RADIUS_MM
        full = shut[:, pad:-pad, pad:-pad].repeat(step, axis=1).repeat(step, axis=2)
        closed |= full[:, : labels.shape[1], : labels.shape[2]]
    return closed


def _suppress(points: np.ndarray, radius: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Of peaks closer than the larger one's radius keep the larger (``points`` sorted by radius, largest first)."""
    positions = points * spacing
    tree = cKDTree(positions)
    keep = np.ones(points.shape[0], dtype=bool)
    for index in range(points.shape[0]):
        if keep[index]:
            for other in tree.query_ball_point(positions[index], float(radius[index])):
                if other > index:
                    keep[other] = False
    return keep


def _surroundings(
    points: np.ndarray, radius: np.ndarray, spacing: np.ndarray, aerated: np.ndarray, dense: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Shares of aerated lung and of dense tissue on a sphere of 1.5 radii + 1 mm around each point."""
    directions = np.random.default_rng(0).normal(size=(_SHELL_DIRECTIONS, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    shell = (1.5 * radius + 1.0)[:, None, None] * directions[None, :, :]
    index = np.rint(((points * spacing)[:, None, :] + shell) / spacing).astype(np.int64)
    for axis, size in enumerate(aerated.shape):
        np.clip(index[..., axis], 0, size - 1, out=index[..., axis])
    lung = aerated[index[..., 0], index[..., 1], index[..., 2]].mean(axis=1)
    solid = dense[index[..., 0], index[..., 1], index[..., 2]].mean(axis=1)
    return lung, solid

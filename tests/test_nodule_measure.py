"""Nodule segmentation and measurement: calipers on known shapes (plumbing), and real LIDC nodules.

The shapes are synthetic arrays and check only the geometry of the calipers; every clinical expectation is checked
on real LIDC-IDRI crops with their radiologists' consensus (``../shared/data/ct/lidc_nodule_vois``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from models.nodules.measure import (
    TypeRule,
    axial_diameters,
    classify_calcification,
    classify_type,
    measure_nodule,
    segment_nodule,
)
from models.training.lidc_vois import Voi, load_voi, read_records

LIDC = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct" / "lidc_nodule_vois"


def test_calipers_of_an_ellipse_are_its_axes_within_a_pixel() -> None:
    rows, cols = np.ogrid[-40:41, -40:41]
    ellipse = (cols / 30.0) ** 2 + (rows / 12.0) ** 2 <= 1.0  # semi-axes 30 and 12 pixels
    d = axial_diameters(ellipse[None], (0.5, 0.5))
    assert d.long_mm == pytest.approx(30.5, abs=0.5)  # 61 pixels of 0.5 mm edge to edge
    assert d.short_mm == pytest.approx(12.5, abs=0.5)
    assert d.mean_mm == round((d.long_mm + d.short_mm) / 2, 1)
    (r0, c0), (r1, c1) = d.long_axis
    assert abs(r1 - r0) <= 1.0 and abs(c1 - c0) == pytest.approx(61.0, abs=1.0)  # corner to corner, horizontal


def test_the_slice_with_the_longest_axis_is_measured() -> None:
    stack = np.zeros((3, 30, 30), dtype=bool)
    stack[0, 10:14, 10:14] = True
    stack[1, 5:25, 12:16] = True  # longest: 20 pixels
    stack[2, 8:20, 8:20] = True
    assert axial_diameters(stack, (1.0, 1.0), origin=(7, 0, 0)).slice_index == 8


def test_type_and_calcification_rules() -> None:
    rule = TypeRule(ground_glass_below=0.2, solid_from=0.7)
    assert [classify_type(s, rule) for s in (0.1, 0.5, 0.9)] == ["ground-glass", "part-solid", "solid"]
    ball = np.zeros((9, 21, 21), dtype=bool)
    zz, yy, xx = np.ogrid[-4:5, -10:11, -10:11]
    ball[(zz / 4) ** 2 + (yy / 10) ** 2 + (xx / 10) ** 2 <= 1] = True
    hu = np.where(ball, 40.0, -850.0).astype(np.float32)
    assert classify_calcification(hu, ball, (1.0, 1.0, 1.0))[0] == "none"
    core = ball & ((zz / 2) ** 2 + (yy / 4) ** 2 + (xx / 4) ** 2 <= 1)
    assert classify_calcification(np.where(core, 600.0, hu), ball, (1.0, 1.0, 1.0))[0] == "central"
    assert classify_calcification(np.where(ball, 500.0, hu), ball, (1.0, 1.0, 1.0))[0] == "diffuse"
    eccentric = ball & ((zz / 2) ** 2 + (yy / 3) ** 2 + ((xx - 6) / 3) ** 2 <= 1)
    assert classify_calcification(np.where(eccentric, 600.0, hu), ball, (1.0, 1.0, 1.0))[0] == "non-benign"


def _voi(name: str) -> Voi:
    record = next(r for r in read_records(LIDC) if r.name == name)
    return load_voi(LIDC, record)


@pytest.mark.parametrize(
    "name",
    [
        "LIDC-IDRI-0003_R_3",  # solid, 8.8 mm
        "LIDC-IDRI-0012_R_4",  # solid, 11.4 mm
        "LIDC-IDRI-0121_R_1",  # solid, 14.7 mm, against the chest wall
    ],
)
def test_real_lidc_nodules_measure_close_to_the_consensus(name: str) -> None:
    voi = _voi(name)
    nodule = segment_nodule(voi.hu, voi.spacing, voi.seed())
    assert nodule is not None
    measures = measure_nodule(voi.hu, voi.spacing, nodule)
    # Against the consensus diameter, within the Lung-RADS growth step (1.5 mm) plus the consensus outline's own
    # looseness (it is drawn outside the edge: see the card); the volume-equivalent diameter tracks it closely.
    assert measures.mean_diameter_mm == pytest.approx(voi.record.diameter_mm, abs=2.5)
    equivalent = (6.0 * measures.volume_mm3 / math.pi) ** (1 / 3)
    assert equivalent == pytest.approx(voi.record.diameter_mm, abs=2.0)
    assert measures.nodule_type == "solid" and voi.record.texture == "solid"
    # Stays within the consensus region (never leaks into the chest wall or along a vessel).
    full = np.zeros(voi.mask.shape, dtype=bool)
    full[nodule.box()] = nodule.mask
    assert np.count_nonzero(full & voi.mask) >= 0.8 * np.count_nonzero(full)


def test_a_juxtapleural_nodule_is_cut_from_the_chest_wall_and_said_to_touch_the_pleura() -> None:
    voi = _voi("LIDC-IDRI-0121_R_1")
    nodule = segment_nodule(voi.hu, voi.spacing, voi.seed())
    assert nodule is not None and nodule.pleural_contact


def test_a_ground_glass_nodule_is_segmented_at_its_own_faint_edge() -> None:
    voi = _voi("LIDC-IDRI-0008_R_1")  # non-solid (GGO), 5.7 mm
    nodule = segment_nodule(voi.hu, voi.spacing, voi.seed())
    assert nodule is not None
    assert nodule.threshold_hu < -600.0  # half-way between lung and a ground-glass core, not the solid edge
    measures = measure_nodule(voi.hu, voi.spacing, nodule, TypeRule())
    assert measures.nodule_type == "ground-glass"


def test_the_convex_hull_is_skimages_pixel_for_pixel() -> None:
    # The segmentation bounds every nodule by the per-slice convex hull of the aerated lung; its own hull must keep
    # exactly the pixels skimage's does (edge pixels included), on real lung and on irregular blobs.
    from skimage.morphology import convex_hull_image

    from models.nodules.measure import convex_hull_2d

    voi = load_voi(LIDC, read_records(LIDC)[0])
    rng = np.random.default_rng(7)
    masks = [plane < -400.0 for plane in voi.hu]
    masks += [
        rng.random((int(h), int(w))) < p
        for h, w, p in zip(*rng.integers(3, 60, (2, 300)), rng.uniform(0.02, 0.5, 300), strict=True)
    ]
    checked = 0
    for mask in masks:
        if np.count_nonzero(mask) >= 3:
            assert np.array_equal(convex_hull_2d(mask), convex_hull_image(mask))
            checked += 1
    assert checked > 250

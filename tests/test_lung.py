"""Lung segmentation: a geometric phantom for the plumbing, the real pyradiomics chest CTs for anatomy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from lung_support import chest_phantom, load_pyradiomics_ct

from models.lung import LABEL_LEFT, LABEL_RIGHT, downsample_factor, segment_lungs


def test_phantom_lungs_are_found_whole_and_told_apart() -> None:
    phantom = chest_phantom()
    lungs = segment_lungs(phantom.hu, phantom.spacing)
    assert np.array_equal(lungs.mask, phantom.lungs)
    assert lungs.split
    # Columns run towards the patient's left, so the lung at low column indices is the right lung.
    assert np.all(lungs.labels[phantom.right_lung] == LABEL_RIGHT)
    assert np.all(lungs.labels[phantom.lungs & ~phantom.right_lung] == LABEL_LEFT)


def test_trachea_and_main_bronchi_are_not_counted_as_lung() -> None:
    phantom = chest_phantom(with_airway=True)
    lungs = segment_lungs(phantom.hu, phantom.spacing)
    airway_ml = phantom.airway.sum() * phantom.voxel_ml
    removed_ml = lungs.airway_voxels * phantom.voxel_ml
    assert removed_ml == pytest.approx(airway_ml, rel=0.1)
    # What is left of the airway is the bronchus stub on the slice where it opens into each lung (< 1 mL).
    assert (lungs.mask & phantom.airway).sum() * phantom.voxel_ml < 1.0
    assert lungs.split, "with the trachea removed the two lungs are separate again"
    assert lungs.voxel_count * phantom.voxel_ml == pytest.approx(phantom.lungs.sum() * phantom.voxel_ml, rel=0.001)


def test_stomach_gas_under_the_diaphragm_is_not_lung() -> None:
    phantom = chest_phantom(with_gas=True)
    lungs = segment_lungs(phantom.hu, phantom.spacing)
    assert phantom.gas.sum() * phantom.voxel_ml > 80
    assert not (lungs.mask & phantom.gas).any()


def test_soft_tissue_only_gives_an_empty_mask() -> None:
    phantom = chest_phantom(with_lungs=False)
    lungs = segment_lungs(phantom.hu, phantom.spacing)
    assert lungs.voxel_count == 0
    assert lungs.slice_extent() is None


def test_typical_chest_ct_pixels_are_halved_for_the_component_steps() -> None:
    assert downsample_factor(0.627) == 2
    assert downsample_factor(1.0) == 1
    assert downsample_factor(0.35) == 4


def test_lung2_whole_lungs_in_view_with_plausible_adult_volumes(data_dir: Path) -> None:
    hu, spacing = load_pyradiomics_ct(data_dir, "lung2_image")
    lungs = segment_lungs(hu, spacing)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    right_ml = np.count_nonzero(lungs.labels == LABEL_RIGHT) * voxel_ml
    left_ml = np.count_nonzero(lungs.labels == LABEL_LEFT) * voxel_ml
    assert lungs.split
    assert 2500 < right_ml + left_ml < 8000
    # The right lung (three lobes) is the larger one, about 55% of the total in adults.
    assert 0.5 < right_ml / (right_ml + left_ml) < 0.65
    # Apex and bases are inside the scanned range: no lung on the first (feet) and last (head) slices.
    first, last = lungs.slice_extent() or (0, 0)
    assert first > 0 and last < hu.shape[0] - 1
    # The trachea (about 2 cm2 over 13 cm above the carina) was found and removed.
    assert 10 < lungs.airway_voxels * voxel_ml < 60


def test_lung2_mask_holds_aerated_lung_and_its_vessels(data_dir: Path) -> None:
    hu, spacing = load_pyradiomics_ct(data_dir, "lung2_image")
    lungs = segment_lungs(hu, spacing)
    inside = hu[lungs.mask]
    # Aerated lung: median near -830 HU; vessels inside the lung are kept, so some voxels are soft tissue.
    assert -900 < float(np.median(inside)) < -750
    assert 0.01 < float(np.mean(inside > -400)) < 0.15
    # Nothing outside the body: the air around the patient (-1000 HU) never enters the mask.
    assert not lungs.mask[:, :, :5].any() and not lungs.mask[:, :5, :].any()


def test_lung1_covers_the_apex_but_not_the_bases(data_dir: Path) -> None:
    hu, spacing = load_pyradiomics_ct(data_dir, "lung1_image")
    lungs = segment_lungs(hu, spacing)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    first, last = lungs.slice_extent() or (0, 0)
    assert first == 0, "the lung bases continue below the first slice"
    assert last < hu.shape[0] - 1, "the apex is inside the scanned range"
    assert 2000 < lungs.voxel_count * voxel_ml < 8000
    assert lungs.split


def test_a_2d_image_is_refused_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="3-D volume"):
        segment_lungs(np.zeros((64, 64), dtype=np.float32), (1.0, 1.0))


@pytest.mark.parametrize("across_slices", [True, False])
def test_run_based_components_are_those_of_ndimage_label(across_slices: bool) -> None:
    """The run-based labelling finds the same components, numbered alike, as scipy on random masks."""
    from scipy import ndimage

    from models.lung import _Runs

    structure = ndimage.generate_binary_structure(3, 1)
    if not across_slices:
        structure[[0, 2]] = False
    rng = np.random.default_rng(7)
    for _ in range(60):
        shape = tuple(int(n) for n in rng.integers(1, 12, 3))
        mask = rng.random(shape) < rng.random()
        expected, count = ndimage.label(mask, structure=structure)
        runs = _Runs.of(mask, across_slices=across_slices)
        assert runs.count == count
        found = np.zeros(shape, dtype=np.int32)
        for component in range(count):
            found.reshape(-1)[runs.voxels(runs.component == component)] = component + 1
        assert np.array_equal(found, expected)
        assert np.array_equal(runs.sizes(), np.bincount(expected.ravel(), minlength=count + 1)[1:])


def test_a_volume_is_segmented_once_and_its_mask_goes_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """check_input, analyze and other analyzers of one volume share one mask, which is freed with the volume."""
    import gc
    import weakref

    from models import lung
    from models.base import ImageInput
    from models.emphysema import EmphysemaAnalyzer, measure_emphysema

    segmented: list[int] = []
    segment = lung._segment

    def counting(hu: np.ndarray, spacing: tuple[float, float, float]) -> lung.LungMask:
        segmented.append(id(hu))
        return segment(hu, spacing)

    monkeypatch.setattr(lung, "_segment", counting)
    phantom = chest_phantom()
    image = ImageInput(phantom.hu, phantom.spacing, "CT", {})
    analyzer = EmphysemaAnalyzer()
    analyzer.check_input(image)
    analyzer.analyze(image)
    measured = measure_emphysema(phantom.hu, phantom.spacing)  # e.g. the nodule analyzer, on the same volume
    assert len(segmented) == 1
    assert measured.lungs is segment_lungs(phantom.hu, phantom.spacing)
    with pytest.raises(ValueError, match="read-only"):
        measured.lungs.mask[0, 0, 0] = True  # shared: no caller may change it under another
    changed = phantom.hu.copy()
    changed[phantom.lungs] = 40.0
    assert segment_lungs(changed, phantom.spacing).voxel_count == 0, "another array is segmented afresh"
    assert len(segmented) == 2

    freed = weakref.ref(measured.lungs.mask)
    del image, measured, phantom, changed
    gc.collect()
    assert freed() is None, "the mask must not outlive its volume"

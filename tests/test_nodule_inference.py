"""The nodule analyzer's fast paths compute what its reference code computes, on a real chest CT.

The analyzer runs the trained false-positive networks rebuilt for speed (batch norm folded in, the five-plane 3-D
convolution as a 2-D one), samples its patches a batch at a time, and computes distance maps without scipy's
float64 copies. Each is checked here against the plain version on the real pyradiomics lung1 CT: the same
distances to the last bit, the same candidates accepted, the probabilities within float rounding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from models.lung import segment_lungs
from models.nodules.detect import DENSE_HU, find_candidates
from models.nodules.distance import depth_mm
from models.nodules.network import NoduleModels, candidate_features, sample_patches
from models.registry import get_analyzer
from models.training.chest_scans import LabelledScan, read_labelled_scans

WHOLE_CTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct" / "chest_pyradiomics"


@pytest.fixture(scope="module")
def lung1() -> LabelledScan:
    return next(s for s in read_labelled_scans(WHOLE_CTS) if s.name == "lung1")


def test_distance_maps_equal_scipys_to_the_last_bit(lung1: LabelledScan) -> None:
    # Dense tissue of the real CT on its own anisotropic grid (5 mm slices, 0.57 mm pixels), a slab of it.
    spacing = tuple(float(s) for s in lung1.image.spacing)
    dense = lung1.image.array[20:32, 150:400, 100:420] >= DENSE_HU
    assert 0.05 < dense.mean() < 0.95
    assert np.array_equal(depth_mm(dense, spacing), ndimage.distance_transform_edt(dense, sampling=spacing))
    assert not depth_mm(np.zeros((3, 4, 5), dtype=bool), (1.0, 1.0, 1.0)).any()


def test_the_rebuilt_networks_accept_the_same_candidates_as_the_trained_ones(lung1: LabelledScan) -> None:
    models: NoduleModels = get_analyzer("ct-lung-nodules").models  # type: ignore[attr-defined]
    hu = lung1.image.array
    spacing = (float(lung1.image.spacing[0]), float(lung1.image.spacing[1]), float(lung1.image.spacing[2]))
    lungs = segment_lungs(hu, spacing)
    candidates = find_candidates(hu, spacing, lungs.labels, lungs.box)
    assert len(candidates) > 500  # every distance peak of a real chest CT: mostly vessels
    centres = [c.centre for c in candidates]
    radii = [c.radius_mm for c in candidates]
    features = candidate_features(radii, [c.lung_surround for c in candidates], [c.dense_surround for c in candidates])
    patches = sample_patches(hu, spacing, centres, radii)
    # The trained networks as trained: 3-D convolution, batch norm, each patch and its mirror image on their own.
    x, f = torch.from_numpy(patches)[:, None], torch.from_numpy(features)
    with torch.no_grad():
        logits = torch.stack([net(x, f) + net(x.flip(-1), f) for net in models.candidate_nets]).mean(dim=0)
    reference = torch.sigmoid(logits / 2.0).reshape(-1).numpy()

    fast = models.candidate_probabilities(hu, spacing, centres, radii, features)
    assert np.abs(fast - reference).max() < 1e-5
    assert np.array_equal(fast >= models.candidate_threshold, reference >= models.candidate_threshold)
    assert (reference >= models.candidate_threshold).sum() >= 10  # the decision compared is not empty
    # Sampled batch by batch or all at once, the same patches.
    assert np.array_equal(models.nodule_probabilities(patches, features), fast)

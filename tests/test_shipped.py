"""The analyzers' numpy evaluation of the shipped ensembles computes what the torch networks compute, from the
same hash-checked file, without importing torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.networks import MedMnistCNN, ensemble_from_checkpoint, grad_cam, tta_logits
from models.projection_classifier import WEIGHTS_DIR
from models.shipped import load_shipped_classifier
from models.weights_io import load_checked

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def test_images() -> np.ndarray:
    with np.load(REPO / "tests" / "data" / "medmnist" / "pneumoniamnist_28_reconstructed.npz") as data:
        return data["test_images"][::8].astype(np.float32) / 255.0  # 78 real test radiographs, both classes


@pytest.mark.parametrize("weights", ["pneumonia_cnn.pt", "breast_cnn.pt"])
def test_numpy_probabilities_equal_the_torch_ensembles(weights: str, test_images: np.ndarray) -> None:
    checkpoint = load_checked(WEIGHTS_DIR / weights)
    ensemble = ensemble_from_checkpoint(checkpoint)
    with torch.no_grad():
        batch = torch.from_numpy(test_images)[:, None]
        expected = torch.sigmoid(tta_logits(ensemble, batch, int(checkpoint["tta_shifts"]))).numpy().reshape(-1)
    shipped = load_shipped_classifier(WEIGHTS_DIR / weights)
    np.testing.assert_allclose(shipped.probabilities(test_images), expected, rtol=0, atol=1e-5)
    assert shipped.probability(test_images[0]) == pytest.approx(float(expected[0]), abs=1e-5)


def test_numpy_grad_cam_equals_torch_grad_cam(test_images: np.ndarray) -> None:
    checkpoint = load_checked(WEIGHTS_DIR / "pneumonia_cnn.pt")
    ensemble = ensemble_from_checkpoint(checkpoint)
    shipped = load_shipped_classifier(WEIGHTS_DIR / "pneumonia_cnn.pt")
    for image in test_images[:5]:
        batch = torch.from_numpy(image)[None, None]
        maps = [grad_cam(m, m.gradcam_layer, batch) for m in ensemble.members if isinstance(m, MedMnistCNN)]
        expected = np.mean(maps, axis=0)
        np.testing.assert_allclose(shipped.gradcam(image), expected / expected.max(), atol=1e-4)


def test_the_analyzers_never_import_torch() -> None:
    """A command-line analysis of a radiograph must not pay torch's import (about 2 s of CPU)."""
    code = (
        "import sys, numpy as np; from models.registry import get_analyzer; from dicom_io.projection import "
        "read_projection; a = get_analyzer('cxr-pneumonia'); "
        "i = read_projection('tests/data/cr/rsna_pneumonia/rsna_cxr_unlabelled.dcm'); a.check_input(i); "
        "r = a.analyze(i); assert r.probability is not None; print(sorted(m for m in ('torch', 'monai', 'skimage', "
        "'scipy') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"

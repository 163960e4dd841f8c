"""The hippocampus segmentation network: the frame it reads, its intensity normalisation, and inference.

Training (:mod:`models.training.train_hippocampus`) and the analyzer (:mod:`models.hippocampus`) both use the
functions here, so they cannot disagree about how a crop is presented to the network.

The frame: the Medical Segmentation Decathlon Task04 crops are 1 mm isotropic with an identity NIfTI affine,
i.e. array axis 0 runs to the patient's right, axis 1 anterior and axis 2 superior (RAS). The labels agree with
that reading in every training crop: label 1 (anterior hippocampus) lies at the high end of axis 1, and the
hippocampal long axis descends from tail to head along axis 2 (measured on all 201 labelled crops). Every crop
shows the hippocampus in the same handedness (the slope of its long axis in the axial plane has one sign in
84 % of crops, unimodal), so left hippocampi were mirrored into that orientation before release; an input crop
must be presented the same way (:func:`to_network_frame`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.nets import UNet
from scipy import ndimage

from models import metrics

LABELS: dict[int, str] = {1: "anterior", 2: "posterior"}
"""MSD Task04 label values: 1 = anterior hippocampus (head), 2 = posterior hippocampus (body and tail)."""

NETWORK_VOXEL_MM = 1.0
"""The training crops' voxel size (isotropic); inputs are resampled to it before segmentation."""

INTENSITY_PERCENTILES = (0.5, 99.5)
"""Crop intensities are clipped to these percentiles before standardisation: MR values are in arbitrary units
(two of the training set's scalings differ by a factor of 1000), and a few bright vessels must not set the scale."""


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters that fully define the network (stored in the weights file)."""

    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 0
    norm: str = "BATCH"
    dropout: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "channels": list(self.channels), "strides": list(self.strides)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetConfig:
        return cls(
            channels=tuple(int(c) for c in data["channels"]),
            strides=tuple(int(s) for s in data["strides"]),
            num_res_units=int(data["num_res_units"]),
            norm=str(data["norm"]),
            dropout=float(data.get("dropout", 0.0)),
        )

    @property
    def size_multiple(self) -> int:
        """Every input side must be a multiple of this (the product of the strides)."""
        return int(np.prod(self.strides))


def build_unet(config: UNetConfig) -> UNet:
    """MONAI's 3-D UNet with one input channel and three outputs (background, anterior, posterior)."""
    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=1 + len(LABELS),
        channels=config.channels,
        strides=config.strides,
        num_res_units=config.num_res_units,
        norm=config.norm,
        dropout=config.dropout,
    )


def normalise_intensity(crop: np.ndarray) -> np.ndarray:
    """Clip to the 0.5-99.5 percentiles, then standardise to zero mean and unit SD (float32).

    MR intensities have no physical unit, so only the shape of the histogram within the crop is comparable
    between scanners; this is the per-image z-score nnU-Net uses for MRI.
    """
    values = np.asarray(crop, dtype=np.float32)
    low, high = np.percentile(values, INTENSITY_PERCENTILES)
    clipped = np.clip(values, low, high)
    spread = float(clipped.std())
    return ((clipped - float(clipped.mean())) / (spread if spread > 0 else 1.0)).astype(np.float32)


def pad_to_multiple(array: np.ndarray, multiple: int) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Edge-pad every side of a 3-D array up to a multiple of ``multiple``; return the array and the slices that
    cut the original back out."""
    pads = []
    for size in array.shape:
        extra = (-size) % multiple
        pads.append((extra // 2, extra - extra // 2))
    padded = np.pad(array, pads, mode="edge")
    return padded, tuple(slice(before, before + size) for (before, _), size in zip(pads, array.shape, strict=True))


def largest_component(labels: np.ndarray) -> np.ndarray:
    """Keep the largest 26-connected hippocampus (both labels together); stray islands elsewhere are removed."""
    foreground, count = ndimage.label(labels > 0, structure=np.ones((3, 3, 3), dtype=bool))
    if count <= 1:
        return labels
    sizes = np.bincount(foreground.ravel())
    sizes[0] = 0
    return np.where(foreground == int(np.argmax(sizes)), labels, 0).astype(labels.dtype)


class ShippedSegmenter:
    """A loaded, hash-checked hippocampus network; ``segment`` takes a crop already in the network frame."""

    def __init__(self, checkpoint: dict[str, Any], sha256: str) -> None:
        self.config = UNetConfig.from_dict(checkpoint["network"])
        self.network = build_unet(self.config)
        self.network.load_state_dict(checkpoint["state_dict"])
        self.network.eval()
        self.sha256 = sha256

    @torch.no_grad()
    def probabilities(self, crop: np.ndarray) -> np.ndarray:
        """Softmax ``(3, x, y, z)`` for a crop in the network frame at 1 mm (any intensity scale)."""
        padded, inside = pad_to_multiple(normalise_intensity(crop), self.config.size_multiple)
        logits = self.network(torch.from_numpy(np.ascontiguousarray(padded))[None, None])
        return torch.softmax(logits[0], dim=0).numpy()[(slice(None), *inside)]

    def segment(self, crop: np.ndarray) -> np.ndarray:
        """Label map (0 background, 1 anterior, 2 posterior; uint8) of a crop in the network frame at 1 mm."""
        labels = np.argmax(self.probabilities(crop), axis=0).astype(np.uint8)
        return largest_component(labels)


def load_shipped_segmenter(path: Path, expected_sha256: str | None = None) -> ShippedSegmenter:
    """Hash-check a weights file (every call, so a replaced file is refused at once) and load it once per content."""
    from models.weights_io import verify_sha256

    return _load_verified(path, verify_sha256(path, expected_sha256))


@lru_cache(maxsize=2)
def _load_verified(path: Path, digest: str) -> ShippedSegmenter:
    from models.weights_io import load_checked

    return ShippedSegmenter(load_checked(path, digest), digest)


def dice(reference: np.ndarray, predicted: np.ndarray) -> float:
    """Dice similarity coefficient of two boolean masks (1.0 when both are empty)."""
    overlap = float(np.logical_and(reference, predicted).sum())
    total = float(reference.sum()) + float(predicted.sum())
    return 1.0 if total == 0 else 2.0 * overlap / total


def label_volumes_ml(labels: np.ndarray, voxel_mm: Sequence[float]) -> dict[str, float]:
    """Anterior, posterior and total volume in mL of a label map with the given voxel size."""
    voxel_ml = float(np.prod(voxel_mm)) / 1000.0
    volumes = {name: float((labels == value).sum()) * voxel_ml for value, name in LABELS.items()}
    volumes["total"] = sum(volumes.values())
    return volumes


def case_figures(reference: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Dice per label and volumes (mL) of one crop, reference and predicted."""
    row: dict[str, float] = {}
    for value, name in LABELS.items():
        row[f"dice_{name}"] = dice(reference == value, predicted == value)
    row["dice_whole"] = dice(reference > 0, predicted > 0)
    voxel = (NETWORK_VOXEL_MM,) * 3  # both label maps are in the network frame at 1 mm
    for name, volume in label_volumes_ml(reference, voxel).items():
        row[f"reference_{name}_ml"] = volume
    for name, volume in label_volumes_ml(predicted, voxel).items():
        row[f"predicted_{name}_ml"] = volume
    return row


def summarise_figures(rows: list[dict[str, float]], subjects: list[int]) -> dict[str, dict[str, float]]:
    """The card figures: mean Dice per label (and their mean), and Bland-Altman of the volumes, with subject-
    bootstrap 95% CIs (:mod:`models.metrics`)."""
    figures: dict[str, dict[str, float]] = {}
    table = {key: np.array([r[key] for r in rows]) for key in rows[0]}
    for key in ("dice_anterior", "dice_posterior", "dice_whole"):
        figures[key] = metrics.cluster_bootstrap(table[key], subjects, lambda v: float(v.mean())).as_dict()
    both = np.stack([table["dice_anterior"], table["dice_posterior"]], axis=1)
    figures["dice_mean"] = metrics.cluster_bootstrap(both, subjects, lambda v: float(v.mean())).as_dict()
    for name in ("total", "anterior", "posterior"):
        agreement = metrics.bland_altman(table[f"reference_{name}_ml"], table[f"predicted_{name}_ml"], subjects)
        figures.update(agreement.as_figures(f"{name}_volume_ml"))
    return figures

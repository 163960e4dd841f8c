"""The shipped 28x28 classifiers as the analyzers run them: the trained ensemble evaluated in numpy, without torch.

The networks (:class:`models.networks.MedMnistCNN`) are small - three stages of 3x3 convolutions on a 28x28 image
- so numpy evaluates one image in milliseconds, while importing torch costs about 2 s of CPU: most of a
command-line analysis's cold start. Training, the MONAI bundle analyzers and the tests use the torch modules; the
numpy forward pass here computes the same function from the same weights (conv -> batch norm (eval) -> ReLU,
2x2 max pooling between stages, global average pooling, linear), and tests/test_shipped.py holds the two to
1e-5 on real images. Grad-CAM needs no backward pass here: behind global average pooling and one linear layer,
the gradient of the logit with respect to the last stage's activations is the layer's weight divided by the
number of positions, at every position, so Grad-CAM is the class activation map (Zhou et al., CVPR 2016).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import ThreadpoolController

from models.medmnist import medmnist_input

_BATCH = 64
"""Images per numpy block in batch evaluation: the 3x3 patches of 64 images fit in about 30 MB."""

_BLAS = ThreadpoolController()
"""The networks' matrix products are small: BLAS threads only add synchronisation (one analysis took 0.35-0.65 s
with OpenBLAS's default threads on a busy 2-core machine, 0.10-0.20 s with one), so each evaluation runs them on one
thread. Concurrent analyses run in their own threads (serve, job workers) instead."""


@dataclass(frozen=True)
class _Block:
    """3x3 convolution (no bias) then batch norm folded into a per-channel scale and shift, then ReLU."""

    kernel: np.ndarray  # (out, in * 9)
    scale: np.ndarray  # (out,)
    shift: np.ndarray  # (out,)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        n, channels, height, width = x.shape
        padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))  # (n, c, h, w, 3, 3)
        patches = windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * height * width, channels * 9)
        out = patches @ self.kernel.T
        out = out * self.scale + self.shift
        return np.maximum(out, 0.0).reshape(n, height, width, -1).transpose(0, 3, 1, 2)


@dataclass(frozen=True)
class _Member:
    """One trained network of the ensemble."""

    stages: tuple[tuple[_Block, ...], ...]
    weight: np.ndarray  # (C,) of the final linear layer
    bias: float
    standardise: bool

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], config: dict[str, Any]) -> _Member:
        channels = [int(c) for c in config["channels"]]
        convs = int(config.get("convs_per_stage", 2))
        stages = []
        for index in range(len(channels)):
            blocks = []
            for k in range(convs):
                prefix = f"features.stage{index}.{k + (1 if index > 0 else 0)}"
                kernel = state[f"{prefix}.conv.weight"].astype(np.float32)
                gamma, beta = state[f"{prefix}.adn.N.weight"], state[f"{prefix}.adn.N.bias"]
                mean, var = state[f"{prefix}.adn.N.running_mean"], state[f"{prefix}.adn.N.running_var"]
                scale = (gamma / np.sqrt(var + 1e-5)).astype(np.float32)  # torch BatchNorm2d eps
                blocks.append(
                    _Block(kernel.reshape(kernel.shape[0], -1), scale, (beta - mean * scale).astype(np.float32))
                )
            stages.append(tuple(blocks))
        linear = state["head.3.weight"].astype(np.float32).reshape(-1)
        return cls(tuple(stages), linear, float(state["head.3.bias"].reshape(-1)[0]), bool(config.get("standardise")))

    def last_stage(self, images: np.ndarray) -> np.ndarray:
        """Activations of the last stage, ``(N, C, 7, 7)`` for 28x28 input ``(N, 1, 28, 28)`` in 0..1."""
        x = images.astype(np.float32)
        if self.standardise:  # per image, unbiased standard deviation as torch.std
            mean = x.mean(axis=(-2, -1), keepdims=True)
            x = (x - mean) / np.maximum(x.std(axis=(-2, -1), ddof=1, keepdims=True), 1e-6)
        else:
            x = 2.0 * x - 1.0
        for index, blocks in enumerate(self.stages):
            if index > 0:  # 2x2 max pooling, stride 2
                n, c, h, w = x.shape
                x = x[:, :, : h - h % 2, : w - w % 2].reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))
            for block in blocks:
                x = block(x)
        return x

    def logits(self, images: np.ndarray) -> np.ndarray:
        return self.last_stage(images).mean(axis=(-2, -1)) @ self.weight + self.bias


@dataclass(frozen=True)
class FeatureLimit:
    """The feature-space reference of :class:`models.networks.FeatureReference`, for numpy."""

    means: np.ndarray  # (members, 2, C)
    precisions: np.ndarray  # (members, C, C)
    limit: float
    limit_percentile: float


class ShippedClassifier:
    """A loaded, hash-checked ensemble with the operating point it was validated at.

    ``probability``, ``feature_distance`` and ``gradcam`` take one image already prepared by :meth:`prepare`
    (``(28, 28)``, grey levels / 255); they are all the analyzers ask of a network.
    """

    def __init__(self, checkpoint: dict[str, Any], sha256: str) -> None:
        config = dict(checkpoint["network"])
        self.members = tuple(_Member.from_state(state, config) for state in checkpoint["members"])
        self.threshold = float(checkpoint["threshold"])
        self.temperature = float(checkpoint["temperature"])
        self.tta_shifts = int(checkpoint.get("tta_shifts", 0))
        self.input_size = int(checkpoint.get("input_size", 28))
        self.finding = str(checkpoint.get("finding", "finding"))
        reference = checkpoint.get("feature_reference")
        self.feature_reference = (
            FeatureLimit(
                np.asarray(reference["means"], dtype=np.float64),
                np.asarray(reference["precisions"], dtype=np.float64),
                float(reference["limit"]),
                float(reference["limit_percentile"]),
            )
            if isinstance(reference, dict)
            else None
        )
        self.sha256 = sha256

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """Presentation values 0..1 of a radiograph of any size -> the 28x28 input the ensemble was trained on.

        The MedMNIST recipe itself (:func:`models.medmnist.medmnist_input`): the 8-bit display image, its centre
        square, Pillow's anti-aliased bilinear reduction, grey levels / 255 - the scale of the training images.
        """
        return medmnist_input(image, self.input_size)

    def _batch(self, image: np.ndarray) -> np.ndarray:
        if image.shape != (self.input_size, self.input_size):
            raise ValueError(f"expected a {self.input_size}x{self.input_size} image, got {image.shape}")
        return np.ascontiguousarray(image, dtype=np.float32)[None, None]

    def _calibrated_logits(self, batch: np.ndarray) -> np.ndarray:
        """Mean member logit / temperature, averaged over +/- ``tta_shifts`` pixel translations (edges repeated)."""
        s = self.tta_shifts
        views = [batch]
        if s:
            padded = np.pad(batch, ((0, 0), (0, 0), (s, s), (s, s)), mode="edge")
            h, w = batch.shape[-2:]
            views = [padded[..., s + dy : s + dy + h, s + dx : s + dx + w] for dy in (-s, 0, s) for dx in (-s, 0, s)]
        stacked = np.concatenate(views)  # one pass per member over all views: the blocks are small, calls cost
        logits = np.mean([m.logits(stacked) for m in self.members], axis=0) / self.temperature
        return logits.reshape(len(views), batch.shape[0]).mean(axis=0)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of the finding for a ``(N, 28, 28)`` stack (with the shipped TTA)."""
        stack = np.ascontiguousarray(images, dtype=np.float32)[:, None]
        with _BLAS.limit(limits=1, user_api="blas"):
            logits = np.concatenate(
                [self._calibrated_logits(stack[i : i + _BATCH]) for i in range(0, stack.shape[0], _BATCH)]
            )
        return (0.5 * (1.0 + np.tanh(0.5 * logits.astype(np.float64)))).reshape(-1)

    def probability(self, image: np.ndarray) -> float:
        return float(self.probabilities(self._batch(image)[:, 0])[0])

    def feature_distance(self, image: np.ndarray) -> float | None:
        """Mahalanobis distance of the image from the training images in the members' feature spaces
        (:class:`models.networks.FeatureReference`); None when the weights carry no reference."""
        reference = self.feature_reference
        if reference is None:
            return None
        batch = self._batch(image)
        total = 0.0
        for member, centres, precision in zip(self.members, reference.means, reference.precisions, strict=True):
            with _BLAS.limit(limits=1, user_api="blas"):
                features = member.last_stage(batch).mean(axis=(-2, -1))[0].astype(np.float64)
            squared = [float((features - c) @ precision @ (features - c)) for c in centres]
            total += float(np.sqrt(max(0.0, min(squared))))
        return total / len(self.members)

    def gradcam(self, image: np.ndarray) -> np.ndarray:
        """Grad-CAM of the finding's logit on each member's last stage, averaged, ``(28, 28)``, 1 = most evidence.

        Behind global average pooling and one linear layer the gradient is the same at every position, so each
        member's map is its class activation map: ReLU of the channel activations weighted by the linear layer,
        upsampled bilinearly (half-pixel centres, as torch) and scaled to 0..1 per member (as
        :func:`models.networks.grad_cam`).
        """
        batch = self._batch(image)
        maps = []
        for member in self.members:
            with _BLAS.limit(limits=1, user_api="blas"):
                activations = member.last_stage(batch)[0]
            cam = np.maximum(np.tensordot(member.weight, activations, axes=1), 0.0)
            cam = _upsample_bilinear(cam.astype(np.float64), self.input_size)
            low, high = float(cam.min()), float(cam.max())
            maps.append((cam - low) / (high - low) if high > low else np.zeros_like(cam))
        mean = np.mean(maps, axis=0)
        high = float(mean.max())
        return (mean / high if high > 0 else mean).astype(np.float32)


def _upsample_bilinear(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a square map to ``size`` x ``size`` with half-pixel centres (``align_corners=False``)."""

    def axis_weights(n_in: int) -> np.ndarray:
        source = np.clip((np.arange(size) + 0.5) * n_in / size - 0.5, 0.0, None)
        low = np.minimum(np.floor(source).astype(int), n_in - 1)
        high = np.minimum(low + 1, n_in - 1)
        frac = source - low
        weights = np.zeros((size, n_in))
        np.add.at(weights, (np.arange(size), low), 1.0 - frac)
        np.add.at(weights, (np.arange(size), high), frac)
        return weights

    rows, columns = axis_weights(image.shape[0]), axis_weights(image.shape[1])
    return rows @ image @ columns.T


def load_shipped_classifier(path: Path, expected_sha256: str | None = None) -> ShippedClassifier:
    """Hash-check a weights file (every call) and load it (once per content); a mismatch raises.

    The hash is checked on every call, not cached, so a file replaced while the service runs is refused
    at the next analysis rather than silently served from memory.
    """
    from models.weights_io import verify_sha256

    return _load_verified(path, verify_sha256(path, expected_sha256))


@lru_cache(maxsize=4)
def _load_verified(path: Path, digest: str) -> ShippedClassifier:
    from models.weights_io import load_checked_arrays

    return ShippedClassifier(load_checked_arrays(path, digest), digest)

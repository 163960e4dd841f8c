"""The two trained parts of the nodule analyzer: the false-positive network and the suspicion model.

**Patches.** Each candidate is seen as a small stack of axial planes resampled around its centre: 32 x 32 pixels
in-plane at ``max(1 mm, radius / 8)`` per pixel (at least 32 mm across; a large mass is seen whole) and 5 planes
at -0.75, -0.375, 0, +0.375 and +0.75 radii along the slice axis. Scaling the planes with the radius shows whether
a structure ends within its own radius above and below (a nodule) or runs on (a vessel crossing the slices), and
it keeps the patch inside what the LIDC volumes of interest hold: those crops end at the nodule's first and last
slice. HU are clipped to [-1000, 400] and mapped to about [-1, 1].

**False-positive network** (:class:`CandidateNet`): a small CNN of MONAI ``Convolution`` blocks whose first
layer is a 3-D convolution across the five planes, then in-plane convolutions and pooling, global average
pooling, and the pooled features with three numbers from the candidate stage (log radius, lung and dense shares
around it) into one logit.

**Suspicion model** (:class:`SuspicionModel`): logistic regression on measured nodule features; trained on the
LIDC radiologists' malignancy ratings (4-5 against 1-2), so its output is the agreement with what radiologists
rated as suspicious, not a pathology-proven probability of cancer.

Both are trained by ``python -m models.training.train_nodules`` and ship in one weights file, SHA-256 pinned.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the conventional torch alias
from monai.networks.blocks import Convolution
from torch import nn

from models.nodules.measure import NoduleMeasures, TypeRule

PATCH_SIDE = 32
PATCH_PLANES = 5
PATCH_MIN_PIXEL_MM = 1.0
PATCH_Z_REACH = 0.75
HU_LOW, HU_HIGH = -1000.0, 400.0
BATCH = 64
"""Candidates per network call (each with its mirror image: 128 patches): the activations stay under 10 MiB and in
the processor's caches; larger batches ran no faster on CPU."""


def patch_geometry(radius_mm: float) -> tuple[float, np.ndarray]:
    """In-plane pixel size (mm) and the planes' offsets along the slice axis (mm) for a candidate's radius."""
    pixel = max(PATCH_MIN_PIXEL_MM, radius_mm / 8.0)
    offsets = np.linspace(-PATCH_Z_REACH * radius_mm, PATCH_Z_REACH * radius_mm, PATCH_PLANES)
    return pixel, offsets


def sample_patches(
    hu: np.ndarray,
    spacing: Sequence[float],
    centres: Sequence[Sequence[float]],
    radii_mm: Sequence[float],
) -> np.ndarray:
    """``(N, PATCH_PLANES, PATCH_SIDE, PATCH_SIDE)`` float32 patches around (fractional) voxel centres, normalised.

    Trilinear interpolation; outside the volume the nearest edge value is used.
    """
    volume = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))
    with torch.inference_mode():
        return _sample(volume, spacing, centres, radii_mm).numpy()


def _sample(
    volume: torch.Tensor, spacing: Sequence[float], centres: Sequence[Sequence[float]], radii_mm: Sequence[float]
) -> torch.Tensor:
    """The patches of :func:`sample_patches` as a tensor, by one ``grid_sample`` call over all the centres.

    The five planes of every candidate are the output's depth axis, so the volume is read once, by torch's own
    threads, and no coordinate array of the whole batch is built in float64 (as ``map_coordinates`` needs).
    """
    count = len(centres)
    if count == 0:
        return torch.zeros((0, PATCH_PLANES, PATCH_SIDE, PATCH_SIDE))
    grid_offsets = torch.arange(PATCH_SIDE, dtype=torch.float64) - (PATCH_SIDE - 1) / 2.0
    centre = torch.tensor(np.asarray(centres, dtype=np.float64).reshape(count, 3))
    geometry = [patch_geometry(float(r)) for r in radii_mm]
    pixel = torch.tensor([g[0] for g in geometry], dtype=torch.float64)
    planes = torch.tensor(np.stack([g[1] for g in geometry]), dtype=torch.float64)
    # Voxel coordinates of each axis, then grid_sample's [-1, 1] (align_corners: -1 and 1 are the first and last
    # voxel centres; "border" padding repeats the edge voxel, as map_coordinates' "nearest" mode does).
    along = (
        centre[:, 0, None] + planes / float(spacing[0]),
        centre[:, 1, None] + grid_offsets[None, :] * pixel[:, None] / float(spacing[1]),
        centre[:, 2, None] + grid_offsets[None, :] * pixel[:, None] / float(spacing[2]),
    )
    z, y, x = ((a * (2.0 / max(n - 1, 1)) - 1.0).to(torch.float32) for a, n in zip(along, volume.shape, strict=True))
    grid = torch.empty((count, PATCH_PLANES, PATCH_SIDE, PATCH_SIDE, 3), dtype=torch.float32)
    grid[..., 0] = x[:, None, None, :]
    grid[..., 1] = y[:, None, :, None]
    grid[..., 2] = z[:, :, None, None]
    sampled = F.grid_sample(
        volume[None, None],
        grid.view(1, count * PATCH_PLANES, PATCH_SIDE, PATCH_SIDE, 3),
        mode="bilinear",
        padding_mode="border",
        align_corners=True,
    )
    patches = sampled.view(count, PATCH_PLANES, PATCH_SIDE, PATCH_SIDE)
    return patches.clamp_(HU_LOW, HU_HIGH).add_(300.0).div_(700.0)


def candidate_features(
    radius_mm: Sequence[float], lung_surround: Sequence[float], dense_surround: Sequence[float]
) -> np.ndarray:
    """The three candidate-stage numbers the network gets beside the patch, ``(N, 3)`` float32."""
    return np.stack(
        [np.log(np.asarray(radius_mm, dtype=np.float64)), np.asarray(lung_surround), np.asarray(dense_surround)],
        axis=1,
    ).astype(np.float32)


@dataclass(frozen=True)
class CandidateNetConfig:
    channels: tuple[int, ...] = (16, 32, 32)
    features: int = 3
    dropout: float = 0.2

    def as_dict(self) -> dict[str, object]:
        return {"channels": list(self.channels), "features": self.features, "dropout": self.dropout}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> CandidateNetConfig:
        channels = data.get("channels", list(cls.channels))
        assert isinstance(channels, Sequence)
        return cls(
            channels=tuple(int(c) for c in channels),
            features=int(str(data.get("features", cls.features))),
            dropout=float(str(data.get("dropout", cls.dropout))),
        )


class CandidateNet(nn.Module):
    """Small CNN: is this candidate a nodule? One logit per ``(N, 1, 5, 32, 32)`` patch and ``(N, 3)`` features.

    The first layer is a 3-D convolution spanning all five planes (kernel 5 x 3 x 3), so every feature sees how
    a structure changes from plane to plane; the later layers work in-plane (a 3-D convolution over one plane is a
    2-D one, and the 2-D kernels run several times faster on a CPU). Max pooling halves the plane twice; global
    average pooling and the candidate-stage numbers feed one logit.
    """

    def __init__(self, config: CandidateNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or CandidateNetConfig()
        first, *rest = self.config.channels
        self.across_planes = Convolution(
            3, 1, first, kernel_size=(PATCH_PLANES, 3, 3), padding=(0, 1, 1), act="RELU", norm="BATCH", bias=False
        )
        layers: list[nn.Module] = []
        previous = first
        for width in rest:
            layers.append(nn.MaxPool2d(kernel_size=2))
            layers.append(Convolution(2, previous, width, kernel_size=3, act="RELU", norm="BATCH", bias=False))
            previous = width
        self.in_plane = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Dropout(self.config.dropout), nn.Linear(previous + self.config.features, 1))

    def forward(self, patches: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        planes = self.across_planes(patches).squeeze(2)  # (N, C, 1, H, W) -> (N, C, H, W)
        pooled = self.pool(self.in_plane(planes)).flatten(1)
        return self.head(torch.cat([pooled, features], dim=1))


class ScoringNet(nn.Module):
    """A trained :class:`CandidateNet` in eval mode, rebuilt to run twice as fast on a CPU; the same function.

    Three rewrites that leave the output unchanged (to float rounding, about 1e-6 on a logit): batch
    normalisation folded into the convolution before it (eval mode uses fixed statistics); the first 3-D
    convolution, whose kernel spans all five planes with no padding across them, run as a 2-D convolution that
    takes the five planes as input channels; and channels-last tensors, which CPU convolutions and max pooling
    prefer (the pooling alone ran six times slower on the default layout).
    """

    def __init__(self, trained: CandidateNet) -> None:
        super().__init__()
        layers: list[nn.Module] = [_folded(trained.across_planes, planes_as_channels=True), nn.ReLU(inplace=True)]
        for module in trained.in_plane:
            if isinstance(module, nn.MaxPool2d):
                layers.append(nn.MaxPool2d(kernel_size=2))
            else:
                layers += [_folded(module), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.head = trained.head
        self.eval()

    def forward(self, patches: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """One logit per ``(N, 5, 32, 32)`` patch (planes as channels) and ``(N, 3)`` features."""
        planes = self.body(patches.contiguous(memory_format=torch.channels_last))
        return self.head(torch.cat([planes.mean(dim=(2, 3)), features], dim=1))


def _folded(block: nn.Module, *, planes_as_channels: bool = False) -> nn.Conv2d:
    """A 2-D convolution with bias computing an eval-mode MONAI ``Convolution`` block's convolution and batch norm."""
    conv, norm = getattr(block, "conv", None), getattr(getattr(block, "adn", None), "N", None)
    if not isinstance(conv, nn.Conv2d | nn.Conv3d) or not isinstance(norm, nn.BatchNorm2d | nn.BatchNorm3d):
        raise TypeError("expected a MONAI Convolution block of a convolution without bias and a batch norm")
    if norm.running_mean is None or norm.running_var is None:
        raise TypeError("the batch norm has no running statistics to fold")
    weight = conv.weight.detach()
    if planes_as_channels:  # (out, 1, planes, k, k) -> (out, planes, k, k)
        weight = weight[:, 0]
    scale = norm.weight.detach() / torch.sqrt(norm.running_var + norm.eps)
    size = int(weight.shape[-1])
    folded = nn.Conv2d(int(weight.shape[1]), int(weight.shape[0]), kernel_size=size, padding=size // 2)
    with torch.no_grad():
        folded.weight.copy_(weight * scale[:, None, None, None])
        folded.bias.copy_(norm.bias.detach() - norm.running_mean * scale)  # type: ignore[union-attr]
    return folded


SUSPICION_FEATURES = (
    "log_mean_diameter",
    "log_volume",
    "part_solid",
    "ground_glass",
    "calcified_fraction",
    "sphericity",
    "mean_hu",
    "long_short_ratio",
)
"""What the suspicion model weighs, in this order (all measured by :func:`models.nodules.measure.measure_nodule`)."""


def suspicion_features(measures: NoduleMeasures) -> np.ndarray:
    """The :data:`SUSPICION_FEATURES` of one nodule as a float64 vector."""
    d = measures.diameters
    return np.array(
        [
            math.log(max(d.mean_mm, 0.5)),
            math.log(max(measures.volume_mm3, 1.0)),
            1.0 if measures.nodule_type == "part-solid" else 0.0,
            1.0 if measures.nodule_type == "ground-glass" else 0.0,
            measures.calcified_fraction,
            measures.sphericity,
            measures.mean_hu / 1000.0,
            d.long_mm / max(d.short_mm, 0.5),
        ],
        dtype=np.float64,
    )


@dataclass(frozen=True)
class SuspicionModel:
    """Logistic regression on standardised :data:`SUSPICION_FEATURES` (mean and scale from the training nodules)."""

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: float

    def probability(self, features: np.ndarray) -> np.ndarray:
        z = (np.atleast_2d(features) - self.mean) / self.scale
        return np.asarray(1.0 / (1.0 + np.exp(-(z @ self.weights + self.bias))))

    def as_dict(self) -> dict[str, object]:
        return {
            "features": list(SUSPICION_FEATURES),
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "weights": self.weights.tolist(),
            "bias": self.bias,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> SuspicionModel:
        if list(data.get("features", [])) != list(SUSPICION_FEATURES):  # type: ignore[call-overload]
            raise ValueError("the suspicion model was trained on other features than this version computes")
        return cls(
            mean=np.asarray(data["mean"], dtype=np.float64),
            scale=np.asarray(data["scale"], dtype=np.float64),
            weights=np.asarray(data["weights"], dtype=np.float64),
            bias=float(str(data["bias"])),
        )


@dataclass(frozen=True)
class NoduleModels:
    """Everything the analyzer loads from the weights file.

    ``candidate_nets`` are the false-positive networks whose logits are averaged (the shipped model: one per
    whole-CT fold); ``folds`` keeps each network with its threshold by the whole CT it was trained on, so that a
    scan can be measured with the network that never saw it (:meth:`held_out`).
    """

    candidate_nets: tuple[CandidateNet, ...]
    candidate_threshold: float
    suspicion: SuspicionModel
    suspicion_threshold: float
    type_rule: TypeRule
    sha256: str
    folds: tuple[tuple[str, CandidateNet, float], ...] = ()
    description: str = "ensemble"
    scoring_nets: tuple[ScoringNet, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scoring_nets", tuple(ScoringNet(net) for net in self.candidate_nets))

    def held_out(self, scan: str) -> NoduleModels:
        """These models with only the networks not trained on ``scan`` (all of them when none was)."""
        kept = [(name, net, threshold) for name, net, threshold in self.folds if name != scan]
        if not kept or len(kept) == len(self.folds):
            return self
        if len(kept) > 1:
            raise ValueError("held-out evaluation expects one network per whole CT and two whole CTs")
        name, net, threshold = kept[0]
        return replace(
            self,
            candidate_nets=(net,),
            candidate_threshold=threshold,
            description=f"the network trained without {scan} (with {name} only)",
        )

    def nodule_probabilities(self, patches: np.ndarray, features: np.ndarray) -> np.ndarray:
        """The network's probability that each candidate is a nodule, ``(N,)``, from patches already sampled."""
        x = torch.from_numpy(np.ascontiguousarray(patches, dtype=np.float32))
        f = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        with torch.inference_mode():
            scored = [self._probabilities(x[s : s + BATCH], f[s : s + BATCH]) for s in range(0, len(x), BATCH)]
        return torch.cat(scored).numpy() if scored else np.zeros(0, dtype=np.float32)

    def candidate_probabilities(
        self,
        hu: np.ndarray,
        spacing: Sequence[float],
        centres: Sequence[Sequence[float]],
        radii_mm: Sequence[float],
        features: np.ndarray,
    ) -> np.ndarray:
        """:meth:`nodule_probabilities` of candidates in ``hu``, sampled and scored :data:`BATCH` at a time.

        The same patches as :func:`sample_patches`, but only one batch of them exists at any time, so a scan's
        candidates cost the memory of one batch, not of all their patches.
        """
        with warnings.catch_warnings():  # torch warns about a read-only array; it only reads this one
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
            volume = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))
        f = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        with torch.inference_mode():
            scored = [
                self._probabilities(
                    _sample(volume, spacing, centres[s : s + BATCH], radii_mm[s : s + BATCH]), f[s : s + BATCH]
                )
                for s in range(0, len(centres), BATCH)
            ]
        return torch.cat(scored).numpy() if scored else np.zeros(0, dtype=np.float32)

    def _probabilities(self, patches: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Mean logit of the networks, each averaged over the patch and its left-right mirror image, as a probability.

        The mirror images go through in the same batch as the patches: one call per network instead of two.
        """
        count = patches.shape[0]
        both = torch.cat([patches, patches.flip(-1)])
        twice = torch.cat([features, features])
        logits = []
        for net in self.scoring_nets:
            out = net(both, twice)
            logits.append(out[:count] + out[count:])
        return torch.sigmoid(torch.stack(logits, dim=0).mean(dim=0) / 2.0).reshape(-1)


def models_from_checkpoint(checkpoint: dict[str, object], sha256: str) -> NoduleModels:
    config = checkpoint["candidate_net"]
    folds = checkpoint["candidate_folds"]
    suspicion = checkpoint["suspicion"]
    type_rule = checkpoint["type_rule"]
    assert isinstance(config, dict) and isinstance(folds, dict)
    assert isinstance(suspicion, dict) and isinstance(type_rule, dict)
    loaded = []
    for name in sorted(folds):
        fold = folds[name]
        net = CandidateNet(CandidateNetConfig.from_dict(config))
        net.load_state_dict({k: v.float() for k, v in fold["state"].items()})
        net.eval()
        loaded.append((str(name), net, float(fold["threshold"])))
    return NoduleModels(
        candidate_nets=tuple(net for _, net, _ in loaded),
        folds=tuple(loaded),
        candidate_threshold=float(str(checkpoint["candidate_threshold"])),
        suspicion=SuspicionModel.from_dict(suspicion),
        suspicion_threshold=float(str(checkpoint["suspicion_threshold"])),
        type_rule=TypeRule(float(type_rule["ground_glass_below"]), float(type_rule["solid_from"])),
        sha256=sha256,
    )


def load_nodule_models(path: Path, expected_sha256: str | None = None) -> NoduleModels:
    """Hash-check the weights file on every call; load it once per content (a mismatch raises)."""
    from models.weights_io import verify_sha256

    return _load_verified(path, verify_sha256(path, expected_sha256))


@lru_cache(maxsize=2)
def _load_verified(path: Path, digest: str) -> NoduleModels:
    from models.weights_io import load_checked

    return models_from_checkpoint(load_checked(path, digest), digest)

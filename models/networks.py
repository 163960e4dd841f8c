"""Small networks for 28x28 MedMNIST-style binary classification, and the ensemble that ships them (torch).

The networks are deliberately small: they must train in minutes on a 2-core CPU and the weights must stay a
few megabytes so they can live in the repository. An :class:`CalibratedEnsemble` averages the logits of a few
independently seeded members and divides by a temperature fitted on the validation split, so that the
probability it returns is calibrated (see :mod:`models.metrics`). These torch modules train the networks and run
them in MONAI bundles; the analyzers evaluate the same weights in numpy (:mod:`models.shipped`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class NetworkConfig:
    """Hyper-parameters that fully define one member network (stored in the weights file)."""

    channels: tuple[int, ...] = (32, 64, 128)
    convs_per_stage: int = 2
    dropout: float = 0.2
    in_channels: int = 1
    standardise: bool = True

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "channels": list(self.channels)}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> NetworkConfig:
        channels = data.get("channels", cls.channels)
        assert isinstance(channels, Sequence)
        return cls(
            channels=tuple(int(c) for c in channels),
            convs_per_stage=int(str(data.get("convs_per_stage", cls.convs_per_stage))),
            dropout=float(str(data.get("dropout", cls.dropout))),
            in_channels=int(str(data.get("in_channels", cls.in_channels))),
            standardise=bool(data.get("standardise", cls.standardise)),
        )


class ConvNormAct(nn.Sequential):
    """3x3 convolution (same padding, no bias) -> batch norm -> ReLU, laid out as MONAI's ``Convolution`` block.

    Same layers under the same names (``conv``, ``adn.N``, ``adn.A``) as ``monai.networks.blocks.Convolution(2, in,
    out, kernel_size=3, act="RELU", norm="BATCH", bias=False)``, so weights trained with either load into both and
    give the same outputs (tests/test_networks.py). Built from ``torch.nn`` alone because importing any part of
    MONAI imports all of it (its ``__init__`` loads every submodule: several seconds), which a command-line
    analysis of one radiograph should not pay for.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        norm_act = nn.Sequential(OrderedDict(N=nn.BatchNorm2d(out_channels), A=nn.ReLU()))
        super().__init__(OrderedDict(conv=nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), adn=norm_act))


class MedMnistCNN(nn.Module):
    """VGG-like CNN of conv -> batch norm -> ReLU blocks (:class:`ConvNormAct`, MONAI's layout), one logit out.

    Intensity normalisation happens inside ``forward`` (per-image standardisation, or a fixed [0, 1] -> [-1, 1]
    map when ``standardise`` is off), so training, evaluation and the analyzers cannot disagree about it.
    Stages halve the resolution with max pooling (28 -> 14 -> 7); the last stage keeps 7x7 so Grad-CAM on
    ``features.stage{n-1}`` still has a useful spatial map. Global average pooling makes the head independent
    of the exact input size, which keeps test-time augmentation simple.
    """

    def __init__(self, config: NetworkConfig | None = None) -> None:
        super().__init__()
        self.config = config or NetworkConfig()
        stages: list[tuple[str, nn.Module]] = []
        previous = self.config.in_channels
        for index, width in enumerate(self.config.channels):
            layers: list[nn.Module] = []
            if index > 0:
                layers.append(nn.MaxPool2d(2))
            for _ in range(self.config.convs_per_stage):
                layers.append(ConvNormAct(previous, width))
                previous = width
            stages.append((f"stage{index}", nn.Sequential(*layers)))
        self.features = nn.Sequential(OrderedDict(stages))
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(self.config.dropout), nn.Linear(previous, 1)
        )

    @property
    def gradcam_layer(self) -> str:
        """Name of the last convolutional stage, the layer Grad-CAM explains."""
        return f"features.stage{len(self.config.channels) - 1}"

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The globally pooled last-stage features ``(N, C)``: what the final linear layer reads."""
        x = standardise_per_image(x) if self.config.standardise else 2.0 * x - 1.0
        return self.features(x).mean(dim=(-2, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = standardise_per_image(x) if self.config.standardise else 2.0 * x - 1.0
        return self.head(self.features(x))


class CalibratedEnsemble(nn.Module):
    """Mean logit of several members divided by a fitted temperature; returns ``(N, 1)`` calibrated logits.

    Grad-CAM works on the ensemble directly: ``target_layer`` names member 0's last stage by default; the
    analyzers average the maps of all members for the explanation.
    """

    def __init__(self, members: Sequence[MedMnistCNN], temperature: float = 1.0) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member network")
        self.members = nn.ModuleList(members)
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def uncalibrated_logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(x) for member in self.members], dim=0).mean(dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        temperature = self.get_buffer("temperature")
        return self.uncalibrated_logits(x) / temperature


def standardise_per_image(images: torch.Tensor) -> torch.Tensor:
    """Zero-mean, unit-variance per image: the intensity normalisation shared by training and inference.

    Per-image standardisation makes the network indifferent to any linear intensity mapping (bit depth,
    window level and width, 8-bit JPEG export), which is what differs most between the MedMNIST training
    images and a DICOM radiograph from another vendor.
    """
    x = images.float()
    mean = x.mean(dim=(-2, -1), keepdim=True)
    std = x.std(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
    return (x - mean) / std


@dataclass(frozen=True)
class FeatureReference:
    """Where the training images lie in each member's feature space, to tell how unlike them an image is.

    The Mahalanobis detector of Lee et al. (NeurIPS 2018, "A simple unified framework for detecting
    out-of-distribution samples and adversarial attacks"): per member, the class means of the pooled features
    of the training images and the inverse of their shared (within-class) covariance; an image's distance is
    its Mahalanobis distance to the nearer class mean, averaged over the members. ``limit`` is the distance
    that ``limit_percentile`` % of the validation images stay within (fitted by the training script).
    """

    means: torch.Tensor  # (members, 2, C)
    precisions: torch.Tensor  # (members, C, C)
    limit: float
    limit_percentile: float

    @classmethod
    def fit(cls, members: Sequence[MedMnistCNN], images: torch.Tensor, labels: np.ndarray) -> FeatureReference:
        """Class means and shared-covariance precision of each member's features over ``images`` (no limit yet)."""
        means, precisions = [], []
        with torch.no_grad():
            for member in members:
                member.eval()
                features = member.embedding(images).double()
                centres = torch.stack([features[torch.from_numpy(labels == c)].mean(dim=0) for c in (0, 1)])
                within = features - centres[torch.from_numpy(labels.astype(np.int64))]
                covariance = within.T @ within / (features.shape[0] - 2)
                ridge = 1e-3 * float(covariance.diagonal().mean()) * torch.eye(covariance.shape[0], dtype=torch.float64)
                means.append(centres.float())
                precisions.append(torch.linalg.inv(covariance + ridge).float())
        return cls(torch.stack(means), torch.stack(precisions), float("inf"), 100.0)

    def distances(self, members: Sequence[MedMnistCNN], images: torch.Tensor) -> np.ndarray:
        """Per image, the mean over members of the Mahalanobis distance to the nearer class mean."""
        total = torch.zeros(images.shape[0], dtype=torch.float64)
        with torch.no_grad():
            for member, centres, precision in zip(members, self.means, self.precisions, strict=True):
                features = member.embedding(images)
                squared = torch.stack(
                    [torch.einsum("nc,cd,nd->n", features - m, precision, features - m) for m in centres]
                )
                total += squared.min(dim=0).values.clamp_min(0.0).sqrt().double()
        return (total / len(members)).numpy()

    def with_limit(self, validation_distances: np.ndarray, percentile: float) -> FeatureReference:
        limit = float(np.percentile(validation_distances, percentile))
        return FeatureReference(self.means, self.precisions, limit, percentile)

    def as_checkpoint(self) -> dict[str, object]:
        return {
            "means": self.means.clone(),
            "precisions": self.precisions.clone(),
            "limit": self.limit,
            "limit_percentile": self.limit_percentile,
        }

    @classmethod
    def from_checkpoint(cls, data: dict[str, object]) -> FeatureReference:
        means, precisions = data["means"], data["precisions"]
        assert isinstance(means, torch.Tensor) and isinstance(precisions, torch.Tensor)
        return cls(means.float(), precisions.float(), float(str(data["limit"])), float(str(data["limit_percentile"])))


def ensemble_from_checkpoint(checkpoint: dict[str, object]) -> CalibratedEnsemble:
    """Rebuild the shipped ensemble from a checkpoint written by ``models.training.train_medmnist``."""
    config_data = checkpoint["network"]
    states = checkpoint["members"]
    assert isinstance(config_data, dict) and isinstance(states, list)
    config = NetworkConfig.from_dict(config_data)
    members = []
    for state in states:
        member = MedMnistCNN(config)
        member.load_state_dict({k: v.float() for k, v in state.items()})
        members.append(member)
    ensemble = CalibratedEnsemble(members, float(str(checkpoint["temperature"])))
    ensemble.eval()
    return ensemble


def tta_logits(ensemble: CalibratedEnsemble, images: torch.Tensor, shifts: int = 0) -> torch.Tensor:
    """Calibrated ensemble logits averaged over +/- ``shifts`` pixel translations (test-time augmentation).

    Translations only: the training augmentation never flipped chest radiographs, so flipping at test time
    would show the model anatomy it never saw. Edges are replicated, as in training.
    """
    if shifts == 0:
        return ensemble(images)
    padded = torch.nn.functional.pad(images, (shifts, shifts, shifts, shifts), mode="replicate")
    size_y, size_x = images.shape[-2:]
    outputs = []
    for dy in (-shifts, 0, shifts):
        for dx in (-shifts, 0, shifts):
            window = padded[..., shifts + dy : shifts + dy + size_y, shifts + dx : shifts + dx + size_x]
            outputs.append(ensemble(window))
    return torch.stack(outputs, dim=0).mean(dim=0)


def grad_cam(network: nn.Module, layer: str, batch: torch.Tensor, output_index: int = 0) -> np.ndarray:
    """Grad-CAM (Selvaraju et al., ICCV 2017) of one output of ``network`` for one image, ``(H, W)`` in 0..1.

    The activations of ``layer`` are weighted by the spatial mean of the output's gradient with respect to them,
    summed over channels, kept where positive, upsampled bilinearly to the input size and scaled so that 0 is the
    least and 1 the most evidence for the output. (MONAI's ``GradCAM``, used before, scales its maps the other way
    round by default - its ``default_normalizer`` maps the maximum to 0 - which made the key images highlight the
    regions of least evidence; see tests/test_networks.py.)
    """
    target = network.get_submodule(layer)
    captured: dict[str, torch.Tensor] = {}

    def keep(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        output.retain_grad()
        captured["activations"] = output

    handle = target.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            network.zero_grad(set_to_none=True)
            output = network(batch)
            output[0, output_index].backward()
    finally:
        handle.remove()
    activations = captured["activations"]
    gradients = activations.grad
    assert gradients is not None
    weights = gradients.mean(dim=(-2, -1), keepdim=True)
    cam = torch.relu((weights * activations).sum(dim=1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=batch.shape[-2:], mode="bilinear", align_corners=False)
    heat = cam[0, 0].detach().numpy().astype(np.float64)
    low, high = float(heat.min()), float(heat.max())
    return ((heat - low) / (high - low) if high > low else np.zeros_like(heat)).astype(np.float32)

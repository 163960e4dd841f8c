"""Small MONAI networks for 28x28 MedMNIST-style binary classification, and the ensemble that ships them.

The networks are deliberately small: they must train in minutes on a 2-core CPU and the weights must stay a
few megabytes so they can live in the repository. An :class:`CalibratedEnsemble` averages the logits of a few
independently seeded members and divides by a temperature fitted on the validation split, so that the
probability it returns is calibrated (see :mod:`models.metrics`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from monai.networks.blocks import Convolution
from torch import nn


@dataclass(frozen=True)
class NetworkConfig:
    """Hyper-parameters that fully define one member network (stored in the weights file)."""

    channels: tuple[int, ...] = (32, 64, 128)
    convs_per_stage: int = 2
    dropout: float = 0.2
    in_channels: int = 1

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
        )


class MedMnistCNN(nn.Module):
    """VGG-like CNN of MONAI ``Convolution`` blocks (conv -> batch norm -> ReLU), one logit out.

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
                layers.append(Convolution(2, previous, width, kernel_size=3, act="RELU", norm="BATCH", bias=False))
                previous = width
            stages.append((f"stage{index}", nn.Sequential(*layers)))
        self.features = nn.Sequential(dict(stages))
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(self.config.dropout), nn.Linear(previous, 1)
        )

    @property
    def gradcam_layer(self) -> str:
        """Name of the last convolutional stage, the layer Grad-CAM explains."""
        return f"features.stage{len(self.config.channels) - 1}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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


# Intensity convention shared by training and inference: 8-bit presentation values -> [-1, 1].
INTENSITY_OFFSET = 127.5
INTENSITY_SCALE = 127.5


def normalise_uint8_scale(images: torch.Tensor) -> torch.Tensor:
    """Map images on the 0..255 presentation scale (as MedMNIST stores them) to the network's [-1, 1]."""
    return (images.float() - INTENSITY_OFFSET) / INTENSITY_SCALE


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

"""The classifiers' building blocks against MONAI's: the same layers and weights, and a Grad-CAM that points at
the evidence (MONAI's default scaling points the other way)."""

from __future__ import annotations

import numpy as np
import torch
from monai.networks.blocks import Convolution
from monai.visualize import GradCAM

from models.networks import ConvNormAct, MedMnistCNN, NetworkConfig, grad_cam
from models.projection_classifier import WEIGHTS_DIR
from models.weights_io import load_checked


def test_the_block_has_monais_layout_and_gives_its_outputs() -> None:
    torch.manual_seed(0)
    monai_block = Convolution(2, 1, 16, kernel_size=3, act="RELU", norm="BATCH", bias=False)
    ours = ConvNormAct(1, 16)
    assert list(ours.state_dict()) == list(monai_block.state_dict())
    monai_block.train()
    monai_block(torch.randn(8, 1, 28, 28))  # move the running statistics off their defaults
    ours.load_state_dict(monai_block.state_dict())
    monai_block.eval(), ours.eval()
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(ours(x), monai_block(x), rtol=0, atol=0)


def test_the_shipped_weights_load_into_the_torch_only_network() -> None:
    checkpoint = load_checked(WEIGHTS_DIR / "breast_cnn.pt")  # trained when the blocks were MONAI's own
    network = MedMnistCNN(NetworkConfig.from_dict(checkpoint["network"]))
    missing, unexpected = network.load_state_dict(checkpoint["members"][0], strict=True)
    assert not missing and not unexpected


def test_grad_cam_is_monais_map_scaled_so_that_1_is_the_most_evidence() -> None:
    with np.load("tests/data/medmnist/pneumoniamnist_28_reconstructed.npz") as data:
        image = torch.from_numpy(data["test_images"][:1].astype(np.float32) / 255.0)[:, None]
    checkpoint = load_checked(WEIGHTS_DIR / "pneumonia_cnn.pt")
    network = MedMnistCNN(NetworkConfig.from_dict(checkpoint["network"]))
    network.load_state_dict(checkpoint["members"][0])
    network.eval()
    ours = grad_cam(network, network.gradcam_layer, image)
    monai_map = GradCAM(nn_module=network, target_layers=network.gradcam_layer)(x=image, class_idx=0)
    np.testing.assert_allclose(ours, 1.0 - monai_map.detach().numpy()[0, 0], atol=1e-5)
    # where the map is highest, blanking the image lowers the finding's logit more than where it is lowest
    with torch.no_grad():
        logit = float(network(image)[0, 0])
        hot, cold = image.clone(), image.clone()
        hot[0, 0][torch.from_numpy(ours >= np.quantile(ours, 0.75))] = float(image.mean())
        cold[0, 0][torch.from_numpy(ours <= np.quantile(ours, 0.25))] = float(image.mean())
        assert logit - float(network(hot)[0, 0]) > logit - float(network(cold)[0, 0])

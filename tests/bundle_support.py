"""A tiny but complete MONAI bundle written on the fly, for registry, web and bundle tests.

The network is a real ``monai.networks.nets.Classifier`` with seeded random weights: the tests check how
bundles are pinned, parsed, refused and listed, not what the network predicts (the packaged pneumonia bundle
covers that in test_bundle.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import Classifier

from models.cards import RULE_BASED
from models.package_bundle import write_bundle

TINY_NAME = "cxr-tiny"


def tiny_card(name: str = TINY_NAME) -> dict[str, Any]:
    return {
        "name": name,
        "version": "0.1.0",
        "title": "Tiny demonstration chest radiograph classifier (MONAI bundle)",
        "status": "experimental",
        "intended_use": "Exercising the bundle machinery in tests; never for patients.",
        "not_for": ["Any clinical use"],
        "inputs_accepted": {"modalities": ["CR", "DX"]},
        "training_data": RULE_BASED,
        "method": "Untrained MONAI Classifier with seeded random weights.",
        "validation": {
            "summary": "Not validated: random weights.",
            "dataset": "none",
            "operating_threshold": 0.5,
            "figures": {"auc": {"value": 0.5, "ci95_low": 0.45, "ci95_high": 0.55}},
        },
        "limits": ["Random weights: its output means nothing."],
        "references": ["MONAI Consortium. MONAI: Medical Open Network for AI. Zenodo 2020."],
    }


def tiny_inference() -> dict[str, Any]:
    return {
        "network_def": {
            "_target_": "monai.networks.nets.Classifier",
            "in_shape": [1, 32, 32],
            "classes": 1,
            "channels": [4, 8],
            "strides": [2, 2],
        },
        "inputs": {"modalities": ["CR", "DX"], "body_parts": ["CHEST"], "view_positions": ["PA", "AP"]},
        "preprocessing": {"crop": "centre-square", "spatial_size": [32, 32], "intensity": "standardise"},
        "postprocessing": {
            "activation": "sigmoid",
            "class_names": ["no finding", "finding"],
            "positive_class": "finding",
            "threshold": 0.5,
        },
    }


def make_tiny_bundle(root: Path, *, name: str = TINY_NAME, inference: dict[str, Any] | None = None) -> dict[str, str]:
    """Write the bundle under ``root`` and return its SHA-256 pins."""
    torch.manual_seed(0)
    network = Classifier(in_shape=(1, 32, 32), classes=1, channels=(4, 8), strides=(2, 2))
    card = tiny_card(name)
    return write_bundle(
        root,
        state_dict=network.state_dict(),
        inference=inference or tiny_inference(),
        metadata={"version": card["version"], "description": "100% synthetic"},
        card=card,
    )

"""Package the project's trained pneumonia ensemble as a MONAI bundle (the test case for bundle analyzers).

Usage::

    python -m models.package_bundle            # writes models/bundles/cxr-pneumonia-bundle and bundles.json

The bundle is the layout MONAI uses (``configs/metadata.json``, ``configs/inference.json``,
``models/model.pt``) plus ``configs/model_card.json``. Its ``inference.json`` stays inside the declarative
subset :mod:`models.bundle` accepts - no ``$`` expressions, no ``@`` references - and ``model.pt`` is the
ensemble's plain state dict (tensors only, loadable with ``weights_only=True``). ``bundles.json`` beside it
is the administrator's registration file with the SHA-256 pins of every file
(``IMAGING_CDS_BUNDLES=models/bundles/bundles.json``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from models.bundle import CARD, INFERENCE, METADATA, PINNED_DIRECTORIES, WEIGHTS
from models.cards import REPO_ROOT
from models.weights_io import sha256_of_file

BUNDLES_DIR = REPO_ROOT / "models" / "bundles"
BUNDLE_NAME = "cxr-pneumonia-bundle"


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_bundle(
    root: Path,
    *,
    state_dict: Mapping[str, torch.Tensor],
    inference: Mapping[str, Any],
    metadata: Mapping[str, Any],
    card: Mapping[str, Any],
) -> dict[str, str]:
    """Write a bundle directory; the card's weights entry is filled in. Returns the SHA-256 pins of its files."""
    weights = root / WEIGHTS
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone().contiguous() for k, v in state_dict.items()}, weights)
    digest = sha256_of_file(weights)
    _write_json(root / INFERENCE, inference)
    _write_json(root / METADATA, metadata)
    _write_json(root / CARD, {**card, "weights": {"file": WEIGHTS, "sha256": digest}})
    return {
        path.relative_to(root).as_posix(): sha256_of_file(path)
        for directory in PINNED_DIRECTORIES
        for path in sorted((root / directory).rglob("*"))
        if path.is_file()
    }


def _figures(card: Mapping[str, Any]) -> dict[str, Any]:
    validation = card.get("validation")
    if isinstance(validation, Mapping) and isinstance(validation.get("figures"), Mapping):
        return dict(validation["figures"])
    return dict(card.get("test_performance") or {})


def _preprocessing(size: int) -> dict[str, Any]:
    """The bundle's literal preprocessing, matching ``ShippedClassifier.prepare``: the MedMNIST recipe, whose grey
    levels / 255 are the training images' own scale, so no further intensity mapping is needed."""
    return {"crop": "centre-square", "spatial_size": [size, size], "resample": "medmnist", "intensity": "none"}


def pneumonia_bundle_parts(checkpoint: Mapping[str, Any], source_card: Mapping[str, Any]) -> dict[str, Any]:
    """network_def, inference config, metadata and card of the built-in pneumonia model, as a bundle."""
    import monai
    import numpy as np

    from models.networks import MedMnistCNN, NetworkConfig

    network_config = NetworkConfig.from_dict(dict(checkpoint["network"]))
    config = network_config.as_dict()
    members = len(checkpoint["members"])
    size = int(checkpoint.get("input_size", 28))
    threshold = float(checkpoint["threshold"])
    member_def = {
        "_target_": "models.networks.MedMnistCNN",
        "config": {"_target_": "models.networks.NetworkConfig", **config},
    }
    inference = {
        "network_def": {
            "_target_": "models.networks.CalibratedEnsemble",
            "members": [member_def] * members,
            "temperature": float(checkpoint["temperature"]),
        },
        "inputs": {
            "modalities": ["CR", "DX"],
            "body_parts": ["CHEST", "THORAX", "LUNG"],
            "view_positions": ["PA", "AP"],
        },
        "preprocessing": _preprocessing(size),
        "inference": {"test_time_translation_pixels": int(checkpoint.get("tta_shifts", 0))},
        "postprocessing": {
            "activation": "sigmoid",
            "class_names": ["no pneumonia", "pneumonia"],
            "positive_class": "pneumonia",
            "threshold": threshold,
            "threshold_rule": "Youden's J maximised on the PneumoniaMNIST validation split after calibration",
        },
        "explanation": {
            "method": "gradcam",
            "target_layer": f"members.0.{MedMnistCNN(network_config).gradcam_layer}",
        },
    }
    version = str(source_card.get("version", "1.0.0"))
    metadata = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": version,
        "changelog": {version: "packaged from the project's built-in cxr-pneumonia weights"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"imaging-cds": "the project's models.networks"},
        "task": "Pneumonia classification on frontal chest radiographs",
        "description": "Ensemble of small CNNs trained on PneumoniaMNIST (28x28), temperature-calibrated.",
        "authors": "imaging-cds contributors",
        "copyright": "imaging-cds contributors; training data MedMNIST v2 (CC BY 4.0)",
        "data_source": "PneumoniaMNIST (MedMNIST v2), from Kermany et al., Cell 2018",
        "data_type": "numpy",
        "intended_use": "Research and demonstration only; see configs/model_card.json",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "CR/DX",
                    "num_channels": 1,
                    "spatial_shape": [size, size],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "logits",
                    "format": "classification",
                    "num_channels": 1,
                    "spatial_shape": [1],
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": False,
                    "channel_def": {"0": "pneumonia"},
                }
            },
        },
    }
    figures = _figures(source_card)
    references = list(source_card.get("references") or [])
    training = source_card.get("training_data") or {}
    for entry in (training.get("source"), training.get("citation")) if isinstance(training, Mapping) else ():
        if entry and entry not in references:
            references.append(str(entry))
    card = {
        "name": BUNDLE_NAME,
        "version": version,
        "title": f"{source_card.get('title', 'Chest radiograph pneumonia classifier')} - as a MONAI bundle",
        "status": source_card.get("status", "experimental"),
        "intended_use": source_card.get("intended_use"),
        "not_for": source_card.get("not_for"),
        "inputs_accepted": source_card.get("inputs_accepted") or source_card.get("inputs"),
        "training_data": training,
        "method": {
            "packaging": "The built-in cxr-pneumonia ensemble, packaged as an admin-installed MONAI bundle by "
            "python -m models.package_bundle: same weights, preprocessing, test-time translation averaging and "
            "threshold, so the same probabilities. Grad-CAM here explains member 0 only.",
            "model": source_card.get("method"),
        },
        "validation": {
            "summary": "Same weights as the built-in cxr-pneumonia analyzer; its figures apply. The test suite "
            "checks that this bundle returns the built-in analyzer's probabilities on the PneumoniaMNIST test split.",
            "dataset": "PneumoniaMNIST official test split (624 images)",
            "figures": figures,
            "operating_threshold": threshold,
        },
        "limits": source_card.get("limits") or source_card.get("known_limits"),
        "references": references,
    }
    return {"inference": inference, "metadata": metadata, "card": card}


def package_pneumonia(weights: Path, source_card: Path, out: Path) -> dict[str, str]:
    """Write the pneumonia bundle to ``out``; returns its pins."""
    from models.networks import ensemble_from_checkpoint
    from models.weights_io import load_checked

    checkpoint = load_checked(weights)
    ensemble = ensemble_from_checkpoint(checkpoint)
    parts = pneumonia_bundle_parts(checkpoint, json.loads(source_card.read_text(encoding="utf-8")))
    return write_bundle(out, state_dict=ensemble.state_dict(), **parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=REPO_ROOT / "models" / "weights" / "pneumonia_cnn.pt")
    parser.add_argument("--card", type=Path, default=REPO_ROOT / "models" / "cards" / "cxr-pneumonia.json")
    parser.add_argument("--out", type=Path, default=BUNDLES_DIR / BUNDLE_NAME)
    args = parser.parse_args(argv)
    pins = package_pneumonia(args.weights, args.card, args.out)
    registration = args.out.parent / "bundles.json"
    _write_json(registration, {"bundles": [{"path": args.out.name, "sha256": pins}]})
    print(f"wrote {args.out} ({len(pins)} pinned files) and {registration}")


if __name__ == "__main__":
    main()

"""Admin-installed MONAI bundles as analyzers: hash-pinned, declarative, never evaluated.

A MONAI bundle (``configs/metadata.json``, ``configs/inference.json``, ``models/model.pt``) normally runs
through ``monai.bundle.ConfigParser``, which evaluates ``$`` strings as Python, resolves ``@`` references and
``%`` macros - a bundle is then code, and code from a file is as dangerous as code from a request. This module
never hands a bundle to ConfigParser. It reads the JSON itself and accepts a small declarative subset:

* ``network_def``: ``_target_`` from :data:`ALLOWED_NETWORKS` (``monai.networks.nets`` classifiers and the
  project's own small CNN ensemble) with literal keyword arguments; nested ``_target_`` only from the same list;
* ``inputs``: modalities, body parts and views the analyzer accepts (the input guard);
* ``preprocessing``: centre-square crop or none, ``spatial_size``, ``resample`` (``bilinear``, the default: scikit-
  image's anti-aliased bilinear on the presentation values; or ``medmnist``: the MedMNIST recipe of
  :mod:`models.medmnist`, 8-bit display values reduced by Pillow, grey levels / 255), intensity ``min-max`` /
  ``standardise`` / ``percentile-map`` (with literal ``percentile_map``: percentiles, targets, clip) / ``none``;
* ``inference``: ``test_time_translation_pixels`` (translation averaging of the logits);
* ``postprocessing``: ``activation`` (sigmoid or softmax), ``class_names``, ``positive_class``, ``threshold``;
* ``explanation`` (optional): Grad-CAM on a named layer.

Any string with ``$``, ``@`` or ``%``, any other key, and any other ``_target_`` is refused with the field
named. Every file under ``configs/`` and ``models/`` must be pinned by SHA-256 in the admin's configuration and
is re-checked each time the analyzer is built; the bundle also carries ``configs/model_card.json``, a card in
the project's schema (:mod:`models.cards`), because no analyzer runs without one.

Parsing and pin checks use only ``json`` and ``hashlib``: listing bundles never imports torch.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

from core.errors import ConfigurationError, UnsuitableInputError
from core.options import did_you_mean
from models.base import (
    AnalysisResult,
    Category,
    Explanation,
    ImageInput,
    Measurement,
    SeriesRequirements,
    at_or_above_threshold,
    highest_normal,
    probability_percent,
)
from models.cards import ModelCard, card_from_dict
from models.weights_io import sha256_of_file

if TYPE_CHECKING:
    import numpy as np
    import torch

METADATA = "configs/metadata.json"
INFERENCE = "configs/inference.json"
CARD = "configs/model_card.json"
WEIGHTS = "models/model.pt"
REQUIRED_FILES = (METADATA, INFERENCE, CARD, WEIGHTS)
PINNED_DIRECTORIES = ("configs", "models")
"""Every file under these directories must be pinned: an unpinned file could be loaded by a later version."""

ALLOWED_NETWORKS: dict[str, str] = {
    **{
        f"monai.networks.nets.{name}": f"monai.networks.nets:{name}"
        for name in (
            "DenseNet121",
            "DenseNet169",
            "DenseNet201",
            "EfficientNetBN",
            "SEResNet50",
            "ResNet",
            "Classifier",
            "ViT",
        )
    },
    "models.networks.CalibratedEnsemble": "models.networks:CalibratedEnsemble",
    "models.networks.MedMnistCNN": "models.networks:MedMnistCNN",
    "models.networks.NetworkConfig": "models.networks:NetworkConfig",
}
"""``_target_`` values a bundle may name (short MONAI names like ``DenseNet121`` also work). Nothing else is
ever imported on a bundle's behalf."""

_INFERENCE_KEYS = ("network_def", "inputs", "preprocessing", "inference", "postprocessing", "explanation")
_FORBIDDEN_CHARACTERS = re.compile(r"[$@%]")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _refuse(bundle: str, what: str, remedy: str) -> ConfigurationError:
    return ConfigurationError(f"MONAI bundle {bundle}: {what}", remedy=remedy)


def _safe_relative(name: str, bundle: str) -> PurePosixPath:
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise _refuse(
            bundle,
            f"pinned path {name!r} is not a plain path inside the bundle.",
            "Pin files by their path relative to the bundle directory, e.g. 'models/model.pt'.",
        )
    return relative


def verify_pins(root: Path, sha256_pins: Mapping[str, str]) -> None:
    """Refuse the bundle unless every required file is pinned, every file in configs/ and models/ is pinned,
    and every pinned file's SHA-256 equals its pin."""
    bundle = root.name
    if not root.is_dir():
        raise _refuse(bundle, f"directory {root} does not exist.", "Install the bundle or fix its path.")
    pins = {str(_safe_relative(name, bundle)): str(value).lower() for name, value in sha256_pins.items()}
    for name, value in pins.items():
        if not _SHA256.match(value):
            raise _refuse(bundle, f"the pin of {name} is not a SHA-256 hex digest.", "Give 64 hex characters.")
    for required in REQUIRED_FILES:
        if required not in pins:
            raise _refuse(
                bundle,
                f"{required} is not pinned; a bundle is only loaded when all its files are hash-pinned.",
                f"Add {required!r}: '<sha256>' to the bundle's sha256 pins (sha256sum prints it).",
            )
    resolved_root = root.resolve()
    for directory in PINNED_DIRECTORIES:
        for path in sorted((root / directory).rglob("*")):
            relative = path.relative_to(root).as_posix()
            if (path.is_file() or path.is_symlink()) and relative not in pins:
                raise _refuse(
                    bundle,
                    f"file {relative} is not pinned; unpinned files in configs/ or models/ are refused.",
                    "Remove the file or add its SHA-256 to the bundle's pins after reviewing it.",
                )
    for name, expected in sorted(pins.items()):
        path = root / name
        if path.is_symlink() or not path.resolve().is_relative_to(resolved_root):
            raise _refuse(bundle, f"{name} is a link or lies outside the bundle.", "Copy the real file in.")
        if not path.is_file():
            raise _refuse(bundle, f"pinned file {name} is missing.", "Reinstall the bundle.")
        actual = sha256_of_file(path)
        if actual != expected:
            raise _refuse(
                bundle,
                f"{name} failed its integrity check: expected SHA-256 {expected}, got {actual}.",
                "The file was modified or replaced; reinstall the reviewed bundle or, after review, update the pin.",
            )


def refuse_expressions(value: Any, where: str, bundle: str, *, anywhere: bool) -> None:
    """Refuse strings MONAI would evaluate: ``$`` expressions, ``@`` references, ``%`` macros.

    ``anywhere`` refuses the characters anywhere in a string (inference.json, which is executable in MONAI);
    otherwise only at the start (metadata.json, whose free text may contain a percent sign).
    """
    if isinstance(value, str):
        hit = _FORBIDDEN_CHARACTERS.search(value) if anywhere else _FORBIDDEN_CHARACTERS.match(value)
        if hit:
            raise _refuse(
                bundle,
                f"{where} contains {hit.group()!r} ({value[:40]!r}); MONAI would evaluate it as an expression, "
                "reference or macro, and this project never evaluates configuration.",
                "Replace it with a literal value (numbers, strings, lists) from the declarative subset "
                "documented in models/bundle.py.",
            )
    elif isinstance(value, Mapping):
        for key, item in value.items():
            refuse_expressions(key, f"{where} key", bundle, anywhere=anywhere)
            refuse_expressions(item, f"{where}.{key}", bundle, anywhere=anywhere)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            refuse_expressions(item, f"{where}[{index}]", bundle, anywhere=anywhere)


def _read_json(root: Path, name: str) -> Any:
    try:
        return json.loads((root / name).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise _refuse(root.name, f"{name} is not valid JSON (line {exc.lineno}).", "Fix the file.") from None


def _check_network(node: Any, where: str, bundle: str) -> None:
    """A ``_target_`` component: allowed target, literal arguments, nested components allowed likewise."""
    if not isinstance(node, Mapping) or "_target_" not in node:
        raise _refuse(bundle, f"{where} must be an object with a '_target_'.", "Name a network class.")
    target = str(node["_target_"])
    if _network_path(target) is None:
        raise _refuse(
            bundle,
            f"{where}._target_ {target!r} is not an allowed network.{did_you_mean(target, ALLOWED_NETWORKS)}",
            f"Allowed: {', '.join(sorted(ALLOWED_NETWORKS))}.",
        )
    for key, value in node.items():
        if key == "_target_" or key == "_desc_":
            continue
        if key.startswith("_"):
            raise _refuse(bundle, f"{where}.{key} is a ConfigParser directive; it is not supported.", "Remove it.")
        _check_literal(value, f"{where}.{key}", bundle)


def _check_literal(value: Any, where: str, bundle: str) -> None:
    if isinstance(value, Mapping):
        if "_target_" in value:
            _check_network(value, where, bundle)
            return
        for key, item in value.items():
            _check_literal(item, f"{where}.{key}", bundle)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_literal(item, f"{where}[{index}]", bundle)
    elif not (value is None or isinstance(value, str | int | float | bool)):
        raise _refuse(bundle, f"{where} is not a literal.", "Use JSON numbers, strings, lists or objects.")


def _network_path(target: str) -> str | None:
    return ALLOWED_NETWORKS.get(target) or ALLOWED_NETWORKS.get(f"monai.networks.nets.{target}")


@dataclass(frozen=True)
class BundleInputs:
    """What the input guard accepts (upper-case DICOM values); empty body parts/views accept any value."""

    modalities: tuple[str, ...]
    body_parts: tuple[str, ...] = ()
    view_positions: tuple[str, ...] = ()


@dataclass(frozen=True)
class BundlePreprocessing:
    """Literal preprocessing. ``percentile-map`` first scales to [0, 1] (min-max), then maps the image's
    ``percentiles`` linearly onto ``targets`` and clips to ``clip`` (puts any DICOM window on the training
    images' intensity scale)."""

    crop: Literal["centre-square", "none"]
    spatial_size: tuple[int, int]
    intensity: Literal["min-max", "standardise", "percentile-map", "none"]
    resample: Literal["bilinear", "medmnist"] = "bilinear"
    percentiles: tuple[float, float] = (1.0, 99.0)
    targets: tuple[float, float] = (0.0, 1.0)
    clip: tuple[float, float] = (0.0, 1.0)


@dataclass(frozen=True)
class BundleSpec:
    """A verified, parsed bundle: everything needed to build the analyzer, read without torch."""

    root: Path
    pins: Mapping[str, str]
    card: ModelCard
    network_def: Mapping[str, Any]
    inputs: BundleInputs
    preprocessing: BundlePreprocessing
    tta_shifts: int
    activation: Literal["sigmoid", "softmax"]
    class_names: tuple[str, ...]
    positive_class: str
    threshold: float
    threshold_rule: str
    gradcam_layer: str | None

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def version(self) -> str:
        return self.card.version

    @property
    def title(self) -> str:
        return self.card.title


def _field(section: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str, bundle: str) -> Any:
    if key not in section:
        raise _refuse(bundle, f"{INFERENCE} has no {where}.{key}.", "Add it (see models/bundle.py).")
    value = section[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise _refuse(bundle, f"{INFERENCE} {where}.{key} has the wrong type ({type(value).__name__}).", "Fix it.")
    return value


def _section(config: Mapping[str, Any], key: str, allowed: tuple[str, ...], bundle: str) -> Mapping[str, Any]:
    section = config.get(key, {})
    if not isinstance(section, Mapping):
        raise _refuse(bundle, f"{INFERENCE} {key} must be an object.", "Fix it.")
    for name in section:
        if name not in allowed:
            raise _refuse(
                bundle,
                f"{INFERENCE} {key}.{name} is not a supported field.{did_you_mean(name, allowed)}",
                f"Allowed: {', '.join(allowed)}.",
            )
    return section


def parse_inference(config: Any, card: ModelCard, root: Path, pins: Mapping[str, str]) -> BundleSpec:
    """Turn the declarative inference.json into a :class:`BundleSpec`, refusing anything outside the subset."""
    bundle = root.name
    if not isinstance(config, Mapping):
        raise _refuse(bundle, f"{INFERENCE} must be a JSON object.", "Fix it.")
    refuse_expressions(config, "inference.json", bundle, anywhere=True)
    for key in config:
        if key not in _INFERENCE_KEYS:
            raise _refuse(
                bundle,
                f"{INFERENCE} key {key!r} is outside the declarative subset this project accepts."
                f"{did_you_mean(str(key), _INFERENCE_KEYS)}",
                f"Keep only {', '.join(_INFERENCE_KEYS)}; loaders, inferers and handlers are the project's own.",
            )
    _check_network(config.get("network_def"), "network_def", bundle)

    inputs = _section(config, "inputs", ("modalities", "body_parts", "view_positions"), bundle)
    modalities = _field(inputs, "modalities", list, "inputs", bundle)
    if not modalities:
        raise _refuse(bundle, "inputs.modalities is empty.", "List the DICOM modalities, e.g. ['CR', 'DX'].")

    prep = _section(
        config, "preprocessing", ("crop", "spatial_size", "resample", "intensity", "percentile_map"), bundle
    )
    size = _field(prep, "spatial_size", list, "preprocessing", bundle)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= 4096 for s in size):
        raise _refuse(bundle, "preprocessing.spatial_size must be two positive integers.", "E.g. [224, 224].")
    crop = prep.get("crop", "none")
    intensity = prep.get("intensity", "none")
    resample = prep.get("resample", "bilinear")
    medmnist_shape = crop == "centre-square" and size[0] == size[1]
    if resample not in ("bilinear", "medmnist") or (resample == "medmnist" and not medmnist_shape):
        raise _refuse(
            bundle,
            "preprocessing.resample must be 'bilinear' or 'medmnist' (the MedMNIST recipe: crop 'centre-square' "
            "to a square spatial_size).",
            "Use one of the supported values.",
        )
    if crop not in ("centre-square", "none") or intensity not in ("min-max", "standardise", "percentile-map", "none"):
        raise _refuse(
            bundle,
            "preprocessing.crop must be 'centre-square' or 'none'; intensity 'min-max', 'standardise', "
            "'percentile-map' or 'none'.",
            "Use one of the supported values.",
        )
    mapping = _section(prep, "percentile_map", ("percentiles", "targets", "clip"), bundle)
    pairs: dict[str, tuple[float, float]] = {}
    for key in ("percentiles", "targets", "clip"):
        pair = mapping.get(key, [1.0, 99.0] if key == "percentiles" else [0.0, 1.0])
        if not (
            isinstance(pair, list)
            and len(pair) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in pair)
            and pair[0] < pair[1]
        ):
            raise _refuse(bundle, f"preprocessing.percentile_map.{key} must be two increasing numbers.", "Fix it.")
        pairs[key] = (float(pair[0]), float(pair[1]))

    inference = _section(config, "inference", ("test_time_translation_pixels",), bundle)
    shifts = inference.get("test_time_translation_pixels", 0)
    if not isinstance(shifts, int) or isinstance(shifts, bool) or not 0 <= shifts <= 8:
        raise _refuse(bundle, "inference.test_time_translation_pixels must be an integer 0-8.", "Fix it.")

    post = _section(
        config, "postprocessing", ("activation", "class_names", "positive_class", "threshold", "threshold_rule"), bundle
    )
    activation = _field(post, "activation", str, "postprocessing", bundle)
    class_names = tuple(str(c) for c in _field(post, "class_names", list, "postprocessing", bundle))
    positive = _field(post, "positive_class", str, "postprocessing", bundle)
    threshold = float(_field(post, "threshold", (int, float), "postprocessing", bundle))
    if activation not in ("sigmoid", "softmax"):
        raise _refuse(bundle, f"postprocessing.activation {activation!r} is not supported.", "Use sigmoid/softmax.")
    if positive not in class_names or (activation == "sigmoid" and class_names.index(positive) != 1):
        raise _refuse(
            bundle,
            f"postprocessing.positive_class {positive!r} must be one of class_names "
            "(for sigmoid: class_names = [negative, positive], the single output is the positive logit).",
            "Fix class_names or positive_class.",
        )
    if not 0.0 < threshold < 1.0:
        raise _refuse(bundle, f"postprocessing.threshold {threshold} is not a probability in (0, 1).", "Fix it.")
    if probability_percent(threshold) <= 0.0:  # calls are made on probabilities as filed, to 0.1 %
        raise _refuse(
            bundle,
            f"postprocessing.threshold {threshold} is 0.0 % at the 0.1 % precision probabilities are filed and "
            "called at, so every case would be called positive.",
            "Give a threshold of at least 0.001.",
        )

    explanation = _section(config, "explanation", ("method", "target_layer"), bundle)
    layer = explanation.get("target_layer")
    if explanation and (explanation.get("method") != "gradcam" or not isinstance(layer, str)):
        raise _refuse(bundle, "explanation must be {'method': 'gradcam', 'target_layer': '<module name>'}.", "Fix it.")

    return BundleSpec(
        root=root,
        pins=dict(pins),
        card=card,
        network_def=config["network_def"],
        inputs=BundleInputs(
            modalities=tuple(str(m).upper() for m in modalities),
            body_parts=tuple(str(b).upper() for b in inputs.get("body_parts", [])),
            view_positions=tuple(str(v).upper() for v in inputs.get("view_positions", [])),
        ),
        preprocessing=BundlePreprocessing(
            crop=crop, spatial_size=(size[0], size[1]), intensity=intensity, resample=resample, **pairs
        ),
        tta_shifts=shifts,
        activation=activation,
        class_names=class_names,
        positive_class=positive,
        threshold=threshold,
        threshold_rule=str(post.get("threshold_rule", "set by the bundle's author")),
        gradcam_layer=layer if isinstance(layer, str) else None,
    )


def read_bundle(root: Path, sha256_pins: Mapping[str, str]) -> BundleSpec:
    """Verify the pins, then parse metadata, card and inference config; never imports torch or evaluates."""
    root = Path(root)
    verify_pins(root, sha256_pins)
    bundle = root.name
    metadata = _read_json(root, METADATA)
    if not isinstance(metadata, Mapping):
        raise _refuse(bundle, f"{METADATA} must be a JSON object.", "Fix it.")
    refuse_expressions(metadata, "metadata.json", bundle, anywhere=False)
    card_data = _read_json(root, CARD)
    card = card_from_dict(card_data, source=f"Model card of MONAI bundle {bundle}")
    if str(metadata.get("version")) != card.version:
        raise _refuse(
            bundle,
            f"metadata.json version {metadata.get('version')!r} differs from the model card's {card.version!r}.",
            "The card must describe this version of the bundle; update one of them after review.",
        )
    if card.weights is None or card.weights.file != WEIGHTS or card.weights.sha256 != sha256_pins.get(WEIGHTS):
        raise _refuse(
            bundle,
            f"the model card's weights must name {WEIGHTS} with the same SHA-256 as its pin.",
            "Regenerate the card together with the weights (python -m models.package_bundle).",
        )
    return parse_inference(_read_json(root, INFERENCE), card, root, sha256_pins)


# ---------------------------------------------------------------------------------------------------------------
# The analyzer: torch and MONAI are imported only here, when a bundle is actually built.


def _instantiate(node: Any) -> Any:
    """Build an already-checked component tree: nested ``_target_`` dicts become objects, lists stay lists."""
    if isinstance(node, Mapping):
        if "_target_" in node:
            module_name, _, attribute = str(_network_path(str(node["_target_"]))).partition(":")
            factory: Callable[..., Any] = getattr(importlib.import_module(module_name), attribute)
            kwargs = {k: _instantiate(v) for k, v in node.items() if k not in ("_target_", "_desc_")}
            if attribute == "NetworkConfig" and isinstance(kwargs.get("channels"), list):
                kwargs["channels"] = tuple(kwargs["channels"])
            return factory(**kwargs)
        return {k: _instantiate(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_instantiate(v) for v in node]
    return node


def prepare_image(array: np.ndarray, preprocessing: BundlePreprocessing) -> np.ndarray:
    """Crop, resize (anti-aliased when shrinking, bilinear) and normalise intensity, as the bundle declares."""
    import numpy as np

    from models.medmnist import centre_square, medmnist_input

    image = np.asarray(array, dtype=np.float32)
    if preprocessing.resample == "medmnist":
        small = medmnist_input(image, preprocessing.spatial_size[0])
    else:
        from skimage.transform import resize

        if preprocessing.crop == "centre-square":
            top, left, side = centre_square(*image.shape)
            image = image[top : top + side, left : left + side]
        shrink = any(s > t for s, t in zip(image.shape, preprocessing.spatial_size, strict=True))
        small = resize(image, preprocessing.spatial_size, order=1, anti_aliasing=shrink, preserve_range=True)
    if preprocessing.intensity in ("min-max", "percentile-map"):
        low, high = float(small.min()), float(small.max())
        small = ((small - low) / (high - low if high > low else 1.0)).astype(np.float32)
    if preprocessing.intensity == "percentile-map":
        low, high = np.percentile(small, preprocessing.percentiles)
        target_low, target_high = preprocessing.targets
        scale = (target_high - target_low) / (high - low) if high > low else 1.0
        small = np.clip(target_low + (small - low) * scale, *preprocessing.clip)
    elif preprocessing.intensity == "standardise":
        small = (small - small.mean()) / max(float(small.std()), 1e-6)
    return np.asarray(small, dtype=np.float32)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


class BundleAnalyzer:
    """A 2-D image classifier from a verified bundle, with the project's input guard and result shape."""

    def __init__(self, spec: BundleSpec) -> None:
        import torch

        from models.weights_io import load_checked

        verify_pins(spec.root, spec.pins)  # re-checked at every build: a file swapped since registration is refused
        self.spec = spec
        self.name = spec.name
        self.version = spec.version
        self.title = spec.title
        self.requirements = SeriesRequirements(modalities=spec.inputs.modalities, body_parts=spec.inputs.body_parts)
        self.threshold = spec.threshold
        self.model_sha256 = spec.pins[WEIGHTS]
        network = _instantiate(spec.network_def)
        if not isinstance(network, torch.nn.Module):
            raise _refuse(spec.root.name, "network_def does not build a torch module.", "Fix network_def.")
        state = load_checked(spec.root / WEIGHTS, self.model_sha256)
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first_line = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else "shape mismatch"
            raise _refuse(
                spec.root.name,
                f"{WEIGHTS} does not fit network_def ({first_line[:200]}).",
                "Package the weights with the network definition they were trained with.",
            ) from None
        network.eval()
        self._network = network

    def check_input(self, image: ImageInput) -> None:
        from models.projection_classifier import check_projection_image, matches

        inputs = self.spec.inputs
        modality = image.modality.upper()
        if modality not in inputs.modalities:
            raise UnsuitableInputError(
                f"{self.name} reads {'/'.join(inputs.modalities)} images; this image is modality "
                f"{modality or 'unknown'}.",
                remedy=f"Choose a series of modality {' or '.join(inputs.modalities)}.",
            )
        for attribute, accepted in (("BodyPartExamined", inputs.body_parts), ("ViewPosition", inputs.view_positions)):
            value = image.attributes.get(attribute)
            if accepted and value and value.strip() and not matches(value, accepted):
                raise UnsuitableInputError(
                    f"{self.name} accepts {attribute} {', '.join(accepted)}; this image has {value.strip()}.",
                    remedy="Choose an image the bundle's model card lists under inputs accepted.",
                )
        check_projection_image(image, self.name)

    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Network output averaged over +/- ``tta_shifts`` pixel translations with replicated edges."""
        import torch

        shifts = self.spec.tta_shifts
        if shifts == 0:
            return self._network(batch)
        padded = torch.nn.functional.pad(batch, (shifts, shifts, shifts, shifts), mode="replicate")
        rows, columns = batch.shape[-2:]
        outputs = [
            self._network(padded[..., shifts + dy : shifts + dy + rows, shifts + dx : shifts + dx + columns])
            for dy in (-shifts, 0, shifts)
            for dx in (-shifts, 0, shifts)
        ]
        return torch.stack(outputs, dim=0).mean(dim=0)

    def probabilities(self, prepared: np.ndarray) -> np.ndarray:
        """Probability of the positive class for a ``(N, H, W)`` stack already passed through prepare_image."""
        import numpy as np
        import torch

        batch = torch.from_numpy(np.ascontiguousarray(prepared, dtype=np.float32))[:, None]
        with torch.no_grad():
            logits = self._logits(batch)
            if self.spec.activation == "sigmoid":
                probability = torch.sigmoid(logits)[:, 0]
            else:
                probability = torch.softmax(logits, dim=1)[:, self.spec.class_names.index(self.spec.positive_class)]
        return np.asarray(probability.numpy(), dtype=np.float64).reshape(-1)

    def _gradcam_png(self, image: ImageInput, prepared: np.ndarray, caption: str) -> bytes | None:
        if self.spec.gradcam_layer is None or self.spec.preprocessing.crop != "centre-square":
            return None
        import numpy as np
        import torch

        from models.networks import grad_cam
        from models.projection_classifier import gradcam_overlay_png

        index = 0 if self.spec.activation == "sigmoid" else self.spec.class_names.index(self.spec.positive_class)
        batch = torch.from_numpy(np.ascontiguousarray(prepared, dtype=np.float32))[None, None]
        heat = grad_cam(self._network, self.spec.gradcam_layer, batch, index)
        return gradcam_overlay_png(image.array, heat, caption)

    def analyze(self, image: ImageInput) -> AnalysisResult:
        prepared = prepare_image(image.array, self.spec.preprocessing)
        probability = float(self.probabilities(prepared[None])[0])
        positive = self.spec.positive_class
        slug = _slug(positive)
        percent, threshold_percent = probability_percent(probability), probability_percent(self.threshold)
        suspected = at_or_above_threshold(probability, self.threshold)  # on the values as filed and read
        category = Category(
            code=f"{slug.replace('_', '-')}-suspected" if suspected else f"{slug.replace('_', '-')}-not-suspected",
            display=f"{positive.capitalize()} suspected" if suspected else f"{positive.capitalize()} not suspected",
            rule=f"Model probability >= {threshold_percent:.1f} % (MONAI bundle {self.name} {self.version}: "
            f"{self.spec.threshold_rule})",
            abnormal=suspected,
        )
        measurement = Measurement(
            key=f"{slug}_probability",
            display=f"Model probability of {positive}",
            value=percent,
            unit="%",
            interpretation="A" if suspected else "N",
            reference_high=highest_normal(threshold_percent, 1),
            note="Reference high = the highest probability called negative, one 0.1 % step below the bundle's "
            "operating threshold; see its model card for calibration and limits.",
        )
        caption = (
            f"Grad-CAM: regions that raised the {positive} score ({percent:.1f} %, threshold "
            f"{threshold_percent:.1f} %).\nBrighter = more influence."
        )
        png = self._gradcam_png(image, prepared, caption)
        explanations = (
            (Explanation(title=f"Grad-CAM heatmap of the {positive} score", kind="heatmap", png=png),)
            if png is not None
            else ()
        )
        warnings = [
            f"Result of an admin-installed MONAI bundle ({self.name} {self.version}, status {self.spec.card.status}); "
            "read its model card for what it was validated on and its limits."
        ]
        for attribute in ("BodyPartExamined", "ViewPosition"):
            accepted = (
                self.spec.inputs.body_parts if attribute == "BodyPartExamined" else self.spec.inputs.view_positions
            )
            if accepted and not image.attributes.get(attribute):
                warnings.append(f"{attribute} is not recorded; the model assumes {' or '.join(accepted)}.")
        return AnalysisResult(
            analyzer=self.name,
            version=self.version,
            measurements=(measurement,),
            category=category,
            conclusion=f"{category.display}: model probability {percent:.1f} % (operating threshold "
            f"{threshold_percent:.1f} %). Decision support only; confirm on the image.",
            explanations=explanations,
            probability=probability,
            warnings=tuple(warnings),
        )

"""Find an analyzer by name, with its model card, its weights checked, and admin-installed MONAI bundles.

Analyzer modules are imported lazily, and cards and bundle configurations are plain JSON, so importing the
registry, listing analyzers and reading cards (as the CDS Hooks service and the web front door do) never
pulls in torch. Building an analyzer is strict: it needs a valid card, and when the card pins weights, the
file's SHA-256 must equal the pin, or the analyzer refuses to run.

Bundles are registered by the administrator only: in code with :func:`register_bundle`, or in the JSON file
named by ``IMAGING_CDS_BUNDLES``::

    {"bundles": [{"path": "/opt/imaging-cds/bundles/my-bundle",
                  "sha256": {"configs/metadata.json": "...", "configs/inference.json": "...",
                             "configs/model_card.json": "...", "models/model.pt": "..."}}]}

Relative paths are relative to that file. Nothing a request carries can name a bundle path or a config.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigurationError
from core.options import did_you_mean
from models.base import Analyzer
from models.bundle import BundleSpec, read_bundle
from models.cards import REPO_ROOT, ModelCard, load_card

BUNDLES_ENV = "IMAGING_CDS_BUNDLES"

# name -> "module:factory"; the factory takes no arguments and returns an Analyzer.
_BUILTIN: dict[str, str] = {
    "ct-emphysema": "models.emphysema:EmphysemaAnalyzer",
    "ct-bone": "models.bone:BoneAnalyzer",
    "ct-heart": "models.heart:HeartAnalyzer",
    "cxr-pneumonia": "models.cxr_pneumonia:PneumoniaAnalyzer",
    "us-breast": "models.breast_us:BreastUltrasoundAnalyzer",
    "mr-hippocampus": "models.hippocampus:HippocampusAnalyzer",
    "ct-lung-nodules": "models.nodules.analyzer:LungNoduleAnalyzer",
}


def import_builtin_modules() -> None:
    """Import each built-in analyzer's module (torch, MONAI...), building nothing: a process that forks workers
    does it once, so that each worker starts with the code already in memory."""
    for target in _BUILTIN.values():
        importlib.import_module(target.partition(":")[0])


_REGISTERED_BUNDLES: dict[str, BundleSpec] = {}
_configured: tuple[tuple[str, int], dict[str, BundleSpec]] | None = None


@dataclass(frozen=True)
class RegisteredAnalyzer:
    """One line of the analyzer list, read from the card alone (no model loaded)."""

    name: str
    version: str
    title: str
    status: str
    kind: str  # "built-in" or "MONAI bundle"
    problem: str | None = None  # why the card is unusable (only in a non-strict listing)


def register_bundle(path: Path | str, *, sha256_pins: Mapping[str, str]) -> str:
    """Register an admin-installed MONAI bundle directory as an analyzer; returns its name.

    Every required file and every file under ``configs/`` and ``models/`` must be pinned and match; the
    inference config must stay inside the declarative subset of :mod:`models.bundle`. The name comes from
    the bundle's model card and may not shadow a built-in analyzer.
    """
    spec = read_bundle(Path(path), sha256_pins)
    if spec.name in _BUILTIN:
        raise ConfigurationError(
            f"MONAI bundle {Path(path).name} is named {spec.name!r}, the name of a built-in analyzer.",
            remedy="Give the bundle's model card a name of its own.",
        )
    _REGISTERED_BUNDLES[spec.name] = spec
    return spec.name


def unregister_bundle(name: str) -> None:
    """Forget a bundle registered with :func:`register_bundle` (no error when it was not registered)."""
    _REGISTERED_BUNDLES.pop(name, None)


def load_bundles_config(config_path: Path) -> dict[str, BundleSpec]:
    """Read and verify every bundle listed in an admin bundles file (see the module docstring)."""
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigurationError(
            f"The bundles file {config_path} named by {BUNDLES_ENV} does not exist.",
            remedy=f"Fix {BUNDLES_ENV} or unset it.",
        ) from None
    except json.JSONDecodeError as exc:
        raise ConfigurationError(
            f"The bundles file {config_path.name} is not valid JSON (line {exc.lineno}).", remedy="Fix its syntax."
        ) from None
    entries = data.get("bundles") if isinstance(data, Mapping) else None
    if not isinstance(entries, list):
        raise ConfigurationError(
            f"The bundles file {config_path.name} must be an object with a 'bundles' list.",
            remedy='Write {"bundles": [{"path": "...", "sha256": {"<file>": "<sha256>", ...}}]}.',
        )
    specs: dict[str, BundleSpec] = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("path"), str):
            raise ConfigurationError(
                f"{config_path.name} bundles[{index}] needs a 'path' and a 'sha256' object.", remedy="Add them."
            )
        pins = entry.get("sha256")
        if not isinstance(pins, Mapping):
            raise ConfigurationError(
                f"{config_path.name} bundles[{index}] has no 'sha256' pins; unpinned bundles are refused.",
                remedy="Pin every file of configs/ and models/ by its SHA-256.",
            )
        root = Path(entry["path"])
        spec = read_bundle(root if root.is_absolute() else config_path.parent / root, pins)
        if spec.name in _BUILTIN:
            raise ConfigurationError(
                f"{config_path.name} bundles[{index}] is named {spec.name!r}, the name of a built-in analyzer.",
                remedy="Give the bundle's model card a name of its own.",
            )
        specs[spec.name] = spec
    return specs


def _configured_bundles() -> dict[str, BundleSpec]:
    """Bundles from ``IMAGING_CDS_BUNDLES`` (re-read when the file changes)."""
    global _configured
    location = os.environ.get(BUNDLES_ENV, "").strip()
    if not location:
        return {}
    path = Path(location)
    try:
        key = (str(path.resolve()), path.stat().st_mtime_ns)
    except FileNotFoundError:
        key = (str(path), -1)
    if _configured is None or _configured[0] != key:
        _configured = (key, load_bundles_config(path))
    return _configured[1]


def _bundles() -> dict[str, BundleSpec]:
    return {**_configured_bundles(), **_REGISTERED_BUNDLES}


def analyzer_names() -> tuple[str, ...]:
    return tuple(sorted({*_BUILTIN, *_bundles()}))


def _unknown(name: str) -> ConfigurationError:
    names = analyzer_names()
    return ConfigurationError(
        f"Unknown analyzer {name!r}.{did_you_mean(name, names)}", remedy=f"Available analyzers: {', '.join(names)}."
    )


def get_card(name: str) -> ModelCard:
    """The validated model card of analyzer ``name`` (built-in or bundle); never imports torch."""
    if name in _BUILTIN:
        return load_card(name)
    bundle = _bundles().get(name)
    if bundle is None:
        raise _unknown(name)
    return bundle.card


def registered_analyzers(*, strict: bool = True) -> list[RegisteredAnalyzer]:
    """Name, version, title and status of every analyzer, from the cards alone (no model is loaded).

    ``strict`` raises on the first invalid card; otherwise the analyzer is listed with status
    ``"card invalid"`` and the reason in ``problem``, so an index page can show what needs fixing.
    """
    rows = []
    bundles = _bundles()
    for name in analyzer_names():
        try:
            card = get_card(name)
        except ConfigurationError as exc:
            if strict:
                raise
            rows.append(RegisteredAnalyzer(name, "", name, "card invalid", _kind(name, bundles), exc.message))
            continue
        rows.append(RegisteredAnalyzer(card.name, card.version, card.title, card.status, _kind(name, bundles)))
    return rows


def _kind(name: str, bundles: Mapping[str, BundleSpec]) -> str:
    return "MONAI bundle" if name in bundles and name not in _BUILTIN else "built-in"


def check_card_weights(card: ModelCard) -> None:
    """Refuse to build an analyzer whose weights file differs from the SHA-256 its card publishes."""
    if card.weights is None:
        return
    from models.weights_io import sha256_of_file

    path = REPO_ROOT / card.weights.file
    if not path.is_file():
        raise ConfigurationError(
            f"Analyzer {card.name}: weights file {card.weights.file} named by its model card does not exist.",
            remedy="Reinstall the shipped weights or retrain the model.",
        )
    actual = sha256_of_file(path)
    if actual != card.weights.sha256:
        raise ConfigurationError(
            f"Analyzer {card.name}: weights file {card.weights.file} failed its integrity check: expected SHA-256 "
            f"{card.weights.sha256} (model card), got {actual}.",
            remedy="The weights were modified or replaced, or the card is stale; reinstall the reviewed weights, "
            "or retrain and update the card together. The analyzer will not run until they agree.",
        )


def get_analyzer(name: str) -> Analyzer:
    """Build the analyzer called ``name``; an unknown name fails with a "did you mean" hint.

    Needs a valid model card; weights are checked against the card's SHA-256 (built-ins) or the admin's pins
    (bundles) before the model is loaded, and the card must describe the version that was built.
    """
    analyzer: Analyzer
    if name in _BUILTIN:
        card = load_card(name)
        check_card_weights(card)
        module_name, _, factory_name = _BUILTIN[name].partition(":")
        factory = getattr(importlib.import_module(module_name), factory_name)
        analyzer = factory()
        loaded_sha256 = getattr(analyzer, "model_sha256", None)
        if card.weights is not None and loaded_sha256 not in (None, card.weights.sha256):
            raise ConfigurationError(
                f"Analyzer {name} loaded weights with SHA-256 {loaded_sha256}, but its card publishes "
                f"{card.weights.sha256}.",
                remedy="Make the card's weights entry name the file the analyzer loads.",
            )
    else:
        bundle = _bundles().get(name)
        if bundle is None:
            raise _unknown(name)
        from models.bundle import BundleAnalyzer

        card = bundle.card
        analyzer = BundleAnalyzer(bundle)
    if (analyzer.name, analyzer.version) != (card.name, card.version):
        raise ConfigurationError(
            f"Analyzer {name} is version {analyzer.version}, but its model card describes {card.name} {card.version}.",
            remedy="Update the card for this version (validation figures included) before the analyzer is used.",
        )
    return analyzer

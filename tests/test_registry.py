"""The analyzer registry: names, cards, weight pins, admin-registered bundles, and no torch on the way."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_support import TINY_NAME, make_tiny_bundle, tiny_card

from core.errors import ConfigurationError
from models.base import Analyzer
from models.bundle import BundleAnalyzer
from models.cards import card_from_dict
from models.registry import (
    BUNDLES_ENV,
    analyzer_names,
    check_card_weights,
    get_analyzer,
    get_card,
    register_bundle,
    registered_analyzers,
    unregister_bundle,
)


def test_listing_analyzers_and_reading_cards_never_imports_torch(tmp_path: Path) -> None:
    """The CDS Hooks service and the card pages rely on this: they must start without loading torch."""
    code = (
        "import sys, models.registry as r, service.model_cards;"
        "rows = r.registered_analyzers(strict=False); names = r.analyzer_names();"
        "assert 'cxr-pneumonia' in names and 'cxr-tiny' in names, names;"
        "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))"
    )
    root = tmp_path / "tiny"
    pins = make_tiny_bundle(root)
    config = tmp_path / "bundles.json"
    config.write_text(json.dumps({"bundles": [{"path": "tiny", "sha256": pins}]}))
    env = {"PATH": "/usr/bin:/bin", BUNDLES_ENV: str(config)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


def test_an_unknown_name_fails_with_did_you_mean() -> None:
    with pytest.raises(ConfigurationError, match=r"Unknown analyzer 'cxr-pneumona'\. Did you mean 'cxr-pneumonia'\?"):
        get_analyzer("cxr-pneumona")
    with pytest.raises(ConfigurationError, match="Available analyzers: ct-bone, ct-emphysema"):
        get_card("mri-brain")


def test_weights_that_differ_from_the_card_pin_refuse_to_run(tmp_path: Path) -> None:
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"weights that were swapped after validation")
    data = tiny_card()
    data["weights"] = {"file": str(weights), "sha256": "0" * 64}
    with pytest.raises(ConfigurationError) as caught:
        check_card_weights(card_from_dict(data))
    message = str(caught.value)
    assert f"weights file {weights} failed its integrity check" in message
    assert f"expected SHA-256 {'0' * 64} (model card)" in message
    assert f"got {hashlib.sha256(weights.read_bytes()).hexdigest()}" in message
    assert "The analyzer will not run until they agree" in message


def test_a_registered_bundle_is_listed_from_its_card_and_builds(tmp_path: Path) -> None:
    root = tmp_path / "tiny"
    name = register_bundle(root, sha256_pins=make_tiny_bundle(root))
    try:
        assert name == TINY_NAME and TINY_NAME in analyzer_names()
        row = next(r for r in registered_analyzers(strict=False) if r.name == TINY_NAME)
        assert (row.version, row.status, row.kind) == ("0.1.0", "experimental", "MONAI bundle")
        analyzer = get_analyzer(TINY_NAME)
        assert isinstance(analyzer, BundleAnalyzer) and isinstance(analyzer, Analyzer)
        assert analyzer.requirements.modalities == ("CR", "DX")
    finally:
        unregister_bundle(name)
    assert TINY_NAME not in analyzer_names()


def test_bundles_come_from_the_admin_file_named_by_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pins = make_tiny_bundle(tmp_path / "tiny")
    config = tmp_path / "bundles.json"
    config.write_text(json.dumps({"bundles": [{"path": "tiny", "sha256": pins}]}))
    monkeypatch.setenv(BUNDLES_ENV, str(config))
    assert TINY_NAME in analyzer_names()
    assert get_card(TINY_NAME).title.startswith("Tiny demonstration")
    config.write_text(json.dumps({"bundles": [{"path": "tiny"}]}))
    with pytest.raises(ConfigurationError, match=r"bundles\[0\] has no 'sha256' pins; unpinned bundles are refused"):
        analyzer_names()
    monkeypatch.setenv(BUNDLES_ENV, str(tmp_path / "missing.json"))
    with pytest.raises(ConfigurationError, match="does not exist"):
        analyzer_names()


def test_a_bundle_may_not_take_the_name_of_a_built_in_analyzer(tmp_path: Path) -> None:
    root = tmp_path / "impostor"
    pins = make_tiny_bundle(root, name="cxr-pneumonia")
    with pytest.raises(ConfigurationError, match="named 'cxr-pneumonia', the name of a built-in analyzer"):
        register_bundle(root, sha256_pins=pins)

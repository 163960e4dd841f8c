"""MONAI bundle analyzers: the project's own pneumonia model as a bundle gives the built-in analyzer's
probabilities on real PneumoniaMNIST test images, and tampered, unpinned or executable bundles are refused."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from bundle_support import make_tiny_bundle, tiny_inference

from core.errors import ConfigurationError, UnsuitableInputError
from devtools.evaluate import benchmark_input
from models.base import ImageInput, at_or_above_threshold
from models.bundle import BundleAnalyzer, read_bundle
from models.cxr_pneumonia import PneumoniaAnalyzer
from models.registry import get_analyzer, register_bundle, unregister_bundle
from models.weights_io import sha256_of_file

BUNDLES = Path(__file__).resolve().parents[1] / "models" / "bundles"
SHIPPED = BUNDLES / "cxr-pneumonia-bundle"


def shipped_pins() -> dict[str, str]:
    registration = json.loads((BUNDLES / "bundles.json").read_text())
    entry = next(b for b in registration["bundles"] if b["path"] == SHIPPED.name)
    return dict(entry["sha256"])


@pytest.fixture()
def bundle_copy(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A private copy of the shipped bundle to tamper with, and its pins."""
    root = tmp_path / SHIPPED.name
    shutil.copytree(SHIPPED, root)
    return root, shipped_pins()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One study at a time runs far faster single-threaded on a small shared CPU (see devtools.evaluate)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pneumonia_bundle() -> Iterator[BundleAnalyzer]:
    name = register_bundle(SHIPPED, sha256_pins=shipped_pins())
    analyzer = get_analyzer(name)
    assert isinstance(analyzer, BundleAnalyzer)
    yield analyzer
    unregister_bundle(name)


def pneumonia_test_cases(every: int) -> tuple[np.ndarray, np.ndarray]:
    data_file = Path(__file__).parent / "data" / "medmnist" / "pneumoniamnist_28_reconstructed.npz"
    with np.load(data_file) as data:
        return data["test_images"][::every], data["test_labels"].reshape(-1)[::every]


def rewrite_json(root: Path, name: str, pins: dict[str, str], change: Any) -> dict[str, str]:
    """Edit a config file and re-pin it, as a careless admin would: the refusal must come from the content."""
    path = root / name
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return {**pins, name: sha256_of_file(path)}


def test_the_bundle_gives_the_built_in_analyzers_probabilities_on_real_test_images(
    pneumonia_bundle: BundleAnalyzer,
) -> None:
    built_in = get_analyzer("cxr-pneumonia")
    assert isinstance(built_in, PneumoniaAnalyzer)
    images, labels = pneumonia_test_cases(every=6)  # 104 of the 624 official test images, both classes
    assert 0 < labels.sum() < labels.size
    bundle_probabilities, built_in_probabilities = [], []
    for image in images:
        case = benchmark_input(image, built_in)
        for analyzer, sink in ((pneumonia_bundle, bundle_probabilities), (built_in, built_in_probabilities)):
            analyzer.check_input(case)
            sink.append(analyzer.analyze(case).probability)
    # the bundle runs torch, the built-in analyzer numpy (models.shipped): the same function to float rounding
    np.testing.assert_allclose(bundle_probabilities, built_in_probabilities, rtol=0, atol=1e-5)
    assert pneumonia_bundle.threshold == pytest.approx(built_in.threshold)
    # Same calls as well as same numbers: a clinician sees the same category from either.
    calls = [at_or_above_threshold(p, pneumonia_bundle.threshold) for p in bundle_probabilities]
    assert calls == [at_or_above_threshold(p, built_in.threshold) for p in built_in_probabilities]


def test_the_bundle_result_reads_like_the_built_in_one(pneumonia_bundle: BundleAnalyzer) -> None:
    images, _ = pneumonia_test_cases(every=50)
    result = pneumonia_bundle.analyze(benchmark_input(images[0], pneumonia_bundle))
    measurement = result.measurement("pneumonia_probability")
    assert measurement.unit == "%" and measurement.value == pytest.approx(100 * result.probability, abs=0.05)
    assert result.category.code in ("pneumonia-suspected", "no-pneumonia-suspected")
    assert "MONAI bundle cxr-pneumonia-bundle" in result.category.rule
    assert result.explanations and result.explanations[0].png.startswith(b"\x89PNG")
    assert any("admin-installed MONAI bundle" in w for w in result.warnings)


def test_the_bundle_calls_on_the_probability_as_filed(
    pneumonia_bundle: BundleAnalyzer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Below the bundle's threshold 0.60531 but filed and read as 60.5 %, the threshold as filed: suspected."""
    monkeypatch.setattr(pneumonia_bundle, "threshold", 0.60531)
    monkeypatch.setattr(pneumonia_bundle, "probabilities", lambda batch: np.array([0.6046]))
    images, _ = pneumonia_test_cases(every=50)
    result = pneumonia_bundle.analyze(benchmark_input(images[0], pneumonia_bundle))
    value = result.measurement("pneumonia_probability")
    assert (value.value, value.reference_high, value.interpretation) == (60.5, 60.4, "A")
    assert result.category.code == "pneumonia-suspected" and result.category.abnormal
    assert "model probability 60.5 % (operating threshold 60.5 %)" in result.conclusion


def test_the_bundle_refuses_images_its_card_excludes(pneumonia_bundle: BundleAnalyzer) -> None:
    ct = ImageInput(np.zeros((128, 128), np.float32), (1.0, 1.0), "CT")
    with pytest.raises(UnsuitableInputError, match="reads CR/DX images; this image is modality CT"):
        pneumonia_bundle.check_input(ct)
    images, _ = pneumonia_test_cases(every=50)
    lateral = benchmark_input(images[0], pneumonia_bundle)
    lateral = ImageInput(lateral.array, lateral.spacing, "CR", {"ViewPosition": "LL"})
    with pytest.raises(UnsuitableInputError, match="accepts ViewPosition PA, AP; this image has LL"):
        pneumonia_bundle.check_input(lateral)


def test_a_tampered_weights_file_is_refused_naming_file_and_both_hashes(bundle_copy: tuple[Path, dict]) -> None:
    root, pins = bundle_copy
    weights = root / "models" / "model.pt"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    expected, actual = pins["models/model.pt"], sha256_of_file(weights)
    with pytest.raises(
        ConfigurationError,
        match=f"models/model.pt failed its integrity check: expected SHA-256 {expected}, got {actual}",
    ):
        register_bundle(root, sha256_pins=pins)


def test_a_file_swapped_after_registration_is_refused_when_the_analyzer_is_built(
    bundle_copy: tuple[Path, dict],
) -> None:
    root, pins = bundle_copy
    name = register_bundle(root, sha256_pins=pins)
    try:
        card = root / "configs" / "model_card.json"
        card.write_text(card.read_text().replace("experimental", "validated"))
        with pytest.raises(ConfigurationError, match=r"configs/model_card\.json failed its integrity check"):
            get_analyzer(name)
    finally:
        unregister_bundle(name)


def test_unpinned_bundles_and_unpinned_files_are_refused(bundle_copy: tuple[Path, dict]) -> None:
    root, pins = bundle_copy
    with pytest.raises(ConfigurationError, match=r"models/model\.pt is not pinned"):
        register_bundle(root, sha256_pins={k: v for k, v in pins.items() if k != "models/model.pt"})
    with pytest.raises(ConfigurationError, match=r"configs/metadata\.json is not pinned"):
        register_bundle(root, sha256_pins={})
    (root / "models" / "model_finetuned.pt").write_bytes(b"\x00" * 16)
    with pytest.raises(ConfigurationError, match=r"file models/model_finetuned\.pt is not pinned"):
        register_bundle(root, sha256_pins=pins)


def test_a_pin_that_escapes_the_bundle_directory_is_refused(bundle_copy: tuple[Path, dict]) -> None:
    root, pins = bundle_copy
    with pytest.raises(ConfigurationError, match=r"pinned path '\.\./bundles\.json' is not a plain path"):
        register_bundle(root, sha256_pins={**pins, "../bundles.json": "0" * 64})


@pytest.mark.parametrize(
    ("change", "refusal"),
    [
        (lambda c: c["postprocessing"].update(threshold="$__import__('os').system('id')"), r"contains '\$'"),
        (lambda c: c.update(network_def="@network"), r"network_def contains '@'"),
        (lambda c: c["network_def"].update(_target_="%configs/other.json#net"), r"contains '%'"),
        (lambda c: c.update(imports=["numpy"]), "key 'imports' is outside the declarative subset"),
        (lambda c: c["network_def"].update(_target_="torch.hub.load"), "'torch.hub.load' is not an allowed network"),
        (lambda c: c["network_def"].update(_requires_="x"), "_requires_ is a ConfigParser directive"),
        (lambda c: c["preprocessing"].update(spatial_sise=[28, 28]), "Did you mean 'spatial_size'"),
        (lambda c: c["postprocessing"].update(threshold=0.0004), r"threshold 0.0004 is 0.0 % at the 0.1 % precision"),
    ],
)
def test_expressions_references_and_unknown_code_in_the_config_are_refused(
    bundle_copy: tuple[Path, dict], change: Any, refusal: str
) -> None:
    root, pins = bundle_copy
    pins = rewrite_json(root, "configs/inference.json", pins, change)
    with pytest.raises(ConfigurationError, match=refusal):
        register_bundle(root, sha256_pins=pins)


def test_an_expression_in_the_metadata_is_refused(bundle_copy: tuple[Path, dict]) -> None:
    root, pins = bundle_copy
    pins = rewrite_json(root, "configs/metadata.json", pins, lambda m: m.update(version="$'1.0.0'"))
    with pytest.raises(ConfigurationError, match=r"metadata.json.version contains '\$'"):
        register_bundle(root, sha256_pins=pins)


def test_a_plain_monai_network_bundle_loads_and_a_wrong_state_dict_is_named(tmp_path: Path) -> None:
    pins = make_tiny_bundle(tmp_path / "tiny")
    spec = read_bundle(tmp_path / "tiny", pins)
    assert spec.network_def["_target_"] == "monai.networks.nets.Classifier"
    assert BundleAnalyzer(spec).name == "cxr-tiny"
    inference = tiny_inference()
    inference["network_def"]["channels"] = [4, 16]  # the weights were saved for [4, 8]
    pins = make_tiny_bundle(tmp_path / "mismatch", inference=inference)
    with pytest.raises(ConfigurationError, match=r"models/model\.pt does not fit network_def"):
        BundleAnalyzer(read_bundle(tmp_path / "mismatch", pins))

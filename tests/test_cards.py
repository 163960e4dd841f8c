"""Model cards: the schema a clinician can rely on, helpful refusals, and the HTML a Device link opens."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from core.errors import ConfigurationError
from models.cards import CARDS_DIR, RULE_BASED, card_from_dict, load_card, read_card_file, render_card_html

SHA = "ab" * 32


def rule_based_card() -> dict[str, Any]:
    """A complete card for a rule-based CT analyzer (the shape every shipped card must have)."""
    return {
        "name": "ct-demo",
        "version": "1.0.0",
        "title": "CT emphysema quantification (LAA-950)",
        "status": "experimental",
        "intended_use": "Quantify lung below -950 HU on inspiratory non-contrast adult chest CT.",
        "not_for": ["Diagnosing COPD on its own", "Expiratory CT"],
        "inputs_accepted": {"modality": "CT", "slice_thickness": "<= 1.5 mm validated"},
        "training_data": RULE_BASED,
        "method": {"threshold": "-950 HU"},
        "validation": {"summary": "Phantoms with known air fraction and two real chest CTs; no reference standard."},
        "limits": ["5 mm slices underestimate LAA-950."],
        "references": ["Gevenois PA et al. Am J Respir Crit Care Med 1996;154:187-192."],
    }


def trained_card() -> dict[str, Any]:
    card = rule_based_card()
    card.update(
        name="cxr-demo",
        training_data={
            "source": "Kermany et al., Cell 2018 (paediatric chest radiographs)",
            "licence": "CC BY 4.0",
            "citation": "Yang J et al. MedMNIST v2. Scientific Data 2023;10:41",
        },
        weights={"file": "models/weights/demo.pt", "sha256": SHA},
        validation={
            "summary": "PneumoniaMNIST official test split, read once after training.",
            "dataset": "PneumoniaMNIST test split (624 images)",
            "operating_threshold": 0.42,
            "figures": {
                "auc": {"value": 0.962, "ci95_low": 0.948, "ci95_high": 0.975},
                "sensitivity": {"value": 0.951, "ci95_low": 0.93, "ci95_high": 0.971},
            },
        },
    )
    return card


def test_a_complete_rule_based_card_loads_with_its_fields() -> None:
    card = card_from_dict(rule_based_card())
    assert card.rule_based and card.weights is None
    assert card.limits == ("5 mm slices underestimate LAA-950.",)
    assert card.figures == {}


def test_a_trained_card_exposes_its_figures_threshold_and_weights_pin() -> None:
    card = card_from_dict(trained_card())
    assert card.figures["auc"] == {"value": 0.962, "ci95_low": 0.948, "ci95_high": 0.975}
    assert card.operating_threshold == 0.42
    assert card.weights is not None and card.weights.sha256 == SHA
    assert card.as_dict()["weights"] == {"file": "models/weights/demo.pt", "sha256": SHA}


def test_misnamed_fields_are_refused_with_the_name_to_use() -> None:
    data = rule_based_card()
    data["known_limits"] = data.pop("limits")
    data["inputs"] = data.pop("inputs_accepted")
    del data["status"]
    with pytest.raises(ConfigurationError) as caught:
        card_from_dict(data, source="Model card ct-demo.json")
    message = str(caught.value)
    assert "Model card ct-demo.json is not a valid model card" in message
    assert "missing field 'limits' (rename 'known_limits' to 'limits')" in message
    assert "missing field 'inputs_accepted' (rename 'inputs' to 'inputs_accepted')" in message
    assert "missing field 'status' ('validated' or 'experimental')" in message


def test_a_trained_model_without_figures_and_confidence_intervals_is_refused() -> None:
    data = trained_card()
    del data["validation"]["figures"]
    with pytest.raises(ConfigurationError, match=r"missing field 'validation\.figures'"):
        card_from_dict(data)
    data = trained_card()
    del data["validation"]["figures"]["auc"]["ci95_low"]
    with pytest.raises(ConfigurationError, match=r"validation\.figures\.auc.*ci95_low"):
        card_from_dict(data)


def test_training_data_must_cite_source_and_licence_or_say_rule_based() -> None:
    data = trained_card()
    del data["training_data"]["licence"]
    with pytest.raises(ConfigurationError, match="'training_data' must be an object with source, licence, citation"):
        card_from_dict(data)


def test_a_malformed_weights_hash_is_refused() -> None:
    data = trained_card()
    data["weights"]["sha256"] = "not-a-hash"
    with pytest.raises(ConfigurationError, match=r"field 'weights\.sha256'"):
        card_from_dict(data)


def test_a_card_whose_name_differs_from_its_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ct-other.json").write_text(json.dumps(rule_based_card()))
    with pytest.raises(ConfigurationError, match="describes 'ct-demo', not 'ct-other'"):
        load_card("ct-other", tmp_path)


def test_broken_json_and_missing_cards_are_named(tmp_path: Path) -> None:
    (tmp_path / "ct-demo.json").write_text('{"name": "ct-demo",\n  oops}')
    with pytest.raises(ConfigurationError, match=r"ct-demo\.json is not valid JSON \(line 2"):
        read_card_file(tmp_path / "ct-demo.json")
    with pytest.raises(ConfigurationError, match=r"Model card absent\.json does not exist"):
        load_card("absent", tmp_path)


def test_every_shipped_card_passes_the_schema() -> None:
    """Each analyzer's own card must load: the registry refuses to run an analyzer without one."""
    problems = []
    for path in sorted(CARDS_DIR.glob("*.json")):
        try:
            load_card(path.stem)
        except ConfigurationError as exc:
            problems.append(str(exc))
    assert problems == []


def test_the_html_card_shows_figures_with_intervals_readably_and_escapes_text() -> None:
    data = trained_card()
    data["limits"] = ["<script>alert(1)</script> never runs"]
    page = render_card_html(card_from_dict(data), json_url="/models/cxr-demo.json", index_url="/models/")
    assert page.startswith("<!DOCTYPE html>") and '<html lang="en">' in page
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("<h1>") == 1 and "<main>" in page
    # The figures table: a caption naming data and threshold, header cells, value and interval as text.
    assert (
        "<caption>Measured performance on PneumoniaMNIST test split (624 images) at operating threshold 0.420" in page
    )
    assert '<th scope="col">95% confidence interval</th>' in page
    assert '<th scope="row">Sensitivity (recognition rate)</th><td>0.951</td><td>0.930 to 0.971</td>' in page
    assert "Status: <span" in page and "experimental" in page and "(not validated for clinical use)" in page
    assert SHA in page and 'href="/models/cxr-demo.json"' in page


def test_html_of_a_rule_based_card_says_it_learned_nothing_from_data() -> None:
    page = render_card_html(card_from_dict(copy.deepcopy(rule_based_card())))
    assert "None: the analyzer applies published rules and learned nothing from data." in page
    assert "Gevenois PA" in page

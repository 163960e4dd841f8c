"""Model cards on the web: the page a clinician opens from the FHIR Device of an AI result."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from bundle_support import TINY_NAME, make_tiny_bundle
from flask import Flask
from flask.testing import FlaskClient

from models.registry import get_analyzer, register_bundle, unregister_bundle
from pipeline.analysis import device_info
from service.model_cards import models_blueprint

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("bundles") / "tiny"
    name = register_bundle(root, sha256_pins=make_tiny_bundle(root))
    yield name
    unregister_bundle(name)


@pytest.fixture()
def client(tiny_bundle: str) -> FlaskClient:
    app = Flask(__name__)
    app.register_blueprint(models_blueprint)
    return app.test_client()


def test_the_index_lists_every_analyzer_with_a_link_to_its_card(client: FlaskClient) -> None:
    response = client.get("/models/", headers={"Accept": BROWSER_ACCEPT})
    assert response.status_code == 200 and response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    assert '<a href="/models/cxr-tiny">Tiny demonstration chest radiograph classifier (MONAI bundle)</a>' in page
    for name in ("ct-emphysema", "ct-bone", "cxr-pneumonia", "us-breast"):
        assert f"<code>{name}</code>" in page
    assert "<caption>Registered analyzers</caption>" in page


def test_the_index_as_json_names_version_status_kind_and_card_url(client: FlaskClient) -> None:
    response = client.get("/models/", headers={"Accept": "application/json"})
    rows = {row["name"]: row for row in response.get_json()["analyzers"]}
    assert rows[TINY_NAME]["version"] == "0.1.0"
    assert rows[TINY_NAME]["status"] == "experimental"
    assert rows[TINY_NAME]["kind"] == "MONAI bundle"
    assert rows[TINY_NAME]["card"] == "http://localhost/models/cxr-tiny"
    assert {"ct-emphysema", "cxr-pneumonia"} <= set(rows)


def test_a_card_page_is_html_for_a_browser_and_json_on_request(client: FlaskClient) -> None:
    html_page = client.get("/models/cxr-tiny", headers={"Accept": BROWSER_ACCEPT})
    assert html_page.status_code == 200 and html_page.mimetype == "text/html"
    text = html_page.get_data(as_text=True)
    assert "<h1>Tiny demonstration chest radiograph classifier (MONAI bundle)</h1>" in text
    assert "Random weights: its output means nothing." in text
    assert 'href="/models/cxr-tiny.json"' in text
    by_accept = client.get("/models/cxr-tiny", headers={"Accept": "application/json"})
    by_suffix = client.get("/models/cxr-tiny.json")
    assert by_accept.mimetype == by_suffix.mimetype == "application/json"
    assert by_accept.get_json() == by_suffix.get_json()
    card = by_suffix.get_json()
    assert card["name"] == TINY_NAME and card["status"] == "experimental"
    assert card["weights"]["file"] == "models/model.pt" and len(card["weights"]["sha256"]) == 64
    assert card["validation"]["figures"]["auc"] == {"value": 0.5, "ci95_low": 0.45, "ci95_high": 0.55}


def test_an_unknown_card_is_404_with_a_did_you_mean(client: FlaskClient) -> None:
    page = client.get("/models/cxr-tyni", headers={"Accept": BROWSER_ACCEPT})
    assert page.status_code == 404
    assert "No model card for analyzer &#x27;cxr-tyni&#x27;. Did you mean &#x27;cxr-tiny&#x27;?" in page.get_data(
        as_text=True
    )
    data = client.get("/models/cxr-tyni.json")
    assert data.status_code == 404
    assert data.get_json()["did_you_mean"] == TINY_NAME and "ct-emphysema" in data.get_json()["analyzers"]


def test_the_device_card_url_of_a_result_opens_its_card(client: FlaskClient, tiny_bundle: str) -> None:
    device = device_info(get_analyzer(tiny_bundle), card_base_url="https://cds.example.org/")
    assert device.card_url == "https://cds.example.org/models/cxr-tiny"
    path = device.card_url.removeprefix("https://cds.example.org")
    assert client.get(path).status_code == 200
    assert device.model_sha256 == client.get(path + ".json").get_json()["weights"]["sha256"]

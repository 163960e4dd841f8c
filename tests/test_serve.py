"""``imaging-cds serve`` as an administrator runs it: a real gunicorn process built from a settings file."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from joserfc import jwk

from devtools.servers import FhirServer, OrthancServer, free_port
from tests.serve_support import base_settings, cds_jwt, serving, write_state_key


@pytest.fixture(scope="module")
def ehr_key() -> jwk.ECKey:
    return jwk.ECKey.generate_key("P-384", parameters={"kid": "ehr-1"})


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, ehr_key: jwk.ECKey, fhir_base: FhirServer, orthanc: OrthancServer
) -> Iterator[str]:
    root = tmp_path_factory.mktemp("serve")
    port = free_port()
    settings = base_settings(
        root,
        port,
        ehr_key,
        dicomweb_allow=[orthanc.dicomweb_url],
        fhir_allow=[fhir_base.base_url],
        smart_clients=[{"fhir_base": fhir_base.base_url, "client_id": "imaging-cds"}],
        state_key={"file": str(write_state_key(root))},
        audit={"fhir_base": fhir_base.base_url, "auth": "none"},
    )
    with serving(settings, root, port) as running:
        yield running.base
        maps = Path(f"/proc/{running.process.pid}/maps").read_text()
        assert "libtorch" not in maps, "serve must not load torch"


def _cds_jwt(key: jwk.ECKey, audience: str) -> str:
    return cds_jwt(key, audience)


def test_discovery_needs_a_trusted_ehr_and_lists_the_three_hooks(server: str, ehr_key: jwk.ECKey) -> None:
    assert requests.get(f"{server}/cds-services", timeout=10).status_code == 401
    token = _cds_jwt(ehr_key, f"{server}/cds-services")
    answer = requests.get(f"{server}/cds-services", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert answer.status_code == 200
    hooks = sorted(service["hook"] for service in answer.json()["services"])
    assert hooks == ["order-select", "order-sign", "patient-view"]


def test_model_cards_are_served_as_json_and_html(server: str) -> None:
    card = requests.get(f"{server}/models/ct-emphysema.json", timeout=10)
    assert card.status_code == 200 and card.json()["name"] == "ct-emphysema"
    page = requests.get(f"{server}/models/ct-emphysema", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    assert requests.get(f"{server}/models/ct-emphysem", timeout=10).status_code == 404


def test_the_app_refuses_a_launch_from_an_ehr_it_is_not_registered_with(server: str) -> None:
    answer = requests.get(
        f"{server}/app/launch", params={"iss": "https://attacker.example/fhir", "launch": "x"}, timeout=10
    )
    assert answer.status_code in (400, 403)
    assert "not registered" in answer.text


def test_an_unknown_settings_key_stops_serve_with_a_hint(tmp_path: Path) -> None:
    config = tmp_path / "settings.json"
    config.write_text(
        json.dumps({"public_base_url": "http://127.0.0.1:1", "data_dir": str(tmp_path), "dicomweb_alow": []})
    )
    done = subprocess.run(
        [sys.executable, "-m", "imaging_cds.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "Did you mean 'dicomweb_allow'?" in done.stderr

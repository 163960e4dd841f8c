"""CDS cards that follow a finding over time, through the real CDS service and the real FHIR server.

patient-view says when a finding progressed since the prior (a change beyond the measurement's published repeatability
in the direction the analyzer's card calls worse), with the numbers; order-select for a follow-up CT says how long
ago the prior was analysed, what a new analysis will compare with it and how the prior scan was acquired.

The results are filed as the pipeline files them (``tests/followup_support.file_compared_result``): each compared
with the earlier ones by the pipeline's own ``find_history`` and ``compare_with_prior`` (the one FHIR search, the
card's repeatability) and filed in one transaction. The LAA-950 values are set by the test (3.1 % then 5.2 %, the
issue's example): no real pair of scans with progression exists here. The comparison of real scans is covered in
tests/test_followup_pipeline.py.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from flask.testing import FlaskClient

from cds.app import create_app
from cds.services import ORDER_SELECT, PATIENT_VIEW
from devtools.servers import FhirServer
from fhir_adapters.client import FhirClient
from tests.cds_support import EhrKeys, create_patient, make_config, prefetch_for
from tests.followup_support import emphysema_result, file_compared_result


@pytest.fixture(scope="module")
def keys() -> EhrKeys:
    return EhrKeys()


@pytest.fixture(scope="module")
def fhir(fhir_base: FhirServer) -> FhirClient:
    return FhirClient(fhir_base.base_url, session=requests.Session())


@pytest.fixture()
def cds(tmp_path: Path, keys: EhrKeys, fhir_base: FhirServer) -> FlaskClient:
    return create_app(make_config(tmp_path, keys, fhir_base.base_url, recent_days=3650)).test_client()


def call(cds: FlaskClient, keys: EhrKeys, service: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    path = f"/cds-services/{service}"
    response = cds.post(path, json=body, headers={"Authorization": f"Bearer {keys.sign(path)}"})
    assert response.status_code == 200, response.get_json()
    cards: list[dict[str, Any]] = response.get_json()["cards"]
    return cards


def patient_view(cds: FlaskClient, keys: EhrKeys, fhir_base: FhirServer, patient_id: str) -> dict[str, Any]:
    body = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"patientId": patient_id, "userId": "Practitioner/1"},
        "prefetch": prefetch_for(fhir_base.base_url, PATIENT_VIEW, patient_id),
    }
    [card] = [c for c in call(cds, keys, PATIENT_VIEW, body) if c["source"]["label"] == "imaging-cds ct-emphysema"]
    return card


def test_patient_view_says_the_finding_progressed_since_the_prior_with_the_numbers(
    cds: FlaskClient, keys: EhrKeys, fhir_base: FhirServer, fhir: FhirClient
) -> None:
    patient = create_patient(fhir_base.base_url)
    file_compared_result(fhir, f"Patient/{patient}", emphysema_result(3.1), "2024-01-01T09:00:00+00:00")
    file_compared_result(fhir, f"Patient/{patient}", emphysema_result(5.2), "2025-01-01T09:00:00+00:00")
    card = patient_view(cds, keys, fhir_base, patient)
    assert card["summary"].startswith("CT emphysema quantification: progressed since 2024-01-01, LAA-950 3.1 -> 5.2 %")
    assert len(card["summary"]) < 140 and card["indicator"] == "warning"
    assert "**Change since the prior study of 2024-01-01**" in card["detail"]
    assert (
        "LAA-950 3.1 % -> 5.2 %, +2.1 points, beyond the repeatability of +1.1 / -1.3 points (weaker: slices of 1 mm, "
        "thicker than the 0.75 mm its repeatability was measured on): increased **(progressed)**"
    ) in card["detail"]
    assert "Lung volume 5400 mL -> 5400 mL, 0 mL (0 %), no verdict" in card["detail"]


def test_a_change_within_repeatability_is_listed_and_not_called_progression(
    cds: FlaskClient, keys: EhrKeys, fhir_base: FhirServer, fhir: FhirClient
) -> None:
    patient = create_patient(fhir_base.base_url)
    file_compared_result(fhir, f"Patient/{patient}", emphysema_result(5.4), "2024-01-01T09:00:00+00:00")
    file_compared_result(fhir, f"Patient/{patient}", emphysema_result(6.1), "2025-01-01T09:00:00+00:00")
    card = patient_view(cds, keys, fhir_base, patient)
    assert "progressed" not in card["summary"] and "progressed" not in card["detail"]
    assert "LAA-950 5.4 % -> 6.1 %, +0.7 points, within the repeatability" in card["detail"]
    assert ": stable" in card["detail"]


def test_order_select_for_a_follow_up_ct_shows_the_interval_and_what_will_be_compared(
    cds: FlaskClient, keys: EhrKeys, fhir_base: FhirServer, fhir: FhirClient
) -> None:
    patient = create_patient(fhir_base.base_url)
    prior = file_compared_result(fhir, f"Patient/{patient}", emphysema_result(3.1), "2024-01-01T09:00:00+00:00")
    order = {
        "resourceType": "ServiceRequest",
        "id": "follow-up-ct",
        "status": "draft",
        "intent": "order",
        "code": {
            "coding": [{"system": "http://loinc.org", "code": "24627-2", "display": "CT Chest"}],
            "text": "CT chest",
        },
        "subject": {"reference": f"Patient/{patient}"},
    }
    body = {
        "hook": "order-select",
        "hookInstance": str(uuid.uuid4()),
        "context": {
            "patientId": patient,
            "userId": "Practitioner/1",
            "selections": ["ServiceRequest/follow-up-ct"],
            "draftOrders": {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": order}]},
        },
        "prefetch": prefetch_for(fhir_base.base_url, ORDER_SELECT, patient),
    }
    cards = call(cds, keys, ORDER_SELECT, body)
    [followup] = [c for c in cards if c["source"]["label"] == "imaging-cds"]
    days = (datetime.now(UTC) - datetime(2024, 1, 1, 9, tzinfo=UTC)).days
    assert followup["indicator"] == "info"
    assert followup["summary"].startswith(f"Follow-up CT: prior AI results of 2024-01-01, {days} days")
    assert followup["summary"].endswith("ago, will be compared")
    detail = followup["detail"]
    assert f"prior of 2024-01-01 ({days} days" in detail and prior in detail
    assert "prior scan: 1 mm slices, kernel B30f, no contrast stated" in detail
    assert "Change called only beyond the published repeatability: LAA-950." in detail
    assert "Change shown without a verdict (no published repeatability): Lung volume." in detail
    assert json_context(followup)["serviceRequest"] == "ServiceRequest/follow-up-ct"


def json_context(card: dict[str, Any]) -> dict[str, Any]:
    context: dict[str, Any] = json.loads(card["links"][0]["appContext"])
    return context

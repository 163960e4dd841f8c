"""The CDS patient-view card for heart results, through the real CDS service and the real FHIR server.

A heart result with an aortic diameter over the 2022 ACC/AHA threshold, or a high coronary calcium category, puts
that finding in the card's summary and the guideline's next step in its detail, as text and with no order
suggestion. The results here are filed as the pipeline files them (one transaction); the real lung2 result is
carried through the same card code in tests/test_pipeline_heart.py.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from cds.app import create_app
from cds.services import PATIENT_VIEW
from devtools.servers import FhirServer
from models.base import AnalysisResult, Category, Interpretation, Measurement
from tests.cds_support import EhrKeys, create_patient, create_study, make_config, post_result

STARTED = "2025-06-01T09:00:00Z"


def heart_result(*, drs: int, ascending_mm: float, ascending_flag: Interpretation) -> AnalysisResult:
    display = {1: "CAC-DRS 1: mild coronary artery calcium (Agatston 1-99)", 3: "CAC-DRS 3: severe"}[drs]
    return AnalysisResult(
        analyzer="ct-heart",
        version="0.1.0",
        measurements=(
            Measurement(
                "cac_agatston",
                "Coronary artery calcium score (Agatston)",
                42.0 if drs == 1 else 512.0,
                "1",
                "A" if drs == 1 else "HH",
                reference_high=0.0,
            ),
            Measurement(
                "ascending_aorta_diameter_mm",
                "Ascending aorta maximal diameter",
                ascending_mm,
                "mm",
                ascending_flag,
                reference_high=39.0,
            ),
            Measurement("descending_aorta_diameter_mm", "Descending thoracic aorta maximal diameter", 26.0, "mm", "N"),
        ),
        category=Category(f"cac-drs-{drs}", display, "CAC-DRS (Hecht 2018)", abnormal=True),
        conclusion="Test result filed as the pipeline files one.",
    )


@pytest.fixture(scope="module")
def keys() -> EhrKeys:
    return EhrKeys()


@pytest.fixture()
def client(tmp_path: Path, keys: EhrKeys, fhir_base: FhirServer) -> FlaskClient:
    return create_app(make_config(tmp_path, keys, fhir_base.base_url, recent_days=3650)).test_client()


def patient_view(client: FlaskClient, keys: EhrKeys, fhir_base: FhirServer, patient_id: str) -> list[dict[str, Any]]:
    path = f"/cds-services/{PATIENT_VIEW}"
    body = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"patientId": patient_id, "userId": "Practitioner/1"},
        "fhirServer": fhir_base.base_url,
        "fhirAuthorization": {
            "access_token": "t",
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/*.read",
            "subject": "cds-service",
        },
    }
    response = client.post(path, json=body, headers={"Authorization": f"Bearer {keys.sign(path)}"})
    assert response.status_code == 200, response.get_json()
    return [c for c in response.get_json()["cards"] if c["source"]["label"] == "imaging-cds ct-heart"]


def test_a_dilated_ascending_aorta_gives_the_2022_acc_aha_next_step(
    client: FlaskClient, keys: EhrKeys, fhir_base: FhirServer
) -> None:
    patient = create_patient(fhir_base.base_url)
    study = create_study(fhir_base.base_url, patient, started=STARTED)
    result = heart_result(drs=1, ascending_mm=46.0, ascending_flag="H")
    post_result(fhir_base.base_url, patient, study, result, started=STARTED)
    [card] = patient_view(client, keys, fhir_base, patient)
    assert card["indicator"] == "warning" and "ascending aorta 46 mm" in card["summary"]
    assert "CAC-DRS" not in card["summary"]  # CAC-DRS 1 is not a high category
    assert "2022 ACC/AHA threshold" in card["detail"] and "surveillance" in card["detail"]
    assert "suggestions" not in card or not card["suggestions"]  # text only: no order the guideline names


def test_an_aorta_at_the_surgical_threshold_and_severe_calcium_give_referral_and_statin_text(
    client: FlaskClient, keys: EhrKeys, fhir_base: FhirServer
) -> None:
    patient = create_patient(fhir_base.base_url)
    study = create_study(fhir_base.base_url, patient, started=STARTED)
    result = heart_result(drs=3, ascending_mm=56.0, ascending_flag="HH")
    post_result(fhir_base.base_url, patient, study, result, started=STARTED)
    [card] = patient_view(client, keys, fhir_base, patient)
    assert "CAC-DRS 3" in card["summary"] and "ascending aorta 56 mm" in card["summary"]
    assert len(card["summary"]) < 140
    assert "high-intensity statin" in card["detail"] and "intervention threshold" in card["detail"]
    assert "multidisciplinary aortic team" in card["detail"]

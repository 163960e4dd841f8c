"""Issue 19 acceptance through the whole pipeline: lung2 in Orthanc, ct-heart, its findings in the real FHIR server.

The study gets UIDs of its own (a copy of lung2's real pixels under fresh Study/Series/SOP Instance UIDs), so this
module never meets another module's lung2 results whatever the order the suite runs in.
"""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
import requests

from cds.cards import CardSettings, patient_view_cards
from core.allowlist import AllowList
from devtools.samples import endpoint_resource, imaging_study_resource, load_sample, upload_series, with_new_uids
from devtools.servers import FhirServer, OrthancServer
from fhir_adapters.client import FhirClient
from fhir_adapters.constants import MEASUREMENT_CODESYSTEM
from fhir_adapters.results import extract_findings
from fhir_adapters.validation import validate_resource
from models.registry import get_analyzer
from pipeline.analysis import AnalysisOutcome, analyze_study


@pytest.fixture(scope="module")
def client(fhir_base: FhirServer) -> FhirClient:
    return FhirClient(fhir_base.base_url, session=requests.Session())


@pytest.fixture(scope="module")
def study(client: FhirClient, orthanc: OrthancServer) -> tuple[str, str]:
    datasets = with_new_uids(load_sample("lung2"), namespace=f"pipeline-heart-{uuid.uuid4()}")
    upload_series(orthanc.url, datasets)
    patient = client.create(
        {"resourceType": "Patient", "gender": "male", "name": [{"family": "Heart", "given": ["Test"]}]}
    )
    endpoint_json = endpoint_resource(orthanc.dicomweb_url)
    identifier = endpoint_json["identifier"][0]
    endpoint = client.create(endpoint_json, if_none_exist=f"identifier={identifier['system']}|{identifier['value']}")
    resource = imaging_study_resource(
        datasets, patient_reference=f"Patient/{patient['id']}", endpoint_reference=f"Endpoint/{endpoint['id']}"
    )
    created = client.create(resource)
    return f"ImagingStudy/{created['id']}", f"Patient/{patient['id']}"


@pytest.fixture(scope="module")
def outcome(client: FhirClient, study: tuple[str, str], allow: AllowList) -> AnalysisOutcome:
    return analyze_study(client, study[0], get_analyzer("ct-heart"), dicomweb_allow_list=allow)


def _read(client: FhirClient, reference: str) -> dict[str, Any]:
    resource_type, resource_id = reference.split("/")[-2:]
    return client.read(resource_type, resource_id)


def _observations(client: FhirClient, report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    observations = [_read(client, r["reference"]) for r in report["result"]]
    return {c["code"]: o for o in observations for c in o["code"]["coding"] if c["system"] == MEASUREMENT_CODESYSTEM}


def test_the_ehr_holds_calcium_and_vessel_observations_with_interpretations(
    client: FhirClient, study: tuple[str, str], outcome: AnalysisOutcome
) -> None:
    report = _read(client, outcome.diagnostic_report)
    validate_resource(report)
    assert report["status"] == "preliminary" and [s["reference"] for s in report["imagingStudy"]] == [study[0]]
    assert report["code"]["coding"][0]["code"] == "24627-2"  # LOINC Chest CT
    by_key = _observations(client, report)
    expected = ("cac_agatston", "cac_volume_mm3", "cac_mass_mg", "tac_agatston", "ascending_aorta_diameter_mm")
    for key in (*expected, "descending_aorta_diameter_mm", "pulmonary_trunk_diameter_mm", "pa_aorta_ratio"):
        assert key in by_key, key
        validate_resource(by_key[key])
        assert by_key[key]["derivedFrom"] == [{"reference": study[0]}]
    cac = by_key["cac_agatston"]
    assert cac["valueQuantity"]["code"] == "1" and cac["valueQuantity"]["value"] >= 100
    assert cac["interpretation"][0]["coding"][0]["code"] in ("H", "HH")
    assert cac["referenceRange"][0]["high"]["value"] == 0
    ascending = by_key["ascending_aorta_diameter_mm"]
    assert ascending["valueQuantity"]["code"] == "mm" and ascending["interpretation"][0]["coding"][0]["code"] == "N"
    assert ascending["referenceRange"][0]["high"]["value"] == 39  # dilated from 40 mm (2022 ACC/AHA)
    assert "McCollough" in " ".join(n["text"] for n in by_key["cac_mass_mg"]["note"])


def test_the_report_concludes_with_the_cac_drs_category_and_shows_the_key_images(
    client: FhirClient, outcome: AnalysisOutcome
) -> None:
    report = _read(client, outcome.diagnostic_report)
    codes = [c["code"] for cc in report["conclusionCode"] for c in cc["coding"]]
    category = next(code for code in codes if code.startswith("ct-heart/"))
    assert category in ("ct-heart/cac-drs-2", "ct-heart/cac-drs-3") and "A" in codes
    assert "CAC-DRS" in report["conclusion"] and "Non-gated" in report["conclusion"]
    titles = [m["comment"] for m in report["media"]]
    assert any("Coronary calcium" in t for t in titles) and any("ascending aorta" in t for t in titles)
    media = _read(client, report["media"][0]["link"]["reference"])
    assert base64.b64decode(media["content"]["data"]).startswith(b"\x89PNG")


def test_a_second_run_writes_nothing_new(
    client: FhirClient, study: tuple[str, str], outcome: AnalysisOutcome, allow: AllowList
) -> None:
    again = analyze_study(client, study[0], get_analyzer("ct-heart"), dicomweb_allow_list=allow)
    assert again.already_present and again.diagnostic_report == outcome.diagnostic_report
    reports = client.search_bundle("DiagnosticReport", {"subject": study[1]})
    assert len(reports.get("entry", [])) == 1


def test_the_patient_view_card_for_lung2_carries_the_cac_drs_next_step(
    client: FhirClient, study: tuple[str, str], outcome: AnalysisOutcome
) -> None:
    """The real lung2 result, read back from the EHR by the one reader of filed results, through the card code."""
    bundle = client.search_bundle("DiagnosticReport", {"subject": study[1], "_include": "DiagnosticReport:result"})
    findings = extract_findings(e["resource"] for e in bundle.get("entry", []))
    settings = CardSettings("https://app.example.org/launch", "https://cards.example.org", now=datetime.now(UTC))
    [card] = patient_view_cards(findings, settings)
    assert card["indicator"] == "warning" and "CAC-DRS" in card["summary"]
    assert "statin" in card["detail"] and "Suggested next steps" in card["detail"]

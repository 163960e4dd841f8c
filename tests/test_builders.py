"""AI findings -> one idempotent, schema-valid R4 transaction, checked field by field and on a real sekmet-fhir.

The AnalysisResults here are hand-made (the analyzers are tested on real images elsewhere); the FHIR server
is real. Every test uses fresh DICOM UIDs, so tests sharing the session's server do not see each other's data.
"""

from __future__ import annotations

import base64
import io
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
import requests
from PIL import Image

from core.errors import ConfigurationError
from devtools.servers import FhirServer
from fhir_adapters import constants
from fhir_adapters.builders import (
    AI_DISCLAIMER,
    MODEL_SHA256_IDENTIFIER_SYSTEM,
    AnalysisTarget,
    DeviceInfo,
    SignoffInputError,
    analysis_identifier,
    build_results_bundle,
    build_signoff_bundle,
)
from fhir_adapters.validation import validate_resource
from models.base import AnalysisResult, Category, Explanation, Measurement

ISSUED = datetime(2025, 3, 4, 10, 30, tzinfo=UTC)
SHA = "3f" * 32
AIAST = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}


def _png(width: int = 8, height: int = 6) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _uid() -> str:
    return f"2.25.{uuid.uuid4().int}"


def emphysema_result(category: Category | None = None) -> AnalysisResult:
    return AnalysisResult(
        analyzer="ct-emphysema",
        version="1.2.0",
        measurements=(
            Measurement("laa950_percent", "LAA-950", 14.2, "%", "H", None, 6.0, "Whole-lung LAA-950."),
            Measurement("lung_volume_ml", "Lung volume", 5830.0, "mL"),
            Measurement("upper_lower_zone_ratio", "Upper/lower zone ratio", 1.8, "1", "A"),
        ),
        category=category or Category("moderate", "Moderate emphysema", "LAA-950 14-25 % (example rule)", True),
        conclusion="Moderate emphysema, upper-zone predominant.",
        explanations=(Explanation("LAA-950 overlay, slice 120", "overlay", _png(), 120),),
        warnings=("Slice thickness 2.5 mm is above the validated 1.25 mm.",),
    )


EMPHYSEMA_DEVICE = DeviceInfo(
    "ct-emphysema", "1.2.0", "CT emphysema quantification", SHA, "https://example.org/cards/ct"
)


def _target(
    patient: str = "Patient/p1", study: str = "is-1", started: str | None = "2024-11-05T09:12:00Z"
) -> AnalysisTarget:
    return AnalysisTarget(study, patient, _uid(), _uid(), "Thin-slice lung-kernel axial series (1 mm).", started)


def _entries(bundle: dict[str, Any], resource_type: str) -> list[dict[str, Any]]:
    return [e for e in bundle["entry"] if e["resource"]["resourceType"] == resource_type]


# --- pure: the bundle's content --------------------------------------------------------------------------------


def test_analysis_identifier_is_stable_and_changes_with_the_model_version() -> None:
    first = analysis_identifier("1.2.3", "1.2.3.4", "ct-emphysema", "1.2.0")
    assert first == analysis_identifier("1.2.3", "1.2.3.4", "ct-emphysema", "1.2.0")
    assert uuid.UUID(first).version == 5
    assert first != analysis_identifier("1.2.3", "1.2.3.4", "ct-emphysema", "1.3.0")
    assert first != analysis_identifier("1.2.3", "1.2.3.5", "ct-emphysema", "1.2.0")


def test_bundle_is_one_transaction_with_device_observations_media_report_provenance() -> None:
    bundle = build_results_bundle(_target(), emphysema_result(), EMPHYSEMA_DEVICE, issued=ISSUED)
    assert bundle["type"] == "transaction"
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds == ["Device", "Observation", "Observation", "Observation", "Media", "DiagnosticReport", "Provenance"]
    assert all(e["fullUrl"].startswith("urn:uuid:") for e in bundle["entry"])
    for entry in bundle["entry"][:-1]:
        assert entry["request"]["method"] == "POST"
        identifier = entry["resource"]["identifier"][0]
        assert entry["request"]["ifNoneExist"] == f"identifier={identifier['system']}|{identifier['value']}"


def test_device_names_the_analyzer_version_weights_and_card() -> None:
    bundle = build_results_bundle(_target(), emphysema_result(), EMPHYSEMA_DEVICE, issued=ISSUED)
    device = _entries(bundle, "Device")[0]["resource"]
    assert {"system": constants.DEVICE_IDENTIFIER_SYSTEM, "value": "ct-emphysema@1.2.0"} in device["identifier"]
    assert {"system": MODEL_SHA256_IDENTIFIER_SYSTEM, "value": SHA} in device["identifier"]
    assert device["version"] == [{"value": "1.2.0"}]
    assert device["deviceName"][0] == {"name": "CT emphysema quantification", "type": "user-friendly-name"}
    assert device["url"] == "https://example.org/cards/ct"
    assert "https://example.org/cards/ct" in device["note"][0]["text"]


def test_laa950_observation_field_by_field() -> None:
    target = _target()
    bundle = build_results_bundle(target, emphysema_result(), EMPHYSEMA_DEVICE, issued=ISSUED)
    device_url = _entries(bundle, "Device")[0]["fullUrl"]
    laa = _entries(bundle, "Observation")[0]["resource"]
    analysis_id = analysis_identifier(target.study_uid, target.series_uid, "ct-emphysema", "1.2.0")
    assert laa["identifier"] == [
        {"system": constants.ANALYSIS_IDENTIFIER_SYSTEM, "value": f"{analysis_id}/obs/laa950_percent"}
    ]
    assert laa["meta"]["security"] == [AIAST]
    assert laa["status"] == "preliminary"
    assert laa["category"][0]["coding"][0]["code"] == "imaging"
    assert {"system": constants.MEASUREMENT_CODESYSTEM, "code": "laa950_percent"}.items() <= laa["code"]["coding"][
        -1
    ].items()
    assert laa["code"]["text"] == "LAA-950"
    assert laa["subject"] == {"reference": "Patient/p1"}
    assert laa["effectiveDateTime"] == "2024-11-05T09:12:00Z"
    assert laa["issued"] == "2025-03-04T10:30:00.000Z"
    assert laa["valueQuantity"] == {"value": 14.2, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"}
    assert laa["interpretation"][0]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
        "code": "H",
        "display": "High",
    }
    assert laa["referenceRange"] == [
        {"high": {"value": 6.0, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"}}
    ]
    assert laa["derivedFrom"] == [{"reference": "ImagingStudy/is-1"}]
    assert laa["device"] == {"reference": device_url}
    assert laa["note"][0] == {"text": "Whole-lung LAA-950."}
    assert AI_DISCLAIMER in laa["note"][1]["text"]


def test_dimensionless_ratio_keeps_ucum_one_without_a_unit_label() -> None:
    bundle = build_results_bundle(_target(), emphysema_result(), EMPHYSEMA_DEVICE, issued=ISSUED)
    ratio = _entries(bundle, "Observation")[2]["resource"]
    assert ratio["valueQuantity"] == {"value": 1.8, "system": "http://unitsofmeasure.org", "code": "1"}


def test_media_carries_the_explanation_png_as_an_ai_explanation() -> None:
    result = emphysema_result()
    bundle = build_results_bundle(_target(), result, EMPHYSEMA_DEVICE, issued=ISSUED)
    media = _entries(bundle, "Media")[0]["resource"]
    assert media["status"] == "completed" and media["meta"]["security"] == [AIAST]
    assert media["type"]["coding"][0]["code"] == "image"
    assert media["content"]["contentType"] == "image/png"
    assert base64.b64decode(media["content"]["data"]) == result.explanations[0].png
    assert media["content"]["title"] == "LAA-950 overlay, slice 120"
    assert (media["width"], media["height"]) == (8, 6)
    assert "AI explanation (overlay) (slice 120)" in media["note"][0]["text"]
    assert "not a diagnostic image" in media["note"][0]["text"]


def test_report_field_by_field() -> None:
    bundle = build_results_bundle(_target(), emphysema_result(), EMPHYSEMA_DEVICE, issued=ISSUED)
    report = _entries(bundle, "DiagnosticReport")[0]["resource"]
    observation_urls = [e["fullUrl"] for e in _entries(bundle, "Observation")]
    media_url = _entries(bundle, "Media")[0]["fullUrl"]
    assert report["status"] == "preliminary" and report["meta"]["security"] == [AIAST]
    assert report["category"][0]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
        "code": "RAD",
        "display": "Radiology",
    }
    assert report["code"]["coding"] == [{"system": "http://loinc.org", "code": "24627-2", "display": "Chest CT"}]
    assert report["effectiveDateTime"] == "2024-11-05T09:12:00Z"
    assert report["issued"] == "2025-03-04T10:30:00.000Z"
    assert "performer" not in report and "resultsInterpreter" not in report
    assert report["imagingStudy"] == [{"reference": "ImagingStudy/is-1"}]
    assert [r["reference"] for r in report["result"]] == observation_urls
    assert report["media"] == [{"comment": "LAA-950 overlay, slice 120", "link": {"reference": media_url}}]
    assert report["conclusion"] == (
        "Moderate emphysema, upper-zone predominant. Warnings: Slice thickness 2.5 mm is above the validated "
        "1.25 mm. AI-generated, preliminary, requires clinician review."
    )
    snomed, project, verdict = report["conclusionCode"]
    assert verdict["coding"][0]["code"] == "A"  # abnormal, stated explicitly for readers such as the CDS service
    assert snomed["coding"] == [
        {"system": "http://snomed.info/sct", "code": "87433001", "display": "Pulmonary emphysema"}
    ]
    assert project["coding"][0] == {
        "system": constants.CATEGORY_CODESYSTEM,
        "code": "ct-emphysema/moderate",
        "display": "Moderate emphysema",
    }


def test_presented_form_is_a_readable_report_with_values_rule_warnings_and_disclaimer() -> None:
    target = _target()
    bundle = build_results_bundle(target, emphysema_result(), EMPHYSEMA_DEVICE, issued=ISSUED)
    form = _entries(bundle, "DiagnosticReport")[0]["resource"]["presentedForm"][0]
    assert form["contentType"] == "text/html" and form["title"] == "CT emphysema quantification: AI analysis report"
    page = base64.b64decode(form["data"]).decode("utf-8")
    for expected in (
        "<td>LAA-950</td><td>14.2</td><td>%</td><td>≤ 6</td><td>H</td>",
        "<td>Lung volume</td><td>5830</td><td>mL</td>",
        "Moderate emphysema (abnormal)",
        "Rule: LAA-950 14-25 % (example rule)",
        "<li>Slice thickness 2.5 mm is above the validated 1.25 mm.</li>",
        "Why this series: Thin-slice lung-kernel axial series (1 mm).",
        target.series_uid,
        "ct-emphysema, version 1.2.0",
        AI_DISCLAIMER,
    ):
        assert expected in page


def test_provenance_is_put_with_a_deterministic_id_and_names_device_and_study() -> None:
    target = _target()
    bundle = build_results_bundle(target, emphysema_result(), EMPHYSEMA_DEVICE, issued=ISSUED)
    entry = _entries(bundle, "Provenance")[0]
    provenance = entry["resource"]
    assert entry["request"] == {"method": "PUT", "url": f"Provenance/{provenance['id']}"}
    assert entry["fullUrl"] == f"urn:uuid:{provenance['id']}"
    new_clinical = [
        e["fullUrl"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] in ("Observation", "Media", "DiagnosticReport")
    ]
    assert sorted(t["reference"] for t in provenance["target"]) == sorted(new_clinical)
    assert provenance["recorded"] == "2025-03-04T10:30:00.000Z"
    assert provenance["agent"] == [
        {
            "type": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                        "code": "author",
                        "display": "Author",
                    }
                ]
            },
            "who": {"reference": _entries(bundle, "Device")[0]["fullUrl"]},
        }
    ]
    assert provenance["entity"] == [{"role": "source", "what": {"reference": "ImagingStudy/is-1"}}]
    assert provenance["activity"]["coding"][0]["code"] == "CREATE"


def test_same_analysis_builds_the_same_bundle() -> None:
    target = _target()
    first = build_results_bundle(target, emphysema_result(), EMPHYSEMA_DEVICE, issued=ISSUED)
    assert build_results_bundle(target, emphysema_result(), EMPHYSEMA_DEVICE, issued=ISSUED) == first


def test_normal_category_asserts_no_emphysema_code_and_unknown_start_leaves_effective_out() -> None:
    normal = emphysema_result(Category("none", "No emphysema", "LAA-950 < 6 %", False))
    bundle = build_results_bundle(_target(started=None), normal, EMPHYSEMA_DEVICE, issued=ISSUED)
    report = _entries(bundle, "DiagnosticReport")[0]["resource"]
    assert [c["coding"][0]["code"] for c in report["conclusionCode"]] == ["ct-emphysema/none", "N"]
    assert "effectiveDateTime" not in report
    assert all("effectiveDateTime" not in e["resource"] for e in _entries(bundle, "Observation"))


def test_pneumonia_probability_becomes_an_observation_and_report_uses_generic_imaging_code() -> None:
    result = AnalysisResult(
        analyzer="cxr-pneumonia",
        version="0.3.0",
        measurements=(),
        category=Category("pneumonia", "Pneumonia likely", "probability >= 0.5 (operating point)", True),
        conclusion="Findings suggest pneumonia.",
        probability=0.87,
    )
    device = DeviceInfo("cxr-pneumonia", "0.3.0", "Chest radiograph pneumonia classifier")
    bundle = build_results_bundle(_target(), result, device, issued=ISSUED)
    (observation,) = [e["resource"] for e in _entries(bundle, "Observation")]
    assert observation["code"]["coding"][0]["code"] == "finding_probability"
    assert observation["valueQuantity"] == {"value": 0.87, "system": "http://unitsofmeasure.org", "code": "1"}
    report = _entries(bundle, "DiagnosticReport")[0]["resource"]
    # The readable report states it in percent, one decimal, as the analyzers' own probabilities are filed.
    assert "<p>Model probability: 87.0 %</p>" in base64.b64decode(report["presentedForm"][0]["data"]).decode()
    assert report["code"]["coding"][0]["code"] == "18748-4"
    assert report["conclusionCode"][0]["coding"][0]["code"] == "233604007"
    assert "media" not in report and not _entries(bundle, "Media")


def test_probability_already_measured_is_not_written_twice() -> None:
    result = AnalysisResult(
        analyzer="cxr-pneumonia",
        version="0.3.0",
        measurements=(Measurement("pneumonia_probability", "Pneumonia probability", 87.0, "%"),),
        category=Category("pneumonia", "Pneumonia likely", "probability >= 50 %", True),
        conclusion="Findings suggest pneumonia.",
        probability=0.87,
    )
    device = DeviceInfo("cxr-pneumonia", "0.3.0", "Chest radiograph pneumonia classifier")
    bundle = build_results_bundle(_target(), result, device, issued=ISSUED)
    assert [e["resource"]["code"]["coding"][0]["code"] for e in _entries(bundle, "Observation")] == [
        "pneumonia_probability"
    ]


def test_unknown_measurement_key_falls_back_to_the_project_code_with_the_analyzer_display() -> None:
    result = AnalysisResult(
        analyzer="ct-bone",
        version="0.1.0",
        measurements=(Measurement("l2_anterior_height_mm", "L2 anterior height", 24.5, "mm"),),
        category=Category("osteoporosis", "Osteoporosis likely", "L1 trabecular HU <= 100 (Pickhardt)", True),
        conclusion="Low L1 attenuation.",
    )
    device = DeviceInfo("ct-bone", "0.1.0", "Opportunistic CT bone screening")
    bundle = build_results_bundle(_target(), result, device, issued=ISSUED)
    observation = _entries(bundle, "Observation")[0]["resource"]
    assert observation["code"]["coding"] == [
        {"system": constants.MEASUREMENT_CODESYSTEM, "code": "l2_anterior_height_mm", "display": "L2 anterior height"}
    ]
    report = _entries(bundle, "DiagnosticReport")[0]["resource"]
    assert report["conclusionCode"][0]["coding"][0]["code"] == "64859006"


def test_inputs_that_cannot_be_recorded_are_refused() -> None:
    with pytest.raises(ValueError, match="time zone"):
        build_results_bundle(_target(), emphysema_result(), EMPHYSEMA_DEVICE, issued=datetime(2025, 1, 1))
    not_png = AnalysisResult(
        **{**emphysema_result().__dict__, "explanations": (Explanation("x", "heatmap", b"GIF89a"),)}
    )
    with pytest.raises(ConfigurationError, match="not a PNG image"):
        build_results_bundle(_target(), not_png, EMPHYSEMA_DEVICE, issued=ISSUED)
    nan = AnalysisResult(
        **{**emphysema_result().__dict__, "measurements": (Measurement("laa950_percent", "LAA", float("nan"), "%"),)}
    )
    with pytest.raises(ConfigurationError, match="non-finite value for 'laa950_percent'"):
        build_results_bundle(_target(), nan, EMPHYSEMA_DEVICE, issued=ISSUED)
    other_version = DeviceInfo("ct-emphysema", "2.0.0", "CT emphysema quantification")
    with pytest.raises(ConfigurationError, match=r"cannot be recorded as device ct-emphysema@2\.0\.0"):
        build_results_bundle(_target(), emphysema_result(), other_version, issued=ISSUED)
    with pytest.raises(ConfigurationError, match="model_sha256 is not 64 lower-case hex"):
        DeviceInfo("ct-emphysema", "1.2.0", "CT", "ABC")


def test_signoff_needs_a_reason_to_reject() -> None:
    report = {"resourceType": "DiagnosticReport", "id": "r1", "status": "preliminary", "code": {"text": "x"}}
    with pytest.raises(SignoffInputError, match="Rejecting DiagnosticReport/r1 needs a reason"):
        build_signoff_bundle(report, "Practitioner/1", accepted=False, reason="  ", when=ISSUED)
    with pytest.raises(SignoffInputError, match="Only a DiagnosticReport"):
        build_signoff_bundle(
            {"resourceType": "Observation", "id": "o"}, "Practitioner/1", accepted=True, reason=None, when=ISSUED
        )


# --- against the real FHIR server ------------------------------------------------------------------------------


def _post(server: FhirServer, resource: dict[str, Any]) -> dict[str, Any]:
    response = requests.post(f"{server.base_url}/{resource['resourceType']}", json=resource, timeout=30)
    assert response.status_code == 201, response.text
    return dict(response.json())


def _get(server: FhirServer, path: str, **params: str) -> dict[str, Any]:
    response = requests.get(f"{server.base_url}/{path}", params=params, timeout=30)
    assert response.status_code == 200, response.text
    return dict(response.json())


def _transaction(server: FhirServer, bundle: dict[str, Any]) -> dict[str, Any]:
    response = requests.post(server.base_url, json=bundle, timeout=60)
    assert response.status_code == 200, response.text
    return dict(response.json())


def _count(server: FhirServer, resource_type: str, **params: str) -> int:
    return int(_get(server, resource_type, _summary="count", **params)["total"])


def _server_target(server: FhirServer) -> AnalysisTarget:
    patient = _post(server, {"resourceType": "Patient", "gender": "female", "birthDate": "1956"})
    study_uid, series_uid = _uid(), _uid()
    study = _post(
        server,
        {
            "resourceType": "ImagingStudy",
            "status": "available",
            "subject": {"reference": f"Patient/{patient['id']}"},
            "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}],
            "started": "2024-11-05T09:12:00Z",
        },
    )
    return AnalysisTarget(
        study["id"], f"Patient/{patient['id']}", study_uid, series_uid, "Thin-slice lung kernel.", study["started"]
    )


def _location_id(entry: dict[str, Any]) -> str:
    # ".../fhir/Observation/<id>/_history/1" -> "Observation/<id>"
    parts = entry["response"]["location"].split("/_history/")[0].rsplit("/", 2)
    return f"{parts[-2]}/{parts[-1]}"


def test_bundle_is_stored_with_resolving_references_and_a_rerun_creates_nothing(fhir_base: FhirServer) -> None:
    target = _server_target(fhir_base)
    bundle = build_results_bundle(target, emphysema_result(), EMPHYSEMA_DEVICE, issued=ISSUED)
    answer = _transaction(fhir_base, bundle)
    statuses = [e["response"]["status"] for e in answer["entry"]]
    assert all(s.startswith("201") for s in statuses[1:]), statuses  # the Device may exist from another test
    stored = [_location_id(e) for e in answer["entry"]]
    device_ref, *observation_refs, media_ref, report_ref, provenance_ref = stored

    report = _get(fhir_base, report_ref)
    assert report["status"] == "preliminary"
    assert [r["reference"] for r in report["result"]] == observation_refs
    assert report["media"][0]["link"]["reference"] == media_ref
    assert report["imagingStudy"] == [{"reference": f"ImagingStudy/{target.imaging_study_id}"}]
    assert report["meta"]["security"][0]["code"] == "AIAST"
    laa = _get(fhir_base, observation_refs[0])
    assert laa["valueQuantity"]["value"] == 14.2 and laa["device"]["reference"] == device_ref
    assert laa["subject"]["reference"] == target.patient_reference
    media = _get(fhir_base, media_ref)
    assert base64.b64decode(media["content"]["data"]) == emphysema_result().explanations[0].png
    device = _get(fhir_base, device_ref)
    assert {"system": constants.DEVICE_IDENTIFIER_SYSTEM, "value": "ct-emphysema@1.2.0"} in device["identifier"]
    provenance = _get(fhir_base, provenance_ref)
    assert sorted(t["reference"] for t in provenance["target"]) == sorted([*observation_refs, media_ref, report_ref])
    assert provenance["agent"][0]["who"]["reference"] == device_ref
    for resource in (report, laa, media, device, provenance):
        validate_resource(resource)  # what the server stored is still valid R4

    # Found by identifier, as the CDS service and the SMART app look for them.
    analysis_id = analysis_identifier(target.study_uid, target.series_uid, "ct-emphysema", "1.2.0")
    by_identifier = f"{constants.ANALYSIS_IDENTIFIER_SYSTEM}|{analysis_id}"
    assert _count(fhir_base, "DiagnosticReport", identifier=by_identifier) == 1

    # Re-run: the same transaction again answers with the existing resources and creates none.
    again = _transaction(fhir_base, build_results_bundle(target, emphysema_result(), EMPHYSEMA_DEVICE, issued=ISSUED))
    assert [_location_id(e) for e in again["entry"]] == stored
    assert all(e["response"]["status"].startswith("200") for e in again["entry"])
    assert _count(fhir_base, "DiagnosticReport", identifier=by_identifier) == 1
    assert _count(fhir_base, "Observation", **{"derived-from": f"ImagingStudy/{target.imaging_study_id}"}) == 3
    assert _count(fhir_base, "Media", subject=target.patient_reference) == 1
    assert _count(fhir_base, "Provenance", target=report_ref) == 1
    assert _count(fhir_base, "Device", identifier=f"{constants.DEVICE_IDENTIFIER_SYSTEM}|ct-emphysema@1.2.0") == 1


def _stored_report(server: FhirServer) -> tuple[AnalysisTarget, dict[str, Any], dict[str, Any]]:
    target = _server_target(server)
    answer = _transaction(server, build_results_bundle(target, emphysema_result(), EMPHYSEMA_DEVICE, issued=ISSUED))
    report_ref = _location_id(answer["entry"][-2])
    practitioner = _post(server, {"resourceType": "Practitioner", "name": [{"family": "Reader"}]})
    return target, _get(server, report_ref), practitioner


def test_clinician_accepts_report_and_it_becomes_final_with_provenance(fhir_base: FhirServer) -> None:
    _, report, practitioner = _stored_report(fhir_base)
    who = f"Practitioner/{practitioner['id']}"
    when = datetime(2025, 3, 5, 8, 0, tzinfo=UTC)
    bundle = build_signoff_bundle(report, who, accepted=True, reason=None, when=when)
    assert bundle["entry"][0]["request"]["ifMatch"] == f'W/"{report["meta"]["versionId"]}"'
    _transaction(fhir_base, bundle)
    signed = _get(fhir_base, f"DiagnosticReport/{report['id']}")
    assert signed["status"] == "final"
    assert signed["resultsInterpreter"] == [{"reference": who}]
    assert signed["conclusion"].endswith("AI-generated; reviewed and accepted by a clinician.")
    assert signed["meta"]["security"][0]["code"] == "AIAST"
    assert _count(fhir_base, "Provenance", target=f"DiagnosticReport/{report['id']}") == 2  # analysis + review
    review = _get(fhir_base, "Provenance", agent=who)["entry"][0]["resource"]
    assert review["agent"][0]["type"]["coding"][0]["code"] == "verifier"
    assert review["recorded"] == "2025-03-05T08:00:00.000Z"

    # A second review against the version read before is refused, not silently applied.
    response = requests.post(fhir_base.base_url, json=bundle, timeout=30)
    assert response.status_code in (409, 412), response.text


def test_clinician_rejects_report_with_a_reason(fhir_base: FhirServer) -> None:
    _, report, practitioner = _stored_report(fhir_base)
    who = f"Practitioner/{practitioner['id']}"
    when = datetime(2025, 3, 5, 8, 0, tzinfo=UTC)
    reason = "Bullae from prior surgery counted as emphysema."
    _transaction(fhir_base, build_signoff_bundle(report, who, accepted=False, reason=reason, when=when))
    rejected = _get(fhir_base, f"DiagnosticReport/{report['id']}")
    assert rejected["status"] == "entered-in-error"
    assert rejected["conclusion"].endswith(f"Rejected by the reviewing clinician: {reason}")
    assert "resultsInterpreter" not in rejected
    review = _get(fhir_base, "Provenance", agent=who)["entry"][0]["resource"]
    assert review["reason"] == [{"text": reason}]

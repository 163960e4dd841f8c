"""The R4 schema check every written resource passes: it must refuse what a lenient server would store."""

from __future__ import annotations

import json
from typing import Any

import pytest

from core.errors import ImagingCdsError
from fhir_adapters import terminology
from fhir_adapters.validation import ResourceValidationError, resource_types, validate_bundle, validate_resource


def _observation(**changes: Any) -> dict[str, Any]:
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "preliminary",
        "code": {
            "coding": [{"system": "http://imaging-cds.org/fhir/CodeSystem/measurement", "code": "laa950_percent"}]
        },
        "subject": {"reference": "Patient/123"},
        "valueQuantity": {"value": 14.2, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"},
    }
    observation.update(changes)
    return observation


def _transaction(*resources: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:00000000-0000-4000-8000-{i:012d}",
                "resource": r,
                "request": {"method": "POST", "url": r["resourceType"]},
            }
            for i, r in enumerate(resources)
        ],
    }


def test_a_correct_laa950_observation_passes() -> None:
    validate_resource(_observation())


def test_bogus_status_that_sekmet_would_store_is_refused_with_its_path() -> None:
    with pytest.raises(ResourceValidationError, match=r"\$\.status: value is not one of the allowed codes") as info:
        validate_resource(_observation(status="bogus"))
    assert info.value.problems == (
        "$.status: value is not one of the allowed codes "
        "(registered, preliminary, final, amended, corrected, cancelled, entered-in-error, unknown)",
    )
    assert info.value.http_status == 500 and isinstance(info.value, ImagingCdsError)
    assert "bug in imaging-cds" in str(info.value)


def test_offending_values_are_not_echoed_because_they_may_be_patient_data() -> None:
    with pytest.raises(ResourceValidationError, match=r"\$\.effectiveDateTime: value does not have the required"):
        validate_resource(_observation(effectiveDateTime="Jane Doe 1970"))
    with pytest.raises(ResourceValidationError) as info:
        validate_resource(_observation(effectiveDateTime="Jane Doe 1970"))
    assert "Jane" not in str(info.value)


def test_unknown_element_and_wrong_type_are_both_listed() -> None:
    broken = _observation(valueQuantity={"value": "14.2", "unit": "%"}, laa950=14.2)
    with pytest.raises(ResourceValidationError, match=r"unknown element\(s\) 'laa950'") as info:
        validate_resource(broken)
    assert "$.valueQuantity.value: must be of JSON type number" in info.value.problems


def test_missing_required_element_is_named() -> None:
    media = {"resourceType": "Media", "status": "completed"}
    with pytest.raises(ResourceValidationError, match=r"\$: 'content' is a required property"):
        validate_resource(media)


def test_unknown_resource_type_is_refused() -> None:
    with pytest.raises(ResourceValidationError, match=r"\$\.resourceType: missing or not an R4 resource type"):
        validate_resource({"resourceType": "ImagingSelection"})  # R5 only
    assert {"DiagnosticReport", "Observation", "Media", "Device", "Provenance"} <= resource_types()


def test_bundle_problems_name_the_entry() -> None:
    bundle = _transaction(_observation(), _observation(status="bogus"))
    bundle["entry"][0]["request"]["method"] = "UPSERT"
    with pytest.raises(ResourceValidationError, match=r"\$\.entry\[1\]\.resource\.status") as info:
        validate_bundle(bundle)
    assert info.value.problems[0].startswith("$.entry[0].request.method: value is not one of the allowed codes")
    assert len(info.value.problems) == 2


def test_validate_resource_of_a_bundle_checks_its_entries() -> None:
    with pytest.raises(ResourceValidationError, match=r"\$\.entry\[0\]\.resource\.status"):
        validate_resource(_transaction(_observation(status="bogus")))


def test_a_correct_transaction_passes() -> None:
    validate_bundle(_transaction(_observation(), _observation(status="final")))


@pytest.mark.parametrize("name", terminology.codesystem_names())
def test_shipped_codesystems_are_valid_r4(name: str) -> None:
    codesystem = terminology.load_codesystem(name)
    validate_resource(codesystem)
    assert codesystem["url"].startswith("http://imaging-cds.org/fhir/CodeSystem/")
    # Round-trips as plain JSON: what a terminology server would be sent.
    assert json.loads(json.dumps(codesystem)) == codesystem


def test_resources_of_one_shape_pass_or_fail_alike_so_volume_resources_are_checked_once_per_shape() -> None:
    """AuditEvents are made per request; checking each one fully would cost more than the request it records."""
    from fhir_adapters.audit import Actor, AuditSource, rest_event
    from fhir_adapters.validation import _shape, validate_resource_by_shape

    def event(patient: str, recorded: str = "2026-01-02T03:04:05.678Z") -> dict[str, Any]:
        actor = Actor("imaging-cds", "10.0.0.1", "Practitioner/1")
        return rest_event(
            "read", actor=actor, server="https://ehr/fhir", source=AuditSource("site"), patient=patient,
            data="ImagingStudy/7", recorded=recorded,
        )  # fmt: skip

    first, second = event("Patient/1"), event("Patient/abc-2")
    first["id"], second["id"] = "0c4f0e1e-0000-4000-8000-000000000001", "9d1a2b3c-1111-4111-8111-111111111112"
    assert _shape(first) == _shape(second)  # different patients and ids, one shape
    validate_resource_by_shape(first)
    validate_resource_by_shape(second)
    for broken in ({**first, "outcome": "maybe"}, {**first, "action": "X"}, event("Patient/1", "2026-13-40T00:00:00Z")):
        assert _shape(broken) != _shape(first)  # an enum or a pattern that differs is another shape ...
        with pytest.raises(ResourceValidationError):  # ... checked, and refused
            validate_resource_by_shape(broken)

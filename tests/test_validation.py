"""The R4 schema check every written resource passes: it must refuse what a lenient server would store."""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Iterator
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


def test_audit_events_are_each_checked_in_full_and_broken_ones_refused() -> None:
    """AuditEvents are made per request, so each check must cost a fraction of the request: every event goes
    through the compiled check, and one it refuses through jsonschema for the reasons."""
    from fhir_adapters.audit import Actor, AuditSource, rest_event

    def event(patient: str, recorded: str = "2026-01-02T03:04:05.678Z") -> dict[str, Any]:
        actor = Actor("imaging-cds", "10.0.0.1", "Practitioner/1")
        return rest_event(
            "read", actor=actor, server="https://ehr/fhir", source=AuditSource("site"), patient=patient,
            data="ImagingStudy/7", recorded=recorded,
        )  # fmt: skip

    first, second = event("Patient/1"), event("Patient/abc-2")
    first["id"], second["id"] = "0c4f0e1e-0000-4000-8000-000000000001", "9d1a2b3c-1111-4111-8111-111111111112"
    validate_resource(first)
    validate_resource(second)
    for broken in ({**first, "outcome": "maybe"}, {**first, "action": "X"}, event("Patient/1", "2026-13-40T00:00:00Z")):
        with pytest.raises(ResourceValidationError):
            validate_resource(broken)


# --------------------------------------------------------------------------------- the compiled check


def _results_bundle() -> dict[str, Any]:
    """A real results transaction: device, observations, key image Media, report and provenance."""
    from test_builders import EMPHYSEMA_DEVICE, ISSUED, _target, emphysema_result

    from fhir_adapters.builders import build_results_bundle

    return build_results_bundle(_target(), emphysema_result(), EMPHYSEMA_DEVICE, issued=ISSUED)


def _nodule_bundle() -> dict[str, Any]:
    """A results transaction that lists findings (lung nodules) and exam-level assessments."""
    from test_builders import ISSUED, _target
    from test_builders_findings import DEVICE, nodule_result

    from fhir_adapters.builders import build_results_bundle

    return build_results_bundle(_target(), nodule_result(), DEVICE, issued=ISSUED)


def test_a_bogus_status_in_any_entry_of_a_results_bundle_is_refused_with_its_path() -> None:
    """What sekmet-fhir would store is refused in every resource of an analysis' transaction whose status the R4
    schema enumerates (Media.status is a bare ``code`` there: the schema cannot refuse it, now as before)."""
    from fhir_adapters.validation import load_schema

    definitions = load_schema()["definitions"]
    bundle = _results_bundle()
    validate_bundle(bundle)
    checked = set()
    for index, entry in enumerate(bundle["entry"]):
        resource_type = entry["resource"]["resourceType"]
        codes = definitions[resource_type]["properties"].get("status", {}).get("enum")
        if "status" not in entry["resource"] or codes is None:
            continue
        broken = copy.deepcopy(bundle)
        broken["entry"][index]["resource"]["status"] = "bogus"
        with pytest.raises(ResourceValidationError) as info:
            validate_bundle(broken)
        assert info.value.problems == (
            f"$.entry[{index}].resource.status: value is not one of the allowed codes ({', '.join(codes)})",
        )
        with pytest.raises(ResourceValidationError, match=rf"^{resource_type} does not conform .*: \$\.status"):
            validate_resource(broken["entry"][index]["resource"])
        checked.add(resource_type)
    assert checked == {"Device", "Observation", "DiagnosticReport"}


def _mutations(resource: Any, rng: random.Random) -> Iterator[Any]:
    """Copies of ``resource`` with one element changed the ways a builder bug would change it."""
    paths: list[tuple[Any, ...]] = []

    def walk(node: Any, path: tuple[Any, ...]) -> None:
        paths.append(path)
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, (*path, key))
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, (*path, index))

    walk(resource, ())
    replacements: list[Any] = [
        "bogus", "", "  ", "a\u0000b", "2026-13-40", "2026-01-02T03:04:05Z", "urn:uuid:x", 0, 1.5, -3, True, None,
        [], {}, ["x"], {"x": 1}, {"text": "t"}, [{"text": "t"}],
    ]  # fmt: skip
    for path in rng.sample(paths, min(len(paths), 60)):
        for replacement in rng.sample(replacements, 6):
            yield _replaced(resource, path, replacement)
        parent = path[:-1]
        if path and isinstance(path[-1], str):
            yield _replaced(resource, parent, None, drop=path[-1])  # an element missing
        yield _replaced(resource, path, None, add=("unknownElement", 1))  # an element the schema does not know
        yield _replaced(resource, path, None, wrap=True)  # one value where a list is expected, or the reverse


def _replaced(
    resource: Any, path: tuple[Any, ...], value: Any, *, drop: str | None = None, add: tuple[str, Any] | None = None,
    wrap: bool = False,
) -> Any:  # fmt: skip
    changed = copy.deepcopy(resource)
    if not path and not (drop or add or wrap):
        return value
    parent = changed
    for key in path[:-1] if path else ():
        parent = parent[key]
    target = parent[path[-1]] if path else changed
    if drop is not None:
        target.pop(drop, None)
    elif add is not None:
        if isinstance(target, dict):
            target[add[0]] = add[1]
    elif wrap:
        if path:
            parent[path[-1]] = target[0] if isinstance(target, list) and target else [target]
    else:
        parent[path[-1]] = value
    return changed


def test_the_compiled_check_decides_as_jsonschema_on_thousands_of_broken_resources() -> None:
    """The fast check only decides whether a resource passes (jsonschema still says why one does not), so it must
    never pass what jsonschema refuses, nor refuse what it passes: compared on a results transaction's own
    structure and every resource in it, an AuditEvent and the shipped CodeSystems, each broken thousands of ways."""
    from fhir_adapters.audit import Actor, AuditSource, rest_event
    from fhir_adapters.validation import _BUNDLE_SHELL, _check, _validator

    rng = random.Random(19)
    bundle = _results_bundle()
    for mutated in _mutations(bundle, rng):
        expected = _validator(_BUNDLE_SHELL).is_valid(mutated)
        assert _check(_BUNDLE_SHELL)(mutated) == expected, mutated
    resources = [e["resource"] for e in bundle["entry"]]
    resources += [e["resource"] for e in _nodule_bundle()["entry"] if e["resource"]["resourceType"] == "Observation"]
    event = rest_event(
        "read", actor=Actor("imaging-cds", "10.0.0.1", "Practitioner/1"), server="https://ehr/fhir",
        source=AuditSource("site"), patient="Patient/1", data="ImagingStudy/7", recorded="2026-01-02T03:04:05Z",
    )  # fmt: skip
    resources += [event, *(terminology.load_codesystem(n) for n in terminology.codesystem_names())]
    compared = refused = 0
    for resource in resources:
        resource_type = resource["resourceType"]
        for mutated in _mutations(resource, rng):
            if not isinstance(mutated, dict):
                continue
            expected = _validator(resource_type).is_valid(mutated)
            assert _check(resource_type)(mutated) == expected, (resource_type, mutated)
            compared += 1
            refused += not expected
    assert compared > 3000 and refused > compared // 3  # most mutations break the resource; some do not

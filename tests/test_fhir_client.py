"""The typed FHIR client against the REAL sekmet-fhir server, with a fault-injecting proxy for retries.

The proxy (``tests/fhir_client_support.py``) forwards to the real server and only answers by itself where a
test injects a failure (a 500, a delay), so the client is exercised end to end.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from fhir_client_support import Action, Plan, fault_proxy

from core.allowlist import AllowList
from core.errors import NotAllowedError
from devtools.servers import FhirServer, free_port
from fhir_adapters.client import FhirClient
from fhir_adapters.errors import (
    FhirConflict,
    FhirError,
    FhirInvalid,
    FhirNotFound,
    FhirServerError,
    FhirUnavailable,
)

MRN_SYSTEM = "urn:oid:1.2.36.146.595.217.0.1"


@pytest.fixture()
def client(fhir_base: FhirServer) -> FhirClient:
    return FhirClient(fhir_base.base_url, backoff=0.01)


def _patient(mrn: str, **extra: object) -> dict[str, object]:
    return {"resourceType": "Patient", "identifier": [{"system": MRN_SYSTEM, "value": mrn}], **extra}


def _fail_first(n: int, status: int = 500) -> Plan:
    return lambda index, method, path: Action(status=status) if index < n else None


@pytest.fixture()
def mrn() -> Iterator[str]:
    yield f"MRN-{uuid.uuid4().hex[:12]}"


def test_capability_statement_is_fhir_r4(client: FhirClient) -> None:
    statement = client.capability_statement()
    assert statement["resourceType"] == "CapabilityStatement"
    assert statement["fhirVersion"].startswith("4.0")


def test_create_then_read_returns_the_stored_patient(client: FhirClient, mrn: str) -> None:
    created = client.create(_patient(mrn, gender="female", birthDate="1950-03-01"))
    read = client.read("Patient", created["id"])
    assert read["identifier"][0]["value"] == mrn
    assert read["birthDate"] == "1950-03-01"
    assert client.read_reference(f"Patient/{created['id']}")["id"] == created["id"]
    assert client.read_reference(f"{client.base_url}/Patient/{created['id']}")["id"] == created["id"]


def test_conditional_create_finds_the_existing_patient_instead_of_duplicating(client: FhirClient, mrn: str) -> None:
    first = client.create(_patient(mrn), if_none_exist=f"identifier={MRN_SYSTEM}|{mrn}")
    second = client.create(_patient(mrn), if_none_exist=f"identifier={MRN_SYSTEM}|{mrn}")
    assert first["id"] == second["id"]
    assert len(list(client.search("Patient", {"identifier": f"{MRN_SYSTEM}|{mrn}"}))) == 1


def test_update_puts_the_resource_at_its_deterministic_id(client: FhirClient) -> None:
    resource_id = f"det-{uuid.uuid4().hex[:16]}"
    client.update({"resourceType": "Patient", "id": resource_id, "gender": "male"})
    updated = client.update({"resourceType": "Patient", "id": resource_id, "gender": "female"})
    assert updated["meta"]["versionId"] == "2"
    assert client.read("Patient", resource_id)["gender"] == "female"


def test_search_follows_next_links_across_pages(client: FhirClient) -> None:
    family = f"Paging{uuid.uuid4().hex[:8]}"
    for n in range(5):
        client.create({"resourceType": "Patient", "name": [{"family": family, "given": [f"G{n}"]}]})
    first_page = client.search_bundle("Patient", {"family": family, "_count": 2})
    assert len(first_page["entry"]) == 2
    everyone = list(client.search("Patient", {"family": family, "_count": 2}))
    assert sorted(p["name"][0]["given"][0] for p in everyone) == ["G0", "G1", "G2", "G3", "G4"]


def test_search_bundle_keeps_included_resources_and_search_yields_only_matches(client: FhirClient, mrn: str) -> None:
    patient = client.create(_patient(mrn))
    client.create(
        {
            "resourceType": "ImagingStudy",
            "status": "available",
            "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:2.25.{uuid.uuid4().int}"}],
            "subject": {"reference": f"Patient/{patient['id']}"},
        }
    )
    params = {"subject": f"Patient/{patient['id']}", "_include": "ImagingStudy:subject"}
    bundle = client.search_bundle("ImagingStudy", params)
    assert sorted(e["resource"]["resourceType"] for e in bundle["entry"]) == ["ImagingStudy", "Patient"]
    assert [r["resourceType"] for r in client.search("ImagingStudy", params)] == ["ImagingStudy"]


def test_a_missing_resource_is_fhir_not_found(client: FhirClient) -> None:
    with pytest.raises(FhirNotFound, match=r"read Patient/no-such-patient failed with HTTP 404"):
        client.read("Patient", "no-such-patient")


def test_a_deleted_resource_is_fhir_not_found(client: FhirClient, fhir_base: FhirServer) -> None:
    created = client.create({"resourceType": "Patient"})
    client.session.delete(f"{fhir_base.base_url}/Patient/{created['id']}", timeout=10).raise_for_status()
    with pytest.raises(FhirNotFound, match="HTTP 410"):
        client.read("Patient", created["id"])


def test_an_invalid_resource_is_fhir_invalid_and_names_the_element_not_the_value(client: FhirClient) -> None:
    with pytest.raises(FhirInvalid, match=r"create Patient failed with HTTP 400: .*Patient\.favouriteColour") as info:
        client.create({"resourceType": "Patient", "favouriteColour": "Jane Doe's secret"})
    assert "Jane Doe" not in str(info.value)
    assert info.value.status == 400
    assert info.value.operation_outcome is not None
    assert info.value.operation_outcome["issue"][0]["severity"] == "error"


def test_a_bad_id_is_refused_before_any_request(client: FhirClient) -> None:
    with pytest.raises(FhirInvalid, match="is not a valid FHIR id"):
        client.read("Patient", "../metadata")


def test_transaction_creates_linked_resources_and_replays_idempotently(client: FhirClient, mrn: str) -> None:
    report_id = f"urn:uuid:{uuid.uuid4()}"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:11111111-1111-4111-8111-111111111111",
                "resource": _patient(mrn),
                "request": {"method": "POST", "url": "Patient", "ifNoneExist": f"identifier={MRN_SYSTEM}|{mrn}"},
            },
            {
                "fullUrl": report_id,
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "identifier": [{"system": "urn:test:obs", "value": mrn}],
                    "code": {"text": "LAA-950"},
                    "subject": {"reference": "urn:uuid:11111111-1111-4111-8111-111111111111"},
                    "valueQuantity": {"value": 12.5, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"},
                },
                "request": {"method": "POST", "url": "Observation", "ifNoneExist": f"identifier=urn:test:obs|{mrn}"},
            },
        ],
    }
    first = client.transaction(bundle)
    assert [e["response"]["status"].split()[0] for e in first["entry"]] == ["201", "201"]
    again = client.transaction(bundle)
    assert [e["response"]["status"].split()[0] for e in again["entry"]] == ["200", "200"]
    observation = next(client.search("Observation", {"identifier": f"urn:test:obs|{mrn}"}))
    patient = next(client.search("Patient", {"identifier": f"{MRN_SYSTEM}|{mrn}"}))
    assert observation["subject"]["reference"].endswith(f"Patient/{patient['id']}")


def test_a_failed_transaction_raises_and_stores_nothing(client: FhirClient, mrn: str) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": _patient(mrn), "request": {"method": "POST", "url": "Patient"}},
            {
                "resource": {"resourceType": "Observation", "status": 5},
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }
    with pytest.raises(FhirInvalid, match=r"transaction of 2 entries failed with HTTP 400: .*Observation\.status"):
        client.transaction(bundle)
    assert list(client.search("Patient", {"identifier": f"{MRN_SYSTEM}|{mrn}"})) == []


def test_only_transaction_bundles_are_posted_as_transactions(client: FhirClient) -> None:
    with pytest.raises(FhirInvalid, match="type 'transaction'"):
        client.transaction({"resourceType": "Bundle", "type": "batch", "entry": []})


# ------------------------------------------------------------------ retries through the fault-injecting proxy


def test_a_server_that_answers_500_then_200_is_retried(fhir_base: FhirServer, mrn: str) -> None:
    patient = FhirClient(fhir_base.base_url).create(_patient(mrn))
    with fault_proxy(fhir_base.base_url, _fail_first(2)) as proxy:
        client = FhirClient(proxy.base_url, retries=3, backoff=0.01)
        assert client.read("Patient", patient["id"])["identifier"][0]["value"] == mrn
        assert proxy.count == 3  # two injected 500s, then the real answer


def test_a_persistent_500_ends_in_fhir_server_error_after_retries_attempts(fhir_base: FhirServer) -> None:
    with fault_proxy(fhir_base.base_url, lambda i, m, p: Action(status=500)) as proxy:
        client = FhirClient(proxy.base_url, retries=4, backoff=0.01)
        with pytest.raises(FhirServerError, match=r"HTTP 500.*after 4 attempts") as info:
            client.read("Patient", "whatever")
        assert info.value.retryable
        assert proxy.count == 4


def test_a_400_is_not_retried(fhir_base: FhirServer) -> None:
    with fault_proxy(fhir_base.base_url, lambda i, m, p: None) as proxy:
        client = FhirClient(proxy.base_url, retries=5, backoff=0.01)
        with pytest.raises(FhirInvalid, match="HTTP 400"):
            client.update({"resourceType": "Patient", "id": "no-retry", "gender": ["not", "a", "code"]})
        assert proxy.count == 1


def test_a_412_conflict_is_not_retried(fhir_base: FhirServer) -> None:
    with fault_proxy(fhir_base.base_url, lambda i, m, p: Action(status=412)) as proxy:
        client = FhirClient(proxy.base_url, retries=5, backoff=0.01)
        with pytest.raises(FhirConflict, match="HTTP 412"):
            client.update({"resourceType": "Patient", "id": "conflict"})
        assert proxy.count == 1


def test_a_plain_create_is_never_retried_so_it_cannot_duplicate(fhir_base: FhirServer) -> None:
    with fault_proxy(fhir_base.base_url, _fail_first(1)) as proxy:
        client = FhirClient(proxy.base_url, retries=3, backoff=0.01)
        with pytest.raises(FhirServerError, match="create Patient failed with HTTP 500"):
            client.create({"resourceType": "Patient"})
        assert proxy.count == 1


def test_a_conditional_create_and_a_transaction_are_retried(fhir_base: FhirServer, mrn: str) -> None:
    with fault_proxy(fhir_base.base_url, lambda i, m, p: Action(status=503) if i in (0, 2) else None) as proxy:
        client = FhirClient(proxy.base_url, retries=3, backoff=0.01)
        created = client.create(_patient(mrn), if_none_exist=f"identifier={MRN_SYSTEM}|{mrn}")
        assert proxy.count == 2
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "resource": _patient(mrn),
                    "request": {"method": "POST", "url": "Patient", "ifNoneExist": f"identifier={MRN_SYSTEM}|{mrn}"},
                }
            ],
        }
        response = client.transaction(bundle)
        assert proxy.count == 4
        assert response["entry"][0]["response"]["location"].split("/")[-3] == created["id"]


def test_a_timeout_is_retried_and_then_succeeds(fhir_base: FhirServer) -> None:
    # Timeout well above a normal answer even on a loaded 2-core machine; the delay well above the timeout.
    with fault_proxy(fhir_base.base_url, lambda i, m, p: Action(delay=6.0) if i == 0 else None) as proxy:
        client = FhirClient(proxy.base_url, timeout=3.0, retries=2, backoff=0.01)
        assert client.capability_statement()["resourceType"] == "CapabilityStatement"
        assert proxy.count == 2


def test_an_unreachable_server_is_fhir_unavailable_after_retries() -> None:
    client = FhirClient(f"http://127.0.0.1:{free_port()}/fhir", retries=2, backoff=0.01)
    with pytest.raises(FhirUnavailable, match=r"could not connect.*after 2 attempts") as info:
        client.read("Patient", "x")
    assert info.value.retryable


# ------------------------------------------------------------------ other origins


def test_next_links_to_another_origin_are_refused_unless_allowed(fhir_base: FhirServer) -> None:
    family = f"Origin{uuid.uuid4().hex[:8]}"
    for _ in range(3):
        FhirClient(fhir_base.base_url).create({"resourceType": "Patient", "name": [{"family": family}]})
    # Through the proxy, the real server's next links point at the server's own port: another origin.
    with fault_proxy(fhir_base.base_url, lambda i, m, p: None) as proxy:
        client = FhirClient(proxy.base_url)
        results = client.search("Patient", {"family": family, "_count": 2})
        assert len([next(results), next(results)]) == 2
        with pytest.raises(NotAllowedError, match=r"'next' link .* outside the FHIR server"):
            next(results)
        allowed = FhirClient(proxy.base_url, allow_list=AllowList.of([proxy.base_url, fhir_base.base_url]))
        assert len(list(allowed.search("Patient", {"family": family, "_count": 2}))) == 3


def test_an_absolute_reference_elsewhere_needs_the_allow_list_and_no_request_is_made(fhir_base: FhirServer) -> None:
    with fault_proxy(fhir_base.base_url, lambda i, m, p: None) as elsewhere:
        client = FhirClient(fhir_base.base_url)
        with pytest.raises(NotAllowedError, match="outside the FHIR server"):
            client.read_reference(f"{elsewhere.base_url}/Patient/x")
        fenced = FhirClient(fhir_base.base_url, allow_list=AllowList.of([fhir_base.base_url]))
        with pytest.raises(NotAllowedError, match="not on this service's allow-list"):
            fenced.read_reference(f"{elsewhere.base_url}/Patient/x")
        assert elsewhere.count == 0


def test_the_choke_point_maps_a_redirect_to_an_error(fhir_base: FhirServer) -> None:
    with fault_proxy(fhir_base.base_url, lambda i, m, p: Action(status=302)) as proxy:
        with pytest.raises(FhirError, match=r"HTTP 302.*Redirects are not followed"):
            FhirClient(proxy.base_url).read("Patient", "x")
        assert proxy.count == 1

"""Audit: each access to patient data becomes a BALP-shaped R4 AuditEvent in the EHR, through a durable outbox.

The hooks are called as an EHR calls them (signed CDS client JWTs, prefetch from the real FHIR server), the
AuditEvents are read back from the real sekmet-fhir server, and the outbox is tested against a killed
``imaging-cds serve`` process and an audit repository that is down. (The browser flow's AuditEvents are checked
in ``tests/test_smart_browser.py``.)
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
from joserfc import jwk

from cds.app import create_app
from cds.services import ORDER_SELECT, ORDER_SIGN, PATIENT_VIEW, SERVICES
from devtools.servers import FhirServer, free_port
from fhir_adapters.audit import Actor, AuditSource, cds_hook_event, dicom_transfer_event, rest_event
from fhir_adapters.client import FhirClient
from fhir_adapters.validation import ResourceValidationError, validate_resource
from pipeline.audit import AuditDrainer, AuditOutbox, FhirAuditDelivery, audit_recorder
from tests.cds_support import (
    EHR_ISS,
    EhrKeys,
    bone_result,
    create_study,
    emphysema_result,
    make_config,
    post_result,
    prefetch_for,
)
from tests.fork_support import succeeds_in_a_forked_child
from tests.serve_support import base_settings, cds_jwt, kill_hard, serving

SOURCE = AuditSource(site="imaging-cds.hospital.example")
APP = Actor("imaging-cds-clinician", "10.1.2.3", "Practitioner/77")
PATIENT_NAME = "Quillfeather"


def _codes(event: dict[str, Any], element: str) -> list[str]:
    return [c["code"] for c in event[element]["coding"]] if "coding" in event.get(element, {}) else []


def _agent_roles(event: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["type"]["coding"][0]["code"]: a for a in event["agent"]}


# ---------------------------------------------------------------------------------------------- builders


def test_a_read_names_the_client_as_destination_and_a_search_as_source_as_balp_does() -> None:
    read = rest_event(
        "read", actor=APP, server="https://ehr/fhir", source=SOURCE, patient="Patient/1", data="ImagingStudy/9"
    )
    query = rest_event(
        "search-type",
        actor=APP,
        server="https://ehr/fhir",
        source=SOURCE,
        patient="Patient/1",
        query="GET ImagingStudy?patient=1",
    )
    create = rest_event(
        "create", actor=APP, server="https://ehr/fhir", source=SOURCE, patient="Patient/1", data="DiagnosticReport/5"
    )
    for event, profile, action in (
        (read, "PatientRead", "R"),
        (query, "PatientQuery", "E"),
        (create, "PatientCreate", "C"),
    ):
        validate_resource(event)
        assert event["meta"]["profile"] == [
            f"https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.{profile}"
        ]
        assert event["action"] == action and event["outcome"] == "0" and event["type"]["code"] == "rest"
    # Data flows from the server on a read (the server is the Source Role ID), from the client on a search/create.
    assert _agent_roles(read)["110152"]["who"]["identifier"]["value"] == "imaging-cds-clinician"
    assert _agent_roles(query)["110153"]["who"]["identifier"]["value"] == "imaging-cds-clinician"
    assert _agent_roles(create)["110153"]["network"] == {"address": "10.1.2.3", "type": "2"}
    user = _agent_roles(read)["IRCP"]
    assert user["who"] == {"reference": "Practitioner/77"} and user["requestor"] is True
    assert _agent_roles(create)["AUT"]["who"] == {"reference": "Practitioner/77"}
    recorded = base64.b64decode(next(e["query"] for e in query["entity"] if "query" in e)).decode()
    assert recorded == "GET ImagingStudy?patient=1"
    patient = next(e for e in read["entity"] if e["role"]["code"] == "1")
    assert patient["what"] == {"reference": "Patient/1"} and patient["type"]["code"] == "1"


def test_a_refused_access_is_recorded_as_a_failure_without_claiming_a_balp_profile() -> None:
    refused = rest_event(
        "read",
        actor=APP,
        server="https://ehr/fhir",
        source=SOURCE,
        data="Patient/1",
        outcome="4",
        failure="FhirForbidden (HTTP 403)",
    )
    validate_resource(refused)
    assert refused["outcome"] == "4" and refused["outcomeDesc"] == "FhirForbidden (HTTP 403)" and "meta" not in refused


def test_dicom_and_hook_events_are_valid_r4_and_carry_references_only() -> None:
    transfer = dicom_transfer_event(
        actor=APP,
        pacs="https://pacs/dicom-web",
        source=SOURCE,
        patient="Patient/1",
        imaging_study="ImagingStudy/9",
        study_uid="1.2.3",
        series_uid="1.2.3.4",
    )
    hook = cds_hook_event(
        hook="patient-view",
        service_url="https://cds/cds-services/imaging-ai-patient-view",
        client=Actor(EHR_ISS, "10.0.0.9", "Practitioner/5"),
        source=SOURCE,
        patient="Patient/1",
        prefetch={"aiReports": "DiagnosticReport?patient=1"},
        reports=["DiagnosticReport/5"],
        hook_instance="h-1",
    )
    for event in (transfer, hook):
        validate_resource(event)
    assert transfer["type"]["code"] == "110104" and transfer["action"] == "R"
    uids = [e["what"]["identifier"]["value"] for e in transfer["entity"] if "identifier" in e["what"]]
    assert uids == ["urn:oid:1.2.3", "urn:oid:1.2.3.4"]
    assert hook["subtype"] == [
        {"system": "https://cds-hooks.org/hooks", "code": "patient-view", "display": "patient-view"}
    ]
    assert _agent_roles(hook)["110153"]["who"]["identifier"]["value"] == EHR_ISS


# ---------------------------------------------------------------------------------------------- the hooks


def _events_for(fhir_base: FhirServer, patient: str) -> list[dict[str, Any]]:
    client = FhirClient(fhir_base.base_url, session=requests.Session())
    return list(client.search("AuditEvent", {"patient": f"Patient/{patient}", "_count": "200"}))


def _hook_event(events: list[dict[str, Any]], hook_instance: str) -> dict[str, Any]:
    found = [
        e
        for e in events
        if e["type"]["code"] == "110110"
        and any(x.get("what", {}).get("identifier", {}).get("value") == hook_instance for x in e["entity"])
    ]
    assert len(found) == 1, f"{len(found)} hook events for {hook_instance}"
    return found[0]


@pytest.fixture(scope="module")
def analysed_patient(fhir_base: FhirServer) -> tuple[str, str, str]:
    """A patient whose chest CT has an emphysema and a bone AI result in the real FHIR server."""
    base = fhir_base.base_url
    named = {
        "resourceType": "Patient",
        "name": [{"family": PATIENT_NAME, "given": ["Audit"]}],
        "birthDate": "1950-02-03",
    }
    patient = str(requests.post(f"{base}/Patient", json=named, timeout=30).json()["id"])
    started = "2025-06-01T09:30:00Z"
    study = create_study(base, patient, started=started)
    emphysema = post_result(base, patient, study, emphysema_result(12.4), started=started)
    bone = post_result(base, patient, study, bone_result(86.0), started=started)
    return patient, emphysema, bone


def test_each_hook_leaves_its_audit_event_in_the_fhir_server(
    tmp_path: Path, fhir_base: FhirServer, analysed_patient: tuple[str, str, str]
) -> None:
    patient, emphysema, bone = analysed_patient
    keys = EhrKeys()
    audit = audit_recorder(tmp_path, site="cds.hospital.example", destination=FhirClient(fhir_base.base_url))
    app = create_app(make_config(tmp_path, keys, fhir_base.base_url, recent_days=3650, audit=audit)).test_client()
    order = {
        "resourceType": "ServiceRequest",
        "id": "draft-1",
        "status": "draft",
        "intent": "order",
        "code": {"coding": [{"system": "http://loinc.org", "code": "24627-2", "display": "CT Chest"}]},
        "subject": {"reference": f"Patient/{patient}"},
    }
    context = {"patientId": patient, "userId": "Practitioner/ordering-1"}
    orders = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": order}]}
    calls = {
        PATIENT_VIEW: {**context},
        ORDER_SELECT: {**context, "selections": ["ServiceRequest/draft-1"], "draftOrders": orders},
        ORDER_SIGN: {**context, "draftOrders": orders},
    }
    instances: dict[str, str] = {}
    for service_id, hook_context in calls.items():
        instance = str(uuid.uuid4())
        instances[service_id] = instance
        body = {
            "hook": SERVICES[service_id].hook,
            "hookInstance": instance,
            "context": hook_context,
            "prefetch": prefetch_for(fhir_base.base_url, service_id, patient),
        }
        path = f"/cds-services/{service_id}"
        answer = app.post(path, json=body, headers={"Authorization": f"Bearer {keys.sign(path)}"})
        assert answer.status_code == 200, answer.get_json()
    # The same hook asked to fetch from a fhirServer that is not on the allow-list: refused, and recorded as such.
    refused = str(uuid.uuid4())
    path = f"/cds-services/{PATIENT_VIEW}"
    answer = app.post(
        path,
        json={
            "hook": "patient-view",
            "hookInstance": refused,
            "context": context,
            "fhirServer": "https://elsewhere.example/fhir",
        },
        headers={"Authorization": f"Bearer {keys.sign(path)}"},
    )
    assert answer.status_code == 403
    # Each answer left after its event was committed to the outbox; the drainer thread sends them on its own time.
    assert audit.drainer is not None
    audit.drainer.stop(drain=True)
    assert audit.outbox.pending() == 0

    events = _events_for(fhir_base, patient)
    for service_id, instance in instances.items():
        event = _hook_event(events, instance)
        validate_resource(event)
        assert event["subtype"][0]["code"] == SERVICES[service_id].hook and event["outcome"] == "0"
        roles = _agent_roles(event)
        assert roles["110153"]["who"]["identifier"]["value"] == EHR_ISS  # who: the CDS client, by its iss
        assert roles["110153"]["network"]["address"] == "127.0.0.1"  # from where
        assert roles["110152"]["who"]["identifier"]["value"].endswith(f"/cds-services/{service_id}")
        assert roles["IRCP"]["who"] == {"reference": "Practitioner/ordering-1"}
        reports = {e["what"]["reference"] for e in event["entity"] if e.get("role", {}).get("code") == "3"}
        assert reports == {emphysema, bone}  # what: the AI results the cards were built from
        assert PATIENT_NAME not in json.dumps(event)  # references only, never the patient's details
    failed = _hook_event(events, refused)
    assert failed["outcome"] == "4" and "NotAllowedError" in failed["outcomeDesc"]


def test_a_hook_that_fetches_from_the_fhir_server_records_each_search(
    tmp_path: Path, fhir_base: FhirServer, analysed_patient: tuple[str, str, str]
) -> None:
    patient, _, _ = analysed_patient
    keys = EhrKeys()
    # Recording only: a drainer would send (and remove) events from the outbox while this test reads it.
    audit = audit_recorder(tmp_path, site="cds.hospital.example", destination=None)
    app = create_app(make_config(tmp_path, keys, fhir_base.base_url, recent_days=3650, audit=audit)).test_client()
    instance = str(uuid.uuid4())
    path = f"/cds-services/{PATIENT_VIEW}"
    body = {
        "hook": "patient-view",
        "hookInstance": instance,
        "context": {"patientId": patient, "userId": "Practitioner/ordering-2"},
        "fhirServer": fhir_base.base_url,
        "fhirAuthorization": {
            "access_token": "ehr-issued",
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "x",
            "subject": "cds",
        },
    }
    assert app.post(path, json=body, headers={"Authorization": f"Bearer {keys.sign(path)}"}).status_code == 200
    searches = [e for e in audit.outbox.events() if e["type"]["code"] == "rest"]
    assert {
        base64.b64decode(next(x["query"] for x in e["entity"] if "query" in x)).decode().split("?")[0] for e in searches
    } == {
        "GET DiagnosticReport",
        "GET ImagingStudy",
    }
    for event in searches:  # this service searched, for the hook's clinician, the EHR's FHIR server
        roles = _agent_roles(event)
        assert roles["110153"]["who"]["identifier"]["value"] == "https://cds.example.org"
        assert roles["110152"]["network"]["address"] == fhir_base.base_url
        assert roles["IRCP"]["who"] == {"reference": "Practitioner/ordering-2"}
        assert event["meta"]["profile"][0].endswith("PatientQuery")


# ---------------------------------------------------------------------------------------------- the outbox


def _closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}/fhir"  # nothing listens there: the repository is down


def test_an_unreachable_repository_loses_nothing_and_the_events_are_sent_once_it_is_back(
    tmp_path: Path, fhir_base: FhirServer
) -> None:
    now = [1000.0]
    outbox = AuditOutbox(tmp_path / "audit-outbox.sqlite", clock=lambda: now[0])
    down = AuditDrainer(outbox, FhirAuditDelivery(FhirClient(_closed_port_url(), retries=1, timeout=2)))
    patient = f"Patient/outbox-{uuid.uuid4().hex[:8]}"
    events = [
        rest_event(
            "read", actor=APP, server="https://ehr/fhir", source=SOURCE, patient=patient, data=f"ImagingStudy/{n}"
        )
        for n in range(3)
    ]
    for event in events:
        outbox.record(event)
    report = down.drain_once()
    assert (report.delivered, report.retried) == (0, 3) and outbox.pending() == 3
    assert down.drain_once().retried == 0  # backing off: not due again yet
    now[0] += 2.5
    up = AuditDrainer(outbox, FhirAuditDelivery(FhirClient(fhir_base.base_url)))
    assert up.drain_once().delivered == 3 and outbox.pending() == 0
    stored = list(FhirClient(fhir_base.base_url).search("AuditEvent", {"patient": patient}))
    assert sorted(e["id"] for e in stored) == sorted(e["id"] for e in events)
    # Sent again (an answer lost, two drainers racing), an event is stored once: PUT to its own id.
    outbox.record(events[0])
    assert up.drain_once().delivered == 1
    assert len(list(FhirClient(fhir_base.base_url).search("AuditEvent", {"patient": patient}))) == 3


def test_a_web_worker_forked_while_the_drainer_writes_the_outbox_can_still_record(tmp_path: Path) -> None:
    # serve builds the app, and starts the audit drainer thread, in gunicorn's master, then forks the web worker.
    # A worker forked in the middle of a drainer's write inherited SQLite's note that its process holds the lock,
    # so it could never record an audit event ("database is locked"): the fork now waits for the write to end.
    outbox = AuditOutbox(tmp_path / "audit-outbox.sqlite")
    writing, go_on = threading.Event(), threading.Event()

    def claim_slowly() -> None:
        with outbox._connections.using() as db:  # a drainer's claim, held open for a moment
            db.execute("BEGIN IMMEDIATE")
            db.execute("UPDATE audit_outbox SET claimed_until = claimed_until")
            writing.set()
            go_on.wait(10)
            db.execute("COMMIT")

    drainer = threading.Thread(target=claim_slowly)
    drainer.start()
    assert writing.wait(10)
    threading.Timer(0.2, go_on.set).start()

    def record_first_event() -> None:  # as the web worker does with its own outbox
        event = rest_event("read", actor=APP, server="https://ehr/fhir", source=SOURCE, data="ImagingStudy/1")
        AuditOutbox(tmp_path / "audit-outbox.sqlite").record(event)

    assert succeeds_in_a_forked_child(record_first_event), "the forked worker could not record to the audit outbox"
    drainer.join()
    assert outbox.pending() == 1


def test_an_event_the_repository_refuses_is_kept_with_the_reason(tmp_path: Path, fhir_base: FhirServer) -> None:
    outbox = AuditOutbox(tmp_path / "audit-outbox.sqlite")
    good = rest_event("read", actor=APP, server="https://ehr/fhir", source=SOURCE, data="Device/1")
    broken = {**good, "id": str(uuid.uuid4()), "outcome": "maybe"}  # not an R4 outcome code: a builder bug
    outbox.record(good)
    outbox.record(broken)
    report = AuditDrainer(outbox, FhirAuditDelivery(FhirClient(fhir_base.base_url))).drain_once()
    assert (report.delivered, report.refused) == (1, 1)
    (kept,) = outbox.refused()
    assert kept[0] == broken["id"] and "not a valid R4 AuditEvent" in kept[1]
    with pytest.raises(ResourceValidationError):
        validate_resource(broken)


@pytest.fixture(scope="module")
def ehr_key() -> jwk.ECKey:
    return jwk.ECKey.generate_key("P-384", parameters={"kid": "ehr-1"})


def _patient_view(base: str, key: jwk.ECKey, patient: str, fhir: str) -> str:
    instance = str(uuid.uuid4())
    path = f"/cds-services/{PATIENT_VIEW}"
    body = {
        "hook": "patient-view",
        "hookInstance": instance,
        "context": {"patientId": patient, "userId": "Practitioner/kill-test"},
        "prefetch": prefetch_for(fhir, PATIENT_VIEW, patient),
    }
    answer = requests.post(
        f"{base}{path}", json=body, headers={"Authorization": f"Bearer {cds_jwt(key, base + path)}"}, timeout=30
    )
    assert answer.status_code == 200, answer.text
    return instance


def test_killing_serve_before_its_outbox_drains_loses_no_audit_event(
    tmp_path: Path, fhir_base: FhirServer, ehr_key: jwk.ECKey, analysed_patient: tuple[str, str, str]
) -> None:
    patient = analysed_patient[0]
    port = free_port()
    down = base_settings(tmp_path, port, ehr_key, audit={"fhir_base": _closed_port_url(), "auth": "none"})
    with serving(down, tmp_path, port, name="first") as first:
        instances = [_patient_view(first.base, ehr_key, patient, fhir_base.base_url) for _ in range(3)]
        kill_hard(first)  # answered, recorded, never sent: the repository was down
    held = AuditOutbox(tmp_path / "data" / "audit-outbox.sqlite").events()
    assert {e["id"] for e in held} and len(held) == 3

    port = free_port()
    up = base_settings(tmp_path, port, ehr_key, audit={"fhir_base": fhir_base.base_url, "auth": "none"})
    outbox = AuditOutbox(tmp_path / "data" / "audit-outbox.sqlite")
    with serving(up, tmp_path, port, name="second"):
        deadline = time.monotonic() + 30
        while True:
            stored = [e for e in _events_for(fhir_base, patient) if e["id"] in {h["id"] for h in held}]
            # Sent, then removed from the outbox: the server stores an event before the drainer forgets it (a
            # drainer stopped in between sends it again, stored once: PUT to its id).
            if (len(stored) == 3 and outbox.pending() == 0) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert sorted(e["id"] for e in stored) == sorted(e["id"] for e in held)
    for instance in instances:
        _hook_event(stored, instance)  # each hook's event, exactly once
    assert outbox.pending() == 0

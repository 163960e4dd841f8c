"""Each access to patient data as a FHIR R4 ``AuditEvent``, shaped as IHE Basic Audit Log Patterns (BALP) ask.

A hospital's security review asks who read or wrote which patient's data, when, from where and with what
outcome. This module answers in the form the hospital's audit repository already reads: BALP profiles over R4
``AuditEvent`` (https://profiles.ihe.net/ITI/BALP/), one event per RESTful interaction:

==================  ==========  ==================================  ===========================================
interaction          action      client / server agent types        profile (successful, patient known)
==================  ==========  ==================================  ===========================================
read                 R           client 110152, server 110153        IHE.BasicAudit.PatientRead (else .Read)
search               E           client 110153, server 110152        IHE.BasicAudit.PatientQuery (else .Query)
create               C           client 110153, server 110152        IHE.BasicAudit.PatientCreate (else .Create)
update               U           client 110153, server 110152        IHE.BasicAudit.PatientUpdate (else .Update)
==================  ==========  ==================================  ===========================================

(BALP follows DICOM: the side data flows *from* is the Source Role ID, 110153.) A transaction is recorded as one
event per resource it created or updated, as BALP asks (one data entity per event), tied together by the
request id entity. Failures are recorded too, with ``outcome`` 4 (refused: 4xx) or 8 (failed: 5xx, no answer)
and the error's type, and claim no profile (BALP profiles are for successes).

Two kinds of access are not FHIR REST and have no BALP profile; they keep BALP's agent and entity shapes:
the images fetched from the PACS (DICOM ``110104`` *DICOM Instances Transferred*, the study and series by UID)
and a CDS Hooks call (DICOM ``110110`` *Patient Record*, action E, the hook as subtype, the EHR as the client,
the prefetch as the query, the AI reports the cards were built from as data entities).

Who: the OAuth client (the app's ``client_id``, the CDS client's ``iss``, the backend client), and the human
(``fhirUser`` of the launch, ``userId`` of the hook) as the requestor. What: references and interaction only,
never resource content: a search is recorded as ``GET Type?params`` (references and codes; params are the
project's own queries, never free text). Where from: the client's network address. When: ``recorded``.

:class:`AuditedFhirClient` records every interaction of a :class:`~fhir_adapters.client.FhirClient` through an
:class:`AuditTrail`; the trail hands each event to an :class:`AuditSink` (the durable outbox in
:mod:`pipeline.audit`), so recording never waits for the audit repository.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol
from urllib.parse import urlencode

from fhir_adapters.client import FhirClient, SearchParams
from fhir_adapters.errors import FhirError
from fhir_adapters.fhirjson import element, items, reference, relative_reference

BALP_PROFILE = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit."
BALP_ENTITY_TYPE = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"
AUDIT_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL_INTERACTION = "http://hl7.org/fhir/restful-interaction"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
PARTICIPATION_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
CDS_HOOK_SYSTEM = "https://cds-hooks.org/hooks"
DICOM_UID_SYSTEM = "urn:dicom:uid"

SOURCE_ROLE = ("110153", "Source Role ID")
DESTINATION_ROLE = ("110152", "Destination Role ID")

Interaction = Literal["read", "search-type", "create", "update", "transaction"]
Outcome = Literal["0", "4", "8"]
"""R4 ``AuditEvent.outcome``: 0 success, 4 minor failure (the request was refused), 8 serious failure."""

_ACTION: dict[str, str] = {"read": "R", "search-type": "E", "create": "C", "update": "U", "transaction": "E"}
_PROFILE: dict[str, str] = {"read": "Read", "search-type": "Query", "create": "Create", "update": "Update"}
_USER_ROLE: dict[str, tuple[str, str]] = {
    "read": ("IRCP", "information recipient"),
    "search-type": ("IRCP", "information recipient"),
    "create": ("AUT", "author (originator)"),
    "update": ("AUT", "author (originator)"),
    "transaction": ("AUT", "author (originator)"),
}


class AuditSink(Protocol):
    """Takes finished AuditEvents (each with its ``id``) for delivery; must not block on the audit repository."""

    def record(self, event: Mapping[str, Any]) -> None: ...


@dataclass(frozen=True)
class Actor:
    """Who is asking: the client software and, when there is one, the human it acts for.

    ``client_id`` names the client as its authorisation knows it (the app's OAuth ``client_id``, a CDS client's
    JWT ``iss``, the backend services client); ``client_address`` is where it connects from (an IP address, a
    host name or a URL); ``user`` is a relative reference to the person (``Practitioner/123``).
    """

    client_id: str
    client_address: str
    user: str | None = None


@dataclass(frozen=True)
class AuditSource:
    """The deployment that records the events (BALP ``source``): its site name and observer."""

    site: str
    observer: str = "imaging-cds"


def recorded_now() -> str:
    """An R4 ``instant`` for now, in UTC, with milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _coding(system: str, code: str, display: str | None = None) -> dict[str, str]:
    coding = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return coding


def _network_type(address: str) -> str:
    """R4 ``network.type``: 1 machine name, 2 IP address, 5 URI."""
    if "://" in address:
        return "5"
    stripped = address.strip("[]")
    if stripped.replace(".", "").isdigit() or ":" in stripped:
        return "2"
    return "1"


def _agent(role: tuple[str, str], who: Mapping[str, Any], address: str | None, *, requestor: bool) -> dict[str, Any]:
    agent: dict[str, Any] = {
        "type": {"coding": [_coding(DCM, role[0], role[1])]},
        "who": dict(who),
        "requestor": requestor,
    }
    if address:
        agent["network"] = {"address": address[:1024], "type": _network_type(address)}
    return agent


def _identified(value: str, system: str | None = None) -> dict[str, Any]:
    identifier: dict[str, str] = {"value": value[:1024]}
    if system:
        identifier["system"] = system
    return {"identifier": identifier, "display": value[:1024]}


def _user_agent(user: str, role: tuple[str, str]) -> dict[str, Any]:
    return {
        "type": {"coding": [_coding(PARTICIPATION_TYPE, role[0], role[1])]},
        "who": {"reference": user},
        "requestor": True,
    }


def _patient_entity(patient: str) -> dict[str, Any]:
    return {
        "what": {"reference": patient},
        "type": _coding(ENTITY_TYPE, "1", "Person"),
        "role": _coding(OBJECT_ROLE, "1", "Patient"),
    }


def _data_entity(what: str, role: tuple[str, str] = ("4", "Domain Resource")) -> dict[str, Any]:
    return {
        "what": {"reference": what},
        "type": _coding(ENTITY_TYPE, "2", "System Object"),
        "role": _coding(OBJECT_ROLE, role[0], role[1]),
    }


def _query_entity(query: str, description: str | None = None) -> dict[str, Any]:
    entity: dict[str, Any] = {
        "type": _coding(ENTITY_TYPE, "2", "System Object"),
        "role": _coding(OBJECT_ROLE, "24", "Query"),
        "query": base64.b64encode(query.encode("utf-8")).decode("ascii"),
    }
    if description:
        entity["description"] = description[:1024]
    return entity


def _request_entity(request_id: str) -> dict[str, Any]:
    return {
        "what": {"identifier": {"value": request_id[:256]}},
        "type": _coding(BALP_ENTITY_TYPE, "XrequestId", "transport specific unique identifier"),
    }


def _source(source: AuditSource) -> dict[str, Any]:
    return {
        "site": source.site,
        "observer": {"display": source.observer},
        "type": [_coding(SOURCE_TYPE, "4", "Application Server")],
    }


def _shell(
    *,
    event_type: dict[str, str],
    subtype: Sequence[dict[str, str]],
    action: str,
    outcome: Outcome,
    failure: str | None,
    agents: list[dict[str, Any]],
    entities: list[dict[str, Any]],
    source: AuditSource,
    profile: str | None,
    recorded: str | None,
) -> dict[str, Any]:
    event: dict[str, Any] = {"resourceType": "AuditEvent", "id": str(uuid.uuid4())}
    if profile and outcome == "0":
        event["meta"] = {"profile": [BALP_PROFILE + profile]}
    event["type"] = event_type
    if subtype:
        event["subtype"] = list(subtype)
    event.update(
        {
            "action": action,
            "recorded": recorded or recorded_now(),
            "outcome": outcome,
        }
    )
    if failure:
        event["outcomeDesc"] = failure[:500]
    event["agent"] = agents
    event["source"] = _source(source)
    event["entity"] = entities
    return event


def _exchange_agents(
    actor: Actor, actor_role: tuple[str, str], peer: str, peer_role: tuple[str, str], user_role: tuple[str, str]
) -> list[dict[str, Any]]:
    """The agents of one network exchange: the software that made it (the requestor unless a user is named), the
    system at the other end (``peer``, a URL), and the user it was made for, when known."""
    agents = [
        _agent(actor_role, _identified(actor.client_id), actor.client_address, requestor=actor.user is None),
        _agent(peer_role, _identified(peer), peer, requestor=False),
    ]
    if actor.user:
        agents.append(_user_agent(actor.user, user_role))
    return agents


def rest_event(
    interaction: Interaction,
    *,
    actor: Actor,
    server: str,
    source: AuditSource,
    patient: str | None = None,
    data: str | None = None,
    query: str | None = None,
    request_id: str | None = None,
    outcome: Outcome = "0",
    failure: str | None = None,
    recorded: str | None = None,
) -> dict[str, Any]:
    """The AuditEvent of one FHIR RESTful interaction by ``actor`` on the FHIR server at ``server``.

    ``patient`` is the patient the data belongs to (``Patient/123``); ``data`` the resource read, created or
    updated (``ImagingStudy/9``); ``query`` a search as ``GET Type?params``; ``request_id`` ties the events of
    one page, job or transaction together.
    """
    client_role, server_role = (
        (DESTINATION_ROLE, SOURCE_ROLE) if interaction == "read" else (SOURCE_ROLE, DESTINATION_ROLE)
    )
    agents = _exchange_agents(actor, client_role, server, server_role, _USER_ROLE[interaction])
    entities: list[dict[str, Any]] = []
    if patient:
        entities.append(_patient_entity(patient))
    if data:
        entities.append(_data_entity(data))
    if query is not None:
        entities.append(_query_entity(query))
    if request_id:
        entities.append(_request_entity(request_id))
    profile = _PROFILE.get(interaction)
    if profile and patient:
        profile = f"Patient{profile}"
    if profile and interaction != "search-type" and not data:
        profile = None  # BALP's read/create/update profiles need the data entity
    return _shell(
        event_type=_coding(AUDIT_EVENT_TYPE, "rest", "Restful Operation"),
        subtype=[_coding(RESTFUL_INTERACTION, interaction, interaction)],
        action=_ACTION[interaction],
        outcome=outcome,
        failure=failure,
        agents=agents,
        entities=entities,
        source=source,
        profile=profile,
        recorded=recorded,
    )


def dicom_transfer_event(
    *,
    actor: Actor,
    pacs: str,
    source: AuditSource,
    patient: str | None,
    imaging_study: str | None,
    study_uid: str,
    series_uid: str,
    request_id: str | None = None,
    outcome: Outcome = "0",
    failure: str | None = None,
) -> dict[str, Any]:
    """The AuditEvent of a series fetched from the PACS (WADO-RS): DICOM *DICOM Instances Transferred*, read."""
    agents = _exchange_agents(actor, DESTINATION_ROLE, pacs, SOURCE_ROLE, _USER_ROLE["read"])
    entities: list[dict[str, Any]] = []
    if patient:
        entities.append(_patient_entity(patient))
    if imaging_study:
        entities.append(_data_entity(imaging_study))
    for uid, kind in ((study_uid, "Study Instance UID"), (series_uid, "Series Instance UID")):
        entities.append(
            {
                "what": {"identifier": {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}, "display": kind},
                "type": _coding(ENTITY_TYPE, "2", "System Object"),
                "role": _coding(OBJECT_ROLE, "3", "Report"),
            }
        )
    if request_id:
        entities.append(_request_entity(request_id))
    return _shell(
        event_type=_coding(DCM, "110104", "DICOM Instances Transferred"),
        subtype=[],
        action="R",
        outcome=outcome,
        failure=failure,
        agents=agents,
        entities=entities,
        source=source,
        profile=None,
        recorded=None,
    )


def cds_hook_event(
    *,
    hook: str,
    service_url: str,
    client: Actor,
    source: AuditSource,
    patient: str | None,
    prefetch: Mapping[str, str],
    reports: Iterable[str] = (),
    hook_instance: str | None = None,
    fetched_from: str | None = None,
    outcome: Outcome = "0",
    failure: str | None = None,
) -> dict[str, Any]:
    """The AuditEvent of one CDS Hooks call: the CDS client (``client``, by its JWT ``iss``) asked this service
    (``service_url``) for advice on ``patient``, sending the data ``prefetch`` names (key -> query, with the
    patient filled in); ``reports`` are the AI results the cards were built from."""
    agents = _exchange_agents(client, SOURCE_ROLE, service_url, DESTINATION_ROLE, _USER_ROLE["read"])
    entities: list[dict[str, Any]] = []
    if patient:
        entities.append(_patient_entity(patient))
    if prefetch:
        queries = "\n".join(f"{key}: {query}" for key, query in sorted(prefetch.items()))
        where = f"fetched from {fetched_from}" if fetched_from else "sent by the CDS client as prefetch"
        entities.append(_query_entity(queries, f"{hook}: {', '.join(sorted(prefetch))} ({where})"))
    for report in sorted(set(reports)):
        entities.append(_data_entity(report, ("3", "Report")))
    if hook_instance:
        entities.append(_request_entity(hook_instance))
    return _shell(
        event_type=_coding(DCM, "110110", "Patient Record"),
        subtype=[_coding(CDS_HOOK_SYSTEM, hook, hook)],
        action="E",
        outcome=outcome,
        failure=failure,
        agents=agents,
        entities=entities,
        source=source,
        profile=None,
        recorded=None,
    )


# ---------------------------------------------------------------------------------------------- what to name


def patient_of(resource: Any) -> str | None:
    """The patient a resource's data belongs to (``Patient/<id>``), or ``None`` when it names none."""
    data = element(resource)
    if data.get("resourceType") == "Patient" and isinstance(data.get("id"), str):
        return f"Patient/{data['id']}"
    for key in ("subject", "patient"):
        found = relative_reference(reference(data.get(key)))
        if found and found.startswith("Patient/"):
            return found
    return None


def _patient_param(params: SearchParams | None) -> str | None:
    pairs = list(params.items()) if isinstance(params, Mapping) else list(params or [])
    for key, value in pairs:
        if key in ("patient", "subject", "subject:Patient") and isinstance(value, str) and value:
            return value if "/" in value else f"Patient/{value}"
    return None


def query_text(resource_type: str, params: SearchParams | None) -> str:
    """A search as BALP records it (``GET Type?params``), from the project's own parameters."""
    pairs = list(params.items()) if isinstance(params, Mapping) else list(params or [])
    flat = [(k, v) for k, value in pairs for v in ([value] if isinstance(value, str | int) else value)]
    return f"GET {resource_type}" + (f"?{urlencode(flat)}" if flat else "")


def failure_of(exc: BaseException) -> tuple[Outcome, str]:
    """The outcome code and description of a failed interaction (the error's kind and status; no content)."""
    status = getattr(exc, "status", None)
    outcome: Outcome = "4" if isinstance(status, int) and 400 <= status < 500 else "8"
    return outcome, f"{type(exc).__name__}" + (f" (HTTP {status})" if status else "")


@dataclass
class AuditTrail:
    """Builds and records the events of one actor's work (a page, a job, a hook) into ``sink``."""

    sink: AuditSink
    actor: Actor
    source: AuditSource
    request_id: str | None = None

    def record(self, event: Mapping[str, Any]) -> None:
        self.sink.record(event)

    def rest(self, interaction: Interaction, server: str, **kwargs: Any) -> None:
        self.record(
            rest_event(
                interaction,
                actor=self.actor,
                server=server,
                source=self.source,
                request_id=self.request_id,
                **kwargs,
            )
        )

    def dicom_transfer(self, **kwargs: Any) -> None:
        self.record(dicom_transfer_event(actor=self.actor, source=self.source, request_id=self.request_id, **kwargs))


class AuditedFhirClient(FhirClient):
    """A :class:`FhirClient` that records each read, search, create, update and transaction in an audit trail.

    The event is recorded after the interaction (with the outcome it had) and before its result is returned,
    so a caller never holds data whose access was not recorded. Only the first page of a search is an event:
    later pages continue the same query.
    """

    def __init__(self, base_url: str, *, trail: AuditTrail, **kwargs: Any) -> None:
        super().__init__(base_url, **kwargs)
        self.trail = trail

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        data = f"{resource_type}/{resource_id}"
        try:
            resource = super().read(resource_type, resource_id)
        except FhirError as exc:
            self._failed("read", exc, data=data)
            raise
        self.trail.rest("read", self.base_url, data=data, patient=patient_of(resource))
        return resource

    def read_reference(self, reference: str) -> dict[str, Any]:
        data = relative_reference(reference) or reference[:200]
        try:
            resource = super().read_reference(reference)
        except FhirError as exc:
            self._failed("read", exc, data=data)
            raise
        self.trail.rest("read", self.base_url, data=data, patient=patient_of(resource))
        return resource

    def search_bundle(self, resource_type: str, params: SearchParams | None = None) -> dict[str, Any]:
        query = query_text(resource_type, params)
        named = _patient_param(params)
        try:
            bundle = super().search_bundle(resource_type, params)
        except FhirError as exc:
            self._failed("search-type", exc, query=query, patient=named)
            raise
        patients = (
            {named}
            if named
            else {p for e in items(bundle.get("entry")) if (p := patient_of(element(e).get("resource")))}
        )
        found: list[str | None] = [*sorted(patients)] or [None]
        for patient in found:  # BALP: one event per patient the results belong to
            self.trail.rest("search-type", self.base_url, query=query, patient=patient)
        return bundle

    def create(self, resource: Mapping[str, Any], *, if_none_exist: str | None = None) -> dict[str, Any]:
        try:
            stored = super().create(resource, if_none_exist=if_none_exist)
        except FhirError as exc:
            self._failed("create", exc, patient=patient_of(resource))
            raise
        reference_ = f"{stored.get('resourceType')}/{stored.get('id')}"
        self.trail.rest("create", self.base_url, data=reference_, patient=patient_of(stored))
        return stored

    def update(self, resource: Mapping[str, Any]) -> dict[str, Any]:
        data = f"{resource.get('resourceType')}/{resource.get('id')}"
        try:
            stored = super().update(resource)
        except FhirError as exc:
            self._failed("update", exc, data=data, patient=patient_of(resource))
            raise
        self.trail.rest("update", self.base_url, data=data, patient=patient_of(stored) or patient_of(resource))
        return stored

    def transaction(
        self, bundle: Mapping[str, Any], *, retry: bool = True, representation: bool = False
    ) -> dict[str, Any]:
        entries = [element(e) for e in items(bundle.get("entry"))]
        try:
            response = super().transaction(bundle, retry=retry, representation=representation)
        except FhirError as exc:
            named: list[str | None] = [*sorted({p for e in entries if (p := patient_of(e.get("resource")))})]
            for patient in named or [None]:
                self._failed("transaction", exc, patient=patient)
            raise
        for sent, answered in zip(entries, items(response.get("entry")), strict=False):
            method = str(element(sent.get("request")).get("method", "")).upper()
            answer = element(element(answered).get("response"))
            status = str(answer.get("status", ""))
            written = relative_reference(str(answer.get("location") or "")) or None
            if method == "POST" and status.startswith("201"):
                interaction: Interaction = "create"
            elif method == "PUT" and status[:1] == "2":
                interaction = "update"
            else:
                continue  # a conditional create that found the resource already there wrote nothing
            patient = patient_of(sent.get("resource")) or patient_of(element(answered).get("resource"))
            self.trail.rest(interaction, self.base_url, data=written, patient=patient)
        return response

    def _failed(self, interaction: Interaction, exc: FhirError, **kwargs: Any) -> None:
        outcome, failure = failure_of(exc)
        self.trail.rest(interaction, self.base_url, outcome=outcome, failure=failure, **kwargs)

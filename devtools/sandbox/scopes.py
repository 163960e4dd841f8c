"""SMART scopes, FHIR interactions and the patient compartment: pure functions the proxy and the server share.

Kept free of Flask and HTTP so each rule (which scope allows which interaction, which search is forced into
the patient's compartment) can be read, and tested, on its own.

Scope grammar understood here:

* SMART v2: ``<patient|user|system>/<Type|*>.<cruds>`` - the permission letters are a non-empty subset of
  ``c r u d s`` in that order. A granular suffix (``patient/Observation.rs?category=...``) is accepted but
  its query is NOT enforced: the scope then counts as the unrestricted one (a sandbox simplification).
* SMART v1: ``<patient|user|system>/<Type|*>.<read|write|*>`` - ``read`` = ``rs``, ``write`` = ``cud``,
  ``*`` = ``cruds``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

PERMISSION_ORDER = "cruds"
INTERACTION_NAMES = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "search"}
V1_PERMISSIONS = {"read": "rs", "write": "cud", "*": "cruds"}
V1_NAME_FOR = {"c": "write", "r": "read", "u": "write", "d": "write", "s": "read"}

_RESOURCE_SCOPE = re.compile(r"^(patient|user|system)/([A-Z][A-Za-z]*|\*)\.([a-z]+|\*)(\?.*)?$")

#: Patient-compartment types (R4) -> the search parameter that names the patient. Searches with a
#: ``patient/`` scope are forced onto the launch patient through this parameter.
PATIENT_SEARCH_PARAM: dict[str, str] = {
    **{
        t: "patient"
        for t in (
            "AllergyIntolerance",
            "Appointment",
            "CarePlan",
            "ChargeItem",
            "Claim",
            "Communication",
            "CommunicationRequest",
            "Condition",
            "Consent",
            "Coverage",
            "Device",
            "DiagnosticReport",
            "DocumentReference",
            "Encounter",
            "EpisodeOfCare",
            "ExplanationOfBenefit",
            "Flag",
            "ImagingStudy",
            "Immunization",
            "Invoice",
            "Media",
            "MedicationAdministration",
            "MedicationDispense",
            "MedicationRequest",
            "MedicationStatement",
            "Observation",
            "Procedure",
            "Provenance",
            "RelatedPerson",
            "ServiceRequest",
            "Specimen",
            "Task",
        )
    },
    "Basic": "subject",
}

#: Elements whose Patient reference places a resource in a patient's compartment (checked on reads/writes).
PATIENT_REFERENCE_ELEMENTS = ("subject", "patient", "for", "beneficiary", "target", "securityContext")
"""``securityContext``: a Binary is guarded as the resource it names (R4), the patient for a key image."""


@dataclass(frozen=True)
class ResourceScope:
    """One parsed resource scope, e.g. ``patient/ImagingStudy.rs``."""

    text: str
    context: str  # patient | user | system
    resource_type: str  # a FHIR type or "*"
    permissions: frozenset[str]  # subset of "cruds"
    version: int  # 1 or 2

    def allows(self, resource_type: str, interaction: str) -> bool:
        return self.resource_type in ("*", resource_type) and interaction in self.permissions

    def covers(self, other: ResourceScope) -> bool:
        """True when granting ``self`` already grants everything ``other`` asks for."""
        return (
            self.context == other.context
            and self.resource_type in ("*", other.resource_type)
            and other.permissions <= self.permissions
        )


@dataclass(frozen=True)
class FhirInteraction:
    """What one FHIR REST call does, in scope terms: an interaction letter on a resource type."""

    resource_type: str
    interaction: str  # one of c r u d s
    resource_id: str | None = None

    @property
    def name(self) -> str:
        return INTERACTION_NAMES[self.interaction]


def parse_resource_scope(text: str) -> ResourceScope | None:
    """Parse a v1 or v2 resource scope; None for anything else (``launch``, ``openid``, malformed)."""
    match = _RESOURCE_SCOPE.match(text)
    if not match:
        return None
    context, resource_type, perms, _granular = match.groups()
    if perms in V1_PERMISSIONS:
        return ResourceScope(text, context, resource_type, frozenset(V1_PERMISSIONS[perms]), 1)
    if perms == "*":
        return None
    # v2: letters must be distinct and in c r u d s order
    positions = [PERMISSION_ORDER.find(letter) for letter in perms]
    if -1 in positions or positions != sorted(set(positions)):
        return None
    return ResourceScope(text, context, resource_type, frozenset(perms), 2)


def split_scopes(scope: str | None) -> list[str]:
    """A scope string as a list, order kept, duplicates dropped."""
    seen: dict[str, None] = {}
    for item in (scope or "").split():
        seen.setdefault(item, None)
    return list(seen)


def is_write_scope(text: str) -> bool:
    """True for resource scopes that allow creating, updating or deleting (shown untickable on consent)."""
    parsed = parse_resource_scope(text)
    return parsed is not None and bool(parsed.permissions & {"c", "u", "d"})


def allowed_subset(requested: Iterable[str], allowed: Iterable[str], *, v1_only: bool) -> list[str]:
    """The requested scopes the client's registration allows (a sandbox grants less rather than failing).

    Non-resource scopes must be listed literally; a resource scope is allowed when an allowed resource scope
    covers it. A ``v1_only`` sandbox drops v2-syntax resource scopes, as a SMART 1.0 server would not know them.
    """
    allowed_list = list(allowed)
    allowed_resource = [p for p in (parse_resource_scope(a) for a in allowed_list) if p is not None]
    result: list[str] = []
    for text in requested:
        parsed = parse_resource_scope(text)
        if parsed is None:
            if text in allowed_list:
                result.append(text)
            continue
        if v1_only and parsed.version == 2:
            continue
        if any(grant.covers(parsed) for grant in allowed_resource):
            result.append(text)
    return result


def granting_scope(scopes: Iterable[str], need: FhirInteraction) -> ResourceScope | None:
    """The granted scope that allows ``need``; a ``user/`` grant wins over a ``patient/`` one (no compartment)."""
    candidates = [p for p in (parse_resource_scope(s) for s in scopes) if p is not None]
    allowing = [
        p for p in candidates if p.context in ("user", "patient") and p.allows(need.resource_type, need.interaction)
    ]
    if not allowing:
        return None
    return next((p for p in allowing if p.context == "user"), allowing[0])


def missing_scope_message(need: FhirInteraction) -> str:
    """Names the scope that would allow ``need``, in both SMART versions."""
    letter = need.interaction
    return (
        f"The access token does not allow {need.name} of {need.resource_type}: it needs the scope "
        f"patient/{need.resource_type}.{letter} or user/{need.resource_type}.{letter} "
        f"(SMART v1: patient/{need.resource_type}.{V1_NAME_FOR[letter]})."
    )


def interaction_for(method: str, path: str) -> FhirInteraction | None:
    """Map a REST call relative to the FHIR base (``ImagingStudy/1``, ``Observation/_search``) to an interaction.

    None means a whole-system call (``/``, ``/_history``) that only the transaction rule handles. Operations
    (``$everything``) count as reads of their type; history as a read.
    """
    parts = [p for p in path.strip("/").split("/") if p]
    method = method.upper()
    if not parts or not parts[0][:1].isupper():
        return None
    resource_type = parts[0]
    resource_id = parts[1] if len(parts) > 1 and not parts[1].startswith(("_", "$")) else None
    if len(parts) > 1 and parts[1] == "_search":
        return FhirInteraction(resource_type, "s")
    if any(p.startswith("$") for p in parts[1:]):
        return FhirInteraction(resource_type, "r", resource_id)
    if method in ("GET", "HEAD"):
        return FhirInteraction(resource_type, "r" if resource_id else "s", resource_id)
    if method == "POST":
        return FhirInteraction(resource_type, "c")
    if method in ("PUT", "PATCH"):
        return FhirInteraction(resource_type, "u", resource_id)
    if method == "DELETE":
        return FhirInteraction(resource_type, "d", resource_id)
    return None


def bundle_entry_interactions(bundle: Mapping[str, Any]) -> list[FhirInteraction | None]:
    """One interaction per transaction/batch entry, from ``entry.request.method`` and ``entry.request.url``."""
    result: list[FhirInteraction | None] = []
    for entry in bundle.get("entry") or []:
        request = (entry.get("request") if isinstance(entry, Mapping) else None) or {}
        url = urlsplit(str(request.get("url") or "")).path
        result.append(interaction_for(str(request.get("method") or ""), url))
    return result


def references_patient(reference: str, patient_id: str) -> bool:
    """True when a reference (relative, absolute, or a bare id) names ``Patient/patient_id``."""
    reference = reference.split("/_history/")[0].rstrip("/")
    return (
        reference == patient_id or reference == f"Patient/{patient_id}" or reference.endswith(f"/Patient/{patient_id}")
    )


def compartment_violation(resource: Mapping[str, Any], patient_id: str) -> str | None:
    """Why ``resource`` is outside ``patient_id``'s compartment, or None when it is inside (or unrelated).

    Only Patient references in the usual compartment elements are examined; a resource that names no
    patient at all (a Device in stock, an Endpoint) is not patient data and passes.
    """
    resource_type = str(resource.get("resourceType") or "")
    if resource_type == "Patient":
        rid = resource.get("id")
        if rid is not None and rid != patient_id:
            return "the Patient is not the patient in context"
        return None
    for element in PATIENT_REFERENCE_ELEMENTS:
        value = resource.get(element)
        values = value if isinstance(value, list) else [value]
        for item in values:
            reference = item.get("reference") if isinstance(item, Mapping) else None
            if not isinstance(reference, str) or "Patient/" not in reference:
                continue
            if not references_patient(reference, patient_id):
                return f"{resource_type}.{element} names another patient"
    return None


def restrict_search_to_patient(
    resource_type: str, query: list[tuple[str, str]], patient_id: str
) -> tuple[list[tuple[str, str]] | None, str | None]:
    """Force a search into the patient's compartment: ``(new query, None)`` or ``(None, why it is refused)``.

    Patient searches get ``_id`` pinned to the patient; compartment types get ``patient=Patient/<id>`` added
    unless the query already names the patient through ``patient`` or ``subject`` (any other patient is
    refused). Types outside the compartment (Practitioner, Endpoint, Organization) are left alone.
    """
    if resource_type == "Patient":
        for value in (v for k, v in query if k == "_id"):
            if any(item != patient_id for item in value.split(",")):
                return None, "the search asks for a patient other than the patient in context"
        return [*[(k, v) for k, v in query if k != "_id"], ("_id", patient_id)], None
    param = PATIENT_SEARCH_PARAM.get(resource_type)
    if param is None:
        return list(query), None
    named = [v for k, v in query if k.split(":")[0] in ("patient", "subject")]
    for value in named:
        if not all(references_patient(item, patient_id) for item in value.split(",")):
            return None, "the search asks for a patient other than the patient in context"
    if named:
        return list(query), None
    return [*query, (param, f"Patient/{patient_id}")], None


def parse_query(query_string: str) -> list[tuple[str, str]]:
    """A raw query string as ordered pairs, blank values kept (FHIR search uses them)."""
    return parse_qsl(query_string, keep_blank_values=True)

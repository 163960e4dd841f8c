"""The scope-enforcing FHIR proxy: what an EHR's resource server does with a SMART access token.

Every call under ``{iss}/`` except ``metadata`` needs ``Authorization: Bearer <token>``; the call is mapped
to an interaction (c r u d s on a type), checked against the token's scopes, forced into the patient's
compartment when only ``patient/`` scopes allow it, and then forwarded unchanged to the real FHIR server.
Responses come back as the upstream server wrote them - including ``Location``, ``fullUrl`` and bundle links
that point at the backing server, as the reference SMART launcher's proxy does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import requests
from flask import Response

from devtools.sandbox.scopes import (
    FhirInteraction,
    bundle_entry_interactions,
    compartment_violation,
    granting_scope,
    interaction_for,
    missing_scope_message,
    parse_query,
    restrict_search_to_patient,
)
from devtools.sandbox.state import SandboxState, TokenRecord
from fhir_adapters.smart import OAUTH_URIS_EXTENSION

FORWARDED_REQUEST_HEADERS = ("Content-Type", "Accept", "If-None-Exist", "If-Match", "If-None-Match", "Prefer")
RETURNED_RESPONSE_HEADERS = ("Content-Type", "Location", "Content-Location", "ETag", "Last-Modified")


@dataclass
class ProxyRefusalError(Exception):
    """A call the proxy answers itself (401/403/400/502) with an OperationOutcome."""

    status: int
    code: str
    diagnostics: str
    www_authenticate: str | None = None


def operation_outcome(code: str, diagnostics: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
    }


def refusal_response(refusal: ProxyRefusalError) -> Response:
    response = Response(
        json.dumps(operation_outcome(refusal.code, refusal.diagnostics)),
        status=refusal.status,
        content_type="application/fhir+json",
    )
    if refusal.www_authenticate:
        response.headers["WWW-Authenticate"] = refusal.www_authenticate
    return response


def authenticate_bearer(state: SandboxState, authorization: str | None) -> TokenRecord:
    """The token record behind an ``Authorization`` header; 401 (RFC 6750) when missing/unknown/expired."""
    realm = 'Bearer realm="sandbox-ehr"'
    if not authorization or not authorization.lower().startswith("bearer "):
        raise ProxyRefusalError(
            401, "login", "This FHIR server needs a SMART access token (Authorization: Bearer).", realm
        )
    record = state.by_access_token(authorization.split(" ", 1)[1].strip())
    if record is None or record.is_revoked():
        raise ProxyRefusalError(
            401, "login", "The access token is not known or was revoked.", f'{realm}, error="invalid_token"'
        )
    if record.is_expired():
        raise ProxyRefusalError(
            401, "expired", "The access token has expired; refresh it.", f'{realm}, error="invalid_token"'
        )
    return record


def authorize_interaction(token: TokenRecord, need: FhirInteraction) -> str | None:
    """Check one interaction; returns the patient id to confine it to (``patient/`` grant) or None (``user/``)."""
    grant = granting_scope(token.scopes, need)
    if grant is None:
        raise ProxyRefusalError(403, "forbidden", missing_scope_message(need))
    if grant.context == "patient":
        patient = token.grant.context.patient
        if not patient:
            raise ProxyRefusalError(
                403, "forbidden", f"The scope {grant.text} needs a patient in context, and this token has none."
            )
        return patient
    return None


def check_compartment(resource: Any, patient: str | None, what: str) -> None:
    if patient is None or not isinstance(resource, Mapping):
        return
    why = compartment_violation(resource, patient)
    if why:
        raise ProxyRefusalError(403, "forbidden", f"{what} is outside the patient's compartment: {why}.")


@dataclass(frozen=True)
class ForwardPlan:
    """An authorized call, ready to forward: its (possibly patient-confined) query and body, and what a
    single-resource read must be checked against when the answer comes back."""

    query_string: str
    body: bytes
    read_patient: str | None = None
    resource_type: str | None = None


def plan_request(token: TokenRecord, method: str, path: str, query_string: str, body: bytes) -> ForwardPlan:
    """Authorize a call before it is forwarded, or raise :class:`ProxyRefusalError`."""
    need = interaction_for(method, path)
    if need is None:
        if method.upper() == "POST" and path.strip("/") == "":
            check_transaction(token, body)
            return ForwardPlan(query_string, body)
        raise ProxyRefusalError(403, "forbidden", "Whole-system calls other than transaction/batch are not allowed.")
    patient = authorize_interaction(token, need)
    if patient is not None and need.interaction == "s":
        query = parse_query(query_string)
        form_search = method.upper() == "POST"
        if form_search:  # POST _search: the form body's parameters count as query parameters
            query += parse_query(body.decode("utf-8", "replace"))
        restricted, why = restrict_search_to_patient(need.resource_type, query, patient)
        if restricted is None:
            raise ProxyRefusalError(403, "forbidden", f"Search on {need.resource_type} refused: {why}.")
        if form_search:
            return ForwardPlan("", urlencode(restricted).encode(), None, need.resource_type)
        return ForwardPlan(urlencode(restricted), body, None, need.resource_type)
    if patient is not None and need.interaction in ("c", "u") and body:
        try:
            resource = json.loads(body)
        except ValueError:
            resource = None
        check_compartment(resource, patient, f"The {need.resource_type} being written")
    return ForwardPlan(query_string, body, patient if need.interaction == "r" else None, need.resource_type)


def check_transaction(token: TokenRecord, body: bytes) -> None:
    """Every entry of a transaction or batch must be allowed on its own."""
    try:
        bundle = json.loads(body or b"{}")
    except ValueError as error:
        raise ProxyRefusalError(
            400, "invalid", "The request body is not JSON; a transaction Bundle was expected."
        ) from error
    if not isinstance(bundle, Mapping) or bundle.get("resourceType") != "Bundle":
        raise ProxyRefusalError(400, "invalid", "POST to the FHIR base needs a transaction or batch Bundle.")
    entries = bundle.get("entry") or []
    for index, need in enumerate(bundle_entry_interactions(bundle)):
        if need is None:
            raise ProxyRefusalError(403, "forbidden", f"Bundle entry {index} has no request the sandbox can authorize.")
        try:
            patient = authorize_interaction(token, need)
            entry = entries[index] if isinstance(entries[index], Mapping) else {}
            if patient is not None and need.interaction in ("c", "u"):
                check_compartment(entry.get("resource"), patient, f"Bundle entry {index} ({need.resource_type})")
            if patient is not None and need.interaction == "s":
                raise ProxyRefusalError(
                    403,
                    "forbidden",
                    "Searches inside a transaction cannot be confined to the patient; search directly.",
                )
        except ProxyRefusalError as refusal:
            if refusal.diagnostics.startswith("Bundle entry"):
                raise
            raise ProxyRefusalError(
                refusal.status, refusal.code, f"Bundle entry {index}: {refusal.diagnostics}"
            ) from None


def forward(
    session: requests.Session,
    upstream: str,
    method: str,
    path: str,
    query_string: str,
    body: bytes,
    headers: Mapping[str, str],
    timeout: float,
) -> requests.Response:
    """Send the call on to the real FHIR server with the headers that carry FHIR semantics."""
    url = f"{upstream.rstrip('/')}/{path.lstrip('/')}" if path else upstream.rstrip("/")
    if query_string:
        url = f"{url}?{query_string}"
    outgoing = {name: headers[name] for name in FORWARDED_REQUEST_HEADERS if name in headers}
    try:
        return session.request(method, url, data=body or None, headers=outgoing, timeout=timeout, allow_redirects=False)
    except requests.RequestException as error:
        raise ProxyRefusalError(
            502, "transient", f"The FHIR server behind the sandbox did not answer ({type(error).__name__})."
        ) from error


def upstream_response(upstream: requests.Response, read_patient: str | None, resource_type: str | None) -> Response:
    """Relay the upstream answer unchanged, after checking a patient-scoped read stays in the compartment."""
    if read_patient is not None and upstream.status_code == 200:
        try:
            resource = upstream.json()
        except ValueError:
            resource = None
        if isinstance(resource, Mapping) and resource.get("resourceType") == resource_type:
            check_compartment(resource, read_patient, f"The {resource_type}")
    response = Response(upstream.content, status=upstream.status_code)
    for name in RETURNED_RESPONSE_HEADERS:
        if name in upstream.headers:
            response.headers[name] = upstream.headers[name]
    return response


def with_oauth_uris(capability: dict[str, Any], authorize_url: str, token_url: str) -> dict[str, Any]:
    """The upstream CapabilityStatement with SMART's security block (``oauth-uris``) added to each rest entry."""
    security = {
        "service": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                        "code": "SMART-on-FHIR",
                    }
                ]
            }
        ],
        "extension": [
            {
                "url": OAUTH_URIS_EXTENSION,
                "extension": [{"url": "authorize", "valueUri": authorize_url}, {"url": "token", "valueUri": token_url}],
            }
        ],
    }
    rests = capability.get("rest") or [{"mode": "server"}]
    capability["rest"] = [{**rest, "security": security} for rest in rests]
    return capability

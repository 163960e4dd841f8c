"""Typed errors for talking to a FHIR server, and the ONE place an HTTP answer becomes one of them.

Every response the project gets from a FHIR server or its SMART token endpoint passes through
:func:`raise_for_fhir_status`. Callers catch a type (``FhirNotFound``, ``FhirServerError``...) instead of
comparing status codes, and the retry policy in :mod:`fhir_adapters.client` asks ``retryable`` instead of
keeping its own list of codes.

Messages never carry PHI or credentials: they name the operation (``read Patient/123``), the HTTP status,
and a summary of the OperationOutcome in which quoted values (where servers echo submitted data) are
redacted. The full OperationOutcome stays available on ``operation_outcome`` for code that needs it.
"""

from __future__ import annotations

import re
from typing import Any

import requests

from core.errors import ImagingCdsError

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_MAX_ISSUES = 3
_MAX_ISSUE_CHARS = 160


class FhirError(ImagingCdsError):
    """A FHIR server (or its token endpoint) answered with an error, or could not be reached.

    ``status`` is the HTTP status (``None`` when there was no answer); ``operation_outcome`` is the
    OperationOutcome the server sent, if any; ``oauth_error`` the OAuth error code a token endpoint sent
    (``invalid_grant``...), if any. ``retryable`` says whether the same request may succeed later.
    """

    http_status = 502
    retryable = False

    def __init__(
        self,
        message: str,
        *,
        remedy: str = "",
        status: int | None = None,
        operation_outcome: dict[str, Any] | None = None,
        oauth_error: str | None = None,
    ) -> None:
        super().__init__(message, remedy=remedy)
        self.status = status
        self.operation_outcome = operation_outcome
        self.oauth_error = oauth_error


class FhirUnauthorized(FhirError):  # noqa: N818 - names follow HTTP/FHIR wording
    """401: no valid credentials (no token, expired token, wrong client secret or key)."""

    http_status = 401


class FhirForbidden(FhirError):  # noqa: N818 - names follow HTTP/FHIR wording
    """403: authenticated, but the granted scopes do not permit the operation."""

    http_status = 403


class FhirNotFound(FhirError):  # noqa: N818 - names follow HTTP/FHIR wording
    """404 / 410: the resource does not exist, or was deleted."""

    http_status = 404


class FhirConflict(FhirError):  # noqa: N818 - names follow HTTP/FHIR wording
    """409 / 412: a version conflict, or a conditional operation matched more than one resource."""

    http_status = 409


class FhirInvalid(FhirError):  # noqa: N818 - names follow HTTP/FHIR wording
    """400 / 422: the server rejected the request or resource as invalid (see ``operation_outcome``)."""

    http_status = 422


class FhirRequestTooLarge(FhirError):  # noqa: N818 - names follow HTTP/FHIR wording
    """413, or a request the writer will not send: larger than the server (or a proxy before it) accepts."""

    http_status = 413


class FhirServerError(FhirError):
    """5xx: the server failed; the same request may succeed later."""

    http_status = 502
    retryable = True


class FhirUnavailable(FhirError):  # noqa: N818 - names follow HTTP/FHIR wording
    """No answer at all: connection refused, DNS failure, timeout. The request may succeed later."""

    http_status = 503
    retryable = True


def summarise_operation_outcome(outcome: dict[str, Any] | None) -> str:
    """A one-line summary of an OperationOutcome's issues, with quoted values redacted.

    Servers often echo submitted values in ``diagnostics`` (a name, a birth date); those are quoted by
    convention, so replacing quoted text with ``'…'`` keeps the sentence and drops the data.
    """
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        return ""
    parts: list[str] = []
    issues = [i for i in outcome.get("issue", []) if isinstance(i, dict)]
    for issue in issues[:_MAX_ISSUES]:
        text = str(issue.get("diagnostics") or (issue.get("details") or {}).get("text") or "").strip()
        text = _QUOTED.sub("'…'", text)[:_MAX_ISSUE_CHARS]
        where = ", ".join(str(e) for e in issue.get("expression", []) if e)
        label = f"{issue.get('severity', 'error')}/{issue.get('code', 'unknown')}"
        parts.append(f"{label}: {text}" + (f" [{where}]" if where and where not in text else ""))
    if len(issues) > _MAX_ISSUES:
        parts.append(f"and {len(issues) - _MAX_ISSUES} more issue(s)")
    return "; ".join(parts)


def _oauth_error(body: dict[str, Any]) -> tuple[str, str]:
    code = str(body.get("error", "")) if isinstance(body.get("error"), str) else ""
    description = _QUOTED.sub("'…'", str(body.get("error_description", "")))[:_MAX_ISSUE_CHARS]
    return code, description


def json_object(response: requests.Response) -> dict[str, Any] | None:
    """The response body when it is a JSON object; ``None`` for anything else (HTML, an array, no body)."""
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


_BY_STATUS: dict[int, tuple[type[FhirError], str]] = {
    400: (FhirInvalid, "Correct the request or resource; the server's OperationOutcome says what it rejected."),
    401: (FhirUnauthorized, "Check the client id and its secret or key, and that a token was obtained."),
    403: (FhirForbidden, "Ask the FHIR server's administrator to grant this client the needed scopes."),
    404: (FhirNotFound, "Check the id or reference; the resource may never have existed on this server."),
    409: (FhirConflict, "Read the current version and retry the change against it."),
    410: (FhirNotFound, "The resource was deleted on the server; use a current one."),
    412: (FhirConflict, "The condition matched more than one resource, or the version changed; narrow it."),
    413: (FhirRequestTooLarge, "Lower the writer's max_request_bytes for this FHIR server to what it accepts."),
    422: (FhirInvalid, "Correct the resource; the server's OperationOutcome says what it rejected."),
}


def fhir_error_for(status: int, *, what: str, body: dict[str, Any] | None = None) -> FhirError:
    """The typed error for an HTTP error ``status`` and its parsed JSON ``body`` (OperationOutcome or OAuth).

    Used by :func:`raise_for_fhir_status` and for the per-entry statuses of a transaction-response, so a
    failed entry and a failed request become the same type. OAuth token-endpoint errors
    (``{"error": "invalid_client"}``) are mapped by their error code, since a token endpoint answers 400
    for both a wrong client and a refused scope.
    """
    outcome = body if body is not None and body.get("resourceType") == "OperationOutcome" else None
    summary = summarise_operation_outcome(outcome)
    oauth_error: str | None = None
    error_type: type[FhirError]
    if body is not None and outcome is None and "error" in body:
        code, description = _oauth_error(body)
        oauth_error = code or None
        summary = f"{code}: {description}" if description else code
        if code in ("invalid_client", "unauthorized_client", "invalid_grant"):
            error_type, remedy = FhirUnauthorized, _BY_STATUS[401][1]
        elif code == "invalid_scope":
            error_type, remedy = FhirForbidden, "Request only scopes this client is registered for."
        else:
            error_type, remedy = _BY_STATUS.get(status, (FhirError, ""))
    elif status >= 500:
        error_type, remedy = FhirServerError, "The FHIR server failed; try again later or contact its administrator."
    elif 300 <= status < 400:
        error_type, remedy = FhirError, "Redirects are not followed; configure the server's final URL."
        summary = summary or "the server redirected the request"
    else:
        error_type, remedy = _BY_STATUS.get(status, (FhirError, ""))
    message = f"FHIR {what} failed with HTTP {status}" + (f": {summary}" if summary else ".")
    return error_type(message, remedy=remedy, status=status, operation_outcome=outcome, oauth_error=oauth_error)


def raise_for_fhir_status(response: requests.Response, *, what: str) -> None:
    """The single choke point: raise the typed :class:`FhirError` for an error ``response``.

    Returns quietly for 1xx, 2xx and 304. Redirects (other 3xx) are errors because the client does not
    follow them: a redirect could carry the bearer token or the request to a host nobody allowed.
    ``what`` names the operation in plain words (``"read ImagingStudy/42"``) and must not contain PHI.
    """
    status = response.status_code
    if status < 300 or status == 304:
        return
    raise fhir_error_for(status, what=what, body=json_object(response))


def unavailable(exc: requests.RequestException, *, what: str) -> FhirUnavailable:
    """Wrap a connection error or timeout as :class:`FhirUnavailable`, without the URL's query or headers."""
    kind = "timed out" if isinstance(exc, requests.Timeout) else "could not connect"
    return FhirUnavailable(
        f"FHIR {what} failed: {kind} ({type(exc).__name__}).",
        remedy="Check that the FHIR server is running and reachable from this service.",
    )

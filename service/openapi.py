"""The HTTP surface of ``serve`` as an OpenAPI 3.1 document, served at ``/openapi.json``.

Written by hand, next to the code it describes: the CDS Hooks endpoints (their bodies follow CDS Hooks 2.0), the
clinician app's pages and the two JSON endpoints its script uses, the model cards, and the operations endpoints.
``tests/test_observability.py`` validates it with ``openapi-spec-validator`` and checks that every route the
application serves is in it and nothing else, so the document cannot drift from the code unnoticed.
"""

from __future__ import annotations

from typing import Any

from cds.services import SERVICES

JSON = "application/json"
HTML = "text/html"


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _html(description: str) -> dict[str, Any]:
    return {"description": description, "content": {HTML: {"schema": {"type": "string"}}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": {"type": "string"}}


_PREFLIGHT = {
    "summary": "CORS preflight",
    "description": "Answered for the origins the deployment allows (cds.config.CdsConfig.cors_allowed_origins).",
    "responses": {"204": {"description": "Preflight answered."}},
}
_ERROR = _json(_ref("Error"), "What was wrong and what to do.")
_UNAUTHORIZED = _json(_ref("Error"), "No valid CDS client JWT (generic body; the reason is logged).")

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "properties": {
            "error": {"type": "string"},
            "message": {"type": "string"},
            "remedy": {"type": "string"},
            "title": {"type": "string"},
        },
        "required": ["error", "message"],
    },
    "Discovery": {
        "type": "object",
        "properties": {
            "services": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "hook": {"type": "string"},
                        "id": {"type": "string"},
                        "title": {"type": "string"},
                        "description": {"type": "string"},
                        "prefetch": {"type": "object", "additionalProperties": {"type": "string"}},
                        "usageRequirements": {"type": "string"},
                    },
                    "required": ["hook", "id", "description"],
                },
            }
        },
        "required": ["services"],
    },
    "HookRequest": {
        "description": "A CDS Hooks 2.0 request: the hook's context, and the prefetch or a fhirServer to query.",
        "type": "object",
        "properties": {
            "hook": {"type": "string"},
            "hookInstance": {"type": "string"},
            "fhirServer": {"type": "string", "format": "uri"},
            "fhirAuthorization": {
                "type": "object",
                "properties": {
                    "access_token": {"type": "string"},
                    "token_type": {"type": "string", "enum": ["Bearer"]},
                    "expires_in": {"type": "integer"},
                    "scope": {"type": "string"},
                    "subject": {"type": "string"},
                },
                "required": ["access_token", "token_type"],
            },
            "context": {"type": "object"},
            "prefetch": {"type": "object", "additionalProperties": {"type": ["object", "null"]}},
        },
        "required": ["hook", "hookInstance", "context"],
    },
    "Cards": {
        "type": "object",
        "properties": {
            "cards": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "uuid": {"type": "string"},
                        "summary": {"type": "string", "maxLength": 140},
                        "detail": {"type": "string"},
                        "indicator": {"type": "string", "enum": ["info", "warning", "critical"]},
                        "source": {"type": "object"},
                        "links": {"type": "array", "items": {"type": "object"}},
                        "suggestions": {"type": "array", "items": {"type": "object"}},
                        "overrideReasons": {"type": "array", "items": {"type": "object"}},
                    },
                    "required": ["summary", "indicator", "source"],
                },
            }
        },
        "required": ["cards"],
    },
    "Feedback": {
        "type": "object",
        "properties": {"feedback": {"type": "array", "items": {"type": "object"}}},
        "required": ["feedback"],
    },
    "FeedbackStored": {"type": "object", "properties": {"stored": {"type": "integer"}}, "required": ["stored"]},
    "ModelCard": {"type": "object", "description": "A model card (models/cards/<name>.json)."},
    "JobStatus": {
        "description": "An analysis job as the clinician app's script follows it.",
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "state": {"type": "string", "enum": ["queued", "running", "done", "failed"]},
            "progress": {"type": "number", "minimum": 0, "maximum": 1},
            "step": {"type": "string"},
            "error": {"type": ["object", "null"]},
            "reportUrl": {"type": ["string", "null"]},
            "studyUrl": {"type": "string"},
            "jobUrl": {"type": "string"},
            "statusUrl": {"type": "string"},
            "resultHtml": {"type": "string"},
            "resultTitle": {"type": "string"},
        },
        "required": ["state", "progress", "step"],
    },
    "Readiness": {
        "type": "object",
        "properties": {
            "status": {"type": "string", "enum": ["ready", "not ready"]},
            "checks": {"type": "object", "additionalProperties": {"type": "string"}},
            "notReady": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["status", "checks"],
    },
}


def _cds_paths() -> dict[str, Any]:
    service_ids = sorted(SERVICES)
    service_id = {**_path_param("service_id", "A CDS service id from discovery."), "schema": {"enum": service_ids}}
    bearer: list[dict[str, list[str]]] = [{"cdsClientJwt": []}]
    return {
        "/cds-services": {
            "get": {
                "tags": ["CDS Hooks"],
                "summary": "Discovery: the CDS services offered",
                "responses": {"200": _json(_ref("Discovery"), "The services."), "401": _UNAUTHORIZED},
            },
            "options": _PREFLIGHT,
        },
        "/cds-services/{service_id}": {
            "parameters": [service_id],
            "post": {
                "tags": ["CDS Hooks"],
                "summary": "Call a CDS service (a hook)",
                "description": "Cards from AI results already in the EHR; never runs an analysis (order-sign may "
                "queue one for a study without results).",
                "security": bearer,
                "requestBody": {"required": True, "content": {JSON: {"schema": _ref("HookRequest")}}},
                "responses": {
                    "200": _json(_ref("Cards"), "The cards."),
                    "400": _ERROR,
                    "401": _UNAUTHORIZED,
                    "403": _json(_ref("Error"), "fhirServer is not on the allow-list."),
                    "404": _ERROR,
                    "412": _json(_ref("Error"), "Data needed that was neither prefetched nor fetchable."),
                },
            },
            "options": _PREFLIGHT,
        },
        "/cds-services/{service_id}/feedback": {
            "parameters": [service_id],
            "post": {
                "tags": ["CDS Hooks"],
                "summary": "Feedback on cards (accepted, overridden)",
                "security": bearer,
                "requestBody": {"required": True, "content": {JSON: {"schema": _ref("Feedback")}}},
                "responses": {
                    "200": _json(_ref("FeedbackStored"), "Stored."),
                    "400": _ERROR,
                    "401": _UNAUTHORIZED,
                    "404": _ERROR,
                },
            },
            "options": _PREFLIGHT,
        },
    }


def _model_paths() -> dict[str, Any]:
    name = _path_param("name", "Analyzer name, for example ct-emphysema.")
    return {
        "/models/": {
            "get": {"tags": ["Model cards"], "summary": "The analyzers and their cards", "responses": {
                "200": {"description": "HTML, or JSON to Accept: application/json.", "content": {
                    HTML: {"schema": {"type": "string"}}, JSON: {"schema": {"type": "object"}}}}}}
        },
        "/models/{name}": {
            "parameters": [name],
            "get": {"tags": ["Model cards"], "summary": "One model card", "responses": {
                "200": {"description": "HTML, or JSON to Accept: application/json.", "content": {
                    HTML: {"schema": {"type": "string"}}, JSON: {"schema": _ref("ModelCard")}}},
                "404": {"description": "No such analyzer (with a did-you-mean hint)."}}},
        },
        "/models/{name}.json": {
            "parameters": [name],
            "get": {"tags": ["Model cards"], "summary": "One model card as JSON", "responses": {
                "200": _json(_ref("ModelCard"), "The card."), "404": _ERROR}},
        },
    }  # fmt: skip


def _app_paths() -> dict[str, Any]:
    study_id = _path_param("study_id", "ImagingStudy id.")
    job_id = _path_param("job_id", "Analysis job id (from starting it).")
    report_id = _path_param("report_id", "DiagnosticReport id.")
    session: list[dict[str, list[str]]] = [{"appSession": []}]

    def page(summary: str, *, method: str = "get", **extra: Any) -> dict[str, Any]:
        responses = {"200": _html(summary), "303": {"description": "Redirect to the next page."}}
        return {method: {"tags": ["Clinician app"], "summary": summary, "responses": responses, **extra}}

    return {
        "/app/launch": page(
            "SMART launch (EHR launch with iss and launch, standalone with iss)",
            parameters=[
                {"name": "iss", "in": "query", "schema": {"type": "string"}},
                {"name": "launch", "in": "query", "schema": {"type": "string"}},
            ],
        ),
        "/app/callback": page("OAuth 2.0 redirect URI (authorization code, state)"),
        "/app/logout": page("End the session", method="post", security=session),
        "/app/": page("The launched patient's imaging studies", security=session),
        "/app/studies/{study_id}": {"parameters": [study_id], **page("One study and the analyzers that suit it")},
        "/app/studies/{study_id}/analyze": {
            "parameters": [study_id],
            "post": {
                "tags": ["Clinician app"],
                "summary": "Start an analysis (form post with the session's CSRF token)",
                "security": session,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/x-www-form-urlencoded": {
                            "schema": {
                                "type": "object",
                                "properties": {"analyzer": {"type": "string"}, "csrf_token": {"type": "string"}},
                                "required": ["analyzer", "csrf_token"],
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json(_ref("JobStatus"), "To Accept: application/json: finished at once."),
                    "202": _json(_ref("JobStatus"), "To Accept: application/json: queued or running."),
                    "303": {"description": "A browser without script: to the progress page."},
                    "403": _ERROR,
                },
            },
        },
        "/app/jobs/{job_id}": {"parameters": [job_id], **page("Progress of an analysis")},
        "/app/jobs/{job_id}/status": {
            "parameters": [job_id],
            "get": {
                "tags": ["Clinician app"],
                "summary": "An analysis job's status (the progress script polls it)",
                "security": session,
                "parameters": [
                    {
                        "name": "wait",
                        "in": "query",
                        "description": "Hold the answer up to this many seconds (at most 5) until the job finishes.",
                        "schema": {"type": "number", "maximum": 5},
                    },
                    {"name": "inline", "in": "query", "schema": {"type": "string", "enum": ["1"]}},
                ],
                "responses": {"200": _json(_ref("JobStatus"), "The job."), "404": _ERROR},
            },
        },
        "/app/reports/{report_id}": {"parameters": [report_id], **page("An AI result, for review")},
        "/app/reports/{report_id}/review": {
            "parameters": [report_id],
            **page("Sign off or reject an AI result (form post)", method="post", security=session),
        },
        "/app/media/{media_id}": {
            "parameters": [_path_param("media_id", "Media id of an explanation image.")],
            "get": {
                "tags": ["Clinician app"],
                "summary": "An explanation image of a result",
                "security": session,
                "responses": {"200": {"description": "The image.", "content": {"image/png": {}}}},
            },
        },
        "/app/smart-static/{filename}": {
            "parameters": [_path_param("filename", "A stylesheet or script of the app.")],
            "get": {
                "tags": ["Clinician app"],
                "summary": "The app's static files (no patient data)",
                "responses": {"200": {"description": "The file."}},
            },
        },
    }


def _operations_paths() -> dict[str, Any]:
    return {
        "/healthz": {"get": {"tags": ["Operations"], "summary": "Liveness", "responses": {
            "200": _json({"type": "object", "properties": {"status": {"const": "alive"}}}, "Alive.")}}},
        "/readyz": {"get": {"tags": ["Operations"], "summary": "Readiness: FHIR servers, PACS and broker reachable",
                            "responses": {"200": _json(_ref("Readiness"), "Ready."),
                                          "503": _json(_ref("Readiness"), "Not ready; notReady names each one.")}}},
        "/metrics": {"get": {"tags": ["Operations"], "summary": "Prometheus metrics", "responses": {
            "200": {"description": "Prometheus text format 0.0.4.", "content": {"text/plain": {
                "schema": {"type": "string"}}}}}}},
        "/openapi.json": {"get": {"tags": ["Operations"], "summary": "This document", "responses": {
            "200": _json({"type": "object"}, "OpenAPI 3.1.")}}},
    }  # fmt: skip


def openapi_document(public_base_url: str, *, with_app: bool) -> dict[str, Any]:
    """The OpenAPI document of a deployment at ``public_base_url`` (``with_app``: the clinician app is served)."""
    paths = {**_cds_paths(), **_model_paths(), **_operations_paths(), **(_app_paths() if with_app else {})}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "imaging-cds",
            "version": "0.1.0",
            "description": "CDS Hooks 2.0 service, SMART on FHIR clinician app and model cards for imaging AI. "
            "AI results are preliminary and for a clinician to review.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "servers": [{"url": public_base_url.rstrip("/")}],
        "tags": [{"name": n} for n in ("CDS Hooks", "Clinician app", "Model cards", "Operations")],
        "paths": paths,
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {
                "cdsClientJwt": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "A JWT signed by a trusted CDS client (CDS Hooks 2.0 trusting CDS clients).",
                },
                "appSession": {"type": "apiKey", "in": "cookie", "name": "imaging_cds_sid"},
            },
        },
    }

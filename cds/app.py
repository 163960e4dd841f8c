"""The CDS Hooks 2.0 front door: a Flask blueprint and an application factory.

This module only adapts HTTP to the pure parts: :mod:`cds.security` (who is calling), :mod:`cds.prefetch`
(which data, from where), :mod:`fhir_adapters.results` and :mod:`cds.orders` (what the data says) and :mod:`cds.cards`
(what to tell the clinician). It never imports torch or touches images: a hook answers from AI results
already in the EHR, while a clinician waits.

Each hook call that reaches patient data is recorded as an AuditEvent (:func:`fhir_adapters.audit.cds_hook_event`:
the CDS client by its ``iss`` and address, the clinician of ``userId``, the patient, the prefetch, the AI reports
the cards were built from, the outcome), and each search on ``fhirServer`` as one more; recording is one local
commit to the outbox (:mod:`pipeline.audit`), so the answer never waits for the audit repository. A replayed JWT
is refused across restarts and processes (:mod:`cds.replay`).

Status codes: 401 unauthenticated (generic body), 404 unknown service, 400 malformed request, 403 a
``fhirServer`` outside the allow-list (a trust failure, not missing data: a trusted client should never name
an untrusted server, and answering 412 would invite it to retry the same request), 412 data needed but
neither prefetched nor fetchable, 413 a body larger than ``limits.cds_request_bytes`` (the caller is
authenticated first, from the headers alone, so an anonymous caller cannot make the service read a body).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from flask.json.provider import DefaultJSONProvider, _default
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.sansio.response import Response as SansioResponse

from cds.cards import (
    CardSettings,
    QueuedStudy,
    followup_order_cards,
    missing_results_card,
    order_finding_cards,
    patient_view_cards,
)
from cds.config import CdsConfig
from cds.feedback import FeedbackStore, parse_feedback
from cds.fhirjson import bundle_problem, bundle_resources
from cds.orders import imaging_orders, studies_for_order
from cds.prefetch import Fetch, HookRequestError, PrefetchUnavailableError, render_template, resolve_prefetch
from cds.replay import replay_cache_for
from cds.security import AuthenticationError, JwtVerifier
from cds.services import (
    AI_REPORTS_KEY,
    IMAGING_STUDIES_KEY,
    ORDER_SELECT,
    PATIENT_VIEW,
    SERVICES,
    ServiceDefinition,
    discovery_document,
)
from core.errors import ImagingCdsError, NotAllowedError
from core.limits import too_large
from fhir_adapters.audit import Actor, Outcome, cds_hook_event, failure_of
from fhir_adapters.client import FhirClient
from fhir_adapters.errors import FhirError, FhirUnauthorized
from fhir_adapters.results import AiFinding, extract_findings

log = logging.getLogger(__name__)

EXTENSION_KEY = "imaging_cds.cds"
_CORS_HEADERS = "Authorization, Content-Type"
_CORS_METHODS = "GET, POST, OPTIONS"


class RequestToken:
    """The ``fhirAuthorization`` access token as a :class:`fhir_adapters.auth.TokenProvider`, for ONE request.

    It cannot be refreshed: after the FHIR server rejects it (``invalidate``) it refuses to be reused, so the
    client's automatic retry-on-401 fails fast instead of resending a token known to be bad. It never appears
    in ``repr`` or logs.
    """

    __slots__ = ("_header", "_rejected")

    def __init__(self, access_token: str) -> None:
        self._header = f"Bearer {access_token}"
        self._rejected = False

    def __repr__(self) -> str:
        return "RequestToken(<redacted>)"

    def authorization_header(self) -> str:
        if self._rejected:
            raise FhirUnauthorized(
                "The FHIR server rejected the hook's fhirAuthorization token.",
                remedy="The CDS client should send a valid access token (or the prefetch).",
            )
        return self._header

    def invalidate(self) -> None:
        self._rejected = True


@dataclass
class CdsHooksService:
    """What the blueprint's views share: configuration, the JWT verifier and the feedback store."""

    config: CdsConfig
    verifier: JwtVerifier
    feedback: FeedbackStore

    def card_settings(self) -> CardSettings:
        return CardSettings(
            app_launch_url=self.config.app_launch_url,
            model_card_base_url=self.config.model_card_base_url,
            now=datetime.now(UTC),
            recent_days=self.config.recent_days,
        )


def _service() -> CdsHooksService:
    service: CdsHooksService = current_app.extensions[EXTENSION_KEY]
    return service


def _error(status: int, code: str, message: str) -> tuple[Response, int]:
    return jsonify({"error": code, "message": message}), status


def _unauthorized() -> tuple[Response, int]:
    response, status = _error(401, "unauthorized", "The request could not be authenticated.")
    response.headers["WWW-Authenticate"] = 'Bearer realm="cds-services"'
    return response, status


def _authenticate(service: CdsHooksService, *paths: str) -> dict[str, Any]:
    base = service.config.base_url
    return service.verifier.verify(request.headers.get("Authorization"), [base + p for p in paths])


def _require(mapping: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = mapping.get(key)
    if not isinstance(value, kind) or (isinstance(value, str) and not value):
        raise HookRequestError(f"{where}.{key} is missing or has the wrong type.", remedy=f"Send {where}.{key}.")
    return value


def _check_hook_request(definition: ServiceDefinition, body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise HookRequestError("The request body must be a JSON object (a CDS Hooks request).")
    hook = _require(body, "hook", str, "request")
    if hook != definition.hook:
        raise HookRequestError(
            f"Service {definition.id} answers the {definition.hook!r} hook, not {hook[:40]!r}.",
            remedy="Call the service registered for this hook (see GET /cds-services).",
        )
    _require(body, "hookInstance", str, "request")
    context = _require(body, "context", dict, "request")
    for key in definition.required_context:
        kind: type = list if key == "selections" else dict if key == "draftOrders" else str
        _require(context, key, kind, "context")
    if "selections" in definition.required_context and not all(isinstance(s, str) and s for s in context["selections"]):
        raise HookRequestError(
            "context.selections must list references to the selected orders (strings).",
            remedy='Send the selected orders as references, for example ["ServiceRequest/123"].',
        )
    if "draftOrders" in definition.required_context:
        orders = context["draftOrders"]
        if orders.get("resourceType") != "Bundle":
            raise HookRequestError("context.draftOrders must be a FHIR Bundle.", remedy="Send the orders as a Bundle.")
        problem = bundle_problem(orders)
        if problem is not None:
            raise HookRequestError(
                f"context.draftOrders.{problem}.", remedy="Send each draft order as the resource of one Bundle entry."
            )
    if "fhirServer" in body:
        _require(body, "fhirServer", str, "request")
    if "fhirAuthorization" in body:
        auth = _require(body, "fhirAuthorization", dict, "request")
        _require(auth, "access_token", str, "fhirAuthorization")
        if str(auth.get("token_type", "Bearer")).lower() != "bearer":
            raise HookRequestError("fhirAuthorization.token_type must be 'Bearer'.")
    if body.get("prefetch") is not None and not isinstance(body["prefetch"], dict):
        raise HookRequestError("request.prefetch must be an object.")
    return body


def _fetcher(service: CdsHooksService, body: Mapping[str, Any]) -> Fetch | None:
    """A search function on the hook's ``fhirServer``; the allow-list is checked here, before any request.

    With auditing, each search is recorded with this service as the client, for the hook's ``userId``.
    """
    server = body.get("fhirServer")
    if not server:
        return None
    server = service.config.fhir_allow_list.check(server, what="fhirServer")  # the canonical URL is what is called
    auth = body.get("fhirAuthorization")
    token = RequestToken(auth["access_token"]) if isinstance(auth, Mapping) else None
    options: dict[str, Any] = {
        "auth": token,
        "timeout": service.config.fhir_timeout_s,
        "retries": 1,  # a clinician is waiting: no backoff sleeps inside a hook
        "allow_list": service.config.fhir_allow_list,
        "limits": service.config.limits,
    }
    audit = service.config.audit
    if audit is None:
        client = FhirClient(server, **options)
    else:
        user = body["context"].get("userId")
        actor = Actor(service.config.base_url, audit.source.site, user if isinstance(user, str) else None)
        client = audit.client(server, actor, request_id=str(body.get("hookInstance", ""))[:64] or None, **options)

    def fetch(resource_type: str, params: list[tuple[str, str]]) -> dict[str, Any]:
        try:
            return client.search_bundle(resource_type, params)
        except FhirError as exc:
            raise PrefetchUnavailableError(
                f"Needed {resource_type} data could not be fetched from fhirServer ({type(exc).__name__}, "
                f"HTTP {exc.status or 'no answer'}).",
                remedy="Send the prefetch, or a fhirAuthorization that grants read access.",
            ) from exc

    return fetch


def _analysed_studies(findings: list[AiFinding]) -> set[str]:
    return {study for f in findings for study in f.imaging_studies}


def _cards_for(service: CdsHooksService, definition: ServiceDefinition, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The hook's cards; the AI reports they were built from are kept on ``g`` for the audit record."""
    context = body["context"]
    fetch = _fetcher(service, body)
    data = resolve_prefetch(definition.prefetch, body.get("prefetch"), context, fetch)
    patient_id = context["patientId"]
    findings = extract_findings(bundle_resources(data.get(AI_REPORTS_KEY)), patient_id=patient_id)
    g.cds_reports = [f.report_reference for f in findings]
    studies = [r for r in bundle_resources(data.get(IMAGING_STUDIES_KEY)) if r.get("resourceType") == "ImagingStudy"]
    settings = service.card_settings()
    user_id = context.get("userId") if isinstance(context.get("userId"), str) else None
    if definition.id == PATIENT_VIEW:
        analysed = _analysed_studies(findings)
        without = sum(1 for s in studies if f"ImagingStudy/{s.get('id')}" not in analysed)
        return patient_view_cards(findings, settings, studies_without_results=without)
    all_orders = imaging_orders(context["draftOrders"])
    if definition.id == ORDER_SELECT:
        wanted = set(context["selections"])  # the same as imaging_orders(draftOrders, selections), parsed once
        selected = [order for order in all_orders if order.reference in wanted]
        return order_finding_cards(
            selected, findings, settings, patient_id=patient_id, user_id=user_id, all_orders=all_orders
        ) + followup_order_cards(selected, findings, settings)
    cards = order_finding_cards(
        all_orders, findings, settings, patient_id=patient_id, user_id=user_id, all_orders=all_orders
    )
    analysed = _analysed_studies(findings)
    for order in all_orders:
        lacking = [s for s in studies_for_order(order, studies) if s not in analysed]
        if lacking:
            queued = [QueuedStudy(study, _enqueue(service, study)) for study in lacking]
            cards.append(missing_results_card(order, queued, settings))
    return cards


def _enqueue(service: CdsHooksService, study: str) -> str | None:
    enqueue = service.config.enqueue_analysis
    if enqueue is None:
        return None
    try:
        return enqueue(study)
    except Exception:  # the queue is optional: a failure must not fail the hook, and the card then promises nothing
        log.exception("queueing the analysis of %s failed", study)
        return None


def _audit_hook(
    service: CdsHooksService,
    definition: ServiceDefinition,
    body: Any,
    claims: Mapping[str, Any],
    error: ImagingCdsError | None,
) -> None:
    """Record the hook call as an AuditEvent (a call whose body named no patient reached no patient data)."""
    audit = service.config.audit
    context = body.get("context") if isinstance(body, Mapping) else None
    if audit is None or not isinstance(context, Mapping) or not isinstance(context.get("patientId"), str):
        return
    try:
        prefetch = {key: render_template(template, context) for key, template in definition.prefetch.items()}
    except ImagingCdsError:
        prefetch = {}
    user = context.get("userId")
    outcome: Outcome = "0"
    failure = None
    if error is not None:
        outcome, failure = failure_of(error)
        outcome = "4" if 400 <= error.http_status < 500 else outcome
    audit.record(
        cds_hook_event(
            hook=definition.hook,
            service_url=f"{service.config.base_url}/cds-services/{definition.id}",
            client=Actor(
                str(claims.get("iss")), request.remote_addr or "unknown", user if isinstance(user, str) else None
            ),
            source=audit.source,
            patient=f"Patient/{context['patientId']}",
            prefetch=prefetch,
            reports=g.get("cds_reports", ()) if error is None else (),
            hook_instance=str(body.get("hookInstance", ""))[:64] or None,
            fetched_from=str(body["fhirServer"]) if body.get("fhirServer") and "prefetch" not in body else None,
            outcome=outcome,
            failure=failure,
        )
    )


def cds_blueprint() -> Blueprint:
    """The CDS Hooks endpoints; the app must hold a :class:`CdsHooksService` under ``extensions``."""
    bp = Blueprint("cds_hooks", __name__)

    @bp.app_errorhandler(RequestEntityTooLarge)
    def too_large_body(exc: RequestEntityTooLarge) -> Any:
        limit = _service().config.limits.cds_request_bytes
        error = too_large("The request body", "cds_request_bytes", limit)
        return _error(413, "request_too_large", str(error))

    @bp.after_request
    def add_cors(response: Response) -> Response:
        allowed = _service().config.cors_allowed_origins
        origin = request.headers.get("Origin")
        if "*" in allowed:
            response.headers["Access-Control-Allow-Origin"] = "*"
        elif origin and origin in allowed:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers.add("Vary", "Origin")
        else:
            return response
        response.headers["Access-Control-Allow-Headers"] = _CORS_HEADERS
        response.headers["Access-Control-Allow-Methods"] = _CORS_METHODS
        response.headers["Access-Control-Max-Age"] = "600"
        return response

    @bp.route("/cds-services", methods=["GET", "OPTIONS"])
    def discovery() -> Any:
        if request.method == "OPTIONS":
            return Response(status=204)
        service = _service()
        if service.config.require_jwt_for_discovery:
            try:
                _authenticate(service, "/cds-services")
            except AuthenticationError as exc:
                log.warning("discovery call refused: %s", exc.reason)
                return _unauthorized()
        return jsonify(discovery_document())

    @bp.route("/cds-services/<service_id>", methods=["POST", "OPTIONS"])
    def invoke(service_id: str) -> Any:
        if request.method == "OPTIONS":
            return Response(status=204)
        service = _service()
        try:
            claims = _authenticate(service, f"/cds-services/{service_id}")
        except AuthenticationError as exc:
            log.warning("hook call to %s refused: %s", service_id[:64], exc.reason)
            return _unauthorized()
        definition = SERVICES.get(service_id)
        if definition is None:
            return _error(404, "unknown_service", "No CDS service with this id; see GET /cds-services.")
        body: Any = None
        try:
            body = _check_hook_request(definition, request.get_json(silent=True))
            cards = _cards_for(service, definition, body)
        except NotAllowedError as exc:
            log.warning("hook %s refused: fhirServer not on the allow-list", definition.id)
            _audit_hook(service, definition, body, claims, exc)
            return _error(403, "fhir_server_not_allowed", str(exc))
        except ImagingCdsError as exc:
            _audit_hook(service, definition, body, claims, exc)
            return _error(exc.http_status, type(exc).__name__, str(exc))
        _audit_hook(service, definition, body, claims, None)  # committed before the answer leaves
        service.feedback.record_issued_later(definition.id, cards)  # off the request path; see FeedbackStore
        log.info("hook %s instance %s: %d card(s)", definition.id, str(body.get("hookInstance"))[:64], len(cards))
        return jsonify({"cards": cards})

    @bp.route("/cds-services/<service_id>/feedback", methods=["POST", "OPTIONS"])
    def feedback(service_id: str) -> Any:
        if request.method == "OPTIONS":
            return Response(status=204)
        service = _service()
        try:
            claims = _authenticate(service, f"/cds-services/{service_id}/feedback", f"/cds-services/{service_id}")
        except AuthenticationError as exc:
            log.warning("feedback call refused: %s", exc.reason)
            return _unauthorized()
        if service_id not in SERVICES:
            return _error(404, "unknown_service", "No CDS service with this id; see GET /cds-services.")
        try:
            entries = parse_feedback(request.get_json(silent=True))
        except ImagingCdsError as exc:
            return _error(exc.http_status, type(exc).__name__, str(exc))
        stored = service.feedback.record_feedback(service_id, entries, client_iss=str(claims.get("iss")))
        return jsonify({"stored": stored})

    return bp


class FastJsonProvider(DefaultJSONProvider):
    """Flask's JSON provider with orjson doing the parsing of request bodies and the encoding of responses.

    A hook body carries the whole prefetch (tens of kilobytes of FHIR JSON) and an order hook's answer
    carries whole draft orders, so JSON is a large share of a hook's CPU time; orjson does it several times
    faster. The results are the same JSON: values orjson does not handle the way Flask does (datetimes,
    dataclasses, anything exotic) go through Flask's own ``default`` hook, and input orjson refuses but the
    standard library reads (integers beyond 64 bits, ``NaN``) falls back to the standard library; nesting too
    deep for either is malformed JSON (a 400), not a crash. Keys are kept in insertion order, as
    ``sort_keys = False`` asks.
    """

    _OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
    sort_keys = False

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        try:
            return orjson.loads(s)
        except orjson.JSONDecodeError:
            try:
                return super().loads(s, **kwargs)
            except RecursionError:  # nesting orjson refused too (over 1024 levels): malformed, not a crash
                raise ValueError("JSON nested too deeply") from None

    def response(self, *args: Any, **kwargs: Any) -> SansioResponse:
        obj = self._prepare_response_obj(args, kwargs)
        try:
            payload = orjson.dumps(obj, default=_default, option=self._OPTIONS)
        except TypeError:  # e.g. non-string keys, which the standard library turns into strings
            return super().response(obj)
        return self._app.response_class(payload, mimetype=self.mimetype)  # type: ignore[arg-type]


def create_app(
    config: CdsConfig, *, verifier: JwtVerifier | None = None, feedback: FeedbackStore | None = None
) -> Flask:
    """A Flask app serving the CDS Hooks endpoints; nothing is read or started before this is called."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.limits.cds_request_bytes  # also stops a chunked body while it streams
    app.json = FastJsonProvider(app)  # keeps keys in insertion order (sort_keys = False)
    app.extensions[EXTENSION_KEY] = CdsHooksService(
        config=config,
        verifier=verifier
        or JwtVerifier(config, replay_cache=replay_cache_for(config.replay_cache, config.feedback_db.parent)),
        feedback=feedback or FeedbackStore(config.feedback_db),
    )
    app.register_blueprint(cds_blueprint())
    return app

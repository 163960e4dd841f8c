"""The sandbox EHR as a Flask app, and a context manager that serves it on loopback for tests and the demo.

Routes (``{base}`` is ``http://127.0.0.1:PORT``; the FHIR base / ``iss`` is ``{base}/fhir``):

* ``GET {base}/launch-ehr`` - the "EHR": issues an opaque launch id and sends the browser to the app.
* ``GET {base}/authorize`` - validates the request, picks a patient (standalone), shows the consent page.
* ``POST {base}/authorize/decision`` - the consent form's Approve / Deny.
* ``POST {base}/token`` - authorization_code and refresh_token grants.
* ``GET {base}/.well-known/jwks.json`` - the key that signs id_tokens.
* ``GET {iss}/.well-known/smart-configuration``, ``{iss}/.well-known/openid-configuration``, ``{iss}/metadata``.
* ``{iss}/<anything>`` - the scope-enforcing proxy to the real FHIR server.
"""

from __future__ import annotations

import ipaddress
import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import requests
from authlib.common.urls import add_params_to_uri
from authlib.oauth2.rfc6749 import InvalidRequestError, InvalidScopeError, OAuth2Error
from flask import Flask, Response, jsonify, render_template, request
from werkzeug.serving import WSGIRequestHandler, make_server

from core.errors import ConfigurationError
from devtools.sandbox.authserver import (
    ASSERTION_ALGORITHMS,
    TOKEN_AUTH_METHODS,
    StoredAuthorizationRequest,
    build_authorization_server,
)
from devtools.sandbox.config import SandboxConfig
from devtools.sandbox.proxy import (
    ProxyRefusalError,
    authenticate_bearer,
    forward,
    plan_request,
    refusal_response,
    upstream_response,
    with_oauth_uris,
)
from devtools.sandbox.scopes import parse_resource_scope, split_scopes
from devtools.sandbox.state import Grant, LaunchContext, SandboxState

CONSENT_LIFETIME = 600
FHIR_CONTEXT_KEYS = ("reference", "canonical", "identifier", "type", "role")

CAPABILITIES_COMMON = (
    "launch-ehr",
    "launch-standalone",
    "authorize-post",
    "client-public",
    "client-confidential-symmetric",
    "client-confidential-asymmetric",
    "context-ehr-patient",
    "context-ehr-encounter",
    "context-standalone-patient",
    "context-banner",
    "context-style",
    "sso-openid-connect",
    "permission-offline",
    "permission-online",
    "permission-patient",
    "permission-user",
    "permission-v1",
)


def patient_id(value: str | None) -> str | None:
    """``Patient/123``, an absolute URL or ``123`` -> ``123`` (the token's ``patient`` is a bare id)."""
    return value.rstrip("/").split("/")[-1] if value else None


def practitioner_reference(value: str | None) -> str | None:
    """``123`` -> ``Practitioner/123``; a typed reference (``PractitionerRole/9``) is kept as is."""
    if not value:
        return None
    parts = value.rstrip("/").split("/")
    return "/".join(parts[-2:]) if len(parts) >= 2 else f"Practitioner/{parts[-1]}"


def parse_fhir_context(raw: str | None) -> tuple[dict[str, Any], ...]:
    """The launch's ``fhir_context`` parameter: a JSON list of references (strings) or SMART 2.x objects."""
    if not raw:
        return ()
    try:
        items = json.loads(raw)
    except ValueError:
        items = [part for part in raw.split(",") if part]
    if not isinstance(items, list):
        items = [items]
    result: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, str):
            result.append({"reference": item})
        elif isinstance(item, Mapping):
            result.append({k: v for k, v in item.items() if k in FHIR_CONTEXT_KEYS})
    return tuple(result)


def smart_configuration(config: SandboxConfig, base: str) -> dict[str, Any]:
    """The ``.well-known/smart-configuration`` document (SMART App Launch 2.x, section 2.0.x discovery)."""
    capabilities = list(CAPABILITIES_COMMON)
    if not config.v1_only:
        capabilities.append("permission-v2")
    return {
        "issuer": f"{base}/fhir",
        "jwks_uri": f"{base}/.well-known/jwks.json",
        "authorization_endpoint": f"{base}/authorize",
        "token_endpoint": f"{base}/token",
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "token_endpoint_auth_methods_supported": list(TOKEN_AUTH_METHODS),
        "token_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGORITHMS),
        "scopes_supported": list(config.advertised_scopes),
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "capabilities": capabilities,
    }


def create_sandbox_app(config: SandboxConfig) -> Flask:
    """Build a fresh sandbox EHR (its own state, keys and clients); nothing is shared between apps."""
    app = Flask(__name__)
    app.config["SANDBOX_CONFIG"] = config
    state = SandboxState()
    sessions = threading.local()

    def base_url() -> str:
        return (config.public_base_url or request.url_root).rstrip("/")

    def issuer() -> str:
        return f"{base_url()}/fhir"

    def token_url() -> str:
        return f"{base_url()}/token"

    server, signer = build_authorization_server(app, config, state, issuer, token_url)

    def upstream_session() -> requests.Session:
        if not hasattr(sessions, "session"):
            sessions.session = requests.Session()
        session: requests.Session = sessions.session
        return session

    def error_page(title: str, detail: str, status: int = 400) -> Response:
        return Response(render_template("error.html", title=title, detail=detail), status=status)

    def oauth_error(error: OAuth2Error) -> Response:
        """Redirect the error to the app when its redirect URI is proven; otherwise show it here (RFC 6749 4.1.2.1)."""
        if error.redirect_uri:
            response: Response = server.handle_error_response(None, error)
            return response
        return error_page("The app's authorization request was refused", error.get_error_description())

    # --- discovery ------------------------------------------------------------------------------
    @app.get("/fhir/.well-known/smart-configuration")
    def smart_config() -> Response:
        return jsonify(smart_configuration(config, base_url()))

    @app.get("/fhir/.well-known/openid-configuration")
    def openid_config() -> Response:
        base = base_url()
        return jsonify(
            {
                "issuer": f"{base}/fhir",
                "authorization_endpoint": f"{base}/authorize",
                "token_endpoint": f"{base}/token",
                "jwks_uri": f"{base}/.well-known/jwks.json",
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "scopes_supported": ["openid", "fhirUser", "profile"],
                "claims_supported": ["iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "fhirUser"],
            }
        )

    @app.get("/.well-known/jwks.json")
    def jwks() -> Response:
        return jsonify(signer.public_jwks())

    @app.get("/smart-style.json")
    def smart_style() -> Response:
        return jsonify({"color_background": "#ffffff", "color_text": "#1b1b1b", "font_family_body": "sans-serif"})

    @app.get("/fhir/metadata")
    def metadata() -> Response:
        try:
            upstream = forward(
                upstream_session(), config.fhir_upstream, "GET", "metadata", "", b"",
                {"Accept": "application/fhir+json"}, config.upstream_timeout,
            )  # fmt: skip
        except ProxyRefusalError as refusal:
            return refusal_response(refusal)
        if upstream.status_code != 200:
            return upstream_response(upstream, None, None)
        capability = with_oauth_uris(upstream.json(), f"{base_url()}/authorize", token_url())
        return Response(json.dumps(capability), status=200, content_type="application/fhir+json")

    # --- the EHR side: launching an app ------------------------------------------------------------
    @app.get("/launch-ehr")
    def launch_ehr() -> Response:
        app_url = request.args.get("app", "")
        if urlsplit(app_url).scheme not in ("http", "https"):
            return error_page("Cannot launch the app", "The 'app' parameter must be the app's http(s) launch URL.")
        practitioner = practitioner_reference(request.args.get("practitioner") or config.auto_practitioner)
        if not practitioner:
            return error_page("Cannot launch the app", "An EHR launch needs the launching 'practitioner'.")
        context = LaunchContext(
            practitioner=practitioner,
            patient=patient_id(request.args.get("patient")),
            encounter=patient_id(request.args.get("encounter")),
            fhir_context=parse_fhir_context(request.args.get("fhir_context")),
            need_patient_banner=request.args.get("need_patient_banner", "true").lower() not in ("0", "false", "no"),
        )
        launch_id = state.new_launch(context, config.launch_lifetime)
        target = add_params_to_uri(app_url, [("iss", issuer()), ("launch", launch_id)])
        return Response(status=302, headers={"Location": target})

    # --- authorization ---------------------------------------------------------------------------
    def redirect_error(grant: Any, error: OAuth2Error) -> Response:
        error.redirect_uri = grant.redirect_uri
        error.state = grant.request.payload.state
        return oauth_error(error)

    @app.route("/authorize", methods=["GET", "POST"])
    def authorize() -> Response:
        try:
            grant = server.get_consent_grant(end_user=None)
        except OAuth2Error as error:
            return oauth_error(error)
        params = {key: request.values[key] for key in request.values}
        requested = split_scopes(params.get("scope"))
        scopes = split_scopes(grant.request.scope)
        launch_param = params.get("launch")
        if launch_param:
            if "launch" not in requested:
                return redirect_error(grant, InvalidScopeError("An EHR launch must request the 'launch' scope."))
            launch_context = state.launch(launch_param)
            if launch_context is None:
                return redirect_error(grant, InvalidRequestError("The 'launch' value is unknown or has expired."))
            context = launch_context
        elif "launch" in requested:
            return redirect_error(
                grant, InvalidRequestError("The 'launch' scope needs the 'launch' parameter of an EHR launch.")
            )
        else:
            practitioner = practitioner_reference(params.get("sandbox_practitioner") or config.auto_practitioner)
            wants_patient = "launch/patient" in requested
            chosen_patient = patient_id(params.get("sandbox_patient"))
            if not practitioner or (wants_patient and not chosen_patient):
                return picker_page(params, practitioner, wants_patient)
            context = LaunchContext(practitioner=practitioner, patient=chosen_patient if wants_patient else None)
        transaction = state.add_pending(params, context, scopes, CONSENT_LIFETIME)
        return Response(
            render_template(
                "consent.html",
                client_id=grant.client.get_client_id(),
                transaction=transaction,
                context=context,
                resource_scopes=[s for s in scopes if parse_resource_scope(s) is not None],
                other_scopes=[s for s in scopes if parse_resource_scope(s) is None],
                dropped=[s for s in requested if s not in scopes],
            )
        )

    def picker_page(params: dict[str, str], practitioner: str | None, wants_patient: bool) -> Response:
        """Standalone launch: the user picks the patient (and, without a test pre-selection, who they are)."""

        def listing(resource_type: str) -> list[tuple[str, str]]:
            try:
                upstream = forward(
                    upstream_session(), config.fhir_upstream, "GET", resource_type, "_count=100", b"",
                    {"Accept": "application/fhir+json"}, config.upstream_timeout,
                )  # fmt: skip
                bundle = upstream.json() if upstream.status_code == 200 else {}
            except (ProxyRefusalError, ValueError):
                bundle = {}
            return [display(entry.get("resource") or {}) for entry in bundle.get("entry") or []]

        hidden = {k: v for k, v in params.items() if k not in ("sandbox_patient", "sandbox_practitioner")}
        return Response(
            render_template(
                "picker.html",
                hidden=hidden,
                practitioner=practitioner,
                practitioners=[] if practitioner else listing("Practitioner"),
                patients=listing("Patient") if wants_patient else [],
                wants_patient=wants_patient,
            )
        )

    @app.post("/authorize/decision")
    def decision() -> Response:
        pending = state.take_pending(request.form.get("transaction", ""))
        if pending is None:
            return error_page("This consent page has expired", "Start the launch again from the EHR.")
        stored = StoredAuthorizationRequest(f"{base_url()}/authorize?{urlencode(pending.params)}", pending.params)
        try:
            grant = server.get_consent_grant(stored)
        except OAuth2Error as error:
            return oauth_error(error)
        user: Grant | None = None
        if request.form.get("decision") == "approve":
            ticked = set(request.form.getlist("granted"))
            granted = [s for s in pending.scopes if parse_resource_scope(s) is None or s in ticked]
            user = Grant(context=pending.context, scope=" ".join(granted), nonce=pending.params.get("nonce"))
        response: Response = server.create_authorization_response(stored, grant_user=user, grant=grant)
        return response

    @app.post("/token")
    def token() -> Response:
        response: Response = server.create_token_response()
        return response

    # --- the FHIR proxy -------------------------------------------------------------------------
    @app.route("/fhir", defaults={"path": ""}, methods=["GET", "POST"])
    @app.route("/fhir/<path:path>", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"])
    def fhir_proxy(path: str) -> Response:
        try:
            token_record = authenticate_bearer(state, request.headers.get("Authorization"))
            body = request.get_data()
            plan = plan_request(token_record, request.method, path, request.query_string.decode(), body)
            upstream = forward(
                upstream_session(), config.fhir_upstream, request.method, path, plan.query_string, plan.body,
                dict(request.headers), config.upstream_timeout,
            )  # fmt: skip
            return upstream_response(upstream, plan.read_patient, plan.resource_type)
        except ProxyRefusalError as refusal:
            return refusal_response(refusal)

    return app


def display(resource: Mapping[str, Any]) -> tuple[str, str]:
    """(id, a readable label) for a Patient or Practitioner in the picker; the label is only shown on the page."""
    names = resource.get("name") or [{}]
    name = names[0] if isinstance(names, list) and names else {}
    text = name.get("text") or " ".join([*(name.get("given") or []), name.get("family") or ""]).strip()
    rid = str(resource.get("id") or "")
    return rid, text or f"{resource.get('resourceType', 'Resource')}/{rid}"


@dataclass(frozen=True)
class SandboxHandle:
    """Where a running sandbox answers; ``fhir_base`` is the ``iss`` the app is launched with."""

    base_url: str
    fhir_base: str
    authorize_url: str
    token_url: str
    jwks_url: str
    app: Flask

    @property
    def smart_configuration_url(self) -> str:
        return f"{self.fhir_base}/.well-known/smart-configuration"

    def launch_url(
        self,
        patient: str,
        practitioner: str,
        app_launch_url: str,
        encounter: str | None = None,
        fhir_context: Sequence[str | Mapping[str, Any]] | None = None,
        need_patient_banner: bool = True,
    ) -> str:
        """The URL a clinician's click in the EHR opens: it redirects to ``app_launch_url?iss=...&launch=...``."""
        params = {"patient": patient, "practitioner": practitioner, "app": app_launch_url}
        if encounter:
            params["encounter"] = encounter
        if fhir_context:
            params["fhir_context"] = json.dumps(list(fhir_context))
        params["need_patient_banner"] = "true" if need_patient_banner else "false"
        return f"{self.base_url}/launch-ehr?{urlencode(params)}"


class QuietRequestHandler(WSGIRequestHandler):
    """werkzeug's request handler without its per-request access log line.

    That line carries the full query string - an authorization ``code``, a ``launch`` id, a patient id in a
    FHIR search - and costs a write to stdout per request. Errors are still logged (without the URL).
    """

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        return None


@contextmanager
def run_sandbox(config: SandboxConfig, host: str = "127.0.0.1") -> Iterator[SandboxHandle]:
    """Serve a sandbox EHR on a free port of ``host`` (loopback by default) in a background thread."""
    if not ipaddress.ip_address(host).is_loopback:
        raise ConfigurationError(
            f"The sandbox EHR was asked to serve on {host}.", remedy="It is a development tool: use a loopback address."
        )
    app = create_sandbox_app(config)
    server = make_server(host, 0, app, threaded=True, request_handler=QuietRequestHandler)
    base = config.public_base_url or f"http://{host}:{server.port}"
    thread = threading.Thread(target=server.serve_forever, name="sandbox-ehr", daemon=True)
    thread.start()
    try:
        yield SandboxHandle(
            base_url=base,
            fhir_base=f"{base}/fhir",
            authorize_url=f"{base}/authorize",
            token_url=f"{base}/token",
            jwks_url=f"{base}/.well-known/jwks.json",
            app=app,
        )
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()

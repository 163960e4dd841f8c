"""The clinician's SMART app: a Flask blueprint and an application factory.

This module adapts HTTP to the pure parts and nothing more:

* :mod:`smart_launch.oauth` - discovery, PKCE, state, scopes, token grants, id_token verification;
* :mod:`smart_launch.session` - the server-side authorisation state behind an opaque session cookie;
* :mod:`smart_launch.views` - what the screens show, computed from FHIR JSON;
* :class:`pipeline.handler.StudyAnalysisHandler` (run by :mod:`pipeline.jobs`) - the analysis itself, with the
  launching clinician's token;
* :func:`fhir_adapters.builders.build_signoff_bundle` - the clinician's review, written back;
* :mod:`smart_launch.reviews` - the acceptance figures.

Security in one place: every response carries a strict Content-Security-Policy (scripts and styles from this
app's static files only; ``frame-ancestors`` as configured) and ``Cache-Control: no-store``; every
state-changing request is a POST with the session's CSRF token; the session cookie is HttpOnly, SameSite=Lax,
Secure and ``__Host-``-prefixed (bound to this host, path ``/``) unless configured for loopback tests over
http; tokens stay in the server-side session (sealed at rest, :mod:`smart_launch.session`) and reach the FHIR
server only as an ``Authorization`` header. ``GET /launch`` needs no sign-in, so it is bounded: an ``iss`` that
is not a registered EHR is refused before any request, discovery is cached per EHR, each client address may
start ``launches_per_minute`` launches, and nothing is stored on the server until the EHR has authorised the
launch (the pending launch is a sealed cookie). Each access to patient data, by a page or an analysis job, is
recorded as an AuditEvent with the launching clinician as the user (:mod:`fhir_adapters.audit`). Errors show
the project error's message and remedy, never a stack trace, and logs name resource ids only.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import requests
from flask import (
    Blueprint,
    Flask,
    Response,
    abort,
    after_this_request,
    current_app,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    url_for,
)
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response as WerkzeugResponse

from core.errors import ImagingCdsError
from core.outbound import outbound_session
from core.ratelimit import RateLimitedError, RateLimiter
from core.sealing import Keyring
from core.statefiles import private_directory
from fhir_adapters.builders import build_signoff_bundle
from fhir_adapters.client import FhirClient
from fhir_adapters.constants import ANALYSIS_IDENTIFIER_SYSTEM
from fhir_adapters.errors import FhirError, FhirForbidden, FhirNotFound, FhirUnauthorized
from fhir_adapters.fhirjson import relative_reference
from fhir_adapters.history import with_devices, with_results
from fhir_adapters.images import media_png
from fhir_adapters.results import is_ai_report
from fhir_adapters.validation import validate_bundle
from models.base import Analyzer
from pipeline.analysis import AnalysisOutcome
from pipeline.handler import ANALYZE_STUDY, StudyAnalysisHandler, analysis_params
from pipeline.jobs import EmbeddedJobRunner, JobRecord, JobRunner, JobState, SqliteJobStore, UnknownJobError
from pipeline.memory import LoadedAnalyzers
from smart_launch import oauth
from smart_launch.config import SmartAppConfig
from smart_launch.launch_clients import LaunchClients, open_session_store
from smart_launch.oauth import SmartLaunchError, TokenSet
from smart_launch.reviews import ReviewLog
from smart_launch.session import (
    SESSION_LIFETIME_WHILE_AUTHORIZING_S,
    AuthorizationState,
    PendingLaunch,
    RecentReads,
    SessionStore,
    SessionTokenProvider,
)
from smart_launch.views import (
    AnalyzerChoice,
    PatientBanner,
    Permissions,
    model_card,
    patient_banner,
    permissions,
    report_view,
    study_row,
    study_rows,
    suitable_analyzers,
    trend_sections,
)

log = logging.getLogger(__name__)

EXTENSION_KEY = "imaging_cds.smart"
SESSION_COOKIE = "imaging_cds_sid"
LAUNCH_COOKIE = "imaging_cds_launch"
SECURE_PREFIX = "__Host-"
"""Over HTTPS cookies are named ``__Host-...``: the browser then keeps them only if Secure, without Domain and with
path ``/``, so no sibling subdomain can set or shadow the session."""
ANALYZER_RETRY_S = 60.0
REJECTION_KINDS = ("entered-in-error", "cancelled")
STATIC_MAX_AGE_S = 600

bp = Blueprint(
    "smart",
    __name__,
    template_folder="templates",
    static_folder="static",
    static_url_path="/smart-static",
)


# ---------------------------------------------------------------------------------------------- app state


@dataclass
class SmartApp:
    """Everything the blueprint needs at run time, built once by :func:`create_app`."""

    config: SmartAppConfig
    sessions: SessionStore
    job_store: SqliteJobStore | None
    reviews: ReviewLog
    http: requests.Session = field(default_factory=outbound_session)
    recent: RecentReads = field(default_factory=RecentReads)
    loaded: LoadedAnalyzers = field(default_factory=LoadedAnalyzers)
    _analyzer_errors: dict[str, tuple[str, float]] = field(default_factory=dict)
    job_runner: JobRunner | None = None
    """A job engine's runner (its workers build the handler themselves: ``service.worker``); ``None``: analyses
    run on an embedded runner over ``job_store``, in this process."""
    jobs: JobRunner = field(init=False)
    clients: LaunchClients = field(init=False)
    launch_limit: RateLimiter = field(init=False)
    _discovered: dict[str, tuple[float, oauth.SmartConfiguration]] = field(default_factory=dict)

    @property
    def keyring(self) -> Keyring:
        return self.sessions.keyring

    def __post_init__(self) -> None:
        self.launch_limit = RateLimiter(self.config.launches_per_minute, 60.0)
        self.clients = LaunchClients(self.config, self.sessions, self.http)
        if self.job_runner is not None:
            self.jobs = self.job_runner
            return
        assert self.job_store is not None, "an embedded runner needs a job store"
        handler = StudyAnalysisHandler(
            client_for=self.client_for_job,
            dicomweb_allow_list=self.config.dicomweb_allow_list,
            card_base_url=self.config.card_base_url,
            loaded=self.loaded,
            keep_filed=True,
            on_outcome=self.keep_outcome,
            limits=self.config.limits,
            write_settings=self.config.write_settings,
        )
        self.jobs = EmbeddedJobRunner(self.job_store, {ANALYZE_STUDY: handler}, max_workers=self.config.job_workers)

    # ------------------------------------------------------------------ tokens and FHIR

    def refresher(self, state: AuthorizationState) -> TokenSet:
        return self.clients.refresher(state)

    def token_provider(self, session_id: str) -> SessionTokenProvider:
        return self.clients.token_provider(session_id)

    def read_recent(self, session_id: str, client: FhirClient, resource_type: str, resource_id: str) -> dict[str, Any]:
        """``resource_type/resource_id`` as this session read it within the last minute, else read from the EHR."""
        key = f"{resource_type}/{resource_id}"
        found = self.recent.get(session_id, key)
        if found is None:
            found = client.read(resource_type, resource_id)
            self.recent.put(session_id, key, found)
        resource: dict[str, Any] = found
        return resource

    def fhir_client(self, session_id: str, state: AuthorizationState) -> FhirClient:
        """A FHIR client for the session's EHR whose token comes from (and is refreshed in) the session, with each
        access recorded for the launch's clinician (see :meth:`LaunchClients.fhir_client`)."""
        return self.clients.fhir_client(session_id, state)

    def discovery(self, client: oauth.ClientRegistration) -> oauth.SmartConfiguration:
        """The registered EHR's SMART configuration, discovered at most once per ``discovery_cache_s``: a flood
        of launches does not become a flood of requests to the EHR."""
        base = client.fhir_base.rstrip("/")
        found = self._discovered.get(base)
        if found is not None and time.monotonic() - found[0] < self.config.discovery_cache_s:
            return found[1]
        smart = oauth.discover(base, self.http, timeout=self.config.http_timeout_s)
        self._discovered[base] = (time.monotonic(), smart)
        return smart

    # ------------------------------------------------------------------ analyzers

    def analyzer(self, name: str) -> Analyzer:
        """The analyzer ``name``, built once (loading weights is slow) and kept for later jobs."""
        if name not in self.config.analyzers:
            from core.errors import ConfigurationError

            raise ConfigurationError(
                f"Analyzer {name!r} is not offered by this app.",
                remedy=f"Choose one of: {', '.join(self.config.analyzers)}.",
            )
        return self.loaded.get(name)

    def analyzer_choices(self) -> list[AnalyzerChoice]:
        """The configured analyzers that could be built here; one that cannot (weights missing, card invalid) is
        left out and its reason kept for :meth:`unavailable_analyzers`, and retried a minute later."""
        choices: list[AnalyzerChoice] = []
        for name in self.config.analyzers:
            failed = self._analyzer_errors.get(name)
            if failed is not None and time.monotonic() - failed[1] < ANALYZER_RETRY_S:
                continue
            try:
                analyzer = self.analyzer(name)
            except ImagingCdsError as exc:
                self._analyzer_errors[name] = (exc.message, time.monotonic())
                log.warning("Analyzer %s is unavailable: %s", name, type(exc).__name__)
                continue
            self._analyzer_errors.pop(name, None)
            choices.append(AnalyzerChoice(name, analyzer.title, tuple(analyzer.requirements.modalities)))
        return choices

    def unavailable_analyzers(self) -> dict[str, str]:
        """Why each configured analyzer that cannot run here cannot (for the administrator; no patient data)."""
        return {name: message for name, (message, _) in self._analyzer_errors.items()}

    # ------------------------------------------------------------------ jobs

    def client_for_job(self, params: Mapping[str, Any]) -> FhirClient:
        """The FHIR client an analysis job runs with: the launching session's (see :class:`LaunchClients`)."""
        return self.clients.client_for_job(params)

    def keep_outcome(self, params: Mapping[str, Any], outcome: AnalysisOutcome) -> None:
        """Keep what an analysis just filed for the launching session's next page (see the two methods below)."""
        session_id = self.sessions.session_for_job_ref(str(params.get("launch_ref", "")))
        if session_id is not None:
            self._keep_explanations(session_id, outcome)
            self._keep_report(session_id, outcome)

    def _keep_explanations(self, session_id: str, outcome: AnalysisOutcome) -> None:
        """Keep the PNGs the analysis just filed, by Media id, so the result page that opens next shows them
        without reading each Media back from the EHR.

        The bundle has one Media per explanation, in order, each created conditionally on the analysis'
        deterministic identifier; when the EHR already held them (a re-run), they are the same analysis of the
        same series by the same analyzer version. If the counts do not pair up, nothing is kept and the images
        come from the EHR as on any later visit.
        """
        media = [ref.split("/")[1] for ref in outcome.written if ref.startswith("Media/")]
        explanations = outcome.result.explanations
        if len(media) == len(explanations):
            for media_id, explanation in zip(media, explanations, strict=True):
                self.recent.put(session_id, f"png:Media/{media_id}", explanation.png)

    def _keep_report(self, session_id: str, outcome: AnalysisOutcome) -> None:
        """Keep the report the analysis just filed, with its Observations and Device, as the EHR answered the
        transaction with them, for the result page that opens next (see :func:`report`), once.

        Kept only when the answer carried the report and every resource the page shows; otherwise that page
        reads the EHR, as on any later visit.
        """
        report = outcome.filed.get(outcome.diagnostic_report)
        if report is None:
            return
        results = [
            outcome.filed.get(relative_reference(str((r or {}).get("reference", ""))) or "")
            for r in report.get("result") or []
        ]
        if not all(results):
            return
        devices = [r for ref, r in outcome.filed.items() if ref.startswith("Device/")]
        self.recent.put(session_id, f"report:{outcome.diagnostic_report}", [report, *results, *devices])

    def close(self) -> None:
        self.jobs.shutdown(wait=True)
        if self.job_store is not None:
            self.job_store.close()
        self.sessions.close()
        self.reviews.close()


def smart_app() -> SmartApp:
    ext: SmartApp = current_app.extensions[EXTENSION_KEY]
    return ext


def create_app(config: SmartAppConfig, *, job_runner: JobRunner | None = None) -> Flask:
    """Build the clinician app for ``config``; state files live under ``config.data_dir`` (made ``0700``).

    ``job_runner``: the deployment's job engine (``serve`` with a broker); by default analyses run in this process.
    """
    private_directory(config.data_dir)
    if config.keyring is None:
        log.warning("No state key configured: sessions are sealed with a key of this process only (tests, demo)")
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=secrets.token_bytes(32),  # Flask's own cookie session is not used; this only guards misuse
        MAX_CONTENT_LENGTH=64 * 1024,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=config.secure_cookies,
        # The app's own CSS and JS (no patient data) may be reused for ten minutes without asking again: the
        # progress and result pages then render without a revalidation round trip for each file.
        SEND_FILE_MAX_AGE_DEFAULT=STATIC_MAX_AGE_S,
    )
    ext = SmartApp(
        config=config,
        sessions=open_session_store(config),
        job_store=None if job_runner is not None else SqliteJobStore(config.data_dir / "smart-jobs.sqlite"),
        reviews=ReviewLog(config.data_dir / "reviews.sqlite"),
        job_runner=job_runner,
    )
    app.extensions[EXTENSION_KEY] = ext
    app.register_blueprint(bp)
    return app


# ---------------------------------------------------------------------------------------------- request plumbing


@dataclass(frozen=True)
class Current:
    """The request's session: its id and state (``None`` when the browser has no live session)."""

    session_id: str | None
    state: AuthorizationState | None


def current() -> Current:
    """The request's session, looked up once; its id is passed on as the store's key (:class:`SessionKey`)."""
    if "smart_current" not in g:
        session_id = request.cookies.get(cookie_name(SESSION_COOKIE))
        key = smart_app().sessions.key(session_id) if session_id else None
        state = smart_app().sessions.get(key) if key else None
        g.smart_current = Current(key if state else None, state)
    found: Current = g.smart_current
    return found


def cookie_name(base: str) -> str:
    """``base``, with the ``__Host-`` prefix when cookies are Secure (served over HTTPS)."""
    return f"{SECURE_PREFIX}{base}" if smart_app().config.secure_cookies else base


def _cookie_options() -> dict[str, Any]:
    """Attributes of every cookie the app sets. Embedded in an EHR's frame (``frame_ancestors``) over HTTPS, the
    cookies are ``SameSite=None; Partitioned`` (kept per embedding site), or the frame would never see them."""
    config = smart_app().config
    embedded = bool(config.frame_ancestors) and config.secure_cookies
    return {
        "httponly": True,
        "samesite": "None" if embedded else "Lax",
        "secure": config.secure_cookies,
        "partitioned": embedded,
        "path": "/",
    }


def require_session() -> tuple[str, AuthorizationState]:
    found = current()
    if found.session_id is None or found.state is None or not found.state.authorized:
        raise SmartLaunchError(
            "There is no active launch in this browser (it may have expired).",
            remedy="Open imaging-cds from the patient's chart in the EHR, or use the standalone launch.",
        )
    return found.session_id, found.state


def check_csrf(state: AuthorizationState) -> None:
    sent = request.form.get("csrf_token", "")
    if not sent or not hmac.compare_digest(sent.encode("utf-8"), state.csrf_token.encode("utf-8")):
        raise SmartLaunchError(
            "This form was not submitted from the page this app showed you (its security token is missing or old).",
            remedy="Reload the page and submit the form again.",
        )


def set_session_cookie(response: WerkzeugResponse, session_id: str) -> None:
    response.set_cookie(
        cookie_name(SESSION_COOKIE),
        session_id,
        max_age=int(smart_app().config.session_lifetime_s),
        **_cookie_options(),
    )


def clear_cookie(response: WerkzeugResponse, base: str) -> None:
    options = _cookie_options()
    response.delete_cookie(
        cookie_name(base),
        path="/",
        secure=options["secure"],
        httponly=True,
        samesite=options["samesite"],
        partitioned=options["partitioned"],
    )


def content_security_policy(frame_ancestors: tuple[str, ...]) -> str:
    ancestors = " ".join(frame_ancestors) if frame_ancestors else "'none'"
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        f"form-action 'self'; base-uri 'none'; frame-ancestors {ancestors}"
    )


@bp.before_app_request
def request_id() -> None:
    """An id for this request, recorded with each access it makes (the audit's transaction entity)."""
    g.request_id = str(uuid.uuid4())


@bp.after_app_request
def security_headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = content_security_policy(smart_app().config.frame_ancestors)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    if not request.path.startswith("/smart-static/"):
        response.headers["Cache-Control"] = "no-store"
    return response


def render(template: str, http_status: int = 200, **context: Any) -> tuple[str, int]:
    found = current()
    state = found.state if found.state and found.state.authorized else None
    page = render_template(template, active=state, csrf_token=state.csrf_token if state else "", **context)
    return page, http_status


def render_fragment(template: str, **context: Any) -> str:
    """Part of a page (for the app's own script to place), with what :func:`render` gives every page."""
    return render(template, **context)[0]


def wants_json() -> bool:
    """The request is the app's own script asking for JSON (``Accept: application/json``), not a page."""
    return request.accept_mimetypes.best == "application/json"


def error_page(exc: ImagingCdsError) -> Any:
    status = exc.http_status if 400 <= exc.http_status < 600 else 500
    if wants_json():
        body = {"error": type(exc).__name__, "title": _error_title(exc), "message": exc.message, "remedy": exc.remedy}
        answer: Any = jsonify(body), status
    else:
        answer = render("error.html", status, title=_error_title(exc), message=exc.message, remedy=exc.remedy)
    if isinstance(exc, RateLimitedError):
        response = current_app.make_response(answer)
        response.headers["Retry-After"] = str(exc.retry_after_s)
        return response
    return answer


def _error_title(exc: ImagingCdsError) -> str:
    if isinstance(exc, oauth.AuthorizationDeniedError):
        return "Access not granted"
    if isinstance(exc, SmartLaunchError):
        return "The launch could not be completed"
    if isinstance(exc, RateLimitedError):
        return "Too many launches"
    if isinstance(exc, FhirForbidden):
        return "The EHR did not allow this"
    if isinstance(exc, FhirUnauthorized):
        return "Your EHR session has ended"
    return "Something went wrong"


@bp.app_errorhandler(ImagingCdsError)
def handle_project_error(exc: ImagingCdsError) -> Any:
    log.info("Request %s %s ended with %s", request.method, request.url_rule, type(exc).__name__)
    return error_page(exc)


@bp.app_errorhandler(Exception)
def handle_unexpected(exc: Exception) -> Any:
    if isinstance(exc, HTTPException):
        return exc
    reference = secrets.token_hex(4)
    log.error("Unexpected %s in %s %s (reference %s)", type(exc).__name__, request.method, request.url_rule, reference)
    return render(
        "error.html",
        500,
        title="Something went wrong",
        message=f"The app hit an unexpected error (reference {reference}).",
        remedy="Try again; if it keeps happening, give the reference to the administrator.",
    )


# ---------------------------------------------------------------------------------------------- launch


@bp.get("/launch")
def launch() -> Any:
    """EHR launch (``iss`` + ``launch``) or standalone launch (``iss`` alone); without ``iss``, the chooser page.

    Anyone may call this without signing in, so it does the least it can: the client's launch budget is
    checked, an ``iss`` that is not a registered EHR is refused before any request is made, the EHR's SMART
    configuration comes from the discovery cache, and nothing is stored on the server: what the callback
    needs travels in a sealed, ten-minute cookie (:class:`PendingLaunch`).
    """
    ext = smart_app()
    ext.launch_limit.check(request.remote_addr or "unknown", what="launches")
    iss = request.args.get("iss", "").strip()
    launch_id = request.args.get("launch", "").strip() or None
    if not iss:
        return render("launch.html", registrations=ext.config.clients)
    client = ext.config.registration_for(iss)
    smart = ext.discovery(client)
    pkce = oauth.new_pkce()
    scope = oauth.scope_request(smart, standalone=launch_id is None)
    pending = PendingLaunch(
        fhir_base=client.fhir_base.rstrip("/"),
        client_id=client.client_id,
        oauth_state=oauth.new_state(),
        code_verifier=pkce.verifier,
        requested_scope=scope,
        standalone=launch_id is None,
    )
    target = oauth.authorization_url(smart, client, scope=scope, state=pending.oauth_state, pkce=pkce, launch=launch_id)
    log.info("Starting %s launch for client %s", "standalone" if launch_id is None else "EHR", client.client_id)
    response = redirect(target, code=302)
    response.set_cookie(
        cookie_name(LAUNCH_COOKIE),
        pending.seal(ext.keyring),
        max_age=SESSION_LIFETIME_WHILE_AUTHORIZING_S,
        **_cookie_options(),
    )
    return response


@bp.get("/callback")
def callback() -> Any:
    """The redirect URI: check ``state`` against this browser's pending launch, trade the code, verify the
    id_token, and only then store a session (under a fresh id: an id planted in the browser is worth nothing).

    The pending launch is single use: its cookie is cleared by this answer, whatever it is.
    """
    ext = smart_app()

    @after_this_request
    def forget_pending(response: Response) -> Response:
        clear_cookie(response, LAUNCH_COOKIE)
        return response

    pending = PendingLaunch.open(request.cookies.get(cookie_name(LAUNCH_COOKIE)), ext.keyring)
    oauth.check_state(pending.oauth_state if pending is not None else None, request.args.get("state"))
    assert pending is not None
    error = request.args.get("error")
    if error:
        raise oauth.authorization_error(error, request.args.get("error_description"))
    code = request.args.get("code", "")
    if not code:
        raise SmartLaunchError("The EHR's answer has no authorization code.", remedy="Launch the app again.")
    client = ext.config.registration_for(pending.fhir_base)
    smart = ext.discovery(client)
    tokens = oauth.exchange_code(
        smart,
        client,
        code=code,
        code_verifier=pending.code_verifier,
        requested_scope=pending.requested_scope,
        http=ext.http,
        timeout=ext.config.http_timeout_s,
    )
    state = AuthorizationState(
        smart=smart.to_json(),
        client_id=client.client_id,
        standalone=pending.standalone,
        requested_scope=pending.requested_scope,
    )
    state.apply_tokens(tokens)
    if tokens.id_token:
        jwks = oauth.fetch_jwks(smart, ext.http, timeout=ext.config.http_timeout_s)
        claims = oauth.verify_id_token(
            tokens.id_token, jwks, client_id=client.client_id, issuer=smart.issuer or smart.fhir_base
        )
        fhir_user = claims.get("fhirUser")
        state.fhir_user = relative_reference(fhir_user) if isinstance(fhir_user, str) else None
    if not state.patient:
        raise SmartLaunchError(
            "The EHR did not say which patient this launch is for.",
            remedy="Launch the app from a patient's chart, or pick a patient when the EHR asks.",
        )
    state.phase = "authorized"
    old = request.cookies.get(cookie_name(SESSION_COOKIE))
    if old:  # this launch replaces the browser's previous one (and its tokens)
        ext.sessions.delete(old)
        ext.recent.forget_session(ext.sessions.key(old))
    new_id = ext.sessions.create(state)
    log.info("Launch authorised for client %s (%d scopes granted)", client.client_id, len(state.granted.scopes))
    study = next(
        (
            relative_reference(str(item.get("reference", "")))
            for item in state.fhir_context
            if str(item.get("reference", "")).split("/")[-2:-1] == ["ImagingStudy"]
            or (relative_reference(str(item.get("reference", ""))) or "").startswith("ImagingStudy/")
        ),
        None,
    )
    target = url_for("smart.study", study_id=study.split("/")[1]) if study else url_for("smart.index")
    response = redirect(target, code=303)
    set_session_cookie(response, new_id)
    return response


@bp.post("/logout")
def logout() -> Any:
    found = current()
    if found.session_id and found.state:
        check_csrf(found.state)
        smart_app().sessions.delete(found.session_id)
        smart_app().recent.forget_session(found.session_id)
    response = redirect(url_for("smart.launch"), code=303)
    clear_cookie(response, SESSION_COOKIE)
    return response


# ---------------------------------------------------------------------------------------------- screens


def _can(state: AuthorizationState) -> Permissions:
    return permissions(state.granted, state.fhir_user)


def _banner(client: FhirClient, session_id: str, state: AuthorizationState) -> PatientBanner | None:
    """The patient banner, on every screen of a launch that asked for one (``need_patient_banner``); the
    Patient is read once a minute at most, not on every page of one click's way to the results."""
    if not state.need_patient_banner:
        return None
    return patient_banner(smart_app().read_recent(session_id, client, "Patient", str(state.patient)))


def _patient_reports(client: FhirClient, patient: str) -> list[dict[str, Any]]:
    return list(client.search("DiagnosticReport", {"patient": patient, "identifier": f"{ANALYSIS_IDENTIFIER_SYSTEM}|"}))


def _patient_results(client: FhirClient, patient: str) -> list[dict[str, Any]]:
    """The patient's AI reports with their Observations and analyzer Devices: what the study list and the trend
    charts are drawn from."""
    params = {
        "patient": patient,
        "identifier": f"{ANALYSIS_IDENTIFIER_SYSTEM}|",
        "_include": "DiagnosticReport:result",
        "_count": "100",
    }
    resources = [
        entry["resource"]
        for page in client.search_pages("DiagnosticReport", params)
        for entry in page.get("entry", [])
        if isinstance(entry, dict) and isinstance(entry.get("resource"), dict)
    ]
    # Their Observations where the server ignored _include, and which analyzer version filed each (for the trends).
    return with_devices(client, with_results(client, resources))


@bp.get("/")
def index() -> Any:
    """The patient's imaging studies with their AI results (or, without a launch, how to open the app)."""
    found = current()
    if found.state is None or not found.state.authorized or found.session_id is None:
        return render("welcome.html", registrations=smart_app().config.clients)
    session_id, state = found.session_id, found.state
    assert state.patient is not None
    client = smart_app().fhir_client(session_id, state)
    banner = _banner(client, session_id, state)
    studies = list(client.search("ImagingStudy", {"patient": state.patient, "_count": "100"}))
    results = _patient_results(client, state.patient) if _can(state).can_read_results else []
    reports = [r for r in results if r.get("resourceType") == "DiagnosticReport"]
    return render(
        "studies.html",
        banner=banner,
        rows=study_rows(studies, reports),
        can=_can(state),
        trend_sections=trend_sections(results, patient_id=state.patient),
    )


@bp.get("/studies/<study_id>")
def study(study_id: str) -> Any:
    """One study: its series, its AI results, and the analyzers that suit its modality."""
    session_id, state = require_session()
    client = smart_app().fhir_client(session_id, state)
    resource = client.read("ImagingStudy", study_id)
    _check_same_patient(resource, state)
    smart_app().recent.put(session_id, f"ImagingStudy/{study_id}", resource)  # the Analyze click that follows
    banner = _banner(client, session_id, state)
    reports = _patient_reports(client, str(state.patient)) if _can(state).can_read_results else []
    row = study_row(resource, reports)
    analyzers = suitable_analyzers(row.modalities, smart_app().analyzer_choices())
    running = _running_job_for(state, f"ImagingStudy/{study_id}")
    return render(
        "study.html",
        banner=banner,
        row=row,
        analyzers=analyzers,
        unavailable=smart_app().unavailable_analyzers(),
        can=_can(state),
        running=running,
    )


def _check_same_patient(resource: dict[str, Any], state: AuthorizationState) -> None:
    """Never show one patient's data under another patient's banner, whatever the EHR's scopes allowed."""
    subject = relative_reference(str((resource.get("subject") or {}).get("reference", "")))
    if subject != f"Patient/{state.patient}":
        raise FhirNotFound(
            f"{resource.get('resourceType')}/{resource.get('id')} does not belong to the patient of this launch.",
            remedy="Open the study from this patient's list.",
        )


def _running_job_for(state: AuthorizationState, imaging_study: str) -> JobRecord | None:
    runner = smart_app().jobs
    for job_id in reversed(state.jobs):
        try:
            record = runner.get(job_id)
        except UnknownJobError:
            continue
        if record.params.get("imaging_study") == imaging_study and not record.state.finished:
            return record
    return None


@bp.post("/studies/<study_id>/analyze")
def analyze(study_id: str) -> Any:
    """Start an analysis job (or join the one already running for this study and analyzer).

    For the study page's script (JSON) the answer is also the job's first status, held and completed as a status
    poll's is (``?wait=``, ``?inline=1``; see :func:`job_status`): a quick analysis is answered, with its result,
    by the request that started it, and no second request competes with it while it starts.
    """
    session_id, state = require_session()
    check_csrf(state)
    can = _can(state)
    if not can.can_analyze:
        reason = next((r for r in can.reasons if "cannot file" in r), "AI results cannot be filed.")
        raise FhirForbidden(reason, remedy="Analysis needs permission to file results in the record.")
    ext = smart_app()
    name = request.form.get("analyzer", "")
    client = ext.fhir_client(session_id, state)
    resource = ext.read_recent(session_id, client, "ImagingStudy", study_id)
    _check_same_patient(resource, state)
    row = study_row(resource)
    if name not in {a.name for a in suitable_analyzers(row.modalities, ext.analyzer_choices())}:
        raise SmartLaunchError(
            f"Analyzer {name[:40]!r} does not suit ImagingStudy/{study_id} "
            f"({', '.join(row.modalities) or 'no modality'}).",
            remedy="Choose one of the analyzers offered on the study page.",
        )
    imaging_study = f"ImagingStudy/{study_id}"
    record = ext.jobs.submit(
        ANALYZE_STUDY,
        analysis_params(imaging_study, [name], fhir_base=state.fhir_base, launch_ref=state.job_ref),
        # One job per launch: a second clinician pressing Analyze on the same study gets an analysis of their own,
        # run with their own token (the job finds its session by launch_ref), never a share of the first one's.
        dedupe_key=f"{state.job_ref}|{imaging_study}|{name}",
    )
    with ext.sessions.locked(session_id):
        fresh = ext.sessions.get(session_id)
        if fresh is not None and record.id not in fresh.jobs:
            fresh.jobs = [*fresh.jobs[-49:], record.id]
            ext.sessions.put(session_id, fresh)
    log.info("Analysis job %s submitted (%s on %s)", record.id, name, imaging_study)
    if wants_json():  # the study page's script follows the job in place (see static/progress.js)
        status = _status_answer(session_id, state, record)
        status["jobUrl"] = url_for("smart.job", job_id=record.id)
        status["statusUrl"] = url_for("smart.job_status", job_id=record.id, wait=1, inline=1)
        return jsonify(status), 200 if JobState(status["state"]).finished else 202
    return redirect(url_for("smart.job", job_id=record.id), code=303)


def _own_job(state: AuthorizationState, job_id: str) -> JobRecord:
    if job_id not in state.jobs:
        raise UnknownJobError(f"No analysis {job_id[:40]!r} in this session.", remedy="Start it from the study page.")
    return smart_app().jobs.get(job_id)


def _job_json(record: JobRecord) -> dict[str, Any]:
    report = (record.result or {}).get("diagnosticReport") if record.state == JobState.DONE else None
    report_ref = relative_reference(str(report)) if report else None
    return {
        "state": record.state.value,
        "progress": round(record.progress, 3),
        "step": record.step,
        "error": record.error,
        "reportUrl": url_for("smart.report", report_id=report_ref.split("/")[1]) if report_ref else None,
        "studyUrl": url_for("smart.study", study_id=str(record.params.get("imaging_study", "/")).split("/")[-1]),
    }


@bp.get("/jobs/<job_id>")
def job(job_id: str) -> Any:
    """The progress page; it refreshes itself without JS and moves on to the results once they are filed."""
    session_id, state = require_session()
    record = _own_job(state, job_id)
    status = _job_json(record)
    if status["reportUrl"]:
        return redirect(status["reportUrl"], code=303)
    banner = _banner(smart_app().fhir_client(session_id, state), session_id, state)
    return render("job.html", job=record, status=status, banner=banner)


MAX_STATUS_WAIT_S = 5.0
RESULT_PAGE_TITLE = "AI result"


@bp.get("/jobs/<job_id>/status")
def job_status(job_id: str) -> Any:
    """The JSON the progress page polls: state, progress, step, and where the results are once done.

    ``?wait=<seconds>`` (at most 5) holds the answer until the job finishes or the time is up (long polling),
    so the results open the moment they are filed instead of at the next poll.

    ``?inline=1`` (the study page's script): the answer that reports the job done also carries the result itself
    (``resultHtml``, the main content of the result page, and ``resultTitle``), rendered from the report the
    analysis just filed, so the study page shows it in place instead of loading the result page. Only once, and
    only where the result page would show that copy (see :func:`_kept_report`); otherwise the answer has no
    ``resultHtml`` and the script opens ``reportUrl``, which reads the EHR.
    """
    session_id, state = require_session()
    return jsonify(_status_answer(session_id, state, _own_job(state, job_id)))


def _status_answer(session_id: str, state: AuthorizationState, record: JobRecord) -> dict[str, Any]:
    """The job's status JSON, after the wait and with the inline result that the request's query asks for."""
    try:
        wait = min(MAX_STATUS_WAIT_S, max(0.0, float(request.args.get("wait", "0"))))
    except ValueError:
        wait = 0.0
    if wait and not record.state.finished:
        record = smart_app().jobs.wait(record.id, timeout=wait)
    status = _job_json(record)
    if status["reportUrl"] and request.args.get("inline") == "1":
        report_id = str(status["reportUrl"]).rsplit("/", 1)[-1]
        resources = _kept_report(session_id, state, report_id)
        if resources is not None:
            client = smart_app().fhir_client(session_id, state)
            context = _report_context(session_id, state, client, report_id, resources)
            status["resultHtml"] = render_fragment("_report_main.html", reviewed=None, **context)
            status["resultTitle"] = f"{RESULT_PAGE_TITLE} · imaging-cds"
    return status


def _kept_report(session_id: str, state: AuthorizationState, report_id: str) -> list[dict[str, Any]] | None:
    """The report this session's analysis just filed, as the EHR answered the transaction with it (see
    :meth:`SmartApp._keep_report`): taken once, and only by a launch allowed to read all that a result shows."""
    if not all(state.granted.allows(kind, "r") for kind in ("DiagnosticReport", "Observation", "Device")):
        return None
    kept = smart_app().recent.take(session_id, f"report:DiagnosticReport/{report_id}")
    return list(kept) if isinstance(kept, list) else None


def _report_context(
    session_id: str, state: AuthorizationState, client: FhirClient, report_id: str, resources: list[dict[str, Any]]
) -> dict[str, Any]:
    """What a result shows (``_report_main.html``), from the report and its Observations (and Device)."""
    resource = next((r for r in resources if r.get("resourceType") == "DiagnosticReport"), None)
    if resource is None or not is_ai_report(resource):
        raise FhirNotFound(
            f"DiagnosticReport/{report_id} is not an AI result of this patient.", remedy="Open it from the study page."
        )
    _check_same_patient(resource, state)
    devices = {
        ref
        for r in resources
        if r.get("resourceType") == "Observation"
        for ref in [relative_reference(str((r.get("device") or {}).get("reference", "")))]
        if ref
    }
    present = {f"{r.get('resourceType')}/{r.get('id')}" for r in resources}
    for ref in sorted(devices - present)[:1]:
        try:
            kind, _, device_id = ref.partition("/")
            resources = [*resources, smart_app().read_recent(session_id, client, kind, device_id)]
        except FhirError as exc:
            log.info("Could not read the analyzer Device of a report: %s", type(exc).__name__)
    view = report_view(resource, resources)
    history = _patient_results(client, str(state.patient)) if _can(state).can_read_results else []
    return {
        "view": view,
        "trend_sections": trend_sections(
            history, patient_id=str(state.patient), analyzer=view.analyzer, focus_report=f"DiagnosticReport/{view.id}"
        ),
        "card": model_card(view.analyzer),
        "can": _can(state),
        "rejection_kinds": REJECTION_KINDS,
    }


@bp.get("/reports/<report_id>")
def report(report_id: str) -> Any:
    """One AI result: findings, category, probability, explanation images, analyzer version, limits, review."""
    session_id, state = require_session()
    client = smart_app().fhir_client(session_id, state)
    # Right after this session's analysis filed it, the report is shown as the EHR answered that transaction.
    resources = _kept_report(session_id, state, report_id)
    if resources is None:
        bundle = client.search_bundle(
            "DiagnosticReport",
            {"_id": report_id, "_include": "DiagnosticReport:result", "patient": str(state.patient)},
        )
        resources = [e["resource"] for e in bundle.get("entry", []) if isinstance(e.get("resource"), dict)]
    outcome = request.args.get("reviewed")
    return render(
        "report.html",
        result_page_title=RESULT_PAGE_TITLE,
        banner=_banner(client, session_id, state),
        reviewed=outcome if outcome in ("accepted", "rejected") else None,
        **_report_context(session_id, state, client, report_id, resources),
    )


@bp.get("/media/<media_id>")
def media(media_id: str) -> Any:
    """An explanation image, read from the EHR's Media (and the Binary it points at, for an image too large to
    travel inline) with the session's token and served as PNG bytes.

    Right after this session's analysis filed it, the PNG comes from what the analysis kept (see
    :meth:`SmartApp._keep_explanations`) instead of a second trip to the EHR.
    """
    session_id, state = require_session()
    # Only a launch allowed to read Media sees the kept copy; any other gets the EHR's answer (a refusal).
    kept = smart_app().recent.get(session_id, f"png:Media/{media_id}") if state.granted.allows("Media", "r") else None
    if isinstance(kept, bytes):
        return Response(kept, mimetype="image/png", headers={"Cache-Control": "private, no-store"})
    client = smart_app().fhir_client(session_id, state)
    resource = client.read("Media", media_id)
    _check_same_patient(resource, state)
    try:
        png = media_png(client, resource)  # inline, or in the Binary the Media points at
    except FhirNotFound:
        abort(404)
    return Response(png, mimetype="image/png", headers={"Cache-Control": "private, no-store"})


@bp.post("/reports/<report_id>/review")
def review(report_id: str) -> Any:
    """Accept (final, the clinician as resultsInterpreter) or reject (entered-in-error/cancelled with a note)."""
    session_id, state = require_session()
    check_csrf(state)
    can = _can(state)
    if not can.can_review:
        reason = next((r for r in can.reasons if "signed off" in r), "Results cannot be signed off here.")
        raise FhirForbidden(reason, remedy="Sign-off needs write permission and a Practitioner user.")
    decision = request.form.get("decision")
    if decision not in ("accept", "reject"):
        raise SmartLaunchError("The review form sent no decision.", remedy="Press Accept or Reject.")
    kind = request.form.get("rejection_kind", "entered-in-error")
    if kind not in REJECTION_KINDS:
        raise SmartLaunchError("Unknown rejection kind.", remedy="Choose 'wrong result' or 'not needed'.")
    ext = smart_app()
    client = ext.fhir_client(session_id, state)
    resource = client.read("DiagnosticReport", report_id)
    if not is_ai_report(resource):
        raise FhirNotFound(f"DiagnosticReport/{report_id} is not an AI result.", remedy="Open it from the study page.")
    _check_same_patient(resource, state)
    accepted = decision == "accept"
    assert state.fhir_user is not None
    bundle = build_signoff_bundle(
        resource,
        state.fhir_user,
        accepted=accepted,
        reason=request.form.get("reason", "")[:1000] if not accepted else None,
        when=datetime.now(UTC),
    )
    if not accepted and kind == "cancelled":
        bundle = _as_cancelled(bundle)
    client.transaction(bundle)
    view = report_view(resource, [])
    ext.reviews.record(
        f"DiagnosticReport/{report_id}",
        view.analyzer,
        view.version,
        "accepted" if accepted else "rejected",
        rejection_kind=None if accepted else kind,  # type: ignore[arg-type]
        reviewer=state.fhir_user,
    )
    log.info("Review of DiagnosticReport/%s recorded: %s", report_id, "accepted" if accepted else "rejected")
    outcome = "accepted" if accepted else "rejected"
    return redirect(url_for("smart.report", report_id=report_id, reviewed=outcome), code=303)


def _as_cancelled(bundle: dict[str, Any]) -> dict[str, Any]:
    """A rejection recorded as ``cancelled`` (the result is not needed) instead of ``entered-in-error`` (wrong)."""
    for entry in bundle["entry"]:
        resource = entry["resource"]
        if resource.get("resourceType") == "DiagnosticReport":
            resource["status"] = "cancelled"
    validate_bundle(bundle)
    return bundle

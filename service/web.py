"""``imaging-cds serve``: the three front doors of one deployment behind one WSGI application.

    /cds-services...   CDS Hooks 2.0 service (``cds``)           - answers EHR hooks, never runs inference
    /models/...        model cards, HTML and JSON (``service.model_cards``)
    /app/...           the clinician SMART app (``smart_launch``), launch URL ``/app/launch``
    /healthz /readyz /metrics /openapi.json   operations (``service.observability``, ``service.openapi``)

The clinician app keeps its own Flask application (its cookie, CSRF and Content-Security-Policy settings
are its own); it is mounted under ``/app``. The sandbox EHR is a development tool and is never served here.

Analyses (the clinician app's, and those the CDS service queues on order-sign with the deployment's SMART
Backend Services client; without a ``backend`` in the settings nothing is queued and the cards do not promise it)
run on one of two engines, chosen by the settings:

* embedded (the default): threads inside this process, each front door with its own job store;
* Celery (``jobs.broker_url``): this process only records and publishes jobs, in one store shared with the workers
  (``data_dir/jobs.sqlite``); ``imaging-cds worker`` runs them (:mod:`service.worker`), so no analysis runs here.

Trust wiring, in one place: ``data_dir`` is made ``0700`` and every state file in it ``0600``; the clinician
app's sessions are sealed with the ``state_key`` (workers are given the same); the CDS JWT replay cache lives in
``data_dir`` (or Redis, ``cds_replay``), so it survives restarts and is shared by every process; and every access
to patient data by the app, the CDS service and the analyses (here or on a worker) is recorded in the audit
outbox in ``data_dir``, which drainer threads (here and in the workers) send to the audit repository.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask import Flask
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from cds.app import create_app as create_cds_app
from cds.config import CdsConfig, TrustedClient
from core.errors import ConfigurationError
from core.outbound import outbound_session
from core.statefiles import private_directory
from fhir_adapters.audit import Actor
from pipeline.audit import AuditRecorder, audit_recorder
from pipeline.celery_engine import CeleryJobRunner
from pipeline.handler import ANALYZE_STUDY, StudyAnalysisHandler, analysis_params
from pipeline.jobs import EmbeddedJobRunner, JobRunner, SqliteJobStore
from service.model_cards import models_blueprint
from service.observability import Dependencies, RequestMetrics, install_operations, label_routes
from service.openapi import openapi_document
from service.settings import Settings, secret_from_env

AUDIT_SCOPE = "system/AuditEvent.cu"
"""What the audit drainer asks the repository for: writing AuditEvents (``PUT AuditEvent/<id>``), nothing else."""

log = logging.getLogger(__name__)

# Analyzers tried, in order, on a study queued from order-sign; those whose series rules do not fit are skipped.
BACKGROUND_ANALYZERS = ("ct-emphysema", "ct-bone", "ct-heart", "cxr-pneumonia", "mr-hippocampus")


def _trusted_client(raw: Mapping[str, Any]) -> TrustedClient:
    return TrustedClient(
        iss=str(raw.get("iss", "")),
        jwks=raw.get("jwks"),
        jwks_file=Path(raw["jwks_file"]) if raw.get("jwks_file") else None,
        jku_allow_list=tuple(raw.get("jku_allow_list", ())),
        algorithms=tuple(raw.get("algorithms", ("ES384", "RS384"))),
    )


def _smart_registration(raw: Mapping[str, Any], settings: Settings) -> Any:
    from smart_launch.oauth import ClientRegistration

    private_key = Path(raw["private_key_file"]).read_text() if raw.get("private_key_file") else None
    secret_env = raw.get("client_secret_env")
    return ClientRegistration(
        fhir_base=str(raw.get("fhir_base", "")),
        client_id=str(raw.get("client_id", "")),
        redirect_uri=str(raw.get("redirect_uri") or f"{settings.app_base_url}/callback"),
        auth_method=raw.get("auth_method", "none"),
        client_secret=secret_from_env(secret_env, what="SMART client secret") if secret_env else None,
        private_key=private_key,
        kid=raw.get("kid"),
        algorithm=raw.get("algorithm", "RS384"),
    )


def job_store_path(settings: Settings) -> Path:
    """The job store ``serve`` and its Celery workers share."""
    return settings.data_dir / "jobs.sqlite"


def require_state_key(settings: Settings) -> None:
    """Refuse to serve (or run a worker for) the clinician app without the key that seals its sessions at rest."""
    if settings.smart_clients and settings.state_key is None:
        raise ConfigurationError(
            "The clinician app is configured but no state_key seals its sessions (the clinicians' tokens) at rest.",
            remedy="Make a key (head -c 32 /dev/urandom | base64 > state.key; chmod 600 state.key) and add "
            "'state_key: {file: <path>}' to the settings (serve and its workers need the same key).",
        )


def deployment_audit(settings: Settings) -> AuditRecorder:
    """The deployment's audit outbox in ``data_dir``, with a drainer sending it to the configured repository (every
    process of the deployment records into the one outbox and helps drain it; leases keep them from colliding)."""
    from fhir_adapters.auth import backend_services_auth
    from fhir_adapters.client import FhirClient

    destination = settings.audit
    if destination is None:
        raise ConfigurationError(
            "No audit repository is configured, and every access to patient data must be recorded.",
            remedy="Add 'audit: {fhir_base: <FHIR server>, auth: backend|none}' or a 'backend' client to the settings.",
        )
    session = outbound_session()
    auth = None
    if destination.auth == "backend":
        backend = settings.backend
        assert backend is not None and backend.client_id is not None  # checked when the settings were parsed
        assert backend.private_key_file is not None and backend.kid is not None
        auth = backend_services_auth(
            backend.fhir_base,
            backend.client_id,
            scope=AUDIT_SCOPE,
            session=session,
            token_url=backend.token_url,
            private_key=backend.private_key_file.read_text(),
            kid=backend.kid,
            algorithm=backend.algorithm,  # type: ignore[arg-type]
        )
    client = FhirClient(destination.fhir_base, auth=auth, session=session, retries=1, limits=settings.limits)
    site = destination.site or urlsplit(settings.base_url).hostname or settings.base_url
    return audit_recorder(settings.data_dir, site=site, destination=client)


def backend_client(settings: Settings, audit: AuditRecorder | None = None) -> Any:
    """The FHIR client of analyses no clinician launched (order-sign), with the SMART Backend Services credentials
    of the settings, or none for an open development server (``backend: {auth: none}``); with ``audit``, each of
    its interactions is recorded for the backend client."""
    from fhir_adapters.auth import backend_services_auth
    from fhir_adapters.client import FhirClient

    backend = settings.backend
    assert backend is not None
    session = outbound_session()
    auth = None
    if backend.client_id is not None:
        assert backend.private_key_file is not None and backend.kid is not None
        auth = backend_services_auth(
            backend.fhir_base,
            backend.client_id,
            scope=backend.scope,
            session=session,
            token_url=backend.token_url,
            private_key=backend.private_key_file.read_text(),
            kid=backend.kid,
            algorithm=backend.algorithm,  # type: ignore[arg-type]
        )
    options: dict[str, Any] = {"auth": auth, "session": session, "timeout": backend.timeout_s}
    options["limits"] = settings.limits
    if audit is None:
        return FhirClient(backend.fhir_base, **options)
    actor = Actor(backend.client_id or "imaging-cds (backend, no credentials)", audit.source.site)
    return audit.client(backend.fhir_base, actor, **options)


def smart_app_config(settings: Settings, audit: AuditRecorder | None = None) -> Any:
    """The clinician app's configuration: the same in ``serve`` and in a worker (its session store's path and key)."""
    from smart_launch.config import SmartAppConfig

    return SmartAppConfig(
        clients=tuple(_smart_registration(c, settings) for c in settings.smart_clients),
        data_dir=settings.data_dir / "app",
        dicomweb_allow_list=settings.dicomweb_allow,
        secure_cookies=settings.secure_cookies,
        card_base_url=settings.base_url,
        limits=settings.limits,
        write_settings=settings.fhir_write,
        keyring=settings.state_key.keyring() if settings.state_key else None,
        frame_ancestors=settings.frame_ancestors,
        audit=audit,
    )


def order_sign_params(imaging_study: str) -> tuple[dict[str, Any], str]:
    """The params and dedupe key of the analysis order-sign queues for a study."""
    return analysis_params(imaging_study, BACKGROUND_ANALYZERS, skip_unsuitable=True), f"order-sign|{imaging_study}"


def _background_runner(settings: Settings, audit: AuditRecorder) -> tuple[EmbeddedJobRunner, SqliteJobStore]:
    """The embedded job runner for analyses queued by order-sign."""
    client = backend_client(settings, audit)
    handler = StudyAnalysisHandler(
        client_for=lambda params: client,
        dicomweb_allow_list=settings.dicomweb_allow,
        card_base_url=settings.base_url,
        limits=settings.limits,
        write_settings=settings.fhir_write,
    )
    store = SqliteJobStore(settings.data_dir / "background-jobs.sqlite")
    return EmbeddedJobRunner(store, {ANALYZE_STUDY: handler}, max_workers=1), store


def celery_runner(settings: Settings) -> CeleryJobRunner:
    """The runner that records jobs in the shared store and publishes them to the workers."""
    from pipeline.celery_engine import make_celery_app

    engine = settings.jobs
    assert engine is not None
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = SqliteJobStore(job_store_path(settings))
    return CeleryJobRunner(store, make_celery_app(engine), engine, kinds=(ANALYZE_STUDY,))


def _dependencies(settings: Settings) -> Dependencies:
    fhir_bases = [c.get("fhir_base", "") for c in settings.smart_clients]
    if settings.backend is not None:
        fhir_bases.append(settings.backend.fhir_base)
    return Dependencies(
        fhir_bases=tuple(dict.fromkeys(str(b) for b in fhir_bases if b)),
        dicomweb_bases=settings.dicomweb_allow.prefixes,
        engine=settings.jobs,
    )


def create_server_app(settings: Settings) -> Any:
    """Build the WSGI application for ``settings`` (nothing starts or is read before this is called)."""
    private_directory(settings.data_dir)
    if not settings.cds_clients:
        raise ConfigurationError("No CDS clients are configured.", remedy="Add cds_clients to the settings file.")
    require_state_key(settings)
    audit = deployment_audit(settings)
    if audit.drainer is not None:
        audit.drainer.start()
    stores: list[Any] = []
    engine_runner = celery_runner(settings) if settings.jobs is not None else None
    background: JobRunner | None = engine_runner
    if engine_runner is not None:
        stores.append(engine_runner.store)
    elif settings.backend is not None:
        background, background_store = _background_runner(settings, audit)
        stores.append(background_store)
    enqueue = None
    if settings.backend is not None and background is not None:
        runner = background

        def enqueue(imaging_study: str) -> str | None:
            params, dedupe_key = order_sign_params(imaging_study)
            return runner.submit(ANALYZE_STUDY, params, dedupe_key=dedupe_key).id

    cds_app: Flask = create_cds_app(
        CdsConfig(
            public_base_url=settings.base_url,
            trusted_clients=tuple(_trusted_client(c) for c in settings.cds_clients),
            fhir_allow_list=settings.fhir_allow,
            app_launch_url=f"{settings.app_base_url}/launch",
            model_card_base_url=settings.base_url,
            feedback_db=settings.data_dir / "cds-feedback.sqlite",
            enqueue_analysis=enqueue,
            limits=settings.limits,
            replay_cache=settings.cds_replay,
            audit=audit,
        )
    )
    cds_app.register_blueprint(models_blueprint)
    label_routes(cds_app)
    mounts: dict[str, Any] = {}
    if settings.smart_clients:
        from smart_launch.app import EXTENSION_KEY as SMART_KEY
        from smart_launch.app import create_app as create_smart_app

        smart_app = create_smart_app(smart_app_config(settings, audit), job_runner=engine_runner)
        if engine_runner is None:
            stores.append(smart_app.extensions[SMART_KEY].job_store)
        label_routes(smart_app)
        mounts["/app"] = smart_app
    install_operations(
        cds_app,
        dependencies=_dependencies(settings),
        stores=lambda: stores,
        openapi=openapi_document(settings.base_url, with_app=bool(settings.smart_clients)),
    )
    application = DispatcherMiddleware(cds_app, mounts) if mounts else cds_app
    return RequestMetrics(application)


def serve(settings: Settings, *, host: str, port: int, threads: int = 8) -> None:
    """Run the application under gunicorn: one process, ``threads`` threads (see the module docstring)."""
    from gunicorn.app.base import BaseApplication

    from pipeline.memory import freeze_long_lived
    from service.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    application = create_server_app(settings)
    freeze_long_lived()  # start-up objects are long-lived: keep them out of the collector's way (p99 latency)

    class _Server(BaseApplication):
        def load_config(self) -> None:
            self.cfg.set("bind", f"{host}:{port}")
            self.cfg.set("workers", 1)
            self.cfg.set("threads", threads)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("accesslog", None)  # access logs would carry query strings (authorization codes)

        def load(self) -> Any:
            return application

    _Server().run()

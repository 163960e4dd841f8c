"""``imaging-cds serve``: the three front doors of one deployment behind one WSGI application.

    /cds-services...   CDS Hooks 2.0 service (``cds``)           - answers EHR hooks, never runs inference
    /models/...        model cards, HTML and JSON (``service.model_cards``)
    /app/...           the clinician SMART app (``smart_launch``), launch URL ``/app/launch``

The clinician app keeps its own Flask application (its cookie, CSRF and Content-Security-Policy settings
are its own); it is mounted under ``/app``. The sandbox EHR is a development tool and is never served here.

Background analyses that the CDS service queues on order-sign run in an embedded job runner with the
deployment's SMART Backend Services client; without a ``backend`` in the settings nothing is queued and the
cards do not promise it. One process (threads, not worker processes) keeps the job runner and the JWT replay
cache whole: see ``serve``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Flask
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from cds.app import create_app as create_cds_app
from cds.config import CdsConfig, TrustedClient
from core.errors import ConfigurationError, StudyError
from core.outbound import outbound_session
from pipeline.jobs import EmbeddedJobRunner, ProgressReporter, SqliteJobStore
from pipeline.memory import LoadedAnalyzers
from service.model_cards import models_blueprint
from service.settings import Settings, secret_from_env

log = logging.getLogger(__name__)

BACKGROUND_ANALYSIS = "background-analysis"
# Analyzers tried, in order, on a study queued from order-sign; those whose series rules do not fit are skipped.
BACKGROUND_ANALYZERS = ("ct-emphysema", "ct-bone", "cxr-pneumonia")


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


def _background_runner(settings: Settings) -> tuple[EmbeddedJobRunner, Any]:
    """The job runner for analyses queued by order-sign, and the ``enqueue_analysis`` callable for the CDS app."""
    from fhir_adapters.auth import BackendServicesAuth, discover_token_endpoint
    from fhir_adapters.client import FhirClient

    backend = settings.backend
    assert backend is not None
    session = outbound_session()
    token_url = backend.token_url or discover_token_endpoint(backend.fhir_base, session)
    auth = BackendServicesAuth(
        token_url,
        backend.client_id,
        backend.private_key_file.read_text(),
        algorithm=backend.algorithm,  # type: ignore[arg-type]
        kid=backend.kid,
        scope=backend.scope,
    )
    client = FhirClient(backend.fhir_base, auth=auth, session=session, limits=settings.limits)

    analyzers = LoadedAnalyzers()

    def analyse(params: dict[str, Any], report: ProgressReporter) -> dict[str, Any]:
        from pipeline.analysis import analyze_study

        written: dict[str, str] = {}
        for name in BACKGROUND_ANALYZERS:
            try:
                outcome = analyze_study(
                    client,
                    str(params["imaging_study"]),
                    analyzers.get(name),
                    dicomweb_allow_list=settings.dicomweb_allow,
                    card_base_url=settings.base_url,
                    progress=report,
                    limits=settings.limits,
                )
            except StudyError:
                continue  # no series this analyzer is built for
            written[name] = outcome.diagnostic_report
        return {"diagnosticReports": written}

    runner = EmbeddedJobRunner(
        SqliteJobStore(settings.data_dir / "background-jobs.sqlite"), {BACKGROUND_ANALYSIS: analyse}, max_workers=1
    )

    def enqueue(imaging_study: str) -> str | None:
        job = runner.submit(BACKGROUND_ANALYSIS, {"imaging_study": imaging_study}, dedupe_key=imaging_study)
        return job.id

    return runner, enqueue


def create_server_app(settings: Settings) -> Any:
    """Build the WSGI application for ``settings`` (nothing starts or is read before this is called)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if not settings.cds_clients:
        raise ConfigurationError("No CDS clients are configured.", remedy="Add cds_clients to the settings file.")
    enqueue = None
    if settings.backend is not None:
        _, enqueue = _background_runner(settings)
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
        )
    )
    cds_app.register_blueprint(models_blueprint)
    mounts: dict[str, Any] = {}
    if settings.smart_clients:
        from smart_launch.app import create_app as create_smart_app
        from smart_launch.config import SmartAppConfig

        smart_app = create_smart_app(
            SmartAppConfig(
                clients=tuple(_smart_registration(c, settings) for c in settings.smart_clients),
                data_dir=settings.data_dir / "app",
                dicomweb_allow_list=settings.dicomweb_allow,
                secure_cookies=settings.secure_cookies,
                card_base_url=settings.base_url,
                limits=settings.limits,
            )
        )
        mounts["/app"] = smart_app
    return DispatcherMiddleware(cds_app, mounts) if mounts else cds_app


def serve(settings: Settings, *, host: str, port: int, threads: int = 8) -> None:
    """Run the application under gunicorn: one process, ``threads`` threads (see the module docstring)."""
    from gunicorn.app.base import BaseApplication

    from pipeline.memory import freeze_long_lived

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

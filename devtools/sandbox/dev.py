"""Run the clinician app registered with a sandbox EHR on loopback: for the demo and the tests, never production.

``serve_app_with_sandbox`` starts the sandbox EHR (an authlib SMART authorization server and a scope-enforcing
proxy in front of a real FHIR server), registers the app's exact redirect URI with it, and serves the app (with
the model-card pages it links to) from werkzeug in a background thread. The app records each access to patient
data in its audit outbox, which is sent to the real FHIR server behind the sandbox (where the EHR keeps it).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from flask import Flask
from werkzeug.serving import make_server

from core.allowlist import AllowList
from core.sealing import Keyring
from devtools.sandbox.app import QuietRequestHandler, SandboxHandle, run_sandbox
from devtools.sandbox.config import SandboxClient, SandboxConfig
from devtools.servers import free_port
from fhir_adapters.client import FhirClient
from pipeline.audit import AuditRecorder, audit_recorder
from pipeline.jobs import JobRunner
from service.model_cards import models_blueprint
from smart_launch.app import EXTENSION_KEY, SmartApp, create_app
from smart_launch.config import SmartAppConfig
from smart_launch.oauth import ClientRegistration

CLIENT_ID = "imaging-cds-clinician"


@dataclass(frozen=True)
class RunningApp:
    """The clinician app serving on loopback, with the sandbox EHR it is registered with."""

    url: str
    flask: Flask
    sandbox: SandboxHandle

    @property
    def ext(self) -> SmartApp:
        ext: SmartApp = self.flask.extensions[EXTENSION_KEY]
        return ext

    @property
    def audit(self) -> AuditRecorder:
        audit = self.ext.config.audit
        assert audit is not None
        return audit

    @property
    def launch_url(self) -> str:
        return f"{self.url}/launch"

    @property
    def redirect_uri(self) -> str:
        return f"{self.url}/callback"


@contextmanager
def serve_app_with_sandbox(
    fhir_upstream: str,
    data_dir: Path,
    dicomweb_prefix: str,
    *,
    access_token_lifetime: int = 3600,
    v1_only: bool = False,
    registration_overrides: dict[str, object] | None = None,
    confidential_secret: str | None = None,
    confidential_jwks: dict[str, object] | None = None,
    job_runner: JobRunner | None = None,
    keyring: Keyring | None = None,
    launches_per_minute: int = 30,
) -> Iterator[RunningApp]:
    """Start a sandbox EHR (registering the app's exact redirect URI) and the app registered with it.

    The app is a public client unless ``confidential_secret`` or ``confidential_jwks`` (its public keys, for
    ``private_key_jwt``) registers it as a confidential one; ``registration_overrides`` configure the app's side.
    ``job_runner``: a job engine's runner (the app's analyses then run on its workers); default: in this process.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    confidential = confidential_secret is not None or confidential_jwks is not None
    client = SandboxClient(
        client_id=CLIENT_ID,
        redirect_uris=[f"{url}/callback"],
        public=not confidential,
        client_secret=confidential_secret,
        jwks=confidential_jwks,
    )
    config = SandboxConfig(
        fhir_upstream=fhir_upstream,
        clients=[client],
        access_token_lifetime=access_token_lifetime,
        v1_only=v1_only,
    )
    with run_sandbox(config) as sandbox:
        registration = ClientRegistration(
            fhir_base=sandbox.fhir_base,
            client_id=client.client_id,
            redirect_uri=f"{url}/callback",
            **(registration_overrides or {}),  # type: ignore[arg-type]
        )
        audit = audit_recorder(data_dir, site="127.0.0.1", destination=FhirClient(fhir_upstream, retries=1))
        flask_app = create_app(
            SmartAppConfig(
                clients=(registration,),
                data_dir=data_dir,
                dicomweb_allow_list=AllowList.of([dicomweb_prefix]),
                secure_cookies=False,  # loopback over http; production keeps Secure cookies
                card_base_url=url,
                keyring=keyring,
                launches_per_minute=launches_per_minute,
                audit=audit,
            ),
            job_runner=job_runner,
        )
        flask_app.register_blueprint(models_blueprint)  # the cards the screens link to (/models/<name>)
        server = make_server("127.0.0.1", port, flask_app, threaded=True, request_handler=QuietRequestHandler)
        thread = threading.Thread(target=server.serve_forever, name="smart-app", daemon=True)
        thread.start()
        try:
            yield RunningApp(url=url, flask=flask_app, sandbox=sandbox)
        finally:
            server.shutdown()
            thread.join(timeout=10)
            server.server_close()
            flask_app.extensions[EXTENSION_KEY].close()
            if audit.drainer is not None:
                audit.drainer.stop(drain=True)

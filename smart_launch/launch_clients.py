"""FHIR clients that act for the clinician who launched the app, built from the server-side session.

The app's own pages and the analyses it queues both need one: a page for the session it serves, an analysis job
for the launch that submitted it (found by the ``launch_ref`` in the job's params; params never carry a token,
see :func:`pipeline.jobs.check_params`). :class:`LaunchClients` needs only the app's configuration and the
session store, so any process that opens the same store builds the same clients: the web process, and a job
engine's worker process (``imaging-cds worker``), which cannot reach the web process's memory.

The session store is where the seam is. Today it is the SQLite file :func:`open_session_store` opens under the
app's ``data_dir``, which the web process and the workers share by path (one machine, or a shared volume).
Token refreshes of one session are serialised across processes by the store's per-session lease
(:meth:`smart_launch.session.SessionStore.locked`), so a rotating refresh token is never spent twice; every process
opens the store with the deployment's ``state_key`` (``config.keyring``), which seals the sessions at rest. Each
client's interactions are recorded in the deployment's audit outbox for the launch's clinician.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import requests
from flask import g, has_request_context, request

from core.allowlist import AllowList
from core.outbound import outbound_session
from fhir_adapters.audit import Actor
from fhir_adapters.client import FhirClient
from smart_launch import oauth
from smart_launch.config import SmartAppConfig
from smart_launch.oauth import SmartLaunchError, TokenSet
from smart_launch.session import AuthorizationState, SessionStore, SessionTokenProvider

SESSION_FILE = "smart-sessions.sqlite"


def open_session_store(config: SmartAppConfig) -> SessionStore:
    """The app's session store: the same one for every process of a deployment that is given ``config``."""
    return SessionStore(config.data_dir / SESSION_FILE, keyring=config.keyring, max_age_s=config.session_lifetime_s)


@dataclass
class LaunchClients:
    """FHIR clients whose token comes from (and is refreshed in) a launch's server-side session."""

    config: SmartAppConfig
    sessions: SessionStore
    http: requests.Session = field(default_factory=outbound_session)

    def refresher(self, state: AuthorizationState) -> TokenSet:
        """Refresh a session's access token with the registration of the EHR that issued it."""
        client = self.config.registration_for(state.fhir_base)
        assert state.refresh_token is not None
        return oauth.refresh_access_token(
            state.smart_configuration,
            client,
            refresh_token=state.refresh_token,
            granted_scope=state.granted_scope,
            http=self.http,
            timeout=self.config.http_timeout_s,
        )

    def token_provider(self, session_id: str) -> SessionTokenProvider:
        return SessionTokenProvider(self.sessions, session_id, self.refresher)

    def fhir_client(self, session_id: str, state: AuthorizationState) -> FhirClient:
        """A FHIR client for the session's EHR whose token comes from (and is refreshed in) the session.

        With auditing configured, each of its interactions is recorded for the launch's client and clinician,
        from the browser's address for a page, or this deployment's site for an analysis job (a worker included).
        """
        options: dict[str, Any] = {
            "auth": self.token_provider(session_id),
            "timeout": self.config.http_timeout_s,
            "session": outbound_session(),
            "allow_list": AllowList.of([state.fhir_base]),
            "limits": self.config.limits,
        }
        audit = self.config.audit
        if audit is None:
            return FhirClient(state.fhir_base, **options)
        in_page = has_request_context()
        actor = Actor(state.client_id, (request.remote_addr if in_page else None) or audit.source.site, state.fhir_user)
        request_id = g.get("request_id") if in_page else None
        return audit.client(state.fhir_base, actor, request_id=request_id, **options)

    def client_for_job(self, params: Mapping[str, Any]) -> FhirClient:
        """The FHIR client an analysis job runs with: the launching session's, found by the job's launch reference.

        The token reaches the pipeline through the session store, never through the job's params.
        """
        session_id = self.sessions.session_for_job_ref(str(params.get("launch_ref", "")))
        state = self.sessions.get(session_id) if session_id else None
        if session_id is None or state is None or not state.authorized:
            raise SmartLaunchError(
                "The launch that started this analysis has ended, so the EHR cannot be read for it.",
                remedy="Launch imaging-cds again from the EHR and start the analysis again.",
            )
        return self.fhir_client(session_id, state)

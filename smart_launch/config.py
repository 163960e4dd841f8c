"""How one deployment of the clinician app is set up: the EHRs it is registered with, where it keeps state, policy.

One frozen object configures one app (the Flask application factory takes it), so tests build several apps side
by side without global state, and nothing is read from the environment at import time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.allowlist import AllowList
from core.errors import ConfigurationError
from core.limits import DEFAULT_LIMITS, InputLimits
from core.options import did_you_mean
from core.sealing import Keyring
from fhir_adapters.writer import ServerWriteSettings
from pipeline.audit import AuditRecorder
from smart_launch.oauth import ClientRegistration
from smart_launch.session import DEFAULT_SESSION_LIFETIME_S

DEFAULT_ANALYZERS = (
    "ct-emphysema",
    "ct-bone",
    "ct-heart",
    "ct-lung-nodules",
    "cxr-pneumonia",
    "us-breast",
    "mr-hippocampus",
)


@dataclass(frozen=True)
class SmartAppConfig:
    """Settings of the clinician app.

    * ``clients``: one :class:`~smart_launch.oauth.ClientRegistration` per EHR (``iss``) the app is registered
      with; a launch from any other ``iss`` is refused before any request is made to it.
    * ``data_dir``: where the server-side sessions, the analysis jobs and the review log are kept (SQLite).
    * ``dicomweb_allow_list``: the PACS the analysis may fetch images from (an ImagingStudy's Endpoint must be
      on it).
    * ``secure_cookies``: mark the session cookie ``Secure``; must stay on outside loopback tests over http.
    * ``card_base_url``: absolute base URL of this app, written into the Device of each result as the
      model card's address (``{card_base_url}/models/<name>``); the screen links ``/models/<name>``.
    * ``frame_ancestors``: origins allowed to embed the app in a frame (an EHR that opens apps in an
      iframe); none by default. With secure cookies, naming any also makes the cookies usable inside the EHR's
      frame (``SameSite=None; Partitioned``); every form still carries its CSRF token.
    * ``limits``: how large the EHR's answers and the PACS's images may be (:class:`core.limits.InputLimits`).
    * ``write_settings``: how results are written to each EHR's FHIR server (strategy, limits); by default
      decided from its CapabilityStatement (:mod:`fhir_adapters.writer`).
    * ``keyring``: the key(s) sessions and pending launches are sealed with (:class:`core.sealing.Keyring`, from
      the deployment's ``state_key``); ``None`` makes a key for this process only, so sessions do not survive a
      restart and other processes cannot read them: for tests and the demo.
    * ``launches_per_minute``: how many launches one client address may start per minute.
    * ``discovery_cache_s``: how long an EHR's SMART configuration is reused before it is discovered again.
    * ``audit``: where the app records each access to patient data (:class:`pipeline.audit.AuditRecorder`);
      ``None`` records nothing (tests of other things).
    """

    clients: tuple[ClientRegistration, ...]
    data_dir: Path
    dicomweb_allow_list: AllowList
    secure_cookies: bool = True
    analyzers: tuple[str, ...] = DEFAULT_ANALYZERS
    card_base_url: str | None = None
    session_lifetime_s: float = DEFAULT_SESSION_LIFETIME_S
    http_timeout_s: float = 30.0
    job_workers: int = 1
    frame_ancestors: tuple[str, ...] = ()
    limits: InputLimits = DEFAULT_LIMITS
    write_settings: ServerWriteSettings = field(default_factory=ServerWriteSettings)
    keyring: Keyring | None = None
    launches_per_minute: int = 30
    discovery_cache_s: float = 300.0
    audit: AuditRecorder | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.clients:
            raise ConfigurationError(
                "The clinician app has no SMART client registration.",
                remedy="Register the app with the EHR and add a ClientRegistration for its FHIR base (iss).",
            )
        bases = [c.fhir_base.rstrip("/") for c in self.clients]
        if len(set(bases)) != len(bases):
            raise ConfigurationError(
                "Two SMART client registrations name the same FHIR base.", remedy="Keep one per EHR (iss)."
            )

    def registration_for(self, iss: str) -> ClientRegistration:
        """The registration for a launch's ``iss`` (exact FHIR base, trailing slash ignored); else refuse."""
        wanted = (iss or "").strip().rstrip("/")
        for client in self.clients:
            if client.fhir_base.rstrip("/") == wanted:
                return client
        from smart_launch.oauth import SmartLaunchError

        hint = did_you_mean(wanted, [c.fhir_base for c in self.clients])
        raise SmartLaunchError(
            f"This app is not registered with the EHR whose FHIR server is {wanted[:200] or '(none given)'}.{hint}",
            remedy="Launch it from an EHR it is registered with; an administrator can add a registration.",
        )

"""The CDS service's settings: one object, built by the deployment and handed to :func:`cds.app.create_app`.

Nothing here reads the environment or the disk at import time. Every value that decides whom the service
trusts (CDS clients and their keys, FHIR servers it may call) is explicit, because a CDS service that guesses
trust is one that can be tricked into fetching from, or answering to, the wrong party.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.allowlist import AllowList
from core.errors import ConfigurationError
from core.limits import DEFAULT_LIMITS, InputLimits
from pipeline.audit import AuditRecorder

EnqueueAnalysis = Callable[[str], "str | None"]
"""Queue a background analysis of ``"ImagingStudy/<id>"``; return the job id, or ``None`` if nothing was queued.

It must be quick (push onto a queue), never run the analysis itself: it is called inside order-sign.
"""

SAFE_ALGORITHMS = frozenset({"ES384", "RS384", "ES256", "RS256", "ES512", "RS512", "PS256", "PS384", "PS512"})
"""Asymmetric JWS algorithms a trusted client may be configured for; HMAC and ``none`` can never be enabled."""
DEFAULT_ALGORITHMS: tuple[str, ...] = ("ES384", "RS384")
"""CDS Hooks 2.0: CDS clients sign with ES384 or RS384; other asymmetric algorithms must be opted into."""


@dataclass(frozen=True)
class TrustedClient:
    """A CDS client (an EHR) this service answers, identified by the JWT ``iss`` it signs with.

    Its public keys come from ``jwks`` (a JWK Set given by value), ``jwks_file`` (the same, read once when the
    app is created) or a ``jku`` URL in the JWT header, which is fetched only when the configured set holds no key
    for the token's ``kid`` and the URL starts with one of ``jku_allow_list``. ``algorithms`` limits the JWS
    algorithms accepted from this client.
    """

    iss: str
    jwks: Mapping[str, Any] | None = None
    jwks_file: Path | None = None
    jku_allow_list: tuple[str, ...] = ()
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS

    def __post_init__(self) -> None:
        if not self.iss:
            raise ConfigurationError("A trusted CDS client needs its 'iss'.", remedy="Set TrustedClient.iss.")
        unsafe = sorted(set(self.algorithms) - SAFE_ALGORITHMS)
        if unsafe or not self.algorithms:
            raise ConfigurationError(
                f"Trusted client {self.iss!r} allows unsupported JWS algorithms {unsafe or '(none given)'}.",
                remedy=f"Use asymmetric algorithms only: {', '.join(sorted(SAFE_ALGORITHMS))}.",
            )
        if self.jwks is None and self.jwks_file is None and not self.jku_allow_list:
            raise ConfigurationError(
                f"Trusted client {self.iss!r} has no keys: give jwks, jwks_file or jku_allow_list.",
                remedy="Configure the client's JWK Set by value or file, or the jku URLs it publishes keys at.",
            )
        AllowList.of(self.jku_allow_list)  # validates each entry

    def static_jwks(self) -> dict[str, Any] | None:
        """The JWK Set configured by value or file (``None`` if the client only publishes keys at a ``jku``)."""
        if self.jwks is not None:
            return dict(self.jwks)
        if self.jwks_file is not None:
            try:
                loaded = json.loads(Path(self.jwks_file).read_text())
            except (OSError, ValueError) as exc:
                raise ConfigurationError(
                    f"JWK Set file for trusted client {self.iss!r} cannot be read: {type(exc).__name__}.",
                    remedy=f"Check that {self.jwks_file} exists and holds a JSON JWK Set.",
                ) from exc
            if not isinstance(loaded, dict) or not isinstance(loaded.get("keys"), list):
                raise ConfigurationError(
                    f"JWK Set file for trusted client {self.iss!r} is not a JWK Set.",
                    remedy='It must be a JSON object with a "keys" array.',
                )
            return loaded
        return None


@dataclass(frozen=True)
class CdsConfig:
    """Everything the CDS service needs to know.

    ``public_base_url`` is the service's base URL as CDS clients call it (``https://cds.example.org``); the
    JWT ``aud`` must equal the invoked endpoint under it. It is configured, never derived from the request's
    ``Host`` header, which the caller controls. ``fhir_allow_list`` lists the FHIR servers a hook's
    ``fhirServer`` may name. ``app_launch_url`` is the SMART app's launch URL for card links;
    ``model_card_base_url`` is where ``/models/<analyzer>`` model cards are published. ``limits`` bounds the
    request body (``cds_request_bytes``), a ``jku``'s JWK Set and the answers of a ``fhirServer``.

    ``replay_cache`` says where the JWT ids already used are kept: ``None`` or ``"sqlite"`` in a file beside
    ``feedback_db`` (survives restarts; shared by the processes of one host), or a ``redis://`` URL (shared by
    several hosts); see :mod:`cds.replay`. ``audit`` records each hook's access to patient data
    (:class:`pipeline.audit.AuditRecorder`); ``None`` records nothing.
    """

    public_base_url: str
    trusted_clients: tuple[TrustedClient, ...]
    fhir_allow_list: AllowList
    app_launch_url: str
    model_card_base_url: str
    feedback_db: Path
    enqueue_analysis: EnqueueAnalysis | None = None
    recent_days: int = 365
    require_jwt_for_discovery: bool = True
    cors_allowed_origins: tuple[str, ...] = ("*",)
    fhir_timeout_s: float = 5.0
    max_jwt_lifetime_s: int = 300
    clock_skew_s: int = 60
    jwks_cache_s: float = 300.0
    limits: InputLimits = DEFAULT_LIMITS
    replay_cache: str | None = None
    audit: AuditRecorder | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("public_base_url", "app_launch_url", "model_card_base_url"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.startswith(("http://", "https://")):
                raise ConfigurationError(f"CdsConfig.{name} must be an absolute http(s) URL.", remedy=f"Set {name}.")
        if not self.trusted_clients:
            raise ConfigurationError(
                "No trusted CDS clients are configured, so every hook call would be refused.",
                remedy="Add at least one TrustedClient (the EHR's iss and its keys).",
            )
        issuers = [c.iss for c in self.trusted_clients]
        if len(set(issuers)) != len(issuers):
            raise ConfigurationError("Two trusted CDS clients share one 'iss'.", remedy="Give each issuer once.")

    @property
    def base_url(self) -> str:
        return self.public_base_url.rstrip("/")

    def client(self, iss: str) -> TrustedClient | None:
        for candidate in self.trusted_clients:
            if candidate.iss == iss:
                return candidate
        return None

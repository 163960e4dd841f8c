"""What a sandbox EHR is set up with: the FHIR server it fronts, the registered apps, and its policies.

One frozen object configures one sandbox, so a test can build several sandboxes side by side (a v2 one and a
v1-only one, say) without any global state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.errors import ConfigurationError

#: Scopes a v2 sandbox advertises in ``scopes_supported``. Wildcards stand for every resource type.
V2_SCOPES_SUPPORTED: tuple[str, ...] = (
    "openid",
    "fhirUser",
    "profile",
    "launch",
    "launch/patient",
    "launch/encounter",
    "offline_access",
    "online_access",
    "patient/*.cruds",
    "patient/*.rs",
    "user/*.cruds",
    "user/*.rs",
    "patient/*.read",
    "patient/*.write",
    "patient/*.*",
    "user/*.read",
    "user/*.write",
    "user/*.*",
)

#: Scopes a ``v1_only`` sandbox advertises: the SMART 1.0 ``.read`` / ``.write`` / ``.*`` forms only.
V1_SCOPES_SUPPORTED: tuple[str, ...] = (
    "openid",
    "fhirUser",
    "profile",
    "launch",
    "launch/patient",
    "launch/encounter",
    "offline_access",
    "online_access",
    "patient/*.read",
    "patient/*.write",
    "patient/*.*",
    "user/*.read",
    "user/*.write",
    "user/*.*",
)

#: What a client may ask for unless its registration narrows it: every scope the sandbox understands.
DEFAULT_ALLOWED_SCOPES = (
    "openid fhirUser profile launch launch/patient launch/encounter offline_access online_access "
    "patient/*.cruds user/*.cruds"
)


@dataclass(frozen=True)
class SandboxClient:
    """One registered SMART app.

    The registration decides how the app authenticates at the token endpoint:

    * ``public=True``: no credentials (``none``); PKCE is its only proof.
    * ``client_secret``: ``client_secret_basic`` or ``client_secret_post``.
    * ``jwks`` (a JWK Set *by value*, public keys only): ``private_key_jwt`` with RS384/ES384 (RS256/ES256 too).

    ``allowed_scopes`` (space separated) caps what the app can be granted; a wildcard resource scope such as
    ``patient/*.cruds`` covers every narrower one (``patient/ImagingStudy.rs``, ``patient/Observation.read``).
    """

    client_id: str
    redirect_uris: tuple[str, ...] | list[str]
    client_secret: str | None = None
    jwks: dict[str, Any] | None = None
    public: bool = False
    allowed_scopes: str = DEFAULT_ALLOWED_SCOPES

    def __post_init__(self) -> None:
        if not self.client_id:
            raise ConfigurationError("A sandbox client has an empty client_id.", remedy="Give every app an id.")
        if not self.redirect_uris:
            raise ConfigurationError(
                f"Sandbox client {self.client_id!r} has no redirect URI.",
                remedy="Register the app's exact callback URL(s) in redirect_uris.",
            )
        if self.public and (self.client_secret or self.jwks):
            raise ConfigurationError(
                f"Sandbox client {self.client_id!r} is public but also has credentials.",
                remedy="A public client has neither client_secret nor jwks; drop them or set public=False.",
            )
        if not self.public and not (self.client_secret or self.jwks):
            raise ConfigurationError(
                f"Sandbox client {self.client_id!r} is confidential but has no credentials.",
                remedy="Give it a client_secret or a jwks (public keys), or set public=True.",
            )
        if self.jwks is not None and not isinstance(self.jwks.get("keys"), list):
            raise ConfigurationError(
                f"Sandbox client {self.client_id!r} has a jwks without a 'keys' list.",
                remedy='Register a JWK Set by value: {"keys": [{...public JWK...}]}.',
            )


@dataclass(frozen=True)
class SandboxConfig:
    """Everything a sandbox EHR needs.

    ``fhir_upstream`` is the base URL of the REAL FHIR server (sekmet-fhir) the sandbox fronts; the sandbox's
    own FHIR base (the ``iss`` apps see) is ``{sandbox base}/fhir``. ``public_base_url`` pins the sandbox's own
    base URL (``http://host:port``); when None, each request's host URL is used, which is what
    :func:`~devtools.sandbox.app.run_sandbox` relies on.
    """

    fhir_upstream: str
    clients: list[SandboxClient] = field(default_factory=list)
    access_token_lifetime: int = 3600
    refresh_token_lifetime: int = 86400
    code_lifetime: int = 60
    launch_lifetime: int = 3600
    v1_only: bool = False
    scopes_supported: tuple[str, ...] | None = None
    auto_practitioner: str | None = None
    smart_style_url: bool = True
    public_base_url: str | None = None
    upstream_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not self.fhir_upstream.startswith(("http://", "https://")):
            raise ConfigurationError(
                f"The sandbox's fhir_upstream {self.fhir_upstream!r} is not an http(s) URL.",
                remedy="Pass the FHIR server's base URL, e.g. http://127.0.0.1:8080/fhir.",
            )
        ids = [client.client_id for client in self.clients]
        duplicates = sorted({cid for cid in ids if ids.count(cid) > 1})
        if duplicates:
            raise ConfigurationError(
                f"Sandbox clients registered twice: {', '.join(duplicates)}.", remedy="Give each app a unique id."
            )
        if self.access_token_lifetime < 1 or self.code_lifetime < 1:
            raise ConfigurationError(
                "Sandbox token and code lifetimes must be at least 1 second.", remedy="Use a positive lifetime."
            )

    @property
    def advertised_scopes(self) -> tuple[str, ...]:
        """``scopes_supported`` as published in the discovery document."""
        if self.scopes_supported is not None:
            return self.scopes_supported
        return V1_SCOPES_SUPPORTED if self.v1_only else V2_SCOPES_SUPPORTED

    def client(self, client_id: str) -> SandboxClient | None:
        """The registered app with this id, or None."""
        return next((client for client in self.clients if client.client_id == client_id), None)

"""The SMART App Launch 2.x client: discovery, the authorization request, code and refresh grants, id_token.

Everything here is a plain function over plain values, so that :mod:`smart_launch.app` stays a thin adapter and
each rule of the specification sits in one place:

* Discovery and the token request are :mod:`fhir_adapters.smart`'s (shared with the backend services); this
  module adds the rules of a clinician's launch on top and words their errors for the clinician (:func:`discover`).
* PKCE uses ``S256`` only; a server that advertises code challenge methods without ``S256`` is refused, and
  ``plain`` is never sent (:func:`new_pkce`).
* ``state`` is 256 random bits, kept in the server-side session and compared in constant time (:func:`new_state`,
  :func:`check_state`); ``aud`` is always the ``iss`` the launch named; the redirect URI is the registered one.
* Scopes are SMART v2 (``patient/DiagnosticReport.cru``) unless the server only advertises v1, in which case
  the same needs are asked for as ``.read``/``.write`` (:func:`scope_request`); :class:`GrantedScopes` answers
  what the scopes actually *granted* allow.
* The id_token is verified against the server's JWKS (signature, ``iss``, ``aud``, ``exp``) before its
  ``fhirUser`` is believed (:func:`verify_id_token`).
* Public clients, confidential clients with a secret, and ``private_key_jwt`` clients (:class:`ClientRegistration`).

Tokens never appear in ``repr``, log lines or exception messages: :class:`TokenSet` redacts itself and every
error names the endpoint and the OAuth error code, never a credential.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal
from urllib.parse import urlencode, urlsplit

import requests
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from core.errors import ConfigurationError, ImagingCdsError
from fhir_adapters.errors import FhirError, FhirUnavailable, json_object
from fhir_adapters.smart import (
    AuthorizationServer,
    ClientAuthMethod,
    ClientCredentials,
    UnusableTokenResponse,
    load_private_key,
    read_capability_statement,
    read_smart_configuration,
    request_token,
)
from fhir_adapters.smart import discover as discover_authorization_server

log = logging.getLogger(__name__)

MAX_REFRESH_MARGIN_S = 60.0
"""Refresh an access token this long before it expires (less for very short-lived tokens, see below)."""
ID_TOKEN_ALGORITHMS = ("RS256", "RS384", "ES256", "ES384")
"""Signature algorithms accepted on an id_token (OpenID Connect requires RS256; SMART servers use these)."""
CLOCK_LEEWAY_S = 30
"""Tolerated clock difference when checking the id_token's ``exp`` and ``iat``."""

Interaction = Literal["c", "r", "u", "d", "s"]

# What the app does with each resource type, in SMART v2 letters (create, read, update, delete, search).
# Search on DiagnosticReport is needed to list earlier AI results; read on Media to show explanation images;
# Endpoint is read to find the PACS of a study.
APP_NEEDS: tuple[tuple[str, str], ...] = (
    ("Patient", "r"),
    ("ImagingStudy", "rs"),
    ("Endpoint", "r"),
    ("DiagnosticReport", "crus"),
    ("Observation", "crs"),
    ("Media", "crs"),  # "s": the writer looks for a filed key image before writing its Binary again
    ("Binary", "cru"),  # key images too large to travel inline (fhir_adapters.writer); PUT at their id is "u"
    ("Provenance", "cu"),
    ("Device", "crs"),
)
EHR_LAUNCH_SCOPES = ("launch", "openid", "fhirUser", "online_access")
STANDALONE_LAUNCH_SCOPES = ("launch/patient", "openid", "fhirUser", "online_access")


class SmartLaunchError(ImagingCdsError):
    """The SMART launch or authorization cannot go on as it stands (the message says which step and why)."""

    http_status = 400


class AuthorizationDeniedError(SmartLaunchError):
    """The user (or the EHR on their behalf) declined to authorise the app."""

    http_status = 403


class TokenRequestError(SmartLaunchError):
    """The token endpoint refused a code or refresh grant (wrong verifier, replayed or expired code...)."""

    http_status = 401


class IdTokenError(SmartLaunchError):
    """The id_token is not signed by the server's keys, or not meant for this app, or expired."""

    http_status = 401


# ---------------------------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class SmartConfiguration(AuthorizationServer):
    """An EHR's authorization server as discovered from its FHIR base, checked fit for a clinician's launch
    (PKCE S256, the ``authorization_code`` grant, an authorize endpoint: :func:`discover`)."""

    authorization_endpoint: str

    @property
    def uses_v2_scopes(self) -> bool:
        """Ask for SMART v2 scopes unless the server shows it only understands v1.

        v2 is the default when the server says nothing either way; a server that lists ``permission-v1``
        without ``permission-v2``, or v1-style scopes only, or that publishes only the v1-era
        CapabilityStatement extension, gets v1 scopes.
        """
        if "permission-v2" in self.capabilities:
            return True
        if "permission-v1" in self.capabilities:
            return False
        if self.source == "capability-statement":
            return False
        if self.scopes_supported:
            return any(_V2_SCOPE.match(s) for s in self.scopes_supported)
        return True

    def to_json(self) -> dict[str, Any]:
        """The configuration as JSON-ready data, for the server-side session."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SmartConfiguration:
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        return cls(**values)


_ENDPOINTS_REMEDY = "The EHR must publish absolute http(s) authorization and token endpoints."


def _for_clinician_launch(server: AuthorizationServer) -> SmartConfiguration:
    """The app's rules on what discovery found: PKCE S256, the ``authorization_code`` grant, an authorize endpoint.

    A backend-services-only server (``grant_types_supported: [client_credentials]``, as sekmet-fhir publishes)
    is refused here with a message saying so, rather than at its authorize endpoint.
    """
    base = server.fhir_base
    methods = server.code_challenge_methods
    if methods and "S256" not in methods:
        raise SmartLaunchError(
            f"The EHR at {base} does not support PKCE with S256 (it offers {', '.join(methods)}).",
            remedy="This app only launches with PKCE S256, as SMART App Launch 2 requires; ask the EHR vendor.",
        )
    grants = server.grant_types
    if grants and "authorization_code" not in grants:
        raise SmartLaunchError(
            f"The FHIR server {base} offers SMART only for {', '.join(grants)}, not for a clinician's launch.",
            remedy="A user-facing app needs the authorization_code grant; launch it from an EHR that offers it.",
        )
    if server.authorization_endpoint is None:
        what = "authorization_endpoint" if server.source == "smart-configuration" else "authorize URI"
        raise SmartLaunchError(f"The SMART configuration of {base} has no usable {what}.", remedy=_ENDPOINTS_REMEDY)
    return SmartConfiguration(**asdict(server))


def _not_advertised(fhir_base: str) -> SmartLaunchError:
    return SmartLaunchError(
        f"The FHIR server {fhir_base} does not advertise SMART on FHIR authorization.",
        remedy="It publishes neither .well-known/smart-configuration nor the oauth-uris extension; "
        "check the launch's iss, or ask the EHR vendor to enable SMART.",
    )


def parse_smart_configuration(fhir_base: str, document: Mapping[str, Any]) -> SmartConfiguration:
    """Read a ``.well-known/smart-configuration`` document; refuse one that rules out PKCE S256 or user launches."""
    try:
        return _for_clinician_launch(read_smart_configuration(fhir_base, document))
    except FhirError as exc:
        raise SmartLaunchError(exc.message, remedy=_ENDPOINTS_REMEDY) from None


def parse_capability_statement(fhir_base: str, capability: Mapping[str, Any]) -> SmartConfiguration:
    """Read the v1-era ``oauth-uris`` extension of ``CapabilityStatement.rest.security``."""
    try:
        server = read_capability_statement(fhir_base, capability)
    except FhirError as exc:
        raise SmartLaunchError(exc.message, remedy=_ENDPOINTS_REMEDY) from None
    if server is None:
        raise _not_advertised(fhir_base)
    return _for_clinician_launch(server)


def discover(fhir_base: str, http: requests.Session, *, timeout: float = 10.0) -> SmartConfiguration:
    """Find the authorization server of the FHIR server ``fhir_base`` (the launch's ``iss``).

    :func:`fhir_adapters.smart.discover` does the reading; its typed errors become what a clinician can act on.
    """
    base = fhir_base.rstrip("/")
    try:
        server = discover_authorization_server(base, http, timeout=timeout)
    except FhirUnavailable:
        raise SmartLaunchError(
            f"The EHR's FHIR server {base} could not be reached to discover its SMART configuration.",
            remedy="Check that the EHR is running and try the launch again.",
        ) from None
    except FhirError as exc:
        if exc.status is None:  # the server answered, with a SMART configuration that cannot be used
            raise SmartLaunchError(exc.message, remedy=_ENDPOINTS_REMEDY) from None
        raise SmartLaunchError(
            f"The EHR's FHIR server {base} answered HTTP {exc.status} to SMART discovery.",
            remedy="Check the launch's iss: it must be the FHIR base URL of the EHR.",
        ) from None
    if server is None:
        raise _not_advertised(base)
    return _for_clinician_launch(server)


# ---------------------------------------------------------------------------------------------- PKCE and state


@dataclass(frozen=True)
class Pkce:
    """A PKCE pair: the secret ``verifier`` stays in the server-side session, the ``challenge`` goes out."""

    verifier: str = field(repr=False)
    challenge: str
    method: Literal["S256"] = "S256"


def s256_challenge(verifier: str) -> str:
    """``BASE64URL(SHA256(verifier))`` without padding (RFC 7636 section 4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def new_pkce() -> Pkce:
    """A fresh verifier of 86 URL-safe characters (512 random bits; RFC 7636 allows 43 to 128)."""
    verifier = secrets.token_urlsafe(64)
    return Pkce(verifier=verifier, challenge=s256_challenge(verifier))


def new_state() -> str:
    """An unguessable ``state`` value (256 random bits) for one authorization request."""
    return secrets.token_urlsafe(32)


def check_state(expected: str | None, received: str | None) -> None:
    """Refuse a callback whose ``state`` is not the one this browser session sent (a forged or stale callback)."""
    if not expected:
        raise SmartLaunchError(
            "This browser has no SMART launch in progress, so the authorization answer cannot be accepted.",
            remedy="Start the app again from the EHR (or the standalone launch page) in this browser.",
        )
    if not received or not hmac.compare_digest(expected.encode("utf-8"), received.encode("utf-8")):
        raise SmartLaunchError(
            "The authorization answer does not belong to the launch this browser started (its state differs).",
            remedy="The answer may have been tampered with or come from an older launch; start the app again.",
        )


# ---------------------------------------------------------------------------------------------- scopes

_V2_SCOPE = re.compile(r"^(patient|user|system)/(\*|[A-Z][A-Za-z]+)\.(c?r?u?d?s?)(\?.*)?$")
_V1_SCOPE = re.compile(r"^(patient|user|system)/(\*|[A-Z][A-Za-z]+)\.(read|write|\*)$")
_V1_MEANING: dict[str, str] = {"read": "rs", "write": "cud", "*": "cruds"}


def scope_request(
    smart: SmartConfiguration,
    *,
    standalone: bool,
    needs: Iterable[tuple[str, str]] = APP_NEEDS,
    context: str = "patient",
) -> str:
    """The ``scope`` parameter: launch/identity scopes plus one resource scope per need, v2 or v1 style."""
    scopes = list(STANDALONE_LAUNCH_SCOPES if standalone else EHR_LAUNCH_SCOPES)
    v2 = smart.uses_v2_scopes
    for resource_type, letters in needs:
        if v2:
            ordered = "".join(c for c in "cruds" if c in letters)
            scopes.append(f"{context}/{resource_type}.{ordered}")
            continue
        if set(letters) & set("rs"):
            scopes.append(f"{context}/{resource_type}.read")
        if set(letters) & set("cud"):
            scopes.append(f"{context}/{resource_type}.write")
    return " ".join(scopes)


@dataclass(frozen=True)
class GrantedScopes:
    """The scopes the EHR actually granted (which may be fewer than asked for), and what they allow."""

    scopes: frozenset[str]

    @classmethod
    def parse(cls, scope: str | None) -> GrantedScopes:
        return cls(frozenset((scope or "").split()))

    def allows(self, resource_type: str, interaction: Interaction) -> bool:
        """Whether some granted ``patient/``, ``user/`` or ``system/`` scope permits ``interaction`` on the type.

        v1 ``read`` means read and search, ``write`` create, update and delete. A v2 scope restricted by a
        query (``?category=...``) counts as permitting: the EHR enforces the restriction on each request.
        """
        for scope in self.scopes:
            match = _V1_SCOPE.match(scope)
            if match:
                letters = _V1_MEANING[match.group(3)]
            else:
                match = _V2_SCOPE.match(scope)
                if not match or not match.group(3):
                    continue
                letters = match.group(3)
            if match.group(2) in ("*", resource_type) and interaction in letters:
                return True
        return False

    def missing(self, needs: Iterable[tuple[str, str]]) -> list[str]:
        """The needs (``"DiagnosticReport.u"``) that no granted scope covers, for a message saying why."""
        return [f"{t}.{c}" for t, letters in needs for c in letters if not self.allows(t, c)]  # type: ignore[arg-type]

    @property
    def has_openid(self) -> bool:
        return "openid" in self.scopes and ("fhirUser" in self.scopes or "profile" in self.scopes)


# ---------------------------------------------------------------------------------------------- clients


@dataclass(frozen=True)
class ClientRegistration:
    """This app as registered with one EHR: its client id, redirect URI and how it authenticates.

    ``auth_method`` ``none`` is a public client (a browser-side app would be; PKCE protects the code);
    ``client_secret_basic``/``client_secret_post`` a confidential client with a secret; ``private_key_jwt``
    a confidential client proving possession of ``private_key`` (PEM or JWK; RS384 or ES384) under ``kid``.
    ``fhir_base`` is the ``iss`` this registration is for: a launch naming any other ``iss`` is refused, so a
    forged launch link cannot make the app talk to (or send a client secret to) a server of the attacker's.
    """

    fhir_base: str
    client_id: str
    redirect_uri: str
    auth_method: ClientAuthMethod = "none"
    client_secret: str | None = field(default=None, repr=False)
    private_key: str | dict[str, Any] | None = field(default=None, repr=False)
    kid: str | None = None
    algorithm: Literal["RS384", "ES384"] = "RS384"

    def __post_init__(self) -> None:
        if not self.client_id or not self.redirect_uri:
            raise ConfigurationError(
                f"The SMART client for {self.fhir_base} needs a client id and a redirect URI.",
                remedy="Register the app with the EHR and copy both into the configuration.",
            )
        if self.auth_method.startswith("client_secret") and not self.client_secret:
            raise ConfigurationError(
                f"SMART client {self.client_id} uses {self.auth_method} but has no secret.",
                remedy="Configure client_secret, or use auth_method 'none' for a public client.",
            )
        if self.auth_method == "private_key_jwt":
            if self.private_key is None or not self.kid:
                raise ConfigurationError(
                    f"SMART client {self.client_id} uses private_key_jwt but has no private key or kid.",
                    remedy="Configure the private key and the kid its public JWK is registered under.",
                )
            load_private_key(self.private_key, self.algorithm)  # fail at start-up, not at the first launch

    @property
    def is_confidential(self) -> bool:
        return self.auth_method != "none"

    def credentials(self) -> ClientCredentials:
        """How this registration authenticates at the token endpoint (the private key read afresh each time)."""
        key = load_private_key(self.private_key, self.algorithm) if self.private_key is not None else None
        return ClientCredentials(
            self.client_id,
            self.auth_method,
            secret=self.client_secret,
            private_key=key,
            algorithm=self.algorithm,
            kid=self.kid,
        )


def client_assertion(client: ClientRegistration, token_endpoint: str, *, now: float | None = None) -> str:
    """A signed ``private_key_jwt`` assertion: ``iss = sub = client_id``, ``aud`` = token endpoint, unique ``jti``."""
    return client.credentials().client_assertion(token_endpoint, now=now)


# ---------------------------------------------------------------------------------------------- authorize


def authorization_url(
    smart: SmartConfiguration,
    client: ClientRegistration,
    *,
    scope: str,
    state: str,
    pkce: Pkce,
    launch: str | None,
) -> str:
    """The URL the browser is sent to: code flow, PKCE S256, ``aud`` = the FHIR base, the registered redirect."""
    params = {
        "response_type": "code",
        "client_id": client.client_id,
        "redirect_uri": client.redirect_uri,
        "scope": scope,
        "state": state,
        "aud": smart.fhir_base,
        "code_challenge": pkce.challenge,
        "code_challenge_method": pkce.method,
    }
    if launch:
        params["launch"] = launch
    separator = "&" if urlsplit(smart.authorization_endpoint).query else "?"
    return f"{smart.authorization_endpoint}{separator}{urlencode(params)}"


def authorization_error(error: str, description: str | None) -> SmartLaunchError:
    """The error to show for ``?error=...`` on the callback (``access_denied`` when the user said no)."""
    if error == "access_denied":
        return AuthorizationDeniedError(
            "Access was not granted: the request to let imaging-cds use this patient's record was declined.",
            remedy="Nothing was read or written. To use the app, launch it again and approve the request.",
        )
    code = error if re.fullmatch(r"[a-z_]{1,40}", error or "") else "unknown"
    return SmartLaunchError(
        f"The EHR's authorization server refused the launch ({code}).",
        remedy="Launch the app again; if it keeps failing, give this error code to the EHR administrator.",
    )


# ---------------------------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class TokenSet:
    """A token response: credentials (never printed) plus the launch context that came with them."""

    access_token: str = field(repr=False)
    expires_at: float
    lifetime_s: float
    scope: str
    refresh_token: str | None = field(default=None, repr=False)
    id_token: str | None = field(default=None, repr=False)
    context: dict[str, Any] = field(default_factory=dict)

    def refresh_due(self, now: float) -> bool:
        return now >= self.expires_at - refresh_margin(self.lifetime_s)


def refresh_margin(lifetime_s: float) -> float:
    """How long before expiry to refresh: a minute, or a quarter of the lifetime for tokens shorter than 4 min."""
    return min(MAX_REFRESH_MARGIN_S, max(0.0, lifetime_s) / 4.0)


_CONTEXT_KEYS = (
    "patient",
    "encounter",
    "fhirContext",
    "need_patient_banner",
    "smart_style_url",
    "intent",
    "tenant",
)

_GRANT_ERRORS: dict[str, str] = {
    "invalid_grant": "the authorization code or refresh token was refused: it may have been used already, "
    "have expired, or the PKCE code verifier did not match",
    "invalid_client": "the EHR did not accept this app's client credentials",
    "unauthorized_client": "this app is not allowed to use this grant",
    "invalid_request": "the request was malformed",
    "invalid_scope": "the scopes asked for are not allowed",
}


def _token_request(
    token_endpoint: str,
    client: ClientRegistration,
    form: dict[str, str],
    http: requests.Session,
    *,
    what: str,
    timeout: float,
    now: Callable[[], float],
    fallback_scope: str,
) -> TokenSet:
    """One grant through :func:`fhir_adapters.smart.request_token`; its typed errors in words for the clinician."""
    started = now()
    try:
        token = request_token(
            token_endpoint, form, client.credentials(), http, what=f"token request ({what})", timeout=timeout
        )
    except FhirUnavailable:
        raise TokenRequestError(
            f"The EHR's token endpoint could not be reached for the {what}.",
            remedy="Check that the EHR is running and try again.",
        ) from None
    except UnusableTokenResponse as exc:
        raise TokenRequestError(f"The EHR answered the {what} {exc.problem}.", remedy="Launch again.") from None
    except FhirError as exc:
        error = exc.oauth_error or ""
        code = error if re.fullmatch(r"[a-z_]{1,40}", error) else f"HTTP {exc.status}"
        explanation = _GRANT_ERRORS.get(error, "the token endpoint refused the request")
        log.info("Token endpoint refused the %s: %s", what, code)
        raise TokenRequestError(
            f"The EHR refused the {what} ({code}): {explanation}.",
            remedy="Launch the app again from the EHR; an authorization code can be used only once.",
        ) from None
    return TokenSet(
        access_token=token.access_token,
        expires_at=started + token.lifetime_s,
        lifetime_s=token.lifetime_s,
        scope=token.scope or fallback_scope,
        refresh_token=token.refresh_token,
        id_token=token.id_token,
        context={k: token.fields[k] for k in _CONTEXT_KEYS if k in token.fields},
    )


def exchange_code(
    smart: SmartConfiguration,
    client: ClientRegistration,
    *,
    code: str,
    code_verifier: str,
    requested_scope: str,
    http: requests.Session,
    timeout: float = 30.0,
    now: Callable[[], float] = time.time,
) -> TokenSet:
    """Trade the authorization code for tokens, proving possession of the PKCE verifier."""
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": client.redirect_uri,
        "code_verifier": code_verifier,
    }
    return _token_request(
        smart.token_endpoint,
        client,
        form,
        http,
        what="authorization code",
        timeout=timeout,
        now=now,
        fallback_scope=requested_scope,
    )


def refresh_access_token(
    smart: SmartConfiguration,
    client: ClientRegistration,
    *,
    refresh_token: str,
    granted_scope: str,
    http: requests.Session,
    timeout: float = 30.0,
    now: Callable[[], float] = time.time,
) -> TokenSet:
    """Use the refresh token for a new access token with the scopes already granted (never more)."""
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token, "scope": granted_scope}
    tokens = _token_request(
        smart.token_endpoint,
        client,
        form,
        http,
        what="token refresh",
        timeout=timeout,
        now=now,
        fallback_scope=granted_scope,
    )
    if tokens.refresh_token is None:  # the server kept the old refresh token valid (no rotation)
        tokens = TokenSet(
            access_token=tokens.access_token,
            expires_at=tokens.expires_at,
            lifetime_s=tokens.lifetime_s,
            scope=tokens.scope,
            refresh_token=refresh_token,
            id_token=tokens.id_token,
            context=tokens.context,
        )
    return tokens


# ---------------------------------------------------------------------------------------------- id_token


def fetch_jwks(smart: SmartConfiguration, http: requests.Session, *, timeout: float = 10.0) -> dict[str, Any]:
    """The server's public keys: ``jwks_uri`` from the SMART configuration, else OpenID discovery of its issuer."""
    jwks_uri = smart.jwks_uri
    try:
        if not jwks_uri and smart.issuer:
            oidc = http.get(
                f"{smart.issuer.rstrip('/')}/.well-known/openid-configuration", timeout=timeout, allow_redirects=False
            )
            candidate = (json_object(oidc) or {}).get("jwks_uri") if oidc.status_code == 200 else None
            jwks_uri = candidate if isinstance(candidate, str) else None
        if not jwks_uri:
            raise IdTokenError(
                f"The EHR at {smart.fhir_base} publishes no JWKS, so the clinician's identity cannot be verified.",
                remedy="The EHR must publish jwks_uri in its SMART configuration for openid/fhirUser.",
            )
        response = http.get(jwks_uri, headers={"Accept": "application/json"}, timeout=timeout, allow_redirects=False)
    except (requests.ConnectionError, requests.Timeout):
        raise IdTokenError(
            "The EHR's signing keys (JWKS) could not be fetched.", remedy="Try the launch again."
        ) from None
    keys = json_object(response) or {}
    if response.status_code != 200 or not isinstance(keys.get("keys"), list):
        raise IdTokenError(
            f"The EHR's JWKS answered HTTP {response.status_code} without a key set.", remedy="Ask the EHR vendor."
        )
    return keys


def verify_id_token(
    id_token: str,
    jwks: Mapping[str, Any],
    *,
    client_id: str,
    issuer: str | None,
    now: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """The id_token's claims once its signature, audience, issuer and expiry are checked; else :class:`IdTokenError`."""
    try:
        key_set = KeySet.import_key_set(dict(jwks))  # type: ignore[arg-type]
        token = jwt.decode(id_token, key_set, algorithms=list(ID_TOKEN_ALGORITHMS))
    except (JoseError, ValueError, TypeError) as exc:
        raise IdTokenError(
            f"The id_token's signature could not be verified against the EHR's published keys ({type(exc).__name__}).",
            remedy="The clinician's identity cannot be trusted; launch the app again.",
        ) from None
    options: dict[str, Any] = {"aud": {"essential": True, "value": client_id}, "exp": {"essential": True}}
    if issuer:
        options["iss"] = {"essential": True, "value": issuer}
    try:
        jwt.JWTClaimsRegistry(now=lambda: int(now()), leeway=CLOCK_LEEWAY_S, **options).validate(token.claims)
    except JoseError as exc:
        raise IdTokenError(
            f"The id_token is not valid for this app ({type(exc).__name__}: {getattr(exc, 'claim', '') or ''}).",
            remedy="It may be expired or issued to another app; launch the app again.",
        ) from None
    return dict(token.claims)

"""A FHIR server's SMART authorization server: discovery, client authentication and the token request.

Both kinds of client the project runs go through this one module:

* the backend services (:mod:`fhir_adapters.auth`: the CLI, ``serve``, the order-sign jobs) ask for
  ``client_credentials`` tokens;
* the clinician app (:mod:`smart_launch.oauth`) trades authorization codes and refresh tokens.

Discovery (:func:`discover`) reads ``{fhir_base}/.well-known/smart-configuration`` (SMART App Launch 2) and
falls back to the CapabilityStatement's ``oauth-uris`` extension, which SMART v1 servers publish instead. It
reports what the server advertises and imposes no rule on it: a server that offers only ``client_credentials``
(sekmet-fhir) is as good as an EHR for a backend client, and the clinician app applies its own rules (PKCE
S256, the ``authorization_code`` grant) on top.

Every HTTP answer goes through :func:`fhir_adapters.errors.raise_for_fhir_status`, so a refused token request
becomes the same typed error whichever client made it (``invalid_client`` -> ``FhirUnauthorized``,
``invalid_scope`` -> ``FhirForbidden``...), with the OAuth error code kept on ``oauth_error`` for a client that
explains it in its own words. Redirects are never followed: a redirected token request would carry the
client's credentials to a host nobody configured. Tokens, secrets and assertions never appear in ``repr``,
log lines or messages.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import requests
from joserfc import jwk, jwt

from core.errors import ConfigurationError
from fhir_adapters.errors import FhirError, FhirUnauthorized, json_object, raise_for_fhir_status, unavailable

OAUTH_URIS_EXTENSION = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
"""The SMART v1 CapabilityStatement extension (``rest.security``) that names the authorize and token URIs."""
ASSERTION_LIFETIME_S = 300
"""``private_key_jwt``: a client assertion expires at most five minutes after it is made (SMART)."""
DEFAULT_TOKEN_LIFETIME_S = 300
"""Assumed access-token lifetime when a token response has no ``expires_in``: short, so clients re-ask early."""
JWT_BEARER_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

SigningAlgorithm = Literal["RS384", "ES384"]
ClientAuthMethod = Literal["none", "client_secret_basic", "client_secret_post", "private_key_jwt"]
DiscoverySource = Literal["smart-configuration", "capability-statement"]

# ---------------------------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class AuthorizationServer:
    """What a FHIR server advertises about its SMART authorization server.

    ``token_endpoint`` is always an absolute http(s) URL; ``authorization_endpoint`` is ``None`` when the
    server publishes no usable one (a backend-services-only server needs none). The lists are as published
    (empty when the server says nothing); ``source`` says which document they came from.
    """

    fhir_base: str
    token_endpoint: str
    source: DiscoverySource
    authorization_endpoint: str | None = None
    issuer: str | None = None
    jwks_uri: str | None = None
    capabilities: tuple[str, ...] = ()
    scopes_supported: tuple[str, ...] = ()
    code_challenge_methods: tuple[str, ...] = ()
    grant_types: tuple[str, ...] = ()
    token_auth_methods: tuple[str, ...] = ()


def absolute_http_url(value: Any) -> str | None:
    """``value`` when it is an absolute http(s) URL, else ``None`` (SMART endpoints must be absolute)."""
    if not isinstance(value, str):
        return None
    parts = urlsplit(value)
    return value if parts.scheme in ("http", "https") and parts.netloc else None


def _strings(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in value) if isinstance(value, list) else ()


def _optional_string(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _unusable_token_endpoint(fhir_base: str, what: str) -> FhirError:
    return FhirError(
        f"The SMART configuration of {fhir_base} has no usable {what}.",
        remedy="The server must publish an absolute http(s) token endpoint; ask its vendor.",
    )


def read_smart_configuration(fhir_base: str, document: Mapping[str, Any]) -> AuthorizationServer:
    """Read a ``.well-known/smart-configuration`` document; a :class:`FhirError` when it has no token endpoint."""
    token_endpoint = absolute_http_url(document.get("token_endpoint"))
    if token_endpoint is None:
        raise _unusable_token_endpoint(fhir_base, "token_endpoint")
    return AuthorizationServer(
        fhir_base=fhir_base,
        token_endpoint=token_endpoint,
        source="smart-configuration",
        authorization_endpoint=absolute_http_url(document.get("authorization_endpoint")),
        issuer=_optional_string(document.get("issuer")),
        jwks_uri=_optional_string(document.get("jwks_uri")),
        capabilities=_strings(document.get("capabilities")),
        scopes_supported=_strings(document.get("scopes_supported")),
        code_challenge_methods=_strings(document.get("code_challenge_methods_supported")),
        grant_types=_strings(document.get("grant_types_supported")),
        token_auth_methods=_strings(document.get("token_endpoint_auth_methods_supported")),
    )


def read_capability_statement(fhir_base: str, capability: Mapping[str, Any]) -> AuthorizationServer | None:
    """Read the ``oauth-uris`` extension of ``CapabilityStatement.rest.security``; ``None`` when there is none."""
    for rest in capability.get("rest", []) or []:
        if not isinstance(rest, dict):
            continue
        for extension in (rest.get("security") or {}).get("extension", []) or []:
            if not isinstance(extension, dict) or extension.get("url") != OAUTH_URIS_EXTENSION:
                continue
            subs = [sub for sub in extension.get("extension", []) or [] if isinstance(sub, dict)]
            uris = {sub.get("url"): sub.get("valueUri") for sub in subs}
            token_endpoint = absolute_http_url(uris.get("token"))
            if token_endpoint is None:
                raise _unusable_token_endpoint(fhir_base, "token URI")
            return AuthorizationServer(
                fhir_base=fhir_base,
                token_endpoint=token_endpoint,
                source="capability-statement",
                authorization_endpoint=absolute_http_url(uris.get("authorize")),
            )
    return None


def discover(fhir_base: str, http: requests.Session, *, timeout: float = 10.0) -> AuthorizationServer | None:
    """The authorization server ``fhir_base`` advertises, or ``None`` when it advertises none.

    A ``.well-known/smart-configuration`` answered with a JSON object is authoritative (a broken one is an
    error naming it); any other answer there (404, an HTML page, a redirect) means "not published", and the
    CapabilityStatement is read instead. HTTP errors on the CapabilityStatement, and no answer at all, raise
    the typed :class:`FhirError` of :mod:`fhir_adapters.errors`.
    """
    base = fhir_base.rstrip("/")
    what = "SMART discovery"
    try:
        response = http.get(
            f"{base}/.well-known/smart-configuration",
            headers={"Accept": "application/json"},
            timeout=timeout,
            allow_redirects=False,
        )
        document = json_object(response) if response.status_code == 200 else None
        if document:
            return read_smart_configuration(base, document)
        response = http.get(
            f"{base}/metadata", headers={"Accept": "application/fhir+json"}, timeout=timeout, allow_redirects=False
        )
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise unavailable(exc, what=what) from None
    raise_for_fhir_status(response, what=f"{what} (read CapabilityStatement)")
    return read_capability_statement(base, json_object(response) or {})


# ---------------------------------------------------------------------------------------------- client authentication


def load_private_key(private_key: str | bytes | dict[str, Any], algorithm: SigningAlgorithm) -> jwk.RSAKey | jwk.ECKey:
    """Import a PEM (str/bytes) or JWK (dict) private key and check it suits ``algorithm``.

    Fails early with a :class:`ConfigurationError` rather than at the first token request.
    """
    expected: type[jwk.RSAKey] | type[jwk.ECKey] = jwk.RSAKey if algorithm == "RS384" else jwk.ECKey
    try:
        key = jwk.import_key(private_key) if isinstance(private_key, dict) else expected.import_key(private_key)
    except Exception as exc:
        raise ConfigurationError(
            f"The SMART private key could not be read as a {algorithm} key ({type(exc).__name__}).",
            remedy="Give a PEM private key or a private JWK of the right type.",
        ) from None
    if not isinstance(key, expected) or not key.is_private:
        raise ConfigurationError(
            f"The SMART private key is not a private {'RSA' if algorithm == 'RS384' else 'EC P-384'} key.",
            remedy=f"Algorithm {algorithm} needs the matching private key.",
        )
    if isinstance(key, jwk.ECKey) and key.curve_name != "P-384":
        raise ConfigurationError(f"ES384 needs a P-384 key, not {key.curve_name}.", remedy="Generate a P-384 key.")
    return key


@dataclass(frozen=True)
class ClientCredentials:
    """How one client proves who it is at a token endpoint.

    ``none``: a public client (sends its ``client_id`` only; PKCE protects its codes). ``client_secret_basic`` /
    ``client_secret_post``: a shared secret in the ``Authorization`` header or the form (RFC 6749 2.3.1).
    ``private_key_jwt``: a signed assertion (RFC 7523) under ``kid``, RS384 or ES384 as SMART requires.
    The constructors of the two clients check their configuration and say what is missing in their terms;
    this object only carries it.
    """

    client_id: str
    method: ClientAuthMethod = "none"
    secret: str | None = field(default=None, repr=False)
    private_key: jwk.RSAKey | jwk.ECKey | None = field(default=None, repr=False)
    algorithm: SigningAlgorithm = "RS384"
    kid: str | None = None

    def client_assertion(self, token_endpoint: str, *, now: float | None = None) -> str:
        """A signed assertion: ``iss = sub = client_id``, ``aud`` = the token endpoint, a unique ``jti``,
        ``exp`` :data:`ASSERTION_LIFETIME_S` ahead, ``kid`` in the header."""
        if self.private_key is None or not self.kid:
            raise ConfigurationError(
                f"SMART client {self.client_id} has no private key or kid to sign an assertion with.",
                remedy="Configure the private key and the kid its public JWK is registered under.",
            )
        issued = int(now if now is not None else time.time())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": token_endpoint,
            "jti": str(uuid.uuid4()),
            "iat": issued,
            "exp": issued + ASSERTION_LIFETIME_S,
        }
        header = {"alg": self.algorithm, "kid": self.kid, "typ": "JWT"}
        return jwt.encode(header, claims, self.private_key, algorithms=[self.algorithm])

    def authentication(self, token_endpoint: str) -> tuple[dict[str, str], tuple[str, str] | None]:
        """Form fields and HTTP basic credentials that authenticate this client at ``token_endpoint``."""
        if self.method in ("client_secret_basic", "client_secret_post") and not self.secret:
            raise ConfigurationError(
                f"SMART client {self.client_id} uses {self.method} but has no secret.", remedy="Configure its secret."
            )
        if self.method == "client_secret_basic":
            assert self.secret is not None
            return {}, (self.client_id, self.secret)
        if self.method == "client_secret_post":
            assert self.secret is not None
            return {"client_id": self.client_id, "client_secret": self.secret}, None
        if self.method == "private_key_jwt":
            return {
                "client_assertion_type": JWT_BEARER_ASSERTION,
                "client_assertion": self.client_assertion(token_endpoint),
            }, None
        return {"client_id": self.client_id}, None


# ---------------------------------------------------------------------------------------------- the token request


@dataclass(frozen=True)
class TokenResponse:
    """A successful token response. ``fields`` holds everything else the server sent (the SMART launch
    context: ``patient``, ``encounter``, ``fhirContext``...), never the tokens themselves."""

    access_token: str = field(repr=False)
    lifetime_s: float
    scope: str | None
    refresh_token: str | None = field(default=None, repr=False)
    id_token: str | None = field(default=None, repr=False)
    fields: Mapping[str, Any] = field(default_factory=dict, repr=False)


class UnusableTokenResponse(FhirUnauthorized):
    """The token endpoint answered 200, but not with a bearer token; ``problem`` says what was wrong."""

    def __init__(self, what: str, problem: str) -> None:
        super().__init__(
            f"FHIR {what} answered {problem}.",
            remedy="Check the token endpoint URL; it should be the SMART token endpoint.",
            status=200,
        )
        self.problem = problem


_CREDENTIAL_FIELDS = frozenset({"access_token", "refresh_token", "id_token"})


def request_token(
    token_endpoint: str,
    grant: Mapping[str, str],
    credentials: ClientCredentials,
    http: requests.Session,
    *,
    what: str,
    timeout: float = 30.0,
) -> TokenResponse:
    """POST one grant (``grant_type`` and its parameters) to ``token_endpoint`` as ``credentials``' client.

    ``what`` names the request in errors (``"token request for client imaging-cds"``; no PHI, no secrets).
    A refusal raises the typed error of :func:`fhir_adapters.errors.raise_for_fhir_status`; a 200 without a
    bearer token raises :class:`UnusableTokenResponse`.
    """
    fields, basic = credentials.authentication(token_endpoint)
    try:
        response = http.post(
            token_endpoint,
            data={**grant, **fields},
            auth=basic,
            headers={"Accept": "application/json"},
            timeout=timeout,
            allow_redirects=False,
        )
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise unavailable(exc, what=what) from None
    raise_for_fhir_status(response, what=what)
    body = json_object(response)
    if body is None:
        raise UnusableTokenResponse(what, "with a body that is not a JSON object")
    access_token = body.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise UnusableTokenResponse(what, "without an access token")
    if str(body.get("token_type", "bearer")).lower() != "bearer":  # absent: bearer, the only type SMART uses
        raise UnusableTokenResponse(what, "with a non-bearer token type")
    try:
        lifetime = float(body.get("expires_in") or DEFAULT_TOKEN_LIFETIME_S)
    except (TypeError, ValueError):
        lifetime = DEFAULT_TOKEN_LIFETIME_S
    refresh_token, id_token, scope = body.get("refresh_token"), body.get("id_token"), body.get("scope")
    return TokenResponse(
        access_token=access_token,
        lifetime_s=lifetime,
        scope=scope if isinstance(scope, str) and scope else None,
        refresh_token=refresh_token if isinstance(refresh_token, str) and refresh_token else None,
        id_token=id_token if isinstance(id_token, str) and id_token else None,
        fields={k: v for k, v in body.items() if k not in _CREDENTIAL_FIELDS},
    )

"""SMART Backend Services authorisation: obtain, cache and refresh system-level access tokens.

The project runs unattended (a CDS service, a worker), so it authenticates as a *system* with the OAuth 2.0
``client_credentials`` grant, as SMART Backend Services prescribes. Two client authentication methods:

* :class:`BackendServicesAuth` - the SMART way: a signed JWT (``private_key_jwt``, RS384 or ES384) proves
  possession of a private key whose public half the EHR registered (JWKS).
* :class:`ClientSecretAuth` - a shared secret (``client_secret_basic``), which many EHR sandboxes offer.

authlib performs the grant; this module adds what SMART asks for on top (assertion lifetime of at most five
minutes, a ``kid`` header, a unique ``jti``), caches the token until shortly before it expires, and routes
token-endpoint errors through :func:`fhir_adapters.errors.raise_for_fhir_status`. Tokens and secrets never
appear in logs, ``repr`` or exception messages.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Literal, Protocol, runtime_checkable

import requests
from authlib.integrations.requests_client import OAuth2Session
from authlib.oauth2.rfc7523 import PrivateKeyJWT, private_key_jwt_sign
from joserfc import jwk

from core.errors import ConfigurationError
from fhir_adapters.errors import FhirError, FhirUnauthorized, raise_for_fhir_status, unavailable

log = logging.getLogger(__name__)

ASSERTION_LIFETIME_S = 300
"""SMART Backend Services: the client assertion's ``exp`` is no more than five minutes in the future."""
REFRESH_SKEW_S = 60.0
"""A cached token is replaced this long before it expires, so a request never carries a token that dies in flight."""
DEFAULT_TOKEN_LIFETIME_S = 300
"""Assumed lifetime when a token response has no ``expires_in`` (short, so we re-ask rather than fail)."""
OAUTH_URIS_EXTENSION = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"

SigningAlgorithm = Literal["RS384", "ES384"]


@runtime_checkable
class TokenProvider(Protocol):
    """Something that can authorise FHIR requests; :class:`fhir_adapters.client.FhirClient` needs only this."""

    def authorization_header(self) -> str:
        """The value of the ``Authorization`` header (``"Bearer ..."``), fetching a token if needed."""
        ...

    def invalidate(self) -> None:
        """Forget the cached token (the server answered 401), so the next header fetches a fresh one."""
        ...


class _CachedClientCredentials:
    """Shared machinery: one cached token, refreshed under a lock; subclasses say how the client authenticates."""

    def __init__(self, token_url: str, client_id: str, scope: str, *, timeout: float = 30.0) -> None:
        if not token_url or not client_id:
            raise ConfigurationError("A SMART client needs a token URL and a client id.", remedy="Set both.")
        self.token_url = token_url
        self.client_id = client_id
        self.scope = scope
        self.timeout = timeout
        self._lock = threading.Lock()
        self._access_token: str | None = None
        self._expires_at = 0.0  # time.monotonic() seconds
        self.granted_scope: str | None = None

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(token_url={self.token_url!r}, client_id={self.client_id!r}, scope={self.scope!r})"

    def authorization_header(self) -> str:
        """``"Bearer <token>"``, from the cache while it has more than :data:`REFRESH_SKEW_S` left."""
        with self._lock:
            if self._access_token is None or time.monotonic() >= self._expires_at - REFRESH_SKEW_S:
                self._fetch_locked()
            assert self._access_token is not None
            return f"Bearer {self._access_token}"

    def invalidate(self) -> None:
        """Drop the cached token; the next :meth:`authorization_header` asks the token endpoint again."""
        with self._lock:
            self._access_token = None
            self._expires_at = 0.0

    def _session(self) -> OAuth2Session:
        raise NotImplementedError

    def _fetch_locked(self) -> None:
        what = f"token request for client {self.client_id}"

        def check_response(response: requests.Response) -> requests.Response:
            raise_for_fhir_status(response, what=what)
            return response

        started = time.monotonic()
        with self._session() as oauth:
            oauth.register_compliance_hook("access_token_response", check_response)
            try:
                token: dict[str, Any] = oauth.fetch_token(
                    self.token_url, grant_type="client_credentials", scope=self.scope, timeout=self.timeout
                )
            except (requests.ConnectionError, requests.Timeout) as exc:
                raise unavailable(exc, what=what) from None
            except FhirError:
                raise
            except Exception as exc:  # authlib's OAuthError for a malformed answer; keep its text out (may echo).
                raise FhirError(
                    f"FHIR {what} got an unusable answer ({type(exc).__name__}).",
                    remedy="Check the token endpoint URL; it should be the SMART token endpoint.",
                ) from None
        access_token = token.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise FhirUnauthorized(f"FHIR {what} answered without an access token.", remedy="Check the token URL.")
        if str(token.get("token_type", "bearer")).lower() != "bearer":
            raise FhirUnauthorized(f"FHIR {what} answered with a non-bearer token type.", remedy="Use a SMART server.")
        lifetime = float(token.get("expires_in") or DEFAULT_TOKEN_LIFETIME_S)
        self._access_token = access_token
        self._expires_at = started + lifetime
        self.granted_scope = str(token.get("scope") or self.scope)
        log.info("Obtained an access token for client %s (expires in %.0f s)", self.client_id, lifetime)


class ClientSecretAuth(_CachedClientCredentials):
    """``client_credentials`` with a shared secret (``client_secret_basic`` by default).

    Kept for EHR sandboxes that do not register keys; prefer :class:`BackendServicesAuth` in production,
    because a private key never leaves this service whereas a secret is sent with every token request.
    """

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: str,
        scope: str,
        *,
        method: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic",
        timeout: float = 30.0,
    ) -> None:
        super().__init__(token_url, client_id, scope, timeout=timeout)
        if not client_secret:
            raise ConfigurationError(f"SMART client {client_id} has an empty secret.", remedy="Configure its secret.")
        self._client_secret = client_secret
        self._method = method

    def _session(self) -> OAuth2Session:
        return OAuth2Session(
            self.client_id, self._client_secret, token_endpoint_auth_method=self._method, scope=self.scope
        )


class _SmartPrivateKeyJWT(PrivateKeyJWT):
    """authlib's ``private_key_jwt`` with SMART's five-minute assertion lifetime and the ``kid`` header."""

    def __init__(self, token_endpoint: str, *, alg: str, kid: str) -> None:
        super().__init__(token_endpoint=token_endpoint, headers={"kid": kid, "typ": "JWT"}, alg=alg)

    def sign(self, auth: Any, token_endpoint: str) -> str:
        # Fresh header and claims dicts each time: authlib adds jti/alg to the dicts it is given.
        return str(
            private_key_jwt_sign(
                auth.client_secret,
                client_id=auth.client_id,
                token_endpoint=token_endpoint,
                alg=self.alg,
                claims=None,
                header=dict(self.headers or {}),
                expires_in=ASSERTION_LIFETIME_S,
            )
        )


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


class BackendServicesAuth(_CachedClientCredentials):
    """SMART Backend Services: ``client_credentials`` authenticated by a signed JWT assertion.

    The assertion has ``iss = sub = client_id``, ``aud = token_url``, a unique ``jti`` and
    ``exp`` five minutes ahead at most, and is signed with RS384 or ES384 under ``kid``.
    """

    def __init__(
        self,
        token_url: str,
        client_id: str,
        private_key: str | bytes | dict[str, Any],
        *,
        algorithm: SigningAlgorithm = "RS384",
        kid: str,
        scope: str,
        timeout: float = 30.0,
    ) -> None:
        super().__init__(token_url, client_id, scope, timeout=timeout)
        if algorithm not in ("RS384", "ES384"):
            raise ConfigurationError(
                f"SMART Backend Services signing algorithm {algorithm!r} is not supported.",
                remedy="Use RS384 or ES384, the two algorithms SMART requires servers to accept.",
            )
        if not kid:
            raise ConfigurationError("A SMART signing key needs a kid.", remedy="Use the kid published in the JWKS.")
        self.algorithm = algorithm
        self.kid = kid
        self._key = load_private_key(private_key, algorithm)

    def client_assertion(self) -> str:
        """A freshly signed client assertion JWT (for inspection and tests; token requests make their own)."""
        signer = _SmartPrivateKeyJWT(self.token_url, alg=self.algorithm, kid=self.kid)
        return signer.sign(_AssertionParty(self.client_id, self._key), self.token_url)

    def _session(self) -> OAuth2Session:
        session = OAuth2Session(
            self.client_id, self._key, token_endpoint_auth_method="private_key_jwt", scope=self.scope
        )
        session.register_client_auth_method(_SmartPrivateKeyJWT(self.token_url, alg=self.algorithm, kid=self.kid))
        return session


class _AssertionParty:
    """The two attributes authlib's signer reads from its client (``client_id`` and the key)."""

    def __init__(self, client_id: str, key: jwk.RSAKey | jwk.ECKey) -> None:
        self.client_id = client_id
        self.client_secret = key


def discover_token_endpoint(fhir_base: str, session: requests.Session | None = None, *, timeout: float = 10.0) -> str:
    """Find the SMART token endpoint of a FHIR server.

    Reads ``{fhir_base}/.well-known/smart-configuration`` (SMART App Launch 2) and falls back to the
    CapabilityStatement's ``oauth-uris`` security extension, which older servers publish instead.
    """
    http = session or requests.Session()
    base = fhir_base.rstrip("/")
    what = "SMART configuration discovery"
    try:
        response = http.get(
            f"{base}/.well-known/smart-configuration", headers={"Accept": "application/json"}, timeout=timeout
        )
        if response.status_code == 200:
            endpoint = _json_dict(response).get("token_endpoint")
            if isinstance(endpoint, str) and endpoint:
                return endpoint
        response = http.get(f"{base}/metadata", headers={"Accept": "application/fhir+json"}, timeout=timeout)
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise unavailable(exc, what=what) from None
    raise_for_fhir_status(response, what="read CapabilityStatement")
    for rest in _json_dict(response).get("rest", []):
        for extension in (rest.get("security") or {}).get("extension", []):
            if extension.get("url") != OAUTH_URIS_EXTENSION:
                continue
            for sub in extension.get("extension", []):
                if sub.get("url") == "token" and sub.get("valueUri"):
                    return str(sub["valueUri"])
    raise ConfigurationError(
        f"The FHIR server {base} advertises no SMART token endpoint.",
        remedy="Configure the token URL explicitly, or ask the EHR vendor for its SMART configuration.",
    )


def _json_dict(response: requests.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}

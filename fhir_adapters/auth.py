"""SMART Backend Services authorisation: obtain, cache and refresh system-level access tokens.

The project runs unattended (a CDS service, a worker), so it authenticates as a *system* with the OAuth 2.0
``client_credentials`` grant, as SMART Backend Services prescribes. Two client authentication methods:

* :class:`BackendServicesAuth` - the SMART way: a signed JWT (``private_key_jwt``, RS384 or ES384) proves
  possession of a private key whose public half the EHR registered (JWKS).
* :class:`ClientSecretAuth` - a shared secret (``client_secret_basic``), which many EHR sandboxes offer.

The token request itself, the assertion (lifetime of at most five minutes, a ``kid`` header, a unique ``jti``)
and the error mapping are :mod:`fhir_adapters.smart`'s, shared with the clinician app; this module caches the
token until shortly before it expires. Tokens and secrets never appear in logs, ``repr`` or exception messages.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Literal, Protocol, runtime_checkable

import requests

from core.errors import ConfigurationError
from core.outbound import outbound_session
from fhir_adapters.smart import (
    ClientCredentials,
    SigningAlgorithm,
    discover,
    load_private_key,
    request_token,
)

log = logging.getLogger(__name__)

REFRESH_SKEW_S = 60.0
"""A cached token is replaced this long before it expires, so a request never carries a token that dies in flight."""


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

    def _credentials(self) -> ClientCredentials:
        raise NotImplementedError

    def _fetch_locked(self) -> None:
        started = time.monotonic()
        with outbound_session() as http:
            token = request_token(
                self.token_url,
                {"grant_type": "client_credentials", "scope": self.scope},
                self._credentials(),
                http,
                what=f"token request for client {self.client_id}",
                timeout=self.timeout,
            )
        self._access_token = token.access_token
        self._expires_at = started + token.lifetime_s
        self.granted_scope = token.scope or self.scope
        log.info("Obtained an access token for client %s (expires in %.0f s)", self.client_id, token.lifetime_s)


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
        self._client = ClientCredentials(client_id, method, secret=client_secret)

    def _credentials(self) -> ClientCredentials:
        return self._client


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
        key = load_private_key(private_key, algorithm)
        self._client = ClientCredentials(client_id, "private_key_jwt", private_key=key, algorithm=algorithm, kid=kid)

    def client_assertion(self) -> str:
        """A freshly signed client assertion JWT (for inspection and tests; token requests make their own)."""
        return self._client.client_assertion(self.token_url)

    def _credentials(self) -> ClientCredentials:
        return self._client


def discover_token_endpoint(fhir_base: str, session: requests.Session | None = None, *, timeout: float = 10.0) -> str:
    """The SMART token endpoint of a FHIR server, as :func:`fhir_adapters.smart.discover` finds it.

    Any grant the server offers is accepted here (a backend-services-only server is fine); the caller asks
    for ``client_credentials`` and the token endpoint answers whether that is allowed.
    """
    server = discover(fhir_base, session or outbound_session(), timeout=timeout)
    if server is None:
        raise ConfigurationError(
            f"The FHIR server {fhir_base.rstrip('/')} advertises no SMART token endpoint.",
            remedy="Configure the token URL explicitly, or ask the EHR vendor for its SMART configuration.",
        )
    return server.token_endpoint


def backend_services_auth(
    fhir_base: str,
    client_id: str,
    *,
    scope: str,
    session: requests.Session,
    token_url: str | None = None,
    private_key: str | bytes | dict[str, Any] | None = None,
    kid: str | None = None,
    algorithm: SigningAlgorithm = "RS384",
    client_secret: str | None = None,
) -> TokenProvider:
    """This service's own credentials with an EHR, built the same way for the CLI and for ``serve``.

    ``private_key_jwt`` when a private key is given (the SMART way), else ``client_secret_basic``; the token endpoint
    is discovered from ``fhir_base`` unless ``token_url`` names it.
    """
    if private_key is None and not client_secret:
        raise ConfigurationError(
            f"SMART client {client_id} has no credential.", remedy="Configure a private key (and its kid) or a secret."
        )
    endpoint = token_url or discover_token_endpoint(fhir_base, session)
    if private_key is not None:
        if not kid:
            raise ConfigurationError("A SMART signing key needs a kid.", remedy="Give the kid registered with the EHR.")
        return BackendServicesAuth(endpoint, client_id, private_key, algorithm=algorithm, kid=kid, scope=scope)
    assert client_secret is not None
    return ClientSecretAuth(endpoint, client_id, client_secret, scope=scope)

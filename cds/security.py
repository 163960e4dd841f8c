"""Verify the JWT a CDS client (an EHR) sends with every call, as CDS Hooks 2.0 asks.

A hook request makes this service read patient data and answer with advice, so it must know who is calling.
The CDS client signs a short-lived JWT with its private key; this module checks, in order: a bearer token is
present; its header names an asymmetric algorithm the issuer is configured for (never ``none``, never HMAC,
which would let anyone holding the *public* key sign - the "algorithm confusion" attack) and a ``kid``; its
``iss`` is a configured trusted client; the key is the one with the token's ``kid`` in that client's configured
JWK Set (by value or file) whenever the set holds it - whatever ``jku`` the header also names, which is then
never fetched - and otherwise comes from the ``jku`` URL in the header only when that URL, in canonical form
(:func:`core.allowlist.canonical_url`: a ``jku`` of ``{allowed}/../elsewhere`` is not under ``{allowed}``), is
on the client's own jku allow-list (checked before any request; the canonical URL is what is fetched, without
following redirects, and the set is refused while it streams in once it passes ``limits.jwks_bytes``); nothing
else is ever fetched. CDS Hooks lets a client share its keys out of band or publish them at a ``jku``, and the
official sandbox names its public ``jku`` on every request: a service configured with the sandbox's key by
value must verify with it, not refuse the token for the ``jku`` it will not fetch. Then the signature; ``aud``
(a string or a list of strings) equals the endpoint being invoked; ``exp`` (not expired, not more than
``max_jwt_lifetime_s`` ahead), ``iat`` (not in the future); and ``jti`` was not seen before.

Every failure raises :class:`AuthenticationError`. Its ``reason`` is for the service's own log (never the
token); callers answer a generic 401, because telling an attacker *which* check failed helps them.

Replay cache: :class:`JtiCache` lives in one process's memory, so a restart forgets it and other workers never
see it; :func:`cds.app.create_app` therefore uses a shared one (:mod:`cds.replay`: SQLite in the deployment's
``data_dir`` by default, Redis when configured), and :class:`JtiCache` is for a verifier built on its own.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import requests
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import Key, KeySet

from cds.config import CdsConfig, TrustedClient
from core.allowlist import AllowList
from core.errors import LimitExceededError, NotAllowedError
from core.limits import DEFAULT_LIMITS
from core.outbound import limit_body, outbound_session

_MAX_TOKEN_CHARS = 16_384
_MIN_REFETCH_S = 10.0


class AuthenticationError(Exception):
    """The caller could not be authenticated; ``reason`` says why, for the service's log only."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ReplayCache(Protocol):
    """Remembers JWT ids until they expire; ``first_use`` is an atomic check-and-record."""

    def first_use(self, key: str, expires_at: float) -> bool: ...


class JtiCache:
    """In-process replay cache (see the module docstring for the multi-process caveat)."""

    def __init__(self, clock: Any = time.time) -> None:
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self._clock = clock
        self._next_purge = 0.0

    def first_use(self, key: str, expires_at: float) -> bool:
        now = self._clock()
        with self._lock:
            if now >= self._next_purge:
                self._seen = {k: exp for k, exp in self._seen.items() if exp > now}
                self._next_purge = now + 30.0
            previous = self._seen.get(key)
            if previous is not None and previous > now:
                return False
            self._seen[key] = expires_at
            return True


@dataclass
class _CachedKeys:
    keys: KeySet
    fetched_at: float


class JwksFetcher:
    """Fetch and cache JWK Sets published at ``jku`` URLs; the caller has already checked the allow-list.

    A key id not found in a cached set triggers one refetch (keys rotate), at most every ten seconds per URL,
    so a stream of tokens with random ``kid`` values cannot turn this service into a request amplifier.
    """

    def __init__(
        self,
        *,
        ttl_s: float,
        timeout_s: float,
        session: requests.Session | None = None,
        max_bytes: int = DEFAULT_LIMITS.jwks_bytes,
    ) -> None:
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._session = session or outbound_session()
        self._limit_body = limit_body(max_bytes, what="The JWK Set at a jku", limit_name="jwks_bytes")
        self._cache: dict[str, _CachedKeys] = {}
        self._lock = threading.Lock()

    def keys(self, url: str, kid: str) -> KeySet:
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(url)
        if cached is not None:
            fresh = now - cached.fetched_at < self._ttl_s
            has_kid = any(k.kid == kid for k in cached.keys.keys)
            if fresh and (has_kid or now - cached.fetched_at < _MIN_REFETCH_S):
                return cached.keys
        keys = self._fetch(url)
        with self._lock:
            self._cache[url] = _CachedKeys(keys, time.monotonic())
        return keys

    def _fetch(self, url: str) -> KeySet:
        try:
            response = self._session.get(
                url,
                timeout=self._timeout_s,
                allow_redirects=False,
                headers={"Accept": "application/json"},
                hooks={"response": self._limit_body},
            )
        except (requests.RequestException, NotAllowedError, LimitExceededError) as exc:
            raise AuthenticationError(f"JWKS at jku could not be fetched ({type(exc).__name__})") from exc
        if response.status_code != 200:
            raise AuthenticationError(f"JWKS at jku answered HTTP {response.status_code}")
        return _import_key_set(response.content)


def _import_key_set(raw: bytes | dict[str, Any]) -> KeySet:
    try:
        data = json.loads(raw) if isinstance(raw, bytes) else raw
        # Only public asymmetric keys: an "oct" (shared secret) entry in a client's set is ignored outright.
        public = [k for k in data.get("keys", []) if isinstance(k, dict) and k.get("kty") in ("RSA", "EC")]
        return KeySet.import_key_set({"keys": public})
    except (ValueError, AttributeError, JoseError) as exc:
        raise AuthenticationError(f"JWK Set is malformed ({type(exc).__name__})") from exc


def bearer_token(authorization: str | None) -> str:
    """The token from an ``Authorization: Bearer <token>`` header."""
    if not authorization:
        raise AuthenticationError("no Authorization header")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError("Authorization is not a Bearer token")
    if len(token) > _MAX_TOKEN_CHARS:
        raise AuthenticationError("token too long")
    return token


class JwtVerifier:
    """Checks CDS client JWTs against :class:`cds.config.CdsConfig` (see the module docstring)."""

    def __init__(
        self,
        config: CdsConfig,
        *,
        replay_cache: ReplayCache | None = None,
        jwks_fetcher: JwksFetcher | None = None,
        clock: Any = time.time,
    ) -> None:
        self._config = config
        self._replay = replay_cache or JtiCache(clock)
        self._fetcher = jwks_fetcher or JwksFetcher(
            ttl_s=config.jwks_cache_s, timeout_s=config.fhir_timeout_s, max_bytes=config.limits.jwks_bytes
        )
        self._clock = clock
        # Static key sets are parsed once here, so a bad file fails at start-up, not on the first hook call.
        self._static: dict[str, KeySet] = {}
        self._static_by_kid: dict[tuple[str, str, str], Key] = {}
        self._jku_allow: dict[str, AllowList] = {}
        self._jws_registry: dict[str, jws.JWSRegistry] = {}
        self._claims_registry: dict[str, jwt.JWTClaimsRegistry] = {}
        for client in config.trusted_clients:
            static = client.static_jwks()
            if static is not None:
                self._static[client.iss] = _import_key_set(static)
            self._jku_allow[client.iss] = AllowList.of(client.jku_allow_list)
            # Only this client's algorithms are registered, so joserfc itself refuses any other ``alg``.
            self._jws_registry[client.iss] = jws.JWSRegistry(algorithms=list(client.algorithms))
            self._claims_registry[client.iss] = jwt.JWTClaimsRegistry(
                now=lambda: int(self._clock()),
                leeway=config.clock_skew_s,
                iss={"essential": True, "value": client.iss},
                exp={"essential": True},
                iat={"essential": True},
                jti={"essential": True},
                aud={"essential": True},
            )

    def verify(self, authorization: str | None, audiences: Iterable[str]) -> dict[str, Any]:
        """Return the verified claims, or raise :class:`AuthenticationError`.

        ``audiences`` are the URLs this call may be addressed to (the invoked endpoint).

        The token is parsed once: its header and payload are read (unverified) to pick the issuer's keys, then
        joserfc checks the signature of that same parsed object with the issuer's algorithm allow-list, and
        only then are the payload's claims trusted. Keys, JWS registries and claim rules are built once per
        trusted client, not per request (a hook is answered while a clinician waits).
        """
        token = bearer_token(authorization)
        try:
            compact = jws.extract_compact(token.encode("ascii"))
            header = compact.headers()
            claims = orjson.loads(compact.payload)
        except (JoseError, ValueError, UnicodeError) as exc:  # orjson.JSONDecodeError is a ValueError
            raise AuthenticationError(f"token is not a compact JWS ({type(exc).__name__})") from exc
        if not isinstance(claims, dict):
            raise AuthenticationError("token payload is not a JSON object")
        iss = claims.get("iss")
        client = self._config.client(iss) if isinstance(iss, str) else None
        if client is None:
            raise AuthenticationError("iss is not a trusted CDS client")
        alg = header.get("alg")
        if alg not in client.algorithms:
            raise AuthenticationError(f"alg {alg!r} is not accepted for this client")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthenticationError("kid header is missing")
        keys = self._keys_for(client, header, kid)
        try:
            valid = jws.validate_compact(compact, keys, registry=self._jws_registry[client.iss])
        except JoseError as exc:
            raise AuthenticationError(f"signature check failed ({type(exc).__name__})") from exc
        if not valid:
            raise AuthenticationError("signature check failed (BadSignatureError)")
        self._check_claims(claims, client, set(audiences))
        return claims

    def _keys_for(self, client: TrustedClient, header: dict[str, Any], kid: str) -> Key | KeySet:
        static = self._static.get(client.iss)
        if static is not None:
            key = self._configured_key(client, static, kid, str(header.get("alg")))
            if key is not None:
                return key  # the configured key for this kid: a jku in the header is not needed, never fetched
        jku = header.get("jku")
        if jku is not None:
            if not isinstance(jku, str) or not client.jku_allow_list:
                raise AuthenticationError("kid not in the configured keys, and this client has no jku allow-list")
            try:
                url = self._jku_allow[client.iss].check(jku, what="jku")
            except NotAllowedError as exc:
                raise AuthenticationError("jku is not on the client's allow-list") from exc
            return self._fetcher.keys(url, kid)
        if static is None:
            raise AuthenticationError("no jku and no configured JWK Set for this client")
        return static  # no key for this kid: joserfc refuses, and the caller answers the same generic 401

    def _configured_key(self, client: TrustedClient, static: KeySet, kid: str, alg: str) -> Key | None:
        """The key of the configured set for ``kid`` and ``alg`` (``None`` when it holds none).

        Memoises joserfc's own choice of key for this (iss, kid, alg) - the same lookup, with the same "alg" and
        "use": "sig" filters, that it does when given the set - so it is not repeated per request. A kid with no
        matching key is not memoised; the memo is bounded by the configured keys times their algorithms.
        """
        memo = (client.iss, kid, alg)
        key = self._static_by_kid.get(memo)
        if key is None:
            try:
                key = static.get_by_kid(kid, {"alg": alg, "use": "sig"})
            except (JoseError, ValueError):
                return None
            self._static_by_kid[memo] = key
        return key

    def _check_claims(self, claims: dict[str, Any], client: TrustedClient, audiences: set[str]) -> None:
        now = self._clock()
        skew = self._config.clock_skew_s
        registry = self._claims_registry[client.iss]
        try:
            registry.validate(claims)
        except JoseError as exc:
            raise AuthenticationError(f"claims rejected ({type(exc).__name__})") from exc
        aud = claims["aud"]
        offered = [aud] if isinstance(aud, str) else aud
        if not isinstance(offered, list) or not all(isinstance(a, str) for a in offered):
            raise AuthenticationError("aud is neither a string nor a list of strings")
        if not {a.rstrip("/") for a in offered} & {a.rstrip("/") for a in audiences}:
            raise AuthenticationError("aud is not this endpoint")
        exp, iat = claims["exp"], claims["iat"]
        if not isinstance(exp, int | float) or not isinstance(iat, int | float):
            raise AuthenticationError("exp/iat are not numbers")
        if iat > now + skew:
            raise AuthenticationError("iat is in the future")
        if exp > now + self._config.max_jwt_lifetime_s + skew:
            raise AuthenticationError("exp is too far in the future")
        if not self._replay.first_use(f"{client.iss}\x00{claims['jti']}", float(exp) + skew):
            raise AuthenticationError("jti was already used (replay)")

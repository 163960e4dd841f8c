"""The sandbox's in-memory state: launches, pending consents, codes and tokens, behind one lock.

It is a development server, so nothing survives a restart; but the web server is threaded (the app under test
and its browser hit it at once), so every read-modify-write happens under the store's lock.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from devtools.sandbox.scopes import split_scopes


@dataclass(frozen=True)
class LaunchContext:
    """What the EHR knew when the clinician clicked the app: the user and the patient/encounter/study."""

    practitioner: str | None = None
    patient: str | None = None
    encounter: str | None = None
    fhir_context: tuple[dict[str, Any], ...] = ()
    need_patient_banner: bool = True


@dataclass
class Launch:
    """An opaque launch id issued by ``/launch-ehr``; reusable until it expires (a reload must work)."""

    launch_id: str
    context: LaunchContext
    expires_at: float


@dataclass
class PendingConsent:
    """A validated authorization request waiting for the user's Approve/Deny."""

    transaction_id: str
    params: dict[str, str]
    context: LaunchContext
    scopes: list[str]
    expires_at: float


@dataclass
class Grant:
    """The user's decision, carried by authlib as ``request.user`` into codes and tokens."""

    context: LaunchContext
    scope: str
    nonce: str | None = None
    auth_time: int = field(default_factory=lambda: int(time.time()))

    def get_user_id(self) -> str | None:
        return self.context.practitioner


@dataclass
class AuthorizationCodeRecord:
    """One authorization code, bound to its client, redirect URI, PKCE challenge and grant."""

    code: str
    client_id: str
    redirect_uri: str
    scope: str
    grant: Grant
    code_challenge: str | None
    code_challenge_method: str | None
    expires_at: float
    used: bool = False

    # authlib AuthorizationCodeMixin
    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope

    def get_nonce(self) -> str | None:
        return self.grant.nonce

    def get_auth_time(self) -> int:
        return self.grant.auth_time


@dataclass
class TokenRecord:
    """An issued access token (and its refresh token, if any) with what it was granted."""

    access_token: str
    refresh_token: str | None
    client_id: str
    scope: str
    grant: Grant
    issued_at: float
    access_expires_at: float
    refresh_expires_at: float
    origin_code: str | None
    revoked: bool = False

    @property
    def scopes(self) -> list[str]:
        return split_scopes(self.scope)

    # authlib TokenMixin
    def check_client(self, client: Any) -> bool:
        return bool(client.get_client_id() == self.client_id)

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return int(self.access_expires_at - self.issued_at)

    def is_expired(self) -> bool:
        return time.time() >= self.access_expires_at

    def is_revoked(self) -> bool:
        return self.revoked


class SandboxState:
    """Thread-safe in-memory store. Expired entries are dropped lazily when looked at."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._launches: dict[str, Launch] = {}
        self._pending: dict[str, PendingConsent] = {}
        self._codes: dict[str, AuthorizationCodeRecord] = {}
        self._by_access: dict[str, TokenRecord] = {}
        self._by_refresh: dict[str, TokenRecord] = {}
        self._jtis: dict[str, float] = {}

    # launches ---------------------------------------------------------------------------------
    def new_launch(self, context: LaunchContext, lifetime: int) -> str:
        launch_id = secrets.token_urlsafe(16)
        with self._lock:
            self._launches[launch_id] = Launch(launch_id, context, time.time() + lifetime)
        return launch_id

    def launch(self, launch_id: str) -> LaunchContext | None:
        with self._lock:
            launch = self._launches.get(launch_id)
            if launch is None or launch.expires_at <= time.time():
                self._launches.pop(launch_id, None)
                return None
            return launch.context

    # consent ----------------------------------------------------------------------------------
    def add_pending(self, params: dict[str, str], context: LaunchContext, scopes: list[str], lifetime: int) -> str:
        transaction_id = secrets.token_urlsafe(24)
        with self._lock:
            self._pending[transaction_id] = PendingConsent(
                transaction_id, params, context, scopes, time.time() + lifetime
            )
        return transaction_id

    def take_pending(self, transaction_id: str) -> PendingConsent | None:
        """Single use: a consent form can be submitted once."""
        with self._lock:
            pending = self._pending.pop(transaction_id, None)
        if pending is None or pending.expires_at <= time.time():
            return None
        return pending

    # codes ------------------------------------------------------------------------------------
    def add_code(self, record: AuthorizationCodeRecord) -> None:
        with self._lock:
            self._codes[record.code] = record

    def redeem_code(self, code: str, client_id: str) -> AuthorizationCodeRecord | None:
        """Atomically mark a code used and return it; None if unknown, expired, foreign or replayed.

        A replay (second redemption) revokes every token issued from the code, as RFC 6749 4.1.2 asks.
        """
        with self._lock:
            record = self._codes.get(code)
            if record is None or record.client_id != client_id:
                return None
            if record.used:
                for token in self._by_access.values():
                    if token.origin_code == code:
                        token.revoked = True
                return None
            record.used = True
            if record.expires_at <= time.time():
                return None
            return record

    # tokens -----------------------------------------------------------------------------------
    def add_token(self, record: TokenRecord) -> None:
        with self._lock:
            self._by_access[record.access_token] = record
            if record.refresh_token:
                self._by_refresh[record.refresh_token] = record

    def by_access_token(self, access_token: str) -> TokenRecord | None:
        with self._lock:
            return self._by_access.get(access_token)

    def by_refresh_token(self, refresh_token: str) -> TokenRecord | None:
        with self._lock:
            record = self._by_refresh.get(refresh_token)
        if record is None or record.revoked or record.refresh_expires_at <= time.time():
            return None
        return record

    def use_jti(self, key: str, expires_at: float) -> bool:
        """Record a client assertion's ``jti``; False if it was seen before (a replayed assertion)."""
        now = time.time()
        with self._lock:
            for stale in [k for k, exp in self._jtis.items() if exp < now]:
                del self._jtis[stale]
            if key in self._jtis:
                return False
            self._jtis[key] = max(expires_at, now + 300)
            return True

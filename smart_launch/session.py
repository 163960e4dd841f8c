"""The authorisation state of one browser session, kept on the server; the browser holds only an opaque id.

One serialisable object, :class:`AuthorizationState`, holds everything a launch produced: the discovered
endpoints, the pending ``state`` and PKCE verifier while the user is at the EHR's consent screen, then the tokens,
the granted scopes, the launch context (patient, encounter, fhirContext, banner) and the verified ``fhirUser``.
:class:`SessionStore` keeps these objects in SQLite under a random 256-bit session id; that id is all the
session cookie carries, so a token never reaches a page, a URL or the browser's storage.

:class:`SessionTokenProvider` lets a :class:`fhir_adapters.client.FhirClient` (and a background analysis job)
use a session's access token, refreshing it shortly before it expires; refreshes of one session are
serialised by a per-session lock so a page request and a running job never spend a rotating refresh token
twice.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from fhir_adapters.errors import FhirUnauthorized
from smart_launch.oauth import GrantedScopes, SmartConfiguration, TokenSet, refresh_margin

Phase = Literal["authorizing", "authorized"]

DEFAULT_SESSION_LIFETIME_S = 8 * 3600
"""A clinician's session lasts a working shift at most; after that the app must be launched again."""


@dataclass
class AuthorizationState:
    """Everything one launch established. Plain fields only, so it round-trips through JSON unchanged."""

    smart: dict[str, Any]
    client_id: str
    phase: Phase = "authorizing"
    standalone: bool = False
    created_at: float = field(default_factory=time.time)
    csrf_token: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    job_ref: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    # While the user is at the EHR's authorization screen:
    oauth_state: str | None = field(default=None, repr=False)
    code_verifier: str | None = field(default=None, repr=False)
    requested_scope: str = ""
    # After the code exchange:
    access_token: str | None = field(default=None, repr=False)
    refresh_token: str | None = field(default=None, repr=False)
    expires_at: float = 0.0
    token_lifetime_s: float = 0.0
    granted_scope: str = ""
    patient: str | None = None
    encounter: str | None = None
    fhir_context: list[dict[str, Any]] = field(default_factory=list)
    need_patient_banner: bool = True
    fhir_user: str | None = None
    jobs: list[str] = field(default_factory=list)

    @property
    def smart_configuration(self) -> SmartConfiguration:
        return SmartConfiguration.from_json(self.smart)

    @property
    def fhir_base(self) -> str:
        return str(self.smart["fhir_base"])

    @property
    def granted(self) -> GrantedScopes:
        return GrantedScopes.parse(self.granted_scope)

    @property
    def authorized(self) -> bool:
        return self.phase == "authorized" and self.access_token is not None

    def refresh_due(self, now: float) -> bool:
        return now >= self.expires_at - refresh_margin(self.token_lifetime_s)

    def apply_tokens(self, tokens: TokenSet) -> None:
        """Take the tokens of a code exchange or refresh; a refresh keeps the launch context it does not repeat."""
        self.access_token = tokens.access_token
        self.refresh_token = tokens.refresh_token
        self.expires_at = tokens.expires_at
        self.token_lifetime_s = tokens.lifetime_s
        self.granted_scope = tokens.scope
        context = tokens.context
        if isinstance(context.get("patient"), str):
            self.patient = context["patient"]
        if isinstance(context.get("encounter"), str):
            self.encounter = context["encounter"]
        if isinstance(context.get("fhirContext"), list):
            self.fhir_context = [c for c in context["fhirContext"] if isinstance(c, dict)]
        if isinstance(context.get("need_patient_banner"), bool):
            self.need_patient_banner = context["need_patient_banner"]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AuthorizationState:
        data = json.loads(text)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def __repr__(self) -> str:
        return (
            f"AuthorizationState(fhir_base={self.fhir_base!r}, client_id={self.client_id!r}, phase={self.phase!r}, "
            f"patient={'set' if self.patient else None}, <credentials redacted>)"
        )


_SCHEMA = """
CREATE TABLE IF NOT EXISTS smart_sessions (
    id TEXT PRIMARY KEY,
    job_ref TEXT NOT NULL,
    data TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS smart_sessions_by_job_ref ON smart_sessions (job_ref);
"""


class SessionStore:
    """Authorisation states by session id, in one SQLite file (or ``:memory:``), safe across threads.

    Sessions older than ``max_age_s`` are treated as gone (and removed): a stolen session id stops working
    after a shift even if never logged out. Token values are stored in the file, which must therefore be
    readable by the service only, like any credential store.
    """

    def __init__(
        self,
        path: str | Path = ":memory:",
        *,
        max_age_s: float = DEFAULT_SESSION_LIFETIME_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._session_locks: dict[str, threading.Lock] = {}
        self._connection = sqlite3.connect(str(path), timeout=10.0, isolation_level=None, check_same_thread=False)
        with self._lock:
            if str(path) != ":memory:":
                self._connection.execute("PRAGMA journal_mode=WAL")
                # WAL with NORMAL sync survives an app crash; a power cut may lose the last writes, which only
                # means signing in again. It spares an fsync on each page that updates the session.
                self._connection.execute("PRAGMA synchronous=NORMAL")
            self._connection.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    def create(self, state: AuthorizationState) -> str:
        """Store ``state`` under a new random id and return the id (the only thing the cookie will hold)."""
        session_id = secrets.token_urlsafe(32)
        now = self._clock()
        with self._lock:
            self._connection.execute(
                "INSERT INTO smart_sessions (id, job_ref, data, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                (session_id, state.job_ref, state.to_json(), now, now),
            )
        return session_id

    def get(self, session_id: str | None) -> AuthorizationState | None:
        if not session_id:
            return None
        with self._lock:
            row = self._connection.execute(
                "SELECT data, created_at FROM smart_sessions WHERE id = ?", (session_id,)
            ).fetchone()
        if row is None:
            return None
        if self._clock() - float(row[1]) > self.max_age_s:
            self.delete(session_id)
            return None
        return AuthorizationState.from_json(row[0])

    def put(self, session_id: str, state: AuthorizationState) -> None:
        with self._lock:
            self._connection.execute(
                "UPDATE smart_sessions SET data = ?, job_ref = ?, updated_at = ? WHERE id = ?",
                (state.to_json(), state.job_ref, self._clock(), session_id),
            )

    def delete(self, session_id: str) -> None:
        with self._lock:
            self._connection.execute("DELETE FROM smart_sessions WHERE id = ?", (session_id,))
            self._session_locks.pop(session_id, None)

    def session_for_job_ref(self, job_ref: str) -> str | None:
        """The session id that submitted jobs under ``job_ref`` (jobs carry the ref, never the session id)."""
        with self._lock:
            row = self._connection.execute("SELECT id FROM smart_sessions WHERE job_ref = ?", (job_ref,)).fetchone()
        return str(row[0]) if row else None

    @contextmanager
    def locked(self, session_id: str) -> Iterator[None]:
        """Hold the session's own lock (token refresh, read-modify-write of its state)."""
        with self._lock:
            lock = self._session_locks.setdefault(session_id, threading.Lock())
        with lock:
            yield


Refresher = Callable[[AuthorizationState], TokenSet]
"""Obtains new tokens for a state (the app binds the client registration and HTTP session)."""


class SessionTokenProvider:
    """A :class:`fhir_adapters.auth.TokenProvider` over one server-side session, refreshing before expiry.

    When the token is due (or the FHIR server answered 401 and :meth:`invalidate` was called) and the session
    has a refresh token, it refreshes; without one it fails with a message that asks for a new launch.
    """

    def __init__(
        self,
        store: SessionStore,
        session_id: str,
        refresher: Refresher,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._session_id = session_id
        self._refresher = refresher
        self._clock = clock
        self.refresh_count = 0

    def __repr__(self) -> str:
        return "SessionTokenProvider(<session redacted>)"

    def authorization_header(self) -> str:
        with self._store.locked(self._session_id):
            state = self._store.get(self._session_id)
            if state is None or not state.authorized:
                raise FhirUnauthorized(
                    "The SMART session has ended, so the EHR cannot be read or written for it.",
                    remedy="Launch imaging-cds again from the EHR.",
                )
            if state.refresh_due(self._clock()):
                if not state.refresh_token:
                    raise FhirUnauthorized(
                        "The EHR's access token expired and the EHR issued no refresh token.",
                        remedy="Launch imaging-cds again from the EHR to continue.",
                    )
                state.apply_tokens(self._refresher(state))
                self._store.put(self._session_id, state)
                self.refresh_count += 1
            assert state.access_token is not None
            return f"Bearer {state.access_token}"

    def invalidate(self) -> None:
        with self._store.locked(self._session_id):
            state = self._store.get(self._session_id)
            if state is not None:
                state.expires_at = 0.0
                self._store.put(self._session_id, state)


RECENT_READ_TTL_S = 60.0
"""How long a resource the app just read or wrote may stand in for re-reading it: long enough to cover one
click (study page -> Analyze, analysis -> result page and its images), short enough that a later visit asks
the EHR, which stays the source of truth."""


class RecentReads:
    """What one session's pages and jobs just read from (or wrote to) the EHR, for a minute, in this process.

    Each page used to re-read the Patient (banner), the ImagingStudy (from the study page to the Analyze POST)
    and, right after an analysis had filed them, the Media images it had just written. Entries are keyed by the
    session id, so one launch never sees another's data, and expire after ``ttl_s``; the store is bounded
    (oldest first out) and never written to disk. Values are treated as read-only by callers.
    """

    def __init__(
        self, ttl_s: float = RECENT_READ_TTL_S, max_entries: int = 512, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._clock = clock
        self._entries: dict[tuple[str, str], tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def get(self, session_id: str, key: str) -> Any | None:
        """The value kept for ``key`` in this session, or ``None`` when there is none or it has expired."""
        with self._lock:
            found = self._entries.get((session_id, key))
            if found is None:
                return None
            if found[0] <= self._clock():
                del self._entries[(session_id, key)]
                return None
            return found[1]

    def take(self, session_id: str, key: str) -> Any | None:
        """Like :meth:`get`, but the value is removed: for something that may be used once only."""
        with self._lock:
            found = self._entries.pop((session_id, key), None)
        return found[1] if found is not None and found[0] > self._clock() else None

    def put(self, session_id: str, key: str, value: Any) -> None:
        with self._lock:
            now = self._clock()
            self._entries.pop((session_id, key), None)
            self._entries[(session_id, key)] = (now + self._ttl_s, value)
            if len(self._entries) > self._max_entries:
                for stale in [k for k, (expires, _) in self._entries.items() if expires <= now]:
                    del self._entries[stale]
                while len(self._entries) > self._max_entries:  # dicts keep insertion order: oldest first
                    del self._entries[next(iter(self._entries))]

    def forget_session(self, session_id: str) -> None:
        """Drop everything a session kept (logout, or the session id replaced after login)."""
        with self._lock:
            for key in [k for k in self._entries if k[0] == session_id]:
                del self._entries[key]

"""The authorisation state of one browser session, kept on the server; the browser holds only an opaque id.

One serialisable object, :class:`AuthorizationState`, holds everything a launch produced: the discovered
endpoints, the tokens, the granted scopes, the launch context (patient, encounter, fhirContext, banner) and the
verified ``fhirUser``. :class:`SessionStore` keeps these objects sealed (AES-GCM) in SQLite under the hash of a
random 256-bit session id; that id is all the session cookie carries, so a token never reaches a page, a URL or
the browser's storage, nor the state file in readable form. Before the EHR has authorised the launch nothing is
stored: the ``state`` and PKCE verifier travel in a sealed cookie (:class:`PendingLaunch`).

:class:`SessionTokenProvider` lets a :class:`fhir_adapters.client.FhirClient` (and a background analysis job)
use a session's access token, refreshing it shortly before it expires; refreshes of one session are
serialised by a per-session lease, across threads and processes, so a page request and a running job never
spend a rotating refresh token twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from core.errors import ImagingCdsError
from core.sealing import Keyring, SealedValueError
from core.statefiles import connect_private_sqlite
from fhir_adapters.errors import FhirUnauthorized
from smart_launch.oauth import GrantedScopes, SmartConfiguration, TokenSet, refresh_margin

log = logging.getLogger(__name__)

Phase = Literal["authorizing", "authorized"]

DEFAULT_SESSION_LIFETIME_S = 8 * 3600
"""A clinician's session lasts a working shift at most; after that the app must be launched again."""


@dataclass
class AuthorizationState:
    """Everything one authorised launch established. Plain fields only, so it round-trips through JSON unchanged.

    It exists from the code exchange on (a launch still at the EHR's consent screen is a :class:`PendingLaunch`).
    """

    smart: dict[str, Any]
    client_id: str
    phase: Phase = "authorizing"
    standalone: bool = False
    created_at: float = field(default_factory=time.time)
    csrf_token: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    job_ref: str = field(default_factory=lambda: secrets.token_urlsafe(16))
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


SESSION_LIFETIME_WHILE_AUTHORIZING_S = 600
"""A launch waiting at the EHR's consent screen is pending for ten minutes at most (the pending launch cookie's
lifetime); after that the clinician starts it again."""

SWEEP_INTERVAL_S = 60.0
REFRESH_LEASE_S = 60.0
"""How long one process may hold a session's refresh lease: longer than a token request may take (its timeout
is 30 s), so a lease is only taken over from a process that died while holding it."""
REFRESH_WAIT_S = 45.0
_SEALED_CONTEXT = "smart-session:"
_PENDING_CONTEXT = "smart-pending-launch"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS smart_sessions_sealed (
    key TEXT PRIMARY KEY,
    job_ref TEXT NOT NULL,
    sealed TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS smart_sessions_sealed_by_job_ref ON smart_sessions_sealed (job_ref);
CREATE INDEX IF NOT EXISTS smart_sessions_sealed_by_created ON smart_sessions_sealed (created_at);
CREATE TABLE IF NOT EXISTS smart_session_leases (
    key TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    until REAL NOT NULL
);
"""


class SessionKey(str):
    """What the store keys a session by: the SHA-256 of its id, so the file never holds a usable session cookie.

    Code that already looked a session up (a page, a job found by its launch reference) passes this key on; a
    plain string is always taken for a session id and hashed, so a cookie holding a key read from the file
    opens nothing.
    """

    __slots__ = ()

    @classmethod
    def of(cls, session_id: str) -> SessionKey:
        if isinstance(session_id, SessionKey):
            return session_id
        return cls(hashlib.sha256(session_id.encode("utf-8")).hexdigest())


class SessionBusyError(ImagingCdsError):
    """Another request (in this or another process) has been refreshing this session's token for too long."""

    http_status = 503


class SessionStore:
    """Authorisation states by session id, in one SQLite file (or ``:memory:``), shared by threads and processes.

    What the file holds, and what it does not:

    * each state is sealed (:class:`core.sealing.Keyring`, AES-GCM) and bound to its row, so neither a token,
      nor the PKCE verifier, nor the patient of a launch can be read from the file or a backup of it;
    * rows are keyed by a SHA-256 of the session id: the cookie's value is not in the file either;
    * deleted rows are overwritten (``secure_delete``), and a file left by a release that stored states in
      plain text is emptied of them when opened;
    * the file is ``0600`` in a ``0700`` folder (:mod:`core.statefiles`).

    Several processes may share the file (``serve`` and job workers given the same ``data_dir``, on one host):
    every statement is atomic in SQLite, each process opens its own connection (also after a fork), and a token
    refresh takes a per-session lease row (:meth:`locked`) so that two processes never spend one rotating refresh
    token twice. Sessions older than ``max_age_s`` are gone (a stolen session id stops working after a shift),
    and expired rows are swept at most once a minute by whichever process writes.
    """

    def __init__(
        self,
        path: str | Path = ":memory:",
        *,
        keyring: Keyring | None = None,
        max_age_s: float = DEFAULT_SESSION_LIFETIME_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = str(path)
        self.max_age_s = max_age_s
        self.keyring = keyring or Keyring.ephemeral()
        self._clock = clock
        self._lock = threading.Lock()
        self._session_locks: dict[str, threading.Lock] = {}
        self._holder = f"{os.getpid()}:{secrets.token_hex(8)}"
        self._pid = os.getpid()
        self._next_sweep = 0.0
        self._connection = self._open()
        with self._lock:
            self._forget_plain_text_sessions()

    def _open(self) -> sqlite3.Connection:
        connection = connect_private_sqlite(self.path)
        connection.execute("PRAGMA secure_delete=ON")
        connection.executescript(_SCHEMA)
        return connection

    def _db(self) -> sqlite3.Connection:
        """This process's connection (a connection must not cross a fork: a forked worker opens its own)."""
        if self._pid != os.getpid():
            self._connection = self._open()
            self._pid = os.getpid()
            self._holder = f"{os.getpid()}:{secrets.token_hex(8)}"
            self._session_locks = {}
        return self._connection

    def _forget_plain_text_sessions(self) -> None:
        """Earlier releases kept states, tokens included, in plain text (table ``smart_sessions``): drop them and
        rewrite the file so no page of it still holds them (those clinicians launch the app again)."""
        db = self._db()
        found = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'smart_sessions'").fetchone()
        if found:
            db.execute("DROP TABLE smart_sessions")
            db.execute("VACUUM")
            if self.path != ":memory:":
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    def key(self, session_id: str) -> SessionKey:
        """The key of the session whose id (the cookie's value) is ``session_id``."""
        return SessionKey.of(session_id)

    def _seal(self, key: str, state: AuthorizationState) -> str:
        return self.keyring.seal(state.to_json().encode("utf-8"), context=_SEALED_CONTEXT + key)

    def create(self, state: AuthorizationState) -> str:
        """Store ``state`` under a new random id and return the id (the only thing the cookie will hold)."""
        session_id = secrets.token_urlsafe(32)
        key = SessionKey.of(session_id)
        now = self._clock()
        sealed = self._seal(key, state)
        with self._lock:
            self._sweep(now)
            self._db().execute(
                "INSERT INTO smart_sessions_sealed (key, job_ref, sealed, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (key, state.job_ref, sealed, now, now),
            )
        return session_id

    def _sweep(self, now: float) -> None:
        """Remove expired sessions and abandoned leases (caller holds ``_lock``); at most once a minute."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_INTERVAL_S
        db = self._db()
        db.execute("DELETE FROM smart_sessions_sealed WHERE created_at < ?", (now - self.max_age_s,))
        db.execute("DELETE FROM smart_session_leases WHERE until < ?", (now,))

    def sweep(self) -> None:
        """Remove expired sessions now (``create`` also does, at most once a minute)."""
        with self._lock:
            self._next_sweep = 0.0
            self._sweep(self._clock())

    def count(self) -> int:
        """How many sessions the file holds (expired ones not yet swept included)."""
        with self._lock:
            row = self._db().execute("SELECT COUNT(*) FROM smart_sessions_sealed").fetchone()
        return int(row[0])

    def get(self, session_id: str | None) -> AuthorizationState | None:
        if not session_id:
            return None
        key = SessionKey.of(session_id)
        with self._lock:
            row = (
                self._db()
                .execute("SELECT sealed, created_at FROM smart_sessions_sealed WHERE key = ?", (key,))
                .fetchone()
            )
        if row is None:
            return None
        if self._clock() - float(row[1]) > self.max_age_s:
            self.delete(session_id)
            return None
        try:
            plain = self.keyring.open(row[0], context=_SEALED_CONTEXT + key)
        except SealedValueError:
            # Not deleted: a process given the wrong key must not end the sessions of those that have the right one;
            # an unreadable session expires and is swept like any other.
            log.warning("A session could not be unsealed (another key, or the file was altered); treated as ended")
            return None
        state = AuthorizationState.from_json(plain.decode("utf-8"))
        if not self.keyring.sealed_with_current(row[0]):
            # Re-sealed with the current key, so the previous key can be retired; only if nobody wrote the row
            # meanwhile (a refresh in another process must never be undone by this).
            with self._lock:
                self._db().execute(
                    "UPDATE smart_sessions_sealed SET sealed = ? WHERE key = ? AND sealed = ?",
                    (self._seal(key, state), key, row[0]),
                )
        return state

    def put(self, session_id: str, state: AuthorizationState) -> None:
        key = SessionKey.of(session_id)
        sealed = self._seal(key, state)
        with self._lock:
            self._db().execute(
                "UPDATE smart_sessions_sealed SET sealed = ?, job_ref = ?, updated_at = ? WHERE key = ?",
                (sealed, state.job_ref, self._clock(), key),
            )

    def delete(self, session_id: str) -> None:
        key = SessionKey.of(session_id)
        with self._lock:
            self._db().execute("DELETE FROM smart_sessions_sealed WHERE key = ?", (key,))
            self._session_locks.pop(key, None)

    def session_for_job_ref(self, job_ref: str) -> SessionKey | None:
        """The key of the session that submitted jobs under ``job_ref`` (jobs carry the ref, never the session)."""
        with self._lock:
            row = self._db().execute("SELECT key FROM smart_sessions_sealed WHERE job_ref = ?", (job_ref,)).fetchone()
        return SessionKey(row[0]) if row else None

    @contextmanager
    def locked(self, session_id: str) -> Iterator[None]:
        """Hold the session's lock in this process and its lease across processes (token refresh,
        read-modify-write of its state). Waits up to 45 s for another holder, then :class:`SessionBusyError`."""
        key = SessionKey.of(session_id)
        with self._lock:
            lock = self._session_locks.setdefault(key, threading.Lock())
        with lock:
            self._take_lease(key)
            try:
                yield
            finally:
                with self._lock:
                    self._db().execute(
                        "DELETE FROM smart_session_leases WHERE key = ? AND holder = ?", (key, self._holder)
                    )

    def _take_lease(self, key: str) -> None:
        deadline = time.monotonic() + REFRESH_WAIT_S
        while True:
            now = self._clock()
            with self._lock:
                taken = (
                    self._db()
                    .execute(
                        "INSERT INTO smart_session_leases (key, holder, until) VALUES (?, ?, ?) "
                        "ON CONFLICT (key) DO UPDATE SET holder = excluded.holder, until = excluded.until "
                        "WHERE smart_session_leases.until < ?",
                        (key, self._holder, now + REFRESH_LEASE_S, now),
                    )
                    .rowcount
                )
            if taken:
                return
            if time.monotonic() > deadline:
                raise SessionBusyError(
                    "Another request of this launch has been renewing its access to the EHR for too long.",
                    remedy="Try again in a minute; if it keeps happening, launch the app again from the EHR.",
                )
            time.sleep(0.05)


@dataclass
class PendingLaunch:
    """A launch waiting at the EHR's authorization screen, kept sealed in the browser, not on the server.

    Until the EHR sends the browser back with a code, the app has nothing to store: the ``state`` to check and
    the PKCE verifier to send travel in a sealed, short-lived cookie (:meth:`seal`), so an unauthenticated
    ``GET /launch`` writes nothing and a flood of them fills no table.
    """

    fhir_base: str
    client_id: str
    oauth_state: str = field(repr=False)
    code_verifier: str = field(repr=False)
    requested_scope: str
    standalone: bool
    created_at: float = field(default_factory=time.time)

    def seal(self, keyring: Keyring) -> str:
        return keyring.seal(json.dumps(asdict(self)).encode("utf-8"), context=_PENDING_CONTEXT)

    @classmethod
    def open(cls, sealed: str | None, keyring: Keyring, *, now: float | None = None) -> PendingLaunch | None:
        """The pending launch in a cookie, or ``None`` when there is none, it is not genuine, or it expired."""
        if not sealed:
            return None
        try:
            data = json.loads(keyring.open(sealed, context=_PENDING_CONTEXT))
            pending = cls(**{k: data[k] for k in cls.__dataclass_fields__})
        except (SealedValueError, ValueError, KeyError, TypeError):
            return None
        current = time.time() if now is None else now
        if not 0 <= current - pending.created_at <= SESSION_LIFETIME_WHILE_AUTHORIZING_S:
            return None
        return pending


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
        state = self._store.get(self._session_id)
        if state is not None and state.authorized and not state.refresh_due(self._clock()):
            assert state.access_token is not None
            return f"Bearer {state.access_token}"  # the common case: no lease taken, nothing written
        with self._store.locked(self._session_id):
            state = self._store.get(self._session_id)  # again: another holder may have refreshed it meanwhile
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

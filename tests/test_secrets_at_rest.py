"""Secrets at rest and shared state: sealed sessions, key rotation, private state files, a replay cache that survives.

A security review copies the state folder and looks for tokens; restarts the service and replays a captured CDS
JWT; runs two processes against one session store. Each test below is one of those checks, on real files, real
processes and real servers (Redis, ``imaging-cds serve``).
"""

from __future__ import annotations

import base64
import multiprocessing
import os
import sqlite3
import stat
import time
from pathlib import Path

import pytest
import requests
from joserfc import jwk

from cds.feedback import FeedbackStore
from cds.replay import RedisReplayCache, SqliteReplayCache
from cds.services import PATIENT_VIEW
from core.errors import ConfigurationError
from core.sealing import Keyring, KeySource, SealedValueError
from devtools.servers import free_port, redis_server
from pipeline.audit import AuditOutbox
from pipeline.jobs import SqliteJobStore
from smart_launch.reviews import ReviewLog
from smart_launch.session import AuthorizationState, SessionStore
from tests.serve_support import base_settings, cds_jwt, serving

ACCESS_TOKEN = "eyJ-access-token-of-dr-who-0123456789"
REFRESH_TOKEN = "refresh-token-of-dr-who-9876543210"


def _authorised_state() -> AuthorizationState:
    state = AuthorizationState(smart={"fhir_base": "https://ehr/fhir"}, client_id="app", phase="authorized")
    state.access_token, state.refresh_token, state.patient = ACCESS_TOKEN, REFRESH_TOKEN, "patient-123"
    state.expires_at = time.time() + 3600
    return state


def _all_bytes(folder: Path) -> bytes:
    return b"".join(f.read_bytes() for f in folder.rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------- sealing


def test_a_sealed_value_opens_only_with_its_key_and_where_it_was_stored() -> None:
    keys = Keyring.ephemeral()
    sealed = keys.seal(b"token", context="row-a")
    assert keys.open(sealed, context="row-a") == b"token"
    with pytest.raises(SealedValueError, match="integrity check"):
        keys.open(sealed, context="row-b")  # copied into another row
    tampered = sealed[:-4] + ("A" if sealed[-4] != "A" else "B") + sealed[-3:]
    with pytest.raises(SealedValueError, match="integrity check"):
        keys.open(tampered, context="row-a")
    with pytest.raises(SealedValueError, match="no longer has"):
        Keyring.ephemeral().open(sealed, context="row-a")  # another deployment's key


def test_a_key_file_other_accounts_can_read_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "state.key"
    key_file.write_text(base64.b64encode(os.urandom(32)).decode())
    key_file.chmod(0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        KeySource(file=key_file).read()
    key_file.chmod(0o600)
    assert len(KeySource(file=key_file).read()) == 32
    monkeypatch.setenv("STATE_KEY_TEST", base64.urlsafe_b64encode(os.urandom(32)).decode())
    assert len(KeySource(env="STATE_KEY_TEST").read()) == 32
    monkeypatch.setenv("STATE_KEY_TEST", base64.b64encode(b"too short").decode())
    with pytest.raises(ConfigurationError, match="256-bit key"):
        KeySource(env="STATE_KEY_TEST").read()


# ---------------------------------------------------------------------------------------------- the session store


def test_the_session_file_holds_neither_tokens_nor_session_ids(tmp_path: Path) -> None:
    store = SessionStore(tmp_path / "sessions.sqlite", keyring=Keyring.ephemeral())
    session_id = store.create(_authorised_state())
    state = store.get(session_id)
    assert state is not None and state.access_token == ACCESS_TOKEN
    state.access_token = ACCESS_TOKEN + "-refreshed"
    store.put(session_id, state)
    content = _all_bytes(tmp_path)
    for secret in (ACCESS_TOKEN, REFRESH_TOKEN, session_id, "patient-123"):
        assert secret.encode() not in content
    store.delete(session_id)
    assert store.get(session_id) is None and store.count() == 0


def test_a_cookie_holding_a_key_from_the_file_opens_no_session(tmp_path: Path) -> None:
    store = SessionStore(tmp_path / "sessions.sqlite", keyring=Keyring.ephemeral())
    store.create(_authorised_state())
    (row_key,) = (
        sqlite3.connect(tmp_path / "sessions.sqlite").execute("SELECT key FROM smart_sessions_sealed").fetchone()
    )
    assert store.get(row_key) is None  # a plain string is always taken for a session id and hashed


def test_key_rotation_keeps_sessions_and_reseals_them_with_the_new_key(tmp_path: Path) -> None:
    old, new = os.urandom(32), os.urandom(32)
    path = tmp_path / "sessions.sqlite"
    session_id = SessionStore(path, keyring=Keyring(old)).create(_authorised_state())
    rotated = SessionStore(path, keyring=Keyring(new, previous=[old]))  # new key current, old still opens
    state = rotated.get(session_id)
    assert state is not None and state.access_token == ACCESS_TOKEN  # nobody was logged out by the rotation
    retired = SessionStore(path, keyring=Keyring(new))  # the old key dropped once everything was re-sealed
    assert retired.get(session_id) is not None


def test_without_the_key_a_stolen_file_opens_nothing(tmp_path: Path) -> None:
    path = tmp_path / "sessions.sqlite"
    session_id = SessionStore(path, keyring=Keyring(os.urandom(32))).create(_authorised_state())
    assert SessionStore(path, keyring=Keyring(os.urandom(32))).get(session_id) is None


def test_plain_text_sessions_left_by_an_earlier_release_are_wiped_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "smart-sessions.sqlite"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE smart_sessions (id TEXT PRIMARY KEY, job_ref TEXT, data TEXT, created_at REAL, updated_at REAL)"
    )
    old.execute("INSERT INTO smart_sessions VALUES ('sid', 'ref', ?, 0, 0)", (f'{{"access_token": "{ACCESS_TOKEN}"}}',))
    old.commit()
    old.close()
    assert ACCESS_TOKEN.encode() in path.read_bytes()
    SessionStore(path, keyring=Keyring.ephemeral()).close()
    assert ACCESS_TOKEN.encode() not in _all_bytes(tmp_path)


def test_expired_sessions_are_swept_without_being_read(tmp_path: Path) -> None:
    now = [1000.0]
    store = SessionStore(tmp_path / "s.sqlite", max_age_s=60, clock=lambda: now[0])
    for _ in range(5):
        store.create(_authorised_state())
    now[0] += 61
    store.create(_authorised_state())  # a write sweeps what has expired (at most once a minute)
    assert store.count() == 1


def _hold_lease(path: str, key: bytes, log: str, rounds: int) -> None:
    store = SessionStore(path, keyring=Keyring(key))
    for _ in range(rounds):
        with store.locked("shared-session"):
            with open(log, "a") as out:
                out.write(f"start {os.getpid()} {time.monotonic()}\n")
            time.sleep(0.02)
            with open(log, "a") as out:
                out.write(f"end {os.getpid()} {time.monotonic()}\n")


def test_two_processes_never_hold_one_sessions_refresh_lease_at_once(tmp_path: Path) -> None:
    """A token refresh spends a rotating refresh token: two processes must never do it at the same time."""
    key, log = os.urandom(32), tmp_path / "lease.log"
    SessionStore(tmp_path / "s.sqlite", keyring=Keyring(key)).close()
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_hold_lease, args=(str(tmp_path / "s.sqlite"), key, str(log), 5)) for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    lines = [line.split() for line in log.read_text().splitlines()]
    assert len(lines) == 20 and {pid for _, pid, _ in lines} == {str(w.pid) for w in workers}
    for first, second in zip(lines[::2], lines[1::2], strict=True):  # each start is followed by its own end
        assert (first[0], second[0], first[1]) == ("start", "end", second[1])


# ---------------------------------------------------------------------------------------------- file modes


def test_every_state_file_is_private_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o022)  # the usual default: files 0644, folders 0755
    try:
        data = tmp_path / "data"
        stores = [
            SessionStore(data / "smart-sessions.sqlite"),
            SqliteJobStore(data / "smart-jobs.sqlite"),
            ReviewLog(data / "reviews.sqlite"),
            AuditOutbox(data / "audit-outbox.sqlite"),
            SqliteReplayCache(data / "cds-replay.sqlite"),
        ]
        feedback = FeedbackStore(data / "cds-feedback.sqlite")
        feedback.record_issued("s", [{"uuid": "u1", "indicator": "info", "source": {"label": "imaging-cds x"}}])
        stores[0].create(_authorised_state())
        stores[4].first_use("jti", time.time() + 60)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    files = sorted(f for f in data.iterdir())
    assert any(f.name.endswith("-wal") for f in files)  # SQLite's companions are covered too
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {f.name: "0o600" for f in files}


# ---------------------------------------------------------------------------------------------- JWT replay


@pytest.fixture(scope="module")
def ehr_key() -> jwk.ECKey:
    return jwk.ECKey.generate_key("P-384", parameters={"kid": "ehr-1"})


def _hook(base: str, token: str) -> int:
    body = {
        "hook": "patient-view",
        "hookInstance": "h",
        "context": {"patientId": "p1"},
        "prefetch": {"aiReports": None, "imagingStudies": None},
    }
    path = f"/cds-services/{PATIENT_VIEW}"
    return requests.post(
        f"{base}{path}", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ).status_code


def test_a_captured_cds_jwt_replayed_after_serve_restarts_is_refused(tmp_path: Path, ehr_key: jwk.ECKey) -> None:
    port = free_port()
    settings = base_settings(
        tmp_path, port, ehr_key, audit={"fhir_base": f"http://127.0.0.1:{free_port()}/fhir", "auth": "none"}
    )
    token = cds_jwt(ehr_key, f"http://127.0.0.1:{port}/cds-services/{PATIENT_VIEW}")
    with serving(settings, tmp_path, port, name="before"):
        assert _hook(f"http://127.0.0.1:{port}", token) == 200
        assert _hook(f"http://127.0.0.1:{port}", token) == 401  # replayed while it runs
    with serving(settings, tmp_path, port, name="after"):
        assert _hook(f"http://127.0.0.1:{port}", token) == 401  # and after a restart, within the token's lifetime
        assert (
            _hook(f"http://127.0.0.1:{port}", cds_jwt(ehr_key, f"http://127.0.0.1:{port}/cds-services/{PATIENT_VIEW}"))
            == 200
        )


def test_workers_sharing_redis_refuse_a_jti_any_of_them_has_seen() -> None:
    with redis_server() as redis:
        first, second = RedisReplayCache(redis.url), RedisReplayCache(redis.url)
        expires = time.time() + 120
        assert first.first_use("https://ehr\x00jti-1", expires)
        assert not second.first_use("https://ehr\x00jti-1", expires)  # another worker, another connection
        assert second.first_use("https://ehr\x00jti-2", expires)
        assert first.first_use("https://ehr\x00jti-3", time.time() + 0.2)
        time.sleep(0.4)
        assert second.first_use("https://ehr\x00jti-3", time.time() + 60)  # forgotten once the token expired


def test_the_sqlite_replay_cache_is_shared_by_two_connections_and_forgets_expired_ids(tmp_path: Path) -> None:
    now = [1000.0]
    first = SqliteReplayCache(tmp_path / "replay.sqlite", clock=lambda: now[0])
    second = SqliteReplayCache(tmp_path / "replay.sqlite", clock=lambda: now[0])
    assert first.first_use("iss\x00a", 1300.0)
    assert not second.first_use("iss\x00a", 1300.0)
    now[0] = 1301.0
    assert second.first_use("iss\x00a", 1600.0)  # expired: the id may be seen again (the JWT itself is refused)

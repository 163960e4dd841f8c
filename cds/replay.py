"""Replay caches for CDS client JWT ids that survive a restart and are shared by every process of a deployment.

A CDS client's JWT is valid for up to five minutes; whoever captures one (a proxy log, a misrouted request) could
send it again. :class:`cds.security.JwtVerifier` refuses a ``jti`` it has seen, but a cache in one process's
memory forgets everything on restart and is not seen by the other workers. The caches here are what a deployment
uses instead (``cds_replay`` in the settings):

* :class:`SqliteReplayCache` (the default): one SQLite file in ``data_dir``, WAL mode, shared by the processes
  of one host; a ``jti`` recorded before a crash is still refused after it.
* :class:`RedisReplayCache`: ``SET key NX PXAT <exp>`` on a Redis server, for workers on several hosts.

Both record the hash of ``iss`` + ``jti`` (a fixed-size key whatever the token carries) until the token's
expiry plus the allowed clock skew; the check and the record are one atomic step, so two requests racing with
one token cannot both pass.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.errors import ConfigurationError
from core.statefiles import ThreadConnections

REPLAY_FILE = "cds-replay.sqlite"
PURGE_EVERY_S = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS seen_jti (
    key BLOB PRIMARY KEY,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
"""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class SqliteReplayCache:
    """JWT ids seen, until they expire, in one SQLite file; safe across threads and the processes of one host."""

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._connections = ThreadConnections(self.path)
        self._next_purge = 0.0
        self._db().executescript(_SCHEMA)

    def _db(self) -> sqlite3.Connection:
        return self._connections()

    def first_use(self, key: str, expires_at: float) -> bool:
        """Record ``key`` until ``expires_at``; False when it was already recorded and has not expired."""
        now = self._clock()
        db = self._db()
        if now >= self._next_purge:
            self._next_purge = now + PURGE_EVERY_S
            db.execute("DELETE FROM seen_jti WHERE expires_at <= ?", (now,))
        inserted = db.execute(
            "INSERT INTO seen_jti (key, expires_at) VALUES (?, ?) ON CONFLICT (key) DO UPDATE"
            " SET expires_at = excluded.expires_at WHERE seen_jti.expires_at <= ?",
            (_digest(key), expires_at, now),
        ).rowcount
        return inserted == 1

    def count(self) -> int:
        """JWT ids recorded and not yet purged (a method, not ``__len__``: an empty cache must stay truthy)."""
        return int(self._db().execute("SELECT COUNT(*) FROM seen_jti").fetchone()[0])


class RedisReplayCache:
    """JWT ids seen, until they expire, on a Redis server (``redis://host:port/db``), for several hosts."""

    def __init__(self, url: str, *, prefix: str = "imaging-cds:jti:", client: Any = None) -> None:
        if client is None:
            try:
                import redis
            except ImportError as exc:  # pragma: no cover - redis is a dependency
                raise ConfigurationError(
                    "The Redis replay cache needs the 'redis' package.", remedy="pip install redis"
                ) from exc
            client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._redis = client
        self._prefix = prefix

    def first_use(self, key: str, expires_at: float) -> bool:
        name = self._prefix + _digest(key).hex()
        return bool(self._redis.set(name, b"1", nx=True, pxat=max(1, int(expires_at * 1000))))


def replay_cache_for(setting: str | None, data_dir: Path) -> SqliteReplayCache | RedisReplayCache:
    """The deployment's replay cache: Redis for a ``redis://`` / ``rediss://`` URL, else SQLite in ``data_dir``."""
    if setting and setting.startswith(("redis://", "rediss://", "unix://")):
        return RedisReplayCache(setting)
    if setting not in (None, "", "sqlite"):
        raise ConfigurationError(
            f"cds_replay must be 'sqlite' or a redis:// URL, not {setting!r}.",
            remedy="Leave it out (SQLite in data_dir), or name the Redis server all workers share.",
        )
    return SqliteReplayCache(data_dir / REPLAY_FILE)

"""Analysis jobs: an id, a state, progress, and a durable record, run by a small pool of worker threads.

An analysis takes seconds to minutes (fetch a study over DICOMweb, run a model, write one FHIR transaction),
far longer than a CDS Hooks request may wait. So a front door *submits* a job and answers at once; the
clinician app and the service poll the job's record until it is ``done`` or ``failed``.

Three small pieces keep the engine replaceable:

- :class:`JobRecord` is what anyone may see about a job. It is plain JSON: ``params`` names resources by
  reference (``{"imaging_study": "ImagingStudy/123", "analyzer": "ct-emphysema", "fhir_base": ...}``), never
  PHI and never a token; ``error`` is the message and remedy of an :class:`ImagingCdsError`, or a generic
  message for anything else, never a traceback.
- :class:`JobStore` keeps records. :class:`SqliteJobStore` is the durable default (one file, WAL mode).
- :class:`JobRunner` runs handlers. :class:`EmbeddedJobRunner` runs them on threads inside the web process,
  which is all a single-node deployment needs. The distributed engine (:mod:`pipeline.celery_engine`, Celery
  with a Redis broker) implements the same four methods: its ``submit`` writes the record and publishes the id,
  its workers call the same handlers with a :class:`ProgressReporter` bound to the shared store. What it needs
  beyond :class:`JobStore` (a lease per attempt, attempts counted, publication tracked) is
  :class:`LeasedJobStore`, which :class:`SqliteJobStore` also implements.

Handlers are ``handler(params, report) -> result``: they receive the job's params, call
``report(progress, step)`` as they go, and return a JSON-serialisable summary (report id, written
resources). Credentials a handler needs (a SMART access token) reach it through the handler's closure or a
server-side session looked up by a reference in ``params`` - never through ``params`` itself, which is
stored in plain text and shown to whoever polls the job.

Crash recovery (decided here, one place): when an :class:`EmbeddedJobRunner` starts it marks every job left
``running`` as ``failed`` with a ``JobInterrupted`` error, because its handler may already have written to
the EHR and running it again could file a second report; the remedy asks to resubmit if no report appeared.
Jobs left ``queued`` never started, so nothing was written: the new runner runs them. This assumes one
embedded runner per database file; several processes sharing a store need a distributed runner.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

from core.errors import ConfigurationError, ImagingCdsError
from core.options import look_up_option
from core.statefiles import connect_private_sqlite, fork_guarded_lock

logger = logging.getLogger(__name__)

current_job_id: ContextVar[str | None] = ContextVar("imaging_cds_job_id", default=None)
"""The id of the job the current thread is running (for log records; see :func:`running_job`)."""

JsonObject = dict[str, Any]

_MAX_STEP_CHARS = 200
_CROSS_PROCESS_POLL_S = 0.5
_SECRET_KEY_WORDS = ("token", "password", "secret", "authorization", "cookie", "credential")


class JobState(StrEnum):
    """Where a job is in its life: queued -> running -> done | failed."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        """True once the job will not change again."""
        return self in (JobState.DONE, JobState.FAILED)


class UnknownJobError(ImagingCdsError):
    """A job id that this service never issued (or whose record was removed)."""

    http_status = 404


@dataclass(frozen=True)
class JobRecord:
    """Everything the service tells anyone about one job; safe to return to a poller as is (see :meth:`to_json`)."""

    id: str
    kind: str
    params: JsonObject
    state: JobState
    progress: float
    step: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    result: JsonObject | None
    error: JsonObject | None
    dedupe_key: str | None
    attempts: int = 0
    """How many times a worker started the job (a distributed engine runs a job again after a worker is lost)."""
    worker: str | None = None
    """Which worker process holds (or last held) the job: ``host:pid:attempt-token``; no patient data."""

    def to_json(self) -> JsonObject:
        """The record as a JSON object (timestamps in ISO 8601 UTC), for a status endpoint."""
        return {
            "id": self.id,
            "kind": self.kind,
            "params": self.params,
            "state": self.state.value,
            "progress": self.progress,
            "step": self.step,
            "created_at": self.created_at.isoformat(),
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "result": self.result,
            "error": self.error,
            "dedupe_key": self.dedupe_key,
            "attempts": self.attempts,
            "worker": self.worker,
        }


def error_summary(exc: ImagingCdsError) -> JsonObject:
    """The part of a project error a job record keeps: its class, message and remedy (no PHI by contract)."""
    return {"type": type(exc).__name__, "message": exc.message, "remedy": exc.remedy}


def internal_error_summary(job_id: str) -> JsonObject:
    """What a job record says about an unexpected exception: only where to look, since its text may hold PHI."""
    return {
        "type": "InternalError",
        "message": f"Internal error while running job {job_id}; see the server log for job {job_id}.",
        "remedy": "Report the job id to the service's administrator; resubmitting may not help.",
    }


def interrupted_error_summary() -> JsonObject:
    """What a job record says when the service stopped while the job was running."""
    return {
        "type": "JobInterrupted",
        "message": "The service stopped while this job was running, so the job did not finish.",
        "remedy": "Check the EHR for a report from this analysis; if there is none, submit the analysis again.",
    }


def worker_lost_error_summary(attempts: int) -> JsonObject:
    """What a job record says when every attempt ended with its worker process gone (killed, out of memory)."""
    return {
        "type": "WorkerLost",
        "message": f"The analysis was started {attempts} times and each time its worker process stopped before it "
        "finished (killed, out of memory, or its machine stopped); it is not tried again.",
        "remedy": "Check the worker logs and its memory ceiling for this study; a report appears in the EHR only if "
        "an attempt finished writing it. Submit the analysis again once the cause is fixed.",
    }


@contextmanager
def running_job(job_id: str) -> Iterator[None]:
    """Mark the current thread as running ``job_id`` (log records then carry the job id)."""
    token = current_job_id.set(job_id)
    try:
        yield
    finally:
        current_job_id.reset(token)


def check_params(params: Mapping[str, Any]) -> JsonObject:
    """Return ``params`` as a plain JSON object, refusing values that cannot be stored or keys that hold secrets.

    Params are stored in plain text and shown to pollers, so a key that names a credential is a bug in the
    caller, caught here before it reaches the database.
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"Job params must be a mapping, not {type(params).__name__}.")
    _refuse_secret_keys(params, path="params")
    try:
        plain: JsonObject = json.loads(json.dumps(dict(params), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"Job params are not JSON-serialisable ({type(exc).__name__}).",
            remedy="Pass references and plain values (str, int, float, bool, list, dict) only.",
        ) from exc
    return plain


def _refuse_secret_keys(value: Any, *, path: str) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            if any(word in str(key).lower() for word in _SECRET_KEY_WORDS):
                raise ConfigurationError(
                    f"Job params key {path}.{key} looks like a credential; job params are stored in plain text.",
                    remedy="Give the handler credentials through its closure or a server-side session, not params.",
                )
            _refuse_secret_keys(item, path=f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _refuse_secret_keys(item, path=f"{path}[{index}]")


class JobStore(Protocol):
    """Durable job records. Every transition is conditional on the current state, so a late or repeated call
    (a worker finishing a job that recovery already failed) changes nothing and returns False.
    """

    def create(self, kind: str, params: JsonObject, *, dedupe_key: str | None = None) -> tuple[JobRecord, bool]:
        """Add a queued job, or return the queued/running job with the same ``dedupe_key``; the bool says
        whether a new job was created. Check and insert are one transaction."""
        ...

    def get(self, job_id: str) -> JobRecord | None: ...

    def list(
        self, *, kind: str | None = None, state: JobState | None = None, limit: int | None = 100
    ) -> tuple[JobRecord, ...]:
        """Newest first."""
        ...

    def update_progress(self, job_id: str, progress: float, step: str) -> bool: ...

    def mark_running(self, job_id: str) -> bool: ...

    def mark_done(self, job_id: str, result: JsonObject) -> bool: ...

    def mark_failed(self, job_id: str, error: JsonObject) -> bool: ...

    def fail_interrupted(self) -> tuple[str, ...]:
        """Mark every ``running`` job failed with a ``JobInterrupted`` error; return their ids."""
        ...

    def close(self) -> None: ...


def stored_job(store: JobStore, job_id: str) -> JobRecord:
    """The job's record in ``store``; :class:`UnknownJobError` (404) for an id never issued."""
    record = store.get(job_id)
    if record is None:
        raise UnknownJobError(f"No job with id {job_id!r}.", remedy="Use the id that submitting the job returned.")
    return record


class ClaimOutcome(StrEnum):
    """What a worker found when it tried to take a job (see :meth:`LeasedJobStore.claim`)."""

    CLAIMED = "claimed"  # the job is this worker's to run now
    HELD = "held"  # another worker holds a live lease on it: leave it to that worker
    FINISHED = "finished"  # done or failed already: a repeated delivery, nothing to do
    MISSING = "missing"  # no such job in the store
    GAVE_UP = "gave-up"  # every attempt allowed was started and lost: the job is now failed


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    record: JobRecord | None


class LeasedJobStore(JobStore, Protocol):
    """What a distributed engine needs besides :class:`JobStore`: leases, attempts and publication.

    A worker *claims* a job before running it: the claim moves a queued job (or a running one whose lease has
    lapsed: its worker died) to running under the worker's name, counts the attempt, and starts a lease that the
    worker renews (:meth:`heartbeat`) while it runs. A live lease keeps any other worker off the job, so a
    message delivered twice never runs an analysis twice at once; a lapsed lease lets the job be taken over.
    """

    def claim(self, job_id: str, worker: str, *, lease_s: float, max_attempts: int) -> Claim:
        """Take the job for ``worker`` in one transaction (see :class:`ClaimOutcome`)."""
        ...

    def heartbeat(self, job_id: str, worker: str) -> bool:
        """Renew ``worker``'s lease; False when the job is no longer running under that worker."""
        ...

    def requeue(self, job_id: str, worker: str, step: str, *, publish_at: datetime) -> bool:
        """Put a running job back in the queue for a later attempt (a transient failure), to be published at
        ``publish_at``; the attempts made so far are kept."""
        ...

    def mark_published(self, job_id: str, at: datetime | None = None) -> None:
        """Record that a message for the job was handed to the broker (due at ``at``, default now)."""
        ...

    def due_for_publishing(
        self, *, lease_s: float, requeue_after_s: float, queue_empty: bool, limit: int = 100
    ) -> tuple[str, ...]:
        """Jobs whose message the broker may have lost, stamped as published now (so that several sweepers
        publish each at most once per interval): queued jobs never published; queued jobs published more than
        ``requeue_after_s`` ago while the broker's queue is empty; running jobs whose lease has lapsed, at once if
        nothing was published for them since their last attempt began, else every ``requeue_after_s``."""
        ...

    def counts(self) -> dict[JobState, int]:
        """How many jobs are in each state (for metrics)."""
        ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    params TEXT NOT NULL,
    state TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0,
    step TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    result TEXT,
    error TEXT,
    dedupe_key TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_active_dedupe ON jobs (dedupe_key)
    WHERE dedupe_key IS NOT NULL AND state IN ('queued', 'running');
"""

_MIGRATIONS = (
    # (column, definition): columns added after the first release, added to an older file when it is opened.
    ("attempts", "INTEGER NOT NULL DEFAULT 0"),
    ("worker", "TEXT"),
    ("heartbeat_at", "TEXT"),
    ("published_at", "TEXT"),
)

_COLUMNS = (
    "id, kind, params, state, progress, step, created_at, started_at, finished_at, result, error, dedupe_key, "
    "attempts, worker"
)
_UNPUBLISHED_GRACE_S = 5.0
"""A job never published is picked up by a sweeper this long after it was created: its submitter publishes it
right after creating it, unless the broker was unreachable."""


def _now() -> datetime:
    return datetime.now(UTC)


def _timestamp(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _record_from_row(row: tuple[Any, ...]) -> JobRecord:
    job_id, kind, params, state, progress, step, created, started, finished, result, error, dedupe_key = row[:12]
    attempts, worker = row[12:14]
    created_at = _timestamp(created)
    assert created_at is not None  # NOT NULL column
    return JobRecord(
        id=job_id,
        kind=kind,
        params=json.loads(params),
        state=JobState(state),
        progress=float(progress),
        step=step,
        created_at=created_at,
        started_at=_timestamp(started),
        finished_at=_timestamp(finished),
        result=json.loads(result) if result is not None else None,
        error=json.loads(error) if error is not None else None,
        dedupe_key=dedupe_key,
        attempts=int(attempts),
        worker=worker,
    )


class SqliteJobStore:
    """Job records in one SQLite file (WAL mode, so pollers in other processes read while a worker writes).

    One connection per store, guarded by a lock, serves every thread; write transactions are ``BEGIN
    IMMEDIATE`` so the dedupe check-and-insert and a worker's claim are atomic across processes too. Every
    process of a deployment (the web process, each Celery worker) may open the same file: it is the
    :class:`LeasedJobStore` of :mod:`pipeline.celery_engine`. The schema is created if missing, and columns added
    since (``_MIGRATIONS``) are added to an older file. A connection must not cross ``fork``: a process opens
    its own store.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = fork_guarded_lock()  # a worker's main process forks pool children while its sweeper writes
        self._connection = connect_private_sqlite(self.path)  # 0600, WAL
        with self._transaction() as db:  # several processes may open a new file at once
            for statement in filter(str.strip, _SCHEMA.split(";")):
                db.execute(statement)
            present = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
            for column, definition in _MIGRATIONS:
                if column not in present:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {definition}")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    def _write(self, sql: str, args: tuple[Any, ...]) -> bool:
        with self._lock:
            return self._connection.execute(sql, args).rowcount > 0

    def create(self, kind: str, params: JsonObject, *, dedupe_key: str | None = None) -> tuple[JobRecord, bool]:
        params_text = json.dumps(params, allow_nan=False, sort_keys=True)
        with self._lock:
            db = self._connection
            db.execute("BEGIN IMMEDIATE")
            try:
                if dedupe_key is not None:
                    row = db.execute(
                        f"SELECT {_COLUMNS} FROM jobs WHERE dedupe_key = ? AND state IN (?, ?)",
                        (dedupe_key, JobState.QUEUED.value, JobState.RUNNING.value),
                    ).fetchone()
                    if row is not None:
                        db.execute("COMMIT")
                        return _record_from_row(row), False
                job_id = str(uuid.uuid4())
                db.execute(
                    "INSERT INTO jobs (id, kind, params, state, created_at, dedupe_key) VALUES (?, ?, ?, ?, ?, ?)",
                    (job_id, kind, params_text, JobState.QUEUED.value, _now().isoformat(), dedupe_key),
                )
                row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return _record_from_row(row), True

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._connection.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _record_from_row(row) if row is not None else None

    def list(
        self, *, kind: str | None = None, state: JobState | None = None, limit: int | None = 100
    ) -> tuple[JobRecord, ...]:
        clauses: list[str] = []
        args: list[Any] = []
        if kind is not None:
            clauses.append("kind = ?")
            args.append(kind)
        if state is not None:
            clauses.append("state = ?")
            args.append(JobState(state).value)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        args.append(-1 if limit is None else limit)
        with self._lock:
            rows = self._connection.execute(
                f"SELECT {_COLUMNS} FROM jobs {where} ORDER BY rowid DESC LIMIT ?", tuple(args)
            ).fetchall()
        return tuple(_record_from_row(row) for row in rows)

    def update_progress(self, job_id: str, progress: float, step: str) -> bool:
        return self._write(
            "UPDATE jobs SET progress = ?, step = ? WHERE id = ? AND state = ?",
            (progress, step, job_id, JobState.RUNNING.value),
        )

    def mark_running(self, job_id: str) -> bool:
        return self._write(
            "UPDATE jobs SET state = ?, started_at = ?, attempts = attempts + 1 WHERE id = ? AND state = ?",
            (JobState.RUNNING.value, _now().isoformat(), job_id, JobState.QUEUED.value),
        )

    def mark_done(self, job_id: str, result: JsonObject) -> bool:
        return self._write(
            "UPDATE jobs SET state = ?, progress = 1.0, finished_at = ?, result = ? WHERE id = ? AND state = ?",
            (
                JobState.DONE.value,
                _now().isoformat(),
                json.dumps(result, allow_nan=False),
                job_id,
                JobState.RUNNING.value,
            ),
        )

    def mark_failed(self, job_id: str, error: JsonObject) -> bool:
        return self._write(
            "UPDATE jobs SET state = ?, finished_at = ?, error = ? WHERE id = ? AND state IN (?, ?)",
            (
                JobState.FAILED.value,
                _now().isoformat(),
                json.dumps(error),
                job_id,
                JobState.QUEUED.value,
                JobState.RUNNING.value,
            ),
        )

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: other processes wait for it (up to the connection timeout).

        An exception that arrives between two statements (Celery's soft time limit is raised by a signal handler)
        rolls back whatever was begun, so no transaction is left holding the file's write lock.
        """
        with self._lock:
            db = self._connection
            try:
                db.execute("BEGIN IMMEDIATE")
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def claim(self, job_id: str, worker: str, *, lease_s: float, max_attempts: int) -> Claim:
        now = _now()
        with self._transaction() as db:
            row = db.execute(f"SELECT {_COLUMNS}, heartbeat_at FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return Claim(ClaimOutcome.MISSING, None)
            record = _record_from_row(row)
            heartbeat = _timestamp(row[-1])
            if record.state.finished:
                return Claim(ClaimOutcome.FINISHED, record)
            lapsed = heartbeat is None or (now - heartbeat).total_seconds() > lease_s
            if record.state is JobState.RUNNING and not lapsed:
                return Claim(ClaimOutcome.HELD, record)
            if record.state is JobState.RUNNING and record.attempts >= max_attempts:
                db.execute(
                    "UPDATE jobs SET state = ?, finished_at = ?, error = ? WHERE id = ?",
                    (
                        JobState.FAILED.value,
                        now.isoformat(),
                        json.dumps(worker_lost_error_summary(record.attempts)),
                        job_id,
                    ),
                )
                return Claim(ClaimOutcome.GAVE_UP, self._get_locked(db, job_id))
            db.execute(
                "UPDATE jobs SET state = ?, attempts = attempts + 1, worker = ?, heartbeat_at = ?, progress = 0, "
                "step = '', started_at = COALESCE(started_at, ?) WHERE id = ?",
                (JobState.RUNNING.value, worker, now.isoformat(), now.isoformat(), job_id),
            )
            return Claim(ClaimOutcome.CLAIMED, self._get_locked(db, job_id))

    @staticmethod
    def _get_locked(db: sqlite3.Connection, job_id: str) -> JobRecord:
        return _record_from_row(db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def heartbeat(self, job_id: str, worker: str) -> bool:
        return self._write(
            "UPDATE jobs SET heartbeat_at = ? WHERE id = ? AND state = ? AND worker = ?",
            (_now().isoformat(), job_id, JobState.RUNNING.value, worker),
        )

    def requeue(self, job_id: str, worker: str, step: str, *, publish_at: datetime) -> bool:
        return self._write(
            "UPDATE jobs SET state = ?, progress = 0, step = ?, heartbeat_at = NULL, published_at = ? "
            "WHERE id = ? AND state = ? AND worker = ?",
            (
                JobState.QUEUED.value,
                step[:_MAX_STEP_CHARS],
                publish_at.isoformat(),
                job_id,
                JobState.RUNNING.value,
                worker,
            ),
        )

    def mark_published(self, job_id: str, at: datetime | None = None) -> None:
        self._write("UPDATE jobs SET published_at = ? WHERE id = ?", ((at or _now()).isoformat(), job_id))

    def due_for_publishing(
        self, *, lease_s: float, requeue_after_s: float, queue_empty: bool, limit: int = 100
    ) -> tuple[str, ...]:
        now = _now()
        unpublished_before = (now - timedelta(seconds=_UNPUBLISHED_GRACE_S)).isoformat()
        requeue_before = (now - timedelta(seconds=requeue_after_s)).isoformat()
        lapsed_before = (now - timedelta(seconds=lease_s)).isoformat()
        queued, running = JobState.QUEUED.value, JobState.RUNNING.value
        # ISO 8601 UTC timestamps of one format compare as text in time order.
        with self._transaction() as db:
            ids = tuple(
                row[0]
                for row in db.execute(
                    "SELECT id FROM jobs WHERE "
                    "(state = ? AND published_at IS NULL AND created_at < ?) "
                    "OR (state = ? AND ? AND published_at < ?) "
                    "OR (state = ? AND (heartbeat_at IS NULL OR heartbeat_at < ?) AND (published_at IS NULL "
                    "    OR published_at < heartbeat_at OR published_at < ?)) "
                    "ORDER BY rowid LIMIT ?",
                    (
                        queued,
                        unpublished_before,
                        queued,
                        int(queue_empty),
                        requeue_before,
                        running,
                        lapsed_before,
                        requeue_before,
                        limit,
                    ),
                )
            )
            db.executemany("UPDATE jobs SET published_at = ? WHERE id = ?", [(now.isoformat(), i) for i in ids])
        return ids

    def counts(self) -> dict[JobState, int]:
        with self._lock:
            rows = self._connection.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        found = {JobState(state): int(count) for state, count in rows}
        return {state: found.get(state, 0) for state in JobState}

    def fail_interrupted(self) -> tuple[str, ...]:
        with self._lock:
            db = self._connection
            db.execute("BEGIN IMMEDIATE")
            try:
                ids = tuple(
                    row[0] for row in db.execute("SELECT id FROM jobs WHERE state = ?", (JobState.RUNNING.value,))
                )
                db.execute(
                    "UPDATE jobs SET state = ?, finished_at = ?, error = ? WHERE state = ?",
                    (
                        JobState.FAILED.value,
                        _now().isoformat(),
                        json.dumps(interrupted_error_summary()),
                        JobState.RUNNING.value,
                    ),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return ids


class ProgressReporter:
    """The callable a handler uses to say how far it got: ``report(0.2, "fetching images 12/61")``.

    ``progress`` is clamped to 0..1; ``step`` is shown to clinicians and stored, so it must name counts and
    phases only, never patient details. Reports after the job finished are ignored.
    """

    def __init__(self, store: JobStore, job_id: str) -> None:
        self._store = store
        self.job_id = job_id

    def __call__(self, progress: float, step: str) -> None:
        if not math.isfinite(progress):
            raise ValueError(f"Job progress must be a finite number between 0 and 1, not {progress!r}.")
        self._store.update_progress(self.job_id, min(1.0, max(0.0, float(progress))), step[:_MAX_STEP_CHARS])


JobHandler = Callable[[JsonObject, ProgressReporter], Mapping[str, Any]]
"""Runs one kind of job: ``handler(params, report) -> result summary`` (JSON-serialisable)."""


def plain_result(result: Mapping[str, Any]) -> JsonObject:
    """A handler's result as the plain JSON object the store keeps (fails on NaN or unserialisable values)."""
    plain: JsonObject = json.loads(json.dumps(dict(result), allow_nan=False))
    return plain


def log_unexpected_failure(job_id: str, kind: str, exc: BaseException) -> None:
    """Log an unexpected handler exception by type and place only: its text and locals may hold PHI."""
    where = "".join(traceback.format_tb(exc.__traceback__))
    logger.error("Job %s (%s) failed with unexpected %s at\n%s", job_id, kind, type(exc).__name__, where)


class JobRunner(Protocol):
    """What front doors need from a job engine; the embedded thread pool and a future distributed engine both
    provide it. Records come from the shared :class:`JobStore`, so a poller in any process sees the same job.
    """

    def submit(self, kind: str, params: Mapping[str, Any], *, dedupe_key: str | None = None) -> JobRecord:
        """Queue a job and return its record at once. If a job with ``dedupe_key`` is queued or running, return
        that job instead (an EHR that fires order-sign twice must not start two analyses). An unknown ``kind``
        raises :class:`ConfigurationError` with a did-you-mean hint."""
        ...

    def get(self, job_id: str) -> JobRecord:
        """The job's current record; :class:`UnknownJobError` (404) for an id never issued."""
        ...

    def wait(self, job_id: str, timeout: float) -> JobRecord:
        """Block up to ``timeout`` seconds for the job to finish; return its record as it then stands (check
        ``record.state.finished``), so a front door can fall back to "analysis in progress"."""
        ...

    def shutdown(self, *, wait: bool = True) -> None:
        """Stop taking jobs. Jobs still queued stay queued in the store for the next runner to run."""
        ...


class EmbeddedJobRunner:
    """Runs jobs on a thread pool inside this process; the single-node :class:`JobRunner`.

    On start it applies the crash-recovery rule of this module: jobs left ``running`` fail as interrupted,
    jobs left ``queued`` are run. Only one embedded runner may use a store file at a time.
    """

    def __init__(self, store: JobStore, handlers: Mapping[str, JobHandler], *, max_workers: int = 2) -> None:
        if max_workers < 1:
            raise ConfigurationError(f"max_workers must be at least 1, not {max_workers}.")
        self._store = store
        self._handlers = dict(handlers)
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="imaging-cds-job")
        self._finished = threading.Condition()
        self._lock = threading.Lock()
        self._closed = False
        interrupted = store.fail_interrupted()
        if interrupted:
            logger.warning("Marked %d job(s) interrupted by a previous shutdown: %s", len(interrupted), interrupted)
        for record in reversed(store.list(state=JobState.QUEUED, limit=None)):
            self._schedule(record)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.shutdown()

    def _handler_for(self, kind: str) -> JobHandler:
        return look_up_option(
            kind,
            self._handlers,
            what="job kind",
            remedy=f"Job kinds this service runs: {', '.join(sorted(self._handlers)) or '(none)'}.",
        )

    def submit(self, kind: str, params: Mapping[str, Any], *, dedupe_key: str | None = None) -> JobRecord:
        self._handler_for(kind)
        plain = check_params(params)
        with self._lock:
            if self._closed:
                raise ConfigurationError("The job runner is shut down.", remedy="Submit jobs before shutdown().")
            record, created = self._store.create(kind, plain, dedupe_key=dedupe_key)
            if created:
                self._schedule(record)
        return record

    def get(self, job_id: str) -> JobRecord:
        return stored_job(self._store, job_id)

    def wait(self, job_id: str, timeout: float) -> JobRecord:
        deadline = time.monotonic() + timeout
        with self._finished:
            while True:
                record = self.get(job_id)
                remaining = deadline - time.monotonic()
                if record.state.finished or remaining <= 0:
                    return record
                # Woken by this runner's workers; the poll interval covers jobs finished by another process.
                self._finished.wait(min(remaining, _CROSS_PROCESS_POLL_S))

    def shutdown(self, *, wait: bool = True) -> None:
        with self._lock:
            self._closed = True
        self._executor.shutdown(wait=wait, cancel_futures=True)

    def _schedule(self, record: JobRecord) -> None:
        self._executor.submit(self._run, record.id, record.kind, record.params)

    def _run(self, job_id: str, kind: str, params: JsonObject) -> None:
        try:
            self._run_handler(job_id, kind, params)
        except Exception:
            # Only the store can fail here; params stay out of the log.
            logger.exception("Job %s (%s): could not record its outcome", job_id, kind)
        finally:
            with self._finished:
                self._finished.notify_all()

    def _run_handler(self, job_id: str, kind: str, params: JsonObject) -> None:
        try:
            handler = self._handler_for(kind)
        except ConfigurationError as exc:  # a resumed job whose kind this deployment no longer runs
            self._store.mark_failed(job_id, error_summary(exc))
            return
        if not self._store.mark_running(job_id):
            return  # failed or finished elsewhere meanwhile
        with running_job(job_id):
            try:
                summary = plain_result(handler(params, ProgressReporter(self._store, job_id)))
            except ImagingCdsError as exc:
                logger.info("Job %s (%s) failed: %s", job_id, kind, type(exc).__name__)
                self._store.mark_failed(job_id, error_summary(exc))
            except Exception as exc:
                log_unexpected_failure(job_id, kind, exc)
                self._store.mark_failed(job_id, internal_error_summary(job_id))
            else:
                self._store.mark_done(job_id, summary)

"""The audit outbox: AuditEvents are committed to a local SQLite file first and sent to the audit repository later.

A page, a hook or an analysis must not wait for (or fail with) the hospital's audit repository, and an access
must not go unrecorded because that repository was down or this process was killed. So recording an access is
one local commit (:meth:`AuditOutbox.record`, done before the data is shown or the answer sent), and an
:class:`AuditDrainer` thread sends what is committed to the repository (the EHR's FHIR server, or another the
deployment names) in batches, off the request path:

* an event stays in the outbox until the repository has answered 2xx for it; a process killed before that
  leaves it there for the next drainer (of any process sharing the file) to send;
* each event has its id from the start and is sent as ``PUT AuditEvent/<id>`` in a ``batch`` Bundle, so an
  event sent twice (the answer was lost, two drainers raced) is stored once;
* a repository that cannot be reached, or answers 5xx or 429, is retried with exponential backoff (2 s
  doubling to 5 min); one that refuses an event (another 4xx) keeps it in the outbox marked refused, with the
  reason, for the administrator: an audit record is never dropped silently;
* each event is checked against the FHIR R4 schema before it is sent
  (:func:`fhir_adapters.validation.validate_resource`, a fraction of a millisecond); one that fails is a bug in
  the builder and is kept as refused.

Several processes (``serve`` and job workers with one ``data_dir``) share one outbox file; drainers in each
claim batches with a lease, so no two send the same event at once, and a lease left by a killed drainer
lapses after a minute. Durability: WAL with ``synchronous=NORMAL`` (see :mod:`core.statefiles`) keeps what was
committed across a killed process, not across a power cut of the host.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from core.statefiles import ThreadConnections
from fhir_adapters.audit import Actor, AuditedFhirClient, AuditSource, AuditTrail
from fhir_adapters.client import FhirClient
from fhir_adapters.errors import FhirError
from fhir_adapters.fhirjson import element, items
from fhir_adapters.validation import ResourceValidationError, validate_resource

log = logging.getLogger(__name__)

OUTBOX_FILE = "audit-outbox.sqlite"
BATCH_SIZE = 100
LEASE_S = 60.0
MIN_RETRY_S = 2.0
MAX_RETRY_S = 300.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_outbox (
    seq INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL,
    event BLOB NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    claimed_by TEXT,
    claimed_until REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    refused INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS audit_outbox_due ON audit_outbox (next_attempt_at);
"""


class AuditOutbox:
    """AuditEvents waiting to be sent, in one SQLite file shared by threads and processes (an :class:`AuditSink`).

    :meth:`record` commits before it returns; it costs one small local write, never a network round trip. The
    table is kept lean for that write (rowid order, one index): an event recorded twice is sent twice, and
    stored once (``PUT`` to its id).
    """

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._connections = ThreadConnections(self.path)
        self._listeners: list[Callable[[], None]] = []
        # The drainer thread writes here while ``serve`` forks its worker: every use holds the fork guard.
        with self._connections.using() as db:
            db.executescript(_SCHEMA)

    def on_record(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after each record (a drainer in this process starts itself then)."""
        self._listeners.append(listener)

    def record(self, event: Mapping[str, Any]) -> None:
        """Commit ``event`` (an AuditEvent with its ``id``) to the outbox."""
        event_id = event.get("id")
        if not isinstance(event_id, str) or not event_id:
            raise ValueError("An AuditEvent is recorded with its id, so that sending it twice stores it once.")
        with self._connections.using() as db:
            db.execute(
                "INSERT INTO audit_outbox (event_id, event, created_at) VALUES (?, ?, ?)",
                (event_id, orjson.dumps(event), self._clock()),
            )
        for listener in self._listeners:
            listener()

    def pending(self) -> int:
        """Events not yet accepted by the repository (refused ones excluded)."""
        with self._connections.using() as db:
            row = db.execute("SELECT COUNT(*) FROM audit_outbox WHERE refused = 0").fetchone()
        return int(row[0])

    def refused(self) -> list[tuple[str, str]]:
        """``(event id, reason)`` of the events the repository refused (kept for the administrator)."""
        with self._connections.using() as db:
            rows = db.execute("SELECT event_id, last_error FROM audit_outbox WHERE refused = 1 ORDER BY seq").fetchall()
        return [(str(a), str(b)) for a, b in rows]

    def events(self) -> list[dict[str, Any]]:
        """Every event still held, oldest first (for inspection and tests)."""
        with self._connections.using() as db:
            rows = db.execute("SELECT event FROM audit_outbox ORDER BY seq").fetchall()
        return [orjson.loads(row[0]) for row in rows]

    def claim(
        self, holder: str, *, limit: int = BATCH_SIZE, lease_s: float = LEASE_S
    ) -> list[tuple[int, dict[str, Any]]]:
        """Lease up to ``limit`` due events to ``holder`` (``(seq, event)``, oldest first); another holder will not
        get them until the lease ends."""
        now = self._clock()
        with self._connections.using() as db:
            try:
                db.execute("BEGIN IMMEDIATE")
                db.execute(
                    "UPDATE audit_outbox SET claimed_by = ?, claimed_until = ? WHERE seq IN ("
                    " SELECT seq FROM audit_outbox WHERE refused = 0 AND next_attempt_at <= ? AND claimed_until <= ?"
                    " ORDER BY seq LIMIT ?)",
                    (holder, now + lease_s, now, now, limit),
                )
                rows = db.execute(
                    "SELECT seq, event FROM audit_outbox WHERE claimed_by = ? AND claimed_until = ? ORDER BY seq",
                    (holder, now + lease_s),
                ).fetchall()
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        return [(int(row[0]), orjson.loads(row[1])) for row in rows]

    def delivered(self, seqs: Sequence[int]) -> None:
        with self._connections.using() as db:
            db.executemany("DELETE FROM audit_outbox WHERE seq = ?", [(s,) for s in seqs])

    def retry_later(self, seqs: Sequence[int], error: str) -> None:
        """Put events back, due again after a backoff that doubles with each failed attempt."""
        now = self._clock()
        with self._connections.using() as db:
            db.executemany(
                "UPDATE audit_outbox SET attempts = attempts + 1, claimed_by = NULL, claimed_until = 0, last_error = ?,"
                " next_attempt_at = ? + MIN(?, ? * (1 << MIN(attempts, 16))) WHERE seq = ?",
                [(error[:500], now, MAX_RETRY_S, MIN_RETRY_S, s) for s in seqs],
            )

    def refuse(self, seq: int, reason: str) -> None:
        """Keep an event the repository will not take, with the reason; it is not sent again."""
        with self._connections.using() as db:
            db.execute(
                "UPDATE audit_outbox SET refused = 1, claimed_by = NULL, claimed_until = 0, last_error = ?"
                " WHERE seq = ?",
                (reason[:500], seq),
            )


class AuditDelivery(Protocol):
    """Sends a batch of events to the audit repository; returns, per event id, ``None`` (stored), ``"retry"``
    or a reason the repository refused it. Raises nothing for a repository that is down: all ``"retry"``."""

    def deliver(self, events: Sequence[Mapping[str, Any]]) -> dict[str, str | None]: ...


@dataclass
class FhirAuditDelivery:
    """Sends events to a FHIR server as one ``batch`` of ``PUT AuditEvent/<id>`` (idempotent by the id).

    ``client`` must be a plain :class:`FhirClient`: writing the audit trail is not itself audited.
    """

    client: FhirClient

    def deliver(self, events: Sequence[Mapping[str, Any]]) -> dict[str, str | None]:
        outcome: dict[str, str | None] = {}
        valid: list[Mapping[str, Any]] = []
        for event in events:
            try:
                validate_resource(event)
            except ResourceValidationError as exc:
                outcome[str(event["id"])] = f"not a valid R4 AuditEvent: {'; '.join(exc.problems[:3])}"
                continue
            valid.append(event)
        if not valid:
            return outcome
        bundle = {
            "resourceType": "Bundle",
            "type": "batch",
            "entry": [
                {"resource": dict(e), "request": {"method": "PUT", "url": f"AuditEvent/{e['id']}"}} for e in valid
            ],
        }
        try:
            response = self.client.request(
                "POST", self.client.base_url, what=f"batch of {len(valid)} AuditEvents", body=bundle, retry=False
            )
            answered = items(orjson.loads(response.content).get("entry"))
        except (FhirError, ValueError) as exc:
            retryable = getattr(exc, "retryable", True) or getattr(exc, "status", None) == 429
            for event in valid:
                outcome[str(event["id"])] = "retry" if retryable else f"batch refused: {type(exc).__name__}"
            return outcome
        for index, event in enumerate(valid):
            answer = element(element(answered[index]).get("response")) if index < len(answered) else {}
            status = str(answer.get("status", "")).split(" ", 1)[0]
            if status[:1] == "2":
                outcome[str(event["id"])] = None
            elif status in ("", "429") or status[:1] == "5":
                outcome[str(event["id"])] = "retry"
            else:
                outcome[str(event["id"])] = f"HTTP {status}"
        return outcome


@dataclass
class DrainReport:
    delivered: int = 0
    retried: int = 0
    refused: int = 0


class AuditDrainer:
    """Sends the outbox's events to the repository from a background thread (one per process, started by
    :meth:`start`, or on the first record in this process with ``start_on_record``), and on demand with
    :meth:`drain_once`."""

    def __init__(
        self,
        outbox: AuditOutbox,
        delivery: AuditDelivery,
        *,
        interval_s: float = 1.0,
        batch_size: int = BATCH_SIZE,
        start_on_record: bool = False,
    ) -> None:
        self.outbox = outbox
        self.delivery = delivery
        self.interval_s = interval_s
        self.batch_size = batch_size
        self._holder = f"{os.getpid()}:{secrets.token_hex(6)}"
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._start_lock = threading.Lock()
        if start_on_record:  # a forked worker process then gets its own thread the first time it records
            outbox.on_record(self.start)

    def drain_once(self) -> DrainReport:
        """Send every due event, batch after batch, until none is due; return what happened."""
        report = DrainReport()
        while True:
            batch = self.outbox.claim(self._holder, limit=self.batch_size)
            if not batch:
                return report
            results = self.delivery.deliver([event for _, event in batch])
            outcome = [(seq, str(event["id"]), results.get(str(event["id"]), "retry")) for seq, event in batch]
            stored = [seq for seq, _, result in outcome if result is None]
            retry = [seq for seq, _, result in outcome if result == "retry"]
            self.outbox.delivered(stored)
            if retry:
                self.outbox.retry_later(retry, "the audit repository could not be reached or was busy")
            for seq, event_id, reason in outcome:
                if reason not in (None, "retry"):
                    log.error("The audit repository refused AuditEvent %s: %s (kept in the outbox)", event_id, reason)
                    self.outbox.refuse(seq, str(reason))
                    report.refused += 1
            report.delivered += len(stored)
            report.retried += len(retry)
            if retry:
                return report  # the repository is struggling: back off instead of pushing the next batch

    def start(self) -> None:
        """Run the drainer thread in this process (no-op when it runs; a forked child starts its own)."""
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        with self._start_lock:
            if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
                return
            self._pid = os.getpid()
            self._holder = f"{os.getpid()}:{secrets.token_hex(6)}"
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="audit-outbox-drainer", daemon=True)
            self._thread.start()

    def stop(self, *, drain: bool = True, timeout: float = 10.0) -> None:
        """Stop the thread; with ``drain``, first try once more to send what is due."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._pid == os.getpid():
            self._thread.join(timeout)
        if drain:
            try:
                self.drain_once()
            except Exception:  # the outbox keeps the events for the next start
                log.exception("Could not send the audit outbox at shutdown; it is kept for the next start")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.drain_once()
            except Exception:  # the thread outlives one failure; events stay in the outbox
                log.exception("Sending the audit outbox failed; retrying")
            self._wake.wait(self.interval_s)
            self._wake.clear()


@dataclass
class AuditRecorder:
    """What a front door or a job holds to record accesses: the outbox, and this deployment's source name."""

    outbox: AuditOutbox
    source: AuditSource
    drainer: AuditDrainer | None = field(default=None, repr=False)

    def trail(self, actor: Actor, *, request_id: str | None = None) -> AuditTrail:
        return AuditTrail(self.outbox, actor, self.source, request_id)

    def client(self, base_url: str, actor: Actor, *, request_id: str | None = None, **kwargs: Any) -> FhirClient:
        """A FHIR client whose every interaction is recorded for ``actor``."""
        return AuditedFhirClient(base_url, trail=self.trail(actor, request_id=request_id), **kwargs)

    def record(self, event: Mapping[str, Any]) -> None:
        self.outbox.record(event)


def audit_recorder(
    data_dir: Path, *, site: str, destination: FhirClient | None, interval_s: float = 1.0
) -> AuditRecorder:
    """The recorder of a deployment: its outbox in ``data_dir`` and, when ``destination`` is given, a drainer
    sending to it (a process that only records, such as a job worker, leaves the sending to ``serve``)."""
    outbox = AuditOutbox(data_dir / OUTBOX_FILE)
    drainer = (
        AuditDrainer(outbox, FhirAuditDelivery(destination), interval_s=interval_s, start_on_record=True)
        if destination
        else None
    )
    return AuditRecorder(outbox, AuditSource(site=site), drainer)

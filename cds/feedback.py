"""Durable record of the cards this service issued and what clinicians did with them (CDS Hooks feedback).

Each issued card is recorded with its analyzer, so that feedback - which names only the card's uuid - can be
attributed to the analyzer that caused it. Per-analyzer figures (cards shown, accepted, overridden, override
reasons) feed the assessment of each model in practice: a rising "disagree with the AI finding" rate is a
signal a model card should report.

Storage is SQLite in WAL mode, safe for several worker processes on one host. Free-text ``userComment`` is
not stored (it may contain patient details); only whether one was given.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import ImagingCdsError
from core.statefiles import ThreadConnections

log = logging.getLogger(__name__)

OUTCOMES = frozenset({"accepted", "overridden"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS issued_card (
    card_uuid TEXT PRIMARY KEY,
    service_id TEXT NOT NULL,
    analyzer TEXT,
    indicator TEXT NOT NULL,
    issued_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    card_uuid TEXT NOT NULL,
    service_id TEXT NOT NULL,
    outcome TEXT NOT NULL CHECK (outcome IN ('accepted', 'overridden')),
    accepted_suggestions TEXT NOT NULL,
    override_system TEXT,
    override_code TEXT,
    override_display TEXT,
    has_user_comment INTEGER NOT NULL,
    outcome_timestamp TEXT,
    client_iss TEXT,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_card ON feedback (card_uuid);
"""


class FeedbackFormatError(ImagingCdsError):
    """A feedback request body does not follow the CDS Hooks feedback format."""

    http_status = 400


@dataclass(frozen=True)
class FeedbackEntry:
    """One validated feedback item."""

    card_uuid: str
    outcome: str
    accepted_suggestions: tuple[str, ...] = ()
    override_reason: Mapping[str, Any] | None = None
    has_user_comment: bool = False
    outcome_timestamp: str | None = None


@dataclass
class AnalyzerFigures:
    """How clinicians responded to one analyzer's cards."""

    analyzer: str
    cards_issued: int = 0
    accepted: int = 0
    overridden: int = 0
    override_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def responded(self) -> int:
        return self.accepted + self.overridden

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / (accepted + overridden); ``None`` before any feedback."""
        return self.accepted / self.responded if self.responded else None

    @property
    def override_rate(self) -> float | None:
        return self.overridden / self.responded if self.responded else None


def parse_feedback(body: Any) -> list[FeedbackEntry]:
    """Validate a feedback body (``{"feedback": [...]}``); raise :class:`FeedbackFormatError` if malformed."""
    if not isinstance(body, Mapping) or not isinstance(body.get("feedback"), list) or not body["feedback"]:
        raise FeedbackFormatError('Feedback must be a JSON object with a non-empty "feedback" array.')
    entries = []
    for index, item in enumerate(body["feedback"]):
        where = f"feedback[{index}]"
        if not isinstance(item, Mapping):
            raise FeedbackFormatError(f"{where} is not an object.")
        card, outcome = item.get("card"), item.get("outcome")
        if not isinstance(card, str) or not card:
            raise FeedbackFormatError(f"{where}.card must be the uuid of the card the user acted on.")
        if not isinstance(outcome, str) or outcome not in OUTCOMES:
            raise FeedbackFormatError(f"{where}.outcome must be 'accepted' or 'overridden'.")
        accepted = item.get("acceptedSuggestions") or []
        if not isinstance(accepted, list) or not all(
            isinstance(s, Mapping) and isinstance(s.get("id"), str) for s in accepted
        ):
            raise FeedbackFormatError(f"{where}.acceptedSuggestions must be a list of {{'id': <suggestion uuid>}}.")
        override = item.get("overrideReason")
        reason: Mapping[str, Any] | None = None
        has_comment = False
        if override is not None:
            if outcome != "overridden" or not isinstance(override, Mapping):
                raise FeedbackFormatError(
                    f"{where}.overrideReason is only allowed, as an object, when outcome is 'overridden'."
                )
            raw_reason = override.get("reason")
            if raw_reason is not None and not (
                isinstance(raw_reason, Mapping)
                and isinstance(raw_reason.get("code"), str)
                and all(isinstance(raw_reason.get(k), str | None) for k in ("system", "display"))
            ):
                raise FeedbackFormatError(
                    f"{where}.overrideReason.reason must be a Coding with a code (code, system and display as strings)."
                )
            reason = raw_reason
            has_comment = bool(override.get("userComment"))
        if outcome == "accepted" and not accepted:
            raise FeedbackFormatError(f"{where}: an 'accepted' outcome must list acceptedSuggestions.")
        timestamp = item.get("outcomeTimestamp")
        entries.append(
            FeedbackEntry(
                card_uuid=card,
                outcome=str(outcome),
                accepted_suggestions=tuple(str(s["id"]) for s in accepted),
                override_reason=reason,
                has_user_comment=has_comment,
                outcome_timestamp=timestamp if isinstance(timestamp, str) else None,
            )
        )
    return entries


IssuedRow = tuple[str, str, str | None, str, float]
"""One ``issued_card`` row: (card uuid, service id, analyzer or ``None``, indicator, issued at)."""

ISSUED_QUEUE_MAX = 10_000
"""Hook answers (each a batch of issued-card rows) the background writer may hold; when it is full, the request
writes its own rows (back-pressure), so memory stays bounded and no record is dropped."""


ISSUED_BATCH_WINDOW_S = 0.02
"""How long the background writer gathers issued cards before one commit (also the most a flush waits extra)."""


def issued_rows(service_id: str, cards: Iterable[Mapping[str, Any]], now: float) -> list[IssuedRow]:
    """The ``issued_card`` rows for the cards just returned (uuid -> analyzer, read from ``source.label``)."""
    rows: list[IssuedRow] = []
    for card in cards:
        label = str((card.get("source") or {}).get("label", ""))
        analyzer = label.split(" ", 1)[1] if label.startswith("imaging-cds ") else None
        rows.append((str(card["uuid"]), service_id, analyzer, str(card.get("indicator", "")), now))
    return rows


class FeedbackStore:
    """SQLite-backed store of issued cards and feedback; one connection per thread (and per process).

    Issued cards can be recorded two ways. :meth:`record_issued` writes before it returns. The hook path uses
    :meth:`record_issued_later`, which hands the rows to one background writer thread per process, so a
    clinician's hook answer never waits for a SQLite write (or for another worker's write lock). The writer
    commits each batch within tens of milliseconds; every read on this store (:meth:`feedback_for_card`,
    :meth:`analyzer_figures`) and :meth:`record_feedback` first waits for rows queued before it (:meth:`flush`),
    and the queue is drained when the interpreter exits normally (a gracefully stopped gunicorn worker does).
    Another process (another worker, ``imaging-cds evaluate``) sees a card once its batch is committed,
    tens of milliseconds after the answer - long before a clinician can act on the card. Durability trade-off: if the
    process is killed hard, cards issued in the last tens of milliseconds may be unrecorded; feedback on them is
    still stored and then counts as "(unattributed)". Feedback is never queued: it is committed before the
    response.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._connections = ThreadConnections(self.path)
        self._queue: queue.Queue[list[IssuedRow]] = queue.Queue(maxsize=ISSUED_QUEUE_MAX)
        self._writer: threading.Thread | None = None
        self._writer_pid = 0
        self._writer_lock = threading.Lock()
        with self._connect() as conn:
            conn.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return self._connections()

    def _write_issued(self, rows: list[IssuedRow]) -> None:
        if rows:
            self._connect().executemany("INSERT OR IGNORE INTO issued_card VALUES (?, ?, ?, ?, ?)", rows)

    def record_issued(self, service_id: str, cards: Iterable[Mapping[str, Any]]) -> None:
        """Remember the cards just returned (uuid -> analyzer) so feedback can be attributed later; written
        before this returns."""
        self._write_issued(issued_rows(service_id, cards, time.time()))

    def record_issued_later(self, service_id: str, cards: Iterable[Mapping[str, Any]]) -> None:
        """Like :meth:`record_issued`, but written by the background writer (see the class docstring).

        If the queue is full (the disk cannot keep up), the rows are written here instead: back-pressure,
        never a silently dropped record.
        """
        rows = issued_rows(service_id, cards, time.time())
        if not rows:
            return
        self._ensure_writer()
        try:
            self._queue.put_nowait(rows)
        except queue.Full:
            self._write_issued(rows)

    def flush(self) -> None:
        """Wait until every issued card queued before this call is written."""
        if self._writer is not None and self._writer_pid == os.getpid() and self._writer.is_alive():
            self._queue.join()

    def _ensure_writer(self) -> None:
        # Threads do not survive fork: a worker forked from a preloading master starts its own writer.
        if self._writer is not None and self._writer_pid == os.getpid() and self._writer.is_alive():
            return
        with self._writer_lock:
            if self._writer is not None and self._writer_pid == os.getpid() and self._writer.is_alive():
                return
            if self._writer_pid != os.getpid():
                self._queue = queue.Queue(maxsize=ISSUED_QUEUE_MAX)  # the parent's queue state is not ours
            self._writer = threading.Thread(target=self._drain, name="cds-issued-card-writer", daemon=True)
            self._writer_pid = os.getpid()
            self._writer.start()
            atexit.register(self.flush)

    def _drain(self) -> None:
        """The writer thread: take whatever is queued, write it in one transaction, repeat."""
        while True:
            batch = [self._queue.get()]
            # Gather what arrives in the next few milliseconds into the same transaction: under load one wake-up
            # and one commit then serve many hook answers, instead of a thread switch and a commit for each.
            time.sleep(ISSUED_BATCH_WINDOW_S)
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            rows = [row for rows in batch for row in rows]
            try:
                conn = self._connect()
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.executemany("INSERT OR IGNORE INTO issued_card VALUES (?, ?, ?, ?, ?)", rows)
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            except Exception:  # the writer must outlive one failed batch; the loss is logged, not raised
                log.exception("recording %d issued card(s) failed", len(rows))
            finally:
                for _ in batch:
                    self._queue.task_done()

    def record_feedback(self, service_id: str, entries: Iterable[FeedbackEntry], *, client_iss: str | None) -> int:
        """Store feedback entries durably (committed before this returns); returns how many were stored."""
        self.flush()
        now = time.time()
        rows = [
            (
                e.card_uuid,
                service_id,
                e.outcome,
                json.dumps(list(e.accepted_suggestions)),
                (e.override_reason or {}).get("system"),
                (e.override_reason or {}).get("code"),
                (e.override_reason or {}).get("display"),
                int(e.has_user_comment),
                e.outcome_timestamp,
                client_iss,
                now,
            )
            for e in entries
        ]
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                "INSERT INTO feedback (card_uuid, service_id, outcome, accepted_suggestions, override_system, "
                "override_code, override_display, has_user_comment, outcome_timestamp, client_iss, received_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return len(rows)

    def feedback_for_card(self, card_uuid: str) -> list[dict[str, Any]]:
        """The feedback stored for one card, with the analyzer of the issued card (``None`` if unknown)."""
        self.flush()
        conn = self._connect()
        conn.row_factory = sqlite3.Row
        try:
            rows = conn.execute(
                "SELECT f.*, i.analyzer FROM feedback f LEFT JOIN issued_card i USING (card_uuid) "
                "WHERE f.card_uuid = ? ORDER BY f.id",
                (card_uuid,),
            ).fetchall()
        finally:
            conn.row_factory = None
        return [dict(r) for r in rows]

    def analyzer_figures(self) -> dict[str, AnalyzerFigures]:
        """Per-analyzer acceptance and override figures. Feedback on unknown cards counts as ``"(unattributed)"``;
        cards not tied to an analyzer (queue notices) as ``"(service)"``."""
        self.flush()
        conn = self._connect()
        figures: dict[str, AnalyzerFigures] = {}

        def get(name: str | None) -> AnalyzerFigures:
            key = name or "(service)"
            return figures.setdefault(key, AnalyzerFigures(analyzer=key))

        for analyzer, count in conn.execute("SELECT analyzer, COUNT(*) FROM issued_card GROUP BY analyzer"):
            get(analyzer).cards_issued = int(count)
        query = (
            "SELECT CASE WHEN i.card_uuid IS NULL THEN '(unattributed)' ELSE i.analyzer END, f.outcome, "
            "f.override_code, COUNT(*) FROM feedback f LEFT JOIN issued_card i USING (card_uuid) "
            "GROUP BY 1, 2, 3"
        )
        for analyzer, outcome, code, count in conn.execute(query):
            target = get(analyzer)
            if outcome == "accepted":
                target.accepted += int(count)
            else:
                target.overridden += int(count)
                reason = code or "(no reason given)"
                target.override_reasons[reason] = target.override_reasons.get(reason, 0) + int(count)
        return figures

"""Durable record of the cards this service issued and what clinicians did with them (CDS Hooks feedback).

Each issued card is recorded with its analyzer, so that feedback - which names only the card's uuid - can be
attributed to the analyzer that caused it. Per-analyzer figures (cards shown, accepted, overridden, override
reasons) feed the assessment of each model in practice: a rising "disagree with the AI finding" rate is a
signal a model card should report.

Storage is SQLite in WAL mode, safe for several worker processes on one host. Free-text ``userComment`` is
not stored (it may contain patient details); only whether one was given.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imaging_cds.errors import ImagingCdsError

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
        if outcome not in OUTCOMES:
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
                isinstance(raw_reason, Mapping) and isinstance(raw_reason.get("code"), str)
            ):
                raise FeedbackFormatError(f"{where}.overrideReason.reason must be a Coding with a code.")
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


class FeedbackStore:
    """SQLite-backed store of issued cards and feedback; one connection per thread."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._connect() as conn:
            conn.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def record_issued(self, service_id: str, cards: Iterable[Mapping[str, Any]]) -> None:
        """Remember the cards just returned (uuid -> analyzer) so feedback can be attributed later."""
        now = time.time()
        rows = []
        for card in cards:
            label = str((card.get("source") or {}).get("label", ""))
            analyzer = label.split(" ", 1)[1] if label.startswith("imaging-cds ") else None
            rows.append((str(card["uuid"]), service_id, analyzer, str(card.get("indicator", "")), now))
        if rows:
            conn = self._connect()
            conn.executemany("INSERT OR IGNORE INTO issued_card VALUES (?, ?, ?, ?, ?)", rows)

    def record_feedback(self, service_id: str, entries: Iterable[FeedbackEntry], *, client_iss: str | None) -> int:
        """Store feedback entries durably; returns how many were stored."""
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

"""Clinicians' review decisions on AI results, kept for the assessment figures (acceptance rate per analyzer).

The EHR holds the authoritative record of each sign-off (the DiagnosticReport's status and its Provenance);
this small SQLite table counts decisions so the project can report how often clinicians accept each analyzer's
results, and says who decided (the reviewer's ``Practitioner`` reference, from the launch's ``fhirUser``). It
stores resource ids, analyzer names and decision codes: no patient data.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from core.statefiles import connect_private_sqlite

Decision = Literal["accepted", "rejected"]
RejectionKind = Literal["entered-in-error", "cancelled"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reviews (
    report TEXT NOT NULL,
    analyzer TEXT NOT NULL,
    version TEXT NOT NULL,
    decision TEXT NOT NULL CHECK (decision IN ('accepted', 'rejected')),
    rejection_kind TEXT,
    reviewed_at TEXT NOT NULL,
    reviewer TEXT,
    PRIMARY KEY (report, decision, reviewed_at)
);
"""


@dataclass(frozen=True)
class AnalyzerFigures:
    """How clinicians judged one analyzer's results."""

    analyzer: str
    accepted: int
    rejected: int

    @property
    def reviewed(self) -> int:
        return self.accepted + self.rejected

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / reviewed, or ``None`` before the first review."""
        return self.accepted / self.reviewed if self.reviewed else None


class ReviewLog:
    """Append-only log of review decisions in one SQLite file (``:memory:`` for tests)."""

    def __init__(self, path: str | Path = ":memory:") -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        self._connection = connect_private_sqlite(self.path, wal=False)
        with self._lock:
            self._connection.executescript(_SCHEMA)
            columns = {row[1] for row in self._connection.execute("PRAGMA table_info(reviews)")}
            if "reviewer" not in columns:  # a log written before reviewers were recorded
                self._connection.execute("ALTER TABLE reviews ADD COLUMN reviewer TEXT")

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    def record(
        self,
        report: str,
        analyzer: str,
        version: str,
        decision: Decision,
        *,
        rejection_kind: RejectionKind | None = None,
        when: datetime | None = None,
        reviewer: str | None = None,
    ) -> None:
        """Count one decision on ``report`` (``DiagnosticReport/<id>``) by ``reviewer`` (``Practitioner/<id>``)."""
        at = (when or datetime.now(UTC)).astimezone(UTC).isoformat()
        with self._lock:
            self._connection.execute(
                "INSERT OR IGNORE INTO reviews"
                " (report, analyzer, version, decision, rejection_kind, reviewed_at, reviewer)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (report, analyzer, version, decision, rejection_kind if decision == "rejected" else None, at, reviewer),
            )

    def decisions(self, report: str) -> list[tuple[str, str | None, str]]:
        """``(decision, reviewer, reviewed_at)`` of each decision on ``report``, oldest first."""
        with self._lock:
            rows = self._connection.execute(
                "SELECT decision, reviewer, reviewed_at FROM reviews WHERE report = ? ORDER BY reviewed_at", (report,)
            ).fetchall()
        return [(str(d), r, str(t)) for d, r, t in rows]

    def figures(self) -> dict[str, AnalyzerFigures]:
        """Acceptance figures per analyzer name, counting each report's latest decision only."""
        with self._lock:
            rows = self._connection.execute(
                """
                SELECT analyzer,
                       SUM(decision = 'accepted'), SUM(decision = 'rejected')
                FROM reviews r
                WHERE reviewed_at = (SELECT MAX(reviewed_at) FROM reviews WHERE report = r.report)
                GROUP BY analyzer ORDER BY analyzer
                """
            ).fetchall()
        return {name: AnalyzerFigures(name, int(acc or 0), int(rej or 0)) for name, acc, rej in rows}


def review_figures(path: str | Path) -> dict[str, AnalyzerFigures]:
    """Acceptance figures per analyzer from the review log at ``path`` (for the assessment report)."""
    log = ReviewLog(path)
    try:
        return log.figures()
    finally:
        log.close()

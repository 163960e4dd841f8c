"""The feedback store's background writer: cards issued on the hook path are written off that path, yet
feedback always finds them.

No server is involved: the store is a local SQLite file, as in production.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from cds.cards import time_ordered_uuid
from cds.feedback import FeedbackFormatError, FeedbackStore, parse_feedback


def _card(uuid: str, analyzer: str | None, indicator: str = "warning") -> dict[str, object]:
    label = f"imaging-cds {analyzer}" if analyzer else "imaging-cds"
    return {"uuid": uuid, "indicator": indicator, "source": {"label": label}}


def test_card_uuids_are_unique_and_sort_in_the_order_the_cards_were_issued() -> None:
    """The issued-card table is keyed by card uuid: time-ordered uuids append to its index instead of scattering."""
    batches = []
    for _ in range(3):
        batches.append([time_ordered_uuid() for _ in range(200)])
        time.sleep(0.002)  # the next batch is issued in a later millisecond
    every = [u for batch in batches for u in batch]
    assert len(set(every)) == len(every)
    assert all(max(earlier) < min(later) for earlier, later in itertools.pairwise(batches))
    assert {uuid.UUID(u).version for u in every} == {7}
    assert {uuid.UUID(u).variant for u in every} == {uuid.RFC_4122}


def test_feedback_on_a_card_recorded_in_the_background_is_attributed_to_its_analyzer(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path / "fb.sqlite")
    store.record_issued_later("imaging-ai-order-select", [_card("card-bone", "ct-bone"), _card("card-q", None)])
    entries = parse_feedback(
        {"feedback": [{"card": "card-bone", "outcome": "overridden", "overrideReason": {"reason": {"code": "x"}}}]}
    )
    assert store.record_feedback("imaging-ai-order-select", entries, client_iss="https://ehr.example.org") == 1

    (row,) = store.feedback_for_card("card-bone")
    assert row["analyzer"] == "ct-bone" and row["outcome"] == "overridden"
    figures = store.analyzer_figures()
    assert figures["ct-bone"].cards_issued == 1 and figures["ct-bone"].overridden == 1
    assert figures["(service)"].cards_issued == 1  # the queue notice is not attributed to a model


def test_after_flush_another_process_sees_every_card_issued_in_the_background(tmp_path: Path) -> None:
    db = tmp_path / "fb.sqlite"
    store = FeedbackStore(db)
    for batch in range(300):  # many small batches, as under load: none is lost or reordered away
        store.record_issued_later(
            "imaging-ai-patient-view", [_card(f"pv-{batch}-{i}", "ct-emphysema") for i in range(3)]
        )
    store.flush()

    other = FeedbackStore(db)  # what another worker, or `imaging-cds evaluate`, opens
    assert other.analyzer_figures()["ct-emphysema"].cards_issued == 900


def test_cards_queued_just_before_the_interpreter_exits_are_still_written(tmp_path: Path) -> None:
    db = tmp_path / "fb.sqlite"
    script = textwrap.dedent(
        f"""
        from cds.feedback import FeedbackStore
        store = FeedbackStore({str(db)!r})
        store.record_issued_later("imaging-ai-order-sign", [{{"uuid": "last-card", "indicator": "info",
                                   "source": {{"label": "imaging-cds ct-bone"}}}}])
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)

    assert FeedbackStore(db).analyzer_figures()["ct-bone"].cards_issued == 1


def test_the_synchronous_record_is_visible_at_once_to_another_store(tmp_path: Path) -> None:
    db = tmp_path / "fb.sqlite"
    FeedbackStore(db).record_issued("imaging-ai-patient-view", [_card("now", "us-breast", "info")])
    assert FeedbackStore(db).analyzer_figures()["us-breast"].cards_issued == 1


@pytest.mark.parametrize(
    ("entry", "named"),
    [
        ({"card": "c1", "outcome": ["overridden"]}, "feedback[0].outcome"),
        ({"card": "c1", "outcome": {"accepted": True}}, "feedback[0].outcome"),
        (
            {"card": "c1", "outcome": "overridden", "overrideReason": {"reason": {"code": "x", "system": ["s"]}}},
            "feedback[0].overrideReason.reason",
        ),
        (
            {"card": "c1", "outcome": "overridden", "overrideReason": {"reason": {"code": "x", "display": {}}}},
            "feedback[0].overrideReason.reason",
        ),
    ],
)
def test_feedback_with_values_of_the_wrong_type_is_refused_naming_them(entry: dict[str, Any], named: str) -> None:
    """Values the store could not hold (an outcome that is a list, a Coding's display that is an object) are a
    malformed request (400) that names them, found while the body is read: not a failure inside the store (500)."""
    with pytest.raises(FeedbackFormatError, match=re.escape(named)):
        parse_feedback({"feedback": [entry]})

"""Shared set-up for the property-based and fuzz tests (``tests/test_fuzz_*.py``): one Hypothesis profile, sized
for CI, and the hostile corpus kept in ``tests/data/hostile``.

The CI profile is derandomised (the same cases every run, so a failure reproduces from its log) and has no deadline
(a shared 2-core machine stalls now and then; a hang is caught by the tests' own timeouts, not by Hypothesis).
``IMAGING_CDS_FUZZ_SCALE`` multiplies every test's number of cases and ``IMAGING_CDS_FUZZ_SEED`` switches to random
search with that seed, for a longer hunt outside CI::

    IMAGING_CDS_FUZZ_SCALE=20 IMAGING_CDS_FUZZ_SEED=7 .venv/bin/python -m pytest tests/test_fuzz_*.py
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

HOSTILE = Path(__file__).parent / "data" / "hostile"
SCALE = float(os.environ.get("IMAGING_CDS_FUZZ_SCALE", "1"))
SEED = os.environ.get("IMAGING_CDS_FUZZ_SEED")

settings.register_profile(
    "imaging-cds-ci",
    deadline=None,
    derandomize=SEED is None,
    database=None,  # nothing written into the working tree
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
settings.load_profile("imaging-cds-ci")

F = TypeVar("F", bound=Callable[..., Any])


def fuzz(cases: int) -> Callable[[F], F]:
    """``@fuzz(n)``: run the property ``n`` times (scaled by ``IMAGING_CDS_FUZZ_SCALE``)."""

    def decorate(test: F) -> F:
        configured = settings(max_examples=max(1, round(cases * SCALE)))(test)
        return hypothesis_seed(int(SEED))(configured) if SEED is not None else configured

    return decorate


def hostile_files(folder: str, pattern: str = "*") -> list[Path]:
    """The hostile corpus files of one kind, sorted (test ids stay stable)."""
    return sorted((HOSTILE / folder).glob(pattern))


JUNK = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
    | st.sampled_from(["", "Patient/", "ImagingStudy/../x", "urn:uuid:", "http://127.0.0.1:9/fhir", "9999-99-99",
                       "2025-13-45T25:61:61Z", "final", "preliminary", "24627-2", "\u202e", "a" * 300]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3),
    max_leaves=6,
)  # fmt: skip
"""A JSON value of any shape, with the strings FHIR readers and card builders meet at their edges."""

_REMOVE = object()


def json_paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path below a JSON value (dict keys and list indexes), parents before children."""
    if isinstance(value, dict):
        for key, child in value.items():
            yield (*prefix, key)
            yield from json_paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield (*prefix, index)
            yield from json_paths(child, (*prefix, index))


def damage(document: Any, data: st.DataObject, edits: int) -> None:
    """Damage a JSON document in place, ``edits`` times: an element (anywhere) is removed or replaced by
    :data:`JUNK`. Mutating a real document keeps most of it valid, so the damage reaches deep readers."""
    for _ in range(edits):
        paths = list(json_paths(document))
        if not paths:
            return
        path = data.draw(st.sampled_from(paths), label="path")
        parent: Any = document
        for step in path[:-1]:
            parent = parent[step]
        replacement = data.draw(st.just(_REMOVE) | JUNK, label="value")
        if replacement is _REMOVE:
            del parent[path[-1]]
        else:
            parent[path[-1]] = replacement

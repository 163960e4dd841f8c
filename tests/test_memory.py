"""Freezing a server's long-lived objects for the garbage collector (pipeline.memory)."""

from __future__ import annotations

import gc
import weakref

import pytest

from core.errors import ImagingCdsError
from pipeline.memory import LoadedAnalyzers, freeze_long_lived


class _Node:
    def __init__(self) -> None:
        self.itself = self  # a reference cycle: only the cyclic collector can free it


def test_freezing_collects_the_garbage_first_and_later_garbage_is_still_collected() -> None:
    garbage = _Node()
    before = weakref.ref(garbage)
    del garbage
    freeze_long_lived()
    assert before() is None  # collected, not frozen for the life of the process
    assert gc.get_freeze_count() > 0

    later = _Node()
    after = weakref.ref(later)
    del later
    gc.collect()
    assert after() is None  # objects made after the freeze are collected as usual


def test_an_analyzer_is_built_once_per_process_and_an_unknown_name_is_refused() -> None:
    loaded = LoadedAnalyzers()
    first = loaded.get("ct-emphysema")
    assert loaded.get("ct-emphysema") is first  # kept, not rebuilt for the next job
    with pytest.raises(ImagingCdsError, match="ct-emphysem"):  # the registry's "did you mean" hint
        loaded.get("ct-emphysemaa")

"""Keeping long-lived objects out of the garbage collector's way in a server process.

CPython's cyclic collector walks every tracked object of the oldest generation on each full collection. Once a
server has imported its web stack and loaded an analyzer (torch, MONAI, model weights), that is several hundred
thousand objects that live as long as the process: on a small machine a full collection then takes 40-170 ms, and
it runs inside whichever request happens to allocate at that moment - a clinician's hook call or result page.
:func:`freeze_long_lived` moves what is alive now into the permanent generation (``gc.freeze``), so later full
collections walk only what was created after it. Call it when the process has just built something that lives as
long as the process (after start-up, after an analyzer is loaded: :class:`LoadedAnalyzers`), not in the middle of
ordinary work.
"""

from __future__ import annotations

import gc
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.base import Analyzer


def freeze_long_lived() -> None:
    """Collect the garbage there is now, then exempt every object still alive from later collections.

    Frozen objects are still freed by reference counting when they are released; only reference cycles among
    them would outlive the process, which is why the garbage is collected first.
    """
    gc.collect()
    gc.freeze()


class LoadedAnalyzers:
    """The analyzers a server process has built, each built once (loading weights is slow) and kept for later jobs.

    What building one made (torch, MONAI, the weights) lives as long as the process, so it is frozen for the
    collector right after (:func:`freeze_long_lived`): full collections, which run inside whatever request
    allocates next, then do not walk it again and again (``freeze=False`` for a process that analyses once and
    exits, such as the CLI). Safe to share between threads.
    """

    def __init__(self, *, freeze: bool = True) -> None:
        self._built: dict[str, Analyzer] = {}
        self._lock = threading.Lock()
        self._freeze = freeze

    def get(self, name: str) -> Analyzer:
        """The analyzer called ``name``, built on first use (errors as :func:`models.registry.get_analyzer`)."""
        with self._lock:
            if name not in self._built:
                from models.registry import get_analyzer

                self._built[name] = get_analyzer(name)
                if self._freeze:
                    freeze_long_lived()
            return self._built[name]

"""Test support for code that must survive ``os.fork``: run a piece of work in a forked child, as a process pool
(Celery's prefork workers, gunicorn's worker) runs its children, and read back whether it succeeded."""

from __future__ import annotations

import os
from collections.abc import Callable


def succeeds_in_a_forked_child(work: Callable[[], object]) -> bool:
    """Fork, run ``work`` in the child (nothing else), and say whether it returned without raising."""
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            work()
            status = 0
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0

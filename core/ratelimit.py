"""A per-client limit on requests anyone may send without signing in (the SMART app's ``/launch``).

Each such request makes the service work (discovery, a redirect, a sealed cookie) before anything proves who
sent it; a client that sends thousands must not turn the service into a load generator against the EHR, nor
crowd out the clinicians behind the same service. :class:`RateLimiter` keeps a sliding window of recent
request times per client key (the peer address), in this process's memory, bounded in the number of keys.

Behind a reverse proxy the peer address is the proxy's: configure the WSGI server's proxy handling (for
example werkzeug's ``ProxyFix``) so the client's own address reaches the app, or every clinician shares one
budget.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from core.errors import ImagingCdsError


class RateLimitedError(ImagingCdsError):
    """A client sent more requests than the limit allows in the window."""

    http_status = 429

    def __init__(self, message: str, *, remedy: str = "", retry_after_s: int = 60) -> None:
        super().__init__(message, remedy=remedy)
        self.retry_after_s = retry_after_s


class RateLimiter:
    """At most ``limit`` events per ``window_s`` seconds per key; at most ``max_keys`` keys remembered (the
    least recently seen are forgotten first, so a flood of spoofed keys costs bounded memory)."""

    def __init__(
        self,
        limit: int,
        window_s: float = 60.0,
        *,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit < 1 or window_s <= 0:
            raise ValueError("A rate limit needs a positive count and window.")
        self.limit = limit
        self.window_s = window_s
        self._max_keys = max_keys
        self._clock = clock
        self._events: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        """Count one event for ``key`` and say whether it is within the limit (a refused event is not counted)."""
        now = self._clock()
        with self._lock:
            times = self._events.pop(key, None) or deque()
            while times and times[0] <= now - self.window_s:
                times.popleft()
            allowed = len(times) < self.limit
            if allowed:
                times.append(now)
            self._events[key] = times  # most recently seen last
            while len(self._events) > self._max_keys:
                self._events.popitem(last=False)
        return allowed

    def check(self, key: str, *, what: str) -> None:
        """:meth:`allow`, raising :class:`RateLimitedError` (HTTP 429) when the event is over the limit."""
        if not self.allow(key):
            raise RateLimitedError(
                f"Too many {what} from this address ({self.limit} per {self.window_s:g} s at most).",
                remedy="Wait a minute and try again.",
                retry_after_s=int(self.window_s),
            )

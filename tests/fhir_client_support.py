"""Test support for the FHIR client tests: a fault-injecting reverse proxy in front of the real server.

The proxy sits on loopback in front of the REAL sekmet-fhir server. It forwards every request unchanged
except the ones its ``plan`` tells it to answer itself (a 500, a 400) or to delay (to provoke a timeout),
and it counts what it received, so a test can assert how many attempts the client made.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import requests

from devtools.servers import free_port


@dataclass
class Action:
    """What the proxy does with one request: answer ``status`` itself (with ``body`` and extra ``headers``, such
    as a redirect's ``Location``), or wait ``delay`` s, then forward.

    ``lose_answer``: forward the request (the server does what it asks) and then answer ``status`` instead of the
    server's answer, as when the answer of a write is lost on the way back.
    """

    status: int | None = None
    delay: float = 0.0
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    lose_answer: bool = False


Plan = Callable[[int, str, str], Action | None]
"""(index of the request, method, path) -> an Action, or None to forward the request unchanged."""


@dataclass
class FaultProxy:
    """A running proxy: ``base_url`` replaces the FHIR server's base; ``requests_seen`` records (method, path)."""

    base_url: str
    requests_seen: list[tuple[str, str]] = field(default_factory=list)
    headers_seen: list[dict[str, str]] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.requests_seen)


def _outcome(status: int) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "exception", "diagnostics": f"injected HTTP {status} by the proxy"}],
    }


@contextmanager
def fault_proxy(upstream_base: str, plan: Plan) -> Iterator[FaultProxy]:
    """Run a reverse proxy on a free loopback port that forwards ``/fhir...`` to ``upstream_base``."""
    upstream_origin = upstream_base.split("/fhir", 1)[0]
    port = free_port()
    proxy = FaultProxy(base_url=f"http://127.0.0.1:{port}/fhir")
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
            return

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            with lock:
                index = proxy.count
                proxy.requests_seen.append((self.command, self.path))
                proxy.headers_seen.append(dict(self.headers.items()))
            action = plan(index, self.command, self.path)
            if action is not None and action.delay:
                time.sleep(action.delay)
            if action is not None and action.status is not None and not action.lose_answer:
                payload = json.dumps(action.body or _outcome(action.status)).encode()
                self._reply(action.status, {"Content-Type": "application/fhir+json", **action.headers}, payload)
                return
            forward_headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
            try:
                upstream = requests.request(
                    self.command,
                    upstream_origin + self.path,
                    data=body or None,
                    headers=forward_headers,
                    timeout=30,
                    allow_redirects=False,
                )
            except requests.RequestException:
                self._reply(502, {"Content-Type": "text/plain"}, b"upstream unreachable")
                return
            if action is not None and action.lose_answer:
                status = action.status or 500
                self._reply(status, {"Content-Type": "application/fhir+json"}, json.dumps(_outcome(status)).encode())
                return
            keep = {
                k: v
                for k, v in upstream.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding")
            }
            self._reply(upstream.status_code, keep, upstream.content)

        def _reply(self, status: int, headers: dict[str, str], payload: bytes) -> None:
            try:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up waiting (timeout test)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle  # noqa: N815

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="fault-proxy", daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()

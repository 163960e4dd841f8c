"""A hostile server on loopback: it answers whatever a test scripts, and records what it was asked and sent.

The parties these tests play cannot run here as themselves: a compromised PACS that redirects or streams ten
thousand instances, an EHR whose ``next`` links climb out of its base, a CDS client's key server that never stops
sending. Their answers are scripted; everything on our side (the sessions, the allow-list, the parsers) is the
real code, talking real HTTP over a real socket.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    """What the server answers: ``body`` as bytes (sent with Content-Length) or chunks (sent chunked)."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | Iterable[bytes] = b""


@dataclass
class Seen:
    """A request the server received: method, path (with query) and headers."""

    method: str
    path: str
    headers: dict[str, str]


@dataclass
class HostileServer:
    """A running server: ``url`` is its origin (``http://127.0.0.1:<port>``); ``seen`` what it was asked;
    ``bytes_sent`` how many body bytes it managed to write before the client stopped reading."""

    url: str
    seen: list[Seen] = field(default_factory=list)
    bytes_sent: int = 0

    @property
    def paths(self) -> list[str]:
        return [s.path for s in self.seen]


Script = Callable[[Seen], Reply]


@contextmanager
def hostile_server(script: Script) -> Iterator[HostileServer]:
    """Serve ``script`` on a free loopback port for the duration of the block."""
    lock = threading.Lock()
    state: dict[str, HostileServer] = {}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return

        def setup(self) -> None:
            super().setup()
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms Nagle stall per answer

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            seen = Seen(self.command, self.path, dict(self.headers.items()))
            server = state["server"]
            with lock:
                server.seen.append(seen)
            reply = script(seen)
            try:
                self.send_response(reply.status)
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                if isinstance(reply.body, bytes):
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body)
                    with lock:
                        server.bytes_sent += len(reply.body)
                    return
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for chunk in reply.body:
                    if chunk:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        with lock:
                            server.bytes_sent += len(chunk)
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client stopped reading: what a limit is for

        do_GET = do_POST = do_PUT = do_DELETE = _handle  # noqa: N815

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    state["server"] = HostileServer(url=f"http://127.0.0.1:{httpd.server_address[1]}")
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), name="hostile-server", daemon=True)
    thread.start()
    try:
        yield state["server"]
    finally:
        httpd.shutdown()
        httpd.server_close()

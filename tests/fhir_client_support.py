"""Test support for the FHIR client tests: a fault-injecting reverse proxy and a configurable sekmet server.

The proxy sits on loopback in front of the REAL sekmet-fhir server. It forwards every request unchanged
except the ones its ``plan`` tells it to answer itself (a 500, a 400) or to delay (to provoke a timeout),
and it counts what it received, so a test can assert how many attempts the client made.

``sekmet_server`` starts sekmet with settings that :func:`imaging_cds.servers.fhir_server` does not expose
yet (client JWKS for private_key_jwt, token lifetime); it follows the same pattern as that helper.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

from imaging_cds.servers import free_port, sekmet_executable


@dataclass
class Action:
    """What the proxy does with one request: answer ``status`` itself, or wait ``delay`` s, then forward."""

    status: int | None = None
    delay: float = 0.0
    body: dict[str, Any] | None = None


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
            if action is not None and action.status is not None:
                payload = json.dumps(action.body or _outcome(action.status)).encode()
                self._reply(action.status, {"Content-Type": "application/fhir+json"}, payload)
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


@dataclass(frozen=True)
class Sekmet:
    base_url: str
    token_url: str
    root: Path


@contextmanager
def sekmet_server(server_auth: dict[str, Any], *, timeout: float = 60.0) -> Iterator[Sekmet]:
    """Run sekmet-fhir with ``server_auth`` settings written verbatim (e.g. smart_clients with ``jwks``)."""
    root = Path(tempfile.mkdtemp(prefix="imaging-cds-fhir-auth-"))
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/fhir"
    settings = {
        "base_url": base_url,
        "host": "127.0.0.1",
        "port": port,
        "data_dir": str(root / "data"),
        "simulator": {"enabled": False},
        "validation": {"inbound": "strict"},
        "server_auth": server_auth,
    }
    config = root / "settings.yaml"
    config.write_text(json.dumps(settings, indent=2))  # JSON is YAML
    log_path = root / "sekmet.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [str(sekmet_executable()), "serve", "-c", str(config)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=root,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"sekmet exited while starting; see {log_path}")
            try:
                if requests.get(f"{base_url}/metadata", timeout=1).status_code < 500:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"sekmet did not start within {timeout} s; see {log_path}")
            time.sleep(0.1)
        yield Sekmet(base_url=base_url, token_url=f"http://127.0.0.1:{port}/auth/token", root=root)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        shutil.rmtree(root, ignore_errors=True)

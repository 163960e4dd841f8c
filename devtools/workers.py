"""Start ``imaging-cds worker`` nodes on this machine: for the demo, the benchmarks and the tests.

A node is started exactly as an administrator starts one (``python -m imaging_cds.cli worker --config``), from a
deployment settings file that :func:`write_settings` writes for local servers (an open FHIR server, the local
Orthanc and Redis, a state key made for the deployment: :func:`deployment_keyring` gives the in-process app the
same key, so a worker opens the sessions the app sealed). :class:`WorkerNode` knows its child processes, so a
fault-injection test can kill the one that runs an analysis, by process id.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.sealing import Keyring, KeySource
from devtools.servers import PROJECT_ROOT

STATE_KEY_FILE = "state.key"


def deployment_keyring(root: Path) -> Keyring:
    """The state key of the deployment :func:`write_settings` wrote under ``root`` (made on first use)."""
    return Keyring.from_sources(KeySource(file=_state_key_file(root)))


def _state_key_file(root: Path) -> Path:
    path = root / STATE_KEY_FILE
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as out:
            out.write(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
    return path


def write_settings(
    root: Path,
    *,
    broker_url: str,
    fhir_base: str,
    dicomweb: str,
    jobs: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    backend_timeout_s: float = 30.0,
    log_format: str = "json",
) -> Path:
    """A deployment settings file for ``serve`` and its workers (open FHIR server: ``backend.auth: none``)."""
    settings = {
        "public_base_url": "http://127.0.0.1:9",
        "data_dir": str(root / "data"),
        "dicomweb_allow": [dicomweb],
        "backend": {"fhir_base": fhir_base, "auth": "none", "timeout_s": backend_timeout_s},
        "jobs": {"broker_url": broker_url, **(jobs or {})},
        "logging": {"format": log_format, "level": "INFO"},
        "state_key": {"file": str(_state_key_file(root))},
        **(extra or {}),
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "settings.json"
    path.write_text(json.dumps(settings, indent=2))
    return path


@dataclass
class WorkerNode:
    """A running ``imaging-cds worker``: its main process and the log it writes."""

    process: subprocess.Popen[bytes]
    log: Path

    def children(self) -> list[int]:
        """The pool's child processes (those that run analyses)."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.process.pid:
                    found.append(int(entry.name))
        return found

    def kill(self) -> None:
        """SIGKILL the node: the main process and each of its children, by process id."""
        pids = self.children()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        for pid in pids:
            _kill(pid)

    def stop(self) -> None:
        children = self.children()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        for pid in children:
            _kill(pid)


def _kill(pid: int) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@contextmanager
def worker_node(settings: Path, name: str, *, concurrency: int = 1, timeout: float = 120.0) -> Iterator[WorkerNode]:
    """Start ``imaging-cds worker`` and wait until it consumes (its log says ready); stop it on exit."""
    log = settings.parent / f"worker-{name}.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "imaging_cds.cli", "worker", "--config", str(settings),
                "--concurrency", str(concurrency), "--name", f"{name}@test",
            ],
            stdout=out, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT,
        )  # fmt: skip
    node = WorkerNode(process, log)
    try:
        deadline = time.monotonic() + timeout
        while f"{name}@test ready" not in log.read_text(errors="replace"):
            assert process.poll() is None, f"worker {name} exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"worker {name} did not start:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)
        yield node
    finally:
        node.kill()  # the graceful path waits for the broker and the sweeper; a test has no use for it

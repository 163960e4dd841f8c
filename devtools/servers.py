"""Start the real third-party servers the demo and the tests run against, on loopback, in temp dirs.

* FHIR R4: ``sekmet-fhir`` in its own virtual environment (its pins differ from ours), as a subprocess; and
  Medplum's FHIR engine (``@medplum/fhir-router`` from npm, in ``devtools/medplum``) behind the project's small
  Node HTTP wrapper, a second server with other limits (8 entries per conditional transaction, 1 MB bodies).
* PACS: Orthanc with its DICOMweb plugin (Debian packages ``orthanc`` and ``orthanc-dicomweb``).
* Redis (Debian ``redis-server``) where a queue needs it.

Each server is a context manager that picks free ports, waits until the server answers, and stops it
(and removes its storage) on exit. Nothing here is a mock.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from core.errors import ConfigurationError
from core.options import look_up_option

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ORTHANC_DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sekmet_executable() -> Path:
    """Locate the ``sekmet`` command of the FHIR server's own venv (``SEKMET_BIN`` overrides)."""
    candidates = [os.environ.get("SEKMET_BIN", ""), str(PROJECT_ROOT / ".venv-fhir" / "bin" / "sekmet")]
    found = shutil.which("sekmet")
    if found:
        candidates.append(found)
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise ConfigurationError(
        "The FHIR test server 'sekmet' is not installed.",
        remedy="Run scripts/setup.sh, or: python3 -m venv .venv-fhir && .venv-fhir/bin/pip install sekmet-fhir",
    )


def _wait_until_up(url: str, process: subprocess.Popen[bytes], log: Path, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ConfigurationError(
                f"{what} exited with code {process.returncode} while starting.",
                remedy=f"See its log: {log}",
            )
        try:
            if requests.get(url, timeout=1).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    process.kill()
    raise ConfigurationError(f"{what} did not answer at {url} within {timeout:.0f} s.", remedy=f"See its log: {log}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


class ManagedProcess:
    """A server process the tools started, that a fault-injection test may stop and start again (same command,
    same port, same storage): ``restart`` is a crash and a recovery, ``kill`` a crash alone."""

    def __init__(self, argv: list[str], *, cwd: Path, log: Path, what: str, is_up: Callable[[], bool]) -> None:
        self.argv = argv
        self.cwd = cwd
        self.log = log
        self.what = what
        self._is_up = is_up
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.poll() is None else None

    def start(self, timeout: float = 30.0) -> None:
        with self.log.open("ab") as log_file:
            self.process = subprocess.Popen(
                self.argv, stdout=log_file, stderr=subprocess.STDOUT, cwd=self.cwd, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while not self._is_up():
            if self.process.poll() is not None:
                raise ConfigurationError(
                    f"{self.what} exited with code {self.process.returncode} while starting.",
                    remedy=f"See its log: {self.log}",
                )
            if time.monotonic() > deadline:
                self.process.kill()
                raise ConfigurationError(f"{self.what} did not start within {timeout:.0f} s.", remedy=f"See {self.log}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)

    def kill(self) -> None:
        """SIGKILL, as a crash would end it (only this process, by its id)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def restart(self, *, down_s: float = 0.0) -> None:
        self.kill()
        time.sleep(down_s)
        self.start()


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code < 500
    except requests.RequestException:
        return False


@dataclass(frozen=True)
class SmartClient:
    """A SMART Backend Services client registered on the local FHIR server."""

    client_id: str
    client_secret: str | None = None
    scopes: str = "system/*.*"
    jwks: dict[str, Any] | None = None  # public keys for private_key_jwt client authentication

    def settings(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"client_id": self.client_id, "scopes": self.scopes}
        if self.client_secret is not None:
            entry["client_secret"] = self.client_secret
        if self.jwks is not None:
            entry["jwks"] = self.jwks
        return entry


@dataclass(frozen=True)
class FhirServer:
    base_url: str
    token_url: str | None
    data_dir: Path
    log: Path
    kind: str = "sekmet"
    """Which server software: ``sekmet`` or ``medplum`` (see :data:`FHIR_SERVER_KINDS`)."""


@contextmanager
def fhir_server(
    workdir: Path | None = None,
    *,
    smart_clients: tuple[SmartClient, ...] = (),
    token_lifetime: int | None = None,
    timeout: float = 60.0,
) -> Iterator[FhirServer]:
    """Run a fresh ``sekmet-fhir`` server (strict inbound validation, SQLite in a temp dir).

    With ``smart_clients`` the server requires SMART Backend Services bearer tokens from ``token_url``.
    """
    own_dir = workdir is None
    root = Path(tempfile.mkdtemp(prefix="imaging-cds-fhir-")) if workdir is None else workdir
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/fhir"
    settings: dict[str, object] = {
        "base_url": base_url,
        "host": "127.0.0.1",
        "port": port,
        "data_dir": str(root / "data"),
        "simulator": {"enabled": False},
        "validation": {"inbound": "strict"},
    }
    if smart_clients:
        server_auth: dict[str, Any] = {"types": ["smart"], "smart_clients": [c.settings() for c in smart_clients]}
        if token_lifetime is not None:
            server_auth["token_lifetime"] = token_lifetime
        settings["server_auth"] = server_auth
    config = root / "settings.yaml"
    # JSON is a subset of YAML: no YAML writer needed.
    config.write_text(json.dumps(settings, indent=2))
    log = root / "sekmet.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [str(sekmet_executable()), "serve", "-c", str(config)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=root,
            start_new_session=True,
        )
    try:
        _wait_until_up(f"{base_url}/metadata", process, log, "The FHIR server (sekmet)", timeout)
        token_url = f"http://127.0.0.1:{port}/auth/token" if smart_clients else None
        yield FhirServer(base_url=base_url, token_url=token_url, data_dir=root, log=log)
    finally:
        _stop(process)
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)


MEDPLUM_DIR = PROJECT_ROOT / "devtools" / "medplum"


def medplum_command() -> list[str]:
    """``node server.mjs`` of the Medplum wrapper, once ``npm install`` has put Medplum's packages beside it."""
    node = shutil.which("node")
    if node is None or not (MEDPLUM_DIR / "node_modules" / "@medplum" / "fhir-router").is_dir():
        raise ConfigurationError(
            "The Medplum FHIR test server is not installed (Node.js and the @medplum packages).",
            remedy="Run scripts/setup.sh, or: cd devtools/medplum && npm ci",
        )
    return [node, str(MEDPLUM_DIR / "server.mjs")]


@contextmanager
def medplum_server(
    workdir: Path | None = None, *, max_json_bytes: int | None = None, timeout: float = 60.0
) -> Iterator[FhirServer]:
    """Run Medplum's FHIR engine (in-memory store, so every start is a fresh server) on a free loopback port.

    It keeps Medplum's own limits: a transaction holding conditional creates takes at most 8 entries, and request
    bodies stop at ``max_json_bytes`` (Medplum's default, 1 MiB, unless given).
    """
    own_dir = workdir is None
    root = Path(tempfile.mkdtemp(prefix="imaging-cds-medplum-")) if workdir is None else workdir
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/fhir"
    argv = [*medplum_command(), "--port", str(port), "--base-path", "/fhir"]
    if max_json_bytes is not None:
        argv += ["--max-json-bytes", str(max_json_bytes)]
    process = ManagedProcess(
        argv,
        cwd=MEDPLUM_DIR,
        log=root / "medplum.log",
        what="The FHIR server (Medplum)",
        is_up=lambda: _answers(f"{base_url}/metadata"),
    )
    try:
        process.start(timeout)
        yield FhirServer(base_url=base_url, token_url=None, data_dir=root, log=process.log, kind="medplum")
    finally:
        process.stop()
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)


FHIR_SERVER_KINDS = ("sekmet", "medplum")


@contextmanager
def fhir_server_of_kind(kind: str) -> Iterator[FhirServer]:
    """A fresh open FHIR server of ``kind`` (one of :data:`FHIR_SERVER_KINDS`): what tests run against both."""
    starters: dict[str, Callable[[], AbstractContextManager[FhirServer]]] = {
        "sekmet": fhir_server,
        "medplum": medplum_server,
    }
    with look_up_option(kind, starters, what="FHIR server kind")() as server:
        yield server


@dataclass(frozen=True)
class OrthancServer:
    url: str
    dicomweb_url: str
    storage: Path
    log: Path
    process: ManagedProcess | None = None

    def upload(self, data: bytes) -> dict[str, str]:
        """Store one DICOM instance (``POST /instances``); returns Orthanc's answer (ids, status)."""
        response = requests.post(f"{self.url}/instances", data=data, timeout=60)
        response.raise_for_status()
        return dict(response.json())


@contextmanager
def orthanc_server(workdir: Path | None = None, *, timeout: float = 30.0) -> Iterator[OrthancServer]:
    """Run a fresh Orthanc with the DICOMweb plugin on a free loopback port, storage in a temp dir."""
    binary = shutil.which("Orthanc")
    if binary is None or not ORTHANC_DICOMWEB_PLUGIN.is_file():
        raise ConfigurationError(
            "Orthanc and its DICOMweb plugin are not installed.",
            remedy="Install the Debian packages: apt-get install -y orthanc orthanc-dicomweb",
        )
    own_dir = workdir is None
    root = Path(tempfile.mkdtemp(prefix="imaging-cds-orthanc-")) if workdir is None else workdir
    storage = root / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "Name": "imaging-cds-local",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": port,
        "DicomServerEnabled": False,
        "DicomPort": free_port(),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [str(ORTHANC_DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    config_path = root / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    url = f"http://127.0.0.1:{port}"
    process = ManagedProcess(
        [binary, str(config_path)],
        cwd=root,
        log=root / "orthanc.log",
        what="Orthanc",
        is_up=lambda: _answers(f"{url}/system"),
    )
    try:
        process.start(timeout)
        yield OrthancServer(url=url, dicomweb_url=f"{url}/dicom-web", storage=storage, log=process.log, process=process)
    finally:
        process.stop()
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class RedisServer:
    url: str
    log: Path
    port: int = 0
    process: ManagedProcess | None = None


def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextmanager
def redis_server(workdir: Path | None = None, *, timeout: float = 15.0) -> Iterator[RedisServer]:
    """Run a throw-away ``redis-server`` (no persistence) on a free loopback port.

    Without persistence a restart empties it, as a Redis restarted without its data would be: what the job
    engine must survive (see :mod:`pipeline.celery_engine`).
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise ConfigurationError(
            "redis-server is not installed.", remedy="Install the Debian package: apt-get install -y redis-server"
        )
    own_dir = workdir is None
    root = Path(tempfile.mkdtemp(prefix="imaging-cds-redis-")) if workdir is None else workdir
    port = free_port()
    process = ManagedProcess(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no"],
        cwd=root,
        log=root / "redis.log",
        what="redis-server",
        is_up=lambda: _redis_answers(port),
    )
    try:
        process.start(timeout)
        yield RedisServer(url=f"redis://127.0.0.1:{port}/0", log=process.log, port=port, process=process)
    finally:
        process.stop()
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)

"""Run ``imaging-cds serve`` as an administrator does: a real process started from a settings file.

Used by the tests that restart or kill the service (replay cache, audit outbox) and by ``tests/test_serve.py``.
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
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from joserfc import jwk, jwt

from devtools.servers import free_port

EHR_ISS = "https://ehr.example.org"


@dataclass(frozen=True)
class Serving:
    base: str
    process: subprocess.Popen[bytes]
    log: Path


def write_state_key(folder: Path) -> Path:
    """A fresh 256-bit state key in a file only its owner can read, as the README says to make one."""
    path = folder / "state.key"
    path.write_text(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
    path.chmod(0o600)
    return path


def base_settings(root: Path, port: int, ehr_key: jwk.Key, **extra: Any) -> dict[str, Any]:
    """Settings of a deployment trusting one CDS client (``EHR_ISS``, keys in a file), data under ``root/data``."""
    jwks = root / "ehr-jwks.json"
    jwks.write_text(json.dumps({"keys": [ehr_key.as_dict(private=False)]}))
    return {
        "public_base_url": f"http://127.0.0.1:{port}",
        "data_dir": str(root / "data"),
        "dicomweb_allow": ["http://127.0.0.1:9/dicom-web"],
        "cds_clients": [{"iss": EHR_ISS, "jwks_file": str(jwks)}],
        **extra,
    }


@contextmanager
def serving(settings: dict[str, Any], root: Path, port: int, *, name: str = "serve") -> Iterator[Serving]:
    """Start ``imaging-cds serve`` with ``settings`` on ``port``; stop it on exit (if the test has not killed it)."""
    config = root / f"{name}.json"
    config.write_text(json.dumps(settings))
    log_path = root / f"{name}.log"
    base = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "imaging_cds.cli", "serve", "--config", str(config), "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(f"{base}/models/", timeout=1)
                break
            except requests.RequestException:
                assert process.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "imaging-cds serve did not start"
                time.sleep(0.2)
        yield Serving(base, process, log_path)
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=15)


def kill_hard(serving: Serving) -> None:
    """SIGKILL the service: no atexit handler, no flush, no drain - as a crash or the OOM killer would."""
    os.kill(serving.process.pid, signal.SIGKILL)
    serving.process.wait(timeout=10)


def cds_jwt(key: jwk.Key, audience: str, *, alg: str = "ES384", jti: str | None = None) -> str:
    """A CDS client JWT as an EHR signs one for each call (five minutes at most, its own ``jti``)."""
    now = int(time.time())
    claims = {
        "iss": EHR_ISS,
        "sub": "ehr-client",
        "aud": audience,
        "exp": now + 60,
        "iat": now,
        "jti": jti or str(uuid.uuid4()),
    }
    return jwt.encode({"alg": alg, "kid": key.kid, "typ": "JWT"}, claims, key, algorithms=[alg])


__all__ = ["EHR_ISS", "Serving", "base_settings", "cds_jwt", "free_port", "kill_hard", "serving", "write_state_key"]

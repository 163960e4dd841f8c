"""Test support for the CDS Hooks tests: a CDS client's keys and JWTs, AI results in the real FHIR server,
and loopback servers that serve a JWK Set or record that nobody connected.

The CDS *client* (an EHR) cannot run here, so the tests play its part: they sign JWTs with keys generated
per session, exactly as an EHR would, and send hook requests. The FHIR data is real: AI results are built
with :func:`fhir_adapters.builders.build_results_bundle` and posted to the real sekmet-fhir server.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from cds.config import CdsConfig, TrustedClient
from cds.services import SERVICES
from core.allowlist import AllowList
from fhir_adapters.builders import AnalysisTarget, DeviceInfo, build_results_bundle, build_signoff_bundle
from models.base import AnalysisResult, Category, Measurement

EHR_ISS = "https://ehr.example.org"
CDS_BASE = "https://cds.example.org"
APP_LAUNCH = "https://app.example.org/launch"
MODEL_CARDS = "https://imaging-cds.example.org"


@dataclass
class EhrKeys:
    """The CDS client's signing keys (ES384 primary, RS384 second), with their public JWK Set."""

    ec: ECKey = field(default_factory=lambda: ECKey.generate_key("P-384", parameters={"kid": "ehr-es384"}))
    rsa: RSAKey = field(default_factory=lambda: RSAKey.generate_key(2048, parameters={"kid": "ehr-rs384"}))

    def public_jwks(self) -> dict[str, Any]:
        return {"keys": [self.ec.as_dict(private=False), self.rsa.as_dict(private=False)]}

    def sign(
        self,
        path: str,
        *,
        alg: str = "ES384",
        header: dict[str, Any] | None = None,
        drop_kid: bool = False,
        **claims: Any,
    ) -> str:
        """A CDS client JWT for ``POST/GET {CDS_BASE}{path}``; keyword arguments override claims."""
        now = int(time.time())
        body = {"iss": EHR_ISS, "sub": "ehr-client", "aud": CDS_BASE + path, "iat": now, "exp": now + 240}
        body["jti"] = str(uuid.uuid4())
        body.update(claims)
        key = self.ec if alg.startswith("ES") else self.rsa
        head = {"alg": alg, "typ": "JWT", "kid": key.kid}
        if drop_kid:
            head.pop("kid")
        head.update(header or {})
        return jwt.encode(head, body, key, algorithms=[alg])


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def make_config(tmp_path: Path, keys: EhrKeys, fhir_base: str, **overrides: Any) -> CdsConfig:
    client = overrides.pop("client", None) or TrustedClient(iss=EHR_ISS, jwks=keys.public_jwks())
    values: dict[str, Any] = {
        "public_base_url": CDS_BASE,
        "trusted_clients": (client,),
        "fhir_allow_list": AllowList.of([fhir_base]),
        "app_launch_url": APP_LAUNCH,
        "model_card_base_url": MODEL_CARDS,
        "feedback_db": tmp_path / "feedback.sqlite",
    }
    values.update(overrides)
    return CdsConfig(**values)


# ---------------------------------------------------------------- FHIR data


def _post(base: str, resource: dict[str, Any]) -> dict[str, Any]:
    response = requests.post(f"{base}/{resource['resourceType']}", json=resource, timeout=30)
    response.raise_for_status()
    created: dict[str, Any] = response.json()
    return created


def create_patient(base: str) -> str:
    return str(_post(base, {"resourceType": "Patient", "name": [{"family": "Test", "given": ["CDS"]}]})["id"])


def create_study(base: str, patient_id: str, *, started: str, based_on: str | None = None) -> str:
    uid = f"2.25.{uuid.uuid4().int}"
    study: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}],
        "status": "available",
        "subject": {"reference": f"Patient/{patient_id}"},
        "started": started,
        "modality": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}],
    }
    if based_on:
        study["basedOn"] = [{"reference": based_on}]
    return str(_post(base, study)["id"])


def emphysema_result(laa_percent: float = 12.4) -> AnalysisResult:
    return AnalysisResult(
        analyzer="ct-emphysema",
        version="1.0.0",
        measurements=(
            Measurement("laa950_percent", "Lung volume below -950 HU (LAA-950)", laa_percent, "%", "H"),
            Measurement("lung_volume_ml", "Segmented lung volume", 5321.0, "mL"),
        ),
        category=Category("moderate", "Moderate emphysema (LAA-950 10-20%)", "test rule", abnormal=True),
        conclusion=f"LAA-950 {laa_percent}% of lung volume: moderate emphysema.",
    )


def bone_result(hu: float = 86.0) -> AnalysisResult:
    return AnalysisResult(
        analyzer="ct-bone",
        version="0.3.1",
        measurements=(Measurement("l1_trabecular_hu", "L1 trabecular attenuation", hu, "[hnsf'U]", "L"),),
        category=Category("osteoporosis", "Osteoporosis likely (L1 <= 100 HU)", "test rule", abnormal=True),
        conclusion=f"L1 trabecular attenuation {hu} HU, in the range associated with osteoporosis.",
    )


def normal_emphysema_result() -> AnalysisResult:
    return AnalysisResult(
        analyzer="ct-emphysema",
        version="1.0.0",
        measurements=(Measurement("laa950_percent", "Lung volume below -950 HU (LAA-950)", 1.2, "%", "N"),),
        category=Category("none", "No emphysema by CT densitometry (LAA-950 < 5%)", "test rule", abnormal=False),
        conclusion="LAA-950 1.2%: no emphysema.",
    )


def post_result(base: str, patient_id: str, study_id: str, result: AnalysisResult, *, started: str) -> str:
    """Write ``result`` as the pipeline does (one transaction); return the DiagnosticReport reference."""
    target = AnalysisTarget(
        imaging_study_id=study_id,
        patient_reference=f"Patient/{patient_id}",
        study_uid=f"2.25.{uuid.uuid4().int}",
        series_uid=f"2.25.{uuid.uuid4().int}",
        selection_reason="test",
        study_started=started,
    )
    device = DeviceInfo(name=result.analyzer, version=result.version, title=result.analyzer)
    bundle = build_results_bundle(target, result, device, issued=datetime.now(UTC))
    response = requests.post(base, json=bundle, timeout=60)
    response.raise_for_status()
    for entry in response.json()["entry"]:
        location = entry["response"]["location"].removeprefix(base + "/")
        if location.startswith("DiagnosticReport/"):
            return "/".join(location.split("/")[:2])
    raise AssertionError("no DiagnosticReport in the transaction response")


def sign_off(base: str, report_reference: str) -> None:
    """A clinician accepts the AI report: the real sign-off transaction (report becomes ``final``)."""
    practitioner = _post(base, {"resourceType": "Practitioner", "name": [{"family": "Reviewer"}]})
    report = requests.get(f"{base}/{report_reference}", timeout=30).json()
    bundle = build_signoff_bundle(
        report, f"Practitioner/{practitioner['id']}", accepted=True, reason=None, when=datetime.now(UTC)
    )
    requests.post(base, json=bundle, timeout=60).raise_for_status()


def prefetch_for(base: str, service_id: str, patient_id: str) -> dict[str, Any]:
    """What an EHR would prefetch for ``service_id``: each discovery template run against the FHIR server."""
    prefetch = {}
    for key, template in SERVICES[service_id].prefetch.items():
        query = template.replace("{{context.patientId}}", patient_id)
        response = requests.get(f"{base}/{query}", timeout=30)
        response.raise_for_status()
        prefetch[key] = response.json()
    return prefetch


# ---------------------------------------------------------------- loopback servers


@contextmanager
def jwks_server(jwks: dict[str, Any]) -> Iterator[tuple[str, list[str]]]:
    """Serve ``jwks`` at ``http://127.0.0.1:<port>/jwks.json``; yields (url, paths requested)."""
    requested: list[str] = []
    body = json.dumps(jwks).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requested.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json", requested
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def recording_listener() -> Iterator[tuple[str, list[tuple[str, int]]]]:
    """A loopback TCP listener that records every connection made to it (and answers nothing useful)."""
    connections: list[tuple[str, int]] = []
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.settimeout(0.2)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, address = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            connections.append(address)
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", connections
    finally:
        stop.set()
        thread.join(timeout=2)
        sock.close()

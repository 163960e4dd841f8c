"""Shared set-up for the clinician-app tests: the sandbox EHR in front of the real sekmet-fhir, the app on loopback.

Everything here is real: sekmet-fhir and Orthanc from ``tests/conftest.py``, the sandbox EHR (an authlib
authorization server and a scope-enforcing proxy), and the Flask app served by werkzeug in a thread.
"""

from __future__ import annotations

import base64
import re
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

if TYPE_CHECKING:
    from devtools.demo import LoadedStudy
    from devtools.sandbox.dev import RunningApp
    from fhir_adapters.client import FhirClient

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parent.parent / "artifacts" / "screenshots"


def practitioner_resource(name: str) -> dict[str, object]:
    return {
        "resourceType": "Practitioner",
        "identifier": [{"system": "http://imaging-cds.org/fhir/sid/test-practitioner", "value": str(uuid.uuid4())}],
        "name": [{"family": name, "given": ["Test"], "prefix": ["Dr"]}],
    }


def launch_over_http(app: RunningApp, chest_ct: LoadedStudy, practitioner: str, *, drop: str = "") -> requests.Response:
    """Click the app in the EHR, approve the consent page (unticking scopes matching ``drop``), land in the app."""
    browser = requests.Session()
    url = app.sandbox.launch_url(chest_ct.patient.split("/")[1], practitioner, app.launch_url)
    consent = browser.get(url, timeout=30)
    assert consent.status_code == 200, consent.text[:300]
    transaction = re.search(r'name="transaction" value="([^"]+)"', consent.text)
    assert transaction is not None
    scopes = re.findall(r'name="granted" value="([^"]+)"', consent.text)
    granted = [s for s in scopes if not (drop and re.search(drop, s))]
    answer = browser.post(
        f"{app.sandbox.base_url}/authorize/decision",
        data={"transaction": transaction.group(1), "decision": "approve", "granted": granted},
        timeout=60,
    )
    answer.session = browser  # type: ignore[attr-defined]
    return answer


def audit_events(app: RunningApp, fhir: FhirClient, patient: str) -> list[dict[str, Any]]:
    """The AuditEvents about ``patient`` in the real FHIR server, once the app's outbox has been sent there."""
    app.audit.drainer.drain_once()  # type: ignore[union-attr]
    assert app.audit.outbox.pending() == 0 and not app.audit.outbox.refused()
    return list(fhir.search("AuditEvent", {"patient": patient, "_count": "500"}))


def profile_of(event: dict[str, Any]) -> str | None:
    """The BALP profile an AuditEvent claims (``PatientRead``...), or ``None``."""
    profiles = event.get("meta", {}).get("profile", [])
    return profiles[0].rsplit(".", 1)[-1] if profiles else None


def entity_of(event: dict[str, Any]) -> str | None:
    """What an AuditEvent is about: its data entity's reference, its query (``GET Type``), else its patient."""
    for entity in event.get("entity", []):
        if entity.get("role", {}).get("code") in ("3", "4") and "reference" in entity.get("what", {}):
            return str(entity["what"]["reference"])
        if "query" in entity:
            return base64.b64decode(entity["query"]).decode().split("?", 1)[0]
    return next(
        (str(e["what"]["reference"]) for e in event.get("entity", []) if e.get("role", {}).get("code") == "1"), None
    )


def app_pacs(app: RunningApp) -> str:
    """The PACS the app may fetch from (the DICOMweb prefix it was configured with)."""
    return str(app.ext.config.dicomweb_allow_list.prefixes[0]).rstrip("/")

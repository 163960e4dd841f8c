"""Shared set-up for the clinician-app tests: the sandbox EHR in front of the real sekmet-fhir, the app on loopback.

Everything here is real: sekmet-fhir and Orthanc from ``tests/conftest.py``, the sandbox EHR (an authlib
authorization server and a scope-enforcing proxy), and the Flask app served by werkzeug in a thread.
"""

from __future__ import annotations

import uuid
from pathlib import Path

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

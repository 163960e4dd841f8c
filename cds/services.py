"""The CDS services this plugin offers, as the discovery endpoint describes them.

Prefetch templates ask the CDS client for exactly what the cards need, so that a well-behaved EHR sends it
with the hook call and this service never has to call back: the patient's imaging studies (to link an order
to its studies) and the patient's AI DiagnosticReports, recognised by the project's analysis identifier
system, with their result Observations included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fhir_adapters.constants import ANALYSIS_IDENTIFIER_SYSTEM

PATIENT_VIEW = "imaging-ai-patient-view"
ORDER_SELECT = "imaging-ai-order-select"
ORDER_SIGN = "imaging-ai-order-sign"

IMAGING_STUDIES_KEY = "imagingStudies"
AI_REPORTS_KEY = "aiReports"

PREFETCH_TEMPLATES: dict[str, str] = {
    IMAGING_STUDIES_KEY: "ImagingStudy?patient={{context.patientId}}&_count=100",
    AI_REPORTS_KEY: (
        f"DiagnosticReport?patient={{{{context.patientId}}}}&identifier={ANALYSIS_IDENTIFIER_SYSTEM}|"
        "&_include=DiagnosticReport:result&_count=100"
    ),
}


@dataclass(frozen=True)
class ServiceDefinition:
    """One entry of the discovery document; ``required_context`` is what the hook request must carry."""

    id: str
    hook: str
    title: str
    description: str
    prefetch: dict[str, str]
    usage_requirements: str
    required_context: tuple[str, ...]

    def discovery_entry(self) -> dict[str, Any]:
        return {
            "hook": self.hook,
            "id": self.id,
            "title": self.title,
            "description": self.description,
            "prefetch": dict(self.prefetch),
            "usageRequirements": self.usage_requirements,
        }


_USAGE = (
    "The CDS client must be registered as a trusted client (JWT iss and keys). Send the prefetch, or give "
    "fhirServer (on this service's allow-list) and fhirAuthorization with read access to ImagingStudy, "
    "DiagnosticReport and Observation for the patient. Cards summarise AI results already in the EHR; "
    "no image analysis runs during the hook."
)

SERVICES: dict[str, ServiceDefinition] = {
    s.id: s
    for s in (
        ServiceDefinition(
            id=PATIENT_VIEW,
            hook="patient-view",
            title="Imaging AI findings for this patient",
            description=(
                "Summarises AI imaging findings awaiting clinician review and notable recent signed findings, "
                "says when a finding progressed since the prior study (beyond its published repeatability), "
                "with a link that opens the imaging-cds app for the patient."
            ),
            prefetch=dict(PREFETCH_TEMPLATES),
            usage_requirements=_USAGE,
            required_context=("patientId",),
        ),
        ServiceDefinition(
            id=ORDER_SELECT,
            hook="order-select",
            title="Prior imaging AI findings for a new imaging order",
            description=(
                "When an imaging ServiceRequest is selected, brings relevant prior AI findings (same body region "
                "or modality) to the order, with suggestions where a guideline supports one; for a follow-up CT, "
                "the interval since the prior AI result and what a new analysis will compare with it."
            ),
            prefetch=dict(PREFETCH_TEMPLATES),
            usage_requirements=_USAGE,
            required_context=("patientId", "selections", "draftOrders"),
        ),
        ServiceDefinition(
            id=ORDER_SIGN,
            hook="order-sign",
            title="Imaging AI check before an imaging order is signed",
            description=(
                "Before imaging orders are signed, shows relevant prior AI findings, and says which referenced "
                "studies have no AI results yet (and whether their analysis was queued)."
            ),
            prefetch=dict(PREFETCH_TEMPLATES),
            usage_requirements=_USAGE,
            required_context=("patientId", "draftOrders"),
        ),
    )
}


def discovery_document() -> dict[str, Any]:
    """The body of ``GET /cds-services``."""
    return {"services": [s.discovery_entry() for s in SERVICES.values()]}

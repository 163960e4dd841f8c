"""Read the project's AI results back out of FHIR: DiagnosticReports (plus their Observations) -> findings.

The pipeline writes each analysis as a DiagnosticReport identified by
:data:`fhir_adapters.constants.ANALYSIS_IDENTIFIER_SYSTEM`, with ``conclusionCode`` in the project's
finding-category CodeSystem (``"<analyzer>/<category>"``) and result Observations coded in its measurement
CodeSystem. Recognising them by those systems - never by free text - means a human radiology report or
another vendor's AI result is never mistaken for ours. These are pure functions over JSON; an element of the
wrong JSON type reads as absent (see :mod:`cds.fhirjson`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cds import fhirjson
from fhir_adapters.constants import (
    ABNORMAL_INTERPRETATION_SYSTEM,
    ANALYSIS_IDENTIFIER_SYSTEM,
    CATEGORY_CODESYSTEM,
    DEVICE_IDENTIFIER_SYSTEM,
    MEASUREMENT_CODESYSTEM,
)

NORMAL_CATEGORY_CODES = frozenset({"none", "normal", "negative", "no-finding", "not-detected", "benign"})
"""Fallback for reports without an explicit A/N conclusion code: category codes that mean "nothing abnormal"."""
AWAITING_REVIEW_STATUSES = frozenset({"registered", "partial", "preliminary"})
SIGNED_STATUSES = frozenset({"final", "amended", "corrected", "appended"})


@dataclass(frozen=True)
class MeasuredValue:
    """One measurement of an AI result, as stored in its Observation."""

    key: str
    display: str
    value: float
    unit: str
    interpretation: str | None = None


@dataclass(frozen=True)
class AiFinding:
    """One AI analysis of one study, as the EHR holds it."""

    report_reference: str  # "DiagnosticReport/<id>"
    analyzer: str
    version: str | None
    category_code: str
    category_display: str
    status: str
    conclusion: str
    imaging_studies: tuple[str, ...]
    effective: datetime | None
    measurements: tuple[MeasuredValue, ...]
    stated_abnormal: bool | None = None  # the report's own A/N conclusion code, when it has one

    @property
    def abnormal(self) -> bool:
        if self.stated_abnormal is not None:
            return self.stated_abnormal
        return self.category_code not in NORMAL_CATEGORY_CODES

    @property
    def awaiting_review(self) -> bool:
        return self.status in AWAITING_REVIEW_STATUSES

    @property
    def signed(self) -> bool:
        return self.status in SIGNED_STATUSES

    def measurement(self, key: str) -> MeasuredValue | None:
        return next((m for m in self.measurements if m.key == key), None)


def bundle_resources(bundle: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The resources in a Bundle's entries (an absent or empty Bundle gives none)."""
    if not isinstance(bundle, dict):
        return []
    return [
        e["resource"]
        for e in fhirjson.items(bundle.get("entry"))
        if isinstance(e, dict) and isinstance(e.get("resource"), dict)
    ]


def _codings(concept: Any) -> list[Mapping[str, Any]]:
    return [c for c in fhirjson.items(fhirjson.element(concept).get("coding")) if isinstance(c, dict)]


def parse_datetime(value: Any) -> datetime | None:
    """A FHIR dateTime/instant as an aware datetime (dates and partial dates count from their start, UTC)."""
    if not isinstance(value, str) or not value:
        return None
    text = value.replace("Z", "+00:00")
    for candidate in (text, text + "-01-01" if len(text) == 4 else text, text + "-01" if len(text) == 7 else text):
        try:
            parsed = datetime.fromisoformat(candidate)
        except ValueError:
            continue
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def is_ai_report(resource: Mapping[str, Any]) -> bool:
    return resource.get("resourceType") == "DiagnosticReport" and any(
        isinstance(i, dict) and i.get("system") == ANALYSIS_IDENTIFIER_SYSTEM
        for i in fhirjson.items(resource.get("identifier"))
    )


def _analyzer_and_category(report: Mapping[str, Any]) -> tuple[str, str, str] | None:
    for concept in fhirjson.items(report.get("conclusionCode")):
        for coding in _codings(concept):
            code = coding.get("code")
            if coding.get("system") == CATEGORY_CODESYSTEM and isinstance(code, str) and "/" in code:
                analyzer, _, category = code.partition("/")
                return (
                    analyzer,
                    category,
                    str(coding.get("display") or fhirjson.element(concept).get("text") or category),
                )
    return None


def _stated_abnormal(report: Mapping[str, Any]) -> bool | None:
    """The analyzer's own verdict, written by the builders as a v3 ObservationInterpretation A/N code."""
    for concept in fhirjson.items(report.get("conclusionCode")):
        for coding in _codings(concept):
            if coding.get("system") == ABNORMAL_INTERPRETATION_SYSTEM and coding.get("code") in ("A", "N"):
                return coding.get("code") == "A"
    return None


def _measured_value(observation: Mapping[str, Any]) -> MeasuredValue | None:
    coding = next((c for c in _codings(observation.get("code")) if c.get("system") == MEASUREMENT_CODESYSTEM), None)
    quantity = observation.get("valueQuantity")
    if coding is None or not isinstance(quantity, dict) or not isinstance(quantity.get("value"), int | float):
        return None
    interpretation = next(
        (
            str(c.get("code"))
            for concept in fhirjson.items(observation.get("interpretation"))
            for c in _codings(concept)
        ),
        None,
    )
    return MeasuredValue(
        key=str(coding.get("code")),
        display=str(
            coding.get("display") or fhirjson.element(observation.get("code")).get("text") or coding.get("code")
        ),
        value=float(quantity["value"]),
        unit=str(quantity.get("unit") or quantity.get("code") or ""),
        interpretation=interpretation,
    )


def _device_versions(resources: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """``{"Device/<id>": "<name>@<version>"}`` for analyzer Devices present in the data."""
    versions: dict[str, str] = {}
    for resource in resources:
        if resource.get("resourceType") != "Device":
            continue
        for identifier in fhirjson.items(resource.get("identifier")):
            if isinstance(identifier, dict) and identifier.get("system") == DEVICE_IDENTIFIER_SYSTEM:
                versions[f"Device/{resource.get('id')}"] = str(identifier.get("value", ""))
    return versions


def extract_findings(resources: Iterable[Mapping[str, Any]], *, patient_id: str | None = None) -> list[AiFinding]:
    """AI findings among ``resources`` (reports plus included Observations/Devices), newest first.

    Reports without the project's identifier or category coding are skipped: they are not ours to summarise.
    Cancelled and entered-in-error reports are skipped too. With ``patient_id``, a report about any other
    patient is skipped: a mis-built prefetch must never put one patient's finding on another's card.
    """
    subject = f"Patient/{patient_id}" if patient_id else None
    items = [r for r in resources if isinstance(r, dict)]
    by_reference = {f"{r.get('resourceType')}/{r.get('id')}": r for r in items if r.get("id")}
    devices = _device_versions(items)
    findings: list[AiFinding] = []
    for report in items:
        if not is_ai_report(report) or report.get("status") in ("cancelled", "entered-in-error"):
            continue
        if subject is not None:
            about = fhirjson.reference(report.get("subject"))
            if about != subject and not about.endswith("/" + subject):
                continue
        parsed = _analyzer_and_category(report)
        if parsed is None:
            continue
        analyzer, category, category_display = parsed
        measurements: list[MeasuredValue] = []
        version: str | None = None
        for ref in fhirjson.items(report.get("result")):
            observation = by_reference.get(fhirjson.reference(ref))
            if observation is None:
                continue
            value = _measured_value(observation)
            if value is not None:
                measurements.append(value)
            device = devices.get(fhirjson.reference(observation.get("device")))
            if device and "@" in device:
                version = device.partition("@")[2]
        findings.append(
            AiFinding(
                report_reference=f"DiagnosticReport/{report.get('id')}",
                analyzer=analyzer,
                version=version,
                category_code=category,
                category_display=category_display,
                status=str(report.get("status", "")),
                conclusion=str(report.get("conclusion", "")),
                imaging_studies=tuple(
                    r for r in map(fhirjson.reference, fhirjson.items(report.get("imagingStudy"))) if r
                ),
                effective=parse_datetime(report.get("effectiveDateTime") or report.get("issued")),
                measurements=tuple(measurements),
                stated_abnormal=_stated_abnormal(report),
            )
        )
    oldest = datetime.min.replace(tzinfo=UTC)
    findings.sort(key=lambda f: f.effective or oldest, reverse=True)
    return findings

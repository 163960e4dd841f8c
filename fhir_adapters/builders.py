"""Turn an analyzer's findings into ONE idempotent FHIR R4 transaction, and a clinician's review into another.

This is the one place where ``models.base.AnalysisResult`` becomes FHIR. The results transaction holds:

* the ``Device`` that stands for the analyzer version (identifier ``<name>@<version>``, model SHA-256, card);
* one ``Observation`` per measurement (plus one for ``AnalysisResult.probability`` when no measurement
  already carries it), status ``preliminary``, derived from the ImagingStudy, produced by the Device;
* one ``Observation`` per exam-level assessment (``AnalysisResult.assessments``: a guideline category, a
  recommendation) with the coded value and the rule that gave it;
* one ``Observation`` per finding (``AnalysisResult.findings``: a nodule, a lesion), its measurements and coded
  attributes as components, its body site, its location in words, derived from the ImagingStudy and from the
  Media that show it;
* one ``Media`` per explanation image (PNG), marked as an AI explanation, not a diagnostic image;
* the ``DiagnosticReport`` (status ``preliminary``, no performer or interpreter: the AI is neither) linking
  them, with a human-readable HTML report in ``presentedForm``;
* a ``Provenance`` naming the Device as author of every new clinical resource, the ImagingStudy as source;
* with a :class:`~models.followup.FollowupComparison`, one ``Observation`` per compared measurement (derived from
  the current and the prior measurement, the prior study's date in a component, the verdict as its value), and the
  report's conclusion states the comparison. The report records how the images were acquired (extension
  :data:`~fhir_adapters.constants.ACQUISITION_EXTENSION`), which a later comparison reads back;
* for lesions matched with the prior's (:attr:`~models.followup.FollowupComparison.lesions`), one ``Observation``
  per matched, new or resolved lesion (derived from the current and the prior finding's Observation), coded
  ``lesion-since-prior``. A finding's centre (patient coordinates) is filed as components of its Observation, and
  the lungs' extent as the report's extension :data:`~fhir_adapters.constants.LUNG_EXTENT_EXTENSION`: what the next
  scan's lesions are matched against.

Idempotency: every resource but the Provenance has an identifier derived from :func:`analysis_identifier`
(study UID + series UID + analyzer + version; findings add their stable key, ``/finding/nodule-1``) and is POSTed
with ``ifNoneExist``, so re-running an analysis creates nothing new; the server answers with the existing
resources and resolves the ``urn:uuid`` references to them. R4 Provenance has no identifier, so it gets a
deterministic id and ``PUT Provenance/<id>`` (update-as-create): a re-run writes a new *version* of the same
Provenance, never a second Provenance.
sekmet-fhir supports both in a transaction (checked against the real server in ``tests/test_builders.py``).

Every resource asserted by the AI (Observation, Media, DiagnosticReport) carries the HL7 AI Transparency
security label AIAST in ``meta.security``. The Device (a description of software) and the Provenance
(written by this service about the AI) are not AI assertions and carry none.

Every resource and the bundle are validated against the R4 JSON schema before they are returned.

How the bundle reaches a server (as one transaction, or as ordered writes with the report last; images inline or
in a ``Binary`` given by :func:`media_image_binary`) is :mod:`fhir_adapters.writer`'s choice, per server.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import html
import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from core.errors import ConfigurationError, ImagingCdsError
from fhir_adapters import constants, terminology
from fhir_adapters.validation import validate_bundle, validate_resource
from models.base import AnalysisResult, CodedValue, Explanation, Finding, Measurement, probability_percent
from models.followup import MEAN_DIAMETER_KEY, Acquisition, FollowupComparison, MeasurementChange
from models.lesion_followup import Box, LesionMatch

# Identifier.system of the model weights' SHA-256 on the Device (searchable: find the Device by weights).
MODEL_SHA256_IDENTIFIER_SYSTEM = f"{constants.CANONICAL_BASE}/sid/model-sha256"

AI_DISCLAIMER = "AI-generated, preliminary, requires clinician review."
LESION_RULES = (
    "Growth: a mean-diameter increase over 1.5 mm within 12 months (Lung-RADS v2022, ACR; Christensen J et al., "
    "J Am Coll Radiol 2024); a volume change within 25 % is measurement error (NELSON, van Klaveren RJ et al., N Engl "
    "J Med 2009); volume doubling time bands of NELSON (Horeweg N et al., Lancet Oncol 2014). Nodules are matched by "
    "position after aligning the two scans' lungs (a project rule)."
)
ACCEPTED_NOTE = "AI-generated; reviewed and accepted by a clinician."

# Namespace of every UUID this module derives; changing it would break idempotency with earlier runs.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, f"{constants.CANONICAL_BASE}/analysis")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class SignoffInputError(ImagingCdsError):
    """A clinician's review cannot be recorded as given (no reason for a rejection, not a report)."""

    http_status = 422


@dataclass(frozen=True)
class DeviceInfo:
    """The analyzer version, as the EHR should know it.

    ``model_sha256`` is the SHA-256 (hex) of the weights file, ``card_url`` the model card (intended use,
    validation, limits) a clinician can open from the report.
    """

    name: str
    version: str
    title: str
    model_sha256: str | None = None
    card_url: str | None = None

    def __post_init__(self) -> None:
        if self.model_sha256 is not None and not _SHA256.match(self.model_sha256):
            raise ConfigurationError(
                f"Analyzer {self.name!r} {self.version}: model_sha256 is not 64 lower-case hex digits.",
                remedy="Record the weights' digest as printed by `sha256sum`.",
            )

    @property
    def identifier_value(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class AnalysisTarget:
    """What was analysed: the EHR's ImagingStudy, its patient, and the DICOM study and series chosen.

    ``imaging_study_id`` is the ImagingStudy's logical id (or a relative reference ``ImagingStudy/<id>``);
    ``patient_reference`` is ``Patient/<id>``. ``selection_reason`` says in words why this series was
    chosen (shown in the report). ``study_started`` is ``ImagingStudy.started`` when known: the report's
    and observations' effective time is when the images were acquired, not when the AI ran. ``acquisition`` is how
    the series was acquired (slice thickness, kernel, contrast...), filed with the report for later comparisons.
    """

    imaging_study_id: str
    patient_reference: str
    study_uid: str
    series_uid: str
    selection_reason: str
    study_started: str | None = None
    acquisition: Acquisition | None = None

    @property
    def imaging_study_reference(self) -> str:
        if "/" in self.imaging_study_id:
            return self.imaging_study_id
        return f"ImagingStudy/{self.imaging_study_id}"


def analysis_identifier(study_uid: str, series_uid: str, analyzer: str, version: str) -> str:
    """The deterministic identifier of one analysis: a name-based UUID (v5) of the four values.

    UUID v5 (SHA-1 over a project namespace and ``"<study>|<series>|<analyzer>|<version>"``) gives the same
    value on every run and machine and differs when any of them changes (a new model version is a new
    analysis). Per-resource identifiers append ``/obs/<key>`` and ``/media/<n>``.
    """
    return str(uuid.uuid5(_NAMESPACE, "|".join((study_uid, series_uid, analyzer, version))))


def _uuid_for(name: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, name))


def _instant(when: datetime) -> str:
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError("FHIR instants need a time zone; pass an aware datetime (e.g. datetime.now(UTC)).")
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _security() -> dict[str, Any]:
    return {"security": [terminology.AI_ASSERTED.coding()]}


def _identifier(value: str) -> list[dict[str, str]]:
    return [{"system": constants.ANALYSIS_IDENTIFIER_SYSTEM, "value": value}]


def identifier_query(system: str, value: str) -> str:
    """``ifNoneExist`` query for one identifier, with characters outside ordinary ones percent-encoded."""
    return "identifier=" + quote(f"{system}|{value}", safe=":/|@")


def conditional_create_entry(full_url: str, resource: dict[str, Any], system: str, value: str) -> dict[str, Any]:
    """A transaction entry that creates ``resource`` unless one with this identifier already exists."""
    return {
        "fullUrl": full_url,
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"], "ifNoneExist": identifier_query(system, value)},
    }


def _png_size(png: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG's IHDR chunk (no image library needed)."""
    if len(png) < 24 or not png.startswith(_PNG_SIGNATURE) or png[12:16] != b"IHDR":
        return None
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def _format_value(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"


def _check_measurement(analyzer: str, m: Measurement) -> None:
    if not math.isfinite(m.value):
        raise ConfigurationError(
            f"Analyzer {analyzer!r} reported a non-finite value for {m.key!r}.",
            remedy="The analyzer must report finite numbers or leave the measurement out.",
        )


def _device(device: DeviceInfo) -> dict[str, Any]:
    identifiers = [{"system": constants.DEVICE_IDENTIFIER_SYSTEM, "value": device.identifier_value}]
    notes = [f"AI image analysis software '{device.title}' ({device.identifier_value})."]
    if device.model_sha256:
        identifiers.append({"system": MODEL_SHA256_IDENTIFIER_SYSTEM, "value": device.model_sha256})
        notes.append(f"Model weights SHA-256: {device.model_sha256}.")
    if device.card_url:
        notes.append(f"Model card (intended use, validation, limitations): {device.card_url}")
    resource: dict[str, Any] = {
        "resourceType": "Device",
        "identifier": identifiers,
        "status": "active",
        "deviceName": [
            {"name": device.title, "type": "user-friendly-name"},
            {"name": device.name, "type": "model-name"},
        ],
        "type": {"text": "Medical image analysis software (artificial intelligence)"},
        "version": [{"value": device.version}],
        "note": [{"text": " ".join(notes)}],
    }
    if device.card_url:
        resource["url"] = device.card_url
    return resource


def _measurement_note(result: AnalysisResult, text: str) -> list[dict[str, str]]:
    notes = [{"text": text}] if text else []
    notes.append({"text": f"Measured by {result.analyzer} {result.version}. {AI_DISCLAIMER}"})
    return notes


def _observation(
    target: AnalysisTarget,
    result: AnalysisResult,
    m: Measurement,
    *,
    identifier: str,
    device_url: str,
    issued: str,
) -> dict[str, Any]:
    observation = _imaging_observation(
        target, terminology.measurement_concept(m.key, m.display), identifier=identifier, issued=issued
    )
    observation["valueQuantity"] = terminology.quantity(m.value, m.unit)
    if m.interpretation is not None:
        observation["interpretation"] = [terminology.interpretation_concept(m.interpretation)]
    observation["note"] = _measurement_note(result, m.note)
    if m.reference_low is not None or m.reference_high is not None:
        reference: dict[str, Any] = {}
        if m.reference_low is not None:
            reference["low"] = terminology.quantity(m.reference_low, m.unit)
        if m.reference_high is not None:
            reference["high"] = terminology.quantity(m.reference_high, m.unit)
        observation["referenceRange"] = [reference]
    observation["device"] = {"reference": device_url}
    observation["derivedFrom"] = [{"reference": target.imaging_study_reference}]
    return observation


def _imaging_observation(
    target: AnalysisTarget,
    code: dict[str, Any],
    *,
    identifier: str,
    issued: str,
) -> dict[str, Any]:
    """The fields every AI Observation shares, in R4 element order up to ``issued`` (the current study's times: a
    comparison with the prior is a finding of the current study too)."""
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "meta": _security(),
        "identifier": _identifier(identifier),
        "status": "preliminary",
        "category": [terminology.IMAGING_CATEGORY.concept()],
        "code": code,
        "subject": {"reference": target.patient_reference},
    }
    if target.study_started:
        observation["effectiveDateTime"] = target.study_started
    observation["issued"] = issued
    return observation


def _assessment_observation(
    target: AnalysisTarget,
    result: AnalysisResult,
    value: CodedValue,
    *,
    identifier: str,
    device_url: str,
    issued: str,
) -> dict[str, Any]:
    """An exam-level coded conclusion (a guideline category, a recommendation) with the rule that gave it."""
    observation = _imaging_observation(
        target,
        terminology.finding_concept(value.key, value.display),
        identifier=identifier,
        issued=issued,
    )
    observation["valueCodeableConcept"] = terminology.coded_value_concept(value)
    observation["note"] = _measurement_note(result, f"Rule: {value.rule}" if value.rule else "")
    observation["device"] = {"reference": device_url}
    observation["derivedFrom"] = [{"reference": target.imaging_study_reference}]
    return observation


def _finding_observation(
    target: AnalysisTarget,
    result: AnalysisResult,
    finding: Finding,
    *,
    identifier: str,
    device_url: str,
    issued: str,
    media_urls: list[str],
) -> dict[str, Any]:
    """One finding: what it is (code), where (bodySite, and in words), its values as components."""
    observation = _imaging_observation(
        target,
        terminology.finding_concept(finding.kind, finding.display),
        identifier=identifier,
        issued=issued,
    )
    notes = [finding.location, finding.note]
    observation["note"] = _measurement_note(result, " ".join(n for n in notes if n))
    if finding.body_site is not None:
        observation["bodySite"] = terminology.coded_value_concept(finding.body_site)
    observation["device"] = {"reference": device_url}
    derived = [{"reference": target.imaging_study_reference}]
    for index in finding.explanations:
        if not 0 <= index < len(media_urls):
            raise ConfigurationError(
                f"Analyzer {result.analyzer!r} finding {finding.key!r} points at explanation {index}, which "
                f"does not exist (the result has {len(media_urls)}).",
                remedy="Finding.explanations must index AnalysisResult.explanations.",
            )
        derived.append({"reference": media_urls[index]})
    observation["derivedFrom"] = derived
    components: list[dict[str, Any]] = []
    for m in finding.measurements:
        _check_measurement(result.analyzer, m)
        component: dict[str, Any] = {
            "code": terminology.measurement_concept(m.key, m.display),
            "valueQuantity": terminology.quantity(m.value, m.unit),
        }
        if m.interpretation is not None:
            component["interpretation"] = [terminology.interpretation_concept(m.interpretation)]
        components.append(component)
    for value in finding.values:
        components.append(
            {
                "code": terminology.finding_concept(value.key, value.display),
                "valueCodeableConcept": terminology.coded_value_concept(value),
            }
        )
    if finding.location:
        components.append(
            {"code": terminology.finding_concept("location", "Location"), "valueString": finding.location}
        )
    if finding.centre_mm is not None:
        for axis, coordinate in zip("xyz", finding.centre_mm, strict=True):
            components.append(
                {
                    "code": terminology.finding_concept(f"centre_{axis}", f"Centre, {axis} (DICOM LPS)"),
                    "valueQuantity": terminology.quantity(round(coordinate, 1), "mm"),
                }
            )
    observation["component"] = components
    return observation


def _check_keys(result: AnalysisResult) -> None:
    """Assessment keys and finding keys must be unique: they are part of the resources' identifiers."""
    for what, keys in (
        ("assessment", [a.key for a in result.assessments]),
        ("finding", [f.key for f in result.findings]),
    ):
        seen: set[str] = set()
        for key in keys:
            if key in seen:
                raise ConfigurationError(
                    f"Analyzer {result.analyzer!r} reported {what} {key!r} twice.",
                    remedy=f"Each {what} key must appear once per result.",
                )
            seen.add(key)


def _probability_measurement(result: AnalysisResult) -> Measurement | None:
    """A measurement for ``result.probability`` unless the analyzer already reports one (``*_probability``)."""
    if result.probability is None or any(m.key.endswith("_probability") for m in result.measurements):
        return None
    return Measurement(
        key=terminology.PROBABILITY_KEY,
        display=f"Model probability: {result.category.display}",
        value=float(result.probability),
        unit="1",
        note="The model's output score (0 to 1); not a calibrated clinical risk unless the model card says so.",
    )


def _media(
    target: AnalysisTarget,
    result: AnalysisResult,
    explanation: Explanation,
    *,
    identifier: str,
    device_url: str,
    issued: str,
) -> dict[str, Any]:
    size = _png_size(explanation.png)
    if size is None:
        raise ConfigurationError(
            f"Analyzer {result.analyzer!r} returned explanation {explanation.title!r} that is not a PNG image.",
            remedy="Explanations must be PNG bytes (models.base.Explanation.png).",
        )
    where = f" (slice {explanation.slice_index})" if explanation.slice_index is not None else ""
    media: dict[str, Any] = {
        "resourceType": "Media",
        "meta": _security(),
        "identifier": _identifier(identifier),
        "status": "completed",
        "type": terminology.IMAGE_MEDIA.concept(),
        "subject": {"reference": target.patient_reference},
        "issued": issued,
        "device": {"reference": device_url},
        "height": size[1],
        "width": size[0],
        "content": {
            "contentType": "image/png",
            "data": base64.b64encode(explanation.png).decode("ascii"),
            "title": explanation.title,
        },
        "note": [
            {
                "text": f"AI explanation ({explanation.kind}){where} from {result.analyzer} {result.version}: "
                "shows what the model based its finding on; not a diagnostic image. " + AI_DISCLAIMER
            }
        ],
    }
    return media


def _analysis_identifier_of(resource: Mapping[str, Any]) -> str:
    for identifier in resource.get("identifier") or []:
        if identifier.get("system") == constants.ANALYSIS_IDENTIFIER_SYSTEM and identifier.get("value"):
            return str(identifier["value"])
    raise ConfigurationError(
        f"The {resource.get('resourceType')} carries no analysis identifier.",
        remedy="Pass a resource built by build_results_bundle.",
    )


def media_image_binary(media: Mapping[str, Any]) -> dict[str, Any]:
    """The ``Binary`` that carries a key image when its ``Media`` is too large to carry it inline.

    Servers and the proxies before them cap request bodies (the SMART reference launcher at 1 MB, Medplum's JSON
    body limit at 1 MB), and a report with several key images can pass that in one request. The Binary holds the
    same PNG, carries the AI label like its Media, and names the patient in ``securityContext`` so a server
    controls access to it as to the patient's data. Its id derives from the Media's analysis identifier: writing
    it again (a re-run, a retry) replaces the same Binary on a server that allows update-as-create.
    """
    content = media.get("content") or {}
    if media.get("resourceType") != "Media" or not content.get("data"):
        raise ConfigurationError(
            "Only a Media that carries its image inline can give it to a Binary.",
            remedy="Pass a Media built by build_results_bundle.",
        )
    binary: dict[str, Any] = {
        "resourceType": "Binary",
        "id": _uuid_for(f"{_analysis_identifier_of(media)}/binary"),
        "meta": _security(),
        "contentType": content.get("contentType", "image/png"),
        "securityContext": {"reference": media["subject"]["reference"]},
        "data": content["data"],
    }
    validate_resource(binary)
    return binary


def media_with_image_at(media: Mapping[str, Any], binary_reference: str) -> dict[str, Any]:
    """The ``Media`` with its image in the Binary at ``binary_reference`` (``Binary/<id>``) instead of inline.

    ``content.url`` is a relative reference, resolved against the FHIR server's base like any reference (R4
    Attachment.url); ``size`` and ``hash`` (base64 SHA-1, as R4 specifies) let a reader check it got the image
    the report was written with.
    """
    content = dict(media.get("content") or {})
    png = base64.b64decode(str(content.pop("data", "")))
    if not png:
        raise ConfigurationError(
            "The Media carries no inline image to move to a Binary.", remedy="Pass the Media as built."
        )
    content["url"] = binary_reference
    content["size"] = len(png)
    content["hash"] = base64.b64encode(hashlib.sha1(png, usedforsecurity=False).digest()).decode("ascii")
    moved = {**copy.deepcopy(dict(media)), "content": content}
    validate_resource(moved)
    return moved


def _conclusion(result: AnalysisResult, comparison: FollowupComparison | None = None) -> str:
    parts = [result.conclusion.strip()]
    if comparison is not None:
        parts.append(comparison.sentence())
    if result.warnings:
        parts.append("Warnings: " + "; ".join(w.strip().rstrip(".") for w in result.warnings) + ".")
    parts.append(AI_DISCLAIMER)
    return " ".join(p for p in parts if p)


def render_report_html(
    target: AnalysisTarget,
    result: AnalysisResult,
    device: DeviceInfo,
    measurements: tuple[Measurement, ...],
    comparison: FollowupComparison | None = None,
) -> str:
    """The human-readable report a clinician opens from the EHR (``DiagnosticReport.presentedForm``).

    Everything is escaped: analyzer strings are not trusted markup.
    """
    e = html.escape
    rows = []
    for m in measurements:
        low = "" if m.reference_low is None else _format_value(m.reference_low)
        high = "" if m.reference_high is None else _format_value(m.reference_high)
        reference = f"{low} – {high}" if low and high else (f"≤ {high}" if high else (f"≥ {low}" if low else ""))
        rows.append(
            f"<tr><td>{e(m.display)}</td><td>{e(_format_value(m.value))}</td>"
            f"<td>{e(terminology.unit_label(m.unit))}</td><td>{e(reference)}</td>"
            f"<td>{e(m.interpretation or '')}</td></tr>"
        )
    warnings = "".join(f"<li>{e(w)}</li>" for w in result.warnings) or "<li>None.</li>"
    probability = (
        f"<p>Model probability: {probability_percent(result.probability):.1f} %</p>"
        if result.probability is not None
        else ""
    )
    card = f' <a href="{e(device.card_url)}">Model card</a>.' if device.card_url else ""
    extra = _assessments_html(result) + _findings_html(result)
    digest = f"<br>Model weights SHA-256: <code>{e(device.model_sha256)}</code>" if device.model_sha256 else ""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{e(device.title)}: AI analysis report</title></head><body>"
        f"<h1>{e(device.title)}: AI analysis report</h1>"
        f"<p><strong>{e(AI_DISCLAIMER)}</strong></p>"
        f"<h2>Conclusion</h2><p>{e(result.conclusion)}</p>"
        f"<h2>Category</h2><p>{e(result.category.display)} ({'abnormal' if result.category.abnormal else 'normal'})"
        f"</p><p>Rule: {e(result.category.rule)}</p>{probability}"
        "<h2>Measurements</h2><table><thead><tr><th>Measurement</th><th>Value</th><th>Unit</th>"
        f"<th>Reference range</th><th>Interpretation</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        f"{extra}{_comparison_html(comparison)}<h2>Warnings</h2><ul>{warnings}</ul>"
        f"<h2>Images analysed</h2><p>Study UID <code>{e(target.study_uid)}</code>, series UID "
        f"<code>{e(target.series_uid)}</code>.</p><p>Why this series: {e(target.selection_reason)}</p>"
        f"<h2>Analyzer</h2><p>{e(device.title)} ({e(device.name)}, version {e(device.version)}).{card}{digest}</p>"
        "</body></html>\n"
    )


def _assessments_html(result: AnalysisResult) -> str:
    """The exam-level assessments (a guideline category, a recommendation) with their rules; empty when none."""
    if not result.assessments:
        return ""
    e = html.escape
    items = "".join(
        f"<li><strong>{e(a.display)}</strong>: {e(a.code_display)}"
        + (f" <br>Rule: {e(a.rule)}" if a.rule else "")
        + "</li>"
        for a in result.assessments
    )
    return f"<h2>Assessments</h2><ul>{items}</ul>"


def _findings_html(result: AnalysisResult) -> str:
    """One row per finding: what and where, its values, its attributes; empty when the analyzer lists none."""
    if not result.findings:
        return ""
    e = html.escape
    rows = []
    for f in result.findings:
        values = "; ".join(
            f"{m.display} {_format_value(m.value)} {terminology.unit_label(m.unit)}".strip() for m in f.measurements
        )
        attributes = "; ".join(f"{v.display}: {v.code_display}" for v in f.values)
        rows.append(
            f"<tr><td>{e(f.display)}</td><td>{e(f.location)}</td><td>{e(values)}</td><td>{e(attributes)}</td>"
            f"<td>{e(f.note)}</td></tr>"
        )
    return (
        "<h2>Findings</h2><table><thead><tr><th>Finding</th><th>Location</th><th>Measurements</th>"
        f"<th>Attributes</th><th>Note</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _comparison_html(comparison: FollowupComparison | None) -> str:
    """The report's comparison section: one row per compared measurement, verdicts in words (no colour)."""
    if comparison is None:
        return ""
    e = html.escape
    if comparison.prior is None:
        notes = "".join(f"<p>{e(n)}</p>" for n in comparison.not_compared) or "<p>No earlier result to compare.</p>"
        return f"<h2>Comparison with the prior study</h2>{notes}"
    rows = "".join(
        f"<tr><td>{e(c.display)}</td><td>{e(_format_value(c.prior))}</td><td>{e(_format_value(c.current))}</td>"
        f"<td>{e(terminology.unit_label(c.unit))}</td><td>{e(_signed(c.absolute))}</td>"
        f"<td>{e('' if c.per_year is None else _signed(c.per_year))}</td>"
        f"<td>{e(c.verdict.replace('-', ' '))}</td><td>{e(c.limit or c.no_verdict_because)}</td></tr>"
        for c in comparison.changes
    )
    lesions = _lesions_html(comparison.lesions)
    weaker = "".join(f"<li>{e(w)}</li>" for w in comparison.weaker_because) or "<li>None stated.</li>"
    left_out = "".join(f"<li>{e(n)}</li>" for n in comparison.not_compared)
    sources = sorted({c.source for c in comparison.changes if c.source})
    return (
        f"<h2>Comparison with the prior study of {e(comparison.prior.effective.date().isoformat())}</h2>"
        f"<p>{e(comparison.sentence())}</p><table><thead><tr><th>Measurement</th><th>Prior</th><th>Now</th>"
        "<th>Unit</th><th>Change</th><th>Change per year</th><th>Verdict</th><th>Repeatability</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>{lesions}<p>Reasons the comparison is weaker:</p><ul>{weaker}</ul>"
        + (f"<p>Not compared:</p><ul>{left_out}</ul>" if left_out else "")
        + "".join(f"<p>Repeatability source: {e(source)}</p>" for source in sources)
        + f"<p>{e(comparison.validation)}</p>"
    )


def _lesions_html(lesions: tuple[LesionMatch, ...] | None) -> str:
    """One row per matched, new or resolved lesion: sizes then and now, change, doubling time, verdict in words."""
    if lesions is None:
        return ""
    e = html.escape

    def mm(value: float | None) -> str:
        return "" if value is None else f"{value:.1f}"

    rows = []
    for m in lesions:
        g = m.growth
        rows.append(
            f"<tr><td>{e(m.key)}</td><td>{e(m.prior.key if m.prior else '')}</td>"
            f"<td>{e(mm(m.prior.mean_diameter_mm if m.prior else None))}</td>"
            f"<td>{e(mm(m.current.mean_diameter_mm if m.current else None))}</td>"
            f"<td>{e('' if g is None else f'{g.diameter_change_mm:+.1f}')}</td>"
            f"<td>{e('' if g is None or g.volume_change_percent is None else f'{g.volume_change_percent:+.0f}')}</td>"
            f"<td>{e('' if g is None or g.vdt_days is None else f'{g.vdt_days:.0f} ({g.nelson_band})')}</td>"
            f"<td>{e(mm(m.distance_mm))}</td><td>{e(m.verdict)}</td><td>{e(m.lung_rads or '')}</td></tr>"
        )
    body = "".join(rows) or '<tr><td colspan="10">No nodule listed now or before.</td></tr>'
    return (
        "<h3>Nodules compared with the prior</h3><table><thead><tr><th>Nodule</th><th>Prior nodule</th>"
        "<th>Prior mean diameter (mm)</th><th>Mean diameter now (mm)</th><th>Change (mm)</th>"
        "<th>Volume change (%)</th><th>Volume doubling time (days)</th><th>Aligned distance (mm)</th>"
        f"<th>Verdict</th><th>Implied Lung-RADS</th></tr></thead><tbody>{body}</tbody></table><p>{e(LESION_RULES)}</p>"
    )


def _signed(value: float) -> str:
    return ("+" if value > 0 else "") + _format_value(value)


def _change_components(change: MeasurementChange, prior_date: str) -> list[dict[str, Any]]:
    def quantity(code: str, value: float, ucum: str) -> dict[str, Any]:
        return {"code": terminology.comparison_code(code).concept(), "valueQuantity": terminology.quantity(value, ucum)}

    rate_unit = "/a" if change.unit == "1" else f"{change.unit}/a"
    components = [
        {
            "code": terminology.measurement_concept(change.key, change.display),
            "valueQuantity": terminology.quantity(change.current, change.unit),
        },
        quantity("prior-value", change.prior, change.unit),
        {"code": terminology.comparison_code("prior-study-date").concept(), "valueDateTime": prior_date},
        quantity("interval", round(change.interval_days, 1), "d"),
        quantity("absolute-change", _rounded(change.absolute), change.unit),
    ]
    if change.percent is not None:
        components.append(quantity("percent-change", round(change.percent, 1), "%"))
    if change.per_year is not None:
        components.append(quantity("change-per-year", _rounded(change.per_year), rate_unit))
    if change.band is not None:
        components.append(quantity("repeatability-low", _rounded(change.band[0]), change.unit))
        components.append(quantity("repeatability-high", _rounded(change.band[1]), change.unit))
    return components


def _rounded(value: float) -> float:
    """Four significant digits: a change is never more precise than the values it comes from."""
    return float(f"{value:.4g}")


def _comparison_observation(
    target: AnalysisTarget,
    comparison: FollowupComparison,
    change: MeasurementChange,
    *,
    identifier: str,
    current_url: str,
    device_url: str,
    issued: str,
) -> dict[str, Any]:
    assert comparison.prior is not None
    prior_date = comparison.prior.effective.date().isoformat()
    verdict = terminology.comparison_code(change.verdict)
    observation = _imaging_observation(
        target,
        terminology.comparison_code("change-since-prior").concept(
            f"{change.display}: change since the {comparison.prior.modality} of {prior_date}"
        ),
        identifier=identifier,
        issued=issued,
    )
    observation["valueCodeableConcept"] = verdict.concept(change.sentence())
    interpretations = terminology.change_interpretations(change.verdict, change.worse)
    if interpretations:
        observation["interpretation"] = interpretations
    notes = [f"Repeatability: {change.limit}. Source: {change.source}" if change.source else change.no_verdict_because]
    notes.extend(f"Comparison weaker: {reason}." for reason in comparison.weaker_because)
    notes.append(f"Not validated on real follow-up pairs of scans (see the model card). {AI_DISCLAIMER}")
    observation["note"] = [{"text": n} for n in notes if n]
    observation["device"] = {"reference": device_url}
    observation["derivedFrom"] = [{"reference": current_url}, {"reference": change.prior_reference}]
    observation["component"] = _change_components(change, comparison.prior.effective.isoformat())
    return observation


def _lesion_components(match: LesionMatch, comparison: FollowupComparison) -> list[dict[str, Any]]:
    assert comparison.prior is not None and comparison.interval_days is not None

    def quantity(code: str, value: float, ucum: str) -> dict[str, Any]:
        return {"code": terminology.comparison_code(code).concept(), "valueQuantity": terminology.quantity(value, ucum)}

    components: list[dict[str, Any]] = []
    if match.current is not None:
        components.append(
            {
                "code": terminology.measurement_concept(MEAN_DIAMETER_KEY, "Mean diameter (Lung-RADS)"),
                "valueQuantity": terminology.quantity(round(match.current.mean_diameter_mm, 1), "mm"),
            }
        )
    if match.prior is not None:
        components.append(quantity("prior-value", round(match.prior.mean_diameter_mm, 1), "mm"))
    components.append(
        {
            "code": terminology.comparison_code("prior-study-date").concept(),
            "valueDateTime": comparison.prior.effective.isoformat(),
        }
    )
    components.append(quantity("interval", round(comparison.interval_days, 1), "d"))
    growth = match.growth
    if growth is not None:
        components.append(quantity("absolute-change", round(growth.diameter_change_mm, 1), "mm"))
        if growth.volume_change_percent is not None:
            components.append(quantity("volume-change", round(growth.volume_change_percent, 1), "%"))
        if growth.vdt_days is not None:
            components.append(quantity("volume-doubling-time", round(growth.vdt_days), "d"))
        if growth.nelson_band is not None:
            band = {"code": terminology.comparison_code("nelson-band").concept(), "valueString": growth.nelson_band}
            components.append(band)
        components.append(
            {"code": terminology.comparison_code("lung-rads-growth").concept(), "valueBoolean": growth.lung_rads_growth}
        )
    if match.distance_mm is not None:
        components.append(quantity("match-distance", round(match.distance_mm, 1), "mm"))
    if match.lung_rads is not None:
        category = CodedValue("lung_rads", "Lung-RADS v2022 category", match.lung_rads, f"Lung-RADS {match.lung_rads}")
        components.append(
            {
                "code": terminology.comparison_code("implied-lung-rads").concept(),
                "valueCodeableConcept": terminology.coded_value_concept(category),
            }
        )
    return components


def _lesion_observation(
    target: AnalysisTarget,
    comparison: FollowupComparison,
    match: LesionMatch,
    *,
    identifier: str,
    current_url: str | None,
    device_url: str,
    issued: str,
) -> dict[str, Any]:
    """One lesion against the prior scan: matched (with growth), new, or not found now (resolved)."""
    assert comparison.prior is not None
    prior_date = comparison.prior.effective.date().isoformat()
    observation = _imaging_observation(
        target,
        terminology.comparison_code("lesion-since-prior").concept(
            f"{match.key}: compared with the {comparison.prior.modality} of {prior_date}"
        ),
        identifier=identifier,
        issued=issued,
    )
    verdict = match.verdict
    observation["valueCodeableConcept"] = terminology.comparison_code(verdict).concept(match.sentence())
    if verdict in ("increased", "decreased"):
        observation["interpretation"] = terminology.change_interpretations(verdict, "increase")
    notes = [
        LESION_RULES,
        *(f"Comparison weaker: {reason}." for reason in comparison.weaker_because),
        f"Not validated on real follow-up pairs of scans (see the model card). {AI_DISCLAIMER}",
    ]
    observation["note"] = [{"text": n} for n in notes]
    observation["device"] = {"reference": device_url}
    derived = [{"reference": current_url}] if current_url is not None else []
    if match.prior is not None and match.prior.reference:
        derived.append({"reference": match.prior.reference})
    if derived:
        observation["derivedFrom"] = derived
    observation["component"] = _lesion_components(match, comparison)
    return observation


def _lung_extent_extension(lungs: Box) -> dict[str, Any]:
    """The lungs' extent in patient coordinates (mm, LPS), for the next scan's lesions to be aligned with."""
    parts = [
        {"url": f"{side}{axis.upper()}", "valueQuantity": terminology.quantity(round(value, 1), "mm")}
        for side, corner in (("low", lungs.low), ("high", lungs.high))
        for axis, value in zip("xyz", corner, strict=True)
    ]
    return {"url": constants.LUNG_EXTENT_EXTENSION, "extension": parts}


def _acquisition_extension(acquisition: Acquisition) -> dict[str, Any]:
    """How the images were acquired, in DICOM's own attribute names, for a later comparison to read back."""
    parts: list[dict[str, Any]] = []
    if acquisition.slice_thickness_mm is not None:
        thickness = terminology.quantity(acquisition.slice_thickness_mm, "mm")
        parts.append({"url": "SliceThickness", "valueQuantity": thickness})
    if acquisition.kernel:
        parts.append({"url": "ConvolutionKernel", "valueString": acquisition.kernel})
    if acquisition.contrast_agent:
        parts.append({"url": "ContrastBolusAgent", "valueString": acquisition.contrast_agent})
    if acquisition.kvp is not None:
        parts.append({"url": "KVP", "valueQuantity": terminology.quantity(acquisition.kvp, "kV")})
    if acquisition.scanner:
        parts.append({"url": "Scanner", "valueString": acquisition.scanner})
    return {"url": constants.ACQUISITION_EXTENSION, "extension": parts}


def _provenance(
    provenance_id: str,
    targets: list[str],
    *,
    recorded: str,
    agent: dict[str, Any],
    activity: dict[str, Any],
    entity: dict[str, Any] | None,
) -> dict[str, Any]:
    provenance: dict[str, Any] = {
        "resourceType": "Provenance",
        "id": provenance_id,
        "target": [{"reference": t} for t in targets],
        "recorded": recorded,
        "activity": activity,
        "agent": [agent],
    }
    if entity is not None:
        provenance["entity"] = [entity]
    return provenance


def build_results_bundle(
    target: AnalysisTarget,
    result: AnalysisResult,
    device: DeviceInfo,
    *,
    issued: datetime,
    comparison: FollowupComparison | None = None,
) -> dict[str, Any]:
    """One ``transaction`` Bundle that records ``result`` in the EHR; posting it twice creates nothing new.

    ``issued`` (time-zone aware) is when the results are made available; it is also the Provenance's
    ``recorded``. ``comparison`` (with the patient's earlier result) adds one Observation per compared
    measurement, identified ``<analysis>/comparison/<key>``, and its sentence to the conclusion. Raises
    :class:`~fhir_adapters.validation.ResourceValidationError` if a built resource does
    not conform to R4 (a bug here), :class:`ConfigurationError` for an analyzer output that cannot be
    written (a non-finite value, an explanation that is not PNG).
    """
    if result.analyzer != device.name or result.version != device.version:
        raise ConfigurationError(
            f"Result of {result.analyzer} {result.version} cannot be recorded as device {device.identifier_value}.",
            remedy="Pass the DeviceInfo of the analyzer version that produced the result.",
        )
    issued_at = _instant(issued)
    analysis_id = analysis_identifier(target.study_uid, target.series_uid, result.analyzer, result.version)
    device_url = f"urn:uuid:{_uuid_for('device|' + device.identifier_value)}"
    entries: list[dict[str, Any]] = [
        conditional_create_entry(
            device_url, _device(device), constants.DEVICE_IDENTIFIER_SYSTEM, device.identifier_value
        )
    ]

    probability = _probability_measurement(result)
    measurements = result.measurements + ((probability,) if probability else ())
    seen: set[str] = set()
    observation_urls: list[str] = []
    for m in measurements:
        _check_measurement(result.analyzer, m)
        if m.key in seen:
            raise ConfigurationError(
                f"Analyzer {result.analyzer!r} reported measurement {m.key!r} twice.",
                remedy="Each measurement key must appear once per result.",
            )
        seen.add(m.key)
        identifier = f"{analysis_id}/obs/{m.key}"
        url = f"urn:uuid:{_uuid_for(identifier)}"
        observation = _observation(target, result, m, identifier=identifier, device_url=device_url, issued=issued_at)
        entries.append(conditional_create_entry(url, observation, constants.ANALYSIS_IDENTIFIER_SYSTEM, identifier))
        observation_urls.append(url)

    measurement_urls = dict(zip((m.key for m in measurements), observation_urls, strict=True))
    _check_keys(result)
    media_urls = [f"urn:uuid:{_uuid_for(f'{analysis_id}/media/{n}')}" for n in range(len(result.explanations))]
    for value in result.assessments:
        identifier = f"{analysis_id}/assessment/{value.key}"
        url = f"urn:uuid:{_uuid_for(identifier)}"
        observation = _assessment_observation(
            target, result, value, identifier=identifier, device_url=device_url, issued=issued_at
        )
        entries.append(conditional_create_entry(url, observation, constants.ANALYSIS_IDENTIFIER_SYSTEM, identifier))
        observation_urls.append(url)
    finding_urls: dict[str, str] = {}
    for finding in result.findings:
        identifier = f"{analysis_id}/finding/{finding.key}"
        url = f"urn:uuid:{_uuid_for(identifier)}"
        observation = _finding_observation(
            target,
            result,
            finding,
            identifier=identifier,
            device_url=device_url,
            issued=issued_at,
            media_urls=media_urls,
        )
        entries.append(conditional_create_entry(url, observation, constants.ANALYSIS_IDENTIFIER_SYSTEM, identifier))
        observation_urls.append(url)
        finding_urls[finding.key] = url
    compared = comparison.changes if comparison is not None and comparison.prior is not None else ()
    for change in compared:
        assert comparison is not None  # for the type checker: ``compared`` is empty without one
        identifier = f"{analysis_id}/comparison/{change.key}"
        url = f"urn:uuid:{_uuid_for(identifier)}"
        observation = _comparison_observation(
            target,
            comparison,
            change,
            identifier=identifier,
            current_url=measurement_urls[change.key],
            device_url=device_url,
            issued=issued_at,
        )
        entries.append(conditional_create_entry(url, observation, constants.ANALYSIS_IDENTIFIER_SYSTEM, identifier))
        observation_urls.append(url)
    lesions = comparison.lesions if comparison is not None and comparison.prior is not None else None
    for match in lesions or ():
        assert comparison is not None  # for the type checker: ``lesions`` is None without one
        identifier = f"{analysis_id}/comparison/lesion/{match.key}"
        url = f"urn:uuid:{_uuid_for(identifier)}"
        observation = _lesion_observation(
            target,
            comparison,
            match,
            identifier=identifier,
            current_url=None if match.current is None else finding_urls[match.current.key],
            device_url=device_url,
            issued=issued_at,
        )
        entries.append(conditional_create_entry(url, observation, constants.ANALYSIS_IDENTIFIER_SYSTEM, identifier))
        observation_urls.append(url)

    media_links: list[dict[str, Any]] = []
    for n, explanation in enumerate(result.explanations):
        identifier = f"{analysis_id}/media/{n}"
        url = media_urls[n]
        media = _media(target, result, explanation, identifier=identifier, device_url=device_url, issued=issued_at)
        entries.append(conditional_create_entry(url, media, constants.ANALYSIS_IDENTIFIER_SYSTEM, identifier))
        media_links.append({"comment": explanation.title, "link": {"reference": url}})

    report_html = render_report_html(target, result, device, measurements, comparison)
    report_url = f"urn:uuid:{_uuid_for(analysis_id)}"
    report: dict[str, Any] = {"resourceType": "DiagnosticReport", "meta": _security()}
    extensions = []
    if target.acquisition is not None and not target.acquisition.empty:
        extensions.append(_acquisition_extension(target.acquisition))
    if result.lungs_mm is not None:
        extensions.append(_lung_extent_extension(result.lungs_mm))
    if extensions:
        report["extension"] = extensions
    report |= {
        "identifier": _identifier(analysis_id),
        "status": "preliminary",
        "category": [terminology.RADIOLOGY_SECTION.concept()],
        "code": terminology.report_code(result.analyzer).concept(f"AI analysis: {device.title}"),
        "subject": {"reference": target.patient_reference},
    }
    if target.study_started:
        report["effectiveDateTime"] = target.study_started
    report["issued"] = issued_at
    report["result"] = [{"reference": u} for u in observation_urls]
    report["imagingStudy"] = [{"reference": target.imaging_study_reference}]
    if media_links:
        report["media"] = media_links
    report["conclusion"] = _conclusion(result, comparison)
    report["conclusionCode"] = terminology.conclusion_codes(result.analyzer, result.category)
    report["presentedForm"] = [
        {
            "contentType": "text/html",
            "language": "en",
            "data": base64.b64encode(report_html.encode("utf-8")).decode("ascii"),
            "title": f"{device.title}: AI analysis report",
            "creation": issued_at,
        }
    ]
    entries.append(conditional_create_entry(report_url, report, constants.ANALYSIS_IDENTIFIER_SYSTEM, analysis_id))

    provenance_id = _uuid_for(f"{analysis_id}/provenance")
    provenance = _provenance(
        provenance_id,
        [*observation_urls, *(link["link"]["reference"] for link in media_links), report_url],
        recorded=issued_at,
        agent={"type": terminology.AUTHOR.concept(), "who": {"reference": device_url}},
        activity=terminology.CREATE.concept(),
        entity={"role": "source", "what": {"reference": target.imaging_study_reference}},
    )
    entries.append(
        {
            "fullUrl": f"urn:uuid:{provenance_id}",
            "resource": provenance,
            "request": {"method": "PUT", "url": f"Provenance/{provenance_id}"},
        }
    )

    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    validate_bundle(bundle)
    return bundle


def build_signoff_bundle(
    report: Mapping[str, Any],
    practitioner_reference: str,
    *,
    accepted: bool,
    reason: str | None,
    when: datetime,
) -> dict[str, Any]:
    """A ``transaction`` that records a clinician's review of an AI report as it was read from the server.

    Accept: the report becomes ``final`` with the clinician as ``resultsInterpreter`` and the disclaimer
    replaced by a note that a clinician accepted it. Reject: the report becomes ``entered-in-error`` (it must
    no longer be relied on) and the clinician's reason is appended to the conclusion. Either way a
    ``Provenance`` records who did what and when (agent = the practitioner as verifier, activity UPDATE, the
    prior report version as the revised entity). The report is ``PUT`` with ``ifMatch`` on the version read,
    so a concurrent review fails with a conflict instead of silently overwriting the other one; the
    Provenance id derives from report, clinician, decision and time, so a retried submission makes no second
    Provenance. The Observations stay ``preliminary``: R4 ties their status to their own lifecycle, and a
    reader sees the review on the report.
    """
    if report.get("resourceType") != "DiagnosticReport" or not report.get("id"):
        raise SignoffInputError(
            "Only a DiagnosticReport read from the FHIR server (with its id) can be signed off.",
            remedy="Read the report first and pass the resource as returned.",
        )
    reason_text = (reason or "").strip()
    if not accepted and not reason_text:
        raise SignoffInputError(
            f"Rejecting DiagnosticReport/{report['id']} needs a reason.",
            remedy="Say why the AI result is wrong; it is kept with the report.",
        )
    at = _instant(when)
    report_id = str(report["id"])
    updated = copy.deepcopy(dict(report))
    meta = dict(updated.get("meta", {}))
    version = meta.pop("versionId", None)
    meta.pop("lastUpdated", None)
    if meta:
        updated["meta"] = meta
    else:
        updated.pop("meta", None)
    conclusion = str(updated.get("conclusion", ""))
    if accepted:
        updated["status"] = "final"
        updated["resultsInterpreter"] = [{"reference": practitioner_reference}]
        conclusion = conclusion.replace(AI_DISCLAIMER, ACCEPTED_NOTE) if AI_DISCLAIMER in conclusion else conclusion
        updated["conclusion"] = conclusion.strip() or ACCEPTED_NOTE
    else:
        updated["status"] = "entered-in-error"
        updated["conclusion"] = f"{conclusion} Rejected by the reviewing clinician: {reason_text}".strip()
    updated["issued"] = at

    request: dict[str, Any] = {"method": "PUT", "url": f"DiagnosticReport/{report_id}"}
    if version:
        request["ifMatch"] = f'W/"{version}"'
    report_ref = f"DiagnosticReport/{report_id}"
    decision = "accepted" if accepted else "rejected"
    provenance_id = _uuid_for(f"signoff|{report_id}|{practitioner_reference}|{decision}|{at}")
    provenance = _provenance(
        provenance_id,
        [report_ref],
        recorded=at,
        agent={"type": terminology.VERIFIER.concept(), "who": {"reference": practitioner_reference}},
        activity=terminology.UPDATE.concept(f"Clinician review: {decision}"),
        entity={"role": "revision", "what": {"reference": f"{report_ref}/_history/{version}"}} if version else None,
    )
    if reason_text:
        provenance["reason"] = [{"text": reason_text}]
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": f"urn:uuid:{_uuid_for('report|' + report_id)}", "resource": updated, "request": request},
            {
                "fullUrl": f"urn:uuid:{provenance_id}",
                "resource": provenance,
                "request": {"method": "PUT", "url": f"Provenance/{provenance_id}"},
            },
        ],
    }
    validate_bundle(bundle)
    return bundle

"""What the clinician's screen shows, computed from FHIR JSON: pure functions, no HTTP, no Flask.

The templates render these small dataclasses as they are, so every rule about what is shown (which reports
are AI results, which analyzers suit a study, what the granted scopes allow, what a model card's limits say)
lives here and is tested without a browser.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fhir_adapters import constants, terminology
from smart_launch.oauth import GrantedScopes, relative_reference

MODEL_CARDS_DIR = Path(__file__).resolve().parent.parent / "models" / "cards"

STATUS_WORDS: dict[str, str] = {
    "registered": "Registered",
    "partial": "Partial",
    "preliminary": "Preliminary - awaiting clinician review",
    "final": "Final - accepted by a clinician",
    "amended": "Amended",
    "corrected": "Corrected",
    "appended": "Appended",
    "cancelled": "Cancelled by a clinician",
    "entered-in-error": "Rejected as wrong (entered in error)",
    "unknown": "Unknown",
}

# What the app needs for each action, in SMART v2 letters (see smart_launch.oauth.APP_NEEDS).
ANALYZE_NEEDS: tuple[tuple[str, str], ...] = (
    ("ImagingStudy", "r"),
    ("DiagnosticReport", "c"),
    ("Observation", "c"),
    ("Media", "c"),
    ("Device", "c"),
    ("Provenance", "c"),
)
REVIEW_NEEDS: tuple[tuple[str, str], ...] = (("DiagnosticReport", "ru"), ("Provenance", "c"))
READ_RESULTS_NEEDS: tuple[tuple[str, str], ...] = (("DiagnosticReport", "rs"), ("Observation", "r"))


def _codings(concept: Any) -> list[Mapping[str, Any]]:
    if not isinstance(concept, Mapping):
        return []
    return [c for c in concept.get("coding", []) or [] if isinstance(c, Mapping)]


def _concept_text(concept: Any) -> str:
    if not isinstance(concept, Mapping):
        return ""
    if concept.get("text"):
        return str(concept["text"])
    return next((str(c.get("display") or c.get("code")) for c in _codings(concept) if c.get("display") or c), "")


# ---------------------------------------------------------------------------------------------- permissions


@dataclass(frozen=True)
class Permissions:
    """What the granted scopes (and the launching user) let this session do, with reasons when they do not."""

    can_analyze: bool
    can_review: bool
    can_read_results: bool
    reasons: tuple[str, ...]


def _scope_words(needs: Iterable[str]) -> str:
    return ", ".join(needs)


def permissions(granted: GrantedScopes, fhir_user: str | None) -> Permissions:
    """Decide which actions to offer; each refusal says which permission is missing, in words a user can pass on."""
    reasons: list[str] = []
    missing_read = granted.missing(READ_RESULTS_NEEDS)
    if missing_read:
        reasons.append(
            "AI results already in the record cannot be shown: the EHR did not grant permission to read "
            f"{_scope_words(missing_read)}."
        )
    missing_analyze = granted.missing(ANALYZE_NEEDS)
    if missing_analyze:
        reasons.append(
            "This app cannot file AI results in the record: the EHR did not grant it permission to write "
            f"{_scope_words(missing_analyze)} (letters: c = create, r = read, u = update). "
            "Ask the EHR administrator for write access, or relaunch and approve all requested permissions."
        )
    missing_review = granted.missing(REVIEW_NEEDS)
    if missing_review:
        reasons.append(
            f"Results cannot be signed off here: the EHR did not grant permission for {_scope_words(missing_review)}."
        )
    practitioner = fhir_user if fhir_user and fhir_user.split("/")[0] in ("Practitioner", "PractitionerRole") else None
    if practitioner is None:
        reasons.append(
            "Results cannot be signed off here: the EHR did not identify the signed-in clinician as a "
            "Practitioner (openid fhirUser)."
        )
    return Permissions(
        can_analyze=not missing_analyze,
        can_review=not missing_review and practitioner is not None,
        can_read_results=not missing_read,
        reasons=tuple(reasons),
    )


# ---------------------------------------------------------------------------------------------- patient


@dataclass(frozen=True)
class PatientBanner:
    """The minimum a clinician needs to be sure of the patient: name, birth date, sex, record identifier."""

    name: str
    birth_date: str
    gender: str
    identifier: str


def patient_banner(patient: Mapping[str, Any]) -> PatientBanner:
    names = [n for n in patient.get("name", []) or [] if isinstance(n, Mapping)]
    official = next((n for n in names if n.get("use") == "official"), names[0] if names else {})
    name = str(official.get("text") or " ".join([*official.get("given", []), official.get("family", "")]).strip())
    identifiers = [i for i in patient.get("identifier", []) or [] if isinstance(i, Mapping) and i.get("value")]
    return PatientBanner(
        name=name or "(no name recorded)",
        birth_date=str(patient.get("birthDate") or "not recorded"),
        gender=str(patient.get("gender") or "not recorded"),
        identifier=str(identifiers[0]["value"]) if identifiers else "",
    )


# ---------------------------------------------------------------------------------------------- studies


@dataclass(frozen=True)
class AiResultSummary:
    """One AI result already in the EHR, as the study list shows it."""

    report_id: str
    analyzer: str
    category: str
    status: str
    status_words: str
    issued: str


@dataclass(frozen=True)
class StudyRow:
    id: str
    date: str
    modalities: tuple[str, ...]
    description: str
    body_sites: tuple[str, ...]
    series_count: int | None
    instance_count: int | None
    series: tuple[dict[str, Any], ...]
    ai_results: tuple[AiResultSummary, ...] = ()


def is_ai_report(resource: Mapping[str, Any]) -> bool:
    """A DiagnosticReport the project wrote, recognised by its analysis identifier system (never by text)."""
    return resource.get("resourceType") == "DiagnosticReport" and any(
        isinstance(i, Mapping) and i.get("system") == constants.ANALYSIS_IDENTIFIER_SYSTEM
        for i in resource.get("identifier", []) or []
    )


def report_analyzer(report: Mapping[str, Any]) -> tuple[str, str]:
    """``(analyzer name, category display)`` from the project's finding-category coding (``"<analyzer>/<code>"``)."""
    for concept in report.get("conclusionCode", []) or []:
        for coding in _codings(concept):
            code = coding.get("code")
            if coding.get("system") == constants.CATEGORY_CODESYSTEM and isinstance(code, str) and "/" in code:
                analyzer, _, category = code.partition("/")
                return analyzer, str(coding.get("display") or concept.get("text") or category)
    return "unknown analyzer", ""


def ai_result_summary(report: Mapping[str, Any]) -> AiResultSummary:
    analyzer, category = report_analyzer(report)
    status = str(report.get("status", "unknown"))
    return AiResultSummary(
        report_id=str(report.get("id", "")),
        analyzer=analyzer,
        category=category,
        status=status,
        status_words=STATUS_WORDS.get(status, status),
        issued=str(report.get("issued", ""))[:16].replace("T", " "),
    )


def study_row(study: Mapping[str, Any], reports: Iterable[Mapping[str, Any]] = ()) -> StudyRow:
    """One line of the study list, with the AI results whose ``imagingStudy`` points at this study."""
    study_id = str(study.get("id", ""))
    series = tuple(s for s in study.get("series", []) or [] if isinstance(s, Mapping))
    modalities = [str(c.get("code")) for c in study.get("modality", []) or [] if isinstance(c, Mapping)]
    for s in series:
        code = (s.get("modality") or {}).get("code")
        if code and code not in modalities:
            modalities.append(str(code))
    body_sites: list[str] = []
    for s in series:
        site = s.get("bodySite")
        text = str(site.get("display") or site.get("code") or "") if isinstance(site, Mapping) else ""
        if text and text not in body_sites:
            body_sites.append(text)
    own = f"ImagingStudy/{study_id}"
    results = [
        ai_result_summary(r)
        for r in reports
        if is_ai_report(r)
        and any(relative_reference((s or {}).get("reference")) == own for s in r.get("imagingStudy", []) or [])
    ]
    results.sort(key=lambda r: r.issued, reverse=True)
    instance_count = study.get("numberOfInstances")
    if instance_count is None and series:
        instance_count = sum(int(s.get("numberOfInstances") or 0) for s in series)
    return StudyRow(
        id=study_id,
        date=str(study.get("started") or "")[:10] or "date not recorded",
        modalities=tuple(modalities),
        description=str(study.get("description") or "(no description)"),
        body_sites=tuple(body_sites),
        series_count=study.get("numberOfSeries", len(series) if series else None),
        instance_count=instance_count,
        series=tuple(
            {
                "number": s.get("number"),
                "modality": (s.get("modality") or {}).get("code", ""),
                "description": s.get("description") or "",
                "instances": s.get("numberOfInstances"),
            }
            for s in series
        ),
        ai_results=tuple(results),
    )


def study_rows(studies: Iterable[Mapping[str, Any]], reports: Sequence[Mapping[str, Any]]) -> list[StudyRow]:
    """The patient's studies, newest first, each with its AI results."""
    rows = [study_row(s, reports) for s in studies]
    rows.sort(key=lambda r: r.date, reverse=True)
    return rows


@dataclass(frozen=True)
class AnalyzerChoice:
    name: str
    title: str
    modalities: tuple[str, ...]


def suitable_analyzers(study_modalities: Iterable[str], analyzers: Iterable[AnalyzerChoice]) -> list[AnalyzerChoice]:
    """Analyzers whose required modality appears in the study (a chest CT is never offered the breast model)."""
    present = {m.upper() for m in study_modalities}
    return [a for a in analyzers if present & {m.upper() for m in a.modalities}]


# ---------------------------------------------------------------------------------------------- one result


@dataclass(frozen=True)
class FindingView:
    display: str
    value: str
    unit: str
    interpretation: str


@dataclass(frozen=True)
class ImageView:
    media_id: str
    title: str


@dataclass(frozen=True)
class CardSummary:
    """Plain-language limits from a model card (``models/cards/<name>.json``)."""

    intended_use: str = ""
    validated_on: tuple[str, ...] = ()
    not_for: tuple[str, ...] = ()
    limits: tuple[str, ...] = ()
    status: str = ""


@dataclass(frozen=True)
class ReportView:
    """Everything the result screen shows about one AI DiagnosticReport."""

    id: str
    status: str
    status_words: str
    analyzer: str
    version: str
    category: str
    probability: str | None
    conclusion: str
    findings: tuple[FindingView, ...]
    images: tuple[ImageView, ...]
    imaging_study: str | None
    subject: str | None
    issued: str
    interpreters: tuple[str, ...] = field(default_factory=tuple)

    @property
    def awaiting_review(self) -> bool:
        return self.status in ("registered", "partial", "preliminary")


def _format_number(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1 else (f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}")


def _device_version(device: Mapping[str, Any]) -> tuple[str, str]:
    for identifier in device.get("identifier", []) or []:
        if isinstance(identifier, Mapping) and identifier.get("system") == constants.DEVICE_IDENTIFIER_SYSTEM:
            name, _, version = str(identifier.get("value", "")).partition("@")
            return name, version
    versions = [v.get("value") for v in device.get("version", []) or [] if isinstance(v, Mapping)]
    return "", str(versions[0]) if versions else ""


def report_view(report: Mapping[str, Any], related: Iterable[Mapping[str, Any]]) -> ReportView:
    """Build the result screen from the report and the Observations/Devices read with it.

    A probability is taken from an Observation whose project code ends in ``_probability`` (or is the
    generic probability key); every other Observation with a quantity is a finding.
    """
    by_reference = {f"{r.get('resourceType')}/{r.get('id')}": r for r in related if r.get("id")}
    analyzer, category = report_analyzer(report)
    version = ""
    findings: list[FindingView] = []
    probability: str | None = None
    for item in report.get("result", []) or []:
        observation = by_reference.get(relative_reference((item or {}).get("reference")) or "")
        if observation is None:
            continue
        device = by_reference.get(relative_reference((observation.get("device") or {}).get("reference")) or "")
        if device is not None and not version:
            _, version = _device_version(device)
        codings = _codings(observation.get("code"))
        code = next((str(c.get("code")) for c in codings if c.get("system") == constants.MEASUREMENT_CODESYSTEM), "")
        quantity = observation.get("valueQuantity") or {}
        if not isinstance(quantity.get("value"), int | float):
            continue
        value = float(quantity["value"])
        unit = str(quantity.get("unit") or terminology.unit_label(str(quantity.get("code") or "")))
        if code == terminology.PROBABILITY_KEY or code.endswith("_probability"):
            probability = f"{_format_number(value)} {unit}".rstrip()  # "60.5 %"; a 0-1 score has no unit
            continue
        interpretations = [c for i in observation.get("interpretation", []) or [] for c in _codings(i)]
        interpretation = next((str(c.get("display") or c.get("code")) for c in interpretations), "")
        findings.append(
            FindingView(
                display=_concept_text(observation.get("code")),
                value=_format_number(value),
                unit=unit,
                interpretation=interpretation,
            )
        )
    images = tuple(
        ImageView(media_id=ref.split("/")[1], title=str(m.get("comment") or "Explanation image"))
        for m in report.get("media", []) or []
        if isinstance(m, Mapping)
        for ref in [relative_reference((m.get("link") or {}).get("reference")) or ""]
        if ref.startswith("Media/")
    )
    status = str(report.get("status", "unknown"))
    studies = [relative_reference((s or {}).get("reference")) for s in report.get("imagingStudy", []) or []]
    return ReportView(
        id=str(report.get("id", "")),
        status=status,
        status_words=STATUS_WORDS.get(status, status),
        analyzer=analyzer,
        version=version or "unknown",
        category=category,
        probability=probability,
        conclusion=str(report.get("conclusion", "")),
        findings=tuple(findings),
        images=images,
        imaging_study=next((s for s in studies if s), None),
        subject=relative_reference((report.get("subject") or {}).get("reference")),
        issued=str(report.get("issued", ""))[:16].replace("T", " "),
        interpreters=tuple(
            str(relative_reference(i.get("reference")) or "")
            for i in report.get("resultsInterpreter", []) or []
            if isinstance(i, Mapping)
        ),
    )


def _as_lines(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,) if value.strip() else ()
    if isinstance(value, list):
        return tuple(str(v) for v in value if isinstance(v, str | int | float) and str(v).strip())
    if isinstance(value, Mapping):
        text = value.get("text") or value.get("description") or value.get("summary")
        return _as_lines(text) if text else tuple(f"{k}: {v}" for k, v in value.items() if isinstance(v, str))
    return ()


def card_summary(name: str, cards_dir: Path = MODEL_CARDS_DIR) -> CardSummary | None:
    """The limits a clinician must know, from the analyzer's model card, or ``None`` when there is no card.

    The card is read with :func:`models.cards.load_card` (validated against its schema; no torch). A card that
    does not validate (being edited, say) is still read for the same fields, leniently, so the result screen
    keeps showing what limits it can rather than none.
    """
    if not name.replace("-", "").replace(".", "").isalnum():
        return None
    from core.errors import ImagingCdsError
    from models.cards import load_card

    try:
        card = load_card(name, cards_dir)
    except ImagingCdsError:
        return _lenient_card_summary(cards_dir / f"{name}.json")
    return CardSummary(
        intended_use=card.intended_use,
        validated_on=_as_lines(card.validation.get("summary")),
        not_for=card.not_for,
        limits=card.limits,
        status=card.status,
    )


def _lenient_card_summary(path: Path) -> CardSummary | None:
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(card, Mapping):
        return None

    def first(*keys: str) -> Any:
        return next((card[k] for k in keys if card.get(k)), None)

    return CardSummary(
        intended_use=" ".join(_as_lines(first("intended_use", "intendedUse", "purpose"))),
        validated_on=_as_lines(first("validated_on", "validation", "validation_data", "evaluation_data")),
        not_for=_as_lines(first("not_for", "out_of_scope", "contraindications", "not_intended_for")),
        limits=_as_lines(first("limits", "known_limits", "limitations")),
        status=str(card.get("status") or ""),
    )

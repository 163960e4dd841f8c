"""What the clinician's screen shows, computed from FHIR JSON: pure functions, no HTTP, no Flask.

The templates render these small dataclasses as they are, so every rule about what is shown (which analyzers
suit a study, what the granted scopes allow, what a model card's limits say) lives here and is tested without a
browser. What a filed AI result says is read by :mod:`fhir_adapters.results`, the reader the CDS service uses
too, and model cards by :mod:`models.registry`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.errors import ImagingCdsError
from fhir_adapters import terminology
from fhir_adapters.fhirjson import relative_reference
from fhir_adapters.results import (
    AWAITING_REVIEW_STATUSES,
    extract_findings,
    index_resources,
    is_ai_report,
    read_report,
    report_category,
)
from models.cards import ModelCard
from models.followup import followup_spec
from models.registry import get_card
from smart_launch.oauth import GrantedScopes
from smart_launch.trends import Trend, patient_trends

log = logging.getLogger(__name__)

UNKNOWN_ANALYZER = "unknown analyzer"
"""Shown for a result whose report carries no finding-category coding to name its analyzer."""
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


def ai_result_summary(report: Mapping[str, Any]) -> AiResultSummary:
    category = report_category(report)
    status = str(report.get("status", "unknown"))
    return AiResultSummary(
        report_id=str(report.get("id", "")),
        analyzer=category.analyzer if category else UNKNOWN_ANALYZER,
        category=category.display if category else "",
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
class ListedView:
    """One finding the result lists on its own (a nodule): its words, values, attributes and key images."""

    title: str
    location: str
    site: str
    values: tuple[FindingView, ...]
    attributes: tuple[tuple[str, str], ...]
    images: tuple[ImageView, ...]
    since_prior: str = ""
    """This finding against the prior study, as filed (matched with its size change, or new); empty without one."""


LISTED_HEADINGS: dict[str, str] = {"lung_nodule": "Lung nodules"}
"""Heading of the listed findings by their kind; other kinds are "Findings listed one by one"."""


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
    listed: tuple[ListedView, ...] = ()
    listed_heading: str = ""
    assessments: tuple[tuple[str, str], ...] = ()
    not_found_since_prior: tuple[str, ...] = ()
    """Listed findings of the prior study that were not found now, as filed."""

    @property
    def awaiting_review(self) -> bool:
        return self.status in AWAITING_REVIEW_STATUSES


def _format_number(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1 else (f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}")


def report_view(report: Mapping[str, Any], related: Iterable[Mapping[str, Any]]) -> ReportView:
    """Build the result screen from the report and the Observations/Devices read with it.

    A probability is taken from an Observation whose project code ends in ``_probability`` (or is the
    generic probability key); every other measurement is a finding.
    """
    filed = read_report(report, index_resources(related))
    findings: list[FindingView] = []
    probability: str | None = None
    for measured in filed.measurements:
        if measured.key == terminology.PROBABILITY_KEY or measured.key.endswith("_probability"):
            probability = f"{_format_number(measured.value)} {measured.unit}".rstrip()  # "60.5 %"; a 0-1 score: no unit
            continue
        findings.append(
            FindingView(
                display=measured.text,
                value=_format_number(measured.value),
                unit=measured.unit,
                interpretation=measured.interpretation_display or "",
            )
        )
    images = tuple(
        ImageView(media_id=ref.split("/")[1], title=str(m.get("comment") or "Explanation image"))
        for m in report.get("media", []) or []
        if isinstance(m, Mapping)
        for ref in [relative_reference((m.get("link") or {}).get("reference")) or ""]
        if ref.startswith("Media/")
    )
    titles = {f"Media/{image.media_id}": image.title for image in images}
    since_prior = {c.current: c.sentence for c in filed.lesion_comparisons if c.current}
    listed = tuple(
        ListedView(
            title=item.display,
            location=item.location,
            site=item.body_site,
            values=tuple(
                FindingView(m.text, _format_number(m.value), m.unit, m.interpretation_display or "")
                for m in item.measurements
            ),
            attributes=tuple((v.display, v.code_display) for v in item.values),
            images=tuple(ImageView(ref.split("/")[1], titles.get(ref, "Explanation image")) for ref in item.key_images),
            since_prior=since_prior.get(item.reference, ""),
        )
        for item in filed.listed
    )
    status = str(report.get("status", "unknown"))
    studies = [relative_reference((s or {}).get("reference")) for s in report.get("imagingStudy", []) or []]
    return ReportView(
        id=str(report.get("id", "")),
        status=status,
        status_words=STATUS_WORDS.get(status, status),
        analyzer=filed.analyzer or UNKNOWN_ANALYZER,
        version=filed.version or "unknown",
        category=filed.category_display,
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
        listed=listed,
        listed_heading=LISTED_HEADINGS.get(filed.listed[0].kind, "Findings listed one by one") if listed else "",
        assessments=tuple((a.display, a.code_display) for a in filed.assessments),
        not_found_since_prior=tuple(c.sentence for c in filed.lesion_comparisons if c.verdict == "resolved"),
    )


def model_card(analyzer: str) -> ModelCard | None:
    """The limits a clinician must know: the analyzer's model card, or ``None`` when it has no valid card.

    Read through :func:`models.registry.get_card` (built-in or bundle analyzer, validated against the card
    schema, no torch), the card ``/models/<name>`` serves; without one the screen links that page instead.
    """
    try:
        return get_card(analyzer)
    except ImagingCdsError as exc:
        log.warning("No model card shown for analyzer %r: %s", analyzer[:64], exc.message)
        return None


# ---------------------------------------------------------------------------------------------- trends


@dataclass(frozen=True)
class TrendSection:
    """One analyzer's trend charts (its followed measurements with at least two filed values)."""

    analyzer: str
    title: str
    trends: tuple[Trend, ...]


def trend_sections(
    resources: Iterable[Mapping[str, Any]],
    *,
    patient_id: str,
    analyzer: str | None = None,
    focus_report: str | None = None,
) -> list[TrendSection]:
    """Trend charts from the patient's filed results (reports with their Observations), per analyzer whose card
    follows measurements over time; only ``analyzer`` when given, each centred on ``focus_report`` or the newest."""
    findings = extract_findings(resources, patient_id=patient_id)
    sections = []
    for name in dict.fromkeys(f.analyzer for f in findings if analyzer in (None, f.analyzer)):
        card = model_card(name)
        spec = followup_spec(card) if card is not None else None
        if spec is None or card is None:
            continue
        trends = patient_trends(findings, analyzer=name, spec=spec, focus_report=focus_report)
        if trends:
            sections.append(TrendSection(analyzer=name, title=card.title, trends=tuple(trends)))
    return sections

"""Build CDS Hooks 2.0 cards from AI findings: pure functions, JSON in, JSON out.

Design choices a clinician or integrator should know:

* One card per analyzer (patient-view) or per order and analyzer (order hooks), so every card's ``source``
  names the analyzer that produced it and feedback can be attributed to it.
* ``indicator`` is ``warning`` when the card carries an abnormal finding, ``info`` otherwise. ``critical`` is
  never used: an AI measurement alone, reviewed or not, does not justify a hard stop in the clinician's path.
* Normal findings produce no card: silence is the right answer when there is nothing to act on.
* Findings awaiting clinician review say so in the summary; suggestions built on them are offered but not
  marked as recommended.
* Suggestions carry complete R4 resources: a DXA ``ServiceRequest`` proposal (status ``draft``, intent
  ``proposal``) after low vertebral attenuation, and an ``update`` of the draft order adding a note that
  cites the prior AI finding.
* A result that compares with the patient's prior one says so: patient-view puts a change beyond the published
  repeatability in the worse direction ("progressed") in the summary with its numbers, and lists every comparison in
  the detail; order-select for a CT the analyzers follow says how long ago the prior was analysed and which
  measurements a new analysis will compare with it (from the analyzer's model card), and how the prior was acquired.
* A heart result with a high coronary calcium category (CAC-DRS 2 or 3) or an aortic diameter over a guideline
  threshold puts that finding in the patient-view summary and the guideline's next step in the detail, as text:
  the guidelines name a treatment or a referral, not an order this service could fill in, so no suggestion.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from cds.orders import ImagingOrder
from core.errors import ImagingCdsError
from fhir_adapters import fhirjson
from fhir_adapters.constants import CANONICAL_BASE
from fhir_adapters.results import AiFinding, FiledComparison, FiledLesionComparison
from models.cards import load_card
from models.followup import FollowupSpec, followup_spec

SUMMARY_MAX_CHARS = 139
"""CDS Hooks: the summary is shorter than 140 characters."""
TOPIC_SYSTEM = f"{CANONICAL_BASE}/CodeSystem/cds-topic"
OVERRIDE_REASON_SYSTEM = f"{CANONICAL_BASE}/CodeSystem/cds-override-reason"
OVERRIDE_REASONS: tuple[dict[str, str], ...] = (
    {"system": OVERRIDE_REASON_SYSTEM, "code": "disagree-with-ai", "display": "Disagree with the AI finding"},
    {"system": OVERRIDE_REASON_SYSTEM, "code": "not-relevant", "display": "Not relevant to this patient or order"},
    {"system": OVERRIDE_REASON_SYSTEM, "code": "already-addressed", "display": "Already known or addressed"},
    {"system": OVERRIDE_REASON_SYSTEM, "code": "patient-declined", "display": "Patient declined"},
)

LOINC = "http://loinc.org"
CPT = "http://www.ama-assn.org/go/cpt"
SNOMED = "http://snomed.info/sct"
DXA_ORDER_CODE: dict[str, Any] = {
    "coding": [
        {"system": LOINC, "code": "38269-7", "display": "DXA Skeletal system Study report"},
        {"system": CPT, "code": "77080", "display": "DXA bone density study, 1 or more sites; axial skeleton"},
    ],
    "text": "DXA bone density (hip and spine)",
}
IMAGING_CATEGORY: dict[str, Any] = {
    "coding": [{"system": SNOMED, "code": "363679005", "display": "Imaging"}],
    "text": "Imaging",
}
LOW_BONE_DENSITY_CATEGORIES = frozenset({"osteoporosis", "osteopenia", "low-density", "low-attenuation", "low"})
DXA_RULE = (
    "Opportunistic CT screening: low L1 trabecular attenuation is associated with osteoporosis "
    "(Pickhardt et al., Ann Intern Med 2013;158:588-595); DXA confirms or excludes it."
)


@dataclass(frozen=True)
class AnalyzerInfo:
    """How an analyzer's findings are presented and which orders they are relevant to."""

    title: str
    modalities: frozenset[str]
    regions: frozenset[str]


ANALYZERS: dict[str, AnalyzerInfo] = {
    "ct-emphysema": AnalyzerInfo("CT emphysema quantification", frozenset({"CT"}), frozenset({"chest"})),
    # Vertebrae are in every chest and abdominal CT, so low attenuation matters for those orders too.
    "ct-bone": AnalyzerInfo(
        "CT vertebral bone density", frozenset({"CT", "DXA"}), frozenset({"spine", "chest", "abdomen"})
    ),
    "cxr-pneumonia": AnalyzerInfo("Chest X-ray pneumonia", frozenset({"XR", "CT"}), frozenset({"chest"})),
    "us-breast": AnalyzerInfo("Breast ultrasound lesion", frozenset({"US", "MG", "MR"}), frozenset({"breast"})),
    "ct-heart": AnalyzerInfo("CT heart and great vessels", frozenset({"CT"}), frozenset({"chest", "heart"})),
    "mr-hippocampus": AnalyzerInfo("MR hippocampal volumetry", frozenset({"MR"}), frozenset({"head"})),
    "ct-lung-nodules": AnalyzerInfo("CT lung nodules", frozenset({"CT"}), frozenset({"chest"})),
}
LISTED_FINDINGS_SHOWN = 5
"""At most this many of a result's listed findings (its nodules, most suspicious first) are shown on a card."""

HEART_ANALYZER = "ct-heart"
HIGH_CAC_CATEGORIES: dict[str, str] = {
    "cac-drs-2": (
        "Coronary artery calcium CAC-DRS 2 (Agatston 100-299): CAC-DRS (SCCT 2018) recommends moderate- to "
        "high-intensity statin therapy and aspirin 81 mg if bleeding risk allows; the 2018 AHA/ACC cholesterol "
        "guideline favours statin therapy from a score of 100. Review cardiovascular risk factors."
    ),
    "cac-drs-3": (
        "Coronary artery calcium CAC-DRS 3 (Agatston 300 or more): CAC-DRS (SCCT 2018) recommends high-intensity "
        "statin therapy and aspirin 81 mg if bleeding risk allows. Review cardiovascular risk factors."
    ),
}
"""Next steps for a high coronary calcium category (Hecht HS et al., J Cardiovasc Comput Tomogr 2018;12:185-191;
Grundy SM et al., 2018 AHA/ACC Guideline on the Management of Blood Cholesterol, Circulation 2019;139:e1082)."""
AORTA_MEASUREMENTS: dict[str, str] = {
    "ascending_aorta_diameter_mm": "ascending aorta",
    "descending_aorta_diameter_mm": "descending thoracic aorta",
    "aortic_arch_diameter_mm": "aortic arch",
}
AORTA_NEXT_STEP = {
    "H": (
        "{name} {value} mm, over the 2022 ACC/AHA threshold: confirm the diameter on dedicated CT or MR "
        "angiography, control blood pressure, and image the aorta again for surveillance."
    ),
    "HH": (
        "{name} {value} mm, at or above the 2022 ACC/AHA intervention threshold: refer to a cardiovascular surgeon "
        "or multidisciplinary aortic team for evaluation."
    ),
}
"""Next steps for an aortic diameter over threshold (Isselbacher EM et al., 2022 ACC/AHA Guideline for the
Diagnosis and Management of Aortic Disease, Circulation 2022;146:e334-e482)."""


def heart_next_steps(finding: AiFinding) -> tuple[list[str], list[str]]:
    """For a ct-heart finding: (what crossed a guideline threshold, in short, for the summary; the guideline's
    next step for each, for the detail). Both empty when nothing did."""
    reasons: list[str] = []
    steps: list[str] = []
    if finding.category_code in HIGH_CAC_CATEGORIES:
        reasons.append(finding.category_code.upper().replace("CAC-DRS-", "CAC-DRS "))
        steps.append(HIGH_CAC_CATEGORIES[finding.category_code])
    for key, name in AORTA_MEASUREMENTS.items():
        measured = finding.measurement(key)
        if measured is None or measured.interpretation not in AORTA_NEXT_STEP:
            continue
        value = f"{measured.value:.15g}"
        reasons.append(f"{name} {value} mm")
        steps.append(AORTA_NEXT_STEP[measured.interpretation].format(name=name.capitalize(), value=value))
    return reasons, steps


def time_ordered_uuid() -> str:
    """A random UUID that sorts by the time it was made: RFC 9562 version 7 (48 bits of Unix milliseconds, then
    74 random bits).

    Card uuids key the feedback store's issued-card table (:mod:`cds.feedback`). Ordered by time, each batch of
    issued cards is added at the end of that index rather than scattered over it: half the SQLite work per
    card, measured, and pages that stay in cache however large the table grows. The random bits keep the uuids
    unique and unguessable; the time they reveal is when the card was shown, which its EHR already knows.
    """
    unix_ms = (time.time_ns() // 1_000_000) & ((1 << 48) - 1)
    random_bits = int.from_bytes(os.urandom(10), "big")
    rand_a, rand_b = random_bits >> 68, random_bits & ((1 << 62) - 1)  # 12 and 62 of the 80 random bits
    # unix_ts_ms (48 bits) | version 7 (4) | rand_a (12) | variant 0b10 (2) | rand_b (62)
    value = (unix_ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
    return str(uuid.UUID(int=value))


@dataclass(frozen=True)
class CardSettings:
    """The parts of the configuration cards need, plus the clock (so tests and replays are deterministic)."""

    app_launch_url: str
    model_card_base_url: str
    now: datetime
    recent_days: int = 365
    new_uuid: Callable[[], str] = time_ordered_uuid


def fit_summary(text: str, limit: int = SUMMARY_MAX_CHARS) -> str:
    """Shorten ``text`` to ``limit`` characters at a word boundary, with an ellipsis."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[: limit - 1].rsplit(" ", 1)[0].rstrip(" ,;:-")
    return cut + "…"


def mid_sentence(display: str) -> str:
    """A category's display as it reads inside a sentence: "No emphysema by CT densitometry (LAA-950 < 5%)" becomes
    "no emphysema by CT densitometry (LAA-950 < 5%)".

    Only a capitalised ordinary first word loses its capital; acronyms, units and codes ("CT", "LAA-950", "L1",
    "HU") keep the category's own spelling, because lower-casing them changes what they say.
    """
    first, _, rest = display.partition(" ")
    if len(first) > 1 and first[0].isupper() and first[1:].isalpha() and first[1:].islower():
        return first[0].lower() + first[1:] + (f" {rest}" if rest else "")
    return display


def analyzer_title(name: str) -> str:
    info = ANALYZERS.get(name)
    return info.title if info else name


def source_for(analyzer: str | None, settings: CardSettings) -> dict[str, Any]:
    """``card.source``: the analyzer (label and model card) or, for queue notices, the service itself."""
    base = settings.model_card_base_url.rstrip("/")
    if analyzer is None:
        return {"label": "imaging-cds", "url": f"{base}/models"}
    return {
        "label": f"imaging-cds {analyzer}",
        "url": f"{base}/models/{analyzer}",
        "topic": {"system": TOPIC_SYSTEM, "code": analyzer, "display": analyzer_title(analyzer)},
    }


def smart_link(settings: CardSettings, app_context: Mapping[str, str], label: str) -> dict[str, Any]:
    """A ``smart`` link launching the imaging-cds app; ``appContext`` is a JSON string, as the spec requires."""
    return {
        "label": label,
        "url": settings.app_launch_url,
        "type": "smart",
        "appContext": json.dumps(dict(app_context)),
    }


def _date(finding: AiFinding) -> str:
    return finding.effective.date().isoformat() if finding.effective else "date unknown"


def _status_phrase(finding: AiFinding) -> str:
    return "awaiting clinician review" if finding.awaiting_review else "signed"


def _key_values(finding: AiFinding, limit: int = 2) -> str:
    parts = []
    for m in finding.measurements[:limit]:
        # As filed: a card never re-rounds the value its report states (0.25 % stays 0.25 %, not 0.2 %).
        value = f"{m.value:.15g}"  # a float's own digits, without a trailing ".0"
        parts.append(f"{m.display} {value} {m.unit}".strip())
    return "; ".join(parts)


def _finding_line(finding: AiFinding) -> str:
    values = _key_values(finding, limit=4)
    version = f" v{finding.version}" if finding.version else ""
    line = f"- {_date(finding)}: **{finding.category_display}** ({_status_phrase(finding)})"
    if values:
        line += f" - {values}"
    if finding.conclusion:
        line += f". {finding.conclusion}"
    line += f" [{finding.report_reference}, {finding.analyzer}{version}]"
    return "\n".join([line, *_listed_lines(finding)])


def _listed_lines(finding: AiFinding) -> list[str]:
    """The result's listed findings (its nodules), one indented line each, as the analyzer described them."""
    lines = [f"    - {item.display}" for item in finding.listed[:LISTED_FINDINGS_SHOWN]]
    hidden = len(finding.listed) - LISTED_FINDINGS_SHOWN
    if hidden > 0:
        lines.append(f"    - and {hidden} more in the report")
    return lines


_DISCLAIMER = "_AI-generated measurement, not a diagnosis; the signed radiology report is authoritative._"


def _base_card(
    *, summary: str, detail: str, indicator: str, analyzer: str | None, settings: CardSettings
) -> dict[str, Any]:
    return {
        "uuid": settings.new_uuid(),
        "summary": fit_summary(summary),
        "detail": detail,
        "indicator": indicator,
        "source": source_for(analyzer, settings),
    }


def _recent(finding: AiFinding, settings: CardSettings) -> bool:
    return finding.effective is None or finding.effective >= settings.now - timedelta(days=settings.recent_days)


def _progressed(finding: AiFinding) -> list[FiledComparison]:
    """The finding's changes since its prior beyond repeatability in the direction its analyzer calls worse."""
    return [c for c in finding.comparisons if c.progressed]


def _grown(finding: AiFinding) -> list[FiledLesionComparison]:
    """The finding's lesions (nodules) that grew since the prior beyond the published margins."""
    return [c for c in finding.lesion_comparisons if c.progressed]


def _prior_date(change: FiledComparison | FiledLesionComparison) -> str:
    return change.prior_date.date().isoformat() if change.prior_date else "the prior study"


def _value(value: float) -> str:
    return f"{value:.15g}"  # as filed, never re-rounded


def _change_words(change: FiledComparison) -> str:
    """``LAA-950 0.25 -> 3.1 %`` (as filed)."""
    before = "?" if change.prior is None else _value(change.prior)
    return f"{change.display} {before} -> {_value(change.current)} {change.unit}".rstrip()


def _comparison_lines(finding: AiFinding) -> list[str]:
    """The newest result's comparisons with its prior, as filed, for a card's detail."""
    if not finding.comparisons:
        return []
    lines = [
        f"**Change since the prior study of {_prior_date(finding.comparisons[0])}** (called a change only beyond "
        "the measurement's published repeatability; see the model card):",
        "",
    ]
    for change in finding.comparisons:
        marker = " **(progressed)**" if change.progressed else ""
        lines.append(f"- {change.sentence or _change_words(change)}{marker}")
    lines.append("")
    return lines


def _lesion_lines(finding: AiFinding) -> list[str]:
    """The newest result's lesions against its prior's, as filed: the ones that changed, and how many did not."""
    if not finding.lesion_comparisons:
        return []
    first = finding.lesion_comparisons[0]
    stable = sum(c.verdict == "stable" for c in finding.lesion_comparisons)
    lines = [
        f"**Nodules compared with the prior study of {_prior_date(first)}** (growth only beyond 1.5 mm mean diameter "
        "or 25 % volume; see the model card):",
        "",
    ]
    lines.extend(
        f"- {c.sentence}{' **(grew)**' if c.progressed else ''}"
        for c in finding.lesion_comparisons
        if c.verdict != "stable"
    )
    lines.extend([f"- {stable} matched nodule{'s' if stable != 1 else ''} without growth", ""])
    return lines


def patient_view_cards(
    findings: Sequence[AiFinding], settings: CardSettings, *, studies_without_results: int = 0
) -> list[dict[str, Any]]:
    """One card per analyzer with findings awaiting review or notable (abnormal, signed, recent) findings."""
    by_analyzer: dict[str, list[AiFinding]] = {}
    for finding in findings:
        changed = _progressed(finding) or _grown(finding)
        notable = finding.signed and (finding.abnormal or changed) and _recent(finding, settings)
        if finding.awaiting_review or notable:
            by_analyzer.setdefault(finding.analyzer, []).append(finding)
    cards = []
    for analyzer, items in by_analyzer.items():
        pending = [f for f in items if f.awaiting_review]
        newest = items[0]
        title = analyzer_title(analyzer)
        reasons, steps = heart_next_steps(newest) if analyzer == HEART_ANALYZER else ([], [])
        progressed = _progressed(newest)
        if progressed:
            state = "awaiting review" if newest.awaiting_review else f"signed {_date(newest)}"
            more = f" and {len(progressed) - 1} more" if len(progressed) > 1 else ""
            change = _change_words(progressed[0])
            summary = f"{title}: progressed since {_prior_date(progressed[0])}, {change}{more} (AI, {state})"
        elif grown := _grown(newest):
            state = "awaiting review" if newest.awaiting_review else f"signed {_date(newest)}"
            more = f" and {len(grown) - 1} more" if len(grown) > 1 else ""
            summary = f"{title}: nodule grew since {_prior_date(grown[0])}, {grown[0].sentence}{more} (AI, {state})"
        elif reasons:
            state = "awaiting review" if newest.awaiting_review else f"signed {_date(newest)}"
            summary = f"{title}: {', '.join(reasons)} (AI, {state}); guideline next steps inside"
        elif pending:
            summary = (
                f"{title}: {len(pending)} AI result{'s' if len(pending) != 1 else ''} awaiting review; "
                f"latest {mid_sentence(pending[0].category_display)} ({_date(pending[0])})"
            )
        else:
            summary = f"{title}: {mid_sentence(newest.category_display)} (AI, signed {_date(newest)})"
        lines = [f"**{title}** - AI results for this patient:", "", *(_finding_line(f) for f in items), ""]
        lines.extend(_comparison_lines(newest))
        lines.extend(_lesion_lines(newest))
        if steps:
            lines.extend(["**Suggested next steps (guidelines, for the clinician to decide):**", ""])
            lines.extend(f"- {step}" for step in steps)
            lines.append("")
        if studies_without_results:
            lines.append(
                f"{studies_without_results} imaging stud{'ies' if studies_without_results != 1 else 'y'} "
                "of this patient ha{} no AI results yet.".format("ve" if studies_without_results != 1 else "s")
            )
            lines.append("")
        lines.append(_DISCLAIMER)
        card = _base_card(
            summary=summary,
            detail="\n".join(lines),
            indicator="warning" if any(f.abnormal for f in items) else "info",
            analyzer=analyzer,
            settings=settings,
        )
        context = {"diagnosticReport": newest.report_reference}
        if newest.imaging_studies:
            context["imagingStudy"] = newest.imaging_studies[0]
        card["links"] = [smart_link(settings, context, "Review in imaging-cds")]
        card["overrideReasons"] = [dict(r) for r in OVERRIDE_REASONS]
        cards.append(card)
    return cards


def worth_a_card(finding: AiFinding) -> bool:
    """An order card is shown for an abnormal finding, or for listed findings (prior nodules) even when they are
    benign-looking: a new CT of the same region is when they are compared for growth."""
    return finding.abnormal or bool(finding.listed)


def relevant_to_order(finding: AiFinding, order: ImagingOrder) -> bool:
    """Same body region; or, when the order's region could not be read, the same modality."""
    info = ANALYZERS.get(finding.analyzer)
    if info is None:
        return False
    if order.regions:
        return bool(order.regions & info.regions)
    return bool(order.modalities & info.modalities)


_LISTED_NOUNS = {"lung_nodule": ("lung nodule", "lung nodules")}


def _listed_noun(finding: AiFinding, count: int) -> str:
    singular, plural = _LISTED_NOUNS.get(finding.listed[0].kind, ("finding", "findings"))
    return singular if count == 1 else plural


def order_note_update(order: ImagingOrder, finding: AiFinding) -> dict[str, Any]:
    """The draft order with a note citing the prior AI finding appended (for an ``update`` action).

    A shallow copy with a new ``note`` list: ``order.resource`` is left unchanged, and the nested values the
    two share are only read (serialised into the response), so deep-copying the whole order on every hook
    call would be wasted work. Treat the result as read-only, or deep-copy it before changing nested parts.
    """
    resource = dict(order.resource)
    values = _key_values(finding)
    listed = "; ".join(item.display for item in finding.listed[:LISTED_FINDINGS_SHOWN])
    text = (
        f"Prior AI finding ({finding.analyzer}, {finding.report_reference}, {_date(finding)}, "
        f"{_status_phrase(finding)}): {finding.category_display}"
        + (f"; {values}" if values else "")
        + (f". {listed}" if listed else "")
        + ". Please compare."
    )
    resource["note"] = [*fhirjson.items(resource.get("note")), {"text": text}]
    return resource


def _copy_json(value: Any) -> Any:
    """A copy of a small JSON-like constant (dicts, lists, scalars): several times faster than ``deepcopy``."""
    if isinstance(value, dict):
        return {k: _copy_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_json(v) for v in value]
    return value


def dxa_proposal(order: ImagingOrder, finding: AiFinding, *, patient_id: str, user_id: str | None) -> dict[str, Any]:
    """A DXA ServiceRequest proposal (draft, intent ``proposal``) citing the low-attenuation finding."""
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "status": "draft",
        "intent": "proposal",
        "category": [_copy_json(IMAGING_CATEGORY)],
        "code": _copy_json(DXA_ORDER_CODE),
        "subject": {"reference": f"Patient/{patient_id}"},
        "reasonReference": [{"reference": finding.report_reference}],
        "note": [
            {
                "text": f"Proposed after an AI finding of {mid_sentence(finding.category_display)} "
                f"({finding.report_reference}, {_status_phrase(finding)}). {DXA_RULE}"
            }
        ],
    }
    encounter = fhirjson.reference(order.resource.get("encounter"))
    if encounter:
        resource["encounter"] = {"reference": encounter}
    if user_id and user_id.split("/")[0] in ("Practitioner", "PractitionerRole"):
        resource["requester"] = {"reference": user_id}
    return resource


def _suggestion(label: str, action: dict[str, Any], *, recommended: bool, settings: CardSettings) -> dict[str, Any]:
    return {"label": label, "uuid": settings.new_uuid(), "isRecommended": recommended, "actions": [action]}


def order_finding_cards(
    orders: Iterable[ImagingOrder],
    findings: Sequence[AiFinding],
    settings: CardSettings,
    *,
    patient_id: str,
    user_id: str | None,
    all_orders: Sequence[ImagingOrder] = (),
) -> list[dict[str, Any]]:
    """For each imaging order, one card per analyzer whose newest relevant finding is abnormal."""
    dxa_already_ordered = any(o.is_dxa for o in all_orders)
    cards = []
    for order in orders:
        newest_by_analyzer: dict[str, AiFinding] = {}
        for finding in findings:  # newest first
            if relevant_to_order(finding, order):
                newest_by_analyzer.setdefault(finding.analyzer, finding)
        for analyzer, finding in newest_by_analyzer.items():
            if not worth_a_card(finding) or order.is_dxa:
                continue
            title = analyzer_title(analyzer)
            if finding.listed:
                count = len(finding.listed)
                summary = (
                    f"Prior AI: {count} {_listed_noun(finding, count)}, {mid_sentence(finding.category_display)} "
                    f"({_date(finding)}, {_status_phrase(finding)})"
                )
            else:
                summary = (
                    f"Prior AI finding: {mid_sentence(finding.category_display)} "
                    f"({title}, {_date(finding)}, {_status_phrase(finding)})"
                )
            because = ", ".join(sorted(order.regions | order.modalities))
            detail_lines = [
                f"A prior AI analysis is relevant to this order ({because}):",
                "",
                _finding_line(finding),
                "",
                _DISCLAIMER,
            ]
            suggestions = [
                _suggestion(
                    "Add the prior AI finding to this order's note",
                    {
                        "type": "update",
                        "description": "Add a note citing the prior AI finding to the draft order",
                        "resource": order_note_update(order, finding),
                    },
                    recommended=False,
                    settings=settings,
                )
            ]
            if (
                analyzer == "ct-bone"
                and finding.category_code in LOW_BONE_DENSITY_CATEGORIES
                and not dxa_already_ordered
            ):
                detail_lines.insert(3, f"\n{DXA_RULE}")
                suggestions.insert(
                    0,
                    _suggestion(
                        "Propose a DXA bone density study",
                        {
                            "type": "create",
                            "description": "Propose DXA of hip and spine (draft proposal for the clinician to sign)",
                            "resource": dxa_proposal(order, finding, patient_id=patient_id, user_id=user_id),
                        },
                        recommended=finding.signed,
                        settings=settings,
                    ),
                )
            card = _base_card(
                summary=summary,
                detail="\n".join(detail_lines),
                indicator="warning" if finding.abnormal else "info",
                analyzer=analyzer,
                settings=settings,
            )
            card["suggestions"] = suggestions
            card["selectionBehavior"] = "any"
            card["overrideReasons"] = [dict(r) for r in OVERRIDE_REASONS]
            context = {"diagnosticReport": finding.report_reference, "serviceRequest": order.reference}
            if finding.imaging_studies:
                context["imagingStudy"] = finding.imaging_studies[0]
            card["links"] = [smart_link(settings, context, "Review prior AI result in imaging-cds")]
            cards.append(card)
    return cards


@dataclass(frozen=True)
class QueuedStudy:
    """A study referenced by an order that has no AI result, and the background job queued for it (if any)."""

    study: str
    job_id: str | None


def missing_results_card(order: ImagingOrder, studies: Sequence[QueuedStudy], settings: CardSettings) -> dict[str, Any]:
    """order-sign: say which referenced studies lack AI results, and promise analysis only where it was queued."""
    queued = [s for s in studies if s.job_id]
    n = len(studies)
    plural = "study" if n == 1 else "studies"
    if queued and len(queued) == n:
        summary = f"No AI results yet for {n} {plural} referenced by this order; analysis queued"
    elif queued:
        summary = f"No AI results yet for {n} {plural} referenced by this order; {len(queued)} queued for analysis"
    else:
        summary = f"No AI results for {n} {plural} referenced by this order"
    lines = ["Studies referenced by this order without AI results:", ""]
    for s in studies:
        state = f"background analysis queued (job {s.job_id})" if s.job_id else "not queued for analysis"
        lines.append(f"- {s.study}: {state}")
    lines += [
        "",
        "Results, when ready, appear in the EHR as preliminary AI reports for clinician review."
        if queued
        else "AI analysis is not started from this hook; ask for it in the imaging-cds app if needed.",
    ]
    card = _base_card(summary=summary, detail="\n".join(lines), indicator="info", analyzer=None, settings=settings)
    context = {"serviceRequest": order.reference}
    if studies:
        context["imagingStudy"] = studies[0].study
    card["links"] = [smart_link(settings, context, "Open the study in imaging-cds")]
    return card


@lru_cache(maxsize=64)
def _followup_spec(analyzer: str) -> FollowupSpec | None:
    """The analyzer's follow-up rules from its built-in model card (read as JSON: the registry would bring torch
    into the CDS service); an analyzer without them, or without a built-in card, is not followed here. Cards ship
    with the code, so each is read once per process, not on every hook call."""
    try:
        return followup_spec(load_card(analyzer))
    except ImagingCdsError:
        return None


def _interval_words(days: int) -> str:
    if days < 62:
        return f"{days} days"
    months = round(days / 30.44)
    return f"{days} days (about {months} months)" if months < 24 else f"{days} days (about {days / 365.25:.1f} years)"


def _acquisition_words(finding: AiFinding) -> str:
    acquisition = finding.acquisition
    if acquisition is None or acquisition.empty:
        return "how the prior scan was acquired was not filed with its result"
    parts = []
    if acquisition.slice_thickness_mm is not None:
        parts.append(f"{acquisition.slice_thickness_mm:g} mm slices")
    parts.append(f"kernel {acquisition.kernel}" if acquisition.kernel else "kernel not stated")
    parts.append(f"contrast {acquisition.contrast_agent}" if acquisition.contrast_agent else "no contrast stated")
    if acquisition.kvp is not None:
        parts.append(f"{acquisition.kvp:g} kV")
    return "prior scan: " + ", ".join(parts)


def followup_order_cards(
    orders: Iterable[ImagingOrder], findings: Sequence[AiFinding], settings: CardSettings
) -> list[dict[str, Any]]:
    """order-select: for a CT order the analyzers follow, the interval since the prior AI result and what a new
    analysis will compare with it (one info card per order; nothing when no analyzer has a prior to compare)."""
    cards = []
    for order in orders:
        if "CT" not in order.modalities:
            continue
        newest_by_analyzer: dict[str, AiFinding] = {}
        for finding in findings:  # newest first
            if relevant_to_order(finding, order) and finding.effective is not None:
                newest_by_analyzer.setdefault(finding.analyzer, finding)
        entries: list[tuple[AiFinding, list[str], list[str], str]] = []
        for analyzer, finding in newest_by_analyzer.items():
            spec = _followup_spec(analyzer)
            if spec is None:
                continue
            with_verdict: list[str] = []
            without: list[str] = []
            for measured in finding.measurements:
                followed = spec.measurements.get(measured.key)
                if followed is not None:
                    (with_verdict if followed.repeatability is not None else without).append(measured.text)
            lesions = ""
            if spec.lesions is not None and finding.listed:
                kind = [item for item in finding.listed if item.kind == spec.lesions]
                lesions = (
                    f"its {len(kind)} listed nodule{'s' if len(kind) != 1 else ''} matched after aligning the lungs; "
                    "growth called only beyond 1.5 mm mean diameter within 12 months (Lung-RADS v2022) or 25 % volume "
                    "(NELSON), with the volume doubling time and its NELSON band"
                    if all(item.centre_mm is not None for item in kind)
                    else "its nodules cannot be matched: their positions were not filed with that result"
                )
            if with_verdict or without or lesions:
                entries.append((finding, with_verdict, without, lesions))
        if not entries:
            continue
        newest = max((e[0] for e in entries), key=lambda f: f.effective or settings.now)
        assert newest.effective is not None
        days = max((settings.now - newest.effective).days, 0)
        summary = f"Follow-up CT: prior AI results of {_date(newest)}, {_interval_words(days)} ago, will be compared"
        lines = ["A new AI analysis of this CT will be compared with the patient's prior results:", ""]
        for finding, with_verdict, without, lesions in entries:
            assert finding.effective is not None
            interval = _interval_words(max((settings.now - finding.effective).days, 0))
            version = f" v{finding.version}" if finding.version else ""
            lines.append(
                f"- **{analyzer_title(finding.analyzer)}**{version}: prior of {_date(finding)} ({interval} ago, "
                f"{_status_phrase(finding)}; {finding.report_reference}); {_acquisition_words(finding)}."
            )
            if with_verdict:
                lines.append(f"  - Change called only beyond the published repeatability: {', '.join(with_verdict)}.")
            if without:
                lines.append(f"  - Change shown without a verdict (no published repeatability): {', '.join(without)}.")
            if lesions:
                lines.append(f"  - Nodules: {lesions}.")
        lines += [
            "",
            "The same slice thickness, kernel and contrast phase as the prior keep the comparison strong; a "
            "difference is named in the report as a reason the comparison is weaker.",
            "",
            _DISCLAIMER,
        ]
        # The service's note about the order, not one analyzer's finding: its source is the service (as for queue
        # notices), so each analyzer's own finding card keeps its attribution and feedback.
        card = _base_card(summary=summary, detail="\n".join(lines), indicator="info", analyzer=None, settings=settings)
        context = {"diagnosticReport": newest.report_reference, "serviceRequest": order.reference}
        if newest.imaging_studies:
            context["imagingStudy"] = newest.imaging_studies[0]
        card["links"] = [smart_link(settings, context, "Review the prior AI result in imaging-cds")]
        card["overrideReasons"] = [dict(r) for r in OVERRIDE_REASONS]
        cards.append(card)
    return cards

"""Compare a result with the patient's earlier results of the same analyzer: change, and whether it is real.

A radiologist reads a scan against the previous one; disease monitoring is a change, not a value. Two measurements
of an unchanged patient still differ (breath-hold, noise, the segmentation meeting different voxels), so a change
is called ``increased`` or ``decreased`` only when it leaves the measurement's published repeatability, and
``stable`` when it stays inside; a measurement without a published repeatability gets its change and no verdict.
Each analyzer's model card says, in its ``followup`` section, which measurements are followed, their repeatability
with the source, which direction is the worse one, and which earlier analyzer versions measure the same thing
(:func:`followup_spec`).

Everything here is pure: the prior results arrive as :class:`PriorResult` (the FHIR layer reads them from the EHR,
see :mod:`fhir_adapters.history`), the acquisition of each scan as :class:`Acquisition` (from the DICOM attributes
of the volume), and what comes out, :class:`FollowupComparison`, is what the FHIR builders file and the report
states. Lesion lists (nodules) need their lesions matched first: for an analyzer whose card follows lesions
(``followup.lesions``), each finding with a centre is matched to the prior result's by
:func:`models.lesion_followup.match_lesions`, after aligning the two scans' lungs, and the matches travel in the same
comparison (:attr:`FollowupComparison.lesions`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from models.base import AnalysisResult, Finding, Measurement
from models.cards import ModelCard
from models.lesion_followup import Box, Lesion, LesionMatch, LungAlignment, lesions_sentence, match_lesions

Verdict = Literal["stable", "increased", "decreased", "not-assessed"]
Direction = Literal["increase", "decrease"]

RATE_MIN_DAYS = 90
"""A change per year is given for intervals of at least this many days: over shorter intervals the annualised
figure magnifies measurement noise (a project convention, stated in the report)."""
DAYS_PER_YEAR = 365.25
SLICE_THICKNESS_TOLERANCE_MM = 0.1
MEAN_DIAMETER_KEY = "nodule_mean_diameter_mm"
VOLUME_KEY = "nodule_volume_mm3"
TYPE_KEY = "nodule_type"
"""The finding measurements and value a lesion is followed by (those of ``ct-lung-nodules``): the Lung-RADS mean
diameter, the segmented volume, and the type (the growth categories are those of solid nodules)."""
NOT_VALIDATED = (
    "Change figures are computed from the two filed results; they are not validated on real follow-up pairs of scans."
)


# ---------------------------------------------------------------------------------------------- what the card says


@dataclass(frozen=True)
class Repeatability:
    """How far two measurements of an unchanged patient may differ (95 % limits), as a published source states it.

    ``kind`` is ``absolute`` (limits ``lower``..``upper`` in the measurement's unit, e.g. -1.3..+1.1 points of
    LAA-950), ``relative`` (``percent`` of the prior value either way) or ``square-root`` (``coefficient`` x the
    square root of the prior value either way, and above ``zero_prior_limit`` from a prior of zero: the coronary
    calcium model of Sevrukov et al.). ``basis`` says what was measured how, ``source`` cites it.
    ``slice_thickness_mm`` is the slice thickness the figure was measured on, when the source says: thicker scans
    make the comparison weaker, and beyond ``verdict_up_to_slice_mm`` (when set) no verdict is given at all, because
    the measurement is known to vary far more on such slices.
    """

    kind: Literal["absolute", "relative", "square-root"]
    basis: str
    source: str
    lower: float = 0.0
    upper: float = 0.0
    percent: float = 0.0
    coefficient: float = 0.0
    zero_prior_limit: float = 0.0
    slice_thickness_mm: float | None = None
    verdict_up_to_slice_mm: float | None = None

    def band(self, prior: float) -> tuple[float, float]:
        """The values a follow-up of ``prior`` can take without a change beyond repeatability (inclusive)."""
        if self.kind == "absolute":
            return prior + self.lower, prior + self.upper
        if self.kind == "relative":
            return prior * (1.0 - self.percent / 100.0), prior * (1.0 + self.percent / 100.0)
        if prior <= 0.0:
            return 0.0, self.zero_prior_limit
        spread = self.coefficient * math.sqrt(prior)
        return max(prior - spread, 0.0), prior + spread

    def describe(self, prior: float, unit: str) -> str:
        """The limit in words, as the report quotes it (``+1.1 / -1.3 points``, ``+/-16 HU``)."""
        if self.kind == "absolute":
            if math.isclose(-self.lower, self.upper):
                return f"+/-{_number(self.upper)} {unit}".rstrip()
            return f"+{_number(self.upper)} / {_number(self.lower)} {unit}".rstrip()
        if self.kind == "relative":
            return f"+/-{_number(self.percent)} % of the prior value"
        high = self.band(prior)[1]
        if prior <= 0.0:
            return f"above {_number(high)} {unit} from a prior of 0".replace("  ", " ")
        return f"+/-{_number(high - prior)} {unit} ({_number(self.coefficient)} x the square root of the prior)"


@dataclass(frozen=True)
class FollowedMeasurement:
    """One measurement an analyzer follows over time, as its card describes it.

    ``repeatability`` is ``None`` when no published repeatability fits the measurement; ``no_verdict_because`` then
    says why, and the change is shown without a verdict. ``worse`` is the direction that means progression
    (``increase`` for LAA-950, ``decrease`` for bone attenuation). ``same_site`` asks that both results name the same
    structure (the measurement's text, e.g. the vertebra), since the key alone does not say which one was measured.
    ``comparable_versions``, when set, replaces the card's list for this measurement: a version that changed how one
    measurement is made still measures the others as before.
    """

    key: str
    repeatability: Repeatability | None
    worse: Direction | None = None
    same_site: bool = False
    no_verdict_because: str = ""
    comparable_versions: frozenset[str] | None = None


@dataclass(frozen=True)
class FollowupSpec:
    """An analyzer's ``followup`` card section: what is followed, how far it may vary, which versions agree."""

    analyzer: str
    version: str
    comparable_versions: frozenset[str]
    measurements: Mapping[str, FollowedMeasurement]
    validation: str
    lesions: str | None = None
    """The finding kind whose lesions are matched with the prior's (``lung_nodule``); ``None`` when none are."""

    def compares_with(self, version: str | None, key: str | None = None) -> bool:
        """Whether a result of analyzer ``version`` measures the same thing as this version's results: measurement
        ``key``, or (without one) at least one of the followed measurements."""
        if version is None:
            return False
        if version == self.version:
            return True
        if key is None:
            if not self.measurements:  # lesions only (nodules): the card's list decides
                return version in self.comparable_versions
            return any(self.compares_with(version, k) for k in self.measurements)
        followed = self.measurements.get(key)
        versions = followed.comparable_versions if followed is not None else None
        return version in (self.comparable_versions if versions is None else versions)


def followup_spec(card: ModelCard) -> FollowupSpec | None:
    """The follow-up rules of an analyzer's card, or ``None`` when its results are not followed over time.

    The card schema (:data:`models.cards.CARD_SCHEMA`) has already checked the section's shape.
    """
    section = card.followup
    if not section or not (section.get("measurements") or section.get("lesions")):
        return None
    followed: dict[str, FollowedMeasurement] = {}
    for key, item in (section.get("measurements") or {}).items():
        raw = item.get("repeatability")
        repeatability = None
        if raw is not None:
            repeatability = Repeatability(
                kind=raw["kind"],
                basis=raw["basis"],
                source=raw["source"],
                lower=float(raw.get("lower", 0.0)),
                upper=float(raw.get("upper", 0.0)),
                percent=float(raw.get("percent", 0.0)),
                coefficient=float(raw.get("coefficient", 0.0)),
                zero_prior_limit=float(raw.get("zero_prior_limit", 0.0)),
                slice_thickness_mm=raw.get("slice_thickness_mm"),
                verdict_up_to_slice_mm=raw.get("verdict_up_to_slice_mm"),
            )
        followed[key] = FollowedMeasurement(
            key=key,
            repeatability=repeatability,
            worse=item.get("worse"),
            same_site=bool(item.get("same_site", False)),
            no_verdict_because=str(item.get("no_verdict_because", "")),
            comparable_versions=None if "comparable_versions" not in item else frozenset(item["comparable_versions"]),
        )
    return FollowupSpec(
        analyzer=card.name,
        version=card.version,
        comparable_versions=frozenset(section.get("comparable_versions", ())),
        measurements=followed,
        validation=str(section.get("validation", NOT_VALIDATED)),
        lesions=(section.get("lesions") or {}).get("kind"),
    )


# ---------------------------------------------------------------------------------------------- the two scans


@dataclass(frozen=True)
class Acquisition:
    """How a scan was acquired, as far as it changes the numbers: what makes two scans comparable or not.

    Read from the volume's DICOM attributes (:meth:`from_attributes`) and filed with the result, so that a later
    comparison knows the prior scan's too. Empty fields were not stated in the images.
    """

    slice_thickness_mm: float | None = None
    kernel: str = ""
    contrast_agent: str = ""
    kvp: float | None = None
    scanner: str = ""

    @classmethod
    def from_attributes(cls, attributes: Mapping[str, str]) -> Acquisition:
        scanner = " ".join(
            part for part in (attributes.get("Manufacturer", ""), attributes.get("ManufacturerModelName", "")) if part
        )
        return cls(
            slice_thickness_mm=_positive(attributes.get("SliceThickness", "")),
            kernel=attributes.get("ConvolutionKernel", "").strip(),
            contrast_agent=attributes.get("ContrastBolusAgent", "").strip(),
            kvp=_positive(attributes.get("KVP", "")),
            scanner=scanner.strip(),
        )

    @property
    def empty(self) -> bool:
        return self == Acquisition()


def acquisition_differences(current: Acquisition, prior: Acquisition | None) -> tuple[str, ...]:
    """Why the two scans' numbers are less comparable, in words; empty when nothing stated differs.

    Slice thickness, reconstruction kernel and contrast change attenuation-based measures (LAA-950, trabecular HU,
    calcium scores); tube voltage changes HU and calcium; another scanner changes calibration. A difference is named
    only when both scans state the value, except contrast: an agent stated for one scan and not the other is named.
    """
    if prior is None or prior.empty:
        return ("the acquisition of the prior scan (slice thickness, kernel, contrast) was not filed with its result",)
    reasons: list[str] = []
    now, before = current.slice_thickness_mm, prior.slice_thickness_mm
    if now is not None and before is not None and abs(now - before) > SLICE_THICKNESS_TOLERANCE_MM:
        reasons.append(f"slice thickness {_number(now)} mm now, {_number(before)} mm before")
    if current.kernel and prior.kernel and current.kernel.casefold() != prior.kernel.casefold():
        reasons.append(f"reconstruction kernel {current.kernel} now, {prior.kernel} before")
    if bool(current.contrast_agent) != bool(prior.contrast_agent):
        if current.contrast_agent:
            reasons.append(f"contrast agent stated now ({current.contrast_agent}), not before")
        else:
            reasons.append(f"contrast agent stated before ({prior.contrast_agent}), not now")
    if current.kvp is not None and prior.kvp is not None and abs(current.kvp - prior.kvp) >= 1.0:
        reasons.append(f"tube voltage {_number(current.kvp)} kV now, {_number(prior.kvp)} kV before")
    if current.scanner and prior.scanner and current.scanner.casefold() != prior.scanner.casefold():
        reasons.append(f"scanner {current.scanner} now, {prior.scanner} before")
    return tuple(reasons)


# ---------------------------------------------------------------------------------------------- the prior results


@dataclass(frozen=True)
class PriorMeasurement:
    """One filed measurement of an earlier result: ``reference`` is its Observation (``Observation/<id>``)."""

    key: str
    value: float
    unit: str
    text: str
    reference: str


@dataclass(frozen=True)
class PriorResult:
    """An earlier result of the analyzer for the same patient, as the EHR holds it.

    ``effective`` is when the prior images were acquired; ``version`` the analyzer version that measured them
    (``None`` when the EHR did not say); ``acquisition`` what was filed about the scan (``None`` for results filed
    before acquisitions were recorded).
    """

    reference: str
    analyzer: str
    version: str | None
    effective: datetime
    imaging_study: str
    measurements: tuple[PriorMeasurement, ...]
    acquisition: Acquisition | None = None
    modality: str = "CT"
    lesions: tuple[Lesion, ...] = ()
    lungs_mm: Box | None = None
    """The lesions the prior result listed with their centres, and the extent of its lungs; ``lungs_mm`` is ``None``
    for a result filed before positions were recorded, whose lesions cannot be matched."""

    def measurement(self, key: str) -> PriorMeasurement | None:
        return next((m for m in self.measurements if m.key == key), None)


# ---------------------------------------------------------------------------------------------- the comparison


@dataclass(frozen=True)
class MeasurementChange:
    """The change of one measurement since the prior, and what it means.

    ``absolute`` is in the measurement's unit (percentage points for a percentage), ``percent`` relative to the prior
    (``None`` from a prior of 0), ``per_year`` the absolute change per year (``None`` for intervals under
    :data:`RATE_MIN_DAYS`). ``band`` is the range the current value could take without a change beyond repeatability.
    """

    key: str
    display: str
    unit: str
    current: float
    prior: float
    prior_reference: str
    interval_days: float
    absolute: float
    percent: float | None
    per_year: float | None
    verdict: Verdict
    band: tuple[float, float] | None
    limit: str
    source: str
    worse: Direction | None
    no_verdict_because: str = ""
    weaker_because: str = ""
    """What makes this measurement's comparison weaker beyond the acquisition differences of the two scans (slices
    thicker than those its repeatability was measured on)."""

    @property
    def progressed(self) -> bool:
        """A change beyond repeatability in the direction the card calls worse."""
        return (self.verdict, self.worse) in (("increased", "increase"), ("decreased", "decrease"))

    def sentence(self) -> str:
        """``LAA-950 3.1 % -> 5.2 %, +2.1 points, beyond the repeatability of +1.1 / -1.3 points: increased``."""
        unit = _unit_words(self.unit)
        text = (
            f"{self.display} {_number(self.prior)} {_unit_label(self.unit)} -> {_number(self.current)} "
            f"{_unit_label(self.unit)}, {_signed(self.absolute)} {unit}".replace("  ", " ").rstrip()
        )
        if self.percent is not None and self.unit != "%":
            text += f" ({_signed(self.percent)} %)"
        if self.verdict == "not-assessed":
            return f"{text}, no verdict ({self.no_verdict_because})" if self.no_verdict_because else text
        where = "within" if self.verdict == "stable" else "beyond"
        weaker = f" (weaker: {self.weaker_because})" if self.weaker_because else ""
        return f"{text}, {where} the repeatability of {self.limit}{weaker}: {self.verdict}"


@dataclass(frozen=True)
class FollowupComparison:
    """What the current result says against the patient's earlier ones.

    ``prior`` is the newest earlier result whose version measures the same thing (``None`` when there is none);
    ``history`` every earlier result found, newest first, for the trend (comparable or not); ``not_compared`` says
    in words which earlier results were left out and why; ``weaker_because`` names the acquisition differences that
    make the comparison weaker.
    """

    analyzer: str
    current_date: datetime
    prior: PriorResult | None
    changes: tuple[MeasurementChange, ...] = ()
    history: tuple[PriorResult, ...] = ()
    not_compared: tuple[str, ...] = ()
    weaker_because: tuple[str, ...] = ()
    validation: str = NOT_VALIDATED
    lesions: tuple[LesionMatch, ...] | None = None
    """Each current lesion matched to the prior's (or new), and each prior lesion not found (resolved); ``None``
    when lesions were not matched (the analyzer lists none, or a scan lacks the positions: ``not_compared`` says)."""

    @property
    def interval_days(self) -> float | None:
        return None if self.prior is None else _days(self.prior.effective, self.current_date)

    @property
    def progressed(self) -> tuple[MeasurementChange, ...]:
        return tuple(c for c in self.changes if c.progressed)

    def sentence(self) -> str:
        """The comparison as the report's conclusion states it, with the earlier results left out and why (empty
        when there was nothing earlier)."""
        notes = " ".join(self.not_compared)
        if self.prior is None:
            return notes
        assessed = [c for c in self.changes if c.verdict != "not-assessed"]
        others = len(self.changes) - len(assessed)
        compared = "; ".join(c.sentence() for c in assessed)
        if self.lesions is not None:
            compared = "; ".join(text for text in (compared, lesions_sentence(self.lesions)) if text)
        compared = compared or "no measurement with a stated repeatability"
        parts = [f"Compared with the {self.prior.modality} of {self.prior.effective.date().isoformat()}: {compared}"]
        if others:
            parts.append(f"{others} further measurement{'s' if others > 1 else ''} compared without a verdict")
        if self.weaker_because:
            parts.append("comparison weaker: " + "; ".join(self.weaker_because))
        return " ".join(text for text in (". ".join(parts) + ".", notes) if text)


def compare_with_history(
    result: AnalysisResult,
    *,
    current_date: datetime,
    acquisition: Acquisition,
    history: Sequence[PriorResult],
    spec: FollowupSpec,
) -> FollowupComparison:
    """Compare ``result`` with the newest comparable earlier result in ``history``.

    ``history`` must be the same patient's earlier results of this analyzer (the caller's search guarantees patient
    and analyzer; results at or after ``current_date`` are ignored here too). An earlier result is comparable when
    the card says its version measures the same thing (:meth:`FollowupSpec.compares_with`).
    """
    earlier = sorted(
        (p for p in history if p.analyzer == result.analyzer and p.effective < current_date),
        key=lambda p: p.effective,
        reverse=True,
    )
    not_compared: list[str] = []
    prior = None
    for candidate in earlier:
        if spec.compares_with(candidate.version):
            prior = candidate
            break
        version = candidate.version or "an unrecorded version"
        not_compared.append(
            f"The result of {candidate.effective.date().isoformat()} ({result.analyzer} {version}) is not compared: "
            f"the model card does not say that version measures the same as {spec.version}."
        )
    if prior is None:
        return FollowupComparison(
            result.analyzer, current_date, None, history=tuple(earlier), not_compared=tuple(not_compared)
        )
    interval = _days(prior.effective, current_date)
    changes: list[MeasurementChange] = []
    for m in result.measurements:
        followed = spec.measurements.get(m.key)
        before = prior.measurement(m.key)
        if followed is None or before is None:
            continue
        if not spec.compares_with(prior.version, m.key):
            not_compared.append(
                f"{m.display} is not compared: {result.analyzer} {prior.version} measured it differently (model card)."
            )
            continue
        if followed.same_site and measurement_site(m.display) != measurement_site(before.text):
            not_compared.append(f"{m.display} is not compared: the prior measured {before.text}.")
            continue
        thickest = _thickest(acquisition, prior.acquisition)
        changes.append(_change(m, before, interval, followed, thickest))
    lesions = None
    if spec.lesions is not None:
        lesions, why_not = follow_lesions(result, prior, interval, spec, _thickest(acquisition, prior.acquisition))
        not_compared.extend(why_not)
    return FollowupComparison(
        analyzer=result.analyzer,
        current_date=current_date,
        prior=prior,
        changes=tuple(changes),
        history=tuple(earlier),
        not_compared=tuple(not_compared),
        weaker_because=acquisition_differences(acquisition, prior.acquisition) if changes or lesions else (),
        validation=spec.validation,
        lesions=lesions,
    )


def lesion(
    key: str,
    centre_mm: tuple[float, float, float] | None,
    measurements: Mapping[str, float],
    values: Mapping[str, str],
    reference: str = "",
) -> Lesion | None:
    """A finding as :mod:`models.lesion_followup` follows it, or ``None`` without a centre or a mean diameter."""
    diameter = measurements.get(MEAN_DIAMETER_KEY)
    if centre_mm is None or diameter is None:
        return None
    return Lesion(
        key=key,
        position_mm=centre_mm,
        mean_diameter_mm=diameter,
        volume_mm3=measurements.get(VOLUME_KEY),
        solid=values.get(TYPE_KEY, "solid") == "solid",
        reference=reference,
    )


def finding_lesion(finding: Finding) -> Lesion | None:
    return lesion(
        finding.key,
        finding.centre_mm,
        {m.key: m.value for m in finding.measurements},
        {v.key: v.code for v in finding.values},
    )


def follow_lesions(
    result: AnalysisResult,
    prior: PriorResult,
    interval_days: float,
    spec: FollowupSpec,
    thickest_slice_mm: float | None = None,
) -> tuple[tuple[LesionMatch, ...] | None, tuple[str, ...]]:
    """Match the result's lesions with the prior's after aligning the two scans' lungs; ``None`` and the reason when
    they cannot be (a scan without its lungs' extent or its lesions' centres: positions in two scans' own coordinates
    are centimetres apart for the same nodule, so no unaligned match is attempted)."""
    listed = [f for f in result.findings if f.kind == spec.lesions]
    current = [found for found in map(finding_lesion, listed) if found is not None]
    if len(current) < len(listed) or result.lungs_mm is None:
        return None, ("Nodules are not matched with the prior: this scan's positions are not known.",)
    if prior.lungs_mm is None:
        return None, (
            f"Nodules are not matched with the result of {prior.effective.date().isoformat()}: it did not record its "
            "nodules' positions and its lungs' extent.",
        )
    if not spec.compares_with(prior.version, MEAN_DIAMETER_KEY):
        return None, (f"Nodules are not matched: {result.analyzer} {prior.version} measured them differently.",)
    alignment = LungAlignment.from_lungs(prior.lungs_mm, result.lungs_mm)
    return match_lesions(current, prior.lesions, alignment, interval_days, thickest_slice_mm), ()


def _change(
    m: Measurement,
    before: PriorMeasurement,
    interval: float,
    followed: FollowedMeasurement,
    thickest_slice_mm: float | None,
) -> MeasurementChange:
    absolute = m.value - before.value
    repeatability = followed.repeatability
    verdict: Verdict = "not-assessed"
    band = None
    no_verdict_because = followed.no_verdict_because
    weaker = ""
    if repeatability is not None and _thicker(thickest_slice_mm, repeatability.verdict_up_to_slice_mm):
        no_verdict_because = (
            f"its published repeatability holds for slices up to {_number(repeatability.verdict_up_to_slice_mm or 0)} "
            f"mm, and these scans have {_number(thickest_slice_mm or 0)} mm slices, on which it varies far more"
        )
        repeatability = None
    elif repeatability is not None and _thicker(thickest_slice_mm, repeatability.slice_thickness_mm):
        weaker = (
            f"slices of {_number(thickest_slice_mm or 0)} mm, thicker than the "
            f"{_number(repeatability.slice_thickness_mm or 0)} mm its repeatability was measured on"
        )
    if repeatability is not None:
        band = repeatability.band(before.value)
        verdict = "increased" if m.value > band[1] else "decreased" if m.value < band[0] else "stable"
    return MeasurementChange(
        key=m.key,
        display=m.display,
        unit=m.unit,
        current=m.value,
        prior=before.value,
        prior_reference=before.reference,
        interval_days=interval,
        absolute=absolute,
        percent=None if before.value == 0 else 100.0 * absolute / abs(before.value),
        per_year=absolute * DAYS_PER_YEAR / interval if interval >= RATE_MIN_DAYS else None,
        verdict=verdict,
        band=band,
        limit="" if repeatability is None else repeatability.describe(before.value, _unit_words(m.unit)),
        source="" if repeatability is None else repeatability.source,
        worse=followed.worse,
        no_verdict_because=no_verdict_because,
        weaker_because=weaker,
    )


def _thicker(thickest_slice_mm: float | None, limit_mm: float | None) -> bool:
    if thickest_slice_mm is None or limit_mm is None:
        return False
    return thickest_slice_mm > limit_mm + SLICE_THICKNESS_TOLERANCE_MM


def _thickest(current: Acquisition, prior: Acquisition | None) -> float | None:
    """The thicker of the two scans' slices, when either states it."""
    known = [a.slice_thickness_mm for a in (current, prior) if a is not None and a.slice_thickness_mm is not None]
    return max(known) if known else None


# ---------------------------------------------------------------------------------------------- helpers


def measurement_site(text: str) -> str:
    """The structure a measurement names in brackets (``Anterior height (L1)`` -> ``l1``), else its whole text."""
    opening = text.rfind("(")
    return (text[opening + 1 :].rstrip(") ") if opening >= 0 else text).strip().casefold()


def _days(start: datetime, end: datetime) -> float:
    return (end - start).total_seconds() / 86400.0


def _positive(raw: str) -> float | None:
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def _number(value: float) -> str:
    """Up to three significant decimals, no trailing zeros (``1.1``, ``16``, ``0.25``)."""
    if value == 0:
        return "0"
    text = f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return text[:-2] if text.endswith(".0") else text


def _signed(value: float) -> str:
    return ("+" if value > 0 else "") + _number(value)


_UNIT_LABELS = {"[hnsf'U]": "HU", "1": "", "mm3": "mm3"}


def _unit_label(ucum: str) -> str:
    return _UNIT_LABELS.get(ucum, ucum)


def _unit_words(ucum: str) -> str:
    """How a difference is spoken: a difference of two percentages is in points."""
    return "points" if ucum == "%" else _unit_label(ucum)


def as_json(comparison: FollowupComparison) -> dict[str, Any]:
    """A JSON summary of the comparison (no PHI: values, dates of the studies, references)."""
    return {
        "prior": None
        if comparison.prior is None
        else {
            "report": comparison.prior.reference,
            "date": comparison.prior.effective.isoformat(),
            "version": comparison.prior.version,
        },
        "changes": [
            {
                "key": c.key,
                "prior": c.prior,
                "current": c.current,
                "absolute": c.absolute,
                "percent": c.percent,
                "perYear": c.per_year,
                "verdict": c.verdict,
            }
            for c in comparison.changes
        ],
        "lesions": None
        if comparison.lesions is None
        else [
            {
                "key": m.key,
                "status": m.status,
                "verdict": m.verdict,
                "distanceMm": m.distance_mm,
                "diameterChangeMm": None if m.growth is None else m.growth.diameter_change_mm,
                "volumeChangePercent": None if m.growth is None else m.growth.volume_change_percent,
                "vdtDays": None if m.growth is None else m.growth.vdt_days,
                "lungRads": m.lung_rads,
            }
            for m in comparison.lesions
        ],
        "notCompared": list(comparison.not_compared),
        "weakerBecause": list(comparison.weaker_because),
    }

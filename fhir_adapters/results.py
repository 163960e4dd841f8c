"""Read the project's filed AI results back out of FHIR: the one reader, beside the writer.

:mod:`fhir_adapters.builders` (with the codes of :mod:`fhir_adapters.terminology`) files each analysis as a
DiagnosticReport identified in :data:`~fhir_adapters.constants.ANALYSIS_IDENTIFIER_SYSTEM` and labelled
AI-asserted (``meta.security`` AIAST), whose ``conclusionCode`` carries the project's finding category
(``"<analyzer>/<category>"``) and an A/N interpretation, whose result Observations are coded in the project's
measurement CodeSystem, and whose Device is identified as ``"<name>@<version>"``. This module reads exactly
that back, for both front doors: the CDS service's cards (:mod:`cds`) and the clinician app's screens
(:mod:`smart_launch`).

A result may also carry comparisons with the patient's earlier result of the same analyzer (Observations coded
``change-since-prior`` in :data:`~fhir_adapters.constants.COMPARISON_CODESYSTEM`, read as :class:`FiledComparison`)
and how its images were acquired (extension :data:`~fhir_adapters.constants.ACQUISITION_EXTENSION`, read as a
:class:`models.followup.Acquisition`), which the next comparison needs.

A result is recognised by the project's identifier system, never by free text and not by the AIAST label alone
(another vendor's AI result carries that label too), so a human radiology report or someone else's AI output is
never summarised as ours. These are pure functions over JSON: an element of the wrong JSON type reads as absent
(:mod:`fhir_adapters.fhirjson`), and each resource is looked at once, because the CDS hooks call them on every
request.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from fhir_adapters import fhirjson
from fhir_adapters.constants import (
    ABNORMAL_INTERPRETATION_SYSTEM,
    ACQUISITION_EXTENSION,
    ANALYSIS_IDENTIFIER_SYSTEM,
    CATEGORY_CODESYSTEM,
    COMPARISON_CODESYSTEM,
    DEVICE_IDENTIFIER_SYSTEM,
    FINDING_CODESYSTEM,
    FINDING_VALUE_CODESYSTEM,
    LUNG_EXTENT_EXTENSION,
    MEASUREMENT_CODESYSTEM,
)
from fhir_adapters.terminology import unit_label
from models.followup import Acquisition
from models.lesion_followup import Box

NORMAL_CATEGORY_CODES = frozenset({"none", "normal", "negative", "no-finding", "not-detected", "benign"})
"""Fallback for reports without an explicit A/N conclusion code: category codes that mean "nothing abnormal"."""
AWAITING_REVIEW_STATUSES = frozenset({"registered", "partial", "preliminary"})
SIGNED_STATUSES = frozenset({"final", "amended", "corrected", "appended"})
WITHDRAWN_STATUSES = frozenset({"cancelled", "entered-in-error"})
"""A clinician rejected the result (or it was filed in error): it must no longer be relied on."""


class ReportCategory(NamedTuple):
    """The finding category a report concludes with: analyzer name, category code and its display."""

    analyzer: str
    code: str
    display: str


@dataclass(frozen=True)
class MeasuredValue:
    """One measurement of an AI result, as stored in its Observation.

    ``display`` is the measurement CodeSystem's name for ``key``; ``text`` what the analyzer called this value
    (``Observation.code.text``, e.g. naming the vertebra). ``unit`` is the readable label (``HU``, ``%``; empty
    for a plain number); ``interpretation`` the HL7 v3 code (``H``, ``L``...), ``interpretation_display`` its words.
    """

    key: str
    display: str
    value: float
    unit: str
    interpretation: str | None = None
    text: str = ""
    interpretation_display: str | None = None
    reference: str = ""
    """The Observation it was read from (``Observation/<id>``), for a comparison to derive from; empty when unknown."""


@dataclass(frozen=True)
class FiledComparison:
    """A comparison of one measurement with the prior study, as filed (see :mod:`fhir_adapters.builders`).

    ``verdict`` is ``stable``, ``increased``, ``decreased`` or ``not-assessed``; ``sentence`` the filed wording
    (``LAA-950 3.1 % -> 5.2 %, +2.1 points, beyond the repeatability of ...: increased``); ``band`` the values the
    current measurement could take without a change beyond repeatability, when one is stated.
    """

    key: str
    display: str
    unit: str
    current: float
    prior: float | None
    prior_date: datetime | None
    absolute: float | None
    per_year: float | None
    verdict: str
    sentence: str
    band: tuple[float, float] | None = None
    significant: bool = False  # interpretation U or D: a change beyond repeatability
    progressed: bool = False  # interpretation W: beyond repeatability in the direction the analyzer calls worse


@dataclass(frozen=True)
class FiledLesionComparison:
    """One lesion compared with the prior study, as filed (code ``lesion-since-prior``).

    ``key`` names the lesion (``nodule-3``; ``resolved-nodule-2`` for a prior one not found now); ``verdict`` is
    ``stable``, ``increased``, ``decreased``, ``new`` or ``resolved``; ``current`` and ``prior`` the finding
    Observations it derives from (empty when there is none); ``sentence`` the filed wording with the numbers.
    """

    key: str
    verdict: str
    sentence: str
    current: str
    prior: str
    prior_date: datetime | None
    lung_rads: str | None = None

    @property
    def progressed(self) -> bool:
        """Grown beyond the margins (a new lesion is not called progression: on a detector with several false
        positives per scan most new ones are noise; it is listed, with the category a new nodule implies)."""
        return self.verdict == "increased"


@dataclass(frozen=True)
class CodedAnswer:
    """A coded value of a result (a Lung-RADS category, a nodule type): what is coded, its code and its words.

    ``code`` is the value without its attribute prefix (``4A`` for ``lung_rads/4A``), or the standard code (a
    RadLex site) when the value is in a standard system.
    """

    key: str
    display: str
    code: str
    code_display: str


@dataclass(frozen=True)
class ListedFinding:
    """One finding a report lists on its own (a lung nodule), as stored in its Observation.

    ``kind`` is the project finding code (``lung_nodule``); ``display`` the analyzer's one-line description
    (``Observation.code.text``); ``measurements`` and ``values`` its components; ``key_images`` the Media it is
    derived from (``Media/<id>``), which show it. ``key`` is the analyzer's key of the finding (``nodule-1``, from
    the Observation's analysis identifier; empty when absent) and ``centre_mm`` its centre in patient coordinates
    (mm, LPS) when filed.
    """

    reference: str
    kind: str
    display: str
    measurements: tuple[MeasuredValue, ...]
    values: tuple[CodedAnswer, ...]
    location: str
    body_site: str
    key_images: tuple[str, ...]
    key: str = ""
    centre_mm: tuple[float, float, float] | None = None

    def measurement(self, key: str) -> MeasuredValue | None:
        return next((m for m in self.measurements if m.key == key), None)

    def value(self, key: str) -> CodedAnswer | None:
        return next((v for v in self.values if v.key == key), None)


@dataclass(frozen=True)
class AiFinding:
    """One AI analysis of one study, as the EHR holds it.

    ``analyzer``, ``category_code`` and ``category_display`` are empty for a report without the project's
    category coding (:func:`extract_findings` leaves such reports out; a screen may still show one).
    """

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
    listed: tuple[ListedFinding, ...] = ()
    """Findings the report lists one by one (its lesions), most suspicious first, as the analyzer ordered them."""
    assessments: tuple[CodedAnswer, ...] = ()
    """The report's exam-level coded conclusions besides its category (a guideline category, a recommendation)."""
    subject: str = ""  # "Patient/<id>" as the report names it
    acquisition: Acquisition | None = None
    """How the analysed images were acquired, when the report recorded it (results filed before that did not)."""
    comparisons: tuple[FiledComparison, ...] = ()
    """The report's comparisons with the patient's prior result, one per compared measurement."""
    lungs_mm: Box | None = None
    """The extent of the lungs in patient coordinates, when the report recorded it (a lesion-listing analyzer)."""
    lesion_comparisons: tuple[FiledLesionComparison, ...] = ()
    """The report's lesions compared with the prior's: matched, new and not found now."""

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

    def assessment(self, key: str) -> CodedAnswer | None:
        return next((a for a in self.assessments if a.key == key), None)

    def comparison(self, key: str) -> FiledComparison | None:
        return next((c for c in self.comparisons if c.key == key), None)


def _codings(concept: Any) -> list[Any]:
    """The ``coding`` array of a CodeableConcept (its items still to be checked for being objects)."""
    return fhirjson.items(fhirjson.element(concept).get("coding"))


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
    """A DiagnosticReport the project filed, recognised by its analysis identifier system."""
    return resource.get("resourceType") == "DiagnosticReport" and any(
        isinstance(i, dict) and i.get("system") == ANALYSIS_IDENTIFIER_SYSTEM
        for i in fhirjson.items(resource.get("identifier"))
    )


def report_category(report: Mapping[str, Any]) -> ReportCategory | None:
    """The project's finding-category coding of a report (``"<analyzer>/<code>"``), or ``None``."""
    return _conclusion(report)[0]


def _conclusion(report: Mapping[str, Any]) -> tuple[ReportCategory | None, bool | None]:
    """One pass over ``conclusionCode``: the finding category, and the analyzer's own verdict (the v3
    ObservationInterpretation A/N code the builders write; ``None`` on reports filed before it was written)."""
    category: ReportCategory | None = None
    abnormal: bool | None = None
    for concept in fhirjson.items(report.get("conclusionCode")):
        for coding in _codings(concept):
            if not isinstance(coding, dict):
                continue
            system, code = coding.get("system"), coding.get("code")
            if category is None and system == CATEGORY_CODESYSTEM and isinstance(code, str) and "/" in code:
                analyzer, _, category_code = code.partition("/")
                display = coding.get("display") or fhirjson.element(concept).get("text") or category_code
                category = ReportCategory(analyzer, category_code, str(display))
            elif abnormal is None and system == ABNORMAL_INTERPRETATION_SYSTEM and code in ("A", "N"):
                abnormal = code == "A"
    return category, abnormal


def _first_interpretation(observation: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for concept in fhirjson.items(observation.get("interpretation")):
        for coding in _codings(concept):
            if isinstance(coding, dict):
                return coding
    return None


def measured_value(observation: Mapping[str, Any]) -> MeasuredValue | None:
    """The measurement an Observation carries: its project coding and a numeric ``valueQuantity``; else ``None``."""
    quantity = observation.get("valueQuantity")
    if not isinstance(quantity, dict) or not isinstance(quantity.get("value"), int | float):
        return None
    concept = fhirjson.element(observation.get("code"))
    for coding in _codings(concept):
        if isinstance(coding, dict) and coding.get("system") == MEASUREMENT_CODESYSTEM:
            break
    else:
        return None
    display = str(coding.get("display") or concept.get("text") or coding.get("code"))
    interpretation = _first_interpretation(observation)
    return MeasuredValue(
        key=str(coding.get("code")),
        display=display,
        value=float(quantity["value"]),
        unit=str(quantity.get("unit") or unit_label(str(quantity.get("code") or ""))),
        interpretation=None if interpretation is None else str(interpretation.get("code")),
        text=str(concept.get("text") or display),
        interpretation_display=(
            None if interpretation is None else str(interpretation.get("display") or interpretation.get("code"))
        ),
        reference=f"Observation/{observation['id']}" if isinstance(observation.get("id"), str) else "",
    )


def _quantity_value(element: Any) -> float | None:
    value = fhirjson.element(element).get("value")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _coded(concept: Any, system: str) -> str | None:
    for coding in _codings(concept):
        if isinstance(coding, dict) and coding.get("system") == system and isinstance(coding.get("code"), str):
            return str(coding["code"])
    return None


def filed_comparison(observation: Mapping[str, Any]) -> FiledComparison | None:
    """The comparison an Observation coded ``change-since-prior`` carries; ``None`` for any other Observation."""
    if _coded(observation.get("code"), COMPARISON_CODESYSTEM) != "change-since-prior":
        return None
    current: MeasuredValue | None = None
    parts: dict[str, Mapping[str, Any]] = {}
    for component in fhirjson.items(observation.get("component")):
        if not isinstance(component, dict):
            continue
        code = _coded(component.get("code"), COMPARISON_CODESYSTEM)
        if code is not None:
            parts[code] = component
        elif current is None:
            current = measured_value({"code": component.get("code"), "valueQuantity": component.get("valueQuantity")})
    if current is None:
        return None
    value = fhirjson.element(observation.get("valueCodeableConcept"))
    low = _quantity_value(parts.get("repeatability-low", {}).get("valueQuantity"))
    high = _quantity_value(parts.get("repeatability-high", {}).get("valueQuantity"))
    interpretations = {
        coding.get("code")
        for concept in fhirjson.items(observation.get("interpretation"))
        for coding in _codings(concept)
        if isinstance(coding, dict) and coding.get("system") == ABNORMAL_INTERPRETATION_SYSTEM
    }
    return FiledComparison(
        key=current.key,
        display=current.text,  # the analyzer's own words for the measurement, as the comparison was worded
        unit=current.unit,
        current=current.value,
        prior=_quantity_value(parts.get("prior-value", {}).get("valueQuantity")),
        prior_date=parse_datetime(parts.get("prior-study-date", {}).get("valueDateTime")),
        absolute=_quantity_value(parts.get("absolute-change", {}).get("valueQuantity")),
        per_year=_quantity_value(parts.get("change-per-year", {}).get("valueQuantity")),
        verdict=_coded(value, COMPARISON_CODESYSTEM) or "not-assessed",
        sentence=str(value.get("text") or ""),
        band=None if low is None or high is None else (low, high),
        significant=bool(interpretations & {"U", "D"}),
        progressed="W" in interpretations,
    )


def filed_lesion_comparison(observation: Mapping[str, Any]) -> FiledLesionComparison | None:
    """The lesion comparison an Observation coded ``lesion-since-prior`` carries; ``None`` for any other."""
    if _coded(observation.get("code"), COMPARISON_CODESYSTEM) != "lesion-since-prior":
        return None
    parts: dict[str, Mapping[str, Any]] = {}
    for component in fhirjson.items(observation.get("component")):
        if isinstance(component, dict) and (code := _coded(component.get("code"), COMPARISON_CODESYSTEM)) is not None:
            parts[code] = component
    verdict = _coded(observation.get("valueCodeableConcept"), COMPARISON_CODESYSTEM) or "not-assessed"
    derived = [
        fhirjson.relative_reference(fhirjson.reference(d)) or "" for d in fhirjson.items(observation.get("derivedFrom"))
    ]
    current = "" if verdict == "resolved" else next(iter(derived), "")
    prior = next(iter(derived[1:]), "") if current else next(iter(derived), "")
    category = coded_answer("lung_rads", "Lung-RADS", parts.get("implied-lung-rads", {}).get("valueCodeableConcept"))
    key = ""
    for identifier in fhirjson.items(observation.get("identifier")):
        if isinstance(identifier, dict) and identifier.get("system") == ANALYSIS_IDENTIFIER_SYSTEM:
            key = str(identifier.get("value", "")).rpartition("/")[2]
    return FiledLesionComparison(
        key=key,
        verdict=verdict,
        sentence=str(fhirjson.element(observation.get("valueCodeableConcept")).get("text") or ""),
        current=current,
        prior=prior,
        prior_date=parse_datetime(parts.get("prior-study-date", {}).get("valueDateTime")),
        lung_rads=None if category is None else category.code,
    )


def _extension(resource: Mapping[str, Any], url: str) -> Mapping[str, Any] | None:
    """The resource's extension of ``url``, or ``None``."""
    return next(
        (e for e in fhirjson.items(resource.get("extension")) if isinstance(e, dict) and e.get("url") == url), None
    )


def read_acquisition(report: Mapping[str, Any]) -> Acquisition | None:
    """How the report's images were acquired (its acquisition extension), or ``None`` when it recorded nothing."""
    extension = _extension(report, ACQUISITION_EXTENSION)
    if extension is None:
        return None
    parts = {str(p.get("url")): p for p in fhirjson.items(extension.get("extension")) if isinstance(p, dict)}
    texts = {name: part.get("valueString") for name, part in parts.items()}
    numbers = {name: _quantity_value(part.get("valueQuantity")) for name, part in parts.items()}

    def text(name: str) -> str:
        value = texts.get(name)
        return value.strip() if isinstance(value, str) else ""

    return Acquisition(
        slice_thickness_mm=numbers.get("SliceThickness"),
        kernel=text("ConvolutionKernel"),
        contrast_agent=text("ContrastBolusAgent"),
        kvp=numbers.get("KVP"),
        scanner=text("Scanner"),
    )


def read_lung_extent(report: Mapping[str, Any]) -> Box | None:
    """The lungs' extent the report recorded (extension :data:`LUNG_EXTENT_EXTENSION`), or ``None``."""
    extension = _extension(report, LUNG_EXTENT_EXTENSION)
    if extension is None:
        return None
    values = {
        str(part.get("url")): _quantity_value(part.get("valueQuantity"))
        for part in fhirjson.items(extension.get("extension"))
        if isinstance(part, dict)
    }
    low = [values.get(f"low{axis}") for axis in "XYZ"]
    high = [values.get(f"high{axis}") for axis in "XYZ"]
    if any(v is None for v in (*low, *high)):
        return None
    return Box((low[0], low[1], low[2]), (high[0], high[1], high[2]))  # type: ignore[arg-type]


def _finding_key(observation: Mapping[str, Any]) -> str:
    """The analyzer's key of a finding, from its analysis identifier (``<analysis>/finding/<key>``)."""
    for identifier in fhirjson.items(observation.get("identifier")):
        if isinstance(identifier, dict) and identifier.get("system") == ANALYSIS_IDENTIFIER_SYSTEM:
            _, found, key = str(identifier.get("value", "")).rpartition("/finding/")
            if found:
                return key
    return ""


def _project_coding(concept: Any, system: str) -> Mapping[str, Any] | None:
    for coding in _codings(concept):
        if isinstance(coding, dict) and coding.get("system") == system and isinstance(coding.get("code"), str):
            return coding
    return None


def coded_answer(key: str, display: str, concept: Any) -> CodedAnswer | None:
    """A coded value (``valueCodeableConcept``): the project value code ``<key>/<code>``, else its first coding."""
    value = _project_coding(concept, FINDING_VALUE_CODESYSTEM)
    if value is not None:
        prefix, _, code = str(value["code"]).partition("/")
        code = code if prefix == key else str(value["code"])
    else:
        value = next((c for c in _codings(concept) if isinstance(c, dict) and c.get("code")), None)
        if value is None:
            return None
        code = str(value["code"])
    words = value.get("display") or fhirjson.element(concept).get("text") or code
    return CodedAnswer(key=key, display=display, code=code, code_display=str(words))


def _component_measurement(component: Mapping[str, Any]) -> MeasuredValue | None:
    """A component with a project measurement code and a ``valueQuantity``, read like a measured Observation."""
    return measured_value(
        {
            "code": component.get("code"),
            "valueQuantity": component.get("valueQuantity"),
            "interpretation": component.get("interpretation"),
        }
    )


def listed_finding(observation: Mapping[str, Any]) -> ListedFinding | None:
    """The finding an Observation lists (project finding code and components), or ``None`` for anything else."""
    components = [c for c in fhirjson.items(observation.get("component")) if isinstance(c, dict)]
    kind = _project_coding(observation.get("code"), FINDING_CODESYSTEM)
    if kind is None or not components:
        return None
    measurements: list[MeasuredValue] = []
    values: list[CodedAnswer] = []
    location = ""
    centre: dict[str, float | None] = {}
    for component in components:
        measured = _component_measurement(component)
        if measured is not None:
            measurements.append(measured)
            continue
        attribute = _project_coding(component.get("code"), FINDING_CODESYSTEM)
        if attribute is None:
            continue
        key = str(attribute["code"])
        if key == "location" and isinstance(component.get("valueString"), str):
            location = component["valueString"]
            continue
        if key in _CENTRE_KEYS:
            centre[key] = _quantity_value(component.get("valueQuantity"))
            continue
        answer = coded_answer(key, str(attribute.get("display") or key), component.get("valueCodeableConcept"))
        if answer is not None:
            values.append(answer)
    site = fhirjson.element(observation.get("bodySite"))
    site_words = site.get("text") or next(
        (c.get("display") for c in _codings(site) if isinstance(c, dict) and c.get("display")), ""
    )
    images = tuple(
        ref
        for ref in (
            fhirjson.relative_reference(fhirjson.reference(d)) or ""
            for d in fhirjson.items(observation.get("derivedFrom"))
        )
        if ref.startswith("Media/")
    )
    return ListedFinding(
        reference=f"Observation/{observation.get('id')}",
        kind=str(kind["code"]),
        display=str(fhirjson.element(observation.get("code")).get("text") or kind.get("display") or kind["code"]),
        measurements=tuple(measurements),
        values=tuple(values),
        location=location,
        body_site=str(site_words or ""),
        key_images=images,
        key=_finding_key(observation),
        centre_mm=_centre(centre),
    )


_CENTRE_KEYS = ("centre_x", "centre_y", "centre_z")


def _centre(parts: Mapping[str, float | None]) -> tuple[float, float, float] | None:
    x, y, z = (parts.get(key) for key in _CENTRE_KEYS)
    return None if x is None or y is None or z is None else (x, y, z)


def assessment_answer(observation: Mapping[str, Any]) -> CodedAnswer | None:
    """An exam-level assessment (project finding code, coded value, no components), or ``None``."""
    attribute = _project_coding(observation.get("code"), FINDING_CODESYSTEM)
    if (
        attribute is None
        or observation.get("component")
        or not isinstance(observation.get("valueCodeableConcept"), dict)
    ):
        return None
    key = str(attribute["code"])
    return coded_answer(
        key, str(fhirjson.element(observation.get("code")).get("text") or key), observation["valueCodeableConcept"]
    )


def device_version(device: Mapping[str, Any]) -> str | None:
    """The analyzer version a Device stands for: from its ``"<name>@<version>"`` identifier, else its version."""
    for identifier in fhirjson.items(device.get("identifier")):
        if isinstance(identifier, dict) and identifier.get("system") == DEVICE_IDENTIFIER_SYSTEM:
            _, at, version = str(identifier.get("value", "")).partition("@")
            if at:
                return version
    versions = [v.get("value") for v in fhirjson.items(device.get("version")) if isinstance(v, dict)]
    return str(versions[0]) if versions and versions[0] else None


def index_resources(resources: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """``{"Type/id": resource}`` for resources that have an id: what :func:`read_report` resolves references in."""
    return {f"{r.get('resourceType')}/{r.get('id')}": r for r in resources if r.get("id")}


def resolve(index: Mapping[str, Mapping[str, Any]], ref: Any) -> Mapping[str, Any] | None:
    """The resource a Reference element points at, among ``index``; absolute and versioned references too."""
    literal = fhirjson.reference(ref)
    return index.get(literal) or _resolve_elsewhere(index, literal)


def _resolve_elsewhere(index: Mapping[str, Mapping[str, Any]], literal: str) -> Mapping[str, Any] | None:
    if "://" in literal or "/_history" in literal:
        return index.get(fhirjson.relative_reference(literal) or "")
    return None


def read_report(report: Mapping[str, Any], index: Mapping[str, Mapping[str, Any]]) -> AiFinding:
    """One filed report with the Observations (and their Device) found in ``index`` (see :func:`index_resources`)."""
    return _read_report(report, index, *_conclusion(report))


def _read_report(
    report: Mapping[str, Any],
    index: Mapping[str, Mapping[str, Any]],
    category: ReportCategory | None,
    abnormal: bool | None,
) -> AiFinding:
    measurements: list[MeasuredValue] = []
    listed: list[ListedFinding] = []
    assessments: list[CodedAnswer] = []
    comparisons: list[FiledComparison] = []
    lesion_comparisons: list[FiledLesionComparison] = []
    version: str | None = None
    for ref in fhirjson.items(report.get("result")):
        observation = resolve(index, ref)
        if observation is None:
            continue
        value = measured_value(observation)
        if value is not None:
            measurements.append(value)
        elif (finding := listed_finding(observation)) is not None:
            listed.append(finding)
        elif (answer := assessment_answer(observation)) is not None:
            assessments.append(answer)
        elif (compared := filed_comparison(observation)) is not None:
            comparisons.append(compared)
        elif (lesion := filed_lesion_comparison(observation)) is not None:
            lesion_comparisons.append(lesion)
        if version is None:
            device = resolve(index, observation.get("device"))
            version = device_version(device) if device is not None else None
    analyzer, code, display = category or ("", "", "")
    return AiFinding(
        report_reference=f"DiagnosticReport/{report.get('id')}",
        analyzer=analyzer,
        version=version,
        category_code=code,
        category_display=display,
        status=str(report.get("status", "")),
        conclusion=str(report.get("conclusion", "")),
        imaging_studies=tuple(r for r in map(fhirjson.reference, fhirjson.items(report.get("imagingStudy"))) if r),
        effective=parse_datetime(report.get("effectiveDateTime") or report.get("issued")),
        measurements=tuple(measurements),
        stated_abnormal=abnormal,
        listed=tuple(listed),
        assessments=tuple(assessments),
        subject=fhirjson.reference(report.get("subject")),
        acquisition=read_acquisition(report),
        comparisons=tuple(comparisons),
        lungs_mm=read_lung_extent(report),
        lesion_comparisons=tuple(lesion_comparisons),
    )


def extract_findings(resources: Iterable[Mapping[str, Any]], *, patient_id: str | None = None) -> list[AiFinding]:
    """AI findings among ``resources`` (reports plus included Observations/Devices), newest first.

    Reports without the project's identifier or category coding are skipped: they are not ours to summarise.
    Cancelled and entered-in-error reports are skipped too. With ``patient_id``, a report about any other
    patient is skipped: a mis-built prefetch must never put one patient's finding on another's card.
    """
    subject = f"Patient/{patient_id}" if patient_id else None
    items = [r for r in resources if isinstance(r, dict)]
    index = index_resources(items)
    findings: list[AiFinding] = []
    for report in items:
        if not is_ai_report(report) or str(report.get("status", "")) in WITHDRAWN_STATUSES:
            continue
        if subject is not None:
            about = fhirjson.reference(report.get("subject"))
            if about != subject and not about.endswith("/" + subject):
                continue
        category, abnormal = _conclusion(report)
        if category is not None:
            findings.append(_read_report(report, index, category, abnormal))
    oldest = datetime.min.replace(tzinfo=UTC)
    findings.sort(key=lambda f: f.effective or oldest, reverse=True)
    return findings

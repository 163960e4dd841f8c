"""The published rules that turn measured nodules into categories and follow-up: Lung-RADS, Fleischner, Brock.

Every size below is the mean diameter (average of long and short axis) in millimetres unless named otherwise.

**Lung-RADS v2022** (American College of Radiology, Lung CT Screening Reporting & Data System, version 2022,
https://www.acr.org/Clinical-Resources/Reporting-and-Data-Systems/Lung-Rads; Christensen J et al., "ACR Lung-RADS
v2022: Assessment Categories and Management Recommendations", J Am Coll Radiol 2024;21:473-488). For lung cancer
*screening* CT. Baseline rules are applied (no prior CT is compared here), mean diameter to one decimal:

* 1 - no nodules, or nodules with benign calcification (complete, central, popcorn, concentric rings) or fat;
* 2 - solid < 6 mm; part-solid < 6 mm; ground-glass < 30 mm;
* 3 - solid 6 to < 8 mm; part-solid >= 6 mm with a solid component < 6 mm; ground-glass >= 30 mm;
* 4A - solid 8 to < 15 mm; part-solid with a solid component 6 to < 8 mm;
* 4B - solid >= 15 mm; part-solid with a solid component >= 8 mm;
* 4X (category 3 or 4 with features that raise suspicion, such as spiculation) and the S modifier need a reader's
  judgement and are never assigned here; nor is the v2022 category 2 for juxtapleural (perifissural) nodules < 10
  mm, which depends on their margin and shape: such nodules are flagged for the reader instead.
* Management: 1-2 annual screening CT in 12 months; 3 low-dose CT in 6 months; 4A low-dose CT in 3 months
  (PET/CT may be considered for a solid component >= 8 mm); 4B diagnostic chest CT with or without contrast,
  PET/CT, tissue sampling and/or referral for further clinical evaluation.
* The exam's category is that of its most suspicious nodule. Category 0 (incomplete) applies when part of the
  lungs cannot be evaluated; here, when the lungs extend beyond the scanned range and no nodule of category 3 or
  higher was found (see :func:`exam_lung_rads`).

**Fleischner Society 2017** (MacMahon H et al., "Guidelines for Management of Incidental Pulmonary Nodules Detected
on CT Images: From the Fleischner Society 2017", Radiology 2017;284:228-243). For *incidental* nodules in patients
35 or older who are not immunocompromised and have no known cancer; not for screening. Mean diameter rounded to the
nearest millimetre; < 6 mm, 6-8 mm, > 8 mm:

* solid, single: < 6 mm no routine follow-up (high risk: optional CT at 12 months); 6-8 mm CT at 6-12 months, then
  consider (high risk: then) CT at 18-24 months; > 8 mm consider CT at 3 months, PET/CT or tissue sampling;
* solid, multiple: < 6 mm no routine follow-up (high risk: optional CT at 12 months); 6-8 mm CT at 3-6 months,
  then consider (high risk: then) CT at 18-24 months; > 8 mm CT at 3-6 months, then consider CT at 18-24 months;
* ground-glass, single: < 6 mm no routine follow-up; >= 6 mm CT at 6-12 months to confirm persistence, then every
  2 years until 5 years;
* part-solid, single: < 6 mm no routine follow-up; >= 6 mm CT at 3-6 months to confirm persistence; if unchanged
  and the solid component stays < 6 mm, annual CT for 5 years;
* subsolid, multiple: < 6 mm CT at 3-6 months, if stable consider CT at 2 and 4 years; >= 6 mm CT at 3-6 months,
  then manage by the most suspicious nodule.
* The patient's risk (low or high, from smoking history and other risk factors) is a clinical judgement: when
  the EHR does not give it, both recommendations are stated. Benign calcified nodules need no follow-up.

**Brock (PanCan) model** (McWilliams A et al., "Probability of cancer in pulmonary nodules detected on first
screening CT", N Engl J Med 2013;369:910-919; full model with spiculation, "model 2b"), nodule size taken as its
longest diameter (as the British Thoracic Society guideline applies it, Callister MEJ et al., Thorax 2015;70
Suppl 2:ii1-ii54). Inputs the image cannot give (family history of lung cancer, upper-lobe location - lobes are
not segmented here - and spiculation) are never guessed: the probability is given as the range over their possible
values, and they are named. Without age or sex from the EHR no probability is given.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from models.nodules.measure import NoduleType

LungRads = Literal["0", "1", "2", "3", "4A", "4B"]
LUNG_RADS_ORDER: tuple[LungRads, ...] = ("0", "1", "2", "3", "4A", "4B")
"""From least to most suspicious (0, incomplete, ranks lowest among nodule findings; see :func:`exam_lung_rads`)."""

LUNG_RADS_SOURCE = (
    "ACR Lung-RADS v2022 (Christensen J et al., J Am Coll Radiol 2024;21:473-488), baseline screening rules"
)
FLEISCHNER_SOURCE = "Fleischner Society 2017 (MacMahon H et al., Radiology 2017;284:228-243)"
BROCK_SOURCE = "Brock/PanCan model 2b (McWilliams A et al., N Engl J Med 2013;369:910-919)"

LUNG_RADS_DISPLAY: dict[LungRads, str] = {
    "0": "Lung-RADS 0: incomplete",
    "1": "Lung-RADS 1: negative",
    "2": "Lung-RADS 2: benign appearance or behavior",
    "3": "Lung-RADS 3: probably benign",
    "4A": "Lung-RADS 4A: suspicious",
    "4B": "Lung-RADS 4B: very suspicious",
}

LUNG_RADS_MANAGEMENT: dict[LungRads, str] = {
    "0": "Additional lung cancer screening CT images and/or comparison to prior chest CT examinations are needed.",
    "1": "Continue annual screening with low-dose CT in 12 months.",
    "2": "Continue annual screening with low-dose CT in 12 months.",
    "3": "Low-dose chest CT in 6 months.",
    "4A": "Low-dose chest CT in 3 months; PET/CT may be considered if there is a solid component of 8 mm or more.",
    "4B": "Diagnostic chest CT with or without contrast; PET/CT may be considered if there is a solid component of "
    "8 mm or more; tissue sampling and/or referral for further clinical evaluation.",
}


@dataclass(frozen=True)
class NoduleFacts:
    """What the rules need about one nodule (from :class:`models.nodules.measure.NoduleMeasures`)."""

    mean_diameter_mm: float
    long_axis_mm: float
    nodule_type: NoduleType
    solid_mean_diameter_mm: float
    benign_calcification: bool


@dataclass(frozen=True)
class Assessment:
    """A category with the rule that produced it, in words a reader can check."""

    code: str
    display: str
    rule: str
    management: str


def lung_rads(nodule: NoduleFacts) -> Assessment:
    """The Lung-RADS v2022 baseline category of one nodule (see the module docstring)."""
    d = round(nodule.mean_diameter_mm, 1)
    solid = round(nodule.solid_mean_diameter_mm, 1)
    code: LungRads
    if nodule.benign_calcification:
        code, rule = "1", "benign pattern of calcification"
    elif nodule.nodule_type == "solid":
        if d < 6.0:
            code, rule = "2", f"solid nodule, mean diameter {d:g} mm < 6 mm"
        elif d < 8.0:
            code, rule = "3", f"solid nodule, mean diameter {d:g} mm, 6 to < 8 mm"
        elif d < 15.0:
            code, rule = "4A", f"solid nodule, mean diameter {d:g} mm, 8 to < 15 mm"
        else:
            code, rule = "4B", f"solid nodule, mean diameter {d:g} mm >= 15 mm"
    elif nodule.nodule_type == "part-solid":
        if d < 6.0:
            code, rule = "2", f"part-solid nodule, mean diameter {d:g} mm < 6 mm"
        elif solid < 6.0:
            code, rule = "3", f"part-solid nodule {d:g} mm >= 6 mm with a solid component of {solid:g} mm < 6 mm"
        elif solid < 8.0:
            code, rule = "4A", f"part-solid nodule with a solid component of {solid:g} mm, 6 to < 8 mm"
        else:
            code, rule = "4B", f"part-solid nodule with a solid component of {solid:g} mm >= 8 mm"
    else:
        if d < 30.0:
            code, rule = "2", f"ground-glass nodule, mean diameter {d:g} mm < 30 mm"
        else:
            code, rule = "3", f"ground-glass nodule, mean diameter {d:g} mm >= 30 mm"
    return Assessment(code, LUNG_RADS_DISPLAY[code], f"{LUNG_RADS_SOURCE}: {rule}", LUNG_RADS_MANAGEMENT[code])


def exam_lung_rads(nodule_codes: Sequence[str], *, lungs_fully_scanned: bool) -> Assessment:
    """The exam's category: that of its most suspicious nodule; 1 without nodules.

    When part of the lungs lies outside the scanned range the exam is incomplete (category 0), unless a nodule of
    category 3 or higher was found: its management (a shorter follow-up or work-up) then already goes beyond what
    completing the exam would add, and downgrading it to "incomplete" would hide it; the rule says so.
    """
    known = [code for code in LUNG_RADS_ORDER if code in nodule_codes]
    worst: LungRads | None = known[-1] if known else None
    significant = worst is not None and LUNG_RADS_ORDER.index(worst) >= LUNG_RADS_ORDER.index("3")
    if not lungs_fully_scanned and not significant:
        return Assessment(
            "0",
            LUNG_RADS_DISPLAY["0"],
            f"{LUNG_RADS_SOURCE}: part of the lungs is outside the scanned range and cannot be evaluated",
            LUNG_RADS_MANAGEMENT["0"],
        )
    if worst is None:
        return Assessment(
            "1", LUNG_RADS_DISPLAY["1"], f"{LUNG_RADS_SOURCE}: no lung nodules found", LUNG_RADS_MANAGEMENT["1"]
        )
    rule = f"{LUNG_RADS_SOURCE}: the exam takes the category of its most suspicious nodule"
    if not lungs_fully_scanned:
        rule += " (part of the lungs is outside the scanned range: the exam is also incomplete)"
    return Assessment(worst, LUNG_RADS_DISPLAY[worst], rule, LUNG_RADS_MANAGEMENT[worst])


Risk = Literal["low", "high"]


@dataclass(frozen=True)
class FleischnerAdvice:
    """The Fleischner 2017 recommendation for the most suspicious nodule, by patient risk."""

    applicable: bool
    low_risk: str
    high_risk: str
    basis: str

    def for_risk(self, risk: Risk | None) -> str:
        if risk == "low":
            return self.low_risk
        if risk == "high":
            return self.high_risk
        if self.low_risk == self.high_risk:
            return self.low_risk
        return f"Low-risk patient: {self.low_risk} High-risk patient: {self.high_risk}"


def fleischner(nodules: Sequence[NoduleFacts], *, age_years: int | None = None) -> FleischnerAdvice:
    """Fleischner 2017 for an exam's nodules (the most suspicious nodule guides management when there are several)."""
    if age_years is not None and age_years < 35:
        return FleischnerAdvice(
            False, "Not applicable.", "Not applicable.", f"{FLEISCHNER_SOURCE}: not for patients under 35 years"
        )
    relevant = [n for n in nodules if not n.benign_calcification]
    if not relevant:
        text = "No routine follow-up (no non-calcified nodule)."
        return FleischnerAdvice(True, text, text, f"{FLEISCHNER_SOURCE}: no non-calcified nodule")
    multiple = len(relevant) > 1
    # "The most suspicious nodule" guides management: the highest Lung-RADS category, then the largest.
    most = max(relevant, key=lambda n: (LUNG_RADS_ORDER.index(lung_rads(n).code), n.mean_diameter_mm))
    size = math.floor(most.mean_diameter_mm + 0.5)  # Fleischner rounds to the nearest whole millimetre
    if most.nodule_type == "solid":
        return _fleischner_solid(size, multiple)
    return _fleischner_subsolid(most, size, multiple)


def _fleischner_solid(size: int, multiple: bool) -> FleischnerAdvice:
    kind = "multiple solid nodules" if multiple else "single solid nodule"
    basis = f"{FLEISCHNER_SOURCE}: {kind}, largest {size} mm"
    if size < 6:
        return FleischnerAdvice(True, "No routine follow-up.", "Optional CT at 12 months.", basis + " (< 6 mm)")
    if size <= 8:
        first = "CT at 3-6 months" if multiple else "CT at 6-12 months"
        return FleischnerAdvice(
            True,
            f"{first}, then consider CT at 18-24 months.",
            f"{first}, then CT at 18-24 months.",
            basis + " (6-8 mm)",
        )
    text = (
        "CT at 3-6 months, then consider CT at 18-24 months."
        if multiple
        else "Consider CT at 3 months, PET/CT, or tissue sampling."
    )
    return FleischnerAdvice(True, text, text, basis + " (> 8 mm)")


def _fleischner_subsolid(nodule: NoduleFacts, size: int, multiple: bool) -> FleischnerAdvice:
    kind = "multiple subsolid nodules" if multiple else f"single {nodule.nodule_type} nodule"
    basis = f"{FLEISCHNER_SOURCE}: {kind}, largest {size} mm"
    if multiple:
        text = (
            "CT at 3-6 months; if stable, consider CT at 2 and 4 years."
            if size < 6
            else "CT at 3-6 months; subsequent management based on the most suspicious nodule(s)."
        )
    elif size < 6:
        text = "No routine follow-up."
    elif nodule.nodule_type == "ground-glass":
        text = "CT at 6-12 months to confirm persistence, then CT every 2 years until 5 years."
    else:
        text = (
            "CT at 3-6 months to confirm persistence; if unchanged and the solid component remains < 6 mm, "
            "annual CT for 5 years."
        )
    return FleischnerAdvice(True, text, text, basis + (" (< 6 mm)" if size < 6 else " (>= 6 mm)"))


# Brock / PanCan model 2b coefficients (McWilliams et al. 2013, supplementary appendix).
_BROCK_INTERCEPT = -6.7892
_BROCK_AGE = 0.0287  # per year from 62
_BROCK_FEMALE = 0.6011
_BROCK_FAMILY_HISTORY = 0.2961
_BROCK_EMPHYSEMA = 0.2953
_BROCK_SIZE = -5.3854  # times ((size / 10) ** -0.5 - 1.58113883)
_BROCK_GROUND_GLASS = -0.1276
_BROCK_PART_SOLID = 0.3770
_BROCK_UPPER_LOBE = 0.6581
_BROCK_COUNT = -0.0824  # per nodule from 4
_BROCK_SPICULATION = 0.7729

BROCK_UNKNOWN_INPUTS = ("family history of lung cancer", "upper-lobe location", "spiculation")
"""Brock inputs the image analysis cannot give; the probability is reported as the range over them."""


@dataclass(frozen=True)
class BrockEstimate:
    """The Brock probability of cancer (0-1) as a range over unknown inputs, or why it was not computed."""

    low: float | None
    high: float | None
    unknown: tuple[str, ...]
    missing: tuple[str, ...]
    emphysema: bool | None

    @property
    def computed(self) -> bool:
        return self.low is not None and self.high is not None


def brock(
    nodule: NoduleFacts,
    *,
    age_years: int | None,
    sex: str | None,
    emphysema: bool | None,
    nodule_count: int,
) -> BrockEstimate:
    """Brock model 2b, as a range over the inputs nobody gave (see the module docstring)."""
    missing = []
    if age_years is None:
        missing.append("age")
    if sex not in ("male", "female"):
        missing.append("sex (male or female)")
    if emphysema is None:
        missing.append("emphysema")
    if missing:
        return BrockEstimate(None, None, BROCK_UNKNOWN_INPUTS, tuple(missing), emphysema)
    assert age_years is not None and emphysema is not None
    size = max(nodule.long_axis_mm, 1.0)
    base = (
        _BROCK_INTERCEPT
        + _BROCK_AGE * (age_years - 62)
        + (_BROCK_FEMALE if sex == "female" else 0.0)
        + (_BROCK_EMPHYSEMA if emphysema else 0.0)
        + _BROCK_SIZE * ((size / 10.0) ** -0.5 - 1.58113883)
        + {"ground-glass": _BROCK_GROUND_GLASS, "part-solid": _BROCK_PART_SOLID}.get(nodule.nodule_type, 0.0)
        + _BROCK_COUNT * (nodule_count - 4)
    )
    unknown_terms = (_BROCK_FAMILY_HISTORY, _BROCK_UPPER_LOBE, _BROCK_SPICULATION)
    values = [
        1.0 / (1.0 + math.exp(-(base + sum(t for t, on in zip(unknown_terms, flags, strict=True) if on))))
        for flags in itertools.product((False, True), repeat=len(unknown_terms))
    ]
    return BrockEstimate(min(values), max(values), BROCK_UNKNOWN_INPUTS, (), emphysema)

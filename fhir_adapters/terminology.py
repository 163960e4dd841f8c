"""Codes for what the analyzers report: measured values, report types, findings, interpretations, units.

Rules, so that readers (the CDS service, the SMART app, another EHR's decision support) can rely on them:

* Every measured value carries a coding from the project CodeSystem ``constants.MEASUREMENT_CODESYSTEM``
  whose code is the analyzer's measurement key. Readers match values by that coding, never by text.
  Standard codings (LOINC, SNOMED CT) are added next to it only where a code that means exactly that value
  is known; no LOINC code for CT-derived LAA-950, lung volume, vertebral attenuation or heights, or a model's
  probability was found, nor a LOINC, SNOMED CT or RadLex code verified in HL7-published material for the coronary
  or thoracic aortic calcium scores (Agatston, volume, mass), the CT aortic and pulmonary artery diameters or the
  PA:aorta ratio, so at release measurements carry the project coding only.
* A report's type (``DiagnosticReport.code``) is a LOINC imaging document code per analyzer, with the generic
  18748-4 "Diagnostic imaging study" where no more specific code fits every study the analyzer accepts.
* A categorical finding carries the project code ``"<analyzer>/<category code>"`` and, when the category is
  abnormal and SNOMED CT has a concept for the disorder, that SNOMED CT concept.

Every standard code below was checked against published HL7 material (value sets and examples that list the
code with its display); none was made up. The project CodeSystems ship as FHIR R4 CodeSystem resources in
``fhir_adapters/codesystems/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources
from typing import Any

from fhir_adapters import constants
from models.base import Category, CodedValue, Interpretation

SNOMED_CT = "http://snomed.info/sct"
LOINC = "http://loinc.org"
RADLEX = "http://radlex.org"
UCUM = "http://unitsofmeasure.org"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
OBSERVATION_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
DIAGNOSTIC_SERVICE_SECTION = "http://terminology.hl7.org/CodeSystem/v2-0074"
MEDIA_TYPE = "http://terminology.hl7.org/CodeSystem/media-type"
PROVENANCE_PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"

# Key of the Observation written for AnalysisResult.probability when no measurement already carries it.
PROBABILITY_KEY = "finding_probability"


@dataclass(frozen=True)
class Code:
    """One concept in one code system."""

    system: str
    code: str
    display: str

    def coding(self) -> dict[str, str]:
        return {"system": self.system, "code": self.code, "display": self.display}

    def concept(self, text: str | None = None) -> dict[str, Any]:
        """A CodeableConcept with this coding alone."""
        concept: dict[str, Any] = {"coding": [self.coding()]}
        if text:
            concept["text"] = text
        return concept


# Standard codes, each verified against HL7-published material.
CHEST_CT = Code(LOINC, "24627-2", "Chest CT")  # FHIR R4 ServiceRequest example "di"
BREAST_US = Code(LOINC, "24601-7", "US Breast")  # LOINC Imaging Document Codes value set
MR_BRAIN = Code(LOINC, "24590-2", "MR Brain")  # same value set
DIAGNOSTIC_IMAGING_STUDY = Code(LOINC, "18748-4", "Diagnostic imaging study")  # same value set
PULMONARY_EMPHYSEMA = Code(SNOMED_CT, "87433001", "Pulmonary emphysema")
PNEUMONIA = Code(SNOMED_CT, "233604007", "Pneumonia")
OSTEOPOROSIS = Code(SNOMED_CT, "64859006", "Osteoporosis")
OSTEOPENIA = Code(SNOMED_CT, "312894000", "Osteopenia")
# RadLex (http://radlex.org) as used in published FHIR imaging examples and the ACR/RSNA common data elements
# (openimagingdata "pulmonary nodule" CDE: RID50149; right lung RID1302, left lung RID1326).
PULMONARY_NODULE = Code(RADLEX, "RID50149", "pulmonary nodule")
# SNOMED CT observable for a Lung-RADS category, as profiled in HL7's Lithuanian lung cancer screening IG
# (StructureDefinition lung-rads-assessment). No LOINC code for the Lung-RADS category could be verified from
# published HL7 or LOINC material, so none is written.
LUNG_RADS_CATEGORY = Code(SNOMED_CT, "1362105002", "Lung Imaging Reporting and Data System category")

IMAGING_CATEGORY = Code(OBSERVATION_CATEGORY, "imaging", "Imaging")
RADIOLOGY_SECTION = Code(DIAGNOSTIC_SERVICE_SECTION, "RAD", "Radiology")
IMAGE_MEDIA = Code(MEDIA_TYPE, "image", "Image")
AUTHOR = Code(PROVENANCE_PARTICIPANT_TYPE, "author", "Author")
VERIFIER = Code(PROVENANCE_PARTICIPANT_TYPE, "verifier", "Verifier")
CREATE = Code(DATA_OPERATION, "CREATE", "create")
UPDATE = Code(DATA_OPERATION, "UPDATE", "revise")
AI_ASSERTED = Code(
    constants.AI_ASSERTED_SECURITY_SYSTEM, constants.AI_ASSERTED_SECURITY_CODE, "Artificial Intelligence asserted"
)

_REPORT_CODES: dict[str, Code] = {
    "ct-emphysema": CHEST_CT,
    "ct-heart": CHEST_CT,  # the heart and great vessels as seen on a chest CT (gated or not)
    # Opportunistic bone analysis runs on chest or abdominal CT: no single body-region code fits.
    "ct-bone": DIAGNOSTIC_IMAGING_STUDY,
    # The LOINC chest radiograph codes name the number of views; the analyzer reads one frontal view of a
    # study that may have more, so the generic code is the honest one.
    "cxr-pneumonia": DIAGNOSTIC_IMAGING_STUDY,
    "us-breast": BREAST_US,
    # A hippocampal crop is part of a brain MR study.
    "mr-hippocampus": MR_BRAIN,
    "ct-lung-nodules": CHEST_CT,
}

# (analyzer, category code) -> the disorder, for abnormal categories only; "*" matches any abnormal category.
_FINDING_CODES: dict[tuple[str, str], Code] = {
    ("ct-emphysema", "*"): PULMONARY_EMPHYSEMA,
    ("cxr-pneumonia", "*"): PNEUMONIA,
    ("ct-bone", "osteoporosis"): OSTEOPOROSIS,
    ("ct-bone", "osteopenia"): OSTEOPENIA,
    ("ct-lung-nodules", "*"): PULMONARY_NODULE,
}

# Finding kinds (models.base.Finding.kind) and coded attributes (CodedValue.key) with a standard concept.
_STANDARD_FINDING_CODES: dict[str, tuple[Code, ...]] = {
    "lung_nodule": (PULMONARY_NODULE,),
    "lung_rads": (LUNG_RADS_CATEGORY,),
}
# Code systems a CodedValue may name for its value (CodedValue.system).
_VALUE_SYSTEMS: dict[str, str] = {"radlex": RADLEX, "snomed": SNOMED_CT, "loinc": LOINC}

# Standard codings per measurement key: none verified yet (see the module docstring).
_STANDARD_MEASUREMENT_CODES: dict[str, tuple[Code, ...]] = {}

_INTERPRETATIONS: dict[str, str] = {
    "N": "Normal",
    "H": "High",
    "L": "Low",
    "A": "Abnormal",
    "HH": "Critical high",
    "LL": "Critical low",
}

# Human-readable unit labels for Quantity.unit; the UCUM code itself goes in Quantity.code.
# UCUM "1" (a plain number: ratio, fraction) has no label a reader needs, so Quantity.unit is left out.
_UNIT_LABELS: dict[str, str] = {"[hnsf'U]": "HU", "1": ""}


@cache
def load_codesystem(name: str) -> dict[str, Any]:
    """One of the project's CodeSystem resources shipped in ``fhir_adapters/codesystems/`` (by file stem)."""
    path = resources.files("fhir_adapters").joinpath("codesystems", f"{name}.json")
    codesystem: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return codesystem


def codesystem_names() -> tuple[str, ...]:
    """File stems of the shipped CodeSystems (``measurement``, ``finding-category``, ``finding``, ``finding-value``)."""
    folder = resources.files("fhir_adapters").joinpath("codesystems")
    return tuple(sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json")))


@lru_cache(maxsize=1)
def _known_measurements() -> dict[str, str]:
    return {c["code"]: c["display"] for c in load_codesystem("measurement").get("concept", [])}


def measurement_coding(key: str, display: str) -> Code:
    """The project coding for a measurement key; the CodeSystem's display when the key is documented."""
    return Code(constants.MEASUREMENT_CODESYSTEM, key, _known_measurements().get(key, display))


def measurement_concept(key: str, display: str) -> dict[str, Any]:
    """``Observation.code`` for a measurement: standard codings (if any), then the project coding."""
    codings = [c.coding() for c in _STANDARD_MEASUREMENT_CODES.get(key, ())]
    codings.append(measurement_coding(key, display).coding())
    return {"coding": codings, "text": display}


def finding_concept(key: str, display: str) -> dict[str, Any]:
    """``Observation.code`` (or a component's code) for a finding kind or a coded attribute: standard codings when
    known, then the project coding ``constants.FINDING_CODESYSTEM`` with the key as code."""
    codings = [c.coding() for c in _STANDARD_FINDING_CODES.get(key, ())]
    codings.append(Code(constants.FINDING_CODESYSTEM, key, display).coding())
    return {"coding": codings, "text": display}


def coded_value_concept(value: CodedValue) -> dict[str, Any]:
    """A coded attribute's value: in its standard system when it names one, else the project code ``key/code``."""
    system = _VALUE_SYSTEMS.get(value.system or "")
    coding = (
        Code(system, value.code, value.code_display)
        if system
        else Code(constants.FINDING_VALUE_CODESYSTEM, f"{value.key}/{value.code}", value.code_display)
    )
    return coding.concept(value.code_display)


def report_code(analyzer: str) -> Code:
    """``DiagnosticReport.code`` for an analyzer's report (generic imaging study for unknown analyzers)."""
    return _REPORT_CODES.get(analyzer, DIAGNOSTIC_IMAGING_STUDY)


def category_code(analyzer: str, category: Category) -> Code:
    """The project code ``"<analyzer>/<category code>"`` for a categorical conclusion."""
    return Code(constants.CATEGORY_CODESYSTEM, f"{analyzer}/{category.code}", category.display)


def finding_code(analyzer: str, category: Category) -> Code | None:
    """The standard (SNOMED CT) code of the disorder an abnormal category asserts, if one is mapped.

    A normal category asserts no disorder, so it never gets one (``ct-emphysema/none`` is not "emphysema").
    """
    if not category.abnormal:
        return None
    return _FINDING_CODES.get((analyzer, category.code)) or _FINDING_CODES.get((analyzer, "*"))


def conclusion_codes(analyzer: str, category: Category) -> list[dict[str, Any]]:
    """``DiagnosticReport.conclusionCode``: the standard finding (when there is one), the project code, and
    whether the analyzer calls the result abnormal (v3 ObservationInterpretation ``A`` / ``N``).

    The explicit A/N lets readers (the CDS service, the app) tell a finding from a non-result such as
    "level not identified" without knowing every analyzer's category names.
    """
    concepts: list[dict[str, Any]] = []
    standard = finding_code(analyzer, category)
    if standard is not None:
        concepts.append(standard.concept())
    concepts.append(category_code(analyzer, category).concept(category.display))
    concepts.append(interpretation_concept("A" if category.abnormal else "N"))
    return concepts


def interpretation_concept(code: Interpretation) -> dict[str, Any]:
    """``Observation.interpretation`` entry for an HL7 v3 ObservationInterpretation code."""
    return Code(OBSERVATION_INTERPRETATION, code, _INTERPRETATIONS[code]).concept()


_CHANGE_INTERPRETATIONS: dict[str, Code] = {
    "increased": Code(OBSERVATION_INTERPRETATION, "U", "Significant change up"),
    "decreased": Code(OBSERVATION_INTERPRETATION, "D", "Significant change down"),
    "worse": Code(OBSERVATION_INTERPRETATION, "W", "Worse"),
    "better": Code(OBSERVATION_INTERPRETATION, "B", "Better"),
}


@lru_cache(maxsize=1)
def _comparison_displays() -> dict[str, str]:
    return {c["code"]: c["display"] for c in load_codesystem("comparison").get("concept", [])}


def comparison_code(code: str) -> Code:
    """A concept of the project's comparison CodeSystem (``change-since-prior``, ``prior-value``, ``stable``...)."""
    displays = _comparison_displays()
    if code not in displays:
        raise KeyError(f"{code!r} is not in the comparison CodeSystem; it has {sorted(displays)}")
    return Code(constants.COMPARISON_CODESYSTEM, code, displays[code])


def change_interpretations(verdict: str, worse: str | None) -> list[dict[str, Any]]:
    """``Observation.interpretation`` of a change beyond repeatability: v3 ``U`` / ``D``, and ``W`` (worse) or
    ``B`` (better) when the analyzer's card says which direction is progression; none for a stable change."""
    direction = _CHANGE_INTERPRETATIONS.get(verdict)
    if direction is None:
        return []
    concepts = [direction.concept()]
    if worse is not None:
        progressed = (verdict, worse) in (("increased", "increase"), ("decreased", "decrease"))
        concepts.append(_CHANGE_INTERPRETATIONS["worse" if progressed else "better"].concept())
    return concepts


def unit_label(ucum: str) -> str:
    """What a reader sees as the unit (``HU`` for ``[hnsf'U]``, nothing for ``1``); else the UCUM code."""
    return _UNIT_LABELS.get(ucum, ucum)


def quantity(value: float, ucum: str) -> dict[str, Any]:
    """A UCUM ``Quantity`` (``unit`` is the readable label, ``code`` the UCUM code)."""
    label = unit_label(ucum)
    result: dict[str, Any] = {"value": value}
    if label:
        result["unit"] = label
    result.update({"system": UCUM, "code": ucum})
    return result

"""The analyzer interface shared by every clinical area.

An analyzer receives an :class:`ImageInput` (a numpy array with its physical spacing and a few
non-identifying acquisition attributes) and returns an :class:`AnalysisResult`: measured values with UCUM
units, a category, an optional probability, and explanation images. FHIR builders and the CDS service turn
these into resources and cards; analyzers never see them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np
from numpy.typing import ArrayLike

from models.lesion_followup import Box

Interpretation = Literal["N", "H", "L", "A", "HH", "LL"]
"""HL7 v3 ObservationInterpretation codes used for measured values (normal, high, low, abnormal...)."""


AdministrativeSex = Literal["male", "female", "other", "unknown"]
"""FHIR ``Patient.gender`` (administrative gender), the sex the published nomograms and risk models are split by."""


@dataclass(frozen=True)
class PatientContext:
    """What an analyzer may know about the patient beside the image: derived, non-identifying values only.

    ``age_years`` is the age on the day of the study (whole years, from ``Patient.birthDate`` and the study's
    start); ``sex`` is ``Patient.gender``. ``None`` means the EHR did not say, and an analyzer that needs the value
    must say it is missing rather than guess. Names, identifiers and dates never reach the analyzers.
    """

    age_years: int | None = None
    sex: AdministrativeSex | None = None


@dataclass(frozen=True)
class ImageInput:
    """One image or volume ready for analysis.

    ``array`` is ``(slices, rows, columns)`` for cross-sectional series, sorted along the slice normal
    from inferior to superior (patient +z), in Hounsfield units for CT; ``(rows, columns)`` for projection
    radiographs, in presentation values from 0 (black) to 1 (white) of the image's default presentation
    (Modality LUT, VOI LUT or window, MONOCHROME1 inverted: ``dicom_io.projection``). ``spacing`` is in millimetres,
    one value per array axis. ``attributes`` carries non-identifying DICOM attributes an analyzer may
    check (``Modality``, ``BodyPartExamined``, ``ViewPosition``, ``PhotometricInterpretation``...).
    ``patient`` carries the age and sex the pipeline read from the EHR, for analyzers whose references depend on
    them (normative percentiles, risk models). ``origin`` (mm, 3-D volumes from DICOM) is the LPS position of voxel
    ``[0, 0, 0]`` and ``direction`` gives, for each array axis, the LPS unit vector it runs along
    (``dicom_io.volume.Volume.direction``): analyzers that must know which way is right, anterior or superior
    whatever plane the series was acquired in read ``direction``, and a finding is located in patient coordinates
    as a radiologist's viewer would show it; ``None`` when unknown (projection images, synthetic arrays).
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    modality: str
    attributes: Mapping[str, str] = field(default_factory=dict)
    patient: PatientContext = field(default_factory=PatientContext)
    origin: tuple[float, float, float] | None = None
    direction: tuple[tuple[float, float, float], ...] | None = None

    def __post_init__(self) -> None:
        if len(self.spacing) != self.array.ndim:
            raise ValueError(
                f"spacing has {len(self.spacing)} values for a {self.array.ndim}-D array; give one per axis."
            )

    def patient_position(self, index: tuple[float, ...]) -> tuple[float, ...] | None:
        """LPS position (mm) of a (fractional) voxel index, or None when the geometry is not known."""
        if self.origin is None or self.direction is None:
            return None
        position = np.asarray(self.origin, dtype=np.float64)
        for step, spacing, axis in zip(index, self.spacing, self.direction, strict=True):
            position = position + float(step) * float(spacing) * np.asarray(axis, dtype=np.float64)
        return tuple(float(v) for v in position)

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (cm3); only meaningful for 3-D inputs."""
        return float(np.prod(self.spacing)) / 1000.0


@dataclass(frozen=True)
class SeriesRequirements:
    """What a series must look like for an analyzer to accept it; used to choose a series from a study.

    Matching is case-insensitive. ``body_parts`` and ``description_keywords`` are hints that rank
    candidate series; ``modalities`` and ``min_instances`` are hard requirements. ``accepted_body_parts``, when
    given, is a hard requirement too: a series whose body site, or whose study's or series' description, names
    another body part (a shoulder MR for a brain analyzer) is not chosen.
    """

    modalities: tuple[str, ...]
    min_instances: int = 1
    body_parts: tuple[str, ...] = ()
    description_keywords: tuple[str, ...] = ()
    excluded_description_keywords: tuple[str, ...] = ()
    accepted_body_parts: tuple[str, ...] = ()


def probability_percent(probability: float) -> float:
    """A model probability as it is filed and read: a percentage with one decimal (0.60530 -> 60.5).

    Trained analyzers make their call on this value, against their threshold at the same precision
    (:func:`at_or_above_threshold`), so a report can never read "60.5 % (threshold 60.5 %)" and be below it.
    """
    return round(100.0 * float(probability), 1)


def filed_probability(probability: float) -> float:
    """A probability (or a probability threshold) as filed, back on the 0-1 scale (0.60530 -> 0.605).

    A trained analyzer's figures are measured on these, probabilities and threshold alike, so they describe
    exactly the calls the analyzer makes and the values the EHR holds.
    """
    return probability_percent(probability) / 100.0


def filed_probabilities(probabilities: ArrayLike) -> np.ndarray:
    """:func:`filed_probability` of each value: what an assessment scores."""
    return np.array([filed_probability(p) for p in np.asarray(probabilities, dtype=np.float64).reshape(-1)])


def at_or_above_threshold(probability: float, threshold: float) -> bool:
    """The call of a trained analyzer: its probability as filed is at or above its threshold as filed."""
    return probability_percent(probability) >= probability_percent(threshold)


def highest_normal(threshold: float, decimals: int) -> float:
    """The inclusive upper limit of normal for values filed with ``decimals`` places, abnormal from ``threshold``.

    FHIR ``referenceRange.high`` includes its value, so a limit of 5 % would put a filed 5.00 % (abnormal) inside
    the normal range; the limit is the last filed value below the threshold (4.99 %). ``threshold`` must be a
    value at that precision itself.
    """
    return round(threshold - 10.0**-decimals, decimals)


def lowest_normal(threshold: float, decimals: int) -> float:
    """The inclusive lower limit of normal for values filed with ``decimals`` places, abnormal up to ``threshold``.

    The mirror of :func:`highest_normal`: FHIR ``referenceRange.low`` includes its value, so with values of
    160 HU and below low, the normal range starts at 161 HU, not at 160.
    """
    return round(threshold + 10.0**-decimals, decimals)


@dataclass(frozen=True)
class Measurement:
    """One measured value. ``key`` is stable (``laa950_percent``) and mapped to codes by the FHIR layer."""

    key: str
    display: str
    value: float
    unit: str  # UCUM, e.g. "%", "mL", "[hnsf'U]", "mm"
    interpretation: Interpretation | None = None
    reference_low: float | None = None
    reference_high: float | None = None
    note: str = ""


@dataclass(frozen=True)
class Explanation:
    """An image that shows why the analyzer said what it said (overlay, heatmap, mask)."""

    title: str
    kind: Literal["overlay", "heatmap", "mask"]
    png: bytes
    slice_index: int | None = None


@dataclass(frozen=True)
class Category:
    """A categorical conclusion with the rule it came from (for example a published threshold)."""

    code: str  # stable, e.g. "none", "mild", "moderate", "severe"
    display: str
    rule: str  # the published rule, cited, that produced the category
    abnormal: bool


@dataclass(frozen=True)
class CodedValue:
    """A categorical value with its code: an assessment (a Lung-RADS category), a type, a location.

    ``key`` names what is coded (stable, e.g. ``lung_rads``) and is mapped to a concept by the FHIR layer; ``code`` is
    the value (``4A``), ``code_display`` its words; ``rule`` the published rule that gave it, cited, when there is
    one. ``system`` names a standard code system the value belongs to when one exists (``radlex``, ``snomed``);
    otherwise the value is a project code.
    """

    key: str
    display: str
    code: str
    code_display: str
    rule: str = ""
    system: str | None = None


@dataclass(frozen=True)
class Finding:
    """One lesion an analyzer lists on its own (a nodule, a fracture): written as one Observation with components.

    ``key`` is stable within the result (``nodule-1``) and becomes part of the Observation's identifier, so a re-run
    of the same analysis finds the same Observation. ``kind`` says what the finding is (``lung_nodule``) and is
    mapped to a concept by the FHIR layer. ``measurements`` and ``values`` become the Observation's components;
    ``location`` says in words where it is, ``body_site`` is a coded site when known. ``explanations`` are indexes
    into :attr:`AnalysisResult.explanations` of the images that show this finding. ``centre_mm`` is its centre in
    patient coordinates (mm, DICOM LPS) when the volume's geometry is known: what a later scan's findings are matched
    against (:mod:`models.lesion_followup`).
    """

    key: str
    kind: str
    display: str
    measurements: tuple[Measurement, ...] = ()
    values: tuple[CodedValue, ...] = ()
    location: str = ""
    body_site: CodedValue | None = None
    explanations: tuple[int, ...] = ()
    note: str = ""
    centre_mm: tuple[float, float, float] | None = None

    def measurement(self, key: str) -> Measurement:
        for m in self.measurements:
            if m.key == key:
                return m
        raise KeyError(f"finding {self.key} has no measurement {key!r}; it has {[m.key for m in self.measurements]}")

    def value(self, key: str) -> CodedValue:
        for v in self.values:
            if v.key == key:
                return v
        raise KeyError(f"finding {self.key} has no value {key!r}; it has {[v.key for v in self.values]}")


@dataclass(frozen=True)
class AnalysisResult:
    """Everything an analyzer found in one image or volume.

    ``measurements`` are the exam's numbers, ``assessments`` its coded conclusions besides the category (a
    guideline category, a recommendation), ``findings`` the lesions listed one by one. Analyzers that report none of
    the last two leave them empty, and their FHIR output does not change. ``lungs_mm`` is the extent of the lungs in
    patient coordinates, for an analyzer that lists lung lesions: a later scan's lesions are matched after the two
    scans' lungs are aligned.
    """

    analyzer: str
    version: str
    measurements: tuple[Measurement, ...]
    category: Category
    conclusion: str
    explanations: tuple[Explanation, ...] = ()
    probability: float | None = None
    warnings: tuple[str, ...] = ()
    assessments: tuple[CodedValue, ...] = ()
    findings: tuple[Finding, ...] = ()
    lungs_mm: Box | None = None

    def measurement(self, key: str) -> Measurement:
        for m in self.measurements:
            if m.key == key:
                return m
        raise KeyError(f"{self.analyzer} reported no measurement {key!r}; it has {[m.key for m in self.measurements]}")


@runtime_checkable
class Analyzer(Protocol):
    """The interface every analyzer implements.

    ``check_input`` raises :class:`core.errors.UnsuitableInputError` with a clear reason when the
    image is not one the analyzer was built and validated for; ``analyze`` assumes it passed.

    An analyzer whose references depend on the patient's age or sex sets ``uses_patient_context = True``; the
    pipeline then reads the Patient and fills :attr:`ImageInput.patient` (it stays unknown otherwise).
    """

    name: str
    version: str
    title: str
    requirements: SeriesRequirements

    def check_input(self, image: ImageInput) -> None: ...

    def analyze(self, image: ImageInput) -> AnalysisResult: ...

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

Interpretation = Literal["N", "H", "L", "A", "HH", "LL"]
"""HL7 v3 ObservationInterpretation codes used for measured values (normal, high, low, abnormal...)."""


@dataclass(frozen=True)
class ImageInput:
    """One image or volume ready for analysis.

    ``array`` is ``(slices, rows, columns)`` for cross-sectional series, sorted along the slice normal
    from inferior to superior (patient +z), in Hounsfield units for CT; ``(rows, columns)`` for projection
    radiographs, already in presentation intensity (higher = brighter). ``spacing`` is in millimetres,
    one value per array axis. ``attributes`` carries non-identifying DICOM attributes an analyzer may
    check (``Modality``, ``BodyPartExamined``, ``ViewPosition``, ``PhotometricInterpretation``...).
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    modality: str
    attributes: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.spacing) != self.array.ndim:
            raise ValueError(
                f"spacing has {len(self.spacing)} values for a {self.array.ndim}-D array; give one per axis."
            )

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (cm3); only meaningful for 3-D inputs."""
        return float(np.prod(self.spacing)) / 1000.0


@dataclass(frozen=True)
class SeriesRequirements:
    """What a series must look like for an analyzer to accept it; used to choose a series from a study.

    Matching is case-insensitive. ``body_parts`` and ``description_keywords`` are hints that rank
    candidate series; ``modalities`` and ``min_instances`` are hard requirements.
    """

    modalities: tuple[str, ...]
    min_instances: int = 1
    body_parts: tuple[str, ...] = ()
    description_keywords: tuple[str, ...] = ()
    excluded_description_keywords: tuple[str, ...] = ()


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
class AnalysisResult:
    """Everything an analyzer found in one image or volume."""

    analyzer: str
    version: str
    measurements: tuple[Measurement, ...]
    category: Category
    conclusion: str
    explanations: tuple[Explanation, ...] = ()
    probability: float | None = None
    warnings: tuple[str, ...] = ()

    def measurement(self, key: str) -> Measurement:
        for m in self.measurements:
            if m.key == key:
                return m
        raise KeyError(f"{self.analyzer} reported no measurement {key!r}; it has {[m.key for m in self.measurements]}")


@runtime_checkable
class Analyzer(Protocol):
    """The interface every analyzer implements.

    ``check_input`` raises :class:`imaging_cds.errors.UnsuitableInputError` with a clear reason when the
    image is not one the analyzer was built and validated for; ``analyze`` assumes it passed.
    """

    name: str
    version: str
    title: str
    requirements: SeriesRequirements

    def check_input(self, image: ImageInput) -> None: ...

    def analyze(self, image: ImageInput) -> AnalysisResult: ...

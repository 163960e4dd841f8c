"""Understand draft imaging orders well enough to match them with prior AI findings.

EHR order catalogues differ, so an order's modality and body region are read from every place they may be:
the ``code`` (LOINC/CPT/local codings' displays and text), ``bodySite`` and ``category``. Matching is by
words, deliberately simple and inspectable; an order we cannot place gets no cards rather than wrong ones. An
element of the wrong JSON type reads as absent (see :mod:`fhir_adapters.fhirjson`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cds.fhirjson import bundle_resources
from fhir_adapters import fhirjson

IMAGING_CATEGORY_SNOMED = "363679005"  # SNOMED CT "Imaging (procedure)", the usual ServiceRequest.category

_MODALITY_WORDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("DXA", re.compile(r"\b(dxa|dexa|densitometry|absorptiometry)\b", re.I)),
    ("CT", re.compile(r"\b(ct|cta|computed tomography|cat scan)\b", re.I)),
    ("MR", re.compile(r"\b(mr|mri|mra|magnetic resonance)\b", re.I)),
    ("MG", re.compile(r"\b(mg|mammogra\w*|tomosynthesis)\b", re.I)),
    ("US", re.compile(r"\b(us|ultrasound|sonogra\w*|echograph\w*)\b", re.I)),
    ("XR", re.compile(r"\b(xr|x-ray|xray|radiograph\w*|plain film)\b", re.I)),
    ("NM", re.compile(r"\b(nm|nuclear medicine|scintigra\w*|pet)\b", re.I)),
)
_REGION_WORDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("spine", re.compile(r"\b(spine|spinal|vertebra\w*|l-spine|t-spine|lumbar|lumbosacral|thoracolumbar)\b", re.I)),
    ("chest", re.compile(r"\b(chest|thorax|thoracic|lungs?|pulmonary)\b(?!\s+spine)", re.I)),
    ("abdomen", re.compile(r"\b(abdomen|abdominal|abd|pelvis|pelvic)\b", re.I)),
    ("breast", re.compile(r"\b(breasts?|mammary|mammogra\w*)\b", re.I)),
    ("head", re.compile(r"\b(head|brain|skull)\b", re.I)),
)


@dataclass(frozen=True)
class ImagingOrder:
    """A draft imaging order, with what could be read about it."""

    reference: str  # "ServiceRequest/<id>"
    resource: dict[str, Any]
    modalities: frozenset[str]
    regions: frozenset[str]
    supporting_studies: tuple[str, ...]

    @property
    def is_dxa(self) -> bool:
        return "DXA" in self.modalities


def _texts(resource: Mapping[str, Any]) -> list[str]:
    texts: list[str] = []
    concepts = [
        resource.get("code"),
        *fhirjson.items(resource.get("bodySite")),
        *fhirjson.items(resource.get("category")),
    ]
    for concept in map(fhirjson.element, concepts):
        if isinstance(concept.get("text"), str):
            texts.append(concept["text"])
        for coding in fhirjson.items(concept.get("coding")):
            if isinstance(coding, dict) and isinstance(coding.get("display"), str):
                texts.append(coding["display"])
    return texts


def _is_imaging(resource: Mapping[str, Any], modalities: frozenset[str]) -> bool:
    for concept in fhirjson.items(resource.get("category")):
        for coding in fhirjson.items(fhirjson.element(concept).get("coding")):
            if isinstance(coding, dict) and coding.get("code") == IMAGING_CATEGORY_SNOMED:
                return True
    return bool(modalities)


def read_order(resource: Mapping[str, Any]) -> ImagingOrder | None:
    """An :class:`ImagingOrder` for an imaging ServiceRequest, ``None`` for anything else."""
    if resource.get("resourceType") != "ServiceRequest" or not resource.get("id"):
        return None
    text = " | ".join(_texts(resource))
    modalities = frozenset(name for name, pattern in _MODALITY_WORDS if pattern.search(text))
    if not _is_imaging(resource, modalities):
        return None
    regions = frozenset(name for name, pattern in _REGION_WORDS if pattern.search(text))
    supporting = tuple(
        ref
        for ref in map(fhirjson.reference, fhirjson.items(resource.get("supportingInfo")))
        if ref.startswith("ImagingStudy/")
    )
    return ImagingOrder(
        reference=f"ServiceRequest/{resource['id']}",
        resource=dict(resource),
        modalities=modalities,
        regions=regions,
        supporting_studies=supporting,
    )


def imaging_orders(
    draft_orders: Mapping[str, Any] | None, selections: Sequence[str] | None = None
) -> list[ImagingOrder]:
    """The imaging orders among ``context.draftOrders``; with ``selections`` (order-select) only those selected."""
    wanted = set(selections) if selections is not None else None
    orders: list[ImagingOrder] = []
    for resource in bundle_resources(draft_orders):
        order = read_order(resource)
        if order is not None and (wanted is None or order.reference in wanted):
            orders.append(order)
    return orders


def studies_for_order(order: ImagingOrder, imaging_studies: Iterable[Mapping[str, Any]]) -> tuple[str, ...]:
    """ImagingStudies referenced by the order (``supportingInfo``) or fulfilling it (their ``basedOn``)."""
    found = list(order.supporting_studies)
    for study in imaging_studies:
        if study.get("resourceType") != "ImagingStudy" or not study.get("id"):
            continue
        based_on = set(map(fhirjson.reference, fhirjson.items(study.get("basedOn"))))
        reference = f"ImagingStudy/{study['id']}"
        if order.reference in based_on and reference not in found:
            found.append(reference)
    return tuple(found)

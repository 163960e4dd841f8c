"""Read the Bundles a CDS client sends without trusting their structure.

Where a hook request is read, its structure is checked and refused with a 400 that names what is wrong: the
context fields, each Bundle's ``entry`` list, each entry's ``resource`` (:func:`bundle_problem`, used by
:mod:`cds.app` and :mod:`cds.prefetch`). Inside a resource, checking every element against FHIR's datatypes
would cost more than a hook's whole time budget, so the readers of :mod:`fhir_adapters.fhirjson` take an
element of the wrong JSON type as absent: a report whose coding cannot be read is not summarised, and an order
that cannot be placed gets no card, as when the element is missing. Nothing inside a resource can then make a
hook fail.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fhir_adapters.fhirjson import items


def bundle_resources(bundle: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The resources in a Bundle's entries (an absent or empty Bundle gives none)."""
    if not isinstance(bundle, dict):
        return []
    return [
        e["resource"] for e in items(bundle.get("entry")) if isinstance(e, dict) and isinstance(e.get("resource"), dict)
    ]


def bundle_problem(bundle: Mapping[str, Any]) -> str | None:
    """What keeps ``bundle`` from being read as a Bundle of resources, or ``None`` when nothing does.

    ``entry`` may be absent (no resources); when present it must be an array of objects, and each entry's
    ``resource``, when present, an object with a ``resourceType``. The message names the first offending
    element by its path below the Bundle (``entry[2].resource``).
    """
    entries = bundle.get("entry")
    if entries is None:
        return None
    if not isinstance(entries, list):
        return "entry is not an array"
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            return f"entry[{index}] is not an object"
        resource = entry.get("resource")
        if resource is not None and not (isinstance(resource, dict) and isinstance(resource.get("resourceType"), str)):
            return f"entry[{index}].resource is not a FHIR resource (an object with a resourceType)"
    return None

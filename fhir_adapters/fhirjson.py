"""Read FHIR JSON without trusting its types: an element of the wrong JSON type reads as absent.

Resources read back from an EHR, or sent by a CDS client in a hook's prefetch, are not checked against FHIR's
datatypes on the way in: doing so for every element would cost more than a hook's whole time budget. The
readers below take an element of the wrong JSON type as absent instead, so a report whose coding cannot be
read is simply not summarised, as when the element is missing, and nothing inside a resource can make a
reader fail.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

_EMPTY: Mapping[str, Any] = MappingProxyType({})
_REFERENCE_TAIL = re.compile(r"([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})$")


def items(value: Any) -> list[Any]:
    """A FHIR array element: the list, or no items when it is absent or not an array."""
    return value if isinstance(value, list) else []


def element(value: Any) -> Mapping[str, Any]:
    """A FHIR complex element (CodeableConcept, Reference, ...): the object, or an empty one when it is absent
    or not an object."""
    return value if isinstance(value, dict) else _EMPTY


def reference(value: Any) -> str:
    """The ``reference`` string of a Reference element, or ``""``."""
    ref = element(value).get("reference")
    return ref if isinstance(ref, str) else ""


def relative_reference(reference: str | None) -> str | None:
    """``Type/id`` from a relative or absolute reference (``fhirUser``, a ``Location`` header); ``None`` if neither.

    A ``/_history/<v>`` suffix is dropped. A proxy that leaves absolute URLs pointing at its backing server is
    handled the same way: only the type and id matter to a reader.
    """
    if not reference:
        return None
    path = urlsplit(reference).path if "://" in reference else reference
    path = path.split("/_history")[0].rstrip("/")
    match = _REFERENCE_TAIL.search(path)
    return f"{match.group(1)}/{match.group(2)}" if match else None

"""Check every resource the project writes against HL7's official FHIR R4 JSON schema before it leaves.

The EHR's FHIR server may accept codes outside a required value set (sekmet-fhir takes ``status: "bogus"``),
so a resource we build wrongly could be stored and mislead a reader later. Validating here turns such a
mistake into a :class:`ResourceValidationError` at build time, naming each offending element by its JSON path.

Speed matters because every analysis validates its whole transaction. Validating against the schema's root
(a ``oneOf`` over ~150 resource types) or a Bundle whose ``entry.resource`` is such a ``oneOf`` costs tens of
milliseconds per resource, so instead:

* each resource is validated against ``#/definitions/<resourceType>`` with one cached validator per type;
* a Bundle is validated against a copy of the Bundle definition whose ``entry.resource`` only has to be an
  object with a ``resourceType``, and each entry's resource is then validated against its own type.

The schema is package data (``fhir_adapters/schema/fhir.schema.json``, a copy of
``/work/shared/fhir/fhir.schema.json``), loaded once on first use.

Messages describe the problem without echoing the offending value: values may be patient data.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping
from functools import cache, lru_cache
from importlib import resources
from typing import Any

from jsonschema import Draft6Validator
from jsonschema.exceptions import ValidationError

from core.errors import ImagingCdsError

_SCHEMA_PACKAGE = "fhir_adapters"
_SCHEMA_PATH = ("schema", "fhir.schema.json")
_MAX_PROBLEMS = 20
# The Bundle definition used for the bundle's own structure: entry resources are checked one by one.
_BUNDLE_SHELL = "__BundleShell"


class ResourceValidationError(ImagingCdsError):
    """A resource the project built does not conform to the FHIR R4 schema.

    This is the project's own bug (a builder wrote a wrong element), hence HTTP 500. ``problems`` lists
    each one as ``"<JSON path>: <what is wrong>"``.
    """

    http_status = 500

    def __init__(self, message: str, *, problems: Iterable[str], remedy: str = "") -> None:
        self.problems = tuple(problems)
        super().__init__(message, remedy=remedy)


@lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    """The FHIR R4 JSON schema (draft-06), parsed once."""
    path = resources.files(_SCHEMA_PACKAGE).joinpath(*_SCHEMA_PATH)
    try:
        schema: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:  # pragma: no cover - a packaging error
        from core.errors import ConfigurationError

        raise ConfigurationError(
            "The FHIR R4 JSON schema is missing from the installed package (fhir_adapters/schema/fhir.schema.json).",
            remedy="Reinstall imaging-cds; the schema is package data.",
        ) from exc
    return schema


def resource_types() -> frozenset[str]:
    """Every resource type the R4 schema defines (the targets of its root ``oneOf``)."""
    return _resource_types()


@lru_cache(maxsize=1)
def _resource_types() -> frozenset[str]:
    refs = (alt.get("$ref", "") for alt in load_schema().get("oneOf", []))
    return frozenset(ref.rsplit("/", 1)[-1] for ref in refs if ref)


@lru_cache(maxsize=1)
def _definitions() -> dict[str, Any]:
    """The schema's definitions plus the Bundle shell (the shared dicts are not modified)."""
    definitions = dict(load_schema()["definitions"])
    entry = dict(definitions["Bundle_Entry"])
    entry_properties = dict(entry["properties"])
    entry_properties["resource"] = {
        "type": "object",
        "required": ["resourceType"],
        "properties": {"resourceType": {"type": "string"}},
    }
    entry["properties"] = entry_properties
    definitions["__BundleShell_Entry"] = entry
    bundle = dict(definitions["Bundle"])
    bundle_properties = dict(bundle["properties"])
    bundle_properties["entry"] = {"type": "array", "items": {"$ref": "#/definitions/__BundleShell_Entry"}}
    bundle["properties"] = bundle_properties
    definitions[_BUNDLE_SHELL] = bundle
    return definitions


@cache
def _validator(definition: str) -> Draft6Validator:
    """One validator per definition; ``$ref`` resolves against the schema's shared definitions."""
    schema = load_schema()
    root = {
        "$schema": schema["$schema"],
        "id": schema["id"],
        "definitions": _definitions(),
        "$ref": f"#/definitions/{definition}",
    }
    return Draft6Validator(root)


def _describe(error: ValidationError) -> str:
    """What is wrong, in words, without the offending value (it may be patient data)."""
    kind, expected = error.validator, error.validator_value
    if kind == "enum":
        allowed = ", ".join(str(v) for v in expected)
        return f"value is not one of the allowed codes ({allowed})"
    if kind == "const":
        return f"value must be {expected!r}"
    if kind == "type":
        return f"must be of JSON type {expected}"
    if kind == "pattern":
        return f"value does not have the required format (pattern {expected})"
    if kind == "required":
        return error.message  # "'x' is a required property": names the element, not a value
    if kind == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return f"unknown element(s) {', '.join(repr(e) for e in extra)}"
    if kind in ("oneOf", "anyOf"):
        return f"matches none of the allowed alternatives ({kind})"
    if kind in ("minItems", "maxItems", "minLength", "maxLength", "minimum", "maximum"):
        return f"violates {kind} {expected}"
    return f"violates schema rule {kind!r}"


def _problems(instance: Mapping[str, Any], definition: str, prefix: str) -> list[str]:
    errors = sorted(_validator(definition).iter_errors(instance), key=lambda e: list(e.absolute_path))
    found: list[str] = []
    for error in errors:
        path = prefix + error.json_path[1:]
        found.append(f"{path}: {_describe(error)}")
    return found


def _resource_problems(resource: Any, prefix: str) -> list[str]:
    if not isinstance(resource, Mapping):
        return [f"{prefix}: a resource must be a JSON object"]
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str) or resource_type not in _resource_types():
        return [f"{prefix}.resourceType: missing or not an R4 resource type"]
    return _problems(resource, resource_type, prefix)


def _raise(what: str, problems: list[str]) -> None:
    shown = problems[:_MAX_PROBLEMS]
    more = f" (and {len(problems) - _MAX_PROBLEMS} more)" if len(problems) > _MAX_PROBLEMS else ""
    raise ResourceValidationError(
        f"{what} does not conform to the FHIR R4 schema: " + "; ".join(shown) + more,
        problems=problems,
        remedy="This is a bug in imaging-cds' resource builders; report it with this message.",
    )


def validate_resource(resource: Mapping[str, Any]) -> None:
    """Raise :class:`ResourceValidationError` unless ``resource`` conforms to its R4 schema definition.

    A Bundle is validated with its entries (see :func:`validate_bundle`).
    """
    if isinstance(resource, Mapping) and resource.get("resourceType") == "Bundle":
        validate_bundle(resource)
        return
    problems = _resource_problems(resource, "$")
    if problems:
        rtype = resource.get("resourceType", "resource") if isinstance(resource, Mapping) else "resource"
        _raise(str(rtype), problems)


def validate_bundle(bundle: Mapping[str, Any]) -> None:
    """Raise :class:`ResourceValidationError` unless the Bundle and every entry's resource conform to R4.

    Paths of problems inside an entry read ``$.entry[2].resource.status``.
    """
    if not isinstance(bundle, Mapping) or bundle.get("resourceType") != "Bundle":
        _raise("Bundle", ["$.resourceType: must be 'Bundle'"])
    problems = _problems(bundle, _BUNDLE_SHELL, "$")
    entries = bundle.get("entry", [])
    if isinstance(entries, list):
        for index, entry in enumerate(entries):
            if isinstance(entry, Mapping) and "resource" in entry:
                problems.extend(_resource_problems(entry["resource"], f"$.entry[{index}].resource"))
    if problems:
        _raise(f"Bundle ({bundle.get('type', 'no type')})", problems)


# ---------------------------------------------------------------------------------------------- by shape

_SHAPE_CACHE_SIZE = 4096
_valid_shapes: OrderedDict[Hashable, None] = OrderedDict()
_shapes_lock = threading.Lock()


@lru_cache(maxsize=1)
def _primitive_patterns() -> tuple[re.Pattern[str], ...]:
    """Every pattern the R4 schema's primitive types use (id, code, instant, uri, string, ...)."""
    definitions = load_schema()["definitions"]
    return tuple(re.compile(d["pattern"]) for d in definitions.values() if isinstance(d.get("pattern"), str))


@lru_cache(maxsize=1)
def _enum_values() -> frozenset[str]:
    """Every value any enum of the R4 schema lists (the required value sets it spells out)."""
    found: set[str] = set()

    def collect(node: Any) -> None:
        if isinstance(node, Mapping):
            if isinstance(node.get("enum"), list):
                found.update(v for v in node["enum"] if isinstance(v, str))
            for item in node.values():
                collect(item)
        elif isinstance(node, list):
            for item in node:
                collect(item)

    collect(load_schema()["definitions"])
    return frozenset(found)


def _shape(value: Any) -> Hashable:
    """What the schema can tell apart in ``value``: its structure; a string that some enum of the schema lists, as
    it is; any other string only by which primitive patterns it matches (the schema constrains nothing else)."""
    if isinstance(value, Mapping):
        return tuple((key, _shape(item)) for key, item in sorted(value.items()))
    if isinstance(value, list):
        return ("[", *(_shape(item) for item in value))
    if isinstance(value, str):
        return _string_shape(value)
    return (type(value).__name__, value)


@lru_cache(maxsize=65_536)
def _string_shape(value: str) -> Hashable:
    """A string's part of a shape; remembered, since most strings of a kind of resource (systems, codes,
    displays, server URLs) recur in every one of them."""
    if value in _enum_values():
        return value
    return ("s", sum(1 << n for n, pattern in enumerate(_primitive_patterns()) if pattern.search(value)))


def validate_resource_by_shape(resource: Mapping[str, Any]) -> None:
    """:func:`validate_resource` for resources made in volume (AuditEvents), where it would cost more than the
    request they record: a resource whose shape (see :func:`_shape`) passed before is not checked again.

    Two resources of one shape pass or fail alike: the R4 JSON schema constrains strings only by the primitive
    type patterns and by enums, and both are part of the shape (a string in no enum fails every enum alike).
    """
    shape = _shape(resource)
    with _shapes_lock:
        if shape in _valid_shapes:
            _valid_shapes.move_to_end(shape)
            return
    validate_resource(resource)
    with _shapes_lock:
        _valid_shapes[shape] = None
        while len(_valid_shapes) > _SHAPE_CACHE_SIZE:
            _valid_shapes.popitem(last=False)

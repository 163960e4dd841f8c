"""Check every resource the project writes against HL7's official FHIR R4 JSON schema before it leaves.

The EHR's FHIR server may accept codes outside a required value set (sekmet-fhir takes ``status: "bogus"``),
so a resource we build wrongly could be stored and mislead a reader later. Validating here turns such a
mistake into a :class:`ResourceValidationError` at build time, naming each offending element by its JSON path.

Speed matters because every analysis validates its whole transaction and every access its AuditEvent.
``jsonschema`` walks the schema node by node, resolving each ``$ref`` as it goes: about a millisecond per
resource, 20-25 ms for a results bundle with its key images. So a resource is first put through a check
compiled once per process from the same definitions (:class:`_CompiledCheck`: plain Python predicates for the
few keywords the R4 schema uses, with Draft 6's meaning), which says only *whether* it conforms, in a tenth of
the time. Only a resource it refuses goes through ``jsonschema``, which names each problem; so what is refused,
and the message saying why, are what ``jsonschema`` decides. Both work per resource type:

* each resource is checked against ``#/definitions/<resourceType>``;
* a Bundle is checked against a copy of the Bundle definition whose ``entry.resource`` only has to be an
  object with a ``resourceType``, and each entry's resource is then checked against its own type.

The schema is package data (``fhir_adapters/schema/fhir.schema.json``, a copy of
``/work/shared/fhir/fhir.schema.json``), loaded once on first use.

Messages describe the problem without echoing the offending value: values may be patient data.
"""

from __future__ import annotations

import json
import numbers
import re
import threading
from collections.abc import Callable, Iterable, Mapping
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
    if _conforms(resource):
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
    entries = bundle.get("entry", [])
    if _check(_BUNDLE_SHELL)(bundle) and (
        not isinstance(entries, list)  # the shell check has refused a non-list already; for mypy
        or all(_conforms(e["resource"]) for e in entries if isinstance(e, Mapping) and "resource" in e)
    ):
        return
    problems = _problems(bundle, _BUNDLE_SHELL, "$")
    if isinstance(entries, list):
        for index, entry in enumerate(entries):
            if isinstance(entry, Mapping) and "resource" in entry:
                problems.extend(_resource_problems(entry["resource"], f"$.entry[{index}].resource"))
    if problems:
        _raise(f"Bundle ({bundle.get('type', 'no type')})", problems)


# ---------------------------------------------------------------------------------------------- the fast check


def _conforms(resource: Any) -> bool:
    """Whether the compiled check passes ``resource`` (a known R4 type conforming to its definition)."""
    if not isinstance(resource, Mapping):
        return False
    resource_type = resource.get("resourceType")
    return isinstance(resource_type, str) and resource_type in _resource_types() and _check(resource_type)(resource)


Check = Callable[[Any], bool]
"""Whether an instance conforms to a schema node: no message, no path (``jsonschema`` gives those)."""


class UnsupportedSchemaError(ValueError):
    """The schema uses a keyword or form :class:`_CompiledCheck` does not reproduce."""


class _CompiledCheck:
    """Predicates compiled from the R4 schema's definitions, one per definition, built on first use.

    The R4 schema uses ten keywords: ``$ref`` (to ``#/definitions/...``), ``type``, ``properties``,
    ``additionalProperties`` (always ``false``), ``required``, ``items`` (one schema), ``pattern``, ``enum`` and
    ``const`` (strings), ``oneOf`` (the resource list), and ``description``. Each is given the meaning Draft 6 and
    ``jsonschema`` give it: a ``$ref`` hides its siblings; ``properties``, ``additionalProperties`` and
    ``required`` only constrain a ``dict``, ``items`` only a ``list``, ``pattern`` only a ``str`` (``re.search``);
    ``number`` is any ``numbers.Number`` but a ``bool``. A node with any other keyword raises
    :class:`UnsupportedSchemaError`, and that definition is then left to ``jsonschema`` alone.
    ``tests/test_validation.py`` compares the two on mutated resources.
    """

    KEYWORDS = frozenset(
        {"$ref", "type", "properties", "additionalProperties", "required", "items", "pattern", "enum", "const"}
        | {"oneOf", "description"}
    )
    TYPES: Mapping[str, Check] = {
        "object": lambda x: isinstance(x, dict),
        "array": lambda x: isinstance(x, list),
        "string": lambda x: isinstance(x, str),
        "boolean": lambda x: isinstance(x, bool),
        "number": lambda x: isinstance(x, numbers.Number) and not isinstance(x, bool),
    }

    def __init__(self, definitions: Mapping[str, Any]) -> None:
        self.definitions = definitions
        self.cells: dict[str, list[Check]] = {}  # per definition: its check, once compiled
        self.lock = threading.RLock()  # compiling a definition compiles (and so looks up) the ones it refers to

    def definition(self, name: str) -> Check:
        """The check of ``#/definitions/<name>``. A definition is compiled when an instance first reaches it, so
        a process compiles the few dozen it meets, not the thousand the schema has."""
        if name not in self.definitions:
            raise UnsupportedSchemaError(f"$ref to an unknown definition {name!r}")
        with self.lock:
            if name not in self.cells:

                def compile_then_check(instance: Any) -> bool:
                    with self.lock:
                        if cell[0] is compile_then_check:
                            cell[0] = self.node(self.definitions[name])
                    return cell[0](instance)

                cell: list[Check] = [compile_then_check]
                self.cells[name] = cell
            found = self.cells[name]
        return lambda instance: found[0](instance)

    def node(self, schema: Mapping[str, Any]) -> Check:
        unknown = set(schema) - self.KEYWORDS
        if unknown:
            raise UnsupportedSchemaError(f"keyword(s) {sorted(unknown)}")
        if "$ref" in schema:  # Draft 6: the siblings of a $ref are ignored
            ref = schema["$ref"]
            if not isinstance(ref, str) or not ref.startswith("#/definitions/"):
                raise UnsupportedSchemaError(f"$ref {ref!r}")
            return self.definition(ref.removeprefix("#/definitions/"))
        checks: list[Check] = []
        if "type" in schema:
            if not isinstance(schema["type"], str) or schema["type"] not in self.TYPES:
                raise UnsupportedSchemaError(f"type {schema['type']!r}")
            checks.append(self.TYPES[schema["type"]])
        if "enum" in schema or "const" in schema:
            allowed = frozenset(schema["enum"]) if "enum" in schema else frozenset([schema["const"]])
            if not all(isinstance(value, str) for value in allowed):
                raise UnsupportedSchemaError("an enum or const that is not all strings")
            checks.append(lambda x: isinstance(x, str) and x in allowed)
        if "pattern" in schema:
            search = re.compile(schema["pattern"]).search
            checks.append(lambda x: not isinstance(x, str) or search(x) is not None)
        if "items" in schema:
            if not isinstance(schema["items"], Mapping):
                raise UnsupportedSchemaError("items as a list")
            item = self.node(schema["items"])
            checks.append(lambda x: not isinstance(x, list) or all(item(i) for i in x))
        if {"properties", "additionalProperties", "required"} & set(schema):
            checks.append(self._object(schema))
        if "oneOf" in schema:
            alternatives = [self.node(alternative) for alternative in schema["oneOf"]]
            checks.append(lambda x: sum(1 for alternative in alternatives if alternative(x)) == 1)
        if not checks:
            return lambda x: True
        if len(checks) == 1:
            return checks[0]
        return lambda x: all(check(x) for check in checks)

    def _object(self, schema: Mapping[str, Any]) -> Check:
        properties = {name: self.node(sub) for name, sub in schema.get("properties", {}).items()}
        additional = schema.get("additionalProperties", True)
        if additional not in (True, False):
            raise UnsupportedSchemaError("additionalProperties as a schema")
        required = tuple(schema.get("required", ()))

        def check(x: Any) -> bool:
            if not isinstance(x, dict):
                return True
            for key, value in x.items():
                sub = properties.get(key)
                if sub is None:
                    if not additional:
                        return False
                elif not sub(value):
                    return False
            return all(name in x for name in required)

        return check


@cache
def _check(definition: str) -> Check:
    """The compiled check of one definition, or, where the schema uses what it does not reproduce, ``jsonschema``
    itself (its ``is_valid``)."""
    try:
        return _compiler().definition(definition)
    except UnsupportedSchemaError:
        return _validator(definition).is_valid


@lru_cache(maxsize=1)
def _compiler() -> _CompiledCheck:
    return _CompiledCheck(_definitions())

"""File one analysis' results on a FHIR server the way that server takes them: the writer beside the builders.

:func:`fhir_adapters.builders.build_results_bundle` describes a result as one transaction Bundle. The servers
hospitals run differ in what they accept:

* some take the Bundle as one transaction; Medplum takes a transaction that holds conditional creates only up to
  8 entries ("Transaction requires strict isolation but has too many entries"), and many vendor EHR APIs offer
  no transaction at all;
* servers and the proxies before them cap request bodies (Medplum's JSON limit and the SMART reference
  launcher's: 1 MB), and a report with several key images passes that in one request;
* some create a resource at an id the client chose (``PUT``, "update as create", which the Provenance's
  deterministic id relies on) and some declare they do not (Medplum: ``updateCreate: false``).

:func:`write_results` reads the server's CapabilityStatement (once per server: :class:`CapabilityCache`),
combines it with what the administrator configured (:class:`WriteSettings`), and files the result by one of two
strategies, chosen by :func:`plan_write`:

``transaction``
    the Bundle in one request, all or nothing.
``ordered``
    one request per resource, the parts first (Device, Observations, Media; a part that names another, such as a
    finding derived from its key images, after it) and the DiagnosticReport last, so a clinician never sees a
    report whose parts are missing; the ``urn:uuid`` references of the Bundle are
    rewritten to the ids the server gave. Every write is idempotent (a conditional create on the resource's
    deterministic identifier, or a ``PUT`` to a deterministic id), so a retry after a failure at any step
    completes the same result and duplicates nothing.

A transaction larger than the server's request limit sends its largest key images ahead, each as a ``Binary``
referenced from its ``Media`` (:func:`~fhir_adapters.builders.media_image_binary`), until it fits; in ordered
writes each image already travels alone. Every request is checked against the limit before the first is sent.
Where the server cannot create the Provenance at its deterministic id, it is written last, conditionally on its
target and agent.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qsl

import orjson

from core.errors import ConfigurationError
from core.options import did_you_mean, look_up_option
from fhir_adapters.builders import media_image_binary, media_with_image_at
from fhir_adapters.client import FhirClient
from fhir_adapters.errors import FhirError, FhirRequestTooLarge

log = logging.getLogger(__name__)

Strategy = Literal["transaction", "ordered"]
STRATEGY_SETTINGS = ("auto", "transaction", "ordered")

DEFAULT_MAX_REQUEST_BYTES = 1_000_000
"""Below the 1 MB body limits common in front of FHIR servers (the SMART reference launcher's proxy, Medplum's
``maxJsonSize``), for a server whose limit nobody configured."""

CAPABILITIES_TTL_S = 3600.0
"""How long a server's CapabilityStatement is trusted before it is read again (a server upgrade is noticed)."""
UNKNOWN_CAPABILITIES_TTL_S = 300.0
"""How long to wait before asking again a server whose CapabilityStatement could not be read."""


@dataclass(frozen=True)
class KnownLimits:
    """Limits a server enforces by default but does not publish in its CapabilityStatement."""

    max_transaction_entries: int | None
    """Entries allowed in a transaction that holds conditional creates (every results transaction does)."""
    max_request_bytes: int | None
    source: str


KNOWN_LIMITS: dict[str, KnownLimits] = {
    # Medplum 4.x: @medplum/fhir-router refuses a transaction holding conditional writes past 8 entries
    # (batch.ts, "Transaction requires strict isolation but has too many entries"), and the server's JSON body
    # parser stops at config.maxJsonSize, "1mb" by default (packages/server/src/config/utils.ts).
    "medplum": KnownLimits(max_transaction_entries=8, max_request_bytes=1024 * 1024, source="Medplum's defaults"),
}
"""By ``CapabilityStatement.software.name``, lower-cased."""


@dataclass(frozen=True)
class WriteSettings:
    """How an administrator wants results written to one FHIR server; ``None`` leaves a limit to the server.

    * ``strategy``: ``auto`` (decide from the CapabilityStatement and the limits), ``transaction`` (always one
      transaction) or ``ordered`` (always ordered writes);
    * ``max_transaction_entries``: the most entries the server takes in one transaction;
    * ``max_request_bytes``: the largest request body the server, and every proxy before it, accepts.

    A limit left out comes from what is known of the server's software (:data:`KNOWN_LIMITS`), then from the
    defaults (no entry limit; :data:`DEFAULT_MAX_REQUEST_BYTES`).
    """

    strategy: str = "auto"
    max_transaction_entries: int | None = None
    max_request_bytes: int | None = None

    def __post_init__(self) -> None:
        look_up_option(self.strategy, STRATEGY_SETTINGS, what="write strategy")
        for name in ("max_transaction_entries", "max_request_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigurationError(
                    f"The write setting {name} must be a positive whole number, not {value!r}.",
                    remedy="Give the server's limit, or leave the setting out.",
                )

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], *, source: str) -> WriteSettings:
        """Parse one entry of a deployment file; unknown keys fail with a "did you mean" hint."""
        known = tuple(f.name for f in fields(cls))
        for key in raw:
            if key not in known:
                raise ConfigurationError(
                    f"{source}: unknown write setting '{key}'.{did_you_mean(str(key), known)}",
                    remedy=f"Known settings: {', '.join(known)}.",
                )
        values: dict[str, Any] = {}
        if "strategy" in raw:
            values["strategy"] = str(raw["strategy"])
        for key in ("max_transaction_entries", "max_request_bytes"):
            if raw.get(key) is not None:
                try:
                    values[key] = int(raw[key])
                except (TypeError, ValueError) as exc:
                    raise ConfigurationError(f"{source}: {key} must be a whole number, not {raw[key]!r}.") from exc
        return cls(**values)


@dataclass(frozen=True)
class ServerWriteSettings:
    """:class:`WriteSettings` by FHIR server base URL; a server not named gets ``default``."""

    servers: Mapping[str, WriteSettings] = field(default_factory=dict)
    default: WriteSettings = field(default_factory=WriteSettings)

    def for_server(self, base_url: str) -> WriteSettings:
        wanted = base_url.rstrip("/")
        for base, settings in self.servers.items():
            if base.rstrip("/") == wanted:
                return settings
        return self.default


# ---------------------------------------------------------------------------------------------- capabilities


@dataclass(frozen=True)
class ServerCapabilities:
    """What a server's CapabilityStatement says about writing, with the limits known for its software."""

    software: str
    transaction: bool
    update_create: Mapping[str, bool] = field(default_factory=dict)
    conditional_create: Mapping[str, bool] = field(default_factory=dict)
    known: KnownLimits | None = None

    @classmethod
    def from_statement(cls, statement: Mapping[str, Any]) -> ServerCapabilities:
        software = str((statement.get("software") or {}).get("name") or "").strip()
        rest: Mapping[str, Any] = next((r for r in statement.get("rest") or [] if r.get("mode") == "server"), {})
        system = {str(i.get("code")) for i in rest.get("interaction") or [] if isinstance(i, Mapping)}
        update_create: dict[str, bool] = {}
        conditional_create: dict[str, bool] = {}
        for resource in rest.get("resource") or []:
            kind = str(resource.get("type") or "")
            if isinstance(resource.get("updateCreate"), bool):
                update_create[kind] = resource["updateCreate"]
            if isinstance(resource.get("conditionalCreate"), bool):
                conditional_create[kind] = resource["conditionalCreate"]
        return cls(
            software=software,
            transaction="transaction" in system,
            update_create=update_create,
            conditional_create=conditional_create,
            known=KNOWN_LIMITS.get(software.lower()),
        )

    @classmethod
    def unknown(cls) -> ServerCapabilities:
        """A server whose CapabilityStatement could not be read: what the project assumed before reading any."""
        return cls(software="", transaction=True)

    @staticmethod
    def _declared(declared: Mapping[str, bool], resource_type: str) -> bool:
        """The flag for ``resource_type``: as declared for it, else as declared for every type that declares it
        (a server may leave a type such as Binary out of its list), else True (undeclared: the R4 norm)."""
        if resource_type in declared:
            return declared[resource_type]
        return all(declared.values()) if declared else True

    def allows_update_create(self, resource_type: str) -> bool:
        return self._declared(self.update_create, resource_type)

    def allows_conditional_create(self, resource_type: str) -> bool:
        return self._declared(self.conditional_create, resource_type)


class CapabilityCache:
    """Each server's :class:`ServerCapabilities`, read from ``[base]/metadata`` once per ``ttl_s``.

    Keyed by base URL, so the clients of many launches against one EHR share one read: an analysis adds no
    request. A server that answers the read with a client error (no CapabilityStatement there) is treated as
    :meth:`ServerCapabilities.unknown` for a shorter time; a retryable failure (5xx, unreachable) is raised, as the
    write would fail too.
    """

    def __init__(self, ttl_s: float = CAPABILITIES_TTL_S, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, ServerCapabilities]] = {}

    def get(self, client: FhirClient) -> ServerCapabilities:
        now = self._clock()
        with self._lock:
            cached = self._entries.get(client.base_url)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            capabilities = ServerCapabilities.from_statement(client.capability_statement())
            expires = now + self.ttl_s
        except FhirError as exc:
            if exc.retryable:
                raise
            log.warning("FHIR server %s: no CapabilityStatement (%s); assuming transactions", client.base_url, exc)
            capabilities = ServerCapabilities.unknown()
            expires = now + min(self.ttl_s, UNKNOWN_CAPABILITIES_TTL_S)
        with self._lock:
            self._entries[client.base_url] = (expires, capabilities)
        return capabilities

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


CAPABILITIES = CapabilityCache()
"""The process-wide cache every writer shares unless given its own."""


# ---------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class WritePlan:
    """How one results Bundle goes to one server, and why (the reason is shown in the analysis summary)."""

    strategy: Strategy
    reason: str
    binary_media: frozenset[str]
    """``fullUrl`` of each Media whose image goes to a Binary instead of travelling inline."""
    provenance_in_transaction: bool
    max_request_bytes: int


def _size(body: Any) -> int:
    return len(orjson.dumps(body))


def _is_provenance(entry: Mapping[str, Any]) -> bool:
    return (entry.get("resource") or {}).get("resourceType") == "Provenance"


def _is_inline_media(entry: Mapping[str, Any]) -> bool:
    resource = entry.get("resource") or {}
    return resource.get("resourceType") == "Media" and bool((resource.get("content") or {}).get("data"))


def _media_without_image(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The entry as it travels once its image is in a Binary (a 64-character id stands in for the one it gets)."""
    return {**entry, "resource": media_with_image_at(entry["resource"], f"Binary/{'0' * 64}")}


def _check_size(resource: Mapping[str, Any], max_bytes: int) -> None:
    size = _size(resource)
    if size > max_bytes:
        raise FhirRequestTooLarge(
            f"The {resource.get('resourceType')} of this result is {size} bytes, more than the {max_bytes} bytes "
            "the FHIR server is configured to accept in one request.",
            remedy="Raise max_request_bytes for this server if it (and every proxy before it) accepts more.",
        )


def plan_write(bundle: Mapping[str, Any], capabilities: ServerCapabilities, settings: WriteSettings) -> WritePlan:
    """Choose the strategy and the images that go to Binary for ``bundle`` on a server with ``capabilities``."""
    entries = [e for e in bundle.get("entry") or [] if isinstance(e, Mapping)]
    known = capabilities.known
    max_bytes = settings.max_request_bytes or (known and known.max_request_bytes) or DEFAULT_MAX_REQUEST_BYTES
    provenance_in_transaction = capabilities.allows_update_create("Provenance")
    in_transaction = [e for e in entries if provenance_in_transaction or not _is_provenance(e)]
    conditional = any((e.get("request") or {}).get("ifNoneExist") for e in in_transaction)
    max_entries = settings.max_transaction_entries or (
        known.max_transaction_entries if known is not None and conditional else None
    )
    software = capabilities.software or "the server"

    strategy: Strategy
    if settings.strategy == "ordered":
        strategy, reason = "ordered", "ordered writes, as configured for this server"
    elif settings.strategy == "transaction":
        strategy, reason = "transaction", "one transaction, as configured for this server"
    elif not capabilities.transaction:
        strategy, reason = "ordered", f"ordered writes: {software} offers no transaction (CapabilityStatement)"
    elif max_entries is not None and len(in_transaction) > max_entries:
        limit_source = "as configured" if settings.max_transaction_entries else f"({known.source if known else ''})"
        strategy = "ordered"
        reason = (
            f"ordered writes: the result has {len(in_transaction)} entries and {software} takes at most "
            f"{max_entries} in a transaction with conditional creates {limit_source}"
        ).strip()
    else:
        strategy, reason = "transaction", f"one transaction: {software} supports it and the result fits its limits"

    binary_media: set[str] = set()
    if strategy == "transaction":
        sendable = {str(e.get("fullUrl")): e for e in in_transaction}
        media = sorted(
            (e for e in in_transaction if _is_inline_media(e)), key=lambda e: _size(e["resource"]), reverse=True
        )
        while _size({"resourceType": "Bundle", "type": "transaction", "entry": list(sendable.values())}) > max_bytes:
            if not media:
                if settings.strategy == "transaction":
                    raise FhirRequestTooLarge(
                        f"The results transaction is larger than {max_bytes} bytes even with its images as Binary.",
                        remedy="Allow ordered writes for this server, or raise its max_request_bytes.",
                    )
                strategy = "ordered"
                reason = f"ordered writes: the result is larger than {max_bytes} bytes in one transaction"
                binary_media.clear()
                break
            largest = media.pop(0)
            binary_media.add(str(largest["fullUrl"]))
            sendable[str(largest["fullUrl"])] = _media_without_image(largest)
    # Every request must fit, checked before the first is sent, so a result too large to file is refused before
    # any part of it is written. In ordered writes each image already travels alone in its Media, so a Binary (the
    # same bytes) would be no smaller.
    for entry in entries:
        resource = entry["resource"]
        if str(entry.get("fullUrl")) in binary_media:
            resource = media_image_binary(resource)
        elif strategy == "transaction" and entry in in_transaction:
            continue  # travels in the transaction, whose size is checked above
        _check_size(resource, max_bytes)
    return WritePlan(strategy, reason, frozenset(binary_media), provenance_in_transaction, max_bytes)


# ---------------------------------------------------------------------------------------------- the writes


@dataclass(frozen=True)
class FiledResults:
    """What the server holds for one result once it is filed, and how it got there."""

    strategy: Strategy
    reason: str
    report: str
    """``DiagnosticReport/<id>``."""
    report_created: bool
    """False when the report was already there (a re-run, or a retry after the report was written)."""
    written: tuple[str, ...]
    """``Type/id`` of every resource of the result, Binary images first."""
    images_as_binary: int
    filed: dict[str, dict[str, Any]] = field(default_factory=dict)
    """With ``representation``: the resources as the server answered with them, by ``Type/id``."""


def write_results(
    client: FhirClient,
    bundle: Mapping[str, Any],
    *,
    settings: WriteSettings | None = None,
    capabilities: CapabilityCache = CAPABILITIES,
    representation: bool = False,
) -> FiledResults:
    """File the results ``bundle`` (from :func:`~fhir_adapters.builders.build_results_bundle`) on ``client``'s server.

    Idempotent whichever strategy the server gets: writing the same bundle again, or again after a failure at any
    step, leaves exactly one complete result. ``representation=True`` keeps the resources as the server answered
    with them (:attr:`FiledResults.filed`) for a caller that shows them next; a server may leave them out of a
    transaction's answer.
    """
    if bundle.get("resourceType") != "Bundle" or bundle.get("type") != "transaction":
        raise ConfigurationError(
            "The results to write must be a transaction Bundle.", remedy="Build them with build_results_bundle."
        )
    server = capabilities.get(client)
    plan = plan_write(bundle, server, settings or WriteSettings())
    entries = [copy.deepcopy(dict(e)) for e in bundle.get("entry") or []]
    log.info("Writing results to %s: %s", client.base_url, plan.reason)
    binaries: list[str] = []
    for entry in entries:
        if str(entry.get("fullUrl")) in plan.binary_media:
            binary = _file_media_image(client, server, entry, plan.max_request_bytes)
            entry["resource"] = media_with_image_at(entry["resource"], binary)
            binaries.append(binary)
    writer = _Transaction(client, server, plan) if plan.strategy == "transaction" else _Ordered(client, server, plan)
    writer.write(entries, representation=representation)
    if not writer.report:
        raise FhirError(
            f"The FHIR server {client.base_url} answered the results without the DiagnosticReport's location.",
            remedy="Check that the server returns Location (or the resource) for each write.",
        )
    return FiledResults(
        strategy=plan.strategy,
        reason=plan.reason,
        report=writer.report,
        report_created=writer.report_created,
        written=(*binaries, *writer.written),
        images_as_binary=len(binaries),
        filed=writer.filed if representation else {},
    )


def _reference_of(resource: Mapping[str, Any]) -> str:
    return f"{resource['resourceType']}/{resource['id']}"


def _search_pairs(query: str) -> list[tuple[str, str]]:
    return parse_qsl(query, keep_blank_values=True)


def _file_media_image(client: FhirClient, server: ServerCapabilities, entry: Mapping[str, Any], max_bytes: int) -> str:
    """Write a Media's image as a Binary (unless the Media is already filed with one): its ``Binary/<id>``."""
    media = entry["resource"]
    query = str((entry.get("request") or {}).get("ifNoneExist") or "")
    if query:
        for existing in client.search("Media", [*_search_pairs(query), ("_count", "1")]):
            url = str((existing.get("content") or {}).get("url") or "")
            if url.startswith("Binary/"):
                return url  # filed before, with its image in this Binary: nothing to write
            break
    binary = media_image_binary(media)
    _check_size(binary, max_bytes)
    if server.allows_update_create("Binary"):
        return _reference_of(client.update(binary))  # at its deterministic id: a retry replaces, never duplicates
    # No update-as-create: the server names the Binary. A failure before its Media is filed leaves this Binary
    # unreferenced (never shown: no report points at it); the retry writes the image again and files the Media.
    return _reference_of(client.create({k: v for k, v in binary.items() if k != "id"}))


def _resolve(value: Any, ids: Mapping[str, str]) -> Any:
    """``value`` with every reference to a Bundle entry (``urn:uuid:...``) replaced by the id the server gave it."""
    if isinstance(value, dict):
        resolved = {k: _resolve(v, ids) for k, v in value.items()}
        reference = resolved.get("reference")
        if isinstance(reference, str) and reference in ids:
            resolved["reference"] = ids[reference]
        return resolved
    if isinstance(value, list):
        return [_resolve(v, ids) for v in value]
    return value


def _unresolved(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        reference = value.get("reference")
        if isinstance(reference, str) and reference.startswith("urn:uuid:"):
            yield reference
        for item in value.values():
            yield from _unresolved(item)
    elif isinstance(value, list):
        for item in value:
            yield from _unresolved(item)


def _provenance_query(provenance: Mapping[str, Any]) -> str:
    """The search that finds this analysis' Provenance again: its report (or first target) and its agent."""
    targets = [str((t or {}).get("reference", "")) for t in provenance.get("target") or []]
    target = next((t for t in targets if t.startswith("DiagnosticReport/")), targets[0] if targets else "")
    agent = str(((provenance.get("agent") or [{}])[0].get("who") or {}).get("reference", ""))
    return f"target={target}&agent={agent}"


class _Writer:
    """What both strategies share: the ids given so far, the report, what was written and returned."""

    def __init__(self, client: FhirClient, server: ServerCapabilities, plan: WritePlan) -> None:
        self.client = client
        self.server = server
        self.plan = plan
        self.ids: dict[str, str] = {}
        self.report = ""
        self.report_created = False
        self.written: list[str] = []
        self.filed: dict[str, dict[str, Any]] = {}

    def _stored(self, entry: Mapping[str, Any], resource: dict[str, Any], created: bool) -> None:
        reference = _reference_of(resource)
        self.ids[str(entry.get("fullUrl"))] = reference
        self.written.append(reference)
        self.filed[reference] = resource
        if resource["resourceType"] == "DiagnosticReport":
            self.report, self.report_created = reference, created

    def write(self, entries: list[dict[str, Any]], *, representation: bool) -> None:
        raise NotImplementedError

    def _create_once(self, resource: dict[str, Any], query: str) -> tuple[dict[str, Any], bool]:
        """A conditional create, or where the server declares none for the type, a search and then a create."""
        if self.server.allows_conditional_create(resource["resourceType"]):
            return self.client.conditional_create(resource, query)
        for existing in self.client.search(resource["resourceType"], [*_search_pairs(query), ("_count", "1")]):
            return existing, False
        return self.client.create(resource), True

    def _write_provenance(self, entry: Mapping[str, Any]) -> None:
        provenance = _resolve(entry["resource"], self.ids)
        self._check_resolved(provenance)
        if self.server.allows_update_create("Provenance"):
            self._stored(entry, self.client.update(provenance), True)
            return
        body = {k: v for k, v in provenance.items() if k != "id"}
        self._stored(entry, *self._create_once(body, _provenance_query(body)))

    @staticmethod
    def _check_resolved(resource: Mapping[str, Any]) -> None:
        left = sorted(set(_unresolved(resource)))
        if left:
            raise ConfigurationError(
                f"The {resource.get('resourceType')} refers to {len(left)} resource(s) not written before it.",
                remedy="This is a bug in the results writer's ordering; report it.",
            )


class _Transaction(_Writer):
    """The Bundle in one transaction; the Provenance after it where the server cannot PUT it at its id."""

    def write(self, entries: list[dict[str, Any]], *, representation: bool) -> None:
        provenance = [e for e in entries if _is_provenance(e)]
        sent = entries if self.plan.provenance_in_transaction else [e for e in entries if not _is_provenance(e)]
        response = self.client.transaction(
            {"resourceType": "Bundle", "type": "transaction", "entry": sent}, representation=representation
        )
        for request_entry, response_entry in zip(sent, response.get("entry", []), strict=True):
            answer = response_entry.get("response") or {}
            location = str(answer.get("location") or "")
            reference = "/".join(location.split("/_history")[0].split("/")[-2:]) if location else ""
            resource = response_entry.get("resource")
            if not reference and isinstance(resource, dict) and resource.get("id"):
                reference = _reference_of(resource)
            if not reference:
                continue
            self.ids[str(request_entry.get("fullUrl"))] = reference
            self.written.append(reference)
            if isinstance(resource, dict) and resource.get("resourceType") and resource.get("id"):
                self.filed[_reference_of(resource)] = resource
            if reference.startswith("DiagnosticReport/"):
                self.report = reference
                self.report_created = str(answer.get("status", "")).startswith("201")
        if not self.plan.provenance_in_transaction:
            for entry in provenance:
                self._write_provenance(entry)


class _Ordered(_Writer):
    """One request per resource: Device, the other parts, the DiagnosticReport, then the Provenance."""

    _ORDER: ClassVar[dict[str, int]] = {"Device": 0, "DiagnosticReport": 2, "Provenance": 3}

    def write(self, entries: list[dict[str, Any]], *, representation: bool) -> None:
        for entry in self._in_order(entries):
            if _is_provenance(entry):
                _check_size(entry["resource"], self.plan.max_request_bytes)
                self._write_provenance(entry)
                continue
            resource = _resolve(entry["resource"], self.ids)
            self._check_resolved(resource)
            _check_size(resource, self.plan.max_request_bytes)
            request = entry.get("request") or {}
            query = str(request.get("ifNoneExist") or "")
            if request.get("method") == "PUT":
                self._stored(entry, self.client.update(resource), True)
            elif query:
                self._stored(entry, *self._create_once(resource, query))
            else:
                raise ConfigurationError(
                    f"The {resource['resourceType']} of this result has no deterministic identifier to write it "
                    "by: it could be written twice.",
                    remedy="Results must be built by build_results_bundle.",
                )

    @classmethod
    def _in_order(cls, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Device, the other parts, the report, the Provenance; and each entry after the entries it refers to.

        A part may name another part (a finding's Observation is derived from the Media that show it), and its
        reference can only be rewritten once that part has its id; the report and the Provenance name every part,
        so they still come last.
        """
        waiting = sorted(entries, key=lambda e: cls._ORDER.get(e["resource"]["resourceType"], 1))  # stable sort
        in_bundle = {str(e.get("fullUrl")) for e in entries}
        placed: set[str] = set()
        ordered: list[dict[str, Any]] = []
        while waiting:
            deferred = []
            for entry in waiting:
                if set(_unresolved(entry["resource"])) & in_bundle <= placed:
                    ordered.append(entry)
                    placed.add(str(entry.get("fullUrl")))
                else:
                    deferred.append(entry)
            if len(deferred) == len(waiting):
                raise ConfigurationError(
                    f"{len(deferred)} resource(s) of this result refer to each other in a cycle: none can be "
                    "written first.",
                    remedy="Results must be built by build_results_bundle; report this bug.",
                )
            waiting = deferred
        return ordered

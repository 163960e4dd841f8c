"""Prefetch semantics: use what the CDS client sent, fetch what it did not, and know when we cannot answer.

For each prefetch key a service needs, the request's ``prefetch`` object may:

* lack the key - the client did not provide it: fetch it from ``fhirServer`` (using ``fhirAuthorization``);
* hold ``null`` - the client looked and found no data: use no data, do not fetch;
* hold an OperationOutcome - the client tried and failed. We then fetch it ourselves when ``fhirServer`` is
  given, and otherwise answer 412: showing "no AI findings" when the findings could not be read would tell
  the clinician something false, so a failed prefetch is never treated as an empty one;
* hold a Bundle or resource - use it; a Bundle whose entries cannot be read (:func:`cds.fhirjson.bundle_problem`)
  is refused with a 400 that names the offending entry.

If a needed key can be neither used nor fetched, :class:`PrefetchUnavailableError` (412) is raised.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl, quote

from cds.fhirjson import bundle_problem
from core.errors import ImagingCdsError

Fetch = Callable[[str, list[tuple[str, str]]], dict[str, Any]]
"""Search on the hook's FHIR server: ``(resource_type, params) -> searchset Bundle``."""

_TOKEN = re.compile(r"\{\{\s*context\.([A-Za-z]+)\s*\}\}")


class PrefetchUnavailableError(ImagingCdsError):
    """Data the service needs was neither prefetched nor fetchable."""

    http_status = 412


class HookRequestError(ImagingCdsError):
    """The hook request is malformed (missing context field, wrong type)."""

    http_status = 400


def render_template(template: str, context: Mapping[str, Any]) -> str:
    """Fill ``{{context.x}}`` tokens; values are URL-encoded so a context value cannot add query parameters."""

    def substitute(match: re.Match[str]) -> str:
        value = context.get(match.group(1))
        if not isinstance(value, str) or not value:
            raise HookRequestError(
                f"context.{match.group(1)} is needed by a prefetch template but is missing or not a string.",
                remedy=f"Send context.{match.group(1)} as the hook's specification requires.",
            )
        return quote(value, safe="")

    return _TOKEN.sub(substitute, template)


def split_query(query: str) -> tuple[str, list[tuple[str, str]]]:
    """``"Type?a=1&b=2"`` -> ``("Type", [("a", "1"), ("b", "2")])``."""
    resource_type, _, params = query.partition("?")
    return resource_type, parse_qsl(params, keep_blank_values=True)


def _is_outcome(value: Any) -> bool:
    return isinstance(value, Mapping) and value.get("resourceType") == "OperationOutcome"


def resolve_prefetch(
    templates: Mapping[str, str],
    prefetch: Mapping[str, Any] | None,
    context: Mapping[str, Any],
    fetch: Fetch | None,
) -> dict[str, dict[str, Any] | None]:
    """Return each template key's data (a Bundle/resource, or ``None`` for "no data").

    ``fetch`` is ``None`` when the request gave no usable ``fhirServer``; then every key that needs fetching
    makes this raise :class:`PrefetchUnavailableError`.
    """
    sent = prefetch or {}
    resolved: dict[str, dict[str, Any] | None] = {}
    for key, template in templates.items():
        if key in sent and sent[key] is None:
            resolved[key] = None
            continue
        value = sent.get(key)
        if isinstance(value, Mapping) and not _is_outcome(value):
            if not isinstance(value.get("resourceType"), str):
                raise HookRequestError(
                    f"prefetch.{key} is not a FHIR resource.", remedy="Send a Bundle, an OperationOutcome or null."
                )
            problem = bundle_problem(value)
            if problem is not None:
                raise HookRequestError(
                    f"prefetch.{key}.{problem}.", remedy="Send each Bundle entry as an object holding one resource."
                )
            resolved[key] = dict(value)
            continue
        if key in sent and not _is_outcome(value):
            raise HookRequestError(f"prefetch.{key} must be a FHIR resource or null.", remedy="Send a Bundle or null.")
        if fetch is None:
            why = "the CDS client reported an error for it" if _is_outcome(value) else "it was not prefetched"
            raise PrefetchUnavailableError(
                f"prefetch.{key} is needed but {why}, and no fhirServer was given to fetch it from.",
                remedy="Send the prefetch, or fhirServer and fhirAuthorization.",
            )
        resource_type, params = split_query(render_template(template, context))
        fetched = fetch(resource_type, params)
        problem = bundle_problem(fetched)
        if problem is not None:
            raise PrefetchUnavailableError(
                f"The {resource_type} search on fhirServer answered a Bundle that cannot be read ({problem}).",
                remedy="Check the FHIR server's search answers, or send the prefetch.",
            )
        resolved[key] = fetched
    return resolved

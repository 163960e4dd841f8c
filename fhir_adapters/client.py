"""A small typed FHIR R4 REST client: the only place the project sends HTTP requests to a FHIR server.

Design points an integrator should know:

* Every answer passes through :func:`fhir_adapters.errors.raise_for_fhir_status`, so callers catch typed
  errors (``FhirNotFound``, ``FhirForbidden``...) and never look at status codes.
* Retries with exponential backoff happen only for failures that may heal: 5xx answers, timeouts and
  connection errors. A 4xx is never retried: the same request would get the same answer.
* A plain ``POST`` create is not idempotent (a retry after a lost answer would create a duplicate), so it is
  sent once unless it carries ``If-None-Exist``. :meth:`FhirClient.transaction` IS retried: every
  transaction this project writes is idempotent by construction - each entry is either a conditional create
  (``ifNoneExist`` on a deterministic identifier) or a ``PUT`` to a deterministic id - so replaying a
  transaction whose answer was lost finds the resources already there instead of duplicating them.
  Callers that build non-idempotent transactions must pass ``retry=False``.
* The bearer token goes only to URLs under ``base_url``; a 401 makes the client drop its token, fetch a
  fresh one and try once more. Other origins (a ``next`` link or an absolute reference elsewhere) are
  refused unless the :class:`~core.allowlist.AllowList` allows them, and even then get no token. "Under"
  is judged on the URL's canonical form (:func:`core.allowlist.canonical_url`: ``{base}/../admin`` is not
  under ``base``), and that canonical form is what is sent.
* Redirects are not followed (see :func:`~fhir_adapters.errors.raise_for_fhir_status`).
* Inputs are bounded (:class:`core.limits.InputLimits`): a response body is refused while it streams in once it
  passes ``fhir_response_bytes``, and a search that would follow more than ``fhir_search_pages`` pages is
  refused rather than silently cut short (a partial list of studies would look complete).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import orjson
import requests

from core.allowlist import AllowList, canonical_url
from core.errors import NotAllowedError
from core.limits import DEFAULT_LIMITS, InputLimits, too_large
from core.outbound import limit_body, outbound_session
from fhir_adapters.auth import TokenProvider
from fhir_adapters.errors import (
    FhirError,
    FhirInvalid,
    fhir_error_for,
    raise_for_fhir_status,
    unavailable,
)
from fhir_adapters.fhirjson import element, items

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
MAX_BACKOFF_S = 10.0
MAX_RETRY_AFTER_S = 30.0

_RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_RESOURCE_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_RELATIVE_REFERENCE = re.compile(r"^([A-Z][A-Za-z]{1,63})/([A-Za-z0-9\-.]{1,64})(/_history/([A-Za-z0-9\-.]{1,64}))?$")

SearchParams = Mapping[str, str | int | Sequence[str]] | Sequence[tuple[str, str]]


def _check_type_and_id(resource_type: str, resource_id: str | None = None) -> None:
    if not _RESOURCE_TYPE.match(resource_type or ""):
        raise FhirInvalid(
            f"{resource_type!r} is not a FHIR resource type.", remedy="Use a type name such as ImagingStudy."
        )
    if resource_id is not None and not _RESOURCE_ID.match(resource_id):
        raise FhirInvalid(
            f"{resource_type} id {resource_id[:70]!r} is not a valid FHIR id.",
            remedy="FHIR ids are 1-64 letters, digits, '-' or '.'.",
        )


class FhirClient:
    """A FHIR R4 client over one :class:`requests.Session`, bound to one server (``base_url``).

    ``retries`` is the number of attempts in all for a request that fails in a retryable way (5xx,
    timeout, connection error): ``retries=3`` means the first try and at most two more, waiting
    ``backoff``, ``2*backoff``... seconds in between. ``allow_list`` names other servers the client may
    follow references and ``next`` links to; ``base_url`` itself is always allowed. ``limits`` bounds what the
    server's answers may hold. Without a ``session``, one from :func:`core.outbound.outbound_session` is used.
    """

    def __init__(
        self,
        base_url: str,
        *,
        auth: TokenProvider | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.3,
        session: requests.Session | None = None,
        allow_list: AllowList | None = None,
        limits: InputLimits = DEFAULT_LIMITS,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        if allow_list is not None:
            allow_list.check(self.base_url, what="FHIR server")
        self._own_base = AllowList.of([self.base_url])
        self.auth = auth
        self.timeout = timeout
        self.retries = max(1, int(retries))
        self.backoff = max(0.0, float(backoff))
        self.session = session or outbound_session()
        self.allow_list = allow_list
        self.limits = limits
        self._limit_body = limit_body(
            limits.fhir_response_bytes,
            what=f"An answer of the FHIR server {self.base_url}",
            limit_name="fhir_response_bytes",
        )

    def __repr__(self) -> str:
        return f"FhirClient(base_url={self.base_url!r})"

    # ------------------------------------------------------------------ URLs

    def is_own_url(self, url: str) -> bool:
        """Whether ``url``, in canonical form, lies under this client's ``base_url`` (same origin and path
        prefix): only then does it get the bearer token."""
        return self._own_base.allows(url)

    def check_url(self, url: str, *, what: str) -> str:
        """Return ``url`` if the client may request it: under ``base_url``, or allowed by the allow-list.

        Raises :class:`~core.errors.NotAllowedError` before any request is made otherwise.
        """
        if self.is_own_url(url):
            return canonical_url(url).geturl()
        if self.allow_list is None:
            raise NotAllowedError(
                f"{what} points outside the FHIR server {self.base_url}; refused.",
                remedy="Configure an allow-list entry if this other server is trusted.",
            )
        return self.allow_list.check(url, what=what)

    def url_for_reference(self, reference: str) -> str:
        """The absolute URL of a literal reference (``"Type/id"``, ``"Type/id/_history/v"`` or absolute)."""
        reference = (reference or "").strip()
        if reference.startswith("#"):
            raise FhirInvalid(
                f"Reference {reference!r} is to a contained resource.",
                remedy="Look it up in the containing resource's 'contained' list.",
            )
        if _RELATIVE_REFERENCE.match(reference):
            return f"{self.base_url}/{reference}"
        if reference.startswith(("http://", "https://")):
            return reference
        raise FhirInvalid(
            f"Reference {reference[:80]!r} is neither 'Type/id' nor an absolute URL.",
            remedy="Use a literal reference such as 'ImagingStudy/123'.",
        )

    # ------------------------------------------------------------------ transport

    def _delay(self, attempt: int, response: requests.Response | None) -> float:
        delay = min(MAX_BACKOFF_S, self.backoff * (2 ** (attempt - 1)))
        retry_after = response.headers.get("Retry-After", "") if response is not None else ""
        if retry_after.isdigit():
            delay = max(delay, min(MAX_RETRY_AFTER_S, float(retry_after)))
        return delay

    def request(
        self,
        method: str,
        url: str,
        *,
        what: str,
        params: SearchParams | None = None,
        body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        retry: bool = True,
    ) -> requests.Response:
        """Send one FHIR request with auth, retries and error mapping; return the successful response.

        ``url`` must already have passed :meth:`check_url`; it is sent in the canonical form that check judged.
        ``retry=False`` sends it once (a plain create); a 401 is still retried once with a fresh token, because
        the server refused it before acting.
        """
        url = canonical_url(url).geturl()
        attempts = self.retries if retry else 1
        send_token = self.auth is not None and self.is_own_url(url)
        data = orjson.dumps(body) if body is not None else None  # UTF-8 JSON; fast for bundles carrying images
        attempt = 0
        refreshed = False
        while True:
            attempt += 1
            request_headers = {"Accept": FHIR_JSON, **(headers or {})}
            if data is not None:
                request_headers["Content-Type"] = f"{FHIR_JSON}; charset=utf-8"
            if send_token and self.auth is not None:
                request_headers["Authorization"] = self.auth.authorization_header()
            response: requests.Response | None = None
            try:
                response = self.session.request(
                    method,
                    url,
                    params=params,
                    data=data,
                    headers=request_headers,
                    timeout=self.timeout,
                    allow_redirects=False,
                    hooks={"response": self._limit_body},
                )
                if response.status_code == 401 and send_token and not refreshed and self.auth is not None:
                    log.info("FHIR %s answered 401; fetching a fresh token and trying once more", what)
                    self.auth.invalidate()
                    refreshed = True
                    attempt -= 1
                    continue
                raise_for_fhir_status(response, what=what)
                return response
            except (requests.ConnectionError, requests.Timeout) as exc:
                error: FhirError = unavailable(exc, what=what)
            except FhirError as exc:
                error = exc
            if not error.retryable or attempt >= attempts:
                if attempt > 1:
                    error.message += f" (after {attempt} attempts)"
                raise error from None
            delay = self._delay(attempt, response)
            log.warning(
                "FHIR %s failed (attempt %d of %d): %s; retrying in %.2f s",
                what,
                attempt,
                attempts,
                type(error).__name__,
                delay,
            )
            time.sleep(delay)

    def _json(self, response: requests.Response, *, what: str) -> dict[str, Any]:
        try:
            body = orjson.loads(response.content)
        except ValueError:  # orjson.JSONDecodeError is a ValueError
            raise FhirError(
                f"FHIR {what} answered HTTP {response.status_code} without a JSON body.",
                remedy="Check that the URL is a FHIR R4 server's base.",
                status=response.status_code,
            ) from None
        if not isinstance(body, dict) or "resourceType" not in body:
            raise FhirError(f"FHIR {what} did not answer with a FHIR resource.", status=response.status_code)
        return body

    # ------------------------------------------------------------------ interactions

    def capability_statement(self) -> dict[str, Any]:
        """The server's CapabilityStatement (``GET [base]/metadata``)."""
        what = "read CapabilityStatement"
        return self._json(self.request("GET", f"{self.base_url}/metadata", what=what), what=what)

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """Read one resource; :class:`~fhir_adapters.errors.FhirNotFound` if it does not exist or was deleted."""
        _check_type_and_id(resource_type, resource_id)
        what = f"read {resource_type}/{resource_id}"
        resource = self._json(
            self.request("GET", f"{self.base_url}/{resource_type}/{resource_id}", what=what), what=what
        )
        if resource.get("resourceType") != resource_type:
            raise FhirError(f"FHIR {what} answered with a {resource.get('resourceType')}.", remedy="Check the server.")
        return resource

    def read_reference(self, reference: str) -> dict[str, Any]:
        """Resolve a literal reference: ``"Type/id"`` on this server, or an absolute URL.

        An absolute URL outside ``base_url`` must pass the allow-list (else ``NotAllowedError`` before any
        request) and is fetched without the bearer token, which belongs to this server only.
        """
        url = self.check_url(self.url_for_reference(reference), what=f"Reference {reference[:80]}")
        segments = urlsplit(url).path.rstrip("/").split("/")
        start = segments.index("_history") - 2 if "_history" in segments else len(segments) - 2
        what = "read " + "/".join(segments[max(0, start) :])
        return self._json(self.request("GET", url, what=what), what=what)

    def search_bundle(self, resource_type: str, params: SearchParams | None = None) -> dict[str, Any]:
        """The first page of a search as the raw Bundle (keeps ``_include``/``_revinclude`` entries)."""
        _check_type_and_id(resource_type)
        what = f"search {resource_type}"
        response = self.request("GET", f"{self.base_url}/{resource_type}", what=what, params=params)
        bundle = self._json(response, what=what)
        if bundle.get("resourceType") != "Bundle":
            raise FhirError(f"FHIR {what} did not answer with a Bundle.", status=response.status_code)
        return bundle

    def search(self, resource_type: str, params: SearchParams | None = None) -> Iterator[dict[str, Any]]:
        """Yield every matching resource, following ``next`` links page by page.

        Only ``search.mode = match`` entries are yielded (``_include``d resources are for
        :meth:`search_bundle` and :meth:`search_pages`). A ``next`` link to another origin is refused unless
        allow-listed, and a search with more than ``limits.fhir_search_pages`` pages is refused when the next page
        would pass the limit.
        """
        for bundle in self.search_pages(resource_type, params):
            for entry in map(element, items(bundle.get("entry"))):
                resource = entry.get("resource")
                if isinstance(resource, dict) and element(entry.get("search")).get("mode", "match") == "match":
                    yield resource

    def search_pages(self, resource_type: str, params: SearchParams | None = None) -> Iterator[dict[str, Any]]:
        """Yield each page of a search as the raw Bundle (with its ``_include``d resources), as :meth:`search`
        follows them: the same origin and page-count checks."""
        bundle = self.search_bundle(resource_type, params)
        seen: set[str] = set()
        while True:
            yield bundle
            links = map(element, items(bundle.get("link")))
            next_url = next((link.get("url") for link in links if link.get("relation") == "next"), None)
            if not isinstance(next_url, str) or not next_url or next_url in seen:
                return
            seen.add(next_url)
            if len(seen) >= self.limits.fhir_search_pages:
                raise too_large(
                    f"The FHIR search for {resource_type} at {self.base_url}",
                    "fhir_search_pages",
                    self.limits.fhir_search_pages,
                    unit="pages",
                    remedy="Narrow the search, or have an administrator raise limits.fhir_search_pages.",
                )
            what = f"search {resource_type} (page {len(seen) + 1})"
            next_url = self.check_url(next_url, what=f"The 'next' link of {what}")
            bundle = self._json(self.request("GET", next_url, what=what), what=what)

    def create(self, resource: Mapping[str, Any], *, if_none_exist: str | None = None) -> dict[str, Any]:
        """Create a resource; with ``if_none_exist`` (a search query) only if no match exists.

        Returns the stored resource (the existing one when the condition matched). Only a conditional
        create is retried on 5xx/timeouts; a plain one is sent once, to never create duplicates.
        """
        return self._create(resource, if_none_exist)[0]

    def conditional_create(self, resource: Mapping[str, Any], if_none_exist: str) -> tuple[dict[str, Any], bool]:
        """Create ``resource`` unless a resource matches the search ``if_none_exist``: ``(stored, created)``.

        ``created`` is False when the server answered with the match it already held (``200``, not ``201``), so
        a caller can tell a first filing from a re-run. Retried like every idempotent request.
        """
        if not if_none_exist:
            raise FhirInvalid("A conditional create needs its search query.", remedy="Pass the If-None-Exist query.")
        return self._create(resource, if_none_exist)

    def _create(self, resource: Mapping[str, Any], if_none_exist: str | None) -> tuple[dict[str, Any], bool]:
        resource_type = str(resource.get("resourceType", ""))
        _check_type_and_id(resource_type)
        what = f"create {resource_type}"
        headers = {"Prefer": "return=representation"}
        if if_none_exist:
            headers["If-None-Exist"] = if_none_exist
        response = self.request(
            "POST",
            f"{self.base_url}/{resource_type}",
            what=what,
            body=resource,
            headers=headers,
            retry=bool(if_none_exist),
        )
        return self._stored(response, what=what), response.status_code == 201

    def update(self, resource: Mapping[str, Any]) -> dict[str, Any]:
        """Create or replace a resource at its own id (``PUT [type]/[id]``); idempotent, so retried."""
        resource_type = str(resource.get("resourceType", ""))
        resource_id = str(resource.get("id", ""))
        _check_type_and_id(resource_type, resource_id)
        what = f"update {resource_type}/{resource_id}"
        response = self.request(
            "PUT",
            f"{self.base_url}/{resource_type}/{resource_id}",
            what=what,
            body=resource,
            headers={"Prefer": "return=representation"},
        )
        return self._stored(response, what=what)

    def _stored(self, response: requests.Response, *, what: str) -> dict[str, Any]:
        """The resource a create/update stored: the body, or a read of ``Location`` under return=minimal."""
        if response.content.strip():
            return self._json(response, what=what)
        location = response.headers.get("Location") or response.headers.get("Content-Location")
        if not location:
            raise FhirError(f"FHIR {what} answered without the resource or its location.", status=response.status_code)
        return self.read_reference(location)

    def transaction(
        self, bundle: Mapping[str, Any], *, retry: bool = True, representation: bool = False
    ) -> dict[str, Any]:
        """Post a transaction Bundle; return the transaction-response after checking every entry.

        Retried on 5xx/timeouts because the project's transactions are idempotent by construction
        (conditional creates and deterministic PUTs; see the module docstring). A response entry whose
        status is not 2xx raises the typed error for that status, naming the entry.

        ``representation=True`` asks the server (``Prefer: return=representation``) to put each resource, as it
        now stands, in its response entry: the one just created, or the one a conditional create found. A
        server may still leave them out; callers must not rely on them being there.
        """
        if bundle.get("resourceType") != "Bundle" or bundle.get("type") != "transaction":
            raise FhirInvalid(
                "Only Bundles of type 'transaction' can be posted as a transaction.",
                remedy="Set Bundle.type to 'transaction'.",
            )
        entries = list(bundle.get("entry", []))
        what = f"transaction of {len(entries)} entries"
        headers = {"Prefer": "return=representation"} if representation else None
        response = self.request("POST", self.base_url, what=what, body=bundle, headers=headers, retry=retry)
        result = self._json(response, what=what)
        if result.get("resourceType") != "Bundle" or result.get("type") != "transaction-response":
            raise FhirError(f"FHIR {what} did not answer with a transaction-response.", status=response.status_code)
        answered = items(result.get("entry"))
        if len(answered) != len(entries):
            raise FhirError(
                f"FHIR {what} answered {len(answered)} entries for {len(entries)}.", status=response.status_code
            )
        for index, (sent, entry) in enumerate(zip(entries, map(element, answered), strict=True)):
            status_line = str(element(entry.get("response")).get("status", ""))
            code = status_line.split(" ", 1)[0]
            if not code.isdigit():
                raise FhirError(f"FHIR {what}: entry {index} has no response status.", status=response.status_code)
            if int(code) >= 300:
                request = sent.get("request") or {}
                target = str(request.get("url", "?")).split("?", 1)[0]  # the query may name a patient identifier
                entry_what = f"{what}, entry {index} ({request.get('method', '?')} {target})"
                outcome = element(entry.get("response")).get("outcome")
                raise fhir_error_for(int(code), what=entry_what, body=outcome if isinstance(outcome, dict) else None)
        return result

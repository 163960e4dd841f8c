"""Allow-lists for outbound URLs: nothing is fetched from a host the deployment did not configure.

A hook's ``fhirServer`` and an Endpoint's ``address`` arrive from outside. Before any request, the URL is
checked here: scheme http(s), no credentials in it, and its origin (scheme, host, port) plus path prefix
must match a configured entry. Link-local and cloud metadata addresses are refused even if listed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from core.errors import ConfigurationError, NotAllowedError

_METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "instance-data"})


def _normalise(url: str) -> tuple[str, str, int, str]:
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise NotAllowedError(f"URL scheme {scheme or '(none)'!r} is not allowed.", remedy="Use an http(s) URL.")
    if parts.username or parts.password:
        raise NotAllowedError("URLs carrying credentials are not allowed.", remedy="Remove user:password@ from it.")
    host = (parts.hostname or "").lower()
    if not host:
        raise NotAllowedError(f"URL {url!r} has no host.", remedy="Give an absolute URL.")
    port = parts.port or (443 if scheme == "https" else 80)
    path = parts.path.rstrip("/")
    return scheme, host, port, path


def _is_forbidden_host(host: str) -> bool:
    if host in _METADATA_HOSTS:
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return address.is_link_local or address.is_multicast or address.is_unspecified or address.is_reserved


@dataclass(frozen=True)
class AllowList:
    """URL prefixes outbound requests may go to (``http://127.0.0.1:8080/fhir`` allows that base and below)."""

    prefixes: tuple[str, ...]

    @classmethod
    def of(cls, prefixes: Iterable[str]) -> AllowList:
        cleaned = tuple(p.strip() for p in prefixes if p and p.strip())
        for prefix in cleaned:
            try:
                _normalise(prefix)
            except NotAllowedError as exc:
                raise ConfigurationError(f"Allow-list entry {prefix!r} is invalid: {exc}") from exc
        return cls(cleaned)

    def allows(self, url: str) -> bool:
        try:
            self.check(url)
        except NotAllowedError:
            return False
        return True

    def check(self, url: str, *, what: str = "URL") -> str:
        """Return ``url`` if it may be fetched; raise :class:`NotAllowedError` naming ``what`` otherwise."""
        scheme, host, port, path = _normalise(url)
        if _is_forbidden_host(host):
            raise NotAllowedError(f"{what} points at a link-local or metadata address; refused.")
        for prefix in self.prefixes:
            p_scheme, p_host, p_port, p_path = _normalise(prefix)
            if (scheme, host, port) == (p_scheme, p_host, p_port) and (
                path == p_path or path.startswith(p_path + "/") or not p_path
            ):
                return url
        raise NotAllowedError(
            f"{what} {scheme}://{host}:{port}{path} is not on this service's allow-list.",
            remedy="An administrator can add it to the configured allow-list if it is a trusted server.",
        )

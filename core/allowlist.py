"""Allow-lists for outbound URLs: nothing is fetched from a host the deployment did not configure.

A hook's ``fhirServer``, an Endpoint's ``address``, a CDS client's ``jku`` and a FHIR ``next`` link arrive from
outside. Before any request, the URL is checked here: scheme http(s), no credentials in it, and its origin
(scheme, host, port) plus path prefix must match a configured entry. Link-local, metadata and unspecified
addresses are refused even if listed (:func:`forbidden_address`; :mod:`core.outbound` applies the same rule to
the addresses a host *name* resolves to, when connecting).

A prefix comparison on the raw string is not enough: ``http://pacs/dicom-web/../tools/execute-script`` starts
with ``http://pacs/dicom-web`` but requests (urllib3) sends it as ``/tools/execute-script``, and a server
decodes ``%2e%2e`` to ``..`` as well. So every URL is first brought to one canonical form
(:func:`canonical_url`), the form a server would resolve it to, and that form is both compared and sent
(:meth:`AllowList.check` returns it, and callers request what it returns):

* scheme and host in lower case; a host with a trailing dot without it; an internationalised host in its IDNA
  (punycode) form, as requests encodes it; IPv4 in dotted-quad form (``2130706433``, ``0x7f.1`` and ``127.1``
  are ``127.0.0.1`` to the resolver) and IPv6 compressed, with IPv4-mapped forms read as the IPv4 address;
* the port explicit for the comparison (80 and 443 by default) and left out of the sent URL when it is the
  default;
* in the path: percent-encoded unreserved characters decoded (``%2e`` is ``.``, RFC 3986 section 6.2.2.2),
  other escapes in upper case, duplicate slashes merged, then dot segments removed (RFC 3986 section 5.2.4).
  What servers disagree about is refused rather than guessed: an encoded ``/``, ``\\`` or control character,
  an encoded ``%`` (double encoding), a dot segment carrying ``;`` parameters (``..;`` climbs a level in Java
  servers), a backslash, whitespace or a control character anywhere, and credentials (``user@host``).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from urllib.parse import quote, urlsplit

from core.errors import ConfigurationError, NotAllowedError

MAX_URL_CHARS = 8192
"""Longer URLs are refused: no server this project talks to needs one, and most servers refuse them anyway."""

METADATA_HOSTS = frozenset(
    {"metadata.google.internal", "metadata", "instance-data", "instance-data.ec2.internal", "metadata.goog"}
)
"""Cloud instance-metadata host names: a request there can hand out the machine's cloud credentials."""

METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, Azure, GCP, OpenStack, DigitalOcean (also link-local)
        "169.254.170.2",  # AWS ECS task metadata (also link-local)
        "fd00:ec2::254",  # AWS IPv6 instance metadata (unique-local, so not caught as link-local)
        "100.100.100.200",  # Alibaba Cloud (carrier-grade NAT range)
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

_DEFAULT_PORTS = {"http": 80, "https": 443}
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PERCENT = re.compile(r"%(..)?", re.DOTALL)
_HEX = frozenset("0123456789ABCDEFabcdef")
_REFUSED_ESCAPES = {0x2F: "an encoded '/'", 0x5C: "an encoded '\\'", 0x25: "an encoded '%' (double encoding)"}
_PATH_SAFE = "!$%&'()*+,/:;=@[]~"  # what requests' requote_uri leaves alone in a path (with letters, digits, -._)
_DOMAIN = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*$")
_NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}$")


def forbidden_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether no request may go to ``address``: link-local, cloud metadata, unspecified (``0.0.0.0`` reaches
    this machine), multicast or reserved; an IPv6 address embedding such an IPv4 address counts as it."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None and forbidden_address(embedded):
            return True
        if address.ipv4_mapped is not None:
            return False  # judged as its IPv4 address above
    return (
        address in METADATA_ADDRESSES
        or address.is_link_local
        or address.is_multicast
        or address.is_unspecified
        or (address.is_reserved and not address.is_loopback)
    )


@dataclass(frozen=True)
class OutboundUrl:
    """A URL in the canonical form it is compared and sent in (see the module docstring).

    ``host`` is lower-case ASCII without brackets or trailing dot; ``path`` starts with ``/``, has no dot
    segments and no empty segments, and ends with ``/`` only if the original did.
    """

    scheme: str
    host: str
    port: int
    path: str
    query: str = ""

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(s for s in self.path.split("/") if s)

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if _DEFAULT_PORTS[self.scheme] == self.port else f"{host}:{self.port}"

    def geturl(self) -> str:
        """The URL to send: requests and urllib3 send it unchanged (no dot segment left for them to remove)."""
        return f"{self.scheme}://{self.netloc}{self.path}" + (f"?{self.query}" if self.query else "")

    def under(self, base: OutboundUrl) -> bool:
        """Same origin as ``base`` and its path at or below ``base``'s path, segment by segment."""
        if (self.scheme, self.host, self.port) != (base.scheme, base.host, base.port):
            return False
        prefix = base.segments
        return self.segments[: len(prefix)] == prefix


def _refuse(url: str, why: str, remedy: str = "Use a plain absolute http(s) URL.") -> NotAllowedError:
    shown = url if len(url) <= 200 else url[:200] + "..."
    return NotAllowedError(f"URL {shown!r} is refused: {why}.", remedy=remedy)


def _canonical_host(url: str, netloc: str, hostname: str) -> str:
    if netloc.startswith("["):  # an IPv6 literal (urlsplit has checked the brackets)
        try:
            address = ipaddress.IPv6Address(hostname)
        except ValueError:
            raise _refuse(url, "its IPv6 address cannot be read") from None
        mapped = address.ipv4_mapped
        return str(mapped) if mapped is not None else address.compressed
    host = hostname.removesuffix(".")  # "pacs.example." is the fully qualified "pacs.example"
    if not host.isascii():
        import idna  # requests' own dependency, and the encoding it applies to such hosts

        try:
            host = idna.encode(host, uts46=True).decode("ascii")
        except idna.IDNAError:
            raise _refuse(url, "its host name is not a valid internationalised domain name") from None
    if _NUMERIC_HOST.match(host):
        # The C resolver reads "2130706433", "0x7f.1" and "127.1" as 127.0.0.1: compare what it will connect to.
        try:
            return socket.inet_ntoa(socket.inet_aton(host))
        except OSError:
            raise _refuse(url, "its host looks like an IPv4 address but is not one") from None
    if not _DOMAIN.match(host) or len(host) > 253:
        raise _refuse(url, "its host is not a valid host name")
    return host


def _unescape_unreserved(url: str, path: str) -> str:
    """Decode escapes of unreserved characters (``%2e`` -> ``.``), upper-case the others, refuse the ambiguous."""

    def one(match: re.Match[str]) -> str:
        digits = match.group(1)
        if digits is None or not set(digits) <= _HEX:
            raise _refuse(url, "its path has a malformed percent escape")
        code = int(digits, 16)
        if code in _REFUSED_ESCAPES or code < 0x20 or code == 0x7F:
            what = _REFUSED_ESCAPES.get(code, "an encoded control character")
            raise _refuse(url, f"its path holds {what}, which servers read differently")
        char = chr(code)
        return char if char in _UNRESERVED else f"%{digits.upper()}"

    return _PERCENT.sub(one, path)


def _remove_dot_segments(url: str, path: str) -> str:
    output: list[str] = []
    segments = path.split("/")[1:]
    trailing = False
    for segment in segments:
        trailing = segment in ("", ".", "..")
        if segment in ("", "."):
            continue
        if segment == "..":
            if output:
                output.pop()
            continue
        if segment.split(";", 1)[0] in (".", ".."):
            raise _refuse(url, "its path has a dot segment with ';' parameters, which some servers resolve")
        output.append(segment)
    if not output:
        return "/"
    return "/" + "/".join(output) + ("/" if trailing else "")


def canonical_url(url: str) -> OutboundUrl:
    """The canonical form of ``url`` (see the module docstring), or :class:`NotAllowedError` saying why not.

    Pure and cached: the same URL (a hook's ``fhirServer``, a FHIR base) is parsed once per process.
    """
    if not isinstance(url, str):
        raise NotAllowedError(f"A URL must be a string, not {type(url).__name__}.", remedy="Send an absolute URL.")
    return _canonical(url.strip())


@lru_cache(maxsize=4096)
def _canonical(url: str) -> OutboundUrl:
    if len(url) > MAX_URL_CHARS:
        raise _refuse(url, f"it is longer than {MAX_URL_CHARS} characters")
    if any(c <= " " or c in "\x7f\\" for c in url):
        raise _refuse(url, "it contains whitespace, a control character or a backslash")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise _refuse(url, "it cannot be parsed (bad port or brackets)") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise NotAllowedError(f"URL scheme {scheme or '(none)'!r} is not allowed.", remedy="Use an http(s) URL.")
    if "@" in parts.netloc:
        raise NotAllowedError("URLs carrying credentials are not allowed.", remedy="Remove user:password@ from it.")
    if not parts.hostname:
        raise NotAllowedError(f"URL {url[:200]!r} has no host.", remedy="Give an absolute URL.")
    if port == 0:
        raise _refuse(url, "port 0 cannot be connected to")
    host = _canonical_host(url, parts.netloc, parts.hostname)
    path = parts.path or "/"
    if not path.isascii():
        path = quote(path, safe=_PATH_SAFE)  # as requests would send it: UTF-8, percent-encoded
    path = _remove_dot_segments(url, quote(_unescape_unreserved(url, path), safe=_PATH_SAFE))
    return OutboundUrl(scheme, host, port or _DEFAULT_PORTS[scheme], path, parts.query)


def _host_is_forbidden(host: str) -> bool:
    if host in METADATA_HOSTS:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return forbidden_address(address)


@dataclass(frozen=True)
class AllowList:
    """URL prefixes outbound requests may go to (``http://127.0.0.1:8080/fhir`` allows that base and below).

    Entries are canonicalised once, when the allow-list is built, and each URL to check is canonicalised the
    same way; an entry is matched segment by segment, so ``/fhir`` does not admit ``/fhir-admin``.
    """

    prefixes: tuple[str, ...]
    _entries: tuple[OutboundUrl, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def of(cls, prefixes: Iterable[str]) -> AllowList:
        cleaned = tuple(p.strip() for p in prefixes if p and p.strip())
        entries: list[OutboundUrl] = []
        for prefix in cleaned:
            try:
                entry = canonical_url(prefix)
            except NotAllowedError as exc:
                raise ConfigurationError(f"Allow-list entry {prefix!r} is invalid: {exc}") from exc
            if entry.query or "#" in prefix:
                raise ConfigurationError(
                    f"Allow-list entry {prefix!r} has a query or fragment.", remedy="Give a base URL only."
                )
            if _host_is_forbidden(entry.host):
                raise ConfigurationError(
                    f"Allow-list entry {prefix!r} names a link-local, metadata or unspecified address.",
                    remedy="No request may go there; remove the entry.",
                )
            entries.append(entry)
        return cls(cleaned, tuple(entries))

    def allows(self, url: str) -> bool:
        try:
            self.check(url)
        except NotAllowedError:
            return False
        return True

    def check(self, url: str, *, what: str = "URL") -> str:
        """The canonical form of ``url`` to send, if it may be fetched; :class:`NotAllowedError` naming ``what``
        otherwise. Callers must request the returned URL, not the one they passed in."""
        try:
            target = canonical_url(url)
        except NotAllowedError as exc:
            raise NotAllowedError(f"{what}: {exc.message}", remedy=exc.remedy) from None
        if _host_is_forbidden(target.host):
            raise NotAllowedError(f"{what} points at a link-local or metadata address; refused.")
        for entry in self._entries:
            if target.under(entry):
                return target.geturl()
        raise NotAllowedError(
            f"{what} {target.scheme}://{target.host}:{target.port}{target.path} is not on this service's allow-list.",
            remedy="An administrator can add it to the configured allow-list if it is a trusted server.",
        )

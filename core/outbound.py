"""The HTTP session every outbound request of this project goes through: :func:`outbound_session`.

Three guards no caller should have to remember:

* **Redirects** are followed only to a URL the session's allow-list admits (checked in canonical form, see
  :mod:`core.allowlist`), and with no allow-list never: a server cannot send a request, or what requests carries
  along with it, to a host the deployment did not configure. Refused with :class:`~core.errors.NotAllowedError`
  before the redirected request is made. (A caller that passes ``allow_redirects=False`` still gets the 3xx.)
* **Addresses**: when a connection is opened, the host name is resolved once and every address checked with
  :func:`core.allowlist.forbidden_address`; the socket then connects to a checked address, never to a second
  resolution, so a DNS answer that changes between the check and the connection (DNS rebinding) is caught too.
  A configured name that resolves to a link-local or metadata address is refused, not just a literal address.
* **Sizes**: :func:`limit_body` gives a response hook that counts a body while it streams in (after
  decompression, so a gzip bomb is stopped) and refuses it at a limit, before it is held in memory; a
  ``Content-Length`` above the limit is refused before reading anything.

With an HTTP proxy configured in the environment, the address guard sees the proxy's address, not the target's.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from collections.abc import Callable, Generator, Iterator
from typing import Any
from urllib.parse import urljoin

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util import connection as urllib3_connection

from core.allowlist import AllowList, forbidden_address
from core.errors import NotAllowedError
from core.limits import too_large

MAX_REDIRECTS = 5


def _checked_addresses(host: str, port: int) -> list[tuple[Any, ...]]:
    """``getaddrinfo`` for ``host``, refused when any answer is an address no request may go to."""
    infos = socket.getaddrinfo(host.strip("[]"), port, urllib3_connection.allowed_gai_family(), socket.SOCK_STREAM)
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if forbidden_address(address):
            raise NotAllowedError(
                f"The host {host[:100]} resolves to {address}, a link-local, metadata or unspecified address; "
                "no request is sent there.",
                remedy="Check the host name in the configuration and the DNS records it resolves to.",
            )
    return infos


class _GuardedConnectionMixin:
    """Replaces urllib3's ``_new_conn``: resolve once, check every address, connect to a checked one."""

    _dns_host: str
    host: str
    port: int
    timeout: Any
    source_address: tuple[str, int] | None
    socket_options: Any

    def _new_conn(self) -> socket.socket:
        try:
            infos = _checked_addresses(self._dns_host, self.port)
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc  # type: ignore[arg-type]
        error: OSError | None = None
        for *_, sockaddr in infos:
            try:
                sock = urllib3_connection.create_connection(
                    (str(sockaddr[0]), int(sockaddr[1])),  # a literal address: no second resolution
                    self.timeout,
                    source_address=self.source_address,
                    socket_options=self.socket_options,
                )
            except TimeoutError as exc:
                raise ConnectTimeoutError(
                    self, f"Connection to {self.host} timed out. (connect timeout={self.timeout})"
                ) from exc
            except OSError as exc:
                error = exc
                continue
            sys.audit("http.client.connect", self, self.host, self.port)
            return sock
        raise NewConnectionError(
            self,  # type: ignore[arg-type]
            f"Failed to establish a new connection: {error or 'no address'}",
        )


class _GuardedHTTPConnection(_GuardedConnectionMixin, HTTPConnection):
    pass


class _GuardedHTTPSConnection(_GuardedConnectionMixin, HTTPSConnection):
    pass


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class _GuardedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _GuardedHTTPPool, "https": _GuardedHTTPSPool}


class OutboundSession(requests.Session):
    """A :class:`requests.Session` with the guards of the module docstring; build it with :func:`outbound_session`.

    ``redirect_allow_list`` is where redirects may lead; ``None`` follows none.
    """

    def __init__(self, redirect_allow_list: AllowList | None = None) -> None:
        super().__init__()
        self.redirect_allow_list = redirect_allow_list
        self.max_redirects = MAX_REDIRECTS
        adapter = _GuardedAdapter()
        self.mount("http://", adapter)
        self.mount("https://", adapter)

    def _check_redirect(self, response: requests.Response) -> None:
        location = self.get_redirect_target(response)
        if location is None:
            return
        target = urljoin(response.url, location)
        try:
            if self.redirect_allow_list is None:
                raise NotAllowedError(
                    f"The server redirected the request to {target[:200]}; this request follows no redirects.",
                    remedy="Configure the URL the server redirects to in place of the one it redirects from.",
                )
            self.redirect_allow_list.check(target, what="A redirect target")
        except NotAllowedError:
            response.close()
            raise

    def resolve_redirects(
        self, resp: requests.Response, req: requests.PreparedRequest, *args: Any, **kwargs: Any
    ) -> Generator[Any, None, None]:
        """Check each redirect target before requests follows it (the hop is sent by the inner generator)."""
        inner = super().resolve_redirects(resp, req, *args, **kwargs)
        if kwargs.get("yield_requests"):  # the caller does not follow redirects; requests only notes the next one
            yield from inner
            return
        last = resp
        while True:
            self._check_redirect(last)
            try:
                last = next(inner)
            except StopIteration:
                return
            yield last


def outbound_session(redirect_allow_list: AllowList | None = None) -> OutboundSession:
    """A session for outbound requests; redirects only within ``redirect_allow_list`` (none without one)."""
    return OutboundSession(redirect_allow_list)


class _CountingBody:
    """Wraps urllib3's response so every byte handed to requests is counted against a limit."""

    def __init__(self, raw: Any, limit: int, refuse: Callable[[], Exception]) -> None:
        self._raw = raw
        self._limit = limit
        self._refuse = refuse
        self._seen = 0

    def _count(self, data: bytes) -> bytes:
        self._seen += len(data)
        if self._seen > self._limit:
            self._raw.close()
            raise self._refuse()
        return data

    def stream(self, amt: int | None = 2**16, decode_content: bool | None = None) -> Iterator[bytes]:
        for chunk in self._raw.stream(amt, decode_content=decode_content):
            yield self._count(chunk)

    def read(self, amt: int | None = None, *args: Any, **kwargs: Any) -> bytes:
        return self._count(self._raw.read(amt, *args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_raw":
            raise AttributeError(name)
        return getattr(self._raw, name)


def limit_body(limit: int, *, what: str, limit_name: str) -> Callable[..., requests.Response]:
    """A response hook that refuses a body over ``limit`` bytes (``limits.<limit_name>``) while it is read.

    Pass it per request (``hooks={"response": limit_body(...)}``) or on a session; the refusal is a
    :class:`~core.errors.LimitExceededError` raised from the request (``Content-Length`` too large) or from
    reading the body, whichever comes first.
    """

    def refuse(declared: str = "") -> Exception:
        return too_large(f"{what}{declared}", limit_name, limit)

    def hook(response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            response.close()
            raise refuse(f" (Content-Length {int(declared):,} bytes)")
        if not isinstance(response.raw, _CountingBody):
            response.raw = _CountingBody(response.raw, limit, refuse)
        return response

    return hook

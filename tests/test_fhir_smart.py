"""The one SMART discovery and token-endpoint client (``fhir_adapters.smart``), against the REAL sekmet-fhir.

sekmet publishes a SMART configuration that offers ``client_credentials`` only, and its token endpoint supports
``client_secret_basic``, ``client_secret_post`` and ``private_key_jwt``. What a misbehaving server would do (a
redirect, a 200 without a token) is played by the fault-injecting proxy of ``fhir_client_support`` in front of
it; everything else is the real server's answer.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
from fhir_client_support import Action, fault_proxy

from core.errors import ConfigurationError
from devtools.servers import FhirServer, SmartClient, fhir_server, free_port
from fhir_adapters.auth import discover_token_endpoint
from fhir_adapters.errors import FhirError, FhirForbidden, FhirInvalid, FhirUnauthorized, FhirUnavailable
from fhir_adapters.smart import ClientCredentials, UnusableTokenResponse, discover, request_token

SECRET = "s3cret-for-tests-only"
CLIENT_CREDENTIALS = {"grant_type": "client_credentials", "scope": "system/*.rs"}


@pytest.fixture(scope="module")
def smart_server() -> Iterator[FhirServer]:
    with fhir_server(smart_clients=(SmartClient("reader", SECRET, "system/*.rs"),)) as server:
        yield server


def _token_url(server: FhirServer) -> str:
    assert server.token_url is not None
    return server.token_url


# ---------------------------------------------------------------------------------------------- discovery


def test_a_backend_services_only_server_is_discovered_as_it_is(smart_server: FhirServer) -> None:
    server = discover(smart_server.base_url, requests.Session())
    assert server is not None
    assert server.source == "smart-configuration"
    assert server.token_endpoint == smart_server.token_url
    assert server.grant_types == ("client_credentials",)  # no user launch: still fine for a backend client
    assert {"private_key_jwt", "client_secret_basic"} <= set(server.token_auth_methods)
    assert discover_token_endpoint(smart_server.base_url) == smart_server.token_url


def test_a_redirected_smart_configuration_is_not_followed(smart_server: FhirServer) -> None:
    real_document = f"{smart_server.base_url}/.well-known/smart-configuration"

    def redirect_well_known(index: int, method: str, path: str) -> Action | None:
        return Action(status=302, headers={"Location": real_document}) if ".well-known" in path else None

    with fault_proxy(smart_server.base_url, redirect_well_known) as proxy:
        server = discover(proxy.base_url, requests.Session())
        # The redirect counts as "no document here": the CapabilityStatement is read instead, through the proxy.
        assert server is not None and server.source == "capability-statement"
        assert server.token_endpoint == smart_server.token_url
        assert [path for _, path in proxy.requests_seen] == ["/fhir/.well-known/smart-configuration", "/fhir/metadata"]


def test_a_server_that_advertises_no_smart_is_named(fhir_base: FhirServer) -> None:
    # The open test server publishes no oauth-uris; with its .well-known document hidden it advertises nothing.
    def no_well_known(index: int, method: str, path: str) -> Action | None:
        return Action(status=404) if ".well-known" in path else None

    with fault_proxy(fhir_base.base_url, no_well_known) as proxy:
        assert discover(proxy.base_url, requests.Session()) is None
        with pytest.raises(ConfigurationError, match="advertises no SMART token endpoint"):
            discover_token_endpoint(proxy.base_url)


def test_a_capability_statement_error_is_the_typed_error(smart_server: FhirServer) -> None:
    def fail(index: int, method: str, path: str) -> Action | None:
        return Action(status=404) if ".well-known" in path else Action(status=503)

    with fault_proxy(smart_server.base_url, fail) as proxy, pytest.raises(FhirError, match="HTTP 503") as info:
        discover(proxy.base_url, requests.Session())
    assert info.value.retryable


# ---------------------------------------------------------------------------------------------- token request


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
def test_a_client_credentials_token_with_either_secret_method(smart_server: FhirServer, method: str) -> None:
    credentials = ClientCredentials("reader", method, secret=SECRET)  # type: ignore[arg-type]
    token = request_token(
        _token_url(smart_server), CLIENT_CREDENTIALS, credentials, requests.Session(), what="token request"
    )
    assert token.scope == "system/*.rs"
    assert 0 < token.lifetime_s <= 3600
    assert token.access_token not in repr(token) and SECRET not in repr(credentials)
    answer = requests.get(
        f"{smart_server.base_url}/Patient", headers={"Authorization": f"Bearer {token.access_token}"}, timeout=10
    )
    assert answer.status_code == 200  # the server honours the token it issued


def test_refusals_are_typed_and_keep_the_oauth_error_code(smart_server: FhirServer) -> None:
    http, url = requests.Session(), _token_url(smart_server)
    reader = ClientCredentials("reader", "client_secret_basic", secret=SECRET)
    with pytest.raises(FhirUnauthorized, match="invalid_client") as wrong_secret:
        request_token(
            url, CLIENT_CREDENTIALS, ClientCredentials("reader", "client_secret_basic", secret="x"), http, what="t"
        )
    assert (wrong_secret.value.status, wrong_secret.value.oauth_error) == (401, "invalid_client")
    with pytest.raises(FhirForbidden, match="invalid_scope") as scope:
        request_token(
            url, {"grant_type": "client_credentials", "scope": "system/Patient.cruds"}, reader, http, what="t"
        )
    assert scope.value.oauth_error == "invalid_scope"
    with pytest.raises(FhirInvalid, match="unsupported_grant_type") as grant:
        request_token(url, {"grant_type": "authorization_code", "code": "c"}, reader, http, what="t")
    assert grant.value.oauth_error == "unsupported_grant_type"


def test_a_redirected_token_request_is_not_followed(smart_server: FhirServer) -> None:
    # A 307 would make a following client re-send the credentials to wherever Location points.
    def redirect(index: int, method: str, path: str) -> Action | None:
        return Action(status=307, headers={"Location": _token_url(smart_server)})

    reader = ClientCredentials("reader", "client_secret_post", secret=SECRET)
    with fault_proxy(smart_server.base_url, redirect) as proxy:
        token_url = proxy.base_url.removesuffix("/fhir") + "/auth/token"
        with pytest.raises(FhirError, match="HTTP 307") as info:
            request_token(token_url, CLIENT_CREDENTIALS, reader, requests.Session(), what="token request")
        assert "Redirects are not followed" in info.value.remedy
        assert proxy.count == 1


def test_a_200_without_an_access_token_is_unusable(smart_server: FhirServer) -> None:
    def no_token(index: int, method: str, path: str) -> Action | None:
        return Action(status=200, body={"token_type": "bearer", "expires_in": 300})

    reader = ClientCredentials("reader", "client_secret_basic", secret=SECRET)
    with fault_proxy(smart_server.base_url, no_token) as proxy:
        token_url = proxy.base_url.removesuffix("/fhir") + "/auth/token"
        with pytest.raises(UnusableTokenResponse, match="answered without an access token") as info:
            request_token(token_url, CLIENT_CREDENTIALS, reader, requests.Session(), what="token request")
    assert info.value.problem == "without an access token"


def test_an_unreachable_token_endpoint_is_unavailable_and_retryable() -> None:
    reader = ClientCredentials("reader", "client_secret_basic", secret=SECRET)
    closed = f"http://127.0.0.1:{free_port()}/auth/token"
    with pytest.raises(FhirUnavailable, match="could not connect") as info:
        request_token(closed, CLIENT_CREDENTIALS, reader, requests.Session(), what="token request", timeout=5)
    assert info.value.retryable and SECRET not in str(info.value)

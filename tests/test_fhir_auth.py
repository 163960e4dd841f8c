"""SMART Backend Services against the REAL sekmet-fhir server with server_auth enabled.

sekmet's token endpoint supports both client authentication methods the project offers:
``client_secret_basic`` and ``private_key_jwt`` (a client registered with an inline JWKS; it verifies the
signature, ``iss == sub``, ``aud == token URL``, ``exp`` at most five minutes ahead and a unique ``jti``).
``devtools.servers.fhir_server`` cannot register a JWKS yet, so these tests start sekmet with
``devtools.servers.fhir_server``. sekmet tries every key of a client with the assertion's algorithm and
fails with HTTP 500 when an RSA key meets an ES384 assertion, so the RSA and EC keys are registered on
separate clients here.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from fhir_client_support import Action, fault_proxy
from joserfc import jwk, jwt

from core.allowlist import AllowList
from core.errors import ConfigurationError
from devtools.servers import FhirServer, SmartClient, fhir_server
from fhir_adapters.auth import BackendServicesAuth, ClientSecretAuth, TokenProvider, discover_token_endpoint
from fhir_adapters.client import FhirClient
from fhir_adapters.errors import FhirForbidden, FhirUnauthorized

SECRET = "s3cret-for-tests-only"
RSA_KEY = jwk.RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})
EC_KEY = jwk.ECKey.generate_key("P-384", parameters={"kid": "ec-1"})
UNREGISTERED_KEY = jwk.RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})


SMART_CLIENTS = (
    SmartClient("secret-client", SECRET, "system/*.*"),
    SmartClient("reader", SECRET, "system/*.rs"),
    SmartClient("rsa-client", scopes="system/*.*", jwks={"keys": [RSA_KEY.as_dict(private=False)]}),
    SmartClient("ec-client", scopes="system/*.*", jwks={"keys": [EC_KEY.as_dict(private=False)]}),
)


@pytest.fixture(scope="module")
def smart_server() -> Iterator[FhirServer]:
    with fhir_server(smart_clients=SMART_CLIENTS) as server:
        yield server


def _rsa_auth(server: FhirServer, key: jwk.RSAKey = RSA_KEY) -> BackendServicesAuth:
    pem = key.as_pem(private=True)
    return BackendServicesAuth(server.token_url, "rsa-client", pem, algorithm="RS384", kid="rsa-1", scope="system/*.*")


def _new_patient() -> dict[str, object]:
    return {"resourceType": "Patient", "identifier": [{"system": "urn:test:mrn", "value": uuid.uuid4().hex}]}


def test_the_token_endpoint_is_discovered_from_smart_configuration(smart_server: FhirServer) -> None:
    assert discover_token_endpoint(smart_server.base_url) == smart_server.token_url


def test_discovery_falls_back_to_the_capability_statement(smart_server: FhirServer) -> None:
    def no_well_known(index: int, method: str, path: str) -> Action | None:
        return Action(status=404) if ".well-known" in path else None

    with fault_proxy(smart_server.base_url, no_well_known) as proxy:
        assert discover_token_endpoint(proxy.base_url) == smart_server.token_url
        assert [path.split("?")[0] for _, path in proxy.requests_seen] == [
            "/fhir/.well-known/smart-configuration",
            "/fhir/metadata",
        ]


def test_backend_services_rs384_with_a_pem_key_can_write_and_read(smart_server: FhirServer) -> None:
    client = FhirClient(smart_server.base_url, auth=_rsa_auth(smart_server))
    created = client.create(_new_patient())
    assert client.read("Patient", created["id"])["identifier"] == created["identifier"]


def test_backend_services_es384_with_a_jwk_key_can_write_and_read(smart_server: FhirServer) -> None:
    auth = BackendServicesAuth(
        smart_server.token_url,
        "ec-client",
        EC_KEY.as_dict(private=True),
        algorithm="ES384",
        kid="ec-1",
        scope="system/*.*",
    )
    client = FhirClient(smart_server.base_url, auth=auth)
    created = client.create(_new_patient())
    assert client.read("Patient", created["id"])["id"] == created["id"]
    assert auth.granted_scope == "system/*.*"


def test_the_client_assertion_has_the_claims_smart_requires(smart_server: FhirServer) -> None:
    auth = _rsa_auth(smart_server)
    before = int(time.time())
    first, second = auth.client_assertion(), auth.client_assertion()
    token = jwt.decode(first, RSA_KEY, algorithms=["RS384"])  # verifies the signature with the public key
    assert token.header == {"alg": "RS384", "kid": "rsa-1", "typ": "JWT"}
    claims = token.claims
    assert claims["iss"] == claims["sub"] == "rsa-client"
    assert claims["aud"] == smart_server.token_url
    assert 0 < claims["exp"] - before <= 300  # SMART: no more than five minutes ahead
    assert claims["jti"] != jwt.decode(second, RSA_KEY, algorithms=["RS384"]).claims["jti"]
    with pytest.raises(Exception, match="signature"):
        jwt.decode(first, UNREGISTERED_KEY, algorithms=["RS384"])


def test_a_key_the_server_does_not_know_is_unauthorized(smart_server: FhirServer) -> None:
    client = FhirClient(smart_server.base_url, auth=_rsa_auth(smart_server, UNREGISTERED_KEY))
    with pytest.raises(FhirUnauthorized, match=r"token request for client rsa-client failed .*invalid_client"):
        client.read("Patient", "any")


def test_an_rs384_client_refuses_an_ec_key_at_configuration_time(smart_server: FhirServer) -> None:
    with pytest.raises(ConfigurationError, match="RS384 key"):
        BackendServicesAuth(
            smart_server.token_url, "rsa-client", EC_KEY.as_pem(private=True), kid="ec-1", scope="system/*.*"
        )


def test_client_secret_auth_writes_and_reads_with_one_cached_token(smart_server: FhirServer) -> None:
    auth = ClientSecretAuth(smart_server.token_url, "secret-client", SECRET, "system/*.*")
    client = FhirClient(smart_server.base_url, auth=auth)
    created = client.create(_new_patient())
    header = auth.authorization_header()
    assert client.read("Patient", created["id"])["id"] == created["id"]
    assert auth.authorization_header() == header  # still the same token: cached, not re-fetched
    assert SECRET not in repr(auth)
    assert header.removeprefix("Bearer ") not in repr(auth)


def test_no_token_is_fhir_unauthorized(smart_server: FhirServer) -> None:
    with pytest.raises(FhirUnauthorized, match="read Patient/abc failed with HTTP 401"):
        FhirClient(smart_server.base_url).read("Patient", "abc")


def test_a_wrong_secret_is_unauthorized_and_never_shown(smart_server: FhirServer) -> None:
    wrong = "not-the-secret-xyz"
    with pytest.raises(FhirUnauthorized, match="invalid_client") as info:
        ClientSecretAuth(smart_server.token_url, "secret-client", wrong, "system/*.*").authorization_header()
    assert wrong not in str(info.value)
    assert info.value.status == 401


def test_a_token_without_the_write_scope_is_fhir_forbidden_for_writes(smart_server: FhirServer) -> None:
    writer = FhirClient(
        smart_server.base_url, auth=ClientSecretAuth(smart_server.token_url, "secret-client", SECRET, "system/*.*")
    )
    existing = writer.create(_new_patient())
    reader = FhirClient(
        smart_server.base_url, auth=ClientSecretAuth(smart_server.token_url, "reader", SECRET, "system/*.rs")
    )
    assert reader.read("Patient", existing["id"])["id"] == existing["id"]
    with pytest.raises(FhirForbidden, match="create Patient failed with HTTP 403"):
        reader.create(_new_patient())


def test_asking_for_a_scope_the_client_was_not_granted_is_forbidden(smart_server: FhirServer) -> None:
    auth = ClientSecretAuth(smart_server.token_url, "reader", SECRET, "system/Observation.cruds")
    with pytest.raises(FhirForbidden, match="invalid_scope"):
        auth.authorization_header()


class _StaleFirst:
    """A real provider whose first token is stale (as after a server-side revocation or key rotation)."""

    def __init__(self, real: TokenProvider, *, always_stale: bool = False) -> None:
        self.real = real
        self.stale = True
        self.always_stale = always_stale
        self.invalidations = 0

    def authorization_header(self) -> str:
        return "Bearer stale.token.value" if self.stale else self.real.authorization_header()

    def invalidate(self) -> None:
        self.invalidations += 1
        self.stale = self.always_stale
        self.real.invalidate()


def test_a_401_refreshes_the_token_once_and_retries(smart_server: FhirServer) -> None:
    provider = _StaleFirst(ClientSecretAuth(smart_server.token_url, "secret-client", SECRET, "system/*.*"))
    with fault_proxy(smart_server.base_url, lambda i, m, p: None) as proxy:
        client = FhirClient(proxy.base_url, auth=provider, retries=3)
        assert client.capability_statement()["resourceType"] == "CapabilityStatement"
        created = client.create(_new_patient())  # a plain create: a 401 retry is still safe, nothing was written
        assert client.read("Patient", created["id"])["id"] == created["id"]
        assert provider.invalidations == 1
        assert proxy.count == 4  # metadata (open), create refused with the stale token, create again, read


def test_a_token_that_stays_invalid_ends_in_fhir_unauthorized_after_one_refresh(smart_server: FhirServer) -> None:
    provider = _StaleFirst(
        ClientSecretAuth(smart_server.token_url, "secret-client", SECRET, "system/*.*"), always_stale=True
    )
    with fault_proxy(smart_server.base_url, lambda i, m, p: None) as proxy:
        client = FhirClient(proxy.base_url, auth=provider, retries=5)
        with pytest.raises(FhirUnauthorized, match="HTTP 401") as info:
            client.read("Patient", "x")
        assert "stale.token.value" not in str(info.value)
        assert provider.invalidations == 1
        assert proxy.count == 2


def test_the_token_is_sent_only_to_the_clients_own_server(smart_server: FhirServer, fhir_base: FhirServer) -> None:
    other = FhirClient(fhir_base.base_url).create(_new_patient())
    with fault_proxy(fhir_base.base_url, lambda i, m, p: None) as elsewhere:
        client = FhirClient(
            smart_server.base_url,
            auth=ClientSecretAuth(smart_server.token_url, "secret-client", SECRET, "system/*.*"),
            allow_list=AllowList.of([smart_server.base_url, elsewhere.base_url]),
        )
        client.create(_new_patient())  # proves the client does carry a token to its own server
        assert client.read_reference(f"{elsewhere.base_url}/Patient/{other['id']}")["id"] == other["id"]
        assert elsewhere.count == 1
        assert "Authorization" not in elsewhere.headers_seen[0]


def test_concurrent_requests_share_one_token(smart_server: FhirServer) -> None:
    auth = ClientSecretAuth(smart_server.token_url, "secret-client", SECRET, "system/*.*")
    headers: list[str] = []
    threads = [threading.Thread(target=lambda: headers.append(auth.authorization_header())) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(headers) == 8
    assert len(set(headers)) == 1


def test_a_token_about_to_expire_is_replaced_before_use() -> None:
    # The server issues 30-second tokens: less than the 60 s refresh margin, so each use gets a fresh one.
    with fhir_server(smart_clients=SMART_CLIENTS, token_lifetime=30) as server:
        auth = ClientSecretAuth(server.token_url, "secret-client", SECRET, "system/*.*")
        first = auth.authorization_header()
        time.sleep(1.1)  # tokens are signed with a one-second iat: let the next one differ
        second = auth.authorization_header()
        assert first != second
        client = FhirClient(server.base_url, auth=auth)
        assert client.create(_new_patient())["resourceType"] == "Patient"

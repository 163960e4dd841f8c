"""The SMART client's rules, checked one by one: PKCE, state, discovery (with its v1 fallback), scopes, id_token.

Discovery and the token grants run against the real sandbox EHR in front of real sekmet-fhir. The one stand-in
is a SMART v1-era server that publishes only the CapabilityStatement extension (no ``.well-known``): none can
be installed here, so a tiny loopback server serves the sandbox's real CapabilityStatement and nothing else.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from fhir_client_support import Action, fault_proxy
from flask import Flask, Response
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey
from werkzeug.serving import make_server

from core.errors import ConfigurationError
from devtools.sandbox.app import SandboxHandle, run_sandbox
from devtools.sandbox.config import SandboxClient, SandboxConfig
from devtools.servers import FhirServer
from fhir_adapters.fhirjson import relative_reference
from smart_launch import oauth
from smart_launch.oauth import ClientRegistration, GrantedScopes, SmartConfiguration, SmartLaunchError

# ---------------------------------------------------------------------------------------------- PKCE and state


def test_s256_challenge_matches_the_rfc_7636_example() -> None:
    # RFC 7636 appendix B: the verifier and challenge printed in the specification.
    assert (
        oauth.s256_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk")
        == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    )


def test_new_pkce_is_s256_with_a_verifier_of_legal_length_and_alphabet() -> None:
    pairs = [oauth.new_pkce() for _ in range(20)]
    for pair in pairs:
        assert pair.method == "S256"
        assert 43 <= len(pair.verifier) <= 128
        assert set(pair.verifier) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
        assert pair.challenge == oauth.s256_challenge(pair.verifier)
        assert pair.verifier not in repr(pair)
    assert len({p.verifier for p in pairs}) == 20


def test_state_is_checked_against_the_browser_session() -> None:
    state = oauth.new_state()
    oauth.check_state(state, state)
    with pytest.raises(SmartLaunchError, match="does not belong to the launch this browser started"):
        oauth.check_state(state, state[:-1] + ("A" if state[-1] != "A" else "B"))
    with pytest.raises(SmartLaunchError, match="does not belong"):
        oauth.check_state(state, None)
    with pytest.raises(SmartLaunchError, match="no SMART launch in progress"):
        oauth.check_state(None, state)


def test_a_server_without_s256_is_refused() -> None:
    document = {
        "authorization_endpoint": "https://ehr.example/authorize",
        "token_endpoint": "https://ehr.example/token",
        "code_challenge_methods_supported": ["plain"],
    }
    with pytest.raises(SmartLaunchError, match="does not support PKCE with S256"):
        oauth.parse_smart_configuration("https://ehr.example/fhir", document)


def test_authorization_url_carries_pkce_state_aud_and_the_exact_redirect() -> None:
    smart = oauth.parse_smart_configuration(
        "https://ehr.example/fhir",
        {"authorization_endpoint": "https://ehr.example/authorize", "token_endpoint": "https://ehr.example/token"},
    )
    client = ClientRegistration("https://ehr.example/fhir", "app", "https://app.example/callback")
    pkce = oauth.new_pkce()
    url = oauth.authorization_url(smart, client, scope="launch openid", state="s1", pkce=pkce, launch="L1")
    query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    assert query == {
        "response_type": "code",
        "client_id": "app",
        "redirect_uri": "https://app.example/callback",
        "scope": "launch openid",
        "state": "s1",
        "aud": "https://ehr.example/fhir",
        "code_challenge": pkce.challenge,
        "code_challenge_method": "S256",
        "launch": "L1",
    }
    assert pkce.verifier not in url


# ---------------------------------------------------------------------------------------------- scopes


def _smart(**kwargs: object) -> SmartConfiguration:
    base = {
        "fhir_base": "https://ehr.example/fhir",
        "authorization_endpoint": "https://ehr.example/authorize",
        "token_endpoint": "https://ehr.example/token",
        "source": "smart-configuration",
    }
    return SmartConfiguration(**{**base, **kwargs})  # type: ignore[arg-type]


def test_v2_scopes_are_asked_for_a_v2_server_and_v1_for_a_v1_only_server() -> None:
    v2 = oauth.scope_request(_smart(capabilities=("permission-v2", "permission-v1")), standalone=False).split()
    assert "patient/DiagnosticReport.crus" in v2 and "patient/ImagingStudy.rs" in v2 and "launch" in v2
    v1 = oauth.scope_request(_smart(capabilities=("permission-v1",)), standalone=True).split()
    assert "patient/DiagnosticReport.read" in v1 and "patient/DiagnosticReport.write" in v1
    assert "patient/ImagingStudy.write" not in v1
    assert "launch/patient" in v1 and "launch" not in v1
    assert not _smart(source="capability-statement").uses_v2_scopes


def test_granted_scopes_answer_what_is_allowed_in_v1_and_v2() -> None:
    granted = GrantedScopes.parse("openid fhirUser patient/ImagingStudy.rs patient/DiagnosticReport.read")
    assert granted.allows("ImagingStudy", "s")
    assert granted.allows("DiagnosticReport", "r")
    assert not granted.allows("DiagnosticReport", "u")
    assert granted.missing([("DiagnosticReport", "ru"), ("Provenance", "c")]) == ["DiagnosticReport.u", "Provenance.c"]
    assert GrantedScopes.parse("user/*.cruds").allows("Media", "c")
    assert GrantedScopes.parse("patient/*.write").allows("Provenance", "u")


# ---------------------------------------------------------------------------------------------- id_token


def _id_token(key: RSAKey, **claims: object) -> str:
    now = int(time.time())
    body = {"iss": "https://ehr.example/fhir", "aud": "app", "sub": "p1", "iat": now, "exp": now + 300, **claims}
    return jwt.encode({"alg": "RS256", "kid": key.kid}, body, key)


def test_id_token_is_verified_against_the_jwks_and_its_audience_and_expiry() -> None:
    key = RSAKey.generate_key(2048, parameters={"kid": "k1"}, private=True)
    jwks = {"keys": [key.as_dict(private=False)]}
    token = _id_token(key, fhirUser="https://ehr.example/fhir/Practitioner/42")
    claims = oauth.verify_id_token(token, jwks, client_id="app", issuer="https://ehr.example/fhir")
    assert relative_reference(str(claims["fhirUser"])) == "Practitioner/42"

    impostor = RSAKey.generate_key(2048, parameters={"kid": "k1"}, private=True)
    with pytest.raises(oauth.IdTokenError, match="signature could not be verified"):
        oauth.verify_id_token(_id_token(impostor), jwks, client_id="app", issuer="https://ehr.example/fhir")
    with pytest.raises(oauth.IdTokenError, match="not valid for this app"):
        oauth.verify_id_token(_id_token(key, aud="other-app"), jwks, client_id="app", issuer=None)
    with pytest.raises(oauth.IdTokenError, match="not valid for this app"):
        expired = _id_token(key, exp=int(time.time()) - 3600)
        oauth.verify_id_token(expired, jwks, client_id="app", issuer=None)


def test_relative_reference_reads_backing_server_locations() -> None:
    assert relative_reference("http://10.0.0.5:8080/fhir/DiagnosticReport/abc/_history/2") == "DiagnosticReport/abc"
    assert relative_reference("Practitioner/7") == "Practitioner/7"
    assert relative_reference("not a reference") is None


def test_client_registration_checks_its_credentials_at_start_up() -> None:
    with pytest.raises(ConfigurationError, match="has no secret"):
        ClientRegistration("https://ehr/fhir", "app", "https://app/cb", auth_method="client_secret_basic")
    with pytest.raises(ConfigurationError, match="no private key or kid"):
        ClientRegistration("https://ehr/fhir", "app", "https://app/cb", auth_method="private_key_jwt")


# ---------------------------------------------------------------------------------------------- against the sandbox


@pytest.fixture(scope="module")
def sandbox(fhir_base: FhirServer) -> Iterator[SandboxHandle]:
    config = SandboxConfig(
        fhir_upstream=fhir_base.base_url,
        clients=[SandboxClient(client_id="unit", redirect_uris=["http://127.0.0.1:9/cb"], public=True)],
    )
    with run_sandbox(config) as handle:
        yield handle


def test_discovery_reads_the_smart_configuration(sandbox: SandboxHandle) -> None:
    smart = oauth.discover(sandbox.fhir_base, requests.Session())
    assert smart.source == "smart-configuration"
    assert smart.authorization_endpoint == sandbox.authorize_url
    assert smart.token_endpoint == sandbox.token_url
    assert smart.jwks_uri == sandbox.jwks_url
    assert smart.uses_v2_scopes
    assert SmartConfiguration.from_json(smart.to_json()) == smart


@pytest.fixture()
def v1_era_server(sandbox: SandboxHandle) -> Iterator[str]:
    """Stand-in for a SMART v1 EHR: the sandbox's real CapabilityStatement, and no .well-known document."""
    capability = requests.get(f"{sandbox.fhir_base}/metadata", timeout=10).content
    app = Flask("v1-era")

    @app.get("/fhir/metadata")
    def metadata() -> Response:
        return Response(capability, content_type="application/fhir+json")

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.port}/fhir"
    finally:
        server.shutdown()
        thread.join(timeout=5)


def test_discovery_falls_back_to_the_capability_statement_oauth_uris(
    v1_era_server: str, sandbox: SandboxHandle
) -> None:
    smart = oauth.discover(v1_era_server, requests.Session())
    assert smart.source == "capability-statement"
    assert smart.authorization_endpoint == sandbox.authorize_url
    assert smart.token_endpoint == sandbox.token_url
    assert not smart.uses_v2_scopes  # an old server gets .read/.write scopes


def test_a_backend_services_only_server_is_refused_for_a_clinician_launch(fhir_base: FhirServer) -> None:
    # sekmet-fhir publishes a SMART configuration for client_credentials only (no user launch).
    with pytest.raises(SmartLaunchError, match="offers SMART only for client_credentials"):
        oauth.discover(fhir_base.base_url, requests.Session())


def test_a_server_without_any_smart_advertisement_is_named() -> None:
    with pytest.raises(SmartLaunchError, match="does not advertise SMART on FHIR authorization"):
        oauth.parse_capability_statement("https://ehr.example/fhir", {"resourceType": "CapabilityStatement"})


def test_a_bogus_code_is_refused_by_the_token_endpoint_with_a_clear_message(sandbox: SandboxHandle) -> None:
    smart = oauth.discover(sandbox.fhir_base, requests.Session())
    client = ClientRegistration(sandbox.fhir_base, "unit", "http://127.0.0.1:9/cb")
    with pytest.raises(oauth.TokenRequestError, match=r"invalid_grant.*used already"):
        oauth.exchange_code(
            smart, client, code="never-issued", code_verifier="x" * 43, requested_scope="", http=requests.Session()
        )


def test_a_redirecting_token_endpoint_is_refused_not_followed(sandbox: SandboxHandle) -> None:
    # The shared token client (fhir_adapters.smart) sees the 307; the app words it for the clinician.
    smart = oauth.discover(sandbox.fhir_base, requests.Session())

    def redirect(index: int, method: str, path: str) -> Action | None:
        return Action(status=307, headers={"Location": sandbox.token_url})

    client = ClientRegistration(sandbox.fhir_base, "unit", "http://127.0.0.1:9/cb")
    with fault_proxy(sandbox.fhir_base, redirect) as proxy:
        moved = replace(smart, token_endpoint=proxy.base_url.removesuffix("/fhir") + "/token")
        with pytest.raises(oauth.TokenRequestError, match=r"refused the authorization code \(HTTP 307\)"):
            oauth.exchange_code(
                moved, client, code="c", code_verifier="x" * 43, requested_scope="", http=requests.Session()
            )
        assert proxy.count == 1


def test_private_key_jwt_assertion_is_signed_for_the_token_endpoint() -> None:
    key = ECKey.generate_key("P-384", parameters={"kid": "app-key"}, private=True)
    client = ClientRegistration(
        "https://ehr/fhir",
        "app",
        "https://app/cb",
        auth_method="private_key_jwt",
        private_key=key.as_dict(private=True),
        kid="app-key",
        algorithm="ES384",
    )
    assertion = oauth.client_assertion(client, "https://ehr/token")
    decoded = jwt.decode(assertion, key, algorithms=["ES384"])
    assert decoded.header["kid"] == "app-key"
    assert decoded.claims["iss"] == decoded.claims["sub"] == "app"
    assert decoded.claims["aud"] == "https://ehr/token"
    assert decoded.claims["exp"] - decoded.claims["iat"] <= 300

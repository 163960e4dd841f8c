"""Every JWT attack on the CDS service is refused with the same generic 401; good tokens (ES384, RS384, keys
from an allow-listed jku) are accepted. The tests play the CDS client (an EHR cannot run here) and the
attacker: attack tokens are assembled by hand, as an attacker would.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from joserfc import jwt
from joserfc.jwk import ECKey

from cds.app import create_app
from cds.config import TrustedClient
from cds.services import AI_REPORTS_KEY, IMAGING_STUDIES_KEY, PATIENT_VIEW
from core.errors import ConfigurationError
from tests.cds_support import CDS_BASE, EHR_ISS, EhrKeys, b64url, jwks_server, make_config, recording_listener

PATH = f"/cds-services/{PATIENT_VIEW}"
BODY = {
    "hook": "patient-view",
    "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
    "context": {"patientId": "p1", "userId": "Practitioner/1"},
    "prefetch": {AI_REPORTS_KEY: None, IMAGING_STUDIES_KEY: None},
}
GENERIC_401 = {"error": "unauthorized", "message": "The request could not be authenticated."}


@pytest.fixture(scope="module")
def keys() -> EhrKeys:
    return EhrKeys()


@pytest.fixture
def client(tmp_path: Path, keys: EhrKeys) -> FlaskClient:
    return create_app(make_config(tmp_path, keys, "http://127.0.0.1:9/fhir")).test_client()


def send(client: FlaskClient, token: str | None, path: str = PATH) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return client.post(path, json=BODY, headers=headers)


def assert_refused(response: Any) -> None:
    assert response.status_code == 401
    assert response.get_json() == GENERIC_401  # the same body whatever failed: nothing to learn from it
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    values = {
        "iss": EHR_ISS,
        "sub": "ehr-client",
        "aud": CDS_BASE + PATH,
        "iat": now,
        "exp": now + 240,
        "jti": str(uuid.uuid4()),
    }
    values.update(overrides)
    return values


def unsigned(header: dict[str, Any], body: dict[str, Any], signature: bytes = b"") -> str:
    return ".".join([b64url(json.dumps(header).encode()), b64url(json.dumps(body).encode()), b64url(signature)])


def test_valid_es384_and_rs384_tokens_are_accepted(client: FlaskClient, keys: EhrKeys) -> None:
    for alg in ("ES384", "RS384"):
        response = send(client, keys.sign(PATH, alg=alg))
        assert response.status_code == 200 and response.get_json() == {"cards": []}


def test_missing_or_non_bearer_authorization_is_refused(client: FlaskClient) -> None:
    assert_refused(send(client, None))
    assert_refused(client.post(PATH, json=BODY, headers={"Authorization": "Basic dXNlcjpwYXNz"}))
    assert_refused(send(client, "not-a-jwt"))


def test_alg_none_is_refused(client: FlaskClient, keys: EhrKeys) -> None:
    assert_refused(send(client, unsigned({"alg": "none", "typ": "JWT", "kid": "ehr-es384"}, claims())))


def test_hmac_signed_with_the_public_key_is_refused(client: FlaskClient, keys: EhrKeys) -> None:
    """Algorithm confusion: an attacker signs HS384 using the client's PUBLIC key (PEM and JWK) as the secret."""
    for secret in (keys.rsa.as_pem(private=False), json.dumps(keys.rsa.as_dict(private=False)).encode()):
        for kid in ("ehr-rs384", "ehr-es384"):
            header = {"alg": "HS384", "typ": "JWT", "kid": kid}
            signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims()).encode())}"
            signature = hmac.new(secret, signing_input.encode(), hashlib.sha384).digest()
            assert_refused(send(client, f"{signing_input}.{b64url(signature)}"))


def test_expired_token_is_refused(client: FlaskClient, keys: EhrKeys) -> None:
    now = int(time.time())
    assert_refused(send(client, keys.sign(PATH, iat=now - 900, exp=now - 600)))


def test_token_for_another_endpoint_is_refused(client: FlaskClient, keys: EhrKeys) -> None:
    assert_refused(send(client, keys.sign(PATH, aud="https://other-cds.example.org" + PATH)))
    assert_refused(send(client, keys.sign(PATH, aud=CDS_BASE + "/cds-services/imaging-ai-order-sign")))


def test_unknown_issuer_is_refused(client: FlaskClient, keys: EhrKeys) -> None:
    assert_refused(send(client, keys.sign(PATH, iss="https://evil.example.org")))


def test_replayed_token_is_refused(client: FlaskClient, keys: EhrKeys) -> None:
    token = keys.sign(PATH)
    assert send(client, token).status_code == 200
    assert_refused(send(client, token))


def test_missing_kid_is_refused(client: FlaskClient, keys: EhrKeys) -> None:
    assert_refused(send(client, keys.sign(PATH, drop_kid=True)))


def test_bad_signature_is_refused(client: FlaskClient, keys: EhrKeys) -> None:
    impostor = EhrKeys(ec=ECKey.generate_key("P-384", parameters={"kid": "ehr-es384"}))  # same kid, other key
    assert_refused(send(client, impostor.sign(PATH)))
    header, body, signature = keys.sign(PATH).split(".")
    tampered = json.loads(__import__("base64").urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    tampered["sub"] = "someone-else"
    assert_refused(send(client, f"{header}.{b64url(json.dumps(tampered).encode())}.{signature}"))


def test_iat_in_the_future_and_overlong_lifetime_are_refused(client: FlaskClient, keys: EhrKeys) -> None:
    now = int(time.time())
    assert_refused(send(client, keys.sign(PATH, iat=now + 3600, exp=now + 3700)))
    assert_refused(send(client, keys.sign(PATH, exp=now + 86400)))


def test_algorithms_not_configured_for_the_client_are_refused(client: FlaskClient, keys: EhrKeys) -> None:
    p256 = EhrKeys(ec=ECKey.generate_key("P-256", parameters={"kid": "ehr-es384"}))
    assert_refused(send(client, p256.sign(PATH, alg="ES256")))


def test_hmac_or_none_can_never_be_configured() -> None:
    with pytest.raises(ConfigurationError, match="unsupported JWS algorithms"):
        TrustedClient(iss=EHR_ISS, jwks={"keys": []}, algorithms=("HS256",))
    with pytest.raises(ConfigurationError, match="unsupported JWS algorithms"):
        TrustedClient(iss=EHR_ISS, jwks={"keys": []}, algorithms=("none",))


def test_jku_on_the_allow_list_is_fetched_and_trusted(tmp_path: Path, keys: EhrKeys) -> None:
    jku_keys = EhrKeys()  # the EHR publishes these at its jku; none are configured by value
    with jwks_server(jku_keys.public_jwks()) as (url, requested):
        prefix = url.rsplit("/", 1)[0]
        client = TrustedClient(iss=EHR_ISS, jku_allow_list=(prefix,))
        app = create_app(make_config(tmp_path, keys, "http://127.0.0.1:9/fhir", client=client))
        for _ in range(2):
            response = send(app.test_client(), jku_keys.sign(PATH, header={"jku": url}))
            assert response.status_code == 200
        assert requested == ["/jwks.json"]  # fetched once, then cached
        without_jku = send(app.test_client(), jku_keys.sign(PATH))
        assert_refused(without_jku)


def test_jku_off_the_allow_list_is_never_fetched(tmp_path: Path, keys: EhrKeys) -> None:
    stranger = EhrKeys()  # keys nobody configured
    with recording_listener() as (url, connections):
        client = TrustedClient(iss=EHR_ISS, jwks=keys.public_jwks(), jku_allow_list=("https://keys.ehr.example.org",))
        app = create_app(make_config(tmp_path, keys, "http://127.0.0.1:9/fhir", client=client))
        # The configured key for the token's kid verifies it; the off-list jku it also names is not needed.
        assert send(app.test_client(), keys.sign(PATH, header={"jku": f"{url}/jwks.json"})).status_code == 200
        # A kid the configured set lacks could only come from its jku, which is off the list: refused.
        unknown = {"jku": f"{url}/jwks.json", "kid": "stranger-es384"}
        assert_refused(send(app.test_client(), stranger.sign(PATH, header=unknown)))
        static_only = create_app(make_config(tmp_path / "b", keys, "http://127.0.0.1:9/fhir"))
        assert_refused(send(static_only.test_client(), stranger.sign(PATH, header=unknown)))
    assert connections == []


def test_feedback_needs_a_valid_token_too(client: FlaskClient, keys: EhrKeys) -> None:
    path = f"{PATH}/feedback"
    feedback = {"feedback": [{"card": str(uuid.uuid4()), "outcome": "overridden"}]}
    refused = client.post(path, json=feedback, headers={"Authorization": f"Bearer {keys.sign(PATH, aud='x')}"})
    assert_refused(refused)
    accepted = client.post(path, json=feedback, headers={"Authorization": f"Bearer {keys.sign(path)}"})
    assert accepted.status_code == 200


def test_a_kid_the_client_does_not_publish_is_refused_every_time(client: FlaskClient, keys: EhrKeys) -> None:
    assert send(client, keys.sign(PATH, alg="RS384")).status_code == 200  # the right kid is accepted ...
    for _ in range(2):  # ... and a wrong one never is, not even after a good token warmed the key lookup
        assert_refused(send(client, keys.sign(PATH, alg="RS384", header={"kid": "not-published"})))


def test_a_key_published_for_encryption_or_another_alg_does_not_verify_signatures(
    tmp_path: Path, keys: EhrKeys
) -> None:
    for restriction in ({"use": "enc"}, {"alg": "RS512"}):
        restricted = {**keys.rsa.as_dict(private=False), **restriction}
        client = TrustedClient(iss=EHR_ISS, jwks={"keys": [restricted]})
        app = create_app(make_config(tmp_path, keys, "http://127.0.0.1:9/fhir", client=client)).test_client()
        for _ in range(2):  # refused on first use and on every later one
            assert_refused(send(app, keys.sign(PATH, alg="RS384")))


# ---------------------------------------------------------------- the official CDS Hooks sandbox's request shape

SANDBOX_ISS = "https://sandbox.cds-hooks.org"
SANDBOX_KID = "44823f3d-0b01-4a6c-a80e-b9d3e8a7226f"  # the kid of its published key pair
SANDBOX_JKU = "https://sandbox.cds-hooks.org/.well-known/jwks.json"  # unreachable from here, and never fetched


@pytest.fixture(scope="module")
def sandbox_key() -> ECKey:
    """Stands in for the sandbox's private key (its public half is what a deployment configures)."""
    return ECKey.generate_key("P-384", parameters={"kid": SANDBOX_KID})


def sandbox_token(key: ECKey, path: str, *, kid: str = SANDBOX_KID, jku: str = SANDBOX_JKU) -> str:
    """A JWT shaped as the sandbox signs every request, discovery included (cds-hooks/sandbox, jwt-generator.js):
    ES384, its kid and its public jku in the header; iss, aud, exp (+300 s), iat and jti; no sub."""
    now = int(time.time())
    header = {"alg": "ES384", "typ": "JWT", "kid": kid, "jku": jku}
    body = {"iss": SANDBOX_ISS, "aud": CDS_BASE + path, "exp": now + 300, "iat": now, "jti": str(uuid.uuid4())}
    return jwt.encode(header, body, key, algorithms=["ES384"])


def _sandbox_client(tmp_path: Path, keys: EhrKeys, client: TrustedClient) -> FlaskClient:
    return create_app(make_config(tmp_path, keys, "http://127.0.0.1:9/fhir", client=client)).test_client()


@pytest.mark.parametrize("configured", ["by value", "by file"])
def test_the_sandboxs_requests_verify_with_its_key_configured_by_value_or_file(
    tmp_path: Path, keys: EhrKeys, sandbox_key: ECKey, configured: str
) -> None:
    public = {"keys": [sandbox_key.as_dict(private=False)]}
    if configured == "by value":
        trusted = TrustedClient(iss=SANDBOX_ISS, jwks=public, algorithms=("ES384",))
    else:
        (tmp_path / "sandbox-jwks.json").write_text(json.dumps(public))
        trusted = TrustedClient(iss=SANDBOX_ISS, jwks_file=tmp_path / "sandbox-jwks.json", algorithms=("ES384",))
    app = _sandbox_client(tmp_path, keys, trusted)
    discovery = app.get(
        "/cds-services", headers={"Authorization": f"Bearer {sandbox_token(sandbox_key, '/cds-services')}"}
    )
    assert discovery.status_code == 200 and discovery.get_json()["services"]
    hook = send(app, sandbox_token(sandbox_key, PATH))
    assert hook.status_code == 200 and "cards" in hook.get_json()
    # The sandbox's key does not make any other signer the sandbox.
    assert_refused(send(app, sandbox_token(ECKey.generate_key("P-384"), PATH)))


def test_an_off_list_jku_serving_the_signers_keys_is_never_fetched(
    tmp_path: Path, keys: EhrKeys, sandbox_key: ECKey
) -> None:
    attacker = ECKey.generate_key("P-384", parameters={"kid": "attacker"})
    # The loopback server would hand over exactly the keys that verify the attacker's tokens, if it were asked.
    with jwks_server({"keys": [attacker.as_dict(private=False)]}) as (url, requested):
        trusted = TrustedClient(
            iss=SANDBOX_ISS,
            jwks={"keys": [sandbox_key.as_dict(private=False)]},
            jku_allow_list=("https://sandbox.cds-hooks.org/.well-known/",),
            algorithms=("ES384",),
        )
        app = _sandbox_client(tmp_path, keys, trusted)
        assert send(app, sandbox_token(sandbox_key, PATH, jku=url)).status_code == 200  # the configured key
        assert_refused(send(app, sandbox_token(attacker, PATH, kid="attacker", jku=url)))  # unknown kid, off list
        assert_refused(send(app, sandbox_token(attacker, PATH, jku=url)))  # the sandbox's kid, another key
        assert_refused(send(app, sandbox_token(attacker, PATH, kid="attacker")))  # the listed jku: unreachable
    assert requested == []


def test_an_allow_listed_jku_is_fetched_only_for_a_kid_the_configured_keys_lack(
    tmp_path: Path, keys: EhrKeys, sandbox_key: ECKey
) -> None:
    rotated = ECKey.generate_key("P-384", parameters={"kid": "rotated"})  # published after the set was configured
    with jwks_server({"keys": [rotated.as_dict(private=False)]}) as (url, requested):
        trusted = TrustedClient(
            iss=SANDBOX_ISS,
            jwks={"keys": [sandbox_key.as_dict(private=False)]},
            jku_allow_list=(url.rsplit("/", 1)[0],),
            algorithms=("ES384",),
        )
        app = _sandbox_client(tmp_path, keys, trusted)
        assert send(app, sandbox_token(sandbox_key, PATH, jku=url)).status_code == 200
        assert requested == []  # the configured key was enough
        assert send(app, sandbox_token(rotated, PATH, kid="rotated", jku=url)).status_code == 200
        assert requested == ["/jwks.json"]

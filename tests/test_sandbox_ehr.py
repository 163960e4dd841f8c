"""The sandbox EHR (SMART App Launch 2.x server + scope-enforcing proxy) against a real sekmet-fhir server.

Driven with ``requests`` the way a browser and an app would: follow the EHR launch, read the consent form and
post it, exchange the code with PKCE, then use the token through the proxy. The app's redirect URI is never
contacted (redirects are read, not followed), so no app needs to run here; the browser tests live with the app.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey

from core.errors import ConfigurationError
from devtools.sandbox import SandboxClient, SandboxConfig, SandboxHandle, run_sandbox
from devtools.sandbox.scopes import (
    FhirInteraction,
    allowed_subset,
    interaction_for,
    parse_resource_scope,
    restrict_search_to_patient,
)
from devtools.servers import FhirServer

APP_LAUNCH = "http://127.0.0.1:9/launch"
REDIRECT = "http://127.0.0.1:9/callback"
FHIR_JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
CLIENT_KEY = RSAKey.generate_key(2048, parameters={"kid": "imaging-app-rs384", "alg": "RS384"}, private=True)
OTHER_KEY = RSAKey.generate_key(2048, parameters={"kid": "imaging-app-rs384", "alg": "RS384"}, private=True)

CLIENTS = [
    SandboxClient("imaging-app", [REDIRECT], public=True),
    SandboxClient("imaging-app-secret", [REDIRECT], client_secret="s3cret-for-tests"),
    SandboxClient("imaging-app-jwt", [REDIRECT], jwks={"keys": [CLIENT_KEY.as_dict(private=False)]}),
]
APP_SCOPES = "launch openid fhirUser offline_access patient/Patient.r patient/ImagingStudy.rs patient/Observation.cr"


@dataclass
class Ehr:
    """Resources on the real FHIR server: the launch patient, another patient, a radiologist, studies."""

    upstream: str
    patient: str
    other_patient: str
    practitioner: str
    study: str
    other_study: str


class FormReader(HTMLParser):
    """Reads the sandbox's forms as a browser would: action, hidden fields and ticked checkboxes."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: dict[str, dict[str, Any]] = {}
        self._current: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self._current = a.get("id", "")
            self.forms[self._current] = {"action": a.get("action"), "method": a.get("method"), "fields": []}
        elif tag == "input" and self._current is not None:
            kind = a.get("type", "text")
            if kind == "hidden" or (kind in ("checkbox", "radio") and "checked" in a):
                self.forms[self._current]["fields"].append((a["name"], a.get("value", "")))
            if kind == "radio":
                self.forms[self._current].setdefault("choices", []).append((a["name"], a.get("value", "")))

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._current = None


def read_forms(html: str) -> dict[str, dict[str, Any]]:
    reader = FormReader()
    reader.feed(html)
    return reader.forms


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def query_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def create(upstream: str, resource: dict[str, Any]) -> str:
    response = requests.post(f"{upstream}/{resource['resourceType']}", json=resource, headers=FHIR_JSON, timeout=30)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


@pytest.fixture(scope="module")
def ehr(fhir_base: FhirServer) -> Ehr:
    upstream = fhir_base.base_url
    patient = create(upstream, {"resourceType": "Patient", "name": [{"family": "Sandbox", "given": ["Ann"]}]})
    other = create(upstream, {"resourceType": "Patient", "name": [{"family": "Other", "given": ["Bob"]}]})
    practitioner = create(upstream, {"resourceType": "Practitioner", "name": [{"family": "Reader", "given": ["Rad"]}]})

    def study(pid: str) -> str:
        return create(
            upstream,
            {"resourceType": "ImagingStudy", "status": "available", "subject": {"reference": f"Patient/{pid}"}},
        )

    return Ehr(upstream, patient, other, practitioner, study(patient), study(other))


@pytest.fixture(scope="module")
def sandbox(ehr: Ehr) -> Iterator[SandboxHandle]:
    with run_sandbox(SandboxConfig(fhir_upstream=ehr.upstream, clients=CLIENTS)) as handle:
        yield handle


def ehr_launch(handle: SandboxHandle, ehr: Ehr, **extra: Any) -> dict[str, str]:
    """Click the app in the EHR: the sandbox redirects to the app's launch URL with iss and launch."""
    url = handle.launch_url(ehr.patient, f"Practitioner/{ehr.practitioner}", APP_LAUNCH, **extra)
    response = requests.get(url, allow_redirects=False, timeout=10)
    assert response.status_code == 302
    assert response.headers["Location"].startswith(APP_LAUNCH + "?")
    return query_of(response.headers["Location"])


def authorize_params(handle: SandboxHandle, client_id: str, scope: str, challenge: str, **extra: str) -> dict[str, str]:
    return {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": REDIRECT,
        "scope": scope,
        "state": "st-" + secrets.token_urlsafe(8),
        "aud": handle.fhir_base,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        **extra,
    }


def consent(
    handle: SandboxHandle, params: dict[str, str], *, approve: bool = True, untick: tuple[str, ...] = ()
) -> requests.Response:
    """Open the consent page and press Approve or Deny; returns the redirect back to the app."""
    page = requests.get(handle.authorize_url, params=params, allow_redirects=False, timeout=10)
    assert page.status_code == 200, page.text
    form = read_forms(page.text)["consent"]
    fields = [(k, v) for k, v in form["fields"] if not (k == "granted" and v in untick)]
    fields.append(("decision", "approve" if approve else "deny"))
    response = requests.post(handle.base_url + form["action"], data=fields, allow_redirects=False, timeout=10)
    assert response.status_code == 302, response.text
    return response


def launch_and_get_code(
    handle: SandboxHandle, ehr: Ehr, client_id: str = "imaging-app", scope: str = APP_SCOPES, **launch_extra: Any
) -> tuple[str, str, dict[str, str]]:
    launch = ehr_launch(handle, ehr, **launch_extra)
    assert launch["iss"] == handle.fhir_base
    verifier, challenge = pkce_pair()
    params = authorize_params(handle, client_id, scope, challenge, launch=launch["launch"], nonce="n-123")
    back = query_of(consent(handle, params).headers["Location"])
    assert back["state"] == params["state"]
    return back["code"], verifier, params


def exchange(handle: SandboxHandle, code: str, verifier: str, client_id: str = "imaging-app") -> requests.Response:
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT, "code_verifier": verifier}
    return requests.post(handle.token_url, data={**data, "client_id": client_id}, timeout=10)


def bearer(token: str) -> dict[str, str]:
    return {**FHIR_JSON, "Authorization": f"Bearer {token}"}


def test_discovery_document_lists_smart_2_endpoints_and_s256_only(sandbox: SandboxHandle) -> None:
    doc = requests.get(sandbox.smart_configuration_url, timeout=10).json()
    assert doc["authorization_endpoint"] == sandbox.authorize_url
    assert doc["token_endpoint"] == sandbox.token_url
    assert doc["jwks_uri"] == sandbox.jwks_url
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert {"private_key_jwt", "client_secret_basic", "client_secret_post"} <= set(
        doc["token_endpoint_auth_methods_supported"]
    )
    assert {"launch-ehr", "launch-standalone", "permission-v2", "sso-openid-connect", "context-banner"} <= set(
        doc["capabilities"]
    )
    assert "patient/*.rs" in doc["scopes_supported"]
    assert doc["grant_types_supported"] == ["authorization_code", "refresh_token"]


def test_capability_statement_carries_oauth_uris_for_the_fallback(sandbox: SandboxHandle) -> None:
    capability = requests.get(f"{sandbox.fhir_base}/metadata", headers=FHIR_JSON, timeout=10).json()
    assert capability["resourceType"] == "CapabilityStatement"
    (oauth,) = [
        ext
        for ext in capability["rest"][0]["security"]["extension"]
        if ext["url"] == "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
    ]
    uris = {item["url"]: item["valueUri"] for item in oauth["extension"]}
    assert uris == {"authorize": sandbox.authorize_url, "token": sandbox.token_url}


def test_ehr_launch_gives_the_study_context_a_signed_id_token_and_read_only_access(
    sandbox: SandboxHandle, ehr: Ehr
) -> None:
    code, verifier, _ = launch_and_get_code(sandbox, ehr, fhir_context=[f"ImagingStudy/{ehr.study}"])
    token = exchange(sandbox, code, verifier).json()
    assert token["token_type"] == "Bearer"
    assert token["patient"] == ehr.patient
    assert token["fhirContext"] == [{"reference": f"ImagingStudy/{ehr.study}"}]
    assert token["need_patient_banner"] is True
    assert set(token["scope"].split()) == set(APP_SCOPES.split())
    assert token["refresh_token"]

    keys = KeySet.import_key_set(requests.get(sandbox.jwks_url, timeout=10).json())
    claims = jwt.decode(token["id_token"], keys, algorithms=["RS256"]).claims
    assert claims["fhirUser"] == f"{sandbox.fhir_base}/Practitioner/{ehr.practitioner}"
    assert (claims["iss"], claims["aud"], claims["nonce"]) == (sandbox.fhir_base, "imaging-app", "n-123")

    study = requests.get(f"{sandbox.fhir_base}/ImagingStudy/{ehr.study}", headers=bearer(token["access_token"]))
    assert study.status_code == 200
    assert study.json()["subject"]["reference"] == f"Patient/{ehr.patient}"

    # a search without a patient is confined to the launch patient's compartment
    found = requests.get(f"{sandbox.fhir_base}/ImagingStudy", headers=bearer(token["access_token"])).json()
    ids = {entry["resource"]["id"] for entry in found.get("entry", [])}
    assert ehr.study in ids and ehr.other_study not in ids
    other = requests.get(f"{sandbox.fhir_base}/ImagingStudy/{ehr.other_study}", headers=bearer(token["access_token"]))
    assert other.status_code == 403

    report: dict[str, Any] = {"resourceType": "DiagnosticReport", "status": "preliminary", "code": {"text": "AI"}}
    refused = requests.post(f"{sandbox.fhir_base}/DiagnosticReport", json=report, headers=bearer(token["access_token"]))
    assert refused.status_code == 403
    assert "patient/DiagnosticReport.c" in refused.json()["issue"][0]["diagnostics"]


def test_patient_scoped_searches_stay_in_the_launch_patients_compartment(sandbox: SandboxHandle, ehr: Ehr) -> None:
    code, verifier, _ = launch_and_get_code(sandbox, ehr, scope="launch patient/Patient.rs patient/ImagingStudy.rs")
    headers = bearer(exchange(sandbox, code, verifier).json()["access_token"])
    patients = requests.get(f"{sandbox.fhir_base}/Patient", headers=headers).json()
    assert [entry["resource"]["id"] for entry in patients["entry"]] == [ehr.patient]
    form = {**headers, "Content-Type": "application/x-www-form-urlencoded"}
    studies = requests.post(f"{sandbox.fhir_base}/ImagingStudy/_search", data={"status": "available"}, headers=form)
    assert studies.status_code == 200, studies.text
    assert {entry["resource"]["id"] for entry in studies.json()["entry"]} == {ehr.study}
    asked = requests.get(f"{sandbox.fhir_base}/ImagingStudy", params={"patient": ehr.other_patient}, headers=headers)
    assert asked.status_code == 403


def test_encounter_and_banner_flag_travel_from_the_launch(sandbox: SandboxHandle, ehr: Ehr) -> None:
    code, verifier, _ = launch_and_get_code(sandbox, ehr, encounter="Encounter/enc-1", need_patient_banner=False)
    token = exchange(sandbox, code, verifier).json()
    assert (token["encounter"], token["need_patient_banner"]) == ("enc-1", False)
    assert "fhirContext" not in token


def test_plain_or_missing_pkce_is_refused(sandbox: SandboxHandle, ehr: Ehr) -> None:
    launch = ehr_launch(sandbox, ehr)["launch"]
    verifier, _ = pkce_pair()
    plain = authorize_params(sandbox, "imaging-app", APP_SCOPES, verifier, launch=launch)
    plain["code_challenge_method"] = "plain"
    response = requests.get(sandbox.authorize_url, params=plain, allow_redirects=False, timeout=10)
    back = query_of(response.headers["Location"])
    assert (back["error"], back["state"]) == ("invalid_request", plain["state"])
    assert "S256" in back["error_description"]

    missing = {k: v for k, v in plain.items() if not k.startswith("code_challenge")}
    response = requests.get(sandbox.authorize_url, params=missing, allow_redirects=False, timeout=10)
    assert query_of(response.headers["Location"])["error"] == "invalid_request"


def test_pkce_verifier_mismatch_is_refused(sandbox: SandboxHandle, ehr: Ehr) -> None:
    code, _verifier, _ = launch_and_get_code(sandbox, ehr)
    response = exchange(sandbox, code, pkce_pair()[0])
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"


def test_replayed_code_is_refused_and_revokes_its_tokens(sandbox: SandboxHandle, ehr: Ehr) -> None:
    code, verifier, _ = launch_and_get_code(sandbox, ehr)
    first = exchange(sandbox, code, verifier).json()
    replay = exchange(sandbox, code, verifier)
    assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant"
    after = requests.get(f"{sandbox.fhir_base}/Patient/{ehr.patient}", headers=bearer(first["access_token"]))
    assert after.status_code == 401
    refresh = requests.post(
        sandbox.token_url,
        data={"grant_type": "refresh_token", "refresh_token": first["refresh_token"], "client_id": "imaging-app"},
    )
    assert refresh.json()["error"] == "invalid_grant"


def test_denied_consent_returns_access_denied_with_the_state(sandbox: SandboxHandle, ehr: Ehr) -> None:
    launch = ehr_launch(sandbox, ehr)["launch"]
    params = authorize_params(sandbox, "imaging-app", APP_SCOPES, pkce_pair()[1], launch=launch)
    back = query_of(consent(sandbox, params, approve=False).headers["Location"])
    assert (back["error"], back["state"]) == ("access_denied", params["state"])
    assert "code" not in back


def test_unticked_write_scope_is_not_granted(sandbox: SandboxHandle, ehr: Ehr) -> None:
    launch = ehr_launch(sandbox, ehr)["launch"]
    verifier, challenge = pkce_pair()
    params = authorize_params(sandbox, "imaging-app", APP_SCOPES, challenge, launch=launch)
    back = query_of(consent(sandbox, params, untick=("patient/Observation.cr",)).headers["Location"])
    token = exchange(sandbox, back["code"], verifier).json()
    assert "patient/Observation.cr" not in token["scope"].split()
    assert "patient/ImagingStudy.rs" in token["scope"].split()


def test_unknown_redirect_uri_is_refused_without_redirecting(sandbox: SandboxHandle, ehr: Ehr) -> None:
    launch = ehr_launch(sandbox, ehr)["launch"]
    params = authorize_params(sandbox, "imaging-app", APP_SCOPES, pkce_pair()[1], launch=launch)
    params["redirect_uri"] = "http://127.0.0.1:9/callback/evil"
    response = requests.get(sandbox.authorize_url, params=params, allow_redirects=False, timeout=10)
    assert response.status_code == 400
    assert "Location" not in response.headers
    assert "not supported by client" in response.text


def test_aud_other_than_the_iss_is_refused(sandbox: SandboxHandle, ehr: Ehr) -> None:
    launch = ehr_launch(sandbox, ehr)["launch"]
    params = authorize_params(sandbox, "imaging-app", APP_SCOPES, pkce_pair()[1], launch=launch)
    params["aud"] = "http://127.0.0.1:9/fhir"
    back = query_of(requests.get(sandbox.authorize_url, params=params, allow_redirects=False).headers["Location"])
    assert back["error"] == "invalid_request" and "aud" in back["error_description"]


def test_expired_access_token_gets_401_and_refresh_restores_access(ehr: Ehr) -> None:
    config = SandboxConfig(fhir_upstream=ehr.upstream, clients=CLIENTS, access_token_lifetime=1)
    with run_sandbox(config) as handle:
        code, verifier, _ = launch_and_get_code(handle, ehr)
        token = exchange(handle, code, verifier).json()
        assert token["expires_in"] == 1
        time.sleep(1.5)
        expired = requests.get(f"{handle.fhir_base}/Patient/{ehr.patient}", headers=bearer(token["access_token"]))
        assert expired.status_code == 401
        assert 'error="invalid_token"' in expired.headers["WWW-Authenticate"]
        assert expired.json()["resourceType"] == "OperationOutcome"

        refreshed = requests.post(
            handle.token_url,
            data={"grant_type": "refresh_token", "refresh_token": token["refresh_token"], "client_id": "imaging-app"},
        ).json()
        assert refreshed["scope"] == token["scope"]
        assert refreshed["patient"] == ehr.patient
        again = requests.get(f"{handle.fhir_base}/Patient/{ehr.patient}", headers=bearer(refreshed["access_token"]))
        assert again.status_code == 200 and again.json()["id"] == ehr.patient

        refresh = {"grant_type": "refresh_token", "refresh_token": token["refresh_token"], "client_id": "imaging-app"}
        narrower = requests.post(handle.token_url, data={**refresh, "scope": "patient/Patient.r"}).json()
        assert narrower["scope"] == "patient/Patient.r"
        wider = requests.post(handle.token_url, data={**refresh, "scope": "patient/DiagnosticReport.c"})
        assert wider.json()["error"] == "invalid_scope"


def test_missing_token_gets_401_with_www_authenticate(sandbox: SandboxHandle, ehr: Ehr) -> None:
    response = requests.get(f"{sandbox.fhir_base}/Patient/{ehr.patient}", headers=FHIR_JSON)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_v1_only_sandbox_advertises_and_enforces_v1_scopes(ehr: Ehr) -> None:
    with run_sandbox(SandboxConfig(fhir_upstream=ehr.upstream, clients=CLIENTS, v1_only=True)) as handle:
        doc = requests.get(handle.smart_configuration_url, timeout=10).json()
        assert "permission-v2" not in doc["capabilities"]
        assert "patient/*.read" in doc["scopes_supported"]
        assert not [s for s in doc["scopes_supported"] if s.endswith((".rs", ".cruds"))]

        code, verifier, _ = launch_and_get_code(handle, ehr, scope="launch patient/*.read patient/ImagingStudy.rs")
        token = exchange(handle, code, verifier).json()
        assert token["scope"].split() == ["launch", "patient/*.read"]
        read = requests.get(f"{handle.fhir_base}/ImagingStudy/{ehr.study}", headers=bearer(token["access_token"]))
        assert read.status_code == 200
        obs: dict[str, Any] = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}
        write = requests.post(f"{handle.fhir_base}/Observation", json=obs, headers=bearer(token["access_token"]))
        assert write.status_code == 403
        assert "patient/Observation.write" in write.json()["issue"][0]["diagnostics"]


def test_location_header_passes_through_pointing_at_the_backing_server(sandbox: SandboxHandle, ehr: Ehr) -> None:
    code, verifier, _ = launch_and_get_code(sandbox, ehr)
    token = exchange(sandbox, code, verifier).json()
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "preliminary",
        "code": {"text": "LAA-950"},
        "subject": {"reference": f"Patient/{ehr.patient}"},
    }
    created = requests.post(f"{sandbox.fhir_base}/Observation", json=observation, headers=bearer(token["access_token"]))
    assert created.status_code == 201
    assert created.headers["Location"].startswith(ehr.upstream + "/Observation/")
    assert not created.headers["Location"].startswith(sandbox.fhir_base)

    elsewhere: dict[str, Any] = {**observation, "subject": {"reference": f"Patient/{ehr.other_patient}"}}
    refused = requests.post(f"{sandbox.fhir_base}/Observation", json=elsewhere, headers=bearer(token["access_token"]))
    assert refused.status_code == 403 and "another patient" in refused.json()["issue"][0]["diagnostics"]


def test_transaction_entries_are_each_checked_against_the_scopes(sandbox: SandboxHandle, ehr: Ehr) -> None:
    code, verifier, _ = launch_and_get_code(sandbox, ehr)
    token = exchange(sandbox, code, verifier).json()
    subject = {"reference": f"Patient/{ehr.patient}"}
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"text": "x"},
                    "subject": subject,
                },
                "request": {"method": "POST", "url": "Observation"},
            },
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": {
                    "resourceType": "DiagnosticReport",
                    "status": "final",
                    "code": {"text": "AI"},
                    "subject": subject,
                },
                "request": {"method": "POST", "url": "DiagnosticReport"},
            },
        ],
    }
    refused = requests.post(sandbox.fhir_base, json=bundle, headers=bearer(token["access_token"]))
    assert refused.status_code == 403
    diagnostics = refused.json()["issue"][0]["diagnostics"]
    assert diagnostics.startswith("Bundle entry 1") and "patient/DiagnosticReport.c" in diagnostics

    bundle["entry"] = bundle["entry"][:1]
    accepted = requests.post(sandbox.fhir_base, json=bundle, headers=bearer(token["access_token"]))
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["type"] == "transaction-response"


def client_assertion(handle: SandboxHandle, key: RSAKey, client_id: str = "imaging-app-jwt") -> str:
    now = int(time.time())
    claims = {"iss": client_id, "sub": client_id, "aud": handle.token_url, "exp": now + 240, "jti": uuid.uuid4().hex}
    return jwt.encode({"alg": "RS384", "kid": key.kid, "typ": "JWT"}, claims, key, algorithms=["RS384"])


def test_private_key_jwt_client_authenticates_with_an_rs384_key(sandbox: SandboxHandle, ehr: Ehr) -> None:
    code, verifier, _ = launch_and_get_code(sandbox, ehr, client_id="imaging-app-jwt")
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "code_verifier": verifier,
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
    }
    forged = requests.post(sandbox.token_url, data={**data, "client_assertion": client_assertion(sandbox, OTHER_KEY)})
    assert forged.status_code in (400, 401) and forged.json()["error"] == "invalid_client"

    token = requests.post(sandbox.token_url, data={**data, "client_assertion": client_assertion(sandbox, CLIENT_KEY)})
    assert token.status_code == 200, token.text
    assert token.json()["patient"] == ehr.patient


def test_client_secret_basic_authenticates_a_confidential_app(sandbox: SandboxHandle, ehr: Ehr) -> None:
    code, verifier, _ = launch_and_get_code(sandbox, ehr, client_id="imaging-app-secret")
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT, "code_verifier": verifier}
    wrong = requests.post(sandbox.token_url, data=data, auth=("imaging-app-secret", "wrong"))
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_client"
    # a failed client authentication does not burn the code
    token = requests.post(sandbox.token_url, data=data, auth=("imaging-app-secret", "s3cret-for-tests"))
    assert token.status_code == 200, token.text
    assert token.json()["patient"] == ehr.patient


def test_standalone_launch_lets_the_user_pick_the_patient(sandbox: SandboxHandle, ehr: Ehr) -> None:
    verifier, challenge = pkce_pair()
    params = authorize_params(
        sandbox,
        "imaging-app",
        "launch/patient openid fhirUser patient/ImagingStudy.rs",
        challenge,
        sandbox_practitioner=ehr.practitioner,
    )
    picker = requests.get(sandbox.authorize_url, params=params, allow_redirects=False, timeout=10)
    form = read_forms(picker.text)["picker"]
    assert ("sandbox_patient", ehr.patient) in form["choices"]
    chosen = dict(form["fields"]) | {"sandbox_patient": ehr.other_patient}
    back = query_of(consent(sandbox, chosen).headers["Location"])
    token = exchange(sandbox, back["code"], verifier).json()
    assert token["patient"] == ehr.other_patient
    assert token["need_patient_banner"] is True


def test_launch_parameter_without_launch_scope_is_refused(sandbox: SandboxHandle, ehr: Ehr) -> None:
    launch = ehr_launch(sandbox, ehr)["launch"]
    params = authorize_params(sandbox, "imaging-app", "patient/Patient.r", pkce_pair()[1], launch=launch)
    back = query_of(requests.get(sandbox.authorize_url, params=params, allow_redirects=False).headers["Location"])
    assert back["error"] == "invalid_scope"


def test_scope_grammar_maps_v1_and_v2_to_the_same_permissions() -> None:
    v2 = parse_resource_scope("patient/ImagingStudy.rs")
    v1 = parse_resource_scope("patient/ImagingStudy.read")
    assert v2 is not None and v1 is not None and v1.permissions == v2.permissions == frozenset("rs")
    assert parse_resource_scope("patient/ImagingStudy.sr") is None  # v2 letters must be in c r u d s order
    assert parse_resource_scope("launch") is None
    assert interaction_for("GET", "ImagingStudy/abc") == FhirInteraction("ImagingStudy", "r", "abc")
    assert interaction_for("POST", "DiagnosticReport/_search") == FhirInteraction("DiagnosticReport", "s")
    assert interaction_for("PUT", "DiagnosticReport/r1") == FhirInteraction("DiagnosticReport", "u", "r1")
    assert allowed_subset(["patient/Media.c", "system/*.read"], ["patient/*.cruds"], v1_only=False) == [
        "patient/Media.c"
    ]
    query, why = restrict_search_to_patient("Observation", [("subject", "Patient/other")], "p1")
    assert query is None and why is not None and "patient other than the patient in context" in why


def test_a_public_client_with_a_secret_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="public but also has credentials"):
        SandboxClient("bad", [REDIRECT], client_secret="x", public=True)

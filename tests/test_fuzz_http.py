"""Fuzzing the HTTP surface: the CDS Hooks service and the clinician (SMART) app answer any request with a 2xx or a
clear 4xx, never a 500, never an unhandled exception.

The CDS seeds are real: a patient's AI results written to the real FHIR server by the project's builders and read
back as an EHR would prefetch them, and a draft chest CT order. Hypothesis damages them element by element (a value
replaced by one of the wrong JSON type, an empty or huge one, or removed) and sends them with a valid CDS client
JWT, so the requests get past authentication into the hook body, prefetch and FHIR readers and the card builders.
Tokens themselves are fuzzed separately (a 401, always). The app is fuzzed from outside a launch (its launch,
callback and page routes with arbitrary parameters, cookies and forms): a launched session needs the sandbox EHR's
browser flow, which ``tests/test_smart_app.py`` drives. The hostile hook bodies of ``tests/data/hostile/hooks`` are
replayed as they are.

Schemathesis (schema-driven fuzzing from an OpenAPI document) is not used yet: the service has no OpenAPI document
(issue 23 adds one); these tests stand in until then.
"""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import event, given
from hypothesis import strategies as st
from joserfc.errors import JoseError

from cds.app import create_app
from cds.services import ORDER_SELECT, ORDER_SIGN, PATIENT_VIEW, SERVICES
from core.allowlist import AllowList
from devtools.servers import FhirServer
from tests.cds_support import (
    EhrKeys,
    bone_result,
    create_patient,
    create_study,
    emphysema_result,
    make_config,
    post_result,
    prefetch_for,
    sign_off,
)
from tests.fuzz_support import JUNK, damage, fuzz, hostile_files

CDS_ANSWERS = {200, 400, 403, 404, 412, 413}
SEEDS: dict[str, Any] = {}
KEYS = EhrKeys()


@pytest.fixture(scope="module", autouse=True)
def seeds(fhir_base: FhirServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Real prefetch from the real FHIR server, kept in ``SEEDS`` (a fixture value would be printed with every
    failing case)."""
    base = fhir_base.base_url
    patient = create_patient(base)
    started = "2025-06-01T09:30:00Z"
    study = create_study(base, patient, started=started, based_on="ServiceRequest/draft-chest-ct")
    post_result(base, patient, study, emphysema_result(12.35), started=started)
    sign_off(base, post_result(base, patient, study, bone_result(86.0), started=started))
    order = {
        "resourceType": "ServiceRequest",
        "id": "draft-chest-ct",
        "status": "draft",
        "intent": "order",
        "code": {"coding": [{"system": "http://loinc.org", "code": "24627-2", "display": "CT Chest"}]},
        "subject": {"reference": f"Patient/{patient}"},
    }
    SEEDS.update(
        patient=patient,
        prefetch=prefetch_for(base, PATIENT_VIEW, patient),
        orders={"resourceType": "Bundle", "type": "collection", "entry": [{"resource": order}]},
        cds=create_app(
            make_config(
                tmp_path_factory.mktemp("fuzz-cds"),
                KEYS,
                "http://127.0.0.1:9/fhir",  # an allowed fhirServer where nothing listens: a fetch fails fast
                recent_days=36500,
            )
        ).test_client(),
    )
    yield
    SEEDS.clear()


def _seed_body(service_id: str) -> dict[str, Any]:
    context: dict[str, Any] = {"patientId": SEEDS["patient"], "userId": "Practitioner/1"}
    if service_id != PATIENT_VIEW:
        context["draftOrders"] = copy.deepcopy(SEEDS["orders"])
    if service_id == ORDER_SELECT:
        context["selections"] = ["ServiceRequest/draft-chest-ct"]
    return {
        "hook": SERVICES[service_id].hook,
        "hookInstance": "a5e7c3de-1c8e-4b36-9bbf-1f0d0f0e0a01",
        "context": context,
        "prefetch": copy.deepcopy(SEEDS["prefetch"]),
    }


def _post(service_id: str, body: Any, *, raw: bytes | None = None) -> Any:
    path = f"/cds-services/{service_id}"
    headers = {"Authorization": f"Bearer {KEYS.sign(path)}"}
    client: FlaskClient = SEEDS["cds"]
    if raw is not None:
        return client.post(path, data=raw, content_type="application/json", headers=headers)
    return client.post(path, json=body, headers=headers)


def _check_cds_answer(response: Any, *, fuzzing: bool = True) -> None:
    if fuzzing:
        event(f"HTTP {response.status_code}")  # how the cases spread (pytest --hypothesis-show-statistics)
    assert response.status_code in CDS_ANSWERS, (response.status_code, response.get_data()[:300])
    answer = response.get_json()
    assert isinstance(answer, dict)
    if response.status_code == 200:
        assert isinstance(answer["cards"], list)
    else:
        assert answer["error"] and answer["message"]


def test_the_unharmed_seeds_give_cards() -> None:
    for service_id in (PATIENT_VIEW, ORDER_SELECT, ORDER_SIGN):
        response = _post(service_id, _seed_body(service_id))
        assert response.status_code == 200, response.get_json()
    assert _post(PATIENT_VIEW, _seed_body(PATIENT_VIEW)).get_json()["cards"]  # the seed reaches the card builders


@fuzz(800)
@given(service_id=st.sampled_from([PATIENT_VIEW, ORDER_SELECT, ORDER_SIGN]), edits=st.integers(1, 4), data=st.data())
def test_a_damaged_hook_request_is_answered_with_cards_or_a_4xx(
    service_id: str, edits: int, data: st.DataObject
) -> None:
    body = _seed_body(service_id)
    damage(body, data, edits)
    _check_cds_answer(_post(service_id, body))


@fuzz(300)
@given(body=JUNK, service_id=st.sampled_from([*SERVICES, "unknown-service"]))
def test_any_json_body_is_answered_with_a_4xx(body: Any, service_id: str) -> None:
    _check_cds_answer(_post(service_id, body))


@fuzz(300)
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_any_bytes_as_a_body_are_answered_with_a_4xx(raw: bytes) -> None:
    _check_cds_answer(_post(PATIENT_VIEW, None, raw=raw))


def _b64(value: Any) -> str:
    text = value if isinstance(value, bytes) else json.dumps(value).encode()
    return base64.urlsafe_b64encode(text).rstrip(b"=").decode()


@fuzz(500)
@given(
    header=JUNK,
    claims=JUNK | st.fixed_dictionaries({"iss": JUNK, "aud": JUNK, "exp": JUNK, "iat": JUNK, "jti": JUNK}),
    signature=st.binary(max_size=64),
    scheme=st.sampled_from(["Bearer ", "bearer ", "Basic ", "", "Bearer  "]),
)
def test_any_forged_token_is_a_generic_401(header: Any, claims: Any, signature: bytes, scheme: str) -> None:
    token = f"{_b64(header)}.{_b64(claims)}.{_b64(signature)}"
    client: FlaskClient = SEEDS["cds"]
    response = client.post(
        f"/cds-services/{PATIENT_VIEW}", json=_seed_body(PATIENT_VIEW), headers={"Authorization": scheme + token}
    )
    assert response.status_code == 401
    assert response.get_json()["error"] == "unauthorized"


@fuzz(300)
@given(
    header_extra=st.dictionaries(st.sampled_from(["jku", "kid", "alg", "typ", "crit", "x5u", "jwk"]), JUNK, max_size=3),
    claims_extra=st.dictionaries(st.sampled_from(["aud", "exp", "iat", "jti", "iss", "nbf", "sub"]), JUNK, max_size=3),
)
def test_a_validly_signed_token_with_damaged_claims_is_accepted_or_a_401(
    header_extra: dict[str, Any], claims_extra: dict[str, Any]
) -> None:
    path = f"/cds-services/{PATIENT_VIEW}"
    if "alg" in header_extra or "kid" in header_extra:
        return  # joserfc signs with the given key and algorithm only; those headers are fuzzed above
    try:
        token = KEYS.sign(path, header=header_extra, **claims_extra)
    except (TypeError, ValueError, JoseError):
        return  # the test's own signer (joserfc) refuses to write such a header; nothing is sent
    client: FlaskClient = SEEDS["cds"]
    response = client.post(path, json=_seed_body(PATIENT_VIEW), headers={"Authorization": f"Bearer {token}"})
    assert response.status_code in (200, 401), response.status_code


FEEDBACK_ENTRY = st.fixed_dictionaries(
    {
        "card": JUNK,
        "outcome": st.sampled_from(["accepted", "overridden", "x"]) | JUNK,
        "outcomeTimestamp": JUNK,
        "acceptedSuggestions": JUNK,
        "overrideReason": JUNK,
    }
)


@fuzz(300)
@given(body=JUNK | st.fixed_dictionaries({"feedback": st.lists(JUNK | FEEDBACK_ENTRY, max_size=3)}))
def test_any_feedback_body_is_stored_or_a_4xx(body: Any) -> None:
    path = f"/cds-services/{PATIENT_VIEW}/feedback"
    client: FlaskClient = SEEDS["cds"]
    response = client.post(path, json=body, headers={"Authorization": f"Bearer {KEYS.sign(path)}"})
    assert response.status_code in (200, 400), (response.status_code, response.get_data()[:300])


@pytest.mark.parametrize("path", hostile_files("hooks", "*.json"), ids=lambda p: p.name)
def test_every_hostile_hook_body_is_answered_with_a_4xx(path: Path) -> None:
    response = _post(PATIENT_VIEW, None, raw=path.read_bytes())
    _check_cds_answer(response, fuzzing=False)
    assert response.status_code != 200


# ---------------------------------------------------------------- the clinician app


@pytest.fixture(scope="module")
def smart_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flask]:
    from smart_launch.app import EXTENSION_KEY
    from smart_launch.app import create_app as create_smart_app
    from smart_launch.config import SmartAppConfig
    from smart_launch.oauth import ClientRegistration

    registration = ClientRegistration(
        fhir_base="http://127.0.0.1:9/fhir", client_id="imaging-cds", redirect_uri="http://127.0.0.1:5/app/callback"
    )
    app = create_smart_app(
        SmartAppConfig(
            clients=(registration,),
            data_dir=tmp_path_factory.mktemp("fuzz-app"),
            dicomweb_allow_list=AllowList.of(["http://127.0.0.1:9/dicom-web"]),
            secure_cookies=False,
            http_timeout_s=2.0,
        )
    )
    yield app
    app.extensions[EXTENSION_KEY].close()


ROUTES = [
    ("GET", "/launch"), ("GET", "/callback"), ("POST", "/logout"), ("GET", "/"), ("GET", "/studies/{id}"),
    ("POST", "/studies/{id}/analyze"), ("GET", "/jobs/{id}"), ("GET", "/jobs/{id}/status"), ("GET", "/reports/{id}"),
    ("GET", "/media/{id}"), ("POST", "/reports/{id}/review"), ("GET", "/smart-static/app.css"), ("GET", "/{id}"),
]  # fmt: skip
PARAM_NAMES = st.sampled_from(["iss", "launch", "code", "state", "error", "error_description", "wait", "analyzer",
                               "csrf_token", "decision", "reason", "note", "aud", "x"])  # fmt: skip
PARAM_VALUES = st.text(max_size=40) | st.sampled_from(
    ["http://127.0.0.1:9/fhir", "http://169.254.169.254/", "1e9", "-1", "nan", "ct-emphysema", "accept", "%00"]
)


@fuzz(800)
@given(
    route=st.sampled_from(ROUTES),
    resource_id=st.text(max_size=30) | st.sampled_from(["1", "..", "%2e%2e", "a/b", "x" * 300]),
    params=st.lists(st.tuples(PARAM_NAMES, PARAM_VALUES), max_size=4),
    cookie=st.none() | st.text(max_size=60),
    accept_json=st.booleans(),
)
def test_any_request_to_the_app_is_answered_without_a_500(
    smart_app: Flask,
    route: tuple[str, str],
    resource_id: str,
    params: list[tuple[str, str]],
    cookie: str | None,
    accept_json: bool,
) -> None:
    method, template = route
    client = smart_app.test_client()  # each case starts without the cookies an earlier case set
    if cookie is not None:
        from smart_launch.app import SESSION_COOKIE

        client.set_cookie(SESSION_COOKIE, cookie)
    path = template.replace("{id}", resource_id.replace("/", "%2F").replace("?", "%3F").replace("#", "%23"))
    headers = {"Accept": "application/json"} if accept_json else {}
    if method == "GET":
        response = client.get(path, query_string=params, headers=headers)
    else:
        response = client.post(path, data=dict(params), headers=headers)
    assert response.status_code < 500 or response.status_code in (502, 503, 504), (
        method,
        path,
        response.status_code,
        response.get_data()[:300],
    )

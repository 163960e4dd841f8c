"""CDS Hooks service against the real FHIR server: discovery, the three hooks with full, partial and no
prefetch, cards field by field, suggestion resources against the R4 schema, feedback, errors and CORS.

The FHIR server (sekmet-fhir, open, no auth) accepts any bearer token, so fetching "with
fhirAuthorization" here proves the token is sent and the data read, not that the server checks it.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from flask.testing import FlaskClient

from cds.app import create_app
from cds.cards import OVERRIDE_REASON_SYSTEM, SUMMARY_MAX_CHARS, mid_sentence
from cds.prefetch import PrefetchUnavailableError, resolve_prefetch
from cds.services import AI_REPORTS_KEY, IMAGING_STUDIES_KEY, ORDER_SELECT, ORDER_SIGN, PATIENT_VIEW, SERVICES
from devtools.servers import FhirServer
from fhir_adapters.constants import CATEGORY_CODESYSTEM
from tests.cds_support import (
    APP_LAUNCH,
    MODEL_CARDS,
    EhrKeys,
    bone_result,
    create_patient,
    create_study,
    emphysema_result,
    make_config,
    normal_emphysema_result,
    post_result,
    prefetch_for,
    recording_listener,
    sign_off,
)

SCHEMA_PATH = Path("/work/shared/fhir/fhir.schema.json")


@cache
def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def assert_valid_r4(resource: dict[str, Any]) -> None:
    schema = _schema()
    definition = {**schema, "$ref": f"#/definitions/{resource['resourceType']}"}
    jsonschema.Draft6Validator(definition).validate(resource)


@dataclass(frozen=True)
class Patient:
    """One patient in the real FHIR server, with the ids a test needs."""

    id: str
    chest_ct: str  # ImagingStudy id with emphysema + bone AI results
    emphysema_report: str
    bone_report: str


@pytest.fixture(scope="module")
def keys() -> EhrKeys:
    return EhrKeys()


@pytest.fixture(scope="module")
def patient(fhir_base: FhirServer) -> Patient:
    """A patient with a chest CT analysed twice: emphysema (preliminary) and low L1 attenuation (signed)."""
    base = fhir_base.base_url
    patient_id = create_patient(base)
    started = "2025-06-01T09:30:00Z"
    study = create_study(base, patient_id, started=started)
    emphysema = post_result(base, patient_id, study, emphysema_result(12.35), started=started)
    bone = post_result(base, patient_id, study, bone_result(86.0), started=started)
    sign_off(base, bone)
    return Patient(patient_id, study, emphysema, bone)


@pytest.fixture
def client(tmp_path: Path, keys: EhrKeys, fhir_base: FhirServer) -> FlaskClient:
    return create_app(make_config(tmp_path, keys, fhir_base.base_url, recent_days=3650)).test_client()


Call = Callable[..., Any]


@pytest.fixture
def call(client: FlaskClient, keys: EhrKeys) -> Call:
    """POST a hook request to a service with a fresh, valid CDS client JWT."""

    def post(service_id: str, body: Any, *, path_suffix: str = "") -> Any:
        path = f"/cds-services/{service_id}{path_suffix}"
        return client.post(path, json=body, headers={"Authorization": f"Bearer {keys.sign(path)}"})

    return post


def hook_body(hook: str, context: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"hook": hook, "hookInstance": str(uuid.uuid4()), "context": context, **extra}


def fetch_via(fhir_base: FhirServer) -> dict[str, Any]:
    return {
        "fhirServer": fhir_base.base_url,
        "fhirAuthorization": {
            "access_token": "ehr-issued",
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/*.read",
            "subject": "cds-service",
        },
    }


def chest_ct_order(patient_id: str, order_id: str = "draft-chest-ct", **fields: Any) -> dict[str, Any]:
    order: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "id": order_id,
        "status": "draft",
        "intent": "order",
        "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "363679005", "display": "Imaging"}]}],
        "code": {
            "coding": [{"system": "http://loinc.org", "code": "24627-2", "display": "CT Chest"}],
            "text": "CT chest",
        },
        "subject": {"reference": f"Patient/{patient_id}"},
    }
    order.update(fields)
    return order


def draft_orders(*orders: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": o} for o in orders]}


def check_card_basics(card: dict[str, Any]) -> None:
    """What every card must carry, per CDS Hooks 2.0 and this project."""
    assert uuid.UUID(card["uuid"]).version == 7  # time-ordered: the issued-card table's key (cds.cards)
    assert 0 < len(card["summary"]) <= SUMMARY_MAX_CHARS
    assert card["indicator"] in ("info", "warning", "critical")
    assert card["source"]["label"].startswith("imaging-cds")
    assert card["source"]["url"].startswith(f"{MODEL_CARDS}/models")
    for link in card.get("links", []):
        assert link["type"] == "smart" and link["url"] == APP_LAUNCH
        assert isinstance(json.loads(link["appContext"]), dict)


def by_analyzer(cards: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["source"]["label"].removeprefix("imaging-cds "): c for c in cards}


# ---------------------------------------------------------------- import and discovery


def test_the_service_imports_and_builds_without_torch(tmp_path: Path) -> None:
    code = (
        "import sys; import cds.app, cds.cards, cds.security, cds.feedback, cds.prefetch; "
        "print('torch' in sys.modules, 'monai' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent
    )
    assert out.stdout.split() == ["False", "False"]


def test_discovery_lists_the_three_hooks_with_prefetch_templates(client: FlaskClient, keys: EhrKeys) -> None:
    assert client.get("/cds-services").status_code == 401
    response = client.get("/cds-services", headers={"Authorization": f"Bearer {keys.sign('/cds-services')}"})
    assert response.status_code == 200
    services = {s["id"]: s for s in response.get_json()["services"]}
    assert {s["hook"] for s in services.values()} == {"patient-view", "order-select", "order-sign"}
    for service in services.values():
        assert service["title"] and service["description"] and service["usageRequirements"]
    prefetch = services[PATIENT_VIEW]["prefetch"]
    assert prefetch[IMAGING_STUDIES_KEY].startswith("ImagingStudy?patient={{context.patientId}}")
    assert prefetch[AI_REPORTS_KEY].startswith("DiagnosticReport?patient={{context.patientId}}")
    assert "_include=DiagnosticReport:result" in prefetch[AI_REPORTS_KEY]


# ---------------------------------------------------------------- patient-view


@pytest.mark.parametrize(
    ("display", "in_a_sentence"),
    [
        ("No emphysema by CT densitometry (LAA-950 < 5%)", "no emphysema by CT densitometry (LAA-950 < 5%)"),
        ("Osteoporosis likely (<= 110 HU)", "osteoporosis likely (<= 110 HU)"),
        ("CT not assessable", "CT not assessable"),  # an acronym keeps its capitals
        ("L1 not identified", "L1 not identified"),
        ("Pneumonia", "pneumonia"),
    ],
)
def test_a_category_keeps_its_own_capitalisation_inside_a_card_sentence(display: str, in_a_sentence: str) -> None:
    assert mid_sentence(display) == in_a_sentence


def _check_patient_view_cards(cards: list[dict[str, Any]], patient: Patient) -> None:
    assert len(cards) == 2
    for card in cards:
        check_card_basics(card)
    cards_by = by_analyzer(cards)
    emphysema, bone = cards_by["ct-emphysema"], cards_by["ct-bone"]
    # The emphysema result awaits review: the summary says so, with the category.
    # The category as written, in the sentence: only its capitalised first word is lower-cased, not "LAA-950".
    assert "awaiting review; latest moderate emphysema (LAA-950 10-20%)" in emphysema["summary"]
    assert emphysema["indicator"] == "warning"
    assert emphysema["source"] == {
        "label": "imaging-cds ct-emphysema",
        "url": f"{MODEL_CARDS}/models/ct-emphysema",
        "topic": {
            "system": emphysema["source"]["topic"]["system"],
            "code": "ct-emphysema",
            "display": "CT emphysema quantification",
        },
    }
    # The value as filed (two decimals), not re-rounded for the card.
    assert " 12.35 %" in emphysema["detail"] and patient.emphysema_report in emphysema["detail"]
    assert "2025-06-01" in emphysema["detail"]
    app_context = json.loads(emphysema["links"][0]["appContext"])
    assert app_context == {
        "diagnosticReport": patient.emphysema_report,
        "imagingStudy": f"ImagingStudy/{patient.chest_ct}",
    }
    assert {r["code"] for r in emphysema["overrideReasons"]} >= {"disagree-with-ai", "not-relevant"}
    assert all(r["system"] == OVERRIDE_REASON_SYSTEM for r in emphysema["overrideReasons"])
    # The bone result was signed by a clinician: a notable signed finding, with its HU value.
    assert "signed 2025-06-01" in bone["summary"] and "osteoporosis likely (L1 <= 100 HU)" in bone["summary"]
    assert "attenuation 86 HU" in bone["detail"]
    assert bone["indicator"] == "warning"


def test_patient_view_with_full_prefetch_summarises_both_findings(
    call: Call, patient: Patient, fhir_base: FhirServer
) -> None:
    body = hook_body(
        "patient-view",
        {"patientId": patient.id, "userId": "Practitioner/1"},
        prefetch=prefetch_for(fhir_base.base_url, PATIENT_VIEW, patient.id),
    )
    response = call(PATIENT_VIEW, body)
    assert response.status_code == 200, response.get_json()
    _check_patient_view_cards(response.get_json()["cards"], patient)


def test_patient_view_without_prefetch_fetches_from_fhir_server(
    call: Call, patient: Patient, fhir_base: FhirServer
) -> None:
    body = hook_body("patient-view", {"patientId": patient.id, "userId": "Practitioner/1"}, **fetch_via(fhir_base))
    response = call(PATIENT_VIEW, body)
    assert response.status_code == 200, response.get_json()
    _check_patient_view_cards(response.get_json()["cards"], patient)


def test_patient_view_with_partial_prefetch_fetches_the_missing_key(
    call: Call, patient: Patient, fhir_base: FhirServer
) -> None:
    prefetch = prefetch_for(fhir_base.base_url, PATIENT_VIEW, patient.id)
    del prefetch[AI_REPORTS_KEY]  # the EHR sent the studies but not the reports
    body = hook_body("patient-view", {"patientId": patient.id}, prefetch=prefetch, **fetch_via(fhir_base))
    response = call(PATIENT_VIEW, body)
    assert response.status_code == 200
    _check_patient_view_cards(response.get_json()["cards"], patient)


def test_an_operation_outcome_in_a_prefetch_slot_is_fetched_again_or_412(
    call: Call, patient: Patient, fhir_base: FhirServer
) -> None:
    failed = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "timeout"}]}
    prefetch = {**prefetch_for(fhir_base.base_url, PATIENT_VIEW, patient.id), AI_REPORTS_KEY: failed}
    with_server = call(
        PATIENT_VIEW, hook_body("patient-view", {"patientId": patient.id}, prefetch=prefetch, **fetch_via(fhir_base))
    )
    assert with_server.status_code == 200
    assert len(with_server.get_json()["cards"]) == 2
    without_server = call(PATIENT_VIEW, hook_body("patient-view", {"patientId": patient.id}, prefetch=prefetch))
    assert without_server.status_code == 412
    assert "aiReports" in without_server.get_json()["message"]


def test_patient_view_with_no_findings_returns_no_cards(call: Call, fhir_base: FhirServer) -> None:
    base = fhir_base.base_url
    quiet = create_patient(base)
    study = create_study(base, quiet, started="2025-02-01T10:00:00Z")
    post_result(base, quiet, study, normal_emphysema_result(), started="2025-02-01T10:00:00Z")
    sign_off_all = prefetch_for(base, PATIENT_VIEW, quiet)
    # A signed normal finding is not notable; here it is still preliminary, so it awaits review.
    response = call(PATIENT_VIEW, hook_body("patient-view", {"patientId": quiet}, prefetch=sign_off_all))
    cards = response.get_json()["cards"]
    assert len(cards) == 1 and cards[0]["indicator"] == "info" and "awaiting review" in cards[0]["summary"]

    nobody = create_patient(base)
    fetched = call(PATIENT_VIEW, hook_body("patient-view", {"patientId": nobody}, **fetch_via(fhir_base)))
    assert fetched.status_code == 200 and fetched.get_json() == {"cards": []}
    nulls = call(
        PATIENT_VIEW,
        hook_body("patient-view", {"patientId": nobody}, prefetch={AI_REPORTS_KEY: None, IMAGING_STUDIES_KEY: None}),
    )
    assert nulls.status_code == 200 and nulls.get_json() == {"cards": []}


def test_a_signed_result_the_analyzer_could_not_assess_is_not_shown_as_a_finding(
    call: Call, fhir_base: FhirServer
) -> None:
    """A bone analysis whose vertebral level could not be identified is no finding, whatever its category is
    called: the report says so with its N conclusion code, and once signed it gets no card."""
    from models.base import AnalysisResult, Category, Measurement

    base = fhir_base.base_url
    patient = create_patient(base)
    study = create_study(base, patient, started="2025-03-01T10:00:00Z")
    unassessed = AnalysisResult(
        analyzer="ct-bone",
        version="0.1.0",
        measurements=(
            Measurement("vertebral_trabecular_hu", "Trabecular attenuation, level unknown", 140.0, "[hnsf'U]"),
        ),
        category=Category("level-not-identified", "Vertebral level not identified", "no rule applied", abnormal=False),
        conclusion="No vertebral level could be identified; the osteoporosis thresholds were not applied.",
    )
    report = post_result(base, patient, study, unassessed, started="2025-03-01T10:00:00Z")
    sign_off(base, report)
    response = call(PATIENT_VIEW, hook_body("patient-view", {"patientId": patient}, **fetch_via(fhir_base)))
    assert response.status_code == 200
    assert response.get_json() == {"cards": []}


def test_missing_prefetch_without_fhir_server_is_412(call: Call, patient: Patient) -> None:
    response = call(PATIENT_VIEW, hook_body("patient-view", {"patientId": patient.id}))
    assert response.status_code == 412
    assert "fhirServer" in response.get_json()["message"]


def test_another_patients_report_in_the_prefetch_is_never_shown(
    call: Call, patient: Patient, fhir_base: FhirServer
) -> None:
    other = create_patient(fhir_base.base_url)
    prefetch = prefetch_for(fhir_base.base_url, PATIENT_VIEW, patient.id)  # built for the wrong patient
    response = call(PATIENT_VIEW, hook_body("patient-view", {"patientId": other}, prefetch=prefetch))
    assert response.get_json() == {"cards": []}


# ---------------------------------------------------------------- order-select


def test_order_select_chest_ct_brings_prior_findings_with_valid_suggestions(
    call: Call, patient: Patient, fhir_base: FhirServer
) -> None:
    order = chest_ct_order(patient.id, encounter={"reference": "Encounter/enc-1"})
    context = {
        "patientId": patient.id,
        "userId": "Practitioner/doc-1",
        "selections": ["ServiceRequest/draft-chest-ct"],
        "draftOrders": draft_orders(order),
    }
    body = hook_body("order-select", context, prefetch=prefetch_for(fhir_base.base_url, ORDER_SELECT, patient.id))
    response = call(ORDER_SELECT, body)
    assert response.status_code == 200, response.get_json()
    cards = by_analyzer(response.get_json()["cards"])
    followup = cards.pop("imaging-cds")  # the service's note on what a new chest CT will be compared with
    check_card_basics(followup)
    assert followup["indicator"] == "info" and "will be compared" in followup["summary"]
    assert set(cards) == {"ct-emphysema", "ct-bone"}
    for card in cards.values():
        check_card_basics(card)
        assert card["indicator"] == "warning" and card["selectionBehavior"] == "any"
        for suggestion in card["suggestions"]:
            uuid.UUID(suggestion["uuid"])
            for action in suggestion["actions"]:
                assert_valid_r4(action["resource"])
    emphysema = cards["ct-emphysema"]
    assert emphysema["summary"].startswith("Prior AI finding: moderate emphysema (LAA-950 10-20%)")
    assert "awaiting clinician review" in emphysema["summary"]
    (update,) = emphysema["suggestions"]
    action = update["actions"][0]
    assert action["type"] == "update" and action["resource"]["id"] == "draft-chest-ct"
    assert patient.emphysema_report in action["resource"]["note"][-1]["text"]
    assert "12.35 %" in action["resource"]["note"][-1]["text"]
    assert json.loads(emphysema["links"][0]["appContext"])["serviceRequest"] == "ServiceRequest/draft-chest-ct"

    bone = cards["ct-bone"]
    dxa, note = bone["suggestions"]
    proposal = dxa["actions"][0]["resource"]
    assert dxa["actions"][0]["type"] == "create" and dxa["isRecommended"] is True  # the bone report is signed
    assert proposal["status"] == "draft" and proposal["intent"] == "proposal"
    assert {"system": "http://loinc.org", "code": "38269-7"}.items() <= proposal["code"]["coding"][0].items()
    assert proposal["subject"] == {"reference": f"Patient/{patient.id}"}
    assert proposal["reasonReference"] == [{"reference": patient.bone_report}]
    assert proposal["requester"] == {"reference": "Practitioner/doc-1"}
    assert proposal["encounter"] == {"reference": "Encounter/enc-1"}
    assert note["actions"][0]["type"] == "update"


def test_order_select_spine_and_head_orders_get_only_relevant_findings(
    call: Call, patient: Patient, fhir_base: FhirServer
) -> None:
    spine = chest_ct_order(patient.id, "draft-spine", code={"text": "XR Lumbar spine 2 views"})
    head = chest_ct_order(patient.id, "draft-head", code={"text": "CT Head without contrast"})
    prefetch = prefetch_for(fhir_base.base_url, ORDER_SELECT, patient.id)
    context = {
        "patientId": patient.id,
        "selections": ["ServiceRequest/draft-spine"],
        "draftOrders": draft_orders(spine, head),
    }
    spine_cards = call(ORDER_SELECT, hook_body("order-select", context, prefetch=prefetch)).get_json()["cards"]
    assert set(by_analyzer(spine_cards)) == {"ct-bone"}  # low vertebral attenuation for a spine study
    context["selections"] = ["ServiceRequest/draft-head"]
    assert call(ORDER_SELECT, hook_body("order-select", context, prefetch=prefetch)).get_json() == {"cards": []}


def test_order_select_without_prefetch_fetches_and_skips_dxa_when_dxa_is_ordered(
    call: Call, patient: Patient, fhir_base: FhirServer
) -> None:
    chest = chest_ct_order(patient.id)
    dxa = chest_ct_order(patient.id, "draft-dxa", code={"text": "DXA bone density hip and spine"})
    context = {
        "patientId": patient.id,
        "selections": ["ServiceRequest/draft-chest-ct"],
        "draftOrders": draft_orders(chest, dxa),
    }
    response = call(ORDER_SELECT, hook_body("order-select", context, **fetch_via(fhir_base)))
    bone = by_analyzer(response.get_json()["cards"])["ct-bone"]
    assert [s["actions"][0]["type"] for s in bone["suggestions"]] == ["update"]


# ---------------------------------------------------------------- order-sign


def test_order_sign_says_which_studies_lack_ai_results_and_whether_they_were_queued(
    tmp_path: Path, keys: EhrKeys, patient: Patient, fhir_base: FhirServer
) -> None:
    base = fhir_base.base_url
    unanalysed = create_study(base, patient.id, started="2026-01-10T08:00:00Z", based_on="ServiceRequest/draft-fu")
    supporting = create_study(base, patient.id, started="2025-12-01T08:00:00Z")
    order = chest_ct_order(
        patient.id,
        "draft-fu",
        supportingInfo=[{"reference": f"ImagingStudy/{supporting}"}, {"reference": f"ImagingStudy/{patient.chest_ct}"}],
    )
    context = {"patientId": patient.id, "draftOrders": draft_orders(order)}
    queued: list[str] = []

    def enqueue(study: str) -> str:
        queued.append(study)
        return f"job-{len(queued)}"

    for enqueue_analysis in (enqueue, None):
        app = create_app(
            make_config(tmp_path / str(bool(enqueue_analysis)), keys, base, enqueue_analysis=enqueue_analysis)
        )
        path = f"/cds-services/{ORDER_SIGN}"
        prefetch = prefetch_for(base, ORDER_SIGN, patient.id)
        del prefetch[IMAGING_STUDIES_KEY]  # partial prefetch: studies are fetched
        body = hook_body("order-sign", context, prefetch=prefetch, **fetch_via(fhir_base))
        response = app.test_client().post(path, json=body, headers={"Authorization": f"Bearer {keys.sign(path)}"})
        assert response.status_code == 200, response.get_json()
        cards = response.get_json()["cards"]
        for card in cards:
            check_card_basics(card)
        assert set(by_analyzer(cards)) == {"ct-emphysema", "ct-bone", "imaging-cds"}
        notice = next(c for c in cards if c["source"]["label"] == "imaging-cds")
        assert notice["indicator"] == "info"
        assert f"ImagingStudy/{supporting}" in notice["detail"] and f"ImagingStudy/{unanalysed}" in notice["detail"]
        assert f"ImagingStudy/{patient.chest_ct}" not in notice["detail"]  # it has AI results
        if enqueue_analysis is not None:
            assert notice["summary"] == "No AI results yet for 2 studies referenced by this order; analysis queued"
            assert sorted(queued) == sorted([f"ImagingStudy/{supporting}", f"ImagingStudy/{unanalysed}"])
            assert "job-1" in notice["detail"]
        else:
            assert notice["summary"] == "No AI results for 2 studies referenced by this order"
            assert "queued" not in notice["summary"] and "not queued for analysis" in notice["detail"]


# ---------------------------------------------------------------- feedback


def test_feedback_is_stored_and_feeds_per_analyzer_figures(
    tmp_path: Path, keys: EhrKeys, patient: Patient, fhir_base: FhirServer
) -> None:
    app = create_app(make_config(tmp_path, keys, fhir_base.base_url))
    client = app.test_client()
    order = chest_ct_order(patient.id)
    context = {
        "patientId": patient.id,
        "selections": ["ServiceRequest/draft-chest-ct"],
        "draftOrders": draft_orders(order),
    }
    path = f"/cds-services/{ORDER_SELECT}"
    body = hook_body("order-select", context, prefetch=prefetch_for(fhir_base.base_url, ORDER_SELECT, patient.id))
    cards = by_analyzer(
        client.post(path, json=body, headers={"Authorization": f"Bearer {keys.sign(path)}"}).get_json()["cards"]
    )
    bone, emphysema = cards["ct-bone"], cards["ct-emphysema"]
    feedback = {
        "feedback": [
            {
                "card": bone["uuid"],
                "outcome": "accepted",
                "acceptedSuggestions": [{"id": bone["suggestions"][0]["uuid"]}],
                "outcomeTimestamp": "2026-01-01T10:00:00Z",
            },
            {
                "card": emphysema["uuid"],
                "outcome": "overridden",
                "outcomeTimestamp": "2026-01-01T10:00:05Z",
                "overrideReason": {"reason": emphysema["overrideReasons"][0], "userComment": "motion artefact"},
            },
        ]
    }
    fb_path = f"{path}/feedback"
    stored = client.post(fb_path, json=feedback, headers={"Authorization": f"Bearer {keys.sign(fb_path)}"})
    assert stored.status_code == 200 and stored.get_json() == {"stored": 2}

    store = app.extensions["imaging_cds.cds"].feedback
    (row,) = store.feedback_for_card(emphysema["uuid"])
    assert row["analyzer"] == "ct-emphysema" and row["outcome"] == "overridden"
    assert row["override_code"] == "disagree-with-ai" and row["has_user_comment"] == 1
    assert "motion" not in json.dumps(row)  # free text is not kept
    figures = store.analyzer_figures()
    assert figures["ct-bone"].accepted == 1 and figures["ct-bone"].acceptance_rate == 1.0
    assert figures["ct-emphysema"].overridden == 1 and figures["ct-emphysema"].override_reasons == {
        "disagree-with-ai": 1
    }
    assert figures["ct-emphysema"].cards_issued == 1

    bad = client.post(
        fb_path,
        json={"feedback": [{"card": bone["uuid"], "outcome": "liked"}]},
        headers={"Authorization": f"Bearer {keys.sign(fb_path)}"},
    )
    assert bad.status_code == 400 and "outcome" in bad.get_json()["message"]


# ---------------------------------------------------------------- errors, trust and CORS


def test_unknown_service_is_404_and_malformed_bodies_are_400(call: Call, patient: Patient) -> None:
    assert call("no-such-service", hook_body("patient-view", {"patientId": patient.id})).status_code == 404
    not_json = call(PATIENT_VIEW, None)
    assert not_json.status_code == 400 and "JSON object" in not_json.get_json()["message"]
    no_patient = call(PATIENT_VIEW, hook_body("patient-view", {"userId": "Practitioner/1"}))
    assert no_patient.status_code == 400 and "context.patientId" in no_patient.get_json()["message"]
    wrong_hook = call(PATIENT_VIEW, hook_body("order-sign", {"patientId": patient.id}))
    assert wrong_hook.status_code == 400 and "patient-view" in wrong_hook.get_json()["message"]
    no_bundle = call(
        ORDER_SIGN, hook_body("order-sign", {"patientId": patient.id, "draftOrders": {"resourceType": "Patient"}})
    )
    assert no_bundle.status_code == 400 and "draftOrders" in no_bundle.get_json()["message"]


def _order_select_body(patient_id: str, prefetch: dict[str, Any]) -> dict[str, Any]:
    order = chest_ct_order(
        patient_id,
        bodySite=[{"text": "chest"}],
        note=[{"text": "Follow-up"}],
        encounter={"reference": "Encounter/enc-1"},
        supportingInfo=[{"reference": "ImagingStudy/prior-1"}],
    )
    context = {
        "patientId": patient_id,
        "userId": "Practitioner/doc-1",
        "selections": ["ServiceRequest/draft-chest-ct"],
        "draftOrders": draft_orders(order),
    }
    return hook_body("order-select", context, prefetch=prefetch)


@pytest.mark.parametrize(
    ("where", "value", "named"),
    [
        (("context", "selections"), [{"reference": "ServiceRequest/draft-chest-ct"}], "context.selections"),
        (("context", "draftOrders", "entry"), {"resource": {}}, "context.draftOrders.entry is not an array"),
        (("context", "draftOrders", "entry", 0), "ServiceRequest/draft-chest-ct", "context.draftOrders.entry[0]"),
        (("context", "draftOrders", "entry", 0, "resource"), [], "context.draftOrders.entry[0].resource"),
        (("prefetch", AI_REPORTS_KEY, "entry"), 3, f"prefetch.{AI_REPORTS_KEY}.entry is not an array"),
        (("prefetch", IMAGING_STUDIES_KEY, "entry", 0, "resource"), "x", f"prefetch.{IMAGING_STUDIES_KEY}.entry[0]"),
    ],
)
def test_a_hook_request_whose_structure_cannot_be_read_is_400_naming_the_element(
    call: Call, patient: Patient, fhir_base: FhirServer, where: tuple[str | int, ...], value: Any, named: str
) -> None:
    body = _order_select_body(patient.id, prefetch_for(fhir_base.base_url, ORDER_SELECT, patient.id))
    parent = body
    for step in where[:-1]:
        parent = parent[step]
    parent[where[-1]] = value
    response = call(ORDER_SELECT, body)
    assert response.status_code == 400
    assert named in response.get_json()["message"]


def test_wrong_json_types_inside_resources_read_as_absent_and_never_fail_a_hook(
    call: Call, patient: Patient, fhir_base: FhirServer
) -> None:
    """Every element of real hook requests (their draft order and every resource of the real prefetch), in turn
    given a value of the wrong JSON type: the service answers 200, or 400 naming the element, never a 5xx; and
    the reports stay readable where the broken element is not one they are recognised by."""
    prefetch = prefetch_for(fhir_base.base_url, ORDER_SELECT, patient.id)
    order_select = _order_select_body(patient.id, prefetch)
    patient_view = hook_body("patient-view", {"patientId": patient.id}, prefetch=prefetch)

    def elements(value: Any, path: tuple[str | int, ...]) -> Iterator[tuple[str | int, ...]]:
        yield path
        children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, child in children:
            yield from elements(child, (*path, key))

    statuses: dict[int, int] = {}
    for service, body in ((ORDER_SELECT, order_select), (PATIENT_VIEW, patient_view)):
        for path in elements(body, ()):
            if path[:1] not in (("context",), ("prefetch",)) or len(path) < 3:
                continue  # the request's own top-level fields are covered by the tests above
            for wrong in (7, "text", [7], {}):
                broken = copy.deepcopy(body)
                parent = broken
                for step in path[:-1]:
                    parent = parent[step]
                parent[path[-1]] = wrong
                response = call(service, broken)
                assert response.status_code in (200, 400), (path, wrong, response.status_code)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
    assert statuses[200] > statuses.get(400, 0) > 0

    # A report whose Observations list cannot be read is still summarised, by its conclusion code.
    broken = copy.deepcopy(patient_view)
    for entry in broken["prefetch"][AI_REPORTS_KEY]["entry"]:
        if entry["resource"]["resourceType"] == "DiagnosticReport":
            entry["resource"]["result"] = "not a list"
    response = call(PATIENT_VIEW, broken)
    assert response.status_code == 200
    assert set(by_analyzer(response.get_json()["cards"])) == {"ct-emphysema", "ct-bone"}


def test_a_fetched_bundle_that_cannot_be_read_is_412_not_no_findings() -> None:
    """A FHIR server whose search answer has unreadable entries: the hook says the data could not be read (412)
    instead of showing "no AI findings". (A pure function with the search as an argument: no FHIR server answers
    like this, so none is stood up.)"""

    def fetch(resource_type: str, params: list[tuple[str, str]]) -> dict[str, Any]:
        return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": "DiagnosticReport/1"}]}

    templates = SERVICES[PATIENT_VIEW].prefetch
    with pytest.raises(PrefetchUnavailableError, match=r"entry\[0\]\.resource"):
        resolve_prefetch(templates, None, {"patientId": "p1"}, fetch)


def test_any_valid_json_body_is_read_and_broken_json_is_400(
    client: FlaskClient, keys: EhrKeys, patient: Patient
) -> None:
    path = f"/cds-services/{PATIENT_VIEW}"
    body = hook_body(
        "patient-view", {"patientId": patient.id}, prefetch={AI_REPORTS_KEY: None, IMAGING_STUDIES_KEY: None}
    )
    # Valid JSON the fast parser refuses (an integer beyond 64 bits, NaN) is still read, as the standard library does.
    raw = json.dumps(body)[:-1] + ', "extension": {"big": 123456789012345678901234567890, "nan": NaN}}'
    for data, status in ((raw, 200), (raw[:-2], 400)):
        headers = {"Authorization": f"Bearer {keys.sign(path)}", "Content-Type": "application/json"}
        response = client.post(path, data=data, headers=headers)
        assert response.status_code == status
    assert response.get_json()["message"].startswith("The request body must be a JSON object")


def test_fhir_server_outside_the_allow_list_is_refused_without_a_request(call: Call, patient: Patient) -> None:
    with recording_listener() as (url, connections):
        body = hook_body(
            "patient-view",
            {"patientId": patient.id},
            fhirServer=f"{url}/fhir",
            fhirAuthorization={"access_token": "secret-token", "token_type": "Bearer"},
        )
        response = call(PATIENT_VIEW, body)
    assert response.status_code == 403
    assert "allow-list" in response.get_json()["message"] and "secret-token" not in response.get_data(as_text=True)
    assert connections == []
    metadata = call(
        PATIENT_VIEW, hook_body("patient-view", {"patientId": patient.id}, fhirServer="http://169.254.169.254/fhir")
    )
    assert metadata.status_code == 403


def test_cors_preflight_and_responses_allow_browser_cds_clients(
    client: FlaskClient, call: Call, patient: Patient
) -> None:
    preflight = client.options(
        f"/cds-services/{PATIENT_VIEW}",
        headers={
            "Origin": "https://ehr.example.org",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "*"
    allowed = {h.strip().lower() for h in preflight.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    answered = call(
        PATIENT_VIEW,
        hook_body(
            "patient-view", {"patientId": patient.id}, prefetch={AI_REPORTS_KEY: None, IMAGING_STUDIES_KEY: None}
        ),
    )
    assert answered.headers["Access-Control-Allow-Origin"] == "*"


def test_category_codes_are_read_from_the_project_codesystem(patient: Patient, fhir_base: FhirServer) -> None:
    """Guard the contract with the builders: conclusionCode carries '<analyzer>/<category>' in our CodeSystem."""
    prefetch = prefetch_for(fhir_base.base_url, PATIENT_VIEW, patient.id)
    codes = {
        c["code"]
        for e in prefetch[AI_REPORTS_KEY]["entry"]
        if e["resource"]["resourceType"] == "DiagnosticReport"
        for cc in e["resource"]["conclusionCode"]
        for c in cc["coding"]
        if c["system"] == CATEGORY_CODESYSTEM
    }
    assert codes == {"ct-emphysema/moderate", "ct-bone/osteoporosis"}

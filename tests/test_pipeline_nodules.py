"""Issue 18 acceptance through the whole pipeline: real CTs in Orthanc, lung nodules filed in the real FHIR server.

lung1 (a real chest CT with one labelled nodule, 5 mm slices) reaches the EHR as a DiagnosticReport with one
Observation per nodule (the labelled one among them, with its category and key images), an exam-level Lung-RADS
Observation, and a conclusion with the highest category and its follow-up; a second run adds nothing. On Medplum's
FHIR engine, which takes no transaction that large, the same result is filed by ordered writes. An MR and a
head CT are refused with a clear reason. A chest CT without nodules reads "no nodules found" with the sensitivity
limits stated, not an empty report.

Every study here gets its own DICOM UIDs (derived from this module's name and the test's tag), so no other test's
images or filed results can match, whatever order the tests run in.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nrrd
import numpy as np
import pydicom
import pytest
import requests

from cds.cards import CardSettings, order_finding_cards
from cds.fhirjson import bundle_resources
from cds.orders import imaging_orders
from cds.services import AI_REPORTS_KEY, ORDER_SELECT
from core.allowlist import AllowList
from core.errors import ImageDataError, StudyError
from devtools.samples import (
    endpoint_resource,
    imaging_study_resource,
    load_sample,
    read_dicom_folder,
    upload_series,
    with_new_uids,
)
from devtools.servers import FhirServer, OrthancServer
from fhir_adapters.client import FhirClient
from fhir_adapters.constants import FINDING_CODESYSTEM, FINDING_VALUE_CODESYSTEM, MEASUREMENT_CODESYSTEM
from fhir_adapters.results import extract_findings
from models.registry import get_analyzer
from pipeline.analysis import AnalysisOutcome, analyze_study
from smart_launch.views import report_view
from tests.cds_support import prefetch_for

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LUNG1_LABEL = SHARED / "ct" / "chest_pyradiomics" / "lung1_label.nrrd"


@pytest.fixture(scope="module")
def client(fhir_base: FhirServer) -> FhirClient:
    return FhirClient(fhir_base.base_url, session=requests.Session())


@pytest.fixture(scope="module")
def analyzer() -> Any:
    return get_analyzer("ct-lung-nodules")


def _load(client: FhirClient, orthanc: OrthancServer, datasets: list[pydicom.Dataset], tag: str) -> tuple[str, str]:
    """Store the series in Orthanc and register Patient (with age and sex), Endpoint and ImagingStudy."""
    datasets = with_new_uids(datasets, namespace=f"{__name__}/{tag}")
    upload_series(orthanc.url, datasets)
    patient = client.create(
        {
            "resourceType": "Patient",
            "name": [{"family": "Test", "given": [tag]}],
            "gender": "female",
            "birthDate": "1958-06-01",
        }
    )
    endpoint_json = endpoint_resource(orthanc.dicomweb_url)
    identifier = endpoint_json["identifier"][0]
    endpoint = client.create(endpoint_json, if_none_exist=f"identifier={identifier['system']}|{identifier['value']}")
    study = imaging_study_resource(
        datasets, patient_reference=f"Patient/{patient['id']}", endpoint_reference=f"Endpoint/{endpoint['id']}"
    )
    created = client.create(study)
    return f"ImagingStudy/{created['id']}", f"Patient/{patient['id']}"


def _read(client: FhirClient, reference: str) -> dict[str, Any]:
    resource_type, resource_id = reference.split("/")[-2:]
    return client.read(resource_type, resource_id)


def _count(client: FhirClient, resource_type: str, patient: str) -> int:
    bundle = client.search_bundle(resource_type, {"subject": patient, "_summary": "count"})
    return int(bundle.get("total", 0))


def _project_code(concept: dict[str, Any], system: str) -> str | None:
    return next((c["code"] for c in concept.get("coding", []) if c["system"] == system), None)


def _components(observation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["code"]["coding"][-1]["code"]: c for c in observation.get("component", [])}


@pytest.fixture(scope="module")
def lung1(client: FhirClient, orthanc: OrthancServer) -> tuple[str, str]:
    return _load(client, orthanc, load_sample("lung1"), "lung1")


@pytest.fixture(scope="module")
def lung1_run(client: FhirClient, lung1: tuple[str, str], analyzer: Any, allow: AllowList) -> AnalysisOutcome:
    return analyze_study(client, lung1[0], analyzer, dicomweb_allow_list=allow)


def test_lung1_nodule_is_filed_with_its_measurements_category_and_key_images(
    client: FhirClient, lung1_run: AnalysisOutcome
) -> None:
    report = _read(client, lung1_run.diagnostic_report)
    observations = [_read(client, r["reference"]) for r in report["result"]]
    nodules = [o for o in observations if _project_code(o["code"], FINDING_CODESYSTEM) == "lung_nodule"]
    assert nodules, "no nodule Observation filed"
    # The labelled nodule: right upper lung, 13-14 mm across, 3 slices (slices 33-35 of 48, counted from 1).
    label, _ = nrrd.read(str(LUNG1_LABEL))
    label_slices = {int(k) + 1 for k in np.nonzero(label.any(axis=(0, 1)))[0]}
    labelled = [
        n
        for n in nodules
        if n["bodySite"]["coding"][0]["display"] == "Right lung"
        and any(f"slice {k} of 48" in _components(n)["location"]["valueString"] for k in label_slices)
    ]
    assert len(labelled) == 1, [n["code"]["text"] for n in nodules]
    nodule = _components(labelled[0])
    mean = nodule["nodule_mean_diameter_mm"]["valueQuantity"]
    assert mean["code"] == "mm" and 10.0 <= mean["value"] <= 16.0
    long, short = (nodule[k]["valueQuantity"]["value"] for k in ("nodule_long_axis_mm", "nodule_short_axis_mm"))
    # The mean is taken from the unrounded axes, then rounded: within 0.1 mm of the mean of the rounded ones.
    assert long >= short and mean["value"] == pytest.approx((long + short) / 2, abs=0.1)
    assert nodule["nodule_type"]["valueCodeableConcept"]["coding"][0]["code"] == "nodule_type/solid"
    # A solid nodule of 8 to < 15 mm is Lung-RADS 4A.
    category = nodule["lung_rads"]["valueCodeableConcept"]["coding"][0]
    assert (category["system"], category["code"]) == (FINDING_VALUE_CODESYSTEM, "lung_rads/4A")
    # Its key images: the coronal projection and its own crop, both PNGs in the report's media.
    media = [d["reference"] for d in labelled[0]["derivedFrom"] if d["reference"].startswith("Media/")]
    assert len(media) >= 2 and set(media) <= {m["link"]["reference"] for m in report["media"]}
    crop = _read(client, media[1])
    assert base64.b64decode(crop["content"]["data"]).startswith(b"\x89PNG")
    # Age and sex came from the EHR, so the Brock probability is there, as a range.
    low, high = (
        nodule[k]["valueQuantity"]["value"] for k in ("brock_probability_low_percent", "brock_probability_high_percent")
    )
    assert 0.0 < low < high < 100.0


def test_lung1_report_gives_the_exam_category_and_the_follow_up(client: FhirClient, lung1_run: AnalysisOutcome) -> None:
    report = _read(client, lung1_run.diagnostic_report)
    exam = next(
        o
        for o in (_read(client, r["reference"]) for r in report["result"])
        if _project_code(o["code"], FINDING_CODESYSTEM) == "lung_rads"
    )
    code = exam["valueCodeableConcept"]["coding"][0]["code"]
    assert code in ("lung_rads/4A", "lung_rads/4B")  # at least the labelled nodule's 4A
    assert f"ct-lung-nodules/lung-rads-{code.split('/')[1]}" in [
        c["code"] for cc in report["conclusionCode"] for c in cc["coding"]
    ]
    assert f"Lung-RADS {code.split('/')[1]}" in report["conclusion"] and "months" in report["conclusion"]
    assert "5 mm thick" in report["conclusion"]  # the thick-slice warning travels with the report


def test_a_second_run_adds_nothing(
    client: FhirClient, lung1: tuple[str, str], lung1_run: AnalysisOutcome, analyzer: Any, allow: AllowList
) -> None:
    counts = {t: _count(client, t, lung1[1]) for t in ("DiagnosticReport", "Observation", "Media")}
    again = analyze_study(client, lung1[0], analyzer, dicomweb_allow_list=allow)
    assert again.already_present and again.diagnostic_report == lung1_run.diagnostic_report
    assert {t: _count(client, t, lung1[1]) for t in counts} == counts


def test_on_medplum_the_nodules_are_filed_by_ordered_writes_each_after_its_key_images(
    medplum: FhirServer, orthanc: OrthancServer, analyzer: Any, allow: AllowList
) -> None:
    # Medplum takes at most 8 entries in a transaction with conditional creates; lung1's nodule report has nearly 30, so
    # it is written one resource at a time, and each nodule's Observation names Media the server has already given
    # an id.
    client = FhirClient(medplum.base_url, session=requests.Session())
    study, patient = _load(client, orthanc, load_sample("lung1"), "lung1")
    outcome = analyze_study(client, study, analyzer, dicomweb_allow_list=allow)
    assert outcome.write_strategy == "ordered" and "at most 8" in outcome.write_reason
    report = _read(client, outcome.diagnostic_report)
    media = {m["link"]["reference"] for m in report["media"]}
    nodules = [
        o
        for o in (_read(client, r["reference"]) for r in report["result"])
        if _project_code(o["code"], FINDING_CODESYSTEM) == "lung_nodule"
    ]
    assert len(nodules) == len(outcome.result.findings) >= 1
    for nodule in nodules:
        key_images = {d["reference"] for d in nodule["derivedFrom"] if d["reference"].startswith("Media/")}
        assert key_images and key_images <= media
    counts = {t: _count(client, t, patient) for t in ("DiagnosticReport", "Observation", "Media")}
    assert counts == {"DiagnosticReport": 1, "Observation": len(report["result"]), "Media": len(media)}
    again = analyze_study(client, study, analyzer, dicomweb_allow_list=allow)
    assert again.already_present and again.diagnostic_report == outcome.diagnostic_report
    assert {t: _count(client, t, patient) for t in counts} == counts


def test_an_mr_study_is_refused_for_having_no_ct_series(
    client: FhirClient, orthanc: OrthancServer, analyzer: Any, allow: AllowList
) -> None:
    mr = read_dicom_folder(SHARED / "mr" / "brain_tcia_pgbm" / "Study3" / "26401-T1prereg-52906")
    study, patient = _load(client, orthanc, mr, "brain-mr")
    with pytest.raises(StudyError, match="CT"):
        analyze_study(client, study, analyzer, dicomweb_allow_list=allow)
    assert _count(client, "DiagnosticReport", patient) == 0


def test_a_head_ct_is_refused_with_the_reason_and_nothing_is_written(
    client: FhirClient, orthanc: OrthancServer, analyzer: Any, allow: AllowList, data_dir: Path
) -> None:
    # The project's only head CT has uneven slice gaps: the volume check refuses it before the analyzer would
    # (which refuses any CT with under 300 mL of lung in view; see test_nodule_validation for its input guard).
    study, patient = _load(client, orthanc, read_dicom_folder(data_dir / "ct" / "head_ge"), "head-ct")
    with pytest.raises(ImageDataError, match="slice spacing is uneven"):
        analyze_study(client, study, analyzer, dicomweb_allow_list=allow)
    assert _count(client, "DiagnosticReport", patient) == 0


def test_when_nothing_is_found_the_ehr_gets_no_nodules_found_with_the_limits_not_an_empty_report(
    client: FhirClient, orthanc: OrthancServer, analyzer: Any, allow: AllowList
) -> None:
    # No real chest CT without nodules is at hand: the shared data hold two chest CTs, each with a labelled lesion,
    # and on each the detector also lists false positives (see the card). So what the EHR receives when the detector
    # finds nothing is checked on lung1 read by the same analyzer with its network's operating threshold above any
    # probability, so that no candidate is accepted. Everything else (lungs, densitometry, categories, images, the
    # FHIR transaction) is the real pipeline: this checks the report, not the detector.
    silent = copy.copy(analyzer)
    silent._models = dataclasses.replace(analyzer.models, candidate_threshold=math.inf)
    study, patient = _load(client, orthanc, load_sample("lung1"), "lung1-nothing-found")
    outcome = analyze_study(client, study, silent, dicomweb_allow_list=allow)
    report = _read(client, outcome.diagnostic_report)
    assert report["conclusion"].startswith("No lung nodules of 4 mm or more were found. Sensitivity limits:")
    assert "thick slices" in report["conclusion"] and "mediastinum" in report["conclusion"]
    filed = [_read(client, r["reference"]) for r in report["result"]]
    observations = {_project_code(o["code"], FINDING_CODESYSTEM): o for o in filed}
    measured = {_project_code(o["code"], MEASUREMENT_CODESYSTEM): o for o in filed}
    assert "lung_nodule" not in observations, "a nodule Observation was filed although none was found"
    # Nothing found, but part of lung1's lungs lies outside its scanned range: the exam is not called negative
    # (Lung-RADS 1) but incomplete (0), and the conclusion says why and what to do.
    exam = observations["lung_rads"]["valueCodeableConcept"]["coding"][0]
    assert (exam["system"], exam["code"]) == (FINDING_VALUE_CODESYSTEM, "lung_rads/0")
    assert "outside the scanned range" in report["conclusion"]
    count = measured["lung_nodule_count"]
    assert count["valueQuantity"]["value"] == 0
    assert "thick slices" in " ".join(n["text"] for n in count.get("note", []))
    # The images still show what was searched: the coronal projection of the lungs and the (empty) nodule table.
    images = [_read(client, m["link"]["reference"]) for m in report["media"]]
    assert len(images) == 2 and all(base64.b64decode(i["content"]["data"]).startswith(b"\x89PNG") for i in images)
    assert _count(client, "DiagnosticReport", patient) == 1


# ---------------------------------------------------------------- the front doors read the filed nodules


def test_order_select_for_a_chest_ct_shows_the_prior_nodules_and_their_category(
    fhir_base: FhirServer, lung1: tuple[str, str], lung1_run: AnalysisOutcome
) -> None:
    patient_id = lung1[1].split("/")[1]
    prefetch = prefetch_for(fhir_base.base_url, ORDER_SELECT, patient_id)
    findings = extract_findings(bundle_resources(prefetch[AI_REPORTS_KEY]), patient_id=patient_id)
    [nodules] = [f for f in findings if f.analyzer == "ct-lung-nodules"]
    assert nodules.listed and nodules.listed[0].value("lung_rads") is not None
    order = {
        "resourceType": "ServiceRequest",
        "id": "draft-chest-ct",
        "status": "draft",
        "intent": "order",
        "code": {"coding": [{"system": "http://loinc.org", "code": "24627-2", "display": "CT Chest"}]},
        "subject": {"reference": lung1[1]},
    }
    orders = imaging_orders(
        {"resourceType": "Bundle", "entry": [{"resource": order}]}, ["ServiceRequest/draft-chest-ct"]
    )
    settings = CardSettings("https://app.example.org/launch", "https://cds.example.org", datetime.now(UTC))
    [card] = order_finding_cards(orders, findings, settings, patient_id=patient_id, user_id=None)
    assert card["source"]["label"] == "imaging-cds ct-lung-nodules" and card["indicator"] == "warning"
    assert "lung nodule" in card["summary"] and "Lung-RADS 4" in card["summary"]
    assert len(card["summary"]) < 140
    # Every listed nodule (up to five) is on the card with its size, site and category, as the analyzer said it.
    for item in nodules.listed[:5]:
        assert item.display in card["detail"]
    assert "Lung-RADS 4A" in card["detail"] and "right lung" in card["detail"]
    note = card["suggestions"][0]["actions"][0]["resource"]["note"][-1]["text"]
    assert nodules.listed[0].display in note


def test_the_app_lists_each_nodule_with_its_values_and_key_images(
    fhir_base: FhirServer, lung1_run: AnalysisOutcome
) -> None:
    report_id = lung1_run.diagnostic_report.split("/")[1]
    bundle = requests.get(
        f"{fhir_base.base_url}/DiagnosticReport",
        params={"_id": report_id, "_include": "DiagnosticReport:result"},
        timeout=30,
    ).json()
    resources = bundle_resources(bundle)
    report = next(r for r in resources if r["resourceType"] == "DiagnosticReport")
    view = report_view(report, resources)
    assert view.listed_heading == "Lung nodules" and len(view.listed) == len(lung1_run.result.findings)
    first = view.listed[0]
    assert first.title == lung1_run.result.findings[0].display
    assert any(v.display.startswith("Mean diameter") and v.unit == "mm" for v in first.values)
    assert ("Lung-RADS v2022 category", first.title.split(", ")[-1]) in first.attributes
    media = {image.media_id for image in view.images}
    assert len(first.images) == 2 and {i.media_id for i in first.images} <= media
    assert ("Lung-RADS v2022 category (exam)", view.category) in view.assessments

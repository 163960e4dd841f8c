"""Issue 21 acceptance through the whole pipeline: real brain MRI crops in Orthanc, hippocampal volumes in the real
FHIR server, the refusals with their reasons, and the CDS patient-view card that shows the filed result.

Every study here is stored under this module's own UIDs (``with_new_uids``), so other tests that load the same
samples, in any order, never change what these tests see. The patients are the tests' own, with demographics
chosen so that the nomogram applies (the crops' real patients' ages and sexes are not recorded).
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from flask.testing import FlaskClient
from pydicom.data import get_testdata_file

from cds.app import create_app
from cds.services import PATIENT_VIEW
from core.allowlist import AllowList
from core.errors import StudyError, UnsuitableInputError
from devtools.samples import endpoint_resource, imaging_study_resource, load_sample, upload_series, with_new_uids
from devtools.servers import FhirServer, OrthancServer
from fhir_adapters.client import FhirClient
from fhir_adapters.constants import MEASUREMENT_CODESYSTEM
from fhir_adapters.validation import validate_resource
from models.hippocampus import ADULT_RANGE_ML, HippocampusAnalyzer
from models.registry import get_analyzer
from pipeline.analysis import AnalysisOutcome, analyze_study
from tests.cds_support import EhrKeys, make_config, prefetch_for

REPO = Path(__file__).resolve().parents[1]
SHARED_MR = REPO.parent / "shared" / "data" / "mr" / "brain_tcia_pgbm"
NAMESPACE = "test_pipeline_hippocampus"


@pytest.fixture(scope="module")
def client(fhir_base: FhirServer) -> FhirClient:
    return FhirClient(fhir_base.base_url, session=requests.Session())


@pytest.fixture(scope="module")
def analyzer() -> HippocampusAnalyzer:
    built = get_analyzer("mr-hippocampus")
    assert isinstance(built, HippocampusAnalyzer)
    return built


Register = Callable[..., tuple[str, str]]


@pytest.fixture(scope="module")
def register(client: FhirClient, orthanc: OrthancServer) -> Register:
    """Store datasets in Orthanc under this module's UIDs and register them for a new patient: (study, patient)."""

    def store(datasets: list[pydicom.Dataset], tag: str, **patient: Any) -> tuple[str, str]:
        datasets = with_new_uids(datasets, namespace=f"{NAMESPACE}/{tag}")
        upload_series(orthanc.url, datasets)
        created = client.create({"resourceType": "Patient", "name": [{"family": "Test", "given": [tag]}], **patient})
        endpoint_json = endpoint_resource(orthanc.dicomweb_url)
        identifier = endpoint_json["identifier"][0]
        endpoint = client.create(
            endpoint_json, if_none_exist=f"identifier={identifier['system']}|{identifier['value']}"
        )
        study = imaging_study_resource(
            datasets, patient_reference=f"Patient/{created['id']}", endpoint_reference=f"Endpoint/{endpoint['id']}"
        )
        identifier = study["identifier"][0]
        stored = client.create(study, if_none_exist=f"identifier={identifier['system']}|{identifier['value']}")
        return f"ImagingStudy/{stored['id']}", f"Patient/{created['id']}"

    return store


def _read(client: FhirClient, reference: str) -> dict[str, Any]:
    resource_type, resource_id = reference.split("/")[-2:]
    return client.read(resource_type, resource_id)


def _reports_of(client: FhirClient, patient: str) -> int:
    return int(client.search_bundle("DiagnosticReport", {"subject": patient, "_summary": "count"}).get("total", 0))


def _observations_by_key(client: FhirClient, report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    observations = [_read(client, r["reference"]) for r in report["result"]]
    return {
        c["code"]: obs for obs in observations for c in obs["code"]["coding"] if c["system"] == MEASUREMENT_CODESYSTEM
    }


@pytest.fixture(scope="module")
def crop(register: Register) -> tuple[str, str]:
    """HippoCrop of TCIA PGBM-002 (study date 2020-01-19) for a woman born 1964-05-01: 55 on the study day."""
    return register(load_sample("hippocrop-1"), "crop-1", gender="female", birthDate="1964-05-01")


@pytest.fixture(scope="module")
def first_run(client: FhirClient, crop: tuple[str, str], analyzer: HippocampusAnalyzer, allow: AllowList) -> Any:
    return analyze_study(client, crop[0], analyzer, dicomweb_allow_list=allow)


def test_a_hippocrop_series_files_volumes_percentile_and_key_images(
    client: FhirClient, crop: tuple[str, str], first_run: AnalysisOutcome, analyzer: HippocampusAnalyzer
) -> None:
    report = _read(client, first_run.diagnostic_report)
    validate_resource(report)
    assert report["status"] == "preliminary"
    assert {"system": "http://loinc.org", "code": "24590-2", "display": "MR Brain"} in report["code"]["coding"]
    category = next(
        c["code"] for cc in report["conclusionCode"] for c in cc["coding"] if c["code"].startswith("mr-hippocampus/")
    )
    assert category in ("mr-hippocampus/within-normal-range", "mr-hippocampus/atrophy-suspected")
    by_key = _observations_by_key(client, report)
    total = by_key["right_hippocampus_volume_ml"]
    parts = [by_key[f"right_hippocampus_{p}_volume_ml"]["valueQuantity"]["value"] for p in ("anterior", "posterior")]
    assert total["valueQuantity"]["code"] == "mL"
    assert ADULT_RANGE_ML[0] <= total["valueQuantity"]["value"] <= ADULT_RANGE_ML[1]  # a real adult hippocampus
    assert sum(parts) == pytest.approx(total["valueQuantity"]["value"], abs=0.011)
    # the nomogram applies (a woman of 55, the right hippocampus by the crops' convention): the normal range starts at
    # the 5th percentile for her age, and the percentile is filed beside the volume
    assert 3.0 < total["referenceRange"][0]["low"]["value"] < 3.2
    percentile = by_key.get("right_hippocampus_volume_percentile")
    below_curves = "below the 2.5th" in report["conclusion"] or "above the 97.5th" in report["conclusion"]
    assert percentile is not None or below_curves
    assert "Nobis" in base64.b64decode(report["presentedForm"][0]["data"]).decode()
    media = [_read(client, m["link"]["reference"]) for m in report["media"]]
    assert [m["content"]["title"].split()[0] for m in media] == ["Coronal", "Sagittal"]
    assert all(base64.b64decode(m["content"]["data"]).startswith(b"\x89PNG") for m in media)
    device = _read(client, total["device"]["reference"])
    assert analyzer.model_sha256 in [i["value"] for i in device["identifier"]]
    [entry] = client.search_bundle("Provenance", {"target": first_run.diagnostic_report})["entry"]
    assert entry["resource"]["agent"][0]["who"]["reference"] == total["device"]["reference"]


def test_analysing_the_crop_again_writes_nothing_new(
    client: FhirClient, crop: tuple[str, str], first_run: AnalysisOutcome, analyzer: HippocampusAnalyzer,
    allow: AllowList,
) -> None:  # fmt: skip
    before = _reports_of(client, crop[1])
    again = analyze_study(client, crop[0], analyzer, dicomweb_allow_list=allow)
    assert again.already_present and again.diagnostic_report == first_run.diagnostic_report
    assert _reports_of(client, crop[1]) == before == 1


def test_the_crop_is_chosen_over_the_thick_t1_of_the_same_study(
    client: FhirClient, register: Register, analyzer: HippocampusAnalyzer, allow: AllowList
) -> None:
    study3 = [pydicom.dcmread(p) for p in sorted((SHARED_MR / "Study3").glob("*/*.dcm"))]
    assert {str(ds.SeriesDescription) for ds in study3} == {"HippoCrop", "T1pre_reg"}
    study, _ = register(study3, "study-3", gender="male", birthDate="1978-06-01")
    outcome = analyze_study(client, study, analyzer, dicomweb_allow_list=allow)
    assert outcome.series.description == "HippoCrop" and "'hippocrop'" in outcome.series.reason
    # a man: the nomogram held is for women, and the report says so instead of borrowing it
    assert outcome.result.category.code == "no-normative-reference"
    assert "women only" in outcome.result.conclusion


def test_the_5mm_t1_alone_is_refused_as_too_thick_and_nothing_is_written(
    client: FhirClient, register: Register, analyzer: HippocampusAnalyzer, allow: AllowList
) -> None:
    t1 = [pydicom.dcmread(p) for p in sorted((SHARED_MR / "Study3" / "26401-T1prereg-52906").glob("*.dcm"))]
    study, patient = register(t1, "t1-alone", gender="male", birthDate="1978-06-01")
    with pytest.raises(UnsuitableInputError, match=r"5\.0 mm thick.*at most 1\.5 mm"):
        analyze_study(client, study, analyzer, dicomweb_allow_list=allow)
    assert _reports_of(client, patient) == 0


def test_a_head_ct_is_refused_naming_the_modality(
    client: FhirClient, register: Register, analyzer: HippocampusAnalyzer, allow: AllowList
) -> None:
    head_ct = load_sample("head-ge")
    study, patient = register(head_ct, "head-ct")
    with pytest.raises(StudyError, match=r"is CT, the analyzer needs MR"):
        analyze_study(client, study, analyzer, dicomweb_allow_list=allow)
    assert _reports_of(client, patient) == 0


def test_a_shoulder_mr_is_refused_naming_the_body_part(
    client: FhirClient, register: Register, analyzer: HippocampusAnalyzer, allow: AllowList
) -> None:
    shoulder = [pydicom.dcmread(get_testdata_file("MR2_UNCR.dcm"))]
    assert str(shoulder[0].StudyDescription) == "SHOULDER" and not shoulder[0].get("BodyPartExamined")
    study, patient = register(shoulder, "shoulder")
    with pytest.raises(StudyError, match=r"shows the SHOULDER .*the analyzer reads BRAIN"):
        analyze_study(client, study, analyzer, dicomweb_allow_list=allow)
    assert _reports_of(client, patient) == 0


def test_the_patient_view_card_shows_the_hippocampal_result(
    tmp_path: Path, fhir_base: FhirServer, crop: tuple[str, str], first_run: AnalysisOutcome
) -> None:
    keys = EhrKeys()
    app: FlaskClient = create_app(make_config(tmp_path, keys, fhir_base.base_url, recent_days=36500)).test_client()
    patient_id = crop[1].removeprefix("Patient/")
    path = f"/cds-services/{PATIENT_VIEW}"
    body = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"patientId": patient_id, "userId": "Practitioner/1"},
        "prefetch": prefetch_for(fhir_base.base_url, PATIENT_VIEW, patient_id),
    }
    response = app.post(path, json=body, headers={"Authorization": f"Bearer {keys.sign(path)}"})
    assert response.status_code == 200, response.get_json()
    [card] = [c for c in response.get_json()["cards"] if c["source"]["label"] == "imaging-cds mr-hippocampus"]
    assert card["source"]["topic"]["display"] == "MR hippocampal volumetry"
    assert "awaiting review" in card["summary"]
    total = first_run.result.measurement("right_hippocampus_volume_ml").value
    assert f"{total:.15g} mL" in card["detail"] and first_run.diagnostic_report in card["detail"]
    assert card["indicator"] == ("warning" if first_run.result.category.abnormal else "info")

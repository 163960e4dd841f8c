"""Issue 2 acceptance: one study end to end against the real FHIR server and the real Orthanc, on real CT.

The chest CT ``lung2`` (non-emphysematous) is converted to DICOM, stored in Orthanc, registered in the FHIR
server, analysed, and the resources the EHR now holds are read back and checked field by field. Each failure
path must give its own clear error and leave the EHR untouched.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from pydicom.uid import generate_uid

from core.allowlist import AllowList
from core.errors import ImageDataError, NotAllowedError, PacsError, StudyError
from devtools.demo import LoadedStudy, load_sample_study
from devtools.samples import SAMPLES, SampleStudy, endpoint_resource, imaging_study_resource, load_sample
from devtools.servers import FhirServer, OrthancServer, fhir_server, free_port
from fhir_adapters.client import FhirClient
from fhir_adapters.constants import (
    AI_ASSERTED_SECURITY_CODE,
    ANALYSIS_IDENTIFIER_SYSTEM,
    DEVICE_IDENTIFIER_SYSTEM,
    MEASUREMENT_CODESYSTEM,
)
from fhir_adapters.validation import validate_resource
from models.registry import get_analyzer
from pipeline.analysis import AnalysisOutcome, analyze_study


@pytest.fixture(scope="module")
def own_fhir() -> Iterator[FhirServer]:
    """This module's own FHIR server. Its first analysis must meet an EHR that has never seen lung2's result:
    other modules analyse (and sign) the same sample on the session's shared server, in any order."""
    with fhir_server() as server:
        yield server


@pytest.fixture(scope="module")
def client(own_fhir: FhirServer) -> FhirClient:
    return FhirClient(own_fhir.base_url, session=requests.Session())


@pytest.fixture(scope="module")
def lung2(client: FhirClient, orthanc: OrthancServer) -> LoadedStudy:
    return load_sample_study(client, orthanc, SAMPLES["lung2"])


@pytest.fixture(scope="module")
def first_run(client: FhirClient, lung2: LoadedStudy, allow: AllowList) -> AnalysisOutcome:
    return analyze_study(client, lung2.imaging_study, get_analyzer("ct-emphysema"), dicomweb_allow_list=allow)


def _count(client: FhirClient, resource_type: str, params: dict[str, str]) -> int:
    bundle = client.search_bundle(resource_type, {**params, "_summary": "count"})
    return int(bundle.get("total", 0))


def _ai_resource_counts(client: FhirClient, patient: str) -> dict[str, int]:
    return {
        "DiagnosticReport": _count(client, "DiagnosticReport", {"subject": patient}),
        "Observation": _count(client, "Observation", {"subject": patient}),
        "Media": _count(client, "Media", {"subject": patient}),
    }


def _read(client: FhirClient, reference: str) -> dict[str, Any]:
    resource_type, resource_id = reference.split("/")[-2:]
    return client.read(resource_type, resource_id)


def test_lung2_report_is_preliminary_ai_result_linked_to_the_study(
    client: FhirClient, lung2: LoadedStudy, first_run: AnalysisOutcome
) -> None:
    report = _read(client, first_run.diagnostic_report)
    validate_resource(report)
    assert report["status"] == "preliminary"
    assert report["subject"]["reference"] == lung2.patient
    assert [s["reference"] for s in report["imagingStudy"]] == [lung2.imaging_study]
    assert report["category"][0]["coding"][0]["code"] == "RAD"
    assert any(sec["code"] == AI_ASSERTED_SECURITY_CODE for sec in report["meta"]["security"])
    assert report["identifier"][0]["system"] == ANALYSIS_IDENTIFIER_SYSTEM
    assert "no emphysema" in report["conclusion"].lower()
    assert "resultsInterpreter" not in report  # nobody has signed yet
    html = base64.b64decode(report["presentedForm"][0]["data"]).decode()
    assert "LAA-950" in html and lung2.series_uid in html


def test_lung2_observations_carry_measured_values_with_ucum_units(
    client: FhirClient, lung2: LoadedStudy, first_run: AnalysisOutcome
) -> None:
    report = _read(client, first_run.diagnostic_report)
    observations = [_read(client, r["reference"]) for r in report["result"]]
    by_key = {
        coding["code"]: obs
        for obs in observations
        for coding in obs["code"]["coding"]
        if coding["system"] == MEASUREMENT_CODESYSTEM
    }
    laa = by_key["laa950_percent"]["valueQuantity"]
    volume = by_key["lung_volume_ml"]["valueQuantity"]
    assert (laa["unit"], laa["system"], laa["code"]) == ("%", "http://unitsofmeasure.org", "%")
    # A non-emphysematous scan: well under the 5 % cut-off; lungs of an adult: litres.
    assert 0.0 <= laa["value"] < 5.0
    assert volume["code"] == "mL" and 2500 <= volume["value"] <= 8000
    for obs in observations:
        validate_resource(obs)
        assert obs["status"] == "preliminary"
        assert obs["category"][0]["coding"][0]["code"] == "imaging"
        assert obs["derivedFrom"][0]["reference"] == lung2.imaging_study
        assert obs["device"]["reference"].startswith("Device/")


def test_lung2_device_provenance_and_key_images(client: FhirClient, first_run: AnalysisOutcome) -> None:
    report = _read(client, first_run.diagnostic_report)
    observation = _read(client, report["result"][0]["reference"])
    device = _read(client, observation["device"]["reference"])
    assert {"system": DEVICE_IDENTIFIER_SYSTEM, "value": f"ct-emphysema@{first_run.result.version}"} in [
        {"system": i["system"], "value": i["value"]} for i in device["identifier"]
    ]
    assert device["version"][0]["value"] == first_run.result.version
    assert len(report["media"]) >= 1
    media = _read(client, report["media"][0]["link"]["reference"])
    assert base64.b64decode(media["content"]["data"]).startswith(b"\x89PNG")
    provenances = client.search_bundle("Provenance", {"target": first_run.diagnostic_report})
    [entry] = provenances["entry"]
    provenance = entry["resource"]
    assert provenance["agent"][0]["who"]["reference"] == observation["device"]["reference"]
    assert provenance["entity"][0]["what"]["reference"] == first_run.imaging_study


def test_second_run_adds_nothing(
    client: FhirClient, lung2: LoadedStudy, first_run: AnalysisOutcome, allow: AllowList
) -> None:
    before = _ai_resource_counts(client, lung2.patient)
    devices_before = _count(client, "Device", {})
    again = analyze_study(
        client, lung2.imaging_study, get_analyzer("ct-emphysema"), dicomweb_allow_list=allow, keep_filed=True
    )
    assert again.diagnostic_report.split("/")[-1] == first_run.diagnostic_report.split("/")[-1]
    assert again.already_present
    # Asked for them, the EHR answers with what it already held: the report as stored, and its results.
    report = again.filed[again.diagnostic_report]
    assert report == client.read("DiagnosticReport", again.diagnostic_report.split("/")[1])
    assert all(r["reference"] in again.filed for r in report["result"])
    assert not first_run.filed  # not asked for, not kept
    assert _ai_resource_counts(client, lung2.patient) == before
    assert _count(client, "Device", {}) == devices_before
    assert _count(client, "Provenance", {"target": first_run.diagnostic_report}) == 1


def _register(
    client: FhirClient, sample: SampleStudy, datasets: list[Any], dicomweb_base: str, *, fresh_uids: bool = True
) -> tuple[str, str]:
    """Register a study in the EHR without necessarily storing its images in the PACS.

    With ``fresh_uids`` the ImagingStudy gets new Study/Series UIDs, so no other test's images or resources on
    the shared servers can match it (the PACS certainly holds no images for it).
    """
    patient = client.create({"resourceType": "Patient", "name": [{"family": "Test", "given": [sample.name]}]})
    endpoint_json = endpoint_resource(dicomweb_base)
    identifier = endpoint_json["identifier"][0]
    # Conditional, as an EHR keeps one Endpoint per PACS: the shared server must not collect duplicates.
    endpoint = client.create(endpoint_json, if_none_exist=f"identifier={identifier['system']}|{identifier['value']}")
    study = imaging_study_resource(
        datasets, patient_reference=f"Patient/{patient['id']}", endpoint_reference=f"Endpoint/{endpoint['id']}"
    )
    if fresh_uids:
        study["identifier"][0]["value"] = f"urn:oid:{generate_uid()}"
        for series in study["series"]:
            series["uid"] = generate_uid()
    created = client.create(study)
    return f"ImagingStudy/{created['id']}", f"Patient/{patient['id']}"


@pytest.fixture(scope="module")
def lung1_datasets() -> list[Any]:
    return load_sample("lung1")


@pytest.fixture()
def nothing_written(client: FhirClient) -> Iterator[list[str]]:
    """Collects patient references; after the test, asserts no AI resource was written for any of them."""
    patients: list[str] = []
    yield patients
    for patient in patients:
        assert _ai_resource_counts(client, patient) == {"DiagnosticReport": 0, "Observation": 0, "Media": 0}


def test_unreachable_endpoint_is_a_pacs_error_and_writes_nothing(
    client: FhirClient, lung1_datasets: list[Any], nothing_written: list[str]
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens there
    study, patient = _register(client, SAMPLES["lung1"], lung1_datasets, dead)
    nothing_written.append(patient)
    with pytest.raises(PacsError, match="PACS"):
        analyze_study(client, study, get_analyzer("ct-emphysema"), dicomweb_allow_list=AllowList.of([dead]))


def test_endpoint_off_the_allow_list_is_refused_before_any_fetch(
    client: FhirClient, lung1_datasets: list[Any], orthanc: OrthancServer, nothing_written: list[str]
) -> None:
    study, patient = _register(client, SAMPLES["lung1"], lung1_datasets, orthanc.dicomweb_url)
    nothing_written.append(patient)
    with pytest.raises(NotAllowedError, match="allow-list"):
        analyze_study(
            client, study, get_analyzer("ct-emphysema"), dicomweb_allow_list=AllowList.of(["http://127.0.0.1:9/x"])
        )


def test_series_without_images_in_the_pacs_is_an_image_error_and_writes_nothing(
    client: FhirClient, lung1_datasets: list[Any], allow: AllowList, orthanc: OrthancServer, nothing_written: list[str]
) -> None:
    # The EHR knows the study, but the PACS holds none of its images.
    study, patient = _register(client, SAMPLES["lung1"], lung1_datasets, orthanc.dicomweb_url)
    nothing_written.append(patient)
    with pytest.raises(ImageDataError, match="no instances"):
        analyze_study(client, study, get_analyzer("ct-emphysema"), dicomweb_allow_list=allow)


def test_dicom_without_uids_is_refused_with_the_missing_uids_named(orthanc: OrthancServer) -> None:
    # The real abdominal series whose anonymiser stripped the UIDs: the PACS refuses it, and the loader says why.
    with pytest.raises(ImageDataError, match="Instance UID"):
        from devtools.samples import read_dicom_folder, upload_series

        upload_series(orthanc.url, read_dicom_folder(SAMPLES["abdomen-dicom-no-uids"].path))


def test_non_ct_series_is_refused_naming_the_modality(
    client: FhirClient, orthanc: OrthancServer, allow: AllowList, data_dir: Any, nothing_written: list[str]
) -> None:
    import pydicom

    from devtools.samples import upload_series

    mammogram = pydicom.dcmread(data_dir / "mg" / "P_00173_LEFT_CC_benign_mass_case.dcm")
    upload_series(orthanc.url, [mammogram])
    study, patient = _register(client, SAMPLES["lung1"], [mammogram], orthanc.dicomweb_url, fresh_uids=False)
    nothing_written.append(patient)
    with pytest.raises(StudyError, match="MG"):
        analyze_study(client, study, get_analyzer("ct-emphysema"), dicomweb_allow_list=allow)

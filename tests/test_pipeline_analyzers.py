"""Issue 5 acceptance through the whole pipeline: real images in Orthanc, findings in the real FHIR server.

A chest radiograph reaches the EHR as a DiagnosticReport with the probability, the category, the Grad-CAM key
image, the Device and the Provenance; images the chest X-ray model was not built for are refused with the
reason; a CT showing the spine yields bone Observations in HU and mm; a breast ultrasound gets its malignancy
probability. The filings run on both real FHIR servers (issue 24): sekmet-fhir, and Medplum's FHIR engine with its
default limits, which takes the bone result's 11 entries only as ordered writes.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pydicom
import pytest
import requests

from core.allowlist import AllowList
from core.errors import StudyError
from devtools.demo import LoadedStudy, load_sample_study
from devtools.samples import SAMPLES, endpoint_resource, imaging_study_resource, upload_series
from devtools.servers import FHIR_SERVER_KINDS, FhirServer, OrthancServer
from fhir_adapters.client import FhirClient
from fhir_adapters.constants import MEASUREMENT_CODESYSTEM
from models.registry import get_analyzer
from pipeline.analysis import AnalysisOutcome, analyze_study
from tests.test_breast_us import ultrasound_dicom


@pytest.fixture(scope="module")
def client(fhir_base: FhirServer) -> FhirClient:
    return FhirClient(fhir_base.base_url, session=requests.Session())


@pytest.fixture(scope="module", params=FHIR_SERVER_KINDS)
def ehr(request: pytest.FixtureRequest, fhir_base: FhirServer, medplum: FhirServer) -> FhirClient:
    """Each filing test runs on both servers: sekmet-fhir, and Medplum's engine with its default limits."""
    server = fhir_base if request.param == "sekmet" else medplum
    return FhirClient(server.base_url, session=requests.Session())


def _read(client: FhirClient, reference: str) -> dict[str, Any]:
    resource_type, resource_id = reference.split("/")[-2:]
    return client.read(resource_type, resource_id)


def _observations_by_key(client: FhirClient, report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    observations = [_read(client, r["reference"]) for r in report["result"]]
    return {
        c["code"]: obs for obs in observations for c in obs["code"]["coding"] if c["system"] == MEASUREMENT_CODESYSTEM
    }


@pytest.fixture(scope="module")
def radiograph(ehr: FhirClient, orthanc: OrthancServer) -> LoadedStudy:
    return load_sample_study(ehr, orthanc, SAMPLES["rsna-cxr"])


@pytest.fixture(scope="module")
def radiograph_outcome(ehr: FhirClient, radiograph: LoadedStudy, allow: AllowList) -> AnalysisOutcome:
    return analyze_study(ehr, radiograph.imaging_study, get_analyzer("cxr-pneumonia"), dicomweb_allow_list=allow)


def test_chest_radiograph_report_carries_probability_category_and_gradcam(
    ehr: FhirClient, radiograph: LoadedStudy, radiograph_outcome: AnalysisOutcome
) -> None:
    client = ehr
    assert radiograph_outcome.write_strategy == "transaction"  # five entries: within Medplum's limit too
    report = _read(client, radiograph_outcome.diagnostic_report)
    assert report["status"] == "preliminary"
    assert [s["reference"] for s in report["imagingStudy"]] == [radiograph.imaging_study]
    category = next(
        c["code"] for cc in report["conclusionCode"] for c in cc["coding"] if c["code"].startswith("cxr-pneumonia/")
    )
    assert category in ("cxr-pneumonia/pneumonia-suspected", "cxr-pneumonia/no-pneumonia-suspected")
    probability = _observations_by_key(client, report)["pneumonia_probability"]["valueQuantity"]
    assert probability["code"] == "%" and 0.0 <= probability["value"] <= 100.0
    assert probability["value"] == pytest.approx(100 * radiograph_outcome.result.probability, abs=0.05)
    [key_image] = report["media"]
    media = _read(client, key_image["link"]["reference"])
    assert "Grad-CAM" in key_image["comment"] or "Grad-CAM" in media["content"].get("title", "")
    assert base64.b64decode(media["content"]["data"]).startswith(b"\x89PNG")
    # The paediatric training data is said on the report itself, not only in the card.
    assert "paediatric" in base64.b64decode(report["presentedForm"][0]["data"]).decode()


def test_chest_radiograph_device_carries_the_weights_hash_and_provenance_names_it(
    ehr: FhirClient, radiograph_outcome: AnalysisOutcome
) -> None:
    client = ehr
    report = _read(client, radiograph_outcome.diagnostic_report)
    observation = _read(client, report["result"][0]["reference"])
    device = _read(client, observation["device"]["reference"])
    analyzer = get_analyzer("cxr-pneumonia")
    assert analyzer.model_sha256 in [i["value"] for i in device["identifier"]]  # type: ignore[attr-defined]
    [entry] = client.search_bundle("Provenance", {"target": radiograph_outcome.diagnostic_report})["entry"]
    assert entry["resource"]["agent"][0]["who"]["reference"] == observation["device"]["reference"]


def _register(client: FhirClient, orthanc: OrthancServer, datasets: list[pydicom.Dataset], name: str) -> str:
    upload_series(orthanc.url, datasets)
    patient = client.create({"resourceType": "Patient", "name": [{"family": "Test", "given": [name]}]})
    endpoint_json = endpoint_resource(orthanc.dicomweb_url)
    identifier = endpoint_json["identifier"][0]
    endpoint = client.create(endpoint_json, if_none_exist=f"identifier={identifier['system']}|{identifier['value']}")
    study = imaging_study_resource(
        datasets, patient_reference=f"Patient/{patient['id']}", endpoint_reference=f"Endpoint/{endpoint['id']}"
    )
    identifier = study["identifier"][0]
    created = client.create(study, if_none_exist=f"identifier={identifier['system']}|{identifier['value']}")
    return f"ImagingStudy/{created['id']}"


def test_a_mammogram_sent_to_the_chest_xray_model_is_refused_naming_the_modality(
    client: FhirClient, orthanc: OrthancServer, allow: AllowList, data_dir: Any
) -> None:
    mammogram = pydicom.dcmread(data_dir / "mg" / "P_00173_LEFT_CC_benign_mass_case.dcm")
    study = _register(client, orthanc, [mammogram], "mammogram")
    with pytest.raises(StudyError, match="MG"):
        analyze_study(client, study, get_analyzer("cxr-pneumonia"), dicomweb_allow_list=allow)


def test_a_ct_sent_to_the_chest_xray_model_is_refused_naming_the_modality(
    client: FhirClient, orthanc: OrthancServer, allow: AllowList
) -> None:
    chest_ct = load_sample_study(client, orthanc, SAMPLES["lung2"])
    with pytest.raises(StudyError, match="CT"):
        analyze_study(client, chest_ct.imaging_study, get_analyzer("cxr-pneumonia"), dicomweb_allow_list=allow)


def test_an_abdominal_ct_yields_bone_observations_in_hu_and_mm(
    ehr: FhirClient, orthanc: OrthancServer, allow: AllowList
) -> None:
    client = ehr
    abdomen = load_sample_study(client, orthanc, SAMPLES["abdomen"])
    outcome = analyze_study(client, abdomen.imaging_study, get_analyzer("ct-bone"), dicomweb_allow_list=allow)
    report = _read(client, outcome.diagnostic_report)
    assert len(report["result"]) == len(outcome.result.measurements)  # every part filed, whatever the strategy
    by_key = _observations_by_key(client, report)
    l1 = by_key["l1_trabecular_hu"]["valueQuantity"]
    assert (l1["system"], l1["code"]) == ("http://unitsofmeasure.org", "[hnsf'U]")
    assert 50 <= l1["value"] <= 300  # adult trabecular bone
    for key in ("anterior_height_mm", "middle_height_mm", "posterior_height_mm"):
        height = by_key[key]["valueQuantity"]
        assert height["code"] == "mm" and 15 <= height["value"] <= 40
    assert len(report["media"]) == 2  # sagittal heights and axial ROI overlays


def test_a_breast_ultrasound_files_its_malignancy_probability_and_gradcam(
    ehr: FhirClient, orthanc: OrthancServer, allow: AllowList, data_dir: Any, tmp_path: Any
) -> None:
    with np.load(data_dir / "medmnist" / "breastmnist_28.npz") as data:  # a held-out BreastMNIST test image
        image = data["test_images"][0].astype(np.float32) / 255.0
    study = _register(ehr, orthanc, [pydicom.dcmread(ultrasound_dicom(image, tmp_path / "us.dcm"))], "ultrasound")
    outcome = analyze_study(ehr, study, get_analyzer("us-breast"), dicomweb_allow_list=allow)
    report = _read(ehr, outcome.diagnostic_report)
    probability = _observations_by_key(ehr, report)["malignancy_probability"]["valueQuantity"]
    assert outcome.result.probability is not None
    assert probability["code"] == "%" and probability["value"] == pytest.approx(
        100 * outcome.result.probability, abs=0.05
    )
    [key_image] = report["media"]
    assert base64.b64decode(_read(ehr, key_image["link"]["reference"])["content"]["data"]).startswith(b"\x89PNG")

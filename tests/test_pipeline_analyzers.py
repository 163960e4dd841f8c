"""Issue 5 acceptance through the whole pipeline: real images in Orthanc, findings in the real FHIR server.

A chest radiograph reaches the EHR as a DiagnosticReport with the probability, the category, the Grad-CAM key
image, the Device and the Provenance; images the chest X-ray model was not built for are refused with the
reason; a CT showing the spine yields bone Observations in HU and mm.
"""

from __future__ import annotations

import base64
from typing import Any

import pydicom
import pytest
import requests

from core.allowlist import AllowList
from core.errors import StudyError
from devtools.demo import LoadedStudy, load_sample_study
from devtools.samples import SAMPLES, endpoint_resource, imaging_study_resource, upload_series
from devtools.servers import FhirServer, OrthancServer
from fhir_adapters.client import FhirClient
from fhir_adapters.constants import MEASUREMENT_CODESYSTEM
from models.registry import get_analyzer
from pipeline.analysis import AnalysisOutcome, analyze_study


@pytest.fixture(scope="module")
def client(fhir_base: FhirServer) -> FhirClient:
    return FhirClient(fhir_base.base_url, session=requests.Session())


def _read(client: FhirClient, reference: str) -> dict[str, Any]:
    resource_type, resource_id = reference.split("/")[-2:]
    return client.read(resource_type, resource_id)


def _observations_by_key(client: FhirClient, report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    observations = [_read(client, r["reference"]) for r in report["result"]]
    return {
        c["code"]: obs for obs in observations for c in obs["code"]["coding"] if c["system"] == MEASUREMENT_CODESYSTEM
    }


@pytest.fixture(scope="module")
def radiograph(client: FhirClient, orthanc: OrthancServer) -> LoadedStudy:
    return load_sample_study(client, orthanc, SAMPLES["rsna-cxr"])


@pytest.fixture(scope="module")
def radiograph_outcome(client: FhirClient, radiograph: LoadedStudy, allow: AllowList) -> AnalysisOutcome:
    return analyze_study(client, radiograph.imaging_study, get_analyzer("cxr-pneumonia"), dicomweb_allow_list=allow)


def test_chest_radiograph_report_carries_probability_category_and_gradcam(
    client: FhirClient, radiograph: LoadedStudy, radiograph_outcome: AnalysisOutcome
) -> None:
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
    client: FhirClient, radiograph_outcome: AnalysisOutcome
) -> None:
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
    client: FhirClient, orthanc: OrthancServer, allow: AllowList
) -> None:
    abdomen = load_sample_study(client, orthanc, SAMPLES["abdomen"])
    outcome = analyze_study(client, abdomen.imaging_study, get_analyzer("ct-bone"), dicomweb_allow_list=allow)
    report = _read(client, outcome.diagnostic_report)
    by_key = _observations_by_key(client, report)
    l1 = by_key["l1_trabecular_hu"]["valueQuantity"]
    assert (l1["system"], l1["code"]) == ("http://unitsofmeasure.org", "[hnsf'U]")
    assert 50 <= l1["value"] <= 300  # adult trabecular bone
    for key in ("anterior_height_mm", "middle_height_mm", "posterior_height_mm"):
        height = by_key[key]["valueQuantity"]
        assert height["code"] == "mm" and 15 <= height["value"] <= 40
    assert len(report["media"]) == 2  # sagittal heights and axial ROI overlays

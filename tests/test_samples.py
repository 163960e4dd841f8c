"""The real sample scans as DICOM: geometry faithful to the source file, loadable into a real Orthanc, and
described by R4 ImagingStudy / Endpoint resources that validate against the official schema and a real server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel
import nrrd
import numpy as np
import pytest
import requests
from jsonschema import Draft6Validator
from pydicom.dataset import Dataset

from core.errors import ImageDataError
from devtools.samples import (
    SAMPLES,
    ct_series_from_nifti,
    ct_series_from_nrrd,
    endpoint_resource,
    imaging_study_resource,
    load_sample,
    read_dicom_folder,
    upload_series,
)
from devtools.servers import FhirServer, OrthancServer

FHIR_SCHEMA = Path("/work/shared/fhir/fhir.schema.json")


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return dict(json.loads(FHIR_SCHEMA.read_text()))


def schema_errors(schema: dict[str, Any], resource: dict[str, Any]) -> list[str]:
    validator = Draft6Validator(
        {"$ref": f"#/definitions/{resource['resourceType']}", "definitions": schema["definitions"]}
    )
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(resource)]


@pytest.fixture(scope="module")
def lung2(data_dir: Path) -> list[Dataset]:
    return ct_series_from_nrrd(data_dir / "ct/chest_pyradiomics/lung2_image.nrrd", name="lung2")


def patient_position(ds: Dataset, row: float, column: float) -> np.ndarray:
    """LPS position of pixel (row, column) of a slice, from its DICOM geometry (PS3.3 C.7.6.2.1.1)."""
    orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    return (
        np.asarray(ds.ImagePositionPatient, dtype=float)
        + orientation[:3] * column * column_spacing
        + orientation[3:] * row * row_spacing
    )


def test_lung2_series_keeps_the_nrrd_geometry_and_hounsfield_units(lung2: list[Dataset], data_dir: Path) -> None:
    source, header = nrrd.read(str(data_dir / "ct/chest_pyradiomics/lung2_image.nrrd"))
    assert len(lung2) == 61
    first, last = lung2[0], lung2[-1]
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]  # axial, rows to patient left
    assert [float(v) for v in first.PixelSpacing] == pytest.approx([0.6269531, 0.6269531])
    assert float(first.SliceThickness) == pytest.approx(5.0)
    # Slice k sits at the NRRD origin + k * 5 mm towards the head (LPS, as the NRRD header says).
    assert [float(v) for v in first.ImagePositionPatient] == pytest.approx(list(header["space origin"]))
    assert float(last.ImagePositionPatient[2]) - float(first.ImagePositionPatient[2]) == pytest.approx(60 * 5.0)
    # Voxel (i, j, k) of the NRRD is column i, row j of slice k, with identical HU.
    slice_30 = lung2[30].pixel_array * float(lung2[30].RescaleSlope) + float(lung2[30].RescaleIntercept)
    np.testing.assert_array_equal(slice_30, source[:, :, 30].T)
    assert first.Modality == "CT" and first.BodyPartExamined == "CHEST"
    assert first.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"  # Explicit VR Little Endian
    assert first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage


def test_sample_uids_are_deterministic_and_the_patient_is_clearly_a_demo(lung2: list[Dataset], data_dir: Path) -> None:
    again = ct_series_from_nrrd(data_dir / "ct/chest_pyradiomics/lung2_image.nrrd", name="lung2")
    assert [ds.SOPInstanceUID for ds in again] == [ds.SOPInstanceUID for ds in lung2]
    assert again[0].StudyInstanceUID == lung2[0].StudyInstanceUID
    assert len({ds.SOPInstanceUID for ds in lung2}) == 61
    lung1 = load_sample("lung1")
    assert lung1[0].StudyInstanceUID != lung2[0].StudyInstanceUID
    assert str(lung2[0].PatientID) == "DEMO-LUNG2" and str(lung2[0].PatientName) == "Demo^Lung2"
    assert lung2[0].PatientIdentityRemoved == "YES"


def test_abdomen_nifti_ras_becomes_dicom_lps_at_the_same_patient_position(data_dir: Path) -> None:
    image = nibabel.load(str(data_dir / "ct/abdomen_totalseg/example_ct.nii.gz"))
    assert isinstance(image, nibabel.Nifti1Image)
    source = np.asanyarray(image.dataobj)
    series = ct_series_from_nifti(data_dir / "ct/abdomen_totalseg/example_ct.nii.gz", name="abdomen")
    assert len(series) == 112 and series[0].BodyPartExamined == "ABDOMEN"
    assert [float(v) for v in series[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    # A voxel's RAS position from nibabel, negated in x and y, is where the DICOM geometry puts the same value.
    for i, j, k in [(60, 50, 56), (10, 90, 3), (120, 0, 111)]:
        ras = image.affine @ np.array([i, j, k, 1.0])
        lps = ras[:3] * np.array([-1.0, -1.0, 1.0])
        ds = series[k]
        row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
        origin = np.asarray(ds.ImagePositionPatient, dtype=float)
        column, row = round((lps[0] - origin[0]) / column_spacing), round((lps[1] - origin[1]) / row_spacing)
        assert patient_position(ds, row, column) == pytest.approx(lps, abs=1e-3)
        assert int(ds.pixel_array[row, column]) == int(source[i, j, k])


def test_lung2_loads_into_a_real_orthanc_and_again_without_duplicates(
    orthanc: OrthancServer, lung2: list[Dataset]
) -> None:
    ids = upload_series(orthanc.url, lung2)
    assert len(set(ids)) == 61
    assert upload_series(orthanc.url, lung2) == ids  # same UIDs -> Orthanc keeps one copy
    series = requests.get(f"{orthanc.url}/instances/{ids[0]}/series", timeout=10).json()
    assert series["MainDicomTags"]["SeriesInstanceUID"] == lung2[0].SeriesInstanceUID
    assert len(series["Instances"]) == 61


def test_orthanc_refuses_the_abdomen_dicom_whose_uids_were_stripped(orthanc: OrthancServer, data_dir: Path) -> None:
    assert not SAMPLES["abdomen-dicom-no-uids"].loadable
    defective = read_dicom_folder(data_dir / "ct/abdomen_totalseg/example_ct_dicom")
    with pytest.raises(ImageDataError, match=r"refused instance 1 \(HTTP 400"):
        upload_series(orthanc.url, defective)


def test_imaging_study_and_endpoint_validate_against_the_r4_schema(
    lung2: list[Dataset], schema: dict[str, Any]
) -> None:
    endpoint = endpoint_resource("http://127.0.0.1:8042/dicom-web/")
    study = imaging_study_resource(lung2, patient_reference="Patient/demo-lung2", endpoint_reference="Endpoint/pacs")
    assert schema_errors(schema, endpoint) == []
    assert schema_errors(schema, study) == []
    assert endpoint["address"] == "http://127.0.0.1:8042/dicom-web"
    assert endpoint["connectionType"]["code"] == "dicom-wado-rs"
    assert study["identifier"] == [{"system": "urn:dicom:uid", "value": f"urn:oid:{lung2[0].StudyInstanceUID}"}]
    assert study["started"] == "2025-01-01T09:00:00+00:00"
    assert (study["numberOfSeries"], study["numberOfInstances"]) == (1, 61)
    series = study["series"][0]
    assert series["bodySite"] == {
        "system": "http://snomed.info/sct",
        "code": "51185008",
        "display": "Thoracic structure",
    }
    assert series["modality"] == {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}
    assert [i["number"] for i in series["instance"]] == list(range(1, 62))
    assert series["instance"][0]["sopClass"]["code"] == "urn:oid:1.2.840.10008.5.1.4.1.1.2"
    # The schema check catches what the FHIR server would let through.
    assert schema_errors(schema, {**study, "status": "bogus"}) != []


def test_a_real_fhir_server_stores_the_patient_endpoint_and_imaging_study(
    fhir_base: FhirServer, lung2: list[Dataset]
) -> None:
    base = fhir_base.base_url
    patient: dict[str, Any] = {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:demo", "value": "DEMO-LUNG2"}],
        "name": [{"family": "Demo", "given": ["Lung2"]}],
    }
    patient_id = requests.post(f"{base}/Patient", json=patient, timeout=30).json()["id"]
    endpoint = requests.post(f"{base}/Endpoint", json=endpoint_resource("http://127.0.0.1:1/dicom-web"), timeout=30)
    assert endpoint.status_code == 201
    study = imaging_study_resource(
        lung2, patient_reference=f"Patient/{patient_id}", endpoint_reference=f"Endpoint/{endpoint.json()['id']}"
    )
    identifier = study["identifier"][0]
    # Conditional, as the EHR keeps one ImagingStudy per Study Instance UID (other tests may have loaded lung2).
    created = requests.post(
        f"{base}/ImagingStudy",
        json=study,
        headers={"If-None-Exist": f"identifier={identifier['system']}|{identifier['value']}"},
        timeout=30,
    )
    assert created.status_code in (200, 201), created.text
    found = requests.get(
        f"{base}/ImagingStudy", params={"identifier": f"urn:dicom:uid|urn:oid:{lung2[0].StudyInstanceUID}"}, timeout=30
    ).json()
    [entry] = found["entry"]
    assert entry["resource"]["id"] == created.json()["id"]
    assert entry["resource"]["series"][0]["numberOfInstances"] == 61

"""Reading an ImagingStudy from the REAL FHIR server and choosing the series to analyse.

The study is built from the real head CT in ``tests/data/ct/head_ge`` (its UIDs, modality, slice count and
body part), stored on sekmet-fhir with its Patient and Endpoint, each checked against the official R4 JSON
schema first. The PACS addresses are never contacted by study selection; where a test asserts that no request
was made, a listening proxy counts what reaches it.
"""

from __future__ import annotations

import json
import uuid
from functools import cache
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fhir_client_support import fault_proxy
from jsonschema import Draft6Validator

from core.allowlist import AllowList
from core.errors import NotAllowedError, StudyError
from devtools.servers import FhirServer
from fhir_adapters.client import FhirClient
from fhir_adapters.study import (
    ENDPOINT_CONNECTION_TYPE_SYSTEM,
    choose_series,
    resolve_dicomweb_base,
    select_series,
    study_uid,
)
from models.base import SeriesRequirements

SCHEMA = Path("/work/shared/fhir/fhir.schema.json")
PACS = "http://127.0.0.1:8042/dicom-web"
OTHER_PACS = "http://127.0.0.1:8043/dicom-web"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
SNOMED = "http://snomed.info/sct"
HEAD_CT = SeriesRequirements(
    modalities=("CT",),
    min_instances=10,
    body_parts=("HEAD",),
    description_keywords=("brain", "head"),
    excluded_description_keywords=("scout", "localizer"),
)


@cache
def _schema() -> dict[str, Any]:
    return dict(json.loads(SCHEMA.read_text()))


def assert_valid_r4(resource: dict[str, Any]) -> dict[str, Any]:
    validator = Draft6Validator({"$ref": f"#/definitions/{resource['resourceType']}", **_schema()})
    problems = [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:120]}" for e in validator.iter_errors(resource)]
    assert problems == [], problems
    return resource


@pytest.fixture(scope="module")
def head_ct(data_dir: Path) -> dict[str, Any]:
    """Study/series UIDs, modality, slice count and body part of the real head CT series."""
    files = sorted((data_dir / "ct" / "head_ge").glob("*.dcm"))
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    return {
        "study_uid": str(first.StudyInstanceUID),
        "series_uid": str(first.SeriesInstanceUID),
        "modality": str(first.Modality),
        "body_part": str(first.get("BodyPartExamined", "")),
        "count": len(files),
        "number": int(first.get("SeriesNumber", 1)),
    }


@pytest.fixture()
def client(fhir_base: FhirServer) -> FhirClient:
    return FhirClient(fhir_base.base_url, allow_list=AllowList.of([fhir_base.base_url, PACS, OTHER_PACS]))


def endpoint(
    address: str, *, code: str = "dicom-wado-rs", status: str = "active", endpoint_id: str | None = None
) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Endpoint",
        "status": status,
        "connectionType": {"system": ENDPOINT_CONNECTION_TYPE_SYSTEM, "code": code},
        "name": "PACS DICOMweb",
        "payloadType": [{"text": "DICOM"}],
        "payloadMimeType": ["application/dicom"],
        "address": address,
    }
    if endpoint_id:
        resource["id"] = endpoint_id
    return assert_valid_r4(resource)


def series(
    uid: str,
    modality: str,
    count: int,
    *,
    description: str = "",
    body: tuple[str, str] | None = None,
    endpoint_ref: str | None = None,
    number: int = 1,
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "uid": uid,
        "number": number,
        "modality": {"system": DCM, "code": modality},
        "numberOfInstances": count,
    }
    if description:
        entry["description"] = description
    if body:
        entry["bodySite"] = {"system": SNOMED, "code": body[0], "display": body[1]}
    if endpoint_ref:
        entry["endpoint"] = [{"reference": endpoint_ref}]
    return entry


def imaging_study(
    uid: str,
    patient_id: str,
    all_series: list[dict[str, Any]],
    *,
    endpoint_ref: str | None = None,
    contained: list[dict[str, Any]] | None = None,
    status: str = "available",
) -> dict[str, Any]:
    study: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "status": status,
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}],
        "subject": {"reference": f"Patient/{patient_id}"},
        "numberOfSeries": len(all_series),
        "numberOfInstances": sum(s["numberOfInstances"] for s in all_series),
        "series": all_series,
    }
    if endpoint_ref:
        study["endpoint"] = [{"reference": endpoint_ref}]
    if contained:
        study["contained"] = contained
    return assert_valid_r4(study)


@pytest.fixture()
def patient_id(client: FhirClient) -> str:
    patient = assert_valid_r4(
        {"resourceType": "Patient", "identifier": [{"system": "urn:test:mrn", "value": uuid.uuid4().hex}]}
    )
    return str(client.create(patient)["id"])


def _uid() -> str:
    return f"2.25.{uuid.uuid4().int}"


def test_the_real_head_ct_is_chosen_over_its_scout_and_located_on_the_pacs(
    client: FhirClient, patient_id: str, head_ct: dict[str, Any]
) -> None:
    pacs = client.create(endpoint(PACS))
    scout_uid = _uid()
    study = imaging_study(
        head_ct["study_uid"],
        patient_id,
        [
            series(scout_uid, "CT", 2, description="Scout", number=1),
            series(
                head_ct["series_uid"],
                head_ct["modality"],
                head_ct["count"],
                body=("69536005", head_ct["body_part"]),
                number=head_ct["number"],
            ),
        ],
        endpoint_ref=f"Endpoint/{pacs['id']}",
    )
    stored = client.create(study)

    read, choice = choose_series(client, stored["id"], HEAD_CT)

    assert read["id"] == stored["id"]
    assert choice.study_uid == head_ct["study_uid"]
    assert choice.series_uid == head_ct["series_uid"]
    assert (choice.modality, choice.body_part, choice.instance_count) == ("CT", "HEAD", 28)
    assert choice.dicomweb_base == PACS
    assert choice.reason.startswith(
        f"CT series {head_ct['series_uid']} (28 images, HEAD) chosen: body part matches HEAD"
    )
    assert f"1 other series excluded: series {scout_uid} has 2 images, the analyzer needs at least 10" in choice.reason


def test_the_study_can_be_named_by_reference_or_absolute_url(client: FhirClient, patient_id: str) -> None:
    pacs = client.create(endpoint(PACS))
    stored = client.create(
        imaging_study(_uid(), patient_id, [series(_uid(), "CT", 40)], endpoint_ref=f"Endpoint/{pacs['id']}")
    )
    by_reference = choose_series(client, f"ImagingStudy/{stored['id']}", HEAD_CT)[1]
    by_url = choose_series(client, f"{client.base_url}/ImagingStudy/{stored['id']}", HEAD_CT)[1]
    assert by_reference == by_url
    with pytest.raises(StudyError, match=f"Patient/{patient_id} is a Patient, not an ImagingStudy"):
        choose_series(client, f"Patient/{patient_id}", HEAD_CT)


def test_a_series_endpoint_overrides_the_study_endpoint(client: FhirClient, patient_id: str) -> None:
    study_pacs = client.create(endpoint(PACS))
    series_pacs = client.create(endpoint(OTHER_PACS))
    archived, current = _uid(), _uid()
    stored = client.create(
        imaging_study(
            _uid(),
            patient_id,
            [series(archived, "CT", 30, endpoint_ref=f"Endpoint/{series_pacs['id']}"), series(current, "CT", 20)],
            endpoint_ref=f"Endpoint/{study_pacs['id']}",
        )
    )
    read = client.read("ImagingStudy", stored["id"])
    assert resolve_dicomweb_base(client, read, read["series"][0]) == OTHER_PACS
    assert resolve_dicomweb_base(client, read, read["series"][1]) == PACS
    assert choose_series(client, stored["id"], HEAD_CT)[1].dicomweb_base == OTHER_PACS  # 30 images > 20


def test_a_contained_endpoint_is_resolved(client: FhirClient, patient_id: str) -> None:
    stored = client.create(
        imaging_study(
            _uid(),
            patient_id,
            [series(_uid(), "CT", 12)],
            endpoint_ref="#pacs",
            contained=[endpoint(PACS, endpoint_id="pacs")],
        )
    )
    assert choose_series(client, stored["id"], HEAD_CT)[1].dicomweb_base == PACS
    read = client.read("ImagingStudy", stored["id"])
    read["endpoint"] = [{"reference": "#elsewhere"}]
    with pytest.raises(StudyError, match=rf"ImagingStudy/{stored['id']} refers to a contained Endpoint #elsewhere"):
        resolve_dicomweb_base(client, read, read["series"][0])


def test_an_endpoint_off_the_allow_list_is_refused_without_a_request(
    client: FhirClient, patient_id: str, fhir_base: FhirServer
) -> None:
    with fault_proxy(fhir_base.base_url, lambda i, m, p: None) as unknown_pacs:
        address = unknown_pacs.base_url.replace("/fhir", "/dicom-web")
        pacs = client.create(endpoint(address))
        stored = client.create(
            imaging_study(_uid(), patient_id, [series(_uid(), "CT", 12)], endpoint_ref=f"Endpoint/{pacs['id']}")
        )
        with pytest.raises(NotAllowedError, match=rf"DICOMweb endpoint of ImagingStudy/{stored['id']} .* not on"):
            choose_series(client, stored["id"], HEAD_CT)
        with pytest.raises(NotAllowedError, match="no allow-list is configured"):
            choose_series(FhirClient(client.base_url), stored["id"], HEAD_CT)
        assert unknown_pacs.count == 0


@pytest.mark.parametrize(
    ("code", "status", "problem"),
    [
        ("hl7-fhir-rest", "active", "its connection type is hl7-fhir-rest, not dicom-wado-rs"),
        ("dicom-wado-rs", "off", "its status is off, not active"),
    ],
)
def test_an_unusable_endpoint_is_a_study_error_naming_the_study(
    client: FhirClient, patient_id: str, code: str, status: str, problem: str
) -> None:
    pacs = client.create(endpoint(PACS, code=code, status=status))
    stored = client.create(
        imaging_study(_uid(), patient_id, [series(_uid(), "CT", 12)], endpoint_ref=f"Endpoint/{pacs['id']}")
    )
    with pytest.raises(StudyError, match=rf"ImagingStudy/{stored['id']} has no usable DICOMweb endpoint .*{problem}"):
        choose_series(client, stored["id"], HEAD_CT)


def test_a_study_without_endpoint_is_a_study_error(client: FhirClient, patient_id: str) -> None:
    series_uid = _uid()
    stored = client.create(imaging_study(_uid(), patient_id, [series(series_uid, "CT", 12)]))
    with pytest.raises(StudyError, match=rf"ImagingStudy/{stored['id']} has no endpoint for series {series_uid}"):
        choose_series(client, stored["id"], HEAD_CT)


def test_a_study_with_only_mr_is_refused_naming_the_modality(client: FhirClient, patient_id: str) -> None:
    mr_uid = _uid()
    stored = client.create(
        imaging_study(
            _uid(),
            patient_id,
            [series(mr_uid, "MR", 150, description="T1 brain")],
            endpoint_ref="#p",
            contained=[endpoint(PACS, endpoint_id="p")],
        )
    )
    with pytest.raises(
        StudyError, match=rf"no series the analyzer can use: series {mr_uid} is MR, the analyzer needs CT"
    ):
        choose_series(client, stored["id"], HEAD_CT)


def test_a_series_with_no_instances_is_refused(client: FhirClient, patient_id: str) -> None:
    empty_uid = _uid()
    stored = client.create(
        imaging_study(
            _uid(),
            patient_id,
            [series(empty_uid, "CT", 0)],
            endpoint_ref="#p",
            contained=[endpoint(PACS, endpoint_id="p")],
        )
    )
    with pytest.raises(StudyError, match=rf"series {empty_uid} has 0 images, the analyzer needs at least 10"):
        choose_series(client, stored["id"], HEAD_CT)


# ------------------------------------------------------------------ pure functions


def test_study_uid_reads_the_dicom_identifier_and_names_the_study_when_missing() -> None:
    assert study_uid({"identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.840.1"}]}) == "1.2.840.1"
    with pytest.raises(StudyError, match="ImagingStudy/abc has no Study Instance UID"):
        study_uid({"id": "abc", "identifier": [{"system": "urn:test:accession", "value": "A1"}]})
    with pytest.raises(StudyError, match="ImagingStudy/abc has a DICOM UID identifier that is not a valid UID"):
        study_uid({"id": "abc", "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.abc"}]})


def test_a_localizer_loses_to_a_smaller_diagnostic_series() -> None:
    study = {
        "id": "s1",
        "series": [
            series("1.1", "CT", 300, description="Localizer", body=("69536005", "Head")),
            series("1.2", "CT", 40, description="Brain 5mm", body=("69536005", "Head")),
        ],
    }
    chosen, reason = select_series(study, HEAD_CT)
    assert chosen["uid"] == "1.2"
    assert (
        reason == "CT series 1.2 (40 images, Head) chosen: body part matches HEAD; description mentions 'brain'; "
        "ranked first of 2 suitable series."
    )


def test_body_part_outranks_image_count_and_snomed_codes_match_dicom_terms() -> None:
    chest = SeriesRequirements(modalities=("CT",), min_instances=20, body_parts=("CHEST",))
    study = {
        "series": [
            series("2.1", "CT", 200, body=("818981001", "Abdomen")),
            series("2.2", "CT", 61, body=("51185008", "Thoracic structure")),
        ]
    }
    chosen, reason = select_series(study, chest)
    assert chosen["uid"] == "2.2"
    assert "body part matches CHEST" in reason


def test_a_series_shown_or_described_as_another_body_part_is_not_chosen_for_a_brain_analyzer() -> None:
    brain = SeriesRequirements(modalities=("MR",), accepted_body_parts=("BRAIN", "HEAD"))
    shoulder = {"id": "m", "description": "SHOULDER", "series": [series("4.1", "MR", 20)]}
    with pytest.raises(StudyError, match=r"series 4\.1 shows the SHOULDER \(by its body site or description\), the "):
        select_series(shoulder, brain)
    chest = {"id": "c", "series": [series("4.2", "MR", 20, body=("51185008", "Thoracic structure"))]}
    with pytest.raises(StudyError, match=r"series 4\.2 shows the CHEST"):
        select_series(chest, brain)
    # a description naming the brain as well, or no body part at all, is not a reason to refuse
    mixed = {"id": "b", "description": "MR brain and neck", "series": [series("4.3", "MR", 20)]}
    assert select_series(mixed, brain)[0]["uid"] == "4.3"
    crop = {"id": "h", "series": [series("4.4", "MR", 32, description="HippoCrop")]}
    assert select_series(crop, brain)[0]["uid"] == "4.4"


def test_an_entered_in_error_study_is_not_analysed() -> None:
    with pytest.raises(StudyError, match="ImagingStudy/x has status entered-in-error"):
        select_series({"id": "x", "status": "entered-in-error", "series": [series("3.1", "CT", 50)]}, HEAD_CT)

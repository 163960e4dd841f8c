"""Bounded inputs: every input from outside is refused at a configured limit, before it is read in full or memory
is allocated for it, with an error that names the limit (``limits.<name>``) and what to do.

The oversized or endless answers come from loopback servers playing a broken or hostile PACS, EHR or key server
(``tests/hostile_support.py``): such parties cannot run here as themselves. The images are the real bundled CT and
radiograph with a header that lies about their size; only the 10,000-instance series is made of tiny synthetic
instances, because what is tested there is the count, not the pixels.
"""

from __future__ import annotations

import copy
import io
import json
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

from cds.app import create_app
from cds.services import AI_REPORTS_KEY, IMAGING_STUDIES_KEY, PATIENT_VIEW
from core.errors import ConfigurationError, ImageDataError, LimitExceededError, PacsError
from core.limits import DEFAULT_LIMITS, MIB, InputLimits
from devtools.samples import ct_series_from_nrrd, read_dicom_folder
from dicom_io.dicomweb import fetch_series
from dicom_io.projection import projection_input
from dicom_io.volume import assemble_volume
from fhir_adapters.client import FhirClient
from fhir_adapters.study import SeriesChoice
from pipeline.analysis import load_image
from service.settings import parse_settings
from tests.cds_support import EHR_ISS, EhrKeys, make_config, recording_listener
from tests.hostile_support import Reply, Seen, hostile_server

HOOK_PATH = f"/cds-services/{PATIENT_VIEW}"
MULTIPART = 'multipart/related; type="application/dicom"; boundary=limit-test'


def _hook_body(padding_bytes: int = 0) -> dict[str, object]:
    studies: dict[str, object] = {"resourceType": "Bundle", "type": "searchset"}
    if padding_bytes:
        note = "x" * 1000
        entries = padding_bytes // 1100 + 1
        studies["entry"] = [
            {"resource": {"resourceType": "ImagingStudy", "id": str(i), "description": note}} for i in range(entries)
        ]
    return {
        "hook": "patient-view",
        "hookInstance": "4c1b2a55-8d1e-4d31-9a6e-0a0b6c9d8e7f",
        "context": {"patientId": "p1", "userId": "Practitioner/1"},
        "prefetch": {IMAGING_STUDIES_KEY: studies, AI_REPORTS_KEY: None},
    }


# ---------------------------------------------------------------- the CDS request body


def test_an_oversized_hook_body_is_a_413_naming_the_limit(tmp_path: Path) -> None:
    keys = EhrKeys()
    app = create_app(make_config(tmp_path, keys, "http://127.0.0.1:9/fhir")).test_client()
    body = json.dumps(_hook_body(padding_bytes=DEFAULT_LIMITS.cds_request_bytes + MIB)).encode()
    assert len(body) > DEFAULT_LIMITS.cds_request_bytes
    response = app.post(
        HOOK_PATH,
        data=body,
        content_type="application/json",
        headers={"Authorization": f"Bearer {keys.sign(HOOK_PATH)}"},
    )
    assert response.status_code == 413
    error = response.get_json()
    assert error["error"] == "request_too_large"
    assert "8 MiB allowed (limits.cds_request_bytes)" in error["message"]
    assert "raise limits.cds_request_bytes" in error["message"]
    within = app.post(
        HOOK_PATH, json=_hook_body(padding_bytes=MIB), headers={"Authorization": f"Bearer {keys.sign(HOOK_PATH)}"}
    )
    assert within.status_code == 200  # a large but reasonable prefetch is still answered


def test_a_chunked_hook_body_is_stopped_while_it_streams_in(tmp_path: Path) -> None:
    keys = EhrKeys()
    config = make_config(tmp_path, keys, "http://127.0.0.1:9/fhir", limits=InputLimits(cds_request_bytes=64 * 1024))
    app = create_app(config).test_client()
    body = json.dumps(_hook_body(padding_bytes=256 * 1024)).encode()
    response = app.post(
        HOOK_PATH,
        input_stream=io.BytesIO(body),  # no Content-Length: the size is only known by reading
        content_type="application/json",
        headers={"Authorization": f"Bearer {keys.sign(HOOK_PATH)}"},
        environ_overrides={"wsgi.input_terminated": True},  # as gunicorn sets for a chunked request
    )
    assert response.status_code == 413
    assert "64 KiB allowed (limits.cds_request_bytes)" in response.get_json()["message"]


def test_an_anonymous_oversized_body_is_refused_as_unauthenticated_without_reading_it(tmp_path: Path) -> None:
    app = create_app(make_config(tmp_path, EhrKeys(), "http://127.0.0.1:9/fhir")).test_client()
    body = json.dumps(_hook_body(padding_bytes=DEFAULT_LIMITS.cds_request_bytes + MIB)).encode()
    response = app.post(HOOK_PATH, data=body, content_type="application/json")
    assert response.status_code == 401


def test_a_token_whose_aud_holds_an_object_is_a_401_not_a_500(tmp_path: Path) -> None:
    keys = EhrKeys()
    app = create_app(make_config(tmp_path, keys, "http://127.0.0.1:9/fhir")).test_client()
    for aud in ([{"url": "https://cds.example.org"}], 42, [None], {"a": 1}):
        token = keys.sign(HOOK_PATH, aud=aud)
        response = app.post(HOOK_PATH, json=_hook_body(), headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401, aud


def test_an_endless_jwk_set_is_refused_while_it_streams_in(tmp_path: Path) -> None:
    from cds.config import TrustedClient

    sent_total = 64 * MIB

    def endless_keys(seen: Seen) -> Reply:
        block = b'{"keys": [' + b" " * (MIB - 10)
        return Reply(headers={"Content-Type": "application/json"}, body=(block for _ in range(sent_total // MIB)))

    keys = EhrKeys()
    with hostile_server(endless_keys) as key_server:
        client = TrustedClient(iss=EHR_ISS, jku_allow_list=(f"{key_server.url}/keys",))
        app = create_app(make_config(tmp_path, keys, "http://127.0.0.1:9/fhir", client=client)).test_client()
        token = keys.sign(HOOK_PATH, header={"jku": f"{key_server.url}/keys/jwks.json"})
        response = app.post(HOOK_PATH, json=_hook_body(), headers={"Authorization": f"Bearer {token}"})
        time.sleep(0.2)  # let the server notice the closed connection
    assert response.status_code == 401
    assert key_server.bytes_sent < sent_total // 4  # reading stopped near 256 KiB, not after 64 MiB


# ---------------------------------------------------------------- FHIR answers


def test_a_fhir_answer_past_the_limit_is_refused_while_it_streams_in() -> None:
    def endless_bundle(seen: Seen) -> Reply:
        head = b'{"resourceType": "Bundle", "type": "searchset", "entry": ['
        entry = b'{"resource": {"resourceType": "Patient", "id": "1"}},' * 1000
        return Reply(
            headers={"Content-Type": "application/fhir+json"}, body=(head if i == 0 else entry for i in range(2000))
        )

    with hostile_server(endless_bundle) as ehr:
        client = FhirClient(f"{ehr.url}/fhir", limits=InputLimits(fhir_response_bytes=MIB))
        with pytest.raises(LimitExceededError, match=r"larger than the 1 MiB allowed \(limits\.fhir_response_bytes\)"):
            client.search_bundle("Patient")
        time.sleep(0.2)
    assert ehr.bytes_sent < 20 * MIB  # of the ~100 MiB the server would have sent


def test_a_search_whose_next_links_never_end_is_refused_at_the_page_limit() -> None:
    def next_page(seen: Seen) -> Reply:
        page = int(seen.path.rsplit("page=", 1)[1]) if "page=" in seen.path else 1
        bundle = {
            "resourceType": "Bundle",
            "type": "searchset",
            "link": [{"relation": "next", "url": f"{ehr.url}/fhir/ImagingStudy?page={page + 1}"}],
            "entry": [{"resource": {"resourceType": "ImagingStudy", "id": str(page)}}],
        }
        return Reply(headers={"Content-Type": "application/fhir+json"}, body=json.dumps(bundle).encode())

    with hostile_server(next_page) as ehr:
        found: list[dict[str, object]] = []
        with pytest.raises(LimitExceededError, match=r"100 pages allowed \(limits\.fhir_search_pages\)"):
            found.extend(FhirClient(f"{ehr.url}/fhir").search("ImagingStudy"))
    assert len(ehr.seen) == DEFAULT_LIMITS.fhir_search_pages  # a partial list is never passed off as the whole


# ---------------------------------------------------------------- DICOM headers that lie about their size


@pytest.fixture(scope="module")
def head_ct(data_dir: Path) -> list[Dataset]:
    return read_dicom_folder(data_dir / "ct/head_ge")


def _claiming(datasets: list[Dataset], rows: int, columns: int) -> list[Dataset]:
    lying = [copy.deepcopy(ds) for ds in datasets]
    for ds in lying:
        ds.Rows, ds.Columns = rows, columns
    return lying


def test_a_ct_header_claiming_60000_by_60000_is_refused_before_anything_is_allocated(head_ct: list[Dataset]) -> None:
    lying = _claiming(head_ct, 60000, 60000)
    tracemalloc.start()
    try:
        with pytest.raises(LimitExceededError, match=r"60000 x 60000 .* \(limits\.image_pixels\)"):
            assemble_volume(lying)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 * MIB  # a 28-slice float32 volume of that size would be 403 GB


def test_a_stack_whose_decoded_volume_passes_the_memory_limit_is_refused_before_allocation(data_dir: Path) -> None:
    lung2 = ct_series_from_nrrd(data_dir / "ct/chest_pyradiomics/lung2_image.nrrd", name="lung2")
    lying = _claiming(lung2, 10000, 10000)  # 100 million samples a slice: within image_pixels, 61 slices 24 GB
    tracemalloc.start()
    try:
        with pytest.raises(LimitExceededError, match=r"the volume would take 22\.7 GiB decoded.*limits\.decoded_bytes"):
            assemble_volume(lying)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 * MIB


def test_a_radiograph_header_claiming_huge_dimensions_is_refused_before_decoding(data_dir: Path) -> None:
    radiograph = dcmread(data_dir / "cr/rsna_pneumonia/rsna_cxr_unlabelled.dcm")
    radiograph.Rows, radiograph.Columns = 60000, 60000
    with pytest.raises(LimitExceededError, match=r"limits\.image_pixels"):
        projection_input(radiograph)
    with pytest.warns(UserWarning, match="cannot be assigned"):
        radiograph.Rows = "sixty thousand"  # a header value that is not a number at all
    with pytest.raises(ImageDataError, match="Rows that is not a whole number"):
        projection_input(radiograph)


# ---------------------------------------------------------------- a PACS that sends too much


def _tiny_instance() -> bytes:
    """A minimal CT instance (header only): what is counted here is instances, not pixels."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = UID("1.2.3.4.5.6")
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, UID("1.2.3.4.5.6")
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.3", "1.2.3.4", "CT"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _multipart(part: bytes, count: int, *, per_chunk: int = 100) -> Iterator[bytes]:
    framed = b"--limit-test\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n"
    for start in range(0, count, per_chunk):
        yield framed * min(per_chunk, count - start)
    yield b"--limit-test--\r\n"


def test_a_series_of_10000_instances_is_refused_at_the_instance_limit_while_it_streams() -> None:
    instance = _tiny_instance()
    total = 10_000

    def huge_series(seen: Seen) -> Reply:
        return Reply(headers={"Content-Type": MULTIPART}, body=_multipart(instance, total))

    received = 0
    with hostile_server(huge_series) as pacs:
        with pytest.raises(LimitExceededError, match=r"5,000 instances allowed \(limits\.instances_per_series\)"):
            for _ in fetch_series(f"{pacs.url}/dicom-web", "1.2.3", "1.2.3.4", timeout=10):
                received += 1
        time.sleep(0.2)
    assert received == DEFAULT_LIMITS.instances_per_series
    assert pacs.bytes_sent < total * (len(instance) + 60)  # the rest of the series was never read


def test_a_series_the_ehr_says_is_too_large_is_refused_before_the_pacs_is_asked() -> None:
    with recording_listener() as (pacs, connections):
        choice = SeriesChoice("1.2.3", "1.2.3.4", "CT", None, None, 10_000, f"{pacs}/dicom-web", "test")
        with pytest.raises(LimitExceededError, match=r"limits\.instances_per_series"):
            load_image(choice, expected_modality_projection=False)
    assert connections == []


def test_a_multipart_answer_past_the_byte_limit_is_refused_while_it_streams() -> None:
    def endless_part(seen: Seen) -> Reply:
        head = b"--limit-test\r\nContent-Type: application/dicom\r\n\r\n"
        return Reply(headers={"Content-Type": MULTIPART}, body=(head if i == 0 else b"\0" * MIB for i in range(200)))

    with hostile_server(endless_part) as pacs:
        limits = InputLimits(dicomweb_response_bytes=4 * MIB)
        with pytest.raises(LimitExceededError, match=r"4 MiB allowed \(limits\.dicomweb_response_bytes\)"):
            list(fetch_series(f"{pacs.url}/dicom-web", "1.2.3", "1.2.3.4", timeout=10, limits=limits))
        time.sleep(0.2)
    assert pacs.bytes_sent < 40 * MIB  # of 200 MiB


@pytest.mark.parametrize(
    ("content_type", "body", "error", "message"),
    [
        ("application/json", b"{}", PacsError, "not multipart/related"),
        (None, b"--limit-test--", PacsError, "not multipart/related"),
        ("multipart/related", b"--limit-test--", PacsError, "has no boundary"),
        ('multipart/related; boundary=""', b"----", PacsError, "not a valid boundary"),
        (MULTIPART, b"no boundary anywhere in here", PacsError, "no multipart boundary was found"),
        (MULTIPART, b"--limit-test\r\nContent-Type: application/dicom\r\n\r\nDICM", PacsError, "truncated"),
        (MULTIPART, b"--limit-test\r\nContent-Type: application/dicom", PacsError, "truncated"),
        (MULTIPART, b"--limit-testXY\r\n\r\nabc\r\n--limit-test--", PacsError, "other than a line break"),
        (MULTIPART, b"--limit-test\r\nNo-Blank-Line: x\r\n--limit-test--", PacsError, "headers do not end"),
        (MULTIPART, b"--limit-test\r\n\r\nnot a DICOM file\r\n--limit-test--", ImageDataError, "not a readable DICOM"),
    ],
)
def test_malformed_multipart_answers_are_typed_errors_naming_the_series(
    content_type: str | None, body: bytes, error: type[Exception], message: str
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    with (
        hostile_server(lambda seen: Reply(headers=headers, body=body)) as pacs,
        pytest.raises(error, match=message) as raised,
    ):
        list(fetch_series(f"{pacs.url}/dicom-web", "1.2.3", "1.2.3.4", timeout=5))
    assert "series 1.2.3.4 of study 1.2.3" in str(raised.value)


# ---------------------------------------------------------------- the settings


def test_limits_are_set_in_the_deployment_file_and_checked() -> None:
    raw = {"public_base_url": "https://cds.example.org", "data_dir": "/tmp/x", "dicomweb_allow": ["http://pacs/dw"]}
    settings = parse_settings({**raw, "limits": {"cds_request_bytes": 1048576, "instances_per_series": 3000}})
    assert settings.limits.cds_request_bytes == MIB and settings.limits.instances_per_series == 3000
    assert settings.limits.jwks_bytes == DEFAULT_LIMITS.jwks_bytes  # the others keep their defaults
    assert parse_settings(raw).limits == DEFAULT_LIMITS
    with pytest.raises(ConfigurationError, match="Did you mean 'instances_per_series'"):
        parse_settings({**raw, "limits": {"instance_per_series": 10}})
    with pytest.raises(ConfigurationError, match="positive whole number"):
        parse_settings({**raw, "limits": {"decoded_bytes": 0}})

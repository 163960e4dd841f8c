"""The results writer's choices (fhir_adapters/writer.py): which strategy a server gets, which images go to Binary.

The plans are checked on hand-made results (synthetic PNG noise stands in for key images of a given size: this is
plumbing, not image analysis) against the CapabilityStatements the two real servers publish; the cache and a
complete write are checked against the real servers themselves.
"""

from __future__ import annotations

import io
import uuid
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from core.errors import ConfigurationError
from devtools.servers import FhirServer
from fhir_adapters.builders import AnalysisTarget, DeviceInfo, build_results_bundle
from fhir_adapters.client import FhirClient
from fhir_adapters.errors import FhirRequestTooLarge
from fhir_adapters.images import media_png
from fhir_adapters.writer import (
    DEFAULT_MAX_REQUEST_BYTES,
    CapabilityCache,
    ServerCapabilities,
    WriteSettings,
    plan_write,
    write_results,
)
from models.base import AnalysisResult, Category, Explanation, Measurement
from service.settings import parse_settings
from tests.fhir_client_support import fault_proxy

ISSUED = datetime(2025, 3, 4, 10, 30, tzinfo=UTC)
DEVICE = DeviceInfo("ct-emphysema", "1.2.0", "CT emphysema quantification")

SEKMET_LIKE = ServerCapabilities.from_statement(
    {
        "resourceType": "CapabilityStatement",
        "software": {"name": "SEKMET FHIR R4 Tester"},
        "rest": [{"mode": "server", "interaction": [{"code": "transaction"}], "resource": []}],
    }
)
MEDPLUM_LIKE = ServerCapabilities.from_statement(
    {
        "resourceType": "CapabilityStatement",
        "software": {"name": "medplum", "version": "4.5.2"},
        "rest": [
            {
                "mode": "server",
                "interaction": [{"code": "transaction"}, {"code": "batch"}],
                "resource": [
                    {"type": t, "updateCreate": False, "conditionalCreate": True}
                    for t in ("Binary", "DiagnosticReport", "Media", "Observation", "Provenance")
                ],
            }
        ],
    }
)
NO_TRANSACTIONS = ServerCapabilities.from_statement(
    {"resourceType": "CapabilityStatement", "rest": [{"mode": "server", "interaction": [{"code": "batch"}]}]}
)


def _noise_png(approx_bytes: int, seed: int) -> bytes:
    """A PNG of random pixels (incompressible) of about ``approx_bytes``."""
    side = int((approx_bytes / 3) ** 0.5)
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _result(measurements: int = 3, image_bytes: tuple[int, ...] = (2_000,)) -> AnalysisResult:
    return AnalysisResult(
        analyzer="ct-emphysema",
        version="1.2.0",
        measurements=tuple(Measurement(f"m{n}", f"Measurement {n}", float(n), "%") for n in range(measurements)),
        category=Category("moderate", "Moderate emphysema", "example rule", True),
        conclusion="Moderate emphysema.",
        explanations=tuple(
            Explanation(f"Overlay {n}", "overlay", _noise_png(size, n), n) for n, size in enumerate(image_bytes)
        ),
    )


def _target(patient: str = "Patient/p1", study: str = "is-1") -> AnalysisTarget:
    return AnalysisTarget(study, patient, f"2.25.{uuid.uuid4().int}", f"2.25.{uuid.uuid4().int}", "Chest CT.")


def _bundle(result: AnalysisResult, target: AnalysisTarget | None = None) -> dict[str, Any]:
    return build_results_bundle(target or _target(), result, DEVICE, issued=ISSUED)


def _media_urls(bundle: dict[str, Any]) -> list[str]:
    return [e["fullUrl"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Media"]


# ---------------------------------------------------------------------------------------------- what servers say


def test_the_two_real_servers_declare_what_the_writer_reads(fhir_base: FhirServer, medplum: FhirServer) -> None:
    sekmet = ServerCapabilities.from_statement(FhirClient(fhir_base.base_url).capability_statement())
    assert sekmet.transaction and sekmet.allows_update_create("Provenance") and sekmet.known is None
    # sekmet stores Binary without listing it: an unlisted type follows what every listed type declares.
    assert "Binary" not in sekmet.update_create and sekmet.allows_update_create("Binary")
    engine = ServerCapabilities.from_statement(FhirClient(medplum.base_url).capability_statement())
    assert engine.software == "medplum" and engine.transaction
    assert not engine.allows_update_create("Provenance") and engine.allows_conditional_create("Observation")
    assert engine.known is not None
    assert (engine.known.max_transaction_entries, engine.known.max_request_bytes) == (8, 1024 * 1024)


# ---------------------------------------------------------------------------------------------- the plans


def test_a_result_over_medplums_entry_limit_is_written_in_order_and_a_small_one_in_a_transaction() -> None:
    big = _bundle(_result(measurements=6, image_bytes=(2_000, 2_000, 2_000)))  # Device, 6 + 3, report: 11 entries
    plan = plan_write(big, MEDPLUM_LIKE, WriteSettings())
    assert plan.strategy == "ordered"
    assert "11 entries" in plan.reason and "at most 8" in plan.reason and "medplum" in plan.reason
    small = _bundle(_result(measurements=1))  # Device, 1 Observation, 1 Media, report (+ Provenance after)
    plan = plan_write(small, MEDPLUM_LIKE, WriteSettings())
    assert plan.strategy == "transaction" and not plan.provenance_in_transaction
    assert plan_write(big, SEKMET_LIKE, WriteSettings()).strategy == "transaction"  # no entry limit known there


def test_a_server_without_transactions_gets_ordered_writes_and_settings_override_the_server() -> None:
    bundle = _bundle(_result())
    plan = plan_write(bundle, NO_TRANSACTIONS, WriteSettings())
    assert plan.strategy == "ordered" and "offers no transaction" in plan.reason
    assert plan_write(bundle, SEKMET_LIKE, WriteSettings(strategy="ordered")).strategy == "ordered"
    capped = plan_write(bundle, SEKMET_LIKE, WriteSettings(max_transaction_entries=4))
    assert capped.strategy == "ordered" and "as configured" in capped.reason
    # A larger configured limit lifts what is known of Medplum (an administrator raised it on their server).
    assert plan_write(bundle, MEDPLUM_LIKE, WriteSettings(max_transaction_entries=50)).strategy == "transaction"


def test_images_go_to_binary_largest_first_only_until_the_transaction_fits() -> None:
    result = _result(image_bytes=(60_000, 120_000, 90_000))
    bundle = _bundle(result)
    media = _media_urls(bundle)
    inline = plan_write(bundle, SEKMET_LIKE, WriteSettings())
    assert inline.binary_media == frozenset() and inline.max_request_bytes == DEFAULT_MAX_REQUEST_BYTES
    # ~360 kB of base64 images: under 300 kB the largest (120 kB PNG, 160 kB base64) must go, and it is enough.
    plan = plan_write(bundle, SEKMET_LIKE, WriteSettings(max_request_bytes=300_000))
    assert plan.strategy == "transaction" and plan.binary_media == {media[1]}
    plan = plan_write(bundle, SEKMET_LIKE, WriteSettings(max_request_bytes=200_000))
    assert plan.binary_media == {media[1], media[2]}
    # Under 160 kB the largest image cannot travel even alone: refused before anything is sent.
    with pytest.raises(FhirRequestTooLarge, match=r"The Binary of this result is 16[0-9]{4} bytes"):
        plan_write(bundle, SEKMET_LIKE, WriteSettings(max_request_bytes=150_000))
    # Medplum's own 1 MiB body limit applies without configuration.
    assert plan_write(bundle, MEDPLUM_LIKE, WriteSettings()).max_request_bytes == 1024 * 1024


def test_write_settings_are_checked_with_a_hint() -> None:
    with pytest.raises(ConfigurationError, match="Did you mean 'ordered'"):
        WriteSettings(strategy="orderd")
    with pytest.raises(ConfigurationError, match="positive whole number"):
        WriteSettings(max_request_bytes=0)
    with pytest.raises(ConfigurationError, match="Did you mean 'max_request_bytes'"):
        WriteSettings.from_mapping({"max_request_byte": 5}, source="deploy.yaml")
    settings = parse_settings(
        {
            "public_base_url": "https://cds.example",
            "data_dir": "/tmp/x",
            "dicomweb_allow": ["https://pacs.example/dicom-web"],
            "fhir_write": [{"fhir_base": "https://ehr.example/fhir/", "strategy": "ordered", "max_request_bytes": 5}],
        }
    )
    assert settings.fhir_write.for_server("https://ehr.example/fhir") == WriteSettings("ordered", None, 5)
    assert settings.fhir_write.for_server("https://other.example/fhir") == WriteSettings()


# ---------------------------------------------------------------------------------------------- on the real servers


def _patient_target(client: FhirClient) -> AnalysisTarget:
    patient = client.create({"resourceType": "Patient", "name": [{"family": "Writer", "given": ["Test"]}]})
    return _target(patient=f"Patient/{patient['id']}")


def test_the_capability_statement_is_read_once_per_server_not_per_analysis(fhir_base: FhirServer) -> None:
    with fault_proxy(fhir_base.base_url, lambda index, method, path: None) as proxy:
        client = FhirClient(proxy.base_url, session=requests.Session())
        cache = CapabilityCache()
        for _ in range(3):
            filed = write_results(client, _bundle(_result(image_bytes=()), _patient_target(client)), capabilities=cache)
            assert filed.strategy == "transaction" and filed.report_created
        assert [path for method, path in proxy.requests_seen if path.endswith("/metadata")] == ["/fhir/metadata"]


def test_an_image_larger_than_one_request_may_be_is_refused_before_anything_is_written(medplum: FhirServer) -> None:
    client = FhirClient(medplum.base_url, session=requests.Session())
    target = _patient_target(client)
    bundle = _bundle(_result(measurements=1, image_bytes=(60_000,)), target)
    with pytest.raises(FhirRequestTooLarge, match=r"The Binary of this result is .* more than the 50000 bytes") as no:
        write_results(client, bundle, settings=WriteSettings(max_request_bytes=50_000))
    assert "max_request_bytes" in no.value.remedy
    for kind in ("Observation", "Media", "DiagnosticReport"):
        assert not list(client.search(kind, {"subject": target.patient_reference}))


@pytest.mark.parametrize("kind", ["sekmet", "medplum"])
def test_ordered_writes_put_the_report_last_with_every_bundle_reference_rewritten(
    kind: str, fhir_base: FhirServer, medplum: FhirServer
) -> None:
    client = FhirClient((fhir_base if kind == "sekmet" else medplum).base_url, session=requests.Session())
    result = _result(measurements=2, image_bytes=(3_000,))
    filed = write_results(client, _bundle(result, _patient_target(client)), settings=WriteSettings("ordered"))
    assert filed.strategy == "ordered" and filed.report_created
    kinds = [reference.split("/")[0] for reference in filed.written]
    assert kinds == ["Device", "Observation", "Observation", "Media", "DiagnosticReport", "Provenance"]
    report = client.read_reference(filed.report)
    parts = [r["reference"] for r in report["result"]] + [m["link"]["reference"] for m in report["media"]]
    assert parts == list(filed.written[1:4])  # the ids the server gave, not the Bundle's urn:uuid
    device = filed.written[0]
    assert all(client.read_reference(part)["device"]["reference"] == device for part in parts)
    [provenance] = client.search("Provenance", {"target": filed.report})
    assert provenance["agent"][0]["who"]["reference"] == device
    assert {t["reference"] for t in provenance["target"]} == {*parts, filed.report}


@pytest.mark.parametrize("kind", ["sekmet", "medplum"])
def test_a_transaction_over_the_size_limit_sends_its_largest_image_ahead_as_binary(
    kind: str, fhir_base: FhirServer, medplum: FhirServer
) -> None:
    client = FhirClient((fhir_base if kind == "sekmet" else medplum).base_url, session=requests.Session())
    result = _result(measurements=1, image_bytes=(40_000, 3_000))
    bundle = _bundle(result, _patient_target(client))
    limit = WriteSettings(max_request_bytes=60_000)  # the images alone, base64: about 57 kB
    filed = write_results(client, bundle, settings=limit)
    assert filed.strategy == "transaction" and filed.images_as_binary == 1
    assert filed.written[0].startswith("Binary/")
    report = client.read_reference(filed.report)
    images = [client.read_reference(m["link"]["reference"]) for m in report["media"]]
    assert images[0]["content"]["url"] == filed.written[0] and "data" not in images[0]["content"]
    assert "data" in images[1]["content"]  # the small one still travels inline
    binary = client.read_reference(filed.written[0])
    assert binary["securityContext"]["reference"] == report["subject"]["reference"]
    assert binary["meta"]["security"][0]["code"] == "AIAST"
    assert [media_png(client, m) for m in images] == [e.png for e in result.explanations]
    # Filing it again writes nothing: the report is found, and so is the image's Binary (not written a second time).
    again = write_results(client, bundle, settings=limit)
    assert not again.report_created and again.written == filed.written

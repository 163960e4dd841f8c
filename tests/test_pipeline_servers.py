"""Issue 24 acceptance: the pipeline files its results on two real FHIR servers that take them differently.

sekmet-fhir takes a results Bundle as one transaction. Medplum's FHIR engine (npm ``@medplum/fhir-router``, with
Medplum's default limits: at most 8 entries in a transaction holding conditional creates, 1 MiB request bodies,
no update-as-create) gets the same 12-resource emphysema result as ordered writes, the report last. On both, the
real chest CT's result reads back complete, a re-run adds nothing, and a failure between writes followed by a
retry leaves exactly one complete result. A result whose key images do not fit the request limit is filed with
them as Binary, and the demo's report files still show them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from core.allowlist import AllowList
from devtools.demo import LoadedStudy, load_sample_study, write_report_files
from devtools.samples import SAMPLES
from devtools.servers import FHIR_SERVER_KINDS, FhirServer, OrthancServer
from fhir_adapters.client import FhirClient
from fhir_adapters.errors import FhirServerError
from fhir_adapters.writer import WriteSettings
from models.registry import get_analyzer
from pipeline.analysis import AnalysisOutcome, analyze_study
from tests.fhir_client_support import Action, fault_proxy

EXPECTED_STRATEGY = {"sekmet": "transaction", "medplum": "ordered"}


@pytest.fixture(scope="module", params=FHIR_SERVER_KINDS)
def ehr(request: pytest.FixtureRequest, fhir_base: FhirServer, medplum: FhirServer) -> FhirServer:
    return fhir_base if request.param == "sekmet" else medplum


@pytest.fixture(scope="module")
def client(ehr: FhirServer) -> FhirClient:
    return FhirClient(ehr.base_url, session=requests.Session())


@pytest.fixture(scope="module")
def chest_ct(client: FhirClient, orthanc: OrthancServer) -> LoadedStudy:
    return load_sample_study(client, orthanc, SAMPLES["lung2"], copy=2400)  # its own patient on the shared servers


@pytest.fixture(scope="module")
def first_run(client: FhirClient, chest_ct: LoadedStudy, allow: AllowList) -> AnalysisOutcome:
    return analyze_study(client, chest_ct.imaging_study, get_analyzer("ct-emphysema"), dicomweb_allow_list=allow)


def _all(client: FhirClient, resource_type: str, patient: str) -> list[dict[str, Any]]:
    return list(client.search(resource_type, {"subject": patient}))


def _assert_one_complete_result(client: FhirClient, patient: str, observations: int, media: int) -> dict[str, Any]:
    """The patient has exactly one AI report, whose every part is there once, and one Provenance for it."""
    [report] = _all(client, "DiagnosticReport", patient)
    filed_observations = {f"Observation/{o['id']}" for o in _all(client, "Observation", patient)}
    filed_media = {f"Media/{m['id']}" for m in _all(client, "Media", patient)}
    assert (len(filed_observations), len(filed_media)) == (observations, media)
    assert {r["reference"] for r in report["result"]} == filed_observations
    assert {m["link"]["reference"] for m in report["media"]} == filed_media
    [provenance] = client.search("Provenance", {"target": f"DiagnosticReport/{report['id']}"})
    assert {t["reference"] for t in provenance["target"]} == filed_observations | filed_media | {
        f"DiagnosticReport/{report['id']}"
    }
    return report


def test_the_chest_ct_result_reads_back_complete_written_the_way_the_server_takes_it(
    ehr: FhirServer, client: FhirClient, chest_ct: LoadedStudy, first_run: AnalysisOutcome
) -> None:
    write = first_run.summary()["write"]
    assert write["strategy"] == EXPECTED_STRATEGY[ehr.kind], write
    if ehr.kind == "medplum":
        assert "at most 8" in write["reason"]
    measured = len(first_run.result.measurements)
    report = _assert_one_complete_result(client, chest_ct.patient, measured, len(first_run.result.explanations))
    assert f"DiagnosticReport/{report['id']}" == first_run.diagnostic_report and not first_run.already_present
    assert report["status"] == "preliminary" and "no emphysema" in report["conclusion"].lower()
    laa = next(
        client.read_reference(r["reference"])
        for r in report["result"]
        if "laa950" in str(client.read_reference(r["reference"])["code"])
    )
    assert 0.0 <= laa["valueQuantity"]["value"] < 5.0  # the non-emphysematous chest CT


def test_a_rerun_adds_nothing(
    client: FhirClient, chest_ct: LoadedStudy, first_run: AnalysisOutcome, allow: AllowList
) -> None:
    again = analyze_study(client, chest_ct.imaging_study, get_analyzer("ct-emphysema"), dicomweb_allow_list=allow)
    assert again.already_present and again.diagnostic_report == first_run.diagnostic_report
    assert again.written == first_run.written
    _assert_one_complete_result(
        client, chest_ct.patient, len(first_run.result.measurements), len(first_run.result.explanations)
    )


def _report_write_fails(strategy: str) -> Callable[[int, str, str], Action | None]:
    """The proxy's plan: the first write of a part is done but its answer lost; the report's write always fails.

    Ordered writes: the first Observation is created and its answer lost (the client asks again and must be given
    the one it created), and every POST of the DiagnosticReport answers 503. A transaction: the first one is applied
    and its answer lost, and every later one answers 503.
    """
    report_path = "/fhir/DiagnosticReport" if strategy == "ordered" else "/fhir"
    part_path = "/fhir/Observation" if strategy == "ordered" else "/fhir"
    seen: set[str] = set()

    def plan(index: int, method: str, path: str) -> Action | None:
        path = path.split("?", 1)[0]
        if method != "POST":
            return None
        if path == part_path and part_path not in seen:
            seen.add(part_path)
            return Action(status=500, lose_answer=True)
        if path == report_path:
            return Action(status=503)
        return None

    return plan


def test_a_failure_between_writes_then_a_retry_leaves_exactly_one_complete_result(
    ehr: FhirServer, client: FhirClient, orthanc: OrthancServer, allow: AllowList
) -> None:
    study = load_sample_study(client, orthanc, SAMPLES["lung2"], copy=2401)
    analyzer = get_analyzer("ct-emphysema")
    strategy = EXPECTED_STRATEGY[ehr.kind]
    with fault_proxy(ehr.base_url, _report_write_fails(strategy)) as proxy:
        flaky = FhirClient(proxy.base_url, session=requests.Session(), retries=2, backoff=0.0)
        with pytest.raises(FhirServerError, match="503"):
            analyze_study(flaky, study.imaging_study, analyzer, dicomweb_allow_list=allow)
    reports = _all(client, "DiagnosticReport", study.patient)
    if strategy == "ordered":
        # The parts are in, once each despite the lost answer; no report yet, so no clinician sees a partial one.
        assert reports == [] and len(_all(client, "Observation", study.patient)) > 0
    else:
        assert len(reports) == 1  # the transaction whose answer was lost was applied whole
    retried = analyze_study(client, study.imaging_study, analyzer, dicomweb_allow_list=allow)
    assert retried.already_present == (strategy == "transaction")
    _assert_one_complete_result(
        client, study.patient, len(retried.result.measurements), len(retried.result.explanations)
    )


def test_key_images_over_the_size_limit_are_filed_as_binary_and_the_demo_still_shows_them(
    fhir_base: FhirServer, orthanc: OrthancServer, allow: AllowList, tmp_path: Path
) -> None:
    client = FhirClient(fhir_base.base_url, session=requests.Session())
    study = load_sample_study(client, orthanc, SAMPLES["lung2"], copy=2402)
    outcome = analyze_study(
        client,
        study.imaging_study,
        get_analyzer("ct-emphysema"),
        dicomweb_allow_list=allow,
        write_settings=WriteSettings(max_request_bytes=400_000),  # three ~195 kB key images do not fit
    )
    assert outcome.write_strategy == "transaction" and outcome.summary()["write"]["imagesAsBinary"] >= 1
    report = _assert_one_complete_result(
        client, study.patient, len(outcome.result.measurements), len(outcome.result.explanations)
    )
    contents = [client.read_reference(m["link"]["reference"])["content"] for m in report["media"]]
    assert sum("url" in c and "data" not in c for c in contents) == outcome.images_as_binary
    files = write_report_files(client, outcome.diagnostic_report, outcome.summary(), tmp_path)
    key_images = sorted(p for p in files if p.name.startswith("key-image-"))
    assert [p.read_bytes() for p in key_images] == [e.png for e in outcome.result.explanations]

"""Issue 20 acceptance through the whole pipeline: real scans in Orthanc, the real FHIR server, each analyzer that files
a measurement followed over time.

No real longitudinal pair exists, so each patient's history is made of real scans filed again (see
``tests/followup_support.py``): the first study has no prior; the same pixels a year later must read "no change";
a result filed by an analyzer version its card does not vouch for is named and skipped; a copy with the patient moved
1 mm along the table and a few millimetres across must read "no change" within the stated repeatability; a re-run
adds nothing; another patient's identical scan is never a prior. ct-heart and ct-bone run the same chain as
ct-emphysema; the cases that need more analyses (a comparable older version, another patient) run on ct-emphysema,
the fastest.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import pytest
import requests

from core.allowlist import AllowList
from devtools.samples import load_sample
from devtools.servers import FHIR_SERVER_KINDS, FhirServer, OrthancServer
from fhir_adapters.builders import AnalysisTarget, DeviceInfo, build_results_bundle
from fhir_adapters.client import FhirClient
from fhir_adapters.constants import ACQUISITION_EXTENSION, COMPARISON_CODESYSTEM
from fhir_adapters.history import with_devices
from fhir_adapters.validation import validate_resource
from models.registry import get_analyzer
from pipeline.analysis import AnalysisOutcome, analyze_study
from smart_launch.views import trend_sections
from tests.followup_support import FiledStudy, file_study, resource_count, shifted

SAMPLES = {"ct-emphysema": "lung2", "ct-heart": "lung2", "ct-bone": "abdomen"}
OTHER_VERSION = "0.0.1-not-on-the-card"


class CountingSession(requests.Session):
    """A requests session that remembers each request's method and path: how many FHIR searches an analysis makes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        self.calls.append((str(method), str(url).split("?")[0]))
        return super().request(method, url, *args, **kwargs)


@pytest.fixture(scope="module")
def session() -> CountingSession:
    return CountingSession()


@pytest.fixture(scope="module")
def client(fhir_base: FhirServer, session: CountingSession) -> FhirClient:
    return FhirClient(fhir_base.base_url, session=session)


@pytest.fixture(scope="module")
def images() -> Iterator[dict[str, Any]]:
    loaded: dict[str, Any] = {}
    yield loaded
    loaded.clear()


def sample(images: dict[str, Any], name: str) -> Any:
    if name not in images:
        images[name] = load_sample(name)
    return images[name]


def new_patient(client: FhirClient) -> str:
    return f"Patient/{client.create({'resourceType': 'Patient', 'gender': 'female'})['id']}"


def file_result_of_version(
    client: FhirClient, patient: str, outcome: AnalysisOutcome, version: str, started: str
) -> str:
    """File ``outcome``'s result as if analyzer ``version`` had measured another study on ``started``."""
    study = client.create(
        {
            "resourceType": "ImagingStudy",
            "status": "available",
            "subject": {"reference": patient},
            "started": started,
        }
    )
    target = AnalysisTarget(
        imaging_study_id=str(study["id"]),
        patient_reference=patient,
        study_uid=f"2.25.{abs(hash((patient, version, started)))}",
        series_uid=f"2.25.{abs(hash((version, started, patient)))}",
        selection_reason="filed by an earlier analyzer version (test)",
        study_started=started,
    )
    result = replace(outcome.result, version=version)
    device = DeviceInfo(name=result.analyzer, version=version, title=result.analyzer)
    response = client.transaction(build_results_bundle(target, result, device, issued=datetime.now(UTC)))
    return next(
        "/".join(e["response"]["location"].split("/_history")[0].split("/")[-2:])
        for e in response["entry"]
        if "DiagnosticReport/" in e["response"]["location"]
    )


@dataclass(frozen=True)
class Chain:
    """One patient's history for one analyzer, analysed study by study."""

    patient: str
    first: AnalysisOutcome  # 2023-01-05: no prior
    second: AnalysisOutcome  # 2024-01-10: the same pixels again
    other_version: str  # 2024-06-01: a result of a version the card does not vouch for
    third_study: FiledStudy  # 2025-01-10: the shifted copy
    third: AnalysisOutcome
    third_searches: int  # FHIR searches made by the third analysis


@pytest.fixture(scope="module")
def chains(
    client: FhirClient, orthanc: OrthancServer, allow: AllowList, images: dict[str, Any], session: CountingSession
) -> Iterator[dict[str, Chain]]:
    built: dict[str, Chain] = {}

    def chain(name: str) -> Chain:
        if name in built:
            return built[name]
        analyzer = get_analyzer(name)
        pixels = sample(images, SAMPLES[name])
        patient = new_patient(client)
        first_study = file_study(client, orthanc, patient, pixels, "20230105")
        first = analyze_study(client, first_study.imaging_study, analyzer, dicomweb_allow_list=allow)
        second_study = file_study(client, orthanc, patient, pixels, "20240110")
        second = analyze_study(client, second_study.imaging_study, analyzer, dicomweb_allow_list=allow)
        other = file_result_of_version(client, patient, first, OTHER_VERSION, "2024-06-01T09:00:00+00:00")
        third_study = file_study(client, orthanc, patient, shifted(pixels), "20250110")
        before = len(session.calls)
        third = analyze_study(client, third_study.imaging_study, analyzer, dicomweb_allow_list=allow)
        searches = sum(
            1 for method, url in session.calls[before:] if method == "GET" and url.endswith("/DiagnosticReport")
        )
        built[name] = Chain(patient, first, second, other, third_study, third, searches)
        return built[name]

    yield {name: chain(name) for name in SAMPLES}


def read(client: FhirClient, reference: str) -> dict[str, Any]:
    kind, _, ident = reference.partition("/")
    return client.read(kind, ident)


def comparison_observations(client: FhirClient, report: dict[str, Any]) -> list[dict[str, Any]]:
    observations = [read(client, r["reference"]) for r in report["result"]]
    return [o for o in observations if o["code"]["coding"][0]["system"] == COMPARISON_CODESYSTEM]


@pytest.mark.parametrize("name", list(SAMPLES))
def test_the_first_study_has_no_prior_and_files_how_it_was_acquired(
    name: str, client: FhirClient, chains: dict[str, Chain]
) -> None:
    first = chains[name].first
    assert first.comparison is not None and first.comparison.prior is None and not first.comparison.not_compared
    report = read(client, first.diagnostic_report)
    assert "Compared with" not in report["conclusion"] and not comparison_observations(client, report)
    [extension] = report["extension"]
    thickness = next(p for p in extension["extension"] if p["url"] == "SliceThickness")
    assert extension["url"] == ACQUISITION_EXTENSION
    assert thickness["valueQuantity"]["value"] == (3.0 if name == "ct-bone" else 5.0)


@pytest.mark.parametrize("name", list(SAMPLES))
def test_the_same_scan_a_year_later_reads_no_change(name: str, client: FhirClient, chains: dict[str, Chain]) -> None:
    chain = chains[name]
    comparison = chain.second.comparison
    assert comparison is not None and comparison.prior is not None
    assert comparison.prior.reference == chain.first.diagnostic_report
    assert comparison.changes and all(c.absolute == 0 for c in comparison.changes)
    assessed = [c for c in comparison.changes if c.verdict != "not-assessed"]
    assert assessed and all(c.verdict == "stable" for c in assessed)
    assert not comparison.weaker_because  # the same acquisition, as filed with both results
    report = read(client, chain.second.diagnostic_report)
    assert "Compared with the CT of 2023-01-05" in report["conclusion"]
    filed = comparison_observations(client, report)
    assert len(filed) == len(comparison.changes)
    first_observations = {r["reference"] for r in read(client, chain.first.diagnostic_report)["result"]}
    for observation in filed:
        validate_resource(observation)
        current, prior = (d["reference"] for d in observation["derivedFrom"])
        assert current in {r["reference"] for r in report["result"]} and prior in first_observations
        assert observation["effectiveDateTime"] == report["effectiveDateTime"]
        dates = [c["valueDateTime"] for c in observation["component"] if "valueDateTime" in c]
        assert dates == ["2023-01-05T09:00:00+00:00"]


@pytest.mark.parametrize("name", list(SAMPLES))
def test_a_shifted_copy_reads_no_change_within_repeatability_against_the_newest_comparable_prior(
    name: str, client: FhirClient, chains: dict[str, Chain]
) -> None:
    chain = chains[name]
    comparison = chain.third.comparison
    assert comparison is not None and comparison.prior is not None
    assert comparison.prior.reference == chain.second.diagnostic_report  # newest comparable, not the 2024-06 one
    assert [p.reference for p in comparison.history] == [
        chain.other_version,
        chain.second.diagnostic_report,
        chain.first.diagnostic_report,
    ]
    [skipped] = comparison.not_compared
    assert f"2024-06-01 ({name} {OTHER_VERSION}) is not compared" in skipped
    assessed = {c.key: c for c in comparison.changes if c.verdict != "not-assessed"}
    key = {"ct-emphysema": "laa950_percent", "ct-heart": "ascending_aorta_diameter_mm", "ct-bone": "l1_trabecular_hu"}[
        name
    ]
    assert assessed[key].verdict == "stable", assessed[key].sentence()
    assert all(c.verdict == "stable" for c in assessed.values()), [c.sentence() for c in assessed.values()]
    if name == "ct-heart":  # 5 mm slices: thicker than the 3 mm the calcium repeatability holds for
        calcium = next(c for c in comparison.changes if c.key == "cac_agatston")
        assert calcium.verdict == "not-assessed" and "up to 3 mm" in calcium.no_verdict_because
    report = read(client, chain.third.diagnostic_report)
    assert "Compared with the CT of 2024-01-10" in report["conclusion"] and "2024-06-01" in report["conclusion"]


@pytest.mark.parametrize("name", list(SAMPLES))
def test_finding_the_priors_costs_one_search_and_a_rerun_adds_nothing(
    name: str, client: FhirClient, chains: dict[str, Chain], allow: AllowList
) -> None:
    chain = chains[name]
    assert chain.third_searches == 1
    held = resource_count(client, chain.patient)
    again = analyze_study(client, chain.third_study.imaging_study, get_analyzer(name), dicomweb_allow_list=allow)
    assert again.already_present and again.diagnostic_report == chain.third.diagnostic_report
    assert again.comparison is None  # the first run's comparison is the one in the record
    assert resource_count(client, chain.patient) == held


@pytest.mark.parametrize("name", list(SAMPLES))
def test_every_result_is_in_the_trend_and_the_other_version_is_marked(
    name: str, client: FhirClient, chains: dict[str, Chain]
) -> None:
    chain = chains[name]
    bundle = client.search_bundle(
        "DiagnosticReport", {"subject": chain.patient, "_include": "DiagnosticReport:result", "_count": "100"}
    )
    resources = with_devices(client, [e["resource"] for e in bundle["entry"]])  # as the app reads them
    [section] = trend_sections(resources, patient_id=chain.patient.split("/")[1], analyzer=name)
    key = {"ct-emphysema": "laa950_percent", "ct-heart": "ascending_aorta_diameter_mm", "ct-bone": "l1_trabecular_hu"}[
        name
    ]
    trend = next(t for t in section.trends if t.key == key)
    assert [p.date.year for p in trend.points] == [2023, 2024, 2024, 2025]
    assert [p.comparable for p in trend.points] == [True, True, False, True]
    assert trend.points[-1].focus and trend.band is not None and trend.verdict == "stable"
    assert trend.band[0] <= trend.points[-1].value <= trend.band[1]
    assert "<svg" in trend.svg("t") and "other version" in trend.svg("t")


def test_a_prior_of_a_version_the_card_vouches_for_is_compared(
    client: FhirClient, orthanc: OrthancServer, allow: AllowList, images: dict[str, Any], chains: dict[str, Chain]
) -> None:
    patient = new_patient(client)
    prior = file_result_of_version(client, patient, chains["ct-emphysema"].first, "1.0.1", "2024-03-01T09:00:00+00:00")
    study = file_study(client, orthanc, patient, sample(images, "lung2"), "20250301")
    outcome = analyze_study(client, study.imaging_study, get_analyzer("ct-emphysema"), dicomweb_allow_list=allow)
    assert outcome.comparison is not None and outcome.comparison.prior is not None
    assert outcome.comparison.prior.reference == prior and outcome.comparison.prior.version == "1.0.1"
    laa = next(c for c in outcome.comparison.changes if c.key == "laa950_percent")
    assert laa.verdict == "stable" and laa.absolute == 0
    # filed without an acquisition record (as results were before this feature): the comparison says so
    assert any("was not filed with its result" in reason for reason in outcome.comparison.weaker_because)


def test_another_patients_identical_scan_is_never_a_prior(
    client: FhirClient, orthanc: OrthancServer, allow: AllowList, images: dict[str, Any], chains: dict[str, Chain]
) -> None:
    assert chains["ct-emphysema"].second.comparison is not None  # that patient has earlier results of these pixels
    stranger = new_patient(client)
    study = file_study(client, orthanc, stranger, sample(images, "lung2"), "20260101")
    outcome = analyze_study(client, study.imaging_study, get_analyzer("ct-emphysema"), dicomweb_allow_list=allow)
    assert outcome.comparison is not None
    assert outcome.comparison.prior is None and outcome.comparison.history == ()
    assert "Compared with" not in read(client, outcome.diagnostic_report)["conclusion"]


def test_a_classifiers_probability_is_never_compared(
    client: FhirClient, orthanc: OrthancServer, allow: AllowList, images: dict[str, Any], session: CountingSession
) -> None:
    patient = new_patient(client)
    analyzer = get_analyzer("cxr-pneumonia")
    radiograph = sample(images, "rsna-cxr")
    earlier = file_study(client, orthanc, patient, radiograph, "20240101")
    analyze_study(client, earlier.imaging_study, analyzer, dicomweb_allow_list=allow)
    later = file_study(client, orthanc, patient, radiograph, "20250101")
    before = len(session.calls)
    outcome = analyze_study(client, later.imaging_study, analyzer, dicomweb_allow_list=allow)
    assert outcome.comparison is None  # the card: a model's score has no published scan-rescan repeatability
    assert not any(url.endswith("/DiagnosticReport") and method == "GET" for method, url in session.calls[before:])
    report = read(client, outcome.diagnostic_report)
    assert "Compared with" not in report["conclusion"] and not comparison_observations(client, report)


@pytest.mark.parametrize("kind", FHIR_SERVER_KINDS)
def test_the_comparison_is_filed_on_each_server_the_way_it_takes_results(
    kind: str,
    fhir_base: FhirServer,
    medplum: FhirServer,
    orthanc: OrthancServer,
    allow: AllowList,
    images: dict[str, Any],
) -> None:
    """On Medplum (ordered writes, the report last) as on sekmet-fhir (one transaction): the same search finds the
    prior, the comparison Observations are filed before the report that lists them, and a re-run adds nothing."""
    ehr = FhirClient((fhir_base if kind == "sekmet" else medplum).base_url, session=requests.Session())
    analyzer = get_analyzer("ct-emphysema")
    patient = new_patient(ehr)
    first = file_study(ehr, orthanc, patient, sample(images, "lung2"), "20240201")
    earlier = analyze_study(ehr, first.imaging_study, analyzer, dicomweb_allow_list=allow)
    second = file_study(ehr, orthanc, patient, sample(images, "lung2"), "20250201")
    outcome = analyze_study(ehr, second.imaging_study, analyzer, dicomweb_allow_list=allow)
    assert outcome.write_strategy == ("transaction" if kind == "sekmet" else "ordered")
    assert outcome.comparison is not None and outcome.comparison.prior is not None
    assert outcome.comparison.prior.reference == earlier.diagnostic_report
    report = read(ehr, outcome.diagnostic_report)
    filed = comparison_observations(ehr, report)
    assert (
        len(filed) == len(outcome.comparison.changes) and "Compared with the CT of 2024-02-01" in report["conclusion"]
    )
    held = resource_count(ehr, patient)
    again = analyze_study(ehr, second.imaging_study, analyzer, dicomweb_allow_list=allow)
    assert again.already_present and resource_count(ehr, patient) == held


def test_hippocampal_volumes_plug_in_charted_and_compared_without_a_verdict(
    client: FhirClient, orthanc: OrthancServer, allow: AllowList, images: dict[str, Any]
) -> None:
    """mr-hippocampus follows its volumes through its card alone: the same real crop a year later reads a change of 0
    with no verdict (no published scan-rescan repeatability for its segmentation), and both studies are charted."""
    analyzer = get_analyzer("mr-hippocampus")
    patient = (
        f"Patient/{client.create({'resourceType': 'Patient', 'gender': 'female', 'birthDate': '1965-03-01'})['id']}"
    )
    crop = sample(images, "hippocrop-1")
    first = analyze_study(
        client,
        file_study(client, orthanc, patient, crop, "20230301").imaging_study,
        analyzer,
        dicomweb_allow_list=allow,
    )
    second = analyze_study(
        client,
        file_study(client, orthanc, patient, crop, "20240301").imaging_study,
        analyzer,
        dicomweb_allow_list=allow,
    )
    comparison = second.comparison
    assert comparison is not None and comparison.prior is not None
    assert comparison.prior.reference == first.diagnostic_report
    volumes = [c for c in comparison.changes if c.key.endswith("hippocampus_volume_ml")]
    assert len(volumes) == 1 and volumes[0].absolute == 0 and volumes[0].verdict == "not-assessed"
    assert all(c.verdict == "not-assessed" for c in comparison.changes)
    report = read(client, second.diagnostic_report)
    assert "Compared with the MR of 2023-03-01: no measurement with a stated repeatability" in report["conclusion"]
    bundle = client.search_bundle("DiagnosticReport", {"subject": patient, "_include": "DiagnosticReport:result"})
    [section] = trend_sections(
        with_devices(client, [e["resource"] for e in bundle["entry"]]), patient_id=patient.split("/")[1]
    )
    trend = next(t for t in section.trends if t.key == volumes[0].key)
    assert len(trend.points) == 2 and trend.band is None and trend.verdict == "no verdict"

"""Issue 20, nodules: each lung nodule followed from one real chest CT to the next, through the whole pipeline.

No real longitudinal pair exists, so the patient's history is made of one real 5 mm chest CT (lung1, whose nodules
ct-lung-nodules finds, see ``tests/test_pipeline_nodules.py``) filed again (``tests/followup_support.py``): the first
study has no prior; the same pixels a year later must match every nodule with no growth and no doubling time; a copy
with the patient moved 1 mm along the table and a few millimetres across must match the nodules, the labelled lesion
with no growth beyond the margins; a re-run adds nothing; another patient's identical scan is never compared. Three
nodule analyses in all (tens of seconds each); the stranger's scan is compared without being analysed again.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import nrrd
import numpy as np
import pytest

from cds.cards import CardSettings, followup_order_cards, patient_view_cards
from cds.orders import imaging_orders
from core.allowlist import AllowList
from devtools.samples import load_sample
from devtools.servers import FhirServer, OrthancServer
from fhir_adapters.builders import AnalysisTarget
from fhir_adapters.client import FhirClient
from fhir_adapters.constants import COMPARISON_CODESYSTEM, LUNG_EXTENT_EXTENSION
from fhir_adapters.history import read_history
from fhir_adapters.results import extract_findings, index_resources, read_report
from fhir_adapters.validation import validate_resource
from models.base import Finding
from models.registry import get_analyzer
from pipeline.analysis import AnalysisOutcome, analyze_study, compare_with_prior, find_history
from smart_launch.views import report_view
from tests.followup_support import FiledStudy, file_study, resource_count, shifted
from tests.test_followup_pipeline import CountingSession, new_patient, read
from tests.test_pipeline_nodules import LUNG1_LABEL

ANALYZER = "ct-lung-nodules"


@pytest.fixture(scope="module")
def session() -> CountingSession:
    return CountingSession()


@pytest.fixture(scope="module")
def client(fhir_base: FhirServer, session: CountingSession) -> FhirClient:
    return FhirClient(fhir_base.base_url, session=session)


@dataclass(frozen=True)
class NoduleChain:
    patient: str
    pixels: Any
    first: AnalysisOutcome  # 2023-01-05: no prior
    second_study: FiledStudy
    second: AnalysisOutcome  # 2024-01-10: the same pixels again
    third: AnalysisOutcome  # 2025-01-10: the shifted copy
    third_searches: int


@pytest.fixture(scope="module")
def chain(client: FhirClient, orthanc: OrthancServer, allow: AllowList, session: CountingSession) -> NoduleChain:
    analyzer = get_analyzer(ANALYZER)
    pixels = load_sample("lung1")
    patient = new_patient(client)
    first_study = file_study(client, orthanc, patient, pixels, "20230105")
    first = analyze_study(client, first_study.imaging_study, analyzer, dicomweb_allow_list=allow)
    second_study = file_study(client, orthanc, patient, pixels, "20240110")
    second = analyze_study(client, second_study.imaging_study, analyzer, dicomweb_allow_list=allow)
    third_study = file_study(client, orthanc, patient, shifted(pixels), "20250110")
    before = len(session.calls)
    third = analyze_study(client, third_study.imaging_study, analyzer, dicomweb_allow_list=allow)
    searches = sum(1 for method, url in session.calls[before:] if method == "GET" and url.endswith("/DiagnosticReport"))
    return NoduleChain(patient, pixels, first, second_study, second, third, searches)


def lesion_observations(client: FhirClient, report: dict[str, Any]) -> list[dict[str, Any]]:
    observations = [read(client, r["reference"]) for r in report["result"]]
    return [
        o
        for o in observations
        if any(
            c.get("system") == COMPARISON_CODESYSTEM and c.get("code") == "lesion-since-prior"
            for c in o["code"]["coding"]
        )
    ]


def components(observation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["code"]["coding"][-1]["code"]: c for c in observation["component"]}


def test_the_first_study_files_each_nodule_centre_and_the_lungs_extent_and_has_no_prior(
    client: FhirClient, chain: NoduleChain
) -> None:
    first = chain.first
    assert first.result.findings and first.result.lungs_mm is not None
    assert first.comparison is not None and first.comparison.prior is None and first.comparison.lesions is None
    report = read(client, first.diagnostic_report)
    assert "Compared with" not in report["conclusion"] and not lesion_observations(client, report)
    extent = next(e for e in report["extension"] if e["url"] == LUNG_EXTENT_EXTENSION)
    assert len(extent["extension"]) == 6
    # Read back as the next analysis reads it: every nodule with its centre, inside the lungs' extent.
    resources = [report, *(read(client, r["reference"]) for r in report["result"])]
    filed = read_report(report, index_resources(resources))
    lungs = filed.lungs_mm
    assert lungs is not None and len(filed.listed) == len(first.result.findings)
    for listed, finding in zip(filed.listed, first.result.findings, strict=True):
        assert listed.key == finding.key and listed.centre_mm is not None and finding.centre_mm is not None
        assert math.dist(listed.centre_mm, finding.centre_mm) < 0.1  # filed to 0.1 mm
        # A juxtapleural nodule's centre may lie a little outside the aerated lung mask, never centimetres.
        assert all(lo - 10 <= c <= hi + 10 for c, lo, hi in zip(listed.centre_mm, lungs.low, lungs.high, strict=True))
    # The lungs of a whole chest CT: 15-35 cm across both lungs, 15-35 cm head to foot (lung1 covers them).
    width, _, height = lungs.size
    assert 150 < width < 350 and 150 < height < 350


def test_the_same_scan_a_year_later_matches_every_nodule_with_no_growth_and_no_doubling_time(
    client: FhirClient, chain: NoduleChain
) -> None:
    comparison = chain.second.comparison
    assert comparison is not None and comparison.prior is not None and comparison.lesions is not None
    assert comparison.prior.reference == chain.first.diagnostic_report
    matches = comparison.lesions
    assert len(matches) == len(chain.second.result.findings)
    assert all(m.status == "matched" and m.distance_mm is not None and m.distance_mm < 0.1 for m in matches)
    assert all(m.current and m.prior and m.current.key == m.prior.key for m in matches)
    assert all(m.verdict == "stable" and m.growth and m.growth.vdt_days is None for m in matches)
    report = read(client, chain.second.diagnostic_report)
    conclusion = report["conclusion"]
    assert "Compared with the CT of 2023-01-05" in conclusion
    assert f"nodules {len(matches)} matched (0 grew beyond 1.5 mm mean diameter or 25 % volume), 0 new, 0 resolved" in (
        conclusion
    )
    filed = lesion_observations(client, report)
    assert len(filed) == len(matches)
    current = {r["reference"] for r in report["result"]}
    prior = {r["reference"] for r in read(client, chain.first.diagnostic_report)["result"]}
    for observation in filed:
        validate_resource(observation)
        now, before = (d["reference"] for d in observation["derivedFrom"])
        assert now in current and before in prior
        assert observation["effectiveDateTime"] == report["effectiveDateTime"]
        parts = components(observation)
        assert parts["prior-study-date"]["valueDateTime"] == "2023-01-05T09:00:00+00:00"
        assert parts["absolute-change"]["valueQuantity"]["value"] == 0
        assert parts["lung-rads-growth"]["valueBoolean"] is False
        assert "volume-doubling-time" not in parts and "implied-lung-rads" not in parts
        assert observation["valueCodeableConcept"]["coding"][0]["code"] == "stable"
    html = base64.b64decode(report["presentedForm"][0]["data"]).decode()
    assert "Nodules compared with the prior" in html and "1.5 mm" in html and "Horeweg" in html
    # Read back as the app and the CDS service read it: each nodule says how it compares, and so does the card.
    related = [read(client, r["reference"]) for r in report["result"]]
    view = report_view(report, related)
    assert len(view.listed) == len(matches) and not view.not_found_since_prior
    assert all("no growth beyond 1.5 mm mean diameter" in item.since_prior for item in view.listed)
    [finding] = extract_findings([report, *related], patient_id=chain.patient.split("/")[1])
    assert len(finding.lesion_comparisons) == len(matches) and not any(c.progressed for c in finding.lesion_comparisons)
    settings = CardSettings("https://app.example/launch", "https://app.example", datetime.now(UTC))
    [card] = patient_view_cards([finding], settings)
    assert "Nodules compared with the prior study of 2023-01-05" in card["detail"]
    assert f"{len(matches)} matched nodules without growth" in card["detail"] and "grew" not in card["summary"]
    # order-select for the next chest CT says the nodules will be followed, and by which published margins.
    order = {
        "resourceType": "ServiceRequest",
        "id": "draft-chest-ct",
        "status": "draft",
        "intent": "order",
        "code": {"coding": [{"system": "http://loinc.org", "code": "24627-2", "display": "CT Chest"}]},
        "subject": {"reference": chain.patient},
    }
    orders = imaging_orders(
        {"resourceType": "Bundle", "entry": [{"resource": order}]}, ["ServiceRequest/draft-chest-ct"]
    )
    [follow_up] = followup_order_cards(orders, [finding], settings)
    assert f"its {len(matches)} listed nodules matched after aligning the lungs" in follow_up["detail"]


def labelled_nodule(findings: tuple[Finding, ...]) -> Finding:
    """lung1's labelled nodule (right upper lung, 13-14 mm, on the label's slices), as test_pipeline_nodules."""
    label, _ = nrrd.read(str(LUNG1_LABEL))
    label_slices = {int(k) + 1 for k in np.nonzero(label.any(axis=(0, 1)))[0]}
    [labelled] = [
        f
        for f in findings
        if f.body_site is not None
        and f.body_site.code_display == "Right lung"
        and any(f"slice {k} of 48" in f.location for k in label_slices)
    ]
    return labelled


def test_a_shifted_copy_matches_the_labelled_nodule_with_no_growth_within_the_margins(chain: NoduleChain) -> None:
    comparison = chain.third.comparison
    assert chain.third_searches == 1  # the prior's nodules came with the same search as its report
    assert comparison is not None and comparison.prior is not None and comparison.lesions is not None
    assert comparison.prior.reference == chain.second.diagnostic_report
    matched = [m for m in comparison.lesions if m.status == "matched"]
    figures = [f"{m.sentence()} [{m.distance_mm or 0:.1f} mm apart]" for m in comparison.lesions]
    now, before = labelled_nodule(chain.third.result.findings), labelled_nodule(chain.second.result.findings)
    [lesion] = [m for m in matched if m.current is not None and m.current.key == now.key]
    assert lesion.prior is not None and lesion.prior.key == before.key, figures
    # The patient moved about 3 mm across the table and 1 mm along it: aligned, the centres lie within 2 mm.
    assert lesion.distance_mm is not None and lesion.distance_mm < 2.0, figures
    assert lesion.verdict == "stable" and lesion.growth is not None, figures
    assert not lesion.growth.lung_rads_growth and lesion.growth.vdt_days is None and lesion.lung_rads is None, figures
    # The detector's false positives (2 on each of the two 5 mm CTs, see the card) come and go with the slice
    # positions, so not every listed nodule is matched; most are, and nothing is matched across the lungs.
    assert len(matched) >= len(chain.third.result.findings) // 2, figures
    gates = [max(10.0, m.current.mean_diameter_mm, m.prior.mean_diameter_mm) for m in matched if m.current and m.prior]
    assert all(m.distance_mm is not None and m.distance_mm <= gate for m, gate in zip(matched, gates, strict=True))
    # On 5 mm slices a volume change judges nothing (Fleischner 2017 asks for 1.5 mm or thinner to measure): no
    # doubling time, and a verdict only from the mean diameter, so a false positive's partial-volume swing in volume
    # (up to a factor of two here) is never filed as growth.
    for m in matched:
        assert m.growth is not None and m.growth.vdt_days is None and m.growth.volume_unjudged_because, figures
        grew = abs(m.growth.diameter_change_mm) > 1.5
        assert (m.verdict != "stable") == grew, figures


def test_a_rerun_adds_nothing(client: FhirClient, chain: NoduleChain, allow: AllowList) -> None:
    held = resource_count(client, chain.patient)
    again = analyze_study(client, chain.second_study.imaging_study, get_analyzer(ANALYZER), dicomweb_allow_list=allow)
    assert again.already_present and again.diagnostic_report == chain.second.diagnostic_report
    assert again.comparison is None
    assert resource_count(client, chain.patient) == held


def test_another_patients_identical_scan_is_never_compared(
    client: FhirClient, orthanc: OrthancServer, chain: NoduleChain
) -> None:
    # The same pixels for a stranger, compared as the pipeline compares (the result need not be computed again).
    stranger = new_patient(client)
    study = file_study(client, orthanc, stranger, chain.pixels, "20260101")
    target = AnalysisTarget(
        imaging_study_id=study.imaging_study,
        patient_reference=stranger,
        study_uid="2.25.1",
        series_uid="2.25.2",
        selection_reason="test",
        study_started=study.started,
    )
    analyzer = get_analyzer(ANALYZER)
    comparison = compare_with_prior(analyzer, chain.second.result, target, find_history(client, analyzer, target))
    assert comparison is not None and comparison.prior is None and comparison.lesions is None
    # Even a search that returned the first patient's reports yields nothing for the stranger.
    history = read_history(
        client, patient_reference=stranger, analyzer=ANALYZER, study_date=study.started, analysis_id="none"
    )
    assert history.earlier == () and history.filed is None
    assert extract_findings([read(client, chain.first.diagnostic_report)], patient_id=stranger.split("/")[1]) == []

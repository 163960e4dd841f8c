"""Findings listed one by one (a nodule per Observation) and exam-level assessments, in the results transaction.

The AnalysisResult is hand-made (the nodule analyzer is tested on real scans in test_pipeline_nodules.py); what is
checked here is how any analyzer's findings become FHIR: one Observation per finding with its values as
components, its body site and the key images it is derived from; one Observation per exam-level assessment; a
report that links them; identifiers that make a re-run idempotent; and output unchanged for analyzers that list
no findings.
"""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
import requests

from cds.cards import CardSettings, patient_view_cards
from core.errors import ConfigurationError
from devtools.servers import FhirServer
from fhir_adapters import constants
from fhir_adapters.builders import DeviceInfo, analysis_identifier, build_results_bundle
from fhir_adapters.client import FhirClient
from fhir_adapters.results import AiFinding, CodedAnswer, filed_lesion_comparison, index_resources, read_report
from fhir_adapters.validation import validate_bundle
from fhir_adapters.writer import WriteSettings, write_results
from models.base import AnalysisResult, Category, CodedValue, Explanation, Finding, Measurement
from models.followup import Acquisition, PriorResult, compare_with_history, followup_spec
from models.lesion_followup import Box, Lesion
from models.registry import get_card
from tests.test_builders import EMPHYSEMA_DEVICE, ISSUED, _png, _target, emphysema_result

DEVICE = DeviceInfo("ct-lung-nodules", "1.0.0", "CT lung nodules", "ab" * 32, "https://example.org/cards/nodules")


def nodule_result() -> AnalysisResult:
    nodule = Finding(
        key="nodule-1",
        kind="lung_nodule",
        display="Nodule 1: solid nodule, 9.3 mm mean diameter, right lung upper zone, Lung-RADS 4A: suspicious",
        measurements=(
            Measurement("nodule_long_axis_mm", "Long axis", 10.4, "mm"),
            Measurement("nodule_short_axis_mm", "Short axis", 8.2, "mm"),
            Measurement("nodule_mean_diameter_mm", "Mean diameter", 9.3, "mm"),
            Measurement("nodule_volume_mm3", "Volume", 412.0, "mm3"),
            Measurement("nodule_radiologist_suspicion_percent", "Suspicion", 71.3, "%", interpretation="H"),
        ),
        values=(
            CodedValue("lung_rads", "Lung-RADS v2022 category", "4A", "Lung-RADS 4A: suspicious", "solid 8-<15 mm"),
            CodedValue("nodule_type", "Nodule type", "solid", "Solid"),
        ),
        location="right lung, upper zone; slice 34 of 48",
        body_site=CodedValue("body_site", "Body site", "RID1302", "Right lung", system="radlex"),
        explanations=(0, 1),
        note="Juxtapleural solid nodule under 10 mm: check the shape.",
    )
    return AnalysisResult(
        analyzer="ct-lung-nodules",
        version="1.0.0",
        measurements=(Measurement("lung_nodule_count", "Lung nodules of 4 mm or more", 1.0, "1"),),
        category=Category("lung-rads-4A", "Lung-RADS 4A: suspicious", "ACR Lung-RADS v2022", abnormal=True),
        conclusion="1 lung nodule found; Lung-RADS 4A for the exam.",
        explanations=(
            Explanation("Lung nodules on a coronal MIP", "overlay", _png(), None),
            Explanation("Nodule 1: outline and diameters", "overlay", _png(), 33),
        ),
        assessments=(
            CodedValue(
                "lung_rads", "Lung-RADS v2022 category (exam)", "4A", "Lung-RADS 4A: suspicious", "worst nodule"
            ),
            CodedValue("fleischner_2017", "Fleischner 2017", "single-solid-9-mm", "Consider CT at 3 months.", "rule"),
        ),
        findings=(nodule,),
    )


def _by_type(bundle: dict[str, Any], resource_type: str) -> list[dict[str, Any]]:
    return [e for e in bundle["entry"] if e["resource"]["resourceType"] == resource_type]


def _coding(concept: dict[str, Any], system: str) -> dict[str, Any]:
    return next(c for c in concept["coding"] if c["system"] == system)


def test_each_finding_is_one_observation_with_components_site_and_key_images() -> None:
    target = _target()
    bundle = build_results_bundle(target, nodule_result(), DEVICE, issued=ISSUED)
    analysis = analysis_identifier(target.study_uid, target.series_uid, "ct-lung-nodules", "1.0.0")
    entry = next(
        e
        for e in _by_type(bundle, "Observation")
        if e["resource"]["identifier"][0]["value"].endswith("/finding/nodule-1")
    )
    nodule = entry["resource"]
    assert nodule["identifier"][0]["value"] == f"{analysis}/finding/nodule-1"
    assert "identifier=" in entry["request"]["ifNoneExist"]
    assert _coding(nodule["code"], "http://radlex.org")["code"] == "RID50149"
    assert _coding(nodule["code"], constants.FINDING_CODESYSTEM)["code"] == "lung_nodule"
    assert nodule["bodySite"]["coding"][0] == {
        "system": "http://radlex.org",
        "code": "RID1302",
        "display": "Right lung",
    }
    components = {c["code"]["coding"][-1]["code"]: c for c in nodule["component"]}
    assert components["nodule_mean_diameter_mm"]["valueQuantity"]["value"] == 9.3
    assert components["nodule_volume_mm3"]["valueQuantity"]["code"] == "mm3"
    assert components["nodule_radiologist_suspicion_percent"]["interpretation"][0]["coding"][0]["code"] == "H"
    lung_rads = components["lung_rads"]["valueCodeableConcept"]["coding"][0]
    assert lung_rads == {
        "system": constants.FINDING_VALUE_CODESYSTEM,
        "code": "lung_rads/4A",
        "display": "Lung-RADS 4A: suspicious",
    }
    assert _coding(components["lung_rads"]["code"], "http://snomed.info/sct")["code"] == "1362105002"
    assert components["location"]["valueString"] == "right lung, upper zone; slice 34 of 48"
    media = [e["fullUrl"] for e in _by_type(bundle, "Media")]
    assert [d["reference"] for d in nodule["derivedFrom"]] == ["ImagingStudy/is-1", *media]
    assert nodule["status"] == "preliminary" and nodule["meta"]["security"][0]["code"] == "AIAST"
    assert "check the shape" in nodule["note"][0]["text"]


def test_exam_assessments_are_coded_observations_linked_from_the_report() -> None:
    bundle = build_results_bundle(_target(), nodule_result(), DEVICE, issued=ISSUED)
    observations = [
        e for e in _by_type(bundle, "Observation") if "/assessment/" in e["resource"]["identifier"][0]["value"]
    ]
    lung_rads = next(
        e["resource"] for e in observations if e["resource"]["identifier"][0]["value"].endswith("lung_rads")
    )
    assert lung_rads["valueCodeableConcept"]["coding"][0]["code"] == "lung_rads/4A"
    assert lung_rads["note"][0]["text"] == "Rule: worst nodule"
    [report] = [e["resource"] for e in _by_type(bundle, "DiagnosticReport")]
    linked = {r["reference"] for r in report["result"]}
    observation_urls = {e["fullUrl"] for e in _by_type(bundle, "Observation")}
    assert linked == observation_urls and len(linked) == 4  # count, two assessments, one nodule
    html = base64.b64decode(report["presentedForm"][0]["data"]).decode()
    assert "<h2>Findings</h2>" in html and "Nodule 1: solid nodule" in html and "Rule: worst nodule" in html
    [provenance] = [e["resource"] for e in _by_type(bundle, "Provenance")]
    assert linked <= {t["reference"] for t in provenance["target"]}
    validate_bundle(bundle)


def test_analyzers_without_findings_build_exactly_what_they_built_before() -> None:
    # Nothing about the emphysema report mentions findings or assessments; a frozen copy of its bundle (built
    # before findings existed) guards the byte-for-byte output.
    bundle = build_results_bundle(_target(), emphysema_result(), EMPHYSEMA_DEVICE, issued=ISSUED)
    text = json.dumps(bundle)
    assert "/finding/" not in text and "/assessment/" not in text and "component" not in text
    html = base64.b64decode(_by_type(bundle, "DiagnosticReport")[0]["resource"]["presentedForm"][0]["data"]).decode()
    assert "Findings" not in html and "Assessments" not in html


def test_finding_keys_must_be_unique_and_key_images_must_exist() -> None:
    result = nodule_result()
    twice = AnalysisResult(**{**result.__dict__, "findings": result.findings * 2})
    with pytest.raises(ConfigurationError, match="finding 'nodule-1' twice"):
        build_results_bundle(_target(), twice, DEVICE, issued=ISSUED)
    [finding] = result.findings
    dangling = AnalysisResult(
        **{**result.__dict__, "findings": (Finding(**{**finding.__dict__, "explanations": (5,)}),)}
    )
    with pytest.raises(ConfigurationError, match="explanation 5"):
        build_results_bundle(_target(), dangling, DEVICE, issued=ISSUED)


def test_findings_are_stored_and_a_rerun_creates_nothing(fhir_base: FhirServer) -> None:
    session = requests.Session()
    patient = session.post(f"{fhir_base.base_url}/Patient", json={"resourceType": "Patient"}, timeout=30).json()
    target = _target(patient=f"Patient/{patient['id']}")
    bundle = build_results_bundle(target, nodule_result(), DEVICE, issued=ISSUED)
    first = session.post(fhir_base.base_url, json=bundle, timeout=60)
    assert first.status_code == 200, first.text
    assert all(e["response"]["status"].startswith("201") for e in first.json()["entry"][1:-1])
    again = session.post(fhir_base.base_url, json=bundle, timeout=60).json()
    assert [e["response"]["status"][:3] for e in again["entry"][1:-1]] == ["200"] * (len(bundle["entry"]) - 2)
    found = session.get(
        f"{fhir_base.base_url}/Observation",
        params={"subject": f"Patient/{patient['id']}", "code": f"{constants.FINDING_CODESYSTEM}|lung_nodule"},
        timeout=30,
    ).json()
    [stored] = [e["resource"] for e in found.get("entry", [])]
    assert {d["reference"].split("/")[0] for d in stored["derivedFrom"]} == {"ImagingStudy", "Media"}


def test_the_reader_gets_back_each_listed_finding_and_the_assessments(fhir_base: FhirServer) -> None:
    session = requests.Session()
    patient = session.post(f"{fhir_base.base_url}/Patient", json={"resourceType": "Patient"}, timeout=30).json()
    bundle = build_results_bundle(_target(patient=f"Patient/{patient['id']}"), nodule_result(), DEVICE, issued=ISSUED)
    answer = session.post(fhir_base.base_url, json=bundle, timeout=60).json()
    report_id = next(
        e["response"]["location"] for e in answer["entry"] if "DiagnosticReport/" in e["response"]["location"]
    )
    read = session.get(
        f"{fhir_base.base_url}/DiagnosticReport",
        params={"_id": report_id.split("/")[-3], "_include": "DiagnosticReport:result"},
        timeout=30,
    ).json()
    resources = [e["resource"] for e in read["entry"]]
    report = next(r for r in resources if r["resourceType"] == "DiagnosticReport")
    [nodule] = read_report(report, index_resources(resources)).listed
    assert nodule.kind == "lung_nodule" and nodule.display.startswith("Nodule 1: solid nodule, 9.3 mm")
    assert nodule.measurement("nodule_mean_diameter_mm").value == 9.3  # type: ignore[union-attr]
    assert nodule.value("lung_rads") == CodedAnswer(
        "lung_rads", "Lung-RADS v2022 category", "4A", "Lung-RADS 4A: suspicious"
    )
    assert nodule.body_site == "Right lung" and nodule.location == "right lung, upper zone; slice 34 of 48"
    assert len(nodule.key_images) == 2 and all(i.startswith("Media/") for i in nodule.key_images)
    filed = read_report(report, index_resources(resources))
    assert filed.assessment("lung_rads").code == "4A"  # type: ignore[union-attr]
    assert filed.measurement("lung_nodule_count").value == 1.0  # type: ignore[union-attr]


@pytest.mark.parametrize("kind", ["sekmet", "medplum"])
def test_ordered_writes_file_each_finding_after_the_key_images_it_is_derived_from(
    kind: str, fhir_base: FhirServer, medplum: FhirServer
) -> None:
    # A finding's Observation refers to the Media that show it; written one by one (Medplum past 8 entries, or a
    # server without transactions), each Media must be on the server before the Observation that names it.
    client = FhirClient((fhir_base if kind == "sekmet" else medplum).base_url, session=requests.Session())
    patient = client.create({"resourceType": "Patient", "name": [{"family": "Findings", "given": ["Ordered"]}]})
    bundle = build_results_bundle(_target(patient=f"Patient/{patient['id']}"), nodule_result(), DEVICE, issued=ISSUED)
    filed = write_results(client, bundle, settings=WriteSettings("ordered"))
    assert filed.strategy == "ordered" and filed.report_created
    report = client.read_reference(filed.report)
    media = [m["link"]["reference"] for m in report["media"]]
    [nodule] = [
        o
        for o in (client.read_reference(r["reference"]) for r in report["result"])
        if o["identifier"][0]["value"].endswith("/finding/nodule-1")
    ]
    assert [d["reference"] for d in nodule["derivedFrom"]][1:] == media  # the ids the server gave the images
    assert filed.written.index(media[-1]) < filed.written.index(f"Observation/{nodule['id']}")
    again = write_results(client, bundle, settings=WriteSettings("ordered"))
    assert not again.report_created and set(again.written) == set(filed.written)


def test_a_grown_a_new_and_a_resolved_nodule_are_filed_with_growth_doubling_time_and_category() -> None:
    # Plumbing with hand-made values (no real pair of scans with growth exists): the prior scan lay 20 mm lower on
    # the table; nodule-1 grew from 7.0 to 9.3 mm mean diameter in 306 days, nodule-2 is new, the prior's other nodule
    # is not found now.
    result = nodule_result()
    nodule, *_ = result.findings
    new = Finding(
        key="nodule-2",
        kind="lung_nodule",
        display="Nodule 2: solid nodule, 6.5 mm",
        measurements=(Measurement("nodule_mean_diameter_mm", "Mean diameter", 6.5, "mm"),),
        values=(CodedValue("nodule_type", "Nodule type", "solid", "Solid"),),
        centre_mm=(60.0, -100.0, -600.0),
    )
    lungs = Box((-120.0, -200.0, -780.0), (120.0, -50.0, -560.0))
    result = replace(result, findings=(replace(nodule, centre_mm=(-40.0, -120.0, -650.0)), new), lungs_mm=lungs)
    down = Box((-120.0, -200.0, -800.0), (120.0, -50.0, -580.0))
    prior = PriorResult(
        reference="DiagnosticReport/prior",
        analyzer="ct-lung-nodules",
        version="1.0.0",
        effective=datetime(2024, 1, 4, tzinfo=UTC),
        imaging_study="ImagingStudy/prior",
        measurements=(),
        lesions=(
            Lesion("nodule-1", (-41.0, -121.0, -669.0), 7.0, 180.0, reference="Observation/prior-1"),
            Lesion("nodule-2", (40.0, -150.0, -720.0), 5.0, 65.0, reference="Observation/prior-2"),
        ),
        lungs_mm=down,
    )
    spec = followup_spec(get_card("ct-lung-nodules"))
    assert spec is not None
    comparison = compare_with_history(
        result, current_date=datetime(2024, 11, 5, tzinfo=UTC), acquisition=Acquisition(), history=(prior,), spec=spec
    )
    assert comparison.lesions is not None
    grown, added, gone = comparison.lesions
    assert (grown.status, added.status, gone.status) == ("matched", "new", "resolved")
    assert grown.growth is not None and grown.growth.lung_rads_growth and grown.lung_rads == "4B"
    assert grown.growth.vdt_days is not None and 240 < grown.growth.vdt_days < 260  # 306 d ln2 / ln(412/180)
    assert added.lung_rads == "4A" and gone.prior is not None and gone.prior.key == "nodule-2"

    bundle = build_results_bundle(_target(), result, DEVICE, issued=ISSUED, comparison=comparison)
    report = _by_type(bundle, "DiagnosticReport")[0]["resource"]
    assert (
        "nodules 1 matched (1 grew beyond 1.5 mm mean diameter or 25 % volume), 1 new, 1 resolved"
        in (report["conclusion"])
    )
    assert "VDT 256 days (VDT under 400 days: high probability of cancer (NELSON positive))" in report["conclusion"]
    extent = next(e for e in report["extension"] if e["url"] == constants.LUNG_EXTENT_EXTENSION)
    assert {p["url"]: p["valueQuantity"]["value"] for p in extent["extension"]}["lowZ"] == -780.0
    observations = {e["fullUrl"]: e["resource"] for e in _by_type(bundle, "Observation")}
    lesions = [o for o in observations.values() if o["code"]["coding"][0]["code"] == "lesion-since-prior"]
    by_key = {o["identifier"][0]["value"].rpartition("/")[2]: o for o in lesions}
    assert set(by_key) == {"nodule-1", "nodule-2", "resolved-nodule-2"}
    matched = by_key["nodule-1"]
    current = next(url for url, o in observations.items() if o["identifier"][0]["value"].endswith("/finding/nodule-1"))
    assert [d["reference"] for d in matched["derivedFrom"]] == [current, "Observation/prior-1"]
    parts = {c["code"]["coding"][-1]["code"]: c for c in matched["component"]}
    assert parts["absolute-change"]["valueQuantity"]["value"] == 2.3
    assert parts["volume-doubling-time"]["valueQuantity"] == {
        "value": 256,
        "unit": "d",
        "system": "http://unitsofmeasure.org",
        "code": "d",
    }
    assert "NELSON positive" in parts["nelson-band"]["valueString"]
    assert parts["implied-lung-rads"]["valueCodeableConcept"]["coding"][0]["code"] == "lung_rads/4B"
    assert parts["prior-study-date"]["valueDateTime"] == "2024-01-04T00:00:00+00:00"
    assert matched["valueCodeableConcept"]["coding"][0]["code"] == "increased"
    assert [d["reference"] for d in by_key["resolved-nodule-2"]["derivedFrom"]] == ["Observation/prior-2"]
    assert by_key["nodule-2"]["valueCodeableConcept"]["coding"][0]["code"] == "new"
    nodule_obs = observations[current]
    centre = {c["code"]["coding"][-1]["code"]: c["valueQuantity"]["value"] for c in nodule_obs["component"][-3:]}
    assert centre == {"centre_x": -40.0, "centre_y": -120.0, "centre_z": -650.0}
    # Read back as the CDS service reads it: the grown nodule is the card's news, the new one is listed, not alarmed.
    filed = tuple(c for o in lesions if (c := filed_lesion_comparison(o)) is not None)
    assert [c.verdict for c in filed] == ["increased", "new", "resolved"] and filed[0].lung_rads == "4B"
    finding = AiFinding(
        report_reference="DiagnosticReport/r",
        analyzer="ct-lung-nodules",
        version="1.0.0",
        category_code="lung-rads-4B",
        category_display="Lung-RADS 4B",
        status="preliminary",
        conclusion="",
        imaging_studies=(),
        effective=None,
        measurements=(),
        lesion_comparisons=filed,
    )
    settings = CardSettings("https://app.example/launch", "https://app.example", ISSUED)
    [card] = patient_view_cards([finding], settings)
    assert card["summary"].startswith("CT lung nodules: nodule grew since 2024-01-04, nodule-1 (prior nodule-1): 7.0")
    assert "nodule-2: new, 6.5 mm, Lung-RADS 4A as a new solid nodule" in card["detail"]

"""The one reader of filed AI results (``fhir_adapters.results``), on what the builders wrote to REAL sekmet-fhir.

Results are filed exactly as the pipeline files them (``tests.cds_support.post_result``: the builders' one
transaction), read back the way each front door reads them (the CDS prefetch query; the app's report page with
its Device), and both front doors must then say the same analyzer, version, category and values.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import requests

from cds.fhirjson import bundle_resources
from cds.services import PATIENT_VIEW
from devtools.servers import FhirServer
from fhir_adapters import constants
from fhir_adapters.results import extract_findings, index_resources, is_ai_report, read_report
from models.registry import BUNDLES_ENV, get_card
from smart_launch.views import model_card, report_view, study_row
from tests.cds_support import bone_result, create_patient, create_study, emphysema_result, post_result, prefetch_for

STARTED = "2025-03-04T08:15:00Z"
BUNDLES_FILE = Path(__file__).resolve().parents[1] / "models" / "bundles" / "bundles.json"


@pytest.fixture(scope="module")
def filed(fhir_base: FhirServer) -> dict[str, Any]:
    """One patient with a bone and an emphysema result filed on one chest CT, as the pipeline files them."""
    base = fhir_base.base_url
    patient = create_patient(base)
    study = create_study(base, patient, started=STARTED)
    bone = post_result(base, patient, study, bone_result(86.0), started=STARTED)
    emphysema = post_result(base, patient, study, emphysema_result(12.4), started=STARTED)
    return {"base": base, "patient": patient, "study": study, "bone": bone, "emphysema": emphysema}


def _report_with_related(base: str, reference: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """What the app reads for its result page: the report, its Observations, and the analyzer's Device."""
    report_id = reference.split("/")[1]
    bundle = requests.get(
        f"{base}/DiagnosticReport", params={"_id": report_id, "_include": "DiagnosticReport:result"}, timeout=30
    ).json()
    resources = bundle_resources(bundle)
    device = next(r["device"]["reference"] for r in resources if r["resourceType"] == "Observation")
    resources.append(requests.get(f"{base}/{device}", timeout=30).json())
    report = next(r for r in resources if r["resourceType"] == "DiagnosticReport")
    return report, resources


def test_the_reader_reads_back_what_the_builders_filed(filed: dict[str, Any]) -> None:
    report, related = _report_with_related(filed["base"], filed["bone"])
    assert report["meta"]["security"][0]["code"] == constants.AI_ASSERTED_SECURITY_CODE  # as the writer labels it
    finding = read_report(report, index_resources(related))
    assert (finding.analyzer, finding.version) == ("ct-bone", "0.3.1")
    assert (finding.category_code, finding.category_display) == ("osteoporosis", "Osteoporosis likely (L1 <= 100 HU)")
    assert finding.abnormal and finding.awaiting_review and not finding.signed
    assert finding.imaging_studies == (f"ImagingStudy/{filed['study']}",)
    (l1,) = finding.measurements
    assert (l1.key, l1.value, l1.unit, l1.interpretation) == ("l1_trabecular_hu", 86.0, "HU", "L")
    assert l1.display == "L1 vertebral body trabecular attenuation"  # the measurement CodeSystem's name
    assert l1.text == "L1 trabecular attenuation"  # what the analyzer called it
    assert l1.interpretation_display == "Low"


def test_both_front_doors_read_the_same_result(filed: dict[str, Any]) -> None:
    prefetch = prefetch_for(filed["base"], PATIENT_VIEW, filed["patient"])
    cards_read = {
        f.analyzer: f for f in extract_findings(bundle_resources(prefetch["aiReports"]), patient_id=filed["patient"])
    }
    assert set(cards_read) == {"ct-bone", "ct-emphysema"}
    for reference in (filed["bone"], filed["emphysema"]):
        report, related = _report_with_related(filed["base"], reference)
        screen = report_view(report, related)
        card = cards_read[screen.analyzer]
        assert card.report_reference == reference
        assert screen.category == card.category_display
        assert screen.version == read_report(report, index_resources(related)).version != "unknown"
        shown = {f.display: float(f.value) for f in screen.findings}
        assert shown == pytest.approx({m.text: m.value for m in card.measurements}, rel=1e-3)
    row = study_row({"resourceType": "ImagingStudy", "id": filed["study"]}, bundle_resources(prefetch["aiReports"]))
    assert {(r.analyzer, r.category) for r in row.ai_results} == {
        (f.analyzer, f.category_display) for f in cards_read.values()
    }


def test_absolute_and_versioned_references_resolve(filed: dict[str, Any]) -> None:
    # A proxy may hand back references as absolute URLs of its backing server, or pinned to a version.
    report, related = _report_with_related(filed["base"], filed["emphysema"])
    moved = copy.deepcopy(report)
    moved["result"] = [
        {"reference": f"http://10.0.0.5:8080/fhir/{r['reference']}/_history/1"} for r in report["result"]
    ]
    original, relocated = read_report(report, index_resources(related)), read_report(moved, index_resources(related))
    assert relocated.measurements == original.measurements and len(original.measurements) == 2
    assert relocated.version == "1.0.0"


def test_only_the_projects_identifier_makes_a_report_ours(filed: dict[str, Any]) -> None:
    report, related = _report_with_related(filed["base"], filed["emphysema"])
    other_vendor = copy.deepcopy(report)  # AI-asserted too, but filed under another vendor's identifier
    other_vendor["id"] = "other-vendor"
    other_vendor["identifier"] = [{"system": "urn:example:other-vendor", "value": "42"}]
    assert other_vendor["meta"]["security"][0]["code"] == "AIAST"
    assert is_ai_report(report) and not is_ai_report(other_vendor)
    assert [f.report_reference for f in extract_findings([*related, other_vendor])] == [filed["emphysema"]]


def test_elements_of_the_wrong_json_type_read_as_absent() -> None:
    broken = {
        "resourceType": "DiagnosticReport",
        "id": "x",
        "identifier": [{"system": constants.ANALYSIS_IDENTIFIER_SYSTEM, "value": "v"}],
        "status": "preliminary",
        "conclusionCode": "osteoporosis",
        "result": {"reference": "Observation/1"},
        "imagingStudy": [None, 7],
    }
    finding = read_report(broken, {})
    assert (finding.analyzer, finding.measurements, finding.imaging_studies) == ("", (), ())
    assert extract_findings([broken]) == []  # no category coding: not summarised


# ---------------------------------------------------------------------------------------------- model cards


def test_the_result_screen_reads_the_card_through_the_registry() -> None:
    card = model_card("ct-emphysema")
    assert card == get_card("ct-emphysema") and card is not None and card.limits  # the validated card, as served
    assert model_card("../../etc/passwd") is None and model_card("no-such-analyzer") is None


def test_a_bundle_analyzers_card_is_shown_too(monkeypatch: pytest.MonkeyPatch) -> None:
    # An administrator's MONAI bundle has no file in models/cards/: only the registry knows its card.
    monkeypatch.setenv(BUNDLES_ENV, str(BUNDLES_FILE))
    card = model_card("cxr-pneumonia-bundle")
    assert card is not None and card.intended_use == get_card("cxr-pneumonia-bundle").intended_use

"""Comparison with the prior result: the published repeatability decides, the numbers are as filed, the FHIR is valid.

Pure tests of :mod:`models.followup` (with the analyzers' real model cards), of the comparison Observations and
report extension the builders write, and of reading them back with the one reader of filed results. The
end-to-end behaviour against the real FHIR server and Orthanc is in ``tests/test_followup_pipeline.py``.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from core.errors import ConfigurationError
from fhir_adapters.builders import AnalysisTarget, DeviceInfo, build_results_bundle
from fhir_adapters.constants import ACQUISITION_EXTENSION, COMPARISON_CODESYSTEM
from fhir_adapters.results import filed_comparison, read_acquisition
from fhir_adapters.validation import validate_resource
from models.base import AnalysisResult, Category, CodedValue, Finding, Measurement
from models.cards import card_errors, load_card
from models.followup import (
    Acquisition,
    PriorMeasurement,
    PriorResult,
    acquisition_differences,
    compare_with_history,
    followup_spec,
)
from models.lesion_followup import Box, Lesion

CURRENT = datetime(2025, 1, 1, 9, tzinfo=UTC)
THIN = Acquisition(slice_thickness_mm=0.75, kernel="B30f")


def spec(name: str):  # type: ignore[no-untyped-def]
    found = followup_spec(load_card(name))
    assert found is not None
    return found


def emphysema(laa: float, *, version: str = "1.0.2") -> AnalysisResult:
    return AnalysisResult(
        analyzer="ct-emphysema",
        version=version,
        measurements=(
            Measurement("laa950_percent", "LAA-950", laa, "%"),
            Measurement("lung_volume_ml", "Lung volume", 5400.0, "mL"),
        ),
        category=Category("mild", "Mild emphysema", "test rule", abnormal=True),
        conclusion=f"LAA-950 {laa} %.",
    )


def prior(
    when: datetime,
    values: dict[str, float],
    *,
    analyzer: str = "ct-emphysema",
    version: str | None = "1.0.2",
    acquisition: Acquisition | None = THIN,
    texts: dict[str, str] | None = None,
) -> PriorResult:
    return PriorResult(
        reference=f"DiagnosticReport/prior-{when.date()}",
        analyzer=analyzer,
        version=version,
        effective=when,
        imaging_study=f"ImagingStudy/{when.date()}",
        measurements=tuple(
            PriorMeasurement(key, value, "", (texts or {}).get(key, key), f"Observation/{key}-{when.date()}")
            for key, value in values.items()
        ),
        acquisition=acquisition,
    )


# ---------------------------------------------------------------------------------------------- verdicts


def test_laa950_rising_beyond_the_gietema_limit_reads_increased_with_its_numbers() -> None:
    before = prior(datetime(2024, 1, 1, 9, tzinfo=UTC), {"laa950_percent": 3.1, "lung_volume_ml": 5300.0})
    comparison = compare_with_history(
        emphysema(5.2), current_date=CURRENT, acquisition=THIN, history=[before], spec=spec("ct-emphysema")
    )
    assert comparison.prior is before
    laa = next(c for c in comparison.changes if c.key == "laa950_percent")
    assert laa.verdict == "increased" and laa.progressed
    assert laa.absolute == pytest.approx(2.1) and laa.per_year == pytest.approx(2.1 * 365.25 / 366)
    assert laa.band == pytest.approx((3.1 - 1.3, 3.1 + 1.1))
    assert laa.prior_reference == "Observation/laa950_percent-2024-01-01"
    assert "Gietema" in laa.source
    assert (
        laa.sentence()
        == "LAA-950 3.1 % -> 5.2 %, +2.1 points, beyond the repeatability of +1.1 / -1.3 points: increased"
    )
    volume = next(c for c in comparison.changes if c.key == "lung_volume_ml")
    assert volume.verdict == "not-assessed" and "breath-hold" in volume.no_verdict_because
    assert comparison.sentence().startswith(
        "Compared with the CT of 2024-01-01: LAA-950 3.1 % -> 5.2 %, +2.1 points, beyond the repeatability"
    )
    assert "1 further measurement compared without a verdict" in comparison.sentence()


@pytest.mark.parametrize(
    ("current", "verdict"), [(4.2, "stable"), (4.21, "increased"), (1.8, "stable"), (1.79, "decreased")]
)
def test_the_band_edges_belong_to_stable(current: float, verdict: str) -> None:
    before = prior(datetime(2024, 1, 1, tzinfo=UTC), {"laa950_percent": 3.1})
    comparison = compare_with_history(
        emphysema(current), current_date=CURRENT, acquisition=THIN, history=[before], spec=spec("ct-emphysema")
    )
    assert comparison.changes[0].verdict == verdict


def test_thick_slices_weaken_the_laa950_comparison_and_say_so() -> None:
    thick = Acquisition(slice_thickness_mm=5.0)
    before = prior(datetime(2024, 1, 1, tzinfo=UTC), {"laa950_percent": 3.1}, acquisition=thick)
    comparison = compare_with_history(
        emphysema(3.3), current_date=CURRENT, acquisition=thick, history=[before], spec=spec("ct-emphysema")
    )
    laa = comparison.changes[0]
    assert laa.verdict == "stable" and "thicker than the 0.75 mm" in laa.weaker_because
    assert "(weaker: slices of 5 mm" in laa.sentence()


def heart(agatston: float) -> AnalysisResult:
    return AnalysisResult(
        analyzer="ct-heart",
        version="0.1.0",
        measurements=(
            Measurement("cac_agatston", "Coronary artery calcium score (Agatston)", agatston, "1"),
            Measurement("ascending_aorta_diameter_mm", "Ascending aorta", 41.0, "mm"),
        ),
        category=Category("cac-drs-2", "CAC-DRS 2", "test rule", abnormal=True),
        conclusion="test",
    )


@pytest.mark.parametrize(
    ("before", "after", "verdict"),
    [
        (100.0, 149.3, "stable"),
        (100.0, 149.4, "increased"),
        (100.0, 50.8, "stable"),
        (0.0, 11.6, "stable"),
        (0.0, 12.0, "increased"),
    ],
)
def test_coronary_calcium_follows_the_sevrukov_square_root_model_on_thin_slices(
    before: float, after: float, verdict: str
) -> None:
    gated = Acquisition(slice_thickness_mm=3.0)
    history = [
        prior(
            datetime(2024, 1, 1, tzinfo=UTC),
            {"cac_agatston": before},
            analyzer="ct-heart",
            version="0.1.0",
            acquisition=gated,
        )
    ]
    comparison = compare_with_history(
        heart(after), current_date=CURRENT, acquisition=gated, history=history, spec=spec("ct-heart")
    )
    assert comparison.changes[0].verdict == verdict


def test_calcium_on_5_mm_slices_gets_no_verdict_and_the_aorta_still_does() -> None:
    thick = Acquisition(slice_thickness_mm=5.0)
    history = [
        prior(
            datetime(2024, 1, 1, tzinfo=UTC),
            {"cac_agatston": 100.0, "ascending_aorta_diameter_mm": 35.0},
            analyzer="ct-heart",
            version="0.1.0",
            acquisition=thick,
        )
    ]
    comparison = compare_with_history(
        heart(400.0), current_date=CURRENT, acquisition=thick, history=history, spec=spec("ct-heart")
    )
    calcium, aorta = comparison.changes
    assert calcium.verdict == "not-assessed" and "up to 3 mm" in calcium.no_verdict_because and calcium.band is None
    assert aorta.verdict == "increased" and aorta.progressed and aorta.limit == "+/-5 mm"


# ---------------------------------------------------------------------------------------------- which prior


def test_the_newest_comparable_prior_is_compared_and_a_different_version_is_named() -> None:
    history = [
        prior(datetime(2023, 1, 1, tzinfo=UTC), {"laa950_percent": 1.0}, version="1.0.2"),
        prior(datetime(2024, 6, 1, tzinfo=UTC), {"laa950_percent": 2.0}, version="1.0.1"),  # the card: same thing
        prior(datetime(2024, 11, 1, tzinfo=UTC), {"laa950_percent": 9.0}, version="0.9.0"),  # not on the card
    ]
    comparison = compare_with_history(
        emphysema(2.2), current_date=CURRENT, acquisition=THIN, history=history, spec=spec("ct-emphysema")
    )
    assert comparison.prior is history[1]
    assert comparison.changes[0].verdict == "stable"
    assert [p.effective.year for p in comparison.history] == [2024, 2024, 2023]  # all of them, for the trend
    [skipped] = comparison.not_compared
    assert "2024-11-01 (ct-emphysema 0.9.0) is not compared" in skipped
    assert "does not say that version measures the same as 1.0.2" in skipped


def test_only_a_different_version_means_no_comparison_and_the_conclusion_says_why() -> None:
    history = [prior(datetime(2024, 11, 1, tzinfo=UTC), {"laa950_percent": 9.0}, version="0.9.0")]
    comparison = compare_with_history(
        emphysema(2.2), current_date=CURRENT, acquisition=THIN, history=history, spec=spec("ct-emphysema")
    )
    assert comparison.prior is None and not comparison.changes
    assert comparison.sentence().startswith("The result of 2024-11-01 (ct-emphysema 0.9.0) is not compared")


def test_nodules_of_a_version_the_card_names_are_matched_and_others_are_not() -> None:
    # ct-lung-nodules follows lesions, not measurements: its card's version list alone decides. 1.1.0 and 1.2.0 left
    # out vessels that earlier versions listed but measure every nodule as 1.0.0 did, so those priors are matched.
    nodules = spec("ct-lung-nodules")
    assert nodules.lesions == "lung_nodule" and not nodules.measurements
    assert all(nodules.compares_with(version) for version in (nodules.version, "1.0.0", "1.1.0"))
    assert not nodules.compares_with("0.9.0") and not nodules.compares_with(None)


def test_later_results_same_day_results_and_other_analyzers_are_never_priors() -> None:
    history = [
        prior(datetime(2025, 6, 1, tzinfo=UTC), {"laa950_percent": 1.0}),  # after the current study
        prior(CURRENT, {"laa950_percent": 1.0}),  # the same study time
        prior(datetime(2024, 1, 1, tzinfo=UTC), {"laa950_percent": 1.0}, analyzer="ct-heart"),
    ]
    comparison = compare_with_history(
        emphysema(2.2), current_date=CURRENT, acquisition=THIN, history=history, spec=spec("ct-emphysema")
    )
    assert comparison.prior is None and comparison.history == () and comparison.sentence() == ""


def test_vertebral_heights_are_compared_only_on_the_same_vertebra() -> None:
    result = AnalysisResult(
        analyzer="ct-bone",
        version="0.3.0",
        measurements=(
            Measurement("l1_trabecular_hu", "L1 trabecular attenuation", 150.0, "[hnsf'U]"),
            Measurement("anterior_height_mm", "Anterior vertebral body height (L2)", 25.0, "mm"),
        ),
        category=Category("normal", "Normal", "test", abnormal=False),
        conclusion="test",
    )
    before = prior(
        datetime(2024, 1, 1, tzinfo=UTC),
        {"l1_trabecular_hu": 170.0, "anterior_height_mm": 27.0},
        analyzer="ct-bone",
        version="0.3.0",
        texts={"anterior_height_mm": "Anterior vertebral body height (L1)"},
    )
    comparison = compare_with_history(
        result, current_date=CURRENT, acquisition=THIN, history=[before], spec=spec("ct-bone")
    )
    [l1] = comparison.changes
    assert l1.key == "l1_trabecular_hu" and l1.verdict == "decreased" and l1.progressed  # -20 HU, beyond 16 HU
    assert any("the prior measured Anterior vertebral body height (L1)" in n for n in comparison.not_compared)


def test_a_version_that_changed_one_measurement_is_still_compared_for_the_others() -> None:
    """ct-bone 0.3.0 reads vertebral heights differently from 0.2.x; it measures trabecular attenuation as before."""
    result = AnalysisResult(
        analyzer="ct-bone",
        version="0.3.0",
        measurements=(
            Measurement("l1_trabecular_hu", "L1 trabecular attenuation", 150.0, "[hnsf'U]"),
            Measurement("anterior_height_mm", "Anterior vertebral body height (L1)", 25.0, "mm"),
        ),
        category=Category("normal", "Normal", "test", abnormal=False),
        conclusion="test",
    )
    before = prior(
        datetime(2024, 1, 1, tzinfo=UTC),
        {"l1_trabecular_hu": 155.0, "anterior_height_mm": 27.0},
        analyzer="ct-bone",
        version="0.2.2",
        texts={"anterior_height_mm": "Anterior vertebral body height (L1)"},
    )
    comparison = compare_with_history(
        result, current_date=CURRENT, acquisition=THIN, history=[before], spec=spec("ct-bone")
    )
    assert comparison.prior is before
    [l1] = comparison.changes
    assert l1.key == "l1_trabecular_hu" and l1.verdict == "stable"
    assert "Anterior vertebral body height (L1) is not compared: ct-bone 0.2.2 measured it differently" in " ".join(
        comparison.not_compared
    )


def test_a_change_per_year_needs_at_least_90_days() -> None:
    short = prior(datetime(2024, 11, 1, tzinfo=UTC), {"laa950_percent": 3.0})
    comparison = compare_with_history(
        emphysema(3.2), current_date=CURRENT, acquisition=THIN, history=[short], spec=spec("ct-emphysema")
    )
    assert comparison.changes[0].interval_days == pytest.approx(61.375) and comparison.changes[0].per_year is None


# ---------------------------------------------------------------------------------------------- the two scans


def test_slice_thickness_kernel_contrast_voltage_and_scanner_differences_are_named() -> None:
    now = Acquisition.from_attributes(
        {
            "SliceThickness": "5",
            "ConvolutionKernel": "B70f",
            "ContrastBolusAgent": "Iohexol",
            "KVP": "100",
            "Manufacturer": "SIEMENS",
            "ManufacturerModelName": "Definition",
        }
    )
    before = Acquisition(slice_thickness_mm=1.0, kernel="B30f", kvp=120.0, scanner="GE LightSpeed")
    assert acquisition_differences(now, before) == (
        "slice thickness 5 mm now, 1 mm before",
        "reconstruction kernel B70f now, B30f before",
        "contrast agent stated now (Iohexol), not before",
        "tube voltage 100 kV now, 120 kV before",
        "scanner SIEMENS Definition now, GE LightSpeed before",
    )
    assert acquisition_differences(now, now) == ()
    assert acquisition_differences(now, None) == (
        "the acquisition of the prior scan (slice thickness, kernel, contrast) was not filed with its result",
    )


# ---------------------------------------------------------------------------------------------- the cards


def test_every_verdict_in_the_cards_cites_a_source_the_card_lists_and_classifiers_follow_nothing() -> None:
    for name in ("ct-emphysema", "ct-bone", "ct-heart"):
        card = load_card(name)
        followed = spec(name)
        assert "not validated on real follow-up pairs" in followed.validation
        with_verdict = [m for m in followed.measurements.values() if m.repeatability is not None]
        assert with_verdict, name
        for measurement in with_verdict:
            assert measurement.repeatability is not None and measurement.repeatability.source in card.references
            assert measurement.worse in ("increase", "decrease")
    assert spec("ct-emphysema").measurements["laa950_percent"].repeatability.lower == -1.3  # type: ignore[union-attr]
    for name in ("cxr-pneumonia", "us-breast"):
        card = load_card(name)
        assert followup_spec(card) is None and "probability is not followed" in card.followup["not_followed"]  # type: ignore[index]


def test_a_card_must_say_why_a_followed_measurement_has_no_verdict() -> None:
    data = copy.deepcopy(load_card("ct-emphysema").as_dict())
    del data["followup"]["measurements"]["lung_volume_ml"]["no_verdict_because"]
    data["followup"]["measurements"]["laa950_percent"]["repeatability"].pop("upper")
    problems = " ".join(card_errors(data))
    assert "no_verdict_because" in problems and "upper" in problems
    with pytest.raises(ConfigurationError, match="no_verdict_because"):
        from models.cards import card_from_dict

        card_from_dict(data)


# ---------------------------------------------------------------------------------------------- FHIR


def _filed_bundle(comparison: Any, acquisition: Acquisition | None) -> dict[str, Any]:
    target = AnalysisTarget(
        imaging_study_id="ImagingStudy/now",
        patient_reference="Patient/p1",
        study_uid="2.25.1",
        series_uid="2.25.2",
        selection_reason="test",
        study_started="2025-01-01T09:00:00+00:00",
        acquisition=acquisition,
    )
    device = DeviceInfo(name="ct-emphysema", version="1.0.2", title="CT emphysema")
    return build_results_bundle(target, emphysema(5.2), device, issued=CURRENT, comparison=comparison)


def test_the_comparison_is_filed_as_observations_derived_from_both_results_and_stated_in_the_conclusion() -> None:
    acquisition = Acquisition(slice_thickness_mm=0.75, kernel="B30f")
    before = prior(datetime(2024, 1, 1, 9, tzinfo=UTC), {"laa950_percent": 3.1, "lung_volume_ml": 5300.0})
    comparison = compare_with_history(
        emphysema(5.2), current_date=CURRENT, acquisition=acquisition, history=[before], spec=spec("ct-emphysema")
    )
    bundle = _filed_bundle(comparison, acquisition)  # validated against the R4 schema by the builder
    resources = [e["resource"] for e in bundle["entry"]]
    report = next(r for r in resources if r["resourceType"] == "DiagnosticReport")
    urls = {e["resource"].get("identifier", [{}])[0].get("value", ""): e["fullUrl"] for e in bundle["entry"]}
    compared = [
        r
        for r in resources
        if r["resourceType"] == "Observation" and r["code"]["coding"][0]["system"] == COMPARISON_CODESYSTEM
    ]
    assert len(compared) == 2  # LAA-950 and lung volume, each once
    laa = next(o for o in compared if o["identifier"][0]["value"].endswith("/comparison/laa950_percent"))
    validate_resource(laa)
    current_obs = next(url for value, url in urls.items() if value.endswith("/obs/laa950_percent"))
    assert laa["derivedFrom"] == [{"reference": current_obs}, {"reference": "Observation/laa950_percent-2024-01-01"}]
    assert laa["effectiveDateTime"] == "2025-01-01T09:00:00+00:00"
    components = {c["code"]["coding"][0]["code"]: c for c in laa["component"]}
    assert components["prior-study-date"]["valueDateTime"] == "2024-01-01T09:00:00+00:00"
    assert components["laa950_percent"]["valueQuantity"]["value"] == 5.2
    assert components["prior-value"]["valueQuantity"]["value"] == 3.1
    assert components["absolute-change"]["valueQuantity"]["value"] == pytest.approx(2.1)
    assert components["repeatability-high"]["valueQuantity"]["value"] == pytest.approx(4.2)
    assert laa["valueCodeableConcept"]["coding"][0]["code"] == "increased"
    assert {c["coding"][0]["code"] for c in laa["interpretation"]} == {"U", "W"}
    assert all({"reference": e["fullUrl"]} in report["result"] for e in bundle["entry"] if e["resource"] in compared)
    assert (
        "Compared with the CT of 2024-01-01: LAA-950 3.1 % -> 5.2 %, +2.1 points, beyond the repeatability"
        in (report["conclusion"])
    )
    [extension] = report["extension"]
    assert extension["url"] == ACQUISITION_EXTENSION

    read = filed_comparison(laa)
    assert read is not None and read.key == "laa950_percent" and read.verdict == "increased"
    assert read.progressed and read.significant and read.band == pytest.approx((1.8, 4.2))
    assert read.prior_date == datetime(2024, 1, 1, 9, tzinfo=UTC)
    assert read_acquisition(report) == acquisition


def test_without_a_prior_or_an_acquisition_the_bundle_is_what_it_always_was() -> None:
    bundle = _filed_bundle(None, None)
    report = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")
    assert "extension" not in report and "Compared" not in report["conclusion"]
    assert read_acquisition(report) is None
    assert all(
        e["resource"]["code"]["coding"][0]["system"] != COMPARISON_CODESYSTEM
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "Observation"
    )


def test_the_model_card_page_shows_what_is_followed_and_the_limits_with_their_sources() -> None:
    from models.cards import render_card_html

    page = render_card_html(load_card("ct-emphysema"))
    assert "<h2>Follow-up: comparison with earlier results</h2>" in page
    assert "not validated on real follow-up pairs" in page
    assert "-1.3 to +1.1 (unit of the measurement)" in page and "Gietema HA" in page
    assert "Earlier analyzer versions whose results are compared with this version's: 1.0.0, 1.0.1." in page


def test_nodules_of_a_prior_filed_without_positions_are_not_matched_and_the_report_says_why() -> None:
    # A prior filed before centres and lung extents were recorded: positions in two scans' own coordinates lie
    # centimetres apart for the same nodule, so no unaligned match is attempted.
    nodule = Finding(
        key="nodule-1",
        kind="lung_nodule",
        display="Nodule 1",
        measurements=(Measurement("nodule_mean_diameter_mm", "Mean diameter", 7.0, "mm"),),
        values=(CodedValue("nodule_type", "Nodule type", "solid", "Solid"),),
        centre_mm=(10.0, -120.0, -650.0),
    )
    result = AnalysisResult(
        analyzer="ct-lung-nodules",
        version="1.0.0",
        measurements=(Measurement("lung_nodule_count", "Lung nodules", 1.0, "1"),),
        category=Category("lung-rads-2", "Lung-RADS 2", "rule", abnormal=False),
        conclusion="1 nodule.",
        findings=(nodule,),
        lungs_mm=Box((-120.0, -200.0, -780.0), (120.0, -50.0, -560.0)),
    )
    prior = PriorResult(
        reference="DiagnosticReport/old",
        analyzer="ct-lung-nodules",
        version="1.0.0",
        effective=datetime(2024, 1, 1, tzinfo=UTC),
        imaging_study="ImagingStudy/old",
        measurements=(),
    )
    rules = spec("ct-lung-nodules")
    assert rules.lesions == "lung_nodule"

    def compare(now: AnalysisResult, before: PriorResult) -> Any:
        return compare_with_history(now, current_date=CURRENT, acquisition=Acquisition(), history=(before,), spec=rules)

    comparison = compare(result, prior)
    assert comparison.prior is prior and comparison.lesions is None
    assert "2024-01-01: it did not record its nodules' positions" in comparison.sentence()
    # Without this scan's own positions (a volume without geometry) nothing is matched either.
    unplaced = replace(result, findings=(replace(nodule, centre_mm=None),))
    moved = replace(prior, lungs_mm=result.lungs_mm)
    comparison = compare(unplaced, moved)
    assert comparison.lesions is None and "this scan's positions are not known" in comparison.sentence()
    # With both, the same place and size read stable.
    placed = replace(moved, lesions=(Lesion("nodule-1", (10.0, -120.0, -650.0), 7.0),))
    comparison = compare(result, placed)
    assert comparison.lesions is not None and [m.verdict for m in comparison.lesions] == ["stable"]
    assert "nodules 1 matched (0 grew beyond 1.5 mm mean diameter or 25 % volume), 0 new, 0 resolved" in (
        comparison.sentence()
    )

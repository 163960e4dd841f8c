"""Lung-RADS v2022, Fleischner 2017 and Brock as published: the boundaries a radiologist would check by hand."""

from __future__ import annotations

import math

import pytest

from models.nodules.guidelines import NoduleFacts, brock, exam_lung_rads, fleischner, lung_rads
from models.nodules.measure import NoduleType


def nodule(
    mean: float,
    kind: NoduleType = "solid",
    *,
    solid: float = 0.0,
    long: float | None = None,
    calcified: bool = False,
) -> NoduleFacts:
    return NoduleFacts(mean, long if long is not None else mean, kind, solid, calcified)


@pytest.mark.parametrize(
    ("mean", "category"),
    [(5.9, "2"), (6.0, "3"), (7.9, "3"), (8.0, "4A"), (14.9, "4A"), (15.0, "4B")],
)
def test_solid_nodule_lung_rads_boundaries(mean: float, category: str) -> None:
    assert lung_rads(nodule(mean)).code == category


@pytest.mark.parametrize(
    ("mean", "solid", "category"),
    [(5.9, 3.0, "2"), (6.0, 5.9, "3"), (12.0, 6.0, "4A"), (12.0, 7.9, "4A"), (12.0, 8.0, "4B")],
)
def test_part_solid_nodule_is_categorised_by_its_solid_component(mean: float, solid: float, category: str) -> None:
    assert lung_rads(nodule(mean, "part-solid", solid=solid)).code == category


def test_ground_glass_nodules_stay_category_2_under_30_mm_and_calcified_nodules_are_1() -> None:
    assert lung_rads(nodule(29.9, "ground-glass")).code == "2"
    assert lung_rads(nodule(30.0, "ground-glass")).code == "3"
    assert lung_rads(nodule(20.0, calcified=True)).code == "1"


def test_category_rule_cites_lung_rads_and_management_matches_the_category() -> None:
    assessment = lung_rads(nodule(9.2))
    assert "Lung-RADS v2022" in assessment.rule and "9.2 mm" in assessment.rule
    assert assessment.management.startswith("Low-dose chest CT in 3 months")


def test_exam_takes_the_most_suspicious_nodule_and_is_negative_without_nodules() -> None:
    assert exam_lung_rads(["2", "4A", "3"], lungs_fully_scanned=True).code == "4A"
    assert exam_lung_rads([], lungs_fully_scanned=True).code == "1"
    # Part of the lungs not scanned: incomplete, unless a suspicious nodule already decides management.
    assert exam_lung_rads(["2"], lungs_fully_scanned=False).code == "0"
    assert exam_lung_rads(["4A"], lungs_fully_scanned=False).code == "4A"


def test_fleischner_solid_single_nodule_by_size_and_risk() -> None:
    small = fleischner([nodule(5.0)])
    assert small.low_risk == "No routine follow-up." and small.high_risk == "Optional CT at 12 months."
    middle = fleischner([nodule(7.4)])  # rounds to 7 mm: the 6-8 mm row
    assert middle.low_risk.startswith("CT at 6-12 months, then consider")
    assert middle.high_risk == "CT at 6-12 months, then CT at 18-24 months."
    large = fleischner([nodule(8.6)])  # rounds to 9 mm: > 8 mm
    assert large.for_risk(None) == "Consider CT at 3 months, PET/CT, or tissue sampling."


def test_fleischner_multiple_and_subsolid_nodules() -> None:
    assert fleischner([nodule(7.0), nodule(4.0)]).low_risk.startswith("CT at 3-6 months")
    ggn = fleischner([nodule(8.0, "ground-glass")])
    assert ggn.for_risk("low").startswith("CT at 6-12 months to confirm persistence")
    part = fleischner([nodule(8.0, "part-solid", solid=3.0)])
    assert "annual CT for 5 years" in part.for_risk("high")
    # The most suspicious nodule guides: a 7 mm solid nodule outranks a 4 mm ground-glass one.
    assert fleischner([nodule(4.0, "ground-glass"), nodule(7.0)]).basis.endswith("(6-8 mm)")


def test_fleischner_does_not_apply_under_35_and_ignores_benign_calcified_nodules() -> None:
    assert not fleischner([nodule(9.0)], age_years=30).applicable
    assert fleischner([nodule(12.0, calcified=True)]).for_risk(None).startswith("No routine follow-up")


def test_brock_matches_the_published_equation_and_is_a_range_over_unknown_inputs() -> None:
    # McWilliams 2013 model 2b by hand: 65-year-old woman, emphysema, 12 mm solid nodule, 2 nodules; family history,
    # upper lobe and spiculation all absent gives the low end, all present the high end.
    base = -6.7892 + 0.0287 * (65 - 62) + 0.6011 + 0.2953 - 5.3854 * ((12 / 10) ** -0.5 - 1.58113883) - 0.0824 * (2 - 4)
    estimate = brock(nodule(11.0, long=12.0), age_years=65, sex="female", emphysema=True, nodule_count=2)
    assert estimate.low == pytest.approx(1 / (1 + math.exp(-base)))
    assert estimate.high == pytest.approx(1 / (1 + math.exp(-(base + 0.2961 + 0.6581 + 0.7729))))
    assert set(estimate.unknown) == {"family history of lung cancer", "upper-lobe location", "spiculation"}


def test_brock_names_missing_inputs_instead_of_guessing() -> None:
    estimate = brock(nodule(9.0), age_years=None, sex=None, emphysema=False, nodule_count=1)
    assert not estimate.computed
    assert estimate.missing == ("age", "sex (male or female)")

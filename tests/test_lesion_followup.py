"""Lesion lists over time (models.lesion_followup): matching after aligning the lungs, VDT and the NELSON bands,
Lung-RADS v2022 growth and the category it implies, new and resolved nodules. Pure: positions and sizes in, matches
out; the nodules of a real scan are matched in the pipeline tests once the nodule analyzer files them."""

from __future__ import annotations

import math

import pytest

from models.lesion_followup import (
    Box,
    Lesion,
    LesionMatch,
    LungAlignment,
    growth,
    match_lesions,
    nelson_band,
    new_category,
    volume_doubling_time_days,
)


def sphere(d: float) -> float:
    return math.pi * d**3 / 6.0


def test_volume_doubling_time_is_t_ln2_over_ln_of_the_volume_ratio() -> None:
    assert volume_doubling_time_days(100.0, 200.0, 365.0) == pytest.approx(365.0)
    assert volume_doubling_time_days(100.0, 400.0, 365.0) == pytest.approx(182.5)
    assert volume_doubling_time_days(200.0, 100.0, 365.0) is None  # shrinking: no doubling


@pytest.mark.parametrize(
    ("vdt", "words"),
    [
        (399.0, "NELSON positive"),
        (400.0, "NELSON indeterminate"),
        (600.0, "NELSON indeterminate"),
        (601.0, "NELSON negative"),
    ],
)
def test_the_nelson_bands(vdt: float, words: str) -> None:
    assert words in (nelson_band(vdt) or "")


def test_lung_rads_growth_is_more_than_1_5_mm_within_12_months() -> None:
    before = Lesion("a", (0, 0, 0), 6.0, sphere(6.0))
    assert growth(before, Lesion("b", (0, 0, 0), 7.5, sphere(7.5)), 300).lung_rads_growth is False  # exactly 1.5 mm
    grown = growth(before, Lesion("b", (0, 0, 0), 7.6, sphere(7.6)), 300)
    assert grown.lung_rads_growth and grown.diameter_change_mm == pytest.approx(1.6)
    assert grown.vdt_days == pytest.approx(300 * math.log(2) / math.log((7.6 / 6.0) ** 3))
    assert grown.nelson_band is not None and "NELSON positive" in grown.nelson_band
    assert growth(before, Lesion("b", (0, 0, 0), 7.6, sphere(7.6)), 500).lung_rads_growth is False  # over 12 months


def test_a_volume_change_within_25_percent_gives_no_doubling_time() -> None:
    before = Lesion("a", (0, 0, 0), 8.0, 1000.0)
    change = growth(before, Lesion("b", (0, 0, 0), 8.2, 1200.0), 365)
    assert change.volume_change_percent == pytest.approx(20.0) and change.vdt_days is None


def test_on_thick_slices_a_volume_change_is_shown_but_judges_nothing() -> None:
    """A nodule's volume on 5 mm slices moves by tens of percent with where the slices fall: no VDT, no verdict."""
    before = Lesion("a", (0, 0, 0), 6.0, 100.0)
    now = Lesion("b", (0, 0, 0), 6.4, 208.0)  # +0.4 mm mean diameter, volume +108 %
    thin = growth(before, now, 200, thickest_slice_mm=1.0)
    assert thin.vdt_days is not None and not thin.volume_unjudged_because
    assert LesionMatch("matched", now, before, 0.0, thin).verdict == "increased"
    thick = growth(before, now, 200, thickest_slice_mm=5.0)
    assert thick.volume_change_percent == pytest.approx(108.0) and thick.vdt_days is None and thick.nelson_band is None
    match = LesionMatch("matched", now, before, 0.0, thick)
    assert match.verdict == "stable"  # judged by the mean diameter alone: +0.4 mm
    assert "not judged: 5 mm slices" in match.sentence() and "Fleischner" in match.sentence()
    grown = LesionMatch(
        "matched",
        Lesion("c", (0, 0, 0), 8.0, 400.0),
        before,
        0.0,
        growth(before, Lesion("c", (0, 0, 0), 8.0, 400.0), 200, 5.0),
    )
    assert grown.verdict == "increased"  # +2 mm mean diameter counts on any slices


def test_new_solid_nodules_take_the_lung_rads_new_categories() -> None:
    assert [new_category(Lesion("n", (0, 0, 0), d)) for d in (3.9, 4.0, 6.0, 8.0)] == ["2", "3", "4A", "4B"]
    assert new_category(Lesion("n", (0, 0, 0), 9.0, solid=False)) is None


def test_nodules_are_matched_after_the_lungs_are_aligned_and_the_rest_are_new_or_resolved() -> None:
    # The patient lies 40 mm further along the table and breathes 10 % deeper along z at the follow-up.
    prior_lungs = Box((-150.0, -120.0, -300.0), (150.0, 100.0, -60.0))
    current_lungs = Box((-150.0, -120.0, -272.0), (150.0, 100.0, -8.0))
    align = LungAlignment.from_lungs(prior_lungs, current_lungs)
    assert align((0.0, 0.0, -180.0)) == pytest.approx((0.0, -10.0 + 10.0, -140.0))
    prior = [
        Lesion("p1", (60.0, -20.0, -100.0), 6.0, sphere(6.0), reference="Observation/p1"),
        Lesion("p2", (-70.0, 10.0, -250.0), 5.0, sphere(5.0), reference="Observation/p2"),
    ]
    grown_at = align(prior[0].position_mm)
    current = [
        Lesion("c1", (grown_at[0] + 2.0, grown_at[1] - 1.0, grown_at[2] + 3.0), 8.1, sphere(8.1)),
        Lesion("c2", (50.0, 40.0, -200.0), 6.5, sphere(6.5)),
    ]
    matches = {m.status: m for m in match_lesions(current, prior, align, interval_days=365)}
    matched = matches["matched"]
    assert matched.current is current[0] and matched.prior is prior[0]
    assert matched.growth is not None and matched.growth.lung_rads_growth and matched.lung_rads == "4B"
    assert matches["new"].current is current[1] and matches["new"].lung_rads == "4A"
    assert matches["resolved"].prior is prior[1]
    # Without the alignment the grown nodule lies 40 mm away: it would read as new, and its prior as resolved.
    unaligned = match_lesions(current, prior, LungAlignment.identity(), interval_days=365)
    assert [m.status for m in unaligned] == ["new", "new", "resolved", "resolved"]

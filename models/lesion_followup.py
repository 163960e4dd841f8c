"""Follow a list of lesions (lung nodules) from one scan to the next: match them, then growth, VDT, new and resolved.

Exam-level measurements are compared key by key (:mod:`models.followup`). Lesions first need to be told apart: the
same nodule on two scans has no shared key, so each current lesion is matched to a prior one by position, after
the two scans' lungs are aligned (:class:`LungAlignment`: the patient lies elsewhere on the table, and breathes in
to another depth). Pure functions over positions and sizes; the lungs' extents come from the lung segmentation of
each scan, the lesions from the analyzer's findings.

Published rules applied (sizes are mean diameters, the average of long and short axis):

* **Growth (Lung-RADS v2022)**: an increase in mean diameter of more than 1.5 mm within a 12-month interval
  (American College of Radiology, Lung-RADS v2022; Christensen J et al., Chest 2024;165:738-753). A growing solid
  nodule is category 4A below 8 mm and 4B from 8 mm; a new solid nodule is 3 from 4 to < 6 mm, 4A from 6 to < 8 mm,
  4B from 8 mm (and 2 below 4 mm). Growth over a longer interval is reported, but is not Lung-RADS growth.
* **Volume doubling time**: VDT = t ln 2 / ln(V2 / V1), t in days, for a volume that grew; bands of the NELSON trial
  (Horeweg N, van Rosmalen J, Heuvelmans MA, et al. Lung cancer probability in patients with CT-detected pulmonary
  nodules: a prespecified analysis of data from the NELSON trial of low-dose CT screening. Lancet Oncol.
  2014;15(12):1332-1341): under 400 days high probability of cancer (positive), 400 to 600 days intermediate
  (indeterminate), over 600 days low (negative). A volume change within 25 % is not growth: the NELSON protocol's
  measurement-error margin for semi-automated volumetry (van Klaveren RJ et al., N Engl J Med 2009;361:2221-2229).
* **Volumetry needs thin sections**: NELSON measured volumes on 1 mm sections, and the Fleischner Society asks for
  contiguous sections of 1.5 mm or thinner to measure a nodule (MacMahon H et al., Guidelines for management of
  incidental pulmonary nodules detected on CT images: from the Fleischner Society 2017. Radiology 2017;284:228-243).
  On thicker slices a small nodule's volume moves by tens of percent with where the slices fall, so a volume change
  is reported there but judges nothing: no volume verdict, no VDT; the mean-diameter rule still applies.

A matched lesion is called ``increased`` (or ``decreased``) only beyond one of those margins, 1.5 mm mean diameter or
25 % volume, and ``stable`` within both (:attr:`LesionMatch.verdict`); Lung-RADS growth and the category it implies
need the 1.5 mm within 12 months. :func:`models.followup.compare_with_history` runs the matching for an analyzer whose
card follows lesions, from the positions and lung extents filed with both results.

Matching is a project rule, not a published one: a current lesion and a prior one are the same when their aligned
centres lie within ``max(10 mm, the larger mean diameter)`` of each other, closest pairs first, each lesion used once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

LUNG_RADS_GROWTH_MM = 1.5
LUNG_RADS_GROWTH_DAYS = 365.25
VOLUME_CHANGE_MARGIN = 0.25
NELSON_POSITIVE_DAYS = 400.0
NELSON_NEGATIVE_DAYS = 600.0
MATCH_MIN_MM = 10.0
VOLUMETRY_MAX_SLICE_MM = 1.5
SLICE_TOLERANCE_MM = 0.01  # a stated 1.5 mm slice may be stored as 1.500001

Status = Literal["matched", "new", "resolved"]
LesionVerdict = Literal["stable", "increased", "decreased", "new", "resolved"]


@dataclass(frozen=True)
class Box:
    """The extent of both lungs in patient coordinates (mm, DICOM LPS), from the lung segmentation of one scan."""

    low: tuple[float, float, float]
    high: tuple[float, float, float]

    @property
    def centre(self) -> tuple[float, float, float]:
        return tuple((a + b) / 2.0 for a, b in zip(self.low, self.high, strict=True))  # type: ignore[return-value]

    @property
    def size(self) -> tuple[float, float, float]:
        return tuple(b - a for a, b in zip(self.low, self.high, strict=True))  # type: ignore[return-value]


@dataclass(frozen=True)
class LungAlignment:
    """Maps a prior scan's patient coordinates onto the current scan's: the lungs' centres made to coincide and their
    extents scaled axis by axis (a deeper breath lengthens the lungs mostly along z). An affine fit of the lung boxes,
    coarse but enough to tell nodules apart that are centimetres from each other."""

    prior_centre: tuple[float, float, float]
    current_centre: tuple[float, float, float]
    scale: tuple[float, float, float]

    @classmethod
    def from_lungs(cls, prior: Box, current: Box) -> LungAlignment:
        scale = tuple(c / p if p > 0 else 1.0 for p, c in zip(prior.size, current.size, strict=True))
        return cls(prior.centre, current.centre, scale)  # type: ignore[arg-type]

    @classmethod
    def identity(cls) -> LungAlignment:
        return cls((0.0, 0.0, 0.0), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))

    def __call__(self, point: tuple[float, float, float]) -> tuple[float, float, float]:
        return tuple(  # type: ignore[return-value]
            c + s * (x - p)
            for x, p, c, s in zip(point, self.prior_centre, self.current_centre, self.scale, strict=True)
        )


@dataclass(frozen=True)
class Lesion:
    """One lesion of one scan: ``position_mm`` its centre (DICOM LPS, that scan's coordinates), ``solid`` whether it
    is a solid nodule (the Lung-RADS growth categories below are those of solid nodules)."""

    key: str
    position_mm: tuple[float, float, float]
    mean_diameter_mm: float
    volume_mm3: float | None = None
    solid: bool = True
    reference: str = ""  # the filed Observation, for a prior lesion


@dataclass(frozen=True)
class Growth:
    """What two measurements of the same lesion say: diameter change, Lung-RADS growth, volume change and VDT."""

    diameter_change_mm: float
    lung_rads_growth: bool
    volume_change_percent: float | None
    vdt_days: float | None
    nelson_band: str | None
    volume_unjudged_because: str = ""
    """Why the volume change judges nothing (slices too thick for volumetry); empty when it counts."""


@dataclass(frozen=True)
class LesionMatch:
    """A current lesion with its prior (``matched``), a current one without (``new``), or a prior one without
    (``resolved``); ``growth`` for a matched pair, ``lung_rads`` the category growth or newness implies (solid)."""

    status: Status
    current: Lesion | None
    prior: Lesion | None
    distance_mm: float | None = None
    growth: Growth | None = None
    lung_rads: str | None = None

    @property
    def verdict(self) -> LesionVerdict:
        """``increased`` or ``decreased`` only beyond the published margins (1.5 mm mean diameter, Lung-RADS v2022;
        25 % volume, NELSON), ``stable`` within both; ``new`` or ``resolved`` for an unmatched lesion."""
        if self.status != "matched":
            return self.status
        assert self.growth is not None  # a matched pair always has one
        change, volume = self.growth.diameter_change_mm, self.growth.volume_change_percent
        if self.growth.volume_unjudged_because:
            volume = None
        if change > LUNG_RADS_GROWTH_MM or (volume is not None and volume > 100.0 * VOLUME_CHANGE_MARGIN):
            return "increased"
        if change < -LUNG_RADS_GROWTH_MM or (volume is not None and volume < -100.0 * VOLUME_CHANGE_MARGIN):
            return "decreased"
        return "stable"

    @property
    def key(self) -> str:
        """The current lesion's key, or for a resolved one ``resolved-`` and the prior lesion's key."""
        if self.current is not None:
            return self.current.key
        assert self.prior is not None
        return f"resolved-{self.prior.key}"

    def sentence(self) -> str:
        """This lesion's comparison in words, as the report and its Observation state it."""
        if self.status == "new":
            assert self.current is not None
            category = f", Lung-RADS {self.lung_rads} as a new solid nodule" if self.lung_rads else ""
            return f"{self.current.key}: new, {_mm(self.current.mean_diameter_mm)} mm{category}"
        if self.status == "resolved":
            assert self.prior is not None
            return f"{self.prior.key} of the prior ({_mm(self.prior.mean_diameter_mm)} mm): not found now"
        assert self.current is not None and self.prior is not None and self.growth is not None
        g = self.growth
        text = (
            f"{self.current.key} (prior {self.prior.key}): {_mm(self.prior.mean_diameter_mm)} -> "
            f"{_mm(self.current.mean_diameter_mm)} mm ({_signed(g.diameter_change_mm)} mm)"
        )
        if g.volume_change_percent is not None:
            text += f", volume {_signed(g.volume_change_percent, 0)} %"
            if g.volume_unjudged_because:
                text += f" (not judged: {g.volume_unjudged_because})"
        if g.vdt_days is not None:
            text += f", VDT {g.vdt_days:.0f} days ({g.nelson_band})"
        verdict = self.verdict
        margins = "1.5 mm mean diameter" if g.volume_unjudged_because else "1.5 mm mean diameter or 25 % volume"
        if verdict == "stable":
            return f"{text}: no growth beyond {margins}"
        text += f": {verdict} beyond {margins}"
        if g.lung_rads_growth:
            text += f" (Lung-RADS growth, category {self.lung_rads})" if self.lung_rads else " (Lung-RADS growth)"
        return text


def lesions_sentence(matches: Sequence[LesionMatch]) -> str:
    """The lesion comparison of a report: counts, then each lesion that grew, shrank, is new or resolved."""
    matched = [m for m in matches if m.status == "matched"]
    changed = [m for m in matches if m.verdict != "stable"]
    grown = sum(m.verdict == "increased" for m in matched)
    counts = (
        f"nodules {len(matched)} matched ({grown} grew beyond 1.5 mm mean diameter or 25 % volume), "
        f"{sum(m.status == 'new' for m in matches)} new, {sum(m.status == 'resolved' for m in matches)} resolved"
    )
    if not matches:
        return "no nodule listed now or before"
    return "; ".join([counts, *(m.sentence() for m in changed)])


def _mm(value: float) -> str:
    return f"{value:.1f}"


def _signed(value: float, decimals: int = 1) -> str:
    return f"{value:+.{decimals}f}"


def volume_doubling_time_days(v1: float, v2: float, interval_days: float) -> float | None:
    """VDT = t ln 2 / ln(V2 / V1); ``None`` unless the volume grew (a shrinking or stable lesion does not double)."""
    if v1 <= 0 or v2 <= v1 or interval_days <= 0:
        return None
    return interval_days * math.log(2.0) / math.log(v2 / v1)


def nelson_band(vdt_days: float | None) -> str | None:
    """The NELSON trial's reading of a volume doubling time (Horeweg et al., Lancet Oncol 2014)."""
    if vdt_days is None:
        return None
    if vdt_days < NELSON_POSITIVE_DAYS:
        return "VDT under 400 days: high probability of cancer (NELSON positive)"
    if vdt_days <= NELSON_NEGATIVE_DAYS:
        return "VDT 400-600 days: intermediate (NELSON indeterminate)"
    return "VDT over 600 days: low probability of cancer (NELSON negative)"


def growth(prior: Lesion, current: Lesion, interval_days: float, thickest_slice_mm: float | None = None) -> Growth:
    """The change from ``prior`` to ``current``; ``thickest_slice_mm`` (the thicker of the two scans' slices, when
    known) above :data:`VOLUMETRY_MAX_SLICE_MM` leaves the volume change unjudged."""
    change = current.mean_diameter_mm - prior.mean_diameter_mm
    lung_rads_growth = change > LUNG_RADS_GROWTH_MM and 0 < interval_days <= LUNG_RADS_GROWTH_DAYS
    volume_change = vdt = band = None
    unjudged = ""
    if prior.volume_mm3 and current.volume_mm3:
        volume_change = 100.0 * (current.volume_mm3 - prior.volume_mm3) / prior.volume_mm3
        if thickest_slice_mm is not None and thickest_slice_mm > VOLUMETRY_MAX_SLICE_MM + SLICE_TOLERANCE_MM:
            unjudged = (
                f"{thickest_slice_mm:g} mm slices; volumetry needs {VOLUMETRY_MAX_SLICE_MM:g} mm or thinner "
                "(Fleischner 2017; NELSON measured on 1 mm)"
            )
        elif volume_change > 100.0 * VOLUME_CHANGE_MARGIN:  # within 25 %: measurement error, no doubling time
            vdt = volume_doubling_time_days(prior.volume_mm3, current.volume_mm3, interval_days)
            band = nelson_band(vdt)
    return Growth(change, lung_rads_growth, volume_change, vdt, band, unjudged)


def growth_category(current: Lesion, grew: bool) -> str | None:
    """Lung-RADS v2022 category a growing solid nodule implies (4A below 8 mm, 4B from 8 mm)."""
    if not grew or not current.solid:
        return None
    return "4B" if current.mean_diameter_mm >= 8.0 else "4A"


def new_category(current: Lesion) -> str | None:
    """Lung-RADS v2022 category of a new solid nodule: 2 below 4 mm, 3 to < 6 mm, 4A to < 8 mm, 4B from 8 mm."""
    if not current.solid:
        return None
    size = current.mean_diameter_mm
    return "2" if size < 4.0 else "3" if size < 6.0 else "4A" if size < 8.0 else "4B"


def match_lesions(
    current: Sequence[Lesion],
    prior: Sequence[Lesion],
    alignment: LungAlignment,
    interval_days: float,
    thickest_slice_mm: float | None = None,
) -> tuple[LesionMatch, ...]:
    """Pair each current lesion with the prior one at the same aligned place; the rest are new or resolved."""
    pairs = []
    for i, now in enumerate(current):
        for j, before in enumerate(prior):
            distance = math.dist(now.position_mm, alignment(before.position_mm))
            gate = max(MATCH_MIN_MM, now.mean_diameter_mm, before.mean_diameter_mm)
            if distance <= gate:
                pairs.append((distance, i, j))
    used_current: set[int] = set()
    used_prior: set[int] = set()
    matches: list[LesionMatch] = []
    for distance, i, j in sorted(pairs):
        if i in used_current or j in used_prior:
            continue
        used_current.add(i)
        used_prior.add(j)
        change = growth(prior[j], current[i], interval_days, thickest_slice_mm)
        matches.append(
            LesionMatch(
                "matched",
                current[i],
                prior[j],
                distance,
                change,
                growth_category(current[i], change.lung_rads_growth),
            )
        )
    matches.extend(
        LesionMatch("new", lesion, None, lung_rads=new_category(lesion))
        for i, lesion in enumerate(current)
        if i not in used_current
    )
    matches.extend(LesionMatch("resolved", None, lesion) for j, lesion in enumerate(prior) if j not in used_prior)
    return tuple(matches)

"""Trend charts: each followed measurement across the patient's studies, drawn on the server as SVG.

A chart shows every filed value of one measurement of one analyzer, oldest to newest, and the repeatability band
around the prior value the shown result was compared with: a point outside the band is a change beyond what two
scans of an unchanged patient differ by, a point inside is not. It is readable without colour: results of the
shown analyzer version are filled circles joined by a line, results of another version (not compared) hollow squares,
the shown result a larger ringed circle, the band a hatched area with a dashed edge, and every point carries its
value and date in text. The same numbers are in the SVG's ``<desc>`` and in a table beside it.

Pure functions over what :mod:`fhir_adapters.results` reads and what the card says (:mod:`models.followup`); no
Flask, no HTTP. Every string that reaches the markup is escaped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from fhir_adapters.results import AiFinding
from models.followup import FollowupSpec, measurement_site

WIDTH, HEIGHT = 460, 220
LEFT, RIGHT, TOP, BOTTOM = 64, 40, 22, 58
INSET = 22  # the first and last study stand this far inside the frame, clear of the axis labels


@dataclass(frozen=True)
class TrendPoint:
    """One filed value: when its images were acquired, the value, its report, and how it is drawn."""

    date: datetime
    value: float
    report_id: str
    version: str | None
    comparable: bool  # measured by a version whose results the card says measure the same thing
    focus: bool  # the result this chart is shown for


@dataclass(frozen=True)
class Trend:
    """One measurement over time. ``band`` is the repeatability band around the prior the focus result was compared
    with (from ``band_from`` to the focus date); ``verdict`` that comparison's verdict, as filed when it was."""

    analyzer: str
    key: str
    display: str
    unit: str
    points: tuple[TrendPoint, ...]
    band: tuple[float, float] | None
    band_from: datetime | None
    rule: str
    verdict: str | None

    @property
    def focus(self) -> TrendPoint | None:
        return next((p for p in self.points if p.focus), None)

    def description(self) -> str:
        """The chart in words (the SVG's ``<desc>``): every value with its date, the band and the verdict."""
        values = "; ".join(
            f"{p.date.date().isoformat()}: {_number(p.value)} {self.unit}".rstrip()
            + (" (this result)" if p.focus else "")
            + ("" if p.comparable else " (another analyzer version, not compared)")
            for p in self.points
        )
        text = f"{self.display} over time: {values}."
        if self.band is not None:
            text += (
                f" Values from {_number(self.band[0])} to {_number(self.band[1])} {self.unit} are within the "
                f"repeatability of the prior value ({self.rule})."
            )
        if self.verdict:
            text += f" Verdict: {self.verdict}."
        return text

    def svg(self, chart_id: str) -> str:
        """The chart as an inline SVG element (``chart_id`` must be unique on the page)."""
        return render_svg(self, chart_id)


def patient_trends(
    findings: Sequence[AiFinding], *, analyzer: str, spec: FollowupSpec, focus_report: str | None = None
) -> list[Trend]:
    """A trend per followed measurement of ``analyzer`` with at least two filed values, in the card's order.

    ``findings`` are the patient's filed results (any analyzers, any order); ``focus_report``
    (``DiagnosticReport/<id>``) is the result the charts are shown for, the newest when not given. A measurement
    that names its site (``same_site``, e.g. the vertebra) is charted only where the site is the focus result's.
    """
    own = sorted(
        (f for f in findings if f.analyzer == analyzer and f.effective is not None),
        key=lambda f: f.effective or datetime.min,
    )
    if not own:
        return []
    focus = next((f for f in own if f.report_reference == focus_report), own[-1])
    trends = []
    for key, followed in spec.measurements.items():
        focus_value = focus.measurement(key)
        if focus_value is None:
            continue
        points = []
        for finding in own:
            measured = finding.measurement(key)
            if measured is None or finding.effective is None:
                continue
            if followed.same_site and measurement_site(measured.text) != measurement_site(focus_value.text):
                continue
            points.append(
                TrendPoint(
                    date=finding.effective,
                    value=measured.value,
                    report_id=finding.report_reference.rpartition("/")[2],
                    version=finding.version,
                    comparable=spec.compares_with(finding.version, key),
                    focus=finding is focus,
                )
            )
        if len(points) < 2:
            continue
        band, band_from, verdict = _band(points, focus, key, spec)
        rule = ""
        if followed.repeatability is not None:
            prior = _prior(points)
            rule = followed.repeatability.describe(prior.value if prior else 0.0, _unit_words(focus_value.unit))
        trends.append(
            Trend(
                analyzer=analyzer,
                key=key,
                display=focus_value.text,
                unit=focus_value.unit,
                points=tuple(points),
                band=band,
                band_from=band_from,
                rule=rule or f"none published ({followed.no_verdict_because})",
                verdict=verdict,
            )
        )
    return trends


def _prior(points: Sequence[TrendPoint]) -> TrendPoint | None:
    """The newest comparable point before the focus: the one the focus result is compared with."""
    focus_index = next((i for i, p in enumerate(points) if p.focus), len(points))
    return next((p for p in reversed(points[:focus_index]) if p.comparable), None)


def _band(
    points: Sequence[TrendPoint], focus: AiFinding, key: str, spec: FollowupSpec
) -> tuple[tuple[float, float] | None, datetime | None, str | None]:
    filed = focus.comparison(key)
    prior = _prior(points)
    if filed is not None:  # as the report filed it
        verdict = "no verdict" if filed.verdict == "not-assessed" else filed.verdict
        return filed.band, filed.prior_date or (prior.date if prior else None), verdict
    repeatability = spec.measurements[key].repeatability
    if prior is None or repeatability is None:
        return None, None, None
    return repeatability.band(prior.value), prior.date, None


# ---------------------------------------------------------------------------------------------- drawing


def render_svg(trend: Trend, chart_id: str) -> str:
    e = html.escape
    cid = e(chart_id)
    values = [p.value for p in trend.points] + (list(trend.band) if trend.band else [])
    low, high = _nice_range(min(values), max(values))
    dates = [p.date.timestamp() for p in trend.points]
    first, last = min(dates), max(dates)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(when: datetime) -> float:
        span = plot_w - 2 * INSET
        return LEFT + INSET + (span / 2 if last == first else (when.timestamp() - first) / (last - first) * span)

    def y(value: float) -> float:
        return TOP + plot_h - (value - low) / (high - low) * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="trend-chart" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-labelledby="{cid}-title {cid}-desc">',
        f'<title id="{cid}-title">{e(trend.display)} over time</title>',
        f'<desc id="{cid}-desc">{e(trend.description())}</desc>',
        f'<defs><pattern id="{cid}-hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><line x1="0" y1="0" x2="0" y2="6" stroke="#555" stroke-width="1.5"/>'
        "</pattern></defs>",
        f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="#fff" stroke="#222"/>',
    ]
    for tick in _ticks(low, high):
        ty = y(tick)
        parts.append(f'<line x1="{LEFT - 4}" y1="{ty:.1f}" x2="{LEFT}" y2="{ty:.1f}" stroke="#222"/>')
        parts.append(
            f'<text x="{LEFT - 7}" y="{ty + 4:.1f}" text-anchor="end" font-size="11">{e(_number(tick))}</text>'
        )
    parts.append(
        f'<text x="14" y="{TOP + plot_h / 2:.1f}" font-size="11" text-anchor="middle" '
        f'transform="rotate(-90 14 {TOP + plot_h / 2:.1f})">{e(_unit_label(trend.unit) or "value")}</text>'
    )
    if trend.band is not None:
        focus = trend.focus or trend.points[-1]
        start = x(trend.band_from) if trend.band_from is not None else LEFT
        end = x(focus.date)
        if end - start < 24:  # one study date, or very close ones: a visible band centred on the point
            start, end = end - 12, end + 12
        top, bottom = y(trend.band[1]), y(trend.band[0])
        parts.append(
            f'<rect x="{start:.1f}" y="{top:.1f}" width="{end - start:.1f}" height="{max(bottom - top, 1):.1f}" '
            f'fill="url(#{cid}-hatch)" fill-opacity="0.5" stroke="#222" stroke-dasharray="4 3"/>'
        )
    line = " ".join(f"{x(p.date):.1f},{y(p.value):.1f}" for p in trend.points if p.comparable)
    if line.count(",") > 1:
        parts.append(f'<polyline points="{line}" fill="none" stroke="#222" stroke-width="1.5"/>')
    labelled = _labelled_dates(trend.points)
    for p in trend.points:
        px, py = x(p.date), y(p.value)
        if not p.comparable:
            parts.append(
                f'<rect x="{px - 5:.1f}" y="{py - 5:.1f}" width="10" height="10" fill="#fff" stroke="#222" '
                'stroke-width="1.5"/>'
            )
        elif p.focus:
            parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="8" fill="#fff" stroke="#222" stroke-width="1.5"/>')
            parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="4.5" fill="#222"/>')
        else:
            parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="4.5" fill="#222"/>')
        label_y = py - 11 if py - 11 > TOP + 10 else py + 20  # below a point at the top of the frame
        parts.append(
            f'<text x="{px:.1f}" y="{label_y:.1f}" text-anchor="middle" font-size="11" font-weight="bold">'
            f"{e(_number(p.value))}</text>"
        )
        if p in labelled:
            parts.append(
                f'<text x="{px:.1f}" y="{TOP + plot_h + 15}" text-anchor="middle" font-size="10">'
                f"{e(p.date.date().isoformat())}</text>"
            )
    legend_y = HEIGHT - 14
    parts.append(
        f'<circle cx="{LEFT + 4}" cy="{legend_y - 4}" r="4" fill="#222"/>'
        f'<text x="{LEFT + 12}" y="{legend_y}" font-size="10">this version</text>'
        f'<rect x="{LEFT + 82}" y="{legend_y - 8}" width="8" height="8" fill="#fff" stroke="#222"/>'
        f'<text x="{LEFT + 94}" y="{legend_y}" font-size="10">other version</text>'
    )
    if trend.band is not None:
        parts.append(
            f'<rect x="{LEFT + 172}" y="{legend_y - 9}" width="14" height="10" fill="url(#{cid}-hatch)" '
            'stroke="#222" stroke-dasharray="3 2"/>'
            f'<text x="{LEFT + 190}" y="{legend_y}" font-size="10">repeatability band</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _labelled_dates(points: Sequence[TrendPoint]) -> set[TrendPoint]:
    """Dates written under the axis: all of them when few, else the first, the last and the focus."""
    if len(points) <= 4:
        return set(points)
    return {points[0], points[-1], *(p for p in points if p.focus)}


def _nice_range(low: float, high: float) -> tuple[float, float]:
    if math.isclose(low, high):
        pad = abs(low) * 0.1 or 1.0
        return low - pad, high + pad
    pad = (high - low) * 0.2
    return low - pad, high + pad


def _ticks(low: float, high: float, count: int = 4) -> list[float]:
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.ceil(low / step) * step
    ticks = []
    value = start
    while value <= high + 1e-9:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _number(value: float) -> str:
    text = f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return text


_UNIT_LABELS = {"[hnsf'U]": "HU", "1": ""}


def _unit_label(ucum: str) -> str:
    return _UNIT_LABELS.get(ucum, ucum)


def _unit_words(unit: str) -> str:
    return "points" if unit == "%" else _unit_label(unit)

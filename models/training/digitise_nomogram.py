"""Read the percentile curves of a published hippocampal-volume nomogram out of its vector chart.

Usage (from the repository root)::

    python -m models.training.digitise_nomogram ../shared/data/mr/hippocampus_msd/nomogram_fem_right.svg

The chart is the women's right-hippocampus nomogram of Nobis et al. 2019 (UK Biobank, volumes uncorrected for
head size), as distributed with the hippocampus training data. It is a vector drawing: every percentile curve is
a polyline in the same coordinate frame as the chart's grid lines, so the curves can be read exactly, with no
pixel tracing. The frame is fixed by the grid: vertical lines at ages 52..71 (x = 79..551), horizontal lines at
2500..5100 mm3 (y = 781..74). The chart draws the 50th percentile as a narrow band of two lines; the median is
their midpoint. The table this prints is :data:`models.hippocampus_nomogram.WOMEN_RIGHT_MM3`; a test re-reads
the chart and checks that they agree.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

AGE_GRID = (79.0, 551.0, 52.0, 71.0)
"""(x of the first and last vertical grid line, their ages)."""
VOLUME_GRID = (781.0, 74.0, 2500.0, 5100.0)
"""(y of the lowest and highest horizontal grid line, their volumes in mm3)."""
PERCENTILES = (2.5, 5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 97.5)

_NUMBER = r"-?\d+(?:\.\d+)?(?:e-?\d+)?"


def _polyline(d: str) -> list[tuple[float, float]]:
    """Points of an SVG path made only of move/line commands (absolute or relative), as the chart's curves are."""
    tokens = re.findall(rf"[MmLlHhVv]|{_NUMBER}", d)
    x = y = 0.0
    points: list[tuple[float, float]] = []
    command = ""
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.isalpha():
            command = token
            i += 1
            continue
        if command in "MmLl":
            dx, dy = float(tokens[i]), float(tokens[i + 1])
            i += 2
            x, y = (x + dx, y + dy) if command in "ml" else (dx, dy)
            command = {"m": "l", "M": "L"}.get(command, command)
        elif command in "Hh":
            x = x + float(token) if command == "h" else float(token)
            i += 1
        elif command in "Vv":
            y = y + float(token) if command == "v" else float(token)
            i += 1
        points.append((x, y))
    return points


def read_curves(svg: str) -> list[np.ndarray]:
    """The chart's percentile curves, lowest first, each ``(n, 2)`` of (age, volume mm3) from left to right.

    A curve is a black, unfilled polyline spanning the whole age axis; each is drawn twice (once per adjacent
    band), so only those drawn left to right are kept.
    """
    x0, x1, age0, age1 = AGE_GRID
    y0, y1, volume0, volume1 = VOLUME_GRID
    curves = []
    for match in re.finditer(r"<path\b([^>]*)>", svg):
        attributes = match.group(1)
        style = re.search(r'style="([^"]*)"', attributes)
        d = re.search(r'\sd="([^"]*)"', attributes)
        if style is None or d is None or "stroke:#000000" not in style.group(1) or "fill:none" not in style.group(1):
            continue
        if not re.fullmatch(rf"[\sMmLl,]*(?:{_NUMBER}[\s,]*)+", d.group(1)):
            continue
        points = np.asarray(_polyline(d.group(1)))
        if len(points) < 10 or points[0, 0] > x0 + 1.0 or points[-1, 0] < x1 - 1.0:
            continue
        ages = age0 + (points[:, 0] - x0) / (x1 - x0) * (age1 - age0)
        volumes = volume0 + (y0 - points[:, 1]) / (y0 - y1) * (volume1 - volume0)
        curves.append(np.stack([ages, volumes], axis=1))
    curves.sort(key=lambda c: float(c[:, 1].mean()))
    return curves


def percentile_table(svg: str, ages: range = range(52, 72)) -> dict[float, tuple[int, ...]]:
    """Percentile -> volume (mm3, rounded) at each whole year of ``ages``, read from the chart's curves."""
    curves = read_curves(svg)
    if len(curves) != len(PERCENTILES) + 1:
        raise ValueError(f"expected {len(PERCENTILES) + 1} curves (the median drawn as two), found {len(curves)}")
    at = np.asarray(list(ages), dtype=float)
    sampled = [np.interp(at, c[:, 0], c[:, 1]) for c in curves]
    median = (sampled[4] + sampled[5]) / 2.0
    levels = [*sampled[:4], median, *sampled[6:]]
    return {p: tuple(round(float(v)) for v in level) for p, level in zip(PERCENTILES, levels, strict=True)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("svg", type=Path)
    args = parser.parse_args(argv)
    table = percentile_table(args.svg.read_text(encoding="utf-8"))
    print("{")
    for percentile, volumes in table.items():
        print(f"    {percentile}: {volumes},")
    print("}")


if __name__ == "__main__":
    main()

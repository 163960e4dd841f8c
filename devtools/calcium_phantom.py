"""Score the calcium inserts of a QRM cardiac calcification phantom scan with the project's own scoring functions.

The phantom is not anatomy, so the heart analyzer cannot run on it; instead this module finds the inserts (a task
that only this test has) and hands each insert's neighbourhood to :func:`models.calcium.score_calcium`, the very
function that scores a patient's coronary and aortic calcium. The figures therefore describe the patient scores.

The QRM Cardiac Calcification Insert (QRM GmbH, Moehrendorf, Germany) holds nine cylinders of hydroxyapatite (HA):
three sizes (5, 3 and 1 mm in diameter and length) at three densities (200, 400 and 800 mg HA/cm3); the masses
follow from volume x density (``QRM_INSERTS``, the manufacturer's table shipped as ``QRM_inserts.png`` beside the
data). The inserts of one density lie on a line from the rim of the insert towards its centre, large outermost,
and the three lines are 120 degrees apart. A separate slab holds two calibration rods: water-equivalent material
and 200 mg HA/cm3, which give the mass calibration factor (McCollough 2007).

How the inserts are found (all on the scan itself, nothing tuned to one file):

1. The image is smoothed in-plane (Gaussian, 1 mm) to take the noise down about sevenfold; inserts and rods are
   compact objects above 180 HU that do not touch the scan's outer bone (the phantom's spine and ribs).
2. Each candidate's size is its diameter at half its own peak above the local background (independent of its
   density); the three candidates at least 4 mm across in one slab are the large inserts, ordered low to high
   density by their peak. The insert's centre is the circumcentre of those three.
3. The medium and small insert of each density lie on the line from its large insert to the centre: each is the
   attenuation maximum nearest the position predicted by the spacing of the inserts measured on the densest line
   (the only one where all three stand out); where nothing stands out (a 1 mm, 200 mg/cm3 insert is below the
   noise), the predicted position is used.
4. The region scored for an insert is a cylinder around it: its nominal radius plus :data:`ROI_MARGIN_MM`, over
   the slices whose centres lie within half its length plus one slice thickness of the insert slab's centre.
5. The calibration rod is the largest compact object above 180 HU (about 20 mm across); the water rod is the
   darkest disc of the same size in the rod slab. Their mean HU (inside 2 mm of their edges) give c_HA.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from core.errors import ConfigurationError
from models.calcium import CalciumScore, MassCalibration, score_calcium

CALIBRATION_ROD_MG_PER_CM3 = 200.0
ROI_MARGIN_MM = 1.5
"""Room around an insert's nominal radius for its blur (about 1 mm) and for the locating error (under 0.5 mm)."""

_SMOOTH_MM = 1.0
_CANDIDATE_HU = 180.0
_LARGE_MIN_DIAMETER_MM = 4.0
_ROD_AREA_MM2 = (150.0, 700.0)
"""Cross-section of a calibration rod (about 20 mm across); the phantom's spine and ribs are larger and longer."""


@dataclass(frozen=True)
class Insert:
    """One calcium cylinder of the QRM Cardiac Calcification Insert (manufacturer's table)."""

    size: str  # "large", "medium", "small"
    density: str  # "low", "medium", "high"
    diameter_mm: float
    length_mm: float
    ha_mg_per_cm3: float
    known_mass_mg: float


QRM_INSERTS: tuple[Insert, ...] = tuple(
    Insert(size, density, d, d, rho, mass)
    for density, rho, masses in (
        ("low", 200.0, (19.6, 4.2, 0.2)),
        ("medium", 400.0, (39.3, 8.5, 0.3)),
        ("high", 800.0, (78.5, 17.0, 0.6)),
    )
    for size, d, mass in zip(("large", "medium", "small"), (5.0, 3.0, 1.0), masses, strict=True)
)
"""The nine inserts: diameter = length (5, 3, 1 mm) x density (200, 400, 800 mg HA/cm3); known HA mass in mg."""


@dataclass(frozen=True)
class LocatedInsert:
    insert: Insert
    centre_rc: tuple[float, float]  # row, column (pixels)
    found: bool  # False: placed at the predicted position, nothing stood out there


@dataclass(frozen=True)
class PhantomLayout:
    """Where the inserts and calibration rods are in one scan."""

    slab_centre: float  # slice coordinate (fractional) of the insert slab's centre
    centre_rc: tuple[float, float]
    inserts: tuple[LocatedInsert, ...]
    calibration: MassCalibration
    rod_slices: tuple[int, ...]


@dataclass(frozen=True)
class InsertScore:
    """One insert scored by the project next to the known mass and the published authors' figures."""

    insert: Insert
    located: bool
    score: CalciumScore
    authors_agatston: float | None
    authors_mass_mg: float | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "insert": f"{self.insert.size} {self.insert.density} density",
            "diameter_mm": self.insert.diameter_mm,
            "ha_mg_per_cm3": self.insert.ha_mg_per_cm3,
            "known_mass_mg": self.insert.known_mass_mg,
            "project_mass_mg": None if self.score.mass_mg is None else round(self.score.mass_mg, 2),
            "project_agatston": round(self.score.agatston, 1),
            "project_volume_mm3": round(self.score.volume_mm3, 1),
            "authors_agatston": None if self.authors_agatston is None else round(self.authors_agatston, 1),
            "authors_mass_mg": None if self.authors_mass_mg is None else round(self.authors_mass_mg, 2),
            "located": self.located,
        }


def _smoothed(slice_hu: np.ndarray, pixel_mm: float) -> np.ndarray:
    return np.asarray(ndimage.gaussian_filter(slice_hu.astype(np.float32), _SMOOTH_MM / pixel_mm))


@dataclass(frozen=True)
class _Blob:
    z: float
    row: float
    col: float
    peak: float
    area_mm2: float
    half_max_diameter_mm: float
    slices: tuple[int, int]


def _blobs(hu: np.ndarray, pixel_mm: float) -> list[_Blob]:
    """Compact bright objects (see the module docstring, step 1), with their half-maximum diameter."""
    smooth = np.stack([_smoothed(s, pixel_mm) for s in hu])
    bright = smooth > _CANDIDATE_HU
    labels, _count = ndimage.label(bright, structure=ndimage.generate_binary_structure(3, 1))
    out: list[_Blob] = []
    pixel_mm2 = pixel_mm * pixel_mm
    for number, where in enumerate(ndimage.find_objects(labels), start=1):
        if where is None:
            continue
        rows, cols = where[1], where[2]
        touches_edge = rows.start == 0 or cols.start == 0 or rows.stop == hu.shape[1] or cols.stop == hu.shape[2]
        own = labels[where] == number
        area = float(own.sum(axis=(1, 2)).max()) * pixel_mm2
        if touches_edge or area > 2000.0 or area < 1.0:
            continue
        values = smooth[where]
        z_local, r_local, c_local = np.unravel_index(int(np.argmax(np.where(own, values, -np.inf))), own.shape)
        z, r, c = z_local + where[0].start, r_local + rows.start, c_local + cols.start
        peak = float(values[z_local, r_local, c_local])
        # half maximum above the local background (median of a ring 8-12 mm out on the peak slice)
        rr, cc = np.ogrid[: hu.shape[1], : hu.shape[2]]
        distance = np.hypot(rr - r, cc - c) * pixel_mm
        ring = (distance > 8.0 + math.sqrt(area / math.pi)) & (distance < 12.0 + math.sqrt(area / math.pi))
        background = float(np.median(smooth[z][ring]))
        half = smooth[z] > (peak + background) / 2.0
        half_labels, _ = ndimage.label(half)
        own_half = half_labels == half_labels[r, c]
        half_area = float(np.count_nonzero(own_half)) * pixel_mm2
        r, c = (float(v) for v in ndimage.center_of_mass(own_half))  # the centre of the object, not of its noise
        out.append(
            _Blob(
                z=float(z),
                row=float(r),
                col=float(c),
                peak=peak,
                area_mm2=area,
                half_max_diameter_mm=2.0 * math.sqrt(half_area / math.pi),
                slices=(where[0].start, where[0].stop - 1),
            )
        )
    return out


def _circumcentre(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    (ax, ay), (bx, by), (cx, cy) = points
    d = 2.0 * (ax * (by - cy) + bx * (cy - ay) + cx * (ay - by))
    if abs(d) < 1e-6:
        raise ConfigurationError(
            "The three large inserts are in a line; this is not the QRM insert layout.", remedy="Check the scan."
        )
    ux = ((ax**2 + ay**2) * (by - cy) + (bx**2 + by**2) * (cy - ay) + (cx**2 + cy**2) * (ay - by)) / d
    uy = ((ax**2 + ay**2) * (cx - bx) + (bx**2 + by**2) * (ax - cx) + (cx**2 + cy**2) * (bx - ax)) / d
    return ux, uy


def locate_inserts(hu: np.ndarray, spacing: tuple[float, float, float]) -> PhantomLayout:
    """Find the nine inserts and the calibration rods of a QRM cardiac calcification phantom scan."""
    pixel_mm = float(spacing[1])
    blobs = _blobs(hu, pixel_mm)
    large = [b for b in blobs if b.half_max_diameter_mm >= _LARGE_MIN_DIAMETER_MM and b.area_mm2 < _ROD_AREA_MM2[0]]
    rods = [b for b in blobs if _ROD_AREA_MM2[0] <= b.area_mm2 <= _ROD_AREA_MM2[1]]
    if len(large) < 3 or not rods:
        raise ConfigurationError(
            f"Found {len(large)} large inserts and {len(rods)} calibration rods; a QRM cardiac calcification "
            "phantom scan shows three large inserts and a 200 mg HA/cm3 rod.",
            remedy="Give the axial series of the QRM phantom with its calcification insert in view.",
        )
    # the three large inserts share one slab: take the three closest in z to the brightest one
    brightest = max(large, key=lambda b: b.peak)
    large = sorted(sorted(large, key=lambda b: abs(b.z - brightest.z))[:3], key=lambda b: b.peak)
    centre = _circumcentre([(b.row, b.col) for b in large])
    slab = _slab_centre(hu, large[-1])
    inserts_by_density: dict[str, list[LocatedInsert]] = {}
    slab_slices = range(max(0, round(slab) - 1), min(hu.shape[0], round(slab) + 2))
    slab_max = np.max(np.stack([_smoothed(hu[z], pixel_mm) for z in slab_slices]), axis=0)
    spacing_along = _insert_step(slab_max, large[-1], centre, pixel_mm)
    for blob, density in zip(large, ("low", "medium", "high"), strict=True):
        direction = np.array([centre[0] - blob.row, centre[1] - blob.col])
        direction /= np.linalg.norm(direction)
        located = [LocatedInsert(_insert("large", density), (blob.row, blob.col), True)]
        for k, size in ((1, "medium"), (2, "small")):
            predicted = np.array([blob.row, blob.col]) + k * spacing_along * direction
            position, found = _refine(slab_max, predicted, pixel_mm)
            located.append(LocatedInsert(_insert(size, density), position, found))
        inserts_by_density[density] = located
    rod = max(rods, key=lambda b: b.area_mm2)
    calibration, rod_slices = _calibration(hu, rod, centre, pixel_mm)
    ordered = tuple(located for density in ("low", "medium", "high") for located in inserts_by_density[density])
    return PhantomLayout(slab, centre, ordered, calibration, rod_slices)


def _insert(size: str, density: str) -> Insert:
    return next(i for i in QRM_INSERTS if i.size == size and i.density == density)


def _slab_centre(hu: np.ndarray, blob: _Blob) -> float:
    """Fractional slice of the densest large insert's centre: the centroid of its excess attenuation along z."""
    r, c = round(blob.row), round(blob.col)
    z0, z1 = max(blob.slices[0] - 1, 0), min(blob.slices[1] + 2, hu.shape[0])
    profile = np.array([float(hu[z, r - 2 : r + 3, c - 2 : c + 3].mean()) for z in range(z0, z1)])
    excess = np.clip(profile - np.median(profile[[0, -1]]), 0.0, None)
    return float((np.arange(z0, z1) * excess).sum() / excess.sum()) if excess.sum() > 0 else float(blob.z)


def _insert_step(slab_max: np.ndarray, densest: _Blob, centre: tuple[float, float], pixel_mm: float) -> float:
    """Distance (pixels) between neighbouring inserts on a line, measured on the densest line.

    The profile from the large high-density insert towards the centre has a maximum at each insert; the first one
    more than 5 mm out (clear of the large insert's own blur) is the medium insert.
    """
    start = np.array([densest.row, densest.col])
    direction = np.array(centre) - start
    length = float(np.linalg.norm(direction))
    direction /= length
    steps = np.arange(0.0, length, 0.25)
    points = start[:, None] + direction[:, None] * steps[None, :]
    profile = ndimage.map_coordinates(slab_max, points, order=1)
    clear = steps * pixel_mm > 5.0
    candidates = np.flatnonzero(clear[1:-1] & (profile[1:-1] >= profile[:-2]) & (profile[1:-1] >= profile[2:])) + 1
    if candidates.size == 0:
        raise ConfigurationError(
            "No medium insert found on the line from the large high-density insert to the phantom centre.",
            remedy="Check that the scan shows the QRM calcification insert.",
        )
    best = candidates[np.argmax(profile[candidates] - np.median(profile))]
    return float(steps[best])


def _refine(slab_max: np.ndarray, predicted: np.ndarray, pixel_mm: float) -> tuple[tuple[float, float], bool]:
    """The attenuation maximum within 1.5 mm of the predicted position, if it stands out from the noise."""
    reach = max(2, round(1.5 / pixel_mm))
    r, c = round(float(predicted[0])), round(float(predicted[1]))
    window = slab_max[r - reach : r + reach + 1, c - reach : c + reach + 1]
    ring = slab_max[r - 4 * reach : r + 4 * reach + 1, c - 4 * reach : c + 4 * reach + 1]
    dr, dc = np.unravel_index(int(np.argmax(window)), window.shape)
    # the smoothed noise is about 3-4 HU; an insert stands out by tens of HU at least
    if float(window.max()) - float(np.median(ring)) < 20.0:
        return (float(predicted[0]), float(predicted[1])), False
    return (float(r - reach + dr), float(c - reach + dc)), True


def _disc_mean(slice_hu: np.ndarray, centre: tuple[float, float], radius_px: float) -> float:
    rr, cc = np.ogrid[: slice_hu.shape[0], : slice_hu.shape[1]]
    disc = (rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= radius_px**2
    return float(slice_hu[disc].mean())


def _calibration(
    hu: np.ndarray, rod: _Blob, centre: tuple[float, float], pixel_mm: float
) -> tuple[MassCalibration, tuple[int, ...]]:
    """c_HA from the 200 mg HA/cm3 rod and the water rod (see the module docstring, step 5)."""
    radius_px = math.sqrt(rod.area_mm2 / math.pi) / pixel_mm
    inner = max(1.0, radius_px - 2.0 / pixel_mm)
    means = {z: _disc_mean(hu[z], (rod.row, rod.col), inner) for z in range(rod.slices[0], rod.slices[1] + 1)}
    top = max(means.values())
    full = tuple(z for z, m in means.items() if m >= 0.9 * top)
    # the water rod: darkest disc of the rod's size in the rod slab, away from the calcium rod
    mid = full[len(full) // 2]
    smooth = np.asarray(ndimage.uniform_filter(hu[mid].astype(np.float32), size=max(3, round(2 * inner))))
    rr, cc = np.ogrid[: hu.shape[1], : hu.shape[2]]
    reach = math.hypot(rod.row - centre[0], rod.col - centre[1]) + 3.0 * radius_px
    allowed = (np.hypot(rr - centre[0], cc - centre[1]) <= reach) & (
        np.hypot(rr - rod.row, cc - rod.col) >= 2.2 * radius_px
    )
    allowed &= smooth > -200.0  # inside the phantom
    water_rc = np.unravel_index(int(np.argmin(np.where(allowed, smooth, np.inf))), smooth.shape)
    rod_hu = float(np.mean([_disc_mean(hu[z], (rod.row, rod.col), inner) for z in full]))
    water_hu = float(np.mean([_disc_mean(hu[z], (float(water_rc[0]), float(water_rc[1])), inner) for z in full]))
    calibration = MassCalibration.from_inserts(
        rod_hu, water_hu, CALIBRATION_ROD_MG_PER_CM3, description="QRM calibration rods in this scan"
    )
    return calibration, full


def insert_region(
    shape: tuple[int, int, int], layout: PhantomLayout, located: LocatedInsert, slice_mm: float, pixel_mm: float
) -> np.ndarray:
    """The region scored for one insert: a cylinder of its nominal radius plus :data:`ROI_MARGIN_MM`."""
    insert = located.insert
    region = np.zeros(shape, dtype=bool)
    half_length = insert.length_mm / 2.0 + slice_mm
    slices = [z for z in range(shape[0]) if abs(z - layout.slab_centre) * slice_mm <= half_length]
    radius_px = (insert.diameter_mm / 2.0 + ROI_MARGIN_MM) / pixel_mm
    rr, cc = np.ogrid[: shape[1], : shape[2]]
    disc = (rr - located.centre_rc[0]) ** 2 + (cc - located.centre_rc[1]) ** 2 <= radius_px**2
    region[slices] = disc
    return region


def read_authors_figures(csv_path: Path, vendor: str, scan: str) -> dict[tuple[str, str], tuple[float, float]]:
    """The published authors' Agatston and mass per (size, density) for one scan of ``reference_agatston_mass.csv``."""
    figures: dict[tuple[str, str], tuple[float, float]] = {}
    with csv_path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row["vender"] != vendor or row["scan"] != scan:
                continue
            density = row["inserts"].split()[0].lower()
            for size in ("large", "medium", "small"):
                figures[(size, density)] = (
                    float(row[f"calculated_agat_{size}"]),
                    float(row[f"calculated_mass_{size}"]),
                )
    if not figures:
        raise ConfigurationError(
            f"{csv_path.name} has no rows for {vendor} {scan}.", remedy="Name a vendor and scan the file lists."
        )
    return figures


def score_phantom(
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    authors: dict[tuple[str, str], tuple[float, float]] | None = None,
) -> tuple[PhantomLayout, list[InsertScore]]:
    """Locate the inserts and score each with :func:`models.calcium.score_calcium` (the patients' function)."""
    layout = locate_inserts(hu, spacing)
    scores = []
    for located in layout.inserts:
        region = insert_region(hu.shape, layout, located, float(spacing[0]), float(spacing[1]))
        score = score_calcium(hu, region, spacing, calibration=layout.calibration)
        published = (authors or {}).get((located.insert.size, located.insert.density))
        scores.append(
            InsertScore(
                located.insert,
                located.found,
                score,
                published[0] if published else None,
                published[1] if published else None,
            )
        )
    return layout, scores


# ---------------------------------------------------------------------------------------------------------------
# `imaging-cds evaluate ct-heart --dataset <QRM scan folder>`

REFERENCE_CSV = "reference_agatston_mass.csv"
AGATSTON_GOAL = 0.10
"""Agatston within 10 % of the published authors' value for the large and medium inserts (issue 19's goal)."""
CALCIUM_ANALYZERS = ("ct-heart",)


@dataclass(frozen=True)
class PhantomAssessment:
    """The project's calcium scores of every insert beside the known masses and the published authors' figures."""

    analyzer: str
    version: str
    scan: str
    reference_row: str
    calibration: MassCalibration
    rows: tuple[InsertScore, ...]

    def goal_inserts(self) -> list[InsertScore]:
        """The large and medium inserts, on which the goals are set (a 1 mm insert is below CT resolution)."""
        return [r for r in self.rows if r.insert.size in ("large", "medium")]

    def agatston_within_goal(self) -> bool:
        return all(
            r.authors_agatston and abs(r.score.agatston - r.authors_agatston) <= AGATSTON_GOAL * r.authors_agatston
            for r in self.goal_inserts()
        )

    def mass_closer_than_authors(self) -> bool:
        return all(
            r.score.mass_mg is not None
            and r.authors_mass_mg is not None
            and abs(r.score.mass_mg - r.insert.known_mass_mg) < abs(r.authors_mass_mg - r.insert.known_mass_mg)
            for r in self.goal_inserts()
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "analyzer": {"name": self.analyzer, "version": self.version},
            "dataset": {"scan": self.scan, "reference_row": self.reference_row},
            "calibration": {
                "mg_per_cm3_per_hu": round(self.calibration.mg_per_cm3_per_hu, 4),
                "source": self.calibration.source,
            },
            "inserts": [r.as_dict() for r in self.rows],
            "goals": {
                "agatston_within_10_percent_large_medium": self.agatston_within_goal(),
                "mass_closer_than_authors_large_medium": self.mass_closer_than_authors(),
            },
        }


def is_calcium_phantom(path: Path) -> bool:
    """A QRM phantom scan folder: DICOM files with the published reference table beside it (or one level up)."""
    return path.is_dir() and _reference_csv(path) is not None


def _reference_csv(path: Path) -> Path | None:
    for folder in (path, path.parent):
        if (folder / REFERENCE_CSV).is_file():
            return folder / REFERENCE_CSV
    return None


def _reference_row(csv_path: Path, scan: str, model: str) -> str:
    """The reference table's vendor whose name holds every word of the scanner's model name (``Aquilion ONE`` ->
    ``Canon_Aquilion_One_Vision``)."""
    words = [w.lower() for w in model.replace("_", " ").split() if w]
    with csv_path.open(newline="", encoding="utf-8") as handle:
        vendors = sorted({row["vender"] for row in csv.DictReader(handle) if row["scan"] == scan})
    matching = [v for v in vendors if words and all(w in v.lower() for w in words)]
    if len(matching) != 1:
        raise ConfigurationError(
            f"{csv_path.name} has no single row for scan {scan!r} on a scanner named {model!r} (rows for this scan: "
            f"{', '.join(vendors) or 'none'}).",
            remedy="Give the folder of one scan listed in the reference table.",
        )
    return matching[0]


def evaluate_phantom(analyzer_name: str, folder: Path, *, json_out: Path | None = None) -> PhantomAssessment:
    """Score the phantom scan in ``folder`` and compare with the reference table (see the module docstring)."""
    from pydicom import dcmread

    from dicom_io.volume import assemble_volume
    from models.registry import get_analyzer

    if analyzer_name not in CALCIUM_ANALYZERS:
        raise ConfigurationError(
            f"{folder.name} is a calcium phantom scan; it assesses calcium scoring, which {analyzer_name!r} does not "
            "do.",
            remedy=f"Evaluate {', '.join(CALCIUM_ANALYZERS)} on it.",
        )
    analyzer = get_analyzer(analyzer_name)
    csv_path = _reference_csv(folder)
    assert csv_path is not None
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".dcm")
    if not files:
        raise ConfigurationError(f"{folder} holds no .dcm files.", remedy="Give the folder of one phantom scan.")
    volume = assemble_volume(dcmread(p) for p in files)
    model = volume.attributes.get("ManufacturerModelName", "")
    row = _reference_row(csv_path, folder.name, model)
    authors = read_authors_figures(csv_path, row, folder.name)
    layout, scores = score_phantom(volume.array, volume.spacing, authors)
    assessment = PhantomAssessment(analyzer.name, analyzer.version, folder.name, row, layout.calibration, tuple(scores))
    if json_out is not None:
        json_out.write_text(json.dumps(assessment.as_dict(), indent=2) + "\n", encoding="utf-8")
    return assessment


def format_phantom_table(assessment: PhantomAssessment) -> str:
    """The side-by-side table ``imaging-cds evaluate`` prints for a phantom scan."""

    def number(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        f"Calcium scoring of {assessment.analyzer} {assessment.version} on the QRM phantom scan {assessment.scan} "
        f"(reference row {assessment.reference_row})",
        f"Mass calibration: {assessment.calibration.source}.",
        "",
        f"{'Insert':<24}{'known mg':>9}{'project mg':>11}{'authors mg':>11}{'authors AU':>11}{'project AU':>11}",
    ]
    for r in assessment.rows:
        lines.append(
            f"{r.insert.size + ' ' + r.insert.density:<24}{r.insert.known_mass_mg:>9.1f}"
            f"{number(r.score.mass_mg, 2):>11}{number(r.authors_mass_mg, 2):>11}"
            f"{number(r.authors_agatston, 1):>11}{r.score.agatston:>11.1f}"
        )
    lines.append("")
    lines.append(
        "Agatston within 10 % of the authors' for the large and medium inserts: "
        + ("yes" if assessment.agatston_within_goal() else "NO")
    )
    lines.append(
        "Mass closer to the known mass than the authors' Agatston-mass, large and medium inserts: "
        + ("yes" if assessment.mass_closer_than_authors() else "NO")
    )
    return "\n".join(lines)

"""CT emphysema quantification by densitometry: the share of lung below -950 HU (LAA-950).

Emphysema destroys alveolar walls, so emphysematous lung holds more air and less tissue and its CT
attenuation approaches that of air (-1000 HU). The density-mask measure counts lung voxels below -950 HU.

Where the numbers come from (see also ``models/cards/ct-emphysema.json``):

* The -950 HU threshold is *validated* against pathology: Gevenois PA et al., "Comparison of computed
  density and microscopic morphometry in pulmonary emphysema", Am J Respir Crit Care Med 1996;154:187-192
  (1 mm sections), confirmed on multidetector CT by Madani A et al., "Pulmonary emphysema: objective
  quantification at multi-detector row CT - comparison with macroscopic and microscopic morphometry",
  Radiology 2006;238:1036-1043.
* LAA-950 >= 5% as "emphysema present" is a *convention* of large cohorts, chiefly COPDGene (inspiratory
  thin-section CT, standard kernel; protocol in Regan EA et al., COPD 2010;7:32-43), stated e.g. by Amaza IP
  et al., Int J Chron Obstruct Pulmon Dis 2021;16:1231-1242 ("QCT emphysema is defined as >= 5% of lung
  volume occupied by LAA-950"). It is a research cut-off, not a diagnostic criterion; healthy never-smokers
  can exceed it (age, height and lung volume raise LAA-950).
* The mild / moderate / severe bands above 5% (5-<10, 10-<20, >=20 %) are this project's *convention*,
  chosen to roughly track the mean LAA-950 of the Fleischner visual grades in COPDGene (Lynch DA et al.,
  Radiology 2018;288:859-866); they are not a validated clinical grading and the card says so.

Distribution: the lung's cranio-caudal extent (first to last slice holding lung) is split into upper and
lower *halves*; an odd middle slice counts half to each. Upper-zone predominance is the usual pattern of
smoking-related centrilobular emphysema, lower-zone predominance that of panlobular emphysema (e.g.
alpha-1 antitrypsin deficiency); densitometry alone cannot tell the subtypes apart, so the conclusion only
names the distribution and the pattern it is typical of. A zone ratio of at least 1.5 either way is called
predominant (project convention).

Shape: :func:`measure_emphysema` does the work on a HU volume and its spacing and returns an
:class:`EmphysemaMeasurement` (the lung mask of :func:`models.lung.segment_lungs`, LAA-950 %, volumes, zones,
category); other analyzers of the same chest CT call it directly (the Brock nodule model takes "emphysema
present" from it). :class:`EmphysemaAnalyzer` only refuses unsuitable input, calls it and words the result.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from core.errors import UnsuitableInputError
from models import render
from models.base import (
    AnalysisResult,
    Category,
    Explanation,
    ImageInput,
    Measurement,
    SeriesRequirements,
    highest_normal,
)
from models.ct import check_ct_volume, check_hounsfield, slice_thickness_mm
from models.lung import LungMask, segment_lungs

LAA_THRESHOLD_HU = -950.0
EMPHYSEMA_PRESENT_PERCENT = 5.0
NORMAL_HIGH_PERCENT = highest_normal(EMPHYSEMA_PRESENT_PERCENT, 2)
"""Upper limit of normal as filed (two decimals, inclusive): 4.99 %; from 5.00 % the value is high."""
MODERATE_PERCENT = 10.0
SEVERE_PERCENT = 20.0
PREDOMINANCE_RATIO = 1.5

THIN_SECTION_MAX_MM = 1.5
"""Sections the -950 HU threshold was validated on (1 mm; COPDGene reconstructs at 0.625-0.9 mm)."""
MAX_SLICE_THICKNESS_MM = 10.0
MIN_LUNG_ML = 300.0
LOW_INSPIRATION_ML = 3000.0

_RULE_PRESENT = (
    "LAA-950 >= 5% of lung volume = emphysema present: cohort convention (COPDGene; Regan EA et al., COPD "
    "2010;7:32-43; as stated in Amaza IP et al., Int J Chron Obstruct Pulmon Dis 2021;16:1231-1242); -950 HU "
    "threshold validated against pathology by Gevenois PA et al., Am J Respir Crit Care Med 1996;154:187-192 "
    "and Madani A et al., Radiology 2006;238:1036-1043."
)
_RULE_BANDS = (
    " Severity bands mild 5-<10%, moderate 10-<20%, severe >=20% are a project convention (not a validated "
    "clinical grading), set to track the LAA-950 of the Fleischner visual grades in COPDGene (Lynch DA et al., "
    "Radiology 2018;288:859-866)."
)
_SHARP_KERNEL = re.compile(r"LUNG|BONE|SHARP|DETAIL|EDGE|^[BI][5-9]\d|^FC5\d|^YC|^YD|^L$", re.IGNORECASE)


@dataclass(frozen=True)
class EmphysemaMeasurement:
    """LAA-950 densitometry of one chest CT volume.

    The percentages are kept to 0.01 percentage points, the precision the report files them at, so that the
    category, the interpretations, the sentence and any other analyzer that reads them (the Brock nodule
    model's "emphysema present") all follow the one value the EHR holds. Volumes are unrounded.
    """

    lungs: LungMask
    """The lung mask the shares are taken over (:func:`models.lung.segment_lungs`)."""
    lung_volume_ml: float
    low_attenuation_volume_ml: float
    """Lung below -950 HU, in mL."""
    laa950_percent: float
    upper_zone_percent: float
    """LAA-950 % in the upper half of the lung's cranio-caudal extent (see :func:`zone_percentages`)."""
    lower_zone_percent: float
    lung_voxels_per_slice: np.ndarray
    """Lung voxels on each slice of the volume (index 0 = inferior), int64."""
    low_attenuation_voxels_per_slice: np.ndarray
    """Lung voxels below -950 HU on each slice, int64."""

    @property
    def category(self) -> Category:
        """none / mild / moderate / severe, with the cited rule (:func:`categorize`)."""
        return categorize(self.laa950_percent)

    @property
    def emphysema_present(self) -> bool:
        """LAA-950 >= 5 %: the COPDGene cohort convention for emphysema on CT (a research cut-off)."""
        return self.laa950_percent >= EMPHYSEMA_PRESENT_PERCENT

    @property
    def upper_lower_zone_ratio(self) -> float | None:
        """Upper / lower zone LAA-950; None when the lower half has none (the ratio is then undefined)."""
        return self.upper_zone_percent / self.lower_zone_percent if self.lower_zone_percent > 0.0 else None

    @property
    def distribution(self) -> str:
        """Plain words for the cranio-caudal distribution (:func:`distribution`)."""
        return distribution(self.upper_zone_percent, self.lower_zone_percent)


def measure_emphysema(hu: np.ndarray, spacing: Sequence[float]) -> EmphysemaMeasurement:
    """LAA-950 of the lungs of ``hu`` (slices, rows, columns; inferior to superior, in HU), ``spacing`` in mm.

    The lungs come from :func:`models.lung.segment_lungs`, which keeps its mask for the life of ``hu``: an
    analyzer that already segmented this volume pays only for the counting here (tens of milliseconds).

    Raises :class:`core.errors.UnsuitableInputError` when less than 300 mL of aerated lung is in view: a share
    of so little lung describes the field of view, not the patient.
    """
    lungs = segment_lungs(hu, spacing)
    lung_voxels = lungs.voxel_count
    voxel_ml = float(np.prod(spacing)) / 1000.0
    lung_ml = lung_voxels * voxel_ml
    if lung_ml < MIN_LUNG_ML:
        raise _too_little_lung(lung_ml)
    box = lungs.box  # everything outside the lungs' bounding box is zero in both counts
    mask = lungs.mask[box]
    low = hu[box] < LAA_THRESHOLD_HU
    low &= mask
    lung_per_slice = np.zeros(hu.shape[0], dtype=np.int64)
    low_per_slice = np.zeros(hu.shape[0], dtype=np.int64)
    lung_per_slice[box[0]] = _count_per_slice(mask)
    low_per_slice[box[0]] = _count_per_slice(low)
    del low

    low_voxels = float(low_per_slice.sum())
    upper, lower = zone_percentages(lung_per_slice, low_per_slice)
    return EmphysemaMeasurement(
        lungs=lungs,
        lung_volume_ml=lung_ml,
        low_attenuation_volume_ml=low_voxels * voxel_ml,
        laa950_percent=round(100.0 * low_voxels / lung_voxels, 2),
        upper_zone_percent=round(upper, 2),
        lower_zone_percent=round(lower, 2),
        lung_voxels_per_slice=lung_per_slice,
        low_attenuation_voxels_per_slice=low_per_slice,
    )


def zone_percentages(lung_per_slice: np.ndarray, low_per_slice: np.ndarray) -> tuple[float, float]:
    """LAA-950 % in the upper and lower halves of the lung's cranio-caudal extent (index 0 = inferior).

    An odd middle slice counts half to each zone, so the halves are exact.
    """
    hits = np.flatnonzero(lung_per_slice)
    if hits.size == 0:
        return 0.0, 0.0
    first, last = int(hits[0]), int(hits[-1])
    n = last - first + 1
    weight_upper = np.zeros(lung_per_slice.shape, dtype=np.float64)
    weight_upper[first + (n + 1) // 2 : last + 1] = 1.0
    if n % 2 == 1:
        weight_upper[first + n // 2] = 0.5
    weight_lower = np.zeros_like(weight_upper)
    weight_lower[first : last + 1] = 1.0 - weight_upper[first : last + 1]
    shares = []
    for weight in (weight_upper, weight_lower):
        lung = float((weight * lung_per_slice).sum())
        shares.append(100.0 * float((weight * low_per_slice).sum()) / lung if lung > 0 else 0.0)
    return shares[0], shares[1]


def categorize(laa950_percent: float) -> Category:
    """Map LAA-950 % to none / mild / moderate / severe with the cited rule."""
    if laa950_percent < EMPHYSEMA_PRESENT_PERCENT:
        return Category("none", "No emphysema by CT densitometry (LAA-950 < 5%)", _RULE_PRESENT, abnormal=False)
    if laa950_percent < MODERATE_PERCENT:
        code, display = "mild", "Mild emphysema by CT densitometry (LAA-950 5 to <10%)"
    elif laa950_percent < SEVERE_PERCENT:
        code, display = "moderate", "Moderate emphysema by CT densitometry (LAA-950 10 to <20%)"
    else:
        code, display = "severe", "Severe emphysema by CT densitometry (LAA-950 >= 20%)"
    return Category(code, display, _RULE_PRESENT + _RULE_BANDS, abnormal=True)


def distribution(upper: float, lower: float) -> str:
    """Plain words for the cranio-caudal distribution of low-attenuation lung."""
    if upper >= PREDOMINANCE_RATIO * lower and upper > 0:
        return "upper-zone predominant, the distribution typical of smoking-related centrilobular emphysema"
    if lower >= PREDOMINANCE_RATIO * upper and lower > 0:
        return (
            "lower-zone predominant, the distribution typical of panlobular emphysema "
            "(e.g. alpha-1 antitrypsin deficiency)"
        )
    return "evenly distributed between the upper and lower zones"


def conclusion(laa: float, lung_ml: float, upper: float, lower: float, category: Category) -> str:
    """One plain-language sentence with the numbers as filed in the Observations (two decimals at most)."""
    head = f"Lung below -950 HU makes up {laa:g}% of the {lung_ml / 1000:.2f} L of lung measured"
    if not category.abnormal:
        return f"{head}, under the 5% cut-off for emphysema: no emphysema by CT densitometry."
    return (
        f"{head}: {category.code} emphysema by CT densitometry, {distribution(upper, lower)} "
        f"(upper half {upper:g}%, lower half {lower:g}%)."
    )


class EmphysemaAnalyzer:
    """LAA-950 densitometry of inspiratory chest CT; see the module docstring for the published basis."""

    name = "ct-emphysema"
    version = "1.0.2"
    title = "CT emphysema quantification (LAA-950 densitometry)"
    requirements = SeriesRequirements(
        modalities=("CT",),
        min_instances=20,
        body_parts=("CHEST", "THORAX", "LUNG"),
        description_keywords=("chest", "thorax", "lung"),
        excluded_description_keywords=("scout", "localizer", "topogram"),
    )

    def check_input(self, image: ImageInput) -> None:
        """Refuse what LAA-950 cannot be measured on: not CT, not a volume, not in HU, thick slices, no lungs."""
        check_ct_volume(
            image,
            self.name,
            measures="measures attenuation",
            min_slices=self.requirements.min_instances,
            covers="the lungs",
        )
        thickness = slice_thickness_mm(image)
        if thickness > MAX_SLICE_THICKNESS_MM:
            raise UnsuitableInputError(
                f"Slices are {thickness:g} mm thick; partial-volume averaging at over {MAX_SLICE_THICKNESS_MM:g} mm "
                "hides low-attenuation lung, so LAA-950 would be meaningless.",
                remedy="Use a thin-section (<= 1.5 mm) reconstruction of the chest CT.",
            )
        check_hounsfield(image.array, self.name)
        # The mask is kept for this array, so analyze (and any other analyzer of it) does not segment again.
        lung_ml = segment_lungs(image.array, image.spacing).voxel_count * image.voxel_volume_ml
        if lung_ml < MIN_LUNG_ML:
            raise _too_little_lung(lung_ml)

    def analyze(self, image: ImageInput) -> AnalysisResult:
        """Measure LAA-950 over the segmented lungs and by zone; render the low-attenuation overlay."""
        measured = measure_emphysema(image.array, image.spacing)
        # The values as filed (two decimals) decide the category, the interpretations and the sentence, so the
        # report never files 5.0 % marked normal under "LAA-950 < 5%", nor says 0.2 % next to 0.25 %.
        laa, upper, lower = measured.laa950_percent, measured.upper_zone_percent, measured.lower_zone_percent
        measurements = [
            Measurement(
                "laa950_percent",
                "Lung volume below -950 HU (LAA-950)",
                laa,
                "%",
                interpretation="H" if laa >= EMPHYSEMA_PRESENT_PERCENT else "N",
                reference_high=NORMAL_HIGH_PERCENT,
                note="Share of segmented lung voxels below -950 HU; high from 5 % (the COPDGene convention), so the "
                "normal range ends at 4.99 %.",
            ),
            Measurement("lung_volume_ml", "Segmented lung volume", round(measured.lung_volume_ml, 1), "mL"),
            Measurement(
                "low_attenuation_volume_ml",
                "Lung volume below -950 HU",
                round(measured.low_attenuation_volume_ml, 1),
                "mL",
            ),
            Measurement(
                "laa950_upper_zone_percent",
                "LAA-950 in the upper half of the lungs",
                upper,
                "%",
                interpretation="H" if upper >= EMPHYSEMA_PRESENT_PERCENT else "N",
                reference_high=NORMAL_HIGH_PERCENT,
            ),
            Measurement(
                "laa950_lower_zone_percent",
                "LAA-950 in the lower half of the lungs",
                lower,
                "%",
                interpretation="H" if lower >= EMPHYSEMA_PRESENT_PERCENT else "N",
                reference_high=NORMAL_HIGH_PERCENT,
            ),
        ]
        ratio = measured.upper_lower_zone_ratio
        if ratio is not None:
            measurements.append(
                Measurement(
                    "upper_lower_zone_ratio",
                    "Upper / lower zone LAA-950 ratio",
                    round(ratio, 2),
                    "1",
                    note="Above 1: more low-attenuation lung in the upper half. Omitted when the lower half has none.",
                )
            )
        category = measured.category
        return AnalysisResult(
            analyzer=self.name,
            version=self.version,
            measurements=tuple(measurements),
            category=category,
            conclusion=conclusion(laa, measured.lung_volume_ml, upper, lower, category),
            explanations=tuple(_explanations(image.array, measured)),
            warnings=tuple(_warnings(image, measured)),
        )


def _count_per_slice(mask: np.ndarray) -> np.ndarray:
    """True voxels of each slice. count_nonzero is a fast popcount without ``axis``, a 5x slower sum with it."""
    return np.fromiter((np.count_nonzero(plane) for plane in mask), dtype=np.int64, count=mask.shape[0])


def _too_little_lung(lung_ml: float) -> UnsuitableInputError:
    return UnsuitableInputError(
        f"Only {lung_ml:.0f} mL of aerated lung was found in this CT (at least {MIN_LUNG_ML:.0f} mL needed); "
        "the lungs are not in the field of view.",
        remedy="Choose a chest CT series that covers the lungs.",
    )


def _warnings(image: ImageInput, measured: EmphysemaMeasurement) -> list[str]:
    """Acquisition conditions known to bias LAA-950, stated so that a reader can weigh the number."""
    lung_per_slice, lung_ml = measured.lung_voxels_per_slice, measured.lung_volume_ml
    out: list[str] = []
    thickness = slice_thickness_mm(image)
    if thickness > THIN_SECTION_MAX_MM:
        out.append(
            f"Slices are {thickness:g} mm thick; LAA-950 was validated on thin sections (about 1 mm). Thick slices "
            "average emphysematous spaces with surrounding tissue and underestimate LAA-950."
        )
    kernel = image.attributes.get("ConvolutionKernel", "").strip()
    if not kernel:
        out.append(
            "Reconstruction kernel not stated; a sharp (lung or bone) kernel adds noise and overestimates LAA-950, "
            "which was defined on a smooth or standard kernel."
        )
    elif _SHARP_KERNEL.search(kernel):
        out.append(
            f"Reconstruction kernel {kernel!r} looks sharp; its noise overestimates LAA-950, which was defined on "
            "a smooth or standard kernel."
        )
    if image.attributes.get("ContrastBolusAgent", "").strip():
        out.append("Contrast-enhanced CT: iodine raises lung attenuation and can lower LAA-950 slightly.")
    peak = float(lung_per_slice.max()) if lung_per_slice.size else 0.0
    truncated = [
        where
        for where, count in (("base", lung_per_slice[0]), ("apex", lung_per_slice[-1]))
        if peak > 0 and count > 0.05 * peak
    ]
    if truncated:
        verb = "extend" if len(truncated) > 1 else "extends"
        out.append(
            f"The lung {' and '.join(truncated)} {verb} beyond the scanned range; volumes and percentages describe "
            "only the lung in the field of view."
        )
    elif lung_ml < LOW_INSPIRATION_ML:
        out.append(
            f"Whole-lung volume is {lung_ml / 1000:.2f} L; a volume this low suggests the scan may not be at full "
            "inspiration, which raises lung density and underestimates LAA-950."
        )
    if not measured.lungs.split:
        out.append("The two lungs touch and could not be separated; totals are unaffected.")
    return out


def _explanations(hu: np.ndarray, measured: EmphysemaMeasurement) -> list[Explanation]:
    """One overlay per zone (upper, middle, lower third): the slice with most lung in that third."""
    lungs = measured.lungs
    lung_per_slice, low_per_slice = measured.lung_voxels_per_slice, measured.low_attenuation_voxels_per_slice
    extent = lungs.slice_extent()
    if extent is None:
        return []
    first, last = extent
    bounds = np.linspace(first, last + 1, 4).round().astype(int)
    level, width = render.LUNG_WINDOW
    # Crop to the lungs with a margin: the chest wall stays in view and the PNGs are half the size.
    margin = 24
    rows = slice(max(lungs.box[1].start - margin, 0), min(lungs.box[1].stop + margin, hu.shape[1]))
    cols = slice(max(lungs.box[2].start - margin, 0), min(lungs.box[2].stop + margin, hu.shape[2]))
    zones: list[tuple[str, int, np.ndarray]] = []
    for name, (lo, hi) in zip(("Lower", "Middle", "Upper"), itertools.pairwise(bounds), strict=True):
        if hi <= lo:
            continue
        z = int(lo + np.argmax(lung_per_slice[lo:hi]))
        image = hu[z, rows, cols]
        mask = lungs.mask[z, rows, cols]
        rgb = render.overlay_mask(render.window(image, level, width), mask & (image < LAA_THRESHOLD_HU), render.YELLOW)
        rgb = render.outline(rgb, mask, render.CYAN)
        share = 100.0 * low_per_slice[z] / lung_per_slice[z] if lung_per_slice[z] else 0.0
        text = (
            f"{name} zone, slice {z + 1} of {hu.shape[0]} from the feet: {share:.1f}% of lung below -950 HU\n"
            "Hatched yellow = lung below -950 HU\n"
            "Cyan line = lung boundary; lung window W1500/L-600"
        )
        zones.append((name, z, render.label(rgb, text, font_size=12)))
    pngs = render.to_pngs([image for _, _, image in zones])
    out = [
        Explanation(title=f"Low-attenuation lung, {name.lower()} zone", kind="overlay", png=png, slice_index=z)
        for (name, z, _), png in zip(zones, pngs, strict=True)
    ]
    return list(reversed(out))  # upper, middle, lower: the order a reader scrolls a chest CT

"""``ct-lung-nodules``: find lung nodules on chest CT, measure them as the guidelines do, and categorise them.

The steps (each in its own module, each pure: a volume and its spacing in, findings out):

1. lungs: :func:`models.lung.segment_lungs` (the same mask the emphysema analyzer uses);
2. candidates: :func:`models.nodules.detect.find_candidates` (classical cues, tuned for sensitivity);
3. false-positive reduction: the trained 3-D network (:mod:`models.nodules.network`);
4. segmentation and measurement: :mod:`models.nodules.measure` (long/short axis, mean diameter, volume, type,
   solid component, calcification); what is not shaped like a nodule (a vessel or airway wall running on beyond
   it, a disc cut from a diaphragm dome by a thick slice, a structure outside the lung) is not reported
   (:data:`SHAPE_LIMITS`);
5. categories: :mod:`models.nodules.guidelines` (Lung-RADS v2022, Fleischner 2017, Brock), the radiologists'
   suspicion model, LAA-950 from :mod:`models.emphysema` on the same lungs for the Brock model's emphysema input;
6. explanations: per nodule an axial crop with its outline and both diameters drawn, a coronal maximum-intensity
   projection of the lungs with the nodules numbered, and a nodule table.

Juxtapleural and juxtavascular nodules: see :mod:`models.nodules.detect` (how they are found) and
:mod:`models.nodules.measure` (how they are cut from the chest wall and from their vessels).
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import astuple, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from core.errors import UnsuitableInputError
from models import render
from models.base import (
    AnalysisResult,
    Category,
    CodedValue,
    Explanation,
    Finding,
    ImageInput,
    Measurement,
    SeriesRequirements,
    probability_percent,
)
from models.ct import check_ct_volume, check_hounsfield, slice_thickness_mm
from models.emphysema import EmphysemaMeasurement, measure_emphysema
from models.lesion_followup import Box
from models.lung import LABEL_LEFT, LABEL_RIGHT, LungMask, segment_lungs
from models.nodules import guidelines
from models.nodules.detect import find_candidates
from models.nodules.measure import NoduleMeasures, NoduleSegmentation, measure_nodule, segment_nodule
from models.nodules.network import (
    NoduleModels,
    candidate_features,
    load_nodule_models,
    suspicion_features,
)
from models.projection_classifier import WEIGHTS_DIR

MIN_REPORTED_MM = 4.0
"""Nodules under 4 mm mean diameter are not reported: this analyzer's floor, not a guideline's. Lung-RADS v2022 sets
no size below which a nodule is ignored; a solid nodule under 6 mm at baseline is category 2 (annual screening, no
extra imaging), and 4 mm separates only new solid nodules (under 4 mm category 2, 4 to under 6 mm category 3).
Fleischner 2017 recommends no routine follow-up for a solid nodule under 6 mm in a low-risk patient (optional CT at
12 months if high risk). Under 4 mm detection is unreliable, and neither guideline manages a baseline nodule there
differently from one of 4 to 6 mm."""
MAX_REPORTED = 10
"""At most this many nodules are listed: the ten the network is most sure of, then ordered most suspicious first
(Lung-RADS category, then size)."""
THIN_SLICE_MM = 2.5
"""Lung-RADS asks for reconstructions of 2.5 mm or thinner (ideally 1 mm); the LIDC validation crops are 1-2.5 mm."""
MAX_SLICE_THICKNESS_MM = 10.0
MIN_LUNG_ML = 300.0
MIN_SLICES = 20


@dataclass(frozen=True)
class ShapeLimits:
    """What a reported nodule must show of a nodule's shape at one slice thickness (see :data:`SHAPE_LIMITS`)."""

    compact_share: float
    """Least share of its structure within twice its radius (:attr:`NoduleSegmentation.compact_share`)."""
    height_ratio: float
    """Least craniocaudal extent over long axis (:attr:`NoduleMeasures.craniocaudal_mm`)."""
    axis_ratio: float
    """Least short axis over long axis, on the axial slice where it is measured (:attr:`NoduleMeasures.diameters`)."""
    surface_lung_share: float
    """Least share of its surroundings in aerated lung (:attr:`NoduleSegmentation.surface_lung_share`)."""
    surface_wall_share: float
    """Largest share of its surroundings beyond the lung's outline (:attr:`NoduleSegmentation.surface_wall_share`)."""


SHAPE_LIMITS = {
    THIN_SLICE_MM: ShapeLimits(0.114, 0.337, 0.495, 0.29, 0.281),
    5.0: ShapeLimits(0.811, 0.379, 0.48, 0.281, 0.358),
}
"""Slice thickness (mm) -> what 99 % of the LIDC training and validation nodules show of a nodule's shape there.

A nodule is a compact, roughly round lesion lying in the lung. Four kinds of things the network accepts are not:

* **Structures that run on** beyond the nodule-sized piece the candidate sits on: vessels, junctions of hilar
  vessels, airway walls. A nodule ends: most of the structure its segmentation belongs to lies within twice its
  inscribed radius (``compact_share``).
* **Discs**: a round haze far wider than it is tall, the top of a diaphragm dome cut tangentially by a thick slice.
  A nodule is about as tall as it is wide (``height_ratio``).
* **Tubes cut lengthwise**: a vessel running within the slice, seen along its length, is long and narrow; a nodule's
  short axis is about half its long axis or more (``axis_ratio``).
* **Structures outside the lung** that the search reached: the aorta, the superior vena cava, the oesophagus, bone
  at the apex. A nodule lies in the lung: a good share of the voxels around it are aerated lung
  (``surface_lung_share``), and a juxtapleural one touches the chest wall or mediastinum over only a part of its
  surface (``surface_wall_share``).

Each limit is the 1st percentile of the LIDC training and validation nodules (the 99th for the wall share),
segmented from their consensus centre, as acquired (1-2.5 mm) and thickened to 5 mm
(:func:`models.training.assess_nodules.shape_limits` recomputes them; the card records them; the test patients then
measure what the rules cost). The crops end at each nodule's first and last slice, so their heights are if anything
short and the height limits err towards keeping nodules. On thin slices an attached vessel stays connected to many
nodules, so the compactness limit there excludes little; on 5 mm slices small vessels blur away and a nodule is
compact, while hilar vessels are not. Between 2.5 and 5 mm the limits are interpolated; beyond them they are those
of the nearer thickness."""


MASS_MM = 30.0
"""Over 30 mm a lung lesion is a mass rather than a nodule (Fleischner Society glossary, Hansell DM et al.,
Radiology 2008;246:697-722); the rules below are still applied to it and the text says "mass"."""

SENSITIVITY_LIMITS = (
    "Nodules under 4 mm are not reported; the detector was validated on LIDC nodules of 3 mm and more on 1-2.5 mm "
    "slices, and thick slices (over 2.5 mm) hide small and ground-glass nodules; nodules broadly attached to the "
    "mediastinum or diaphragm, and airway (endobronchial) nodules, can be missed."
)


@dataclass(frozen=True)
class DetectedNodule:
    """One reported nodule: its voxels, measures and categories (numbered from the most suspicious)."""

    number: int
    segmentation: NoduleSegmentation
    measures: NoduleMeasures
    nodule_probability: float
    lung_rads: guidelines.Assessment
    suspicion: float
    side: str
    zone: str


class LungNoduleAnalyzer:
    """Lung nodules on chest CT; see the module docstring for the method and its published rules."""

    name = "ct-lung-nodules"
    version = "1.2.0"
    title = "CT lung nodules: detection, measurement, Lung-RADS and Fleischner categories"
    uses_patient_context = True
    requirements = SeriesRequirements(
        modalities=("CT",),
        min_instances=MIN_SLICES,
        body_parts=("CHEST", "THORAX", "LUNG"),
        description_keywords=("chest", "thorax", "lung"),
        excluded_description_keywords=("scout", "localizer", "topogram"),
    )

    def __init__(self, weights: Path | None = None, expected_sha256: str | None = None) -> None:
        self.weights = weights or WEIGHTS_DIR / "lung_nodules.pt"
        self._models: NoduleModels = load_nodule_models(self.weights, expected_sha256)
        self.model_sha256 = self._models.sha256

    @property
    def models(self) -> NoduleModels:
        return self._models

    def held_out(self, scan: str) -> LungNoduleAnalyzer:
        """The same analyzer with the false-positive network that never saw ``scan`` (for validation only)."""
        other = copy.copy(self)
        other._models = self._models.held_out(scan)
        return other

    def check_input(self, image: ImageInput) -> None:
        """Refuse what the analyzer was not built for, with the reason: not CT, not a volume, no lungs in view."""
        check_ct_volume(
            image,
            self.name,
            measures="finds lung nodules",
            min_slices=MIN_SLICES,
            covers="the lungs",
            remedy="Choose an axial chest CT series of the study.",
        )
        thickness = slice_thickness_mm(image)
        if thickness > MAX_SLICE_THICKNESS_MM:
            raise UnsuitableInputError(
                f"Slices are {thickness:g} mm thick; nodules smaller than the slice thickness cannot be measured.",
                remedy="Use a thin-section (<= 2.5 mm, ideally 1 mm) reconstruction of the chest CT.",
            )
        check_hounsfield(image.array, self.name)
        lungs = segment_lungs(image.array, image.spacing)
        lung_ml = lungs.voxel_count * image.voxel_volume_ml
        if lung_ml < MIN_LUNG_ML:
            raise UnsuitableInputError(
                f"Only {lung_ml:.0f} mL of aerated lung was found in this CT (at least {MIN_LUNG_ML:.0f} mL needed): "
                "the lungs are not in the field of view, so lung nodules cannot be looked for (a head or abdominal "
                "CT?).",
                remedy="Choose a chest CT series that covers the lungs.",
            )

    def analyze(self, image: ImageInput) -> AnalysisResult:
        hu = image.array
        spacing = (float(image.spacing[0]), float(image.spacing[1]), float(image.spacing[2]))
        lungs = segment_lungs(hu, spacing)
        if lungs.voxel_count * image.voxel_volume_ml < MIN_LUNG_ML:
            self.check_input(image)  # raises the explanatory error
        # LAA-950 (the Brock model's emphysema input) over the same lung mask, as ct-emphysema files it.
        densitometry = measure_emphysema(hu, spacing)
        nodules = self._find_nodules(hu, spacing, lungs)
        extent = lungs.slice_extent()
        fully_scanned = _lungs_fully_scanned(densitometry.lung_voxels_per_slice)

        facts = [_facts(n.measures) for n in nodules]
        exam = guidelines.exam_lung_rads([n.lung_rads.code for n in nodules], lungs_fully_scanned=fully_scanned)
        fleischner = guidelines.fleischner(facts, age_years=image.patient.age_years)
        explanations, nodule_images = _explanations(hu, spacing, lungs, nodules)
        findings = tuple(
            self._finding(n, image, densitometry, len(nodules), nodule_images.get(n.number, ())) for n in nodules
        )
        warnings = _warnings(image, lungs, nodules, fully_scanned, extent)
        abnormal = exam.code in ("3", "4A", "4B")
        category = Category(f"lung-rads-{exam.code}", exam.display, exam.rule, abnormal=abnormal)
        assessments = (
            CodedValue("lung_rads", "Lung-RADS v2022 category (exam)", exam.code, exam.display, exam.rule),
            CodedValue(
                "fleischner_2017",
                "Fleischner 2017 recommendation (incidental nodules)",
                _slug(fleischner.basis),
                fleischner.for_risk(None),
                fleischner.basis,
            ),
        )
        return AnalysisResult(
            analyzer=self.name,
            version=self.version,
            measurements=(
                Measurement(
                    "lung_nodule_count",
                    f"Lung nodules of {MIN_REPORTED_MM:g} mm or more",
                    float(len(nodules)),
                    "1",
                    note=SENSITIVITY_LIMITS,
                ),
            ),
            category=category,
            conclusion=_conclusion(nodules, exam, fleischner),
            explanations=tuple(explanations),
            warnings=tuple(warnings),
            assessments=assessments,
            findings=findings,
            lungs_mm=_lungs_box(image, lungs),
        )

    def find_nodules(self, image: ImageInput, limit: int | None = MAX_REPORTED) -> list[DetectedNodule]:
        """The nodules :meth:`analyze` reports, with their voxels (for validation against labelled scans).

        ``limit=None`` lifts the cap of :data:`MAX_REPORTED`, to count every nodule the detector accepts.
        """
        spacing = (float(image.spacing[0]), float(image.spacing[1]), float(image.spacing[2]))
        return self._find_nodules(image.array, spacing, segment_lungs(image.array, image.spacing), limit)

    # -----------------------------------------------------------------------------------------------------------

    def _find_nodules(
        self, hu: np.ndarray, spacing: tuple[float, float, float], lungs: LungMask, limit: int | None = MAX_REPORTED
    ) -> list[DetectedNodule]:
        candidates = find_candidates(hu, spacing, lungs.labels, lungs.box)
        radii = [c.radius_mm for c in candidates]
        features = candidate_features(
            radii, [c.lung_surround for c in candidates], [c.dense_surround for c in candidates]
        )
        probability = self._models.candidate_probabilities(hu, spacing, [c.centre for c in candidates], radii, features)
        order = np.argsort(-probability, kind="stable")
        limits = shape_limits_at(spacing[0])
        found: list[tuple[NoduleSegmentation, NoduleMeasures, float]] = []
        for index in order:
            if probability[index] < self._models.candidate_threshold or len(found) == limit:
                break
            candidate = candidates[int(index)]
            taken = [item[0] for item in found]
            if _covered(taken, candidate.centre):
                continue
            nodule = segment_nodule(hu, spacing, candidate.centre, lung=lungs.mask, radius_mm=candidate.radius_mm)
            if nodule is None or not is_nodule_like(nodule, limits):
                continue  # nothing denser than lung there, or a vessel, airway wall or mediastinum
            if _overlap(taken, nodule) > 0.3 * np.count_nonzero(nodule.mask):
                continue  # the same nodule seen from another candidate
            measures = measure_nodule(hu, spacing, nodule, self._models.type_rule)
            if measures.mean_diameter_mm < MIN_REPORTED_MM or not has_nodule_proportions(measures, limits):
                continue
            found.append((nodule, measures, float(probability[index])))
        ranked = sorted(
            found,
            key=lambda item: (
                -guidelines.LUNG_RADS_ORDER.index(guidelines.lung_rads(_facts(item[1])).code),
                -item[1].mean_diameter_mm,
            ),
        )
        extent = lungs.slice_extent() or (0, hu.shape[0] - 1)
        out = []
        for number, (nodule, measures, p) in enumerate(ranked, start=1):
            side, zone = _location(lungs, measures.centroid, extent)
            out.append(
                DetectedNodule(
                    number=number,
                    segmentation=nodule,
                    measures=measures,
                    nodule_probability=p,
                    lung_rads=guidelines.lung_rads(_facts(measures)),
                    suspicion=float(self._models.suspicion.probability(suspicion_features(measures))[0]),
                    side=side,
                    zone=zone,
                )
            )
        return out

    def _finding(
        self,
        nodule: DetectedNodule,
        image: ImageInput,
        densitometry: EmphysemaMeasurement,
        count: int,
        images: tuple[int, ...],
    ) -> Finding:
        m = nodule.measures
        d = m.diameters
        facts = _facts(m)
        estimate = guidelines.brock(
            facts,
            age_years=image.patient.age_years,
            sex=image.patient.sex,
            emphysema=densitometry.emphysema_present,
            nodule_count=count,
        )
        measurements = [
            Measurement("nodule_long_axis_mm", "Long axis (axial)", round(d.long_mm, 1), "mm"),
            Measurement("nodule_short_axis_mm", "Short axis (axial, perpendicular)", round(d.short_mm, 1), "mm"),
            Measurement(
                "nodule_mean_diameter_mm",
                "Mean diameter (Lung-RADS)",
                d.mean_mm,
                "mm",
                note="Average of long and short axis on the axial slice where the long axis is longest, to 0.1 mm.",
            ),
            Measurement("nodule_volume_mm3", "Volume (3-D segmentation)", m.volume_mm3, "mm3"),
            Measurement("nodule_mean_attenuation_hu", "Mean attenuation", m.mean_hu, "[hnsf'U]"),
        ]
        if m.solid is not None:
            measurements.append(
                Measurement(
                    "nodule_solid_component_mean_diameter_mm",
                    "Solid component mean diameter (-130 HU)",
                    m.solid.mean_mm,
                    "mm",
                )
            )
        measurements.append(
            Measurement(
                "nodule_radiologist_suspicion_percent",
                "Radiologists' suspicion model (LIDC ratings)",
                probability_percent(nodule.suspicion),
                "%",
                interpretation="H" if nodule.suspicion >= self._models.suspicion_threshold else "N",
                note="Agreement with what LIDC radiologists rated as suspicious (ratings 4-5 against 1-2); not a "
                "pathology-proven probability of cancer.",
            )
        )
        brock_note = _brock_note(estimate, densitometry.laa950_percent)
        if estimate.computed and estimate.low is not None and estimate.high is not None:
            measurements.append(
                Measurement(
                    "brock_probability_low_percent",
                    "Brock probability of cancer, lowest over unknown inputs",
                    probability_percent(estimate.low),
                    "%",
                    note=brock_note,
                )
            )
            measurements.append(
                Measurement(
                    "brock_probability_high_percent",
                    "Brock probability of cancer, highest over unknown inputs",
                    probability_percent(estimate.high),
                    "%",
                    note=brock_note,
                )
            )
        attachment = (
            "juxtapleural"
            if nodule.segmentation.pleural_contact
            else "juxtavascular"
            if nodule.segmentation.vessels_detached
            else "isolated"
        )
        values = [
            CodedValue(
                "lung_rads",
                "Lung-RADS v2022 category",
                nodule.lung_rads.code,
                nodule.lung_rads.display,
                nodule.lung_rads.rule,
            ),
            CodedValue("nodule_type", "Nodule type", m.nodule_type, m.nodule_type.replace("-", " ").capitalize()),
            CodedValue(
                "calcification",
                "Calcification",
                m.calcification,
                _CALCIFICATION_WORDS[m.calcification],
                "benign pattern (Lung-RADS category 1)" if m.benign_calcification else "",
            ),
            CodedValue("attachment", "Attachment", attachment, _ATTACHMENT_WORDS[attachment]),
            CodedValue("lung_zone", "Zone", nodule.zone, f"{nodule.zone.capitalize()} zone"),
        ]
        if not estimate.computed:
            values.append(CodedValue("brock", "Brock probability", "not-computed", brock_note))
        position = image.patient_position(m.centroid)
        where = (
            f"{nodule.side} lung, {nodule.zone} zone; slice {d.slice_index + 1} of {image.array.shape[0]} "
            "(from the feet)"
        )
        if position is not None:
            where += f"; patient position x {position[0]:.1f}, y {position[1]:.1f}, z {position[2]:.1f} mm (DICOM LPS)"
        notes = []
        if attachment == "juxtapleural" and m.nodule_type == "solid" and d.mean_mm < 10.0:
            notes.append(
                "Juxtapleural solid nodule under 10 mm: Lung-RADS v2022 category 2 applies if its margins are smooth "
                "and its shape oval, lentiform or triangular (a reader's judgement); the category above does not "
                "assume it."
            )
        if nodule.segmentation.uncertain:
            notes.append("The outline reached into a neighbouring structure and was cut back; check the measurement.")
        size_word = "mass" if d.mean_mm > MASS_MM else "nodule"
        return Finding(
            key=f"nodule-{nodule.number}",
            kind="lung_nodule",
            display=(
                f"Nodule {nodule.number}: {m.nodule_type} {size_word}, {d.mean_mm:g} mm mean diameter, "
                f"{nodule.side} lung {nodule.zone} zone, {nodule.lung_rads.display}"
            ),
            measurements=tuple(measurements),
            values=tuple(values),
            location=where,
            body_site=_SIDE_SITES.get(nodule.side),
            explanations=images,
            note=" ".join(notes),
            centre_mm=None if position is None else (position[0], position[1], position[2]),
        )


_CALCIFICATION_WORDS = {
    "none": "No calcification",
    "diffuse": "Diffuse (complete) calcification",
    "central": "Central calcification",
    "popcorn": "Popcorn calcification",
    "non-benign": "Calcification in a pattern that is not benign (eccentric or stippled)",
}
_ATTACHMENT_WORDS = {
    "juxtapleural": "Juxtapleural (touches the pleura)",
    "juxtavascular": "Juxtavascular (vessels attached)",
    "isolated": "Surrounded by lung",
}
_SIDE_SITES = {
    "right": CodedValue("body_site", "Body site", "RID1302", "Right lung", system="radlex"),
    "left": CodedValue("body_site", "Body site", "RID1326", "Left lung", system="radlex"),
}


def shape_limits_at(slice_mm: float) -> ShapeLimits:
    """:data:`SHAPE_LIMITS` at ``slice_mm``: linear between the two thicknesses, flat beyond them."""
    (thin, thin_limits), (thick, thick_limits) = sorted(SHAPE_LIMITS.items())
    return ShapeLimits(
        *(
            round(float(np.interp(slice_mm, [thin, thick], [low, high])), 3)
            for low, high in zip(astuple(thin_limits), astuple(thick_limits), strict=True)
        )
    )


def is_nodule_like(nodule: NoduleSegmentation, limits: ShapeLimits) -> bool:
    """Whether the segmented structure ends where a nodule ends and lies in the lung (see :data:`SHAPE_LIMITS`)."""
    return (
        nodule.compact_share >= limits.compact_share
        and nodule.surface_lung_share >= limits.surface_lung_share
        and nodule.surface_wall_share <= limits.surface_wall_share
    )


def is_disc(measures: NoduleMeasures, limits: ShapeLimits) -> bool:
    """Whether the measured lesion is far wider than tall (a dome cut tangentially by thick slices, not a nodule)."""
    return measures.craniocaudal_mm < limits.height_ratio * measures.diameters.long_mm


def is_elongated(measures: NoduleMeasures, limits: ShapeLimits) -> bool:
    """Whether the measured lesion is far longer than wide on its slice (a vessel seen along its length)."""
    return measures.diameters.short_mm < limits.axis_ratio * measures.diameters.long_mm


def has_nodule_proportions(measures: NoduleMeasures, limits: ShapeLimits) -> bool:
    """Whether the measured lesion is neither a disc nor a tube (see :data:`SHAPE_LIMITS`)."""
    return not is_disc(measures, limits) and not is_elongated(measures, limits)


def _lungs_box(image: ImageInput, lungs: LungMask) -> Box | None:
    """The extent of the lung mask in patient coordinates (mm, LPS), the outer faces of its first and last voxels
    along each axis; ``None`` without the volume's geometry or without lungs. A later scan's nodules are matched after
    aligning the two scans' lung extents (:class:`models.lesion_followup.LungAlignment`)."""
    inside = lungs.mask[lungs.box]
    if not inside.any():
        return None
    first, last = [], []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(inside.any(axis=others))
        start = lungs.box[axis].start or 0
        first.append(start + float(present[0]) - 0.5)
        last.append(start + float(present[-1]) + 0.5)
    corners = [image.patient_position(corner) for corner in itertools.product(*zip(first, last, strict=True))]
    if any(corner is None for corner in corners):
        return None
    points = np.array(corners, dtype=np.float64)
    low, high = points.min(axis=0), points.max(axis=0)
    return Box((float(low[0]), float(low[1]), float(low[2])), (float(high[0]), float(high[1]), float(high[2])))


def _covered(nodules: list[NoduleSegmentation], voxel: tuple[int, int, int]) -> bool:
    """Does ``voxel`` (slice, row, column) belong to one of ``nodules``?"""
    for nodule in nodules:
        local = tuple(v - o for v, o in zip(voxel, nodule.origin, strict=True))
        if all(0 <= v < n for v, n in zip(local, nodule.mask.shape, strict=True)) and nodule.mask[local]:
            return True
    return False


def _overlap(nodules: list[NoduleSegmentation], nodule: NoduleSegmentation) -> int:
    """How many voxels of ``nodule`` already belong to ``nodules`` (each counted once), box by box: no array the
    size of the volume is needed to remember what was found."""
    box = nodule.box()
    claimed = np.zeros(nodule.mask.shape, dtype=bool)
    for other in nodules:
        shared = tuple(slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(box, other.box(), strict=True))
        if any(s.stop <= s.start for s in shared):
            continue
        mine = tuple(slice(s.start - a.start, s.stop - a.start) for s, a in zip(shared, box, strict=True))
        theirs = tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(shared, other.box(), strict=True))
        claimed[mine] |= other.mask[theirs]
    return int(np.count_nonzero(claimed & nodule.mask))


def _facts(m: NoduleMeasures) -> guidelines.NoduleFacts:
    return guidelines.NoduleFacts(
        mean_diameter_mm=m.mean_diameter_mm,
        long_axis_mm=m.diameters.long_mm,
        nodule_type=m.nodule_type,
        solid_mean_diameter_mm=m.solid_mean_diameter_mm,
        benign_calcification=m.benign_calcification,
    )


def _slug(text: str) -> str:
    words = "".join(c.lower() if c.isalnum() else "-" for c in text.split(":", 1)[-1])
    return "-".join(w for w in words.split("-") if w)[:64] or "none"


def _location(lungs: LungMask, centroid: tuple[float, float, float], extent: tuple[int, int]) -> tuple[str, str]:
    """Which lung (by the lung mask's side labels, nearest lung voxel for a juxtapleural nodule) and which third."""
    z, y, x = (round(v) for v in centroid)
    label = int(lungs.labels[z, y, x])
    if label == 0:
        window = lungs.labels[z, max(y - 40, 0) : y + 41, max(x - 40, 0) : x + 41]
        points = np.argwhere(window > 0)
        if points.size:
            nearest = points[int(np.argmin(((points - [min(y, 40), min(x, 40)]) ** 2).sum(axis=1)))]
            label = int(window[nearest[0], nearest[1]])
    if label == LABEL_RIGHT:
        side = "right"
    elif label == LABEL_LEFT:
        side = "left"
    else:  # the lungs were not told apart: columns run towards the patient's left
        side = "right" if x < lungs.mask.shape[2] / 2 else "left"
    first, last = extent
    share = (z - first + 0.5) / max(last - first + 1, 1)
    zone = "lower" if share < 1 / 3 else "middle" if share < 2 / 3 else "upper"
    return side, zone


def _lungs_fully_scanned(per_slice: np.ndarray) -> bool:
    """False when lung fills the first or last slice (more than 5 % of the largest slice): it goes on beyond."""
    peak = float(per_slice.max()) if per_slice.size else 0.0
    return peak > 0 and per_slice[0] <= 0.05 * peak and per_slice[-1] <= 0.05 * peak


def _brock_note(estimate: guidelines.BrockEstimate, laa: float) -> str:
    if not estimate.computed:
        return (
            f"Not computed: {', '.join(estimate.missing)} not known ({guidelines.BROCK_SOURCE}). Ask the EHR for the "
            "patient's age and sex."
        )
    emphysema = "present" if estimate.emphysema else "absent"
    return (
        f"{guidelines.BROCK_SOURCE}; a range because {', '.join(estimate.unknown)} are unknown to the analyzer; "
        f"emphysema {emphysema} by the project's LAA-950 densitometry ({laa:g} % of lung below -950 HU, cut-off 5 %)."
    )


def _conclusion(
    nodules: list[DetectedNodule], exam: guidelines.Assessment, fleischner: guidelines.FleischnerAdvice
) -> str:
    if not nodules:
        head = f"No lung nodules of {MIN_REPORTED_MM:g} mm or more were found. Sensitivity limits: {SENSITIVITY_LIMITS}"
        if exam.code == "0":
            return f"{head} {exam.display}: {exam.rule.split(': ', 1)[-1]}. {exam.management}"
        return head
    worst = nodules[0]
    d = worst.measures.diameters
    many = f"{len(nodules)} lung nodules found" if len(nodules) > 1 else "1 lung nodule found"
    return (
        f"{many}; most suspicious: nodule {worst.number}, {worst.measures.nodule_type}, {d.mean_mm:g} mm mean "
        f"diameter ({d.long_mm:.1f} x {d.short_mm:.1f} mm), {worst.side} lung {worst.zone} zone. "
        f"{exam.display} for the exam. If this is a lung cancer screening CT: {exam.management} "
        f"If the nodules are incidental (Fleischner 2017): {fleischner.for_risk(None)}"
    )


def _warnings(
    image: ImageInput,
    lungs: LungMask,
    nodules: list[DetectedNodule],
    fully_scanned: bool,
    extent: tuple[int, int] | None,
) -> list[str]:
    out = []
    thickness = slice_thickness_mm(image)
    if thickness > THIN_SLICE_MM:
        out.append(
            f"Slices are {thickness:g} mm thick: Lung-RADS asks for 2.5 mm or thinner, and the analyzer was validated "
            "on 1-2.5 mm slices. Thick slices lower the sensitivity for small and ground-glass nodules and blur their "
            "edges and solid components; diameters on one slice are less affected than volumes."
        )
    if not fully_scanned:
        out.append(
            "The lungs extend beyond the scanned range: nodules outside it cannot be found, and the exam is incomplete "
            "for Lung-RADS."
        )
    if image.attributes.get("ContrastBolusAgent", "").strip():
        out.append("Contrast-enhanced CT: enhancing nodules and vessels can look calcified above 200 HU.")
    if not lungs.split:
        out.append("The two lungs could not be separated; a nodule's side is taken from its column.")
    if len(nodules) == MAX_REPORTED:
        out.append(f"Only the {MAX_REPORTED} most suspicious nodules are listed.")
    if image.patient.age_years is None or image.patient.sex is None:
        out.append("The patient's age or sex was not available from the EHR: the Brock probability is not computed.")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Explanations


def _explanations(
    hu: np.ndarray, spacing: tuple[float, float, float], lungs: LungMask, nodules: list[DetectedNodule]
) -> tuple[list[Explanation], dict[int, tuple[int, ...]]]:
    """The projection with every nodule numbered, then one crop per nodule; which images show which nodule."""
    images = [_projection(hu, spacing, lungs, nodules)]
    titles = ["Lung nodules on a coronal maximum-intensity projection of the lungs"]
    slices: list[int | None] = [None]
    for nodule in nodules:
        images.append(_crop(hu, spacing, nodule))
        titles.append(f"Nodule {nodule.number}: outline and diameters")
        slices.append(nodule.measures.diameters.slice_index)
    images.append(_table(nodules))
    titles.append("Nodule table")
    slices.append(None)
    pngs = render.to_pngs(images)
    explanations = [
        Explanation(title=t, kind="overlay", png=p, slice_index=s) for t, p, s in zip(titles, pngs, slices, strict=True)
    ]
    # Each nodule is shown by the projection (where it is, numbered) and its own crop.
    shown: dict[int, tuple[int, ...]] = {n.number: (0, k + 1) for k, n in enumerate(nodules)}
    return explanations, shown


def _projection(
    hu: np.ndarray, spacing: tuple[float, float, float], lungs: LungMask, nodules: list[DetectedNodule]
) -> np.ndarray:
    """Coronal MIP of the lungs (anterior-posterior), head up, patient's right on the left, nodules circled."""
    box = lungs.box
    # The brightest lung voxel front to back (air, -1000 HU, where a column holds anything besides lung), reduced
    # in place rather than through a masked float32 copy of the lungs' box (a copy only of integer HU).
    mask = lungs.mask[box]
    brightest = np.max(hu[box].astype(np.float32, copy=False), axis=1, where=mask, initial=-np.inf)
    mip = np.where(mask.all(axis=1), brightest, np.maximum(brightest, np.float32(-1000.0)))[::-1]
    gray = render.window(mip, -500.0, 1400.0)
    stretch = spacing[0] / spacing[2]
    height = max(1, round(gray.shape[0] * stretch))
    picture = Image.fromarray(render.to_rgb(gray)).resize((gray.shape[1], height), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(picture)
    for nodule in nodules:
        z, _, x = nodule.measures.centroid
        row = (box[0].stop - 1 - z + 0.5) * stretch
        column = x - box[2].start
        radius = max(8.0, nodule.measures.diameters.long_mm / spacing[2] * 0.75)
        draw.ellipse((column - radius, row - radius, column + radius, row + radius), outline=render.MAGENTA, width=2)
        draw.text((column + radius + 2, row - radius), str(nodule.number), fill=render.YELLOW)
    caption = (
        "Coronal maximum-intensity projection of the lungs (front to back), head at the top,\n"
        "patient's right on the left. Magenta circles = nodules, numbered as in the table."
        if nodules
        else "Coronal maximum-intensity projection of the lungs: no nodule of 4 mm or more was found."
    )
    return render.label(np.asarray(picture), caption, font_size=12)


def _crop(hu: np.ndarray, spacing: tuple[float, float, float], nodule: DetectedNodule) -> np.ndarray:
    """The axial slice of the longest diameter around the nodule, outline in cyan, long axis magenta, short yellow."""
    d = nodule.measures.diameters
    k = d.slice_index
    _, cy, cx = nodule.measures.centroid
    half_mm = max(20.0, 1.5 * d.long_mm)
    half_rows, half_cols = int(half_mm / spacing[1]), int(half_mm / spacing[2])
    r0, c0 = max(int(cy) - half_rows, 0), max(int(cx) - half_cols, 0)
    r1, c1 = min(int(cy) + half_rows + 1, hu.shape[1]), min(int(cx) + half_cols + 1, hu.shape[2])
    plane = hu[k, r0:r1, c0:c1]
    mask = np.zeros(plane.shape, dtype=bool)
    seg = nodule.segmentation
    box = seg.box()
    local = seg.mask[k - box[0].start]
    rows = slice(max(box[1].start, r0), min(box[1].stop, r1))
    cols = slice(max(box[2].start, c0), min(box[2].stop, c1))
    mask[rows.start - r0 : rows.stop - r0, cols.start - c0 : cols.stop - c0] = local[
        rows.start - box[1].start : rows.stop - box[1].start, cols.start - box[2].start : cols.stop - box[2].start
    ]
    scale = max(1, math.ceil(240 / max(plane.shape)))
    rgb = render.outline(render.window(plane, *render.LUNG_WINDOW), mask, render.CYAN)
    picture = Image.fromarray(rgb).resize((rgb.shape[1] * scale, rgb.shape[0] * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(picture)
    for (a, b), colour in ((d.long_axis, render.MAGENTA), (d.short_axis, render.YELLOW)):
        draw.line(
            [
                ((a[1] - c0 + 0.5) * scale, (a[0] - r0 + 0.5) * scale),
                ((b[1] - c0 + 0.5) * scale, (b[0] - r0 + 0.5) * scale),
            ],
            fill=colour,
            width=2,
        )
    m = nodule.measures
    caption = (
        f"Nodule {nodule.number}, slice {k + 1}: {m.nodule_type}, long {d.long_mm:.1f} mm (magenta), short "
        f"{d.short_mm:.1f} mm (yellow)\nmean {d.mean_mm:g} mm, volume {m.volume_mm3:g} mm3, "
        f"{nodule.lung_rads.display}\n"
        "Cyan line = outline; lung window W1500/L-600"
    )
    return render.label(np.asarray(picture), caption, font_size=12)


def _table(nodules: list[DetectedNodule]) -> np.ndarray:
    """The nodule table as an image (the report carries the same table as text)."""
    header = "No.  Side/zone      Type          Mean (LxS) mm        Volume mm3   Lung-RADS  Suspicion"
    lines = [header]
    for n in nodules:
        d = n.measures.diameters
        lines.append(
            f"{n.number:<4} {n.side + ' ' + n.zone:<14} {n.measures.nodule_type:<13} "
            f"{d.mean_mm:>5.1f} ({d.long_mm:.1f}x{d.short_mm:.1f})".ljust(64)
            + f"{n.measures.volume_mm3:>9.0f}   {n.lung_rads.code:<9}  {100 * n.suspicion:>5.1f} %"
        )
    if not nodules:
        lines.append("No lung nodule of 4 mm or more was found.")
    canvas = np.zeros((4, 720, 3), dtype=np.uint8)
    return render.label(canvas, "\n".join(lines), font_size=12)

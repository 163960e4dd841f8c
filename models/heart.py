"""Heart and great vessels on a non-contrast chest CT: coronary and aortic calcium, aortic and pulmonary artery size.

Every chest CT, gated or not, shows the coronary calcium and the great vessels, and reporting them on scans done for
other reasons is recommended practice (Hecht HS, Cronin P, Blaha MJ, et al. 2016 SCCT/STR guidelines for coronary
artery calcium scoring of noncontrast noncardiac chest CT scans. J Cardiovasc Comput Tomogr. 2017;11(1):74-84).
This analyzer finds the structures with :mod:`models.chest_vessels` (no trained weights), scores calcium with
:mod:`models.calcium` (the functions the phantom validation calls) and applies these published thresholds:

* **Coronary artery calcium: CAC-DRS** (Hecht HS, Blaha MJ, Kazerooni EA, et al. CAC-DRS: Coronary Artery Calcium
  Data and Reporting System. An expert consensus document of the Society of Cardiovascular Computed Tomography
  (SCCT). J Cardiovasc Comput Tomogr. 2018;12(3):185-191): Agatston 0 = CAC-DRS 0 (very low risk), 1-99 = 1 (mildly
  increased), 100-299 = 2 (moderately increased), 300 and above = 3 (moderately to severely increased risk). The
  vessel-count modifier (N) is not given: without contrast or ECG gating the calcium cannot be assigned to an artery
  reliably, so only the total is reported.
* **Ascending aorta** (Isselbacher EM, Preventza O, Hamilton Black J 3rd, et al. 2022 ACC/AHA Guideline for the
  Diagnosis and Management of Aortic Disease. Circulation. 2022;146(24):e334-e482): dilated from 40 mm; surgery
  is recommended for a sporadic root or ascending aneurysm from 55 mm, and is reasonable from 50 mm in selected
  patients treated by an experienced multidisciplinary aortic team. Diameters are outer wall to outer wall,
  perpendicular to the centreline, as the guideline asks.
* **Descending thoracic aorta**: an aneurysm is a diameter at least 1.5 times the expected normal (Johnston KW,
  Rutherford RB, Tilson MD, Shah DM, Hollier L, Stanley JC. Suggested standards for reporting on arterial aneurysms.
  J Vasc Surg. 1991;13(3):452-458), the expected normal being the mean CT diameter of the Framingham Heart Study
  (Rogers IS, Massaro JM, Truong QA, et al. Distribution, determinants, and normal reference values of thoracic and
  abdominal aortic diameters by computed tomography (from the Framingham Heart Study). Am J Cardiol.
  2013;111(10):1510-1516): 25.8 mm in men, 23.1 mm in women; repair is recommended from 55 mm (2022 ACC/AHA).
* **Aortic arch**: repair threshold 55 mm (2022 ACC/AHA); no dilation threshold is applied.
* **Pulmonary trunk**: 29 mm or more suggests pulmonary hypertension (Tan RT, Kuzo R, Goodman LR, Siegel R, Haasler
  GB, Presberg KW. Utility of CT scan evaluation for predicting pulmonary hypertension in patients with parenchymal
  lung disease. Chest. 1998;113(5):1250-1256), and so does a pulmonary artery to ascending aorta ratio above 1 at
  the same level (Ng CS, Wells AU, Padley SP. A CT sign of chronic pulmonary arterial hypertension: the ratio of main
  pulmonary artery to aortic diameter. J Thorac Imaging. 1999;14(4):270-278).

Measurements that cannot be made reliably are left out, and the report says which and why.
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from core.errors import UnsuitableInputError
from models import render
from models.base import (
    AnalysisResult,
    Category,
    Explanation,
    ImageInput,
    Interpretation,
    Measurement,
    SeriesRequirements,
    highest_normal,
)
from models.calcium import CalciumScore, MassCalibration, score_calcium
from models.chest_vessels import ChestVessels, Section, find_chest_vessels
from models.ct import check_ct_volume, check_hounsfield, slice_thickness_mm
from models.lung import segment_lungs

MAX_SLICE_THICKNESS_MM = 5.0
"""Calcium scoring on non-gated chest CT has been validated on reconstructions up to 5 mm (SCCT/STR 2016); thicker
slices average small calcifications below 130 HU."""

MIN_LUNG_ML = 500.0
"""Less aerated lung than this and the scan does not show the chest (a head, an abdomen, a limb)."""

CONTRAST_LUMEN_HU = 150.0
"""Unenhanced blood is about 40-60 HU; an aortic lumen well above 150 HU means iodinated contrast."""

NOISE_WARNING_HU = 35.0
"""Image noise (SD in the aortic lumen) above which noise alone makes 130 HU specks of 1 mm2 (SCCT/STR 2016 names
noise as a source of false positive calcium on low-dose scans)."""

CAC_DRS_RULE = (
    "CAC-DRS (Hecht HS et al., J Cardiovasc Comput Tomogr 2018;12:185-191): Agatston 0 = CAC-DRS 0, 1-99 = 1, "
    "100-299 = 2, >= 300 = 3."
)
CAC_DRS_BANDS = ((0.0, 0), (1.0, 1), (100.0, 2), (300.0, 3))
CAC_DRS = {
    0: ("CAC-DRS 0: no coronary artery calcium", "very low risk"),
    1: ("CAC-DRS 1: mild coronary artery calcium (Agatston 1-99)", "mildly increased risk"),
    2: ("CAC-DRS 2: moderate coronary artery calcium (Agatston 100-299)", "moderately increased risk"),
    3: ("CAC-DRS 3: severe coronary artery calcium (Agatston >= 300)", "moderately to severely increased risk"),
}
CAC_DRS_RECOMMENDATION = {
    0: "statin therapy generally not recommended on the basis of calcium alone",
    1: "moderate-intensity statin therapy",
    2: "moderate- to high-intensity statin therapy and low-dose aspirin (81 mg) if bleeding risk allows",
    3: "high-intensity statin therapy and low-dose aspirin (81 mg) if bleeding risk allows",
}
"""CAC-DRS 2018 management recommendations by category, quoted in the report and on the CDS card as text."""

ASCENDING_DILATED_MM = 40.0
ASCENDING_SELECTED_SURGERY_MM = 50.0
ASCENDING_SURGERY_MM = 55.0
DESCENDING_REPAIR_MM = 55.0
ARCH_REPAIR_MM = 55.0
ANEURYSM_FACTOR = 1.5
EXPECTED_DESCENDING_MM = {"male": 25.8, "female": 23.1}
PULMONARY_TRUNK_WIDE_MM = 29.0
PA_AORTA_RATIO_HIGH = 1.0
AORTA_RULE = (
    "2022 ACC/AHA aortic disease guideline (Isselbacher EM et al., Circulation 2022;146:e334-e482): ascending aorta "
    "dilated from 40 mm; surgery from 55 mm (50 mm in selected patients); descending and arch repair from 55 mm. "
    "Descending aneurysm: >= 1.5 x expected normal (Johnston 1991; Framingham CT means 25.8 mm men, 23.1 mm women, "
    "Rogers 2013)."
)
PULMONARY_RULE = (
    "Pulmonary trunk >= 29 mm (Tan RT et al., Chest 1998;113:1250-1256) or pulmonary artery / ascending aorta ratio "
    "> 1 (Ng CS et al., J Thorac Imaging 1999;14:270-278) suggest pulmonary hypertension."
)

NOMINAL_CALIBRATION = MassCalibration(
    0.723,
    "nominal 120 kV factor: c_HA measured by the project's phantom validation (QRM calibration rods, Canon "
    "Aquilion ONE, 120 kV, large body ring); no calibration insert was in this scan, and c_HA differs between "
    "scanners, tube voltages and patient sizes (McCollough 2007), so the mass is approximate",
)
"""Calcium mass of a patient scan is calibrated with this factor when the scan holds no calibration insert."""

WEIGHT_COLOURS: dict[int, render.RGB] = {1: (86, 180, 233), 2: (0, 158, 115), 3: (240, 228, 66), 4: (213, 94, 0)}
"""Agatston density weights 1-4 in the Okabe-Ito palette (distinguishable with colour-vision deficiency), light to
dark-orange; aortic calcium is outlined in magenta, the excluded root and valve in white."""

MEDIASTINAL_WINDOW = (40.0, 400.0)


@dataclass(frozen=True)
class _Findings:
    vessels: ChestVessels
    coronary: CalciumScore | None
    aortic: CalciumScore | None
    contrast: bool
    noise_hu: float | None


class HeartAnalyzer:
    """Coronary and aortic calcium, aortic and pulmonary artery diameters on non-contrast chest CT."""

    name = "ct-heart"
    version = "0.2.0"
    title = "CT heart and great vessels: coronary calcium, aortic calcium and size, pulmonary artery size"
    uses_patient_context = True  # the descending aorta's expected size depends on sex (Framingham)
    requirements = SeriesRequirements(
        modalities=("CT",),
        min_instances=20,
        body_parts=("CHEST", "THORAX", "HEART", "LUNG"),
        description_keywords=("chest", "thorax", "lung", "heart", "cardiac", "calcium"),
        excluded_description_keywords=("scout", "localizer", "topogram", "mip", "mpr", "coronal", "sagittal"),
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cached: tuple[weakref.ref[np.ndarray], tuple[float, ...], _Findings] | None = None

    def check_input(self, image: ImageInput) -> None:
        """A CT volume of the chest: calibrated HU, slices no thicker than 5 mm, lungs and spine in view."""
        check_ct_volume(
            image,
            self.name,
            measures="measures calcium and vessel sizes in Hounsfield units",
            min_slices=self.requirements.min_instances,
            covers="the heart",
            remedy="Choose an axial chest CT series (non-contrast for calcium scoring).",
        )
        thickness = slice_thickness_mm(image)
        if thickness > MAX_SLICE_THICKNESS_MM + 0.01:
            raise UnsuitableInputError(
                f"Slices are {thickness:g} mm thick; calcium scoring is validated on reconstructions up to "
                f"{MAX_SLICE_THICKNESS_MM:g} mm (thicker slices average small calcifications below 130 HU).",
                remedy="Use a reconstruction of 3 mm (or at most 5 mm) of the chest CT.",
            )
        check_hounsfield(image.array, self.name)
        self._findings(image)  # raises UnsuitableInputError without lungs or spine

    def analyze(self, image: ImageInput) -> AnalysisResult:
        found = self._findings(image)
        vessels = found.vessels
        spacing = _spacing3(image)
        measurements: list[Measurement] = []
        warnings: list[str] = []
        not_measured: list[str] = [f"{what} ({why})" for what, why in vessels.missing.items()]

        category = Category("not-assessable", "Coronary artery calcium not assessable", CAC_DRS_RULE, abnormal=False)
        cac_text = ""
        if found.contrast:
            not_measured.append(
                "coronary and aortic calcium (intravenous contrast: iodine above 130 HU reads as calcium)"
            )
        elif found.coronary is not None:
            score = found.coronary
            agatston = round(score.agatston, 1)
            drs = cac_drs(agatston)
            display, risk = CAC_DRS[drs]
            category = Category(f"cac-drs-{drs}", display, CAC_DRS_RULE, abnormal=drs > 0)
            measurements.extend(_coronary_measurements(score, drs))
            cac_text = (
                f"Coronary artery calcium: Agatston {agatston:g} ({display}; {risk}). CAC-DRS suggests "
                f"{CAC_DRS_RECOMMENDATION[drs]}."
            )
            if "base of the heart" in vessels.missing:
                cac_text += " The bottom of the heart is outside the scan, so the score may be incomplete."
        if found.aortic is not None and not found.contrast:
            measurements.extend(_aortic_calcium_measurements(found.aortic))

        sex = image.patient.sex if image.patient.sex in ("male", "female") else None
        size_texts = _size_measurements(vessels, measurements, sex, warnings)

        warnings.extend(_acquisition_warnings(image, found))
        if not_measured:
            warnings.append("Not measured: " + "; ".join(not_measured) + ".")
        conclusion = " ".join(t for t in (cac_text, *size_texts) if t) or (
            "No structure could be measured reliably on this scan."
        )
        explanations = _explanations(image.array, spacing, found)
        return AnalysisResult(
            analyzer=self.name,
            version=self.version,
            measurements=tuple(measurements),
            category=category,
            conclusion=conclusion,
            explanations=tuple(explanations),
            warnings=tuple(warnings),
        )

    def _findings(self, image: ImageInput) -> _Findings:
        """Find the structures and score the calcium once per array (check_input and analyze share it)."""
        spacing = _spacing3(image)
        with self._lock:
            cached = self._cached
            if cached is not None and cached[0]() is image.array and cached[1] == spacing:
                return cached[2]
        hu = image.array
        lungs = segment_lungs(hu, spacing)
        lung_ml = lungs.voxel_count * image.voxel_volume_ml
        if lung_ml < MIN_LUNG_ML:
            raise UnsuitableInputError(
                f"Only {lung_ml:.0f} mL of lung was found (at least {MIN_LUNG_ML:.0f} mL needed): this CT does not "
                "show the chest, so the heart and great vessels cannot be found.",
                remedy="Choose a chest CT series that covers the heart and the lungs around it.",
            )
        try:
            vessels = find_chest_vessels(hu, spacing, lungs)
        except UnsuitableInputError as exc:
            raise UnsuitableInputError(
                f"{self.name}: {exc.message} Without the spine the heart and great vessels cannot be located.",
                remedy=exc.remedy,
            ) from None
        lumen, noise = _lumen_statistics(hu, spacing, vessels)
        contrast = lumen is not None and lumen > CONTRAST_LUMEN_HU
        if image.attributes.get("ContrastBolusAgent", "").strip():
            contrast = True
        calibration = _calibration(image)
        coronary = aortic = None
        # each territory is scored in its bounding box: a whole-volume mask would cost as much as the volume
        heart = vessels.part("heart") if not contrast and vessels.heart_slices is not None else None
        if heart is not None:
            coronary = score_calcium(hu, heart[0], spacing, calibration=calibration, region_at=heart[1])
        aorta = vessels.part("aorta") if not contrast else None
        if aorta is not None and aorta[0].any():
            aortic = score_calcium(hu, aorta[0], spacing, calibration=calibration, region_at=aorta[1])
        findings = _Findings(vessels, coronary, aortic, contrast, noise)
        with self._lock:
            self._cached = (weakref.ref(image.array), spacing, findings)
        return findings


def cac_drs(agatston: float) -> int:
    """CAC-DRS category (0-3) of an Agatston score as filed (one decimal)."""
    category = 0
    for floor, value in CAC_DRS_BANDS:
        if agatston >= floor:
            category = value
    return category


def _cac_interpretation(drs: int) -> Interpretation:
    return ("N", "A", "H", "HH")[drs]


def _coronary_measurements(score: CalciumScore, drs: int) -> list[Measurement]:
    scaled = (
        ""
        if abs(score.slice_factor - 1.0) < 1e-6
        else (
            f" Scaled to 3 mm slices (x {score.slice_factor:.2f}, Ohnesorge 2002); the sum on the scan's own slices is "
            f"{score.agatston_raw:.1f}."
        )
    )
    out = [
        Measurement(
            "cac_agatston",
            "Coronary artery calcium score (Agatston)",
            round(score.agatston, 1),
            "1",
            interpretation=_cac_interpretation(drs),
            reference_high=0.0,
            note=f"{CAC_DRS_RULE}{scaled}",
        ),
        Measurement("cac_volume_mm3", "Coronary artery calcium volume", round(score.volume_mm3, 1), "mm3"),
        Measurement("cac_lesions", "Coronary calcified lesions", float(score.lesion_count), "1"),
    ]
    if score.mass_mg is not None and score.calibration is not None:
        out.append(
            Measurement(
                "cac_mass_mg",
                "Coronary artery calcium mass (hydroxyapatite)",
                round(score.mass_mg, 1),
                "mg",
                note=f"Calibration: {score.calibration.source}.",
            )
        )
    return out


def _aortic_calcium_measurements(score: CalciumScore) -> list[Measurement]:
    out = [
        Measurement(
            "tac_agatston",
            "Thoracic aortic calcium score (Agatston)",
            round(score.agatston, 1),
            "1",
            note="Agatston method applied to the wall of the ascending aorta, arch and descending thoracic aorta "
            "(aortic root and valve excluded); no risk categories are established for it.",
        ),
        Measurement("tac_volume_mm3", "Thoracic aortic calcium volume", round(score.volume_mm3, 1), "mm3"),
    ]
    if score.mass_mg is not None and score.calibration is not None:
        out.append(
            Measurement(
                "tac_mass_mg",
                "Thoracic aortic calcium mass (hydroxyapatite)",
                round(score.mass_mg, 1),
                "mg",
                note=f"Calibration: {score.calibration.source}.",
            )
        )
    return out


def robust_widest(sections: tuple[Section, ...]) -> Section | None:
    """The widest section after a running median over three neighbouring slices.

    A single slice where a touching structure widened the fit must not become the reported maximum; the section
    returned is the real one at the slice where the running median peaks.
    """
    if not sections:
        return None
    diameters = [s.diameter_mm for s in sections]
    smoothed = [
        float(np.median(diameters[max(0, i - 1) : i + 2])) if len(diameters) >= 3 else diameters[i]
        for i in range(len(diameters))
    ]
    best = int(np.argmax(smoothed))
    section = sections[best]
    return Section(
        section.slice_index,
        section.centre,
        smoothed[best],
        section.long_mm,
        section.angle,
        section.outline,
        section.edge_fraction,
    )


def _below_arch(vessels: ChestVessels) -> tuple[Section, ...]:
    """The descending aorta's sections below the level where the ascending aorta ends: above it the chain follows
    the arch's posterior limb, cut obliquely, which is not a diameter across the descending aorta."""
    if vessels.descending is None:
        return ()
    if vessels.ascending is not None:
        limit = vessels.ascending.slices[1]
    elif vessels.arch is not None:
        limit = vessels.arch.slice_index - 1
    else:
        limit = vessels.descending.slices[1] - 2
    return tuple(s for s in vessels.descending.sections if s.slice_index <= limit)


def _size_measurements(
    vessels: ChestVessels, measurements: list[Measurement], sex: str | None, warnings: list[str]
) -> list[str]:
    """Aortic and pulmonary artery diameters with their interpretations; returns the sentences of the conclusion."""
    texts: list[str] = []
    aorta_parts: list[str] = []
    ascending = robust_widest(vessels.ascending.sections) if vessels.ascending else None
    if ascending is not None:
        d = round(ascending.diameter_mm)
        interpretation: Interpretation = (
            "HH" if d >= ASCENDING_SURGERY_MM else "H" if d >= ASCENDING_DILATED_MM else "N"
        )
        measurements.append(
            Measurement(
                "ascending_aorta_diameter_mm",
                "Ascending aorta maximal diameter",
                float(d),
                "mm",
                interpretation=interpretation,
                reference_high=highest_normal(ASCENDING_DILATED_MM, 0),
                note=f"Outer wall to outer wall, perpendicular to the centreline, slice {ascending.slice_index + 1}. "
                f"{AORTA_RULE}",
            )
        )
        if d >= ASCENDING_SURGERY_MM:
            aorta_parts.append(f"ascending aorta {d} mm, at or above the 55 mm surgical threshold")
        elif d >= ASCENDING_SELECTED_SURGERY_MM:
            aorta_parts.append(
                f"ascending aorta {d} mm, dilated and at or above the 50 mm threshold for surgery in selected patients"
            )
        elif d >= ASCENDING_DILATED_MM:
            aorta_parts.append(f"ascending aorta {d} mm, dilated (40 mm or more)")
        else:
            aorta_parts.append(f"ascending aorta {d} mm")
    descending = robust_widest(_below_arch(vessels)) if vessels.descending else None
    if descending is not None:
        d = round(descending.diameter_mm)
        expected = EXPECTED_DESCENDING_MM.get(sex or "male", EXPECTED_DESCENDING_MM["male"])
        aneurysm = round(ANEURYSM_FACTOR * expected)
        interpretation = "HH" if d >= DESCENDING_REPAIR_MM else "H" if d >= aneurysm else "N"
        basis = f"{sex} reference" if sex else "men's reference (sex not known, the larger, to avoid over-calling)"
        measurements.append(
            Measurement(
                "descending_aorta_diameter_mm",
                "Descending thoracic aorta maximal diameter",
                float(d),
                "mm",
                interpretation=interpretation,
                reference_high=highest_normal(float(aneurysm), 0),
                note=f"Outer wall to outer wall, perpendicular to the centreline, slice {descending.slice_index + 1}; "
                f"aneurysm from {aneurysm} mm (1.5 x {expected} mm, {basis}). {AORTA_RULE}",
            )
        )
        if d >= DESCENDING_REPAIR_MM:
            aorta_parts.append(f"descending aorta {d} mm, at or above the 55 mm repair threshold")
        elif d >= aneurysm:
            aorta_parts.append(f"descending aorta {d} mm, aneurysmal (1.5 times the expected {expected} mm or more)")
        else:
            aorta_parts.append(f"descending aorta {d} mm")
    if vessels.arch is not None:
        d = round(vessels.arch.diameter_mm)
        measurements.append(
            Measurement(
                "aortic_arch_diameter_mm",
                "Aortic arch diameter",
                float(d),
                "mm",
                interpretation="HH" if d >= ARCH_REPAIR_MM else None,
                note="Width of the arch on the axial slice where it runs in-plane "
                f"(slice {vessels.arch.slice_index + 1}). "
                "Repair threshold 55 mm (2022 ACC/AHA); no dilation threshold is applied to the arch.",
            )
        )
        aorta_parts.append(f"arch {d} mm" + (", at or above the 55 mm repair threshold" if d >= ARCH_REPAIR_MM else ""))
    if aorta_parts:
        dilated = any(m.interpretation in ("H", "HH") for m in measurements if m.key.endswith("aorta_diameter_mm"))
        texts.append(
            "Thoracic aorta: " + "; ".join(aorta_parts) + ("." if dilated else " (within the guideline thresholds).")
        )
    trunk = vessels.pulmonary_trunk
    if trunk is not None:
        d = round(trunk.diameter_mm)
        measurements.append(
            Measurement(
                "pulmonary_trunk_diameter_mm",
                "Main pulmonary artery diameter",
                float(d),
                "mm",
                interpretation="H" if d >= PULMONARY_TRUNK_WIDE_MM else "N",
                reference_high=highest_normal(PULMONARY_TRUNK_WIDE_MM, 0),
                note=f"Perpendicular to its long axis, slice {trunk.slice_index + 1}. {PULMONARY_RULE}",
            )
        )
        same_level = vessels.ascending.at(trunk.slice_index) if vessels.ascending else None
        sentence = f"Main pulmonary artery {d} mm" + (" (29 mm or more)" if d >= PULMONARY_TRUNK_WIDE_MM else "")
        if same_level is not None:
            ratio = round(trunk.diameter_mm / same_level.diameter_mm, 2)
            measurements.append(
                Measurement(
                    "pa_aorta_ratio",
                    "Pulmonary artery to ascending aorta diameter ratio",
                    ratio,
                    "1",
                    interpretation="H" if ratio > PA_AORTA_RATIO_HIGH else "N",
                    reference_high=PA_AORTA_RATIO_HIGH,
                    note=f"Both measured on slice {trunk.slice_index + 1}. {PULMONARY_RULE}",
                )
            )
            sentence += f", PA:aorta ratio {ratio:.2f}"
        wide = d >= PULMONARY_TRUNK_WIDE_MM or any(
            m.key == "pa_aorta_ratio" and m.interpretation == "H" for m in measurements
        )
        texts.append(sentence + (": suggests pulmonary hypertension." if wide else "."))
    elif vessels.ascending is not None:
        warnings.append(
            "The pulmonary trunk could not be outlined, so neither its diameter nor the PA:aorta ratio is given."
        )
    return texts


def _acquisition_warnings(image: ImageInput, found: _Findings) -> list[str]:
    """The caveats that bear on the calcium scores, with the correction used where there is one."""
    out: list[str] = []
    if found.coronary is not None or found.aortic is not None:
        out.append(
            "Non-gated chest CT: heart motion blurs calcium, and Agatston scores from non-gated scans run lower than "
            "from ECG-gated calcium scans while agreeing by category (SCCT/STR 2016); a score of 0 does not exclude "
            "small calcifications."
        )
        thickness = slice_thickness_mm(image)
        score = found.coronary or found.aortic
        if score is not None and abs(score.slice_factor - 1.0) > 1e-6:
            out.append(
                f"{thickness:g} mm slices: the Agatston sum is scaled by slice spacing / 3 mm "
                f"(x {score.slice_factor:.2f}, the 'equivalent score' of Ohnesorge 2002) to the 3 mm slices the score "
                "was defined on; thick slices also lower the peak HU of small calcifications, which no correction "
                "restores."
            )
        kvp = image.attributes.get("KVP", "").strip()
        if kvp and _float(kvp) not in (None, 120.0):
            out.append(
                f"Tube voltage {kvp} kV: the 130 HU threshold and the density weights were defined at 120-130 kV; "
                "scores at other voltages are not comparable."
            )
        out.append(
            "Calcium is counted inside the heart between the lungs, in front of the spine, without the aortic root and "
            "valve (a cylinder continuing the ascending aorta 20 mm down), the chest wall and the hila; mitral annular "
            "calcification next to the circumflex artery cannot be told apart from it without contrast and is "
            "counted. Per-artery scores (LM, LAD, LCX, RCA) are not given: their localisation is not reliable here."
        )
    if found.noise_hu is not None and found.noise_hu > NOISE_WARNING_HU:
        out.append(
            f"Image noise is high (SD {found.noise_hu:.0f} HU in the aorta): noise specks above 130 HU can add "
            "spurious lesions."
        )
    if found.contrast:
        out.append("Intravenous contrast detected: calcium was not scored; vessel diameters are unaffected.")
    return out


def _float(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _spacing3(image: ImageInput) -> tuple[float, float, float]:
    if len(image.spacing) != 3:
        raise UnsuitableInputError("The heart analyzer needs a 3-D CT volume.", remedy="Send the whole axial series.")
    return (float(image.spacing[0]), float(image.spacing[1]), float(image.spacing[2]))


def _calibration(image: ImageInput) -> MassCalibration | None:
    """The nominal HA calibration at 120 kV; none at another tube voltage (the factor depends on the spectrum)."""
    kvp = _float(image.attributes.get("KVP", ""))
    if kvp is not None and abs(kvp - 120.0) > 0.5:
        return None
    return NOMINAL_CALIBRATION


def _lumen_statistics(
    hu: np.ndarray, spacing: tuple[float, float, float], vessels: ChestVessels
) -> tuple[float | None, float | None]:
    """Median HU and SD inside the descending aorta's lumen (inner half of its radius): contrast and noise."""
    if vessels.descending is None:
        return None, None
    values: list[np.ndarray] = []
    px = float(spacing[1])
    for s in vessels.descending.sections:
        r, c = s.centre
        radius = 0.5 * s.diameter_mm / 2.0 / px
        rr, cc = np.ogrid[-math.ceil(radius) : math.ceil(radius) + 1, -math.ceil(radius) : math.ceil(radius) + 1]
        disc = rr**2 + cc**2 <= radius**2
        top, left = round(r) - math.ceil(radius), round(c) - math.ceil(radius)
        if top < 0 or left < 0:
            continue
        patch = hu[s.slice_index, top : top + disc.shape[0], left : left + disc.shape[1]]
        if patch.shape == disc.shape:
            values.append(patch[disc])
    if not values:
        return None, None
    joined = np.concatenate(values)
    return float(np.median(joined)), float(np.std(joined))


# ---------------------------------------------------------------------------------------------------------------
# explanation images


def _explanations(hu: np.ndarray, spacing: tuple[float, float, float], found: _Findings) -> list[Explanation]:
    """Key images a reader can check every structure and number on (see :func:`_coronary_image` and friends)."""
    images: list[tuple[str, int, np.ndarray]] = []
    vessels = found.vessels
    if found.coronary is not None and found.coronary.lesions:
        per_slice = _per_slice_agatston(found.coronary, hu.shape[0])
        for z in _key_slices(per_slice, 2):
            images.append(
                (f"Coronary calcium by density weight, slice {z + 1}", z, _calcium_image(hu, spacing, found, z))
            )
    elif vessels.heart_slices is not None:
        low, high = vessels.heart_slices
        z = (low + high) // 2
        images.append(
            (
                f"Coronary territory (no coronary calcium scored), slice {z + 1}",
                z,
                _calcium_image(hu, spacing, found, z),
            )
        )
    sections = _vessel_sections(vessels)
    for z in sorted({s.slice_index for _, s in sections}, reverse=True):
        on_slice = [(label, s) for label, s in sections if s.slice_index == z]
        title = "Vessel diameters, slice " + str(z + 1) + ": " + ", ".join(label for label, _ in on_slice)
        images.append((title, z, _vessel_image(hu, spacing, vessels, z, on_slice)))
    pngs = render.to_pngs([image for _, _, image in images])
    return [
        Explanation(title=title, kind="overlay", png=png, slice_index=z)
        for (title, z, _), png in zip(images, pngs, strict=True)
    ]


def _per_slice_agatston(score: CalciumScore, slices: int) -> np.ndarray:
    """The 3 mm-equivalent Agatston score on each slice: every scored pixel carries its 2-D lesion's weight, so the
    sum of weights times the pixel area is the slice's sum of area x weight."""
    out = np.zeros(slices)
    if score.weights.size:
        per_slice = score.weights.reshape(score.weights.shape[0], -1).sum(axis=1, dtype=np.float64)
        out[score.box[0]] = per_slice * score.pixel_mm2 * score.slice_factor
    return out


def _key_slices(per_slice: np.ndarray, count: int) -> list[int]:
    """The slices with the most calcium, at least two slices apart."""
    chosen: list[int] = []
    for z in np.argsort(-per_slice):
        if per_slice[z] <= 0 or len(chosen) == count:
            break
        if all(abs(int(z) - c) >= 2 for c in chosen):
            chosen.append(int(z))
    return sorted(chosen, reverse=True)


def _vessel_sections(vessels: ChestVessels) -> list[tuple[str, Section]]:
    """The sections whose diameters are reported (the maximal ones), labelled for the key images."""
    out: list[tuple[str, Section]] = []
    ascending = robust_widest(vessels.ascending.sections) if vessels.ascending is not None else None
    descending = robust_widest(_below_arch(vessels))
    for label, widest in (("ascending aorta", ascending), ("descending aorta", descending)):
        if widest is not None:
            out.append((label, widest))
    if vessels.arch is not None:
        out.append(("aortic arch", vessels.arch))
    if vessels.pulmonary_trunk is not None:
        trunk = vessels.pulmonary_trunk
        out.append(("pulmonary trunk", trunk))
        aorta = vessels.ascending.at(trunk.slice_index) if vessels.ascending is not None else None
        if aorta is not None and all(
            s.slice_index != trunk.slice_index or label != "ascending aorta" for label, s in out
        ):
            out.append(("ascending aorta at the pulmonary trunk", aorta))
    return out


def _crop_box(mask_rows: np.ndarray, mask_cols: np.ndarray, shape: tuple[int, int], margin: int) -> tuple[slice, slice]:
    r0, r1 = max(int(mask_rows.min()) - margin, 0), min(int(mask_rows.max()) + margin, shape[0])
    c0, c1 = max(int(mask_cols.min()) - margin, 0), min(int(mask_cols.max()) + margin, shape[1])
    return slice(r0, r1), slice(c0, c1)


def _zoomed(rgb: np.ndarray, target: int = 600) -> tuple[Image.Image, float]:
    zoom = max(1.0, target / max(rgb.shape[:2]))
    image = Image.fromarray(rgb)
    if zoom > 1.0:
        image = image.resize((round(rgb.shape[1] * zoom), round(rgb.shape[0] * zoom)), Image.Resampling.NEAREST)
    return image.convert("RGB"), zoom


def _calcium_image(hu: np.ndarray, spacing: tuple[float, float, float], found: _Findings, z: int) -> np.ndarray:
    """One axial slice: coronary calcium filled by density weight, the coronary territory outlined in cyan, aortic
    calcium outlined in magenta, the excluded aortic root and valve outlined in white."""
    vessels = found.vessels
    region = vessels.plane("heart", z)
    rows, cols = np.nonzero(region)
    if rows.size == 0:
        rows, cols = np.array([0, hu.shape[1] - 1]), np.array([0, hu.shape[2] - 1])
    box = _crop_box(rows, cols, hu.shape[1:], round(15.0 / spacing[1]))
    level, width = MEDIASTINAL_WINDOW
    rgb = render.to_rgb(render.window(hu[z][box], level, width))
    if found.coronary is not None:
        weights = _weights_on(found.coronary, hu.shape, z)[box]
        for weight, colour in WEIGHT_COLOURS.items():
            rgb = render.overlay_mask(rgb, weights == weight, colour, alpha=0.85, hatched=False)
    rgb = render.outline(rgb, region[box], render.CYAN)
    if found.aortic is not None:
        rgb = render.outline(rgb, _weights_on(found.aortic, hu.shape, z)[box] > 0, render.MAGENTA)
    rgb = render.outline(rgb, vessels.plane("root", z)[box], render.WHITE)
    score = found.coronary
    here = _per_slice_agatston(score, hu.shape[0])[z] if score is not None else 0.0
    caption = (
        f"Axial slice {z + 1} of {hu.shape[0]} (from the feet), patient right on the left; W{width:.0f}/L{level:.0f}\n"
        "Coronary calcium by Agatston density weight:\n"
        "  blue 1 (130-199 HU), green 2 (200-299), yellow 3 (300-399), orange 4 (400 HU and above)\n"
        "Cyan line: coronary territory; magenta: aortic wall calcium;\n"
        f"white: aortic root and valve (excluded). Agatston on this slice about {here:.0f} (3 mm equivalent)"
    )
    return render.label(np.asarray(_zoomed(rgb)[0]), caption, font_size=12)


def _weights_on(score: CalciumScore, shape: tuple[int, ...], z: int) -> np.ndarray:
    plane = np.zeros(shape[1:], dtype=np.uint8)
    box = score.box
    if box[0].start <= z < box[0].stop:
        plane[box[1], box[2]] = score.weights[z - box[0].start]
    return plane


def _vessel_image(
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    vessels: ChestVessels,
    z: int,
    sections: list[tuple[str, Section]],
) -> np.ndarray:
    """One axial slice with each measured vessel's outline (edge points), its short axis and its diameter."""
    px = float(spacing[1])
    points = [p for _, s in sections for p in s.outline] + [s.centre for _, s in sections]
    rows = np.array([p[0] for p in points])
    cols = np.array([p[1] for p in points])
    box = _crop_box(rows, cols, hu.shape[1:], round(25.0 / px))
    level, width = MEDIASTINAL_WINDOW
    rgb = render.to_rgb(render.window(hu[z][box], level, width))
    image, zoom = _zoomed(rgb)
    draw = ImageDraw.Draw(image)
    r0, c0 = box[0].start, box[1].start

    def xy(point: tuple[float, float]) -> tuple[float, float]:
        return ((point[1] - c0 + 0.5) * zoom, (point[0] - r0 + 0.5) * zoom)

    for label, s in sections:
        colour = render.YELLOW if label.startswith("pulmonary") else render.MAGENTA
        for point in s.outline:
            x, y = xy(point)
            draw.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=colour)
        half = s.diameter_mm / 2.0 / px
        a = (s.centre[0] - math.sin(s.angle) * half, s.centre[1] - math.cos(s.angle) * half)
        b = (s.centre[0] + math.sin(s.angle) * half, s.centre[1] + math.cos(s.angle) * half)
        draw.line([xy(a), xy(b)], fill=render.CYAN, width=2)
        x, y = xy(s.centre)
        draw.text((x + 6, y - 6), f"{s.diameter_mm:.0f} mm", fill=render.WHITE)
    del vessels
    caption = (
        f"Axial slice {z + 1} of {hu.shape[0]}, patient right on the left; W{width:.0f}/L{level:.0f}\n"
        "Dots: outer wall found (magenta: aorta, yellow: pulmonary trunk)\n"
        "Cyan line: diameter perpendicular to the centreline\n"
        + "\n".join(f"{label}: {s.diameter_mm:.0f} mm" for label, s in sections)
    )
    return render.label(np.asarray(image), caption, font_size=12)

"""Where a hippocampal volume lies among healthy people of the same age and sex: a published nomogram.

Source: Nobis L, Manohar SG, Smith SM, Alfaro-Almagro F, Jenkinson M, Mackay CE, Husain M. Hippocampal volume
across age: Nomograms derived from over 19,700 people in UK Biobank. NeuroImage: Clinical 2019;23:101904
(open access, CC BY 4.0). The percentile curves below are those of its chart for the right hippocampus of women,
volumes uncorrected for head size, ages 52-71, as distributed with the hippocampus training data
(``nomogram_fem_right.svg``); they were read from the chart's vector curves by
:mod:`models.training.digitise_nomogram`, exactly, not traced from pixels.

What the project holds is that one chart, so a percentile is given only for the right hippocampus of a woman
aged 52-71; for men, the left hippocampus or other ages the analyzer says that no reference applies rather than
borrowing a chart. Limits a reader must know (also on the model card):

* population: UK Biobank volunteers (healthier than the general population), 3 T Siemens Skyra, 1 mm MPRAGE;
* method: the nomogram's volumes are FSL FIRST segmentations of the whole hippocampus; this analyzer measures the
  anterior + posterior hippocampus as the MSD Task04 experts traced it, on a crop. The methods differ, and no
  conversion between them is published; the MSD expert volumes are smaller on average (see the card), which
  moves percentiles down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise
from statistics import NormalDist

import numpy as np

from models.base import PatientContext

NOMOGRAM_CITATION = (
    "Nobis L, Manohar SG, Smith SM, et al. Hippocampal volume across age: Nomograms derived from over 19,700 "
    "people in UK Biobank. NeuroImage: Clinical 2019;23:101904"
)
NOMOGRAM_NAME = "UK Biobank nomogram, right hippocampus of women (Nobis et al. 2019)"

AGES = tuple(range(52, 72))
"""Whole years covered by the chart (its age axis)."""

WOMEN_RIGHT_MM3: dict[float, tuple[int, ...]] = {
    # ages:  52    53    54    55    56    57    58    59    60    61
    #        62    63    64    65    66    67    68    69    70    71
    2.5:  (2999, 2990, 2978, 2965, 2952, 2946, 2948, 2953, 2952, 2944,
           2930, 2919, 2914, 2908, 2903, 2902, 2900, 2891, 2878, 2869),
    5.0:  (3164, 3155, 3144, 3133, 3126, 3125, 3132, 3137, 3131, 3114,
           3100, 3090, 3084, 3082, 3079, 3070, 3049, 3021, 2997, 2981),
    10.0: (3351, 3346, 3338, 3328, 3318, 3315, 3317, 3320, 3316, 3305,
           3289, 3269, 3252, 3241, 3232, 3218, 3201, 3184, 3167, 3154),
    25.0: (3591, 3590, 3588, 3585, 3581, 3577, 3574, 3569, 3562, 3555,
           3548, 3537, 3525, 3511, 3495, 3479, 3461, 3440, 3419, 3404),
    50.0: (3857, 3855, 3852, 3847, 3841, 3836, 3834, 3833, 3830, 3825,
           3815, 3800, 3784, 3769, 3754, 3737, 3715, 3694, 3678, 3667),
    75.0: (4105, 4103, 4101, 4098, 4095, 4092, 4090, 4087, 4082, 4076,
           4069, 4059, 4047, 4034, 4015, 3991, 3965, 3937, 3913, 3896),
    90.0: (4346, 4345, 4344, 4339, 4329, 4317, 4307, 4299, 4293, 4287,
           4282, 4280, 4278, 4273, 4258, 4233, 4204, 4173, 4148, 4132),
    95.0: (4513, 4509, 4504, 4497, 4484, 4469, 4455, 4443, 4430, 4419,
           4415, 4414, 4410, 4399, 4384, 4364, 4338, 4308, 4282, 4265),
    97.5: (4628, 4625, 4621, 4614, 4603, 4592, 4583, 4574, 4561, 4550,
           4544, 4542, 4542, 4540, 4531, 4504, 4467, 4433, 4409, 4394),
}  # fmt: skip
"""Percentile -> right-hippocampus volume (mm3) of women at each age in :data:`AGES` (Nobis et al. 2019)."""

ATROPHY_PERCENTILE = 5.0
"""Below the 5th percentile for age and sex: atrophy suspected (the cut-off the issue and the chart's users apply;
the chart's 5th-percentile curve, not an extrapolation)."""


@dataclass(frozen=True)
class NormativeComparison:
    """The volume against the nomogram: where it lies when a reference applies, or why none does.

    ``percentile`` is ``None`` outside the chart's 2.5th-97.5th range (``position`` then says "below the 2.5th
    percentile" or "above the 97.5th percentile") and when no reference applies (``reason``).
    ``fifth_percentile_ml`` is the volume at the 5th percentile for this age (mL, 2 decimals, rounded up): the lower
    limit of the normal range; ``below_fifth`` compares the volume as given (the filed value) with it.
    """

    applies: bool
    reason: str = ""
    percentile: float | None = None
    position: str = ""
    below_fifth: bool = False
    fifth_percentile_ml: float | None = None
    median_ml: float | None = None


def _curves_at(age: float) -> dict[float, float]:
    """Each percentile curve's volume (mm3) at ``age``, linear between whole years."""
    return {p: float(np.interp(age, AGES, volumes)) for p, volumes in WOMEN_RIGHT_MM3.items()}


def percentile_of(volume_mm3: float, age: float) -> tuple[float | None, str]:
    """The percentile of a right-hippocampus volume of a woman of ``age`` (52-71), and where it lies in words.

    Between two curves the percentile is interpolated on the normal-quantile scale (z), on which the chart's
    percentile levels of a near-normal quantity are evenly spaced; outside the outermost curves no number is
    given (the chart does not say how far beyond them a volume lies).
    """
    curves = _curves_at(age)
    levels = sorted(curves)
    if volume_mm3 < curves[levels[0]]:
        return None, f"below the {_ordinal(levels[0])} percentile"
    if volume_mm3 > curves[levels[-1]]:
        return None, f"above the {_ordinal(levels[-1])} percentile"
    normal = NormalDist()
    for low, high in pairwise(levels):
        if curves[low] <= volume_mm3 <= curves[high]:
            z_low, z_high = normal.inv_cdf(low / 100.0), normal.inv_cdf(high / 100.0)
            fraction = (volume_mm3 - curves[low]) / (curves[high] - curves[low]) if curves[high] > curves[low] else 0.0
            percentile = 100.0 * normal.cdf(z_low + fraction * (z_high - z_low))
            shown = round(percentile) if percentile >= 10.0 else round(percentile, 1)  # 4.6th, not "5th" below 5
            return percentile, f"at the {_ordinal(shown)} percentile"
    raise AssertionError("unreachable: the curves are ordered")  # pragma: no cover


def _ordinal(value: float) -> str:
    text = f"{value:g}"
    if "." in text or text.endswith(("11", "12", "13")) or not text.endswith(("1", "2", "3")):
        return text + "th"
    return text + {"1": "st", "2": "nd", "3": "rd"}[text[-1]]


def compare(volume_ml: float, patient: PatientContext, side: str) -> NormativeComparison:
    """Compare a hippocampal volume with the nomogram, when the patient and the side are the chart's."""
    missing = [what for what, value in (("age", patient.age_years), ("sex", patient.sex)) if value is None]
    if missing:
        return NormativeComparison(False, f"the EHR does not give the patient's {' or '.join(missing)}")
    assert patient.age_years is not None
    if patient.sex != "female":
        return NormativeComparison(
            False, f"the nomogram held here is for women only (patient's administrative sex: {patient.sex})"
        )
    if side != "right":
        return NormativeComparison(False, f"the nomogram held here is for the right hippocampus (this is the {side})")
    if not AGES[0] <= patient.age_years <= AGES[-1]:
        return NormativeComparison(
            False, f"the nomogram covers ages {AGES[0]}-{AGES[-1]}; the patient is {patient.age_years}"
        )
    curves = _curves_at(patient.age_years)
    # The lower limit of normal as filed (mL, 2 decimals), rounded up so that a volume filed at or above it is at or
    # above the 5th-percentile curve: the filed value, its reference range and the category always agree.
    fifth_ml = math.ceil(curves[ATROPHY_PERCENTILE] / 10.0) / 100.0
    percentile, position = percentile_of(1000.0 * volume_ml, patient.age_years)
    return NormativeComparison(
        True,
        percentile=percentile,
        position=position,
        below_fifth=volume_ml < fifth_ml,
        fifth_percentile_ml=fifth_ml,
        median_ml=curves[50.0] / 1000.0,
    )

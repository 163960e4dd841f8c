"""Hippocampal volumetry on brain MRI: a 3-D network trained here on expert labels, a published nomogram.

Input: a hippocampal crop series of a T1-weighted brain MRI, as an upstream pipeline (a "HippoCrop" tool) sends
it to the PACS: about 35 x 50 x 35 mm around one hippocampus at about 1 mm. The analyzer presents the crop to the
network in the frame of its training crops (:mod:`models.hippocampus_net`: right, anterior, superior; a left
hippocampus mirrored), resampled to 1 mm, segments the anterior and posterior hippocampus, and reports:

* volumes in mL: anterior, posterior, total (voxel counts of the segmentation at 1 mm);
* the total volume's percentile for age and sex where the published nomogram applies
  (:mod:`models.hippocampus_nomogram`), and a category: below the 5th percentile, atrophy suspected, or within
  the normal range; "no normative reference" when the nomogram does not cover the patient;
* key images: coronal and sagittal sections through the hippocampus with the segmentation outlined.

Refused, each with its reason: other modalities (CT), other body parts, slices thicker than 1.5 mm, and fields of
view larger than a hippocampal crop (a whole-brain series: finding the hippocampus in a whole brain needs a
localiser this analyzer does not have, so it says to send the crop series instead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from core.errors import UnsuitableInputError
from models import render
from models.base import (
    AnalysisResult,
    Category,
    Explanation,
    ImageInput,
    Measurement,
    SeriesRequirements,
)
from models.hippocampus_net import (
    LABELS,
    NETWORK_VOXEL_MM,
    ShippedSegmenter,
    label_volumes_ml,
    load_shipped_segmenter,
)
from models.hippocampus_nomogram import (
    ATROPHY_PERCENTILE,
    NOMOGRAM_CITATION,
    NOMOGRAM_NAME,
    NormativeComparison,
    compare,
)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

BRAIN_BODY_PARTS = ("BRAIN", "HEAD", "HEADNECK", "HIPPOCAMPUS")
"""BodyPartExamined values (DICOM PS3.16 CID 4031 terms, and the structure itself) a brain MR may carry."""

MAX_SLICE_MM = 1.5
"""Thicker slices are refused. The reference protocols for hippocampal volumetry are 3-D T1 at about 1 mm (ADNI
MP-RAGE 1.0 x 1.0 x 1.2 mm, Jack et al., J Magn Reson Imaging 2008;27:685-691); the network learnt the boundary on
1 mm voxels, and at 5 mm a 35 mm-long anterior hippocampus spans a handful of partial-volume slices."""

MAX_CROP_MM = (64.0, 80.0, 64.0)
"""Largest field of view accepted (right-left, anterior-posterior, inferior-superior, mm): the training crops
measure at most 41 x 59 x 47 mm. A larger field of view is not a hippocampal crop (for example a whole brain)."""

MIN_CROP_MM = (24.0, 32.0, 20.0)
"""Smallest field of view accepted: the training crops measure at least 31 x 40 x 24 mm; an adult hippocampus is
about 40 mm long (Duvernoy HM, The Human Hippocampus, 3rd ed., Springer 2005)."""

MAX_OBLIQUITY_DEGREES = 30.0
"""The crop's axes may deviate this far from the patient's axes; beyond, which axis is which is ambiguous."""

ADULT_RANGE_ML = (1.73, 5.68)
"""Range of normal adult hippocampal volumes reported across MRI and histology studies (Honeycutt NA, Smith CD.
Hippocampal volume measurements using magnetic resonance imaging in normal young adults. J Neuroimaging
1995;5:95-100); a volume outside it is flagged for review."""

MIN_RECOGNISED_ML = 0.5
"""Below this the network found no hippocampus in the crop (under a third of the smallest normal adult volume
above): the crop shows something else, and nothing is reported."""

LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])

CROP_WARNING = (
    "Volumes are of the anterior and posterior hippocampus as traced by the MSD Task04 experts (Vanderbilt), on "
    "a crop; the nomogram measured the whole hippocampus with FSL FIRST on UK Biobank 3 T scans. The methods "
    "differ and no conversion is published: compare percentiles over time on the same method, not across methods."
)


@dataclass(frozen=True)
class CropGeometry:
    """How the input array maps onto the network frame (axis 0 right, 1 anterior, 2 superior).

    ``order[k]`` is the input axis that becomes network axis ``k``; ``flip[k]`` says whether it is reversed.
    ``spacing`` is the voxel size along the network axes (mm); ``obliquity`` the largest angle (degrees) between
    an input axis and the patient axis it was matched to.
    """

    order: tuple[int, int, int]
    flip: tuple[bool, bool, bool]
    spacing: tuple[float, float, float]
    obliquity: float


def crop_geometry(direction: np.ndarray, spacing: tuple[float, ...]) -> CropGeometry:
    """Match each array axis to the patient axis it most nearly follows (in RAS) and say how to reorient.

    ``direction[k]`` is the LPS unit vector of array axis ``k`` (``dicom_io.volume.Volume.direction``).
    """
    ras = np.asarray(direction, dtype=float) * LPS_TO_RAS
    dominant = np.argmax(np.abs(ras), axis=1)
    if sorted(dominant.tolist()) != [0, 1, 2]:
        raise UnsuitableInputError(
            "The crop's axes do not each follow one patient axis (two run along the same one).",
            remedy="Send the crop in its acquisition geometry, reconstructed along the patient axes.",
        )
    order = tuple(int(np.flatnonzero(dominant == k)[0]) for k in range(3))
    flip = tuple(bool(ras[order[k], k] < 0) for k in range(3))
    cosines = [abs(float(ras[order[k], k])) for k in range(3)]
    obliquity = math.degrees(math.acos(min(1.0, min(cosines))))
    return CropGeometry(
        order=(order[0], order[1], order[2]),
        flip=(flip[0], flip[1], flip[2]),
        spacing=(float(spacing[order[0]]), float(spacing[order[1]]), float(spacing[order[2]])),
        obliquity=obliquity,
    )


def to_network_frame(array: np.ndarray, geometry: CropGeometry, *, mirror: bool) -> np.ndarray:
    """The input array reordered (and flipped) into the network frame; ``mirror`` flips right-left as well."""
    out = np.transpose(array, geometry.order)
    for axis in range(3):
        if geometry.flip[axis] != (mirror and axis == 0):
            out = np.flip(out, axis=axis)
    return np.ascontiguousarray(out)


def from_network_frame(array: np.ndarray, geometry: CropGeometry, *, mirror: bool) -> np.ndarray:
    """Inverse of :func:`to_network_frame` (labels back onto the input array)."""
    out = array
    for axis in range(3):
        if geometry.flip[axis] != (mirror and axis == 0):
            out = np.flip(out, axis=axis)
    return np.ascontiguousarray(np.transpose(out, np.argsort(geometry.order)))


def resample_to(array: np.ndarray, spacing: tuple[float, float, float], target_mm: float, order: int) -> np.ndarray:
    """Resample to isotropic ``target_mm`` voxels (linear for images, nearest for labels); a no-op at that size."""
    zoom = tuple(s / target_mm for s in spacing)
    if all(abs(z - 1.0) < 0.02 for z in zoom):
        return array
    return ndimage.zoom(array, zoom, order=order, mode="nearest", grid_mode=True)


@dataclass(frozen=True)
class HippocampusSegmentation:
    """The network's segmentation of one crop, in the network frame at 1 mm, and how it was obtained."""

    image: np.ndarray  # the crop as the network saw it (network frame, 1 mm)
    labels: np.ndarray  # 0 background, 1 anterior, 2 posterior (network frame, 1 mm)
    side: str  # "right" or "left"
    side_source: str  # how the side was known
    geometry: CropGeometry

    @property
    def volumes_ml(self) -> dict[str, float]:
        return label_volumes_ml(self.labels, (NETWORK_VOXEL_MM,) * 3)

    def network_frame(self, input_labels: np.ndarray) -> np.ndarray:
        """A label map on the input array (a reference segmentation) moved into the network frame at 1 mm, so it
        can be compared voxel for voxel with :attr:`labels`."""
        moved = to_network_frame(input_labels, self.geometry, mirror=self.side == "left")
        moved = resample_to(moved, self.geometry.spacing, NETWORK_VOXEL_MM, order=0)
        if moved.shape != self.labels.shape:  # rounding of the zoomed size: pad or cut the far edges
            moved = moved[tuple(slice(0, n) for n in self.labels.shape)]
            moved = np.pad(moved, [(0, n - m) for n, m in zip(self.labels.shape, moved.shape, strict=True)])
        return moved


class HippocampusAnalyzer:
    """Hippocampal crop of a T1-weighted brain MRI -> anterior, posterior and total volume, percentile, category."""

    name = "mr-hippocampus"
    version = "1.0.0"
    title = "Hippocampal volumetry on brain MRI (MSD-trained 3-D UNet, UK Biobank nomogram)"
    # The crop is the series to analyse: its description ranks it first; a body-part match would rank the whole-
    # brain T1 it was cut from above it (derived crops seldom record BodyPartExamined), so body parts only filter.
    requirements = SeriesRequirements(
        modalities=("MR",),
        description_keywords=("hippocrop", "hippocampus", "hippo"),
        excluded_description_keywords=("localizer", "localiser", "scout", "survey", "rcbv", "perfusion", "dwi"),
        accepted_body_parts=BRAIN_BODY_PARTS,
    )
    uses_patient_context = True

    def __init__(self, weights: Path | None = None, expected_sha256: str | None = None) -> None:
        self.weights = weights or WEIGHTS_DIR / "hippocampus_unet.pt"
        self._segmenter: ShippedSegmenter = load_shipped_segmenter(self.weights, expected_sha256)
        self.model_sha256 = self._segmenter.sha256

    # ----------------------------------------------------------------------------------------------- input guard

    def check_input(self, image: ImageInput) -> None:
        """MR of the brain, a 3-D crop of known orientation, slices <= 1.5 mm, the size of a hippocampal crop."""
        modality = image.modality.upper()
        if modality != "MR":
            raise UnsuitableInputError(
                f"{self.name} reads brain MRI; this series is {modality or 'of unknown modality'}.",
                remedy="Send the hippocampal crop (HippoCrop) series of a T1-weighted brain MRI.",
            )
        body_part = (image.attributes.get("BodyPartExamined") or "").strip().upper()
        if body_part and body_part not in BRAIN_BODY_PARTS:
            raise UnsuitableInputError(
                f"{self.name} reads brain MRI; this series' BodyPartExamined is {body_part}.",
                remedy="Send the hippocampal crop series of a brain MRI.",
            )
        if image.array.ndim != 3 or min(image.array.shape) < 2:
            raise UnsuitableInputError(
                f"{self.name} needs a 3-D volume; got an array of shape {image.array.shape}.",
                remedy="Send the whole crop series, not a single slice.",
            )
        if image.direction is None:
            raise UnsuitableInputError(
                f"{self.name}: the volume's orientation is not known, so right, anterior and superior cannot be "
                "told apart.",
                remedy="Send a DICOM series with ImageOrientationPatient and ImagePositionPatient.",
            )
        geometry = crop_geometry(np.asarray(image.direction), image.spacing)
        thickness, gap = _slice_thickness(image), max(float(s) for s in image.spacing)
        if max(thickness, gap) > MAX_SLICE_MM:
            described = f"{thickness:.1f} mm thick" if thickness else "of unstated thickness"
            raise UnsuitableInputError(
                f"{self.name}: slices are {described}, {gap:.1f} mm apart; hippocampal volumetry needs slices of at "
                f"most {MAX_SLICE_MM} mm (a 3-D T1 at about 1 mm).",
                remedy="Send a 3-D T1-weighted series (MP-RAGE or equivalent, about 1 mm) or its hippocampal crop.",
            )
        if geometry.obliquity > MAX_OBLIQUITY_DEGREES:
            raise UnsuitableInputError(
                f"{self.name}: the crop is tilted {geometry.obliquity:.0f} degrees from the patient's axes (at most "
                f"{MAX_OBLIQUITY_DEGREES:.0f} accepted).",
                remedy="Send the crop reconstructed along the patient's axes.",
            )
        shape = [image.array.shape[axis] for axis in geometry.order]
        extent = tuple(n * s for n, s in zip(shape, geometry.spacing, strict=True))
        described = " x ".join(f"{e:.0f}" for e in extent)
        if any(e > limit for e, limit in zip(extent, MAX_CROP_MM, strict=True)):
            raise UnsuitableInputError(
                f"{self.name}: the field of view is {described} mm (right-left x anterior-posterior x "
                "inferior-superior), larger than a hippocampal crop: this looks like a whole-brain series. "
                "Locating the hippocampus in a whole brain is not supported.",
                remedy="Send the hippocampal crop (HippoCrop) series that the upstream pipeline makes from the 3-D "
                f"T1, at most {' x '.join(f'{m:.0f}' for m in MAX_CROP_MM)} mm around one hippocampus.",
            )
        if any(e < limit for e, limit in zip(extent, MIN_CROP_MM, strict=True)):
            raise UnsuitableInputError(
                f"{self.name}: the field of view is {described} mm, too small to hold a whole hippocampus "
                f"(at least {' x '.join(f'{m:.0f}' for m in MIN_CROP_MM)} mm).",
                remedy="Send the complete hippocampal crop series.",
            )
        low, high = np.percentile(image.array, [1, 99])
        if not high > low:
            raise UnsuitableInputError(
                f"{self.name}: the crop is (nearly) constant; it cannot show the hippocampus.",
                remedy="Check the stored pixel data and send the crop series again.",
            )

    # ----------------------------------------------------------------------------------------------- analysis

    def segment(self, image: ImageInput) -> HippocampusSegmentation:
        """The crop in the network frame at 1 mm, and the network's label map of it (the core of :meth:`analyze`)."""
        assert image.direction is not None
        geometry = crop_geometry(np.asarray(image.direction), image.spacing)
        side, side_source = _side(image)
        crop = to_network_frame(np.asarray(image.array, dtype=np.float32), geometry, mirror=side == "left")
        crop = resample_to(crop, geometry.spacing, NETWORK_VOXEL_MM, order=1)
        labels = self._segmenter.segment(crop)
        return HippocampusSegmentation(crop, labels, side, side_source, geometry)

    def analyze(self, image: ImageInput) -> AnalysisResult:
        return self.report(image, self.segment(image))

    def report(self, image: ImageInput, segmentation: HippocampusSegmentation) -> AnalysisResult:
        """The findings from a segmentation of ``image`` (:meth:`analyze` is ``report(image, segment(image))``)."""
        volumes = segmentation.volumes_ml
        if volumes["total"] < MIN_RECOGNISED_ML:
            raise UnsuitableInputError(
                f"{self.name}: no hippocampus was recognised in the crop (segmented {volumes['total']:.2f} mL).",
                remedy="Check that the series is the hippocampal crop of a T1-weighted brain MRI.",
            )
        side = segmentation.side
        warnings = [CROP_WARNING]
        if segmentation.side_source != "DICOM Laterality":
            warnings.append(
                "The series does not record which hippocampus it shows (DICOM Laterality); it was read as the "
                "right, the convention of the training crops and of the HippoCrop tool."
            )
        if not ADULT_RANGE_ML[0] <= volumes["total"] <= ADULT_RANGE_ML[1]:
            warnings.append(
                f"Total volume {volumes['total']:.2f} mL is outside the published adult range "
                f"{ADULT_RANGE_ML[0]}-{ADULT_RANGE_ML[1]} mL: check the segmentation on the key images."
            )
        if segmentation.geometry.obliquity > 10.0:
            warnings.append(
                f"The crop is tilted {segmentation.geometry.obliquity:.0f} degrees from the patient's axes; the "
                "training crops were not."
            )
        normative = compare(round(volumes["total"], 2), image.patient, side)
        measurements = self._measurements(volumes, side, normative)
        category, conclusion = self._categorise(volumes["total"], side, normative, image)
        explanations = _key_images(segmentation, volumes, normative)
        return AnalysisResult(
            self.name,
            self.version,
            measurements,
            category,
            conclusion,
            explanations,
            warnings=tuple(warnings),
        )

    def _measurements(
        self, volumes: dict[str, float], side: str, normative: NormativeComparison
    ) -> tuple[Measurement, ...]:
        # mL to 2 decimals (10 voxels of 1 mm3): finer than the segmentation's agreement with the experts (see the
        # card); the nomogram is compared with this filed value, so value, reference range and category agree
        total = round(volumes["total"], 2)
        total_measurement = Measurement(
            f"{side}_hippocampus_volume_ml",
            f"{side.capitalize()} hippocampal volume (anterior + posterior)",
            total,
            "mL",
        )
        if normative.applies and normative.fifth_percentile_ml is not None:
            total_measurement = replace(
                total_measurement,
                interpretation="L" if normative.below_fifth else "N",
                reference_low=normative.fifth_percentile_ml,
                note=f"Normal range from the 5th percentile for age and sex, {NOMOGRAM_NAME}.",
            )
        # the total and its percentile first: a card or an order note shows the first values of a report
        measurements = [total_measurement]
        if normative.applies and normative.percentile is not None:
            measurements.append(
                Measurement(
                    f"{side}_hippocampus_volume_percentile",
                    f"{side.capitalize()} hippocampal volume percentile for age and sex",
                    round(normative.percentile, 1),
                    "%",
                    interpretation="L" if normative.below_fifth else "N",
                    reference_low=ATROPHY_PERCENTILE,
                    note=f"{NOMOGRAM_CITATION}. Methods differ: see the model card.",
                )
            )
        measurements += [
            Measurement(
                f"{side}_hippocampus_{name}_volume_ml",
                f"{side.capitalize()} {name} hippocampal volume",
                round(volumes[name], 2),
                "mL",
            )
            for name in LABELS.values()
        ]
        return tuple(measurements)

    def _categorise(
        self, total_ml: float, side: str, normative: NormativeComparison, image: ImageInput
    ) -> tuple[Category, str]:
        volume = f"{side.capitalize()} hippocampal volume {total_ml:.2f} mL"
        rule = (
            f"Total hippocampal volume below the {ATROPHY_PERCENTILE:g}th percentile for age and sex of the "
            f"{NOMOGRAM_NAME} ({NOMOGRAM_CITATION})"
        )
        if not normative.applies:
            category = Category("no-normative-reference", "No normative reference for this patient", rule, False)
            return category, f"{volume}. No percentile: {normative.reason}."
        age = image.patient.age_years
        where = f"{normative.position} for women aged {age}"
        if normative.below_fifth:
            category = Category("atrophy-suspected", "Below the 5th percentile: atrophy suspected", rule, True)
            return category, (
                f"{volume}, {where} (5th percentile {normative.fifth_percentile_ml:.2f} mL): atrophy suspected. "
                "Method differences bias percentiles low: confirm on the images."
            )
        category = Category("within-normal-range", "Within the normal range for age and sex", rule, False)
        return category, f"{volume}, {where} (5th percentile {normative.fifth_percentile_ml:.2f} mL)."


def _slice_thickness(image: ImageInput) -> float:
    """The stated SliceThickness in mm (0 when absent or unreadable); the spacing is checked beside it."""
    stated = image.attributes.get("SliceThickness")
    try:
        return float(stated) if stated not in (None, "") else 0.0
    except ValueError:
        return 0.0


def _side(image: ImageInput) -> tuple[str, str]:
    """Which hippocampus the crop shows: DICOM Laterality when the series records it, else the training crops'
    convention (right)."""
    laterality = (image.attributes.get("Laterality") or image.attributes.get("ImageLaterality") or "").strip().upper()
    if laterality == "L":
        return "left", "DICOM Laterality"
    if laterality == "R":
        return "right", "DICOM Laterality"
    return "right", "convention of the training crops"


# --------------------------------------------------------------------------------------------------- key images

_LABEL_COLOURS = {1: render.YELLOW, 2: render.CYAN}


_KEY_IMAGE_MIN_WIDTH = 480
"""Pixels; a 35 mm crop is enlarged to at least this width so the outlines and the caption are readable."""


def _inner_border(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (pixels beyond the image count as outside)."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    inner[[0, -1], :] = False
    inner[:, [0, -1]] = False
    return mask & ~inner


def _section_rgb(gray: np.ndarray, labels: np.ndarray, caption: str) -> np.ndarray:
    """One 1-mm section, grey 1st-99.5th percentile window, enlarged with each voxel a square (what was measured
    is what is shown), each label outlined two pixels wide in its colour, captioned."""
    low, high = np.percentile(gray, [1.0, 99.5])
    image = render.window(gray, (low + high) / 2.0, max(float(high - low), 1e-6))
    zoom = max(8, math.ceil(_KEY_IMAGE_MIN_WIDTH / image.shape[1]))
    rgb = render.to_rgb(np.repeat(np.repeat(image, zoom, axis=0), zoom, axis=1))
    for value, colour in _LABEL_COLOURS.items():
        mask = np.repeat(np.repeat(labels == value, zoom, axis=0), zoom, axis=1)
        border = _inner_border(mask)
        border |= _inner_border(mask & ~border)  # two pixels wide: still visible when printed
        rgb[border] = colour
    return render.label(rgb, caption, font_size=12)


def _key_images(
    segmentation: HippocampusSegmentation, volumes: dict[str, float], normative: NormativeComparison
) -> tuple[Explanation, ...]:
    """Coronal and sagittal sections through the hippocampus's centre, with both labels outlined.

    Network frame: axis 0 right, 1 anterior, 2 superior. Coronal = fixed axis 1, shown superior up, right on the
    viewer's left (radiological convention); sagittal = fixed axis 0, superior up, anterior on the left.
    """
    image, labels = segmentation.image, segmentation.labels
    centre = [round(float(c.mean())) for c in np.nonzero(labels > 0)]
    legend = "Outlines: yellow anterior, cyan posterior hippocampus; squares: 1 mm voxels."
    coronal_image = np.flipud(np.fliplr(image[:, centre[1], :].T))  # superior up, patient right on the left
    coronal_labels = np.flipud(np.fliplr(labels[:, centre[1], :].T))
    sagittal_image = np.flipud(np.fliplr(image[centre[0], :, :].T))  # superior up, anterior on the left
    sagittal_labels = np.flipud(np.fliplr(labels[centre[0], :, :].T))
    side = segmentation.side
    mirrored = "\n(a left crop, mirrored to the training orientation)" if side == "left" else ""
    summary = (
        f"{side.capitalize()}: anterior {volumes['anterior']:.2f} mL, posterior {volumes['posterior']:.2f} mL,\n"
        f"total {volumes['total']:.2f} mL" + (f", {normative.position}" if normative.applies else "") + f".{mirrored}"
    )
    coronal_caption = f"Coronal, superior up, patient right on the viewer's left.\n{legend}\n{summary}"
    sagittal_caption = f"Sagittal, superior up, anterior on the left.\n{legend}\n{summary}"
    coronal_png, sagittal_png = render.to_pngs(
        [
            _section_rgb(coronal_image, coronal_labels, coronal_caption),
            _section_rgb(sagittal_image, sagittal_labels, sagittal_caption),
        ]
    )
    return (
        Explanation(
            title="Coronal section through the hippocampus with the segmentation outlined",
            kind="overlay",
            png=coronal_png,
            slice_index=centre[1],
        ),
        Explanation(
            title="Sagittal section through the hippocampus with the segmentation outlined",
            kind="overlay",
            png=sagittal_png,
            slice_index=centre[0],
        ),
    )

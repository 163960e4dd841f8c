"""The shared LIDC-IDRI nodule volumes of interest: reading them, and the patient split every figure uses.

``../shared/data/ct/lidc_nodule_vois/`` holds one CT crop per nodule (``image/<patient>_R_<nodule>.nii.gz``, HU)
with the radiologists' consensus mask (``nodule_mask/``) and ``metadata.csv`` (consensus diameter, majority
ratings). A crop spans the nodule's own slices only (no slices above or below it) and about 30-45 mm in-plane.

The split is by patient, never by nodule, and needs no stored list: a patient's SHA-256 decides
(:func:`split_of`), so training, the card and ``imaging-cds evaluate`` agree on which patients were held out.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

Split = Literal["train", "val", "test"]
NoduleTexture = Literal["solid", "part-solid", "ground-glass"]

TEXTURE_CLASSES: dict[str, NoduleTexture] = {
    "Solid": "solid",
    "Solid/Mixed": "solid",
    "Part Solid/Mixed": "part-solid",
    "Non-Solid/Mixed": "ground-glass",
    "Non-Solid/GGO": "ground-glass",
}
"""LIDC texture rating (1 non-solid/GGO ... 5 solid) -> nodule type: 1-2 ground-glass, 3 part-solid, 4-5 solid."""

SPLIT_RULE = "first 8 hex digits of SHA-256(patient_id) mod 10: 0-6 train, 7 validation, 8-9 test"


def split_of(patient_id: str) -> Split:
    """The patient's split (:data:`SPLIT_RULE`): about 70 % train, 10 % validation, 20 % test."""
    bucket = int(hashlib.sha256(patient_id.encode("utf-8")).hexdigest()[:8], 16) % 10
    if bucket <= 6:
        return "train"
    return "val" if bucket == 7 else "test"


@dataclass(frozen=True)
class VoiRecord:
    """One row of ``metadata.csv``: what the radiologists said about one nodule."""

    patient_id: str
    nodule_id: str
    diameter_mm: float
    malignancy: int  # 1 highly unlikely ... 5 highly suspicious (majority rating)
    texture: NoduleTexture
    calcification: str  # LIDC wording: Absent, Solid, Central, Non-central, Laminated, Popcorn
    spiculation: int

    @property
    def name(self) -> str:
        return f"{self.patient_id}_R_{self.nodule_id}"

    @property
    def split(self) -> Split:
        return split_of(self.patient_id)


@dataclass(frozen=True)
class Voi:
    """One volume of interest: ``hu`` and ``mask`` as (slices, rows, columns), ``spacing`` in mm."""

    record: VoiRecord
    hu: np.ndarray
    mask: np.ndarray
    spacing: tuple[float, float, float]

    def seed(self) -> tuple[int, int, int]:
        """The mask voxel nearest the mask's centroid: where a reader would click on the nodule."""
        points = np.argwhere(self.mask)
        centre = points.mean(axis=0)
        z, y, x = (int(v) for v in points[int(np.argmin(((points - centre) ** 2).sum(axis=1)))])
        return z, y, x


def read_records(root: Path) -> list[VoiRecord]:
    """Every row of ``metadata.csv`` whose image and mask exist (two of the 796 have no CT crop)."""
    with (root / "metadata.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    records = []
    for row in rows:
        record = VoiRecord(
            patient_id=row["patient_id"],
            nodule_id=row["nodule_id"],
            diameter_mm=float(row["diameter_mm"]),
            malignancy=int(row["Malignancy_value"]),
            texture=TEXTURE_CLASSES[row["Texture"]],
            calcification=row["Calcification"],
            spiculation=int(row["Spiculation_value"]),
        )
        if (root / "image" / f"{record.name}.nii.gz").is_file() and (
            root / "nodule_mask" / f"{record.name}.nii.gz"
        ).is_file():
            records.append(record)
    return records


def load_voi(root: Path, record: VoiRecord) -> Voi:
    """The crop and its mask, transposed from NIfTI (x, y, z) to (slices, rows, columns)."""
    import nibabel as nib
    from nibabel.spatialimages import SpatialImage

    image = nib.load(str(root / "image" / f"{record.name}.nii.gz"))
    mask = nib.load(str(root / "nodule_mask" / f"{record.name}.nii.gz"))
    assert isinstance(image, SpatialImage) and isinstance(mask, SpatialImage)
    hu = np.ascontiguousarray(np.asarray(image.dataobj, dtype=np.float32).transpose(2, 1, 0))
    voxels = np.ascontiguousarray(np.asarray(mask.dataobj).transpose(2, 1, 0) > 0)
    zx, zy, zz = (float(v) for v in image.header.get_zooms()[:3])
    return Voi(record=record, hu=hu, mask=voxels, spacing=(zz, zy, zx))


def iter_vois(root: Path, splits: tuple[Split, ...] = ("train", "val", "test")) -> Iterator[Voi]:
    for record in read_records(root):
        if record.split in splits:
            yield load_voi(root, record)


def thicken(voi: Voi, thickness_mm: float = 5.0) -> Voi | None:
    """The crop as a thick-slice CT would show it: consecutive slices averaged into ``thickness_mm`` slabs.

    A real reconstruction, not a synthesis: a thick slice is the average of the thin ones it covers. The mask
    becomes the slabs any of whose slices held it. None when the slices are already that thick.
    """
    dz = voi.spacing[0]
    group = round(thickness_mm / dz)
    if group < 2:
        return None
    slabs = voi.hu.shape[0] // group
    if slabs < 1:
        group, slabs = voi.hu.shape[0], 1
    hu = voi.hu[: slabs * group].reshape(slabs, group, *voi.hu.shape[1:]).mean(axis=1)
    mask = np.asarray(voi.mask[: slabs * group].reshape(slabs, group, *voi.mask.shape[1:]).any(axis=1))
    if not mask.any():
        return None
    return Voi(record=voi.record, hu=hu.astype(np.float32), mask=mask, spacing=(dz * group, *voi.spacing[1:]))

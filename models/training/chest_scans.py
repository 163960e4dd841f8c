"""Whole chest CTs with a labelled lesion (the pyradiomics ``lung1`` and ``lung2`` scans), read for validation.

Each ``<name>_image.nrrd`` has a ``<name>_label.nrrd`` marking one lesion. The volume is given to the analyzer as
the pipeline would give it: (slices, rows, columns) in HU, inferior to superior, with its spacing and its DICOM
patient geometry (LPS), as :class:`models.base.ImageInput`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.base import ImageInput


@dataclass(frozen=True)
class LabelledScan:
    name: str
    image: ImageInput
    label: np.ndarray  # bool, the image's shape


def is_labelled_scan_folder(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*_label.nrrd"))


def read_labelled_scans(folder: Path) -> Iterator[LabelledScan]:
    """Every ``<name>_image.nrrd`` with its ``<name>_label.nrrd`` in ``folder``, in name order."""
    for label_path in sorted(folder.glob("*_label.nrrd")):
        name = label_path.name.removesuffix("_label.nrrd")
        image_path = folder / f"{name}_image.nrrd"
        if image_path.is_file():
            hu, spacing, origin, direction = _read(image_path)
            label, *_ = _read(label_path)
            image = ImageInput(
                array=hu,
                spacing=spacing,
                modality="CT",
                attributes={"Modality": "CT", "BodyPartExamined": "CHEST", "SliceThickness": f"{spacing[0]:g}"},
                origin=origin,
                direction=direction,
            )
            yield LabelledScan(name, image, label > 0)


def _read(
    path: Path,
) -> tuple[np.ndarray, tuple[float, float, float], tuple[float, float, float], tuple[tuple[float, float, float], ...]]:
    """(slices, rows, columns) float32, spacing (z, y, x), origin and axis directions in LPS."""
    import nrrd

    data, header = nrrd.read(str(path))
    directions = np.asarray(header["space directions"], dtype=np.float64)  # one row per file axis (x, y, z)
    origin = np.asarray(header["space origin"], dtype=np.float64)
    space = str(header.get("space", "")).lower()
    if space in ("right-anterior-superior", "ras"):
        flip = np.array([-1.0, -1.0, 1.0])
        directions, origin = directions * flip, origin * flip
    elif space not in ("left-posterior-superior", "lps"):
        raise ValueError(f"{path.name}: NRRD space {space!r} is neither LPS nor RAS.")
    steps = np.linalg.norm(directions, axis=1)
    if directions[2, 2] <= 0:
        raise ValueError(f"{path.name}: slices must run from the feet to the head.")
    volume = np.ascontiguousarray(np.asarray(data).transpose(2, 1, 0)).astype(np.float32)
    spacing = (float(steps[2]), float(steps[1]), float(steps[0]))
    unit = directions / steps[:, None]
    direction = tuple((float(unit[k, 0]), float(unit[k, 1]), float(unit[k, 2])) for k in (2, 1, 0))
    return volume, spacing, (float(origin[0]), float(origin[1]), float(origin[2])), direction

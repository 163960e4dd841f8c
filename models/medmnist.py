"""How MedMNIST v2 made its 28x28 images, applied to a radiograph the pipeline decoded.

The MedMNIST-trained classifiers (``cxr-pneumonia``, ``us-breast``) only ever saw images made this way, so an
inference image must be made the same way, pixel for pixel, to look like their training data. What the
MedMNIST authors state (Yang et al., MedMNIST v2, Scientific Data 2023;10:41, and the dataset descriptions in
the ``medmnist`` package's INFO and ``on_medmnist_plus.md``):

* the sources were 8-bit greyscale images (PneumoniaMNIST: the JPEG radiographs of Kermany et al. 2018, sizes
  (384-2,916) x (127-2,713); BreastMNIST: 500x500 ultrasound images);
* "we center-crop the images with a window size of length of the short edge and resize them into 1x28x28";
* the published images are stored as ``uint8``, and their intensities were not stretched: in PneumoniaMNIST the
  median image's brightest pixel is 206 and only 0.2 % of the training images reach 255, so each 28x28 image
  keeps the grey levels of its source.

The resampling filter is not stated in either source. Of the common ones, the high-frequency content of the
published images matches an anti-aliased (area-weighted) bilinear reduction - Pillow's ``BILINEAR`` resize,
whose triangle filter is widened by the reduction factor - and not a plain point-sampled one (nearest or
non-anti-aliased bilinear, which keep pixel-scale noise the published images do not have). Pillow's ``L``-mode
reduction of the 8-bit square is therefore what this module applies; because it is the literal recipe on the
literal 8-bit pixels, an 8-bit source image gives exactly the array the recipe gives (see the tests).

The DICOM-specific steps (Modality LUT, VOI LUT or window, MONOCHROME1, bit depth) happen before, in
``dicom_io.projection``: they turn the stored pixels into presentation values 0..1 (0 black, 1 white), and
``display_8bit`` makes the 8-bit greyscale image a workstation would export from them.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

INPUT_SIZE = 28


def display_8bit(presentation: np.ndarray) -> np.ndarray:
    """Presentation values 0..1 (0 black, 1 white) -> the 8-bit greyscale image a workstation exports."""
    values = np.asarray(presentation, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {values.shape}")
    return np.rint(np.clip(values, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)


def centre_square(rows: int, columns: int) -> tuple[int, int, int]:
    """``(top, left, side)`` of the centred square on the short edge: the part of the image the model sees."""
    side = min(rows, columns)
    return (rows - side) // 2, (columns - side) // 2, side


def reduce_like_medmnist(pixels: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """An 8-bit greyscale image -> its MedMNIST ``size`` x ``size`` image (``uint8``): centre square, reduce."""
    image = np.asarray(pixels)
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 image, got {image.dtype} of shape {image.shape}")
    top, left, side = centre_square(*image.shape)
    square = Image.fromarray(np.ascontiguousarray(image[top : top + side, left : left + side]))
    return np.asarray(square.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def medmnist_input(presentation: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """Presentation values 0..1 -> the model input: the MedMNIST image as float32 grey levels / 255."""
    return reduce_like_medmnist(display_8bit(presentation), size).astype(np.float32) / np.float32(255.0)

"""Explanation images shared by every analyzer: window a slice, overlay a mask or heatmap, add a caption.

Explanations must stay readable when printed in grey or viewed by a colour-blind reader, so a mask is drawn
as a tinted fill *with a hatch pattern* (texture survives without colour), region boundaries are drawn as
solid outlines, and every image carries a caption that names what each mark means. Everything here works
on small uint8 RGB arrays and returns new arrays; nothing touches the input volume.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

RGB = tuple[int, int, int]

LUNG_WINDOW = (-600.0, 1500.0)
"""(level, width) in HU: the conventional lung window (W1500 / L-600)."""

YELLOW: RGB = (255, 220, 0)
CYAN: RGB = (0, 200, 255)
MAGENTA: RGB = (230, 40, 200)
WHITE: RGB = (255, 255, 255)


def window(image: np.ndarray, level: float, width: float) -> np.ndarray:
    """Map ``level +/- width/2`` to 0..255 (uint8), clipping outside, as a radiology viewer's window does."""
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}.")
    low = level - width / 2.0
    scaled = (np.asarray(image, dtype=np.float32) - np.float32(low)) * np.float32(255.0 / width)
    return np.clip(scaled, 0.0, 255.0).astype(np.uint8)


def to_rgb(gray: np.ndarray) -> np.ndarray:
    """Grey uint8 (rows, columns) to RGB uint8 (rows, columns, 3)."""
    if gray.ndim == 3:
        return gray.copy()
    return np.repeat(gray[:, :, None], 3, axis=2)


def hatch(shape: tuple[int, int], spacing: int = 6) -> np.ndarray:
    """Boolean diagonal-line pattern; drawn solid inside a mask it keeps the mask visible without colour."""
    rows = np.arange(shape[0])[:, None]
    cols = np.arange(shape[1])[None, :]
    return ((rows + cols) % spacing) == 0


def overlay_mask(
    gray: np.ndarray, mask: np.ndarray, color: RGB = YELLOW, alpha: float = 0.45, hatched: bool = True
) -> np.ndarray:
    """Tint ``mask`` pixels of a grey or RGB image with ``color``; with ``hatched`` add solid diagonal lines."""
    if gray.shape[:2] != mask.shape:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {gray.shape[:2]}.")
    rgb = to_rgb(gray)
    if not mask.any():
        return rgb
    tint = np.asarray(color, dtype=np.float32)
    pixels = rgb[mask].astype(np.float32)
    rgb[mask] = np.clip((1.0 - alpha) * pixels + alpha * tint, 0, 255).astype(np.uint8)
    if hatched:
        rows, cols = np.nonzero(mask)
        on_line = (rows + cols) % 6 == 0  # the same diagonal lines as hatch(), computed only inside the mask
        rgb[rows[on_line], cols[on_line]] = color
    return rgb


def outline(rgb: np.ndarray, mask: np.ndarray, color: RGB = CYAN) -> np.ndarray:
    """Draw the one-pixel inner boundary of ``mask`` in ``color`` (returns a new image)."""
    out = to_rgb(rgb)
    edge = mask & ~ndimage.binary_erosion(mask)
    out[edge] = color
    return out


def heatmap(gray: np.ndarray, values: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a 0..1 map over a grey image with a lightness-ordered ramp (dark blue to yellow).

    The ramp rises monotonically in lightness, so high values read as brighter also in grey.
    """
    if gray.shape[:2] != values.shape:
        raise ValueError(f"heatmap shape {values.shape} does not match image shape {gray.shape[:2]}.")
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)[:, :, None]
    low = np.array([40, 20, 120], dtype=np.float32)
    high = np.array([255, 240, 40], dtype=np.float32)
    colours = low + v * (high - low)
    base = to_rgb(gray).astype(np.float32)
    weight = alpha * (v > 0.0)
    return np.clip((1.0 - weight) * base + weight * colours, 0, 255).astype(np.uint8)


def label(image: np.ndarray, text: str, font_size: int = 14) -> np.ndarray:
    """Put ``text`` (one or more lines) on a black band above the image, white on black for contrast."""
    rgb = to_rgb(image)
    font = _font(font_size)
    lines = text.splitlines() or [""]
    line_height = font_size + 4
    band = np.zeros((line_height * len(lines) + 6, rgb.shape[1], 3), dtype=np.uint8)
    canvas = Image.fromarray(band)
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, 3 + i * line_height), line, fill=WHITE, font=font)
    return np.concatenate([np.asarray(canvas), rgb], axis=0)


def to_pngs(images: Sequence[np.ndarray], compress_level: int = 1) -> list[bytes]:
    """Encode several images at once: Pillow releases the GIL while compressing, so threads overlap the work."""
    if len(images) < 2:
        return [to_png(image, compress_level) for image in images]
    with ThreadPoolExecutor(max_workers=len(images)) as pool:
        return list(pool.map(lambda image: to_png(image, compress_level), images))


def to_png(rgb: np.ndarray, compress_level: int = 1) -> bytes:
    """Encode an RGB or grey uint8 array as PNG; level 1 is three times faster than 6 and about 20% larger."""
    if rgb.dtype != np.uint8:
        raise ValueError(f"to_png needs uint8 pixels, got {rgb.dtype}; window the image first.")
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()

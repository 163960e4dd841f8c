"""Explanation images shared by every analyzer: window a slice, overlay a mask or heatmap, add a caption.

Explanations must stay readable when printed in grey or viewed by a colour-blind reader, so a mask is drawn
as a tinted fill *with a hatch pattern* (texture survives without colour), region boundaries are drawn as
solid outlines, and every image carries a caption that names what each mark means. Everything here works
on small uint8 RGB arrays and returns new arrays; nothing touches the input volume.
"""

from __future__ import annotations

import functools
import os
import struct
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageDraw, ImageFont

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
    inside = np.flatnonzero(mask)  # flat indices: a third of the time of 2-D boolean indexing and nonzero
    if inside.size == 0:
        return rgb
    pixels = rgb.reshape(-1, 3)
    tint = np.asarray(color, dtype=np.float32)
    blended = (1.0 - alpha) * pixels[inside].astype(np.float32) + alpha * tint
    pixels[inside] = np.clip(blended, 0, 255).astype(np.uint8)
    if hatched:
        rows, cols = np.divmod(inside, mask.shape[1])
        pixels[inside[(rows + cols) % 6 == 0]] = color  # the diagonal lines of hatch(), only inside the mask
    return rgb


def outline(rgb: np.ndarray, mask: np.ndarray, color: RGB = CYAN) -> np.ndarray:
    """Draw the one-pixel inner boundary of ``mask`` in ``color`` (returns a new image)."""
    out = to_rgb(rgb)
    # Erosion by the 4-neighbourhood (pixels beyond the image count as outside), done with slicing: a quarter
    # of the time of ndimage.binary_erosion on a 400 x 470 overlay, same pixels.
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    inner[[0, -1], :] = False
    inner[:, [0, -1]] = False
    out[mask & ~inner] = color
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
    lines = text.splitlines() or [""]
    line_height = font_size + 4
    band = np.zeros((line_height * len(lines) + 6, rgb.shape[1], 3), dtype=np.uint8)
    for i, line in enumerate(lines):
        # Lines do not overlap, so drawing them one at a time and keeping the brighter pixel is the same as
        # drawing them on one canvas; fixed lines (legends) are then rendered once per process.
        np.maximum(band, _caption_line(line, i, len(lines), font_size, rgb.shape[1]), out=band)
    return np.concatenate([band, rgb], axis=0)


@functools.lru_cache(maxsize=64)
def _caption_line(line: str, index: int, count: int, font_size: int, width: int) -> np.ndarray:
    """Line ``index`` of a ``count``-line caption drawn alone on its band (read-only: it is shared)."""
    line_height = font_size + 4
    canvas = Image.new("RGB", (width, line_height * count + 6))
    ImageDraw.Draw(canvas).text((4, 3 + index * line_height), line, fill=WHITE, font=_font(font_size))
    pixels = np.asarray(canvas)
    pixels.flags.writeable = False
    return pixels


def to_pngs(images: Sequence[np.ndarray], compress_level: int = 1) -> list[bytes]:
    """Encode several images at once: zlib releases the GIL while compressing, so threads overlap the work."""
    if len(images) < 2:
        return [to_png(image, compress_level) for image in images]
    return list(_encoder_pool().map(lambda image: to_png(image, compress_level), images))


def to_png(rgb: np.ndarray, compress_level: int = 1) -> bytes:
    """Encode a grey, RGB or RGBA uint8 array as PNG (lossless).

    Every row uses the PNG "Up" filter (the difference to the row above: one numpy subtraction for the whole
    image) before zlib. Pillow's encoder tries five filters on every row, which made it twice as slow for the
    same size (the three 398 x 472 chest CT overlays: 19 -> 10 ms and 142 -> 146 kB each). Level 1 is three
    times faster than 6 and about 20% larger.
    """
    if rgb.dtype != np.uint8:
        raise ValueError(f"to_png needs uint8 pixels, got {rgb.dtype}; window the image first.")
    channels = 1 if rgb.ndim == 2 else rgb.shape[2] if rgb.ndim == 3 else 0
    if channels not in _PNG_COLOUR_TYPE or 0 in rgb.shape:
        raise ValueError(f"to_png needs a grey, RGB or RGBA image, got an array of shape {rgb.shape}.")
    height, width = rgb.shape[:2]
    rows = np.ascontiguousarray(rgb).reshape(height, width * channels)
    filtered = np.empty((height, rows.shape[1] + 1), dtype=np.uint8)
    filtered[:, 0] = 2  # filter type "Up"; the row above the first one is taken as zeros
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    header = struct.pack(">IIBBBBB", width, height, 8, _PNG_COLOUR_TYPE[channels], 0, 0, 0)
    return b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", zlib.compress(filtered.data, compress_level)),
            _png_chunk(b"IEND", b""),
        ]
    )


_PNG_COLOUR_TYPE = {1: 0, 3: 2, 4: 6}
"""Channels -> PNG colour type: greyscale, truecolour, truecolour with alpha."""


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


@functools.cache
def _encoder_pool() -> ThreadPoolExecutor:
    """Threads kept for the process: starting three per analysis cost more than encoding one image."""
    return ThreadPoolExecutor(max_workers=4, thread_name_prefix="png-encoder")


# Threads do not survive fork(): a forked worker (gunicorn, a process pool) starts a pool of its own.
os.register_at_fork(after_in_child=_encoder_pool.cache_clear)


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()

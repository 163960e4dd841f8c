"""Explanation rendering: lung window arithmetic, colour-independent overlays, PNG encoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from models import render


def test_lung_window_maps_its_edges_to_black_and_white() -> None:
    level, width = render.LUNG_WINDOW
    hu = np.array([[-2000.0, -1350.0, -600.0, 150.0, 1000.0]], dtype=np.float32)
    assert render.window(hu, level, width).tolist() == [[0, 0, 127, 255, 255]]


def test_window_width_must_be_positive() -> None:
    with pytest.raises(ValueError, match="window width must be positive"):
        render.window(np.zeros((2, 2)), -600, 0)


def test_a_mask_stays_visible_without_colour() -> None:
    gray = np.full((60, 60), 60, dtype=np.uint8)
    mask = np.zeros((60, 60), dtype=bool)
    mask[10:50, 10:50] = True
    rgb = render.overlay_mask(gray, mask, render.YELLOW)
    luminance = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    inside, outside = luminance[mask], luminance[~mask]
    # Hatch lines make a texture inside the mask even in grey: two clearly different grey levels.
    assert len(np.unique(inside.round())) >= 2 and inside.max() - inside.min() > 50
    # Float32 luminance of an unchanged grey 60 is 60.000004; one unit of change in any channel moves it >= 0.11.
    np.testing.assert_allclose(outside, 60.0, atol=0.01)


def test_outline_marks_only_the_boundary() -> None:
    mask = np.zeros((20, 20), dtype=bool)
    mask[5:15, 5:15] = True
    rgb = render.outline(np.zeros((20, 20), dtype=np.uint8), mask, render.CYAN)
    marked = np.all(rgb == render.CYAN, axis=2)
    assert marked.sum() == 36  # the 10 x 10 square's one-pixel rim
    assert not marked[7:13, 7:13].any()


def test_label_adds_a_caption_band_and_png_round_trips() -> None:
    rgb = render.to_rgb(np.zeros((50, 120), dtype=np.uint8))
    captioned = render.label(rgb, "line one\nline two", font_size=12)
    assert captioned.shape[1] == 120 and captioned.shape[0] > 50
    assert captioned[: captioned.shape[0] - 50].max() == 255, "white caption text on the band"
    decoded = np.asarray(Image.open(io.BytesIO(render.to_png(captioned))))
    assert np.array_equal(decoded, captioned)


@pytest.mark.parametrize("shape", [(7, 9), (7, 9, 3), (7, 9, 4), (1, 1, 3)])
def test_png_is_lossless_for_grey_rgb_and_rgba(shape: tuple[int, ...]) -> None:
    pixels = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(render.to_png(pixels)))), pixels)


def test_png_needs_windowed_pixels() -> None:
    with pytest.raises(ValueError, match="window the image first"):
        render.to_png(np.zeros((4, 4), dtype=np.float32))


def test_heatmap_high_values_read_brighter_in_grey() -> None:
    gray = np.full((1, 3), 100, dtype=np.uint8)
    rgb = render.heatmap(gray, np.array([[0.0, 0.2, 1.0]]), alpha=0.6)
    luminance = rgb[0].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    assert rgb[0, 0].tolist() == [100, 100, 100], "zero leaves the image untouched"
    assert luminance[2] > luminance[1]

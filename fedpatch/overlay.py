"""Overlay pictures: an anomaly heat map blended over its image, with the threshold contour.

For people, not for evaluation (the maps themselves are written by :mod:`fedpatch.maps_io`).

- Colour scale: ``[0, 2 * threshold]`` when a threshold is known, so the threshold sits in
  the middle of the colour map (green in ``jet``) and red means at least twice the threshold,
  the same for every image and every run of a model; without a threshold, the range given by
  the caller (e.g. the min/max over an object's maps).
- White contour: the level set ``map = threshold`` (pixels whose score exceeds the image
  threshold); magenta contour: the ground-truth defect outline, when known.
- A caption strip under the image gives the image score, the threshold and the verdict
  (defective when ``score > threshold``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fedpatch.atomic import atomic_write
from fedpatch.maps_io import heatmap_rgb

THRESHOLD_COLOUR = (255, 255, 255)
GROUND_TRUTH_COLOUR = (255, 0, 255)
HEAT_ALPHA = 0.45


def verdict(score: float, threshold: float | None) -> str:
    """``"defective"`` when ``score > threshold``, ``"good"`` otherwise, ``"unknown"`` without one."""
    if threshold is None:
        return "unknown"
    return "defective" if score > threshold else "good"


def colour_range(threshold: float | None, lo: float, hi: float) -> tuple[float, float]:
    """The heat map's colour scale: ``(0, 2 * threshold)`` if a positive threshold is known,
    else ``(lo, hi)``."""
    if threshold is not None and threshold > 0:
        return 0.0, 2.0 * float(threshold)
    return float(lo), float(hi)


def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Boolean outline of a mask: mask pixels with a 4-neighbour outside it, thickened to ``width``."""
    mask = np.asarray(mask, dtype=bool)
    padded = np.pad(mask, 1, mode="constant", constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & mask
    edge = mask & ~interior
    for _ in range(max(0, width - 1)):
        grown = np.pad(edge, 1, mode="constant", constant_values=False)
        edge = edge | grown[:-2, 1:-1] | grown[2:, 1:-1] | grown[1:-1, :-2] | grown[1:-1, 2:]
    return edge


def render_overlay(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    threshold: float | None,
    value_range: tuple[float, float],
    ground_truth: np.ndarray | None = None,
    caption: str | None = None,
) -> np.ndarray:
    """The overlay picture as ``[H', W, 3]`` uint8 (``H' = H`` plus a caption strip if given).

    ``image`` is the ``[H, W, 3]`` uint8 picture at the map's size; ``ground_truth`` an
    optional ``[H, W]`` mask of the defect pixels.
    """
    amap = np.asarray(anomaly_map)
    if image.shape[:2] != amap.shape:
        raise ValueError(f"image {image.shape[:2]} and anomaly map {amap.shape} differ in size")
    blended = (1.0 - HEAT_ALPHA) * image.astype(np.float64) + HEAT_ALPHA * heatmap_rgb(amap, value_range)
    out = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
    width = max(1, round(min(amap.shape) / 200))
    if ground_truth is not None and np.any(ground_truth):
        out[outline(ground_truth, width)] = GROUND_TRUTH_COLOUR
    if threshold is not None:
        out[outline(amap > threshold, width)] = THRESHOLD_COLOUR
    if caption:
        out = _with_caption(out, caption)
    return out


def _with_caption(picture: np.ndarray, caption: str) -> np.ndarray:
    """The picture above a black strip holding ``caption`` (one line per " | " part if too wide)."""
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top, right, bottom = measure.multiline_textbbox((0, 0), caption, font=font)
    if right - left + 6 > picture.shape[1]:
        caption = caption.replace(" | ", "\n")
        left, top, right, bottom = measure.multiline_textbbox((0, 0), caption, font=font)
    canvas = Image.new("RGB", (picture.shape[1], picture.shape[0] + (bottom - top) + 6), (0, 0, 0))
    canvas.paste(Image.fromarray(picture), (0, 0))
    ImageDraw.Draw(canvas).multiline_text((3, picture.shape[0] + 3 - top), caption, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


def caption_for(score: float, threshold: float | None) -> str:
    """``"score 1.234 | threshold 1.100 | defective"``."""
    limit = "none" if threshold is None else f"{threshold:.4g}"
    return f"score {score:.4g} | threshold {limit} | {verdict(score, threshold)}"


def save_overlay(
    path: str | Path,
    image: np.ndarray,
    anomaly_map: np.ndarray,
    score: float,
    threshold: float | None,
    value_range: tuple[float, float],
    ground_truth: np.ndarray | None = None,
) -> Path:
    """Render (see :func:`render_overlay`) with a score/threshold/verdict caption; write a PNG atomically."""
    picture = Image.fromarray(render_overlay(image, anomaly_map, threshold, value_range, ground_truth, caption_for(score, threshold)))
    return atomic_write(path, lambda handle: picture.save(handle, format="PNG"))


def union_mask(masks: Sequence[np.ndarray]) -> np.ndarray | None:
    """The union of region masks (None when there are none)."""
    if not masks:
        return None
    union = np.zeros(np.shape(masks[0]), dtype=bool)
    for mask in masks:
        union |= np.asarray(mask, dtype=bool)
    return union

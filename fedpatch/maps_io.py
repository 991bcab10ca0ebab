"""Anomaly maps on disk, in the layout the AutoVI / MVTec LOCO evaluators read.

Layout (one folder per object, then one per test folder, like the dataset's ``test/``)::

    <maps>/<object>/<defect>/<stem>.png      16-bit (default) or 8-bit grey PNG
    <maps>/<object>/<defect>/<stem>.npy      the float map, exact (or .tiff: float32)
    <maps>/<object>/png_scaling.json         how the PNG integers map back to scores
    <maps>/<object>/image_scores.json        optional: {"<defect>/<stem>": image score}

PNG scaling. PNG holds integers, so scores are quantised with ONE range per object, the
minimum and maximum over all of the object's maps (``lo``, ``hi``):
``png = round((score - lo) / (hi - lo) * (2**bits - 1))`` (all zeros if ``hi == lo``).
The map is monotone, so the order of scores across every image of the object is kept (ties
may appear between scores closer than ``(hi - lo) / (2**bits - 1)``), and ranking metrics
(AUROC, AUC-sPRO) computed on the integers equal those on the scores up to those ties.
A per-image min/max would destroy the order across images and is never used. The range and
formula are stored in ``png_scaling.json``: ``score ~= lo + png * (hi - lo) / (2**bits - 1)``.
:func:`read_anomaly_map` returns the PNG integers as they are (as float32): the metrics do
not need the scale back.

Float maps: ``.npy`` stores any dtype exactly; ``.tiff`` stores float32 through Pillow's
mode ``F`` (exact for float32 maps, the dtype the model produces), which is what the
official evaluator reads with ``tifffile``. Reading uses Pillow; ``tifffile`` is used only
as a fallback for TIFFs Pillow cannot decode (e.g. float64), when it is installed.

Every file is written atomically (:mod:`fedpatch.atomic`: a hidden temporary file in the same
folder, then ``os.replace``): a reader never sees a half-written map or JSON file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from fedpatch.atomic import atomic_write, atomic_write_json  # re-exported: older callers import them from here
from fedpatch.errors import DataError

FloatFormat = Literal["npy", "tiff"]
MAP_SUFFIXES: tuple[str, ...] = (".npy", ".tiff", ".tif", ".png")
"""Suffixes of anomaly-map files, most exact first (the order evaluation prefers them in)."""

SCALING_FILE = "png_scaling.json"
SCORES_FILE = "image_scores.json"


class MapEntry(NamedTuple):
    """One test image's anomaly map and where it goes: ``<object>/<defect_type>/<stem>``."""

    defect_type: str
    stem: str
    anomaly_map: np.ndarray


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PngScaling:
    """The per-object affine map from scores to PNG integers (see the module docstring)."""

    lo: float
    hi: float
    bits: int

    def __post_init__(self) -> None:
        if self.bits not in (8, 16):
            raise ValueError(f"PNG maps are 8- or 16-bit, got bits={self.bits}")
        if not (math.isfinite(self.lo) and math.isfinite(self.hi) and self.lo <= self.hi):
            raise ValueError(f"PNG scaling range must be finite with lo <= hi, got ({self.lo}, {self.hi})")

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    def quantize(self, anomaly_map: np.ndarray) -> np.ndarray:
        """Scores -> uint8/uint16 with the object's range; values outside it are clipped."""
        dtype = np.uint16 if self.bits == 16 else np.uint8
        if self.hi == self.lo:
            return np.zeros(anomaly_map.shape, dtype=dtype)
        scaled = (anomaly_map.astype(np.float64) - self.lo) * (self.levels / (self.hi - self.lo))
        return np.clip(np.rint(scaled), 0, self.levels).astype(dtype)

    def to_json(self) -> dict[str, object]:
        return {
            "bits": self.bits,
            "min": self.lo,
            "max": self.hi,
            "formula": "png = round((score - min) / (max - min) * (2**bits - 1)); "
            "score ~= min + png * (max - min) / (2**bits - 1)",
        }


def map_path(maps_dir: str | Path, object_name: str, defect_type: str, stem: str, suffix: str) -> Path:
    """``<maps>/<object>/<defect>/<stem><suffix>``."""
    return Path(maps_dir) / object_name / defect_type / f"{stem}{suffix}"


def _checked_map(anomaly_map: np.ndarray, where: str) -> np.ndarray:
    amap = np.asarray(anomaly_map)
    if amap.ndim != 2 or not (np.issubdtype(amap.dtype, np.floating) or np.issubdtype(amap.dtype, np.integer)):
        raise ValueError(f"{where}: an anomaly map must be a 2-D real array, got {amap.dtype} {amap.shape}")
    if not np.isfinite(amap).all():
        raise ValueError(f"{where}: anomaly map contains NaN or infinite values")
    return amap


def write_float_map(path: str | Path, anomaly_map: np.ndarray) -> Path:
    """Write a float map exactly: ``.npy`` (any dtype) or ``.tiff``/``.tif`` (float32)."""
    path = Path(path)
    amap = _checked_map(anomaly_map, str(path))
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return atomic_write(path, lambda handle: np.save(handle, np.ascontiguousarray(amap), allow_pickle=False))
    if suffix in (".tif", ".tiff"):
        image = Image.fromarray(np.ascontiguousarray(amap, dtype=np.float32))
        return atomic_write(path, lambda handle: image.save(handle, format="TIFF"))
    raise ValueError(f"{path}: float maps are written as .npy or .tiff, not {path.suffix!r}")


def write_png_map(path: str | Path, anomaly_map: np.ndarray, scaling: PngScaling) -> Path:
    """Write a map as a grey PNG quantised with the object's ``scaling``."""
    image = Image.fromarray(scaling.quantize(_checked_map(anomaly_map, str(path))))
    return atomic_write(path, lambda handle: image.save(handle, format="PNG"))


def _write_scaling(maps_dir: str | Path, object_name: str, scaling: PngScaling) -> None:
    atomic_write_json(Path(maps_dir) / object_name / SCALING_FILE, scaling.to_json())


def write_anomaly_maps(
    maps_dir: str | Path,
    object_name: str,
    entries: Sequence[MapEntry],
    png_bits: int = 16,
    float_format: FloatFormat = "npy",
) -> PngScaling:
    """Write every test map of one object as PNG (for the official evaluator) and float file.

    The PNG range is the min/max over all ``entries`` (two passes over them), recorded in
    ``png_scaling.json``. Returns that scaling.
    """
    if not entries:
        raise ValueError(f"no anomaly maps to write for object {object_name!r}")
    maps = [_checked_map(e.anomaly_map, f"{object_name}/{e.defect_type}/{e.stem}") for e in entries]
    scaling = PngScaling(
        lo=float(min(m.min() for m in maps)), hi=float(max(m.max() for m in maps)), bits=png_bits
    )
    for entry, amap in zip(entries, maps):
        write_float_map(map_path(maps_dir, object_name, entry.defect_type, entry.stem, f".{float_format}"), amap)
        write_png_map(map_path(maps_dir, object_name, entry.defect_type, entry.stem, ".png"), amap, scaling)
    _write_scaling(maps_dir, object_name, scaling)
    return scaling


def export_png_maps(maps_dir: str | Path, object_name: str, png_bits: int = 16) -> PngScaling:
    """Add PNGs next to float maps already on disk (for writers that stream one map at a time).

    Reads each float map twice (range, then PNG), holding one map in memory at a time.
    """
    paths = [
        p
        for folder in _subfolders(Path(maps_dir) / object_name)
        for p in sorted(folder.iterdir())
        if p.suffix.lower() in (".npy", ".tif", ".tiff") and not p.name.startswith(".")
    ]
    if not paths:
        raise DataError(f"no float anomaly maps (.npy/.tiff) under {Path(maps_dir) / object_name}")
    lo, hi = math.inf, -math.inf
    for path in paths:
        amap = read_anomaly_map(path)
        lo, hi = min(lo, float(amap.min())), max(hi, float(amap.max()))
    scaling = PngScaling(lo=lo, hi=hi, bits=png_bits)
    for path in paths:
        write_png_map(path.with_suffix(".png"), read_anomaly_map(path), scaling)
    _write_scaling(maps_dir, object_name, scaling)
    return scaling


def score_key(defect_type: str, stem: str) -> str:
    """Key of an image in ``image_scores.json``: ``"<defect>/<stem>"``."""
    return f"{defect_type}/{stem}"


def write_image_scores(maps_dir: str | Path, object_name: str, scores: Mapping[tuple[str, str], float]) -> Path:
    """Write ``{(defect, stem): image score}`` to ``<maps>/<object>/image_scores.json``."""
    data = {}
    for (defect_type, stem), score in scores.items():
        if not math.isfinite(float(score)):
            raise ValueError(f"image score of {object_name}/{defect_type}/{stem} is not finite: {score}")
        data[score_key(defect_type, stem)] = float(score)
    return atomic_write_json(Path(maps_dir) / object_name / SCORES_FILE, data)


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def read_image_scores(maps_dir: str | Path, object_name: str) -> dict[str, float] | None:
    """``{"<defect>/<stem>": score}`` from ``image_scores.json``, or None if there is none."""
    path = Path(maps_dir) / object_name / SCORES_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"image scores file {path} is not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DataError(f"image scores file {path} must hold a JSON object of 'defect/stem': score")
    scores = {}
    for key, value in data.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DataError(f"image scores file {path}: score of {key!r} is not a finite number: {value!r}")
        scores[key] = float(value)
    return scores


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"anomaly map file {path} is not a readable .npy array: {exc}") from None


def _read_tiff_fallback(path: Path, reason: Exception) -> np.ndarray:
    try:
        import tifffile  # optional: only for TIFFs Pillow cannot decode
    except ImportError:
        raise DataError(
            f"anomaly map file {path} cannot be read by Pillow ({reason}); write float32 TIFFs "
            "or .npy maps, or install tifffile"
        ) from None
    try:
        return np.asarray(tifffile.imread(path))
    except Exception as exc:  # tifffile raises many types on corrupt input
        raise DataError(f"anomaly map file {path} is not a readable TIFF: {exc}") from None


def _read_pillow(path: Path) -> np.ndarray:
    is_tiff = path.suffix.lower() in (".tif", ".tiff")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in ("F", "I", "L") and not image.mode.startswith("I;16"):
                raise DataError(
                    f"anomaly map file {path} has image mode {image.mode}; a map must be a single "
                    "grey or float channel (a coloured heatmap is not a map)"
                )
            return np.asarray(image)
    except DataError:
        raise
    except UnidentifiedImageError as exc:
        if is_tiff:
            return _read_tiff_fallback(path, exc)
        raise DataError(f"anomaly map file {path} is not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if is_tiff:
            return _read_tiff_fallback(path, exc)
        raise DataError(f"anomaly map file {path} is truncated or corrupt: {exc}") from None


def read_anomaly_map(path: str | Path) -> np.ndarray:
    """Read one map: ``.npy`` as stored, ``.png`` (8/16-bit integers) and ``.tif(f)`` as float32.

    Raises DataError naming the file if it is missing, unreadable, not a 2-D real map, or
    holds NaN/infinite values.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MAP_SUFFIXES:
        raise DataError(
            f"anomaly map file {path} has unsupported suffix {path.suffix!r}; use {', '.join(MAP_SUFFIXES)}"
        )
    if not path.is_file():
        raise DataError(f"anomaly map file not found: {path}")
    amap = _read_npy(path) if suffix == ".npy" else _read_pillow(path)
    if amap.ndim != 2 or not (np.issubdtype(amap.dtype, np.floating) or np.issubdtype(amap.dtype, np.integer)):
        raise DataError(f"anomaly map file {path} must hold a 2-D real array, got {amap.dtype} {amap.shape}")
    if suffix != ".npy" and amap.dtype != np.float32:
        amap = amap.astype(np.float32)
    if not np.isfinite(amap).all():
        raise DataError(f"anomaly map file {path} contains NaN or infinite values")
    return amap


def _subfolders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"anomaly maps folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


# --------------------------------------------------------------------------------------
# Pictures for people
# --------------------------------------------------------------------------------------


def heatmap_rgb(
    anomaly_map: np.ndarray,
    value_range: tuple[float, float] | None = None,
    colormap: str = "jet",
) -> np.ndarray:
    """Colour-map a map to ``[H, W, 3]`` uint8 RGB on ``value_range`` (default: its own min/max);
    values outside the range are clipped."""
    from matplotlib import colormaps  # imported here: only pictures need matplotlib

    amap = _checked_map(anomaly_map, "heat map").astype(np.float64)
    lo, hi = value_range if value_range is not None else (float(amap.min()), float(amap.max()))
    normalised = np.zeros_like(amap) if hi <= lo else np.clip((amap - lo) / (hi - lo), 0.0, 1.0)
    return (colormaps[colormap](normalised)[..., :3] * 255.0 + 0.5).astype(np.uint8)


def save_heatmap_png(
    anomaly_map: np.ndarray,
    path: str | Path,
    value_range: tuple[float, float] | None = None,
    colormap: str = "jet",
) -> Path:
    """Save a colour-mapped RGB picture of a map (for looking at, not for evaluation).

    ``value_range`` fixes the colour scale (use one range for all images of an object to
    compare them); by default the map's own min/max is used.
    """
    _checked_map(anomaly_map, str(path))
    image = Image.fromarray(heatmap_rgb(anomaly_map, value_range, colormap))
    return atomic_write(path, lambda handle: image.save(handle, format="PNG"))

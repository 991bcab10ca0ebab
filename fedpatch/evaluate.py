"""Evaluate a folder of anomaly maps against an AutoVI-layout data root (``fedpatch evaluate``).

For each object: every test image of ``<data>/<object>/test/`` must have a map
``<maps>/<object>/<defect>/<stem>.(npy|tiff|tif|png)`` and every map must belong to a test
image. When several formats are present the most exact one that covers every image of the
object is used (``.npy``, then ``.tiff``/``.tif``, then ``.png``), so an object's maps are
always on one scale; 16-bit PNGs are evaluated as their integers (the per-object PNG scaling
keeps the order, see :mod:`fedpatch.maps_io`).

Sizes: a map whose size differs from its image's native size (the size of the test image
and of its masks in the data root, whatever the object) is resized bilinearly, with pixel
centres aligned (``align_corners=False``, no antialiasing: the convention of
``torch.nn.functional.interpolate`` and OpenCV's ``INTER_LINEAR``). Masks are never resized.

Image score: the maximum of the (resized) map, as the official evaluator does, unless
``<maps>/<object>/image_scores.json`` exists (e.g. PatchCore's reweighted patch score); then
it must give a score for every test image and for no other.

Maps are streamed: one map is in memory at a time, next to the accumulated negative scores.
Results go to ``<output>/<object>/metrics.json`` in the official form (see
:func:`fedpatch.metrics.metrics_json`), written atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedpatch.data import open_dataset
from fedpatch.errors import DataError
from fedpatch.maps_io import (
    MAP_SUFFIXES,
    SCORES_FILE,
    atomic_write_json,
    map_path,
    read_anomaly_map,
    read_image_scores,
    score_key,
)
from fedpatch.metrics import DEFAULT_LIMITS, ObjectMetrics, PixelAccumulator, metrics_json, object_metrics

METRICS_FILE = "metrics.json"


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of 1-D linear interpolation with aligned pixel centres."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    low = np.floor(src).astype(np.intp)
    high = np.minimum(low + 1, n_in - 1)
    return low, high, src - low


def resize_bilinear(anomaly_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a 2-D map to ``shape`` = (H, W) bilinearly (``align_corners=False``), same dtype
    for floating maps, float32 for integer ones."""
    amap = np.asarray(anomaly_map)
    out_dtype = amap.dtype if np.issubdtype(amap.dtype, np.floating) else np.dtype(np.float32)
    if amap.shape == tuple(shape):
        return amap.astype(out_dtype, copy=False)
    r0, r1, rw = _linear_taps(amap.shape[0], shape[0])
    c0, c1, cw = _linear_taps(amap.shape[1], shape[1])
    values = amap.astype(np.float64)
    rows = values[r0] * (1.0 - rw)[:, None] + values[r1] * rw[:, None]
    return (rows[:, c0] * (1.0 - cw) + rows[:, c1] * cw).astype(out_dtype)


def _list_maps(object_maps: Path) -> dict[tuple[str, str], dict[str, Path]]:
    """``{(defect, stem): {suffix: path}}`` for every map file under ``<maps>/<object>/*/``."""
    found: dict[tuple[str, str], dict[str, Path]] = {}
    for folder in sorted(p for p in object_maps.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(folder.iterdir()):
            suffix = path.suffix.lower()
            if path.is_file() and not path.name.startswith(".") and suffix in MAP_SUFFIXES:
                found.setdefault((folder.name, path.stem), {})[suffix] = path
    return found


def _choose_suffix(
    object_maps: Path, keys: Sequence[tuple[str, str]], found: dict[tuple[str, str], dict[str, Path]]
) -> str:
    """The most exact map format present for every image; DataError naming what is missing."""
    for key in keys:
        if key not in found:
            expected = map_path(object_maps.parent, object_maps.name, key[0], key[1], "")
            raise DataError(
                f"missing anomaly map for test image {key[0]}/{key[1]}: expected "
                f"{expected}.npy (or .tiff, .tif, .png)"
            )
    for suffix in MAP_SUFFIXES:
        if all(suffix in found[key] for key in keys):
            return suffix
    best = max(MAP_SUFFIXES, key=lambda s: sum(s in found[key] for key in keys))
    lacking = next(key for key in keys if best not in found[key])
    raise DataError(
        f"anomaly maps under {object_maps} mix formats: no single format covers every test image "
        f"({lacking[0]}/{lacking[1]} has no {best} map, only {', '.join(sorted(found[lacking]))})"
    )


def _common_dtype(paths: Sequence[Path], suffix: str) -> np.dtype:
    """float32 for image files; for .npy the common dtype of the stored arrays (exact widening)."""
    if suffix != ".npy":
        return np.dtype(np.float32)
    dtypes = []
    for path in paths:
        try:
            dtypes.append(np.load(path, mmap_mode="r", allow_pickle=False).dtype)
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"anomaly map file {path} is not a readable .npy array: {exc}") from None
    dtype = np.result_type(*dtypes)
    return dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)


def _checked_scores(maps_dir: Path, object_name: str, keys: Sequence[str]) -> dict[str, float] | None:
    scores = read_image_scores(maps_dir, object_name)
    if scores is None:
        return None
    path = maps_dir / object_name / SCORES_FILE
    missing = [k for k in keys if k not in scores]
    if missing:
        raise DataError(f"image scores file {path} has no score for test image {missing[0]!r}")
    unknown = sorted(set(scores) - set(keys))
    if unknown:
        raise DataError(f"image scores file {path} has a score for {unknown[0]!r}, which is not a test image")
    return scores


def evaluate_object_folder(
    data_dir: str | Path,
    maps_dir: str | Path,
    object_name: str,
    limits: Sequence[float] = DEFAULT_LIMITS,
) -> ObjectMetrics:
    """Metrics of one object's maps folder against its test split (see the module docstring)."""
    maps_dir = Path(maps_dir)
    object_maps = maps_dir / object_name
    if not object_maps.is_dir():
        raise DataError(f"no anomaly maps for object {object_name!r}: folder not found: {object_maps}")
    dataset = open_dataset(data_dir, [object_name], split="test", resize="native")
    records = list(dataset.samples)
    if not records:
        raise DataError(f"object {object_name!r} has no test images under {data_dir}")
    keys = [(r.defect_type, r.stem) for r in records]
    found = _list_maps(object_maps)
    unknown = sorted(set(found) - set(keys))
    if unknown:
        path = next(iter(found[unknown[0]].values()))
        raise DataError(f"anomaly map {path} belongs to no test image of object {object_name!r}")
    suffix = _choose_suffix(object_maps, keys, found)
    dtype = _common_dtype([found[k][suffix] for k in keys], suffix)
    scores = _checked_scores(maps_dir, object_name, [score_key(*k) for k in keys])

    acc = PixelAccumulator()
    image_scores = []
    for index, (record, key) in enumerate(zip(records, keys)):
        path = found[key][suffix]
        amap = resize_bilinear(read_anomaly_map(path).astype(dtype, copy=False), dataset.native_size(index))
        regions = dataset.regions(index)
        if bool(record.label) != bool(regions):
            raise DataError(
                f"test image {record.path} has label {record.label} but {len(regions)} ground-truth regions"
            )
        acc.add(amap, regions)
        image_scores.append(scores[score_key(*key)] if scores is not None else float(amap.max()))
    try:
        return object_metrics(acc, [r.label for r in records], image_scores, limits)
    except DataError:
        raise
    except ValueError as exc:
        raise DataError(f"object {object_name!r} (maps {object_maps}): {exc}") from None


def evaluate_maps_folder(
    data_dir: str | Path,
    maps_dir: str | Path,
    objects: Sequence[str],
    output_dir: str | Path,
    limits: Sequence[float] = DEFAULT_LIMITS,
) -> dict[str, dict[str, object]]:
    """Evaluate ``<maps>/<object>/`` for each object; write ``<output>/<object>/metrics.json``.

    Returns ``{object: metrics.json content}``. Every object's maps folder is checked before
    any is evaluated, so a typo in ``objects`` fails at once.
    """
    if not objects:
        raise DataError("no objects to evaluate")
    maps_dir = Path(maps_dir)
    if not maps_dir.is_dir():
        raise DataError(f"anomaly maps folder not found: {maps_dir}")
    missing = [name for name in objects if not (maps_dir / name).is_dir()]
    if missing:
        present = sorted(p.name for p in maps_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise DataError(
            f"no anomaly maps for object(s) {', '.join(missing)} under {maps_dir} "
            f"(it has: {', '.join(present) or 'nothing'})"
        )
    results: dict[str, dict[str, object]] = {}
    for name in objects:
        result = metrics_json(evaluate_object_folder(data_dir, maps_dir, name, limits))
        atomic_write_json(Path(output_dir) / name / METRICS_FILE, result)
        results[name] = result
    return results

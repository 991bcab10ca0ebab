"""Score new images with a saved model (``fedpatch predict``).

Images are prepared exactly as in training: decoded to RGB, resized with Pillow's bilinear
filter to the model's recorded ``input_size`` (the working size of the object's images when
it was fitted, stored in the model file; none = the image's own size), scored, and the map is
resized back to the image's native size.

Outputs under ``output_dir`` for every image (``<name>`` is the file's stem for a file given
on the command line, ``<folder>/<relative path without suffix>`` for the images found,
recursively, in a folder given on the command line)::

    maps/<name>.npy          float32 anomaly map at the image's native size
    heatmaps/<name>.png      the map in colour (scale 0 .. 2 x threshold, see fedpatch.overlay)
    overlays/<name>.png      heat map over the image, threshold contour, score/verdict caption
    predictions.csv          path, name, score, threshold, verdict (defective when score > threshold)
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fedpatch.data.io import IMAGE_EXTENSIONS, image_size, load_image, to_tensor
from fedpatch.errors import DataError
from fedpatch.maps_io import atomic_write, read_anomaly_map, save_heatmap_png, write_float_map
from fedpatch.overlay import colour_range, save_overlay, verdict
from fedpatch.patchcore import PatchCore
from fedpatch.workflow import to_native_size

PREDICTIONS_FILE = "predictions.csv"


@dataclass(frozen=True)
class ImagePrediction:
    """One scored image and where its pictures went."""

    path: Path
    name: str
    score: float
    threshold: float | None
    verdict: str  # "good", "defective" or "unknown" (no threshold)
    map_file: Path
    heatmap_file: Path
    overlay_file: Path


def collect_images(inputs: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """``(image path, output name)`` for files and (recursively) folders; clear errors for the rest."""
    if not inputs:
        raise DataError("no images given: pass image files or folders")
    found: list[tuple[Path, str]] = []
    for item in map(Path, inputs):
        if item.is_file():
            if item.suffix.lower() not in IMAGE_EXTENSIONS:
                raise DataError(f"{item} is not an image file (expected {', '.join(sorted(IMAGE_EXTENSIONS))})")
            found.append((item, item.stem))
        elif item.is_dir():
            files = sorted(
                p for p in item.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not any(part.startswith(".") for part in p.relative_to(item).parts)
            )
            if not files:
                raise DataError(f"folder {item} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            name = item.resolve().name or "images"
            found += [(p, str(Path(name) / p.relative_to(item).with_suffix(""))) for p in files]
        else:
            raise DataError(f"image file or folder not found: {item}")
    seen: dict[str, Path] = {}
    for path, name in found:
        if name in seen:
            raise DataError(f"{seen[name]} and {path} would both be written as {name!r}; predict them in separate runs")
        seen[name] = path
    return found


def _tensors(images: Sequence[tuple[Path, str]], size: tuple[int, int] | None) -> Iterator[torch.Tensor]:
    for path, _ in images:
        yield to_tensor(load_image(path), size)


def predict_images(
    model_path: str | Path,
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    threshold: float | None = None,
    device: str = "auto",
    progress: bool = True,
) -> list[ImagePrediction]:
    """Score images with a saved model; write maps, heat maps, overlays and ``predictions.csv``.

    ``threshold`` overrides the model's own (calibrated) threshold.
    """
    images = collect_images(inputs)
    model = PatchCore.load(model_path, device=device, progress=False)
    limit = threshold if threshold is not None else model.threshold
    out = Path(output_dir)
    results: list[ImagePrediction] = []
    lo, hi = np.inf, -np.inf
    batches = model.iter_predictions(_tensors(images, model.input_size))
    for (path, name), prediction in tqdm(zip(images, batches), total=len(images), desc="predict", unit="img", disable=not progress, dynamic_ncols=True):
        anomaly_map = to_native_size(prediction.anomaly_map, image_size(path))
        lo, hi = min(lo, float(anomaly_map.min())), max(hi, float(anomaly_map.max()))
        map_file = write_float_map(out / "maps" / f"{name}.npy", anomaly_map)
        results.append(
            ImagePrediction(path, name, prediction.score, limit, verdict(prediction.score, limit), map_file,
                            out / "heatmaps" / f"{name}.png", out / "overlays" / f"{name}.png")
        )
    value_range = colour_range(limit, lo, hi)  # one scale for every picture of the run
    for item in results:
        anomaly_map = read_anomaly_map(item.map_file)
        save_heatmap_png(anomaly_map, item.heatmap_file, value_range)
        save_overlay(item.overlay_file, load_image(item.path), anomaly_map, item.score, limit, value_range)
    write_predictions_csv(out / PREDICTIONS_FILE, results)
    return results


def predictions_csv(results: Sequence[ImagePrediction]) -> str:
    """CSV text: path, name, score, threshold, verdict (full-precision numbers)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "name", "score", "threshold", "verdict"])
    for r in results:
        writer.writerow([str(r.path), r.name, repr(r.score), "" if r.threshold is None else repr(r.threshold), r.verdict])
    return buffer.getvalue()


def write_predictions_csv(path: Path, results: Sequence[ImagePrediction]) -> Path:
    text = predictions_csv(results)
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))

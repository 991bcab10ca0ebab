"""The one fit / aggregate / score path, shared by the centralized CLI and the Flower app.

Training one object is always the same five steps, whoever runs them:

1. ``fit_local``: a participant fits a PatchCore bank on its own good training images.
2. ``fedpatch.aggregation.aggregate_banks``: the banks of all participants become one.
3. ``PatchCore.set_memory_bank``: every participant loads the global bank.
4. ``calibration_scores`` / ``threshold_from_scores``: image scores of held-out good training
   images (never test labels) give the anomaly threshold.
5. ``score_local`` then ``pooled_metrics``: each participant scores its test images; the
   statistics are pooled exactly (see ``fedpatch.metrics``).

The centralized baseline (``fedpatch train``) runs the steps with one participant and a
global ratio of 1.0, so its bank and metrics are exactly those of a one-client federation.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from fedpatch.config import RunConfig
from fedpatch.data import AUTOVI_OBJECTS, open_dataset, resize_for_object
from fedpatch.data.io import ResizeSpec
from fedpatch.metrics import (
    ObjectMetrics,
    PixelAccumulator,
    PixelMetrics,
    image_auroc,
    merge_counts,
    merge_summaries,
    pixel_metrics,
)
from fedpatch.patchcore import FitStats, PatchCore, Prediction


def build_model(config: RunConfig) -> PatchCore:
    """A fresh PatchCore from the ``model`` and ``runtime`` sections."""
    return PatchCore(device=config.runtime.device, progress=config.runtime.progress, **asdict(config.model))


def resize_for(config: RunConfig, object_name: str) -> ResizeSpec:
    """Working size of an object's images: ``data.resize``, the AutoVI presets, or native."""
    if config.data.resize is not None:
        return tuple(config.data.resize)
    if object_name in AUTOVI_OBJECTS:
        return resize_for_object(object_name, tuple(config.data.resize_small), tuple(config.data.resize_large))
    return "native"


def open_object(root: str | Path, object_name: str, split: str, config: RunConfig) -> Dataset:
    """One object's split, in the layout found under ``root`` (AutoVI or MVTec-style)."""
    return open_dataset(root, [object_name], split, resize_for(config, object_name))


def calibration_split(n_images: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (fit indices, calibration indices) of ``n_images`` good training images.

    ``ceil(fraction * n)`` images are held out (none when the fraction is 0), always leaving at
    least one image to fit.
    """
    if n_images < 1:
        raise ValueError("no training images")
    held = min(n_images - 1, math.ceil(fraction * n_images)) if fraction > 0 else 0
    order = np.random.default_rng(seed).permutation(n_images)
    calibration = sorted(int(i) for i in order[:held])
    held_set = set(calibration)
    return [i for i in range(n_images) if i not in held_set], calibration


def split_calibration(train: Dataset, config: RunConfig) -> tuple[Subset, Subset]:
    """(fit images, held-out calibration images) of a participant's training images.

    The one split every participant uses (``data.calibration_fraction``, seeded by
    ``model.seed``), so a one-client federation fits exactly what ``fedpatch train`` fits.
    """
    fit_idx, cal_idx = calibration_split(len(train), config.data.calibration_fraction, config.model.seed)
    return Subset(train, fit_idx), Subset(train, cal_idx)


def loader(dataset: Dataset, config: RunConfig) -> DataLoader:
    """Batches of decoded images in dataset order (workers decode in parallel when configured)."""
    return DataLoader(dataset, batch_size=config.model.batch_size, shuffle=False, num_workers=config.runtime.num_workers, collate_fn=_collate_images)


def _collate_images(items: Sequence[Any]) -> torch.Tensor:
    """Stack the images of a batch (all of one object, hence one size)."""
    return torch.stack([item[0] for item in items])


# --------------------------------------------------------------------------------------------
# Steps 1 and 4: local fit, calibration
# --------------------------------------------------------------------------------------------
def fit_local(config: RunConfig, train: Dataset) -> tuple[PatchCore, FitStats]:
    """Step 1: fit a model on a participant's good training images."""
    model = build_model(config)
    model.fit(loader(train, config))
    return model, model.fit_stats


def calibration_scores(model: PatchCore, calibration: Dataset, config: RunConfig) -> np.ndarray:
    """Image scores of held-out good training images under the (global) bank."""
    if len(calibration) == 0:
        return np.empty(0, dtype=np.float64)
    return model.predict_scores(loader(calibration, config))


def threshold_from_scores(scores: np.ndarray, config: RunConfig) -> float | None:
    """``evaluation.anomaly_threshold`` if set, else the configured quantile of good scores."""
    if config.evaluation.anomaly_threshold is not None:
        return float(config.evaluation.anomaly_threshold)
    if scores.size == 0:
        return None
    return float(np.quantile(scores, config.evaluation.threshold_quantile))


# --------------------------------------------------------------------------------------------
# Step 5: local scoring and pooled metrics
# --------------------------------------------------------------------------------------------
@dataclass
class ScoredImage:
    """What scoring keeps of one test image besides its pixels."""

    key: str  # "<defect_type>/<stem>"
    label: int
    score: float
    path: str


@dataclass
class LocalEvaluation:
    """A participant's scored test images and its mergeable pixel statistics."""

    images: list[ScoredImage] = field(default_factory=list)
    pixels: PixelAccumulator = field(default_factory=PixelAccumulator)

    @property
    def scores(self) -> np.ndarray:
        return np.array([i.score for i in self.images], dtype=np.float64)

    @property
    def labels(self) -> np.ndarray:
        return np.array([i.label for i in self.images], dtype=np.int64)


MapSink = Callable[[ScoredImage, str, np.ndarray, torch.Tensor], None]
"""Called per test image with (image info, defect type, native-size map, model input image)."""


def to_native_size(anomaly_map: np.ndarray, native_hw: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize a map computed at the working size back to the image's native size."""
    if anomaly_map.shape == tuple(native_hw):
        return anomaly_map
    tensor = torch.from_numpy(np.ascontiguousarray(anomaly_map))[None, None]
    return F.interpolate(tensor, size=tuple(native_hw), mode="bilinear", align_corners=False)[0, 0].numpy()


class _TappedBatches:
    """A loader's batches, with each batch's images queued for the caller as it is consumed.

    Lets one ``iter_predictions`` call (one progress bar, the model's own batching) run over
    the whole split while the caller still gets the input image of every prediction.
    """

    def __init__(self, batches: DataLoader) -> None:
        self.batches = batches
        self.images: deque[torch.Tensor] = deque()

    def __len__(self) -> int:
        return len(self.batches.dataset)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch in self.batches:
            self.images.extend(batch)
            yield batch


def _with_images(model: PatchCore, test: Dataset, config: RunConfig) -> Iterator[tuple[int, Prediction, torch.Tensor]]:
    """Predictions in dataset order, each with the model input image it came from."""
    tapped = _TappedBatches(loader(test, config))
    for index, prediction in enumerate(model.iter_predictions(tapped)):
        yield index, prediction, tapped.images.popleft()


def score_local(model: PatchCore, test: Dataset, config: RunConfig, sink: MapSink | None = None) -> LocalEvaluation:
    """Step 5 (participant side): score test images, accumulate exact pixel statistics.

    Maps are resized to each image's native size before evaluation, so they align pixel for
    pixel with the ground-truth masks. ``test`` must expose ``samples`` and ``regions(i)``
    (directly or through a ``Subset``).
    """
    base, indices = _unwrap(test)
    result = LocalEvaluation()
    for position, prediction, image in _with_images(model, test, config):
        record = base.samples[indices[position]]
        regions = base.regions(indices[position])
        native = regions[0].mask.shape if regions else base.native_size(indices[position])
        anomaly_map = to_native_size(prediction.anomaly_map, native)
        info = ScoredImage(f"{record.defect_type}/{record.stem}", int(record.label), prediction.score, record.path)
        result.pixels.add(anomaly_map, regions)
        result.images.append(info)
        if sink is not None:
            sink(info, record.defect_type, anomaly_map, image)
    return result


def _unwrap(dataset: Dataset) -> tuple[Any, list[int]]:
    if isinstance(dataset, Subset):
        base, inner = _unwrap(dataset.dataset)
        return base, [inner[i] for i in dataset.indices]
    return dataset, list(range(len(dataset)))


def pooled_metrics(evaluations: Sequence[LocalEvaluation], limits: Sequence[float]) -> ObjectMetrics:
    """Step 5 (server side): exact image AUROC, pixel AUROC and AUC-sPRO over all participants.

    Uses the two-round exchange of ``fedpatch.metrics`` (summaries, then negative counts at
    the merged region scores), so the result equals evaluating all maps in one place.
    """
    return pooled_metrics_with_curve(evaluations, limits)[0]


def pooled_metrics_with_curve(
    evaluations: Sequence[LocalEvaluation], limits: Sequence[float]
) -> tuple[ObjectMetrics, PixelMetrics]:
    """``pooled_metrics`` plus the pixel-level results it came from (FPR-sPRO curve for plots)."""
    summary = merge_summaries([e.pixels.summary() for e in evaluations])
    counts = merge_counts([e.pixels.negative_counts(summary.values) for e in evaluations])
    pixels = pixel_metrics(summary, counts, limits)
    scores = np.concatenate([e.scores for e in evaluations])
    labels = np.concatenate([e.labels for e in evaluations])
    metrics = ObjectMetrics(
        image_auroc=image_auroc(scores, labels),
        pixel_auroc=pixels.pixel_auroc,
        auc_spro=pixels.auc_spro,
        n_good=int((labels == 0).sum()),
        n_defective=int((labels == 1).sum()),
        n_regions=summary.n_regions,
    )
    return metrics, pixels

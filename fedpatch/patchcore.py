"""PatchCore: fit a memory bank of nominal patch features, score new images against it.

The model owns the whole chain image -> backbone -> patch vectors -> bank -> scores, so callers
pass plain images (float tensors in [0, 1] or uint8, ``[3, H, W]``) and get anomaly maps at each
image's own size. Fitting streams (see ``fedpatch.coreset.StreamingCoreset``): patch features of
the training set are never all held at once.

Federated use needs only ``get_memory_bank`` / ``set_memory_bank``: a client fits on its own
images, sends its bank, and receives the aggregated bank back.
"""

from __future__ import annotations

import json
import math
import logging
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fedpatch import allocator
from fedpatch.anomaly_map import patch_scores_to_maps, reweighted_image_score
from fedpatch.atomic import atomic_save
from fedpatch.backbone import PRECISIONS, FeatureExtractor, get_backbone_spec
from fedpatch.coreset import StreamingCoreset
from fedpatch.errors import BankValidationError, ModelFileError
from fedpatch.features import aggregate_features, extract_patch_features, reduce_channels
from fedpatch.hardware import native_bfloat16_cpu
from fedpatch.memory_bank import IndexSpec, MemoryBank

LOGGER = logging.getLogger(__name__)
MODEL_FORMAT = "fedpatch-patchcore/1"
MAX_BATCH_PIXELS = 1 << 20
"""Pixels one backbone forward pass may hold (``batch_size`` images at most). A pass's
activations grow with its pixel count: WideResNet-50-2 at 1000x750 peaked at 2.35 GiB RSS with
8 images per pass and 1.40 GiB with one (benchmarks/README.md), at the same speed on CPU, so
large images go through in smaller batches and peak memory does not depend on ``batch_size``.
Scores do not change: every image is embedded on its own whatever its batch."""


@dataclass
class PatchCoreConfig:
    """Every hyperparameter of a PatchCore model (saved with it, so a file is self-describing).

    Attributes:
        backbone: backbone name (``fedpatch.backbone.BACKBONES``).
        layers: backbone layers; ``None`` = the backbone's stride-8 and stride-16 pair.
        coreset_percentage: fraction of patch vectors kept in the bank, in (0, 1].
        pretrained: ImageNet weights (True) or seeded random weights (False).
        weights: local state-dict file overriding the default weights source.
        neighborhood_size: local aggregation window (odd).
        target_dim: channel reduction of the patch vectors (``None`` keeps all).
        num_neighbors: bank neighbours used by the image-score reweighting (1 = plain max).
        blur_sigma: Gaussian smoothing of the pixel maps, in pixels.
        coreset_method: ``"greedy"`` (k-center) or ``"random"``.
        projection_dim: random projection used by the greedy selection when it at least halves
            the feature dimension (``None``: never project).
        coreset_chunk_size: patches per streaming chunk (bounds fit memory).
        batch_size: images per backbone forward pass (fewer for large images, so that a pass
            holds at most ``MAX_BATCH_PIXELS`` pixels).
        seed: seeds coreset selection.
        index: nearest-neighbour search of the bank: ``"flat"`` (exact, default), ``"ivf"`` or
            ``"hnsw"`` with optional parameters (``"hnsw:m=32,ef_search=128"``; see
            ``fedpatch.memory_bank.IndexSpec``). Approximate indexes are faster on large banks
            and may change scores slightly (benchmarks report recall@1 and AUROC).
        backbone_precision: ``"float32"`` (default) or ``"bfloat16"``: the arithmetic of the
            backbone's forward pass (``fedpatch.backbone``). bfloat16 made the forward pass
            1.3-1.9x faster on a CPU with native bfloat16 products (AVX512-BF16; AMX and GPUs
            not measured) and changes the features by about 1% of their magnitude, so the
            scores move (``benchmarks/results/zen4/precision.md`` reports its AUROC effect).
            Saved with the model, so fit and predict use the same precision.
    """

    backbone: str = "wide_resnet50_2"
    layers: list[str] | None = None
    coreset_percentage: float = 0.1
    pretrained: bool = True
    weights: str | None = None
    neighborhood_size: int = 3
    target_dim: int | None = None
    num_neighbors: int = 9
    blur_sigma: float = 4.0
    coreset_method: str = "greedy"
    projection_dim: int | None = 128
    coreset_chunk_size: int = 16384
    batch_size: int = 8
    seed: int = 42
    index: str = "flat"
    backbone_precision: str = "float32"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first out-of-range field."""
        get_backbone_spec(self.backbone)
        checks = [
            ("coreset_percentage", 0.0 < self.coreset_percentage <= 1.0, "in (0, 1]"),
            ("neighborhood_size", self.neighborhood_size >= 1 and self.neighborhood_size % 2 == 1, "a positive odd int"),
            ("target_dim", self.target_dim is None or self.target_dim >= 1, ">= 1 or null"),
            ("num_neighbors", self.num_neighbors >= 1, ">= 1"),
            ("blur_sigma", self.blur_sigma >= 0, ">= 0"),
            ("coreset_method", self.coreset_method in ("greedy", "random"), "'greedy' or 'random'"),
            ("projection_dim", self.projection_dim is None or self.projection_dim >= 1, ">= 1 or null"),
            ("coreset_chunk_size", self.coreset_chunk_size >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("backbone_precision", self.backbone_precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"PatchCore {name} must be {expected}, got {getattr(self, name)!r}")
        try:
            IndexSpec.parse(self.index)
        except ValueError as exc:
            raise ValueError(f"PatchCore index: {exc}") from None


@dataclass
class FitStats:
    """What a fit did, for logs, benchmarks and federated metrics."""

    images: int = 0
    patches_seen: int = 0
    bank_size: int = 0
    chunks: int = 0
    extract_seconds: float = 0.0
    coreset_seconds: float = 0.0
    index_seconds: float = 0.0


@dataclass
class Prediction:
    """One scored image: its pixel map at the input's size and its image-level score."""

    anomaly_map: np.ndarray  # float32 [H, W]
    score: float
    patch_scores: np.ndarray = field(repr=False)  # float32 [h, w], before upsampling


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; ``"cuda"`` without a GPU warns and uses CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        warnings.warn(f"device={device!r} requested but no CUDA GPU is available; running on CPU", stacklevel=3)
        return torch.device("cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return torch.device(device)


def _as_image_tensor(item: Any) -> torch.Tensor:
    """The image of a dataset item: a tensor, or the first element of a tuple/list."""
    image = item[0] if isinstance(item, (tuple, list)) else item
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"expected an image tensor (or a tuple whose first element is one), got {type(image).__name__}")
    if image.dtype == torch.uint8:
        image = image.float() / 255.0
    elif not image.is_floating_point():
        raise TypeError(f"image tensors must be float in [0, 1] or uint8, got {image.dtype}")
    else:
        _check_unit_range(image)
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"expected an image of shape [3, H, W] (or a batch [B, 3, H, W]), got {tuple(image.shape)}")
    return image.float()


def _check_unit_range(image: torch.Tensor, tolerance: float = 1e-3) -> None:
    """Float images must be finite and in [0, 1]: a 0-255 float image would silently score wrong."""
    if image.numel() == 0:
        raise ValueError("empty image tensor")
    low, high = float(image.min()), float(image.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("image tensor holds NaN or infinite values")
    if low < -tolerance or high > 1.0 + tolerance:
        raise ValueError(
            f"float image values must be in [0, 1], got [{low:.3g}, {high:.3g}]; divide by 255 or pass a uint8 tensor"
        )


def iter_image_batches(data: Iterable[Any], batch_size: int, max_pixels: int = MAX_BATCH_PIXELS) -> Iterator[torch.Tensor]:
    """Group consecutive images of the same size into ``[B, 3, H, W]`` batches.

    A batch holds at most ``batch_size`` images and, when images are large, at most
    ``max_pixels`` pixels (but always at least one image). Items may be single images, tuples
    whose first element is the image, or whole batches (as a DataLoader yields); a whole
    batch is split only when it exceeds those bounds.
    """
    pending: list[torch.Tensor] = []
    for item in data:
        images = _as_image_tensor(item)
        per_batch = max(1, min(batch_size, max_pixels // (images.shape[-2] * images.shape[-1])))
        flush = images.shape[0] > 1 or len(pending) >= per_batch
        if pending and (flush or images.shape[-2:] != pending[0].shape[-2:]):
            yield torch.cat(pending)
            pending = []
        if images.shape[0] > 1:
            yield from images.split(per_batch)
        else:
            pending.append(images)
    if pending:
        yield torch.cat(pending)


def _length(data: Any) -> int | None:
    """Number of images in ``data`` for progress bars (a DataLoader counts its dataset, not batches)."""
    dataset = getattr(data, "dataset", None) if isinstance(data, torch.utils.data.DataLoader) else None
    try:
        return len(dataset) if dataset is not None else len(data)
    except TypeError:
        return None


def _count_picks(bar: tqdm) -> Callable[[int, int], None]:
    """A greedy-pick callback for ``bar``: each chunk's target joins the total, each pick counts."""

    def progress(picked: int, target: int) -> None:
        if picked == 1:
            bar.total = (bar.total or 0) + target
            bar.refresh()
        bar.update(1)

    return progress


class PatchCore:
    """PatchCore anomaly detector (Roth et al., 2022).

    Args:
        backbone, layers, coreset_percentage, ...: see ``PatchCoreConfig``.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (falls back to CPU with a warning).
        progress: show progress bars (counts and rates) while fitting and scoring.
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: list[str] | None = None,
        coreset_percentage: float = 0.1,
        device: str = "auto",
        *,
        progress: bool = False,
        **options: Any,
    ) -> None:
        known = {f.name for f in fields(PatchCoreConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown PatchCore option(s): {', '.join(unknown)}")
        self.config = PatchCoreConfig(backbone=backbone, layers=layers, coreset_percentage=coreset_percentage, **options)
        if self.config.weights is not None:
            self.config.weights = str(self.config.weights)  # a Path would not serialise into the file header
        self.config.validate()
        self.device = resolve_device(device)
        self.progress = progress
        if self.config.backbone_precision == "bfloat16" and self.device.type == "cpu" and not native_bfloat16_cpu():
            warnings.warn(
                "backbone_precision bfloat16 on a CPU without native bfloat16 products (AVX512-BF16 or AMX): "
                "it is emulated and slower than float32 here", stacklevel=2,
            )
        self.extractor = FeatureExtractor(
            self.config.backbone, self.config.layers, pretrained=self.config.pretrained, weights=self.config.weights,
            precision=self.config.backbone_precision,
        ).to(self.device)
        self.config.layers = list(self.extractor.layers)
        backbone_dim = self.extractor.get_feature_dim()
        if self.config.target_dim is not None and self.config.target_dim > backbone_dim:
            raise ValueError(f"target_dim {self.config.target_dim} exceeds the backbone feature dim {backbone_dim}")
        self.feature_dim = self.config.target_dim or backbone_dim
        self.memory_bank: MemoryBank | None = None
        self.threshold: float | None = None
        self.input_size: tuple[int, int] | None = None
        """(width, height) the images were resized to for fitting; new images must be resized
        the same way before scoring (None: images were used at their own size). Saved with the model."""
        self.fit_stats = FitStats()

    # ------------------------------------------------------------------ features
    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] -> patch features ``[B, D, h, w]`` (on the model's device)."""
        layer_maps = self.extractor(images.to(self.device, non_blocking=True))
        features = aggregate_features(layer_maps, neighborhood_size=self.config.neighborhood_size)
        if self.config.target_dim is not None:
            features = reduce_channels(features, self.config.target_dim)
        return features

    def _bar(self, data: Any, desc: str) -> tqdm:
        return tqdm(total=_length(data), desc=desc, unit="img", disable=not self.progress, dynamic_ncols=True)

    # ------------------------------------------------------------------ fit
    def fit(self, data: Iterable[Any]) -> PatchCore:
        """Build the memory bank from nominal images (streaming; see module docstring)."""
        with allocator.tuned():  # fedpatch's malloc settings for the whole fit (fedpatch.allocator)
            return self._fit(data)

    def _fit(self, data: Iterable[Any]) -> PatchCore:
        cfg = self.config
        show_picks = self.progress and cfg.coreset_method == "greedy"
        picks = tqdm(desc="coreset: greedy picks", unit="pick", disable=not show_picks, dynamic_ncols=True)
        coreset = StreamingCoreset(
            cfg.coreset_percentage, cfg.coreset_chunk_size, cfg.coreset_method, cfg.projection_dim, cfg.seed,
            progress=_count_picks(picks) if show_picks else None, device=self.device,
        )
        stats = FitStats()
        n_images = _length(data)
        with picks:
            with self._bar(data, "fit: features + coreset") as bar:
                for batch in iter_image_batches(data, cfg.batch_size):
                    start = time.perf_counter()
                    patches = extract_patch_features(self.embed(batch)).float().cpu()
                    stats.extract_seconds += time.perf_counter() - start
                    if stats.images == 0 and n_images:  # size the bank once (images of one size)
                        coreset.reserve(n_images * (patches.shape[0] // batch.shape[0]))
                    start = time.perf_counter()
                    coreset.add(patches)
                    del patches
                    # Each backbone pass starts on a trimmed heap: freed blocks that other work took
                    # over in between would otherwise make it grow the heap (fedpatch.allocator).
                    allocator.release_free_memory()
                    stats.coreset_seconds += time.perf_counter() - start
                    stats.images += batch.shape[0]
                    bar.update(batch.shape[0])
                    bar.set_postfix(patches=coreset.patches_seen, chunks=coreset.chunks)
            if stats.images == 0:
                raise ValueError("fit() received no images")
            start = time.perf_counter()
            bank = coreset.finalize()
            stats.coreset_seconds += time.perf_counter() - start
        start = time.perf_counter()
        self.set_memory_bank(bank, copy=False)  # the coreset's array becomes the bank: held once
        stats.index_seconds = time.perf_counter() - start
        stats.patches_seen, stats.bank_size, stats.chunks = coreset.patches_seen, len(bank), coreset.chunks
        self.fit_stats = stats
        allocator.release_free_memory()  # fitting's freed temporaries go back (fedpatch.allocator)
        LOGGER.info("fit: %d images, %d patches -> bank of %d", stats.images, stats.patches_seen, stats.bank_size)
        return self

    # ------------------------------------------------------------------ bank exchange
    def get_memory_bank(self) -> np.ndarray:
        """A copy of the bank ``[M, D]`` (float32)."""
        return np.array(self._require_bank().vectors, dtype=np.float32, copy=True)

    def set_memory_bank(self, features: np.ndarray, *, copy: bool = True) -> None:
        """Replace the bank (validated: 2-D, finite, width = the model's feature dim).

        ``copy=False`` hands ``features`` over (no second copy of a large bank; the caller
        must not modify it afterwards).
        """
        bank = MemoryBank(self.feature_dim, index=self.config.index)
        bank.add(features, copy=copy, source="memory bank")
        bank.build_index()
        self.memory_bank = bank

    def _require_bank(self) -> MemoryBank:
        if self.memory_bank is None or len(self.memory_bank) == 0:
            raise RuntimeError("the model has no memory bank: call fit() or set_memory_bank() first")
        return self.memory_bank

    # ------------------------------------------------------------------ predict
    def iter_predictions(self, data: Iterable[Any]) -> Iterator[Prediction]:
        """Score images one batch at a time; yields a ``Prediction`` per image, in order."""
        bank = self._require_bank()
        with self._bar(data, "predict") as bar:
            for batch in iter_image_batches(data, self.config.batch_size):
                yield from self._predict_batch(batch, bank)
                bar.update(batch.shape[0])

    def _predict_batch(self, batch: torch.Tensor, bank: MemoryBank) -> list[Prediction]:
        with allocator.tuned():  # per batch: the caller's code between batches runs outside (fedpatch.allocator)
            return self._score_batch(batch, bank)

    def _score_batch(self, batch: torch.Tensor, bank: MemoryBank) -> list[Prediction]:
        features = self.embed(batch)
        b, d, h, w = features.shape
        patches = extract_patch_features(features).float()
        if patches.device.type != "cpu" and bank.index_spec.kind == "flat":
            distances, nearest = bank.search_tensor(patches, k=1)  # exact search on the GPU
        else:
            patches = patches.cpu()
            dist_np, near_np = bank.search(patches.numpy(), k=1)
            distances, nearest = torch.from_numpy(dist_np), torch.from_numpy(near_np)
        scores = distances[:, 0].reshape(b, h, w)
        maps = patch_scores_to_maps(scores.to(self.device), tuple(batch.shape[-2:]), self.config.blur_sigma).cpu().numpy()
        scores, nearest = scores.cpu(), nearest.cpu()
        best, tops = scores.reshape(b, -1).max(dim=1)  # each image's most anomalous patch (the first, on ties)
        image_scores = best.tolist()
        if self.config.num_neighbors > 1 and len(bank) > 1:
            rows = torch.arange(b) * (h * w) + tops
            image_scores = self._reweight(image_scores, patches[rows.to(patches.device)].cpu().numpy(), nearest[rows, 0].numpy(), bank)
        return [Prediction(maps[i].astype(np.float32, copy=False), image_scores[i], scores[i].numpy()) for i in range(b)]

    def _reweight(self, scores: list[float], test_patches: np.ndarray, nearest: np.ndarray, bank: MemoryBank) -> list[float]:
        """The paper's reweighted image scores of one batch: one bank search for all its images."""
        k = min(self.config.num_neighbors, len(bank))
        vectors = bank.vectors
        _, support = bank.search(vectors[nearest], k=k)
        out = []
        for score, patch, anchor, found in zip(scores, test_patches, nearest.tolist(), support.tolist()):
            order = [anchor] + [j for j in found if j != anchor][: k - 1]
            out.append(reweighted_image_score(score, patch, vectors[order]))
        return out

    def predict(self, data: Iterable[Any]) -> list[np.ndarray]:
        """Pixel anomaly maps ``[H, W]`` (float32), one per image, at each input image's size."""
        return [p.anomaly_map for p in self.iter_predictions(data)]

    def predict_scores(self, data: Iterable[Any]) -> np.ndarray:
        """Image-level anomaly scores, one per image."""
        return np.array([p.score for p in self.iter_predictions(data)], dtype=np.float64)

    def predict_single(self, image: torch.Tensor) -> np.ndarray:
        """The anomaly map of one image ``[3, H, W]``."""
        if not isinstance(image, torch.Tensor) or image.ndim != 3:
            raise ValueError("predict_single expects one image tensor of shape [3, H, W]")
        return self._predict_batch(_as_image_tensor(image), self._require_bank())[0].anomaly_map

    # ------------------------------------------------------------------ persistence
    def metadata(self) -> dict[str, str]:
        """The file header: format, config, dims, preprocessing, threshold, package version."""
        from fedpatch import __version__

        return {
            "format": MODEL_FORMAT,
            "fedpatch_version": __version__,
            "config": json.dumps(asdict(self.config)),
            "feature_dim": str(self.feature_dim),
            "preprocessing": json.dumps({"mean": self.extractor.spec.mean, "std": self.extractor.spec.std, "input_range": [0, 1]}),
            "threshold": json.dumps(self.threshold),
            "input_size": json.dumps(list(self.input_size) if self.input_size is not None else None),
        }

    def save(self, path: str | Path) -> None:
        """Write the model (config + bank) as safetensors, atomically. Backbone weights are not
        stored: they are re-created from the recorded backbone and weights source."""
        from safetensors.numpy import save_file

        tensors = {"memory_bank": np.ascontiguousarray(self._require_bank().vectors)}
        atomic_save(path, lambda tmp: save_file(tensors, str(tmp), metadata=self.metadata()))

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", backbone: str | None = None, progress: bool = False) -> PatchCore:
        """Load a model written by ``save``. Never unpickles: the file is safetensors.

        ``backbone``, when given, must match the file's backbone (clear error otherwise).
        """
        meta, bank = read_model_file(path)
        config = _config_field(meta["config"], path)
        if backbone is not None and backbone != config.get("backbone"):
            raise ModelFileError(f"{path}: the model was trained with backbone {config['backbone']!r}, not {backbone!r}")
        known = {f.name for f in fields(PatchCoreConfig)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ModelFileError(f"{path}: unknown config field(s) {unknown}; written by fedpatch {meta.get('fedpatch_version')}")
        try:
            model = cls(device=device, progress=progress, **config)
        except (ValueError, TypeError) as exc:  # WeightsUnavailableError (a FedPatchError) passes through
            raise ModelFileError(f"{path}: the recorded model configuration is invalid: {exc}") from None
        if str(model.feature_dim) != meta["feature_dim"] or bank.shape[1] != model.feature_dim:
            raise ModelFileError(
                f"{path}: stored feature dim {meta['feature_dim']} (bank width {bank.shape[1]}) does not match "
                f"backbone {config['backbone']} with layers {config['layers']} (dim {model.feature_dim})"
            )
        try:
            model.set_memory_bank(bank)
        except BankValidationError as exc:
            raise ModelFileError(f"{path}: {exc}") from None
        model.threshold = _threshold_field(meta.get("threshold", "null"), path)
        model.input_size = _input_size_field(meta.get("input_size", "null"), path)
        return model


def _config_field(text: str, path: str | Path) -> dict[str, Any]:
    """The ``config`` header field: a JSON object of PatchCoreConfig fields."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ModelFileError(f"{path}: header field 'config' is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ModelFileError(f"{path}: header field 'config' must be a JSON object, got {type(value).__name__}")
    return value


def _threshold_field(text: str, path: str | Path) -> float | None:
    """The ``threshold`` header field: null or a finite number."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        value = text
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ModelFileError(f"{path}: header field 'threshold' must be null or a finite number, got {value!r}")
    return float(value)


def _input_size_field(text: str, path: str | Path) -> tuple[int, int] | None:
    """The ``input_size`` header field: null or [width, height] of positive ints."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise ModelFileError(f"{path}: header field 'input_size' must be null or [width, height], got {value!r}")
    return int(value[0]), int(value[1])


def read_model_file(path: str | Path) -> tuple[dict[str, str], np.ndarray]:
    """Read the header and bank of a model file, with clear errors for anything else."""
    from safetensors import safe_open

    file = Path(path)
    if not file.is_file():
        raise ModelFileError(f"model file not found: {file}")
    with file.open("rb") as handle:
        head = handle.read(9)
    # A safetensors file starts with its header length (u64, little-endian) and then "{"; that
    # length's low byte can be 0x80 (or its bytes read "PK"), so only files that are not laid
    # out like safetensors are reported as pickles.
    looks_safetensors = head[8:9] == b"{" and int.from_bytes(head[:8], "little") < file.stat().st_size
    if not looks_safetensors and (head[:2] == b"PK" or head[:1] == b"\x80"):
        raise ModelFileError(
            f"{file} is a pickle/zip archive (torch.save format), not a fedpatch model file; "
            "fedpatch never unpickles model files"
        )
    try:
        with safe_open(str(file), framework="numpy") as handle:
            meta = handle.metadata() or {}
            bank = handle.get_tensor("memory_bank")
    except Exception as exc:  # noqa: BLE001 - any parse failure is one user-facing error
        raise ModelFileError(f"{file} is not a readable fedpatch model file: {exc}") from exc
    if meta.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{file}: unexpected format {meta.get('format')!r}, expected {MODEL_FORMAT!r}")
    for key in ("config", "feature_dim"):
        if key not in meta:
            raise ModelFileError(f"{file}: header field {key!r} is missing")
    if bank.ndim != 2 or bank.dtype != np.float32:
        raise ModelFileError(f"{file}: tensor 'memory_bank' must be a 2-D float32 array [rows, dim], got {bank.dtype} {bank.shape}")
    return meta, bank

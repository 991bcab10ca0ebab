"""Image AUROC, pixel AUROC and AUC-sPRO, exact, vectorised and mergeable across clients.

Definitions follow ``docs/metrics.md`` and the MVTec LOCO / AutoVI evaluator
(``mvtec_loco_ad_evaluation``: ``src/metrics.py``, ``src/aggregation.py``, ``src/util.py``):

* A pixel is positive at threshold ``t`` when its score is strictly greater than ``t``.
* Each region (one mask file) has a saturation area ``s_c`` (``DefectRegion.saturation_area``);
  ``sPRO_c(t) = min(|A_c ∩ P_t| / s_c, 1)``, and the curve's y value is the mean over all
  regions of all images.
* ``FPR(t)`` counts the pixels outside every region of every image (good images included).
* The curve runs from (0, 0) (threshold above the maximum) to (1, mean sPRO with every pixel
  positive) and is traced in threshold order, so points sharing an FPR are ordered by rising
  sPRO (vertical steps). It is integrated with the trapezoid rule up to the limit ``L``; when
  ``L`` falls between two points, sPRO is linearly interpolated at ``L``; the area is divided
  by ``L``. The official code approximates the sweep with adaptive threshold refinement; here
  the sweep is exact: every distinct score is a threshold.
* Saturation area 0 (a relative threshold with ``int(thr * area) == 0``): the official code
  divides by zero, so its sPRO is ``inf -> 1`` once any region pixel is detected and NaN before
  (its trapezoid then drops those points with a warning). We use ``s_c = 1`` instead: the
  region saturates at its first detected pixel, which equals the official value wherever that
  one is finite and is 0 (not NaN) before. Empty regions are rejected.

How the exact sweep stays small: the mean sPRO only changes at scores of region pixels, so
between two consecutive region-pixel values the curve is a horizontal segment whose inner
points are collinear and can be dropped without changing any area. For each distinct region
value ``u`` the curve needs two points: all pixels ``> u`` and all pixels ``>= u``. Their FPR
needs only ``#negatives > u`` and ``#negatives >= u``, i.e. binary searches of the region
values in the sorted negative scores. Pixel AUROC (Mann-Whitney with ties counted 1/2)
needs exactly the same counts, because the positive pixels are the region pixels. The
negative scores are sorted in place in chunks of at most ``chunk_size`` values (no argsort,
no float64 copy); region pixels are usually few.

Federated pooling (exact, no pixel leaves a client):

1. Each client streams its maps into a :class:`PixelAccumulator` and sends
   :meth:`PixelAccumulator.summary`: the distinct scores of its region pixels, how many union
   pixels have each score, how much each score raises ``sum_c sPRO_c``, its region count and
   its negative-pixel count. Size: O(distinct region-pixel scores), typically ~1% of pixels.
2. The server merges them (:func:`merge_summaries`) and sends the merged ``values`` back.
3. Each client answers :meth:`PixelAccumulator.negative_counts` (two int64 counts per value:
   its negatives ``>= u`` and ``> u``); the server sums them (:func:`merge_counts`).
4. :func:`pixel_metrics` turns the merged summary and counts into pixel AUROC, AUC-sPRO and
   the curve, identical (to float rounding) to evaluating all images in one place.

It reveals the anomaly scores of defect-region pixels (not image pixels) and per-threshold
negative counts; a one-round protocol would need either every negative score or a shared
histogram grid, which is not exact. Image AUROC pools exactly from one score and one label
per image (:func:`merge_image_scores`). All parties must use the same map dtype (float32).

Memory: the accumulator keeps a copy of the negative scores (dtype of the maps, e.g. 4 bytes
a pixel) plus the region pixels; maps can be streamed and dropped after ``add``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedpatch.data.regions import DefectRegion

DEFAULT_LIMITS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.3, 1.0)
"""FPR integration limits reported by the MVTec LOCO / AutoVI evaluator (``MAX_FPRS``)."""

DEFAULT_CHUNK_SIZE = 1 << 26
"""Negative scores sorted per chunk (64 Mi values = 256 MB of float32)."""


# --------------------------------------------------------------------------------------
# Shared kernels
# --------------------------------------------------------------------------------------


def _finite_1d(values: np.ndarray | Sequence[float], name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _count_ge_gt(sorted_values: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(#values >= q, #values > q)`` for every query, by binary search of the sorted array."""
    if queries.dtype != sorted_values.dtype:
        raise ValueError(
            f"score dtypes differ ({queries.dtype} vs {sorted_values.dtype}); every party must "
            "use the same anomaly-map dtype"
        )
    n = sorted_values.size
    n_ge = n - np.searchsorted(sorted_values, queries, side="left").astype(np.int64)
    n_gt = n - np.searchsorted(sorted_values, queries, side="right").astype(np.int64)
    return n_ge, n_gt


def _auroc_from_counts(pos_count: np.ndarray, n_ge: np.ndarray, n_gt: np.ndarray, n_neg: int) -> float:
    """Tie-aware AUROC (Mann-Whitney U / (n_pos n_neg)) from per-positive-value negative counts.

    ``pos_count[k]`` positives share the value ``u_k``; ``n_ge/n_gt`` count the negatives
    ``>= u_k`` / ``> u_k``. Each positive wins against ``n_neg - n_ge`` negatives and ties with
    ``n_ge - n_gt``; the doubled sum is an exact integer.
    """
    n_pos = int(pos_count.sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs positives and negatives; got {n_pos} positive and {n_neg} negative")
    doubled = int(np.dot(pos_count, 2 * (n_neg - n_ge) + (n_ge - n_gt)))
    return doubled / (2.0 * n_pos * n_neg)


# --------------------------------------------------------------------------------------
# Image AUROC
# --------------------------------------------------------------------------------------


def _check_labels(labels: np.ndarray | Sequence[int], n: int) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) like the scores, got {lab.shape}")
    if not np.isin(lab, (0, 1)).all():
        raise ValueError("labels must be 0 (good) or 1 (defective)")
    return lab.astype(bool)


def image_auroc(scores: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[int]) -> float:
    """AUROC of image scores, good (0) against defective (1); ties count one half.

    Equal to scikit-learn's ``roc_auc_score(labels, scores)``.
    """
    sc = _finite_1d(scores, "image scores")
    lab = _check_labels(labels, sc.size)
    n_pos, n_neg = int(lab.sum()), int((~lab).sum())
    if n_pos == 0 or n_neg == 0:
        present = "defective (1)" if n_pos else "good (0)"
        raise ValueError(
            f"image AUROC needs both good (0) and defective (1) images; only {present} labels are present"
        )
    neg = np.sort(sc[~lab])
    values, counts = np.unique(sc[lab], return_counts=True)
    n_ge, n_gt = _count_ge_gt(neg, values)
    return _auroc_from_counts(counts.astype(np.int64), n_ge, n_gt, n_neg)


def merge_image_scores(
    parts: Sequence[tuple[np.ndarray | Sequence[float], np.ndarray | Sequence[int]]],
) -> tuple[np.ndarray, np.ndarray]:
    """Pool ``(scores, labels)`` of several clients; :func:`image_auroc` of the pool is exact."""
    if not parts:
        raise ValueError("no image scores to merge")
    scores = [_finite_1d(s, f"image scores of part {i}") for i, (s, _) in enumerate(parts)]
    labels = [_check_labels(lab, s.size).astype(np.int64) for s, (_, lab) in zip(scores, parts)]
    return np.concatenate(scores), np.concatenate(labels)


# --------------------------------------------------------------------------------------
# Pixel statistics: accumulation (client side) and merging (server side)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PixelSummary:
    """Round-1 statistics of a set of maps; mergeable, holds no negative pixel.

    Attributes:
        values: distinct scores of the pixels inside any region, ascending.
        positive_count: number of union-of-regions pixels with each value (pixel AUROC).
        spro_gain: increase of ``sum_c sPRO_c`` when the threshold passes below each value.
        n_regions: number of regions (the sPRO mean's denominator).
        n_negative: number of pixels outside every region.
    """

    values: np.ndarray
    positive_count: np.ndarray
    spro_gain: np.ndarray
    n_regions: int
    n_negative: int


@dataclass(frozen=True)
class NegativeCounts:
    """Round-2 statistics: negatives ``>= values[k]`` and ``> values[k]`` (int64); summable."""

    n_ge: np.ndarray
    n_gt: np.ndarray


def _spro_gains(region_scores: np.ndarray, saturation: float) -> np.ndarray:
    """Per-pixel rise of ``min(k / s, 1)`` when the region's pixels turn on, highest score first.

    The k-th pixel (1-based, by descending score) adds ``min(k/s, 1) - min((k-1)/s, 1)``; tied
    pixels turn on together, so only their sum matters, whatever their order.
    """
    k = np.arange(1, region_scores.size + 1, dtype=np.float64)
    return np.minimum(k / saturation, 1.0) - np.minimum((k - 1.0) / saturation, 1.0)


def _effective_saturation(region: DefectRegion, where: str) -> float:
    area = region.area
    if area == 0:
        raise ValueError(f"{where}: region has no pixel (empty mask of defect '{region.spec.defect_name}')")
    return max(float(region.saturation_area), 1.0)


class PixelAccumulator:
    """Streams anomaly maps and their regions; keeps sorted negative chunks and region pixels.

    ``add`` each test image's map (any real dtype, all the same) with its regions (empty for
    good images); then :meth:`summary` and :meth:`negative_counts` give the two rounds of the
    exact protocol described in the module docstring. Maps are copied as needed, so callers
    may drop or reuse them after ``add``. ``chunk_size`` bounds the array sorted at once.
    """

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.chunk_size = chunk_size
        self._dtype: np.dtype | None = None
        self._chunks: list[np.ndarray] = []  # sorted negative scores
        self._buffer: np.ndarray | None = None  # negatives not sorted yet
        self._fill = 0
        self._n_negative = 0
        self._n_images = 0
        self._positive_scores: list[np.ndarray] = []  # union-of-regions pixels, per image
        self._region_scores: list[np.ndarray] = []  # per region, descending
        self._region_gains: list[np.ndarray] = []  # per region, aligned with _region_scores

    @property
    def n_images(self) -> int:
        return self._n_images

    @property
    def n_regions(self) -> int:
        return len(self._region_scores)

    def add(self, anomaly_map: np.ndarray, regions: Sequence[DefectRegion]) -> None:
        """Add one image: its map and its regions (``[]`` for a good image)."""
        where = f"image {self._n_images}"
        amap = self._check_map(anomaly_map, where)
        union = np.zeros(amap.shape, dtype=bool)
        saturations = []
        for j, region in enumerate(regions):
            if region.mask.shape != amap.shape:
                raise ValueError(
                    f"{where}, region {j}: mask shape {region.mask.shape} differs from map shape {amap.shape}"
                )
            saturations.append(_effective_saturation(region, f"{where}, region {j}"))
            union |= region.mask.astype(bool, copy=False)
        for region, saturation in zip(regions, saturations):
            scores = np.sort(amap[region.mask.astype(bool, copy=False)])[::-1]
            self._region_scores.append(scores)
            self._region_gains.append(_spro_gains(scores, saturation))
        self._add_pixels(amap, union)

    def add_masked(self, anomaly_map: np.ndarray, positive_mask: np.ndarray | None) -> None:
        """Add one image for pixel AUROC only: ``positive_mask`` marks defect pixels (None: none)."""
        where = f"image {self._n_images}"
        amap = self._check_map(anomaly_map, where)
        if positive_mask is None:
            union = np.zeros(amap.shape, dtype=bool)
        else:
            union = np.asarray(positive_mask).astype(bool, copy=False)
            if union.shape != amap.shape:
                raise ValueError(f"{where}: mask shape {union.shape} differs from map shape {amap.shape}")
        self._add_pixels(amap, union)

    def summary(self) -> PixelSummary:
        """Round 1: the region/positive statistics of every image added so far."""
        dtype = self._dtype if self._dtype is not None else np.dtype(np.float32)
        positives = np.concatenate(self._positive_scores) if self._positive_scores else np.empty(0, dtype)
        values, counts = np.unique(positives, return_counts=True)
        gains = np.zeros(values.size, dtype=np.float64)
        if self._region_scores:
            index = np.searchsorted(values, np.concatenate(self._region_scores))
            gains = np.bincount(index, weights=np.concatenate(self._region_gains), minlength=values.size)
        return PixelSummary(values, counts.astype(np.int64), gains, self.n_regions, self._n_negative)

    def negative_counts(self, values: np.ndarray) -> NegativeCounts:
        """Round 2: how many of this accumulator's negatives are ``>= v`` and ``> v`` for each value."""
        self._seal()
        queries = np.asarray(values)
        if queries.size == 0:
            return NegativeCounts(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
        n_ge = np.zeros(queries.size, dtype=np.int64)
        n_gt = np.zeros(queries.size, dtype=np.int64)
        for chunk in self._chunks:
            ge, gt = _count_ge_gt(chunk, queries)
            n_ge += ge
            n_gt += gt
        return NegativeCounts(n_ge, n_gt)

    def negative_chunks(self) -> list[np.ndarray]:
        """The negative scores added so far, as ascending chunks (no copy).

        What a participant must keep between the two rounds of the exact protocol (e.g. in a
        Flower node's state); :meth:`from_negative_chunks` rebuilds an accumulator from them.
        """
        self._seal()
        return list(self._chunks)

    @classmethod
    def from_negative_chunks(cls, chunks: Sequence[np.ndarray]) -> PixelAccumulator:
        """An accumulator of negatives only, from :meth:`negative_chunks`; it answers
        :meth:`negative_counts` exactly as the original did (its summary has no region)."""
        acc = cls()
        for i, chunk in enumerate(chunks):
            arr = np.asarray(chunk)
            if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
                raise ValueError(f"negative chunk {i} must be a 1-D array of real numbers, got {arr.dtype} {arr.shape}")
            if acc._dtype is None:
                acc._dtype = arr.dtype
            elif arr.dtype != acc._dtype:
                raise ValueError(f"negative chunk {i} has dtype {arr.dtype}, chunk 0 has {acc._dtype}")
            if arr.size > 1 and bool((arr[1:] < arr[:-1]).any()):
                raise ValueError(f"negative chunk {i} is not sorted ascending")
            if arr.size:
                acc._chunks.append(arr)
                acc._n_negative += arr.size
        return acc

    # -- internals ------------------------------------------------------------------

    def _check_map(self, anomaly_map: np.ndarray, where: str) -> np.ndarray:
        amap = np.asarray(anomaly_map)
        if amap.ndim != 2:
            raise ValueError(f"{where}: anomaly map must be 2-D, got shape {amap.shape}")
        if not (np.issubdtype(amap.dtype, np.floating) or np.issubdtype(amap.dtype, np.integer)):
            raise ValueError(f"{where}: anomaly map must hold real numbers, got dtype {amap.dtype}")
        if self._dtype is None:
            self._dtype = amap.dtype
        elif amap.dtype != self._dtype:
            raise ValueError(f"{where}: map dtype {amap.dtype} differs from the first map's {self._dtype}")
        if not np.isfinite(amap).all():
            raise ValueError(f"{where}: anomaly map contains NaN or infinite values")
        return amap

    def _add_pixels(self, amap: np.ndarray, union: np.ndarray) -> None:
        self._n_images += 1
        if union.any():
            self._positive_scores.append(amap[union])
            self._push_negatives(amap[~union])
        else:
            self._push_negatives(amap.ravel())

    def _push_negatives(self, values: np.ndarray) -> None:
        self._n_negative += values.size
        start = 0
        while start < values.size:
            if self._buffer is None:
                self._buffer = np.empty(self.chunk_size, dtype=self._dtype)
                self._fill = 0
            take = min(values.size - start, self.chunk_size - self._fill)
            self._buffer[self._fill : self._fill + take] = values[start : start + take]
            self._fill += take
            start += take
            if self._fill == self.chunk_size:
                self._seal()

    def _seal(self) -> None:
        """Sort the filled part of the buffer in place and keep it as a chunk."""
        if self._buffer is None:
            return
        chunk, self._buffer = self._buffer, None
        if self._fill < chunk.size:
            chunk.resize(self._fill, refcheck=False)  # shrink in place: no second buffer
        chunk.sort()
        if chunk.size:
            self._chunks.append(chunk)


def merge_summaries(parts: Sequence[PixelSummary]) -> PixelSummary:
    """Server side, round 1: combine the clients' summaries into that of the pooled test set."""
    if not parts:
        raise ValueError("no pixel summaries to merge")
    dtypes = {p.values.dtype for p in parts if p.values.size}
    if len(dtypes) > 1:
        raise ValueError(f"clients sent different score dtypes {sorted(map(str, dtypes))}; use one map dtype")
    dtype = dtypes.pop() if dtypes else parts[0].values.dtype
    values, inverse = np.unique(np.concatenate([p.values for p in parts], dtype=dtype), return_inverse=True)
    counts = np.bincount(inverse, weights=np.concatenate([p.positive_count for p in parts]), minlength=values.size)
    gains = np.bincount(inverse, weights=np.concatenate([p.spro_gain for p in parts]), minlength=values.size)
    return PixelSummary(
        values=values,
        positive_count=np.rint(counts).astype(np.int64),
        spro_gain=gains,
        n_regions=sum(p.n_regions for p in parts),
        n_negative=sum(p.n_negative for p in parts),
    )


def merge_counts(parts: Sequence[NegativeCounts]) -> NegativeCounts:
    """Server side, round 2: add the clients' negative counts (all for the same merged values)."""
    if not parts:
        raise ValueError("no negative counts to merge")
    sizes = {p.n_ge.size for p in parts} | {p.n_gt.size for p in parts}
    if len(sizes) != 1:
        raise ValueError(f"negative counts have different lengths {sorted(sizes)}; all must answer the same values")
    return NegativeCounts(
        n_ge=np.sum([p.n_ge for p in parts], axis=0, dtype=np.int64),
        n_gt=np.sum([p.n_gt for p in parts], axis=0, dtype=np.int64),
    )


# --------------------------------------------------------------------------------------
# From statistics to metrics
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PixelMetrics:
    """Pixel-level results: AUROC, AUC-sPRO per limit, and the (compressed, exact) curve."""

    pixel_auroc: float
    auc_spro: dict[float, float]
    fpr: np.ndarray
    spro: np.ndarray


def _check_counts(summary: PixelSummary, counts: NegativeCounts) -> None:
    if counts.n_ge.shape != summary.values.shape or counts.n_gt.shape != summary.values.shape:
        raise ValueError(
            f"negative counts ({counts.n_ge.size}) do not match the summary's {summary.values.size} values"
        )
    if summary.n_negative == 0:
        raise ValueError("no pixel lies outside the defect regions: the false positive rate is undefined")


def _curve(summary: PixelSummary, counts: NegativeCounts) -> tuple[np.ndarray, np.ndarray]:
    """Exact FPR-sPRO curve, from (0, 0) to (1, final sPRO), horizontal runs compressed.

    For each region value ``u`` (descending) the points "all pixels > u" and "all pixels >= u".
    """
    if summary.n_regions == 0:
        raise ValueError("AUC-sPRO needs at least one defect region (no defective image was given)")
    _check_counts(summary, counts)
    n_neg = float(summary.n_negative)
    after = np.minimum(np.cumsum(summary.spro_gain[::-1]) / summary.n_regions, 1.0)
    before = np.concatenate(([0.0], after[:-1]))
    size = 2 * summary.values.size + 2
    fpr = np.empty(size, dtype=np.float64)
    spro = np.empty(size, dtype=np.float64)
    fpr[0], spro[0] = 0.0, 0.0
    fpr[1:-1:2], spro[1:-1:2] = counts.n_gt[::-1] / n_neg, before
    fpr[2:-1:2], spro[2:-1:2] = counts.n_ge[::-1] / n_neg, after
    fpr[-1], spro[-1] = 1.0, after[-1] if after.size else 0.0
    return fpr, spro


def _area_to_limit(fpr: np.ndarray, spro: np.ndarray, limits: Sequence[float]) -> dict[float, float]:
    """Trapezoid area under the curve up to each limit (sPRO interpolated at it), over the limit."""
    cumulative = np.concatenate(([0.0], np.cumsum(0.5 * (spro[1:] + spro[:-1]) * np.diff(fpr))))
    result = {}
    for limit in limits:
        lim = float(limit)
        if not 0.0 < lim <= 1.0:
            raise ValueError(f"FPR limit must be in (0, 1], got {limit}")
        i = int(np.searchsorted(fpr, lim, side="right")) - 1
        area = cumulative[i]
        if fpr[i] < lim:
            x0, x1, y0, y1 = fpr[i], fpr[i + 1], spro[i], spro[i + 1]
            y_lim = y0 + (y1 - y0) * (lim - x0) / (x1 - x0)
            area += 0.5 * (y0 + y_lim) * (lim - x0)
        result[lim] = float(area / lim)
    return result


def pixel_metrics(
    summary: PixelSummary, counts: NegativeCounts, limits: Sequence[float] = DEFAULT_LIMITS
) -> PixelMetrics:
    """Pixel AUROC, AUC-sPRO and the curve from (merged) summary and negative counts."""
    fpr, spro = _curve(summary, counts)
    auroc = _auroc_from_counts(summary.positive_count, counts.n_ge, counts.n_gt, summary.n_negative)
    return PixelMetrics(pixel_auroc=auroc, auc_spro=_area_to_limit(fpr, spro, limits), fpr=fpr, spro=spro)


def _accumulate(maps: Sequence[np.ndarray], regions_per_image: Sequence[Sequence[DefectRegion]]) -> PixelAccumulator:
    if len(maps) != len(regions_per_image):
        raise ValueError(f"{len(maps)} maps but {len(regions_per_image)} region lists")
    acc = PixelAccumulator()
    for amap, regions in zip(maps, regions_per_image):
        acc.add(amap, regions)
    return acc


def _local_metrics(acc: PixelAccumulator, limits: Sequence[float]) -> PixelMetrics:
    summary = acc.summary()
    return pixel_metrics(summary, acc.negative_counts(summary.values), limits)


# --------------------------------------------------------------------------------------
# In-memory conveniences
# --------------------------------------------------------------------------------------


def pixel_auroc(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray | None]) -> float:
    """AUROC over all pixels of all images; positives are the mask pixels (None: good image)."""
    if len(maps) != len(masks):
        raise ValueError(f"{len(maps)} maps but {len(masks)} masks")
    acc = PixelAccumulator()
    for amap, mask in zip(maps, masks):
        acc.add_masked(amap, mask)
    summary = acc.summary()
    counts = acc.negative_counts(summary.values)
    return _auroc_from_counts(summary.positive_count, counts.n_ge, counts.n_gt, summary.n_negative)


def spro_curve(
    maps: Sequence[np.ndarray], regions_per_image: Sequence[Sequence[DefectRegion]]
) -> tuple[np.ndarray, np.ndarray]:
    """The exact FPR-sPRO curve ``(fpr, spro)``, ascending, for plotting.

    Inner points of horizontal runs are omitted (they do not change the curve's shape).
    """
    acc = _accumulate(maps, regions_per_image)
    summary = acc.summary()
    return _curve(summary, acc.negative_counts(summary.values))


def auc_spro(
    maps: Sequence[np.ndarray],
    regions_per_image: Sequence[Sequence[DefectRegion]],
    limits: Sequence[float] = DEFAULT_LIMITS,
) -> dict[float, float]:
    """Normalised area under the FPR-sPRO curve up to each FPR limit: ``{limit: auc}``."""
    fpr, spro = spro_curve(maps, regions_per_image)
    return _area_to_limit(fpr, spro, limits)


def mean_spro(
    maps: Sequence[np.ndarray],
    regions_per_image: Sequence[Sequence[DefectRegion]],
    thresholds: Sequence[float],
) -> np.ndarray:
    """Mean sPRO over all regions at each given threshold (pixels ``> t`` are positive)."""
    if len(maps) != len(regions_per_image):
        raise ValueError(f"{len(maps)} maps but {len(regions_per_image)} region lists")
    t = np.asarray(thresholds, dtype=np.float64)
    total = np.zeros(t.size, dtype=np.float64)
    n_regions = 0
    for i, (amap, regions) in enumerate(zip(maps, regions_per_image)):
        for j, region in enumerate(regions):
            saturation = _effective_saturation(region, f"image {i}, region {j}")
            if region.mask.shape != np.shape(amap):
                raise ValueError(f"image {i}, region {j}: mask shape {region.mask.shape} differs from the map's")
            scores = np.sort(np.asarray(amap)[region.mask.astype(bool, copy=False)].astype(np.float64))
            detected = scores.size - np.searchsorted(scores, t, side="right")
            total += np.minimum(detected / saturation, 1.0)
            n_regions += 1
    if n_regions == 0:
        raise ValueError("mean sPRO needs at least one defect region")
    return total / n_regions


# --------------------------------------------------------------------------------------
# One object
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectMetrics:
    """Everything reported for one object's test split."""

    image_auroc: float
    pixel_auroc: float
    auc_spro: dict[float, float]
    n_good: int
    n_defective: int
    n_regions: int


def _check_labels_regions(labels: np.ndarray, n_regions: Sequence[int]) -> None:
    for i, (label, n) in enumerate(zip(labels, n_regions)):
        if bool(label) != (n > 0):
            kind = "defective (label 1)" if label else "good (label 0)"
            raise ValueError(f"image {i} is {kind} but has {n} defect regions")


def object_metrics(
    acc: PixelAccumulator,
    labels: np.ndarray | Sequence[int],
    image_scores: np.ndarray | Sequence[float],
    limits: Sequence[float] = DEFAULT_LIMITS,
) -> ObjectMetrics:
    """Finish an object's evaluation from a filled accumulator and per-image scores/labels."""
    scores = _finite_1d(image_scores, "image scores")
    if scores.size != acc.n_images:
        raise ValueError(f"{scores.size} image scores but {acc.n_images} maps")
    lab = _check_labels(labels, scores.size)
    pixels = _local_metrics(acc, limits)
    return ObjectMetrics(
        image_auroc=image_auroc(scores, lab.astype(np.int64)),
        pixel_auroc=pixels.pixel_auroc,
        auc_spro=pixels.auc_spro,
        n_good=int((~lab).sum()),
        n_defective=int(lab.sum()),
        n_regions=acc.n_regions,
    )


def evaluate_object(
    maps: Sequence[np.ndarray],
    labels: np.ndarray | Sequence[int],
    image_scores: np.ndarray | Sequence[float],
    regions_per_image: Sequence[Sequence[DefectRegion]],
    limits: Sequence[float] = DEFAULT_LIMITS,
) -> ObjectMetrics:
    """Image AUROC, pixel AUROC and AUC-sPRO of one object's test split held in memory.

    ``labels[i]`` must be 1 exactly when ``regions_per_image[i]`` is non-empty.
    """
    lab = _check_labels(labels, len(maps))
    _check_labels_regions(lab, [len(r) for r in regions_per_image])
    return object_metrics(_accumulate(maps, regions_per_image), lab.astype(np.int64), image_scores, limits)


def limit_key(limit: float) -> str:
    """JSON key of an FPR limit, as the official evaluator writes it (``json.dump`` of a float)."""
    return repr(float(limit))


def metrics_json(metrics: ObjectMetrics) -> dict[str, object]:
    """The official ``metrics.json`` form, plus our own numbers under ``"fedpatch"``.

    ``{"localization": {"auc_spro": {"0.01": ..., "0.05": ..., ...}},
    "classification": {"auc_roc": ...}, "fedpatch": {"pixel_auroc": ..., counts}}``
    """
    return {
        "localization": {"auc_spro": {limit_key(k): v for k, v in metrics.auc_spro.items()}},
        "classification": {"auc_roc": metrics.image_auroc},
        "fedpatch": {
            "pixel_auroc": metrics.pixel_auroc,
            "n_good": metrics.n_good,
            "n_defective": metrics.n_defective,
            "n_regions": metrics.n_regions,
        },
    }

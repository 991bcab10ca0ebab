"""Coreset subsampling of patch features: greedy k-center (PatchCore) and random.

Greedy k-center (farthest-point traversal, ``fedpatch.kcenter``) picks, one at a time, the
point farthest from everything picked so far. It keeps a vector of each point's distance to its
nearest selected point (memory O(N), never the O(N^2) distance matrix) and, by the triangle
inequality, recomputes only the distances that can shrink. As in the PatchCore paper, selection
runs on a seeded Gaussian random projection of the features (``projection_dim``,
Johnson-Lindenstrauss) when that at least halves their dimension, while the rows returned are
the original full-dimensional features. ``projection_dim=None`` selects exactly: a smaller
coverage radius (the 128-d projection's was 1.09-1.13x the exact one on 448-d and 1536-d
features), at a cost that depends on the features: 1.2x the projected selection's time on
344-d efficientnet_lite0 stages, 7.6x on 1536-d WideResNet features of noise images
(3.4 s against 0.45 s per 16,384-patch chunk).

Streaming: ``StreamingCoreset`` never holds all the patches of a training set. Patches arrive
in batches and are buffered up to ``chunk_size`` rows; each full chunk is reduced to its own
greedy coreset of ``ceil(ratio * rows)`` rows and the buffer is freed. The memory bank is the
union of the chunk coresets, so the only memory that grows with the number of training images
is the bank itself (``ratio`` of the patches). When everything fits in one chunk the result is
exactly the one-shot greedy coreset. The coverage radius of the union is the largest radius
among the chunks; ``coverage_radius`` measures it so the scheme can be compared with the
one-shot greedy (see tests and benchmarks).

The chunk coresets are copied into one bank array as they are made. When the caller says how
many patches to expect (``reserve``; ``PatchCore.fit`` does once it knows the image count and
the patches per image), that array is allocated once at its final size, so ``finalize`` hands
it out without the concatenation that would hold the bank twice (2.1 GB each for 300
WideResNet images at 1000x750). Without a reservation, or past it, the array grows by doubling.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from fedpatch.kcenter import PickProgress, greedy_kcenter_indices

ArrayLike = np.ndarray | torch.Tensor


def _as_float_tensor(features: ArrayLike) -> torch.Tensor:
    """A float32 tensor view of ``features`` (no copy when already float32; never written to)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.as_tensor(features)
    if tensor.ndim != 2:
        raise ValueError(f"features must be a 2-D array [N, D], got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        tensor = tensor.float()
    return tensor.float()


def _shares_memory(tensor: torch.Tensor, source: ArrayLike) -> bool:
    """Whether a CPU ``tensor`` aliases the caller's ``source`` buffer."""
    if isinstance(source, torch.Tensor):
        return source.device.type == "cpu" and tensor.untyped_storage().data_ptr() == source.untyped_storage().data_ptr()
    return bool(np.shares_memory(tensor.numpy(), np.asarray(source)))


def _check_target(target_size: int, n: int) -> None:
    if not isinstance(target_size, (int, np.integer)) or isinstance(target_size, bool):
        raise TypeError(f"target_size must be an int, got {type(target_size).__name__}")
    if target_size < 1:
        raise ValueError(f"target_size must be >= 1, got {target_size}")
    if target_size > n:
        raise ValueError(f"target_size {target_size} exceeds the number of features {n}")


def random_projection(dim: int, projection_dim: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A seeded Gaussian ``[dim, projection_dim]`` matrix scaled to preserve norms in expectation."""
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(dim, projection_dim, generator=generator) / math.sqrt(projection_dim)
    return matrix.to(device)


def project(features: torch.Tensor, projection_dim: int | None, seed: int) -> torch.Tensor:
    """Project to ``projection_dim`` dimensions when that at least halves the dimension.

    A projection that saves less than half of the work is not worth its loss in selection
    quality (measured: efficientnet_lite0's 152-d features projected to 128 lost 0.01 image
    AUROC on the magnetic-tile sample), so such features are used as they are.
    """
    if projection_dim is None or 2 * projection_dim > features.shape[1]:
        return features
    return features @ random_projection(features.shape[1], projection_dim, seed, features.device)


def greedy_coreset_indices(
    features: ArrayLike,
    target_size: int,
    seed: int = 42,
    projection_dim: int | None = 128,
    *,
    progress: PickProgress | None = None,
) -> np.ndarray:
    """Indices of the greedy k-center coreset (first pick drawn from ``seed``), in pick order."""
    tensor = _as_float_tensor(features)
    _check_target(target_size, tensor.shape[0])
    start = int(np.random.default_rng(seed).integers(tensor.shape[0]))
    with torch.no_grad():
        points = project(tensor, projection_dim, seed)
        return greedy_kcenter_indices(points, int(target_size), start, progress).cpu().numpy()


def greedy_coreset_selection(
    features: ArrayLike,
    target_size: int,
    seed: int = 42,
    projection_dim: int | None = 128,
    *,
    progress: PickProgress | None = None,
) -> np.ndarray:
    """Greedy k-center coreset: ``[target_size, D]`` rows of ``features`` (full dimension)."""
    indices = greedy_coreset_indices(features, target_size, seed, projection_dim, progress=progress)
    return _take_rows(features, indices)


def random_coreset_indices(n: int, target_size: int, seed: int = 42) -> np.ndarray:
    """``target_size`` distinct indices out of ``n``, drawn uniformly from ``seed``."""
    _check_target(target_size, n)
    return np.sort(np.random.default_rng(seed).choice(n, size=int(target_size), replace=False))


def random_coreset_selection(features: ArrayLike, target_size: int, seed: int = 42) -> np.ndarray:
    """Uniform random subset of ``target_size`` distinct rows (a cheap baseline)."""
    n = _as_float_tensor(features).shape[0]
    return _take_rows(features, random_coreset_indices(n, target_size, seed))


def _take_rows(features: ArrayLike, indices: np.ndarray) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        return features[torch.as_tensor(indices, device=features.device)].detach().cpu().float().numpy()
    return np.ascontiguousarray(np.asarray(features)[indices], dtype=np.float32)


def coreset_size(n: int, ratio: float) -> int:
    """Rows kept from ``n`` at ``ratio``: ``ceil(ratio * n)``, at least 1.

    The product is rounded to 6 decimals first so that float error does not add a row
    (``0.07 * 300`` is ``21.000000000000004`` in binary floating point, but 21 rows are meant).
    """
    return max(1, min(n, math.ceil(round(ratio * n, 6))))


def coverage_radius(features: np.ndarray, selected: np.ndarray) -> float:
    """Largest distance from any row of ``features`` to its nearest row of ``selected`` (full dim)."""
    from fedpatch.memory_bank import MemoryBank

    bank = MemoryBank(selected.shape[1])
    bank.add(selected)
    distances, _ = bank.search(np.asarray(features, dtype=np.float32), k=1)
    return float(distances.max())


class StreamingCoreset:
    """Bounded-memory greedy (or random) coreset over a stream of patch batches.

    Args:
        ratio: fraction of the patches kept, in (0, 1].
        chunk_size: rows buffered before a chunk is reduced; bounds the working memory to
            ``chunk_size * D`` floats plus the growing bank.
        method: ``"greedy"`` or ``"random"``.
        projection_dim: projection used by the greedy selection (``None``: full dimension).
        seed: seeds the projection and first picks; chunk ``i`` uses ``seed + i``.
        progress: called as ``progress(picked, target)`` during each chunk's greedy selection.
        device: where each chunk's greedy selection runs (the chunk is buffered on the CPU and
            copied there only while it is reduced); ``None``: the CPU.
    """

    def __init__(
        self,
        ratio: float,
        chunk_size: int = 16384,
        method: str = "greedy",
        projection_dim: int | None = 128,
        seed: int = 42,
        progress: PickProgress | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if method not in ("greedy", "random"):
            raise ValueError(f"coreset method must be 'greedy' or 'random', got {method!r}")
        self.ratio = ratio
        self.chunk_size = chunk_size
        self.method = method
        self.projection_dim = projection_dim
        self.seed = seed
        self.progress = progress
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._buffer: list[torch.Tensor] = []
        self._buffered = 0
        self._bank: np.ndarray | None = None
        self._rows = 0
        self._reserved = 0
        self._chunks = 0
        self.patches_seen = 0

    def bank_rows(self, patches: int) -> int:
        """Rows the bank will hold after ``patches`` patches: one coreset per chunk, as ``add`` cuts them."""
        full, rest = divmod(patches, self.chunk_size)
        return full * coreset_size(self.chunk_size, self.ratio) + (coreset_size(rest, self.ratio) if rest else 0)

    def reserve(self, patches: int) -> None:
        """Expect ``patches`` patches in all: the bank is then allocated once at its final size."""
        self._reserved = self.bank_rows(patches)

    def _append(self, rows: np.ndarray) -> None:
        """Copy one chunk's coreset into the bank array, allocating or growing it as needed."""
        needed = self._rows + rows.shape[0]
        if self._bank is None or needed > self._bank.shape[0]:
            capacity = max(needed, self._reserved if self._bank is None else 2 * self._bank.shape[0])
            grown = np.empty((capacity, rows.shape[1]), dtype=np.float32)
            if self._bank is not None:
                grown[: self._rows] = self._bank[: self._rows]
            self._bank = grown
        self._bank[self._rows : needed] = rows
        self._rows = needed

    def add(self, features: torch.Tensor) -> None:
        """Buffer a batch of patch features ``[n, D]``; reduce every full chunk."""
        source = features
        features = _as_float_tensor(features).detach().cpu()
        if _shares_memory(features, source):
            features = features.clone()  # the caller may reuse its buffer after add() returns
        self.patches_seen += features.shape[0]
        while features.shape[0] > 0:
            take = min(self.chunk_size - self._buffered, features.shape[0])
            self._buffer.append(features[:take])
            self._buffered += take
            features = features[take:]
            if self._buffered == self.chunk_size:
                self._reduce_buffer()

    def _reduce_buffer(self) -> None:
        chunk = torch.cat(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        self._buffer, self._buffered = [], 0
        target = coreset_size(chunk.shape[0], self.ratio)
        seed = self.seed + self._chunks
        if self.ratio >= 1.0:
            rows = chunk.numpy()
        elif self.method == "greedy":
            rows = greedy_coreset_selection(chunk.to(self.device), target, seed=seed, projection_dim=self.projection_dim, progress=self.progress)
        else:
            rows = random_coreset_selection(chunk, target, seed=seed)
        self._append(rows)
        self._chunks += 1

    @property
    def chunks(self) -> int:
        """Number of chunks reduced so far."""
        return self._chunks

    def finalize(self) -> np.ndarray:
        """Reduce the last partial chunk and return the bank ``[M, D]`` (float32, C-contiguous).

        The result is the bank array itself (no copy); with an over-estimated reservation it is
        a view of its first ``M`` rows, whose unused tail was never written, hence never resident.
        """
        if self._buffered:
            self._reduce_buffer()
        if self._bank is None:
            raise ValueError("no features were added to the coreset")
        return self._bank[: self._rows]

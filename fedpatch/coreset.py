"""Coreset subsampling of patch features: greedy k-center (PatchCore) and random.

Greedy k-center (farthest-point traversal, ``fedpatch.kcenter``) picks, one at a time, the
point farthest from everything picked so far. It keeps a vector of each point's distance to its
nearest selected point (memory O(N), never the O(N^2) distance matrix) and, by the triangle
inequality, recomputes only the distances that can shrink. As in the PatchCore paper, selection
runs on a seeded Gaussian random projection of the features (``projection_dim``,
Johnson-Lindenstrauss) when that at least halves their dimension, while the rows returned are
the original full-dimensional features. ``projection_dim=None`` selects exactly: a smaller
coverage radius, at a cost that depends on the features. Streamed as ``fit`` does it (2 cores,
radius against exact one-shot greedy): 20,480 x 448 efficientnet_lite0 stages 1.001 exact vs
1.123 projected, 0.84-1.07 s vs 0.92-0.93 s; 20,480 x 1536 WideResNet (random weights) features
of magnetic tiles 1.051 vs 1.134, 1.15-1.26 s vs 1.05-1.58 s; 70,500 x 1536 of six 1000x750
generated images 1.123 vs 1.281, 3.96-4.31 s vs 3.48-3.90 s. But on WideResNet features of
1000x750 noise images exact selection took 5-6x as long (3.0-3.3 s against 0.57 s per
16,384-row chunk: the distance bounds rule out little, ``fedpatch.kcenter``), and that
worst case is why the default projects.

Streaming: ``StreamingCoreset`` never holds all the patches of a training set. Patches arrive
in batches and are buffered up to ``chunk_size`` rows; each full chunk runs its own greedy
traversal, a little past its share of ``ceil(ratio * rows)`` picks (``OVERSELECT``), and the
buffer is freed. The memory bank keeps, of all the chunks' picks, those farthest from their
chunk's earlier picks: a prefix of each chunk's traversal, longer for the chunks that are harder
to cover. So the only memory that grows with the number of training images is the bank itself
(``ratio`` of the patches). When everything fits in one chunk the result is exactly the one-shot
greedy coreset. The coverage radius of the union is at most the largest radius among the
chunks' kept prefixes, which this choice minimises; ``coverage_radius`` measures it so the
scheme can be compared with the one-shot greedy (see tests and benchmarks).

The chunks' picks are copied into one bank array as they are made, into the slots of picks
that can no longer be kept. When the caller says how many patches to expect (``reserve``;
``PatchCore.fit`` does once it knows the image count and the patches per image), that array is
allocated once at its final size, so ``finalize`` hands it out without the concatenation that
would hold the bank twice (2.1 GB each for 300 WideResNet images at 1000x750), and all chunks'
picks compete for it. Without a reservation, or past it, the array grows by doubling and each
chunk competes with those before it only.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from fedpatch.kcenter import PickProgress, greedy_kcenter

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


def greedy_coreset_picks(
    features: ArrayLike,
    target_size: int,
    seed: int = 42,
    projection_dim: int | None = 128,
    *,
    progress: PickProgress | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy k-center picks (first pick drawn from ``seed``) in order, with each pick's squared
    distance to the earlier picks in the selection space (``inf`` for the first; see
    ``fedpatch.kcenter.greedy_kcenter``)."""
    tensor = _as_float_tensor(features)
    _check_target(target_size, tensor.shape[0])
    start = int(np.random.default_rng(seed).integers(tensor.shape[0]))
    with torch.no_grad():
        points = project(tensor, projection_dim, seed)
        picked, gaps = greedy_kcenter(points, int(target_size), start, progress)
    return picked.cpu().numpy(), gaps.cpu().double().numpy()


def greedy_coreset_indices(
    features: ArrayLike,
    target_size: int,
    seed: int = 42,
    projection_dim: int | None = 128,
    *,
    progress: PickProgress | None = None,
) -> np.ndarray:
    """Indices of the greedy k-center coreset (first pick drawn from ``seed``), in pick order."""
    return greedy_coreset_picks(features, target_size, seed, projection_dim, progress=progress)[0]


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


OVERSELECT = 1.25
"""Each chunk's greedy traversal runs this many times its share of picks; the bank keeps, across
chunks, the picks that were farthest from their chunk's earlier picks (``StreamingCoreset``).
Coverage radius of the streamed bank against exact one-shot greedy, same size, 16,384-row chunks,
exact selection, measured on 2 cores: 71,680 x 152 efficientnet_lite0 magnetic-tile features
1.036 (fixed shares) -> 1.008 (1.1 and 1.25); 20,480 x 448 lite0 stages 1.081 -> 1.036 (1.1),
1.001 (1.25); 20,480 x 1536 WideResNet (random weights) 1.130 -> 1.083 (1.1), 1.051 (1.25);
70,500 x 1536 WideResNet on six 1000x750 images 1.229 -> 1.159 (1.1), 1.123 (1.25); 1.5 and 2
gained nothing more. On a 128-d projection the full-dimension radius moved less (1.147 -> 1.134,
1.349 -> 1.281 on the two WideResNet sets): there the projection's own error dominates."""


class StreamingCoreset:
    """Bounded-memory greedy (or random) coreset over a stream of patch batches.

    Patches are copied into one ``chunk_size``-row buffer, allocated once and reused; each full
    chunk runs its own greedy traversal for ``OVERSELECT`` times its share
    (``ceil(ratio * rows)``) of picks. (Copying each batch in, rather than keeping the batches
    and concatenating them at the reduction, holds one chunk instead of up to three: the
    batches the chunk spans, whole, and their concatenation; ``benchmarks/results/fit_memory.md``.)
    The bank keeps ``bank_rows(patches)`` of those picks in all: those with the largest
    pick distance (each pick's distance to its chunk's earlier picks), which, since a
    traversal's pick distances never increase, is a prefix of every chunk's traversal and gives
    more picks to the chunks that are harder to cover. With fixed shares the coverage radius of
    the union is the largest chunk radius, set by the sparsest chunk; this allocation lowers it
    toward the one-shot greedy's (``OVERSELECT``'s measurements). Picks are dropped as soon as
    they cannot be kept: the bank never holds more than its final number of rows (the
    reservation, or the rows owed so far) plus one chunk's picks. With a reservation the result
    is the best choice among all the chunks' picks; without one, each merge keeps the best of
    what has arrived, and later chunks may find the earlier ones' spare picks gone. A single
    chunk gives exactly the one-shot greedy coreset.

    Args:
        ratio: fraction of the patches kept, in (0, 1].
        chunk_size: rows buffered before a chunk is reduced; bounds the working memory to
            ``chunk_size * D`` floats plus the bank.
        method: ``"greedy"`` or ``"random"`` (random: each chunk keeps its own share, no merge).
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
        self._buffer: torch.Tensor | None = None  # [chunk_size, D], allocated by the first add
        self._buffered = 0
        self._bank: np.ndarray | None = None
        self._gaps = np.empty(0)  # per bank row: its pick distance (inf: always kept)
        self._order = np.empty(0, dtype=np.int64)  # per bank row: arrival order, breaks ties
        self._rows = 0
        self._arrived = 0
        self._reserved = 0
        self._reduced = 0
        self._chunks = 0
        self.patches_seen = 0

    def bank_rows(self, patches: int) -> int:
        """Rows the bank will hold after ``patches`` patches: a share per chunk, as ``add`` cuts them."""
        full, rest = divmod(patches, self.chunk_size)
        return full * coreset_size(self.chunk_size, self.ratio) + (coreset_size(rest, self.ratio) if rest else 0)

    def reserve(self, patches: int) -> None:
        """Expect ``patches`` patches in all: the bank is then allocated once at its final size,
        and the picks of all chunks compete for it (class docstring)."""
        self._reserved = self.bank_rows(patches)

    def _ensure_capacity(self, count: int, dim: int) -> None:
        """Make the bank arrays hold at least ``count`` rows (the reservation at first, then doubling)."""
        if self._bank is not None and count <= self._bank.shape[0]:
            return
        capacity = max(count, self._reserved if self._bank is None else 2 * self._bank.shape[0])
        grown = np.empty((capacity, dim), dtype=np.float32)
        gaps, order = np.empty(capacity), np.empty(capacity, dtype=np.int64)
        if self._bank is not None:
            grown[: self._rows], gaps[: self._rows], order[: self._rows] = (
                self._bank[: self._rows], self._gaps[: self._rows], self._order[: self._rows])
        self._bank, self._gaps, self._order = grown, gaps, order

    def _merge(self, rows: np.ndarray, gaps: np.ndarray) -> None:
        """Add one chunk's picks; past the rows the bank may hold, keep the farthest picks."""
        order = np.arange(self._arrived, self._arrived + len(rows))
        self._arrived += len(rows)
        limit = max(self._reserved, self.bank_rows(self._reduced))
        if self._rows + len(rows) <= limit:
            slots = np.arange(self._rows, self._rows + len(rows))
        else:
            keep = _farthest(np.concatenate([self._gaps[: self._rows], gaps]), np.concatenate([self._order[: self._rows], order]), limit)
            new = np.flatnonzero(keep[self._rows :])
            slots = np.concatenate([np.flatnonzero(~keep[: self._rows]), np.arange(self._rows, limit)])[: len(new)]
            rows, gaps, order = rows[new], gaps[new], order[new]
        end = max(self._rows, int(slots.max()) + 1 if len(slots) else 0)
        self._ensure_capacity(end, rows.shape[1])
        assert self._bank is not None
        self._bank[slots], self._gaps[slots], self._order[slots] = rows, gaps, order
        self._rows = end

    def add(self, features: torch.Tensor) -> None:
        """Buffer a batch of patch features ``[n, D]``; reduce every full chunk."""
        features = _as_float_tensor(features).detach().cpu()
        if self._buffer is None:
            # torch.empty touches no pages: a fit smaller than one chunk holds only its own rows
            self._buffer = torch.empty((self.chunk_size, features.shape[1]), dtype=torch.float32)
        elif features.shape[1] != self._buffer.shape[1]:
            raise ValueError(f"patch features have {features.shape[1]} dims, earlier batches had {self._buffer.shape[1]}")
        self.patches_seen += features.shape[0]
        start = 0
        while start < features.shape[0]:
            take = min(self.chunk_size - self._buffered, features.shape[0] - start)
            self._buffer[self._buffered : self._buffered + take].copy_(features[start : start + take])
            self._buffered += take
            start += take
            if self._buffered == self.chunk_size:
                self._reduce_buffer()

    def _reduce_buffer(self) -> None:
        assert self._buffer is not None
        chunk = self._buffer[: self._buffered]  # read only until the next add overwrites it
        self._buffered = 0
        self._reduced += chunk.shape[0]
        target = coreset_size(chunk.shape[0], self.ratio)
        seed = self.seed + self._chunks
        gaps = np.full(target, np.inf)  # a chunk's own share, never dropped
        if self.ratio >= 1.0:
            rows = chunk.numpy()
        elif self.method == "greedy":
            picks = min(chunk.shape[0], math.ceil(OVERSELECT * target))
            indices, gaps = greedy_coreset_picks(chunk.to(self.device), picks, seed=seed, projection_dim=self.projection_dim, progress=self.progress)
            rows = _take_rows(chunk, indices)
        else:
            rows = random_coreset_selection(chunk, target, seed=seed)
        self._merge(rows, gaps)
        self._chunks += 1

    @property
    def chunks(self) -> int:
        """Number of chunks reduced so far."""
        return self._chunks

    def finalize(self) -> np.ndarray:
        """Reduce the last partial chunk and return the bank ``[M, D]`` (float32, C-contiguous),
        ``M = bank_rows(patches_seen)``.

        The result is the bank array itself (no copy); with an over-estimated reservation it is
        a view of its first ``M`` rows (the kept picks, packed in front). Behind them lie the
        dropped picks, at most ``OVERSELECT`` times ``M`` rows in all; the rest of the array was
        never written, hence never resident.
        """
        if self._buffered:
            self._reduce_buffer()
        self._buffer = None
        if self._bank is None:
            raise ValueError("no features were added to the coreset")
        target = self.bank_rows(self._reduced)
        if self._rows > target:  # a reservation larger than what came: keep the farthest picks, packed in front
            keep = _farthest(self._gaps[: self._rows], self._order[: self._rows], target)
            holes, movers = np.flatnonzero(~keep[:target]), np.flatnonzero(keep[target:]) + target
            self._bank[holes], self._gaps[holes], self._order[holes] = self._bank[movers], self._gaps[movers], self._order[movers]
            self._rows = target
        return self._bank[: self._rows]


def _farthest(gaps: np.ndarray, order: np.ndarray, count: int) -> np.ndarray:
    """Mask of the ``count`` entries with the largest ``gaps``, ties going to the lower ``order``
    (so that, within a chunk, the kept picks are a prefix of its traversal). Linear time."""
    if count >= len(gaps):
        return np.ones(len(gaps), dtype=bool)
    cut = np.partition(gaps, len(gaps) - count)[len(gaps) - count]
    keep = gaps > cut
    ties = np.flatnonzero(gaps == cut)
    keep[ties[np.argsort(order[ties], kind="stable")[: count - int(keep.sum())]]] = True
    return keep

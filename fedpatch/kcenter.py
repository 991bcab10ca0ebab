"""Greedy k-center (farthest-point traversal) with exact pruning by the triangle inequality.

Each pick adds the point farthest from the centers picked so far. The plain traversal keeps
every point's squared distance to its nearest center and updates all of them at every pick:
one ``[N, D]`` matrix-vector product per pick. Once the features no longer fit in the cache
that is memory-bound: 438 s for 7,168 picks out of 71,680 x 152 features on a 2-core machine.

Most of those updates change nothing. A point ``x`` whose nearest center ``s`` is at distance
``d(x, s)`` cannot come closer to a new center ``c`` when ``d(s, c) >= 2 d(x, s)``, because
``d(x, c) >= d(s, c) - d(x, s) >= d(x, s)``. So each pick here
1. bounds the distances from ``c`` to the earlier centers from below (``i`` short rows),
2. tests every point against its own center's bound (a few cheap ``N``-long passes),
3. reads the full feature rows, and computes exact distances, only for the points that pass.
Step 3 uses the same expression as the plain update, so the picks are those of the plain
traversal (up to float rounding between near-equal distances; the tests compare them).

For wide features (``D >= 4 * BOUND_DIM``) steps 1-2, and a second test on each candidate, run
on ``Z = X V``: the coordinates along the top principal directions of a row sample. ``V`` has
orthonormal columns, so ``||V^T (x - y)|| <= ||x - y||`` for every pair: these are true lower
bounds whatever ``V`` is, and principal directions make them tight, so few full rows are read.

Early picks (few, large cells) can leave most points to recompute; when a pick reads more
than ``FULL_PASS_FRACTION`` of the full rows the plain update is cheaper, so the traversal
switches to it and retests pruning every ``RECHECK_EVERY`` picks. Narrow features start plain,
wide ones pruned (a plain pick over wide rows costs most); narrow features that fit in the
cache (``PRUNE_MIN_BYTES``, e.g. a default 16,384-row chunk of 152-d patches) are not pruned at
all. On a GPU the plain update is one kernel and pruning would add several plus a host sync
per pick, so it runs plain there.
Features without low-dimensional structure (isotropic noise) leave the bounds nothing to rule
out; the traversal then runs plain passes, as slow as the unpruned one (13 s for 2,048 picks
of 20,480 x 1536 rows), and logs a warning that names ``projection_dim`` as the faster,
approximate alternative. Structured wide features can still be slow where the first picks
move most points: on WideResNet (random weights) features of 1000x750 noise images, 3.4 s per
16,384-row chunk against 0.45 s on the default 128-d projection; that is why selection
projects wide features by default (``fedpatch.coreset``).

Measured on 2 cores (exact selection of 10 %, same picks as the plain traversal; several runs,
``benchmarks.coreset_bench``): 20,480 x 1536 wide_resnet50_2 (random weights) features
13-14 s -> 0.4-0.6 s; 20,480 x 448 real efficientnet_lite0 features (five stages)
4.9-5.6 s -> 0.4-0.6 s; 71,680 x 152 one-shot 438 s -> 19-23 s. A 16,384 x 152 chunk, which
stays in the cache, is faster plain (``PRUNE_MIN_BYTES``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

LOGGER = logging.getLogger(__name__)

PickProgress = Callable[[int, int], None]
"""Called as ``progress(picked, target)`` after each greedy pick (for progress bars)."""

BOUND_DIM = 64
"""Principal directions that carry the lower bounds of features at least four times as wide."""
BOUND_SAMPLE = 4096
"""Rows the principal directions are estimated from (their quality only affects speed)."""
FULL_PASS_FRACTION = 0.4
"""When a pick had to read more than this share of the full feature rows, the next picks update
every point (plain pass) until a recheck finds pruning worth it again."""
PRUNE_MIN_BYTES = 32 * 2**20
"""Narrow features (below ``4 * BOUND_DIM`` dims) are pruned only when they take more than this:
a smaller set stays in the cache, where a plain pass is cheap. Measured in the fit of the
benchmark suite, 20 magnetic-tile images of 152-d efficientnet_lite0 patches in chunks of
16,384 rows (10 MB): coreset 1.26 s pruned, 0.41 s plain in the run before; one-shot 71,680
rows (44 MB) take 19-23 s pruned vs 438 s plain."""
RECHECK_EVERY = 16
"""While in plain passes, every this-many picks tests whether pruning has become worth it."""
WARN_AFTER = 64
"""Picks after which (or after a tenth of the picks, if later) wide features whose picks went
mostly plain get a warning: exact selection then costs a full pass per pick."""
SAFETY = 1.0 - 1e-4
"""Lower bounds are shrunk by this factor so that float rounding never prunes a point the
exact comparison would update."""


def principal_basis(points: torch.Tensor, dim: int, seed: int = 0) -> torch.Tensor:
    """``[D, dim]`` orthonormal columns spanning the top principal directions of a row sample.

    Randomized range finder with two power iterations on at most ``BOUND_SAMPLE`` rows, seeded
    by its own generator (the global RNG is left alone).
    """
    n, width = points.shape
    sample = points[:: max(1, n // BOUND_SAMPLE)]
    sample = sample - sample.mean(dim=0, keepdim=True)
    generator = torch.Generator().manual_seed(seed)
    sketch = torch.randn(width, dim + 8, generator=generator).to(points.device, points.dtype)
    basis = torch.linalg.qr(sample @ sketch).Q
    for _ in range(2):
        basis = torch.linalg.qr(sample @ torch.linalg.qr(sample.T @ basis).Q).Q
    _, _, vh = torch.linalg.svd(basis.T @ sample, full_matrices=False)
    return vh[:dim].T.contiguous()


@contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """Within the block, torch's CPU ops run on one thread (restored after; GPUs unaffected).

    A traversal is thousands of picks of small ops. With two threads each op is a parallel
    region whose barrier waits for both; when anything else runs on a 2-core machine, one of
    them is often descheduled. Measured under load, 1,639 picks of a 16,384-row chunk: 152-d
    1.0-2.3 s on two threads vs 0.5-0.6 s on one; 1536-d 2.0-3.8 s vs 0.7 s. The plain
    matrix-vector products are memory-bound and no faster on two threads (0.36-0.52 s vs
    0.34-0.42 s).
    """
    previous = torch.get_num_threads()
    if device.type != "cpu" or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _plain_update(points: torch.Tensor, sq_norms: torch.Tensor, current: int, min_dist: torch.Tensor) -> torch.Tensor:
    """Squared distances of all points to ``points[current]``; ``min_dist`` lowered in place.

    Returns the mask of the points whose nearest center is now ``current``.
    ``||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2``: one matrix-vector product.
    """
    dist = torch.addmv(sq_norms, points, points[current], alpha=-2.0).add_(sq_norms[current])
    closer = dist < min_dist
    torch.minimum(min_dist, dist, out=min_dist)
    return closer


class _Pruner:
    """State of the pruned traversal: lower-bound coordinates, centers, point assignments."""

    def __init__(self, points: torch.Tensor, sq_norms: torch.Tensor, target_size: int) -> None:
        self.points = points
        self.sq_norms = sq_norms
        # Coordinates whose differences bound the true distances from below (exact when narrow).
        self.refine = points.shape[1] >= 4 * BOUND_DIM
        self.coords = points @ principal_basis(points, BOUND_DIM) if self.refine else points
        self.centers = torch.empty(target_size, self.coords.shape[1], dtype=points.dtype)
        self.assign = torch.zeros(points.shape[0], dtype=torch.long)

    def add_center(self, index: int, current: int) -> None:
        self.centers[index] = self.coords[current]

    def worth_it(self, rows_read: int) -> bool:
        """Whether pruning beats a plain pass when a pick reads ``rows_read`` full feature rows."""
        return rows_read <= FULL_PASS_FRACTION * self.points.shape[0]

    def plain(self, index: int, current: int, min_dist: torch.Tensor) -> None:
        """Update every point (and its assignment) for center number ``index``."""
        self.assign.masked_fill_(_plain_update(self.points, self.sq_norms, current, min_dist), index)

    def pruned(self, index: int, current: int, min_dist: torch.Tensor) -> int:
        """Update only the points that may come closer to center ``index``; returns how many full
        feature rows that took (the points that passed every lower-bound test).

        ``index_select``/``masked_select``/``index_copy_`` rather than tensor indexing: 3-4x
        faster on the CPU for these N-long gathers.
        """
        anchor = self.coords[current]
        # d(s, c)^2 / 4 from below, for every earlier center s; x is a candidate if that is < d(x, s)^2.
        quarter = (self.centers[:index] - anchor).square_().sum(dim=1).mul_(0.25 * SAFETY)
        candidates = torch.lt(quarter.index_select(0, self.assign), min_dist).nonzero().squeeze(1)
        if self.refine and candidates.numel():
            bound = (self.coords.index_select(0, candidates) - anchor).square_().sum(dim=1).mul_(SAFETY)
            candidates = candidates.masked_select(bound < min_dist.index_select(0, candidates))
        rows = self.points.index_select(0, candidates)
        dist = torch.addmv(self.sq_norms.index_select(0, candidates), rows, self.points[current], alpha=-2.0)
        closer = dist.add_(self.sq_norms[current]) < min_dist.index_select(0, candidates)
        moved = candidates.masked_select(closer)
        min_dist.index_copy_(0, moved, dist.masked_select(closer))
        self.assign.index_fill_(0, moved, index)
        return candidates.numel()


def greedy_kcenter(
    points: torch.Tensor, target_size: int, start: int, progress: PickProgress | None = None, *, prune: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Farthest-point traversal on ``points`` from index ``start``: ``(picked indices in order,
    squared pick distances)``.

    The pick distance of pick ``i`` is its squared distance to the nearest of picks ``0..i-1``
    (``inf`` for the first), which is also the squared coverage radius of picks ``0..i-1`` (the
    farthest point is picked next). It never increases along the order; ``StreamingCoreset``
    compares these distances across chunks to choose how many picks each chunk keeps.
    ``prune=False`` runs the plain traversal everywhere (the reference the benchmarks time).
    """
    n = points.shape[0]
    sq_norms = (points * points).sum(dim=1)
    min_dist = torch.full((n,), float("inf"), dtype=points.dtype, device=points.device)
    picked = torch.empty(target_size, dtype=torch.long, device=points.device)
    gaps = torch.full((target_size,), float("inf"), dtype=points.dtype, device=points.device)
    pays = points.shape[1] >= 4 * BOUND_DIM or points.numel() * points.element_size() > PRUNE_MIN_BYTES
    pruner = _Pruner(points, sq_norms, target_size) if prune and pays and points.device.type == "cpu" and target_size > 1 else None
    with _one_thread(points.device):
        _traverse(points, sq_norms, min_dist, picked, gaps, pruner, int(start), progress)
    return picked, gaps


def greedy_kcenter_indices(
    points: torch.Tensor, target_size: int, start: int, progress: PickProgress | None = None, *, prune: bool = True
) -> torch.Tensor:
    """The picked indices of ``greedy_kcenter``, in order."""
    return greedy_kcenter(points, target_size, start, progress, prune=prune)[0]


def _traverse(
    points: torch.Tensor,
    sq_norms: torch.Tensor,
    min_dist: torch.Tensor,
    picked: torch.Tensor,
    gaps: torch.Tensor,
    pruner: _Pruner | None,
    current: int,
    progress: PickProgress | None,
) -> None:
    """The pick loop of ``greedy_kcenter``: fills ``picked`` in order and ``gaps`` (from pick 1 on)."""
    n, target_size = points.shape[0], picked.shape[0]
    pruning = pruner is not None and pruner.refine  # wide features start pruned, narrow ones plain
    plain_picks = 0
    for i in range(target_size):
        picked[i] = current
        if pruner is None:
            _plain_update(points, sq_norms, current, min_dist)
        else:
            pruner.add_center(i, current)
            if i > 0 and (pruning or i % RECHECK_EVERY == 0):
                pruning = pruner.worth_it(pruner.pruned(i, current, min_dist))
            else:
                pruner.plain(i, current, min_dist)
                plain_picks += 1
            if pruner.refine and i == max(WARN_AFTER, target_size // 10) and 2 * plain_picks > i:
                LOGGER.warning(
                    "greedy coreset on %d x %d features: the distance bounds rule out few points (the features "
                    "show little low-dimensional structure), so exact selection costs a full pass over them per "
                    "pick; model.projection_dim: 128 selects on a random projection instead (faster, approximate)",
                    n, points.shape[1],
                )
        min_dist[current] = -1.0  # never re-pick a selected point, even when duplicates tie at 0
        farthest = torch.argmax(min_dist)
        if i + 1 < target_size:
            gaps[i + 1] = min_dist[farthest]
        current = int(farthest)
        if progress is not None:
            progress(i + 1, target_size)

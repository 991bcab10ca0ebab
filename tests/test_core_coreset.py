"""Coreset selection: greedy k-center against a brute-force reference, projection and streaming
quality bounds (measured on clustered data), random coresets and argument errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedpatch import kcenter
from fedpatch.coreset import (
    OVERSELECT,
    StreamingCoreset,
    coreset_size,
    coverage_radius,
    greedy_coreset_picks,
    greedy_coreset_indices,
    greedy_coreset_selection,
    random_coreset_indices,
    random_coreset_selection,
)


def brute_force_farthest_point(points: np.ndarray, target_size: int, start: int) -> list[int]:
    """Textbook farthest-point traversal in float64 with explicit differences (O(N) per pick)."""
    points = points.astype(np.float64)
    min_dist = np.full(points.shape[0], np.inf)
    picked = [start]
    for _ in range(target_size - 1):
        min_dist = np.minimum(min_dist, np.linalg.norm(points - points[picked[-1]], axis=1))
        min_dist[picked] = -np.inf
        picked.append(int(np.argmax(min_dist)))
    return picked


def brute_force_radius(points: np.ndarray, selected: np.ndarray) -> float:
    """max over points of the distance to the nearest selected row (float64, full matrix)."""
    diff = points.astype(np.float64)[:, None, :] - selected.astype(np.float64)[None, :, :]
    return float(np.sqrt((diff**2).sum(-1)).min(axis=1).max())


def clustered_points(seed: int, n: int = 3000, dim: int = 256, clusters: int = 24) -> np.ndarray:
    """Clusters of very unequal sizes, each a 3-d blob embedded in ``dim`` dimensions, plus noise.

    Small far-away clusters are what a poor coreset misses, so coverage radii discriminate
    (a random coreset's radius is about 5x the greedy one's here).
    """
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, 2.0, (clusters, dim))
    bases = rng.normal(0.0, 1.0, (clusters, 3, dim)) / np.sqrt(dim)
    labels = rng.choice(clusters, size=n, p=rng.dirichlet(np.full(clusters, 0.3)))
    latent = rng.normal(0.0, 1.0, (n, 3))
    points = centers[labels] + 4.0 * np.einsum("ni,nid->nd", latent, bases[labels])
    return (points + 0.02 * rng.normal(0.0, 1.0, (n, dim))).astype(np.float32)


def stream(points: np.ndarray, coreset: StreamingCoreset, batch: int) -> np.ndarray:
    """Feed ``points`` to ``coreset`` in batches of ``batch`` rows (as torch tensors); finalize."""
    for i in range(0, points.shape[0], batch):
        coreset.add(torch.from_numpy(points[i : i + batch]))
    return coreset.finalize()


def assert_rows_of(selected: np.ndarray, points: np.ndarray) -> None:
    """Every selected row is (exactly) a row of ``points``."""
    diff = np.abs(selected[:, None, :] - points[None, :, :]).max(-1)
    assert (diff.min(axis=1) == 0).all()


# --------------------------------------------------------------------------------------------
# Greedy k-center
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_exact_greedy_equals_brute_force_reference(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    points = rng.normal(size=(300, 16)).astype(np.float32)
    start = int(np.random.default_rng(seed).integers(points.shape[0]))
    expected = brute_force_farthest_point(points, 40, start)
    got = greedy_coreset_indices(points, 40, seed=seed, projection_dim=None)
    assert got.tolist() == expected
    rows = greedy_coreset_selection(points, 40, seed=seed, projection_dim=None)
    assert np.array_equal(rows, points[expected])


def test_greedy_size_distinct_and_torch_numpy_agree(rng: np.random.Generator) -> None:
    points = rng.normal(size=(500, 64)).astype(np.float32)
    idx = greedy_coreset_indices(points, 50, seed=3, projection_dim=16)
    assert idx.shape == (50,) and len(set(idx.tolist())) == 50
    rows = greedy_coreset_selection(points, 50, seed=3, projection_dim=16)
    assert rows.shape == (50, 64) and rows.dtype == np.float32
    assert np.array_equal(rows, points[idx])
    from_torch = greedy_coreset_selection(torch.from_numpy(points), 50, seed=3, projection_dim=16)
    assert np.array_equal(from_torch, rows)
    assert len(np.unique(rows, axis=0)) == 50


@pytest.mark.parametrize(("projection_dim", "dim"), [(None, 64), (16, 64), (None, 300)])
def test_greedy_never_picks_a_duplicate_row(projection_dim: int | None, dim: int, rng: np.random.Generator) -> None:
    """With each row repeated 3 times, k <= #distinct picks k distinct rows (duplicates tie at 0).

    300-d rows take the pruned traversal's principal-direction bounds (``kcenter.BOUND_DIM``).
    """
    distinct = rng.normal(size=(60, dim)).astype(np.float32) * 10.0
    points = np.concatenate([distinct, distinct, distinct])[rng.permutation(180)]
    for target in (30, 60):
        idx = greedy_coreset_indices(points, target, seed=1, projection_dim=projection_dim)
        assert len(set(idx.tolist())) == target
        assert len(np.unique(points[idx], axis=0)) == target
    # beyond the distinct rows, indices stay distinct even though rows repeat
    idx = greedy_coreset_indices(points, 180, seed=1, projection_dim=projection_dim)
    assert sorted(idx.tolist()) == list(range(180))


@pytest.mark.parametrize("full_pass_fraction", [kcenter.FULL_PASS_FRACTION, 0.0, 1.0])
@pytest.mark.parametrize("dim", [16, 96, 256])
def test_pruned_traversal_equals_brute_force(dim: int, full_pass_fraction: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pruned traversal picks what float64 farthest-point traversal picks.

    16/96-d: bounds on the features themselves; 256-d: on principal coordinates, then a second
    test per candidate. Fraction 0 switches to a plain pass after every recheck, 1 never does.
    """
    monkeypatch.setattr(kcenter, "FULL_PASS_FRACTION", full_pass_fraction)
    monkeypatch.setattr(kcenter, "PRUNE_MIN_BYTES", 0)  # prune these small narrow sets too
    points = clustered_points(dim, n=1500, dim=dim)
    expected = brute_force_farthest_point(points, 150, 11)
    assert kcenter.greedy_kcenter_indices(torch.from_numpy(points), 150, 11).tolist() == expected


@pytest.mark.parametrize("dim", [96, 256])
def test_pruned_traversal_reads_few_full_rows(dim: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """On clustered data most picks leave most points alone: few full rows are read per pick.

    Measured: 96-d 3.8 %, 256-d 1.6 % of the 3,000 rows per pruned pick on average; a plain
    pass reads all of them.
    """
    reads: list[int] = []
    pruned = kcenter._Pruner.pruned

    def counting(self: kcenter._Pruner, index: int, current: int, min_dist: torch.Tensor) -> int:
        reads.append(pruned(self, index, current, min_dist))
        return reads[-1]

    monkeypatch.setattr(kcenter._Pruner, "pruned", counting)
    monkeypatch.setattr(kcenter, "PRUNE_MIN_BYTES", 0)
    points = clustered_points(1, dim=dim)
    picked = kcenter.greedy_kcenter_indices(torch.from_numpy(points), 300, 0)
    assert picked.tolist() == brute_force_farthest_point(points, 300, 0)
    assert len(reads) >= 250  # pruning took over early
    assert np.mean(reads) < 0.15 * len(points), np.mean(reads) / len(points)


def test_principal_basis_bounds_distances_from_below() -> None:
    """Orthonormal columns (so projected distances never exceed true ones), tight on data that
    lies near a low-dimensional subspace, and the global torch RNG is left as it was."""
    rng = np.random.default_rng(5)
    latent = rng.normal(size=(2000, 12)) @ rng.normal(size=(12, 320))
    points = torch.from_numpy((latent + 0.01 * rng.normal(size=latent.shape)).astype(np.float32))
    state = torch.random.get_rng_state()
    basis = kcenter.principal_basis(points, 32)
    assert torch.equal(state, torch.random.get_rng_state())
    assert basis.shape == (320, 32)
    torch.testing.assert_close(basis.T @ basis, torch.eye(32), atol=1e-5, rtol=0)
    pairs = points[:1000] - points[1000:]
    true = pairs.norm(dim=1)
    bound = (pairs @ basis).norm(dim=1)
    assert (bound <= true * (1 + 1e-5)).all()
    assert (bound >= 0.99 * true).all()  # 12 latent directions inside the 32


def test_projected_greedy_coverage_close_to_exact() -> None:
    """Greedy over a 128-d random projection of 256-d features covers within 1.3x of exact greedy.

    Measured on these data sets (seeds 0-2): ratio 1.08-1.09; a random coreset: 4.8-5.7x.
    """
    for seed in range(3):
        points = clustered_points(seed)
        exact = coverage_radius(points, greedy_coreset_selection(points, 150, seed=seed, projection_dim=None))
        projected = coverage_radius(points, greedy_coreset_selection(points, 150, seed=seed, projection_dim=128))
        random = coverage_radius(points, random_coreset_selection(points, 150, seed=seed))
        assert projected <= 1.3 * exact, (seed, projected / exact)
        assert random >= 3.0 * exact, (seed, random / exact)  # the data discriminate


def test_small_projection_gain_uses_full_dimension(rng: np.random.Generator) -> None:
    """A projection that does not at least halve the dimension is skipped (exact greedy)."""
    points = rng.normal(size=(200, 152)).astype(np.float32)
    assert np.array_equal(
        greedy_coreset_indices(points, 20, seed=0, projection_dim=128),
        greedy_coreset_indices(points, 20, seed=0, projection_dim=None),
    )


def test_coverage_radius_matches_brute_force(rng: np.random.Generator) -> None:
    points = rng.normal(size=(400, 8)).astype(np.float32)
    selected = points[:25]
    assert coverage_radius(points, selected) == pytest.approx(brute_force_radius(points, selected), rel=1e-5)


# --------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("projection_dim", [None, 16])
def test_streaming_single_chunk_equals_one_shot(projection_dim: int | None, rng: np.random.Generator) -> None:
    points = rng.normal(size=(700, 64)).astype(np.float32)
    coreset = StreamingCoreset(0.1, chunk_size=1000, projection_dim=projection_dim, seed=5)
    bank = stream(points, coreset, batch=96)
    assert coreset.chunks == 1 and coreset.patches_seen == 700
    one_shot = greedy_coreset_selection(points, math.ceil(0.1 * 700), seed=5, projection_dim=projection_dim)
    assert np.array_equal(bank, one_shot)


def test_pick_distances_are_the_prefix_radii(rng: np.random.Generator) -> None:
    """Each pick's distance to the earlier picks (squared) is the coverage radius of those
    earlier picks, and never increases along the traversal."""
    points = rng.normal(size=(400, 12)).astype(np.float32)
    indices, gaps = greedy_coreset_picks(points, 30, seed=2, projection_dim=None)
    assert gaps[0] == np.inf and np.all(np.diff(gaps[1:]) <= 0)
    for i in (1, 2, 7, 29):
        earlier = points[indices[:i]].astype(np.float64)
        to_earlier = np.sqrt(((earlier - points[indices[i]].astype(np.float64)) ** 2).sum(axis=1)).min()
        assert math.sqrt(gaps[i]) == pytest.approx(to_earlier, rel=1e-5)
        assert math.sqrt(gaps[i]) == pytest.approx(coverage_radius(points, points[indices[:i]]), rel=1e-5)


def chunk_traversals(points: np.ndarray, chunk: int, ratio: float, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each chunk's own greedy traversal as StreamingCoreset runs it: OVERSELECT times its share of
    picks, seed + chunk number; rows and pick distances."""
    out = []
    for i, start in enumerate(range(0, len(points), chunk)):
        part = points[start : start + chunk]
        picks = min(len(part), math.ceil(OVERSELECT * coreset_size(len(part), ratio)))
        indices, gaps = greedy_coreset_picks(part, picks, seed=seed + i, projection_dim=None)
        out.append((part[indices], gaps))
    return out


def row_set(rows: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in rows}


def uneven_points(rng: np.random.Generator) -> np.ndarray:
    """1,000 rows in chunks of 300 of which the second is 5x tighter than the others."""
    points = rng.normal(size=(1000, 8)).astype(np.float32)
    points[300:600] *= 0.2
    return points


def test_streaming_keeps_the_farthest_picks_of_all_chunks(rng: np.random.Generator) -> None:
    """The bank is, per chunk, a prefix of that chunk's traversal, the prefixes chosen by pick
    distance across chunks: the tight chunk gives picks to the spread ones, and the union
    covers better than the fixed shares (21, 21, 21, 7 of 0.07)."""
    points = uneven_points(rng)
    coreset = StreamingCoreset(0.07, chunk_size=300, projection_dim=None, seed=0)
    coreset.reserve(len(points))
    bank = stream(points, coreset, batch=128)
    assert coreset.chunks == 4
    assert bank.shape == (21 + 21 + 21 + 7, 8) and bank.dtype == np.float32
    assert_rows_of(bank, points)
    traversals = chunk_traversals(points, 300, 0.07, seed=0)
    assert [len(rows) for rows, _ in traversals] == [27, 27, 27, 9]
    cut = np.sort(np.concatenate([gaps for _, gaps in traversals]))[::-1][len(bank) - 1]
    kept = [int((gaps >= cut).sum()) for _, gaps in traversals]
    assert sum(kept) == len(bank)
    assert kept[1] < 21 < min(kept[0], kept[2])  # the tight chunk needed fewer of its picks
    assert row_set(bank) == row_set(np.concatenate([rows[:n] for (rows, _), n in zip(traversals, kept)]))
    # the chosen prefixes minimise the largest chunk radius (a theorem for any fixed shares of
    # the same total), which bounds the union's radius
    def worst_chunk_radius(counts: list[int]) -> float:
        return max(coverage_radius(points[300 * i : 300 * (i + 1)], rows[:n]) for i, ((rows, _), n) in enumerate(zip(traversals, counts)))

    fixed = [21, 21, 21, 7]
    assert coverage_radius(points, bank) <= worst_chunk_radius(kept) <= worst_chunk_radius(fixed)
    fixed_bank = np.concatenate([rows[:n] for (rows, _), n in zip(traversals, fixed)])
    assert coverage_radius(points, bank) <= 0.97 * coverage_radius(points, fixed_bank)  # measured 0.957 here


def test_streaming_coverage_close_to_one_shot_greedy() -> None:
    """Five chunks of a clustered set: coverage within 2.5x of the one-shot greedy of equal size.

    Measured (seeds 0-2, ratio 0.05, chunk 700 of 3000 rows, projection 128): 1.46-1.76x the
    one-shot greedy radius; a random coreset of the same size is 2.5-3.6x the streamed radius.
    """
    for seed in range(3):
        points = clustered_points(seed)
        bank = stream(points, StreamingCoreset(0.05, chunk_size=700, projection_dim=128, seed=seed), batch=256)
        assert len(bank) == 4 * math.ceil(0.05 * 700) + math.ceil(0.05 * 200) == 150
        one_shot = greedy_coreset_selection(points, len(bank), seed=seed, projection_dim=128)
        streamed, reference = coverage_radius(points, bank), coverage_radius(points, one_shot)
        assert streamed <= 2.5 * reference, (seed, streamed / reference)
        random = coverage_radius(points, random_coreset_selection(points, len(bank), seed=seed))
        assert random >= 2.0 * streamed, (seed, random / streamed)


def test_streaming_random_method_and_full_ratio(rng: np.random.Generator) -> None:
    points = rng.normal(size=(250, 4)).astype(np.float32)
    bank = stream(points, StreamingCoreset(0.2, chunk_size=100, method="random", seed=1), batch=60)
    assert bank.shape == (20 + 20 + 10, 4)
    assert len(np.unique(bank, axis=0)) == len(bank)
    assert_rows_of(bank, points)
    full = stream(points, StreamingCoreset(1.0, chunk_size=100), batch=60)
    assert np.array_equal(full, points)


def test_streaming_finalize_without_data() -> None:
    with pytest.raises(ValueError, match="no features"):
        StreamingCoreset(0.1).finalize()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ratio": 0.0}, r"ratio must be in \(0, 1\]"),
        ({"ratio": 1.5}, r"ratio must be in \(0, 1\]"),
        ({"ratio": -0.1}, r"ratio must be in \(0, 1\]"),
        ({"ratio": 0.1, "chunk_size": 0}, "chunk_size"),
        ({"ratio": 0.1, "method": "kmeans"}, "method"),
    ],
)
def test_streaming_argument_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StreamingCoreset(**kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Random coreset, sizes, argument errors
# --------------------------------------------------------------------------------------------
def test_random_coreset_properties(rng: np.random.Generator) -> None:
    points = rng.normal(size=(300, 5))
    idx = random_coreset_indices(300, 40, seed=3)
    assert idx.shape == (40,) and len(set(idx.tolist())) == 40
    assert (np.diff(idx) > 0).all() and idx.min() >= 0 and idx.max() < 300
    assert np.array_equal(idx, random_coreset_indices(300, 40, seed=3))
    assert not np.array_equal(idx, random_coreset_indices(300, 40, seed=4))
    rows = random_coreset_selection(points, 40, seed=3)
    assert rows.dtype == np.float32
    np.testing.assert_array_equal(rows, points[idx].astype(np.float32))
    assert np.array_equal(random_coreset_indices(10, 10, seed=0), np.arange(10))


@pytest.mark.parametrize(
    ("n", "ratio", "expected"),
    [
        (1000, 0.1, 100),
        (1001, 0.1, 101),
        (7, 0.01, 1),
        (5, 1.0, 5),
        (65536, 0.1, 6554),
        (300, 0.07, 21),  # 0.07 * 300 == 21.000000000000004 in floating point
        (25, 0.28, 7),  # 0.28 * 25 == 7.000000000000001
        (100, 0.55, 55),
    ],
)
def test_coreset_size_is_ceil(n: int, ratio: float, expected: int) -> None:
    """``ceil(ratio * n)`` of the exact decimal product, not of its float rounding."""
    assert coreset_size(n, ratio) == expected


@pytest.mark.parametrize("select", ["greedy", "random"])
def test_target_size_errors(select: str, rng: np.random.Generator) -> None:
    points = rng.normal(size=(20, 4)).astype(np.float32)

    def run(target: object) -> None:
        if select == "greedy":
            greedy_coreset_selection(points, target, projection_dim=None)  # type: ignore[arg-type]
        else:
            random_coreset_selection(points, target)  # type: ignore[arg-type]

    with pytest.raises(ValueError, match="must be >= 1"):
        run(0)
    with pytest.raises(ValueError, match="exceeds the number of features 20"):
        run(21)
    for bad in (2.5, 3.0, True, "3"):
        with pytest.raises(TypeError, match="target_size must be an int"):
            run(bad)
    assert len(greedy_coreset_selection(points, np.int64(4), projection_dim=None)) == 4


def test_features_must_be_two_dimensional() -> None:
    with pytest.raises(ValueError, match=r"2-D array \[N, D\]"):
        greedy_coreset_selection(np.zeros(10, dtype=np.float32), 2)


@pytest.mark.parametrize("as_numpy", [False, True])
def test_streaming_copies_the_callers_buffer(as_numpy: bool) -> None:
    """A caller may reuse its buffer after add(): the bank must keep the values it was given."""
    coreset = StreamingCoreset(1.0, chunk_size=100)
    buffer = np.ones((10, 4), dtype=np.float32) if as_numpy else torch.ones(10, 4)
    coreset.add(buffer)
    buffer[:] = 0
    assert coreset.finalize().sum() == 40.0


def _tensor_bytes(value: object) -> int:
    """Bytes of the torch storages held by ``value`` (a tensor, or a list or tuple of them)."""
    if isinstance(value, torch.Tensor):
        return value.untyped_storage().nbytes()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(item) for item in value)
    return 0


def test_streaming_holds_one_chunk_between_adds() -> None:
    """Batches that straddle chunk boundaries are copied into one reused chunk buffer: between
    two adds the coreset holds at most one chunk of rows (earlier it kept whole copies of the
    batches the buffered rows came from, 1.2 chunks here, and concatenated them at each
    reduction), and after finalize none."""
    chunk, dim = 1000, 8
    coreset = StreamingCoreset(0.1, chunk_size=chunk, seed=1)
    points = np.random.default_rng(4).normal(size=(3000, dim)).astype(np.float32)
    held = []
    for start in range(0, 3000, 600):  # 0.6 chunk per batch: the chunks end mid-batch
        coreset.add(torch.from_numpy(points[start : start + 600].copy()))
        held.append(sum(_tensor_bytes(value) for value in vars(coreset).values()))
    assert max(held) == chunk * dim * 4
    bank = coreset.finalize()
    assert sum(_tensor_bytes(value) for value in vars(coreset).values()) == 0
    reference = StreamingCoreset(0.1, chunk_size=chunk, seed=1)
    np.testing.assert_array_equal(bank, stream(points, reference, 1000))  # batch size does not matter


def test_streaming_refuses_a_change_of_dimension() -> None:
    coreset = StreamingCoreset(0.5, chunk_size=100)
    coreset.add(torch.ones(10, 4))
    with pytest.raises(ValueError, match="patch features have 5 dims, earlier batches had 4"):
        coreset.add(torch.ones(10, 5))
    assert coreset.patches_seen == 10  # the refused batch is not counted


@pytest.mark.parametrize("reserve", [None, 900, 5000, 100])
def test_streaming_bank_with_or_without_a_reservation(reserve: int | None) -> None:
    """An exact (900 patches) or over-estimated (5000) reservation gives the best choice among
    all the chunks' picks, the same rows either way (packed in front when over); under (100) or
    without one, each merge keeps the best of what has arrived. Always bank_rows(900) rows."""
    points = np.random.default_rng(3).normal(size=(900, 6)).astype(np.float32)
    reference = StreamingCoreset(0.1, chunk_size=256, seed=5)
    reference.reserve(900)
    best = stream(points, reference, 64)
    coreset = StreamingCoreset(0.1, chunk_size=256, seed=5)
    if reserve is not None:
        coreset.reserve(reserve)
    bank = stream(points, coreset, 64)
    assert bank.flags.c_contiguous and bank.dtype == np.float32
    assert len(bank) == coreset.bank_rows(900) == 3 * 26 + 14  # three chunks of 256 at 10 %, then 132 rows
    assert_rows_of(bank, points)
    assert len(row_set(bank)) == len(bank)
    if reserve in (900, 5000):
        assert row_set(bank) == row_set(best)


def test_streaming_bank_with_an_exact_reservation_is_allocated_once() -> None:
    """With the patch count known, finalize hands out the one array the chunks were copied into."""
    points = np.random.default_rng(4).normal(size=(1000, 4)).astype(np.float32)
    coreset = StreamingCoreset(0.2, chunk_size=300, seed=1)
    coreset.reserve(len(points))
    coreset.add(torch.from_numpy(points[:300]))
    first = coreset._bank
    bank = stream(points[300:], coreset, 100)
    assert coreset._bank is first and np.shares_memory(bank, first) and bank.shape == (3 * 60 + 20, 4)


def test_unstructured_wide_features_warn_that_exact_selection_is_slow(caplog: pytest.LogCaptureFixture) -> None:
    """Isotropic noise leaves the bounds nothing to rule out: the traversal goes plain and says
    so (naming the shape and the projection option); clustered rows of the same width do not."""
    noise = torch.from_numpy(np.random.default_rng(0).normal(size=(1000, 300)).astype(np.float32))
    with caplog.at_level("WARNING", logger="fedpatch.kcenter"):
        picked = kcenter.greedy_kcenter_indices(noise, 100, 0)
    assert picked.tolist() == brute_force_farthest_point(noise.numpy(), 100, 0)
    assert [r.getMessage()[:50] for r in caplog.records] == ["greedy coreset on 1000 x 300 features: the distanc"]
    assert "projection_dim: 128" in caplog.records[0].getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="fedpatch.kcenter"):
        kcenter.greedy_kcenter_indices(torch.from_numpy(clustered_points(0, n=1000, dim=300)), 100, 0)
    assert not caplog.records


def test_traversal_runs_on_one_thread_and_restores_the_count() -> None:
    """Picks run on one torch thread (small ops; see ``kcenter._one_thread``); the caller's
    thread count is back afterwards, also when the traversal raises."""
    seen: set[int] = set()
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        points = torch.from_numpy(clustered_points(0, n=500, dim=32))
        kcenter.greedy_kcenter_indices(points, 20, 0, lambda picked, target: seen.add(torch.get_num_threads()))
        assert seen == {1} and torch.get_num_threads() == 2

        def fail(picked: int, target: int) -> None:
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            kcenter.greedy_kcenter_indices(points, 20, 0, fail)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_narrow_features_that_fit_in_the_cache_are_not_pruned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Below ``PRUNE_MIN_BYTES`` narrow rows take plain passes only; above it they are pruned
    (same picks either way); wide rows are pruned whatever their size."""
    built: list[int] = []
    init = kcenter._Pruner.__init__

    def recording(self: kcenter._Pruner, points: torch.Tensor, sq_norms: torch.Tensor, target_size: int) -> None:
        built.append(points.shape[1])
        init(self, points, sq_norms, target_size)

    monkeypatch.setattr(kcenter._Pruner, "__init__", recording)
    narrow = torch.from_numpy(clustered_points(2, n=1500, dim=96))  # 576 KB
    plain = kcenter.greedy_kcenter_indices(narrow, 100, 0)
    assert built == []
    monkeypatch.setattr(kcenter, "PRUNE_MIN_BYTES", 500_000)
    assert torch.equal(kcenter.greedy_kcenter_indices(narrow, 100, 0), plain) and built == [96]
    monkeypatch.setattr(kcenter, "PRUNE_MIN_BYTES", 2**40)
    kcenter.greedy_kcenter_indices(torch.from_numpy(clustered_points(2, n=500, dim=256)), 50, 0)
    assert built == [96, 256]

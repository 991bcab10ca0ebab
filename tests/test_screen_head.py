"""The native screen's head pass (``fedpatch/screen_head.py`` and the kernel's head test): the
bank side's bounds hold, the k-d split's descent finds each row's block, and the test rules
out most full block products on feature-like banks while every query keeps its exact
nearest row."""

from __future__ import annotations

import numpy as np
import pytest

from fedpatch import native_screen, screen_head
from fedpatch.screened_search import ScreenedSearch, int8_product_exact
from test_screened_search import float64_nearest, relu_like

needs_native = pytest.mark.skipif(not native_screen.available(), reason="no AVX512-VNNI on this CPU: the native screen cannot run")


def feature_like(rng: np.random.Generator, rows: int, dim: int, rank: int = 12) -> np.ndarray:
    """CNN-like features: a few strong directions (most of the variance) under ReLU, plus noise."""
    mixing = rng.normal(size=(rank, dim))
    return (np.maximum(rng.normal(size=(rows, rank)) @ mixing, 0) + 0.3 * rng.normal(size=(rows, dim)) + 2.0).astype(np.float32)


def descend(split: screen_head.KdSplit, point: np.ndarray) -> int:
    """The block the kernel's descent (head_seed) reaches for ``point``."""
    if not len(split.axis):
        return 0
    node = 0
    while True:
        child = int(split.child[node, 0 if point[split.axis[node]] < split.value[node] else 1])
        if child < 0:
            return -1 - child
        node = child


def test_head_dims_by_bank_width() -> None:
    widths = {64: 0, 127: 0, 128: 32, 152: 32, 767: 32, 768: 64, 1536: 64, 4096: 64, 4097: 0}
    assert {dim: screen_head.head_dims(dim) for dim in widths} == widths


def test_only_banks_with_most_variance_on_the_head_axes_get_the_test(rng: np.random.Generator) -> None:
    """Feature-like banks do (their 32 first axes carry > 90% of the variance); ReLU-like random
    ones, whose first axes carry about a quarter, and narrow banks do not."""
    for bank, expected in ((feature_like(rng, 600, 152), (152, 32)), (relu_like(rng, 600, 384), None), (feature_like(rng, 600, 100), None)):
        mean = bank.mean(axis=0, dtype=np.float64).astype(np.float32)
        axes = screen_head.head_axes(bank, mean)
        assert (axes.shape if axes is not None else None) == expected
    assert screen_head.principal_axes(relu_like(rng, 600, 384), np.full(384, 0.9, np.float32), 32)[1] < 0.3


def test_the_head_banks_bounds_hold(rng: np.random.Generator) -> None:
    """Every number the kernel's head test trusts, checked against float64 on a bank far from
    zero (so the centring matters) with two rows of padding."""
    bank = feature_like(rng, 190, 152) + 50
    mean = bank.mean(axis=0, dtype=np.float64).astype(np.float32)
    rotation, share = screen_head.principal_axes(bank, mean, 32)
    assert share > 0.9  # 12 strong directions under ReLU, little noise
    w = rotation.astype(np.float64)
    np.testing.assert_allclose(w.T @ w, np.eye(32), atol=1e-5)  # orthonormal up to float32 rounding
    split = screen_head.kd_split(screen_head.project(bank, mean, rotation))
    order = np.concatenate([split.order, np.repeat(split.order[-1:], 2)])
    head = screen_head.build_head(bank, mean, order, rotation, split)
    assert head.dim == 32 and head.packed.shape == (6, 8, 32, 4) and head.packed.min() >= 1  # codes in [-127, 127]
    assert head.sigma >= np.linalg.norm(w, 2)
    exact = (bank[order].astype(np.float64) - mean) @ w
    kernel_view = exact.astype(np.float32).astype(np.float64)  # b' as the kernel sees it
    assert np.linalg.norm(kernel_view - exact, axis=1).max() <= head.bank_error
    codes = head.packed.transpose(0, 2, 1, 3).reshape(192, 32).astype(np.float64) - 128
    residue = kernel_view - codes * np.repeat(head.unit, 32)[:, None]
    squares = (kernel_view**2).sum(axis=1)
    assert np.all(np.linalg.norm(residue, axis=1).reshape(6, 32).max(axis=1) <= head.low)
    assert np.all(np.sqrt(squares).reshape(6, 32).max(axis=1) <= head.norm)
    assert np.all(head.row <= squares / (2 * np.repeat(head.unit, 32))) and squares.max() <= head.sq_max
    # the query side's rounding: gamma_(D+2) |W|_F per unit of |c|
    assert head.query_error >= 154 * 2.0**-24 * np.linalg.norm(w)


def test_the_k_d_descent_finds_each_rows_block(rng: np.random.Generator) -> None:
    points = rng.normal(size=(1000, 8)).astype(np.float32) * np.arange(1, 9, dtype=np.float32)
    split = screen_head.kd_split(points)
    assert sorted(split.order.tolist()) == list(range(1000))
    assert len(split.axis) == 31 and split.child.shape == (31, 2)  # 32 blocks, the last one short (8 rows)
    blocks = {-1 - int(c) for c in split.child.ravel() if c < 0}
    assert blocks == set(range(32))
    block_of = np.empty(1000, dtype=np.int64)
    block_of[split.order] = np.arange(1000) // 32
    assert all(descend(split, points[row]) == block_of[row] for row in range(1000))
    # cells are compact: a block spans far less of the widest coordinate than the bank
    spans = [np.ptp(points[split.order[i : i + 32], 7]) for i in range(0, 992, 32)]
    assert np.median(spans) < 0.3 * np.ptp(points[:, 7])


@needs_native
@pytest.mark.parametrize(("rows", "dim", "queries", "axes", "most"), [(1200, 152, 680, 32, 0.25), (500, 1536, 160, 64, 0.45)])
def test_the_head_test_rules_out_most_products_and_keeps_the_exact_nearest(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch, rows: int, dim: int, queries: int, axes: int, most: float
) -> None:
    """efficientnet_lite0's width (32 head axes) and WRN-50-2's (64): near queries in runs like
    neighbouring patches, far queries, bank members. The head test takes few of the (tile,
    block) products in full (measured 11-12% and 27-30% here over three seeds; on lite0's
    1000x750 features 24%, on WRN-50-2's 12%), and the neighbours are those of the same kernel
    without it and the float64 nearest."""
    bank = feature_like(rng, rows, dim)
    # neighbouring patches look alike: runs of 8 queries (a kernel tile) near one bank row
    near = np.repeat(bank[rng.integers(rows, size=(queries - 40) // 8)], 8, axis=0) + 0.2 * rng.normal(size=(queries - 40, dim))
    query = np.concatenate([near, feature_like(rng, 30, dim), bank[:10]]).astype(np.float32)
    search = ScreenedSearch(bank, native=True)
    assert search.native is not None and search.native.head is not None and search.native.head.dim == axes
    distances, indices = search.nearest(query)
    assert search.native.share_taken < most
    ref_d, ref_i = float64_nearest(bank, query)
    assert np.array_equal(indices, ref_i)
    np.testing.assert_allclose(distances, ref_d, rtol=2e-6, atol=1e-6)
    monkeypatch.setattr(screen_head, "head_dims", lambda dim: 0)
    plain = ScreenedSearch(bank, native=True)
    assert plain.native is not None and plain.native.head is None
    assert np.array_equal(plain.nearest(query)[1], indices) and plain.native.share_taken == 1.0


@needs_native
def test_overflowing_and_non_finite_queries_with_the_head_test(rng: np.random.Generator) -> None:
    """A query whose head coordinates overflow float32 skips the head test (every block is
    kept) and gets the torch screen's answer; NaN / inf rows stay unmatched; the rest exact."""
    bank = feature_like(rng, 300, 152)
    query = np.concatenate([bank[:4] + 0.1, np.full((1, 152), 3e37), bank[4:6]]).astype(np.float32)
    query[2, 5], query[3, 0] = np.nan, np.inf
    native = ScreenedSearch(bank, native=True)
    assert native.native is not None and native.native.head is not None
    distances, indices = native.nearest(query)
    assert indices[2] == -1 and indices[3] == -1 and np.isnan(distances[[2, 3]]).all()
    finite = [0, 1, 5, 6]
    assert np.array_equal(indices[finite], float64_nearest(bank, query[finite])[1])
    assert indices[4] == 0 and distances[4] == np.inf  # every float32 distance overflows: the lowest row wins
    if int8_product_exact():
        assert ScreenedSearch(bank, native=False).nearest(query)[1][4] == 0


@needs_native
def test_a_head_test_that_does_not_pay_is_dropped_after_the_first_search(rng: np.random.Generator) -> None:
    """Queries far from every bank row leave the head test nothing to rule out: once it has
    seen enough block products (``HEAD_JUDGED``) taking more than ``max_taken`` of them, the
    search drops it for norm-ordered blocks, with the same answers before and after."""
    bank = feature_like(rng, 1200, 152)
    query = (bank.mean(axis=0) + bank.std() * rng.normal(size=(1600, 152))).astype(np.float32)
    search = ScreenedSearch(bank, native=True)
    assert search.native is not None and search.native.head is not None
    head_screen = search.native
    first = search.nearest(query)
    assert head_screen.share_taken > screen_head.max_taken(32, 152) and head_screen.products_taken[1] >= native_screen.HEAD_JUDGED
    assert search.native is not head_screen and search.native.head is None  # norm order again
    second = search.nearest(query)
    assert np.array_equal(first[1], second[1]) and np.array_equal(first[0], second[0])
    assert np.array_equal(first[1], float64_nearest(bank, query)[1])
    assert np.all(np.diff(search.squares[search.order[:1200]]) >= 0)

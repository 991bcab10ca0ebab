"""The screened int8 search: exact nearest neighbours against float64, on the sets where a
low-precision or float32 product goes wrong, with the torch screen and the native one; the
screen's pruning; its self-check."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from fedpatch import native_screen, screened_search
from fedpatch.screened_search import ScreenedSearch, int8_product_exact

TORCH_EXACT = int8_product_exact()
torch_screen = pytest.mark.skipif(not TORCH_EXACT, reason="torch's int8 product here is not exact: the torch screen is not used")
KERNELS = [
    pytest.param(False, id="torch", marks=torch_screen),
    pytest.param(True, id="native", marks=pytest.mark.skipif(not native_screen.available(), reason="no AVX512-VNNI here (tests/test_native_screen.py checks the build)")),
]


def float64_nearest(bank: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest bank row of each query by explicit float64 differences (lowest index on ties)."""
    dist = np.sqrt(((query.astype(np.float64)[:, None, :] - bank.astype(np.float64)[None]) ** 2).sum(-1))
    nearest = dist.argmin(axis=1)
    return dist[np.arange(len(query)), nearest], nearest


def relu_like(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    return (np.maximum(rng.normal(size=(rows, dim)), 0) + 0.5).astype(np.float32)


def hard_sets(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    bank = relu_like(rng, 1500, 192)
    centre = (100 * rng.normal(size=(1, 160))).astype(np.float32)  # far from 0: the product cancels
    offset = (centre + 1e-2 * rng.normal(size=(600, 160))).astype(np.float32)
    twins = np.repeat(rng.normal(size=(40, 72)).astype(np.float32), 3, axis=0)
    return {
        "near queries": (bank, (bank[rng.integers(1500, size=700)] + 0.05 * rng.normal(size=(700, 192))).astype(np.float32)),
        "bank members": (bank, bank[::3].copy()),
        "large offset, near ties": (offset, (centre + 1e-2 * rng.normal(size=(500, 160))).astype(np.float32)),
        "duplicated rows": (twins, (twins[::2] + 1e-4).astype(np.float32)),
        "far queries": (bank[:400], 40 * bank[400:700]),
        "one row": (bank[:1], bank[1:50]),
        "three dims": (rng.normal(size=(500, 3)).astype(np.float32), rng.normal(size=(300, 3)).astype(np.float32)),
    }


@pytest.mark.parametrize("native", KERNELS)
@pytest.mark.parametrize("name", ["near queries", "bank members", "large offset, near ties", "duplicated rows", "far queries", "one row", "three dims"])
def test_nearest_is_the_float64_nearest(rng: np.random.Generator, name: str, native: bool) -> None:
    bank, query = hard_sets(rng)[name]
    distances, indices = ScreenedSearch(bank, native=native).nearest(query)
    ref_d, ref_i = float64_nearest(bank, query)
    assert indices.dtype == np.int64 and distances.dtype == np.float32
    assert np.array_equal(indices, ref_i)
    np.testing.assert_allclose(distances, ref_d, rtol=2e-6, atol=1e-6)
    if name == "bank members":
        assert np.all(distances == 0)


@pytest.mark.parametrize("native", KERNELS)
def test_ties_go_to_the_lowest_index(rng: np.random.Generator, native: bool) -> None:
    bank = relu_like(rng, 200, 96)
    bank[150] = bank[40]
    bank[199] = bank[40]
    distances, indices = ScreenedSearch(bank, native=native).nearest(bank[[199, 150, 40]])
    assert indices.tolist() == [40, 40, 40] and distances.tolist() == [0, 0, 0]


@torch_screen
def test_screen_keeps_the_nearest_row_and_prunes_the_rest(rng: np.random.Generator) -> None:
    bank, query = hard_sets(rng)["near queries"]
    search = ScreenedSearch(bank, native=False)
    products = torch.empty(len(query), len(search.order), dtype=torch.int32)
    rows, found = search._screen(search._quantise(torch.from_numpy(query)), products)
    _, truth = float64_nearest(bank, query)
    pairs = set(zip(rows.tolist(), search.order[found].tolist()))
    assert all((i, int(j)) in pairs for i, j in enumerate(truth))
    per_query = np.bincount(rows, minlength=len(query))
    assert per_query.min() >= 1 and per_query.mean() < 3  # of 1,500 rows
    assert np.all(rows[1:] >= rows[:-1])  # sorted by query row, as the pick needs


def test_bank_is_sorted_by_norm_and_padded_with_real_rows(rng: np.random.Generator) -> None:
    """Blocks hold rows of similar norms (a narrow norm range per block) and the padding
    repeats the widest row, so every block's bounds describe real rows."""
    bank = relu_like(rng, 100, 48) * rng.uniform(0.1, 10, size=(100, 1)).astype(np.float32)
    search = ScreenedSearch(bank, native=False)
    assert search.codes is not None and search.native is None
    assert len(search.order) == 128 and search.codes.shape == (48, 128)
    assert sorted(search.order[:100].tolist()) == list(range(100)) and np.all(search.order[100:] == search.order[99])
    squares = ((bank.astype(np.float64) - search.mean) ** 2).sum(axis=1)[search.order]
    assert np.all(np.diff(squares) >= 0)
    assert torch.equal(search.lo[0], torch.from_numpy(squares.reshape(4, 32).min(axis=1).astype(np.float32)))
    assert torch.equal(search.hi[0], torch.from_numpy(squares.reshape(4, 32).max(axis=1).astype(np.float32)))
    assert int(search.codes.abs().max()) == 127  # each block uses its whole int8 range


@pytest.mark.parametrize("native", KERNELS)
@pytest.mark.parametrize("dim", [3, 40, 300])
def test_zero_rows_and_zero_queries(rng: np.random.Generator, dim: int, native: bool) -> None:
    """Zero rows (in norm order an all-zero block, scale 1) and queries at the bank's mean
    (scale 1, codes 0) still find their exact neighbours."""
    bank = np.zeros((70, dim), dtype=np.float32)
    bank[40:55] = relu_like(rng, 15, dim)
    bank[55:] = -bank[40:55]  # the mean is exactly 0: the 40 zero rows fill a block at the mean
    query = np.concatenate([np.zeros((3, dim)), bank[::7] + 1e-3, bank[1::9] * 0.5]).astype(np.float32)
    search = ScreenedSearch(bank, native=native)
    assert not search.mean.any()
    if search.native is None or search.native.head is None:  # norm order (the head test's k-d cells mix them)
        assert float(search.unit[0, 0]) == 2.0  # the zero block first, scale 1
    distances, indices = search.nearest(query)
    ref_d, ref_i = float64_nearest(bank, query)
    assert np.array_equal(indices, ref_i)
    np.testing.assert_allclose(distances, ref_d, rtol=2e-6, atol=1e-6)


@torch_screen
def test_chunked_queries_and_build_give_the_one_chunk_answer(rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    bank, query = hard_sets(rng)["near queries"]
    whole = ScreenedSearch(bank, native=False)
    whole_answer = whole.nearest(query)
    monkeypatch.setattr(screened_search, "CELLS", 64 * 1504)  # 64 rows a chunk: 11 chunks, the last partial
    monkeypatch.setattr(screened_search, "BUILD_ROWS", 96)  # and the bank built 96 rows at a time
    monkeypatch.setattr(screened_search, "GROUP_CELLS", 3 * 64 * 192)  # 3 chunks a group: 4 groups, the last of 2 chunks
    search = ScreenedSearch(bank, native=False)
    assert search.codes is not None and whole.codes is not None
    assert torch.equal(search.codes, whole.codes) and np.array_equal(search.order, whole.order)
    assert all(torch.equal(getattr(search, name), getattr(whole, name)) for name in ("lo", "hi", "unit", "norm_term", "low_term"))
    picks = count_picks(search, monkeypatch)
    chunked = search.nearest(query)
    assert np.array_equal(chunked[1], whole_answer[1]) and np.array_equal(chunked[0], whole_answer[0])
    assert len(query) <= search.candidates < 3 * len(query)
    assert picks == [192, 192, 192, 124]  # query rows per call: one call a group


def count_picks(search: ScreenedSearch, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record how many query rows each call of ``search._pick_nearest`` covers."""
    calls: list[int] = []
    original = search._pick_nearest

    def spy(query: np.ndarray, rows: np.ndarray, *rest: np.ndarray) -> None:
        calls.append(len(np.unique(rows)))
        original(query, rows, *rest)

    monkeypatch.setattr(search, "_pick_nearest", spy)
    return calls


@torch_screen
def test_ties_everywhere_pick_a_chunk_at_a_time(rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bank of one repeated row makes every pair a candidate: the candidates are picked as
    soon as ``CELLS`` of them wait (here every chunk), not a group at a time, and the lowest
    index wins."""
    bank = np.repeat(relu_like(rng, 1, 24), 100, axis=0)
    query = relu_like(rng, 50, 24)
    monkeypatch.setattr(screened_search, "CELLS", 16 * 128)  # 16 rows a chunk against 128 (padded) rows
    search = ScreenedSearch(bank, native=False)
    picks = count_picks(search, monkeypatch)
    distances, indices = search.nearest(query)
    assert search.candidates == 50 * 128 and picks == [16, 16, 16, 2]
    assert np.all(indices == 0)
    np.testing.assert_allclose(distances, float64_nearest(bank, query)[0], rtol=2e-6)


@pytest.mark.parametrize("native", KERNELS)
def test_non_finite_rows_are_left_unmatched(rng: np.random.Generator, native: bool) -> None:
    bank = relu_like(rng, 300, 80)
    query = bank[:5].copy()
    query[1, 3], query[3, 0] = np.nan, -np.inf
    distances, indices = ScreenedSearch(bank, native=native).nearest(query)
    assert indices.tolist() == [0, -1, 2, -1, 4]
    assert np.isnan(distances[[1, 3]]).all() and np.all(distances[[0, 2, 4]] == 0)


def test_pick_orders_by_distance_then_bank_row() -> None:
    """The pick packs (squared distance, bank row) into one int64 per candidate: the nearest
    wins across magnitudes (subnormal, 0, large), equal distances go to the lowest row, and
    query rows without candidates keep what they held."""
    rows = np.array([0, 0, 0, 2, 2, 2, 2, 3, 3], dtype=np.int64)
    found = np.array([7, 3, 9, 5, 1, 8, 2, 4, 6], dtype=np.int64)
    squared = np.array([2.0, 0.5, 1e-40, 4.0, 9.0, 4.0, 4.0, 0.0, 3e38], dtype=np.float32)
    distances = np.full(5, np.nan, dtype=np.float32)
    indices = np.full(5, -1, dtype=np.int64)
    screened_search._pick(rows, found, squared, distances, indices)
    assert indices.tolist() == [9, -1, 2, 4, -1]
    assert distances[[0, 2, 3]].tolist() == np.sqrt(np.float32([1e-40, 4.0, 0.0])).tolist()
    assert np.isnan(distances[[1, 4]]).all()


def _saturating_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """An int8 product the way AVX2's ``vpmaddubsw`` path computes it: ``a`` shifted to
    unsigned, each pair of products summed with 16-bit saturation, the shift taken off."""
    shifted = a.long() + 128
    terms = shifted[:, :, None] * b.long()[None]  # [M, K, N]
    pairs = (terms[:, 0::2] + terms[:, 1::2]).clamp(-(2**15), 2**15 - 1)
    return (pairs.sum(dim=1) - 128 * b.long().sum(dim=0)).int()


def _raises(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("no int8 kernel for this CPU")


@pytest.mark.parametrize(
    ("product", "accepted"),
    [
        (lambda a, b: (a.long() @ b.long()).int(), True),  # exact
        (_saturating_pairs, False),
        (lambda a, b: (a.float() @ b.float()).to(torch.bfloat16).int(), False),  # rounded sums
        (_raises, False),
    ],
)
def test_self_check_refuses_inexact_products(product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], accepted: bool) -> None:
    assert int8_product_exact(product) is accepted


@torch_screen
def test_a_torch_without_an_int8_product_fails_the_self_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch, "_int_mm")
    assert int8_product_exact() is False

"""The screened bfloat16 search: exact nearest neighbours against float64, on the sets where a
bfloat16 or float32 product goes wrong; the screen's pruning; its self-check."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from fedpatch import screened_search
from fedpatch.screened_search import ScreenedSearch, bf16_product_within_bound

pytestmark = pytest.mark.skipif(
    not bf16_product_within_bound(), reason="torch's bfloat16 product here does not accumulate in float32: the search is not used"
)


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


@pytest.mark.parametrize("name", ["near queries", "bank members", "large offset, near ties", "duplicated rows", "far queries", "one row", "three dims"])
def test_nearest_is_the_float64_nearest(rng: np.random.Generator, name: str) -> None:
    bank, query = hard_sets(rng)[name]
    distances, indices = ScreenedSearch(bank).nearest(query)
    ref_d, ref_i = float64_nearest(bank, query)
    assert indices.dtype == np.int64 and distances.dtype == np.float32
    assert np.array_equal(indices, ref_i)
    np.testing.assert_allclose(distances, ref_d, rtol=2e-6, atol=1e-6)
    if name == "bank members":
        assert np.all(distances == 0)


def test_ties_go_to_the_lowest_index(rng: np.random.Generator) -> None:
    bank = relu_like(rng, 200, 96)
    bank[150] = bank[40]
    bank[199] = bank[40]
    distances, indices = ScreenedSearch(bank).nearest(bank[[199, 150, 40]])
    assert indices.tolist() == [40, 40, 40] and distances.tolist() == [0, 0, 0]


def test_screen_keeps_the_nearest_row_and_prunes_the_rest(rng: np.random.Generator) -> None:
    bank, query = hard_sets(rng)["near queries"]
    search = ScreenedSearch(bank)
    rows, found = search._screen(torch.from_numpy(query), *search.buffers(len(query)))
    _, truth = float64_nearest(bank, query)
    pairs = set(zip(rows.tolist(), found.tolist()))
    assert all((i, int(j)) in pairs for i, j in enumerate(truth))
    per_query = np.bincount(rows, minlength=len(query))
    assert per_query.min() >= 1 and per_query.mean() < 3  # of 1,500 rows


def test_chunked_queries_and_build_give_the_one_chunk_answer(rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    bank, query = hard_sets(rng)["near queries"]
    whole = ScreenedSearch(bank).nearest(query)
    built_whole = ScreenedSearch(bank).extended
    monkeypatch.setattr(screened_search, "CELLS", 64 * 1536)  # 64 rows a chunk: 11 chunks, the last partial
    monkeypatch.setattr(screened_search, "BUILD_ROWS", 100)  # and the bank built 100 rows at a time
    search = ScreenedSearch(bank)
    assert torch.equal(search.extended, built_whole)
    chunked = search.nearest(query)
    assert np.array_equal(chunked[1], whole[1]) and np.array_equal(chunked[0], whole[0])
    assert len(query) <= search.candidates < 3 * len(query)


def test_non_finite_rows_are_left_unmatched(rng: np.random.Generator) -> None:
    bank = relu_like(rng, 300, 80)
    query = bank[:5].copy()
    query[1, 3], query[3, 0] = np.nan, -np.inf
    distances, indices = ScreenedSearch(bank).nearest(query)
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


def _bf16_partial_sums(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A product that rounds its running sum to bfloat16 every 16 terms."""
    total = torch.zeros(a.shape[0], b.shape[1], dtype=torch.bfloat16)
    for start in range(0, a.shape[1], 16):
        total = (total.float() + a[:, start : start + 16].float() @ b[start : start + 16].float()).to(torch.bfloat16)
    return total


@pytest.mark.parametrize(
    ("product", "accepted"),
    [
        (lambda a, b: a @ b, True),  # torch's own: float32 accumulation, one rounding
        (lambda a, b: (a.double() @ b.double()).to(torch.bfloat16), True),  # exact, then rounded
        (_bf16_partial_sums, False),
        (lambda a, b: ((a @ b).float() * (1 + 2**-6)).to(torch.bfloat16), False),
    ],
)
def test_self_check_refuses_products_outside_the_bound(product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], accepted: bool) -> None:
    assert bf16_product_within_bound(product) is accepted

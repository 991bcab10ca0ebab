"""The native int8 screen (``fedpatch/_screen_kernel.c``): built and used wherever the CPU runs
it, and the same neighbours as the torch screen on both of its loop orders, on torch's OpenMP
team, a Python pool and one thread, from no more candidates (far fewer where the int8 bound
is loose: its row thresholds under a computed distance)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedpatch import native_screen
from fedpatch.screened_search import ScreenedSearch, int8_product_exact
from test_screened_search import float64_nearest, relu_like

VNNI = all(torch.cpu.get_capabilities().get(name, False) for name in ("avx512_f", "avx512_bw", "avx512_vnni"))  # type: ignore[attr-defined]
needs_native = pytest.mark.skipif(not VNNI, reason="no AVX512-VNNI on this CPU: the native screen cannot run")
needs_both = pytest.mark.skipif(not (VNNI and int8_product_exact()), reason="needs AVX512-VNNI and torch's exact int8 product")


@pytest.mark.skipif(not VNNI, reason="the kernel is optional where the CPU lacks AVX512-VNNI")
def test_the_kernel_is_built_and_runs_where_the_cpu_has_avx512_vnni() -> None:
    """A failed build is only a warning at install time (an optional extension), so this is
    where a machine like CI's would show it: its CPU has AVX512-VNNI and a C compiler."""
    assert native_screen.available()
    bank = np.random.default_rng(0).normal(size=(40, 130)).astype(np.float32)
    assert ScreenedSearch(bank).native is not None


def near_queries(rows: int, dim: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    bank = relu_like(rng, rows, dim)
    near = bank[rng.integers(rows, size=queries)] + 0.3 * rng.normal(size=(queries, dim))
    return bank, near.astype(np.float32)


def both(bank: np.ndarray, query: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray, int], ScreenedSearch]:
    """(distances, indices, candidates) of the torch and the native screen, and the native search."""
    results = []
    for native in (False, True):
        search = ScreenedSearch(bank, native=native)
        distances, indices = search.nearest(query)
        results.append((distances, indices, search.candidates))
    return results[0], results[1], search


@needs_both
@pytest.mark.parametrize(
    ("rows", "dim", "queries", "keeps"),
    [
        (700, 152, 1003, True),  # lite0's width: whole-bank tiles, products kept (rows and queries not whole tiles)
        (1200, 520, 517, False),  # 624 KiB of codes: panels of blocks, passing blocks recomputed
        (64, 130, 9, True),  # fewer queries than a thread's share: one call on the calling thread
    ],
)
def test_native_and_torch_screens_agree(rows: int, dim: int, queries: int, keeps: bool) -> None:
    bank, query = near_queries(rows, dim, queries)
    (d_torch, i_torch, c_torch), (d_native, i_native, c_native), search = both(bank, query)
    assert search.native is not None and bool(search.native.bank.keep_products) is keeps
    assert np.array_equal(i_native, i_torch)
    # each query near one bank row: about one candidate each (ReLU-like random banks get no head
    # test, fedpatch.screen_head.MIN_SHARE: their first axes carry a quarter of the variance)
    assert len(query) <= c_native <= c_torch
    np.testing.assert_allclose(d_native, d_torch, rtol=1e-6)  # float32 sums in another order


@needs_both
@pytest.mark.parametrize(("rows", "dim", "keeps"), [(700, 152, True), (1200, 520, False)])
def test_native_screen_rules_out_most_of_the_torch_screens_candidates(rows: int, dim: int, keeps: bool) -> None:
    """Queries drawn like the bank but near none of its rows (as WRN-50-2's random-weight
    features are): the block bound leaves the torch screen 8.7 / 24.4 candidates per query here
    (40-49 on those features); the native screen's row thresholds under a computed float32
    distance rule out most of them and keep the exact float32 nearest."""
    rng = np.random.default_rng(3)
    bank, query = relu_like(rng, rows, dim), relu_like(rng, 300, dim)
    (d_torch, i_torch, c_torch), (d_native, i_native, c_native), search = both(bank, query)
    assert search.native is not None and bool(search.native.bank.keep_products) is keeps
    assert c_torch > 5 * len(query) and c_native < c_torch / 3  # measured 8.7 -> 1.9 and 24.4 -> 3.8 per query
    assert np.array_equal(i_native, i_torch)
    np.testing.assert_allclose(d_native, d_torch, rtol=1e-6)
    expected = np.concatenate([float64_nearest(bank, query[i : i + 25])[0] for i in range(0, len(query), 25)])
    np.testing.assert_allclose(d_native, expected, rtol=2e-6)

@needs_native
def test_several_panels_of_blocks_give_the_one_panel_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The large-bank loop order (PANEL queries per panel of blocks), forced onto a small bank
    in panels of 3 blocks, the last one partial: the same answer as the whole-bank tiles."""
    bank, query = near_queries(600, 152, 333)
    whole = ScreenedSearch(bank, native=True)
    expected = whole.nearest(query)
    monkeypatch.setattr(native_screen, "KEEP_CODES", 0)
    monkeypatch.setattr(native_screen, "L2_CODES", 3 * 32 * 152)
    panels = ScreenedSearch(bank, native=True)
    assert panels.native is not None and panels.native.bank.panel_blocks == 3 and panels.native.bank.keep_products == 0
    distances, indices = panels.nearest(query)
    assert np.array_equal(indices, expected[1]) and np.array_equal(distances, expected[0])
    assert panels.candidates == whole.candidates


@needs_native
def test_torch_team_python_pool_and_one_thread_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows split over torch's OpenMP team (found in this process), over a Python pool
    where there is none, and on one thread: the same answer."""
    if any(Path(torch.__file__).parent.glob("lib/libgomp*")):  # pip's Linux wheels ship it
        assert native_screen._team() is not None
    bank, query = near_queries(500, 152, 2 * native_screen.ROWS_PER_THREAD + 37)
    search = ScreenedSearch(bank, native=True)
    team = search.nearest(query)
    monkeypatch.setattr(native_screen, "_team", lambda: None)
    pool = search.nearest(query)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = search.nearest(query)
    finally:
        torch.set_num_threads(threads)
    for distances, indices in (pool, single):
        assert np.array_equal(indices, team[1]) and np.array_equal(distances, team[0])
    assert search.candidates % 3 == 0 and search.candidates >= 3 * len(query)


@needs_native
def test_every_pair_a_candidate_and_ties_to_the_lowest_row() -> None:
    """A bank of one repeated row: every row of every block passes (4 blocks, the last one
    padded with copies of the widest row), and the lowest bank row wins."""
    rng = np.random.default_rng(1)
    bank = np.repeat(rng.normal(size=(1, 136)).astype(np.float32), 100, axis=0)
    query = rng.normal(size=(50, 136)).astype(np.float32)
    search = ScreenedSearch(bank, native=True)
    distances, indices = search.nearest(query)
    assert search.candidates == 50 * 128 and np.all(indices == 0)
    np.testing.assert_allclose(distances, float64_nearest(bank, query)[0], rtol=2e-6)


@needs_native
def test_a_missing_or_unsupported_library_leaves_the_torch_screen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native_screen, "_library", lambda: None)
    assert not native_screen.available()
    with pytest.raises(RuntimeError, match="not available"):
        native_screen.NativeScreen(np.zeros((32, 8), np.int8), {}, np.zeros((32, 8), np.float32), np.arange(32))
    search = ScreenedSearch(np.ones((40, 130), np.float32))
    assert search.native is None and search.codes is not None


@needs_native
def test_banks_too_wide_for_int32_sums_stay_on_the_torch_screen() -> None:
    """Unsigned bank codes (up to 255) times signed query codes: 66,311 dims is the widest
    bank whose sums fit int32; a wider one is refused by the kernel and left to torch."""
    assert native_screen.MAX_DIM == 66_311 and 255 * 127 * 66_311 < 2**31 <= 255 * 127 * 66_312
    wide = np.ones((32, native_screen.MAX_DIM + 1), np.float32)
    wide[::2] = -1
    search = ScreenedSearch(wide)
    assert search.native is None and search.codes is not None
    with pytest.raises(ValueError, match="up to 66311 dims"):
        ScreenedSearch(wide, native=True)

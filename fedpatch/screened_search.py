"""Exact nearest-neighbour search on the CPU: an int8 screen with a proven error bound, then
float32 distances for the few rows it cannot rule out.

PatchCore scores a patch by the distance to its nearest bank vector, and on a CPU that search
is a matrix product (every query against every bank row). An int8 product with int32
accumulation (AVX512-VNNI / AVX-VNNI / AMX) runs about 2.2 times as fast as a bfloat16 one
and 4 times a float32 one here, and it is *exact*: integer sums do not round. Its inputs do:
an int8 vector keeps about 7 bits per coordinate. So its distances only *screen*:

1. The bank and the queries are centred on the bank's mean (``m``, float32; distances do not
   change) and scaled to int8: each query row ``c`` by its own ``s_q = max|c_i| / 127``, the
   bank by blocks of ``BLOCK`` rows, sorted by squared norm (the native screen's head test
   orders them by a k-d split instead: ``fedpatch.screen_head``), each block ``k`` by one
   ``s_k``. ``c = s_q r_q + l_q`` and ``b = s_k r_b + l_b``, with ``r`` the int8 codes and
   ``l`` the rounding residues, whose norms are known.
2. ``P = r_q . r_b`` is exact, and by Cauchy-Schwarz
   ``|c.b - s_q s_k P| <= |s_q r_q| |l_b| + |l_q| |b|``, so with the block's largest
   ``|l_b|`` and ``|b|`` the squared distance ``D = |c|^2 + |b|^2 - 2 c.b`` is within
   ``E_qk`` (twice that bound) of ``|c|^2 + |b|^2 - 2 s_q s_k P`` for every row of block ``k``.
3. Each block's largest ``P`` gives an upper bound of the distance of its row; with the
   block's largest squared norm ``hi_k``, ``U = |c|^2 + min_k (hi_k - 2 s_q s_k max P + E_qk)``
   bounds the nearest distance from above. A row of block ``k`` can only be the nearest if
   ``|c|^2 + lo_k - 2 s_q s_k P - E_qk <= U`` (``lo_k`` the block's smallest squared norm),
   that is ``P >= (lo_k - E_qk - (U - |c|^2)) / (2 s_q s_k)``: the *candidates*, an integer
   comparison. ``|c|^2`` cancels, so it is never computed. Blocks whose largest ``P`` misses
   their threshold are skipped whole, and sorting the bank by norm keeps ``hi_k - lo_k`` small.
4. The candidates' distances are computed from the float32 differences
   (``faiss.pairwise_indexed_L2sqr``, no gathered copies) and the smallest wins; ties go to
   the lowest bank index, as ``argmin`` does.

So the result is the exact nearest neighbour (up to the float32 rounding of the final
differences, as with any float32 search), not an approximation. The bound's float
arithmetic is accounted for: the bank's side is computed in float64, each query's residue
norm is enlarged by its float32 rounding (centring, scaling, the norm), ``E`` carries a 1%
margin (``SAFETY``), the upper bound a slack of a few float32 roundings of the per-block
arithmetic's magnitudes (done in float32), and the threshold ``margin`` whole units of ``P``. Candidates per query measured
3.9-6.7 for efficientnet_lite0 and 40-49 for WRN-50-2 with random weights
(``benchmarks/results/cpu_search_zen4.md``).

Two implementations of that bound: the native one (``fedpatch.native_screen``, a C kernel
built at install, used wherever the CPU has AVX512-VNNI) takes each block's largest ``P`` while
the sums are in registers and finishes each query (bounds, candidates, distances, pick) while
its numbers are in cache; the torch one below writes every product and passes over them with
torch and numpy. Both compute the block bound's float32 steps operation for operation and
return the same rows. The native one then tightens it: it first computes the float32 distance
``d`` of the most promising row (of the block that gives ``U``), which bounds the offset
``D - |c|^2`` by ``d (1 + 2 gamma) - |c|^2`` (a lower bound of ``|c|^2`` from its float32 sum;
``gamma`` the float32 sums' rounding) instead of ``U`` (which carries ``E`` once more), and
tests each row of a passing block against its *own* norm and residue rather than the block's
extremes, tightening again whenever a closer row turns up. Every row that can be the float32
nearest still passes, so the pick is the same, from far fewer candidates where ``E`` is large
against the gaps between rows: 2.3-2.5 per query instead of 6.7-7.1 on efficientnet_lite0's
1000x750 features and 7.8-13.1 instead of 40-53 on WRN-50-2's. On efficientnet_lite0
features the native screen searched 3.6-3.8x as fast as the torch one, on WRN-50-2's
1.0-1.4x before that tightening, which made it 1.33-1.42x faster again there. Its head test
(``fedpatch.screen_head``: an int8 product on the bank's first principal axes, with a bound of
its own, decides which blocks' full products to take at all) then made it 1.2-1.3x faster on
lite0's 1000x750 features and 1.9-2.4x on WRN-50-2's (``benchmarks/results/cpu_search_zen4.md``). Banks wider than ``native_screen.MAX_DIM``
(66,311 dims) stay on the torch screen.

Codes stay within [-127, 127] (``|c_i| / s_q <= 127`` up to one rounding, which rounds to
127), so a product of ``D`` dims is at most ``127^2 D`` and fits int32 below ``MAX_DIM``.
The search is used only where torch's int8 product runs natively (``native_int8_cpu``) and
``int8_product_exact`` confirms, once per process, that it returns the exact integer
product on extreme codes (a kernel that saturated its 16-bit pair sums, as AVX2's
``vpmaddubsw`` does, would not; the search then stays on faiss). Rows the screen leaves
without a candidate (queries holding NaN or inf) come back with index -1;
``MemoryBank.search`` refuses them with an error naming the row.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import lru_cache

import faiss
import numpy as np
import torch

from fedpatch import native_screen, screen_head
from fedpatch.hardware import native_int8_cpu

BLOCK = 32
"""Bank rows per block: the unit of the scales, of the norm range and of the first pass. 32
against 64 left 40-49 candidates per query on WRN-50-2 features instead of 65 and was as
fast on lite0's (a one-off sweep of 16-128 on the features of ``benchmarks/cpu_search_bench.py``)."""
CELLS = 1 << 22
"""Products per query chunk (16 MiB of int32): as fast as 2^21 on lite0 features and faster
on the widest and largest banks in the same sweep (2^20-2^23)."""
GROUP_CELLS = 1 << 22
"""Query values scaled to int8 at a time (whole chunks; 16 MiB per float32 temporary): the
per-call costs of the scaling, the final distances and the pick are paid per group, which made
the search 1.04-1.12x as fast on efficientnet_lite0 features (2,048-23,500 queries at 152 dims,
up to 15 chunks a group) and left WRN-50-2's (1,536 dims: one chunk a group) at 0.99-1.01x, in
a one-off A/B against per-chunk steps."""
CODE_MAX = 127
MAX_DIM = (2**31 - 1) // CODE_MAX**2
"""Widest bank whose products fit int32 (133,143 dims)."""
INT32_BELOW = 2**31 - 128
"""The largest float32 below 2^31, where thresholds are clamped before their int32 cast."""
U_FP32 = 2.0**-24
SAFETY = 1.01
"""Margin on the error bound, for the rounding of the bound's own arithmetic."""
BUILD_ROWS = 4096
"""Bank rows converted at a time when the screen is built (a multiple of ``BLOCK``; bounds the
float64 temporaries, 48 MiB each at 1536 dims)."""


class ScreenedSearch:
    """Exact 1-nearest-neighbour search of a fixed float32 bank (see the module docstring).

    Holds the bank's int8 codes (a quarter of the bank's size: ``codes`` ``[D, M]`` for the
    torch screen, or the native screen's own layout) and a few numbers per block, besides a
    reference to the float32 vectors the final distances come from.
    """

    def __init__(self, vectors: np.ndarray, native: bool | None = None) -> None:
        """``native``: screen with the C kernel (``fedpatch.native_screen``) rather than torch
        and numpy; by default wherever it is available. Both return the same neighbours, the
        native screen from fewer candidates; the choice exists for the tests and benchmarks
        that compare them."""
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        rows, dim = self.vectors.shape
        if dim > MAX_DIM:
            raise ValueError(f"the int8 screen handles up to {MAX_DIM} dims, got {dim}")
        self.dim = dim
        total = np.zeros(dim)
        for start in range(0, rows, BUILD_ROWS):
            total += self.vectors[start : start + BUILD_ROWS].sum(axis=0, dtype=np.float64)
        self.mean = (total / rows).astype(np.float32)
        mean = self.mean.astype(np.float64)
        self.squares = np.concatenate(
            [((self.vectors[start : start + BUILD_ROWS] - mean) ** 2).sum(axis=1) for start in range(0, rows, BUILD_ROWS)]
        )
        """Each bank row's squared distance to the mean (float64)."""
        if native is None:
            native = native_screen.available() and dim <= native_screen.MAX_DIM
        self.candidates = 0
        """Candidate pairs whose float32 distances were computed, over every search so far."""
        self._layout(native, screen_head.head_axes(self.vectors, self.mean) if native else None)

    def _layout(self, native: bool, rotation: np.ndarray | None) -> None:
        """The bank's order, int8 codes and per-block numbers, and the native screen's bank side
        if ``native``, with a head test on ``rotation``'s axes where given."""
        rows, dim = self.vectors.shape
        mean, squares = self.mean.astype(np.float64), self.squares
        # the native screen's head test wants blocks that are compact cells on the bank's first
        # principal axes (``fedpatch.screen_head``); otherwise blocks of similar norm
        split = screen_head.kd_split(screen_head.project(self.vectors, self.mean, rotation)) if rotation is not None else None
        order = split.order if split is not None else np.argsort(squares, kind="stable")
        # pad to whole blocks with copies of the last row (the widest one in norm order): real
        # rows, so every bound holds
        self.order = np.concatenate([order, np.repeat(order[-1:], -rows % BLOCK)])
        blocks = len(self.order) // BLOCK
        codes = np.empty((len(self.order), dim), dtype=np.int8)  # sorted bank rows
        scale, low = np.empty(blocks), np.empty(len(self.order))
        for start in range(0, len(self.order), BUILD_ROWS):
            centred = self.vectors[self.order[start : start + BUILD_ROWS]] - mean  # float64
            grouped = centred.reshape(-1, BLOCK, dim)
            first = start // BLOCK
            peak = np.abs(grouped).max(axis=(1, 2)) / CODE_MAX
            peak[peak == 0] = 1.0  # an all-zero block: any scale
            scale[first : first + len(grouped)] = peak
            rounded = np.rint(grouped / peak[:, None, None])
            low[start : start + len(centred)] = np.linalg.norm((grouped - rounded * peak[:, None, None]).reshape(-1, dim), axis=1)
            codes[start : start + len(centred)] = rounded.reshape(-1, dim)
        sorted_squares = squares[self.order].reshape(blocks, BLOCK)
        hi = sorted_squares.max(axis=1)
        low_max = low.reshape(blocks, BLOCK).max(axis=1)
        # per-block numbers in float32: the first pass's arithmetic, [queries x blocks], made the
        # search on lite0 features 1.03-1.07x faster than float64 did (1.00-1.11x in a first
        # one-off A/B, 7 repeats each); its rounding is bounded by the per-query slacks of
        # ``_screen`` and by ``margin``
        self.lo = _float32(sorted_squares.min(axis=1))
        self.hi = _float32(hi)
        self.unit = _float32(2 * scale)  # times s_q: one unit of P in squared distance
        self.norm_term = _float32(2 * SAFETY * np.sqrt(hi))
        self.low_term = _float32(2 * SAFETY * low_max)
        self.squares_max = float(hi.max())
        self.norm_term_max = float(self.norm_term.max())
        self.low_term_max = float(self.low_term.max())
        self.reach = float((np.sqrt(hi) + low_max).max())
        self.margin = 2 + math.ceil(4 * U_FP32 * CODE_MAX**2 * dim)
        """Units of ``P`` the thresholds are lowered by: one for the floor, one spare, and the
        float32 division's relative error (<= 4 u32) over the products' range (127^2 D)."""
        self.torch_mean = torch.from_numpy(self.mean)
        self.gamma = (dim + 4) * U_FP32 / (1 - (dim + 4) * U_FP32)
        self.native: native_screen.NativeScreen | None = None
        self.codes: torch.Tensor | None = None
        """The torch screen's codes ``[D, M]`` (the right operand of ``torch._int_mm``); the
        native screen keeps its own layout instead, so only one copy is held."""
        if native:
            numbers = {name: getattr(self, name).numpy()[0] for name in ("lo", "hi", "unit", "norm_term", "low_term")}
            # each row's own numbers, for the native screen's row thresholds
            rows_sorted = sorted_squares.ravel()
            numbers.update(row_sq=rows_sorted, row_norm_term=2 * SAFETY * np.sqrt(rows_sorted), row_low_term=2 * SAFETY * low)
            scalars = ("squares_max", "norm_term_max", "low_term_max", "reach", "gamma", "margin")
            bound = {"mean": self.mean, **numbers, **{name: getattr(self, name) for name in scalars}}
            head_bank = screen_head.build_head(self.vectors, self.mean, self.order, rotation, split) if rotation is not None and split is not None else None
            self.native = native_screen.NativeScreen(codes, bound, self.vectors, self.order, head_bank)
        else:
            self.codes = torch.from_numpy(np.ascontiguousarray(codes.T))

    def nearest(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact nearest bank row of each query row: ``(distances [N], indices [N])``.

        Distances are Euclidean (float32, from the differences); a row without a candidate
        (a non-finite query) gets index -1 and distance NaN, for the caller to handle.

        Queries go in groups of up to ``GROUP_CELLS`` values: each group is scaled to int8 in
        one pass, screened a chunk of ``CELLS`` products at a time, and its candidates'
        distances computed and picked together (sooner once ``CELLS`` candidates wait), so the
        per-call costs of those steps are paid per group rather than per chunk.
        """
        query = np.ascontiguousarray(query, dtype=np.float32)
        count = len(query)
        distances = np.full(count, np.nan, dtype=np.float32)
        indices = np.full(count, -1, dtype=np.int64)
        if self.native is not None:
            self.candidates += self.native.nearest(query, distances, indices)
            if self.native.head is not None and not self.native.head_pays():
                self._layout(True, None)  # it left too much to the full product: norm order, no head test
            return distances, indices
        chunk = min(max(16, CELLS // len(self.order)), max(count, 1))
        group = chunk * max(1, GROUP_CELLS // (chunk * self.dim))
        products = torch.empty(chunk, len(self.order), dtype=torch.int32)  # reused: no page faults per chunk
        faiss.omp_set_num_threads(torch.get_num_threads())
        for start in range(0, count, group):
            queries = self._quantise(torch.from_numpy(query[start : start + group]))
            row_parts: list[np.ndarray] = []
            found_parts: list[np.ndarray] = []
            for first in range(0, queries.count, chunk):
                part_rows, part_found = self._screen(queries.rows(first, first + chunk), products)
                row_parts.append(part_rows + (start + first))
                found_parts.append(part_found)
                if sum(map(len, row_parts)) >= CELLS or first + chunk >= queries.count:
                    # picked once CELLS pairs wait: fewer than 2 CELLS held (ties can make every pair one)
                    self._pick_nearest(query, np.concatenate(row_parts), np.concatenate(found_parts), distances, indices)
                    row_parts, found_parts = [], []
        return distances, indices

    def _pick_nearest(self, query: np.ndarray, rows: np.ndarray, found: np.ndarray, distances: np.ndarray, indices: np.ndarray) -> None:
        """Float32 distances of candidate pairs (query row, sorted-bank row; rows sorted) and
        each query's nearest among them, into ``distances`` and ``indices`` (step 4)."""
        found = self.order[found]
        self.candidates += len(rows)
        squared = np.empty(len(rows), dtype=np.float32)
        faiss.pairwise_indexed_L2sqr(
            self.dim, len(rows), faiss.swig_ptr(query), faiss.swig_ptr(rows),
            faiss.swig_ptr(self.vectors), faiss.swig_ptr(found), faiss.swig_ptr(squared),
        )  # fmt: skip
        _pick(rows, found, squared, distances, indices)

    def _quantise(self, part: torch.Tensor) -> _Queries:
        """The int8 codes of query rows and the numbers their bounds need (step 1)."""
        centred = part - self.torch_mean
        peak = centred.abs().amax(dim=1)  # 1.5x as fast as max(amax, -amin) here, the same values
        scale = torch.where(peak > 0, peak / CODE_MAX, 1.0)
        rounded = centred.div(scale[:, None]).round_()
        codes = rounded.to(torch.int8)
        dequantised = rounded.mul_(scale[:, None])
        high = torch.linalg.vector_norm(dequantised, dim=1)
        low = torch.linalg.vector_norm(centred.sub_(dequantised), dim=1)
        # |s_q r_q| and |l_q| from their float32 values: the norms' rounding, and the
        # centring's and the subtraction's (each <= u32 |c|, |c| <= |s_q r_q| + |l_q|); the
        # rounding of these few float32 operations is far inside SAFETY's 1%
        high_bound = high * (1 + self.gamma)
        low_bound = low * (1 + self.gamma) + 4 * U_FP32 * (high_bound + low)
        # the per-block float32 arithmetic of ``_screen`` rounds by a few u32 of its operands'
        # magnitudes, which these per-query slacks bound: |hi|, |lo| <= squares_max,
        # E <= error_max, and |2 s_q s_k P| <= 2 |s_q r_q| (|b| + |l_b|) <= 2 high_bound * reach
        error_max = low_bound * self.norm_term_max + high_bound * self.low_term_max
        magnitude = self.squares_max + error_max
        slack = 8 * U_FP32 * (magnitude + 2 * high_bound * self.reach)
        return _Queries(codes, scale, high_bound, low_bound, magnitude, slack, torch.isfinite(peak).numpy())

    def _screen(self, queries: _Queries, products: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Candidate pairs of one query chunk: (query row, row of the sorted bank) as int64
        arrays, sorted by query row. ``products`` is an int32 buffer of at least the chunk's
        rows."""
        products = products[: queries.count]
        assert self.codes is not None  # the torch screen's bank (not built where the native one runs)
        torch._int_mm(queries.codes, self.codes, out=products)
        scale, high_bound, low_bound = queries.scale, queries.high_bound, queries.low_bound
        error = torch.addcmul(low_bound[:, None] * self.norm_term, high_bound[:, None], self.low_term)
        unit = scale[:, None] * self.unit
        blocks = products.shape[1] // BLOCK
        block_max = products.view(-1, blocks, BLOCK).amax(dim=2)
        upper = torch.addcmul(self.hi + error, unit, block_max, value=-1).amin(dim=1)
        upper += queries.slack  # the rounding of the arithmetic above (``_quantise``)
        upper += 5 * U_FP32 * (queries.magnitude + upper.abs())
        limit = (self.lo - error - upper[:, None]).div_(unit).floor_().sub_(self.margin).clamp_(-(2**31), INT32_BELOW).int()
        passing = (block_max >= limit).numpy()
        if not queries.finite.all():
            passing[~queries.finite] = False  # no candidates for NaN/inf rows
        passing_blocks = np.flatnonzero(passing)  # 4-5x faster than a 2-d nonzero here
        query_rows, block = np.divmod(passing_blocks, blocks)
        flat_blocks = torch.from_numpy(passing_blocks)
        selected = products.view(-1, BLOCK).index_select(0, flat_blocks)
        flat = np.flatnonzero((selected >= limit.view(-1).index_select(0, flat_blocks)[:, None]).numpy())  # row-major: rows stay sorted
        entries = flat // BLOCK
        return query_rows[entries], block[entries] * BLOCK + flat % BLOCK


@dataclass(frozen=True)
class _Queries:
    """Query rows scaled to int8 (``_quantise``): codes ``[N, D]`` and, per row, the scale
    ``s_q``, the bounds on ``|s_q r_q|`` and ``|l_q|``, the magnitude of the per-block
    arithmetic and the slack for its rounding, and whether the row is finite."""

    codes: torch.Tensor
    scale: torch.Tensor
    high_bound: torch.Tensor
    low_bound: torch.Tensor
    magnitude: torch.Tensor
    slack: torch.Tensor
    finite: np.ndarray

    @property
    def count(self) -> int:
        return self.codes.shape[0]

    def rows(self, start: int, stop: int) -> _Queries:
        """Rows ``start:stop`` (views, no copies)."""
        return _Queries(*(getattr(self, field.name)[start:stop] for field in fields(self)))


def _float32(values: np.ndarray) -> torch.Tensor:
    """Per-block numbers as a float32 row ``[1, blocks]``, for broadcasting over queries."""
    return torch.from_numpy(values.astype(np.float32))[None]


def _pick(rows: np.ndarray, found: np.ndarray, squared: np.ndarray, distances: np.ndarray, indices: np.ndarray) -> None:
    """Each query's nearest candidate (lowest bank index on ties), written into ``distances``
    and ``indices`` at the candidates' query rows (``rows``, sorted); other rows are left as
    they are.

    A candidate is one int64 key, squared distance in the high half and bank row in the low:
    a non-negative float32 orders like its bit pattern, so each query's smallest key is its
    nearest row, the lowest index among equal distances.
    """
    if not len(rows):
        return
    keys = (np.abs(squared).view(np.int32).astype(np.int64) << 32) | found
    starts = np.flatnonzero(np.concatenate(([True], rows[1:] != rows[:-1])))
    best = np.minimum.reduceat(keys, starts)
    owners = rows[starts]
    distances[owners] = np.sqrt((best >> 32).astype(np.int32).view(np.float32))
    indices[owners] = best & 0xFFFFFFFF


def int8_product_exact(product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> bool:
    """Whether ``product`` (default: torch's int8 product, ``torch._int_mm``) returns the exact
    int32 product on a probe of extreme codes (+-127, long runs of one sign), as the screen
    assumes. A kernel that saturated or rounded its partial sums would fail, and the search
    would stay on faiss."""
    if product is None:
        if not hasattr(torch, "_int_mm"):
            return False
        product = torch._int_mm
    generator = torch.Generator().manual_seed(0)
    a = torch.where(torch.rand(48, 1040, generator=generator) < 0.9, CODE_MAX, -CODE_MAX).to(torch.int8)
    b = torch.where(torch.rand(1040, 72, generator=generator) < 0.9, CODE_MAX, -CODE_MAX).to(torch.int8)
    b[:, ::2] = -b[:, ::2]  # products of both signs, runs long enough to saturate 16-bit sums
    try:
        result = product(a, b)
    except RuntimeError:
        return False
    return bool(torch.equal(result.long(), a.long() @ b.long()))


@lru_cache(maxsize=1)
def available() -> bool:
    """True where the native screen runs (AVX512-VNNI, the kernel built), or on a CPU with
    native int8 products (VNNI or AMX) whose torch product passes ``int8_product_exact``
    (checked once per process)."""
    return native_screen.available() or (native_int8_cpu() and int8_product_exact())

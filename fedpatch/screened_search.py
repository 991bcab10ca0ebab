"""Exact nearest-neighbour search on the CPU: a bfloat16 screen with a proven error bound,
then float32 distances for the few rows it cannot rule out.

PatchCore scores a patch by the distance to its nearest bank vector, and on a CPU that search
is a matrix product (every query against every bank row) which, at WRN-50-2's 1536 dims,
cost a fifth of the prediction time. A bfloat16 product runs about twice as fast as the
float32 one (AVX512-BF16 / AMX), but bfloat16 keeps 8 significant bits, so its distances
alone can pick the wrong neighbour. Here they only *screen*:

1. The bank and the queries are centred on the bank's mean (distances do not change; the
   rounding errors below scale with the vectors' norms, and centring shrinks those several
   times for ReLU features). Each query row ``q`` and bank row ``b`` is extended so that one
   bfloat16 product with float32 accumulation gives the whole squared distance,
   ``[h(q), s_hi(q), s_lo(q), 1, 1] . [-2 h(b), 1, 1, s_hi(b), s_lo(b)] = |q - b|^2`` up to
   rounding, where ``h`` is the bfloat16 rounding of a vector and ``s_hi + s_lo`` its
   squared norm in two bfloat16 parts. The result is rounded to bfloat16 once (``D~``).
2. Per query, ``E`` bounds ``|P - D|`` over every bank row, where ``P`` is the float32
   accumulated product before that last rounding and ``D`` the exact squared distance:
   the vectors' rounding (``|q.b - h(q).h(b)| <= |l(q)| |b| + |h(q)| |l(b)|`` with
   ``l = x - h(x)``, by Cauchy-Schwarz, using the largest ``|b|`` and ``|l(b)|`` of the bank),
   the squared norms' rounding, and float32 accumulation of ``K`` terms
   (``gamma_K = K u32 / (1 - K u32)`` times the sum of the terms' magnitudes). The last
   rounding adds at most ``r |D~|`` with ``r = u / (1 - u)``, ``u = 2^-8``.
3. With ``m`` the screened value of any one bank row, the true nearest neighbour ``b*``
   satisfies ``D~(b*) - r |D~(b*)| - E <= D(b*) <= D(row of m) <= m + r |m| + E``, so every
   row with ``D~ - r |D~| <= m + r |m| + 2E`` (plus the centring's float32 rounding, a term
   of order 1e-7) is a *candidate*, and ``b*`` is one of them. ``m`` is each query's smallest
   screened value.
4. The candidates' distances are computed from the float32 differences
   (``faiss.pairwise_indexed_L2sqr``, no gathered copies) and the smallest wins; ties go to
   the lowest bank index, as ``argmin`` does.

So the result is the exact nearest neighbour (up to the float32 rounding of the final
differences, as with any float32 search), not an approximation: measured against float64 on
WRN-50-2 features it agreed on every query, where the float32 expanded product
(``|q|^2 + |b|^2 - 2 q.b``) in oneDNN's split-bf16 mode, used before, picked another
neighbour for 10 of 23,500 WRN 1000x750 queries (a one-off check), and its distances are within 3e-6 of float64's (faiss's expanded
product: 5e-3 to 8e-3 on WRN-50-2 features). Candidates per query measured 1.6-2.5 for
efficientnet_lite0 and 7.7-13.5 for WRN-50-2 with random weights
(``benchmarks/results/cpu_search_zen4.md``).

Scans are cheap because bfloat16 is compared as int16: for non-negative values the bit
patterns order like the numbers, and torch's int16 reductions ran several times faster
than its bfloat16 ones (a one-off timing). A negative ``D~`` (rounding around a distance of ~0) orders below every
non-negative one, which is all the screen needs (any bank row may serve as ``m``; the
threshold is positive). Each query's minimum comes from blocks of ``BLOCK`` bank rows, and only
the blocks whose minimum passes the threshold are looked at entry by entry.

The bound assumes what oneDNN's bfloat16 kernels do (float32 accumulation, one rounding at
the end); ``bf16_product_within_bound`` checks it on a probe once per process, and the search
is not used where it fails (nor on CPUs without bfloat16 instructions, where the product is
emulated and slow). Rows the screen leaves without a candidate (queries holding NaN or inf)
come back with index -1; ``MemoryBank.search`` refuses them with an error naming the row.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import faiss
import numpy as np
import torch

from fedpatch.hardware import native_bfloat16_cpu

BLOCK = 64
"""Bank rows per block of the screen's first pass."""
CELLS = 1 << 22
"""Screened entries per query chunk (8 MiB of bfloat16): the fastest overall of 2^20-2^23 in a
one-off sweep on the lite0 and WRN-50-2 features of ``benchmarks/cpu_search_bench.py`` (2 threads)."""
U_BF16 = 2.0**-8
"""bfloat16's unit roundoff (8 significant bits)."""
U_FP32 = 2.0**-24
ROUNDING = U_BF16 / (1 - U_BF16)
"""``r``: a value rounded to bfloat16 is within ``r`` times the rounded value's magnitude."""
SAFETY = 1.01
"""Margin on the error bound for the rounding of the bound's own float32 arithmetic."""
EXTRA = 4
"""Columns added to the vectors: two for the query's squared norm, two for the bank row's."""
BUILD_ROWS = 16384
"""Bank rows converted at a time when the screen is built (bounds its temporaries)."""
_FINITE_MAX = torch.tensor(torch.finfo(torch.bfloat16).max, dtype=torch.bfloat16).view(torch.int16).item()


def _gamma(terms: int) -> float:
    return terms * U_FP32 / (1 - terms * U_FP32)


def _split_square(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``values`` (float32 or float64) as a bfloat16 pair ``hi + lo`` (error <= u^2 |values|)."""
    hi = values.to(torch.bfloat16)
    return hi, (values - hi.to(values.dtype)).to(torch.bfloat16)


class ScreenedSearch:
    """Exact 1-nearest-neighbour search of a fixed float32 bank (see the module docstring).

    Holds the bank's centred bfloat16 form (``[K, M]``, half the bank's size) besides a
    reference to the float32 vectors, which the final distances are computed from.
    """

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        rows, dim = self.vectors.shape
        bank = torch.from_numpy(self.vectors)
        blocks = bank.split(BUILD_ROWS)  # temporaries of one block, not of the whole bank
        self.mean = (sum(block.sum(dim=0, dtype=torch.float64) for block in blocks) / rows).float()
        self.dim = dim
        self.width = dim + EXTRA + (-(dim + EXTRA) % 16)  # whole 32-byte bf16 vectors
        extended = torch.zeros(self.width, rows + (-rows % BLOCK), dtype=torch.bfloat16)
        extended[dim : dim + 2] = 1
        extended[dim + 2, rows:] = math.inf  # padding rows: never a candidate
        self.norm_max = self.low_norm_max = 0.0
        start = 0
        for block in blocks:
            centred = block - self.mean
            high = centred.to(torch.bfloat16)
            stop = start + len(block)
            extended[dim + 2, start:stop], extended[dim + 3, start:stop] = _split_square((centred.double() ** 2).sum(dim=1))
            self.norm_max = max(self.norm_max, float(torch.linalg.vector_norm(centred, dim=1).max()))
            self.low_norm_max = max(self.low_norm_max, float(torch.linalg.vector_norm(centred.sub_(high), dim=1).max()))
            extended[:dim, start:stop] = high.mul_(-2).T  # x2 is exact in bfloat16
            start = stop
        self.extended = extended
        self.gamma = _gamma(self.width)
        self.candidates = 0
        """Candidate pairs whose float32 distances were computed, over every search so far."""

    def nearest(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact nearest bank row of each query row: ``(distances [N], indices [N])``.

        Distances are Euclidean (float32, from the differences); a row without a candidate
        (a non-finite query) gets index -1 and distance NaN, for the caller to handle.
        """
        query = np.ascontiguousarray(query, dtype=np.float32)
        count, dim = query.shape
        distances = np.full(count, np.nan, dtype=np.float32)
        indices = np.full(count, -1, dtype=np.int64)
        chunk = min(max(16, CELLS // self.extended.shape[1]), max(count, 1))
        buffers = self.buffers(chunk)
        faiss.omp_set_num_threads(torch.get_num_threads())
        for start in range(0, count, chunk):
            part = torch.from_numpy(query[start : start + chunk])
            rows, found = self._screen(part, *(buffer[: part.shape[0]] for buffer in buffers))
            rows += start
            self.candidates += len(rows)
            squared = np.empty(len(rows), dtype=np.float32)
            faiss.pairwise_indexed_L2sqr(
                dim, len(rows), faiss.swig_ptr(query), faiss.swig_ptr(rows),
                faiss.swig_ptr(self.vectors), faiss.swig_ptr(found), faiss.swig_ptr(squared),
            )  # fmt: skip
            _pick(rows, found, squared, distances, indices)
        return distances, indices

    def buffers(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A chunk's buffers, reused by every chunk of a search (fresh multi-MB tensors per
        chunk cost page faults): the extended bfloat16 queries (their bank-norm columns set
        to 1), the centred float32 queries and the screened values."""
        extended = torch.zeros(rows, self.width, dtype=torch.bfloat16)
        extended[:, self.dim + 2 : self.dim + 4] = 1
        return extended, torch.empty(rows, self.dim), torch.empty(rows, self.extended.shape[1], dtype=torch.bfloat16)

    def _screen(self, part: torch.Tensor, extended: torch.Tensor, centred: torch.Tensor, screened: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Candidate pairs of one query chunk: (query row, bank row) as int64 arrays, sorted by
        both."""
        dim = self.dim
        torch.sub(part, self.mean, out=centred)
        high = extended[:, :dim]
        high.copy_(centred)
        norms = torch.linalg.vector_norm(centred, dim=1)
        squares = norms * norms
        extended[:, dim] = squares
        extended[:, dim + 1] = squares - extended[:, dim].float()
        low_norms = torch.linalg.vector_norm(centred.sub_(high), dim=1)
        screened = torch.matmul(extended, self.extended, out=screened).view(torch.int16).view(part.shape[0], -1, BLOCK)
        block_min = screened.amin(dim=2)
        least = block_min.amin(dim=1).view(torch.bfloat16).float()
        threshold = self._threshold(least, norms, low_norms).numpy()
        # the index work on these small arrays is numpy's: its comparisons and nonzero ran 2-8
        # times faster than torch's on these sizes (a one-off timing); the block minima above
        # stay with torch, whose reduction there was 8 times faster than numpy's
        passing = block_min.numpy() <= threshold[:, None]
        finite = norms.isfinite().numpy()
        if not finite.all():
            passing[~finite] = False  # no candidates for NaN/inf rows
        query_rows, blocks = np.nonzero(passing)
        selected = screened.view(-1, BLOCK).index_select(0, torch.from_numpy(query_rows * screened.shape[1] + blocks)).numpy()
        flat = np.flatnonzero(selected <= threshold[query_rows, None])  # row-major: rows stay sorted
        entries = flat // BLOCK
        return query_rows[entries], blocks[entries] * BLOCK + flat % BLOCK

    def _threshold(self, least: torch.Tensor, norms: torch.Tensor, low_norms: torch.Tensor) -> torch.Tensor:
        """Each query's screen threshold, as the int16 pattern of a bfloat16 rounded up."""
        high_norms = norms + low_norms
        error = (
            2 * (low_norms * self.norm_max + high_norms * self.low_norm_max)  # the vectors' rounding
            + self.gamma * (high_norms + self.norm_max + self.low_norm_max) ** 2  # float32 accumulation
            + (_gamma(self.dim) + 4 * U_FP32 + U_BF16**2) * (norms * norms + self.norm_max**2)  # squared norms
        ) * SAFETY + 1e-30  # bf16 products flush subnormals: a vanishing absolute error
        upper = least + ROUNDING * least.abs() + error  # >= the distance of least's bank row
        # centring rounds each vector by <= u32 |x - mean|, so square roots of distances move by
        # <= slack / 2; (sqrt(upper) + slack)^2 <= upper + slack (1 + upper) + slack^2 (2 sqrt(x) <= 1 + x)
        slack = 2 * SAFETY * U_FP32 * (norms + self.norm_max)
        bound = upper + error + slack * (1 + upper.clamp(min=0) + slack)
        threshold = torch.where(bound >= 0, bound / (1 - ROUNDING), bound / (1 + ROUNDING))
        rounded = threshold.to(torch.bfloat16)
        pattern = rounded.view(torch.int16) + (rounded.float() < threshold).to(torch.int16)
        return pattern.clamp(max=_FINITE_MAX)  # never +inf: the padding rows stay out


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


def bf16_product_within_bound(product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.matmul) -> bool:
    """Whether ``product`` (torch's bfloat16 matrix product) stays within the error bound the
    screen assumes (float32 accumulation, one rounding to bfloat16) on a probe of ReLU-like
    rows with mixed signs.

    A kernel that accumulated in bfloat16, or rounded partial sums, would exceed it and leave
    the search to faiss.
    """
    generator = torch.Generator().manual_seed(0)
    width = 1552
    a = torch.randn(64, width, generator=generator).relu_().add_(0.5).to(torch.bfloat16)
    b = torch.randn(width, 256, generator=generator).relu_().add_(0.5).to(torch.bfloat16)
    b[::3] = -b[::3]  # mixed signs: partial sums cancel, as the screen's do
    result = product(a, b).double()
    exact = a.double() @ b.double()
    magnitude = a.double().abs() @ b.double().abs()
    allowed = ROUNDING * result.abs() + _gamma(width) * magnitude
    return bool(((result - exact).abs() <= allowed).all())


@lru_cache(maxsize=1)
def available() -> bool:
    """True on a CPU with native bfloat16 products (AVX512-BF16 or AMX) whose product passes
    ``bf16_product_within_bound`` (checked once per process)."""
    return native_bfloat16_cpu() and bf16_product_within_bound()

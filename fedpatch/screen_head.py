"""The head pass of the native screen: a cheap int8 test on the bank's first principal axes
that rules out most blocks before their full product is taken.

Without it the native screen's time is mostly its int8 product with the whole bank (80-84% of
the kernel on efficientnet_lite0 features), at the rate the CPU issues ``vpdpbusd``, and most
of that product is spent on blocks that cannot hold the nearest row. PatchCore features
concentrate their spread on a few directions (the first 32 of lite0's 152 principal axes
carry 90% of a 1000x750 bank's variance), so the distance along those axes alone already
rules out most rows:

1. ``W`` (``[D, h]``, float32) holds the bank's first ``h`` principal axes (from up to
   ``SAMPLE_ROWS`` rows: any ``W`` is correct, a good one only prunes more). The bank is
   ordered by a k-d split of its coordinates on them (``kd_order``), so each block of 32 rows
   is a compact cell and a tile of neighbouring patches tends to need few cells.
2. Each bank row's head coordinates ``b' = W^T (b - m)`` (float64, rounded to float32) are
   scaled to int8 per block like the full codes; each query's ``c' = W^T c`` is computed and
   scaled by the kernel.
3. The kernel descends the k-d split with the query's head coordinates to its cell and takes
   the cell's row with the smallest head estimate; its float32 distance ``d`` bounds the
   nearest. A row that can still be the float32 nearest has ``D <= d (1 + 2 gamma)``; then
   ``|W^T (q - b)| <= sigma sqrt(D)`` (``sigma`` bounds ``W``'s largest singular value), and
   ``|c' - b'|`` is within ``e_q + e_b`` of that (the float32 rounding of ``c'`` and of
   ``b'``). The int8 head product bounds ``|c' - b'|`` from below exactly as the full screen
   bounds ``D`` (Cauchy-Schwarz on the codes' residues, with each row's own ``|b'|^2`` and its
   block's largest residue terms), so every row whose bound exceeds that radius is ruled out;
   a block whose rows are all ruled out for all 8 queries of a tile is never multiplied in
   full.

Every row that can be the float32 nearest is kept, so the pick is unchanged; only fewer full
products are taken. The numbers here are rounded outwards to float32 (upper bounds up, lower
bounds down), and float64's own rounding is covered by a 1e-9 relative term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

BLOCK = 32
CODE_MAX = 127.0
U_FP32 = 2.0**-24
SAMPLE_ROWS = 4096
"""Most bank rows the principal axes are computed from (evenly spaced)."""
AXIS_ITERATIONS = 8
"""Subspace iterations for the principal axes."""
MIN_SHARE = 0.5
"""Least share of the bank's variance on the head axes for a head test: PatchCore features
measured 0.90 (efficientnet_lite0, 32 of 152 dims) and 0.997 (WRN-50-2 with random weights, 64
of 1,536); ReLU-like random banks 0.12-0.29."""
BUILD_ROWS = 4096
"""Rows projected at a time (a multiple of BLOCK), which bounds the float64 scratch."""


MAX_SOURCE_DIM = 4096
"""Widest bank given a head pass: its axes come from a ``D x D`` eigendecomposition (about a
second at 4096 dims)."""


def head_dims(dim: int) -> int:
    """Head axes for a bank of ``dim`` dims: 32 from 128 dims, 64 from 768, none below 128
    (where the head product would cost a quarter of the full one or more) or above
    ``MAX_SOURCE_DIM``."""
    if dim < 128 or dim > MAX_SOURCE_DIM:
        return 0
    return 32 if dim < 768 else 64


def max_taken(head: int, dim: int) -> float:
    """The largest share of (query tile, block) products the head test may leave to the full
    product and still pay for itself: its own product costs ``head / dim`` of a full one per
    tile and block, and about as much again in its per-row test and per-query work. Measured on
    efficientnet_lite0 features (``head / dim`` = 32 / 152, limit 0.58): at 24% taken (1000x750)
    the search ran 1.3x as fast with it, at 60% (magnetic tiles, 256x256) 1.15x slower."""
    return 1.0 - 2.0 * head / dim


def head_axes(vectors: np.ndarray, mean: np.ndarray) -> np.ndarray | None:
    """The head test's axes for this bank (float32 ``[D, h]``), or None where it gets no head
    test: outside ``head_dims``' widths, or where its first ``h`` axes carry less than
    ``MIN_SHARE`` of its variance (there the test would rule out too little to pay for itself:
    on ReLU-like random banks of 152-384 dims the search ran 1.2-1.4x slower with it)."""
    head = head_dims(vectors.shape[1])
    if not head:
        return None
    axes, share = principal_axes(vectors, mean, head)
    return axes if share >= MIN_SHARE else None


def principal_axes(vectors: np.ndarray, mean: np.ndarray, head: int) -> tuple[np.ndarray, float]:
    """The bank's first ``head`` principal axes (centred on ``mean``), as float32 ``[D, head]``
    with columns by decreasing variance, and the share of the variance they carry.

    From up to ``SAMPLE_ROWS`` evenly spaced rows, by subspace iteration on their float32
    scatter matrix and a final Rayleigh-Ritz step: near enough (the test only needs axes that
    carry most of the spread, and its bounds hold for any ``W``), and a few times faster than a
    full eigendecomposition (0.58 s at 1,536 dims).
    """
    step = max(1, math.ceil(len(vectors) / SAMPLE_ROWS))
    sample = torch.from_numpy(np.ascontiguousarray(vectors[::step])) - torch.from_numpy(mean)
    scatter = (sample.T @ sample).double()
    generator = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(scatter.shape[0], head, generator=generator, dtype=torch.float64)).Q
    for _ in range(AXIS_ITERATIONS):
        basis = torch.linalg.qr(scatter @ basis).Q
    values, rotation = torch.linalg.eigh(basis.T @ scatter @ basis)
    axes = basis @ rotation[:, torch.argsort(values, descending=True)]
    share = float(values.sum() / scatter.trace()) if float(scatter.trace()) > 0 else 1.0
    return np.ascontiguousarray(axes.numpy(), dtype=np.float32), share


def project(vectors: np.ndarray, mean: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """Float32 head coordinates of every bank row (for ordering only)."""
    out = np.empty((len(vectors), rotation.shape[1]), dtype=np.float32)
    for start in range(0, len(vectors), BUILD_ROWS):
        out[start : start + BUILD_ROWS] = _product(vectors[start : start + BUILD_ROWS] - mean, rotation)
    return out


@dataclass
class KdSplit:
    """A k-d split of the bank's rows into blocks of BLOCK: the row order, and the tree the
    kernel descends to find a query's block (``fp_bank``'s ``kd_*``)."""

    order: np.ndarray  # [rows] int64
    axis: np.ndarray  # [nodes] int32: the head axis node i halves on
    value: np.ndarray  # [nodes] float32: where (lower half below)
    child: np.ndarray  # [nodes, 2] int32: the lower and upper half, a node (>= 0) or block -1 - child


def kd_split(points: np.ndarray) -> KdSplit:
    """Each cell is halved (in whole blocks) at the median of its widest coordinate until it is
    one block, so consecutive blocks are compact cells; only the last block can be short."""
    order = np.arange(len(points))
    axes: list[int] = []
    values: list[float] = []
    children: list[list[int]] = []
    cells = [(0, len(points), -1, 0)]  # first, last, parent node, side
    while cells:
        first, last, parent, side = cells.pop()
        if last - first <= BLOCK:
            if parent >= 0:
                children[parent][side] = -1 - first // BLOCK
            continue
        node = len(axes)
        if parent >= 0:
            children[parent][side] = node
        rows = order[first:last]
        axis = int(np.argmax(points[rows].var(axis=0)))
        rows = rows[np.argsort(points[rows, axis], kind="stable")]
        order[first:last] = rows
        middle = first + (-(-(last - first) // BLOCK) // 2) * BLOCK
        axes.append(axis)
        values.append(0.5 * (float(points[rows[middle - first - 1], axis]) + float(points[rows[middle - first], axis])))
        children.append([0, 0])
        cells += [(first, middle, node, 0), (middle, last, node, 1)]
    return KdSplit(
        order=order,
        axis=np.asarray(axes, dtype=np.int32),
        value=np.asarray(values, dtype=np.float32),
        child=np.asarray(children, dtype=np.int32).reshape(-1, 2),
    )


def _product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` through torch rather than numpy: numpy's BLAS keeps a thread pool of its own
    whose threads spin after each product, and on 2 cores they took the time of the kernel's
    threads (the search of 2,048 queries ran 6.5 ms instead of 2.3 after a numpy product)."""
    return torch.from_numpy(np.ascontiguousarray(a)).matmul(torch.from_numpy(np.ascontiguousarray(b))).numpy()


def _up(values: np.ndarray) -> np.ndarray:
    """Float32 values no smaller than the float64 ``values``."""
    rounded = values.astype(np.float32)
    return np.where(rounded < values, np.nextafter(rounded, np.float32(np.inf)), rounded)


def _up_scalar(value: float) -> float:
    """A float32 value no smaller than ``value``, as a Python float."""
    return float(_up(np.array([value]))[0])


def _down(values: np.ndarray) -> np.ndarray:
    """Float32 values no larger than the float64 ``values``."""
    rounded = values.astype(np.float32)
    return np.where(rounded > values, np.nextafter(rounded, np.float32(-np.inf)), rounded)


def _gamma(terms: int) -> float:
    """The relative error bound of a float32 sum (or dot product) of ``terms`` terms."""
    return terms * U_FP32 / (1 - terms * U_FP32)


@dataclass
class HeadBank:
    """The bank side of the head pass, in the sorted bank's order (``fp_bank``'s ``head_*``)."""

    rotation: np.ndarray  # [D, h] float32 W
    packed: np.ndarray  # [blocks, h / 4, BLOCK, 4] uint8: code + 128
    unit: np.ndarray  # [blocks] float32 s_k
    norm: np.ndarray  # [blocks] float32, >= every row's |b'|
    low: np.ndarray  # [blocks] float32, >= every row's |b' - s_k r|
    row: np.ndarray  # [rows] float32, <= |b'|^2 / (2 s_k)
    row_sq: np.ndarray  # [rows] float32 |b'|^2, for estimates only
    sigma: float  # >= the largest singular value of W
    query_error: float  # >= gamma_(D+2) |W|_F: |c' - W^T c| per unit of |c|
    bank_error: float  # >= |b' - W^T (b - m)| for every row
    sq_max: float  # >= every row's |b'|^2
    split: KdSplit

    @property
    def dim(self) -> int:
        return self.rotation.shape[1]


def build_head(vectors: np.ndarray, mean: np.ndarray, order: np.ndarray, rotation: np.ndarray, split: KdSplit) -> HeadBank:
    """Head codes and bounds of the bank rows ``vectors[order]`` (``len(order)`` a multiple of
    BLOCK, in ``split``'s blocks) on the axes ``rotation``."""
    dim, head = rotation.shape
    w = rotation.astype(np.float64)
    rows = len(order)
    packed = np.empty((rows // BLOCK, head // 4, BLOCK, 4), dtype=np.uint8)
    unit = np.empty(rows // BLOCK, dtype=np.float32)
    squares, norms, lows = np.empty(rows), np.empty(rows), np.empty(rows)
    bank_error = x_max = 0.0
    for start in range(0, rows, BUILD_ROWS):
        x = vectors[order[start : start + BUILD_ROWS]].astype(np.float64) - mean.astype(np.float64)
        exact = _product(x, w)
        coords = exact.astype(np.float32).astype(np.float64)  # b', the vectors the kernel's bounds are about
        bank_error = max(bank_error, float(np.linalg.norm(coords - exact, axis=1).max()))
        x_max = max(x_max, float(np.linalg.norm(x, axis=1).max()))
        grouped = coords.reshape(-1, BLOCK, head)
        first = start // BLOCK
        scale = (np.abs(grouped).max(axis=(1, 2)) / CODE_MAX).astype(np.float32)
        scale[scale == 0] = 1.0
        unit[first : first + len(grouped)] = scale
        codes = np.clip(np.rint(grouped / scale[:, None, None]), -CODE_MAX, CODE_MAX)
        residue = grouped - codes * scale[:, None, None].astype(np.float64)  # exact: 24-bit scale times 8-bit code
        packed[first : first + len(grouped)] = (codes + 128).astype(np.uint8).reshape(len(grouped), BLOCK, head // 4, 4).transpose(0, 2, 1, 3)
        squares[start : start + len(x)] = (coords**2).sum(axis=1)
        norms[start : start + len(x)] = np.sqrt(squares[start : start + len(x)])
        lows[start : start + len(x)] = np.linalg.norm(residue.reshape(-1, head), axis=1)
    frobenius = float(np.linalg.norm(w))
    # float64's rounding of x, x @ w and the norms is below 1e-11 of their sizes
    bank_error += 1e-9 * (1 + frobenius) * x_max
    return HeadBank(
        rotation=np.ascontiguousarray(rotation, dtype=np.float32),
        packed=np.ascontiguousarray(packed),
        unit=unit,
        norm=_up(norms.reshape(-1, BLOCK).max(axis=1) * (1 + 1e-9)),
        low=_up(lows.reshape(-1, BLOCK).max(axis=1) * (1 + 1e-9)),
        row_sq=squares.astype(np.float32),
        row=_down(squares * (1 - 1e-9) / (2 * np.repeat(unit.astype(np.float64), BLOCK))),
        sigma=_up_scalar(float(torch.linalg.matrix_norm(torch.from_numpy(w), ord=2)) * (1 + 1e-9)),
        query_error=_up_scalar(_gamma(dim + 2) * frobenius * (1 + 1e-9)),
        bank_error=_up_scalar(bank_error * (1 + 1e-9)),
        sq_max=_up_scalar(float(squares.max()) * (1 + 1e-9)),
        split=split,
    )

"""The native form of the int8 screen (``fedpatch/_screen_kernel.c``), loaded with ctypes.

``fedpatch.screened_search`` computes every query's int8 products with the whole bank and
then passes over them with torch and numpy; on efficientnet_lite0 features those passes cost
more than the product itself. The C kernel takes each block's maximum while the products are
in registers (AVX512-VNNI) and finishes a query (bounds, candidates, float32 distances, pick)
while its numbers are in cache, with the same block bound, so it returns the same neighbours.
Before computing candidate distances it tightens that bound with the float32 distance of the
most promising row and tests rows on their own numbers (``ROW_NUMBERS``), which leaves far
fewer candidates where the int8 error is large (``fedpatch.screened_search``). Banks of 128
to 4,096 dims get a head test first (``fedpatch.screen_head``): a cheap int8 product on the
bank's first 32 or 64 principal axes rules out most blocks before their full product is
taken (``NativeScreen.share_taken``).

The library is built by ``pip install`` as an optional extension (``pyproject.toml``): where
no C compiler was found, or the CPU lacks AVX512-VNNI, ``available()`` is False and the search
stays on the torch screen. It holds no Python objects, and ctypes releases the GIL during each
call. The rows are split over torch's own OpenMP threads: the kernel is handed libgomp's
``GOMP_parallel`` from the copy torch loaded. A pool of other threads would compete with
torch's, which spin after each torch operation unless ``OMP_WAIT_POLICY=PASSIVE`` was set
before torch loaded (``import fedpatch`` sets it, but only if it comes first): on two cores a
search started right after a convolution took 19.7-20.1 ms on two Python threads against
13.0-14.9 on torch's team (lite0 1000x750 features, one-off, medians of 9). Where torch runs
another OpenMP runtime, a Python pool is the fallback.
"""

from __future__ import annotations

import ctypes
import importlib.util
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from fedpatch import screen_head

LIBRARY = "fedpatch._screen_kernel"
L2_CODES = 256 * 1024
"""Bytes of bank codes swept per query tile (a panel of blocks): well inside a core's L2,
beside the query panel and the block maxima."""
KEEP_CODES = 512 * 1024
"""Largest bank (bytes of codes) searched one query tile at a time over the whole bank, with
the tile's products kept in L2 for the passing blocks rather than recomputed."""
MAX_DIM = (2**31 - 1) // (255 * 127)
"""Widest bank the kernel takes (66,311 dims): its sums of unsigned bank codes (up to 255)
times signed query codes (up to 127 in size) must fit int32 before the correction, or the
block maxima would be taken of wrapped values."""
ROW_NUMBERS = ("row_sq", "row_norm_term", "row_low_term")
"""Per sorted bank row, float32: the squared norm and the two terms of the error bound that the
blocks take the extremes of (``lo`` / ``hi``, ``norm_term``, ``low_term``)."""
HEAD_JUDGED = 4096
"""(query tile, block) products seen before the head test is judged (``head_pays``): 64 tiles
of a 64-block bank."""
ROWS_PER_THREAD = 512
"""Fewest query rows worth a thread of their own (a thread's start costs tens of µs)."""


class _Bank(ctypes.Structure):
    """``fp_bank`` of the C source: the screen's bank side, all pointers into numpy arrays
    that ``NativeScreen`` keeps alive."""

    _fields_ = [
        ("dim", ctypes.c_int64),
        ("padded_dim", ctypes.c_int64),
        ("blocks", ctypes.c_int64),
        ("panel_blocks", ctypes.c_int64),
        ("keep_products", ctypes.c_int64),
        ("packed", ctypes.c_void_p),
        ("mean", ctypes.c_void_p),
        ("lo", ctypes.c_void_p),
        ("hi", ctypes.c_void_p),
        ("unit", ctypes.c_void_p),
        ("norm_term", ctypes.c_void_p),
        ("low_term", ctypes.c_void_p),
        ("squares_max", ctypes.c_float),
        ("norm_term_max", ctypes.c_float),
        ("low_term_max", ctypes.c_float),
        ("reach", ctypes.c_float),
        ("gamma", ctypes.c_float),
        ("margin", ctypes.c_float),
        ("vectors", ctypes.c_void_p),
        ("order", ctypes.c_void_p),
        ("row_sq", ctypes.c_void_p),
        ("row_norm_term", ctypes.c_void_p),
        ("row_low_term", ctypes.c_void_p),
        ("head_dim", ctypes.c_int64),
        ("rotation", ctypes.c_void_p),
        ("head_packed", ctypes.c_void_p),
        ("head_unit", ctypes.c_void_p),
        ("head_norm", ctypes.c_void_p),
        ("head_low", ctypes.c_void_p),
        ("head_row", ctypes.c_void_p),
        ("head_row_sq", ctypes.c_void_p),
        ("kd_nodes", ctypes.c_int64),
        ("kd_axis", ctypes.c_void_p),
        ("kd_child", ctypes.c_void_p),
        ("kd_value", ctypes.c_void_p),
        ("head_sq_max", ctypes.c_float),
        ("head_norm_max", ctypes.c_float),
        ("head_low_max", ctypes.c_float),
        ("head_sigma", ctypes.c_float),
        ("head_query_error", ctypes.c_float),
        ("head_bank_error", ctypes.c_float),
        ("products_taken", ctypes.c_void_p),
    ]


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    """The built kernel with its signatures, or None where it was not built or this CPU
    cannot run it."""
    spec = importlib.util.find_spec(LIBRARY)
    if spec is None or spec.origin is None:
        return None
    library = ctypes.CDLL(spec.origin)
    library.fp_supported.restype = ctypes.c_int
    library.fp_supported.argtypes = []
    if not library.fp_supported():
        return None
    library.fp_nearest.restype = ctypes.c_int64
    library.fp_nearest.argtypes = [ctypes.POINTER(_Bank), ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    library.fp_nearest_team.restype = ctypes.c_int64
    library.fp_nearest_team.argtypes = library.fp_nearest.argtypes + [ctypes.c_int64] + [ctypes.c_void_p] * 3
    return library


def available() -> bool:
    """Whether the native screen was built and runs on this CPU (AVX512-F/BW/VNNI)."""
    return _library() is not None


@lru_cache(maxsize=1)
def _team() -> tuple[int, int, int] | None:
    """Addresses of ``GOMP_parallel``, ``omp_get_thread_num`` and ``omp_get_num_threads`` in
    the OpenMP runtime torch loaded (its own ``libgomp``, in ``torch/lib`` or ``torch.libs``),
    or None where there is none. Other libraries may load their own copy (faiss does); a team
    of theirs would compete with torch's threads just as a Python pool does."""
    root = Path(torch.__file__).resolve().parent
    homes = (root, root.parent / "torch.libs")
    try:
        with open("/proc/self/maps") as maps:
            paths = {Path(line.split()[-1]) for line in maps if "/libgomp" in line}
    except OSError:
        return None
    names = ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads")
    for path in sorted(paths):
        if not any(path.is_relative_to(home) for home in homes):
            continue
        runtime = ctypes.CDLL(str(path))  # already loaded: the same handle, no second runtime
        if all(hasattr(runtime, name) for name in names):
            return tuple(ctypes.cast(getattr(runtime, name), ctypes.c_void_p).value for name in names)  # type: ignore[return-value]
    return None


@lru_cache(maxsize=1)
def _threads() -> ThreadPoolExecutor:
    """Where torch runs on another OpenMP runtime than libgomp: one Python thread per torch
    thread (ctypes releases the GIL)."""
    return ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()), thread_name_prefix="fedpatch-screen")


def _head_fields(head: screen_head.HeadBank) -> dict[str, int | float]:
    """``fp_bank``'s head-pass fields: pointers into ``head``'s arrays (kept alive by the
    ``NativeScreen`` that holds it) and its scalars."""
    split = head.split
    arrays = {"rotation": head.rotation, "head_packed": head.packed, "head_unit": head.unit, "head_norm": head.norm, "head_low": head.low,
              "head_row": head.row, "head_row_sq": head.row_sq, "kd_axis": split.axis, "kd_child": split.child, "kd_value": split.value}  # fmt: skip
    return {
        "head_dim": head.dim, "kd_nodes": len(split.axis), **{name: array.ctypes.data for name, array in arrays.items()},
        "head_sq_max": head.sq_max, "head_norm_max": float(head.norm.max()), "head_low_max": float(head.low.max()),
        "head_sigma": head.sigma, "head_query_error": head.query_error, "head_bank_error": head.bank_error,
    }  # fmt: skip


class NativeScreen:
    """The bank side of the native screen, built from a ``ScreenedSearch``'s numbers."""

    def __init__(
        self, codes: np.ndarray, numbers: dict[str, np.ndarray | float], vectors: np.ndarray, order: np.ndarray, head: screen_head.HeadBank | None = None
    ) -> None:
        """``codes``: the sorted bank's int8 codes ``[M, D]`` (M a multiple of 32); ``numbers``:
        the per-block arrays (``lo``, ``hi``, ``unit``, ``norm_term``, ``low_term``, float32
        ``[M / 32]``), the per-row ones (``ROW_NUMBERS``, ``[M]``) and scalars (``mean`` too,
        float32 ``[D]``) of the bound; ``head``: the head pass's bank side
        (``fedpatch.screen_head``), or None for none."""
        library = _library()
        if library is None:
            raise RuntimeError("the native screen is not available on this machine")
        self._library = library
        rows, dim = codes.shape
        if dim > MAX_DIM:
            raise ValueError(f"the native screen handles up to {MAX_DIM} dims, got {dim}")
        if head is not None and (head.dim % 16 or not 16 <= head.dim <= 64 or head.packed.shape[0] != rows // 32):
            raise ValueError(f"the head pass takes 16 to 64 axes (a multiple of 16) and every block, got {head.dim} axes")
        padded = -(-dim // 4) * 4
        blocks = rows // 32
        wide = np.zeros((rows, padded), dtype=np.int16)
        wide[:, :dim] = codes
        # [blocks][padded / 4][32][4], unsigned: what one vpdpbusd step reads for a block
        self.packed = np.ascontiguousarray((wide + 128).astype(np.uint8).reshape(blocks, 32, padded // 4, 4).transpose(0, 2, 1, 3))
        self.vectors, self.order = vectors, np.ascontiguousarray(order, dtype=np.int64)
        self.products_taken = np.zeros(2, dtype=np.int64)
        """(query tile, block) products taken in full and seen, over every search so far."""
        names = ("mean", "lo", "hi", "unit", "norm_term", "low_term", *ROW_NUMBERS)
        self.arrays = {name: np.ascontiguousarray(numbers[name], dtype=np.float32) for name in names}
        self.bank = _Bank(
            dim=dim, padded_dim=padded, blocks=blocks, keep_products=int(self.packed.nbytes <= KEEP_CODES),
            panel_blocks=blocks if self.packed.nbytes <= KEEP_CODES else max(1, L2_CODES // (32 * padded)),
            packed=self.packed.ctypes.data, vectors=vectors.ctypes.data, order=self.order.ctypes.data,
            **{name: array.ctypes.data for name, array in self.arrays.items()},
            **{name: float(numbers[name]) for name in ("squares_max", "norm_term_max", "low_term_max", "reach", "gamma", "margin")},
            **({} if head is None else _head_fields(head)), products_taken=self.products_taken.ctypes.data,
        )  # fmt: skip
        self.head = head

    def head_pays(self) -> bool:
        """Whether the head test rules out enough block products to pay for itself
        (``screen_head.max_taken``); True until ``HEAD_JUDGED`` have been seen, and without one."""
        taken, seen = self.products_taken.tolist()
        return self.head is None or seen < HEAD_JUDGED or taken <= seen * screen_head.max_taken(self.head.dim, self.bank.dim)

    @property
    def share_taken(self) -> float:
        """The share of (query tile, block) products the searches so far took in full: the rest
        the head test ruled out (1.0 without a head pass)."""
        taken, seen = self.products_taken.tolist()
        return taken / seen if seen else 1.0

    def nearest(self, query: np.ndarray, distances: np.ndarray, indices: np.ndarray) -> int:
        """Write each query row's nearest bank row into ``distances`` / ``indices`` (rows left
        unmatched keep what they hold); returns the number of candidate pairs."""
        count = len(query)
        parts = max(1, min(torch.get_num_threads(), count // ROWS_PER_THREAD))
        team = _team()
        if parts == 1:
            found = self._run(query, distances, indices, 0, count)
        elif team is not None:
            found = self._library.fp_nearest_team(
                ctypes.byref(self.bank), query.ctypes.data, count, distances.ctypes.data, indices.ctypes.data, parts, *team
            )  # fmt: skip
        else:
            bounds = np.linspace(0, count, parts + 1).astype(np.int64)
            jobs = [_threads().submit(self._run, query, distances, indices, int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]
            found = sum(job.result() for job in jobs)
        if found < 0:
            raise MemoryError("the native screen could not allocate its scratch memory")
        return int(found)

    def _run(self, query: np.ndarray, distances: np.ndarray, indices: np.ndarray, start: int, stop: int) -> int:
        """Rows ``start:stop`` on the calling thread; -1 if scratch memory was refused."""
        return int(self._library.fp_nearest(
            ctypes.byref(self.bank), query[start:].ctypes.data, stop - start, distances[start:].ctypes.data, indices[start:].ctypes.data
        ))  # fmt: skip

"""The PatchCore memory bank: nominal patch vectors and nearest-neighbour search.

Search is exact (brute force) L2 by default, with faiss's blocked BLAS kernel (``faiss.knn``)
or, for the nearest neighbour in banks of ``SCREEN_MIN_DIM`` dims or more on CPUs with int8
dot-product instructions, the screened int8 search (below); both work directly on the bank
array (the screen adds int8 codes, a quarter of its size), so the vectors are stored once (no
second float copy inside an index).
For large banks an approximate faiss index can be chosen (``IndexSpec``: ``ivf`` = inverted
lists over k-means cells, ``hnsw`` = a navigable small-world graph); both hold a second copy
of the vectors and trade a little recall for speed, which the benchmarks measure (recall@1
and AUROC against exact search, ``benchmarks/README.md``). Returned distances are true
Euclidean distances (not squared), which is what PatchCore's scores and the coverage radius
use.

On a GPU, ``search_tensor`` runs the exact search with torch on the query's device (the bank
is copied there once), so a CUDA model never moves its patch features to the host to score
them (``benchmarks/results/search.md``).

On a CPU with int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX), 1-nearest-neighbour
search of banks at least ``SCREEN_MIN_DIM`` wide (what PatchCore's scores and the coverage
radius ask for) runs ``fedpatch.screened_search``: an exact int8 product screens the bank
with a proven error bound and float32 distances decide among the few rows it cannot rule
out. The result is the exact nearest neighbour (it agreed with float64 on every query
measured; its distances are within 3e-6 of float64's, faiss's within 1e-4 to 9e-3). On 2
threads its native kernel (AVX512-VNNI) ran at 2.0-6.2x faiss's speed and its torch form at
1.1-2.6x (``benchmarks/results/cpu_search_zen4.md``). Other searches (k > 1, narrower banks, CPUs
without those instructions) use faiss.

Threads: faiss uses OpenMP; searches run with as many threads as torch uses
(``torch.get_num_threads()``), so one knob (``torch.set_num_threads``) sizes the whole
pipeline and the two thread pools do not oversubscribe the cores.

Persistence uses safetensors: a bank file holds one tensor and a small JSON header, and
loading it never unpickles anything.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch

from fedpatch import screened_search
from fedpatch.atomic import atomic_save
from fedpatch.errors import BankValidationError, ModelFileError

BANK_FORMAT = "fedpatch-memory-bank/1"
SCREEN_MIN_DIM = 128
"""Narrower banks stay on faiss: the screened int8 search against faiss on 2 threads
(``benchmarks/results/cpu_search_zen4.md``) was 0.44x at 32 dims, 0.81-1.00x at 64, 1.42x at
128 and 1.52-1.70x at 152 (the bfloat16 screen it replaced: 0.92x, 1.11-1.12x, 1.62x and
1.35-1.46x in a run a day earlier)."""
INDEX_KINDS = ("flat", "ivf", "hnsw")
_INDEX_PARAMS = {"flat": (), "ivf": ("nlist", "nprobe"), "hnsw": ("m", "ef_search")}


@dataclass(frozen=True)
class IndexSpec:
    """How a bank is searched, written as one string (a config value saved with the model).

    - ``"flat"``: exact brute-force search (the default).
    - ``"ivf"`` / ``"ivf:nlist=1024,nprobe=16"``: faiss ``IndexIVFFlat``; ``nlist`` k-means
      cells (default ``4 * sqrt(M)``, at most ``M // 39`` so each cell gets faiss's minimum
      of 39 training points), ``nprobe`` cells visited per query (default 16).
    - ``"hnsw"`` / ``"hnsw:m=32,ef_search=128"``: faiss ``IndexHNSWFlat`` with ``m`` links per
      node (default 32) and a search beam of ``ef_search`` (default 128).
    """

    kind: str = "flat"
    nlist: int | None = None
    nprobe: int = 16
    m: int = 32
    ef_search: int = 128

    @classmethod
    def parse(cls, text: str) -> IndexSpec:
        """Parse ``kind[:key=value,...]``; errors name the offending part."""
        if not isinstance(text, str):
            raise ValueError(f"index must be a string like 'flat', 'ivf:nprobe=16' or 'hnsw:m=32', got {text!r}")
        kind, _, rest = text.strip().partition(":")
        if kind not in INDEX_KINDS:
            raise ValueError(f"index kind must be one of {', '.join(INDEX_KINDS)}, got {kind!r} (in {text!r})")
        params: dict[str, int] = {}
        for item in filter(None, (part.strip() for part in rest.split(","))):
            match = re.fullmatch(r"(\w+)=(\d+)", item)
            if not match or match.group(1) not in _INDEX_PARAMS[kind]:
                allowed = ", ".join(f"{p}=INT" for p in _INDEX_PARAMS[kind]) or "no parameters"
                raise ValueError(f"index {text!r}: bad parameter {item!r}; {kind} takes {allowed}")
            if int(match.group(2)) < 1:
                raise ValueError(f"index {text!r}: {match.group(1)} must be >= 1")
            params[match.group(1)] = int(match.group(2))
        return cls(kind, **params)

    def __str__(self) -> str:
        defaults = IndexSpec()
        parts = [f"{p}={getattr(self, p)}" for p in _INDEX_PARAMS[self.kind] if getattr(self, p) != getattr(defaults, p)]
        return self.kind + (":" + ",".join(parts) if parts else "")

    def cells(self, size: int) -> int:
        """IVF cells for a bank of ``size`` vectors."""
        wanted = self.nlist if self.nlist is not None else int(4 * math.sqrt(size))
        return max(1, min(wanted, size // 39))


def _build_faiss_index(vectors: np.ndarray, spec: IndexSpec) -> faiss.Index | None:
    """The approximate index of ``vectors`` for ``spec`` (``None`` for exact flat search)."""
    if spec.kind == "flat":
        return None
    dim = vectors.shape[1]
    faiss.omp_set_num_threads(torch.get_num_threads())
    if spec.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, spec.m)
        index.hnsw.efSearch = spec.ef_search
    else:
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, spec.cells(len(vectors)))
        index.cp.seed = 1234  # deterministic k-means: the same bank always builds the same cells
        index.train(vectors)
        index.nprobe = min(spec.nprobe, index.nlist)
    index.add(vectors)
    return index


VALIDATION_BLOCK_ROWS = 16384
"""Rows checked at a time: the check's temporary is one block's booleans (25 MB at 1536-d),
not the whole bank's (a 352,629 x 1536 bank would need 540 MB of them)."""


def _non_finite_rows(block: np.ndarray) -> int:
    finite = np.isfinite(block)
    return 0 if finite.all() else int((~finite).any(axis=1).sum())


def validate_bank_array(features: object, feature_dim: int | None, source: str = "features") -> np.ndarray:
    """Check that ``features`` is a finite 2-D float array of width ``feature_dim``; return float32.

    Raises ``BankValidationError`` naming ``source`` (a client id, a file, an argument) when the
    array has the wrong type, rank, width, dtype, is empty, or holds NaN/inf.
    """
    if not isinstance(features, np.ndarray):
        raise BankValidationError(f"{source}: expected a numpy array, got {type(features).__name__}")
    if features.ndim != 2:
        raise BankValidationError(f"{source}: expected a 2-D array [N, D], got shape {features.shape}")
    if features.dtype.kind != "f":
        raise BankValidationError(f"{source}: expected a floating-point array, got dtype {features.dtype}")
    if feature_dim is not None and features.shape[1] != feature_dim:
        raise BankValidationError(f"{source}: feature dimension {features.shape[1]} does not match {feature_dim}")
    if features.shape[0] == 0:
        raise BankValidationError(f"{source}: the array has no rows")
    array = np.ascontiguousarray(features, dtype=np.float32)
    bad = sum(_non_finite_rows(array[start : start + VALIDATION_BLOCK_ROWS]) for start in range(0, len(array), VALIDATION_BLOCK_ROWS))
    if bad:
        raise BankValidationError(f"{source}: {bad} row(s) hold NaN or infinite values")
    return array



class MemoryBank:
    """A growable set of ``feature_dim``-dimensional vectors with exact L2 search.

    Args:
        feature_dim: width of every vector.
        max_size: optional cap on the number of vectors; adding past it raises.
        index: search method (``IndexSpec`` or its string, e.g. ``"hnsw:m=32"``); exact flat
            search by default.
    """

    def __init__(self, feature_dim: int, max_size: int | None = None, index: IndexSpec | str = "flat") -> None:
        if feature_dim < 1:
            raise ValueError(f"feature_dim must be >= 1, got {feature_dim}")
        if max_size is not None and max_size < 1:
            raise ValueError(f"max_size must be >= 1 or None, got {max_size}")
        self.feature_dim = int(feature_dim)
        self.max_size = max_size
        self.index_spec = index if isinstance(index, IndexSpec) else IndexSpec.parse(index)
        self._pending: list[np.ndarray] = []
        self._vectors = np.empty((0, self.feature_dim), dtype=np.float32)
        self._index: faiss.Index | None = None
        self._device_copy: tuple[torch.Tensor, torch.Tensor] | None = None  # (vectors, squared norms)
        self._screen: screened_search.ScreenedSearch | None = None

    def __len__(self) -> int:
        return self._vectors.shape[0] + sum(p.shape[0] for p in self._pending)

    def add(self, features: np.ndarray, *, copy: bool = True, source: str = "features") -> None:
        """Append ``[n, feature_dim]`` vectors (validated: finite floats of the right width).

        ``copy=False`` lets the bank keep a float32 contiguous array itself instead of a copy
        (the caller hands it over and must not modify it): a fit's bank is then held once,
        not twice, at the end of fitting. ``source`` names the vectors in validation errors
        (a file, "memory bank"), so callers need not validate a large bank a second time.
        """
        given = np.asarray(features)
        array = validate_bank_array(given, self.feature_dim, source=source)
        if copy and np.shares_memory(array, given):
            array = array.copy()  # the bank must not alias the caller's buffer
        if self.max_size is not None and len(self) + array.shape[0] > self.max_size:
            raise BankValidationError(
                f"adding {array.shape[0]} vectors would exceed the bank's max_size {self.max_size} (now {len(self)})"
            )
        self._pending.append(array)

    def build_index(self) -> None:
        """Consolidate added vectors into one contiguous array and (re)build the approximate
        index, if any, so the bank is ready for search."""
        if not self._pending:
            return
        if self._vectors.shape[0] == 0 and len(self._pending) == 1:
            self._vectors = self._pending[0]  # no second copy of a large bank
        else:
            self._vectors = np.concatenate([self._vectors, *self._pending])
        self._pending = []
        self._index = _build_faiss_index(self._vectors, self.index_spec)
        self._device_copy = None
        self._screen = None

    @property
    def vectors(self) -> np.ndarray:
        """The bank ``[M, feature_dim]`` (float32, read-only view)."""
        self.build_index()
        view = self._vectors.view()
        view.flags.writeable = False
        return view

    def search(self, query: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """k nearest neighbours: ``(distances [M, k] float32, indices [M, k] int64)``.

        Exact for the flat index; approximate for ``ivf`` / ``hnsw`` (rows the approximate
        index cannot fill with ``k`` neighbours are searched exactly). Distances are
        Euclidean (not squared), ascending along each row. A query row holding NaN or inf
        raises ``ValueError`` (it has no nearest neighbour).
        """
        self.build_index()
        if len(self) == 0:
            raise ValueError("the memory bank is empty")
        if not 1 <= k <= len(self):
            raise ValueError(f"k must be in [1, {len(self)}], got {k}")
        query = np.ascontiguousarray(query, dtype=np.float32)
        if query.ndim != 2 or query.shape[1] != self.feature_dim:
            raise ValueError(f"query must be [M, {self.feature_dim}], got shape {query.shape}")
        if query.shape[0] == 0:
            return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
        if self._index is None and k == 1 and self.feature_dim >= SCREEN_MIN_DIM and screened_search.available():
            distances, indices = self._screened_nearest(query)
        else:
            distances, indices = self._faiss_search(query, k)
        unmatched = indices[:, 0] < 0  # both kernels leave rows with NaN or inf unmatched
        if unmatched.any():
            raise ValueError(f"query: {int(unmatched.sum())} row(s) hold NaN or infinite values (the first is row {int(np.flatnonzero(unmatched)[0])})")
        return distances, indices

    def _faiss_search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        faiss.omp_set_num_threads(torch.get_num_threads())
        if self._index is None:
            sq_dist, indices = faiss.knn(query, self._vectors, k)
        else:
            sq_dist, indices = self._index.search(query, k)
            missing = (indices < 0).any(axis=1)
            if missing.any():
                sq_dist[missing], indices[missing] = faiss.knn(query[missing], self._vectors, k)
        return np.sqrt(np.maximum(sq_dist, 0.0)), indices.astype(np.int64, copy=False)

    def _screened_nearest(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact 1-NN through ``fedpatch.screened_search``; its int8 form of the bank is built
        on first use and kept until the bank changes."""
        if self._screen is None:
            self._screen = screened_search.ScreenedSearch(self._vectors)
        distances, indices = self._screen.nearest(query)
        return distances[:, None], indices[:, None]

    def search_tensor(self, query: torch.Tensor, k: int = 1, chunk_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact k nearest neighbours of a query tensor, computed on the query's device.

        The GPU path of ``PatchCore`` (it runs on a CPU tensor too, for tests). Same result as
        ``search`` with the flat index (up to float rounding), as tensors ``(distances [M, k],
        indices [M, k])`` on the query's device. Neighbours are chosen on the expanded squared
        distances; the returned distances are recomputed from the differences (no
        cancellation: a bank member's own distance is 0). The distance matrix is built
        ``chunk_rows`` queries at a time, bounding its memory.
        """
        self.build_index()
        if not 1 <= k <= len(self):
            raise ValueError(f"k must be in [1, {len(self)}], got {k}")
        if query.ndim != 2 or query.shape[1] != self.feature_dim:
            raise ValueError(f"query must be [M, {self.feature_dim}], got shape {tuple(query.shape)}")
        if self._device_copy is None or self._device_copy[0].device != query.device:
            vectors = torch.from_numpy(self._vectors).to(query.device)
            self._device_copy = (vectors, (vectors * vectors).sum(dim=1))
        vectors, sq_norms = self._device_copy
        query = query.float()
        if query.shape[0] == 0:
            return torch.empty(0, k, device=query.device), torch.empty(0, k, dtype=torch.int64, device=query.device)
        distances, indices = [], []
        for part in query.split(chunk_rows):
            # |x|^2 - 2 q.x: the query's own |q|^2 shifts a whole row, so the order needs none
            sq = torch.addmm(sq_norms.unsqueeze(0), part, vectors.T, alpha=-2.0)
            nearest = sq.topk(k, dim=1, largest=False).indices if k > 1 else sq.argmin(dim=1, keepdim=True)
            # that expansion cancels badly for near neighbours of large vectors: the chosen
            # neighbours' distances are computed from the differences
            diff = vectors[nearest.reshape(-1)].view(part.shape[0], k, -1)
            values = torch.linalg.vector_norm(diff.sub_(part.unsqueeze(1)), dim=2)
            if k > 1:
                values, order = values.sort(dim=1)
                nearest = nearest.gather(1, order)
            distances.append(values)
            indices.append(nearest)
        return torch.cat(distances), torch.cat(indices)

    def save(self, path: str | Path) -> None:
        """Write the bank as a safetensors file (atomically: temp file, then rename)."""
        from safetensors.numpy import save_file

        meta = {
            "format": BANK_FORMAT,
            "feature_dim": str(self.feature_dim),
            "max_size": json.dumps(self.max_size),
            "index": str(self.index_spec),
        }
        tensors = {"vectors": np.ascontiguousarray(self.vectors)}
        atomic_save(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> MemoryBank:
        """Read a bank written by ``save``; never unpickles. Errors name the file."""
        from safetensors import safe_open

        file = Path(path)
        try:
            with safe_open(str(file), framework="numpy") as handle:
                meta = handle.metadata() or {}
                vectors = handle.get_tensor("vectors")
        except FileNotFoundError:
            raise ModelFileError(f"memory bank file not found: {file}") from None
        except Exception as exc:  # noqa: BLE001 - any parse failure is the same user error
            raise ModelFileError(f"{file} is not a fedpatch memory bank file: {exc}") from exc
        if meta.get("format") != BANK_FORMAT:
            raise ModelFileError(f"{file}: unexpected format {meta.get('format')!r}, expected {BANK_FORMAT!r}")
        try:
            index = IndexSpec.parse(meta.get("index", "flat"))
        except ValueError as exc:
            raise ModelFileError(f"{file}: header field 'index': {exc}") from None
        bank = cls(int(meta["feature_dim"]), json.loads(meta.get("max_size", "null")), index=index)
        bank.add(vectors, copy=False, source=str(file))  # the loaded array is ours alone
        bank.build_index()
        return bank

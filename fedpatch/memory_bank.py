"""The PatchCore memory bank: nominal patch vectors and exact nearest-neighbour search.

Search is exact (brute force) L2 with faiss's blocked BLAS kernel (``faiss.knn``), which works
directly on the bank array, so the vectors are stored once (no second copy inside an index).
Returned distances are true Euclidean distances (square roots of faiss's squared distances,
clamped at 0 against rounding), which is what PatchCore's scores and the coverage radius use.

Persistence uses safetensors: a bank file holds one tensor and a small JSON header, and
loading it never unpickles anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np

from fedpatch.errors import BankValidationError, ModelFileError

BANK_FORMAT = "fedpatch-memory-bank/1"


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
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).any(axis=1).sum())
        raise BankValidationError(f"{source}: {bad} row(s) hold NaN or infinite values")
    return array


class MemoryBank:
    """A growable set of ``feature_dim``-dimensional vectors with exact L2 search.

    Args:
        feature_dim: width of every vector.
        max_size: optional cap on the number of vectors; adding past it raises.
    """

    def __init__(self, feature_dim: int, max_size: int | None = None) -> None:
        if feature_dim < 1:
            raise ValueError(f"feature_dim must be >= 1, got {feature_dim}")
        if max_size is not None and max_size < 1:
            raise ValueError(f"max_size must be >= 1 or None, got {max_size}")
        self.feature_dim = int(feature_dim)
        self.max_size = max_size
        self._pending: list[np.ndarray] = []
        self._vectors = np.empty((0, self.feature_dim), dtype=np.float32)

    def __len__(self) -> int:
        return self._vectors.shape[0] + sum(p.shape[0] for p in self._pending)

    def add(self, features: np.ndarray) -> None:
        """Append ``[n, feature_dim]`` vectors (validated: finite floats of the right width)."""
        source = np.asarray(features)
        array = validate_bank_array(source, self.feature_dim)
        if np.shares_memory(array, source):
            array = array.copy()  # the bank must not alias the caller's buffer
        if self.max_size is not None and len(self) + array.shape[0] > self.max_size:
            raise BankValidationError(
                f"adding {array.shape[0]} vectors would exceed the bank's max_size {self.max_size} (now {len(self)})"
            )
        self._pending.append(array)

    def build_index(self) -> None:
        """Consolidate added vectors into one contiguous array ready for search."""
        if not self._pending:
            return
        if self._vectors.shape[0] == 0 and len(self._pending) == 1:
            self._vectors = self._pending[0]  # no second copy of a large bank
        else:
            self._vectors = np.concatenate([self._vectors, *self._pending])
        self._pending = []

    @property
    def vectors(self) -> np.ndarray:
        """The bank ``[M, feature_dim]`` (float32, read-only view)."""
        self.build_index()
        view = self._vectors.view()
        view.flags.writeable = False
        return view

    def search(self, query: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Exact k nearest neighbours: ``(distances [M, k] float32, indices [M, k] int64)``.

        Distances are Euclidean (not squared), ascending along each row.
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
        sq_dist, indices = faiss.knn(query, self._vectors, k)
        return np.sqrt(np.maximum(sq_dist, 0.0)), indices.astype(np.int64, copy=False)

    def save(self, path: str | Path) -> None:
        """Write the bank as a safetensors file (atomically: temp file, then rename)."""
        from safetensors.numpy import save_file

        target = Path(path)
        tmp = target.with_name(target.name + ".tmp")
        meta = {"format": BANK_FORMAT, "feature_dim": str(self.feature_dim), "max_size": json.dumps(self.max_size)}
        save_file({"vectors": np.ascontiguousarray(self.vectors)}, str(tmp), metadata=meta)
        tmp.replace(target)

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
        bank = cls(int(meta["feature_dim"]), json.loads(meta.get("max_size", "null")))
        bank.add(validate_bank_array(vectors, bank.feature_dim, source=str(file)))
        bank.build_index()
        return bank

"""How several client memory banks become one global bank (the server's job, testable alone).

Rule: the global bank is a greedy k-center coreset of the *union* of the validated client
banks. Every client row enters the union once; nothing is weighted (a client with more images
sends a bigger bank, since each client keeps ``coreset_percentage`` of its own patches, and the
greedy pass keeps whatever rows cover the union best, whoever sent them). The size is
``ceil(global_ratio * union)`` or ``global_size`` (capped at the union); a ratio of 1.0 returns
the union unchanged, in client order. Clients are concatenated in the order of their ids so the
result does not depend on reply arrival order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedpatch.coreset import coreset_size, greedy_coreset_selection
from fedpatch.errors import BankValidationError
from fedpatch.memory_bank import validate_bank_array


@dataclass(frozen=True)
class AggregationResult:
    """The global bank and how it was made."""

    bank: np.ndarray
    union_size: int
    contributions: dict[str, int]  # rows each client sent


def global_bank_size(union_size: int, global_ratio: float, global_size: int | None) -> int:
    """Rows of the global bank: ``global_size`` (capped at the union) or ``ceil(ratio * union)``."""
    if global_size is not None:
        return max(1, min(union_size, global_size))
    return coreset_size(union_size, global_ratio)


def validate_client_bank(
    bank: np.ndarray, feature_dim: int, client: str, patches_seen: int | None = None, max_rows: int | None = None
) -> np.ndarray:
    """Check a received bank: shape, dtype, finiteness, and plausible size; return float32.

    A bank with more rows than the patches the client says it saw, or than ``max_rows``, is
    rejected: it cannot be an honest coreset. Errors name the client.
    """
    array = validate_bank_array(bank, feature_dim, source=f"client {client}")
    if patches_seen is not None and array.shape[0] > patches_seen:
        raise BankValidationError(f"client {client}: bank of {array.shape[0]} rows exceeds its {patches_seen} patches")
    if max_rows is not None and array.shape[0] > max_rows:
        raise BankValidationError(f"client {client}: bank of {array.shape[0]} rows exceeds the cap of {max_rows}")
    return array


def aggregate_banks(
    banks: Mapping[str, np.ndarray],
    global_ratio: float = 1.0,
    global_size: int | None = None,
    seed: int = 42,
    projection_dim: int | None = 128,
) -> AggregationResult:
    """Concatenate client banks (sorted by client id) and reduce them with a greedy coreset."""
    if not banks:
        raise ValueError("no client banks to aggregate")
    if not 0.0 < global_ratio <= 1.0:
        raise ValueError(f"global_ratio must be in (0, 1], got {global_ratio}")
    order = sorted(banks)
    dims = {banks[c].shape[1] for c in order}
    if len(dims) != 1:
        raise BankValidationError(f"client banks disagree on the feature dimension: {sorted(dims)}")
    union = np.concatenate([np.asarray(banks[c], dtype=np.float32) for c in order]) if len(order) > 1 else np.asarray(banks[order[0]], dtype=np.float32)
    target = global_bank_size(union.shape[0], global_ratio, global_size)
    bank = union if target == union.shape[0] else greedy_coreset_selection(union, target, seed=seed, projection_dim=projection_dim)
    return AggregationResult(bank=bank, union_size=int(union.shape[0]), contributions={c: int(banks[c].shape[0]) for c in order})

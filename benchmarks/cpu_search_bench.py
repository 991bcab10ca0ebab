"""Exact bank search on the CPU: faiss's float32 kernel vs the split-bf16 torch path.

    python -m benchmarks.cpu_search_bench --out benchmarks/results

``MemoryBank.search`` (flat index) runs on torch with oneDNN's bf16 math mode where the CPU
has bf16 instructions (``fedpatch.memory_bank``), else on ``faiss.knn``. This times both on
the same banks and queries (2 threads, interleaved repeats, medians) and measures what the
path changes: the share of queries whose nearest neighbour differs from faiss's, and each
path's largest distance error against a float64 reference. Data: non-negative features with
a common offset (like CNN activations after ReLU) and queries near bank rows.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from fedpatch.memory_bank import SPLIT_BF16_MIN_DIM, MemoryBank, split_bf16_matmul_available

CASES = [  # (feature dim, bank rows, queries): lite0, resnet18 and WRN-50-2 widths
    (152, 2_351, 23_500),
    (384, 2_351, 23_500),
    (1536, 2_351, 23_500),
    (1536, 23_500, 11_750),
]


def _data(dim: int, rows: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    bank = np.maximum(rng.standard_normal((rows, dim), dtype=np.float32), 0) + 0.5
    near = bank[rng.integers(rows, size=queries)]
    return bank, (near + 0.3 * rng.standard_normal(near.shape, dtype=np.float32)).astype(np.float32)


def _reference(bank: np.ndarray, queries: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """float64 distances from each query to the bank row it was matched with."""
    return np.linalg.norm(queries.astype(np.float64) - bank[indices].astype(np.float64), axis=1)


def run(repeats: int) -> list[dict[str, float | int]]:
    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)
    rows: list[dict[str, float | int]] = []
    for dim, size, count in CASES:
        vectors, queries = _data(dim, size, count)
        bank = MemoryBank(dim)
        bank.add(vectors)
        bank.build_index()
        times: dict[str, list[float]] = {"faiss": [], "fedpatch": []}
        for _ in range(repeats):  # interleaved, so both see the same machine state
            start = time.perf_counter()
            faiss_sq, faiss_idx = faiss.knn(queries, vectors, 1)
            times["faiss"].append(time.perf_counter() - start)
            start = time.perf_counter()
            ours, our_idx = bank.search(queries, k=1)
            times["fedpatch"].append(time.perf_counter() - start)
        faiss_d = np.sqrt(np.maximum(faiss_sq[:, 0], 0.0))
        faiss_s, ours_s = statistics.median(times["faiss"]), statistics.median(times["fedpatch"])
        path = "split-bf16 torch" if dim >= SPLIT_BF16_MIN_DIM and split_bf16_matmul_available() else "faiss"
        rows.append({
            "dim": dim, "bank_rows": size, "queries": count, "fedpatch_path": path,
            "faiss_s": faiss_s, "fedpatch_s": ours_s, "speedup": faiss_s / ours_s,
            "same_nearest": float(np.mean(faiss_idx[:, 0] == our_idx[:, 0])),
            "faiss_max_abs_err": float(np.max(np.abs(faiss_d - _reference(vectors, queries, faiss_idx[:, 0])))),
            "fedpatch_max_abs_err": float(np.max(np.abs(ours[:, 0] - _reference(vectors, queries, our_idx[:, 0])))),
            "median_distance": float(np.median(faiss_d)),
        })  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rows = run(args.repeats)
    from benchmarks.run import write_rows

    caption = (f"Command: `python -m benchmarks.cpu_search_bench`; 2 threads; `fedpatch_path` is the kernel MemoryBank.search "
               f"used (faiss below {SPLIT_BF16_MIN_DIM} dims or without bf16 instructions); seconds are medians of "
               f"{args.repeats} interleaved repeats; errors are against float64 distances.")  # fmt: skip
    write_rows(args.out, "cpu_search", "exact bank search on the CPU: faiss float32 vs MemoryBank.search", caption, rows,
               bf16_instructions=split_bf16_matmul_available())  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

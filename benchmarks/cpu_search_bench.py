"""Exact bank search on the CPU: faiss's float32 kernel vs the split-bf16 torch path.

    python -m benchmarks.cpu_search_bench --out benchmarks/results

``MemoryBank.search`` (flat index) runs ``MemoryBank.search_tensor`` with oneDNN's bf16 math
mode on banks of at least ``SPLIT_BF16_MIN_DIM`` dims where the CPU has bf16 instructions
(``fedpatch.memory_bank``), else ``faiss.knn``. This times both kernels on every case (2
threads, interleaved repeats, medians), narrower banks included, which is where the dimension
threshold comes from, and measures what the torch path changes: the share of queries whose
nearest neighbour differs from faiss's, and each kernel's largest distance error against a
float64 reference. Data: non-negative features with a common offset (like CNN activations
after ReLU) and queries near bank rows.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from fedpatch.memory_bank import SPLIT_BF16_MIN_DIM, MemoryBank, split_bf16_matmul, split_bf16_matmul_available

CASES = [  # (feature dim, bank rows, queries): narrow banks, lite0 (152), resnet18 (384), WRN-50-2 (1536)
    (32, 2_351, 23_500),
    (64, 500, 8_192),
    (64, 2_351, 23_500),
    (128, 2_351, 23_500),
    (152, 2_049, 8_192),  # one batch of 8 lite0 images at 256x256 against a 20-image bank
    (152, 2_351, 23_500),
    (152, 7_171, 8_192),
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


def run(repeats: int) -> list[dict[str, float | int | str]]:
    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)
    split = split_bf16_matmul_available()
    rows: list[dict[str, float | int | str]] = []
    for dim, size, count in CASES:
        vectors, queries = _data(dim, size, count)
        bank = MemoryBank(dim)
        bank.add(vectors)
        bank.build_index()
        query_tensor = torch.from_numpy(queries)
        times: dict[str, list[float]] = {"faiss": [], "torch": []}
        for _ in range(repeats):  # interleaved, so both see the same machine state
            start = time.perf_counter()
            faiss_sq, faiss_idx = faiss.knn(queries, vectors, 1)
            times["faiss"].append(time.perf_counter() - start)
            start = time.perf_counter()
            with split_bf16_matmul():
                ours, our_idx = bank.search_tensor(query_tensor, k=1)
            times["torch"].append(time.perf_counter() - start)
        faiss_d = np.sqrt(np.maximum(faiss_sq[:, 0], 0.0))
        ours_np, our_idx_np = ours[:, 0].numpy(), our_idx[:, 0].numpy()
        faiss_s, torch_s = statistics.median(times["faiss"]), statistics.median(times["torch"])
        rows.append({
            "dim": dim, "bank_rows": size, "queries": count, "faiss_s": faiss_s,
            "torch_split_bf16_s": torch_s, "torch_speedup": faiss_s / torch_s,
            "search_uses": "torch" if dim >= SPLIT_BF16_MIN_DIM and split else "faiss",
            "same_nearest": float(np.mean(faiss_idx[:, 0] == our_idx_np)),
            "faiss_max_abs_err": float(np.max(np.abs(faiss_d - _reference(vectors, queries, faiss_idx[:, 0])))),
            "torch_max_abs_err": float(np.max(np.abs(ours_np - _reference(vectors, queries, our_idx_np)))),
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

    caption = (f"Command: `python -m benchmarks.cpu_search_bench`; 2 threads; both kernels timed on every case; "
               f"`search_uses` is the kernel MemoryBank.search picks (faiss below {SPLIT_BF16_MIN_DIM} dims or without "
               f"bf16 instructions); seconds are medians of {args.repeats} interleaved repeats; errors are against "
               f"float64 distances.")  # fmt: skip
    write_rows(args.out, "cpu_search", "exact bank search on the CPU: faiss float32 vs the split-bf16 torch path", caption, rows,
               bf16_instructions=split_bf16_matmul_available())  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

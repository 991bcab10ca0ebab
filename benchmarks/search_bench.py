"""Exact nearest-neighbour search on large banks: faiss on the CPU vs torch on a GPU.

    python -m benchmarks.search_bench --out benchmarks/results

One test image at 1000x750 gives 11,750 query patches (a 125 x 94 grid); a bank of 10 % of
the patches of ``n`` such training images holds ``1,175 n`` vectors. With WideResNet-50-2's
1536-d features, exact search costs ``2 * 11,750 * 1,175 n * 1536`` flops per image: at
200 training images that is 8.5 TFLOP, far more than the backbone forward (~0.3 TFLOP).
This measures faiss's flat kernel (``faiss.knn``, 2 CPU threads) against
``MemoryBank.search_tensor`` (torch, the GPU path of ``PatchCore.predict``) on the same bank
and queries, and checks that both return the same neighbours.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from fedpatch.memory_bank import MemoryBank

QUERIES = 11_750
DIM = 1536


def _data(bank_rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A bank and queries that lie near bank rows (so the nearest neighbour is well defined)."""
    rng = np.random.default_rng(seed)
    bank = rng.standard_normal((bank_rows, DIM), dtype=np.float32)
    picks = rng.integers(bank_rows, size=QUERIES)
    queries = bank[picks] + 0.3 * rng.standard_normal((QUERIES, DIM), dtype=np.float32)
    return bank, queries


def _time_cpu(bank: MemoryBank, queries: np.ndarray, repeats: int) -> tuple[float, np.ndarray, np.ndarray]:
    """faiss's float32 kernel itself (``MemoryBank.search`` may take the screened int8 search
    on CPUs with int8 dot-product instructions: ``benchmarks/cpu_search_bench.py`` compares the two)."""
    faiss.omp_set_num_threads(torch.get_num_threads())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sq_dist, indices = faiss.knn(queries, bank.vectors, 1)
        times.append(time.perf_counter() - start)
    return statistics.median(times), np.sqrt(np.maximum(sq_dist, 0.0)), indices


def _time_gpu(bank: MemoryBank, queries: np.ndarray, repeats: int) -> tuple[float, np.ndarray, np.ndarray]:
    query = torch.from_numpy(queries).cuda()
    bank.search_tensor(query, k=1)  # warm-up: copies the bank to the GPU once
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        distances, indices = bank.search_tensor(query, k=1)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), distances.cpu().numpy(), indices.cpu().numpy()


def run(bank_sizes: list[int], cpu_max_rows: int) -> list[dict[str, float | int | None]]:
    torch.set_num_threads(2)
    rows: list[dict[str, float | int | None]] = []
    for size in bank_sizes:
        vectors, queries = _data(size)
        bank = MemoryBank(DIM)
        bank.add(vectors)
        bank.build_index()
        flops = 2.0 * QUERIES * size * DIM
        row: dict[str, float | int | None] = {"bank_rows": size, "training_images_at_10pct": size // 1175, "tflop_per_image": flops / 1e12}
        cpu = _time_cpu(bank, queries, repeats=1) if size <= cpu_max_rows else None
        gpu = _time_gpu(bank, queries, repeats=5) if torch.cuda.is_available() else None
        row["cpu_faiss_s"] = cpu[0] if cpu else None
        row["gpu_torch_s"] = gpu[0] if gpu else None
        row["gpu_tflops"] = flops / gpu[0] / 1e12 if gpu else None
        row["speedup"] = cpu[0] / gpu[0] if cpu and gpu else None
        if cpu and gpu:
            row["same_nearest"] = float(np.mean(cpu[2][:, 0] == gpu[2][:, 0]))
            row["max_rel_distance_diff"] = float(np.max(np.abs(cpu[1] - gpu[1]) / np.maximum(cpu[1], 1e-6)))
        rows.append(row)
        print(row, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--bank-sizes", type=int, nargs="+", default=[23_500, 117_500, 235_000])
    parser.add_argument("--cpu-max-rows", type=int, default=117_500, help="skip the (slow) CPU search above this bank size")
    args = parser.parse_args(argv)
    rows = run(args.bank_sizes, args.cpu_max_rows)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    from benchmarks.run import write_rows

    caption = (f"Command: `python -m benchmarks.search_bench`; GPU: {device}; {QUERIES:,} queries (one 1000x750 image), "
               f"{DIM}-d; times are medians, seconds per image.")  # fmt: skip
    write_rows(args.out, "search", "exact bank search: faiss (2 CPU threads) vs torch on the GPU", caption, rows, device=device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

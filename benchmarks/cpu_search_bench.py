"""Exact bank search on the CPU: faiss's float32 kernel vs the screened int8 search, torch and native.

    python -m benchmarks.cpu_search_bench --out benchmarks/results

``MemoryBank.search`` (flat index, k = 1) runs ``fedpatch.screened_search`` on banks of at
least ``SCREEN_MIN_DIM`` dims where the CPU has int8 dot-product instructions (VNNI or AMX), else
``faiss.knn``.
This times faiss, the torch screen and the native one (``fedpatch.native_screen``, where the
CPU runs it) on every case (2 threads, interleaved repeats, medians), narrower banks
included, which is where the dimension threshold comes from, and measures what the screen
does: candidates per query (rows whose float32 distance it computes), and for each kernel the
share of queries whose neighbour is a nearest one by float64 arithmetic and the largest
distance error, on up to ``REFERENCE_QUERIES`` queries.

Two kinds of data: non-negative rows with a common offset (like CNN activations after ReLU)
and queries near bank rows, at the sizes of the cases below; and real patch features
(``FEATURE_CASES``): a bank fitted as in the main suite (``benchmarks.run``) and the patches of
two test images, efficientnet_lite0 with its weights and wide_resnet50_2 with random ones.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as ``import fedpatch`` sets it, before faiss and torch load their OpenMP
import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from fedpatch import native_screen, screened_search  # noqa: E402
from fedpatch.memory_bank import SCREEN_MIN_DIM  # noqa: E402

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
FEATURE_CASES = [  # (data, backbone, pretrained, (W, H), training images): main-suite configurations
    ("magnetic", "efficientnet_lite0", True, (256, 256), 20),
    ("synthetic", "efficientnet_lite0", True, (1000, 750), 2),
    ("synthetic", "wide_resnet50_2", False, (400, 400), 5),
    ("synthetic", "wide_resnet50_2", False, (1000, 750), 2),
]
REFERENCE_QUERIES = 2_000


def _data(dim: int, rows: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    bank = np.maximum(rng.standard_normal((rows, dim), dtype=np.float32), 0) + 0.5
    near = bank[rng.integers(rows, size=queries)]
    return bank, (near + 0.3 * rng.standard_normal(near.shape, dtype=np.float32)).astype(np.float32)


def _features(name: str, backbone: str, pretrained: bool, size: tuple[int, int], n_train: int) -> tuple[np.ndarray, np.ndarray]:
    """A fitted bank and the patch features of two test images."""
    from benchmarks import data as bench_data
    from fedpatch import PatchCore
    from fedpatch.features import extract_patch_features
    from fedpatch.patchcore import iter_image_batches

    bench = bench_data.load(name, size, n_train)
    model = PatchCore(backbone, pretrained=pretrained, device="cpu").fit(bench.train_images())
    with torch.no_grad():
        parts = [extract_patch_features(model.embed(batch)).float().numpy() for batch in iter_image_batches(bench.test_images()[:2], 2)]
    return model.get_memory_bank(), np.concatenate(parts)


def _float64_check(bank: np.ndarray, queries: np.ndarray, indices: np.ndarray, distances: np.ndarray) -> tuple[float, float]:
    """(share of queries whose neighbour is a float64 nearest one, largest distance error)."""
    sample = np.linspace(0, len(queries) - 1, min(len(queries), REFERENCE_QUERIES)).astype(int)
    q, b = torch.from_numpy(queries[sample]).double(), torch.from_numpy(bank).double()
    squared = (q * q).sum(1, keepdim=True) + (b * b).sum(1) - 2 * q @ b.T  # float64: rounding ~1e-13
    best = squared.min(dim=1).values
    chosen = squared[torch.arange(len(sample)), torch.from_numpy(indices[sample])]
    scale = (q * q).sum(1) + (b * b).sum(1).max()
    nearest = (chosen - best <= 1e-11 * scale).double().mean()
    exact = np.linalg.norm(queries[sample].astype(np.float64) - bank[indices[sample]].astype(np.float64), axis=1)
    return float(nearest), float(np.max(np.abs(distances[sample] - exact)))


def _case(label: str, vectors: np.ndarray, queries: np.ndarray, repeats: int, screen: bool) -> dict[str, float | int | str]:
    """faiss, the torch screen and (where it runs) the native screen on one case, interleaved."""
    searches = {}
    if screen and screened_search.int8_product_exact():
        searches["screened"] = screened_search.ScreenedSearch(vectors, native=False)
    if native_screen.available():
        searches["native"] = screened_search.ScreenedSearch(vectors, native=True)
    times: dict[str, list[float]] = {name: [] for name in ("faiss", *searches)}
    answers: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for _ in range(repeats):  # interleaved, so all see the same machine state
        start = time.perf_counter()
        faiss_sq, faiss_idx = faiss.knn(queries, vectors, 1)
        times["faiss"].append(time.perf_counter() - start)
        for name, search in searches.items():
            start = time.perf_counter()
            answers[name] = search.nearest(queries)
            times[name].append(time.perf_counter() - start)
    faiss_d = np.sqrt(np.maximum(faiss_sq[:, 0], 0.0))
    faiss_s = statistics.median(times["faiss"])
    uses = "faiss"
    if vectors.shape[1] >= SCREEN_MIN_DIM and screen:
        uses = "native" if "native" in searches else "screened"
    row: dict[str, float | int | str] = {
        "data": label, "dim": vectors.shape[1], "bank_rows": len(vectors), "queries": len(queries), "faiss_s": faiss_s, "search_uses": uses,
    }  # fmt: skip
    for name, search in searches.items():
        seconds = statistics.median(times[name])
        row.update({f"{name}_s": seconds, f"{name}_speedup": faiss_s / seconds, f"{name}_candidates_per_query": search.candidates / (repeats * len(queries))})
    if "screened" in searches and "native" in searches:
        row["native_vs_screened"] = row["screened_s"] / row["native_s"]  # type: ignore[operator]
        row["same_neighbours"] = int(np.array_equal(answers["screened"][1], answers["native"][1]))
    if "native" in searches and searches["native"].native is not None:
        row["native_products_taken"] = searches["native"].native.share_taken
    checks = {"faiss": _float64_check(vectors, queries, faiss_idx[:, 0], faiss_d)}
    for name, (distances, indices) in answers.items():
        checks[name] = _float64_check(vectors, queries, indices, distances)
    row.update({f"{kernel}_f64_nearest": nearest for kernel, (nearest, _) in checks.items()})
    row.update({f"{kernel}_max_abs_err": error for kernel, (_, error) in checks.items()})
    row["median_distance"] = float(np.median(faiss_d))
    print(row, flush=True)
    return row


def machine() -> str:
    """The CPU's model name and its int8 and bfloat16 instruction sets, from /proc/cpuinfo."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "unknown CPU")
    flags = sorted({flag for flag in text.split() if flag in ("avx2", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16", "amx_bf16")})
    return f"{model} ({', '.join(flags) or 'no avx2/vnni/bf16 flags'}), {torch.get_num_threads()} threads"


def run(repeats: int) -> list[dict[str, float | int | str]]:
    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)
    screen = screened_search.available()
    rows = [_case("relu+offset", *_data(dim, size, count), repeats, screen) for dim, size, count in CASES]
    for name, backbone, pretrained, size, n_train in FEATURE_CASES:
        label = f"{backbone}{'' if pretrained else ' (random)'} {name} {size[0]}x{size[1]} n={n_train}"
        rows.append(_case(label, *_features(name, backbone, pretrained, size, n_train), repeats, screen))
        torch.set_num_threads(2)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--name", default="cpu_search", help="file name of the tables (one per machine)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    rows = run(args.repeats)
    from benchmarks.run import write_rows

    caption = (f"Command: `python -m benchmarks.cpu_search_bench --name {args.name}` on {machine()}; every kernel timed on every "
               f"case (`screened`: the torch screen, `native`: the C kernel); `search_uses` is the kernel MemoryBank.search picks for "
               f"k = 1 (faiss below {SCREEN_MIN_DIM} dims or without int8 dot-product instructions); `native_vs_screened` is the "
               f"torch screen's time over the native one's, `same_neighbours` whether they returned the same rows, "
               f"`native_products_taken` the share of (query tile, block) int8 products the native screen took in full (1 where "
               f"the bank gets no head test: fedpatch.screen_head); seconds are medians of {args.repeats} interleaved repeats; `*_f64_nearest` is "
               f"the share of (up to {REFERENCE_QUERIES}) queries whose neighbour is a nearest one by float64 arithmetic, "
               f"errors are against float64 distances.")  # fmt: skip
    write_rows(args.out, args.name, "exact bank search on the CPU: faiss float32 vs the screened int8 search", caption, rows,
               int8_screen=screened_search.available())  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

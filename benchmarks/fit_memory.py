"""Peak fit memory at full AutoVI scale: 300 images of 1000x750 through ``PatchCore.fit`` with
WideResNet-50-2's feature shape (1536-d on the 94x125 stride-8 grid, 3.5 M patches).

A WideResNet forward pass at 1000x750 takes seconds per image on 2 CPU cores, so this benchmark
replaces the backbone's *output* with seeded random features of exactly its shape and dtype:
everything after the backbone (patch extraction, streaming coreset, bank allocation, index)
runs for real at full scale, and the WideResNet weights stay loaded. The backbone's own
activation memory is bounded per pass (one 1000x750 image per pass) and is measured with real
images by ``benchmarks.run --suite scaling``; the two add up to the fit's peak.

Each setting runs in its own process (peak RSS from ``ru_maxrss``), side by side:
``sized`` (the default: ``fit`` knows the image count and sizes the bank once) against
``unsized`` (an iterable without ``len``: the bank array grows by doubling), then ``real``: the
whole fit with the real (randomly initialised) WideResNet on random-noise images, end to end.
``--curve`` runs only ``real``, once per image count, and writes the curve of peak memory and
fit time against the count (``fit_memory_curve.md`` and ``.png`` beside ``--out``).

    python -m benchmarks.fit_memory [--images 300] [--out benchmarks/results/fit_memory.md]
    python -m benchmarks.fit_memory --curve 25 50 100 200 300
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

HEIGHT, WIDTH, GRID, DIM = 750, 1000, (94, 125), 1536


def worker(images: int, sized: bool, real_backbone: bool = False) -> dict[str, float]:
    """Fit on ``images`` placeholder images with WRN-shaped random features (or, with
    ``real_backbone``, random-noise images through the real, randomly initialised WRN); report peak RSS."""
    import resource

    import torch

    from fedpatch import PatchCore

    torch.set_num_threads(2)
    model = PatchCore("wide_resnet50_2", pretrained=False, device="cpu", seed=0, progress=True)
    generator = torch.Generator().manual_seed(0)
    if not real_backbone:
        model.embed = lambda batch: torch.rand((batch.shape[0], DIM, *GRID), generator=generator)  # type: ignore[method-assign]

    def image() -> torch.Tensor:
        return torch.randint(0, 256, (3, HEIGHT, WIDTH), dtype=torch.uint8, generator=generator)

    class Images:
        """``images`` random images, one tensor alive at a time."""

        def __iter__(self) -> Iterator[torch.Tensor]:
            return (image() for _ in range(images))

    class SizedImages(Images):
        def __len__(self) -> int:
            return images

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    start = time.perf_counter()
    model.fit(SizedImages() if sized else Images())
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    bank_mb = model.memory_bank.vectors.nbytes / 2**20
    return {"images": images, "sized": sized, "backbone": "real" if real_backbone else "stub", "patches": model.fit_stats.patches_seen, "bank_rows": model.fit_stats.bank_size,
            "bank_mb": bank_mb, "peak_mb": peak, "before_fit_mb": before, "fit_s": seconds, "extract_s": model.fit_stats.extract_seconds,
            "coreset_s": model.fit_stats.coreset_seconds}


def run_worker(images: int, mode: str) -> dict[str, float]:
    """One ``worker`` in a fresh process (its own peak RSS); its result."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.fit_memory", "--images", str(images), "--worker", mode],
                          check=True, capture_output=True, text=True)
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    print(result, flush=True)
    return result


def write_curve(rows: list[dict[str, float]], out: Path) -> None:
    """The real fits at several image counts: a Markdown table at ``out`` and its plot beside it
    (``out`` with the suffix ``.png``): peak RSS and bank size, and fit, extraction and coreset
    time, against the count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["images"])
    lines = [
        "# fit memory and time against training images (real WRN-50-2, 1000x750)", "",
        f"Command: `python -m benchmarks.fit_memory --curve {' '.join(str(int(r['images'])) for r in rows)}`. One process per "
        "count: the real (randomly initialised) WideResNet-50-2 on random-noise images, the bank sized once; peak RSS of the "
        "process (`ru_maxrss`). 'peak - bank' is what the fit holds besides its output.", "",
        "| images | patches | bank rows | bank MiB | peak RSS MiB | peak - bank MiB | fit s | extraction s | coreset s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['images']} | {r['patches']:,} | {r['bank_rows']:,} | {r['bank_mb']:,.0f} | {r['peak_mb']:,.0f} | "
                     f"{r['peak_mb'] - r['bank_mb']:,.0f} | {r['fit_s']:.0f} | {r['extract_s']:.0f} | {r['coreset_s']:.0f} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    counts = [r["images"] for r in rows]
    fig, (memory, times) = plt.subplots(1, 2, figsize=(10, 3.8))
    memory.plot(counts, [r["peak_mb"] / 1024 for r in rows], marker="o", label="peak RSS")
    memory.plot(counts, [r["bank_mb"] / 1024 for r in rows], marker="s", label="bank (the output)")
    memory.plot(counts, [(r["peak_mb"] - r["bank_mb"]) / 1024 for r in rows], marker="^", label="peak - bank")
    memory.axhline(4e9 / 2**30, color="grey", linestyle=":", label="4 GB")
    memory.set_title("memory (GiB)")
    for key, label in (("fit_s", "fit"), ("extract_s", "feature extraction"), ("coreset_s", "coreset")):
        times.plot(counts, [r[key] for r in rows], marker="o", label=label)
    times.set_title("time (s), 2 CPU threads")
    for ax in (memory, times):
        ax.set_xlabel("training images (1000x750)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("fedpatch fit, wide_resnet50_2 (random weights), layers 2+3, coreset 10 %")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=80)
    plt.close(fig)
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fit_memory.md"))
    parser.add_argument("--curve", type=int, nargs="+", metavar="IMAGES", help="real fits at these image counts only")
    parser.add_argument("--worker", choices=["sized", "unsized", "real"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.images, args.worker != "unsized", real_backbone=args.worker == "real")))
        return
    if args.curve:
        write_curve([run_worker(images, "real") for images in args.curve], args.out.with_name("fit_memory_curve.md"))
        return
    rows = [run_worker(args.images, mode) for mode in ("sized", "unsized", "real")]
    lines = [
        "# fit memory at full scale (WRN-50-2 feature shape, 1000x750)", "",
        f"Command: `python -m benchmarks.fit_memory --images {args.images}`. First two rows: backbone output replaced by random "
        "features of its exact shape (see the module docstring); last row: the real backbone. Peak RSS per process.", "",
        "| run | images | patches | bank rows | bank MiB | peak RSS MiB | RSS before fit MiB | fit s | coreset s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        label = "sized once (`len(data)` known, default)" if r["sized"] else "grown by doubling (no `len`)"
        if r["backbone"] == "real":
            label = "real WRN-50-2 pass on random-noise images, sized once"
        lines.append(f"| {label} | {r['images']} | {r['patches']:,} | {r['bank_rows']:,} | {r['bank_mb']:,.0f} | {r['peak_mb']:,.0f} | "
                     f"{r['before_fit_mb']:,.0f} | {r['fit_s']:.0f} | {r['coreset_s']:.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

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

    python -m benchmarks.fit_memory [--images 300] [--out benchmarks/results/fit_memory.md]
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
            "bank_mb": bank_mb, "peak_mb": peak, "before_fit_mb": before, "fit_s": seconds, "coreset_s": model.fit_stats.coreset_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fit_memory.md"))
    parser.add_argument("--worker", choices=["sized", "unsized", "real"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.images, args.worker != "unsized", real_backbone=args.worker == "real")))
        return
    rows = []
    for mode in ("sized", "unsized", "real"):
        done = subprocess.run([sys.executable, "-m", "benchmarks.fit_memory", "--images", str(args.images), "--worker", mode],
                              check=True, capture_output=True, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
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

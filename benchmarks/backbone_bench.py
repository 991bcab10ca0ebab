"""Backbone forward on the CPU: the fused extractor (BatchNorm folded, channels-last) vs the plain one.

    python -m benchmarks.backbone_bench --out benchmarks/results

Same random weights, same input; each time is the median of 5 calls after 2 warm-up calls,
the better of two alternating rounds per extractor. Also reports the largest relative
difference between the two extractors' features.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from fedpatch.backbone import FeatureExtractor

CONFIGS = [
    ("efficientnet_lite0", (256, 256), 8),
    ("efficientnet_lite0", (1000, 750), 2),
    ("wide_resnet50_2", (256, 256), 8),
    ("wide_resnet50_2", (1000, 750), 2),
]


def _median_seconds(extractor: FeatureExtractor, images: torch.Tensor, calls: int = 5) -> float:
    with torch.no_grad():
        extractor(images)
        extractor(images)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            extractor(images)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(backbone: str, size: tuple[int, int], batch: int) -> dict[str, object]:
    images = torch.rand(batch, 3, size[1], size[0], generator=torch.Generator().manual_seed(0))
    plain = FeatureExtractor(backbone, pretrained=False, fuse=False)
    fused = FeatureExtractor(backbone, pretrained=False)
    rounds = [(_median_seconds(plain, images), _median_seconds(fused, images)) for _ in range(2)]
    plain_s, fused_s = min(r[0] for r in rounds), min(r[1] for r in rounds)
    with torch.no_grad():
        expected, got = plain(images), fused(images)
    error = max(float((got[k] - expected[k]).abs().max() / expected[k].abs().max()) for k in expected)
    return {"backbone": backbone, "size": f"{size[0]}x{size[1]}", "batch": batch, "plain_s": plain_s, "fused_s": fused_s,
            "speedup": plain_s / fused_s, "max_rel_feature_diff": error}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    rows = []
    for backbone, size, batch in CONFIGS:
        rows.append(measure(backbone, size, batch))
        print(rows[-1], flush=True)
    from benchmarks.run import markdown

    args.out.mkdir(parents=True, exist_ok=True)
    text = ["# backbone forward, 2 CPU threads: fused vs plain extractor\n", "Command: `python -m benchmarks.backbone_bench`\n", markdown(rows)]
    (args.out / "backbone.md").write_text("\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

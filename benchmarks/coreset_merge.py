"""The streaming coreset's merge against fixed shares per chunk, on the magnetic-tile protocol.

    python -m benchmarks.coreset_merge   # -> benchmarks/results/coreset_merge.md / .json

For each coreset seed, efficientnet_lite0 (real weights) at 256x256 is fitted on the 70
magnetic-tile training images (71,680 patches: five chunks of at most 16,384) twice, one fit
right after the other in one process: with every chunk keeping its fixed share
(``OVERSELECT = 1``, the scheme before the merge) and with the default over-selection. Each row
gives the coreset seconds, the coverage radius of the bank over all training patches relative
to exact one-shot greedy k-center on them, and image and pixel AUROC on the 105 test images
(the protocol of ``tests/test_core_realdata.py``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import data as bench_data
from benchmarks.coreset_bench import features
from benchmarks.run import write_rows
from fedpatch import PatchCore, coreset
from fedpatch.metrics import image_auroc, pixel_auroc

REPO = Path(__file__).resolve().parents[1]
BACKBONE = "efficientnet_lite0"


@dataclass(frozen=True)
class Holdout:
    """The test images, their labels and masks, loaded once for every fit."""

    images: list[torch.Tensor]
    labels: list[int]
    masks: list[np.ndarray]

    @classmethod
    def load(cls, bench: bench_data.BenchData) -> Holdout:
        return cls(bench.test_images(), [item.label for item in bench.test], [bench.test_mask(i) for i in range(len(bench.test))])


def fit_and_score(bench: bench_data.BenchData, test: Holdout, seed: int, overselect: float, pretrained: bool) -> tuple[PatchCore, dict[str, Any]]:
    """Fit with ``coreset.OVERSELECT = overselect`` (restored after) and score the test images."""
    default = coreset.OVERSELECT
    coreset.OVERSELECT = overselect
    try:
        model = PatchCore(BACKBONE, device="cpu", seed=seed, pretrained=pretrained)
        model.fit(list(bench.train_images()))
    finally:
        coreset.OVERSELECT = default
    predictions = list(model.iter_predictions(test.images))
    return model, {
        "image_auroc": image_auroc([p.score for p in predictions], test.labels),
        "pixel_auroc": pixel_auroc([p.anomaly_map for p in predictions], test.masks),
        "coreset_s": model.fit_stats.coreset_seconds,
        "bank_rows": model.fit_stats.bank_size,
    }


def compare(seeds: list[int], size: tuple[int, int], n_train: int, pretrained: bool = True) -> list[dict[str, Any]]:
    """One row per seed and scheme (fixed shares, then the merge)."""
    bench = bench_data.magnetic(size, n_train)
    test = Holdout.load(bench)
    patches = features(BACKBONE, n_train, pretrained, size=size)  # every training patch, as the fit sees them
    exact = patches[coreset.greedy_coreset_indices(patches, coreset.coreset_size(len(patches), 0.1), projection_dim=None)]
    exact_radius = coreset.coverage_radius(patches, exact)
    rows = []
    for seed in seeds:
        for label, overselect in (("fixed shares", 1.0), (f"merge ({coreset.OVERSELECT}x picks)", coreset.OVERSELECT)):
            model, scores = fit_and_score(bench, test, seed, overselect, pretrained)
            radius = coreset.coverage_radius(patches, np.asarray(model.memory_bank.vectors))
            rows.append({"seed": seed, "scheme": label, "chunks": model.fit_stats.chunks, **scores, "radius_vs_exact": radius / exact_radius})
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 0, 1, 2])
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    rows = compare(args.seeds, (256, 256), 70)
    write_rows(args.out, "coreset_merge", "streaming coreset: fixed shares per chunk vs the merge",
               f"Command: `python -m benchmarks.coreset_merge --seeds {' '.join(map(str, args.seeds))}` "
               "(efficientnet_lite0, magnetic tiles at 256x256, 70 training images; module docstring).", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

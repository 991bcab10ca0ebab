"""Coreset selection side by side on the same features: anomalib's KCenterGreedy vs fedpatch.

    python -m benchmarks.coreset_bench   # with an interpreter that has anomalib (make bench)

Features are fedpatch's patch vectors of the magnetic-tile training images (efficientnet_lite0,
256x256, 70 images: 71,680 x 152, the reference configuration of issue 7; and wide_resnet50_2
with random weights, 20 images: 20,480 x 1536). Each selection keeps 10 % and is timed alone;
its quality is the coverage radius (largest distance from any patch to its nearest selected
patch, full dimension), reported relative to exact one-shot greedy k-center on the full
features. Selections run one after the other in one process with two torch threads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from benchmarks import data as bench_data
from benchmarks.run import markdown

REPO = Path(__file__).resolve().parents[1]


def features(backbone: str, n_train: int, pretrained: bool) -> np.ndarray:
    """fedpatch patch vectors ``[n_train * 1024, D]`` of the magnetic-tile training images."""
    from fedpatch import PatchCore
    from fedpatch.features import extract_patch_features
    from fedpatch.patchcore import iter_image_batches

    model = PatchCore(backbone, device="cpu", pretrained=pretrained)
    bench = bench_data.magnetic((256, 256), n_train)
    parts = [extract_patch_features(model.embed(batch)).float().numpy() for batch in iter_image_batches(bench.train_images(), 8)]
    return np.concatenate(parts)


def timed(select: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    rows = select()
    return rows, time.perf_counter() - start


def compare(name: str, feats: np.ndarray, ratio: float, anomalib: bool, deadline: float) -> list[dict[str, Any]]:
    from fedpatch.coreset import StreamingCoreset, coreset_size, coverage_radius, greedy_coreset_selection

    target = coreset_size(len(feats), ratio)
    tensor = torch.from_numpy(feats)
    runs: dict[str, tuple[np.ndarray, float]] = {}
    runs["fedpatch greedy, one-shot, full dim (exact)"] = timed(lambda: greedy_coreset_selection(tensor, target, projection_dim=None))
    if feats.shape[1] >= 256:
        runs["fedpatch greedy, one-shot, 128-d projection (default)"] = timed(lambda: greedy_coreset_selection(tensor, target))

    def streaming() -> np.ndarray:
        coreset = StreamingCoreset(ratio, 16384)
        for start in range(0, len(feats), 1024 * 8):  # as fit() feeds it: one batch of 8 images at a time
            coreset.add(tensor[start : start + 1024 * 8])
        return coreset.finalize()

    runs["fedpatch streaming, chunks of 16,384 (default fit)"] = timed(streaming)
    reference, note = None, ""
    if anomalib:
        reference, note = anomalib_seconds(tensor, ratio, deadline)
    exact_radius = coverage_radius(feats, runs["fedpatch greedy, one-shot, full dim (exact)"][0])
    rows = []
    for method, (rows_selected, seconds) in runs.items():
        radius = coverage_radius(feats, rows_selected)
        rows.append({
            "features": name, "method": method, "selected": len(rows_selected), "seconds": seconds,
            "speedup_vs_anomalib": reference / seconds if reference else None,
            "coverage_radius": radius, "radius_vs_exact": radius / exact_radius,
        })
        print(rows[-1], flush=True)
    if reference:
        rows.append({"features": name, "method": f"anomalib KCenterGreedy{note}", "selected": target, "seconds": reference})
    return rows


def anomalib_seconds(tensor: torch.Tensor, ratio: float, deadline: float) -> tuple[float, str]:
    """Time of anomalib's KCenterGreedy on ``tensor``; past ``deadline`` seconds its loop is
    stopped and the time extrapolated from the picks done (every pick costs the same: one
    distance pass over all points), which the returned note says."""
    from anomalib.models.components.sampling import KCenterGreedy, k_center_greedy

    from benchmarks.worker import _Deadline, _deadline_tqdm

    k_center_greedy.tqdm = _deadline_tqdm(deadline)
    torch.manual_seed(0)
    start = time.perf_counter()
    try:
        KCenterGreedy(tensor, ratio).sample_coreset()
    except _Deadline as stop:
        seconds = (time.perf_counter() - start) * stop.total / max(stop.done, 1)
        return seconds, f" (extrapolated from {stop.done:,} of {stop.total:,} picks in {deadline:.0f} s)"
    return time.perf_counter() - start, ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--no-anomalib", action="store_true")
    parser.add_argument("--anomalib-deadline", type=float, default=120.0, help="seconds before anomalib's greedy loop is stopped and extrapolated")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    anomalib = not args.no_anomalib
    rows = []
    lite = features("efficientnet_lite0", 70, True)
    rows += compare(f"efficientnet_lite0 magnetic 256x256, {lite.shape[0]:,} x {lite.shape[1]}", lite, 0.1, anomalib, args.anomalib_deadline)
    del lite
    wrn = features("wide_resnet50_2", 20, False)
    rows += compare(f"wide_resnet50_2 (random) magnetic 256x256, {wrn.shape[0]:,} x {wrn.shape[1]}", wrn, 0.1, anomalib, args.anomalib_deadline)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "coreset.json").write_text(json.dumps(rows, indent=1))
    text = "# coreset selection, same features\n\nCommand: `python -m benchmarks.coreset_bench`\n\n" + markdown(rows)
    (args.out / "coreset.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

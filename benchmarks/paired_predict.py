"""Prediction of fedpatch and anomalib side by side in one process, on one memory bank.

    .venv-bench/bin/python -m benchmarks.paired_predict --out benchmarks/results

The main suite times each implementation in its own process, minutes apart. On these shared
2-core machines that left anomalib's predict throughput on the lite0 magnetic-tile
configuration anywhere between 9.7 and 29.7 img/s over five runs (fedpatch's 32-41 img/s),
which makes a single run's "predict vs anomalib" ratio unreliable. Here both implementations
live in one process and score the same test images group by group (``batch_size`` images per
group, the order of the two alternating from group to group, every group ``--repeats``
times), so each pair of timings sees the same machine state. Both search the same bank:
fedpatch's coreset is handed to anomalib's ``PatchcoreModel`` (whose own greedy selection is
the slow part of its fit and is timed by the main suite), so the comparison is of prediction
alone. Everything else is as in the main suite (``benchmarks.worker``): the same images, the
same backbone weights (checked equal), layers, resolution and batch size, 2 torch threads,
the same OpenMP setting (``benchmarks.run.WORKER_ENV``) and fedpatch's malloc settings
(``fedpatch.allocator``, process-wide).

Reported per configuration: images per second of both (wall clock and process CPU time),
their ratios, the median of the per-group ratios, and the largest relative difference of the
two implementations' image scores (both use the paper's reweighting with 9 neighbours; a
check that they score the same thing).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmarks import data as bench_data
from benchmarks.run import MATRIX, WORKER_ENV, write_rows
from benchmarks.worker import Spec, _anomalib_model, anomalib_predict, timed


def measure(config: dict[str, Any], repeats: int) -> dict[str, Any]:
    """Fit fedpatch on one configuration, give its bank to anomalib, time both predictions."""
    from fedpatch import PatchCore
    from fedpatch.backbone import FeatureExtractor
    from fedpatch.patchcore import iter_image_batches

    spec = Spec(impl="fedpatch", **config)
    bench = bench_data.load(spec.dataset, spec.size, spec.n_train)
    ours = PatchCore(spec.backbone, coreset_percentage=spec.coreset_ratio, device="cpu", pretrained=spec.pretrained, batch_size=spec.batch_size, progress=False)
    ours.fit(bench.train_images())
    extractor = FeatureExtractor(spec.backbone, pretrained=spec.pretrained, fuse=False)  # timm key layout
    theirs = _anomalib_model(spec, extractor).eval()
    theirs.memory_bank = torch.from_numpy(ours.get_memory_bank())
    normalize = extractor.normalize
    images = bench.test_images()

    def fedpatch_scores(chunk: list[torch.Tensor]) -> list[float]:
        return [p.score for p in ours.iter_predictions(chunk)]

    def anomalib_scores(chunk: list[torch.Tensor]) -> list[float]:
        scores: list[float] = []
        for batch in iter_image_batches(chunk, spec.batch_size):  # batching timed, as in fedpatch's predict
            scores += anomalib_predict(theirs, normalize, batch)[0]
        return scores

    runners = {"fedpatch": fedpatch_scores, "anomalib": anomalib_scores}
    for run in runners.values():  # warm-up: first-call allocations and kernel choices
        run(images[: spec.batch_size])
    wall = dict.fromkeys(runners, 0.0)
    cpu = dict.fromkeys(runners, 0.0)
    group_ratios: list[float] = []
    scores: dict[str, list[float]] = {name: [] for name in runners}
    groups = list(range(0, len(images), spec.batch_size))
    for repeat in range(repeats):
        for number, first in enumerate(tqdm(groups, desc=f"{spec.backbone} {spec.size} pass {repeat + 1}", unit="group")):
            chunk = images[first : first + spec.batch_size]
            order = list(runners) if number % 2 == 0 else list(reversed(runners))
            group_wall = {}
            for name in order:
                got, seconds, cpu_seconds = timed(lambda: runners[name](chunk))
                wall[name] += seconds
                cpu[name] += cpu_seconds
                group_wall[name] = seconds
                if repeat == 0:
                    scores[name] += got
            group_ratios.append(group_wall["anomalib"] / group_wall["fedpatch"])
    count = len(images) * repeats
    ours_s, theirs_s = np.array(scores["fedpatch"]), np.array(scores["anomalib"])
    return {
        "config": f"{spec.backbone}{'' if spec.pretrained else ' (random)'} {spec.dataset} {'x'.join(map(str, spec.size))} n={spec.n_train}",
        "bank_rows": len(ours.memory_bank),
        "test_images": len(images),
        "fedpatch_ips": count / wall["fedpatch"],
        "anomalib_ips": count / wall["anomalib"],
        "predict_speedup": wall["anomalib"] / wall["fedpatch"],
        "predict_speedup_cpu": cpu["anomalib"] / cpu["fedpatch"],
        "median_group_speedup": statistics.median(group_ratios),
        "group_speedup_range": f"{min(group_ratios):.2f}-{max(group_ratios):.2f}",
        "max_score_rel_diff": float(np.max(np.abs(ours_s - theirs_s) / np.maximum(np.abs(theirs_s), 1e-12))),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--repeats", type=int, default=2, help="passes over each configuration's test images")
    parser.add_argument("--only", type=int, nargs="*", help="indices of the main suite's configurations to run")
    args = parser.parse_args(argv)
    if any(os.environ.get(key) != value for key, value in WORKER_ENV.items()):
        # the main suite's OpenMP setting applies from process start
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.paired_predict", *(argv if argv is not None else sys.argv[1:])], {**os.environ, **WORKER_ENV})
    torch.set_num_threads(2)
    configs = [MATRIX[i] for i in args.only] if args.only else MATRIX
    rows = []
    for config in configs:
        rows.append(measure(config, args.repeats))
        print(rows[-1], flush=True)
    caption = (f"Command: `python -m benchmarks.paired_predict` (with anomalib installed: `.venv-bench`); one process, "
               f"both implementations on the same bank and test images, group by group of `batch_size` images in "
               f"alternating order, {args.repeats} passes; 2 threads. Ratios > 1 favour fedpatch.")  # fmt: skip
    write_rows(args.out, "paired_predict", "prediction side by side in one process: fedpatch vs anomalib", caption, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Backbone forward and PatchCore predict under fedpatch's malloc settings vs glibc's defaults.

    python -m benchmarks.allocator_bench --out benchmarks/results

``fedpatch.allocator`` keeps freed blocks below 256 MiB on the heap. The settings are
process-wide and applied at import, so every measurement runs in a fresh process: ``tuned``
as ``import fedpatch`` leaves it, ``glibc default`` with ``FEDPATCH_MALLOC_TUNING=0``. The two
alternate, ``--rounds`` rounds each, and the faster round of each mode counts. A process
measures one configuration: the extractor's forward pass (median of 7 calls after 2 warm-up
calls, and the minor page faults per call), then a PatchCore fitted on 2 images scoring 8
(images per second of the fastest of 3 passes, after a warm-up image), and its peak RSS over
both.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.run import WORKER_ENV, write_rows

CONFIGS = [
    ("efficientnet_lite0", (256, 256), 8),
    ("efficientnet_lite0", (1000, 750), 1),
    ("wide_resnet50_2", (256, 256), 8),
    ("wide_resnet50_2", (1000, 750), 1),
]
"""(backbone, (W, H), forward batch); lite0 with its real weights, WideResNet random."""
MODES = {"tuned": {}, "glibc default": {"FEDPATCH_MALLOC_TUNING": "0"}}


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def child(backbone: str, size: tuple[int, int], batch: int) -> dict[str, Any]:
    """One configuration's measurements in this process (see the module docstring)."""
    import torch

    from fedpatch import PatchCore, allocator

    torch.set_num_threads(2)
    torch.manual_seed(0)
    width, height = size
    model = PatchCore(backbone, pretrained=backbone == "efficientnet_lite0", device="cpu")
    images = torch.rand(batch, 3, height, width)
    times, faults = [], []
    with torch.no_grad():
        for call in range(9):
            before, start = _faults(), time.perf_counter()
            model.extractor(images)
            if call >= 2:
                times.append(time.perf_counter() - start)
                faults.append(_faults() - before)
    model.fit([torch.rand(3, height, width) for _ in range(2)])
    test = [torch.rand(3, height, width) for _ in range(9)]
    list(model.iter_predictions(test[:1]))
    passes = []
    for _ in range(3):
        start = time.perf_counter()
        list(model.iter_predictions(test[1:]))
        passes.append(time.perf_counter() - start)
    predict_ips = 8 / min(passes)
    return {
        "tuned": allocator.enabled(),
        "forward_s": statistics.median(times),
        "faults_per_forward": statistics.median(faults),
        "predict_ips": predict_ips,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def measure(backbone: str, size: tuple[int, int], batch: int, mode: str) -> dict[str, Any]:
    """``child`` in a fresh process under ``mode``'s environment."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_") and key != "FEDPATCH_MALLOC_TUNING"}
    env.update(WORKER_ENV)
    env.update(MODES[mode])
    command = [sys.executable, "-m", "benchmarks.allocator_bench", "--child", backbone, f"{size[0]}x{size[1]}", str(batch)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["tuned"] != (mode == "tuned"):
        raise RuntimeError(f"{mode}: the child reports tuned={result['tuned']}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", nargs=3, metavar=("BACKBONE", "WxH", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        width, height = map(int, args.child[1].split("x"))
        print(json.dumps(child(args.child[0], (width, height), int(args.child[2]))))
        return 0
    rows = []
    for backbone, size, batch in CONFIGS:
        best: dict[str, dict[str, Any]] = {}
        for round_ in range(args.rounds):
            order = list(MODES) if round_ % 2 == 0 else list(reversed(MODES))
            for mode in order:
                result = measure(backbone, size, batch, mode)
                if mode not in best or result["forward_s"] < best[mode]["forward_s"]:
                    best[mode] = result
        tuned, default = best["tuned"], best["glibc default"]
        for mode, result in best.items():
            rows.append({"backbone": backbone, "size": f"{size[0]}x{size[1]}", "batch": batch, "malloc": mode,
                         **{key: value for key, value in result.items() if key != "tuned"}})
        rows.append({"backbone": backbone, "size": f"{size[0]}x{size[1]}", "batch": batch, "malloc": "tuned / default",
                     "forward_s": default["forward_s"] / tuned["forward_s"],
                     "predict_ips": tuned["predict_ips"] / default["predict_ips"],
                     "peak_rss_mb": tuned["peak_rss_mb"] - default["peak_rss_mb"]})
        print(rows[-3:], flush=True)
    caption = ("Command: `python -m benchmarks.allocator_bench`; each row one fresh process (2 torch threads), the "
               f"faster of {args.rounds} alternating rounds per mode. `tuned / default` rows: forward speed-up "
               "(default s / tuned s), predict speed-up (tuned img/s / default img/s), peak RSS difference (MiB).")
    write_rows(args.out, "allocator", "fedpatch's malloc settings vs glibc's defaults", caption, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

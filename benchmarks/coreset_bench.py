"""Coreset selection side by side on the same features: anomalib's KCenterGreedy vs fedpatch.

    python -m benchmarks.coreset_bench   # with an interpreter that has anomalib (make bench)

Features are fedpatch's patch vectors of the magnetic-tile training images (efficientnet_lite0,
256x256, 70 images: 71,680 x 152, the reference configuration of issue 7; the same backbone's
five stages blocks.1-5 on 5 images, 20,480 x 448, real wide features; and wide_resnet50_2 with
random weights, 20 images: 20,480 x 1536). Each selection keeps 10 % and is timed alone; its
quality is the coverage radius (largest distance from any patch to its nearest selected patch,
full dimension), reported relative to exact one-shot greedy k-center on the full features
(``projection_dim=None``; on the two 20,480-row sets the plain traversal without pruning is
timed too, and its picks are compared). Selections run one after the other in one process
with two torch threads (fedpatch's greedy pick loop on one, see ``fedpatch.kcenter``).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import data as bench_data
from benchmarks.run import markdown
from benchmarks.worker import timed

REPO = Path(__file__).resolve().parents[1]
ADDRESS_SPACE_CAP = 16 * 2**30
"""Bytes of address space the benchmark may map (see ``anomalib_seconds``)."""


def features(
    backbone: str, n_train: int, pretrained: bool, layers: list[str] | None = None, size: tuple[int, int] = (256, 256)
) -> np.ndarray:
    """fedpatch patch vectors ``[n_train * patches per image, D]`` of the magnetic-tile training images at ``size``."""
    from fedpatch import PatchCore
    from fedpatch.features import extract_patch_features
    from fedpatch.patchcore import iter_image_batches

    model = PatchCore(backbone, layers, device="cpu", pretrained=pretrained)
    bench = bench_data.magnetic(size, n_train)
    parts = [extract_patch_features(model.embed(batch)).float().numpy() for batch in iter_image_batches(bench.train_images(), 8)]
    return np.concatenate(parts)


def compare(name: str, feats: np.ndarray, ratio: float, anomalib: bool, deadline: float, plain: bool) -> list[dict[str, Any]]:
    """Time and measure every selection on ``feats``; ``plain`` adds the unpruned traversal."""
    from fedpatch.coreset import StreamingCoreset, coreset_size, coverage_radius, greedy_coreset_indices
    from fedpatch.kcenter import greedy_kcenter_indices

    target = coreset_size(len(feats), ratio)
    tensor = torch.from_numpy(feats)
    runs: dict[str, tuple[np.ndarray, float]] = {}
    exact, seconds, _ = timed(lambda: greedy_coreset_indices(tensor, target, projection_dim=None))
    runs["fedpatch greedy, one-shot, exact (option, pruned)"] = (feats[exact], seconds)
    if plain:
        with torch.no_grad():
            plain_picks, seconds, _ = timed(lambda: greedy_kcenter_indices(tensor, target, int(exact[0]), prune=False).numpy())
        same = np.mean(plain_picks == exact)
        runs[f"fedpatch greedy, one-shot, exact, plain traversal (no pruning; {same:.1%} of its picks as pruned)"] = (feats[plain_picks], seconds)
    if feats.shape[1] >= 256:
        projected, seconds, _ = timed(lambda: feats[greedy_coreset_indices(tensor, target, projection_dim=128)])
        runs["fedpatch greedy, one-shot, 128-d projection (default)"] = (projected, seconds)

    def streaming(projection_dim: int | None) -> np.ndarray:
        coreset = StreamingCoreset(ratio, 16384, projection_dim=projection_dim)
        coreset.reserve(len(feats))  # as fit() does when it knows the image count
        for start in range(0, len(feats), 1024 * 8):  # as fit() feeds it: one batch of 8 images at a time
            coreset.add(tensor[start : start + 1024 * 8])
        return coreset.finalize()

    streamed, seconds, _ = timed(lambda: streaming(128))
    runs["fedpatch streaming, chunks of 16,384 (default fit)"] = (streamed, seconds)
    if feats.shape[1] >= 256:  # narrower features are not projected: the default row is already exact
        streamed, seconds, _ = timed(lambda: streaming(None))
        runs["fedpatch streaming, chunks of 16,384, exact (projection_dim: null)"] = (streamed, seconds)
    reference, note, picks = None, "", None
    if anomalib:
        reference, note, picks = anomalib_seconds(tensor, ratio, deadline)
        if picks is not None:
            runs[f"anomalib KCenterGreedy{note}"] = (feats[picks], reference)
    exact_radius = coverage_radius(feats, feats[exact])
    rows = []
    for method, (rows_selected, seconds) in runs.items():
        radius = coverage_radius(feats, rows_selected)
        rows.append({
            "features": name, "method": method, "selected": len(rows_selected), "seconds": seconds,
            "speedup_vs_anomalib": reference / seconds if reference and not method.startswith("anomalib") else None,
            "coverage_radius": radius, "radius_vs_exact": radius / exact_radius,
        })
        print(rows[-1], flush=True)
    if anomalib and picks is None:
        method = f"anomalib KCenterGreedy{note}" if reference else f"anomalib KCenterGreedy (failed at the {ADDRESS_SPACE_CAP >> 30} GiB address-space cap)"
        rows.append({"features": name, "method": method, "selected": target, "seconds": reference})
    return rows


def anomalib_seconds(tensor: torch.Tensor, ratio: float, deadline: float) -> tuple[float | None, str, np.ndarray | None]:
    """Time of anomalib's KCenterGreedy on ``tensor`` and its picks; past ``deadline`` seconds
    its loop is stopped and the time extrapolated from the picks done (every pick costs the
    same: one distance pass over all points), which the returned note says (no picks then).
    Its selection runs on a 245-d-or-so sparse random projection (Johnson-Lindenstrauss,
    eps 0.9), so its coverage radius is measured like ours. In two of four runs on the 20,480-row
    sets its loop slowed from ~1,600 picks on and grew past 24 GB (the machine's memory) before
    being killed; ``main`` caps the process's address space so that such a run fails here, with
    ``None`` for its time, instead of taking the machine down."""
    from anomalib.models.components.sampling import KCenterGreedy, k_center_greedy

    from benchmarks.worker import _Deadline, _deadline_tqdm, greedy_allocator

    k_center_greedy.tqdm = _deadline_tqdm(deadline)
    torch.manual_seed(0)
    start = time.perf_counter()
    try:
        with greedy_allocator():  # as in the main suite
            picks = KCenterGreedy(tensor, ratio).select_coreset_idxs()
    except _Deadline as stop:
        seconds = (time.perf_counter() - start) * stop.total / max(stop.done, 1)
        return seconds, f" (extrapolated from {stop.done:,} of {stop.total:,} picks in {deadline:.0f} s)", None
    except (MemoryError, RuntimeError) as error:  # the address-space cap of main(), not a crash of the run
        print(f"anomalib KCenterGreedy failed after {time.perf_counter() - start:.0f} s: {str(error)[:200]}", flush=True)
        return None, "", None
    return time.perf_counter() - start, "", np.asarray(picks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--no-anomalib", action="store_true")
    parser.add_argument("--anomalib-deadline", type=float, default=120.0, help="seconds before anomalib's greedy loop is stopped and extrapolated")
    args = parser.parse_args(argv)
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_CAP if hard == resource.RLIM_INFINITY else min(ADDRESS_SPACE_CAP, hard), hard))
    torch.set_num_threads(2)
    anomalib = not args.no_anomalib
    rows = []
    lite = features("efficientnet_lite0", 70, True)
    rows += compare(f"efficientnet_lite0 magnetic 256x256, {lite.shape[0]:,} x {lite.shape[1]}", lite, 0.1, anomalib, args.anomalib_deadline, False)
    del lite
    stages = features("efficientnet_lite0", 5, True, [f"blocks.{i}" for i in range(1, 6)])
    rows += compare(f"efficientnet_lite0 blocks.1-5 magnetic 256x256, {stages.shape[0]:,} x {stages.shape[1]}", stages, 0.1, anomalib, args.anomalib_deadline, True)
    del stages
    wrn = features("wide_resnet50_2", 20, False)
    rows += compare(f"wide_resnet50_2 (random) magnetic 256x256, {wrn.shape[0]:,} x {wrn.shape[1]}", wrn, 0.1, anomalib, args.anomalib_deadline, True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "coreset.json").write_text(json.dumps(rows, indent=1))
    text = "# coreset selection, same features\n\nCommand: `python -m benchmarks.coreset_bench`\n\n" + markdown(rows)
    (args.out / "coreset.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

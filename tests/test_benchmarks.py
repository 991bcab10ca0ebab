"""The benchmark harness does not rot: the tiny suite runs end to end and its tables hold numbers."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.procmem import RssMonitor, current_rss_mb
from benchmarks import data as bench_data
from benchmarks.run import gpu_ratios_of, main, ratios_of, rows_of, suite_specs
from benchmarks.worker import MAX_PREDICT_PASSES, PREDICT_SECONDS, Spec, enough_passes, run_fedpatch


def test_tiny_suite_writes_tables(tmp_path: Path) -> None:
    main(["--suite", "tiny", "--out", str(tmp_path), "--anomalib-python", str(tmp_path / "no-python"), "--indexes", "hnsw"])
    with (tmp_path / "tiny.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    ours, approx, theirs = rows
    assert ours["impl"] == "fedpatch" and ours["status"] == "ok"
    assert int(ours["bank_size"]) == math.ceil(0.1 * 3 * (64 // 8) ** 2)  # 3 images, an 8x8 patch grid
    for key in ("fit_s", "extract_s", "coreset_s", "index_s", "predict_ips", "backbone_ips", "fit_peak_mb", "predict_peak_mb"):
        assert float(ours[key]) > 0, key
    assert float(ours["fit_s"]) >= float(ours["extract_s"]) + float(ours["coreset_s"])
    assert 0.0 <= float(ours["image_auroc"]) <= 1.0 and 0.0 <= float(ours["pixel_auroc"]) <= 1.0
    assert approx["impl"] == "fedpatch index=hnsw" and float(approx["recall_at_1"]) == 1.0  # a 20-vector bank
    assert approx["image_auroc"] == ours["image_auroc"] and float(approx["backbone_ips"]) > 0
    assert theirs["impl"] == "anomalib" and theirs["status"].startswith("anomalib not importable")
    assert ours["predict_passes"] == approx["predict_passes"] == "2"  # the tiny suite's timed passes
    result = json.loads((tmp_path / "tiny.json").read_text())[0][0]
    ratios = result["predict_vs_backbone_passes"]
    assert len(ratios) == 2 and all(r > 0 for r in ratios)
    # the throughputs are over both passes: their ratio is a weighted mean of the passes' ratios
    assert result["predict_passes"] == 2 and min(ratios) - 1e-9 <= result["predict_ips"] / result["backbone_ips"] <= max(ratios) + 1e-9
    text = (tmp_path / "tiny.md").read_text()
    assert "| efficientnet_lite0 | magnetic | 64x64 | 3 | fedpatch |" in text


def test_passes_continue_until_both_least_passes_and_least_seconds() -> None:
    assert not enough_passes(2, 60.0, (3, 15.0))  # too few passes, however long
    assert not enough_passes(3, 14.9, (3, 15.0))  # enough passes, too short
    assert enough_passes(3, 15.0, (3, 15.0)) and enough_passes(8, 15.2, (3, 15.0))
    assert enough_passes(MAX_PREDICT_PASSES, 1.0, (3, 15.0))  # the cap
    assert not enough_passes(0, 0.0, (0, 0.0)) and enough_passes(1, 0.0, (0, 0.0))  # at least one pass
    main_specs = [spec for group in suite_specs("main") for spec in group]
    assert {spec.predict_seconds for spec in main_specs} == {PREDICT_SECONDS}  # both implementations alike
    assert [spec.predict_seconds for spec in suite_specs("tiny")[0]] == [0.0, 0.0]


def test_fedpatch_worker_times_prediction_for_the_least_seconds() -> None:
    """One pass of the tiny configuration takes well under a second: passes are added until
    prediction has been timed for 1.5 s, and no pass more than that needs."""
    spec = Spec(impl="fedpatch", backbone="efficientnet_lite0", dataset="magnetic", size=(64, 64), n_train=3,
                batch_size=2, predict_passes=1, predict_seconds=1.5)
    result: dict = {}
    bench = bench_data.load("magnetic", spec.size, spec.n_train)
    run_fedpatch(spec, bench, RssMonitor(cap_mb=None, on_cap=lambda phase, rss: None), result)
    passes, images = result["predict_passes"], len(bench.test)
    assert 2 <= passes == len(result["predict_vs_backbone_passes"]) <= MAX_PREDICT_PASSES
    predicted = passes * images / result["predict_ips"]  # seconds of prediction over all passes
    assert predicted >= 1.5 or passes == MAX_PREDICT_PASSES
    assert predicted * (passes - 1) / passes < 1.5 * 1.5  # the last pass was needed (passes' times vary a little)


def test_variant_rows_report_their_own_passes() -> None:
    """The default configuration is timed for PREDICT_SECONDS, its index variants for three passes."""
    spec = {"impl": "fedpatch", "backbone": "efficientnet_lite0", "dataset": "synthetic", "size": [1000, 750], "n_train": 2}
    result = {"spec": spec, "status": "ok", "predict_passes": 11, "predict_ips": 5.0, "variants": {"hnsw": {"predict_passes": 3, "predict_ips": 2.0}}}
    ours, hnsw = rows_of(result)
    assert (ours["predict_passes"], ours["predict_ips"]) == (11, 5.0)
    assert (hnsw["impl"], hnsw["predict_passes"], hnsw["predict_ips"]) == ("fedpatch index=hnsw", 3, 2.0)


def test_ratios_favour_the_faster_implementation() -> None:
    spec = {"backbone": "wide_resnet50_2", "pretrained": False, "dataset": "synthetic", "size": [1000, 750], "n_train": 4}
    ours = {"spec": {**spec, "impl": "fedpatch"}, "fit_s": 10.0, "extract_s": 8.0, "coreset_s": 1.0, "predict_ips": 2.0,
            "backbone_ips": 2.5, "fit_peak_mb": 1000.0, "image_auroc": 0.9, "variants": {"hnsw": {"predict_ips": 2.4, "backbone_ips": 3.2}}}
    theirs = {"spec": {**spec, "impl": "anomalib"}, "fit_s": 30.0, "extract_s": 8.0, "coreset_s": 22.0, "predict_ips": 1.0,
              "fit_peak_mb": 3000.0, "image_auroc": 0.85}
    ratios = ratios_of([ours, theirs])
    assert ratios is not None
    assert ratios["fit_speedup"] == 3.0 and ratios["coreset_speedup"] == 22.0 and ratios["predict_speedup"] == 2.0
    assert ratios["predict_vs_backbone"] == 0.8 and ratios["fit_memory_ratio"] == 3.0
    assert np.isclose(ratios["image_auroc_delta"], 0.05) and ratios["predict_speedup[hnsw]"] == 2.4
    assert np.isclose(ratios["predict_vs_backbone[hnsw]"], 0.75)  # against the variant's own backbone timing
    assert [row["impl"] for row in rows_of(ours)] == ["fedpatch", "fedpatch index=hnsw"]
    assert rows_of(ours)[0]["backbone"] == "wide_resnet50_2 (random)"


def test_labelled_variant_reports_its_speed_and_auroc_change() -> None:
    """A labelled fedpatch variant (the bfloat16 backbone) does not replace the default in the
    ratios: it adds its speed against anomalib and the default, and its AUROC change."""
    spec = {"backbone": "wide_resnet50_2", "pretrained": False, "dataset": "synthetic", "size": [400, 400], "n_train": 5}
    ours = {"spec": {**spec, "impl": "fedpatch"}, "fit_s": 4.0, "predict_ips": 2.0, "backbone_ips": 2.5, "image_auroc": 0.9, "pixel_auroc": 0.95}
    low = {"spec": {**spec, "impl": "fedpatch", "label": "bfloat16"}, "fit_s": 2.0, "predict_ips": 3.0, "image_auroc": 0.875, "pixel_auroc": 0.96}
    theirs = {"spec": {**spec, "impl": "anomalib"}, "fit_s": 8.0, "predict_ips": 1.0, "image_auroc": 0.85}
    ratios = ratios_of([ours, low, theirs])
    assert ratios is not None
    assert ratios["predict_speedup"] == 2.0 and ratios["fit_speedup"] == 2.0  # the default's, unchanged
    assert ratios["predict_speedup[bfloat16]"] == 3.0 and ratios["fit_speedup[bfloat16]"] == 4.0
    assert ratios["predict_vs_default[bfloat16]"] == 1.5
    assert np.isclose(ratios["image_auroc_change[bfloat16]"], -0.025) and np.isclose(ratios["pixel_auroc_change[bfloat16]"], 0.01)
    assert [row["impl"] for row in rows_of(low)] == ["fedpatch bfloat16"]
    precision = suite_specs("precision")
    assert [[(s.impl, s.label, s.options) for s in group] for group in precision[:1]] == [
        [("fedpatch", "", {}), ("fedpatch", "bfloat16", {"backbone_precision": "bfloat16"}), ("anomalib", "", {})]
    ]
    assert [(group[0].backbone, group[0].size) for group in precision] == [(group[0].backbone, group[0].size) for group in suite_specs("main")]


def test_rss_monitor_sees_a_phase_peak() -> None:
    monitor = RssMonitor(cap_mb=None, on_cap=lambda phase, rss: None, interval=0.002)
    before = current_rss_mb()
    monitor.phase("alloc")
    # 300 MiB, touched: above fedpatch.allocator's mmap threshold, so fresh pages (a smaller
    # block may reuse heap memory an earlier test freed, already resident)
    block = np.ones(300 * 2**20 // 8)
    time.sleep(0.1)
    assert monitor.peak("alloc") - before >= 290
    del block


def test_gpu_ratios_compare_the_devices_of_one_configuration() -> None:
    spec = {"impl": "fedpatch", "backbone": "wide_resnet50_2", "dataset": "synthetic", "size": [400, 400], "n_train": 5}
    common = {"status": "ok", "image_auroc": 0.9, "pixel_auroc": 0.95}
    gpu = {"spec": {**spec, "device": "cuda"}, "fit_s": 0.5, "extract_s": 0.1, "coreset_s": 0.2, "predict_ips": 90.0, "backbone_ips": 300.0, **common}
    cpu = {"spec": {**spec, "device": "cpu"}, "fit_s": 2.0, "extract_s": 1.5, "coreset_s": 0.4, "predict_ips": 1.5, "backbone_ips": 2.0, **common, "image_auroc": 0.92}
    ratios = gpu_ratios_of([gpu, cpu])
    assert ratios is not None
    assert ratios["fit_speedup"] == 4.0 and ratios["predict_speedup"] == 60.0
    assert ratios["predict_vs_backbone_gpu"] == 0.3 and ratios["predict_vs_backbone_cpu"] == 0.75
    assert math.isclose(ratios["image_auroc_delta"], -0.02)
    assert gpu_ratios_of([cpu]) is None  # no GPU row: nothing to compare
    assert gpu_ratios_of([{**gpu, "status": "error: CUDA out of memory"}, cpu]) is None


def test_gpu_and_parity_suites_cover_the_matrix() -> None:
    gpu = suite_specs("gpu")
    assert [spec.device for spec in gpu[0]] == ["cuda", "cpu"]
    assert {(s.backbone, s.size) for group in gpu[:6] for s in group} == {(s.backbone, s.size) for group in suite_specs("main") for s in group}
    parity = suite_specs("parity")
    assert [(s.impl, s.seed, s.n_train) for group in parity for s in group] == [
        (impl, seed, 70) for seed in (0, 1, 2) for impl in ("fedpatch", "anomalib")
    ]


def test_coreset_bench_rows_compare_pruned_plain_and_streaming() -> None:
    """On 300-d clustered rows (no anomalib): the pruned and plain traversals pick the same rows
    (radius ratio 1 for both), the optional projection and the two-chunk streaming cover worse."""
    from benchmarks.coreset_bench import compare

    rng = np.random.default_rng(0)
    centers = rng.normal(0.0, 3.0, (30, 300))
    feats = (centers[rng.integers(30, size=20_000)] + rng.normal(0.0, 1.0, (20_000, 300))).astype(np.float32)
    rows = {row["method"]: row for row in compare("clusters", feats, 0.01, False, 0.0, True)}
    assert list(rows) == [
        "fedpatch greedy, one-shot, exact (option, pruned)",
        "fedpatch greedy, one-shot, exact, plain traversal (no pruning; 100.0% of its picks as pruned)",
        "fedpatch greedy, one-shot, 128-d projection (default)",
        "fedpatch streaming, chunks of 16,384 (default fit)",
        "fedpatch streaming, chunks of 16,384, exact (projection_dim: null)",
    ]
    radius = [row["radius_vs_exact"] for row in rows.values()]
    assert radius[0] == radius[1] == 1.0 and radius[2] > 1.0 and radius[3] > 1.0
    assert max(radius[3:]) < 1.1  # measured 1.010 (projected) and 1.021 (exact) on these clusters
    assert [row["selected"] for row in rows.values()] == [200, 200, 200, 164 + 37, 164 + 37]  # 1 % of 16,384 and of 3,616
    assert all(row["speedup_vs_anomalib"] is None and row["seconds"] > 0 for row in rows.values())


def test_coreset_merge_rows_on_one_chunk_match() -> None:
    """Three 64x64 training images make one chunk, where the merge keeps exactly the fixed
    share (the one-shot greedy prefix): both schemes give the same bank and scores."""
    from benchmarks.coreset_merge import compare

    rows = compare([0], (64, 64), 3, pretrained=False)
    assert [row["scheme"] for row in rows] == ["fixed shares", "merge (1.25x picks)"]
    fixed, merged = rows
    assert fixed["chunks"] == merged["chunks"] == 1 and fixed["bank_rows"] == merged["bank_rows"] == 20  # 10 % of 192
    for key in ("image_auroc", "pixel_auroc", "radius_vs_exact"):
        assert fixed[key] == merged[key], key
    assert 0.0 <= fixed["image_auroc"] <= 1.0 and fixed["radius_vs_exact"] > 0.0


def _assert_same_features(got_extractor: torch.nn.Module, expected_extractor: torch.nn.Module) -> None:
    """Both extractors give the same features, to 1e-5 of each layer's largest, on one 64x80 image."""
    images = torch.rand(1, 3, 64, 80, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = expected_extractor(images), got_extractor(images)
    for layer in expected:
        assert float((got[layer] - expected[layer]).abs().max() / expected[layer].abs().max()) < 1e-5


def test_backbone_bench_times_the_same_padding_rewrite_on_its_own() -> None:
    """The benchmark's third extractor is the fused one with timm's padded-copy convolutions
    put back: the same weights and features, no ``SamePaddedConv2d`` left; none for a backbone
    without "SAME" padding."""
    from timm.layers import Conv2dSame

    from benchmarks.backbone_bench import with_timm_padding
    from fedpatch.backbone import FeatureExtractor
    from fedpatch.fusion import SamePaddedConv2d

    fused = FeatureExtractor("efficientnet_lite0", pretrained=False)
    undone = with_timm_padding(fused)
    assert undone is not None
    assert not any(isinstance(m, SamePaddedConv2d) for m in undone.modules())
    assert sum(isinstance(m, Conv2dSame) for m in undone.modules()) == 4
    assert sum(isinstance(m, SamePaddedConv2d) for m in fused.modules()) == 4  # the original is left alone
    _assert_same_features(undone, fused)
    assert with_timm_padding(FeatureExtractor("resnet18", pretrained=False)) is None


def test_backbone_bench_times_the_winograd_rewrite_on_its_own() -> None:
    """The benchmark's Winograd ablation is the fused extractor with direct convolutions put
    back: the same weights, no ``WinogradConv2d`` left, features equal to 1e-5; none for a
    backbone without Winograd convolutions."""
    from benchmarks.backbone_bench import with_direct_convolutions
    from fedpatch.backbone import FeatureExtractor
    from fedpatch.winograd import WinogradConv2d

    fused = FeatureExtractor("resnet50", pretrained=False)
    undone = with_direct_convolutions(fused)
    assert undone is not None
    assert not any(isinstance(m, WinogradConv2d) for m in undone.modules())
    assert sum(isinstance(m, WinogradConv2d) for m in fused.modules()) == 5  # the original is left alone
    fast = [m for m in fused.modules() if isinstance(m, WinogradConv2d)]
    direct = [m for m in undone.modules() if type(m) is torch.nn.Conv2d and m.kernel_size == (3, 3) and m.in_channels == 256 and m.stride == (1, 1)]
    assert len(direct) == 5 and all(torch.equal(d.weight, f.weight) and torch.equal(d.bias, f.bias) for d, f in zip(direct, fast))
    fused.stages[-1].apply(lambda m: setattr(m, "min_tiles", 0) if isinstance(m, WinogradConv2d) else None)
    _assert_same_features(undone, fused)
    assert with_direct_convolutions(FeatureExtractor("efficientnet_lite0", pretrained=False)) is None


def test_fit_memory_curve_table_and_plot(tmp_path: Path) -> None:
    """``benchmarks.fit_memory --curve``: its worker's counts at full 1000x750 scale (WRN-shaped
    stub features, so no backbone pass) and the table and PNG written from them."""
    from benchmarks.fit_memory import worker, write_curve

    rows = [worker(2, sized=True), worker(1, sized=True)]
    assert [r["patches"] for r in rows] == [23_500, 11_750]  # a 94x125 grid per image
    assert [r["bank_rows"] for r in rows] == [1639 + 712, 1175]  # one 16,384-row chunk and the rest, at 10 %
    assert all(r["peak_mb"] > r["bank_mb"] > 0 and r["fit_s"] >= r["extract_s"] + r["coreset_s"] for r in rows)
    out = tmp_path / "curve.md"
    write_curve(rows, out)
    table = [line for line in out.read_text().splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert [line.split(" | ")[1:3] for line in table] == [["11,750", "1,175"], ["23,500", "2,351"]]  # sorted by count
    assert "--curve 1 2`" in out.read_text()
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""The benchmark harness does not rot: the tiny suite runs end to end and its tables hold numbers."""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import numpy as np

from benchmarks.procmem import RssMonitor, current_rss_mb
from benchmarks.run import main, ratios_of, rows_of


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
    assert approx["image_auroc"] == ours["image_auroc"]
    assert theirs["impl"] == "anomalib" and theirs["status"].startswith("anomalib not importable")
    text = (tmp_path / "tiny.md").read_text()
    assert "| efficientnet_lite0 | magnetic | 64x64 | 3 | fedpatch |" in text


def test_ratios_favour_the_faster_implementation() -> None:
    spec = {"backbone": "wide_resnet50_2", "pretrained": False, "dataset": "synthetic", "size": [1000, 750], "n_train": 4}
    ours = {"spec": {**spec, "impl": "fedpatch"}, "fit_s": 10.0, "extract_s": 8.0, "coreset_s": 1.0, "predict_ips": 2.0,
            "backbone_ips": 2.5, "fit_peak_mb": 1000.0, "image_auroc": 0.9, "variants": {"hnsw": {"predict_ips": 2.4}}}
    theirs = {"spec": {**spec, "impl": "anomalib"}, "fit_s": 30.0, "extract_s": 8.0, "coreset_s": 22.0, "predict_ips": 1.0,
              "fit_peak_mb": 3000.0, "image_auroc": 0.85}
    ratios = ratios_of([ours, theirs])
    assert ratios is not None
    assert ratios["fit_speedup"] == 3.0 and ratios["coreset_speedup"] == 22.0 and ratios["predict_speedup"] == 2.0
    assert ratios["predict_vs_backbone"] == 0.8 and ratios["fit_memory_ratio"] == 3.0
    assert np.isclose(ratios["image_auroc_delta"], 0.05) and ratios["predict_speedup[hnsw]"] == 2.4
    assert [row["impl"] for row in rows_of(ours)] == ["fedpatch", "fedpatch index=hnsw"]
    assert rows_of(ours)[0]["backbone"] == "wide_resnet50_2 (random)"


def test_rss_monitor_sees_a_phase_peak() -> None:
    monitor = RssMonitor(cap_mb=None, on_cap=lambda phase, rss: None, interval=0.002)
    before = current_rss_mb()
    monitor.phase("alloc")
    block = np.ones(200 * 2**20 // 8)  # 200 MiB, touched
    time.sleep(0.1)
    assert monitor.peak("alloc") - before >= 190
    del block

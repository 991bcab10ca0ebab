"""Run a benchmark suite side by side (fedpatch and anomalib) and write its tables and plot.

    python -m benchmarks.run --suite main     # the matrix: backbones x resolutions x data sets
    python -m benchmarks.run --suite scaling  # fit time and peak memory against training images
    python -m benchmarks.run --suite index    # fedpatch: exact vs approximate bank search on large banks
    python -m benchmarks.run --suite gpu      # fedpatch on a CUDA GPU vs 2 CPU threads of the same machine
    python -m benchmarks.run --suite parity   # magnetic tiles, 70 training images, three coreset seeds each
    python -m benchmarks.run --suite precision  # the main matrix: fedpatch float32 and bfloat16 backbones, anomalib
    python -m benchmarks.run --suite tiny     # seconds; what tests/test_benchmarks.py runs

Each (configuration, implementation) pair runs in its own subprocess (``benchmarks.worker``),
fedpatch and anomalib one after the other on the same configuration (their order alternates
between configurations), so a busy machine slows both alike and the ratios stay meaningful.
anomalib runs with the Python of ``--anomalib-python`` (default: the ``.venv-bench`` made by
``make bench``); when anomalib is not importable there, its rows say so and fedpatch still runs.
Results: ``<out>/<suite>.json`` (raw), ``.csv`` and ``.md`` (tables with ratios); ``scaling``
also writes ``scaling.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.worker import Spec

REPO = Path(__file__).resolve().parents[1]
LITE, WRN = "efficientnet_lite0", "wide_resnet50_2"
APPROX_INDEXES = ["hnsw", "ivf"]
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
"""OMP_WAIT_POLICY=PASSIVE is what ``import fedpatch`` sets by default (fedpatch/backbone.py); the
workers import torch first, so it is set for both implementations here. No ``MALLOC_*``
variable: both implementations' workers import fedpatch and so run under its malloc settings
(``fedpatch.allocator``), except anomalib's greedy selection (``worker.greedy_allocator``)."""


MATRIX: list[dict[str, Any]] = [
    dict(backbone=LITE, dataset="magnetic", size=(256, 256), n_train=20),
    dict(backbone=WRN, pretrained=False, dataset="synthetic", size=(256, 256), n_train=10),
    dict(backbone=LITE, dataset="synthetic", size=(400, 400), n_train=8),
    dict(backbone=WRN, pretrained=False, dataset="synthetic", size=(400, 400), n_train=5),
    dict(backbone=LITE, dataset="synthetic", size=(1000, 750), n_train=2),
    dict(backbone=WRN, pretrained=False, dataset="synthetic", size=(1000, 750), n_train=2),
]
"""The configurations of ``--suite main`` (and, on a GPU, ``--suite gpu``)."""


def suite_specs(suite: str) -> list[list[Spec]]:
    """Groups of specs; the specs of a group share one configuration (one per implementation)."""
    anomalib = lambda **kw: Spec(impl="anomalib", coreset_timeout_s=300, **kw)  # noqa: E731
    pair = lambda **kw: [Spec(impl="fedpatch", **kw), anomalib(**kw)]  # noqa: E731
    if suite == "tiny":
        return [pair(backbone=LITE, dataset="magnetic", size=(64, 64), n_train=3, batch_size=2, predict_passes=2, predict_seconds=0.0)]
    if suite == "main":
        # training sets are small because anomalib's greedy coreset costs N^2 (71,680 patches took
        # it 218 s on quiet cores; benchmarks.coreset_bench covers that reference on its own)
        return [pair(**config) for config in MATRIX]
    if suite == "scaling":
        groups = []
        for n in (5, 10, 20):
            common = dict(backbone=WRN, pretrained=False, dataset="synthetic", size=(1000, 750), n_train=n, predict=False)
            # anomalib keeps every patch until the coreset (1536-d float32: 72 MB per image at 1000x750,
            # ~21 GB for 300 images); its greedy loop is stopped after 60 s and its time extrapolated
            groups.append([Spec(impl="fedpatch", **common), Spec(impl="anomalib", coreset_timeout_s=60, **common)])
        return groups
    if suite == "index":
        # approximate search pays off on large banks: fedpatch alone, exact vs hnsw vs ivf
        return [
            [Spec(impl="fedpatch", backbone=LITE, dataset="magnetic", size=(256, 256), n_train=70)],
            [Spec(impl="fedpatch", backbone=LITE, dataset="synthetic", size=(1000, 750), n_train=20)],
            [Spec(impl="fedpatch", backbone=WRN, pretrained=False, dataset="synthetic", size=(1000, 750), n_train=6)],
        ]
    if suite == "parity":
        # the real-data protocol of tests/test_core_realdata.py (70 training images) with three
        # coreset seeds each: how much of a difference in AUROC is the seed alone. anomalib runs
        # without the other suites' coreset deadline: a stopped selection leaves no bank to
        # score, and the scores are what this suite compares (its greedy took 247-252 s here)
        return [
            [Spec(impl="fedpatch", seed=seed, **{**MATRIX[0], "n_train": 70}), Spec(impl="anomalib", seed=seed, **{**MATRIX[0], "n_train": 70})]
            for seed in (0, 1, 2)
        ]
    if suite == "precision":
        # the backbone in bfloat16 (an option that changes results): speed and AUROC effect
        # against the float32 default and anomalib, same process order rules as the matrix
        bf16 = dict(label="bfloat16", options={"backbone_precision": "bfloat16"})
        return [[Spec(impl="fedpatch", **config), Spec(impl="fedpatch", **bf16, **config), anomalib(**config)] for config in MATRIX]
    if suite == "gpu":
        # fedpatch alone (anomalib's dependencies are not installed on the lent GPU machines);
        # each configuration of the matrix on the GPU and on 2 threads of the same machine's CPU,
        # the magnetic tiles with the full 70-image protocol of tests/test_core_realdata.py
        configs = [{**MATRIX[0], "n_train": 70}, *MATRIX[1:]]
        groups = [[Spec(impl="fedpatch", device="cuda", **c), Spec(impl="fedpatch", device="cpu", **c)] for c in configs]
        # realistic banks at 1000x750 (23,500 vectors): the CPU's exact search would take minutes per image
        groups += [
            [Spec(impl="fedpatch", device="cuda", backbone=LITE, dataset="synthetic", size=(1000, 750), n_train=20)],
            [Spec(impl="fedpatch", device="cuda", backbone=WRN, pretrained=False, dataset="synthetic", size=(1000, 750), n_train=20)],
        ]
        return groups
    raise ValueError(f"unknown suite {suite!r}")


def run_worker(spec: Spec, python: str, log: Path) -> dict[str, Any]:
    """Run one spec in a subprocess; return its result (status says what went wrong)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_file, out_file = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_file.write_text(json.dumps(asdict(spec)))
        start = time.perf_counter()
        with log.open("a") as handle:
            handle.write(f"\n===== {spec.impl} {spec.backbone} {spec.dataset} {spec.size} n={spec.n_train}\n")
            handle.flush()
            env = {**os.environ, **WORKER_ENV}
            proc = subprocess.run([python, "-m", "benchmarks.worker", str(spec_file), str(out_file)], cwd=REPO, stdout=handle, stderr=handle, env=env)
        if out_file.is_file():
            result = json.loads(out_file.read_text())
        else:
            result = {"spec": asdict(spec), "status": f"worker exited with status {proc.returncode} without a result"}
        if proc.returncode == 3 and not str(result.get("status", "")).startswith("out of memory"):
            result["status"] = "out of memory (cap)"
        result["wall_s"] = time.perf_counter() - start
        return result


def anomalib_available(python: str) -> bool:
    return subprocess.run([python, "-c", "import anomalib"], capture_output=True).returncode == 0


def rows_of(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Table rows of one result: the implementation, then one row per extra fedpatch index."""
    spec = result["spec"]
    base = {
        "backbone": spec["backbone"] + ("" if spec.get("pretrained", True) else " (random)"),
        "data": spec["dataset"],
        "size": "x".join(map(str, spec["size"])),
        "n_train": spec["n_train"],
    }
    keys = ("fit_s", "extract_s", "coreset_s", "coreset_projected_s", "index_s", "fit_cpu_s", "predict_passes", "predict_ips", "predict_cpu_ips", "backbone_ips", "backbone_cpu_ips", "fit_peak_mb", "predict_peak_mb", "fit_gpu_mb", "predict_gpu_mb", "warmup_s", "bank_size", "image_auroc", "pixel_auroc", "recall_at_1")
    impl = f"{spec['impl']} {spec['label']}" if spec.get("label") else spec["impl"]
    main = {**base, "impl": impl, "device": result.get("device_name", spec.get("device", "cpu")), **{k: result.get(k) for k in keys}, "status": result.get("status")}
    if spec.get("seed") is not None:
        main["seed"] = spec["seed"]
    rows = [main]
    for index, variant in (result.get("variants") or {}).items():
        row = {**main, "impl": f"fedpatch index={index}", **{k: variant.get(k) for k in ("index_s", "predict_passes", "predict_ips", "predict_cpu_ips", "backbone_ips", "backbone_cpu_ips", "predict_peak_mb", "image_auroc", "pixel_auroc", "recall_at_1")}}
        row.update(fit_s=None, extract_s=None, coreset_s=None, fit_cpu_s=None, fit_peak_mb=None)
        rows.append(row)
    return rows


def ratios_of(group: list[dict[str, Any]]) -> dict[str, Any] | None:
    """fedpatch vs anomalib on one configuration (higher is better for fedpatch).

    A labelled fedpatch variant of the group (``Spec.label``, e.g. the bfloat16 backbone) adds
    its own speed ratios against anomalib and its AUROC change against unlabelled fedpatch.
    """
    by_impl = {r["spec"]["impl"]: r for r in group if not r["spec"].get("label")}
    ours, theirs = by_impl.get("fedpatch"), by_impl.get("anomalib")
    if ours is None or theirs is None:
        return None

    def ratio(a: Any, b: Any) -> float | None:
        return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None

    spec = ours["spec"]
    their_fit = theirs.get("fit_s") or _projected_fit(theirs)
    out = {
        "config": f"{spec['backbone']} {spec['dataset']} {'x'.join(map(str, spec['size']))} n={spec['n_train']}",
        "fit_speedup": ratio(their_fit, ours.get("fit_s")),
        "extract_speedup": ratio(theirs.get("extract_s"), ours.get("extract_s")),
        "coreset_speedup": ratio(theirs.get("coreset_s") if "coreset_projected_s" not in theirs else theirs["coreset_projected_s"], ours.get("coreset_s")),
        "fit_speedup_cpu": ratio(theirs.get("fit_cpu_s"), ours.get("fit_cpu_s")),
        "predict_speedup": ratio(ours.get("predict_ips"), theirs.get("predict_ips")),
        "predict_speedup_cpu": ratio(ours.get("predict_cpu_ips"), theirs.get("predict_cpu_ips")),
        "predict_vs_backbone": ratio(ours.get("predict_ips"), ours.get("backbone_ips")),
        "predict_vs_backbone_cpu": ratio(ours.get("predict_cpu_ips"), ours.get("backbone_cpu_ips")),
        "predict_vs_backbone_by_pass": " / ".join(f"{r:.2f}" for r in ours.get("predict_vs_backbone_passes") or []) or None,
        "fit_memory_ratio": ratio(theirs.get("fit_peak_mb"), ours.get("fit_peak_mb")),
        "image_auroc_delta": (ours.get("image_auroc") - theirs.get("image_auroc")) if isinstance(ours.get("image_auroc"), float) and isinstance(theirs.get("image_auroc"), float) else None,
    }
    for index, variant in (ours.get("variants") or {}).items():
        out[f"predict_speedup[{index}]"] = ratio(variant.get("predict_ips"), theirs.get("predict_ips"))
        out[f"predict_vs_backbone[{index}]"] = ratio(variant.get("predict_ips"), variant.get("backbone_ips"))
        out[f"predict_speedup_cpu[{index}]"] = ratio(variant.get("predict_cpu_ips"), theirs.get("predict_cpu_ips"))
        out[f"predict_vs_backbone_cpu[{index}]"] = ratio(variant.get("predict_cpu_ips"), variant.get("backbone_cpu_ips"))
    for variant in (r for r in group if r["spec"]["impl"] == "fedpatch" and r["spec"].get("label")):
        name = variant["spec"]["label"]
        out[f"fit_speedup[{name}]"] = ratio(their_fit, variant.get("fit_s"))
        out[f"predict_speedup[{name}]"] = ratio(variant.get("predict_ips"), theirs.get("predict_ips"))
        out[f"predict_speedup_cpu[{name}]"] = ratio(variant.get("predict_cpu_ips"), theirs.get("predict_cpu_ips"))
        out[f"predict_vs_default[{name}]"] = ratio(variant.get("predict_ips"), ours.get("predict_ips"))
        for metric in ("image_auroc", "pixel_auroc"):
            mine, base = variant.get(metric), ours.get(metric)
            out[f"{metric}_change[{name}]"] = mine - base if isinstance(mine, float) and isinstance(base, float) else None
    return out


def gpu_ratios_of(group: list[dict[str, Any]]) -> dict[str, Any] | None:
    """fedpatch on the GPU vs on the CPU, one configuration (higher favours the GPU)."""
    by_device = {r["spec"].get("device", "cpu"): r for r in group}
    gpu, cpu = by_device.get("cuda"), by_device.get("cpu")
    if gpu is None or cpu is None or gpu.get("status") != "ok" or cpu.get("status") != "ok":
        return None
    spec = gpu["spec"]
    return {
        "config": f"{spec['backbone']} {spec['dataset']} {'x'.join(map(str, spec['size']))} n={spec['n_train']}",
        "fit_speedup": cpu["fit_s"] / gpu["fit_s"],
        "extract_speedup": cpu["extract_s"] / gpu["extract_s"],
        "coreset_speedup": cpu["coreset_s"] / gpu["coreset_s"],
        "predict_speedup": gpu["predict_ips"] / cpu["predict_ips"],
        "predict_vs_backbone_gpu": gpu["predict_ips"] / gpu["backbone_ips"],
        "predict_vs_backbone_cpu": cpu["predict_ips"] / cpu["backbone_ips"],
        "image_auroc_delta": gpu["image_auroc"] - cpu["image_auroc"],
        "pixel_auroc_delta": gpu["pixel_auroc"] - cpu["pixel_auroc"],
    }


def _projected_fit(result: dict[str, Any]) -> float | None:
    """anomalib's fit time when its greedy loop was stopped: extraction + extrapolated coreset."""
    if "coreset_projected_s" in result and "extract_s" in result:
        return result["extract_s"] + result["coreset_projected_s"]
    return None


def fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.1e}"  # a relative error or a rate near zero, not "0.000"
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(row.get(k)) for k in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_rows(out: Path, name: str, title: str, caption: str, rows: list[dict[str, Any]], **header: Any) -> None:
    """A standalone benchmark's results: ``<name>.json`` (``header`` plus ``rows``) and
    ``<name>.md`` (``# title``, ``caption``, the rows as a table), in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({**header, "rows": rows}, indent=1))
    (out / f"{name}.md").write_text("\n".join([f"# {title}", "", caption, "", markdown(rows)]))


def write_tables(suite: str, groups: list[list[dict[str, Any]]], out: Path, command: str) -> None:
    rows = [row for group in groups for result in group for row in rows_of(result)]
    ratios = [r for r in (ratios_of(group) for group in groups) if r is not None]
    gpu_ratios = [r for r in (gpu_ratios_of(group) for group in groups) if r is not None]
    (out / f"{suite}.json").write_text(json.dumps(groups, indent=1))
    with (out / f"{suite}.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)
    text = [f"# benchmark suite `{suite}`\n", f"Command: `{command}`\n", "Times in seconds (wall clock; `_cpu` = process CPU time, less sensitive to other load on the machine), memory = peak resident set size (MiB) of the phase, in its own process; predict and backbone in images per second.\n", markdown(rows)]
    if ratios:
        text += ["\n## fedpatch vs anomalib (ratios > 1 favour fedpatch; predict_vs_backbone = fedpatch predict / its backbone forward alone, over all passes and pass by pass; `[label]` columns: a fedpatch variant, its speed against anomalib, its predict speed against fedpatch's default (`predict_vs_default`) and its AUROC change against fedpatch's default)\n", markdown(ratios)]
    if gpu_ratios:
        text += ["\n## fedpatch on the GPU vs 2 threads of the same machine's CPU (ratios > 1 favour the GPU; `_gpu_mb` = peak GPU memory torch allocated)\n", markdown(gpu_ratios)]
    (out / f"{suite}.md").write_text("\n".join(text))


def plot_scaling(groups: list[list[dict[str, Any]]], out: Path) -> None:
    """Fit time, coreset time and peak fit memory against training images, per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for impl, marker in (("fedpatch", "o"), ("anomalib", "s")):
        results = [r for g in groups for r in g if r["spec"]["impl"] == impl]
        timed = [(r["spec"]["n_train"], r.get("fit_s") or _projected_fit(r), r.get("coreset_s") if "coreset_projected_s" not in r else r["coreset_projected_s"]) for r in results]
        timed = [t for t in timed if t[1] is not None]
        style = "--" if any("coreset_projected_s" in r for r in results) else "-"
        label = impl + (" (coreset extrapolated)" if style == "--" else "")
        axes[0].plot([t[0] for t in timed], [t[1] for t in timed], style, marker=marker, label=label)
        axes[1].plot([t[0] for t in timed], [t[2] for t in timed], style, marker=marker, label=label)
        mem = [(r["spec"]["n_train"], r.get("fit_peak_mb")) for r in results if r.get("fit_peak_mb")]
        axes[2].plot([m[0] for m in mem], [m[1] / 1024 for m in mem], marker=marker, label=impl)
        for r in results:
            if str(r.get("status")).startswith("out of memory"):
                axes[2].annotate("OOM cap", (r["spec"]["n_train"], (r.get("fit_peak_mb") or 0) / 1024), fontsize=7)
    for ax, title in zip(axes, ("fit time (s)", "coreset time (s)", "peak fit RSS (GiB)")):
        ax.set_xlabel("training images (1000x750)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("wide_resnet50_2 (random weights), layers 2+3, coreset 10 %, 2 CPU threads")
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=("tiny", "main", "scaling", "index", "gpu", "parity", "precision"), default="main")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--anomalib-python", default=str(REPO / ".venv-bench" / "bin" / "python"))
    parser.add_argument("--fedpatch-python", default=sys.executable)
    parser.add_argument("--indexes", nargs="*", default=None, help="extra fedpatch bank indexes to score (default: hnsw ivf for main)")
    parser.add_argument("--only", type=int, nargs="*", default=None, help="run only these configuration numbers (0-based)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    log = Path(tempfile.gettempdir()) / f"fedpatch-bench-{args.suite}.log"  # workers' output, not a result
    print(f"worker output: {log}", flush=True)
    have_anomalib = Path(args.anomalib_python).exists() and anomalib_available(args.anomalib_python)
    indexes = args.indexes if args.indexes is not None else (APPROX_INDEXES if args.suite in ("main", "index") else [])
    groups: list[list[dict[str, Any]]] = []
    specs = suite_specs(args.suite)
    for number, group in enumerate(specs):
        if args.only is not None and number not in args.only:
            continue
        if number % 2:
            group = group[::-1]  # alternate the order: neither implementation always runs first
        results = []
        for spec in group:
            if spec.impl == "fedpatch":
                spec.indexes = list(indexes) if spec.predict else []
            label = f"[{number + 1}/{len(specs)}] {spec.impl}{' ' + spec.label if spec.label else ''} ({spec.device}) {spec.backbone} {spec.dataset} {spec.size[0]}x{spec.size[1]} n={spec.n_train}"
            if spec.impl == "anomalib" and not have_anomalib:
                results.append({"spec": asdict(spec), "status": f"anomalib not importable with {args.anomalib_python}"})
                continue
            print(label, "...", flush=True)
            python = args.anomalib_python if spec.impl == "anomalib" else args.fedpatch_python
            result = run_worker(spec, python, log)
            print(f"    {result.get('status')} in {result['wall_s']:.0f} s: fit {fmt(result.get('fit_s'))} s, predict {fmt(result.get('predict_ips'))} img/s, peak {fmt(result.get('fit_peak_mb'))} MiB", flush=True)
            results.append(result)
        groups.append(sorted(results, key=lambda r: r["spec"]["impl"] != "fedpatch"))
        write_tables(args.suite, groups, args.out, "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]))
        if args.suite == "scaling":
            plot_scaling(groups, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

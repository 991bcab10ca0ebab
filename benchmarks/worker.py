"""One benchmark measurement in its own process: fit + predict of one implementation.

``python -m benchmarks.worker SPEC_JSON OUT_JSON`` reads a spec (implementation, backbone,
layers, data set, resolution, training images, coreset ratio, options), runs it, and writes
one JSON result: fit time split into feature extraction / coreset / index build, predict
images per second, backbone-only images per second (fedpatch runs only), peak RSS of the fit
and predict phases, bank size, image and pixel AUROC, and recall@1 of an approximate index.

Both implementations see the same images (``benchmarks.data``), the same backbone weights
(anomalib's timm extractor is loaded with fedpatch's weights and checked to give the same
feature maps), the same layers, neighbourhood, resolution, coreset ratio and batch size, and
two torch threads. anomalib is driven through its ``PatchcoreModel`` torch module, the code
its Lightning module calls (``training_step``, ``fit``, ``validation_step``), without the
Lightning engine's own overhead.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmarks import data as bench_data
from benchmarks.procmem import RssMonitor, lifetime_peak_mb
from fedpatch import allocator

PREDICT_PASSES = 3
"""Least timed passes over the test images, for both implementations. A 1000x750 configuration
scores 12 images in two groups, so one pass is two timings of each kind; in two runs of the
main suite on the same code (2026-11-24) a single pass read fedpatch's predict vs backbone
0.86 and 0.80 on one row and 0.94 and 0.79 on another. The scores and AUROCs come from the
first pass; the throughputs from all of them."""
PREDICT_SECONDS = 15.0
"""Least timed prediction (seconds) of the default configuration, for both implementations:
passes are added, up to ``MAX_PREDICT_PASSES``, until it is reached, so a row whose pass takes
a second or two is timed over 7-15 passes instead of three. On lite0 1000x750 (1.5-2 s per
pass) ten passes in a row read predict vs backbone 0.80-0.94 pass by pass (standard
deviation 0.044); any three of them in a row 0.84-0.90, any eight 0.86-0.87 (2026-11-25)."""
MAX_PREDICT_PASSES = 30
GREEDY_MALLOC = (1 << 20, 128 << 10)
"""glibc thresholds (mmap, trim) while anomalib's KCenterGreedy runs: a fixed 1 MiB mmap
threshold, as ``MALLOC_MMAP_THRESHOLD_=1048576`` gives. Its per-pick N x d temporaries then
get fresh mappings, which is stable but costs page faults. With them kept on the heap it is
fast when it works and unstable: on 2026-11-23, under a fixed 32 MiB threshold (the ceiling of
glibc's dynamic one) a 20,480 x 448 selection took 2.3 s alone, but inside the benchmarks it
ran past the 16 GiB address-space cap of ``coreset_bench`` and the 9 GB cap of a main-suite
worker (lite0 400x400); under fedpatch's 256 MiB threshold a 71,680-row selection reached
15 GB in 262 picks. Under this 1 MiB setting the same 20,480 x 448 selection took 17-22 s
that day (10 million page faults) against 3.9 s in the run of ``results/coreset.md``: the
page faults' cost moves with the machine's state, and so do the coreset ratios on the
20,480-row sets. The 71,680-row reference set is not affected: its 79 MB temporaries are
above glibc's own ceiling, so they are mapped afresh under its defaults too."""


@contextmanager
def greedy_allocator() -> Iterator[None]:
    """Run anomalib's greedy selection under ``GREEDY_MALLOC``; the settings fedpatch keeps
    outside its own calls (``fedpatch.allocator``) come back afterwards."""
    allocator.configure(*GREEDY_MALLOC)
    try:
        yield
    finally:
        allocator.restore_outside()


@dataclass
class Spec:
    """What one worker measures."""

    impl: str  # "fedpatch" or "anomalib"
    backbone: str  # fedpatch name: "efficientnet_lite0" or "wide_resnet50_2"
    dataset: str  # "magnetic" or "synthetic"
    size: tuple[int, int]  # (W, H)
    n_train: int
    pretrained: bool = True
    coreset_ratio: float = 0.1
    batch_size: int = 8
    predict: bool = True
    options: dict[str, Any] = field(default_factory=dict)  # extra PatchCore options (fedpatch only)
    indexes: list[str] = field(default_factory=list)  # fedpatch: also score with these bank indexes
    label: str = ""  # variant name in the tables
    device: str = "cpu"  # fedpatch: "cpu" or "cuda" (anomalib runs on the CPU)
    seed: int | None = None  # coreset seed (None: fedpatch's default 42, anomalib's torch seed 0)
    cap_mb: float = 9000.0
    coreset_timeout_s: float | None = None  # anomalib: stop the greedy loop after this long
    predict_passes: int = PREDICT_PASSES  # least timed passes over the test images (scores from the first)
    predict_seconds: float = PREDICT_SECONDS  # least timed prediction of the default configuration


def _write(out: Path, result: dict[str, Any]) -> None:
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)


def _scores_and_metrics(labels: list[int], scores: list[float], acc: Any) -> dict[str, float]:
    from fedpatch.metrics import image_auroc

    out = {"image_auroc": float("nan"), "pixel_auroc": float("nan")}
    if 0 < sum(labels) < len(labels):
        out["image_auroc"] = image_auroc(np.array(scores), np.array(labels))
    summary = acc.summary()
    if summary.positive_count.sum() > 0:
        from fedpatch.metrics import _auroc_from_counts

        counts = acc.negative_counts(summary.values)
        out["pixel_auroc"] = _auroc_from_counts(summary.positive_count, counts.n_ge, counts.n_gt, summary.n_negative)
    return out


# ------------------------------------------------------------------------------------------ fedpatch
def run_fedpatch(spec: Spec, bench: bench_data.BenchData, mon: RssMonitor, result: dict[str, Any]) -> None:
    from fedpatch import PatchCore
    from fedpatch.coreset import greedy_coreset_indices

    model = PatchCore(
        spec.backbone, coreset_percentage=spec.coreset_ratio, device=spec.device, pretrained=spec.pretrained,
        batch_size=spec.batch_size, progress=True, **({"seed": spec.seed} if spec.seed is not None else {}), **spec.options,
    )
    cuda = model.device.type == "cuda"
    result["device_name"] = torch.cuda.get_device_name(model.device) if cuda else "cpu"
    start = time.perf_counter()
    with torch.no_grad():  # warm-up: first-call allocations and kernel choices are not timed
        model.embed(torch.zeros(1, 3, *reversed(spec.size), device=model.device))
        if cuda:  # and the GPU's lazily loaded kernels of the greedy selection
            greedy_coreset_indices(torch.rand(64, model.feature_dim, device=model.device), 4)
    result["warmup_s"] = time.perf_counter() - start
    result["rss_model_mb"] = mon.peak("start")
    mon.phase("fit")
    _reset_gpu_peak(cuda)
    start, cpu = time.perf_counter(), time.process_time()
    model.fit(bench.train_images())
    result["fit_s"], result["fit_cpu_s"] = time.perf_counter() - start, time.process_time() - cpu
    stats = model.fit_stats
    result.update(extract_s=stats.extract_seconds, coreset_s=stats.coreset_seconds, index_s=stats.index_seconds)
    result.update(bank_size=stats.bank_size, patches=stats.patches_seen, fit_peak_mb=mon.peak("fit"), fit_gpu_mb=_gpu_peak(cuda))
    if not spec.predict:
        return
    images = bench.test_images()
    if cuda:  # one untimed batch: the search and post-processing kernels load on first use
        start = time.perf_counter()
        list(model.iter_predictions(images[: spec.batch_size]))
        result["warmup_s"] += time.perf_counter() - start
    _reset_gpu_peak(cuda)
    _predict_fedpatch(model, bench, images, (spec.predict_passes, spec.predict_seconds), mon, result)
    result["predict_gpu_mb"] = _gpu_peak(cuda)
    bank = model.get_memory_bank()
    result["variants"] = {}
    for index in spec.indexes:
        variant: dict[str, Any] = {}
        model.config.index = index
        start = time.perf_counter()
        model.set_memory_bank(bank)
        variant["index_s"] = time.perf_counter() - start
        _predict_fedpatch(model, bench, images, (spec.predict_passes, 0.0), mon, variant)
        variant["recall_at_1"] = _recall_at_1(model, images[: max(2, len(images) // 4)])
        result["variants"][index] = variant


def _reset_gpu_peak(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _gpu_peak(cuda: bool) -> float | None:
    """Peak GPU memory (MiB) allocated by torch since the last reset, or None on the CPU."""
    return torch.cuda.max_memory_allocated() / 2**20 if cuda else None


def timed(work: Callable[[], Any]) -> tuple[Any, float, float]:
    """Run ``work``; return its result, wall seconds and process CPU seconds."""
    start, cpu = time.perf_counter(), time.process_time()
    out = work()
    return out, time.perf_counter() - start, time.process_time() - cpu


def enough_passes(done: int, seconds: float, least: tuple[int, float]) -> bool:
    """Whether ``done`` passes that took ``seconds`` of prediction meet ``least`` (passes,
    seconds); ``MAX_PREDICT_PASSES`` always do."""
    passes, wanted = least
    return done >= MAX_PREDICT_PASSES or (done >= max(1, passes) and seconds >= wanted)


def _predict_fedpatch(model: Any, bench: bench_data.BenchData, images: list[torch.Tensor], least: tuple[int, float], mon: RssMonitor, result: dict[str, Any]) -> None:
    """Score ``images`` and time the backbone forward alone on the same batches.

    The backbone alone is the ceiling of predict throughput. Each group of ``batch_size``
    images goes through both, one right after the other (backbone first on even groups,
    prediction first on odd ones), so the two timings of a group see the same machine state.
    With a separate backbone pass after the whole prediction, one configuration's ratio read
    0.63 in one run and 0.75-0.82 in three reruns on these shared machines. The images are
    gone through until ``least`` (passes, seconds of prediction) is met (``enough_passes``),
    scores kept from the first pass. Records images per second of both over all passes (wall
    and process CPU time; metric bookkeeping excluded), each pass's predict-vs-backbone ratio,
    peak RSS and the AUROCs.
    """
    from fedpatch.metrics import PixelAccumulator
    from fedpatch.patchcore import iter_image_batches

    cuda = model.device.type == "cuda"
    group = model.config.batch_size
    seconds = dict.fromkeys(("predict", "predict_cpu", "backbone", "backbone_cpu"), 0.0)

    def backbone_alone(chunk: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for batch in iter_image_batches(chunk, group):
                model.extractor(batch.to(model.device))
        if cuda:
            torch.cuda.synchronize(model.device)  # the forward is asynchronous on a GPU

    def add_time(name: str, work: Callable[[], Any]) -> Any:
        out, wall, cpu = timed(work)
        seconds[name] += wall
        seconds[name + "_cpu"] += cpu
        return out

    mon.phase("predict")
    acc, scores = PixelAccumulator(), []
    starts = list(enumerate(range(0, len(images), group)))
    pass_ratios: list[float] = []
    shown, model.progress = model.progress, False  # one bar for all passes instead of one per group
    try:
        with tqdm(desc="predict + backbone alone", unit="group") as bar:
            while not enough_passes(len(pass_ratios), seconds["predict"], least):
                before = dict(seconds)  # the pass's own times: the differences at its end
                for number, first in starts:
                    chunk = images[first : first + group]
                    if number % 2 == 0:
                        add_time("backbone", lambda: backbone_alone(chunk))
                    predictions = add_time("predict", lambda: list(model.iter_predictions(chunk)))
                    if number % 2 == 1:
                        add_time("backbone", lambda: backbone_alone(chunk))
                    if not pass_ratios:  # the first pass: scores and metrics
                        for offset, prediction in enumerate(predictions):
                            item = first + offset
                            scores.append(prediction.score)
                            acc.add_masked(prediction.anomaly_map, bench.test_mask(item) if bench.test[item].label else None)
                    bar.update()
                pass_ratios.append((seconds["backbone"] - before["backbone"]) / (seconds["predict"] - before["predict"]))
                bar.set_postfix(passes=len(pass_ratios))
    finally:
        model.progress = shown
    count = len(images) * len(pass_ratios)
    result.update({f"{name}_ips": count / seconds[name] for name in ("predict", "backbone")})
    result.update({f"{name}_cpu_ips": count / seconds[name + "_cpu"] for name in ("predict", "backbone")})
    result.update(predict_passes=len(pass_ratios), predict_vs_backbone_passes=pass_ratios, predict_peak_mb=mon.peak("predict"))
    result.update(_scores_and_metrics([item.label for item in bench.test], scores, acc))


def _recall_at_1(model: Any, images: list[torch.Tensor]) -> float:
    """Share of test patches whose approximate nearest bank vector is the exact one."""
    import faiss

    from fedpatch.features import extract_patch_features
    from fedpatch.patchcore import iter_image_batches

    bank = model.memory_bank
    hits = total = 0
    for batch in iter_image_batches(images, model.config.batch_size):
        patches = extract_patch_features(model.embed(batch)).float().cpu().numpy()
        _, approx = bank.search(patches, k=1)
        exact_d, exact = faiss.knn(patches, np.ascontiguousarray(bank.vectors), 1)
        approx_d = ((patches - bank.vectors[approx[:, 0]]) ** 2).sum(1)
        hits += int(((approx[:, 0] == exact[:, 0]) | np.isclose(approx_d, exact_d[:, 0], rtol=1e-5)).sum())
        total += len(patches)
    return hits / total


# ------------------------------------------------------------------------------------------ anomalib
ANOMALIB_BACKBONE = {"efficientnet_lite0": "tf_efficientnet_lite0", "wide_resnet50_2": "wide_resnet50_2"}
STEM_NAMES = {"efficientnet_lite0": ("conv_stem", "bn1"), "wide_resnet50_2": ("conv1", "bn1")}


def _stage_of(key: str) -> str:
    """The stage a timm state-dict key belongs to: ``blocks.5.0.bn1.weight`` -> ``blocks.5``."""
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]


def _anomalib_model(spec: Spec, extractor: Any) -> Any:
    """anomalib's PatchcoreModel on the same backbone, layers and weights as fedpatch's ``extractor``."""
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    model = PatchcoreModel(layers=list(extractor.layers), backbone=ANOMALIB_BACKBONE[spec.backbone], pre_trained=False, num_neighbors=9)
    state = {}
    stem = STEM_NAMES[spec.backbone]
    for key, value in extractor.state_dict().items():
        _, index, rest = key.split(".", 2)
        name = extractor.stage_names[int(index)]
        if name == "stem":
            sub, tail = rest.split(".", 1)
            state[f"{stem[int(sub)]}.{tail}"] = value
        else:
            state[f"{name}.{rest}"] = value
    target = model.feature_extractor.feature_extractor
    missing, _ = target.load_state_dict(state, strict=False)
    # timm's features_only EfficientNet keeps the blocks after the deepest requested layer (they
    # run, their outputs are unused): only keys of the stages fedpatch builds must be loaded.
    built = set(STEM_NAMES[spec.backbone]) | set(extractor.stage_names)
    missing = [key for key in missing if _stage_of(key) in built]
    if missing:
        raise RuntimeError(f"anomalib backbone keys not loaded from fedpatch's weights: {missing[:5]}")
    probe = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        ours = extractor(probe)
        theirs = model.feature_extractor(extractor.normalize(probe))
    for layer in extractor.layers:
        if not torch.allclose(ours[layer], theirs[layer], rtol=1e-3, atol=1e-4):
            raise RuntimeError(f"anomalib's {layer} features differ from fedpatch's: the weights were not mapped")
    return model


def run_anomalib(spec: Spec, bench: bench_data.BenchData, mon: RssMonitor, result: dict[str, Any], out: Path) -> None:
    from anomalib.models.components.sampling import k_center_greedy

    from fedpatch.backbone import FeatureExtractor
    from fedpatch.metrics import PixelAccumulator
    from fedpatch.patchcore import iter_image_batches

    extractor = FeatureExtractor(spec.backbone, pretrained=spec.pretrained, fuse=False)  # timm key layout
    model = _anomalib_model(spec, extractor)
    normalize = extractor.normalize
    del extractor
    with torch.no_grad():  # warm-up, as for fedpatch
        model.feature_extractor(torch.zeros(1, 3, *reversed(spec.size)))
    result["rss_model_mb"] = mon.peak("start")
    mon.phase("fit")
    model.train()
    start, cpu = time.perf_counter(), time.process_time()
    with tqdm(total=len(bench.train), desc="anomalib fit: features", unit="img") as bar:
        for batch in iter_image_batches(bench.train_images(), spec.batch_size):
            model(normalize(batch))
            bar.update(batch.shape[0])
    result["extract_s"], extract_cpu = time.perf_counter() - start, time.process_time() - cpu
    result["patches"] = int(sum(e.shape[0] for e in model.embedding_store))
    result["fit_peak_extract_mb"] = mon.peak("fit")
    _write(out, {**result, "status": "running coreset"})
    if spec.coreset_timeout_s is not None:
        k_center_greedy.tqdm = _deadline_tqdm(spec.coreset_timeout_s)
    torch.manual_seed(spec.seed or 0)  # anomalib draws its first pick from torch's global generator
    start, cpu = time.perf_counter(), time.process_time()
    try:
        with greedy_allocator():
            model.subsample_embedding(spec.coreset_ratio)
    except _Deadline as stop:
        result["coreset_s"] = time.perf_counter() - start
        result["status"] = f"coreset stopped after {spec.coreset_timeout_s:.0f} s ({stop.done} of {stop.total} picks)"
        result["coreset_projected_s"] = result["coreset_s"] * stop.total / max(stop.done, 1)
        result["fit_peak_mb"] = mon.peak("fit")
        return
    result["coreset_s"] = time.perf_counter() - start
    result["index_s"] = 0.0
    result["fit_s"] = result["extract_s"] + result["coreset_s"]
    result["fit_cpu_s"] = extract_cpu + time.process_time() - cpu
    result.update(bank_size=int(model.memory_bank.shape[0]), fit_peak_mb=mon.peak("fit"))
    if not spec.predict:
        return
    images = bench.test_images()
    model.eval()
    mon.phase("predict")
    acc, scores = PixelAccumulator(), []
    predict_s = predict_cpu = 0.0
    passes = 0  # as fedpatch's default configuration: until (predict_passes, predict_seconds); scores from the first
    while not enough_passes(passes, predict_s, (spec.predict_passes, spec.predict_seconds)):
        index = 0
        start, cpu = time.perf_counter(), time.process_time()
        for batch in iter_image_batches(images, spec.batch_size):  # batching timed, as in fedpatch's predict
            batch_scores, maps = anomalib_predict(model, normalize, batch)
            predict_s, predict_cpu = predict_s + time.perf_counter() - start, predict_cpu + time.process_time() - cpu
            if passes == 0:
                for score, amap in zip(batch_scores, maps):
                    scores.append(score)
                    acc.add_masked(amap, bench.test_mask(index) if bench.test[index].label else None)
                    index += 1
            start, cpu = time.perf_counter(), time.process_time()
        passes += 1
    count = len(images) * passes
    result.update(predict_ips=count / predict_s, predict_cpu_ips=count / predict_cpu, predict_passes=passes, predict_peak_mb=mon.peak("predict"))
    result.update(_scores_and_metrics([item.label for item in bench.test], scores, acc))


def anomalib_predict(model: Any, normalize: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor) -> tuple[list[float], np.ndarray]:
    """anomalib's ``PatchcoreModel`` (eval mode) on one batch: image scores and ``[B, H, W]`` maps."""
    with torch.no_grad():
        output = model(normalize(batch))
    return [float(score) for score in output.pred_score], output.anomaly_map.squeeze(1).numpy()


class _Deadline(Exception):
    def __init__(self, done: int, total: int) -> None:
        super().__init__(f"{done}/{total}")
        self.done, self.total = done, total


def _deadline_tqdm(seconds: float) -> Any:
    """A tqdm stand-in for anomalib's greedy loop that raises ``_Deadline`` after ``seconds``."""

    def wrapped(iterable: Any, **kwargs: Any) -> Any:
        items = list(iterable)
        start = time.perf_counter()
        for done, item in enumerate(tqdm(items, **kwargs)):
            if time.perf_counter() - start > seconds:
                raise _Deadline(done, len(items))
            yield item

    return wrapped


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str]) -> int:
    spec_dict = json.loads(Path(argv[0]).read_text())
    spec_dict["size"] = tuple(spec_dict["size"])
    spec = Spec(**spec_dict)
    out = Path(argv[1])
    torch.set_num_threads(2)
    result: dict[str, Any] = {"spec": spec_dict, "status": "running"}

    def on_cap(phase: str, rss: float) -> None:
        _write(out, {**result, "status": f"out of memory: RSS {rss:.0f} MiB above the {spec.cap_mb:.0f} MiB cap during {phase}",
                     "fit_peak_mb": rss})

    mon = RssMonitor(spec.cap_mb, on_cap)
    try:
        bench = bench_data.load(spec.dataset, spec.size, spec.n_train)
        if spec.impl == "fedpatch":
            run_fedpatch(spec, bench, mon, result)
        elif spec.impl == "anomalib":
            run_anomalib(spec, bench, mon, result, out)
        else:
            raise ValueError(f"unknown implementation {spec.impl!r}")
        if result["status"] == "running":
            result["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - the error goes into the result table
        traceback.print_exc()
        result["status"] = f"error: {type(exc).__name__}: {exc}"
    result["lifetime_peak_mb"] = lifetime_peak_mb()
    _write(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

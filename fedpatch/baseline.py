"""The centralized baseline: train and evaluate objects one after the other (``fedpatch train``).

Each object goes through the steps of :mod:`fedpatch.workflow` with ONE participant, so its
bank is exactly the bank of a one-client federation:

1. ``fit_local`` on the object's good training images, minus a held-out calibration share
   (``split_calibration``: ``data.calibration_fraction``, seeded by ``model.seed``);
2. ``aggregate_banks`` over that one bank with a global ratio of 1.0 (the bank unchanged);
3. ``PatchCore.set_memory_bank`` with the aggregated bank;
4. ``calibration_scores`` / ``threshold_from_scores`` on the held-out images (no test labels);
5. ``score_local`` over the test split, then ``pooled_metrics`` (exact metrics).

Outputs under ``output_dir``::

    config.yaml                              the resolved configuration of the run
    run.json                                 data folder, command, fedpatch version
    logs/training.log                        per object: images, patches, bank, timings, metrics
    models/patchcore_<object>.pt             safetensors model (bank, config, threshold, input size)
    maps/<object>/<defect>/<stem>.npy|.png   float map and 16-bit PNG at native size (official layout)
    maps/<object>/image_scores.json          image scores, read by the maps evaluator
    overlays/<object>/<defect>_<stem>.png    heat map over the image, threshold contour (defective first)
    <object>/metrics.json                    official form + threshold, timings, memory under "fedpatch"
    <object>/spro_curve.png, score_histogram.png
    results.csv, results.md                  one row per object + the mean row, with references

Resuming: an object is skipped ("skipping <object>: done") when its ``metrics.json`` and model
file exist and the metrics were produced with the same result-relevant configuration (the
``model``, ``data`` and ``evaluation`` sections; ``runtime`` and ``federated`` do not change a
centralized result) on the same data folder. A run whose configuration or data folder differs
from the one already in ``output_dir`` is refused unless ``force``; ``force`` also retrains
objects that are done. Every file is written atomically (temporary file, then rename).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm.auto import tqdm

from fedpatch import __version__
from fedpatch.aggregation import aggregate_banks
from fedpatch.config import ADDED_KEYS, RunConfig, dump_config, identity, load_config
from fedpatch.data import list_objects, load_image
from fedpatch.data.io import SampleRecord
from fedpatch.errors import ConfigError, DataError
from fedpatch.atomic import atomic_write_json, atomic_write_text
from fedpatch.maps_io import export_png_maps, map_path, write_float_map, write_image_scores
from fedpatch.metrics import metrics_json
from fedpatch.overlay import colour_range, save_overlay, union_mask
from fedpatch.patchcore import PatchCore
from fedpatch.report import HISTOGRAM_FILE, PEAK_MEMORY_NOTE, SPRO_CURVE_FILE, save_score_histogram, save_spro_curve, write_results_table
from fedpatch.workflow import (
    ScoredImage,
    build_model,
    calibration_scores,
    fit_local,
    open_object,
    pooled_metrics_with_curve,
    resize_for,
    score_local,
    split_calibration,
    threshold_from_scores,
)

LOGGER = logging.getLogger("fedpatch.baseline")
LOCAL_CLIENT = "local"
"""The one participant's id in ``aggregate_banks``."""
RESULT_SECTIONS = ("model", "data", "evaluation")
"""Config sections that change a centralized result (compared when resuming)."""
METRICS_FILE = "metrics.json"
RESERVED_NAMES = frozenset({"models", "maps", "overlays", "logs"})


# --------------------------------------------------------------------------------------------
# Layout, config identity, logging, memory
# --------------------------------------------------------------------------------------------
class RunLayout:
    """Paths of a baseline output folder (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.run = self.root / "run.json"
        self.logs = self.root / "logs"
        self.models = self.root / "models"
        self.maps = self.root / "maps"

    def model(self, name: str) -> Path:
        return self.models / f"patchcore_{name}.pt"

    def metrics(self, name: str) -> Path:
        return self.root / name / METRICS_FILE

    def overlays(self, name: str) -> Path:
        return self.root / "overlays" / name

    def trained_objects(self) -> list[str]:
        """Objects with a model file, sorted."""
        if not self.models.is_dir():
            return []
        return sorted(p.name[len("patchcore_") : -len(".pt")] for p in self.models.glob("patchcore_*.pt"))


def config_hash(config: RunConfig) -> str:
    """Short hash of the result-relevant sections (``RESULT_SECTIONS``) of the config's
    ``identity`` (keys of ``fedpatch.config.ADDED_KEYS`` at their earlier value are left out, so
    earlier runs keep their hash)."""
    sections = identity(config)
    relevant = {name: sections[name] for name in RESULT_SECTIONS}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def config_differences(previous: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``section.key: old -> new`` for every result-relevant key that differs (a key of
    ``ADDED_KEYS`` missing on either side counts as its earlier value)."""
    differences = []
    for section in RESULT_SECTIONS:
        old, new = previous.get(section) or {}, current.get(section) or {}
        added = ADDED_KEYS.get(section, {})
        for key in sorted(set(old) | set(new)):
            before, after = old.get(key, added.get(key, "<missing>")), new.get(key, added.get(key, "<missing>"))
            if before != after:
                differences.append(f"{section}.{key}: {before!r} -> {after!r}")
    return differences


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is not readable JSON: {exc}") from None
    return data if isinstance(data, dict) else {}


def peak_rss_mib() -> float | None:
    """Peak resident set size of this process so far, in MiB (``getrusage`` ``ru_maxrss``)."""
    try:
        import resource
    except ImportError:  # not available on Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


class _TqdmHandler(logging.StreamHandler):
    """Console log lines that do not tear progress bars apart."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


@contextmanager
def log_to(file: Path, console: bool = True) -> Iterator[None]:
    """Send the ``fedpatch`` loggers (INFO and up) to ``file`` (appended) and the console."""
    logger = logging.getLogger("fedpatch")
    file.parent.mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [logging.FileHandler(file, mode="a", encoding="utf-8")]
    handlers[0].setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if console:  # the run's own lines, and warnings from anywhere in fedpatch
        handlers.append(_TqdmHandler())
        handlers[1].setFormatter(logging.Formatter("%(message)s"))
        handlers[1].addFilter(lambda record: record.name == LOGGER.name or record.levelno >= logging.WARNING)
    previous_level = logger.level
    logger.setLevel(logging.INFO)
    for handler in handlers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(previous_level)


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
@dataclass
class BaselineResult:
    """What a run did: ``metrics`` holds each object's ``metrics.json`` content."""

    output_dir: Path
    data_dir: Path
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def resolve_objects(root: Path, objects: str | Sequence[str]) -> list[str]:
    """``"all"`` (or ``["all"]``) -> the object folders present in ``root``; names are checked."""
    if (root / "train").is_dir() or (root / "test").is_dir():
        raise DataError(f"{root} looks like one object's folder; pass its parent {root.parent} as --data-dir and --objects {root.name}")
    available = list_objects(root)
    names = [objects] if isinstance(objects, str) else list(objects)
    if names == ["all"]:
        names = available
    elif "all" in names:
        raise ConfigError("objects: 'all' cannot be combined with object names")
    if not names:
        raise DataError(f"no object folders (with defects_config.json, train/ or test/) in {root}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"objects: {', '.join(duplicates)} listed more than once")
    missing = [n for n in names if n not in available]
    if missing:
        raise DataError(f"object(s) {', '.join(missing)} not found in {root} (it has: {', '.join(available) or 'nothing'})")
    reserved = [n for n in names if n in RESERVED_NAMES]
    if reserved:
        raise DataError(f"object name(s) {', '.join(reserved)} clash with output folders ({', '.join(sorted(RESERVED_NAMES))})")
    return names


def _matching_metrics(layout: RunLayout, key: str, data_dir: Path) -> dict[str, dict[str, Any]]:
    """``metrics.json`` of every object in the folder made with this config and data, by name."""
    found = {}
    for folder in sorted(p for p in layout.root.iterdir() if p.is_dir() and p.name not in RESERVED_NAMES):
        metrics = _read_json(folder / METRICS_FILE)
        ours = metrics.get("fedpatch") or {}
        if ours.get("config_hash") == key and ours.get("data_dir") == str(data_dir):
            found[folder.name] = metrics
    return found


def _write_table(layout: RunLayout, key: str, data_dir: Path) -> dict[str, dict[str, Any]]:
    metrics = _matching_metrics(layout, key, data_dir)
    run = _read_json(layout.run)
    notes = [
        f"data: `{data_dir}`; configuration: `{layout.config.name}` (hash {key}); fedpatch {__version__}",
    ]
    if run.get("command"):
        notes.append(f"command: `{run['command']}`")
    write_results_table(layout.root, metrics, notes)
    LOGGER.info("results table: %s, %s (%d objects)", layout.root / "results.csv", layout.root / "results.md", len(metrics))
    return metrics


# --------------------------------------------------------------------------------------------
# One object: scoring, maps, pictures, metrics (shared by train and evaluate)
# --------------------------------------------------------------------------------------------
def overlay_choice(samples: Sequence[SampleRecord], limit: int) -> list[int]:
    """Indices of up to ``limit`` test images for overlays: defective first, taking the defect
    folders in turn (so every kind shows up), then good images."""
    folders: dict[str, list[int]] = {}
    for i, record in enumerate(samples):
        if record.label:
            folders.setdefault(record.defect_type, []).append(i)
    defective = [i for turn in itertools.zip_longest(*folders.values()) for i in turn if i is not None]
    good = [i for i, r in enumerate(samples) if not r.label]
    return (defective + good)[:limit]


def _fmt_optional(value: float | None) -> str:
    return "none" if value is None else f"{value:.4g}"


def evaluate_object(
    model: PatchCore,
    config: RunConfig,
    data_dir: Path,
    layout: RunLayout,
    name: str,
    training: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Score an object's test split with ``model``; write maps, overlays and pictures.

    Returns the ``metrics.json`` content (the caller writes it); ``training`` (fit statistics)
    is stored in it.
    """
    started = time.perf_counter()
    test = open_object(data_dir, name, "test", config)
    samples: list[SampleRecord] = test.samples
    ev = config.evaluation
    chosen = overlay_choice(samples, ev.max_overlays) if ev.save_overlays else []
    chosen_keys = {f"{samples[i].defect_type}/{samples[i].stem}" for i in chosen}
    for stale in (layout.maps / name, layout.overlays(name)):
        shutil.rmtree(stale, ignore_errors=True)

    kept: dict[str, np.ndarray] = {}
    extremes = [np.inf, -np.inf]
    bar = tqdm(total=len(samples), desc=f"score {name}", unit="img", disable=not config.runtime.progress, dynamic_ncols=True)

    def sink(info: ScoredImage, defect_type: str, anomaly_map: np.ndarray, _image: Any) -> None:
        stem = info.key.split("/", 1)[1]
        if ev.save_maps:
            write_float_map(map_path(layout.maps, name, defect_type, stem, ".npy"), anomaly_map)
        extremes[0] = min(extremes[0], float(anomaly_map.min()))
        extremes[1] = max(extremes[1], float(anomaly_map.max()))
        if info.key in chosen_keys:
            kept[info.key] = np.array(anomaly_map, copy=True)
        bar.update(1)

    showing, model.progress = model.progress, False  # the scoring bar above counts the images
    try:
        evaluation = score_local(model, test, config, sink)
    finally:
        model.progress = showing
        bar.close()
    try:
        metrics, pixels = pooled_metrics_with_curve([evaluation], ev.fpr_limits)
    except ValueError as exc:
        raise DataError(f"object {name!r} in {data_dir}: cannot compute metrics: {exc}") from None
    scoring_seconds = time.perf_counter() - started
    scores = {tuple(image.key.split("/", 1)): image.score for image in evaluation.images}

    if ev.save_maps:
        export_png_maps(layout.maps, name)
        write_image_scores(layout.maps, name, scores)
    threshold = model.threshold
    value_range = colour_range(threshold, extremes[0], extremes[1])
    for i in chosen:
        record = samples[i]
        key = f"{record.defect_type}/{record.stem}"
        regions = test.regions(i)
        save_overlay(
            layout.overlays(name) / f"{record.defect_type}_{record.stem}.png",
            load_image(record.path),
            kept[key],
            scores[(record.defect_type, record.stem)],
            threshold,
            value_range,
            union_mask([r.mask for r in regions]),
        )
    object_dir = layout.root / name
    spro_005 = metrics.auc_spro.get(0.05)
    save_spro_curve(object_dir / SPRO_CURVE_FILE, pixels.fpr, pixels.spro, f"{name}: sPRO vs FPR", spro_005)
    image_scores, labels = evaluation.scores, evaluation.labels
    save_score_histogram(object_dir / HISTOGRAM_FILE, image_scores, labels, threshold, f"{name}: image scores", metrics.image_auroc)

    flagged_good = int((image_scores[labels == 0] > threshold).sum()) if threshold is not None else None
    flagged_defective = int((image_scores[labels == 1] > threshold).sum()) if threshold is not None else None
    result = metrics_json(metrics)
    result["fedpatch"].update(
        {
            "object": name,
            "threshold": threshold,
            "input_size": list(model.input_size) if model.input_size is not None else None,
            "at_threshold": {"good_flagged": flagged_good, "defective_flagged": flagged_defective},
            "config_hash": config_hash(config),
            "data_dir": str(data_dir),
            "model_file": str(layout.model(name).relative_to(layout.root)),
            "training": dict(training) if training is not None else None,
            "scoring": {"images": len(samples), "seconds": round(scoring_seconds, 3), "peak_rss_mib": peak_rss_mib()},
            "peak_memory": PEAK_MEMORY_NOTE,
            "fedpatch_version": __version__,
        }
    )
    LOGGER.info(
        "[%s] test: image AUROC %.4f, AUC-sPRO@0.05 %s, pixel AUROC %.4f (%d good, %d defective, %d regions; scored in %.1f s)",
        name, metrics.image_auroc, _fmt_optional(spro_005), metrics.pixel_auroc,
        metrics.n_good, metrics.n_defective, metrics.n_regions, scoring_seconds,
    )
    if threshold is not None:
        LOGGER.info(
            "[%s] at threshold %.4g: %d/%d good and %d/%d defective test images flagged",
            name, threshold, flagged_good, metrics.n_good, flagged_defective, metrics.n_defective,
        )
    return result


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def _check_model_config(config: RunConfig) -> None:
    """Build the model once before any work: unknown layers or missing weights fail at once."""
    try:
        build_model(config)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"model: {exc}") from None


def _threshold_source(config: RunConfig, n_calibration: int) -> str:
    if config.evaluation.anomaly_threshold is not None:
        return "evaluation.anomaly_threshold"
    if n_calibration == 0:
        return "none: no held-out calibration images (data.calibration_fraction is 0 or too few images)"
    return f"quantile {config.evaluation.threshold_quantile:g} of {n_calibration} held-out good training images"


def train_object(config: RunConfig, data_dir: Path, layout: RunLayout, name: str) -> dict[str, Any]:
    """Fit, calibrate, save and evaluate one object (the workflow steps); return its metrics."""
    started = time.perf_counter()
    layout.metrics(name).unlink(missing_ok=True)  # never leave old metrics next to a new model
    train = open_object(data_dir, name, "train", config)
    test_images = len(open_object(data_dir, name, "test", config))  # a broken test split fails before fitting
    fit_set, calibration = split_calibration(train, config)
    LOGGER.info(
        "[%s] %d training images (%d fitted, %d held out for the threshold), %d test images, working size %s",
        name, len(train), len(fit_set), len(calibration), test_images, resize_for(config, name),
    )

    start = time.perf_counter()
    model, stats = fit_local(config, fit_set)
    fit_seconds = time.perf_counter() - start
    aggregated = aggregate_banks(
        {LOCAL_CLIENT: model.get_memory_bank()}, global_ratio=1.0, seed=config.model.seed, projection_dim=config.model.projection_dim
    )
    model.set_memory_bank(aggregated.bank)
    LOGGER.info(
        "[%s] fit: %d images, %d patches -> bank of %d in %.1f s (extract %.1f s, coreset %.1f s, index %.1f s)",
        name, stats.images, stats.patches_seen, len(aggregated.bank), fit_seconds,
        stats.extract_seconds, stats.coreset_seconds, stats.index_seconds,
    )

    start = time.perf_counter()
    held_out = calibration_scores(model, calibration, config)
    model.threshold = threshold_from_scores(held_out, config)
    calibration_seconds = time.perf_counter() - start
    source = _threshold_source(config, len(calibration))
    LOGGER.info("[%s] threshold %s (%s; %.1f s)", name, _fmt_optional(model.threshold), source, calibration_seconds)
    size = resize_for(config, name)
    model.input_size = None if size == "native" else (int(size[0]), int(size[1]))
    model.save(layout.model(name))

    training = {
        "images": stats.images,
        "calibration_images": len(calibration),
        "patches": stats.patches_seen,
        "bank_size": int(len(aggregated.bank)),
        "fit_seconds": round(fit_seconds, 3),
        "extract_seconds": round(stats.extract_seconds, 3),
        "coreset_seconds": round(stats.coreset_seconds, 3),
        "index_seconds": round(stats.index_seconds, 3),
        "calibration_seconds": round(calibration_seconds, 3),
        "threshold_source": source,
        "peak_rss_mib": peak_rss_mib(),
    }
    result = evaluate_object(model, config, data_dir, layout, name, training)
    total = time.perf_counter() - started
    result["fedpatch"]["total_seconds"] = round(total, 3)
    atomic_write_json(layout.metrics(name), result)  # written last: its presence marks the object done
    LOGGER.info(
        "[%s] done in %.1f s: bank %d, peak RSS %s MiB (process peak so far, ru_maxrss)",
        name, total, training["bank_size"], _fmt_optional(result["fedpatch"]["scoring"]["peak_rss_mib"]),
    )
    return result


def _is_done(layout: RunLayout, name: str, key: str, data_dir: Path) -> dict[str, Any] | None:
    """The object's metrics if its model and metrics exist for this config and data, else None."""
    if not layout.model(name).is_file() or not layout.metrics(name).is_file():
        return None
    metrics = _read_json(layout.metrics(name))
    ours = metrics.get("fedpatch") or {}
    return metrics if ours.get("config_hash") == key and ours.get("data_dir") == str(data_dir) else None


def _check_output_dir(layout: RunLayout, config: RunConfig, data_dir: Path, force: bool) -> None:
    """Refuse to mix runs: an existing output folder must hold the same config and data."""
    if not layout.config.is_file():
        return
    try:
        previous = yaml.safe_load(layout.config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{layout.config} (of an earlier run) is not readable YAML: {exc}") from None
    differences = config_differences(previous if isinstance(previous, dict) else {}, asdict(config))
    previous_data = _read_json(layout.run).get("data_dir")
    if previous_data is not None and previous_data != str(data_dir):
        differences.append(f"data folder: {previous_data} -> {data_dir}")
    if not differences:
        return
    shown = "; ".join(differences[:4]) + (f"; and {len(differences) - 4} more" if len(differences) > 4 else "")
    if not force:
        raise ConfigError(
            f"output folder {layout.root} holds a run with a different configuration ({shown}); "
            "pass --force to retrain there, or choose another --output-dir"
        )
    LOGGER.warning("--force: retraining in %s although its earlier run differs (%s)", layout.root, shown)


def run_baseline(
    config: RunConfig,
    data_dir: str | Path | None,
    output_dir: str | Path,
    objects: str | Sequence[str] = "all",
    force: bool = False,
    *,
    command: str | None = None,
    console_log: bool = True,
) -> BaselineResult:
    """Train and evaluate ``objects`` (see the module docstring); return every object's metrics.

    ``data_dir`` None uses the default synthetic AutoVI set (generated on first use). The
    results table covers every object in ``output_dir`` done with this config and data.
    """
    _check_model_config(config)
    if data_dir is None:
        from fedpatch.data.synthetic import ensure_default_dataset

        data_dir = ensure_default_dataset()
        default_data = True
    else:
        default_data = False
    root = Path(data_dir).resolve()
    names = resolve_objects(root, objects)
    layout = RunLayout(output_dir)
    _check_output_dir(layout, config, root, force)
    key = config_hash(config)
    layout.root.mkdir(parents=True, exist_ok=True)
    config_text = dump_config(config)
    atomic_write_text(layout.config, config_text)
    atomic_write_json(layout.run, {"data_dir": str(root), "command": command, "config_hash": key, "fedpatch_version": __version__})

    result = BaselineResult(output_dir=layout.root, data_dir=root)
    with log_to(layout.logs / "training.log", console_log):
        LOGGER.info("fedpatch %s train: %d object(s) %s", __version__, len(names), ", ".join(names))
        LOGGER.info("data: %s%s", root, " (the default synthetic AutoVI dataset)" if default_data else "")
        LOGGER.info("output: %s (config hash %s)%s", layout.root, key, "; --force" if force else "")
        for name in names:
            done = None if force else _is_done(layout, name, key, root)
            if done is not None:
                LOGGER.info("skipping %s: done", name)
                result.skipped.append(name)
                result.metrics[name] = done
                continue
            result.metrics[name] = train_object(config, root, layout, name)
            result.trained.append(name)
        _write_table(layout, key, root)
    return result


# --------------------------------------------------------------------------------------------
# Re-evaluating a trained output folder
# --------------------------------------------------------------------------------------------
def evaluate_output_dir(
    output_dir: str | Path,
    data_dir: str | Path | None = None,
    objects: str | Sequence[str] = "all",
    overrides: Sequence[str] = (),
    *,
    console_log: bool = True,
) -> BaselineResult:
    """Reload the models of a ``fedpatch train`` folder, rescore the test images and rewrite the
    maps, overlays, pictures, metrics and results table.

    ``data_dir`` defaults to the folder the run was trained on (``run.json``); ``objects``
    "all" means every object with a model file. Only ``runtime.*`` keys may be overridden:
    the rest of the configuration is the run's own.
    """
    layout = RunLayout(output_dir)
    if not layout.config.is_file():
        raise DataError(f"{layout.config} not found: {layout.root} is not the output folder of a fedpatch train run")
    for text in overrides:
        if not text.strip().startswith("runtime."):
            raise ConfigError(f"evaluate re-uses the run's config.yaml; only runtime.* keys may be set, got {text!r}")
    config = load_config(layout.config, list(overrides))
    run = _read_json(layout.run)
    if data_dir is None and not run.get("data_dir"):
        raise DataError(f"{layout.run} does not say which data folder the run used; pass --data-dir")
    root = Path(data_dir if data_dir is not None else run["data_dir"]).resolve()
    trained = layout.trained_objects()
    names = trained if objects == "all" or list(objects) == ["all"] else list(objects)
    if not names:
        raise DataError(f"no model files (patchcore_<object>.pt) in {layout.models}")
    for name in names:
        if not layout.model(name).is_file():
            raise DataError(f"no model for object {name!r}: {layout.model(name)} not found (trained: {', '.join(trained) or 'none'})")
    resolve_objects(root, names)
    key = config_hash(config)

    result = BaselineResult(output_dir=layout.root, data_dir=root)
    with log_to(layout.logs / "evaluate.log", console_log):
        LOGGER.info("fedpatch %s evaluate: %s on %s", __version__, ", ".join(names), root)
        for name in names:
            started = time.perf_counter()
            model = PatchCore.load(layout.model(name), device=config.runtime.device, progress=config.runtime.progress)
            previous = _read_json(layout.metrics(name)).get("fedpatch") or {}
            result.metrics[name] = evaluate_object(model, config, root, layout, name, previous.get("training"))
            atomic_write_json(layout.metrics(name), result.metrics[name])
            LOGGER.info("[%s] evaluated in %.1f s", name, time.perf_counter() - started)
        _write_table(layout, key, root)
    return result

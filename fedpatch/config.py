"""Run configuration: typed sections read from YAML, with every key checked.

A config file has up to five sections; every key of every section is documented on the
dataclass fields below and in ``configs/README.md``. An unknown key, a value of the wrong
type, or a value out of range is a ``ConfigError`` that names the key (``model.coreset_percentage``)
and the file. ``--set section.key=value`` overrides parse the value as YAML.

- ``model``: the PatchCore hyperparameters (``fedpatch.patchcore.PatchCoreConfig``).
- ``data``: dataset sizes (``resize_small`` / ``resize_large`` presets) and calibration split.
- ``evaluation``: threshold, maps written to disk, FPR limits.
- ``runtime``: device, data loading workers, progress bars.
- ``federated``: partitioning and bank aggregation (used by the Flower app; a one-client
  federation with ``global_ratio: 1.0`` is the centralized baseline).
"""

from __future__ import annotations

import copy
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from fedpatch.errors import ConfigError
from fedpatch.patchcore import PatchCoreConfig


@dataclass
class DataConfig:
    """Attributes:
    resize_small: (width, height) for engine_wiring, pipe_clip, pipe_staple (seed: [400, 400]).
    resize_large: (width, height) for tank_screw, underbody_pipes, underbody_screw (seed: [1000, 750]).
    resize: one (width, height) for every object, overriding the presets (null = presets;
        objects that are not AutoVI objects keep their native size when null).
    calibration_fraction: share of the good training images held out (not fitted) to
        calibrate the anomaly threshold without test labels; 0 disables calibration.
    """

    resize_small: list[int] = field(default_factory=lambda: [400, 400])
    resize_large: list[int] = field(default_factory=lambda: [1000, 750])
    resize: list[int] | None = None
    calibration_fraction: float = 0.1


@dataclass
class EvaluationConfig:
    """Attributes:
    anomaly_threshold: fixed image-score threshold; null = calibrated on held-out good images.
    threshold_quantile: quantile of the held-out good scores used as the calibrated threshold
        (1.0 = their maximum).
    save_maps: write anomaly maps (16-bit PNG for the official evaluator + float .npy).
    save_overlays: also write heat-map overlays (PNG) for the first defective test images.
    max_overlays: how many overlays per object.
    fpr_limits: FPR limits at which AUC-sPRO is reported.
    """

    anomaly_threshold: float | None = None
    threshold_quantile: float = 0.99
    save_maps: bool = True
    save_overlays: bool = True
    max_overlays: int = 8
    fpr_limits: list[float] = field(default_factory=lambda: [0.01, 0.05, 0.1, 0.3, 1.0])


@dataclass
class RuntimeConfig:
    """Attributes:
    device: "auto", "cpu" or "cuda" (no GPU: warns and uses the CPU).
    num_workers: DataLoader worker processes decoding images (0 = in the main process).
    progress: progress bars with counts and rates.
    """

    device: str = "auto"
    num_workers: int = 0
    progress: bool = True


@dataclass
class FederatedConfig:
    """Attributes:
    num_clients: number of SuperNodes the run expects (every connected node takes part; the
        server warns when the federation has another size).
    partition: "iid" (each object's training images split evenly), "by-object" (each client
        owns whole objects) or "dirichlet" (per-object client shares drawn with ``dirichlet_alpha``).
    dirichlet_alpha: concentration of the Dirichlet split (small = skewed).
    partition_seed: seeds the partition.
    test_split: "own" (each client scores its share of the test images) or "common" (every
        client scores the whole test split of its objects).
    global_ratio: size of the global bank as a fraction of the union of client banks (1.0 keeps
        the union); ignored when ``global_size`` is set.
    global_size: absolute size of the global bank (null = use ``global_ratio``).
    bank_dtype: dtype of banks on the wire: "float32" or "float16" (halves the bytes).
    min_clients: the run fails unless at least this many clients return a valid bank.
    max_bank_rows: cap on the rows one client may send (null = no cap besides its patch count).
    """

    num_clients: int = 3
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    partition_seed: int = 0
    test_split: str = "own"
    global_ratio: float = 1.0
    global_size: int | None = None
    bank_dtype: str = "float32"
    min_clients: int = 1
    max_bank_rows: int | None = None


@dataclass
class RunConfig:
    """The whole configuration of a training/evaluation run."""

    model: PatchCoreConfig = field(default_factory=PatchCoreConfig)
    data: DataConfig = field(default_factory=DataConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)

    def validate(self) -> None:
        """Range checks across sections; raises ``ConfigError`` naming the key."""
        try:
            self.model.validate()
        except ValueError as exc:
            raise ConfigError(f"model: {exc}") from exc
        d, e, r, f = self.data, self.evaluation, self.runtime, self.federated
        checks = [
            ("data.resize_small", _is_size(d.resize_small), "a [width, height] pair of positive ints"),
            ("data.resize_large", _is_size(d.resize_large), "a [width, height] pair of positive ints"),
            ("data.resize", d.resize is None or _is_size(d.resize), "null or a [width, height] pair"),
            ("data.calibration_fraction", 0.0 <= d.calibration_fraction < 1.0, "in [0, 1)"),
            ("evaluation.threshold_quantile", 0.0 < e.threshold_quantile <= 1.0, "in (0, 1]"),
            ("evaluation.max_overlays", e.max_overlays >= 0, ">= 0"),
            ("evaluation.fpr_limits", bool(e.fpr_limits) and all(0 < x <= 1 for x in e.fpr_limits), "a non-empty list in (0, 1]"),
            ("runtime.device", r.device == "auto" or r.device == "cpu" or r.device.startswith("cuda"), "auto, cpu or cuda[:N]"),
            ("runtime.num_workers", r.num_workers >= 0, ">= 0"),
            ("federated.num_clients", f.num_clients >= 1, ">= 1"),
            ("federated.partition", f.partition in ("iid", "by-object", "dirichlet"), "iid, by-object or dirichlet"),
            ("federated.dirichlet_alpha", f.dirichlet_alpha > 0, "> 0"),
            ("federated.test_split", f.test_split in ("own", "common"), "own or common"),
            ("federated.global_ratio", 0.0 < f.global_ratio <= 1.0, "in (0, 1]"),
            ("federated.global_size", f.global_size is None or f.global_size >= 1, "null or >= 1"),
            ("federated.bank_dtype", f.bank_dtype in ("float32", "float16"), "float32 or float16"),
            ("federated.min_clients", 1 <= f.min_clients, ">= 1"),
            ("federated.max_bank_rows", f.max_bank_rows is None or f.max_bank_rows >= 1, "null or >= 1"),
        ]
        for key, ok, expected in checks:
            if not ok:
                section, name = key.split(".")
                raise ConfigError(f"{key} must be {expected}, got {getattr(getattr(self, section), name)!r}")


def _is_size(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)


def _type_ok(value: Any, annotation: Any) -> bool:
    """Whether a YAML value fits a dataclass field annotation (ints accepted for floats)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return False


def _apply_section(target: Any, values: Any, where: str, source: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: section {where!r} must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(type(target))
    known = {f.name for f in fields(target)}
    for key, value in values.items():
        path = f"{where}.{key}"
        if key not in known:
            raise ConfigError(f"{source}: unknown key {path!r}; known keys of {where!r}: {', '.join(sorted(known))}")
        if not _type_ok(value, hints[key]):
            raise ConfigError(f"{source}: {path} has the wrong type: expected {_describe(hints[key])}, got {value!r}")
        setattr(target, key, float(value) if hints[key] is float else copy.deepcopy(value))


def _describe(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("NoneType", "null")


def config_from_dict(data: dict[str, Any] | None, source: str = "config") -> RunConfig:
    """Build and validate a ``RunConfig`` from nested dicts (unknown keys are errors)."""
    config = RunConfig()
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    sections = {f.name for f in fields(config)}
    for name, values in data.items():
        if name not in sections:
            raise ConfigError(f"{source}: unknown section {name!r}; known sections: {', '.join(sorted(sections))}")
        _apply_section(getattr(config, name), values, name, source)
    try:
        config.validate()
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return config


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"model.backbone=resnet18"`` -> ``("model", "backbone", "resnet18")`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set key must be section.key (e.g. model.backbone), got {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML: {exc}") from None
    return parts[0], parts[1], value


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (``None``: all defaults) and apply ``section.key=value`` overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        file = Path(path)
        source = str(file)
        if not file.is_file():
            raise ConfigError(f"config file not found: {file}")
        try:
            loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{file}: the top level must be a mapping of sections")
        data = loaded or {}
    for text in overrides or []:
        section, key, value = parse_override(text)
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping")
        data[section][key] = value
    return config_from_dict(data, source if not overrides else f"{source} with --set overrides")


def dump_config(config: RunConfig) -> str:
    """The config as YAML (saved next to every run's outputs)."""
    return yaml.safe_dump(asdict(config), sort_keys=False)


"""Run configuration: typed sections read from YAML, with every key checked.

A config file has up to five sections; every key of every section is documented on the
dataclass fields below and in ``configs/README.md``. An unknown key, a value of the wrong
type, or a value out of range is a ``ConfigError`` that names the key (``model.coreset_percentage``)
and the file. ``--set section.key=value`` overrides parse the value as YAML.

Parsing is defensive: YAML is read with PyYAML's safe loader (``!!python/...`` tags are
refused, nothing is ever constructed from a tag) extended to refuse a key given twice;
files over 1 MiB, non-UTF-8 text, NaN/infinite numbers, image sizes above
``fedpatch.data.io.MAX_IMAGE_PIXELS`` and seeds outside [0, 2**63) are ConfigErrors.

- ``model``: the PatchCore hyperparameters (``fedpatch.patchcore.PatchCoreConfig``).
- ``data``: dataset sizes (``resize_small`` / ``resize_large`` presets) and calibration split.
- ``evaluation``: threshold, maps written to disk, FPR limits.
- ``runtime``: device, data loading workers, progress bars.
- ``federated``: partitioning and bank aggregation (used by the Flower app; a one-client
  federation with ``global_ratio: 1.0`` is the centralized baseline).
"""

from __future__ import annotations

import copy
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from fedpatch.data.io import MAX_IMAGE_PIXELS
from fedpatch.errors import ConfigError
from fedpatch.patchcore import PatchCoreConfig
from fedpatch.privacy import PRIVACY_MODES


MAX_WORKERS = 64
"""Most DataLoader worker processes a config may ask for (each is a process holding a dataset copy)."""


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
    privacy: what a client does to its bank before sending it (``fedpatch.privacy``): "none";
        "rotation" (a secret orthogonal rotation shared by the clients, key from node config
        ``rotation-key`` or env ``FEDPATCH_ROTATION_KEY``, never sent to the server; scores
        unchanged; obfuscation, not a formal guarantee); "gaussian" (rows clipped to
        ``clip_norm`` plus Gaussian noise, (dp_epsilon, dp_delta)-DP per released row).
    dp_epsilon: epsilon of the Gaussian mechanism per released row (gaussian only).
    dp_delta: delta of the Gaussian mechanism per released row (gaussian only).
    clip_norm: L2 norm every bank row is clipped to before noise (gaussian only).
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
    privacy: str = "none"
    dp_epsilon: float | None = None
    dp_delta: float = 1e-5
    clip_norm: float | None = None


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
            ("data.resize_small", _pixels(d.resize_small) <= MAX_IMAGE_PIXELS, f"at most {MAX_IMAGE_PIXELS:,} pixels"),
            ("data.resize_large", _pixels(d.resize_large) <= MAX_IMAGE_PIXELS, f"at most {MAX_IMAGE_PIXELS:,} pixels"),
            ("data.resize", d.resize is None or _pixels(d.resize) <= MAX_IMAGE_PIXELS, f"at most {MAX_IMAGE_PIXELS:,} pixels"),
            ("model.seed", 0 <= self.model.seed < 2**63, "in [0, 2**63)"),
            ("runtime.device", re.fullmatch(r"auto|cpu|cuda(:\d+)?", r.device) is not None, "auto, cpu or cuda[:N]"),
            ("runtime.num_workers", 0 <= r.num_workers <= MAX_WORKERS, f"in [0, {MAX_WORKERS}]"),
            ("federated.partition_seed", 0 <= f.partition_seed < 2**63, "in [0, 2**63)"),
            ("federated.num_clients", f.num_clients >= 1, ">= 1"),
            ("federated.partition", f.partition in ("iid", "by-object", "dirichlet"), "iid, by-object or dirichlet"),
            ("federated.dirichlet_alpha", f.dirichlet_alpha > 0, "> 0"),
            ("federated.test_split", f.test_split in ("own", "common"), "own or common"),
            ("federated.global_ratio", 0.0 < f.global_ratio <= 1.0, "in (0, 1]"),
            ("federated.global_size", f.global_size is None or f.global_size >= 1, "null or >= 1"),
            ("federated.bank_dtype", f.bank_dtype in ("float32", "float16"), "float32 or float16"),
            ("federated.min_clients", 1 <= f.min_clients, ">= 1"),
            ("federated.max_bank_rows", f.max_bank_rows is None or f.max_bank_rows >= 1, "null or >= 1"),
            ("federated.privacy", f.privacy in PRIVACY_MODES, " or ".join(PRIVACY_MODES)),
            ("federated.dp_epsilon", f.dp_epsilon is None or 0 < f.dp_epsilon < math.inf, "null or a finite number > 0"),
            ("federated.dp_delta", 0 < f.dp_delta < 1, "in (0, 1)"),
            ("federated.clip_norm", f.clip_norm is None or 0 < f.clip_norm < math.inf, "null or a finite number > 0"),
        ]
        for key, ok, expected in checks:
            if not ok:
                section, name = key.split(".")
                raise ConfigError(f"{key} must be {expected}, got {getattr(getattr(self, section), name)!r}")
        if f.privacy == "gaussian" and (f.dp_epsilon is None or f.clip_norm is None):
            unset = [f"federated.{k}" for k in ("dp_epsilon", "clip_norm") if getattr(f, k) is None]
            raise ConfigError(f"federated.privacy 'gaussian' needs {' and '.join(unset)} (null now)")


def _pixels(size: Any) -> int:
    """width x height of a size that passed ``_is_size`` (0 for anything else: reported there)."""
    return int(size[0]) * int(size[1]) if _is_size(size) else 0


def _is_size(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)


def _has_non_finite(value: Any) -> bool:
    """Whether a YAML value is, or is a list holding, NaN or an infinity (no key takes them)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    return isinstance(value, list) and any(_has_non_finite(v) for v in value)


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _yaml_float(value: float) -> str:
    """``value`` spelled so that YAML 1.1 reads a float (``1.0e-05``, not ``1e-05``)."""
    text = repr(value)
    mantissa, e, exponent = text.partition("e")
    return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
        if _has_non_finite(value):
            raise ConfigError(f"{source}: {path} must be finite, got {value!r}")
        if not _type_ok(value, hints[key]):
            hint = ""
            if isinstance(value, str) and _type_ok(0.5, hints[key]) and _parses_as_float(value):
                hint = f" (YAML reads {value!r} as text: write the number with a dot, e.g. {_yaml_float(float(value))})"
            raise ConfigError(f"{source}: {path} has the wrong type: expected {_describe(hints[key])}, got {value!r}{hint}")
        setattr(target, key, float(value) if _is_number(value) and _type_ok(0.5, hints[key]) else copy.deepcopy(value))


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


MAX_CONFIG_BYTES = 1 << 20
"""Config files larger than this (1 MiB) are refused unread; real ones are a few kB."""


class _StrictSafeLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain types only, no ``!!python/...`` tags) that also refuses a
    key given twice in one mapping, which PyYAML would otherwise resolve silently to the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                continue  # the base class reports unhashable keys
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"found the key {key!r} twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def safe_yaml(text: str) -> Any:
    """Parse YAML with the safe loader (no arbitrary objects) and refuse duplicate keys."""
    return yaml.load(text, Loader=_StrictSafeLoader)  # noqa: S506 - a SafeLoader subclass


def _yaml_reason(exc: BaseException) -> str:
    return "nested too deeply" if isinstance(exc, RecursionError) else str(exc)


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"model.backbone=resnet18"`` -> ``("model", "backbone", "resnet18")`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set key must be section.key (e.g. model.backbone), got {key!r}")
    try:
        value = safe_yaml(raw) if raw.strip() else None
    except (yaml.YAMLError, RecursionError) as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML: {_yaml_reason(exc)}") from None
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
        size = file.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{file} has {size:,} bytes; a config file is at most {MAX_CONFIG_BYTES:,} bytes")
        try:
            loaded = safe_yaml(file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{file} cannot be read: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{file}: not UTF-8 text: {exc}") from None
        except (yaml.YAMLError, RecursionError) as exc:
            raise ConfigError(f"{file}: not valid YAML: {_yaml_reason(exc)}") from None
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


ADDED_KEYS: dict[str, dict[str, Any]] = {"model": {"backbone_precision": "float32"}}
"""Keys added after output folders and checkpoints were first written, with the value every
run before them had. A config holding that value hashes and compares like one without the key
(``identity``), so the outputs of an earlier fedpatch version still resume instead of being
refused as a different configuration or redone."""


def identity(config: RunConfig) -> dict[str, dict[str, Any]]:
    """The config as nested dicts (sections and keys in declaration order), without the keys of
    ``ADDED_KEYS`` that hold their earlier value: what run hashes and checkpoint digests are
    computed from, so they match those an earlier version computed for the same run."""
    sections = asdict(config)
    for section, added in ADDED_KEYS.items():
        sections[section] = {k: v for k, v in sections[section].items() if k not in added or v != added[k]}
    return sections

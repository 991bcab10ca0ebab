"""The run-config side of the Flower app: app settings, the server's run request, data roots.

``AppSettings`` reads ``[tool.flwr.app.config]`` + ``--run-config``; ``RunRequest`` is the
run configuration the server sends with every message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedpatch.config import RunConfig, config_from_dict, dump_config, load_config
from fedpatch.errors import ConfigError, DataError
from fedpatch.federated.errors import ReplyError


# --------------------------------------------------------------------------------------------
# Settings of the Flower app (``[tool.flwr.app.config]`` + ``--run-config``), as a plain mapping
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AppSettings:
    """The run configuration of the Flower app (see ``pyproject.toml``, ``[tool.flwr.app.config]``).

    Attributes:
        config_file: fedpatch YAML config; relative paths are looked up in the app directory
            (the installed FAB), then in the working directory.
        overrides: ``section.key=value`` overrides of the YAML, like ``fedpatch --set``
            (``overrides = "federated.partition=by-object; federated.bank_dtype=float16"``).
        objects: objects to train (``[]`` = every object folder of the data root).
        data_dir: shared data root ("" = the generated default dataset); a node's own
            ``data-dir`` node config takes precedence on that node.
        output_dir: where the server writes models and tables.
        num_rounds: federated rounds (each refits from scratch; the last one is reported).
        train_timeout / evaluate_timeout: seconds the server waits for replies (0 = no limit).
        min_nodes: nodes to wait for before starting (0 = ``federated.min_clients``).
        node_wait_timeout: seconds to wait for them.
        resume: run the objects one at a time, checkpoint each in ``output_dir`` when done and
            skip objects already complete there under the same configuration
            (``fedpatch.federated.checkpoint``); needs an explicit ``objects`` list.
    """

    config_file: str = "configs/federated/patchcore_offline.yaml"
    overrides: tuple[str, ...] = ()
    objects: tuple[str, ...] = ()
    data_dir: str = ""
    output_dir: str = "outputs/federated"
    num_rounds: int = 1
    train_timeout: float = 1800.0
    evaluate_timeout: float = 1800.0
    min_nodes: int = 0
    node_wait_timeout: float = 120.0
    resume: bool = False

    KEYS = {
        "config-file": ("config_file", str),
        "overrides": ("overrides", str),
        "objects": ("objects", str),
        "data-dir": ("data_dir", str),
        "output-dir": ("output_dir", str),
        "num-rounds": ("num_rounds", int),
        "train-timeout": ("train_timeout", float),
        "evaluate-timeout": ("evaluate_timeout", float),
        "min-nodes": ("min_nodes", int),
        "node-wait-timeout": ("node_wait_timeout", float),
        "resume": ("resume", bool),
    }

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> AppSettings:
        """Read the keys this app knows (others, e.g. the client-only ``fault``, are ignored)."""
        values: dict[str, Any] = {}
        for key, (name, kind) in cls.KEYS.items():
            if key not in run_config:
                continue
            value = run_config[key]
            if kind in (str, bool):
                ok = isinstance(value, kind)
            else:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if kind is int and ok and float(value) != int(value):
                ok = False
            if not ok:
                raise ConfigError(f"run config {key!r} must be {kind.__name__}, got {value!r}")
            values[name] = kind(value)
        if "overrides" in values:
            values["overrides"] = parse_overrides(values["overrides"])
        if "objects" in values:
            values["objects"] = parse_objects(values["objects"])
        settings = cls(**values)
        for key, ok in (
            ("num-rounds", settings.num_rounds >= 1),
            ("train-timeout", settings.train_timeout >= 0),
            ("evaluate-timeout", settings.evaluate_timeout >= 0),
            ("min-nodes", settings.min_nodes >= 0),
            ("node-wait-timeout", settings.node_wait_timeout >= 0),
        ):
            if not ok:
                raise ConfigError(f"run config {key!r} is out of range: {run_config.get(key)!r}")
        if settings.resume and not settings.objects:
            raise ConfigError(
                "run config 'resume' needs an explicit 'objects' list (e.g. \"engine_wiring,pipe_clip\"): "
                "the server cannot know which objects the sites hold before asking them"
            )
        return settings

    def load_config(self, app_dir: str | Path | None = None) -> RunConfig:
        """The fedpatch config: ``config_file`` (resolved) with ``overrides`` applied."""
        return load_config(resolve_config_file(self.config_file, app_dir), list(self.overrides))


def parse_overrides(text: str) -> tuple[str, ...]:
    """``"a.b=1; c.d=[2, 3]"`` -> ``("a.b=1", "c.d=[2, 3]")`` (``;`` or newlines separate)."""
    parts = [p.strip() for chunk in text.splitlines() for p in chunk.split(";")]
    return tuple(p for p in parts if p)


def parse_objects(text: str) -> tuple[str, ...]:
    """``"all"`` or ``""`` -> ``()`` (every object); ``"a, b"`` -> ``("a", "b")``."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    return () if names in ([], ["all"]) else tuple(names)


def resolve_config_file(path: str, app_dir: str | Path | None = None) -> Path:
    """An absolute path, or a relative one found in ``app_dir`` (the FAB) or the working dir."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        if not candidate.is_file():
            raise ConfigError(f"run config 'config-file': {candidate} not found")
        return candidate
    tried = [Path(app_dir) / candidate] if app_dir is not None else []
    tried.append(Path.cwd() / candidate)
    for option in tried:
        if option.is_file():
            return option
    raise ConfigError(f"run config 'config-file': {path} not found (looked in {', '.join(str(t.parent) for t in tried)})")


# --------------------------------------------------------------------------------------------
# What every server message carries
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunRequest:
    """The run configuration the server sends with each message (clients hold no config)."""

    config_yaml: str
    objects: tuple[str, ...] = ()
    data_dir: str = ""
    round: int = 1

    @classmethod
    def make(cls, config: RunConfig, objects: Sequence[str], data_dir: str, round: int = 1) -> RunRequest:
        return cls(dump_config(config), tuple(objects), data_dir, round)

    def to_record(self) -> dict[str, str | int]:
        return {"config-yaml": self.config_yaml, "objects": ",".join(self.objects), "data-dir": self.data_dir, "round": self.round}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RunRequest:
        if not isinstance(record, Mapping):
            raise ReplyError(f"the server's 'config' record must be a mapping, got {type(record).__name__}")
        missing = [k for k in ("config-yaml", "objects", "data-dir", "round") if k not in record]
        if missing:
            raise ReplyError(f"the server's message lacks {', '.join(missing)} in its 'config' record")
        for key in ("config-yaml", "objects", "data-dir"):
            if not isinstance(record[key], str):
                raise ReplyError(f"the server's 'config' record field {key!r} must be a string, got {type(record[key]).__name__}")
        number = record["round"]
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ReplyError(f"the server's 'config' record field 'round' must be an integer >= 1, got {number!r}")
        return cls(record["config-yaml"], parse_objects(record["objects"]), record["data-dir"], number)

    def run_config(self) -> RunConfig:
        try:
            data = yaml.safe_load(self.config_yaml)
        except yaml.YAMLError as exc:
            raise ConfigError(f"the configuration sent by the server is not valid YAML: {exc}") from None
        return config_from_dict(data, "configuration sent by the server")


# --------------------------------------------------------------------------------------------
# Where a node's data is
# --------------------------------------------------------------------------------------------
def resolve_data_root(data_dir: str) -> Path:
    """``data_dir`` as a folder; ``""`` means the generated default dataset (created once)."""
    if not data_dir:
        from fedpatch.data.synthetic import ensure_default_dataset

        return ensure_default_dataset()
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"data directory not found: {root}")
    return root

"""Federated PatchCore without Flower: client jobs, message payloads and the server strategy.

The Flower apps in ``clients/`` and ``server/`` only move the plain dictionaries built here
(``{name: ndarray}``, ``{name: number}``, ``{name: str}``) in and out of Flower records; every
decision is taken here and tested without Flower.

Protocol (one round is enough for PatchCore; ``num-rounds`` > 1 repeats it, each round from
scratch, and the last round is reported):

1. ``train``: the server sends a :class:`RunRequest` (the resolved ``RunConfig`` as YAML, the
   objects, the data directory). Each client opens its share (:func:`open_client_data`: its
   partition of a shared data root, or its own node-local data directory), holds out its
   calibration images (:func:`split_calibration`), fits one bank per object with
   ``workflow.fit_local`` and replies with the banks in the wire dtype
   (``federated.bank_dtype``) plus fit metrics (:func:`fit_payload`).
2. The server (:class:`FederatedPatchCore`) validates every reply (:meth:`add_fit_reply`):
   wire dtype, width, NaN/inf, rows against the patches the client says it saw and against
   ``federated.max_bank_rows``. A client with any malformed bank, an error reply or no reply
   within the timeout is reported (node id + reason) and excluded from the rest of the round.
   Fewer than ``federated.min_clients`` good clients is a :class:`FederationError` naming
   the missing ones. The banks of each object are aggregated with
   ``fedpatch.aggregation.aggregate_banks`` (union in client-id order, then a second greedy
   coreset pass to ``global_ratio`` / ``global_size``).
3. ``evaluate``: every remaining client receives the global bank of each object it holds
   (wire dtype), scores its held-out calibration images and its test images
   (``workflow.score_local``) and replies with calibration scores, image scores, labels and
   keys, its ``PixelSummary`` and its own local metrics (:func:`evaluation_payload`). It keeps
   its negative pixel scores in its node state between this message and the next
   (:func:`accumulator_state`).
4. ``evaluate.counts``: the server merges the summaries of the clients pooled for each object
   and sends the merged region-score values; each client answers its ``NegativeCounts``
   (:func:`counts_payload`). A client that fails here is excluded and the object's summary is
   merged again without it, so pooled numbers always come from one consistent set of clients.
5. The server computes the pooled image AUROC, pixel AUROC and AUC-sPRO (the exact
   two-round pooling of ``fedpatch.metrics``; same math as ``workflow.pooled_metrics``), the
   threshold (``evaluation.threshold_quantile`` of the pooled calibration scores) and writes
   the global models and the tables (:func:`write_outputs`).

Test split ``common``: every client scores the whole test split of its objects, so the pooled
metrics of an object use one evaluation only, that of the pooled client with the lowest node
id (the others scored the same images with the same global bank, hence the same numbers;
their image keys are checked to be identical). Each client's own numbers are still reported.
With ``own`` the clients' test shares are disjoint and every evaluation is pooled.

Communication: the Flower apps count the payload bytes (``count_bytes`` of every record) of
every message, per client, stage and round, into a :class:`CommunicationLog`.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from torch.utils.data import Dataset, Subset

from fedpatch import workflow
from fedpatch.aggregation import AggregationResult, aggregate_banks, validate_client_bank
from fedpatch.config import RunConfig, config_from_dict, dump_config, load_config
from fedpatch.data import list_objects
from fedpatch.errors import BankValidationError, ConfigError, DataError, FedPatchError
from fedpatch.metrics import (
    NegativeCounts,
    ObjectMetrics,
    PixelAccumulator,
    PixelSummary,
    image_auroc,
    limit_key,
    merge_counts,
    merge_summaries,
    metrics_json,
    pixel_metrics,
)
from fedpatch.partition import ClientShare, client_share

LOGGER = logging.getLogger(__name__)

WIRE_DTYPES: dict[str, type[np.floating]] = {"float32": np.float32, "float16": np.float16}
REPORT_LIMIT = 0.05
"""The FPR limit of the AUC-sPRO column of the results tables."""


class FederationError(FedPatchError, RuntimeError):
    """The federation cannot finish: too few clients succeeded (the message names the others)."""


class ReplyError(FedPatchError, ValueError):
    """A client's reply is malformed; the message names the client and the field."""


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
    }

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> AppSettings:
        """Read the keys this app knows (others, e.g. the client-only ``fault``, are ignored)."""
        values: dict[str, Any] = {}
        for key, (name, kind) in cls.KEYS.items():
            if key not in run_config:
                continue
            value = run_config[key]
            ok = isinstance(value, str) if kind is str else isinstance(value, (int, float)) and not isinstance(value, bool)
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
        missing = [k for k in ("config-yaml", "objects", "data-dir", "round") if k not in record]
        if missing:
            raise ReplyError(f"the server's message lacks {', '.join(missing)} in its 'config' record")
        return cls(str(record["config-yaml"]), parse_objects(str(record["objects"])), str(record["data-dir"]), int(record["round"]))

    def run_config(self) -> RunConfig:
        try:
            data = yaml.safe_load(self.config_yaml)
        except yaml.YAMLError as exc:
            raise ConfigError(f"the configuration sent by the server is not valid YAML: {exc}") from None
        return config_from_dict(data, "configuration sent by the server")


# --------------------------------------------------------------------------------------------
# Client side: data, fit, evaluation, counts
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


@dataclass
class ClientData:
    """A client's images: per object its training share (fit + calibration) and test share."""

    source: str
    root: Path
    train: dict[str, Dataset]
    test: dict[str, Dataset]
    share: ClientShare | None = None
    skipped: list[str] = field(default_factory=list)

    @property
    def objects(self) -> list[str]:
        return list(self.train)


def open_client_data(
    config: RunConfig,
    root: str | Path,
    objects: Sequence[str] = (),
    partition_id: int | None = None,
    num_partitions: int | None = None,
) -> ClientData:
    """Open a client's share of ``root``.

    With ``partition_id``/``num_partitions`` (simulation, or nodes sharing one data root) the
    client takes its partition (``fedpatch.partition``) of every requested object; a requested
    object missing from the root is a DataError. Without them, ``root`` is the node's own data
    (the deployment case): every image of every requested object present there is the client's,
    and absent objects are listed in ``skipped`` (reported to the server).
    """
    root = Path(root)
    names = list(objects) if objects else list_objects(root)
    local = partition_id is None
    skipped: list[str] = []
    if local:
        skipped = [n for n in names if not (root / n).is_dir()]
        names = [n for n in names if n not in skipped]
    else:
        missing = [n for n in names if not (root / n).is_dir()]
        if missing:
            raise DataError(f"object folder(s) {', '.join(missing)} not found in {root}")
        if num_partitions is None or num_partitions < 1:
            raise ConfigError(f"num-partitions must be >= 1 with a partition-id, got {num_partitions}")
    trains = {n: workflow.open_object(root, n, "train", config) for n in names}
    tests = {n: workflow.open_object(root, n, "test", config) for n in names}
    if local:
        return ClientData(f"data-dir {root}", root, trains, tests, None, skipped)
    fed = config.federated
    share = client_share(
        {n: len(trains[n]) for n in names},
        {n: len(tests[n]) for n in names},
        int(partition_id),
        int(num_partitions),
        fed.partition,
        fed.dirichlet_alpha,
        fed.partition_seed,
        fed.test_split,
    )
    train = {n: Subset(trains[n], share.train[n]) for n in share.objects}
    test = {n: Subset(tests[n], share.test.get(n, [])) for n in share.objects}
    return ClientData(f"partition {partition_id}/{num_partitions} ({fed.partition})", root, train, test, share)


def split_calibration(train: Dataset, config: RunConfig) -> tuple[Subset, Subset]:
    """(fit images, held-out calibration images) of a training share, as ``fedpatch train`` does."""
    fit_idx, cal_idx = workflow.calibration_split(len(train), config.data.calibration_fraction, config.model.seed)
    return Subset(train, fit_idx), Subset(train, cal_idx)


@dataclass
class ObjectFit:
    """A client's fitted bank of one object and how it was made."""

    object_name: str
    bank: np.ndarray
    n_images: int
    n_calibration: int
    patches_seen: int
    fit_seconds: float


def fit_client(config: RunConfig, data: ClientData) -> list[ObjectFit]:
    """Step 1 on a client: fit one bank per object on its share (minus calibration images)."""
    fits = []
    for name, train in data.train.items():
        fit_set, calibration = split_calibration(train, config)
        start = time.perf_counter()
        model, stats = workflow.fit_local(config, fit_set)
        fits.append(ObjectFit(name, model.get_memory_bank(), stats.images, len(calibration), stats.patches_seen, time.perf_counter() - start))
        LOGGER.info("%s: fitted %d images (%d held out), %d patches -> %d rows", name, stats.images, len(calibration), stats.patches_seen, stats.bank_size)
    return fits


def to_wire(bank: np.ndarray, bank_dtype: str) -> np.ndarray:
    """A bank in the wire dtype; float16 overflow (inf) is an error, not a silent clip."""
    if bank_dtype not in WIRE_DTYPES:
        raise ConfigError(f"federated.bank_dtype must be one of {', '.join(WIRE_DTYPES)}, got {bank_dtype!r}")
    with np.errstate(over="ignore"):  # overflow is checked right below
        wire = np.ascontiguousarray(np.asarray(bank).astype(WIRE_DTYPES[bank_dtype]))
    if bank_dtype != "float32" and not np.isfinite(wire).all():
        raise BankValidationError(f"bank values exceed the {bank_dtype} range; use federated.bank_dtype: float32")
    return wire


def fit_payload(fits: Sequence[ObjectFit], bank_dtype: str) -> tuple[dict[str, np.ndarray], dict[str, int | float]]:
    """The train reply: ``{object: bank}`` in the wire dtype and the fit metrics.

    Metrics per object (``<object>/n_images``, ``/n_calibration``, ``/patches_seen``,
    ``/bank_rows``, ``/fit_seconds``) and totals (the same names without the prefix).
    """
    arrays = {f.object_name: to_wire(f.bank, bank_dtype) for f in fits}
    metrics: dict[str, int | float] = {}
    for f in fits:
        metrics.update(
            {
                f"{f.object_name}/n_images": f.n_images,
                f"{f.object_name}/n_calibration": f.n_calibration,
                f"{f.object_name}/patches_seen": f.patches_seen,
                f"{f.object_name}/bank_rows": int(f.bank.shape[0]),
                f"{f.object_name}/fit_seconds": float(f.fit_seconds),
            }
        )
    metrics.update(
        {
            "n_objects": len(fits),
            "n_images": sum(f.n_images for f in fits),
            "n_calibration": sum(f.n_calibration for f in fits),
            "patches_seen": sum(f.patches_seen for f in fits),
            "bank_rows": sum(int(f.bank.shape[0]) for f in fits),
            "fit_seconds": float(sum(f.fit_seconds for f in fits)),
        }
    )
    return arrays, metrics


@dataclass
class ObjectEvaluation:
    """A client's scores of one object under the global bank."""

    object_name: str
    calibration: np.ndarray
    evaluation: workflow.LocalEvaluation


def evaluate_client(config: RunConfig, data: ClientData, banks: Mapping[str, np.ndarray]) -> list[ObjectEvaluation]:
    """Steps 3-5 on a client: load each global bank, score calibration and test images."""
    unknown = [n for n in banks if n not in data.train]
    if unknown:
        raise DataError(f"the server sent banks for {', '.join(unknown)}, which this client ({data.source}) does not hold")
    results = []
    model = workflow.build_model(config)
    for name, bank in banks.items():
        model.set_memory_bank(np.asarray(bank, dtype=np.float32))
        _, calibration = split_calibration(data.train[name], config)
        scores = workflow.calibration_scores(model, calibration, config)
        evaluation = workflow.score_local(model, data.test[name], config)
        results.append(ObjectEvaluation(name, scores, evaluation))
        LOGGER.info("%s: scored %d calibration and %d test images", name, scores.size, len(evaluation.images))
    return results


def local_metrics(evaluation: workflow.LocalEvaluation, limits: Sequence[float]) -> dict[str, float]:
    """A client's own numbers (image AUROC, pixel AUROC, AUC-sPRO per limit) where defined."""
    out: dict[str, float] = {}
    labels = evaluation.labels
    if labels.size and 0 < labels.sum() < labels.size:
        out["image_auroc"] = image_auroc(evaluation.scores, labels)
    acc = evaluation.pixels
    summary = acc.summary()
    if summary.n_regions and summary.n_negative:
        pm = pixel_metrics(summary, acc.negative_counts(summary.values), limits)
        out["pixel_auroc"] = pm.pixel_auroc
        out.update({f"auc_spro@{limit_key(k)}": v for k, v in pm.auc_spro.items()})
    return out


def evaluation_payload(
    evaluations: Sequence[ObjectEvaluation], limits: Sequence[float]
) -> tuple[dict[str, np.ndarray], dict[str, int | float], dict[str, str]]:
    """The evaluate reply: arrays (calibration, scores, labels, summary), metrics, image keys."""
    arrays: dict[str, np.ndarray] = {}
    metrics: dict[str, int | float] = {}
    texts: dict[str, str] = {}
    for item in evaluations:
        n, ev = item.object_name, item.evaluation
        summary = ev.pixels.summary()
        arrays.update(
            {
                f"{n}/calibration": np.asarray(item.calibration, dtype=np.float64),
                f"{n}/scores": ev.scores.astype(np.float64),
                f"{n}/labels": ev.labels.astype(np.int64),
                f"{n}/values": np.ascontiguousarray(summary.values),
                f"{n}/positive_count": summary.positive_count.astype(np.int64),
                f"{n}/spro_gain": summary.spro_gain.astype(np.float64),
            }
        )
        metrics.update({f"{n}/n_regions": summary.n_regions, f"{n}/n_negative": summary.n_negative, f"{n}/n_test": len(ev.images)})
        metrics.update({f"{n}/local_{k}": v for k, v in local_metrics(ev, limits).items()})
        texts[f"{n}/keys"] = "\n".join(i.key for i in ev.images)
    return arrays, metrics, texts


def accumulator_state(evaluations: Sequence[ObjectEvaluation]) -> dict[str, np.ndarray]:
    """What a client keeps between ``evaluate`` and ``evaluate.counts``: its sorted negatives.

    ``{"<object>/<chunk>": ascending float32 scores}``; about 4 bytes per test pixel outside
    the defect regions. Rebuild with :func:`accumulators_from_state`.
    """
    state: dict[str, np.ndarray] = {}
    for item in evaluations:
        chunks = item.evaluation.pixels.negative_chunks()
        if not chunks:
            state[f"{item.object_name}/empty"] = np.empty(0, dtype=np.float32)
        for i, chunk in enumerate(chunks):
            state[f"{item.object_name}/{i:05d}"] = chunk
    return state


def accumulators_from_state(state: Mapping[str, np.ndarray]) -> dict[str, PixelAccumulator]:
    """Inverse of :func:`accumulator_state`."""
    grouped: dict[str, list[tuple[str, np.ndarray]]] = {}
    for key, array in state.items():
        name, _, part = key.rpartition("/")
        grouped.setdefault(name, [])
        if part != "empty":
            grouped[name].append((part, np.asarray(array)))
    return {name: PixelAccumulator.from_negative_chunks([a for _, a in sorted(parts)]) for name, parts in grouped.items()}


def counts_payload(accumulators: Mapping[str, PixelAccumulator], values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The counts reply: ``<object>/n_ge`` and ``<object>/n_gt`` at the merged values."""
    missing = [n for n in values if n not in accumulators]
    if missing:
        raise DataError(
            f"no kept pixel statistics for {', '.join(missing)}: the node state was lost between "
            "the evaluate and counts messages (node restarted?)"
        )
    out: dict[str, np.ndarray] = {}
    for name, merged in values.items():
        counts = accumulators[name].negative_counts(np.asarray(merged))
        out[f"{name}/n_ge"], out[f"{name}/n_gt"] = counts.n_ge, counts.n_gt
    return out


# --------------------------------------------------------------------------------------------
# Server side: the strategy
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClientFailure:
    """A client excluded from a round, and why."""

    client: str
    stage: str
    reason: str
    round: int = 1
    source: str = ""  # where the client's data is, when its train reply said so

    def describe(self) -> str:
        return f"node {self.client}" + (f" ({self.source})" if self.source else "") + f": {self.stage}: {self.reason}"


@dataclass
class ClientFit:
    """What the server learned from a client's valid train reply."""

    client: str
    info: dict[str, str]
    objects: dict[str, dict[str, float]]
    bytes_sent: int | None = None

    @property
    def partition(self) -> str:
        return self.info.get("source", "?")


@dataclass
class ClientEvaluation:
    """A client's validated evaluation of one object."""

    calibration: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    keys: list[str]
    summary: PixelSummary
    local: dict[str, float]


@dataclass
class ObjectResult:
    """The federated outcome of one object."""

    object_name: str
    aggregation: AggregationResult
    threshold: float | None
    n_calibration: int
    pooled_clients: list[str]
    image_auroc: float | None = None
    pixel_auroc: float | None = None
    auc_spro: dict[float, float] = field(default_factory=dict)
    n_good: int = 0
    n_defective: int = 0
    n_regions: int = 0
    notes: list[str] = field(default_factory=list)

    def object_metrics(self) -> ObjectMetrics | None:
        """As ``ObjectMetrics`` when every number is defined (else None)."""
        if self.image_auroc is None or self.pixel_auroc is None or not self.auc_spro:
            return None
        return ObjectMetrics(self.image_auroc, self.pixel_auroc, dict(self.auc_spro), self.n_good, self.n_defective, self.n_regions)


@dataclass
class RoundResult:
    """Everything a round produced (the last round's is written out)."""

    round: int
    clients: list[str]
    fits: dict[str, ClientFit]
    evaluations: dict[str, dict[str, ClientEvaluation]]
    objects: dict[str, ObjectResult]
    failures: list[ClientFailure]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def summarize_error(reason: str | None, limit: int = 400) -> str:
    """The readable core of an error reply's reason (Flower sends whole remote tracebacks).

    ANSI colours are dropped; when the reason holds Flower's ``Message: ...`` (the client's own
    exception text) that text is kept, else the last non-empty line; at most ``limit`` chars.
    """
    text = _ANSI.sub("", reason or "").strip()
    if not text:
        return "no reason given"
    if "Message: " in text:
        text = text.rsplit("Message: ", 1)[1].strip().removesuffix("'>").strip()
    else:
        text = [line.strip() for line in text.splitlines() if line.strip()][-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def client_order(client: str) -> tuple[int, int | str]:
    """Sort key: numeric node ids numerically, then anything else by name."""
    return (0, int(client)) if client.lstrip("-").isdigit() else (1, client)


def _metric(metrics: Mapping[str, Any], key: str, client: str, kind: type = int) -> Any:
    if key not in metrics:
        raise ReplyError(f"client {client}: metric {key!r} is missing")
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ReplyError(f"client {client}: metric {key!r} must be a finite number, got {value!r}")
    if kind is int:
        if float(value) != int(value) or value < 0:
            raise ReplyError(f"client {client}: metric {key!r} must be a non-negative integer, got {value!r}")
        return int(value)
    return float(value)


def _array(arrays: Mapping[str, np.ndarray], key: str, client: str, kinds: str) -> np.ndarray:
    if key not in arrays:
        raise ReplyError(f"client {client}: array {key!r} is missing")
    array = np.asarray(arrays[key])
    if array.ndim != 1 or array.dtype.kind not in kinds:
        raise ReplyError(f"client {client}: array {key!r} must be 1-D of kind {kinds!r}, got {array.dtype} {array.shape}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ReplyError(f"client {client}: array {key!r} holds NaN or infinite values")
    return array


class FederatedPatchCore:
    """The server strategy of one round: validate, aggregate, pool (no Flower in here).

    Args:
        config: the run configuration (``federated`` section: bank dtype, caps, global size,
            min clients, test split).
        feature_dim: the bank width every client must send (the server's model's).
        clients: ids (str) of the clients the round starts with.
        round: round number (for reports).
    """

    def __init__(self, config: RunConfig, feature_dim: int, clients: Sequence[str], round: int = 1) -> None:
        self.config = config
        self.feature_dim = int(feature_dim)
        self.round = round
        self.clients = sorted({str(c) for c in clients}, key=client_order)
        self.failures: list[ClientFailure] = []
        self.excluded: set[str] = set()
        self.fits: dict[str, ClientFit] = {}
        self.sources: dict[str, str] = {}  # client -> where its data is (from its train reply)
        self.banks: dict[str, dict[str, np.ndarray]] = {}
        self.aggregated: dict[str, AggregationResult] = {}
        self.evaluations: dict[str, dict[str, ClientEvaluation]] = {}
        self.merged: dict[str, tuple[tuple[str, ...], PixelSummary]] = {}
        self.counts: dict[str, dict[str, NegativeCounts]] = {}

    # ------------------------------------------------------------------ bookkeeping
    @property
    def active(self) -> list[str]:
        """Clients still in the round (not excluded), in id order."""
        return [c for c in self.clients if c not in self.excluded]

    def fail(self, client: str, stage: str, reason: str) -> None:
        """Exclude ``client`` from the rest of the round, recording why."""
        client = str(client)
        if client not in self.clients:
            self.clients = sorted([*self.clients, client], key=client_order)
        if client in self.excluded:
            return
        self.excluded.add(client)
        self.failures.append(ClientFailure(client, stage, reason, self.round, self.sources.get(client, "")))
        for per_object in self.banks.values():
            per_object.pop(client, None)
        for per_object in self.evaluations.values():
            per_object.pop(client, None)
        LOGGER.warning("round %d, %s: client %s excluded: %s", self.round, stage, client, reason)

    def require_min_clients(self, stage: str) -> None:
        """Raise :class:`FederationError` unless ``federated.min_clients`` clients remain."""
        need = self.config.federated.min_clients
        if len(self.active) >= need:
            return
        missing = "; ".join(f.describe() for f in self.failures)
        raise FederationError(
            f"round {self.round}, {stage}: only {len(self.active)} of {len(self.clients)} clients succeeded "
            f"(federated.min_clients = {need}); failed clients: {missing or 'none'}"
        )

    # ------------------------------------------------------------------ train
    def add_fit_reply(self, client: str, arrays: Mapping[str, np.ndarray], metrics: Mapping[str, Any], info: Mapping[str, Any]) -> bool:
        """Validate a train reply; keep its banks, or exclude the client (returns whether kept)."""
        client = str(client)
        if isinstance(info.get("source"), str) and info["source"]:
            self.sources[client] = info["source"]
        try:
            fit, banks = self._check_fit(client, arrays, metrics, info)
        except (ReplyError, BankValidationError) as exc:
            self.fail(client, "train", str(exc))
            return False
        self.fits[client] = fit
        for name, bank in banks.items():
            self.banks.setdefault(name, {})[client] = bank
        return True

    def _check_fit(
        self, client: str, arrays: Mapping[str, np.ndarray], metrics: Mapping[str, Any], info: Mapping[str, Any]
    ) -> tuple[ClientFit, dict[str, np.ndarray]]:
        fed = self.config.federated
        wire = np.dtype(WIRE_DTYPES[fed.bank_dtype])
        declared = {k.rpartition("/")[0] for k in metrics if "/" in k}
        extra = sorted(declared - set(arrays))
        if extra:
            raise ReplyError(f"client {client}: metrics for object(s) {', '.join(extra)} without a bank")
        objects: dict[str, dict[str, float]] = {}
        banks: dict[str, np.ndarray] = {}
        for name in sorted(arrays):
            bank = arrays[name]
            if not isinstance(bank, np.ndarray) or bank.dtype != wire:
                got = bank.dtype if isinstance(bank, np.ndarray) else type(bank).__name__
                raise BankValidationError(f"client {client}: bank of {name!r} has dtype {got}, expected {wire} (federated.bank_dtype)")
            stats = {
                "n_images": _metric(metrics, f"{name}/n_images", client),
                "n_calibration": _metric(metrics, f"{name}/n_calibration", client),
                "patches_seen": _metric(metrics, f"{name}/patches_seen", client),
                "bank_rows": _metric(metrics, f"{name}/bank_rows", client),
                "fit_seconds": _metric(metrics, f"{name}/fit_seconds", client, float),
            }
            checked = validate_client_bank(bank, self.feature_dim, f"{client} ({name})", stats["patches_seen"], fed.max_bank_rows)
            if checked.shape[0] != stats["bank_rows"]:
                raise BankValidationError(f"client {client} ({name}): bank has {checked.shape[0]} rows but the client reports {stats['bank_rows']}")
            objects[name] = stats
            banks[name] = checked
        bytes_sent = metrics.get("bytes_sent")
        fit = ClientFit(client, {str(k): str(v) for k, v in info.items()}, objects, int(bytes_sent) if isinstance(bytes_sent, (int, float)) else None)
        return fit, banks

    def aggregate(self) -> dict[str, AggregationResult]:
        """Step 2: one global bank per object, from the valid banks (needs ``min_clients``)."""
        self.require_min_clients("train")
        fed, model = self.config.federated, self.config.model
        self.aggregated = {}
        for name in sorted(self.banks):
            banks = {c: b for c, b in self.banks[name].items() if c not in self.excluded}
            if not banks:
                continue
            self.aggregated[name] = aggregate_banks(banks, fed.global_ratio, fed.global_size, model.seed, model.projection_dim)
            result = self.aggregated[name]
            LOGGER.info("round %d, %s: %d client banks, union %d rows -> global bank %d rows", self.round, name, len(banks), result.union_size, len(result.bank))
        if not self.aggregated:
            raise FederationError(f"round {self.round}: no client sent a valid bank for any object")
        return self.aggregated

    def evaluate_requests(self) -> dict[str, dict[str, np.ndarray]]:
        """Step 3: per client, the global bank (wire dtype) of every object it holds."""
        fed = self.config.federated
        requests: dict[str, dict[str, np.ndarray]] = {}
        for client in self.active:
            fit = self.fits.get(client)
            if fit is None:
                continue
            banks = {n: to_wire(self.aggregated[n].bank, fed.bank_dtype) for n in fit.objects if n in self.aggregated}
            if banks:  # a client holding no object (by-object, more clients than objects) is not asked
                requests[client] = banks
        return requests

    # ------------------------------------------------------------------ evaluate
    def add_evaluation_reply(
        self, client: str, arrays: Mapping[str, np.ndarray], metrics: Mapping[str, Any], texts: Mapping[str, Any]
    ) -> bool:
        """Validate an evaluate reply for every object the client was sent (returns whether kept)."""
        client = str(client)
        if client in self.excluded:
            return False
        try:
            parsed = {n: self._check_evaluation(client, n, arrays, metrics, texts) for n in self.fits[client].objects if n in self.aggregated}
        except (ReplyError, KeyError) as exc:
            self.fail(client, "evaluate", str(exc))
            return False
        for name, evaluation in parsed.items():
            self.evaluations.setdefault(name, {})[client] = evaluation
        return True

    def _check_evaluation(self, client: str, name: str, arrays: Mapping[str, np.ndarray], metrics: Mapping[str, Any], texts: Mapping[str, Any]) -> ClientEvaluation:
        calibration = _array(arrays, f"{name}/calibration", client, "f")
        scores = _array(arrays, f"{name}/scores", client, "f")
        labels = _array(arrays, f"{name}/labels", client, "iu")
        values = _array(arrays, f"{name}/values", client, "f")
        positive = _array(arrays, f"{name}/positive_count", client, "iu")
        gains = _array(arrays, f"{name}/spro_gain", client, "f")
        n_test = _metric(metrics, f"{name}/n_test", client)
        keys_text = texts.get(f"{name}/keys")
        if not isinstance(keys_text, str):
            raise ReplyError(f"client {client}: image keys of {name!r} are missing")
        keys = keys_text.split("\n") if keys_text else []
        if not scores.size == labels.size == len(keys) == n_test:
            raise ReplyError(f"client {client} ({name}): {scores.size} scores, {labels.size} labels, {len(keys)} keys for {n_test} test images")
        if labels.size and not np.isin(labels, (0, 1)).all():
            raise ReplyError(f"client {client} ({name}): labels must be 0 or 1")
        if not values.size == positive.size == gains.size:
            raise ReplyError(f"client {client} ({name}): summary arrays differ in length ({values.size}, {positive.size}, {gains.size})")
        if values.size > 1 and not (np.diff(values) > 0).all():
            raise ReplyError(f"client {client} ({name}): summary values must be strictly ascending")
        if (positive < 1).any() or (gains < 0).any():
            raise ReplyError(f"client {client} ({name}): summary counts must be positive and gains non-negative")
        summary = PixelSummary(values, positive.astype(np.int64), gains.astype(np.float64), _metric(metrics, f"{name}/n_regions", client), _metric(metrics, f"{name}/n_negative", client))
        prefix = f"{name}/local_"
        local = {k[len(prefix) :]: float(v) for k, v in metrics.items() if k.startswith(prefix) and isinstance(v, (int, float))}
        return ClientEvaluation(calibration.astype(np.float64), scores.astype(np.float64), labels.astype(np.int64), keys, summary, local)

    def pooled_clients(self, name: str) -> list[str]:
        """Clients whose evaluation of ``name`` enters the pooled metrics (see module docstring)."""
        present = [c for c in self.active if c in self.evaluations.get(name, {})]
        if self.config.federated.test_split == "common":
            return present[:1]
        return present

    def counts_requests(self) -> dict[str, dict[str, np.ndarray]]:
        """Step 4: per client, the merged region values of each object it is pooled for.

        Objects whose counts are complete for their current pooled clients are not asked again;
        after a client fails, the affected objects are merged again without it.
        """
        requests: dict[str, dict[str, np.ndarray]] = {}
        for name in sorted(self.evaluations):
            pooled = tuple(self.pooled_clients(name))
            if not pooled:
                continue
            merged = self.merged.get(name)
            if merged is None or merged[0] != pooled:
                summary = merge_summaries([self.evaluations[name][c].summary for c in pooled])
                self.merged[name] = (pooled, summary)
                self.counts[name] = {}
            summary = self.merged[name][1]
            if summary.values.size == 0:
                continue
            for client in pooled:
                if client not in self.counts[name]:
                    requests.setdefault(client, {})[name] = summary.values
        return requests

    def add_counts_reply(self, client: str, arrays: Mapping[str, np.ndarray], asked: Mapping[str, np.ndarray]) -> bool:
        """Validate a counts reply to ``asked`` (the values sent to this client)."""
        client = str(client)
        if client in self.excluded:
            return False
        try:
            parsed = {}
            for name, values in asked.items():
                n_ge = _array(arrays, f"{name}/n_ge", client, "iu").astype(np.int64)
                n_gt = _array(arrays, f"{name}/n_gt", client, "iu").astype(np.int64)
                limit = self.evaluations[name][client].summary.n_negative
                if not n_ge.size == n_gt.size == values.size:
                    raise ReplyError(f"client {client} ({name}): {n_ge.size} counts for {values.size} values")
                if (n_gt > n_ge).any() or (n_gt < 0).any() or (n_ge > limit).any():
                    raise ReplyError(f"client {client} ({name}): counts are inconsistent with its {limit} negative pixels")
                parsed[name] = NegativeCounts(n_ge, n_gt)
        except (ReplyError, KeyError) as exc:
            self.fail(client, "evaluate.counts", str(exc))
            return False
        for name, counts in parsed.items():
            self.counts[name][client] = counts
        return True

    # ------------------------------------------------------------------ results
    def result(self) -> RoundResult:
        """Step 5: pooled metrics, thresholds and per-client numbers (needs ``min_clients``)."""
        self.require_min_clients("evaluate")
        limits = self.config.evaluation.fpr_limits
        objects = {}
        for name, aggregation in self.aggregated.items():
            evaluated = {c: e for c, e in self.evaluations.get(name, {}).items() if c not in self.excluded}
            calibration = np.concatenate([e.calibration for e in evaluated.values()]) if evaluated else np.empty(0)
            threshold = workflow.threshold_from_scores(calibration, self.config)
            pooled = self.pooled_clients(name)
            result = ObjectResult(name, aggregation, threshold, int(calibration.size), pooled)
            if not pooled:
                result.notes.append("no client returned an evaluation")
                objects[name] = result
                continue
            if self.config.federated.test_split == "common":
                reference = evaluated[pooled[0]].keys
                differing = [c for c, e in evaluated.items() if sorted(e.keys) != sorted(reference)]
                if differing:
                    result.notes.append(f"test_split common: clients {', '.join(differing)} scored other images than {pooled[0]}")
            scores = np.concatenate([evaluated[c].scores for c in pooled])
            labels = np.concatenate([evaluated[c].labels for c in pooled])
            result.n_good, result.n_defective = int((labels == 0).sum()), int((labels == 1).sum())
            if result.n_good and result.n_defective:
                result.image_auroc = image_auroc(scores, labels)
            else:
                result.notes.append("image AUROC undefined: the pooled test images are not both good and defective")
            merged = self.merged.get(name)
            if merged is None or merged[0] != tuple(pooled):
                summary = merge_summaries([evaluated[c].summary for c in pooled])
            else:
                summary = merged[1]
            result.n_regions = summary.n_regions
            if summary.values.size and summary.n_regions and summary.n_negative:
                counts = self.counts.get(name, {})
                if set(counts) != set(pooled):
                    raise FederationError(f"{name}: negative counts missing from clients {sorted(set(pooled) - set(counts))}")
                pm = pixel_metrics(summary, merge_counts([counts[c] for c in pooled]), limits)
                result.pixel_auroc, result.auc_spro = pm.pixel_auroc, pm.auc_spro
            else:
                result.notes.append("pixel metrics undefined: no defect region (or no negative pixel) in the pooled test images")
            objects[name] = result
        evaluations = {n: {c: e for c, e in per.items() if c not in self.excluded} for n, per in self.evaluations.items()}
        return RoundResult(self.round, list(self.clients), {c: f for c, f in self.fits.items() if c not in self.excluded}, evaluations, objects, list(self.failures))


# --------------------------------------------------------------------------------------------
# Communication accounting
# --------------------------------------------------------------------------------------------
@dataclass
class CommunicationLog:
    """Payload bytes of every message, per round, stage and client (down = server -> client)."""

    entries: list[dict[str, Any]] = field(default_factory=list)

    def add(self, round: int, stage: str, client: str, down: int = 0, up: int = 0) -> None:
        self.entries.append({"round": round, "stage": stage, "client": str(client), "bytes_down": int(down), "bytes_up": int(up)})

    def per_client(self, round: int | None = None) -> dict[str, dict[str, int]]:
        totals: dict[str, dict[str, int]] = {}
        for e in self.entries:
            if round is not None and e["round"] != round:
                continue
            t = totals.setdefault(e["client"], {"bytes_down": 0, "bytes_up": 0})
            t["bytes_down"] += e["bytes_down"]
            t["bytes_up"] += e["bytes_up"]
        return dict(sorted(totals.items(), key=lambda kv: client_order(kv[0])))

    def to_json(self, bank_dtype: str) -> dict[str, Any]:
        rounds = sorted({e["round"] for e in self.entries})
        return {
            "bank_dtype": bank_dtype,
            "unit": "bytes of message payload (Flower record count_bytes: array data incl. npy headers, keys, config values)",
            "per_client": self.per_client(),
            "per_round": {str(r): self.per_client(r) for r in rounds},
            "total": {
                "bytes_down": sum(e["bytes_down"] for e in self.entries),
                "bytes_up": sum(e["bytes_up"] for e in self.entries),
            },
            "messages": self.entries,
        }


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------
def result_rows(result: RoundResult, limits: Sequence[float], communication: CommunicationLog | None = None) -> list[dict[str, Any]]:
    """Per object a pooled row (client ``all``) then one row per client; then the ``mean`` row.

    Column names follow the centralized ``results.csv`` (``image_auroc``, ``auc_spro@<limit>``,
    ``pixel_auroc``, ``threshold``, ``bank_size``, ``fit_seconds``); client rows hold each
    client's own numbers on its own test share, and its traffic of the round.
    """
    traffic = communication.per_client(result.round) if communication else {}
    keys = [limit_key(k) for k in limits]
    rows: list[dict[str, Any]] = []
    for name in sorted(result.objects):
        obj = result.objects[name]
        fits = {c: result.fits[c].objects[name] for c in obj.aggregation.contributions if c in result.fits}
        rows.append(
            {
                "object": name,
                "scope": "federated",
                "client": "all",
                "partition": f"{len(obj.aggregation.contributions)} client" + ("" if len(obj.aggregation.contributions) == 1 else "s"),
                "image_auroc": obj.image_auroc,
                **{f"auc_spro@{k}": obj.auc_spro.get(float(k)) for k in keys},
                "pixel_auroc": obj.pixel_auroc,
                "threshold": obj.threshold,
                "bank_size": len(obj.aggregation.bank),
                "fit_images": sum(int(f["n_images"]) for f in fits.values()),
                "calibration_images": obj.n_calibration,
                "test_good": obj.n_good,
                "test_defective": obj.n_defective,
                "fit_seconds": max((float(f["fit_seconds"]) for f in fits.values()), default=None),
                "bytes_up": None,
                "bytes_down": None,
            }
        )
        for client in sorted(obj.aggregation.contributions, key=client_order):
            if client not in fits:
                continue
            stats, ev = fits[client], result.evaluations.get(name, {}).get(client)
            local = ev.local if ev else {}
            rows.append(
                {
                    "object": name,
                    "scope": "client",
                    "client": client,
                    "partition": result.fits[client].partition,
                    "image_auroc": local.get("image_auroc"),
                    **{f"auc_spro@{k}": local.get(f"auc_spro@{k}") for k in keys},
                    "pixel_auroc": local.get("pixel_auroc"),
                    "threshold": None,
                    "bank_size": int(stats["bank_rows"]),
                    "fit_images": int(stats["n_images"]),
                    "calibration_images": int(stats["n_calibration"]),
                    "test_good": int((ev.labels == 0).sum()) if ev else None,
                    "test_defective": int((ev.labels == 1).sum()) if ev else None,
                    "fit_seconds": float(stats["fit_seconds"]),
                    "bytes_up": traffic.get(client, {}).get("bytes_up"),
                    "bytes_down": traffic.get(client, {}).get("bytes_down"),
                }
            )
    pooled = [r for r in rows if r["scope"] == "federated"]
    if pooled:
        mean: dict[str, Any] = {"object": "mean", "scope": "federated", "client": "all", "partition": ""}
        for column in ("image_auroc", *[f"auc_spro@{k}" for k in keys], "pixel_auroc", "bank_size", "fit_seconds"):
            known = [float(r[column]) for r in pooled if r[column] is not None]
            mean[column] = sum(known) / len(known) if known else None
        rows.append(mean)
    return rows


def _columns(limits: Sequence[float]) -> list[str]:
    keys = [limit_key(k) for k in limits]
    return [
        "object", "scope", "client", "partition", "image_auroc", *[f"auc_spro@{k}" for k in keys], "pixel_auroc",
        "threshold", "bank_size", "fit_images", "calibration_images", "test_good", "test_defective", "fit_seconds",
        "bytes_up", "bytes_down",
    ]  # fmt: skip


def results_csv(rows: Sequence[Mapping[str, Any]], limits: Sequence[float]) -> str:
    """The CSV text, numbers at full precision (like the centralized ``results.csv``)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = _columns(limits)
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else repr(row[c]) if isinstance(row.get(c), float) else str(row[c]) for c in columns])
    return buffer.getvalue()


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "n/a"
    return format(value, spec) if isinstance(value, float) else str(value)


def results_markdown(rows: Sequence[Mapping[str, Any]], result: RoundResult, config: RunConfig) -> str:
    """The Markdown table (AUC-sPRO@0.05 only; every limit is in the CSV), exclusions, notes."""
    fed = config.federated
    main = f"auc_spro@{limit_key(REPORT_LIMIT)}"
    lines = [
        "# fedpatch federated results",
        "",
        f"Round {result.round}: {len(result.fits)} of {len(result.clients)} clients succeeded; partition `{fed.partition}`, "
        f"test split `{fed.test_split}`, global ratio {fed.global_ratio:g}"
        + (f", global size {fed.global_size}" if fed.global_size else "")
        + f", bank dtype `{fed.bank_dtype}`, backbone `{config.model.backbone}`.",
        "",
        "| object | client | partition | image AUROC | AUC-sPRO@0.05 | pixel AUROC | bank size | fit images "
        "| test good/defective | threshold | bytes up / down |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        traffic = f"{r['bytes_up']:,} / {r['bytes_down']:,}" if r.get("bytes_up") is not None else ""
        counts = f"{_fmt(r.get('test_good'))}/{_fmt(r.get('test_defective'))}" if r.get("test_good") is not None else ""
        name = f"**{r['object']}**" if r["scope"] == "federated" else r["object"]
        lines.append(
            f"| {name} | {r['client']} | {r['partition']} | {_fmt(r['image_auroc'])} | {_fmt(r.get(main))} "
            f"| {_fmt(r['pixel_auroc'])} | {_fmt(r['bank_size'], ',.0f')} | {_fmt(r.get('fit_images'))} | {counts} "
            f"| {_fmt(r.get('threshold'), '.4g')} | {traffic} |"
        )
    lines += [
        "",
        "Client `all`: pooled over the clients with the exact two-round protocol (identical to scoring all "
        "test images in one place); other rows: each client's own test share. Mean row: mean over the objects. "
        "Bytes up / down: the client's payload bytes for the whole round (all its objects, every stage); "
        "per message and stage in `communication.json`. AUC-sPRO at every FPR limit is in `results.csv`.",
    ]
    if result.failures:
        lines += ["", "## Excluded clients", ""]
        lines += [f"- round {f.round}: {f.describe()}" for f in result.failures]
    notes = [f"- {name}: {note}" for name, obj in sorted(result.objects.items()) for note in obj.notes]
    if notes:
        lines += ["", "## Notes", "", *notes]
    return "\n".join(lines) + "\n"


def write_outputs(
    out_dir: str | Path,
    config: RunConfig,
    result: RoundResult,
    communication: CommunicationLog,
    failures: Sequence[ClientFailure] = (),
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write the global models, per-object ``metrics.json``, ``results.csv/md``,
    ``communication.json``, ``federation.json`` and the resolved ``config.yaml``.

    Models: ``models/patchcore_<object>.pt`` is a PatchCore (built from ``config``, not fitted)
    holding the global bank and the calibrated threshold; it loads with ``PatchCore.load``.
    """
    from fedpatch.maps_io import atomic_write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(config), encoding="utf-8")
    model = workflow.build_model(config)
    for name, obj in sorted(result.objects.items()):
        model.set_memory_bank(obj.aggregation.bank)
        model.threshold = obj.threshold
        size = workflow.resize_for(config, name)
        model.input_size = None if size == "native" else (int(size[0]), int(size[1]))
        model.save(out / "models" / f"patchcore_{name}.pt")
        metrics = obj.object_metrics()
        if metrics is not None:
            payload: dict[str, Any] = metrics_json(metrics)
        else:
            payload = {
                "localization": {"auc_spro": {limit_key(k): v for k, v in obj.auc_spro.items()}},
                "classification": {"auc_roc": obj.image_auroc},
                "fedpatch": {"pixel_auroc": obj.pixel_auroc, "n_good": obj.n_good, "n_defective": obj.n_defective, "n_regions": obj.n_regions},
            }
        payload["fedpatch"].update(
            {
                "threshold": obj.threshold,
                "calibration_images": obj.n_calibration,
                "global_bank_rows": len(obj.aggregation.bank),
                "union_rows": obj.aggregation.union_size,
                "contributions": obj.aggregation.contributions,
                "pooled_clients": obj.pooled_clients,
                "notes": obj.notes,
            }
        )
        atomic_write_json(out / name / "metrics.json", payload)
    limits = config.evaluation.fpr_limits
    rows = result_rows(result, limits, communication)
    (out / "results.csv").write_text(results_csv(rows, limits), encoding="utf-8")
    (out / "results.md").write_text(results_markdown(rows, result, config), encoding="utf-8")
    atomic_write_json(out / "communication.json", communication.to_json(config.federated.bank_dtype))
    federation = {
        "round": result.round,
        "clients": result.clients,
        "succeeded": sorted(result.fits, key=client_order),
        "fits": {c: {"info": f.info, "objects": f.objects} for c, f in sorted(result.fits.items(), key=lambda kv: client_order(kv[0]))},
        "failures": [asdict(f) for f in failures],
        **(dict(extra) if extra else {}),
    }
    atomic_write_json(out / "federation.json", federation)
    return out

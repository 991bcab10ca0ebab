"""The server strategy: validate client replies, aggregate the banks, pool the metrics."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedpatch import workflow
from fedpatch.aggregation import AggregationResult, aggregate_banks, validate_client_bank
from fedpatch.config import RunConfig
from fedpatch.errors import BankValidationError
from fedpatch.federated.client import WIRE_DTYPES, to_wire
from fedpatch.federated.errors import FederationError, ReplyError
from fedpatch.metrics import (
    NegativeCounts,
    ObjectMetrics,
    PixelSummary,
    image_auroc,
    merge_counts,
    merge_summaries,
    pixel_metrics,
)

LOGGER = logging.getLogger(__name__)


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


REJECTION_KINDS: dict[str, str] = {
    "error-reply": "the client answered with an error (its handler raised)",
    "duplicate-reply": "a second reply to one message (the same reply again, or a different one)",
    "unsolicited-reply": "a reply from a node the server did not ask",
    "wrong-dtype": "bank not in the wire dtype (federated.bank_dtype)",
    "wrong-dimension": "bank not 2-D or not of the model's feature width",
    "empty-bank": "bank without rows",
    "non-finite": "NaN or infinite values",
    "too-many-rows": "more bank rows than patches the client says it saw",
    "over-cap": "more bank rows than federated.max_bank_rows",
    "row-count-mismatch": "bank rows differ from the rows the client reports",
    "missing-field": "a required array, metric or text is missing",
    "bad-value": "a metric or array of the wrong type, sign or kind",
    "inconsistent": "arrays that disagree with each other or with earlier replies",
    "malformed": "any other malformed reply",
}
"""Why a reply is rejected: the keys under which ``federation.json`` and ``results.md`` count them."""


@dataclass(frozen=True)
class Rejection:
    """A reply the server received and did not use (it is never aggregated)."""

    client: str
    stage: str
    kind: str
    reason: str
    round: int = 1


def rejection_summary(rejections: Sequence[Rejection]) -> dict[str, Any]:
    """Counts per kind and per client (and kind), plus every rejection, for ``federation.json``."""
    by_kind: dict[str, int] = {}
    by_client: dict[str, dict[str, int]] = {}
    for r in rejections:
        by_kind[r.kind] = by_kind.get(r.kind, 0) + 1
        per = by_client.setdefault(r.client, {})
        per[r.kind] = per.get(r.kind, 0) + 1
    return {
        "total": len(rejections),
        "by_kind": dict(sorted(by_kind.items())),
        "by_client": {c: dict(sorted(by_client[c].items())) for c in sorted(by_client, key=client_order)},
        "replies": [{"round": r.round, "stage": r.stage, "client": r.client, "kind": r.kind, "reason": r.reason} for r in rejections],
    }


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
    rejections: list[Rejection] = field(default_factory=list)


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
        raise ReplyError(f"client {client}: metric {key!r} is missing", "missing-field")
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ReplyError(f"client {client}: metric {key!r} must be a finite number, got {value!r}", "bad-value")
    if kind is int:
        if float(value) != int(value) or value < 0:
            raise ReplyError(f"client {client}: metric {key!r} must be a non-negative integer, got {value!r}", "bad-value")
        return int(value)
    return float(value)


def _array(arrays: Mapping[str, np.ndarray], key: str, client: str, kinds: str) -> np.ndarray:
    if key not in arrays:
        raise ReplyError(f"client {client}: array {key!r} is missing", "missing-field")
    array = np.asarray(arrays[key])
    if array.ndim != 1 or array.dtype.kind not in kinds:
        raise ReplyError(f"client {client}: array {key!r} must be 1-D of kind {kinds!r}, got {array.dtype} {array.shape}", "bad-value")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ReplyError(f"client {client}: array {key!r} holds NaN or infinite values", "non-finite")
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
        self.rejections: list[Rejection] = []
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

    def reject(self, client: str, stage: str, kind: str, reason: str, exclude: bool = True) -> None:
        """Count a reply as rejected (``kind``: a key of :data:`REJECTION_KINDS`); by default
        also exclude its client from the rest of the round."""
        if kind not in REJECTION_KINDS:
            raise ValueError(f"unknown rejection kind {kind!r}")
        self.rejections.append(Rejection(str(client), stage, kind, reason, self.round))
        LOGGER.warning("round %d, %s: reply of client %s rejected (%s): %s", self.round, stage, client, kind, reason)
        if exclude:
            self.fail(client, stage, reason)

    def screen_replies(self, stage: str, asked: Collection[str], replies: Sequence[tuple[str, str]]) -> list[int]:
        """Which of ``replies`` (``(client, reply id)`` pairs, in arrival order) to read.

        At most one reply per asked client is read. The same reply again (same id) is rejected
        as a duplicate and dropped; a client that sent *different* replies to one message is
        ambiguous: all its replies are dropped, each extra one counted, and the client is
        excluded. A reply from a client that was not asked is rejected as unsolicited.
        """
        asked = {str(c) for c in asked}
        first: dict[str, tuple[int, str]] = {}
        conflicting: dict[str, int] = {}
        for index, (client, reply_id) in enumerate(replies):
            client = str(client)
            if client not in asked:
                self.reject(client, stage, "unsolicited-reply", f"reply from node {client}, which was not sent a {stage} message", exclude=False)
            elif client not in first:
                first[client] = (index, reply_id)
            elif reply_id == first[client][1]:
                self.reject(client, stage, "duplicate-reply", f"the same {stage} reply ({reply_id}) received again; the copy is ignored", exclude=False)
            else:
                conflicting[client] = conflicting.get(client, 1) + 1
        for client, count in sorted(conflicting.items(), key=lambda kv: client_order(kv[0])):
            reason = f"sent {count} different replies to one {stage} message; none is used"
            for _ in range(count - 1):
                self.reject(client, stage, "duplicate-reply", reason, exclude=False)
            self.fail(client, stage, reason)
        return sorted(index for client, (index, _) in first.items() if client not in conflicting)

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
        except ReplyError as exc:
            self.reject(client, "train", exc.kind, str(exc))
            return False
        except BankValidationError as exc:
            self.reject(client, "train", "malformed", str(exc))
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
            raise ReplyError(f"client {client}: metrics for object(s) {', '.join(extra)} without a bank", "missing-field")
        objects: dict[str, dict[str, float]] = {}
        banks: dict[str, np.ndarray] = {}
        for name in sorted(arrays):
            bank = arrays[name]
            if not isinstance(bank, np.ndarray) or bank.dtype != wire:
                got = bank.dtype if isinstance(bank, np.ndarray) else type(bank).__name__
                raise ReplyError(f"client {client}: bank of {name!r} has dtype {got}, expected {wire} (federated.bank_dtype)", "wrong-dtype")
            stats = {
                "n_images": _metric(metrics, f"{name}/n_images", client),
                "n_calibration": _metric(metrics, f"{name}/n_calibration", client),
                "patches_seen": _metric(metrics, f"{name}/patches_seen", client),
                "bank_rows": _metric(metrics, f"{name}/bank_rows", client),
                "fit_seconds": _metric(metrics, f"{name}/fit_seconds", client, float),
            }
            checked = self._check_bank(f"client {client} ({name})", bank, stats["patches_seen"])
            if checked.shape[0] != stats["bank_rows"]:
                raise ReplyError(f"client {client} ({name}): bank has {checked.shape[0]} rows but the client reports {stats['bank_rows']}", "row-count-mismatch")
            objects[name] = stats
            banks[name] = checked
        bytes_sent = metrics.get("bytes_sent")
        fit = ClientFit(client, {str(k): str(v) for k, v in info.items()}, objects, int(bytes_sent) if isinstance(bytes_sent, (int, float)) else None)
        return fit, banks

    def _check_bank(self, where: str, bank: np.ndarray, patches_seen: int) -> np.ndarray:
        """Shape, rows, finiteness and size of one bank, each failure under its own kind; then
        ``validate_client_bank`` (the library's checks) as the last gate."""
        if bank.ndim != 2:
            raise ReplyError(f"{where}: expected a 2-D array [N, D], got shape {bank.shape}", "wrong-dimension")
        rows, width = bank.shape
        if width != self.feature_dim:
            raise ReplyError(f"{where}: feature dimension {width} does not match {self.feature_dim}", "wrong-dimension")
        if rows == 0:
            raise ReplyError(f"{where}: the array has no rows", "empty-bank")
        bad = int((~np.isfinite(bank)).any(axis=1).sum())
        if bad:
            raise ReplyError(f"{where}: {bad} row(s) hold NaN or infinite values", "non-finite")
        if rows > patches_seen:
            raise ReplyError(f"{where}: bank of {rows} rows exceeds its {patches_seen} patches", "too-many-rows")
        cap = self.config.federated.max_bank_rows
        if cap is not None and rows > cap:
            raise ReplyError(f"{where}: bank of {rows} rows exceeds the cap of {cap} (federated.max_bank_rows)", "over-cap")
        return validate_client_bank(bank, self.feature_dim, where.removeprefix("client "), patches_seen, cap)

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
        except ReplyError as exc:
            self.reject(client, "evaluate", exc.kind, str(exc))
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
            raise ReplyError(f"client {client}: image keys of {name!r} are missing", "missing-field")
        keys = keys_text.split("\n") if keys_text else []
        if not scores.size == labels.size == len(keys) == n_test:
            raise ReplyError(f"client {client} ({name}): {scores.size} scores, {labels.size} labels, {len(keys)} keys for {n_test} test images", "inconsistent")
        if labels.size and not np.isin(labels, (0, 1)).all():
            raise ReplyError(f"client {client} ({name}): labels must be 0 or 1", "bad-value")
        if not values.size == positive.size == gains.size:
            raise ReplyError(f"client {client} ({name}): summary arrays differ in length ({values.size}, {positive.size}, {gains.size})", "inconsistent")
        if values.size > 1 and not (np.diff(values) > 0).all():
            raise ReplyError(f"client {client} ({name}): summary values must be strictly ascending", "inconsistent")
        if (positive < 1).any() or (gains < 0).any():
            raise ReplyError(f"client {client} ({name}): summary counts must be positive and gains non-negative", "bad-value")
        summary = PixelSummary(values, positive.astype(np.int64), gains.astype(np.float64), _metric(metrics, f"{name}/n_regions", client), _metric(metrics, f"{name}/n_negative", client))
        prefix = f"{name}/local_"
        local = {k[len(prefix) :]: float(v) for k, v in metrics.items() if k.startswith(prefix) and isinstance(v, (int, float))}
        return ClientEvaluation(calibration.astype(np.float64), scores.astype(np.float64), labels.astype(np.int64), keys, summary, local)

    def pooled_clients(self, name: str) -> list[str]:
        """Clients whose evaluation of ``name`` enters the pooled metrics (see the ``fedpatch.federated`` docstring)."""
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
                    raise ReplyError(f"client {client} ({name}): {n_ge.size} counts for {values.size} values", "inconsistent")
                if (n_gt > n_ge).any() or (n_gt < 0).any() or (n_ge > limit).any():
                    raise ReplyError(f"client {client} ({name}): counts are inconsistent with its {limit} negative pixels", "inconsistent")
                parsed[name] = NegativeCounts(n_ge, n_gt)
        except ReplyError as exc:
            self.reject(client, "evaluate.counts", exc.kind, str(exc))
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
        fits = {c: f for c, f in self.fits.items() if c not in self.excluded}
        return RoundResult(self.round, list(self.clients), fits, evaluations, objects, list(self.failures), list(self.rejections))

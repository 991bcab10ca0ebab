"""Everything a client does: open its data, fit its banks, score with the global banks, count.

Each step returns the plain payloads (``{name: ndarray}``, ``{name: number}``, ``{name: str}``)
the ClientApp puts into Flower records.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Subset

from fedpatch import workflow
from fedpatch.config import RunConfig
from fedpatch.data import list_objects
from fedpatch.errors import BankValidationError, ConfigError, DataError
from fedpatch.memory_bank import validate_bank_array
from fedpatch.metrics import PixelAccumulator, image_auroc, limit_key, pixel_metrics
from fedpatch.partition import ClientShare, client_share
from fedpatch.privacy import BankPrivacy

LOGGER = logging.getLogger(__name__)

WIRE_DTYPES: dict[str, type[np.floating]] = {"float32": np.float32, "float16": np.float16}


# --------------------------------------------------------------------------------------------
# Client side: data, fit, evaluation, counts
# --------------------------------------------------------------------------------------------
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


@dataclass
class ObjectFit:
    """A client's fitted bank of one object and how it was made."""

    object_name: str
    bank: np.ndarray
    n_images: int
    n_calibration: int
    patches_seen: int
    fit_seconds: float


def bank_privacy(config: RunConfig, node_config: Mapping[str, Any] | None = None) -> BankPrivacy:
    """The client's bank transform (``federated.privacy``); a rotation key comes from
    ``node_config["rotation-key"]`` or env ``FEDPATCH_ROTATION_KEY``, never from the server."""
    fed = config.federated
    return BankPrivacy.from_settings(fed.privacy, fed.dp_epsilon, fed.dp_delta, fed.clip_norm, node_config)


def fit_client(config: RunConfig, data: ClientData, node_config: Mapping[str, Any] | None = None) -> list[ObjectFit]:
    """Step 1 on a client: fit one bank per object on its share (minus calibration images).

    The returned banks are what the client sends: already rotated or noised when
    ``federated.privacy`` says so (:func:`bank_privacy`).
    """
    privacy = bank_privacy(config, node_config)
    fits = []
    for name, train in data.train.items():
        fit_set, calibration = workflow.split_calibration(train, config)
        start = time.perf_counter()
        model, stats = workflow.fit_local(config, fit_set)
        fits.append(ObjectFit(name, privacy.outgoing(model.get_memory_bank()), stats.images, len(calibration), stats.patches_seen, time.perf_counter() - start))
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


def evaluate_client(
    config: RunConfig, data: ClientData, banks: Mapping[str, np.ndarray], node_config: Mapping[str, Any] | None = None
) -> list[ObjectEvaluation]:
    """Steps 3-5 on a client: load each global bank, score calibration and test images.

    Under ``federated.privacy: rotation`` the global banks arrive rotated and are un-rotated
    here with the client's key before scoring.
    """
    privacy = bank_privacy(config, node_config)
    unknown = [n for n in banks if n not in data.train]
    if unknown:
        raise DataError(f"the server sent banks for {', '.join(unknown)}, which this client ({data.source}) does not hold")
    results = []
    model = workflow.build_model(config)
    for name, bank in banks.items():
        received = validate_bank_array(bank, model.feature_dim, source=f"global bank of {name!r} sent by the server to {data.source}")
        # handed over, not copied: nothing else holds the received array (a global bank can be GBs)
        model.set_memory_bank(privacy.incoming(received), copy=False)
        _, calibration = workflow.split_calibration(data.train[name], config)
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

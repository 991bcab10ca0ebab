"""Flower ClientApp of fedpatch: thin glue from Flower messages to ``fedpatch.federated``.

Handlers (message types; the protocol is described in ``fedpatch.federated``):

- ``train``: fit one memory bank per object on this node's images; reply with the banks
  (``ArrayRecord`` "banks", one array per object, in ``federated.bank_dtype``), fit metrics
  (``MetricRecord`` "fit": images, calibration images, patches seen, bank rows, fit seconds,
  bytes sent) and a description (``ConfigRecord`` "info").
- ``evaluate``: load the global banks ("banks"), score calibration and test images; reply
  with scores, labels, pixel summaries ("results", "summary", "keys").
- ``evaluate.counts``: answer negative-pixel counts at the server's merged values ("values").

Where a node's images come from (``node_config``):

- ``data-dir``: the node's own data root (deployment: each plant has its own images); every
  requested object found there is the node's.
- otherwise ``partition-id`` / ``num-partitions`` (set by the simulation engine, or given to
  ``flower-supernode --node-config``): the node's partition (``fedpatch.partition``) of the
  data root the server names (run config ``data-dir``; empty = the generated default dataset).
- ``rotation-key``: the federation's secret for ``federated.privacy: rotation`` (or env
  ``FEDPATCH_ROTATION_KEY``); read only here, never sent to the server.

State between ``evaluate`` and ``evaluate.counts``: ClientApps are stateless per message, so
the node keeps its negative pixel scores in ``context.state`` (``ArrayRecord``
"fedpatch.negatives", ~4 bytes per negative test pixel, tagged with the round in
"fedpatch.negatives-meta"); every ``evaluate`` replaces them. If that state is missing when
counts are asked (a restarted node), the handler fails and the server excludes the node.

Test hook: ``clients/faults.py`` (run/node config ``fault``), off by default.
"""

from __future__ import annotations

import logging
from logging import INFO

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from clients.faults import Fault
from fedpatch.config import RunConfig
from fedpatch.errors import ConfigError
from fedpatch.federated import (
    ClientData,
    RunRequest,
    accumulator_state,
    accumulators_from_state,
    counts_payload,
    evaluate_client,
    evaluation_payload,
    fit_client,
    fit_payload,
    open_client_data,
    resolve_data_root,
)

STATE_NEGATIVES = "fedpatch.negatives"
STATE_META = "fedpatch.negatives-meta"

logging.getLogger("fedpatch").setLevel(logging.WARNING)
app = ClientApp()


def _arrays(record: ArrayRecord) -> dict:
    return {key: array.numpy() for key, array in record.items()}


def _array_record(arrays: dict) -> ArrayRecord:
    return ArrayRecord({key: Array(value) for key, value in arrays.items()})


def _request(msg: Message) -> tuple[RunRequest, RunConfig]:
    request = RunRequest.from_record(msg.content["config"])
    return request, request.run_config()


def _client_data(request: RunRequest, config: RunConfig, context: Context) -> ClientData:
    node = context.node_config
    own = node.get("data-dir")
    if isinstance(own, str) and own:
        return open_client_data(config, resolve_data_root(own), request.objects)
    if "partition-id" not in node or "num-partitions" not in node:
        raise ConfigError("node config needs either data-dir (the node's own data) or partition-id and num-partitions")
    root = resolve_data_root(request.data_dir)
    return open_client_data(config, root, request.objects, int(node["partition-id"]), int(node["num-partitions"]))


def _fault(context: Context) -> Fault:
    return Fault.for_node(context.node_config, context.run_config)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Fit this node's banks and send them."""
    request, config = _request(msg)
    _fault(context).on("train")
    data = _client_data(request, config, context)
    fits = fit_client(config, data, context.node_config)
    arrays, metrics = fit_payload(fits, config.federated.bank_dtype)
    arrays, metrics = _fault(context).corrupt(arrays, metrics)
    banks = _array_record(arrays)
    metrics["bytes_sent"] = banks.count_bytes()
    info = {"source": data.source, "objects": ",".join(data.objects), "skipped": ",".join(data.skipped)}
    log(INFO, "fedpatch client %s: round %d, %s: %d banks, %d rows, %d bytes", context.node_id, request.round, data.source, len(arrays), metrics["bank_rows"], metrics["bytes_sent"])
    content = RecordDict({"banks": banks, "fit": MetricRecord(metrics), "info": ConfigRecord(info)})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score calibration and test images with the global banks; keep the negatives."""
    request, config = _request(msg)
    _fault(context).on("evaluate")
    data = _client_data(request, config, context)
    evaluations = evaluate_client(config, data, _arrays(msg.content["banks"]), context.node_config)
    arrays, metrics, texts = evaluation_payload(evaluations, config.evaluation.fpr_limits)
    context.state[STATE_NEGATIVES] = _array_record(accumulator_state(evaluations))
    context.state[STATE_META] = ConfigRecord({"round": request.round})
    results = _array_record(arrays)
    metrics["bytes_sent"] = results.count_bytes()
    content = RecordDict({"results": results, "summary": MetricRecord(metrics), "keys": ConfigRecord(texts)})
    return Message(content, reply_to=msg)


@app.evaluate("counts")
def counts(msg: Message, context: Context) -> Message:
    """Negative-pixel counts at the merged region values, from the kept negatives."""
    request, _ = _request(msg)
    _fault(context).on("counts")
    state = context.state.get(STATE_NEGATIVES) if STATE_NEGATIVES in context.state else None
    meta = context.state.get(STATE_META) if STATE_META in context.state else None
    if state is None or meta is None or int(meta["round"]) != request.round:
        kept = None if meta is None else int(meta["round"])
        raise RuntimeError(f"no pixel statistics kept for round {request.round} (kept: {kept}); the node state was lost")
    accumulators = accumulators_from_state(_arrays(state))
    arrays = counts_payload(accumulators, _arrays(msg.content["values"]))
    return Message(RecordDict({"counts": _array_record(arrays)}), reply_to=msg)

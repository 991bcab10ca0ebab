"""Flower ServerApp of fedpatch: thin glue from Flower messages to ``fedpatch.federated``.

The strategy (validation, aggregation, pooling, the results) is
``fedpatch.federated.FederatedPatchCore``; this module only sends messages, collects replies
within the configured timeouts, counts the bytes of every message and writes the outputs.

Run configuration: ``[tool.flwr.app.config]`` in ``pyproject.toml`` (overridable with
``flwr run . --run-config ...``), read by ``fedpatch.federated.AppSettings``.

Who takes part: every SuperNode connected when the run starts. The server waits until at least
``min-nodes`` nodes (0 = ``federated.min_clients``) are connected and their number has been
stable for a second (``node-wait-timeout`` bounds the wait), then uses them all; in a
simulation that is ``num-supernodes``. ``federated.num_clients`` is only compared with it (a
warning when they differ): each node's partition comes from its own ``num-partitions``. In a
deployment whose nodes connect over time, set ``min-nodes`` to the number expected.

Failures: an error reply, no reply within ``train-timeout`` / ``evaluate-timeout`` (each
message also carries that TTL; a node that left is named as no longer connected), an error the
SuperLink returns for the node (it went offline, or the message expired) or a malformed
reply excludes the node for the rest of the round (logged with its node id and the reason,
listed in ``federation.json`` and ``results.md``); fewer than ``federated.min_clients``
remaining nodes fail the run with a message naming the excluded ones (``federation.json`` then
has ``"status": "failed"``). Replies are screened first (``FederatedPatchCore.screen_replies``:
duplicates and unsolicited replies); every reply received and not used is counted under its
reason in the ``rejected`` section of ``federation.json`` and ``results.md``.

Resume (run config ``resume``): objects run one at a time and are checkpointed in the output
folder; a restarted run skips the complete ones (``fedpatch.federated.checkpoint``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedpatch import workflow
from fedpatch.config import RunConfig
from fedpatch.federated import (
    AppSettings,
    ClientFailure,
    CommunicationLog,
    FederatedPatchCore,
    FederationError,
    Rejection,
    RoundResult,
    RunRequest,
    client_order,
    rejection_summary,
    summarize_error,
    write_object_outputs,
    write_outputs,
)
from fedpatch.federated.checkpoint import ObjectCheckpoint, load_checkpoint, write_resumed_outputs
from fedpatch.maps_io import atomic_write_json

APP_DIR = Path(__file__).resolve().parent.parent
"""The app's root (the installed FAB under ``flwr run``): relative config files are found here."""

logging.getLogger("fedpatch").setLevel(logging.INFO)
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by the run config."""
    settings = AppSettings.from_run_config(context.run_config)
    config = settings.load_config(APP_DIR)
    run_federation(grid, config, settings)


def _config_bytes(record: ConfigRecord) -> int:
    """``ConfigRecord.count_bytes`` without its failure on empty strings (flwr 1.41)."""
    total = 0
    for key, value in record.items():
        items = value if isinstance(value, list) else [value]
        total += len(key) + sum(1 if isinstance(v, bool) else len(v) if isinstance(v, (str, bytes)) else 8 for v in items)
    return total


def record_bytes(content: RecordDict) -> int:
    """Payload bytes of a message's records (Flower's ``count_bytes``: array data with npy
    headers, metric/config values, keys)."""
    return sum(_config_bytes(r) if isinstance(r, ConfigRecord) else r.count_bytes() for r in content.values())


def wait_for_nodes(grid: Grid, need: int, timeout: float, poll: float = 0.5, settle: float = 1.0) -> list[int]:
    """Node ids once at least ``need`` nodes are connected and the count held for ``settle`` s."""
    start = time.monotonic()
    last: list[int] = []
    since = start
    while True:
        nodes = sorted(grid.get_node_ids())
        now = time.monotonic()
        if nodes != last:
            last, since = nodes, now
        if len(nodes) >= max(need, 1) and now - since >= settle:
            return nodes
        if now - start > timeout:
            raise FederationError(
                f"only {len(nodes)} SuperNode(s) connected after {timeout:g} s; the run needs at least "
                f"{max(need, 1)} (run config min-nodes, else federated.min_clients)"
            )
        time.sleep(poll)


def exchange(
    grid: Grid,
    contents: Mapping[str, RecordDict],
    message_type: str,
    stage: str,
    timeout: float,
    strategy: FederatedPatchCore,
    communication: CommunicationLog,
) -> dict[str, RecordDict]:
    """Send one message per client, collect replies; report error replies and silent clients.

    A reply the SuperLink sends itself (source ``SUPERLINK_NODE_ID``) answers for a node it
    could not deliver to or hear from: an error naming a node that went offline (missed
    heartbeats, or signed off) or a message or reply that expired. It is matched to that node
    through the message it answers, and the node fails with the SuperLink's reason; it is not
    a reply *from* a node (node id 1 is the SuperLink's), so it is never counted as one.
    """
    messages = []
    for client, content in contents.items():
        communication.add(strategy.round, stage, client, down=record_bytes(content))
        messages.append(Message(content, dst_node_id=int(client), message_type=message_type, group_id=str(strategy.round), ttl=timeout or None))
    replies = list(grid.send_and_receive(messages, timeout=timeout or None))
    # the grid gives each message its id when it pushes it
    sent = {m.metadata.message_id: client for client, m in zip(contents, messages, strict=True) if m.metadata.message_id}
    from_link = [r for r in replies if r.metadata.src_node_id == SUPERLINK_NODE_ID]
    replies = [r for r in replies if r.metadata.src_node_id != SUPERLINK_NODE_ID]
    keep = strategy.screen_replies(stage, contents, [(str(r.metadata.src_node_id), r.metadata.message_id) for r in replies])
    received: dict[str, RecordDict] = {}
    for reply in (replies[i] for i in keep):
        client = str(reply.metadata.src_node_id)
        if reply.has_error():
            log(WARNING, "client %s: error reply at %s (code %s): %s", client, stage, reply.error.code, reply.error.reason)
            strategy.reject(client, stage, "error-reply", f"error reply (code {reply.error.code}): {summarize_error(reply.error.reason)}")
            continue
        communication.add(strategy.round, stage, client, up=record_bytes(reply.content))
        received[client] = reply.content
    for notice in from_link:
        _superlink_notice(notice, sent, received, stage, strategy)
    silent = [c for c in contents if c not in received and c not in strategy.excluded]
    if silent:
        connected = {str(n) for n in grid.get_node_ids()}
        for client in silent:
            gone = "" if client in connected else " (the node is no longer connected)"
            strategy.fail(client, stage, f"no reply within the {stage} timeout of {timeout:g} s{gone}")
    return received


def _superlink_notice(notice: Message, sent: Mapping[str, str], received: Mapping[str, RecordDict], stage: str, strategy: FederatedPatchCore) -> None:
    """Fail the node a SuperLink error reply answers for, unless that node's own reply came
    (then the notice is stale); any other reply of the SuperLink (to no message of this
    exchange, or without an error) is counted as unsolicited, under the client ``superlink``."""
    client = sent.get(notice.metadata.reply_to_message_id)
    if client is None or not notice.has_error():
        about = f"answers no {stage} message of this round" if client is None else f"carries no error (it answers node {client}'s message)"
        strategy.reject("superlink", stage, "unsolicited-reply", f"a reply from the SuperLink itself that {about}", exclude=False)
        return
    if client in received:
        return
    error = notice.error
    log(WARNING, "client %s: the SuperLink answered for it at %s (code %s): %s", client, stage, error.code, error.reason)
    strategy.fail(client, stage, f"no reply; the SuperLink answered for the node (code {error.code}): {summarize_error(error.reason)}")


def _arrays(content: RecordDict, key: str) -> dict[str, Any]:
    record = content.get(key) if key in content else None
    return {} if record is None else {k: v.numpy() for k, v in record.items()}


def _values(content: RecordDict, key: str) -> dict[str, Any]:
    return dict(content[key]) if key in content else {}


def run_round(
    grid: Grid, config: RunConfig, settings: AppSettings, strategy: FederatedPatchCore, communication: CommunicationLog, objects: Sequence[str] | None = None
) -> RoundResult:
    """One round (``strategy.round``): train, aggregate, evaluate, counts, pooled results, for
    ``objects`` (default: the run config's)."""
    rnd = strategy.round
    request = ConfigRecord(RunRequest.make(config, settings.objects if objects is None else objects, settings.data_dir, rnd).to_record())

    log(INFO, "[round %d] train: %d clients", rnd, len(strategy.active))
    contents = {c: RecordDict({"config": request}) for c in strategy.active}
    for client, content in exchange(grid, contents, "train", "train", settings.train_timeout, strategy, communication).items():
        strategy.add_fit_reply(client, _arrays(content, "banks"), _values(content, "fit"), _values(content, "info"))
    for client, fit in sorted(strategy.fits.items(), key=lambda kv: client_order(kv[0])):
        skipped = fit.info.get("skipped")
        log(INFO, "[round %d] client %s (%s): %d object(s), %s bytes up%s", rnd, client, fit.partition, len(fit.objects), fit.bytes_sent, f", skipped {skipped}" if skipped else "")
    strategy.aggregate()

    requests = strategy.evaluate_requests()
    log(INFO, "[round %d] evaluate: %d clients", rnd, len(requests))
    contents = {c: RecordDict({"config": request, "banks": ArrayRecord({k: Array(v) for k, v in banks.items()})}) for c, banks in requests.items()}
    for client, content in exchange(grid, contents, "evaluate", "evaluate", settings.evaluate_timeout, strategy, communication).items():
        strategy.add_evaluation_reply(client, _arrays(content, "results"), _values(content, "summary"), _values(content, "keys"))
    strategy.require_min_clients("evaluate")

    while asked := strategy.counts_requests():
        contents = {c: RecordDict({"config": request, "values": ArrayRecord({k: Array(v) for k, v in values.items()})}) for c, values in asked.items()}
        for client, content in exchange(grid, contents, "evaluate.counts", "evaluate.counts", settings.evaluate_timeout, strategy, communication).items():
            strategy.add_counts_reply(client, _arrays(content, "counts"), asked[client])
        strategy.require_min_clients("evaluate.counts")
    return strategy.result()


@dataclass
class Record:
    """Failures and rejections of the whole run, including those of a round still in flight."""

    failures: list[ClientFailure] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    strategy: FederatedPatchCore | None = None

    def absorb(self) -> None:
        if self.strategy is not None:
            self.failures += self.strategy.failures
            self.rejections += self.strategy.rejections
            self.strategy = None


def run_rounds(
    grid: Grid, config: RunConfig, settings: AppSettings, feature_dim: int, nodes: Sequence[int], objects: Sequence[str], communication: CommunicationLog, record: Record
) -> RoundResult:
    """``num-rounds`` rounds over ``objects``; the last round's result."""
    result = None
    for rnd in range(1, settings.num_rounds + 1):
        record.strategy = FederatedPatchCore(config, feature_dim, [str(n) for n in nodes], rnd)
        result = run_round(grid, config, settings, record.strategy, communication, objects)
        record.absorb()
        _log_round(result, communication)
    assert result is not None
    return result


def run_by_object(grid: Grid, config: RunConfig, settings: AppSettings, feature_dim: int, nodes: Sequence[int], out_dir: Path, record: Record) -> RoundResult | None:
    """``resume``: one object at a time, each checkpointed when done; complete objects skipped."""
    checkpoints: dict[str, ObjectCheckpoint] = {}
    resumed: list[str] = []
    result = None
    for name in settings.objects:
        found = load_checkpoint(out_dir, name, config)
        if found is not None:
            log(INFO, "resume: %s is complete in %s (same configuration); skipped", name, out_dir)
            checkpoints[name], resumed = found, [*resumed, name]
            continue
        communication = CommunicationLog()
        first_failure, first_rejection = len(record.failures), len(record.rejections)
        result = run_rounds(grid, config, settings, feature_dim, nodes, (name,), communication, record)
        write_object_outputs(out_dir, config, [result.objects[name]])
        checkpoint = ObjectCheckpoint.from_round(name, config, result, communication, [str(n) for n in nodes], record.failures[first_failure:], record.rejections[first_rejection:])
        checkpoint.save(out_dir)  # written last: the object counts as complete only now
        checkpoints[name] = checkpoint
        log(INFO, "resume: %s done and checkpointed", name)
    extra = _completed(settings, nodes)
    write_resumed_outputs(out_dir, config, checkpoints, resumed, extra)
    return result


def run_federation(grid: Grid, config: RunConfig, settings: AppSettings) -> RoundResult | None:
    """The whole run: wait for nodes, ``num-rounds`` rounds, write the outputs of the last.

    With ``resume`` the objects run one at a time (see ``fedpatch.federated.checkpoint``) and
    the result is the last object run here (None when every object was already complete).
    """
    out_dir = Path(settings.output_dir).expanduser().resolve()
    fed = config.federated
    log(INFO, "fedpatch federation: backbone %s, partition %s, test split %s, bank dtype %s, outputs in %s", config.model.backbone, fed.partition, fed.test_split, fed.bank_dtype, out_dir)
    record = Record()
    try:
        feature_dim = workflow.build_model(config).feature_dim  # also checks the backbone weights early
        nodes = wait_for_nodes(grid, settings.min_nodes or fed.min_clients, settings.node_wait_timeout)
        log(INFO, "%d SuperNodes connected: %s", len(nodes), ", ".join(map(str, nodes)))
        if len(nodes) != fed.num_clients:
            log(WARNING, "federated.num_clients is %d but %d SuperNodes are connected; every connected node takes part (partitions follow each node's num-partitions)", fed.num_clients, len(nodes))
        if settings.resume:
            result = run_by_object(grid, config, settings, feature_dim, nodes, out_dir, record)
        else:
            communication = CommunicationLog()
            result = run_rounds(grid, config, settings, feature_dim, nodes, settings.objects, communication, record)
            extra = _completed(settings, nodes)
            write_outputs(out_dir, config, result, communication, record.failures, extra, record.rejections)
    except FederationError as exc:
        record.absorb()
        log(ERROR, "fedpatch federation failed: %s", exc)
        failed = {"status": "failed", "error": str(exc), "failures": [asdict(f) for f in record.failures], "rejected": rejection_summary(record.rejections)}
        atomic_write_json(out_dir / "federation.json", failed)
        raise
    log(INFO, "fedpatch federation done: results in %s", out_dir)
    return result


def _settings_json(settings: AppSettings) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.__dict__.items()}


def _completed(settings: AppSettings, nodes: Sequence[int]) -> dict[str, Any]:
    """The run-level fields of ``federation.json`` for a run that finished."""
    return {"status": "completed", "nodes": [str(n) for n in nodes], "num_rounds": settings.num_rounds, "settings": _settings_json(settings)}


def _log_round(result: RoundResult, communication: CommunicationLog) -> None:
    for name, obj in sorted(result.objects.items()):
        spro = obj.auc_spro.get(0.05)
        log(
            INFO,
            "[round %d] %s: image AUROC %s, AUC-sPRO@0.05 %s, global bank %d rows from %d client(s), threshold %s",
            result.round,
            name,
            "n/a" if obj.image_auroc is None else f"{obj.image_auroc:.4f}",
            "n/a" if spro is None else f"{spro:.4f}",
            len(obj.aggregation.bank),
            len(obj.aggregation.contributions),
            "n/a" if obj.threshold is None else f"{obj.threshold:.4f}",
        )
    for client, traffic in communication.per_client(result.round).items():
        log(INFO, "[round %d] client %s: %d bytes up, %d bytes down", result.round, client, traffic["bytes_up"], traffic["bytes_down"])
    for failure in result.failures:
        log(WARNING, "[round %d] excluded client %s at %s: %s", failure.round, failure.client, failure.stage, failure.reason)

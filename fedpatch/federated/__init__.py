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
   Every reply the server receives and does not use (malformed, an error reply, a duplicate,
   unsolicited) is counted under a kind (``REJECTION_KINDS``) in the ``rejected`` section of
   ``federation.json`` and ``results.md``; it is never aggregated.
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

Modules (one job each; everything public is re-exported here):

- ``settings``: the run-config side (:class:`AppSettings`, :class:`RunRequest`, data roots);
- ``client``: what a client does (open its data, fit, evaluate, count; the reply payloads);
- ``strategy``: the server strategy (:class:`FederatedPatchCore`) and its reply checks;
- ``reporting``: :class:`CommunicationLog`, the results tables and :func:`write_outputs`;
- ``checkpoint``: resumable runs (run config ``resume``): per-object checkpoints in the output
  folder, skipped when complete (imported on its own: ``fedpatch.federated.checkpoint``);
- ``errors``: :class:`FederationError`, :class:`ReplyError`.
"""

from __future__ import annotations

from fedpatch.federated.client import (
    WIRE_DTYPES,
    ClientData,
    ObjectEvaluation,
    ObjectFit,
    accumulator_state,
    accumulators_from_state,
    counts_payload,
    evaluate_client,
    evaluation_payload,
    fit_client,
    fit_payload,
    local_metrics,
    open_client_data,
    to_wire,
)
from fedpatch.federated.errors import FederationError, ReplyError
from fedpatch.federated.reporting import (
    REPORT_LIMIT,
    CommunicationLog,
    result_rows,
    results_csv,
    results_markdown,
    write_object_outputs,
    write_outputs,
)
from fedpatch.federated.settings import (
    AppSettings,
    RunRequest,
    parse_objects,
    parse_overrides,
    resolve_config_file,
    resolve_data_root,
)
from fedpatch.federated.strategy import (
    ClientEvaluation,
    ClientFailure,
    ClientFit,
    FederatedPatchCore,
    ObjectResult,
    Rejection,
    RoundResult,
    REJECTION_KINDS,
    client_order,
    rejection_summary,
    summarize_error,
)
from fedpatch.workflow import split_calibration  # re-exported: the split every client uses

__all__ = [
    "REJECTION_KINDS",
    "REPORT_LIMIT",
    "WIRE_DTYPES",
    "AppSettings",
    "ClientData",
    "ClientEvaluation",
    "ClientFailure",
    "ClientFit",
    "CommunicationLog",
    "FederatedPatchCore",
    "FederationError",
    "ObjectEvaluation",
    "ObjectFit",
    "ObjectResult",
    "Rejection",
    "ReplyError",
    "RoundResult",
    "RunRequest",
    "accumulator_state",
    "accumulators_from_state",
    "client_order",
    "counts_payload",
    "evaluate_client",
    "evaluation_payload",
    "fit_client",
    "fit_payload",
    "local_metrics",
    "open_client_data",
    "parse_objects",
    "parse_overrides",
    "resolve_config_file",
    "resolve_data_root",
    "result_rows",
    "results_csv",
    "rejection_summary",
    "results_markdown",
    "split_calibration",
    "summarize_error",
    "to_wire",
    "write_object_outputs",
    "write_outputs",
]

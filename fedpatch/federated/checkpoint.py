"""Resumable federated runs: one checkpoint per finished object in the output folder.

With run config ``resume = true`` the server runs the protocol one object at a time and, as
soon as an object is finished, writes its global model and ``metrics.json`` and then, last,
``<object>/federated.json`` (atomically: temporary file + ``os.replace``). That last file marks
the object complete; it holds the object's table rows, the clients that failed or whose
replies were rejected, and its traffic. A run interrupted at any point and started again with
the same output folder skips every complete object whose checkpoint was made with the same
configuration (same resolved YAML, where a key added since at its earlier value counts as
absent: ``fedpatch.config.identity``; otherwise the object is redone) and finally writes the
folder's tables from all checkpoints.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedpatch.atomic import atomic_write_json
from fedpatch.config import RunConfig, identity
from fedpatch.federated.reporting import CommunicationLog, markdown_report, result_rows, with_mean_row, write_run_files
from fedpatch.federated.strategy import ClientFailure, Rejection, RoundResult, client_order, rejection_summary

CHECKPOINT = "federated.json"
"""``<output-dir>/<object>/federated.json``: the object's checkpoint, written last."""


def config_digest(config: RunConfig) -> str:
    """SHA-256 of the resolved configuration as YAML (a checkpoint is reused only under the
    same one). It is taken of the config's ``identity``, so a key added since (at the value
    earlier runs had) leaves the digest of an earlier version's checkpoint unchanged."""
    return hashlib.sha256(yaml.safe_dump(identity(config), sort_keys=False).encode("utf-8")).hexdigest()


@dataclass
class ObjectCheckpoint:
    """What the final tables need from one finished object."""

    object_name: str
    digest: str
    round: int
    nodes: list[str]
    rows: list[dict[str, Any]]
    failures: list[dict[str, Any]] = field(default_factory=list)
    rejections: list[dict[str, Any]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_round(cls, name: str, config: RunConfig, result: RoundResult, communication: CommunicationLog, nodes: Sequence[str], failures: Sequence[ClientFailure], rejections: Sequence[Rejection]) -> ObjectCheckpoint:
        rows = [r for r in result_rows(result, config.evaluation.fpr_limits, communication) if r["object"] == name]
        return cls(
            name, config_digest(config), result.round, [str(n) for n in nodes], rows,
            [asdict(f) for f in failures], [asdict(r) for r in rejections], list(communication.entries),
            list(result.objects[name].notes) if name in result.objects else [],
        )  # fmt: skip

    def save(self, out: Path) -> Path:
        return atomic_write_json(out / self.object_name / CHECKPOINT, asdict(self))


def load_checkpoint(out: Path, name: str, config: RunConfig) -> ObjectCheckpoint | None:
    """The object's checkpoint when it is complete and made under ``config``; else None."""
    path = out / name / CHECKPOINT
    if not (path.is_file() and (out / name / "metrics.json").is_file() and (out / "models" / f"patchcore_{name}.pt").is_file()):
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        checkpoint = ObjectCheckpoint(**data)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a fedpatch object checkpoint ({exc}); remove it to redo {name!r}") from None
    return checkpoint if checkpoint.digest == config_digest(config) and checkpoint.object_name == name else None


def write_resumed_outputs(out: Path, config: RunConfig, checkpoints: Mapping[str, ObjectCheckpoint], resumed: Sequence[str], extra: Mapping[str, Any]) -> None:
    """``results.csv/md``, ``communication.json``, ``federation.json`` and ``config.yaml`` from
    the checkpoints of every object (``resumed``: those finished by an earlier run)."""
    limits = config.evaluation.fpr_limits
    ordered = [checkpoints[n] for n in sorted(checkpoints)]
    rows = with_mean_row([r for c in ordered for r in c.rows], limits)
    failures = [ClientFailure(**f) for c in ordered for f in c.failures]
    rejections = [Rejection(**r) for c in ordered for r in c.rejections]
    communication = CommunicationLog([m for c in ordered for m in c.messages])
    notes = [f"{c.object_name}: {note}" for c in ordered for note in c.notes]
    nodes = sorted({n for c in ordered for n in c.nodes}, key=client_order)
    summary = f"{len(ordered)} object(s) run one at a time (resume), {len(resumed)} finished by an earlier run; {len(nodes)} node(s) took part"
    federation = {
        "objects": {c.object_name: {"round": c.round, "nodes": c.nodes, "resumed": c.object_name in resumed} for c in ordered},
        "resumed": sorted(resumed),
        "clients": nodes,
        "failures": [asdict(f) for f in failures],
        "rejected": rejection_summary(rejections),
        **dict(extra),
    }
    write_run_files(out, config, rows, markdown_report(rows, summary, config, failures, rejections, notes), communication, federation)

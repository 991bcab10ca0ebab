"""Fault injection: an explicit test hook of the ClientApp (never read by the server or library).

Off by default. It exists so that tests (and demos) can make a real client misbehave inside a
real Flower federation and check that the server reports and excludes it. Two ways to set it:

- run config ``fault`` (all nodes read it, each applies its own entry):
  ``flwr run . --run-config 'fault="1:nan-bank,2:raise"'`` - comma-separated
  ``<partition-id>:<kind>`` entries (simulation, or nodes started with a partition-id);
- node config ``fault`` on one SuperNode (deployment):
  ``flower-supernode ... --node-config 'data-dir="/data" fault="wrong-dim"'``.

Kinds:

``raise``          the train handler raises (Flower sends the server an error reply)
``nan-bank``       the first row of the first bank is NaN
``wrong-dim``      the last feature column of every bank is dropped
``wrong-dtype``    banks are sent as float64 instead of ``federated.bank_dtype``
``too-many-rows``  banks repeated past the number of patches the client saw (metrics agree)
``hang=<s>``       the train handler sleeps ``s`` seconds first (exercises the server's train timeout)
``evaluate-hang=<s>`` the evaluate handler sleeps ``s`` seconds first (the evaluate timeout)
``evaluate-raise`` the evaluate handler raises
``counts-raise``   the counts handler raises
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

KINDS = ("raise", "nan-bank", "wrong-dim", "wrong-dtype", "too-many-rows", "hang", "evaluate-hang", "evaluate-raise", "counts-raise")


class InjectedFault(RuntimeError):
    """Raised by a client on purpose (fault injection)."""


@dataclass(frozen=True)
class Fault:
    """The fault this node injects (``kind`` "" = none)."""

    kind: str = ""
    seconds: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Fault:
        kind, _, arg = text.strip().partition("=")
        kind = kind.strip()
        if not kind:
            return cls()
        if kind not in KINDS:
            raise ValueError(f"unknown fault {kind!r}; known: {', '.join(KINDS)}")
        return cls(kind, float(arg) if arg else 0.0)

    @classmethod
    def for_node(cls, node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> Fault:
        """This node's fault: node config ``fault``, else its entry in run config ``fault``."""
        own = node_config.get("fault")
        if isinstance(own, str) and own.strip():
            return cls.parse(own)
        spec = run_config.get("fault", "")
        if not isinstance(spec, str) or not spec.strip() or "partition-id" not in node_config:
            return cls()
        me = int(node_config["partition-id"])
        for entry in spec.split(","):
            target, sep, kind = entry.partition(":")
            if not sep:
                raise ValueError(f"run config fault entries are '<partition-id>:<kind>', got {entry!r}")
            if int(target) == me:
                return cls.parse(kind)
        return cls()

    def on(self, stage: str) -> None:
        """Act at the start of a handler (``train``, ``evaluate`` or ``counts``)."""
        if (stage, self.kind) in (("train", "hang"), ("evaluate", "evaluate-hang")):
            time.sleep(self.seconds)
        if (stage, self.kind) in (("train", "raise"), ("evaluate", "evaluate-raise"), ("counts", "counts-raise")):
            raise InjectedFault(f"injected fault {self.kind!r} in the {stage} handler")

    def corrupt(self, arrays: dict[str, np.ndarray], metrics: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The train reply's banks and metrics, corrupted as this fault says."""
        if not arrays or self.kind not in ("nan-bank", "wrong-dim", "wrong-dtype", "too-many-rows"):
            return arrays, metrics
        out, metrics = {}, dict(metrics)
        for i, (name, bank) in enumerate(arrays.items()):
            if self.kind == "nan-bank":
                bank = bank.copy()
                if i == 0:
                    bank[0, :] = np.nan
            elif self.kind == "wrong-dim":
                bank = np.ascontiguousarray(bank[:, :-1])
            elif self.kind == "wrong-dtype":
                bank = bank.astype(np.float64)
            else:
                repeats = int(metrics[f"{name}/patches_seen"]) // bank.shape[0] + 2
                bank = np.concatenate([bank] * repeats)
                metrics[f"{name}/bank_rows"] = int(bank.shape[0])
            out[name] = bank
        return out, metrics

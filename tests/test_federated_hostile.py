"""Hostile or broken replies: every one is rejected with its reason, counted, never aggregated.

Unit level: ``FederatedPatchCore.screen_replies`` (duplicates, unsolicited replies) and the
kind every malformed bank is counted under. Server level: the real ServerApp and ClientApp code
over an in-process Grid that duplicates replies the way a faulty transport or a hostile node
could (Flower's own runtimes never hand a ServerApp two replies to one message, so this is the
only place the server's guard can be exercised).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message

from fedpatch.config import config_from_dict
from fedpatch.data.synthetic import generate_autovi_dataset
from fedpatch.federated import REJECTION_KINDS, AppSettings, FederatedPatchCore, rejection_summary
from inprocess_grid import InProcessGrid, partition_configs, task_identity  # noqa: F401 - fixture
from server.server_app import run_federation

DIM = 8


def small_config(**federated):
    return config_from_dict({"model": {"backbone": "resnet18", "layers": None, "pretrained": False}, "runtime": {"device": "cpu"}, "federated": federated})


def rows(n: int, seed: int, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(dtype)


def reply(banks: dict[str, np.ndarray], patches: int = 20) -> tuple[dict, dict]:
    metrics: dict = {}
    for name, bank in banks.items():
        n = int(bank.shape[0]) if bank.ndim == 2 else 1
        metrics.update({f"{name}/n_images": 3, f"{name}/n_calibration": 1, f"{name}/patches_seen": patches, f"{name}/bank_rows": n, f"{name}/fit_seconds": 0.1})
    return banks, metrics


# --------------------------------------------------------------------------------------------
# Unit level
# --------------------------------------------------------------------------------------------
def test_the_same_reply_twice_is_counted_and_the_first_copy_used() -> None:
    strategy = FederatedPatchCore(small_config(), DIM, ["1", "2"])
    keep = strategy.screen_replies("train", ["1", "2"], [("1", "a"), ("2", "b"), ("1", "a")])
    assert keep == [0, 1] and strategy.active == ["1", "2"]
    (rejection,) = strategy.rejections
    assert (rejection.client, rejection.stage, rejection.kind) == ("1", "train", "duplicate-reply")
    assert "received again" in rejection.reason


def test_different_replies_from_one_node_exclude_it_and_none_is_used() -> None:
    strategy = FederatedPatchCore(small_config(), DIM, ["1", "2", "3"])
    keep = strategy.screen_replies("train", ["1", "2", "3"], [("2", "x"), ("1", "a"), ("2", "y"), ("2", "z"), ("3", "c")])
    assert keep == [1, 4]  # node 2's replies are all dropped
    assert strategy.active == ["1", "3"]
    (failure,) = strategy.failures
    assert failure.client == "2" and failure.reason == "sent 3 different replies to one train message; none is used"
    assert [r.kind for r in strategy.rejections] == ["duplicate-reply", "duplicate-reply"]  # the two extra replies


def test_an_unsolicited_reply_is_counted_and_excludes_nobody() -> None:
    strategy = FederatedPatchCore(small_config(), DIM, ["1", "2"])
    assert strategy.screen_replies("evaluate", ["1"], [("1", "a"), ("7", "q")]) == [0]
    assert strategy.active == ["1", "2"] and strategy.clients == ["1", "2"] and not strategy.failures
    assert rejection_summary(strategy.rejections)["by_client"] == {"7": {"unsolicited-reply": 1}}


CASES = {
    "wrong-dtype": ({"p": rows(5, 0, np.float64)}, {}),
    "wrong-dimension": ({"p": rows(5, 0)[:, :-1]}, {}),
    "one-dimensional": ({"p": rows(5, 0)[0]}, {}),
    "empty-bank": ({"p": np.empty((0, DIM), np.float32)}, {}),
    "nan": ({"p": np.where(np.arange(DIM) == 2, np.nan, rows(5, 0)).astype(np.float32)}, {}),
    "inf": ({"p": np.where(np.arange(DIM) == 0, np.inf, rows(5, 0)).astype(np.float32)}, {}),
    "too-many-rows": ({"p": rows(30, 0)}, {}),
    "over-cap": ({"p": rows(7, 0)}, {}),
    "row-count-mismatch": ({"p": rows(5, 0)}, {"p/bank_rows": 4}),
    "missing-field": ({"p": rows(5, 0)}, {"p/patches_seen": None}),
    "bad-value": ({"p": rows(5, 0)}, {"p/n_images": -1}),
}
EXPECTED = {"one-dimensional": "wrong-dimension", "nan": "non-finite", "inf": "non-finite"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_broken_bank_is_rejected_under_its_reason_and_never_aggregated(case: str) -> None:
    strategy = FederatedPatchCore(small_config(max_bank_rows=6), DIM, ["1", "2"])
    banks, patch = CASES[case]
    arrays, metrics = reply(banks)
    for key, value in patch.items():
        metrics.pop(key) if value is None else metrics.__setitem__(key, value)
    assert strategy.add_fit_reply("2", arrays, metrics, {}) is False
    assert strategy.add_fit_reply("1", *reply({"p": rows(5, 1)}), {}) is True
    (rejection,) = strategy.rejections
    kind = EXPECTED.get(case, case)
    assert rejection.kind == kind and kind in REJECTION_KINDS
    assert rejection.client == "2" and "client 2" in rejection.reason
    assert strategy.failures[0].reason == rejection.reason
    assert strategy.aggregate()["p"].contributions == {"1": 5}


def test_rejection_kinds_must_be_known() -> None:
    with pytest.raises(ValueError, match="unknown rejection kind 'oops'"):
        FederatedPatchCore(small_config(), DIM, ["1"]).reject("1", "train", "oops", "x")


# --------------------------------------------------------------------------------------------
# Server level: the ServerApp over an in-process Grid that duplicates replies
# --------------------------------------------------------------------------------------------
class DuplicatingGrid(InProcessGrid):
    """Nodes run the real ClientApp in this process; ``echo`` nodes' train replies arrive twice,
    ``double`` nodes send two different train replies, ``stranger`` sends an unsolicited one."""

    def __init__(self, n: int, run_config: dict, echo: Iterable[int], double: Iterable[int], stranger: int) -> None:
        super().__init__(partition_configs(n), run_config)
        self.echo, self.double, self.stranger = set(echo), set(double), stranger
        self.counter = 0

    def _answer(self, message: Message, node: int) -> Message:
        answer = self.answer(message)
        self.counter += 1
        answer.metadata.__dict__["_message_id"] = f"reply-{self.counter}"
        answer.metadata.__dict__["_src_node_id"] = node
        return answer

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            first = self._answer(message, node)
            replies.append(first)
            if message.metadata.message_type == "train":
                if node in self.echo:
                    replies.append(first)  # the same reply again
                if node in self.double:
                    replies.append(self._answer(message, node))  # a second, different reply
                if node == 1000:
                    stray = self._answer(message, node)
                    stray.metadata.__dict__["_src_node_id"] = self.stranger
                    replies.append(stray)
        return replies


def test_the_server_counts_duplicated_unsolicited_and_broken_replies_and_aggregates_none(tmp_path: Path) -> None:
    data = generate_autovi_dataset(tmp_path / "data", ["pipe_clip"], n_train=10, n_test_good=2, n_test_defective=1, scale=0.15, seed=5)
    grid = DuplicatingGrid(5, {"fault": "4:nan-bank"}, echo=[1001], double=[1002], stranger=9999)
    config = config_from_dict({
        "model": {"backbone": "resnet18", "layers": None, "pretrained": False, "batch_size": 4},
        "data": {"resize": [64, 64]}, "runtime": {"device": "cpu", "progress": False}, "federated": {"min_clients": 2},
    })  # fmt: skip
    out = tmp_path / "out"
    result = run_federation(grid, config, AppSettings(data_dir=str(data), output_dir=str(out), node_wait_timeout=5.0))
    assert result.objects["pipe_clip"].aggregation.contributions.keys() == {"1000", "1001", "1003"}
    federation = json.loads((out / "federation.json").read_text())
    assert federation["status"] == "completed"
    assert {f["client"]: f["stage"] for f in federation["failures"]} == {"1002": "train", "1004": "train"}
    rejected = federation["rejected"]
    assert rejected["total"] == 4
    assert rejected["by_kind"] == {"duplicate-reply": 2, "non-finite": 1, "unsolicited-reply": 1}
    assert rejected["by_client"] == {
        "1001": {"duplicate-reply": 1}, "1002": {"duplicate-reply": 1}, "1004": {"non-finite": 1}, "9999": {"unsolicited-reply": 1},
    }  # fmt: skip
    assert all(r["stage"] == "train" and r["reason"] for r in rejected["replies"])
    md = (out / "results.md").read_text()
    section = md.split("## Rejected replies")[1]
    assert "4 replies received and not used" in section
    for line in ("| 1001 | duplicate-reply | 1 |", "| 1002 | duplicate-reply | 1 |", "| 1004 | non-finite | 1 |", "| 9999 | unsolicited-reply | 1 |"):
        assert line in section
    communication = json.loads((out / "communication.json").read_text())
    assert "9999" not in communication["per_client"]  # unsolicited bytes are not a participant's traffic

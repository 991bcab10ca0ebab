"""The ServerApp glue (server/server_app.py) driven through an in-process Grid.

``LocalGrid`` hands each message to the real ClientApp object with a per-node Context, and can
make nodes silent, which is how a reply timeout looks to the ServerApp (``send_and_receive``
returns without that node's reply). The real simulation engine is exercised in
tests/test_federated_flower.py; this file covers what is timing-dependent there.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
from flwr.app import Message

from fedpatch import workflow
from fedpatch.config import config_from_dict
from fedpatch.data.synthetic import generate_autovi_dataset
from fedpatch.federated import AppSettings, FederationError
from inprocess_grid import InProcessGrid, partition_configs, stamp, task_identity  # noqa: F401 - fixture
from server.server_app import run_federation, wait_for_nodes


class LocalGrid(InProcessGrid):
    """In-process nodes; ``silent`` nodes never reply (a reply timeout, as the ServerApp sees it)."""

    def __init__(self, node_configs: dict[int, dict], run_config: dict, silent: Iterable[int] = ()) -> None:
        super().__init__(node_configs, run_config)
        self.silent = set(silent)
        self.timeouts: list[float | None] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        self.timeouts.append(timeout)
        return [self.answer(m) for m in messages if m.metadata.dst_node_id not in self.silent]


@pytest.fixture(scope="module", autouse=True)
def reuse_built_models() -> Iterator[None]:
    """Speed: build each (seeded, deterministic) model once and hand out deep copies."""
    built: dict[str, object] = {}
    original = workflow.build_model

    def build(config):
        key = json.dumps([asdict(config.model), config.runtime.device], sort_keys=True)
        if key not in built:
            built[key] = original(config)
        return copy.deepcopy(built[key])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(workflow, "build_model", build)
        yield


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("server_data")
    generate_autovi_dataset(data, ["pipe_clip"], n_train=6, n_test_good=2, n_test_defective=1, scale=0.15, seed=5)
    return data


def config(**federated):
    return config_from_dict(
        {
            "model": {"backbone": "resnet18", "layers": None, "pretrained": False, "batch_size": 4},
            "data": {"resize": [64, 64]},
            "runtime": {"device": "cpu", "progress": False},
            "federated": federated,
        }
    )


def grid_for(n: int, run_config: dict | None = None, silent: Iterable[int] = ()) -> LocalGrid:
    return LocalGrid(partition_configs(n), run_config or {}, silent)


def run_losing_one_node(grid: InProcessGrid, root: Path, tmp_path: Path, lost: int, train_timeout: float) -> str:
    """Run the federation of ``grid`` (min_clients 2), in which node ``lost`` fails at train:
    check that it is the one failure and that the others are pooled; return its reason."""
    settings = AppSettings(data_dir=str(root), output_dir=str(tmp_path / "out"), train_timeout=train_timeout, node_wait_timeout=5.0)
    result = run_federation(grid, config(min_clients=2), settings)
    (failure,) = result.failures
    assert (failure.client, failure.stage) == (str(lost), "train")
    assert result.objects["pipe_clip"].pooled_clients == [str(n) for n in sorted(grid.contexts) if n != lost]
    return failure.reason


def test_a_silent_node_is_reported_as_timed_out_and_the_run_completes(root: Path, tmp_path: Path) -> None:
    grid = grid_for(3, silent=[1001])
    reason = run_losing_one_node(grid, root, tmp_path, lost=1001, train_timeout=7.0)
    assert grid.timeouts[0] == 7.0
    assert reason == "no reply within the train timeout of 7 s"
    federation = json.loads((tmp_path / "out" / "federation.json").read_text())
    assert federation["status"] == "completed" and federation["succeeded"] == ["1000", "1002"]
    assert federation["failures"][0]["client"] == "1001"
    communication = json.loads((tmp_path / "out" / "communication.json").read_text())
    assert communication["per_client"]["1001"]["bytes_up"] == 0 and communication["per_client"]["1001"]["bytes_down"] > 0
    assert communication["per_client"]["1000"]["bytes_up"] > 0


def test_too_few_clients_fail_the_run_and_name_the_missing_ones(root: Path, tmp_path: Path) -> None:
    grid = grid_for(3, run_config={"fault": "0:raise,2:nan-bank"})
    settings = AppSettings(data_dir=str(root), output_dir=str(tmp_path / "out"), node_wait_timeout=5.0)
    with pytest.raises(FederationError, match=r"only 1 of 3 clients succeeded \(federated.min_clients = 2\)") as caught:
        run_federation(grid, config(min_clients=2), settings)
    assert "node 1000: train: error reply (code 2): injected fault 'raise' in the train handler" in str(caught.value)
    assert "node 1002 (partition 2/3 (iid)): train: client 1002 (pipe_clip): 1 row(s) hold NaN" in str(caught.value)
    federation = json.loads((tmp_path / "out" / "federation.json").read_text())
    assert federation["status"] == "failed" and {f["client"] for f in federation["failures"]} == {"1000", "1002"}
    assert federation["rejected"]["by_kind"] == {"error-reply": 1, "non-finite": 1}
    assert not (tmp_path / "out" / "results.csv").exists()  # a failed run writes no results table


def test_more_rounds_repeat_the_protocol(root: Path, tmp_path: Path) -> None:
    grid = grid_for(2)
    settings = AppSettings(data_dir=str(root), output_dir=str(tmp_path / "out"), num_rounds=2, node_wait_timeout=5.0)
    result = run_federation(grid, config(), settings)
    assert result.round == 2
    communication = json.loads((tmp_path / "out" / "communication.json").read_text())
    assert set(communication["per_round"]) == {"1", "2"}
    assert communication["per_round"]["1"] == communication["per_round"]["2"]  # same protocol, same payloads


def test_waiting_for_nodes_times_out_clearly() -> None:
    with pytest.raises(FederationError, match=r"only 2 SuperNode\(s\) connected after 0.2 s; the run needs at least 3"):
        wait_for_nodes(grid_for(2), need=3, timeout=0.2, poll=0.05)
    assert wait_for_nodes(grid_for(2), need=2, timeout=5, poll=0.05, settle=0.1) == [1000, 1001]


class LeavingGrid(LocalGrid):
    """``silent`` nodes are connected when the run starts, then leave (no reply, no longer listed)."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.sent = False

    def get_node_ids(self) -> list[int]:
        return [n for n in self.contexts if not (self.sent and n in self.silent)]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        self.sent = True
        return super().send_and_receive(messages, timeout=timeout)


class SuperLinkGrid(LocalGrid):
    """``offline`` nodes never get their messages: the SuperLink answers for them with the error
    reply it makes for a node that missed its heartbeats (Flower's own helper), and sends one
    more error reply that answers no message."""

    def __init__(self, *args, offline: Iterable[int], **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.offline = set(offline)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

        messages = list(messages)
        replies = [self.answer(m) for m in messages if m.metadata.dst_node_id not in self.offline]
        for message in messages:
            if message.metadata.dst_node_id in self.offline:
                replies.append(create_message_error_unavailable_res_message(stamp(message).metadata, "node_unavail"))
        stray = create_message_error_unavailable_res_message(messages[0].metadata, "msg_unavail")
        stray.metadata.__dict__["_reply_to_message_id"] = "no-such-message"
        return [*replies, stray]


def test_a_node_the_superlink_reports_offline_fails_with_its_reason_and_no_phantom_client(root: Path, tmp_path: Path) -> None:
    # The SuperLink's error replies come from node id 1 (SUPERLINK_NODE_ID): they were counted
    # as unsolicited replies of a client "1", and the offline node as silent until the timeout.
    grid = SuperLinkGrid(partition_configs(3), {}, offline=[1002])
    reason = run_losing_one_node(grid, root, tmp_path, lost=1002, train_timeout=9.0)
    assert reason.startswith("no reply; the SuperLink answered for the node (code 5): Error: Node Unavailable")
    federation = json.loads((tmp_path / "out" / "federation.json").read_text())
    rejected = federation["rejected"]
    # the stray notices (one per exchange: train, evaluate, counts) are counted under "superlink"
    assert rejected["by_client"] == {"superlink": {"unsolicited-reply": 3}}
    assert "1" not in federation["nodes"] and "1" not in {f["client"] for f in federation["failures"]}


def test_a_node_that_left_is_reported_as_no_longer_connected(root: Path, tmp_path: Path) -> None:
    grid = LeavingGrid(partition_configs(3), {}, silent=[1002])
    reason = run_losing_one_node(grid, root, tmp_path, lost=1002, train_timeout=9.0)
    assert reason == "no reply within the train timeout of 9 s (the node is no longer connected)"

"""A Flower ``Grid`` whose nodes run the real ClientApp inside the test process.

The ServerApp code (server/server_app.py) talks to nodes only through a Grid, so tests that
need exact control over replies (silence, a node leaving, duplicated or stray replies, a
server crash between objects) subclass ``InProcessGrid`` and override ``send_and_receive``.
The real simulation engine is exercised in tests/test_federated_flower.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

from clients.client_app import app as client_app


def partition_configs(n: int) -> dict[int, dict[str, Any]]:
    """Node configs of ``n`` nodes (ids 1000, 1001, ...) sharing one data root by partition."""
    return {1000 + i: {"partition-id": i, "num-partitions": n} for i in range(n)}


def stamp(message: Message) -> Message:
    """Give ``message`` its id, as Flower's grids do when they push it: replies, and the
    SuperLink's own error replies, refer to their message by this id."""
    if not message.metadata.message_id:
        message.metadata.__dict__["_message_id"] = message.object_id
    return message


class InProcessGrid(Grid):
    """Nodes ``{node_id: node_config}`` answering every message at once, in this process."""

    def __init__(self, node_configs: Mapping[int, Mapping[str, Any]], run_config: Mapping[str, Any] | None = None) -> None:
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config=dict(cfg), state=RecordDict(), run_config=dict(run_config or {}))
            for n, cfg in node_configs.items()
        }

    def answer(self, message: Message) -> Message:
        """The destination node's reply; a raising ClientApp becomes an error reply, as in Flower's runtimes."""
        stamp(message)
        try:
            return client_app(message, self.contexts[message.metadata.dst_node_id])
        except Exception as exc:
            return Message(Error(code=2, reason=f"<'Exception occurred. Message: {exc}'>"), reply_to=message)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return [self.answer(message) for message in messages]

    # The rest of the Grid interface is unused by the ServerApp's synchronous path.
    def set_run(self, run) -> None:  # noqa: ANN001
        raise NotImplementedError

    @property
    def run(self):  # noqa: ANN201
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: ANN001, ANN201
        raise NotImplementedError

    def push_messages(self, messages):  # noqa: ANN001, ANN201
        raise NotImplementedError

    def pull_messages(self, message_ids):  # noqa: ANN001, ANN201
        raise NotImplementedError


@pytest.fixture(scope="module", autouse=True)
def task_identity() -> Iterator[None]:
    """Messages take their run and sender ids from Flower's process-wide TaskIdentity, which the
    real runtimes set (as ``run_simulation`` does); set it for the module, restore it afterwards.
    Test modules import this fixture to use it."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved

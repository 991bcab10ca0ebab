"""Resumable federated runs (run config ``resume``): the real ServerApp and ClientApp code over an
in-process Grid. A run "crashes" after its first object; the next run with the same output
folder does not redo that object, and the final tables hold both."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import Message

from fedpatch.config import config_from_dict, dump_config
from fedpatch.data.synthetic import generate_autovi_dataset
from fedpatch.errors import ConfigError
from fedpatch.federated import AppSettings
from fedpatch.federated.checkpoint import CHECKPOINT, ObjectCheckpoint, config_digest, load_checkpoint
from fedpatch.report import read_results_csv
from inprocess_grid import InProcessGrid, partition_configs, task_identity  # noqa: F401 - fixture
from server.server_app import run_federation

OBJECTS = ("pipe_clip", "engine_wiring")  # run in this order


class Crash(RuntimeError):
    """The server process dying mid-run (nothing in the ServerApp catches it)."""


class RecordingGrid(InProcessGrid):
    """Nodes run the real ClientApp in this process; records the objects of every train
    message and crashes on the first train message for ``crash_on`` (if given)."""

    def __init__(self, n: int, crash_on: str | None = None) -> None:
        super().__init__(partition_configs(n))
        self.crash_on = crash_on
        self.trained: list[str] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            objects = str(messages[0].content["config"]["objects"])
            if objects == self.crash_on:
                raise Crash(f"server killed before training {objects}")
            self.trained.append(objects)
        return [self.answer(m) for m in messages]


def config(**federated):
    return config_from_dict({
        "model": {"backbone": "resnet18", "layers": None, "pretrained": False, "batch_size": 4},
        "data": {"resize": [64, 64]}, "runtime": {"device": "cpu", "progress": False}, "federated": federated,
    })  # fmt: skip


def test_an_interrupted_run_resumes_without_redoing_finished_objects(tmp_path: Path) -> None:
    data = generate_autovi_dataset(tmp_path / "data", list(OBJECTS), n_train=6, n_test_good=2, n_test_defective=1, scale=0.15, seed=7)
    out = tmp_path / "out"
    settings = AppSettings(objects=OBJECTS, data_dir=str(data), output_dir=str(out), node_wait_timeout=5.0, resume=True)

    crashing = RecordingGrid(2, crash_on="engine_wiring")
    with pytest.raises(Crash):
        run_federation(crashing, config(), settings)
    assert crashing.trained == ["pipe_clip"]
    assert (out / "pipe_clip" / CHECKPOINT).is_file() and not (out / "engine_wiring").exists()
    assert not (out / "results.csv").exists()  # the run never finished
    assert not list(out.rglob("*.tmp"))  # atomic writes leave no temporary files behind
    model = out / "models" / "patchcore_pipe_clip.pt"
    first_bytes, first_mtime = model.read_bytes(), model.stat().st_mtime_ns

    resuming = RecordingGrid(2)
    result = run_federation(resuming, config(), settings)
    assert resuming.trained == ["engine_wiring"]  # pipe_clip was not redone
    assert result is not None and set(result.objects) == {"engine_wiring"}
    assert model.read_bytes() == first_bytes and model.stat().st_mtime_ns == first_mtime
    federation = json.loads((out / "federation.json").read_text())
    assert federation["status"] == "completed" and federation["resumed"] == ["pipe_clip"]
    assert {n: o["resumed"] for n, o in federation["objects"].items()} == {"pipe_clip": True, "engine_wiring": False}
    table = read_results_csv(out / "results.csv")
    pooled = {r["object"]: r for r in table if r["client"] == "all"}
    assert set(pooled) == {"pipe_clip", "engine_wiring", "mean"}
    mean = (float(pooled["pipe_clip"]["bank_size"]) + float(pooled["engine_wiring"]["bank_size"])) / 2
    assert float(pooled["mean"]["bank_size"]) == mean
    communication = json.loads((out / "communication.json").read_text())
    assert {m["stage"] for m in communication["messages"]} >= {"train", "evaluate"}
    assert len({m["client"] for m in communication["messages"]}) == 2
    assert "finished by an earlier run" in (out / "results.md").read_text()

    again = RecordingGrid(2)
    run_federation(again, config(), settings)
    assert again.trained == []  # everything complete: nothing is redone

    changed = RecordingGrid(2, crash_on="engine_wiring")
    with pytest.raises(Crash):
        run_federation(changed, config(global_ratio=0.5), settings)
    assert changed.trained == ["pipe_clip"]  # another configuration: the complete object is redone


def test_resume_needs_explicit_objects_and_a_boolean() -> None:
    with pytest.raises(ConfigError, match="'resume' needs an explicit 'objects' list"):
        AppSettings.from_run_config({"resume": True, "objects": "all"})
    with pytest.raises(ConfigError, match="run config 'resume' must be bool"):
        AppSettings.from_run_config({"resume": 1, "objects": "a"})
    assert AppSettings.from_run_config({"resume": True, "objects": "a,b"}).resume is True
    assert AppSettings.from_run_config({}).resume is False


def test_a_checkpoint_of_a_version_before_backbone_precision_is_reused(tmp_path: Path) -> None:
    """Checkpoints written before ``model.backbone_precision`` existed hold the digest of a YAML
    without that key (those runs were float32): a float32 run reuses them, a bfloat16 run
    redoes the object."""
    float32 = config()
    text = dump_config(float32)
    assert "backbone_precision: float32" in text
    earlier = "".join(line for line in text.splitlines(keepends=True) if "backbone_precision" not in line)
    old_digest = hashlib.sha256(earlier.encode("utf-8")).hexdigest()
    assert config_digest(float32) == old_digest

    out = tmp_path / "out"
    ObjectCheckpoint("pipe_clip", old_digest, 1, ["node-0"], []).save(out)
    (out / "pipe_clip" / "metrics.json").write_text("{}")
    (out / "models").mkdir()
    (out / "models" / "patchcore_pipe_clip.pt").write_bytes(b"model")
    reused = load_checkpoint(out, "pipe_clip", float32)
    assert reused is not None and reused.digest == old_digest and reused.nodes == ["node-0"]

    bfloat16 = config()
    bfloat16.model.backbone_precision = "bfloat16"
    assert config_digest(bfloat16) != old_digest
    assert load_checkpoint(out, "pipe_clip", bfloat16) is None

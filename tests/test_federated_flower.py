"""The Flower app through Flower's real simulation engine: ``flwr run . --stream`` (subprocess).

One SuperLink (``flower-superlink --simulation``, started here in its own session, on a free
port, with a private ``FLWR_HOME``) serves every run of this module; each test submits the app
of this repository (the files ``flwr run .`` would ship, unpacked once per session: the
``flower_app`` fixture) with ``flwr run <app> fedpatch-test --stream`` and reads what the
ServerApp wrote. ``flwr run --stream`` exits 0 even when the run fails, so tests read
``federation.json``. Reply timeouts, and a run that fails for too few clients, are tested
in-process (tests/test_federated_server.py: real ClientApp and ServerApp code over a local
Grid), where they do not depend on machine speed.

Ray on 2 cores: each simulated client gets 1 CPU (``client-resources-num-cpus=1``), so two
ClientApps run at a time; Ray's object store is capped with
``RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION``. At the end the SuperLink and every process it
started (SuperExec, simulation processes, Ray) are terminated by process id, and the test checks
that none is left.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpatch import cli
from fedpatch.data.synthetic import generate_autovi_dataset
from fedpatch.deploy.local import flower_env, started_run_id, wait_until_finished
from fedpatch.deploy import DeploymentError
from fedpatch.deploy.processes import ProcessSet, free_port
from fedpatch.patchcore import read_model_file
from fedpatch.report import read_results_csv

BIN = Path(sys.executable).parent
OBJECTS = ["engine_wiring", "pipe_clip"]
CONNECTION = "fedpatch-test"
TINY = "model.backbone=resnet18; model.layers=null; model.pretrained=false; model.batch_size=4; data.resize=[64, 64]"
RUN_TIMEOUT = 420


class Federation:
    """A private SuperLink and the ``flwr run`` command against it."""

    def __init__(self, home: Path, data: Path, out: Path, app: Path) -> None:
        self.home, self.data, self.out, self.app = home, data, out, app
        self.port = free_port()
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n',
            encoding="utf-8",
        )
        # the launcher's environment (offline, private home, telemetry off) and Ray's settings
        self.env = {**flower_env(home, BIN), "RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION": "0.02", "RAY_DEDUP_LOGS": "0"}
        self.processes = ProcessSet(home, self.env)
        self.superlink = self.processes.start(
            "superlink",
            [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(self.port)],
        )  # fmt: skip
        try:  # its log in the error if it exits or does not listen within 60 s
            self.processes.wait_for_port(self.superlink, self.port, 60)
        except DeploymentError:
            self.close()
            raise

    def run(self, name: str, nodes: int, run_config: str = "", overrides: str = "", federation: str = "") -> tuple[dict, str]:
        """``flwr run`` the app; returns (federation.json, the streamed log)."""
        out = self.out / name
        config = f'data-dir="{self.data}" output-dir="{out}" overrides="{TINY}; {overrides}" {run_config}'
        command = [
            str(BIN / "flwr"), "run", str(self.app), CONNECTION, "--stream", "--run-config", config,
            "--federation-config", f"num-supernodes={nodes} client-resources-num-cpus=1 {federation}".strip(),
        ]  # fmt: skip
        deadline = time.monotonic() + RUN_TIMEOUT
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
        self.processes.remember_descendants()  # Ray's workers, stopped with the SuperLink
        log = done.stdout + done.stderr
        run_id = started_run_id(log)
        if run_id is not None:  # the log stream can end before the run does: ask the SuperLink
            hint = f"SuperLink log: {self.home / 'superlink.log'}"
            wait_until_finished(str(BIN / "flwr"), self.env, run_id, deadline, connection=CONNECTION, hint=hint)
        summary = out / "federation.json"
        assert summary.is_file(), f"the run wrote no federation.json (exit {done.returncode}):\n{log[-6000:]}"
        return json.loads(summary.read_text()), log

    def close(self) -> None:
        """Stop the SuperLink and everything it started (``ProcessSet.stop_all``); note what is left."""
        self.leftover = self.processes.stop_all()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("flower_data")
    generate_autovi_dataset(root, OBJECTS, n_train=9, n_test_good=2, n_test_defective=1, scale=0.15, seed=2)
    return root


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, data: Path, flower_app: Path) -> Iterator[Federation]:
    base = tmp_path_factory.mktemp("flower")
    fed = Federation(base / "flwr-home", data, base / "out", flower_app)
    try:
        yield fed
    finally:
        fed.close()
        assert not fed.leftover, f"processes left running: {fed.leftover}"


def _pooled(table: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {r["object"]: r for r in table if r["scope"] == "federated" and r["object"] != "mean"}


def _test_counts(data: Path, name: str) -> int:
    return sum(1 for _ in (data / name / "test").rglob("*.png"))


def test_iid_federation_of_three_clients(federation: Federation, data: Path) -> None:
    summary, log = federation.run("iid", nodes=3)
    assert summary["status"] == "completed", log[-4000:]
    assert len(summary["nodes"]) == 3 and summary["succeeded"] == sorted(summary["nodes"], key=int) and not summary["failures"]
    out = federation.out / "iid"
    table = read_results_csv(out / "results.csv")
    pooled = _pooled(table)
    assert set(pooled) == set(OBJECTS)
    for name in OBJECTS:
        row = pooled[name]
        assert row["partition"] == "3 clients"
        assert int(row["test_good"]) + int(row["test_defective"]) == _test_counts(data, name)  # every test image once
        assert 0.0 <= float(row["image_auroc"]) <= 1.0 and 0.0 <= float(row["auc_spro@0.05"]) <= 1.0
        clients = [r for r in table if r["object"] == name and r["scope"] == "client"]
        assert sorted(r["partition"] for r in clients) == [f"partition {k}/3 (iid)" for k in range(3)]
        assert sum(int(r["bank_size"]) for r in clients) == int(row["bank_size"])  # global ratio 1: the union
        assert sum(int(r["test_good"]) + int(r["test_defective"]) for r in clients) == _test_counts(data, name)
        meta, bank = read_model_file(out / "models" / f"patchcore_{name}.pt")
        assert bank.shape[0] == int(row["bank_size"]) and json.loads(meta["threshold"]) is not None
    communication = json.loads((out / "communication.json").read_text())
    assert set(communication["per_client"]) == set(summary["nodes"])
    for traffic in communication["per_client"].values():
        assert traffic["bytes_up"] > 0 and traffic["bytes_down"] > 0
    assert "bytes up" in log and "AUC-sPRO@0.05" in log  # the server logs per-object results and traffic


def test_by_object_federation_over_two_rounds(federation: Federation) -> None:
    summary, log = federation.run("by-object", nodes=3, run_config="num-rounds=2", overrides="federated.partition=by-object")
    assert summary["status"] == "completed", log[-4000:]
    assert summary["num_rounds"] == 2 and summary["round"] == 2
    out = federation.out / "by-object"
    pooled = _pooled(read_results_csv(out / "results.csv"))
    owners = {name: json.loads((out / name / "metrics.json").read_text())["fedpatch"]["contributions"] for name in OBJECTS}
    assert all(len(o) == 1 for o in owners.values())
    assert set(owners["engine_wiring"]) != set(owners["pipe_clip"])  # one plant per part
    idle = [c for c, fit in summary["fits"].items() if not fit["objects"]]
    assert len(idle) == 1  # 3 clients, 2 objects: one client owns nothing and still succeeds
    for name in OBJECTS:
        assert pooled[name]["partition"] == "1 client"
    communication = json.loads((out / "communication.json").read_text())
    assert set(communication["per_round"]) == {"1", "2"}


def test_failing_and_malformed_clients_are_reported_and_excluded(federation: Federation) -> None:
    faults = "1:raise,2:nan-bank,3:wrong-dim,4:wrong-dtype,5:too-many-rows,6:evaluate-raise,7:counts-raise"
    summary, log = federation.run("faults", nodes=9, run_config=f'fault="{faults}"', overrides="federated.min_clients=2")
    assert summary["status"] == "completed", log[-4000:]
    failures = {f["source"] or f["reason"]: f for f in summary["failures"]}
    assert len(summary["failures"]) == 7
    assert {f["client"] for f in summary["failures"]} <= set(summary["nodes"])
    by_partition = {f["source"].split()[1].split("/")[0]: f for f in summary["failures"] if f["source"]}
    expected = {
        "2": ("train", "NaN or infinite"),
        "3": ("train", "feature dimension"),
        "4": ("train", "dtype float64, expected float32"),
        "5": ("train", "exceeds its"),
        "6": ("evaluate", "injected fault 'evaluate-raise' in the evaluate handler"),
        "7": ("evaluate.counts", "injected fault 'counts-raise' in the counts handler"),
    }
    for partition, (stage, reason) in expected.items():
        assert by_partition[partition]["stage"] == stage and reason in by_partition[partition]["reason"], failures
    (raised,) = [f for f in summary["failures"] if not f["source"]]  # it never replied with data
    assert raised["stage"] == "train" and "injected fault 'raise' in the train handler" in raised["reason"]
    assert raised["client"] in log  # the server log names the node id
    survivors = sorted(summary["succeeded"], key=int)
    assert len(survivors) == 2
    out = federation.out / "faults"
    for name in OBJECTS:
        metrics = json.loads((out / name / "metrics.json").read_text())["fedpatch"]
        assert sorted(metrics["pooled_clients"], key=int) == survivors
        # the clients that failed after train still contributed their (valid) banks
        assert len(metrics["contributions"]) == 4
    md = (out / "results.md").read_text()
    assert "## Excluded clients" in md and raised["client"] in md
    # every reply received and not used is counted under its reason (never aggregated)
    rejected = summary["rejected"]
    assert rejected["by_kind"] == {"error-reply": 3, "non-finite": 1, "too-many-rows": 1, "wrong-dimension": 1, "wrong-dtype": 1}
    assert sum(sum(kinds.values()) for kinds in rejected["by_client"].values()) == rejected["total"] == 7
    assert "## Rejected replies" in md and f"| {raised['client']} | error-reply | 1 |" in md


def test_one_client_federation_equals_fedpatch_train(federation: Federation, data: Path, tmp_path: Path) -> None:
    summary, log = federation.run("one-client", nodes=1)
    assert summary["status"] == "completed", log[-4000:]
    config = tmp_path / "config.yaml"
    config.write_text((federation.out / "one-client" / "config.yaml").read_text())  # the resolved federated config
    central = tmp_path / "central"
    # Ray runs a 1-CPU client with one intra-op thread; float32 convolutions can round differently
    # with another thread count, so the centralized run uses one thread too (bit-for-bit check).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["train", "--config", str(config), "--data-dir", str(data), "--output-dir", str(central),
                         "--set", "evaluation.save_maps=false", "--set", "evaluation.save_overlays=false"]) == 0  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    fed = federation.out / "one-client"
    for name in OBJECTS:
        _, federated_bank = read_model_file(fed / "models" / f"patchcore_{name}.pt")
        central_meta, central_bank = read_model_file(central / "models" / f"patchcore_{name}.pt")
        np.testing.assert_array_equal(federated_bank, central_bank)  # the same vectors, in the same order
        ours = json.loads((fed / name / "metrics.json").read_text())
        theirs = json.loads((central / name / "metrics.json").read_text())
        assert ours["classification"] == theirs["classification"]
        assert ours["localization"] == theirs["localization"]
        assert ours["fedpatch"]["pixel_auroc"] == theirs["fedpatch"]["pixel_auroc"]
        assert ours["fedpatch"]["threshold"] == theirs["fedpatch"]["threshold"]
        assert json.loads(central_meta["threshold"]) == theirs["fedpatch"]["threshold"]

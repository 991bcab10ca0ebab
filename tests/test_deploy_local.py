"""The deployment topology for real: ``flower-superlink`` + N ``flower-supernode`` processes.

``fedpatch.deploy.LocalDeployment`` starts them on loopback (free ports), each SuperNode with
its own site folder (``--node-config data-dir=...``), submits this repository's app with
``flwr run`` (the launcher test from the checkout, the others from the ``flower_app`` copy,
which skips Flower's walk of ``.venv``) and stops every process it started. Tests check the ServerApp's result files,
TLS + SuperNode authentication (an unregistered node is refused), Flower's usage telemetry
off in every process, and a SuperNode killed mid-run. Data: a tiny generated set; model: resnet18 with random weights at 64x64.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from fedpatch.data.synthetic import generate_autovi_dataset
from fedpatch.deploy import DeploymentError, DeploymentOptions, LocalDeployment, NodeSpec, RunOutcome, connection_toml, run_config_text, split_into_sites
from fedpatch.deploy import __main__ as deploy_cli
from fedpatch.deploy import local as deploy_local
from fedpatch.deploy.local import flower_env
from fedpatch.deploy.processes import alive
from fedpatch.errors import ConfigError, DataError
from fedpatch.patchcore import read_model_file
from fedpatch.report import read_results_csv

OBJECT = "pipe_clip"
TINY = "model.backbone=resnet18; model.layers=null; model.pretrained=false; model.batch_size=4; data.resize=[64, 64]"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("deploy_data")
    return generate_autovi_dataset(root, [OBJECT], n_train=6, n_test_good=2, n_test_defective=1, scale=0.15, seed=3)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_sites_are_disjoint_cover_the_images_and_keep_their_masks(data: Path, tmp_path: Path) -> None:
    sites = split_into_sites(data, tmp_path, 3)
    assert [s.name for s in sites] == ["site-0", "site-1", "site-2"]
    images = [f for f in _files(data) if f.split("/")[1] in ("train", "test")]
    held = [f for s in sites for f in _files(s) if f.split("/")[1] in ("train", "test")]
    assert sorted(held) == images  # every image exactly once
    for site in sites:
        assert len(list((site / OBJECT / "train" / "good").glob("*.png"))) == 2
        assert len(list((site / OBJECT / "test").rglob("*.png"))) in (1, 2)  # 5 test images over 3 sites
        assert (site / OBJECT / "defects_config.json").is_file()
        for image in (site / OBJECT / "test").rglob("*.png"):
            if image.parent.name != "good":  # a defective image brings its masks, and only its own
                masks = site / OBJECT / "ground_truth" / image.parent.name / image.stem
                assert _files(masks) == _files(data / OBJECT / "ground_truth" / image.parent.name / image.stem)
        for masks in (site / OBJECT / "ground_truth").glob("*/*"):
            assert (site / OBJECT / "test" / masks.parent.name / f"{masks.name}.png").is_file()


def test_sites_reject_bad_requests(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="number of sites must be >= 1"):
        split_into_sites(data, tmp_path, 0)
    with pytest.raises(DataError, match=r"train: 6 image\(s\) cannot be split among 7 sites"):
        split_into_sites(data, tmp_path, 7)
    with pytest.raises(DataError, match="no object folder with a train split"):
        split_into_sites(tmp_path / "nothing", tmp_path, 2)


def test_connection_file_names_the_local_superlink(tmp_path: Path) -> None:
    assert connection_toml("127.0.0.1:5", None) == (
        '[superlink]\ndefault = "fedpatch-local"\n\n[superlink.fedpatch-local]\naddress = "127.0.0.1:5"\ninsecure = true\n'
    )
    assert 'root-certificates = "/c/ca.crt"' in connection_toml("h:1", Path("/c/ca.crt"))
    assert run_config_text({"output-dir": "/o", "min-nodes": 3, "overrides": 'a=[1, 2]; b="x"'}) == (
        'output-dir="/o" min-nodes=3 overrides="a=[1, 2]; b=\\"x\\""'
    )
    with pytest.raises(ConfigError, match="only make sense with node_auth"):
        LocalDeployment(DeploymentOptions(tmp_path, [NodeSpec(tmp_path)], unregistered=frozenset({0})))


def test_flower_processes_run_without_telemetry_unless_the_user_asks_for_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLWR_TELEMETRY_ENABLED", raising=False)
    env = flower_env(tmp_path / "home", tmp_path / "bin")
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert env["FLWR_DISABLE_UPDATE_CHECK"] == env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["FLWR_HOME"] == str(tmp_path / "home") and env["PATH"].startswith(f"{tmp_path / 'bin'}{os.pathsep}")
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "1")  # an explicit choice is the user's to make
    assert flower_env(tmp_path / "home", tmp_path / "bin")["FLWR_TELEMETRY_ENABLED"] == "1"


def _environ(pid: int) -> dict[str, str]:
    """The environment a running process was started with (Linux ``/proc``)."""
    entries = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    return dict(entry.split("=", 1) for entry in entries if "=" in entry)


def _run_config(out: Path, nodes: int, **extra: str | int | float) -> str:
    return run_config_text({"output-dir": str(out), "min-nodes": nodes, "node-wait-timeout": 60, "overrides": TINY, **extra})


def _wait_for(predicate, timeout: float, what: str) -> None:  # noqa: ANN001 - a callable
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def test_a_run_whose_log_stream_ends_early_is_waited_for_until_the_superlink_finishes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `flwr run --stream` returned while the run went on (seen once in CI on a loaded machine):
    # the outcome comes from the SuperLink's status and the ServerApp's file, not the stream
    deployment = LocalDeployment(DeploymentOptions(tmp_path / "work", [NodeSpec(tmp_path)]))
    out = tmp_path / "out"
    out.mkdir()
    asked: list[int] = []

    def run_status(flwr: str, env: dict[str, str], run_id: int, **where: object) -> tuple[str, str]:
        assert where["connection"] == "fedpatch-local" and flwr.endswith("flwr") and env["FLWR_HOME"] == str(deployment.home)
        asked.append(run_id)
        if len(asked) < 3:
            return "running", ""
        (out / "federation.json").write_text(json.dumps({"status": "completed"}))  # the ServerApp ends
        return "finished:completed", ""

    monkeypatch.setattr(deploy_local, "run_status", run_status)
    stream = deployment.processes.start("flwr-run-1", ["bash", "-c", "echo 'Successfully started run 7'"])
    outcome = deployment.wait(stream, out, timeout=60, started=time.monotonic())
    deployment.close()
    assert asked == [7, 7, 7] and outcome.returncode == 0
    assert outcome.status == "completed" and outcome.flower_status == "finished:completed"

    monkeypatch.setattr(deploy_local, "run_status", lambda *args, **kwargs: ("running", ""))
    with pytest.raises(DeploymentError, match=r"run 7 is still running after the time limit \(SuperLink log: .*superlink.log\)"):
        deployment.wait(deployment.processes.start("flwr-run-2", ["echo", "Successfully started run 7"]), out, timeout=0.5, started=time.monotonic())
    deployment.close()
    assert deploy_local.started_run_id("Using SuperLink\nSuccessfully started run 123\n") == 123
    assert deploy_local.started_run_id("connection refused") is None
    failed = RunOutcome(0, 1.0, "", None, "finished:failed", "ServerApp exited with code 1")
    assert failed.status == "no federation.json (Flower run status finished:failed: ServerApp exited with code 1)"


def test_three_sites_over_tls_with_node_authentication_and_an_unregistered_node_refused(data: Path, tmp_path: Path, flower_app: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLWR_TELEMETRY_ENABLED", raising=False)
    sites = split_into_sites(data, tmp_path / "sites", 3)
    nodes = [NodeSpec(s) for s in sites] + [NodeSpec(sites[0])]  # node 3: a fourth, unregistered site
    options = DeploymentOptions(tmp_path / "work", nodes, tls=True, node_auth=True, unregistered=frozenset({3}), app_dir=flower_app)
    out = tmp_path / "out"
    with LocalDeployment(options) as deployment:
        ids = [deployment.node_id(i) for i in range(3)]
        # every Flower process runs with Flower's usage telemetry off (fedpatch.deploy.flower_env)
        started = {m.name: _environ(m.pid).get("FLWR_TELEMETRY_ENABLED") for m in deployment.processes.managed}
        assert started == dict.fromkeys(["superlink", *(f"supernode-{i}" for i in range(4))], "0"), started
        outcome = deployment.run(_run_config(out, 3), out, timeout=300)
        refused = deployment.node(3)
        _wait_for(lambda: refused.process.poll() is not None, 30, "the unregistered SuperNode to give up")
        pids = [m.pid for m in deployment.processes.managed]
    print(f"local deployment (TLS + node auth, 3 sites): run wall time {outcome.wall_seconds:.1f} s")
    assert not deployment.leftover and not any(alive(p) for p in pids)
    assert outcome.status == "completed", outcome.log[-4000:]
    assert outcome.flower_status == "finished:completed"
    fed = outcome.federation
    assert not fed["failures"], fed["failures"]
    assert sorted(fed["nodes"]) == sorted(ids) and sorted(fed["succeeded"]) == sorted(ids)
    assert sorted(f["info"]["source"] for f in fed["fits"].values()) == [f"data-dir {s}" for s in sites]
    # every site read only its own folder: its 2 training images (1 held out for calibration)
    assert all(f["objects"][OBJECT]["n_images"] + f["objects"][OBJECT]["n_calibration"] == 2 for f in fed["fits"].values())
    table = read_results_csv(out / "results.csv")
    (pooled,) = [r for r in table if r["object"] == OBJECT and r["client"] == "all"]
    clients = [r for r in table if r["object"] == OBJECT and r["scope"] == "client"]
    assert pooled["partition"] == "3 clients" and sorted(r["client"] for r in clients) == sorted(ids)
    assert int(pooled["bank_size"]) == sum(int(r["bank_size"]) for r in clients)  # global ratio 1: the union
    assert int(pooled["test_good"]) + int(pooled["test_defective"]) == 2 + 3  # every test image once
    assert 0.0 <= float(pooled["image_auroc"]) <= 1.0
    _, bank = read_model_file(out / "models" / f"patchcore_{OBJECT}.pt")
    assert bank.shape[0] == int(pooled["bank_size"])
    traffic = json.loads((out / "communication.json").read_text())["per_client"]
    assert sorted(traffic) == sorted(ids)
    for node in ids:  # the bank goes up, the global bank comes down
        assert traffic[node]["bytes_up"] > bank.shape[0] // 3 * bank.shape[1] * 4 // 2
        assert traffic[node]["bytes_down"] > bank.nbytes
    # the unregistered node was refused by the SuperLink and never got an id
    assert "No SuperNode found with the given public key" in (options.work_dir / "logs" / "superlink.log").read_text()
    refused_log = (options.work_dir / "logs" / "supernode-3.log").read_text()
    assert "Failed to initialize the connection to the SuperLink" in refused_log and "SuperNode ID" not in refused_log
    # TLS was on: the connection names the CA, and no process was started with --insecure
    assert "root-certificates" in (options.work_dir / "flwr-home" / "config.toml").read_text()
    assert "insecure" not in (options.work_dir / "logs" / "superlink.log").read_text().lower()


def test_a_supernode_killed_mid_run_is_reported_by_id_and_the_others_finish(data: Path, tmp_path: Path, flower_app: Path) -> None:
    sites = split_into_sites(data, tmp_path / "sites", 3)
    nodes = [NodeSpec(sites[0]), NodeSpec(sites[1]), NodeSpec(sites[2], {"fault": "hang=600"})]
    options = DeploymentOptions(tmp_path / "work", nodes, app_dir=flower_app)
    out = tmp_path / "out"
    with LocalDeployment(options) as deployment:
        victim = deployment.node_id(2)
        started = time.monotonic()
        process = deployment.submit(_run_config(out, 3, **{"train-timeout": 45, "overrides": f"{TINY}; federated.min_clients=2"}))
        hanging = deployment.node(2)
        _wait_for(lambda: "Start `flwr-clientapp` process" in hanging.log_text(tail=1_000_000), 120, "node 2 to start its train handler")
        deployment.kill_node(2)
        assert hanging.process.poll() is not None
        outcome = deployment.wait(process, out, timeout=300, started=started)
    assert not deployment.leftover
    assert outcome.status == "completed", outcome.log[-4000:]
    assert outcome.flower_status == "finished:completed"
    fed = outcome.federation
    assert victim in fed["nodes"] and victim not in fed["succeeded"] and len(fed["succeeded"]) == 2
    (failure,) = fed["failures"]
    assert failure["client"] == victim and failure["stage"] == "train", failure
    # The SuperNode signs off on its SIGTERM (sent once: tests/test_deploy_processes.py), so the
    # SuperLink answers for it with an error reply and the round goes on without waiting for the
    # 45 s train timeout. That reply is never counted as an unsolicited reply of a client "1"
    # (the SuperLink's own node id), as it once was.
    assert failure["reason"].startswith("no reply; the SuperLink answered for the node (code 5): Error: Node Unavailable"), failure
    assert fed["rejected"]["total"] == 0, fed["rejected"]
    assert victim in (out / "results.md").read_text().split("## Excluded clients")[1]
    assert re.search(rf"excluded client {victim} at train", outcome.log)
    metrics = json.loads((out / OBJECT / "metrics.json").read_text())["fedpatch"]
    assert sorted(metrics["contributions"]) == sorted(fed["succeeded"])


def test_the_launcher_command_runs_a_federation_and_reports_traffic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = deploy_cli.main(["local", "--nodes", "2", "--work-dir", str(tmp_path), "--generate", "4", "--objects", OBJECT,
                            "--timeout", "300", "--run-config", run_config_text({"overrides": TINY})])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    fed = json.loads((tmp_path / "outputs" / "federation.json").read_text())
    assert fed["status"] == "completed" and len(fed["succeeded"]) == 2
    assert re.search(r"run completed in [0-9.]+ s \(flwr run exit 0\)", printed)
    for node in fed["succeeded"]:
        assert re.search(rf"node {node}: [0-9,]+ bytes up, [0-9,]+ bytes down", printed)


def test_the_sites_command_deals_a_data_root_out(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert deploy_cli.main(["sites", "--data-dir", str(data), "--out", str(tmp_path / "sites"), "--nodes", "2"]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "sites" / "site-0"), str(tmp_path / "sites" / "site-1")]
    assert deploy_cli.main(["sites", "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 1
    assert "no object folder with a train split" in capsys.readouterr().err

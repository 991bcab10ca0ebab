"""fedpatch.federated without Flower: validation, aggregation, exact pooling, payloads, outputs.

The protocol is driven in-process here (the same calls the Flower apps make, minus Flower);
tests/test_federated_flower.py runs it through Flower's real simulation engine.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from clients.faults import Fault
from fedpatch import workflow
from fedpatch.config import config_from_dict
from fedpatch.data.synthetic import generate_autovi_dataset
from fedpatch.errors import BankValidationError, ConfigError
from fedpatch.federated import (
    AppSettings,
    CommunicationLog,
    FederatedPatchCore,
    FederationError,
    RunRequest,
    accumulator_state,
    accumulators_from_state,
    counts_payload,
    evaluate_client,
    evaluation_payload,
    fit_client,
    fit_payload,
    open_client_data,
    parse_overrides,
    resolve_config_file,
    split_calibration,
    summarize_error,
    to_wire,
    write_outputs,
)
from fedpatch.patchcore import PatchCore
from fedpatch.report import read_results_csv

DIM = 8
OBJECTS = ["engine_wiring", "pipe_clip"]


def small_config(**federated):
    return config_from_dict(
        {
            "model": {"backbone": "resnet18", "layers": None, "pretrained": False, "batch_size": 4},
            "data": {"resize": [64, 64]},
            "evaluation": {"save_maps": False, "save_overlays": False},
            "runtime": {"device": "cpu", "progress": False},
            "federated": federated,
        }
    )


def synthetic_reply(banks: dict[str, np.ndarray], patches: int = 1000):
    metrics = {}
    for name, bank in banks.items():
        metrics.update(
            {
                f"{name}/n_images": 3,
                f"{name}/n_calibration": 1,
                f"{name}/patches_seen": patches,
                f"{name}/bank_rows": int(bank.shape[0]),
                f"{name}/fit_seconds": 0.5,
            }
        )
    return dict(banks), metrics


def rows(n: int, seed: int, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(dtype)


# --------------------------------------------------------------------------------------------
# Validation and aggregation with synthetic banks
# --------------------------------------------------------------------------------------------
def test_global_bank_is_the_union_in_a_fixed_client_order() -> None:
    strategy = FederatedPatchCore(small_config(), DIM, ["12", "3", "7"])
    banks = {c: rows(4, int(c)) for c in ("12", "3", "7")}
    for client in ("7", "12", "3"):  # arrival order does not matter
        assert strategy.add_fit_reply(client, *synthetic_reply({"pipe_clip": banks[client]}), {"source": f"p{client}"})
    result = strategy.aggregate()["pipe_clip"]
    # aggregate_banks concatenates by sorted client id (as strings), whatever the arrival order
    np.testing.assert_array_equal(result.bank, np.concatenate([banks["12"], banks["3"], banks["7"]]))
    assert result.union_size == 12 and result.contributions == {"12": 4, "3": 4, "7": 4}


def test_global_ratio_and_global_size_reduce_the_union() -> None:
    for federated, expected in (({"global_ratio": 0.5}, 6), ({"global_size": 5}, 5), ({"global_size": 50}, 12)):
        strategy = FederatedPatchCore(small_config(**federated), DIM, ["1", "2", "3"])
        union = []
        for c in ("1", "2", "3"):
            bank = rows(4, int(c))
            union.append(bank)
            strategy.add_fit_reply(c, *synthetic_reply({"pipe_clip": bank}), {})
        bank = strategy.aggregate()["pipe_clip"].bank
        assert bank.shape == (expected, DIM)
        stacked = np.concatenate(union)
        assert all(any(np.array_equal(row, u) for u in stacked) for row in bank)  # rows come from the union


def _bad(kind: str):
    good = rows(5, 0)
    if kind == "wrong-dim":
        return {"pipe_clip": rows(5, 0)[:, :-1]}, {}, "feature dimension 7 does not match 8"
    if kind == "nan":
        bad = good.copy()
        bad[2, 3] = np.nan
        return {"pipe_clip": bad}, {}, "NaN or infinite"
    if kind == "inf":
        bad = good.copy()
        bad[0, 0] = np.inf
        return {"pipe_clip": bad}, {}, "NaN or infinite"
    if kind == "float64":
        return {"pipe_clip": good.astype(np.float64)}, {}, "dtype float64, expected float32"
    if kind == "int":
        return {"pipe_clip": good.astype(np.int32)}, {}, "dtype int32, expected float32"
    if kind == "more-rows-than-patches":
        return {"pipe_clip": rows(30, 1)}, {"pipe_clip/patches_seen": 20}, "exceeds its 20 patches"
    if kind == "row-count-lie":
        return {"pipe_clip": good}, {"pipe_clip/bank_rows": 9}, "client reports 9"
    if kind == "missing-metric":
        return {"pipe_clip": good}, {"pipe_clip/patches_seen": None}, "'pipe_clip/patches_seen' is missing"
    if kind == "metrics-without-bank":
        return {"pipe_clip": good}, {"engine_wiring/n_images": 3}, "without a bank"
    if kind == "empty":
        return {"pipe_clip": np.empty((0, DIM), np.float32)}, {}, "no rows"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["wrong-dim", "nan", "inf", "float64", "int", "more-rows-than-patches", "row-count-lie", "missing-metric", "metrics-without-bank", "empty"],
)
def test_a_malformed_bank_excludes_that_client_only(kind: str) -> None:
    strategy = FederatedPatchCore(small_config(), DIM, ["101", "202", "303"])
    arrays, patch, message = _bad(kind)
    reply_arrays, metrics = synthetic_reply(arrays)
    for key, value in patch.items():
        if value is None:
            metrics.pop(key)
        else:
            metrics[key] = value
    assert strategy.add_fit_reply("202", reply_arrays, metrics, {"source": "partition 1/3 (iid)"}) is False
    assert strategy.add_fit_reply("101", *synthetic_reply({"pipe_clip": rows(5, 1)}), {}) is True
    assert strategy.add_fit_reply("303", *synthetic_reply({"pipe_clip": rows(5, 3)}), {}) is True
    (failure,) = strategy.failures
    assert failure.client == "202" and failure.stage == "train" and failure.source == "partition 1/3 (iid)"
    assert message in failure.reason
    assert strategy.active == ["101", "303"]
    assert strategy.aggregate()["pipe_clip"].contributions == {"101": 5, "303": 5}


def test_max_bank_rows_caps_a_client() -> None:
    strategy = FederatedPatchCore(small_config(max_bank_rows=4), DIM, ["1", "2"])
    assert not strategy.add_fit_reply("1", *synthetic_reply({"pipe_clip": rows(5, 0)}), {})
    assert "exceeds the cap of 4" in strategy.failures[0].reason
    assert strategy.add_fit_reply("2", *synthetic_reply({"pipe_clip": rows(4, 0)}), {})


def test_float16_transport_requires_float16_banks() -> None:
    strategy = FederatedPatchCore(small_config(bank_dtype="float16"), DIM, ["1", "2"])
    assert strategy.add_fit_reply("1", *synthetic_reply({"pipe_clip": rows(5, 0, np.float16)}), {})
    assert not strategy.add_fit_reply("2", *synthetic_reply({"pipe_clip": rows(5, 0, np.float32)}), {})
    assert "expected float16" in strategy.failures[0].reason
    strategy.aggregate()
    sent = strategy.evaluate_requests()["1"]["pipe_clip"]
    assert sent.dtype == np.float16


def test_too_few_clients_fail_with_the_missing_ones_named() -> None:
    strategy = FederatedPatchCore(small_config(min_clients=2), DIM, ["11", "22", "33"])
    strategy.add_fit_reply("11", *synthetic_reply({"pipe_clip": rows(5, 0)}), {"source": "partition 0/3 (iid)"})
    strategy.add_fit_reply("22", *synthetic_reply({"pipe_clip": rows(5, 0)[:, :3]}), {"source": "partition 1/3 (iid)"})
    strategy.fail("33", "train", "no reply within the train timeout of 5 s")
    with pytest.raises(FederationError) as caught:
        strategy.aggregate()
    text = str(caught.value)
    assert "only 1 of 3 clients succeeded (federated.min_clients = 2)" in text
    assert "node 22 (partition 1/3 (iid)): train: client 22 (pipe_clip): feature dimension 3" in text
    assert "node 33: train: no reply within the train timeout of 5 s" in text


def test_to_wire_refuses_float16_overflow() -> None:
    assert to_wire(rows(3, 0), "float16").dtype == np.float16
    with pytest.raises(BankValidationError, match="float16 range"):
        to_wire(np.full((2, DIM), 1e6, np.float32), "float16")


# --------------------------------------------------------------------------------------------
# The whole protocol on tiny real data, in-process
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def reuse_built_models() -> Iterator[None]:
    """Speed: build each (seeded, deterministic) model once and hand out deep copies."""
    built: dict[str, PatchCore] = {}
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
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("federated_tiny")
    generate_autovi_dataset(root, OBJECTS, n_train=7, n_test_good=2, n_test_defective=1, scale=0.15, seed=3)
    return root


@pytest.fixture(scope="module")
def iid_run(tiny_root: Path):
    return run_protocol(small_config(partition="iid"), tiny_root, 3)


def run_protocol(config, root: Path, n_clients: int, fail_at_counts: str | None = None):
    """Drive the protocol like the Flower apps do; returns (result, strategy, client data,
    each client's evaluations {client: {object: LocalEvaluation}})."""
    clients = [str(100 + i) for i in range(n_clients)]
    data = {c: open_client_data(config, root, (), i, n_clients) for i, c in enumerate(clients)}
    strategy = FederatedPatchCore(config, workflow.build_model(config).feature_dim, clients)
    for c in clients:
        arrays, metrics = fit_payload(fit_client(config, data[c]), config.federated.bank_dtype)
        strategy.add_fit_reply(c, arrays, metrics, {"source": data[c].source})
    strategy.aggregate()
    states, local = {}, {}
    for c, banks in strategy.evaluate_requests().items():
        evaluations = evaluate_client(config, data[c], banks)
        local[c] = {e.object_name: e.evaluation for e in evaluations}
        states[c] = accumulator_state(evaluations)
        strategy.add_evaluation_reply(c, *evaluation_payload(evaluations, config.evaluation.fpr_limits))
    first = True
    while asked := strategy.counts_requests():
        for c, values in asked.items():
            if first and c == fail_at_counts:
                strategy.fail(c, "evaluate.counts", "error reply (code 2): injected")
                continue
            strategy.add_counts_reply(c, counts_payload(accumulators_from_state(states[c]), values), values)
        first = False
    return strategy.result(), strategy, data, local


def central_metrics(config, root: Path, bank: np.ndarray, name: str, test_indices=None):
    """Metrics of scoring the (selected) test images in one place with ``bank``."""
    model = workflow.build_model(config)
    model.set_memory_bank(bank)
    test = workflow.open_object(root, name, "test", config)
    if test_indices is not None:
        from torch.utils.data import Subset

        test = Subset(test, test_indices)
    return workflow.pooled_metrics([workflow.score_local(model, test, config)], config.evaluation.fpr_limits)


def assert_same_metrics(obj, central, tol: float = 1e-12) -> None:
    assert obj.image_auroc == pytest.approx(central.image_auroc, abs=tol)
    assert obj.pixel_auroc == pytest.approx(central.pixel_auroc, abs=tol)
    for limit, value in central.auc_spro.items():
        assert obj.auc_spro[limit] == pytest.approx(value, abs=tol)
    assert (obj.n_good, obj.n_defective, obj.n_regions) == (central.n_good, central.n_defective, central.n_regions)


BATCH_TOLERANCE = 1e-5
"""Scoring the same image in a batch of another size changes float32 conv results in the last
bits, so metrics against a central re-scoring agree to this tolerance; the pooling itself is
exact (compared with the clients' own maps at 1e-12)."""


def test_pooled_metrics_are_exact(tiny_root: Path, iid_run) -> None:
    config = small_config(partition="iid")
    result, strategy, data, local = iid_run
    assert not result.failures
    for name in OBJECTS:
        obj = result.objects[name]
        assert sorted(obj.pooled_clients) == ["100", "101", "102"]
        # exact: the two-round pooling equals evaluating the clients' maps in one place
        assert_same_metrics(obj, workflow.pooled_metrics([local[c][name] for c in obj.pooled_clients], config.evaluation.fpr_limits))
        # and equals re-scoring every test image centrally with the global bank (float batch noise)
        assert_same_metrics(obj, central_metrics(config, tiny_root, obj.aggregation.bank, name), BATCH_TOLERANCE)
        # threshold: the configured quantile of every client's calibration scores under the global bank
        model = workflow.build_model(config)
        model.set_memory_bank(obj.aggregation.bank)
        scores = np.concatenate([workflow.calibration_scores(model, split_calibration(d.train[name], config)[1], config) for d in data.values()])
        assert obj.threshold == pytest.approx(workflow.threshold_from_scores(scores, config))
        assert obj.n_calibration == scores.size


def test_common_test_split_counts_each_image_once(tiny_root: Path) -> None:
    config = small_config(partition="iid", test_split="common")
    result, _, _, local = run_protocol(config, tiny_root, 3)
    for name in OBJECTS:
        obj = result.objects[name]
        assert obj.pooled_clients == ["100"]  # one evaluation per object: the lowest node id
        assert not obj.notes
        assert_same_metrics(obj, workflow.pooled_metrics([local["100"][name]], config.evaluation.fpr_limits))
        assert_same_metrics(obj, central_metrics(config, tiny_root, obj.aggregation.bank, name), BATCH_TOLERANCE)
        per_client = result.evaluations[name]
        assert len(per_client) == 3 and all(e.scores.size == obj.n_good + obj.n_defective for e in per_client.values())


def test_a_client_failing_at_counts_is_merged_out_consistently(tiny_root: Path) -> None:
    config = small_config(partition="iid")
    result, strategy, data, local = run_protocol(config, tiny_root, 3, fail_at_counts="101")
    assert [(f.client, f.stage) for f in result.failures] == [("101", "evaluate.counts")]
    for name in OBJECTS:
        obj = result.objects[name]
        assert obj.pooled_clients == ["100", "102"]
        assert_same_metrics(obj, workflow.pooled_metrics([local[c][name] for c in ("100", "102")], config.evaluation.fpr_limits))


def test_idle_client_of_by_object_is_not_asked_to_evaluate(tiny_root: Path) -> None:
    config = small_config(partition="by-object")
    result, strategy, data, _ = run_protocol(config, tiny_root, 3)
    owners = {name: list(result.objects[name].aggregation.contributions) for name in OBJECTS}
    assert all(len(o) == 1 for o in owners.values()) and owners["engine_wiring"] != owners["pipe_clip"]
    idle = [c for c, d in data.items() if not d.objects]
    assert len(idle) == 1 and idle[0] in result.fits and not result.fits[idle[0]].objects
    for name in OBJECTS:  # the owner fitted every image: the centralized bank
        owner = owners[name][0]
        assert data[owner].share.train[name] == list(range(7))


def test_accumulator_state_round_trip_answers_the_same_counts(tiny_root: Path) -> None:
    config = small_config()
    data = open_client_data(config, tiny_root, ["pipe_clip"], 0, 1)
    (fit,) = fit_client(config, data)
    (evaluation,) = evaluate_client(config, data, {"pipe_clip": fit.bank})
    restored = accumulators_from_state(accumulator_state([evaluation]))["pipe_clip"]
    values = np.linspace(0.0, float(evaluation.evaluation.pixels.summary().values.max()) * 1.2, 50).astype(np.float32)
    original = evaluation.evaluation.pixels.negative_counts(values)
    again = restored.negative_counts(values)
    np.testing.assert_array_equal(original.n_ge, again.n_ge)
    np.testing.assert_array_equal(original.n_gt, again.n_gt)


def test_negative_chunks_are_checked_when_restored() -> None:
    from fedpatch.metrics import PixelAccumulator

    with pytest.raises(ValueError, match="not sorted"):
        PixelAccumulator.from_negative_chunks([np.array([2.0, 1.0], np.float32)])
    with pytest.raises(ValueError, match="dtype"):
        PixelAccumulator.from_negative_chunks([np.zeros(2, np.float32), np.zeros(2, np.float64)])
    acc = PixelAccumulator.from_negative_chunks([np.array([0.5, 1.0, 1.0], np.float32), np.array([2.0], np.float32)])
    counts = acc.negative_counts(np.array([1.0], np.float32))
    assert (counts.n_ge.tolist(), counts.n_gt.tolist()) == ([3], [1])


def test_write_outputs(iid_run, tmp_path: Path) -> None:
    config = small_config(partition="iid")
    result = iid_run[0]
    communication = CommunicationLog()
    communication.add(1, "train", "100", down=10, up=1000)
    communication.add(1, "train", "101", down=10, up=900)
    out = write_outputs(tmp_path / "out", config, result, communication, result.failures, {"status": "completed"})
    for name in OBJECTS:
        model = PatchCore.load(out / "models" / f"patchcore_{name}.pt", device="cpu")
        np.testing.assert_array_equal(model.get_memory_bank(), result.objects[name].aggregation.bank)
        assert model.threshold == pytest.approx(result.objects[name].threshold)
        assert model.input_size == (64, 64)
        metrics = json.loads((out / name / "metrics.json").read_text())
        assert metrics["classification"]["auc_roc"] == result.objects[name].image_auroc
        assert set(metrics["localization"]["auc_spro"]) == {"0.01", "0.05", "0.1", "0.3", "1.0"}
    table = read_results_csv(out / "results.csv")
    assert [r["object"] for r in table if r["client"] == "all"] == [*OBJECTS, "mean"]
    assert {r["client"] for r in table if r["scope"] == "client"} == {"100", "101", "102"}
    assert "auc_spro@0.05" in table[0] and "image_auroc" in table[0]
    comm = json.loads((out / "communication.json").read_text())
    assert comm["per_client"]["100"] == {"bytes_down": 10, "bytes_up": 1000}
    assert json.loads((out / "federation.json").read_text())["status"] == "completed"
    assert "| **engine_wiring** | all |" in (out / "results.md").read_text()


# --------------------------------------------------------------------------------------------
# Settings, requests, faults, errors
# --------------------------------------------------------------------------------------------
def test_app_settings_from_run_config(tmp_path: Path) -> None:
    settings = AppSettings.from_run_config(
        {"overrides": "federated.partition=by-object;  data.resize=[64, 64]\n", "objects": "pipe_clip, engine_wiring", "num-rounds": 2, "train-timeout": 30, "fault": "1:raise"}
    )
    assert settings.overrides == ("federated.partition=by-object", "data.resize=[64, 64]")
    assert settings.objects == ("pipe_clip", "engine_wiring") and settings.num_rounds == 2 and settings.train_timeout == 30.0
    assert AppSettings.from_run_config({"objects": "all"}).objects == ()
    with pytest.raises(ConfigError, match="'num-rounds' must be int"):
        AppSettings.from_run_config({"num-rounds": 1.5})
    with pytest.raises(ConfigError, match="'num-rounds' is out of range"):
        AppSettings.from_run_config({"num-rounds": 0})
    with pytest.raises(ConfigError, match="'data-dir' must be str"):
        AppSettings.from_run_config({"data-dir": 3})
    assert parse_overrides("") == ()


def test_config_file_is_found_in_the_app_dir(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    found = resolve_config_file("configs/federated/patchcore_offline.yaml", repo)
    assert found == repo / "configs/federated/patchcore_offline.yaml"
    config = AppSettings(overrides=("federated.partition=dirichlet",)).load_config(repo)
    assert config.model.backbone == "efficientnet_lite0" and config.federated.partition == "dirichlet"
    with pytest.raises(ConfigError, match="config-file"):
        resolve_config_file("nope.yaml", tmp_path)


def test_run_request_round_trip() -> None:
    config = small_config(partition="dirichlet")
    request = RunRequest.make(config, ["pipe_clip"], "/data", 2)
    again = RunRequest.from_record(request.to_record())
    assert again == request and again.run_config() == config
    with pytest.raises(Exception, match="lacks config-yaml"):
        RunRequest.from_record({"objects": ""})


def test_summarize_error_keeps_the_client_message() -> None:
    reason = "<class 'ray.exceptions.RayTaskError'>:<'\x1b[36mray::Actor\x1b[39m\n  File x\nException ClientAppException occurred. Message: injected fault 'raise'\n'>"
    assert summarize_error(reason) == "injected fault 'raise'"
    assert summarize_error("a\nlast line\n") == "last line"
    assert summarize_error(None) == "no reason given"
    assert len(summarize_error("x" * 1000)) == 400


def test_fault_hook_selects_this_node() -> None:
    assert Fault.for_node({"partition-id": 1}, {"fault": "0:raise,1:wrong-dim"}).kind == "wrong-dim"
    assert Fault.for_node({"partition-id": 2}, {"fault": "0:raise"}) == Fault()
    assert Fault.for_node({"fault": "hang=2.5"}, {"fault": "0:raise"}) == Fault("hang", 2.5)
    assert Fault.for_node({}, {}) == Fault()
    with pytest.raises(ValueError, match="unknown fault"):
        Fault.parse("explode")
    with pytest.raises(Exception, match="injected fault 'raise' in the train handler"):
        Fault("raise").on("train")
    Fault("raise").on("evaluate")  # other stages untouched


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("nan-bank", "NaN"), ("wrong-dim", "feature dimension"), ("wrong-dtype", "dtype float64"), ("too-many-rows", "exceeds its")],
)
def test_each_injected_bank_fault_is_rejected_by_the_server(kind: str, reason: str) -> None:
    arrays, metrics = synthetic_reply({"pipe_clip": rows(5, 0), "engine_wiring": rows(4, 1)}, patches=12)
    arrays, metrics = Fault(kind).corrupt(arrays, metrics)
    strategy = FederatedPatchCore(small_config(), DIM, ["5"])
    assert not strategy.add_fit_reply("5", arrays, metrics, {})
    assert reason in strategy.failures[0].reason

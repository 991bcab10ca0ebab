"""The command line: `python -m fedpatch` as a subprocess, evaluate (both forms), predict,
generate, and user errors (one line on stderr, exit status 2, no traceback)."""

from __future__ import annotations

import csv
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedpatch import cli
from fedpatch.data import open_dataset
from fedpatch.data.synthetic import generate_autovi_dataset
from fedpatch.maps_io import read_image_scores
from fedpatch.patchcore import PatchCore
from tiny_run import OBJECTS, TINY_SETS

REPO = Path(__file__).resolve().parents[1]
TINY = TINY_SETS


def run_fedpatch(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "fedpatch", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli_data")
    return generate_autovi_dataset(root, list(OBJECTS), n_train=6, n_test_good=3, n_test_defective=2, scale=0.15, seed=2)


@pytest.fixture(scope="module")
def trained(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """One real `python -m fedpatch train` in a subprocess, progress bars on."""
    out = tmp_path_factory.mktemp("cli_run") / "run"
    proc = run_fedpatch("train", "--data-dir", str(tiny_data), "--output-dir", str(out), "--objects", "all", *TINY)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def metrics_of(out: Path, name: str) -> dict:
    return json.loads((out / name / "metrics.json").read_text())


def test_python_m_fedpatch_train(trained: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, proc = trained
    assert f"results: {out / 'results.md'} (2 trained, 0 skipped)" in proc.stdout
    for bar in ("fit: features + coreset", "coreset: greedy picks", "score pipe_clip", "score tank_screw", "predict"):
        assert bar in proc.stderr
    assert "img/s" in proc.stderr  # bars show rates
    assert "9/9" in proc.stderr  # ... and counts (pipe_clip: 3 good + 3 folders x 2 defective)
    for name in OBJECTS:
        assert (out / "models" / f"patchcore_{name}.pt").is_file()
        assert f"[{name}] done in" in proc.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["command"].startswith("fedpatch train --data-dir")


def test_evaluate_output_folder_gives_the_same_numbers(trained: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, _ = trained
    before = {name: metrics_of(out, name) for name in OBJECTS}
    (out / "results.csv").unlink()
    assert cli.main(["evaluate", "--output-dir", str(out), "--set", "runtime.progress=false"]) == 0
    for name in OBJECTS:
        after = metrics_of(out, name)
        assert after["localization"] == before[name]["localization"]
        assert after["classification"] == before[name]["classification"]
        assert after["fedpatch"]["pixel_auroc"] == before[name]["fedpatch"]["pixel_auroc"]
        assert after["fedpatch"]["training"] == before[name]["fedpatch"]["training"]  # fit statistics kept
    rows = {row["object"]: row for row in csv.DictReader((out / "results.csv").open())}
    assert float(rows["tank_screw"]["auc_spro@0.05"]) == before["tank_screw"]["localization"]["auc_spro"]["0.05"]
    assert "pipe_clip" in (out / "logs" / "evaluate.log").read_text()


def test_evaluate_rejects_non_runtime_overrides(trained: tuple[Path, subprocess.CompletedProcess], capsys: pytest.CaptureFixture) -> None:
    out, _ = trained
    assert cli.main(["evaluate", "--output-dir", str(out), "--set", "model.num_neighbors=1"]) == 2
    assert "only runtime.* keys" in capsys.readouterr().err


def test_evaluate_maps_folder_form(trained: tuple[Path, subprocess.CompletedProcess], tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, _ = trained
    target = tmp_path / "eval"
    assert cli.main(["evaluate", "--data-dir", str(tiny_data), "--maps-dir", str(out / "maps"), "--objects", *OBJECTS, "--output-dir", str(target)]) == 0
    printed = capsys.readouterr().out
    for name in OBJECTS:
        ours, theirs = metrics_of(out, name), metrics_of(target, name)
        assert theirs["classification"]["auc_roc"] == ours["classification"]["auc_roc"]  # image_scores.json is used
        for limit, value in ours["localization"]["auc_spro"].items():
            assert theirs["localization"]["auc_spro"][limit] == pytest.approx(value, abs=1e-12)  # float .npy maps
        assert f"{name}: image AUROC {ours['classification']['auc_roc']:.4f}" in printed
    assert [r["object"] for r in csv.DictReader((target / "results.csv").open())] == [*OBJECTS, "mean"]


def test_evaluate_maps_folder_needs_data_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["evaluate", "--maps-dir", str(tmp_path), "--objects", "x", "--output-dir", str(tmp_path / "o")]) == 2
    assert "needs --data-dir" in capsys.readouterr().err


def read_predictions(folder: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((folder / "predictions.csv").open()))


def test_predict_single_image_and_folder(trained: tuple[Path, subprocess.CompletedProcess], tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, _ = trained
    model_file = out / "models" / "patchcore_pipe_clip.pt"
    threshold = PatchCore.load(model_file).threshold
    image = tiny_data / "pipe_clip" / "test" / "unclipped" / "0000.png"
    folder = tiny_data / "pipe_clip" / "test" / "good"
    target = tmp_path / "pred"
    assert cli.main(["predict", "--model", str(model_file), str(image), str(folder), "--output-dir", str(target), "--no-progress"]) == 0
    rows = read_predictions(target)
    assert [r["name"] for r in rows] == ["0000", "good/0000", "good/0001", "good/0002"]
    trained_scores = read_image_scores(out / "maps", "pipe_clip")
    printed = capsys.readouterr().out
    for row, key in zip(rows, ["unclipped/0000", "good/0000", "good/0001", "good/0002"]):
        score = float(row["score"])
        assert float(row["threshold"]) == threshold
        assert row["verdict"] == ("defective" if score > threshold else "good")
        assert score == pytest.approx(trained_scores[key], rel=1e-4)  # same preprocessing as training
        amap = np.load(target / "maps" / f"{row['name']}.npy")
        assert amap.shape == (60, 60)  # the image's native size, not the 64x64 working size
        for kind in ("heatmaps", "overlays"):
            with Image.open(target / kind / f"{row['name']}.png") as picture:
                assert picture.mode == "RGB" and picture.width == 60
        assert f"{row['name']}" in printed and row["verdict"] in printed


def test_predict_threshold_override(trained: tuple[Path, subprocess.CompletedProcess], tiny_data: Path, tmp_path: Path) -> None:
    out, _ = trained
    folder = tiny_data / "tank_screw" / "test" / "missing"
    args = ["predict", "--model", str(out / "models" / "patchcore_tank_screw.pt"), str(folder), "--no-progress"]
    assert cli.main([*args, "--output-dir", str(tmp_path / "low"), "--threshold", "-1"]) == 0
    assert {r["verdict"] for r in read_predictions(tmp_path / "low")} == {"defective"}
    assert cli.main([*args, "--output-dir", str(tmp_path / "high"), "--threshold", "1e9"]) == 0
    assert {r["verdict"] for r in read_predictions(tmp_path / "high")} == {"good"}


def test_generate(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "data"
    args = ["generate", "--output", str(root), "--objects", "pipe_staple", "--scale", "0.1", "--n-train", "2", "--n-test-good", "1", "--n-test-defective", "1", "--seed", "3"]
    assert cli.main(args) == 0
    train = open_dataset(root, "all", "train")
    test = open_dataset(root, "all", "test")
    assert train.objects == ["pipe_staple"] and len(train) == 2
    assert len(test) == 1 + 2  # one good, one per defect folder (missing, multiple)
    with Image.open(train.samples[0].path) as image:
        assert image.size == (40, 40)
    assert cli.main(args) == 2  # never overwrites an existing object folder
    assert capsys.readouterr().err.startswith("fedpatch: error: ")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.corset_percentage=0.1", "unknown key 'model.corset_percentage'"),
        ("model.coreset_percentage=lots", "model.coreset_percentage has the wrong type"),
        ("model.coreset_percentage=1.5", "coreset_percentage must be in (0, 1]"),
        ("data.resize_small=[64]", "data.resize_small must be"),
        ("evaluation.threshold_quantile=0", "evaluation.threshold_quantile must be in (0, 1]"),
        ("modle.backbone=resnet18", "unknown section 'modle'"),
        ("model.layers=[layer9]", "unknown layer(s) ['layer9']"),
    ],
)
def test_config_errors_name_the_key(override: str, expected: str, tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    code = cli.main(["train", "--data-dir", str(tiny_data), "--output-dir", str(out), *TINY, "--set", override])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("fedpatch: error: ") and expected in err and "Traceback" not in err
    assert not out.exists()  # nothing written before the config is known to be valid


def test_config_file_errors_name_the_file_and_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  backbone: resnet18\n  neighbourhood_size: 3\n")
    assert cli.main(["train", "--config", str(config), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and "unknown key 'model.neighbourhood_size'" in err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train", "--data-dir", "{tmp}/missing"], "dataset root not found"),
        (["train", "--data-dir", "{data}", "--objects", "pipe_clip", "nope"], "object(s) nope not found"),
        (["train", "--data-dir", "{data}", "--objects", "all", "pipe_clip"], "'all' cannot be combined"),
        (["train", "--data-dir", "{data}/pipe_clip"], "looks like one object's folder; pass its parent"),
        (["evaluate", "--output-dir", "{tmp}"], "is not the output folder of a fedpatch train run"),
        (["predict", "--model", "{tmp}/model.pt", "{data}", "--output-dir", "{tmp}/p"], "pickle"),
        (["predict", "--model", "{tmp}/none.pt", "{data}", "--output-dir", "{tmp}/p"], "model file not found"),
        (["train", "--data-dir", "{data}", "--output-dir", "{tmp}/o", "--set", "model.pretrained=true"], "weights for resnet18"),
    ],
)
def test_user_errors_exit_2_with_one_line(args: list[str], expected: str, tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "model.pt").write_bytes(pickle.dumps({"bank": [1, 2, 3]}))
    argv = [a.format(tmp=tmp_path, data=tiny_data) for a in args]
    if argv[0] == "train":
        argv[1:1] = TINY  # later --set options win
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedpatch: error: ") and expected in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_subprocess_user_error_has_no_traceback(tmp_path: Path) -> None:
    proc = run_fedpatch("train", "--output-dir", str(tmp_path / "o"), "--set", "runtime.devise=cpu")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("fedpatch: error: ") and "runtime.devise" in proc.stderr

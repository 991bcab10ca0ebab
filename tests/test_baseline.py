"""`fedpatch train` end to end on a tiny generated data set: every output, the results table,
resuming, the one fit path, MVTec-style roots and the default data set."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from torch.utils.data import Subset

from fedpatch import cli
from fedpatch.aggregation import aggregate_banks
from fedpatch.baseline import overlay_choice
from fedpatch.config import load_config
from fedpatch.data import open_dataset
from fedpatch.data import synthetic
from fedpatch.data.io import SampleRecord
from fedpatch.data.synthetic import generate_autovi_dataset
from fedpatch.maps_io import read_image_scores
from fedpatch.patchcore import read_model_file
from fedpatch.report import read_results_csv
from fedpatch.workflow import calibration_split, fit_local, open_object
from tiny_run import OBJECTS, QUIET, TINY_SETS

TINY = TINY_SETS + QUIET
SIZES = {"pipe_clip": (64, 64), "tank_screw": (96, 72)}  # working (W, H) after the overrides


def generate_tiny(root: Path, objects=OBJECTS) -> Path:
    return generate_autovi_dataset(root, list(objects), n_train=6, n_test_good=3, n_test_defective=2, scale=0.15, seed=1)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_tiny(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="module")
def trained(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    assert cli.main(["train", "--data-dir", str(tiny_data), "--output-dir", str(out), "--objects", *OBJECTS, *TINY]) == 0
    return out


def read_metrics(out: Path, name: str) -> dict:
    return json.loads((out / name / "metrics.json").read_text())


def test_train_writes_config_models_and_log(trained: Path) -> None:
    config = load_config(trained / "config.yaml")
    assert config.model.backbone == "resnet18" and config.model.pretrained is False
    assert config.data.resize_small == [64, 64] and config.data.resize_large == [96, 72]
    assert config.model.coreset_percentage == 0.1  # untouched defaults are resolved too
    log = (trained / "logs" / "training.log").read_text()
    for name in OBJECTS:
        model_file = trained / "models" / f"patchcore_{name}.pt"
        head = model_file.read_bytes()[:8]
        assert head[:2] != b"PK" and head[:1] != b"\x80"  # safetensors, not a pickle/zip
        meta, bank = read_model_file(model_file)
        metrics = read_metrics(trained, name)
        assert json.loads(meta["input_size"]) == list(SIZES[name])
        assert json.loads(meta["threshold"]) == metrics["fedpatch"]["threshold"]
        assert bank.shape[0] == metrics["fedpatch"]["training"]["bank_size"]
        training = metrics["fedpatch"]["training"]
        assert training["images"] == 5 and training["calibration_images"] == 1
        w, h = SIZES[name]
        assert training["patches"] == 5 * math.ceil(h / 8) * math.ceil(w / 8)
        assert training["bank_size"] == math.ceil(0.1 * training["patches"])
        assert f"[{name}] 6 training images (5 fitted, 1 held out" in log
        assert f"-> bank of {training['bank_size']} in" in log
        assert f"[{name}] threshold {metrics['fedpatch']['threshold']:.4g}" in log
        assert f"[{name}] test: image AUROC {metrics['classification']['auc_roc']:.4f}" in log
        assert f"[{name}] done in" in log and "peak RSS" in log


def test_train_writes_maps_in_the_official_layout(trained: Path, tiny_data: Path) -> None:
    for name in OBJECTS:
        test = open_dataset(tiny_data, [name], "test")
        scores = read_image_scores(trained / "maps", name)
        assert set(scores) == {f"{r.defect_type}/{r.stem}" for r in test.samples}
        for index, record in enumerate(test.samples):
            folder = trained / "maps" / name / record.defect_type
            amap = np.load(folder / f"{record.stem}.npy")
            assert amap.shape == test.native_size(index) and amap.dtype == np.float32
            with Image.open(folder / f"{record.stem}.png") as png:
                assert png.mode.startswith("I;16") and png.size == (amap.shape[1], amap.shape[0])


def test_overlays_pictures_and_metrics(trained: Path, tiny_data: Path) -> None:
    config = load_config(trained / "config.yaml")
    for name in OBJECTS:
        test = open_dataset(tiny_data, [name], "test")
        expected = [f"{test.samples[i].defect_type}_{test.samples[i].stem}.png" for i in overlay_choice(test.samples, config.evaluation.max_overlays)]
        assert len(expected) == min(config.evaluation.max_overlays, len(test))
        overlays = sorted(p.name for p in (trained / "overlays" / name).iterdir())
        assert overlays == sorted(expected)
        with Image.open(trained / "overlays" / name / expected[0]) as picture:
            assert picture.mode == "RGB" and picture.width == test.native_size(0)[1]
        for picture in ("spro_curve.png", "score_histogram.png"):
            with Image.open(trained / name / picture) as image:
                assert image.format == "PNG" and image.width > 300
        metrics = read_metrics(trained, name)
        assert set(metrics["localization"]["auc_spro"]) == {"0.01", "0.05", "0.1", "0.3", "1.0"}
        assert 0.0 <= metrics["classification"]["auc_roc"] <= 1.0
        ours = metrics["fedpatch"]
        assert ours["n_good"] == 3 and ours["n_defective"] == sum(1 for r in test.samples if r.label)
        assert ours["scoring"]["images"] == len(test.samples) and ours["scoring"]["seconds"] > 0
        assert ours["training"]["fit_seconds"] > 0 and ours["training"]["peak_rss_mib"] > 0
        scores = np.array(list(read_image_scores(trained / "maps", name).values()))
        labels = np.array([1 if not k.startswith("good/") else 0 for k in read_image_scores(trained / "maps", name)])
        threshold = ours["threshold"]
        assert ours["at_threshold"] == {
            "good_flagged": int((scores[labels == 0] > threshold).sum()),
            "defective_flagged": int((scores[labels == 1] > threshold).sum()),
        }


def test_overlay_choice_takes_defect_folders_in_turn_then_good() -> None:
    folders = ["good"] * 3 + ["a"] * 3 + ["b"] * 1 + ["c"] * 2
    samples = [SampleRecord(f"{d}/{i}.png", int(d != "good"), "x", d, str(i)) for i, d in enumerate(folders)]
    picked = [samples[i].defect_type for i in overlay_choice(samples, 8)]
    assert picked == ["a", "b", "c", "a", "c", "a", "good", "good"]
    assert overlay_choice(samples, 0) == []


def test_results_table_equals_each_metrics_file(trained: Path) -> None:
    rows = {row["object"]: row for row in read_results_csv(trained / "results.csv")}
    assert list(rows) == [*OBJECTS, "mean"]
    per_object = {name: read_metrics(trained, name) for name in OBJECTS}
    for name, metrics in per_object.items():
        row = rows[name]
        assert float(row["image_auroc"]) == metrics["classification"]["auc_roc"]
        for limit, value in metrics["localization"]["auc_spro"].items():
            assert float(row[f"auc_spro@{limit}"]) == value
        assert float(row["pixel_auroc"]) == metrics["fedpatch"]["pixel_auroc"]
        assert float(row["threshold"]) == metrics["fedpatch"]["threshold"]
        assert int(row["bank_size"]) == metrics["fedpatch"]["training"]["bank_size"]
        assert float(row["fit_seconds"]) == metrics["fedpatch"]["training"]["fit_seconds"]
        assert float(row["peak_rss_mib"]) > 0
        assert row["published_image_auroc"] == "" and row["seed_target_auc_spro@0.05"] == ""
    mean = rows["mean"]
    assert float(mean["image_auroc"]) == pytest.approx(np.mean([m["classification"]["auc_roc"] for m in per_object.values()]), abs=1e-15)
    assert float(mean["auc_spro@0.05"]) == pytest.approx(np.mean([m["localization"]["auc_spro"]["0.05"] for m in per_object.values()]), abs=1e-15)
    assert (mean["published_image_auroc"], mean["published_auc_spro@0.05"]) == ("0.884", "0.689")
    assert (mean["seed_target_image_auroc"], mean["seed_target_auc_spro@0.05"]) == ("0.88", "0.78")
    markdown = (trained / "results.md").read_text()
    for name, metrics in per_object.items():
        line = next(line for line in markdown.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {metrics['classification']['auc_roc']:.3f} | {metrics['localization']['auc_spro']['0.05']:.3f} |" in line
        assert line.endswith("| n/a | n/a |")
    assert "0.884 / ~0.88" in markdown and "0.689 / ~0.78" in markdown and "Carvalho et al." in markdown


def mtimes(out: Path) -> dict[str, int]:
    files = [out / "models" / f"patchcore_{n}.pt" for n in OBJECTS] + [out / n / "metrics.json" for n in OBJECTS]
    return {str(f.relative_to(out)): f.stat().st_mtime_ns for f in files}


def test_rerun_skips_finished_objects_unless_forced(trained: Path, tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    before = mtimes(out)
    args = ["train", "--data-dir", str(tiny_data), "--output-dir", str(out), "--objects", *OBJECTS, *TINY]
    assert cli.main(args) == 0
    log = (out / "logs" / "training.log").read_text()
    assert "skipping pipe_clip: done" in log and "skipping tank_screw: done" in log
    assert mtimes(out) == before

    (out / "tank_screw" / "metrics.json").unlink()  # as if interrupted before the object finished
    assert cli.main(args) == 0
    after = mtimes(out)
    assert after["models/patchcore_pipe_clip.pt"] == before["models/patchcore_pipe_clip.pt"]
    assert after["models/patchcore_tank_screw.pt"] > before["models/patchcore_tank_screw.pt"]
    assert read_metrics(out, "tank_screw")["localization"] == read_metrics(trained, "tank_screw")["localization"]

    assert cli.main([*args, "--force"]) == 0
    forced = mtimes(out)
    assert all(forced[key] > after[key] for key in after)
    assert (out / "logs" / "training.log").read_text().count("skipping pipe_clip: done") == 2


def test_config_mismatch_with_an_output_folder_is_refused(trained: Path, tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    before = mtimes(out)
    args = ["train", "--data-dir", str(tiny_data), "--output-dir", str(out), *TINY, "--set", "model.num_neighbors=3"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedpatch: error: ") and "model.num_neighbors: 9 -> 3" in err and "--force" in err
    assert "Traceback" not in err
    assert mtimes(out) == before
    assert load_config(out / "config.yaml").model.num_neighbors == 9


def test_bank_is_the_one_workflow_path(trained: Path, tiny_data: Path) -> None:
    """The saved bank is exactly fit_local -> aggregate_banks (one client, ratio 1.0) on the
    calibration split: what a one-client federation computes."""
    config = load_config(trained / "config.yaml")
    train = open_object(tiny_data, "pipe_clip", "train", config)
    fit_indices, _ = calibration_split(len(train), config.data.calibration_fraction, config.model.seed)
    model, _ = fit_local(config, Subset(train, fit_indices))
    expected = aggregate_banks({"client-0": model.get_memory_bank()}, global_ratio=1.0).bank
    _, saved = read_model_file(trained / "models" / "patchcore_pipe_clip.pt")
    np.testing.assert_array_equal(saved, expected)


def to_mvtec(autovi_root: Path, name: str, target: Path) -> Path:
    """Copy one AutoVI object into the MVTec AD layout under a new name (one mask per image)."""
    source, folder = autovi_root / name, target / "widget"
    shutil.copytree(source / "train", folder / "train")
    shutil.copytree(source / "test", folder / "test")
    for defect in (source / "ground_truth").iterdir():
        for instance in defect.iterdir():
            masks = [np.asarray(Image.open(p).convert("L")) > 0 for p in sorted(instance.glob("*.png"))]
            union = np.logical_or.reduce(masks)
            out = folder / "ground_truth" / defect.name / f"{instance.name}_mask.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((union * 255).astype(np.uint8)).save(out)
    return target


def test_mvtec_style_root_is_detected(tiny_data: Path, tmp_path: Path) -> None:
    root = to_mvtec(tiny_data, "pipe_clip", tmp_path / "mvtec")
    out = tmp_path / "run"
    assert cli.main(["train", "--data-dir", str(root), "--output-dir", str(out), "--objects", "all", *TINY]) == 0
    metrics = read_metrics(out, "widget")
    assert metrics["fedpatch"]["n_defective"] == 6 and metrics["fedpatch"]["n_regions"] == 6  # one region per mask
    meta, _ = read_model_file(out / "models" / "patchcore_widget.pt")
    assert json.loads(meta["input_size"]) is None  # not an AutoVI object: native size
    assert [row["object"] for row in read_results_csv(out / "results.csv")] == ["widget", "mean"]


def test_without_data_dir_the_default_dataset_is_generated_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("FEDPATCH_CACHE", str(cache))
    real = synthetic.generate_autovi_dataset
    monkeypatch.setattr(synthetic, "generate_autovi_dataset", lambda root, **_: real(root, ["pipe_clip"], n_train=4, n_test_good=2, n_test_defective=1, scale=0.15))
    out = tmp_path / "run"
    args = ["train", "--output-dir", str(out), "--objects", "pipe_clip", *TINY]
    assert cli.main(args) == 0
    expected = synthetic.default_dataset_path()
    assert f"generating the default synthetic AutoVI dataset in {expected}" in capsys.readouterr().err
    assert (expected / synthetic.COMPLETE_MARKER).is_file()
    assert json.loads((out / "run.json").read_text())["data_dir"] == str(expected.resolve())
    assert cli.main(args) == 0
    assert "generating" not in capsys.readouterr().err  # second run: reused, not regenerated
    assert "skipping pipe_clip: done" in (out / "logs" / "training.log").read_text()


def test_config_yaml_round_trips(trained: Path) -> None:
    saved = yaml.safe_load((trained / "config.yaml").read_text())
    assert saved == asdict(load_config(trained / "config.yaml"))
    assert set(saved) == {"model", "data", "evaluation", "runtime", "federated"}
    assert not any(p.name.endswith(".tmp") for p in trained.rglob("*"))  # atomic writes leave no temp files

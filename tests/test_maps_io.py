"""Anomaly maps to files and back, and evaluate_maps_folder against in-memory metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fedpatch.data import open_dataset
from fedpatch.data.regions import DefectRegion, DefectSpec
from fedpatch.data.synthetic import generate_autovi_dataset
from fedpatch.errors import DataError
from fedpatch.evaluate import evaluate_maps_folder, resize_bilinear
from fedpatch.maps_io import (
    SCALING_FILE,
    MapEntry,
    PngScaling,
    atomic_write,
    atomic_write_json,
    export_png_maps,
    read_anomaly_map,
    save_heatmap_png,
    write_anomaly_maps,
    write_float_map,
    write_image_scores,
)
from fedpatch.metrics import evaluate_object, image_auroc, metrics_json

PNG_TOLERANCE = {16: 1e-3, 8: 2e-2}
"""Largest difference allowed between metrics on PNG maps and on the float maps (measured
over 5 seeds of these tiny sets: 1.3e-4 for 16-bit, 4.6e-3 for 8-bit)."""

SPECS = [
    {"defect_name": "missing", "pixel_value": 255, "saturation_threshold": 1.0, "relative_saturation": True},
    {"defect_name": "scratch", "pixel_value": 128, "saturation_threshold": 20, "relative_saturation": False},
]


# --------------------------------------------------------------------------------------
# A minimal AutoVI tree built here, plus maps with a signal inside the regions
# --------------------------------------------------------------------------------------


def make_object(root: Path, name: str, hw: tuple[int, int], n_good: int, n_bad: int, rng: np.random.Generator):
    """Write ``<root>/<name>`` in the AutoVI layout; return [(defect, stem, regions)] in test order."""
    folder = root / name
    (folder / "defects_config.json").parent.mkdir(parents=True)
    (folder / "defects_config.json").write_text(json.dumps(SPECS))
    image = np.zeros((*hw, 3), np.uint8)
    (folder / "train" / "good").mkdir(parents=True)
    Image.fromarray(image).save(folder / "train" / "good" / "0000.png")
    items = []
    (folder / "test" / "good").mkdir(parents=True)
    for i in range(n_good):
        Image.fromarray(image).save(folder / "test" / "good" / f"{i:04d}.png")
        items.append(("good", f"{i:04d}", []))
    for i in range(n_bad):
        defect = ["missing", "multiple"][i % 2]
        stem = f"{i:04d}"
        (folder / "test" / defect).mkdir(exist_ok=True)
        Image.fromarray(image).save(folder / "test" / defect / f"{stem}.png")
        gt = folder / "ground_truth" / defect / stem
        gt.mkdir(parents=True)
        regions = []
        for j, spec in enumerate(SPECS[: 1 + i % 2]):
            mask = np.zeros(hw, bool)
            top, left = rng.integers(0, hw[0] - 6), rng.integers(0, hw[1] - 6)
            mask[top : top + rng.integers(2, 6), left : left + rng.integers(2, 6)] = True
            Image.fromarray(np.where(mask, spec["pixel_value"], 0).astype(np.uint8)).save(gt / f"{j:03d}.png")
            fields = (spec["defect_name"], spec["pixel_value"], float(spec["saturation_threshold"]))
            regions.append(DefectRegion(mask, DefectSpec(*fields, spec["relative_saturation"])))
        items.append((defect, stem, regions))
    return sorted(items, key=lambda item: (item[0] != "good", item[0], item[1]))


def make_maps(items, hw, rng):
    maps = []
    for _, _, regions in items:
        amap = rng.random(hw).astype(np.float32)
        for region in regions:
            amap[region.mask] += np.float32(rng.uniform(0.2, 0.8))
        maps.append(amap)
    return maps


def in_memory(items, maps):
    labels = [int(bool(regions)) for _, _, regions in items]
    result = evaluate_object(maps, labels, [float(m.max()) for m in maps], [regions for _, _, regions in items])
    return metrics_json(result)


def assert_metrics_close(got, expected, tol):
    assert got.keys() == expected.keys()
    assert got["classification"]["auc_roc"] == pytest.approx(expected["classification"]["auc_roc"], abs=tol)
    assert got["localization"]["auc_spro"].keys() == expected["localization"]["auc_spro"].keys()
    for key, value in expected["localization"]["auc_spro"].items():
        assert got["localization"]["auc_spro"][key] == pytest.approx(value, abs=tol), key
    assert got["fedpatch"]["pixel_auroc"] == pytest.approx(expected["fedpatch"]["pixel_auroc"], abs=tol)


@pytest.fixture
def two_objects(tmp_path):
    """Data root with two objects of different sizes, their maps and in-memory metrics."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    setup = {}
    for name, hw in (("engine_wiring", (24, 32)), ("my_part", (20, 16))):
        items = make_object(data, name, hw, n_good=4, n_bad=5, rng=rng)
        maps = make_maps(items, hw, rng)
        setup[name] = (items, maps)
    return data, setup


def write_all(maps_dir, setup, float_format="npy", png_bits=16):
    for name, (items, maps) in setup.items():
        entries = [MapEntry(defect, stem, amap) for (defect, stem, _), amap in zip(items, maps)]
        write_anomaly_maps(maps_dir, name, entries, png_bits=png_bits, float_format=float_format)


# --------------------------------------------------------------------------------------
# Round trips through evaluate_maps_folder
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("float_format", ["npy", "tiff"])
def test_float_maps_round_trip_exactly(tmp_path, two_objects, float_format):
    data, setup = two_objects
    write_all(tmp_path / "maps", setup, float_format=float_format)
    results = evaluate_maps_folder(data, tmp_path / "maps", list(setup), tmp_path / "out")
    for name, (items, maps) in setup.items():
        expected = in_memory(items, maps)
        assert results[name] == expected  # exact: the float maps are read back bit for bit
        assert json.loads((tmp_path / "out" / name / "metrics.json").read_text()) == expected
        assert not [p for p in (tmp_path / "out" / name).iterdir() if p.name != "metrics.json"]


def test_round_trip_on_generated_autovi_set(tmp_path):
    """Two objects written by the project's generator, read by its loader, maps via files."""
    data = generate_autovi_dataset(
        tmp_path / "data", objects=["pipe_clip", "tank_screw"], n_train=1, n_test_good=3,
        n_test_defective=1, scale=0.1, seed=0,
    )
    rng = np.random.default_rng(4)
    expected = {}
    for name in ("pipe_clip", "tank_screw"):
        dataset = open_dataset(data, [name], split="test")
        items = [(r.defect_type, r.stem, dataset.regions(i)) for i, r in enumerate(dataset.samples)]
        maps = make_maps(items, dataset.native_size(0), rng)
        write_anomaly_maps(tmp_path / "maps", name, [MapEntry(d, s, m) for (d, s, _), m in zip(items, maps)])
        expected[name] = in_memory(items, maps)
    results = evaluate_maps_folder(data, tmp_path / "maps", ["pipe_clip", "tank_screw"], tmp_path / "out")
    assert results == expected
    for path in (tmp_path / "maps").rglob("*.npy"):
        path.unlink()
    from_png = evaluate_maps_folder(data, tmp_path / "maps", ["pipe_clip", "tank_screw"], tmp_path / "out")
    for name in expected:
        assert_metrics_close(from_png[name], expected[name], PNG_TOLERANCE[16])


@pytest.mark.parametrize("bits", [16, 8])
def test_png_maps_round_trip_within_tolerance(tmp_path, two_objects, bits):
    data, setup = two_objects
    maps_dir = tmp_path / "maps"
    write_all(maps_dir, setup, png_bits=bits)
    for path in maps_dir.rglob("*.npy"):
        path.unlink()  # only the PNGs the official evaluator reads are left
    results = evaluate_maps_folder(data, maps_dir, list(setup), tmp_path / "out")
    for name, (items, maps) in setup.items():
        assert_metrics_close(results[name], in_memory(items, maps), PNG_TOLERANCE[bits])
        scaling = json.loads((maps_dir / name / SCALING_FILE).read_text())
        assert scaling["bits"] == bits
        assert scaling["min"] == pytest.approx(min(float(m.min()) for m in maps))
        assert scaling["max"] == pytest.approx(max(float(m.max()) for m in maps))


def test_png_scaling_keeps_order_across_images():
    scaling = PngScaling(lo=-1.0, hi=3.0, bits=16)
    values = np.linspace(-1.0, 3.0, 1001).reshape(7, 143)
    quantised = scaling.quantize(values)
    assert quantised.dtype == np.uint16 and quantised.min() == 0 and quantised.max() == 65535
    assert np.all(np.diff(quantised.ravel().astype(np.int64)) >= 0)
    assert PngScaling(2.0, 2.0, 8).quantize(np.full((2, 2), 2.0)).tolist() == [[0, 0], [0, 0]]


def test_npy_preferred_over_png_when_both_exist(tmp_path, two_objects):
    data, setup = two_objects
    write_all(tmp_path / "maps", setup)  # writes .npy and .png
    results = evaluate_maps_folder(data, tmp_path / "maps", ["my_part"], tmp_path / "out")
    items, maps = setup["my_part"]
    assert results["my_part"] == in_memory(items, maps)


def test_maps_at_another_size_are_resized_bilinearly(tmp_path, two_objects):
    data, setup = two_objects
    items, maps = setup["engine_wiring"]
    small = [np.ascontiguousarray(m[::2, ::2]) for m in maps]
    for (defect, stem, _), amap in zip(items, small):
        write_float_map(tmp_path / "maps" / "engine_wiring" / defect / f"{stem}.npy", amap)
    results = evaluate_maps_folder(data, tmp_path / "maps", ["engine_wiring"], tmp_path / "out")
    resized = [resize_bilinear(m, (24, 32)) for m in small]
    assert results["engine_wiring"] == in_memory(items, resized)


@pytest.mark.parametrize(("src", "dst"), [((6, 8), (24, 32)), ((24, 32), (7, 5)), ((5, 9), (5, 9)), ((1, 4), (3, 2))])
def test_resize_bilinear_matches_torch(src, dst):
    amap = np.random.default_rng(1).random(src).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(amap)[None, None], size=dst, mode="bilinear", align_corners=False)
    got = resize_bilinear(amap, dst)
    assert got.dtype == np.float32 and got.shape == dst
    np.testing.assert_allclose(got, expected[0, 0].numpy(), atol=1e-6)


def test_scores_file_replaces_map_maximum(tmp_path, two_objects):
    data, setup = two_objects
    write_all(tmp_path / "maps", setup)
    items, _ = setup["my_part"]
    rng = np.random.default_rng(5)
    scores = {(defect, stem): float(rng.random()) for defect, stem, _ in items}
    write_image_scores(tmp_path / "maps", "my_part", scores)
    results = evaluate_maps_folder(data, tmp_path / "maps", ["my_part"], tmp_path / "out")
    labels = [int(bool(regions)) for _, _, regions in items]
    expected = image_auroc([scores[(d, s)] for d, s, _ in items], labels)
    assert results["my_part"]["classification"]["auc_roc"] == expected


def test_export_png_maps_from_streamed_float_maps(tmp_path, two_objects):
    _, setup = two_objects
    items, maps = setup["my_part"]
    for (defect, stem, _), amap in zip(items, maps):
        write_float_map(tmp_path / "my_part" / defect / f"{stem}.tiff", amap)
    scaling = export_png_maps(tmp_path, "my_part", png_bits=16)
    assert scaling.lo == min(float(m.min()) for m in maps) and scaling.hi == max(float(m.max()) for m in maps)
    defect, stem, _ = items[-1]
    png = read_anomaly_map(tmp_path / "my_part" / defect / f"{stem}.png")
    np.testing.assert_array_equal(png, scaling.quantize(maps[-1]).astype(np.float32))


# --------------------------------------------------------------------------------------
# Reading single files
# --------------------------------------------------------------------------------------


def test_read_formats(tmp_path):
    amap = np.random.default_rng(2).random((5, 7)).astype(np.float32)
    write_float_map(tmp_path / "a.npy", amap)
    write_float_map(tmp_path / "a.tiff", amap)
    write_float_map(tmp_path / "b.npy", amap.astype(np.float64))
    assert read_anomaly_map(tmp_path / "a.npy").dtype == np.float32
    np.testing.assert_array_equal(read_anomaly_map(tmp_path / "a.npy"), amap)
    np.testing.assert_array_equal(read_anomaly_map(tmp_path / "a.tiff"), amap)
    assert read_anomaly_map(tmp_path / "b.npy").dtype == np.float64
    Image.fromarray((amap * 255).astype(np.uint8)).save(tmp_path / "c.png")
    Image.fromarray((amap * 65535).astype(np.uint16)).save(tmp_path / "d.png")
    np.testing.assert_array_equal(read_anomaly_map(tmp_path / "c.png"), (amap * 255).astype(np.uint8))
    np.testing.assert_array_equal(read_anomaly_map(tmp_path / "d.png"), (amap * 65535).astype(np.uint16))


def test_read_float64_tiff_uses_tifffile_fallback(tmp_path):
    import tifffile  # a test dependency: the fallback path must run, not be skipped
    amap = np.random.default_rng(3).random((4, 6))
    tifffile.imwrite(tmp_path / "m.tif", amap)
    np.testing.assert_array_equal(read_anomaly_map(tmp_path / "m.tif"), amap.astype(np.float32))


def test_bad_map_files_name_the_file(tmp_path):
    nan_map = np.ones((3, 3), np.float32)
    nan_map[1, 1] = np.nan
    np.save(tmp_path / "nan.npy", nan_map)
    Image.fromarray(nan_map).save(tmp_path / "nan.tiff", format="TIFF")
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(tmp_path / "rgb.png")
    np.save(tmp_path / "cube.npy", np.zeros((2, 2, 2), np.float32))
    (tmp_path / "map.jpg").write_bytes(b"")
    for name, message in [
        ("nan.npy", "NaN"),
        ("nan.tiff", "NaN"),
        ("junk.png", "not an image"),
        ("junk.npy", "not a readable .npy"),
        ("rgb.png", "mode RGB"),
        ("cube.npy", "2-D"),
        ("map.jpg", "unsupported suffix"),
        ("missing.npy", "not found"),
    ]:
        with pytest.raises(DataError, match=message) as info:
            read_anomaly_map(tmp_path / name)
        assert name in str(info.value)


def test_writers_refuse_bad_maps(tmp_path):
    with pytest.raises(ValueError, match="NaN"):
        write_float_map(tmp_path / "x.npy", np.full((2, 2), np.nan))
    with pytest.raises(ValueError, match=".npy or .tiff"):
        write_float_map(tmp_path / "x.png", np.zeros((2, 2)))
    with pytest.raises(ValueError, match="8- or 16-bit"):
        PngScaling(0.0, 1.0, 12)
    assert not list(tmp_path.iterdir())


def test_save_heatmap_png(tmp_path):
    amap = np.linspace(0, 1, 30).reshape(5, 6)
    save_heatmap_png(amap, tmp_path / "pics" / "h.png")
    with Image.open(tmp_path / "pics" / "h.png") as image:
        assert image.mode == "RGB" and image.size == (6, 5)
        pixels = np.asarray(image)
    assert not np.array_equal(pixels[0, 0], pixels[-1, -1])


# --------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"a": 1})

    def explode(handle):
        handle.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, explode)
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


# --------------------------------------------------------------------------------------
# Folder errors
# --------------------------------------------------------------------------------------


def test_missing_map_names_expected_path(tmp_path, two_objects):
    data, setup = two_objects
    write_all(tmp_path / "maps", setup)
    for path in (tmp_path / "maps" / "my_part" / "missing").glob("0002.*"):
        path.unlink()
    with pytest.raises(DataError, match=r"missing/0002: expected .*my_part/missing/0002\.npy"):
        evaluate_maps_folder(data, tmp_path / "maps", ["my_part"], tmp_path / "out")


def test_map_for_unknown_image(tmp_path, two_objects):
    data, setup = two_objects
    write_all(tmp_path / "maps", setup)
    np.save(tmp_path / "maps" / "my_part" / "good" / "0099.npy", np.zeros((20, 16), np.float32))
    with pytest.raises(DataError, match=r"good/0099\.npy belongs to no test image"):
        evaluate_maps_folder(data, tmp_path / "maps", ["my_part"], tmp_path / "out")


def test_mismatched_objects(tmp_path, two_objects):
    data, setup = two_objects
    write_all(tmp_path / "maps", {"my_part": setup["my_part"]})
    with pytest.raises(DataError, match="no anomaly maps for object.*engine_wiring.*it has: my_part"):
        evaluate_maps_folder(data, tmp_path / "maps", ["my_part", "engine_wiring"], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # checked before anything is evaluated
    (tmp_path / "maps" / "other").mkdir()
    with pytest.raises(DataError, match="other"):
        evaluate_maps_folder(data, tmp_path / "maps", ["other"], tmp_path / "out")


def test_mixed_formats_and_bad_scores_file(tmp_path, two_objects):
    data, setup = two_objects
    write_all(tmp_path / "maps", {"my_part": setup["my_part"]})
    (tmp_path / "maps" / "my_part" / "good" / "0001.npy").unlink()
    (tmp_path / "maps" / "my_part" / "missing" / "0000.png").unlink()
    with pytest.raises(DataError, match=r"mix formats.*good/0001 has no \.npy"):
        evaluate_maps_folder(data, tmp_path / "maps", ["my_part"], tmp_path / "out")

    write_all(tmp_path / "maps2", {"my_part": setup["my_part"]})
    write_image_scores(tmp_path / "maps2", "my_part", {("good", "0000"): 1.0})
    with pytest.raises(DataError, match="image_scores.json has no score for test image 'good/0001'"):
        evaluate_maps_folder(data, tmp_path / "maps2", ["my_part"], tmp_path / "out")


def test_wrong_size_nan_map_in_folder(tmp_path, two_objects):
    data, setup = two_objects
    write_all(tmp_path / "maps", {"my_part": setup["my_part"]})
    bad = tmp_path / "maps" / "my_part" / "good" / "0003.npy"
    amap = np.load(bad)
    amap[0, 0] = np.inf
    np.save(bad, amap)
    with pytest.raises(DataError, match="0003.npy contains NaN or infinite"):
        evaluate_maps_folder(data, tmp_path / "maps", ["my_part"], tmp_path / "out")


def test_fedpatch_evaluation_needs_neither_sklearn_nor_scipy():
    import subprocess
    import sys

    code = (
        "import sys, fedpatch.metrics, fedpatch.maps_io, fedpatch.evaluate; "
        "print(sorted(m for m in ('sklearn', 'scipy', 'tifffile') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

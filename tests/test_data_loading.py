"""Loading AutoVI-layout (generated), MVTec-layout (handmade and Magnetic Tile) and real AutoVI images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fedpatch.data import (
    AUTOVI_OBJECTS,
    AutoVIDataset,
    MVTecDataset,
    Sample,
    list_objects,
    load_image,
    load_mask,
    open_dataset,
    resize_for_object,
    resize_presets,
)
from fedpatch.data.mvtec import MVTEC_SPEC
from fedpatch.data.synthetic import TEST_FOLDERS, generate_autovi_dataset
from fedpatch.errors import ConfigError, DataError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
AUTOVI_EXAMPLES = SHARED / "autovi_examples" / "engine_wiring" / "test"
MAGNETIC_TILES = SHARED / "magnetic_tile_defects"
N_TRAIN, N_GOOD, N_DEFECTIVE = 3, 2, 2


@pytest.fixture(scope="module")
def autovi_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("autovi")
    return generate_autovi_dataset(root, "all", n_train=N_TRAIN, n_test_good=N_GOOD, n_test_defective=N_DEFECTIVE, scale=0.16)


def test_counts_labels_and_order(autovi_root: Path) -> None:
    train = AutoVIDataset(autovi_root, "all", "train")
    test = AutoVIDataset(autovi_root, "all", "test")
    assert len(train) == 6 * N_TRAIN
    assert len(test) == sum(N_GOOD + N_DEFECTIVE * len(TEST_FOLDERS[obj]) for obj in AUTOVI_OBJECTS)
    assert {r.label for r in train.samples} == {0} and {r.defect_type for r in train.samples} == {"good"}
    records = [r for r in test.samples if r.object_name == "engine_wiring"]
    assert [r.defect_type for r in records] == ["good"] * N_GOOD + [d for d in TEST_FOLDERS["engine_wiring"] for _ in range(N_DEFECTIVE)]
    assert [r.label for r in records] == [0] * N_GOOD + [1] * (len(records) - N_GOOD)
    assert [r.stem for r in records[:N_GOOD]] == ["0000", "0001"]
    assert all(Path(r.path).is_file() and Path(r.path).stem == r.stem for r in test.samples)
    assert [r.object_name for r in train.samples] == [o for o in AUTOVI_OBJECTS for _ in range(N_TRAIN)]


def test_sample_fields_and_native_presets(autovi_root: Path) -> None:
    test = AutoVIDataset(autovi_root, ["engine_wiring", "tank_screw"], "test")
    first = {r.object_name: i for i, r in reversed(list(enumerate(test.samples)))}
    small, large = test[first["engine_wiring"]], test[first["tank_screw"]]
    assert isinstance(small, Sample) and small[0] is small.image
    # "native" = the AutoVI presets (W x H): 400x400 and 1000x750, whatever the file size
    assert small.image.shape == (3, 400, 400) and large.image.shape == (3, 750, 1000)
    assert small.native_size == (64, 64) and large.native_size == (120, 160)
    assert small.image.dtype == torch.float32 and 0.0 <= float(small.image.min()) and float(small.image.max()) <= 1.0
    assert (small.label, small.object_name, small.defect_type) == (0, "engine_wiring", "good")
    assert small.path == test.samples[first["engine_wiring"]].path
    assert test.native_size(first["tank_screw"]) == (120, 160)


def test_image_tensor_is_rgb_of_the_file(autovi_root: Path) -> None:
    data = AutoVIDataset(autovi_root, "pipe_clip", "train", resize=(64, 64))
    sample = data[0]
    expected = np.asarray(Image.open(sample.path).convert("RGB"), dtype=np.float32) / 255
    assert np.allclose(sample.image.permute(1, 2, 0).numpy(), expected)


def test_resize_overrides(autovi_root: Path) -> None:
    one = AutoVIDataset(autovi_root, ["pipe_staple", "underbody_screw"], "train", resize=(48, 32))
    assert {tuple(one[i].image.shape) for i in (0, N_TRAIN)} == {(3, 32, 48)}
    per_object = AutoVIDataset(autovi_root, ["pipe_staple", "underbody_screw"], "train", resize=resize_presets((40, 40), (80, 60)))
    assert per_object[0].image.shape == (3, 40, 40) and per_object[N_TRAIN].image.shape == (3, 60, 80)
    assert resize_for_object("tank_screw", (40, 40), (80, 60)) == (80, 60)
    assert resize_for_object("pipe_clip", (40, 40), (80, 60)) == (40, 40)
    with pytest.raises(ConfigError, match="underbody_screw"):
        AutoVIDataset(autovi_root, ["pipe_staple", "underbody_screw"], "train", resize={"pipe_staple": (40, 40)})
    for bad in [(0, 10), (10,), "big", (10.5, 10), {"pipe_staple": (4, -1), "underbody_screw": (4, 4)}]:
        with pytest.raises(ConfigError):
            AutoVIDataset(autovi_root, ["pipe_staple", "underbody_screw"], "train", resize=bad)  # type: ignore[arg-type]


def test_batches_through_a_dataloader(autovi_root: Path) -> None:
    data = AutoVIDataset(autovi_root, "pipe_clip", "train", resize=(32, 32))
    batch = next(iter(DataLoader(data, batch_size=2)))
    assert batch[0].shape == (2, 3, 32, 32) and batch.label.tolist() == [0, 0]


def test_construction_is_lazy(autovi_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: object) -> None:
        raise AssertionError("decoded an image at construction")

    monkeypatch.setattr("fedpatch.data.io.load_image", refuse)
    data = AutoVIDataset(autovi_root, "all", "test")
    with pytest.raises(AssertionError):
        data[0]


def test_regions_match_mask_files_and_config(autovi_root: Path) -> None:
    data = AutoVIDataset(autovi_root, "all", "test")
    n_regions = 0
    for index, record in enumerate(data.samples):
        regions = data.regions(index)
        if record.label == 0:
            assert regions == []
            continue
        gt_dir = autovi_root / record.object_name / "ground_truth" / record.defect_type / record.stem
        files = sorted(gt_dir.glob("*.png"))
        assert len(regions) == len(files) >= 1
        config = {e["pixel_value"]: e for e in json.loads((autovi_root / record.object_name / "defects_config.json").read_text())}
        for region, path in zip(regions, files):
            raw = np.asarray(Image.open(path))
            assert region.mask.dtype == bool and region.mask.shape == data.native_size(index)
            assert np.array_equal(region.mask, raw > 0)
            entry = config[int(raw.max())]
            assert (region.spec.defect_name, region.spec.pixel_value) == (entry["defect_name"], entry["pixel_value"])
            assert region.spec.relative_saturation is entry["relative_saturation"]
            area = int((raw > 0).sum())
            expected = int(entry["saturation_threshold"] * area) if entry["relative_saturation"] else min(entry["saturation_threshold"], area)
            assert region.area == area and region.saturation_area == expected
            n_regions += 1
    assert n_regions >= sum(N_DEFECTIVE * len(TEST_FOLDERS[o]) for o in AUTOVI_OBJECTS)


def test_saturation_areas_of_known_regions(autovi_root: Path) -> None:
    data = AutoVIDataset(autovi_root, "engine_wiring", "test")
    specs = data.defect_specs("engine_wiring")
    assert sorted(specs) == [252, 253, 254, 255]
    # obstruction: absolute 2000 native pixels at scale 0.16 -> round(2000 * 0.0256) = 51
    assert specs[252].saturation_threshold == 51 and not specs[252].relative_saturation
    assert specs[252].saturation_area(30) == 30 and specs[252].saturation_area(500) == 51
    assert specs[253].saturation_area(101) == 50  # cardboard: relative 0.5, truncated


def test_list_objects_and_layout_detection(autovi_root: Path, tmp_path: Path) -> None:
    assert list_objects(autovi_root) == list(AUTOVI_OBJECTS)
    data = open_dataset(autovi_root, "all", "test")
    assert isinstance(data, AutoVIDataset) and data.objects == list(AUTOVI_OBJECTS)
    subset = tmp_path / "subset"
    shutil.copytree(autovi_root / "pipe_clip", subset / "pipe_clip")
    opened = open_dataset(subset, "all", "train", resize=(32, 32))
    assert isinstance(opened, AutoVIDataset) and opened.objects == ["pipe_clip"] and len(opened) == N_TRAIN
    mvtec = _write_mvtec(tmp_path / "mvtec")
    assert isinstance(open_dataset(mvtec, "all", "test"), MVTecDataset)
    with pytest.raises(DataError, match="pass its parent"):
        open_dataset(subset / "pipe_clip")
    shutil.copytree(mvtec / "widget", subset / "widget")
    with pytest.raises(DataError, match="mixes layouts"):
        open_dataset(subset)
    with pytest.raises(DataError, match="no object folders"):
        (tmp_path / "empty").mkdir()
        open_dataset(tmp_path / "empty")


def _write_mvtec(root: Path) -> Path:
    """A tiny MVTec-layout object 'widget': 3 train, 1 good test, 2 'crack' with masks."""
    rng = np.random.default_rng(0)
    for split, folder, n in (("train", "good", 3), ("test", "good", 1), ("test", "crack", 2)):
        (root / "widget" / split / folder).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(root / "widget" / split / folder / f"{i:03d}.png")
    (root / "widget/ground_truth/crack").mkdir(parents=True)
    binary = np.zeros((24, 32), np.uint8)
    binary[2:6, 3:9] = 255
    soft = np.zeros((24, 32), np.uint8)
    soft[10:14, 10:20] = 255
    soft[9, 10:20] = 100  # anti-aliased edge: below the threshold
    soft[14, 10:20] = 200  # anti-aliased edge: above it
    Image.fromarray(binary).save(root / "widget/ground_truth/crack/000_mask.png")
    Image.fromarray(soft).save(root / "widget/ground_truth/crack/001_mask.png")
    return root


def test_mvtec_layout(tmp_path: Path) -> None:
    root = _write_mvtec(tmp_path)
    train = MVTecDataset(root, "all", "train")
    test = MVTecDataset(root, "widget", "test")
    assert train.objects == ["widget"] and len(train) == 3 and len(test) == 3
    assert [(r.defect_type, r.label) for r in test.samples] == [("good", 0), ("crack", 1), ("crack", 1)]
    assert test[1].image.shape == (3, 24, 32) and test[1].native_size == (24, 32)  # "native": file size
    assert MVTecDataset(root, "widget", "test", resize=(16, 8))[0].image.shape == (3, 8, 16)
    assert test.regions(0) == []
    (region,) = test.regions(1)
    assert region.spec == MVTEC_SPEC and region.area == 24 and region.saturation_area == 24
    (soft,) = test.regions(2)
    assert soft.area == 50 and soft.mask[14, 10] and not soft.mask[9, 10]
    assert test.defect_specs("widget") == {255: MVTEC_SPEC}


def test_magnetic_tile_in_mvtec_layout(tmp_path: Path) -> None:
    """Real grey JPEG images with anti-aliased PNG masks, arranged in the MVTec layout."""
    free = sorted((MAGNETIC_TILES / "MT_Free" / "Imgs").glob("*.jpg"))[:5]
    for i, path in enumerate(free):
        split = "train" if i < 3 else "test"
        (tmp_path / "tile" / split / "good").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, tmp_path / "tile" / split / "good" / path.name)
    for defect in ("Crack", "Blowhole"):
        images = sorted((MAGNETIC_TILES / f"MT_{defect}" / "Imgs").glob("*.jpg"))[:2]
        (tmp_path / "tile/test" / defect.lower()).mkdir(parents=True)
        (tmp_path / "tile/ground_truth" / defect.lower()).mkdir(parents=True)
        for path in images:
            shutil.copy(path, tmp_path / "tile/test" / defect.lower() / path.name)
            shutil.copy(path.with_suffix(".png"), tmp_path / "tile/ground_truth" / defect.lower() / f"{path.stem}_mask.png")
    data = open_dataset(tmp_path, "all", "test", resize=(64, 64))
    assert isinstance(data, MVTecDataset) and len(data) == 2 + 4
    assert [r.defect_type for r in data.samples] == ["good"] * 2 + ["blowhole"] * 2 + ["crack"] * 2
    sample = data[0]
    assert sample.image.shape == (3, 64, 64)
    assert torch.equal(sample.image[0], sample.image[1]) and torch.equal(sample.image[1], sample.image[2])  # grey
    soft_edges = 0
    for index in range(2, 6):
        (region,) = data.regions(index)
        raw = load_mask(data.samples[index].path.replace("/test/", "/ground_truth/").replace(".jpg", "_mask.png"))
        assert region.mask.shape == raw.shape == data.native_size(index)
        assert np.array_equal(region.mask, raw > 127) and region.area > 0
        soft_edges += int(((raw > 0) & (raw < 255)).sum())
    assert soft_edges > 0  # the threshold mattered: these masks are anti-aliased


def test_real_autovi_examples_load(tmp_path: Path) -> None:
    for folder in ("good", "obstruction"):
        image = load_image(AUTOVI_EXAMPLES / folder / "0000.png")
        assert image.shape == (400, 400, 3) and image.dtype == np.uint8 and image.std() > 10
    # the two real images, arranged as an AutoVI object with a handmade config and mask
    obj = tmp_path / "engine_wiring"
    for split, folder in (("train", "good"), ("test", "good"), ("test", "obstruction")):
        (obj / split / folder).mkdir(parents=True)
        shutil.copy(AUTOVI_EXAMPLES / ("obstruction" if folder == "obstruction" else "good") / "0000.png", obj / split / folder / "0000.png")
    (obj / "defects_config.json").write_text(json.dumps([{"defect_name": "obstruction", "pixel_value": 255, "saturation_threshold": 1.0, "relative_saturation": True}]))
    (obj / "ground_truth/obstruction/0000").mkdir(parents=True)
    mask = np.zeros((400, 400, 3), np.uint8)
    mask[120:230, 90:160] = 255  # three channels: channel 0 is read
    Image.fromarray(mask).save(obj / "ground_truth/obstruction/0000/000.png")
    data = AutoVIDataset(tmp_path, "engine_wiring", "test")
    assert [s.native_size for s in data] == [(400, 400), (400, 400)]
    assert data[1].image.shape == (3, 400, 400) and data[1].label == 1
    (region,) = data.regions(1)
    assert region.area == 110 * 70 and region.spec.defect_name == "obstruction"

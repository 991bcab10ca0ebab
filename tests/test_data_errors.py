"""Bad data raises DataError naming the file, field or value at fault; image/mask conversions."""

from __future__ import annotations

import json
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedpatch.data import AutoVIDataset, MVTecDataset, load_image, load_mask, read_defects_config
from fedpatch.data.synthetic import generate_autovi_dataset
from fedpatch.errors import ConfigError, DataError

OBJ = "pipe_staple"  # folders: missing, multiple


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    return generate_autovi_dataset(root, OBJ, n_train=2, n_test_good=1, n_test_defective=1, scale=0.1)


@pytest.fixture
def root(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy of a tiny pipe_staple tree (40x40 images) for each test to break."""
    shutil.copytree(pristine, tmp_path / "data")
    return tmp_path / "data"


def raises(match: object, func: object, *args: object) -> DataError:
    """Call ``func(*args)``, expecting a DataError whose message contains ``str(match)``."""
    with pytest.raises(DataError, match=re.escape(str(match))) as info:
        func(*args)  # type: ignore[operator]
    return info.value


# ---------------------------------------------------------------- folders and config


def test_missing_root_and_object_folder(root: Path) -> None:
    raises(root / "nowhere", AutoVIDataset, root / "nowhere", OBJ)
    raises(root / "tank_screw", AutoVIDataset, root, [OBJ, "tank_screw"], "test")
    raises(root / "engine_wiring", AutoVIDataset, root, "all")  # "all" = the six objects


def test_empty_or_missing_train_split(root: Path) -> None:
    for image in (root / OBJ / "train/good").iterdir():
        image.unlink()
    error = raises(root / OBJ / "train/good", AutoVIDataset, root, OBJ, "train")
    assert "empty train split" in str(error)
    shutil.rmtree(root / OBJ / "train")
    raises(root / OBJ / "train/good", AutoVIDataset, root, OBJ, "train")


def test_train_split_with_defect_folder(root: Path) -> None:
    (root / OBJ / "train/missing").mkdir()
    raises("missing", AutoVIDataset, root, OBJ, "train")


def test_missing_ground_truth_folder(root: Path) -> None:
    shutil.rmtree(root / OBJ / "ground_truth/missing/0000")
    raises(root / OBJ / "ground_truth/missing/0000", AutoVIDataset, root, OBJ, "test")


def test_bad_split_and_objects(root: Path) -> None:
    with pytest.raises(ConfigError, match="validation"):
        AutoVIDataset(root, OBJ, "validation")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=OBJ):
        AutoVIDataset(root, [OBJ, OBJ])


def write_config(root: Path, content: str) -> Path:
    path = root / OBJ / "defects_config.json"
    path.write_text(content)
    return path


GOOD_ENTRY = {"defect_name": "missing", "pixel_value": 255, "saturation_threshold": 1.0, "relative_saturation": True}


def test_missing_config(root: Path) -> None:
    (root / OBJ / "defects_config.json").unlink()
    raises(root / OBJ / "defects_config.json", AutoVIDataset, root, OBJ)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "not valid JSON"),
        ('{"defect_name": "missing"}', "non-empty JSON list"),
        ("[]", "non-empty JSON list"),
        ('["missing"]', "entry 0: expected a JSON object"),
        (json.dumps([{k: v for k, v in GOOD_ENTRY.items() if k != "pixel_value"}]), "entry 0: missing field 'pixel_value'"),
        (json.dumps([GOOD_ENTRY, {**GOOD_ENTRY, "defect_name": ""}]), "entry 1: field 'defect_name'"),
        (json.dumps([{**GOOD_ENTRY, "pixel_value": "255"}]), "field 'pixel_value' must be an integer in 1..255, got '255'"),
        (json.dumps([{**GOOD_ENTRY, "pixel_value": 0}]), "got 0"),
        (json.dumps([{**GOOD_ENTRY, "pixel_value": True}]), "field 'pixel_value'"),
        (json.dumps([{**GOOD_ENTRY, "relative_saturation": "yes"}]), "field 'relative_saturation' must be true or false"),
        (json.dumps([{**GOOD_ENTRY, "saturation_threshold": 1.5}]), "field 'saturation_threshold' must be a number in (0, 1] (relative), got 1.5"),
        (json.dumps([{**GOOD_ENTRY, "saturation_threshold": -3, "relative_saturation": False}]), "positive number of pixels"),
        (json.dumps([{**GOOD_ENTRY, "saturation_threshold": "1.0"}]), "field 'saturation_threshold'"),
        (json.dumps([GOOD_ENTRY, {**GOOD_ENTRY, "defect_name": "scratch"}]), "pixel_value 255 is used by both 'missing' and 'scratch'"),
    ],
)
def test_invalid_config(root: Path, content: str, expected: str) -> None:
    path = write_config(root, content)
    error = raises(expected, AutoVIDataset, root, OBJ, "test")
    assert str(path) in str(error)


def test_valid_config_with_extra_keys(tmp_path: Path) -> None:
    path = tmp_path / "defects_config.json"
    path.write_text(json.dumps([{**GOOD_ENTRY, "comment": "ignored"}, {**GOOD_ENTRY, "defect_name": "a", "pixel_value": 7, "saturation_threshold": 120, "relative_saturation": False}]))
    specs = read_defects_config(path)
    assert sorted(specs) == [7, 255] and specs[7].saturation_threshold == 120.0 and not specs[7].relative_saturation


# ---------------------------------------------------------------- masks


def first_defective(data: AutoVIDataset) -> tuple[int, Path]:
    index = next(i for i, r in enumerate(data.samples) if r.defect_type == "missing")
    record = data.samples[index]
    return index, data.root / OBJ / "ground_truth" / record.defect_type / record.stem


def rewrite_mask(mask_dir: Path, array: np.ndarray) -> Path:
    path = sorted(mask_dir.glob("*.png"))[0]
    Image.fromarray(array).save(path)
    return path


def test_mask_value_not_in_config(root: Path) -> None:
    data = AutoVIDataset(root, OBJ, "test")
    index, mask_dir = first_defective(data)
    mask = np.zeros((40, 40), np.uint8)
    mask[5:9, 5:9] = 77
    path = rewrite_mask(mask_dir, mask)
    error = raises(path, data.regions, index)
    assert "pixel value 77" in str(error)


def test_mask_with_two_values(root: Path) -> None:
    data = AutoVIDataset(root, OBJ, "test")
    index, mask_dir = first_defective(data)
    mask = np.zeros((40, 40), np.uint8)
    mask[5:9, 5:9], mask[20:22, 20:22] = 255, 254
    error = raises(rewrite_mask(mask_dir, mask), data.regions, index)
    assert "[254, 255]" in str(error)


def test_mask_size_differs(root: Path) -> None:
    data = AutoVIDataset(root, OBJ, "test")
    index, mask_dir = first_defective(data)
    error = raises(rewrite_mask(mask_dir, np.full((30, 40), 255, np.uint8)), data.regions, index)
    assert "40x30" in str(error) and "40x40" in str(error)


def test_empty_mask_and_no_mask_files(root: Path) -> None:
    data = AutoVIDataset(root, OBJ, "test")
    index, mask_dir = first_defective(data)
    raises(rewrite_mask(mask_dir, np.zeros((40, 40), np.uint8)), data.regions, index)
    for path in mask_dir.glob("*.png"):
        path.unlink()
    raises(mask_dir, data.regions, index)


def test_three_channel_mask_uses_channel_zero(root: Path) -> None:
    data = AutoVIDataset(root, OBJ, "test")
    index, mask_dir = first_defective(data)
    mask = np.zeros((40, 40, 3), np.uint8)
    mask[3:7, 3:8, 0] = 255
    mask[:, :, 1] = 9  # other channels ignored
    rewrite_mask(mask_dir, mask)
    assert data.regions(index)[0].area == 20


# ---------------------------------------------------------------- unreadable images


def break_first_train_image(root: Path, content: bytes) -> tuple[AutoVIDataset, Path]:
    data = AutoVIDataset(root, OBJ, "train")
    path = Path(data.samples[0].path)
    path.write_bytes(content)
    return data, path


def test_truncated_image(root: Path) -> None:
    original = (root / OBJ / "train/good/0000.png").read_bytes()
    data, path = break_first_train_image(root, original[: len(original) // 2])
    error = raises(path, data.__getitem__, 0)
    assert "truncated or corrupt" in str(error)


def test_zero_size_and_not_an_image(root: Path) -> None:
    data, path = break_first_train_image(root, b"")
    assert "empty (0 bytes)" in str(raises(path, data.__getitem__, 0))
    path.write_bytes(b"this is a text file, not a PNG")
    assert "not an image" in str(raises(path, data.__getitem__, 0))
    raises(path, load_mask, path)
    raises(root / "absent.png", load_image, root / "absent.png")


def test_decompression_bomb_is_refused(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the 40x40 files are now "too large"
    data = AutoVIDataset(root, OBJ, "train")
    error = raises(data.samples[0].path, data.__getitem__, 0)
    assert "decompression bomb" in str(error)


# ---------------------------------------------------------------- MVTec layout


def test_mvtec_missing_mask_and_size(tmp_path: Path) -> None:
    for split, folder in (("train", "good"), ("test", "crack")):
        (tmp_path / "w" / split / folder).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "w" / split / folder / "000.png")
    raises(tmp_path / "w/ground_truth/crack/000_mask.png", MVTecDataset, tmp_path, "w", "test")
    (tmp_path / "w/ground_truth/crack").mkdir(parents=True)
    mask_path = tmp_path / "w/ground_truth/crack/000_mask.png"
    Image.fromarray(np.full((8, 9), 255, np.uint8)).save(mask_path)
    data = MVTecDataset(tmp_path, "w", "test")
    raises(mask_path, data.regions, 0)
    Image.fromarray(np.full((8, 8), 100, np.uint8)).save(mask_path)  # nothing above 127
    assert "no pixel above 127" in str(raises(mask_path, data.regions, 0))
    shutil.rmtree(tmp_path / "w/train")
    raises(tmp_path / "w/train/good", MVTecDataset, tmp_path, "w", "train")
    raises("no object folders", MVTecDataset, tmp_path, "all", "train")


# ---------------------------------------------------------------- conversions


def save(tmp_path: Path, image: Image.Image, name: str) -> Path:
    path = tmp_path / name
    image.save(path)
    return path


def test_grey_rgba_la_palette_and_bilevel_become_rgb(tmp_path: Path) -> None:
    grey = load_image(save(tmp_path, Image.fromarray(np.array([[0, 100, 255]], np.uint8)), "l.png"))
    assert grey.shape == (1, 3, 3) and grey[0, 1].tolist() == [100, 100, 100]
    rgba = np.array([[[10, 20, 30, 0], [40, 50, 60, 255]]], np.uint8)
    assert load_image(save(tmp_path, Image.fromarray(rgba), "rgba.png")).tolist() == [[[10, 20, 30], [40, 50, 60]]]  # alpha dropped
    la = Image.fromarray(np.array([[[70, 0]]], np.uint8), mode="LA")
    assert load_image(save(tmp_path, la, "la.png")).tolist() == [[[70, 70, 70]]]
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 200, 10, 20])
    palette.putpixel((1, 0), 1)
    assert load_image(save(tmp_path, palette, "p.png")).tolist() == [[[0, 0, 0], [200, 10, 20]]]
    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((1, 0), 1)
    assert load_image(save(tmp_path, bilevel, "1.png")).tolist() == [[[0, 0, 0], [255, 255, 255]]]
    with pytest.raises(DataError, match="floating-point"):
        load_image(save(tmp_path, Image.fromarray(np.ones((2, 2), np.float32)), "f.tif"))


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32768, 65535]], np.uint16)
    path = save(tmp_path, Image.fromarray(values), "g16.png")
    assert Image.open(path).mode == "I;16"
    assert load_image(path)[0, :, 0].tolist() == [0, 1, 128, 255]


def png_rgb16(path: Path, pixels: list[tuple[int, int, int]]) -> Path:
    """Write a one-row 16-bit-per-channel RGB PNG (Pillow cannot write one)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", len(pixels), 1, 16, 2, 0, 0, 0)
    row = b"\x00" + b"".join(struct.pack(">3H", *p) for p in pixels)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(row)) + chunk(b"IEND", b""))
    return path


def test_sixteen_bit_rgb(tmp_path: Path) -> None:
    path = png_rgb16(tmp_path / "rgb16.png", [(65535, 0, 32768), (256, 512, 1024)])
    assert load_image(path).tolist() == [[[255, 0, 128], [1, 2, 4]]]


def test_load_mask_channels_and_depth(tmp_path: Path) -> None:
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = (254, 1, 2)
    assert load_mask(save(tmp_path, Image.fromarray(rgb), "m.png")).tolist() == [[254, 0], [0, 0]]
    small16 = np.array([[0, 255]], np.uint16)
    assert load_mask(save(tmp_path, Image.fromarray(small16), "m16.png")).tolist() == [[0, 255]]
    big16 = np.array([[0, 256]], np.uint16)
    path = save(tmp_path, Image.fromarray(big16), "big16.png")
    with pytest.raises(DataError, match=re.escape(str(path))):
        load_mask(path)

"""The synthetic AutoVI-format generator: exact tree, determinism, masks, the default cache."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedpatch.data import synthetic
from fedpatch.data.objects import AUTOVI_OBJECTS
from fedpatch.data.synthetic import (
    COMPLETE_MARKER,
    DEFECT_KINDS,
    TEST_FOLDERS,
    default_dataset_path,
    ensure_default_dataset,
    generate_autovi_dataset,
    generate_image,
    image_rng,
)
from fedpatch.errors import DataError

TINY = 0.08  # 32x32 and 80x60 images


def tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root``."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def tiny_two(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny_two")
    generate_autovi_dataset(root, ["engine_wiring", "underbody_pipes"], n_train=2, n_test_good=1, n_test_defective=2, scale=TINY, seed=7)
    return root


def test_test_folders_are_the_real_ones_plus_multiple() -> None:
    assert TEST_FOLDERS == {
        "engine_wiring": ("blue_hoop", "cardboard", "fastening", "multiple", "obstruction"),
        "pipe_clip": ("multiple", "operator", "unclipped"),
        "pipe_staple": ("missing", "multiple"),
        "tank_screw": ("missing", "multiple"),
        "underbody_pipes": ("multiple", "obstruction", "operator"),
        "underbody_screw": ("missing", "multiple"),
    }


def test_exact_tree(tiny_two: Path) -> None:
    files = set(tree(tiny_two))
    expected_images = set()
    for obj in ("engine_wiring", "underbody_pipes"):
        expected_images |= {f"{obj}/train/good/000{i}.png" for i in range(2)}
        expected_images |= {f"{obj}/test/good/0000.png"}
        expected_images |= {f"{obj}/test/{d}/000{i}.png" for d in TEST_FOLDERS[obj] for i in range(2)}
        expected_images |= {f"{obj}/defects_config.json", f"{obj}/readme.md"}
    masks = {f for f in files if "/ground_truth/" in f}
    assert files - masks == expected_images
    # every defective image has a folder of masks named 000.png, 001.png, ... without gaps
    for obj in ("engine_wiring", "underbody_pipes"):
        for defect in TEST_FOLDERS[obj]:
            for stem in ("0000", "0001"):
                names = sorted(Path(f).name for f in masks if f.startswith(f"{obj}/ground_truth/{defect}/{stem}/"))
                assert names == [f"{k:03d}.png" for k in range(len(names))] and names, (obj, defect, stem)
    assert {f.split("/")[2] for f in masks} == set(TEST_FOLDERS["engine_wiring"]) | set(TEST_FOLDERS["underbody_pipes"])


def test_image_and_mask_files(tiny_two: Path) -> None:
    for obj, size in (("engine_wiring", (32, 32)), ("underbody_pipes", (80, 60))):
        config = json.loads((tiny_two / obj / "defects_config.json").read_text())
        values = {entry["pixel_value"]: entry["defect_name"] for entry in config}
        with Image.open(tiny_two / obj / "train/good/0000.png") as image:
            assert (image.mode, image.size) == ("RGB", size)
        for mask_path in (tiny_two / obj / "ground_truth").rglob("*.png"):
            with Image.open(mask_path) as mask_image:
                assert (mask_image.mode, mask_image.size) == ("L", size)
                mask = np.asarray(mask_image)
            nonzero = set(np.unique(mask).tolist()) - {0}
            assert len(nonzero) == 1 and nonzero <= set(values), mask_path


def test_multiple_folder_holds_several_kinds(tmp_path: Path) -> None:
    generate_autovi_dataset(tmp_path, "engine_wiring", n_train=1, n_test_good=0, n_test_defective=4, scale=TINY)
    for stem_dir in (tmp_path / "engine_wiring/ground_truth/multiple").iterdir():
        values = [int(np.asarray(Image.open(p)).max()) for p in sorted(stem_dir.glob("*.png"))]
        assert len(values) >= 2 and len(set(values)) == len(values), stem_dir


def test_config_mixes_relative_and_absolute_scaled_thresholds(tmp_path: Path) -> None:
    generate_autovi_dataset(tmp_path, "engine_wiring", n_train=1, n_test_good=0, n_test_defective=0, scale=0.5)
    config = json.loads((tmp_path / "engine_wiring/defects_config.json").read_text())
    assert config == [
        {"defect_name": "fastening", "pixel_value": 255, "saturation_threshold": 1.0, "relative_saturation": True},
        {"defect_name": "blue_hoop", "pixel_value": 254, "saturation_threshold": 1.0, "relative_saturation": True},
        {"defect_name": "cardboard", "pixel_value": 253, "saturation_threshold": 0.5, "relative_saturation": True},
        # 2000 pixels at native size -> 2000 * 0.5**2
        {"defect_name": "obstruction", "pixel_value": 252, "saturation_threshold": 500, "relative_saturation": False},
    ]


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    kwargs = dict(objects=["pipe_staple", "tank_screw"], n_train=2, n_test_good=1, n_test_defective=1, scale=TINY)
    a = tree(generate_autovi_dataset(tmp_path / "a", seed=3, **kwargs))
    b = tree(generate_autovi_dataset(tmp_path / "b", seed=3, **kwargs))
    c = tree(generate_autovi_dataset(tmp_path / "c", seed=4, **kwargs))
    assert a == b
    images = [k for k in a if k.endswith(".png") and "/ground_truth/" not in k]
    assert all(a[k] != c[k] for k in images)


def test_objects_and_counts_do_not_change_other_files(tmp_path: Path) -> None:
    alone = tree(generate_autovi_dataset(tmp_path / "alone", "pipe_staple", n_train=1, n_test_good=1, n_test_defective=1, scale=TINY))
    both = tree(generate_autovi_dataset(tmp_path / "both", ["pipe_clip", "pipe_staple"], n_train=3, n_test_good=2, n_test_defective=2, scale=TINY))
    shared = {k: v for k, v in alone.items() if k != "pipe_staple/readme.md"}  # the readme states the counts
    assert shared.items() <= both.items()


def test_good_images_vary(tmp_path: Path) -> None:
    for obj in AUTOVI_OBJECTS:
        a, _ = generate_image(obj, [], image_rng(0, obj, "train", "good", 0), 0.25)
        b, _ = generate_image(obj, [], image_rng(0, obj, "train", "good", 1), 0.25)
        diff = np.abs(a.astype(int) - b.astype(int)).mean()
        assert 3 < diff < 80, (obj, diff)  # not identical, yet the same kind of scene


@pytest.mark.parametrize("obj", AUTOVI_OBJECTS)
def test_defects_change_pixels_inside_their_masks(obj: str) -> None:
    """Same stream with and without a defect: the pixels change where the mask says."""
    for kind in DEFECT_KINDS[obj]:
        for index in range(3):
            good, none = generate_image(obj, [], image_rng(1, obj, "test", kind.name, index), 0.25)
            bad, masks = generate_image(obj, [kind.name], image_rng(1, obj, "test", kind.name, index), 0.25)
            assert none == [] and len(masks) == 1 and masks[0][0] == kind
            mask = masks[0][1]
            changed = np.abs(good.astype(int) - bad.astype(int)).sum(axis=2) > 24
            assert changed[mask].mean() > 0.3, (obj, kind.name, index, changed[mask].mean())
            near = _dilate(mask, 8)  # soft shadows of added or removed parts fall just outside
            assert changed[~near].mean() < 0.005, (obj, kind.name, index)
            assert changed[near].sum() >= 0.95 * changed.sum(), (obj, kind.name, index)


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


@pytest.mark.parametrize("obj", AUTOVI_OBJECTS)
def test_every_folder_yields_visible_masks_at_tiny_scale(obj: str) -> None:
    for folder in TEST_FOLDERS[obj]:
        for index in range(8):
            rng = image_rng(2, obj, "test", folder, index)
            kinds = synthetic._folder_kinds(obj, folder, rng)
            image, masks = generate_image(obj, kinds, rng, TINY)
            assert image.shape[:2] == masks[0][1].shape
            assert masks and all(mask.any() for _, mask in masks)
            if folder in ("multiple", "operator"):
                assert len({kind.name for kind, _ in masks}) == len(masks) >= 1


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "pipe_clip").mkdir()
    (tmp_path / "pipe_clip" / "old.txt").write_text("x")
    with pytest.raises(DataError, match=str(tmp_path / "pipe_clip")):
        generate_autovi_dataset(tmp_path, "pipe_clip", n_train=1, n_test_good=0, n_test_defective=0, scale=TINY)


def test_unknown_object_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nut_bolt"):
        generate_autovi_dataset(tmp_path, "nut_bolt", scale=TINY)


def test_default_path_follows_env_and_argument(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDPATCH_CACHE", str(tmp_path / "env"))
    assert default_dataset_path() == tmp_path / "env" / f"synthetic-autovi-v{synthetic.GENERATOR_VERSION}"
    assert default_dataset_path(tmp_path / "arg").parent == tmp_path / "arg"
    monkeypatch.delenv("FEDPATCH_CACHE")
    assert default_dataset_path().parent == Path.home() / ".cache" / "fedpatch"


def test_ensure_default_dataset_generates_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[Path] = []
    real = synthetic.generate_autovi_dataset

    def tiny(root: Path) -> Path:
        calls.append(root)
        return real(root, "pipe_clip", n_train=1, n_test_good=1, n_test_defective=1, scale=TINY)

    monkeypatch.setattr(synthetic, "generate_autovi_dataset", tiny)
    target = default_dataset_path(tmp_path)
    target.mkdir(parents=True)
    (target / "half-written.png").write_bytes(b"")  # an interrupted run: no marker, never reused
    path = ensure_default_dataset(tmp_path)
    assert path == target and (path / COMPLETE_MARKER).is_file()
    assert (path / "pipe_clip/train/good/0000.png").is_file() and not (path / "half-written.png").exists()
    assert str(target) in capsys.readouterr().err
    assert ensure_default_dataset(tmp_path) == target
    assert len(calls) == 1 and capsys.readouterr().err == ""
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_failed_generation_leaves_no_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(root: Path) -> Path:
        (root / "engine_wiring").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "generate_autovi_dataset", broken)
    with pytest.raises(KeyboardInterrupt):
        ensure_default_dataset(tmp_path)
    assert not default_dataset_path(tmp_path).exists()
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


# The default data set is cached under a folder named after GENERATOR_VERSION, so a change of
# the generated pixels without a version bump would let machines reuse a stale cache silently.
# This fingerprint of a tiny all-object set ties the pixels to the version: when it fails,
# bump GENERATOR_VERSION and record the new fingerprint here.
GENERATOR_FINGERPRINTS = {1: "c8157c16d06f5db7ea2079b1f6d441a6765f6760492bafd61e9156cb3b7c649d"}


def _content_fingerprint(root: Path) -> str:
    """sha256 over every file's relative path and content (PNGs as decoded pixels, so that a
    different zlib or Pillow encoder cannot change it)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        if path.suffix == ".png":
            with Image.open(path) as image:
                pixels = np.asarray(image)
            digest.update(str(pixels.shape).encode() + pixels.tobytes())
        else:
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_generated_pixels_match_the_generator_version(tmp_path: Path) -> None:
    generate_autovi_dataset(tmp_path, objects="all", n_train=1, n_test_good=1, n_test_defective=1, scale=0.1, seed=0)
    assert _content_fingerprint(tmp_path) == GENERATOR_FINGERPRINTS[synthetic.GENERATOR_VERSION]

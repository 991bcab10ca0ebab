"""The benchmark data: file lists and loaders, identical for both implementations.

Two sources:
- ``magnetic``: the real magnetic-tile sample (``../shared/data/magnetic_tile_defects``), with
  the protocol of ``tests/test_core_realdata.py``: train on the first MT_Free images by sorted
  name, test on the last 30 MT_Free images and the 75 defective ones.
- ``synthetic``: fedpatch's AutoVI-format generator (``fedpatch.data.synthetic``), generated
  once into a cache folder: ``pipe_clip`` (native 400x400) for the square resolutions and
  ``tank_screw`` (native 1000x750) for 1000x750.

Images are resized with PIL bilinear to the benchmark resolution and handed over as uint8
``[3, H, W]`` tensors; masks are thresholded and resized by nearest neighbour. Training images
are loaded lazily (an iterable), so holding the training set never counts against a fit's
peak memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
MAGNETIC = REPO.parent / "shared" / "data" / "magnetic_tile_defects"
MAGNETIC_DEFECTS = ("MT_Blowhole", "MT_Break", "MT_Crack", "MT_Fray", "MT_Uneven")
SYNTHETIC_TEST_GOOD = 6
SYNTHETIC_TEST_DEFECTIVE = 3  # per defect folder


def cache_dir() -> Path:
    """Where generated data sets live (``$FEDPATCH_BENCH_DATA``, default /tmp/fedpatch-bench-data)."""
    return Path(os.environ.get("FEDPATCH_BENCH_DATA", "/tmp/fedpatch-bench-data"))


def synthetic_object(size: tuple[int, int]) -> str:
    """The generated object used at ``size`` (W, H): a 1000x750 object for 1000x750, else 400x400."""
    return "tank_screw" if size == (1000, 750) else "pipe_clip"


@dataclass(frozen=True)
class Item:
    """One test image: its file, label and mask files (union = the positive pixels)."""

    image: Path
    label: int
    masks: tuple[Path, ...]


@dataclass(frozen=True)
class BenchData:
    """Training files and test items of one data set at one resolution (W, H)."""

    name: str
    size: tuple[int, int]
    train: tuple[Path, ...]
    test: tuple[Item, ...]

    def train_images(self) -> Iterator[torch.Tensor]:
        """The training images, loaded one at a time."""
        for path in self.train:
            yield load_image(path, self.size)

    def test_images(self) -> list[torch.Tensor]:
        """Every test image (loaded up front so that prediction timing excludes decoding)."""
        return [load_image(item.image, self.size) for item in self.test]

    def test_mask(self, index: int) -> np.ndarray:
        """Bool ``[H, W]`` mask of test image ``index`` at the benchmark size."""
        width, height = self.size
        mask = np.zeros((height, width), dtype=bool)
        for path in self.test[index].masks:
            with Image.open(path) as image:
                binary = Image.fromarray((np.array(image.convert("L")) > 127 if "magnetic" in self.name else np.array(image.convert("L")) > 0).astype(np.uint8) * 255)
            mask |= np.array(binary.resize(self.size, Image.NEAREST)) > 127
        return mask


def load_image(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """An image file as uint8 RGB ``[3, H, W]`` at ``size`` (W, H), PIL bilinear."""
    with Image.open(path) as image:
        rgb = image.convert("RGB").resize(size, Image.BILINEAR)
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous()


def magnetic(size: tuple[int, int], n_train: int) -> BenchData:
    """The magnetic-tile protocol at ``size`` with the first ``n_train`` (<= 70) MT_Free images."""
    if not MAGNETIC.is_dir():
        raise FileNotFoundError(f"magnetic-tile sample not found at {MAGNETIC}")
    if not 1 <= n_train <= 70:
        raise ValueError(f"the magnetic-tile protocol trains on at most 70 images, got {n_train}")
    free = sorted((MAGNETIC / "MT_Free" / "Imgs").glob("*.jpg"))
    defective = [p for cls in MAGNETIC_DEFECTS for p in sorted((MAGNETIC / cls / "Imgs").glob("*.jpg"))]
    test = [Item(p, 0, ()) for p in free[70:]] + [Item(p, 1, (p.with_suffix(".png"),)) for p in defective]
    return BenchData("magnetic", size, tuple(free[:n_train]), tuple(test))


def synthetic(size: tuple[int, int], n_train: int, generate_train: int | None = None) -> BenchData:
    """Generated AutoVI-format data at ``size``; the set is generated once with ``generate_train``
    training images (default ``$FEDPATCH_BENCH_GENERATE`` or 300: fewer saves time on a machine
    that runs only small configurations) and the first ``n_train`` are used."""
    from fedpatch.data.synthetic import generate_autovi_dataset

    if generate_train is None:
        generate_train = int(os.environ.get("FEDPATCH_BENCH_GENERATE", "300"))
    obj = synthetic_object(size)
    root = cache_dir() / f"synthetic-{generate_train}"
    folder = root / obj
    if not (folder / "defects_config.json").is_file():
        generate_autovi_dataset(
            root, objects=[obj], n_train=generate_train, n_test_good=SYNTHETIC_TEST_GOOD,
            n_test_defective=SYNTHETIC_TEST_DEFECTIVE, seed=0,
        )
    train = sorted((folder / "train" / "good").glob("*.png"))
    if n_train > len(train):
        raise ValueError(f"{folder} holds {len(train)} training images, {n_train} requested")
    test: list[Item] = []
    for defect in sorted(p for p in (folder / "test").iterdir() if p.is_dir()):
        label = 0 if defect.name == "good" else 1
        for image in sorted(defect.glob("*.png")):
            masks = tuple(sorted((folder / "ground_truth" / defect.name / image.stem).glob("*.png"))) if label else ()
            test.append(Item(image, label, masks))
    test.sort(key=lambda item: item.label)  # good first, as in the magnetic protocol
    return BenchData(f"synthetic/{obj}", size, tuple(train[:n_train]), tuple(test))


def load(name: str, size: tuple[int, int], n_train: int) -> BenchData:
    """``magnetic`` or ``synthetic`` data at ``size`` with ``n_train`` training images."""
    if name == "magnetic":
        return magnetic(size, n_train)
    if name == "synthetic":
        return synthetic(size, n_train)
    raise ValueError(f"unknown benchmark data set {name!r} (magnetic or synthetic)")

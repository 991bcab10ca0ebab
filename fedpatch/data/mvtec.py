"""The generic MVTec AD layout (also used for VisA and other data converted to it).

```
<root>/<object>/train/good/*.png|jpg
<root>/<object>/test/good/*, test/<defect>/*
<root>/<object>/ground_truth/<defect>/<stem>_mask.png   one mask per defective image
```
Each defective image has one region: its whole mask. Masks are binarised as
``value > 127``: MVTec AD's masks are 0/255, so this changes nothing there, and masks drawn
with anti-aliased edges (values 1..254 along the border, as in the Magnetic Tile data) keep
the pixels that are at least half covered instead of growing a one-pixel halo of
"defect" around every region. Regions carry :data:`MVTEC_SPEC`: relative saturation 1.0,
i.e. sPRO on such data is plain per-region overlap.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedpatch.data.autovi import check_split
from fedpatch.data.objects import object_list
from fedpatch.data.io import (
    FolderDataset,
    ResizeSpec,
    SampleRecord,
    Split,
    image_size,
    list_image_files,
    load_mask,
    resolve_resize,
    subfolders,
    ordered_test_folders,
)
from fedpatch.data.regions import DefectRegion, DefectSpec
from fedpatch.errors import DataError

MASK_THRESHOLD = 127
"""A mask pixel is defective when its value is above this."""

MVTEC_SPEC = DefectSpec("defect", pixel_value=255, saturation_threshold=1.0, relative_saturation=True)
"""The one defect kind of MVTec-style data: full-region saturation (plain per-region overlap)."""


def mvtec_objects(root: Path) -> list[str]:
    """Subfolders of ``root`` that have a ``train/good`` folder, sorted."""
    return [folder.name for folder in subfolders(root) if (folder / "train" / "good").is_dir()]


def mask_path(root: Path, record: SampleRecord) -> Path:
    """Where the mask of a defective image lives: ``ground_truth/<defect>/<stem>_mask.png``."""
    return root / record.object_name / "ground_truth" / record.defect_type / f"{record.stem}_mask.png"


def _list_split(root: Path, name: str, split: Split) -> list[SampleRecord]:
    """Records of one object's split; DataError for a missing/empty split or a missing mask."""
    folder = root / name
    if not folder.is_dir():
        raise DataError(f"object folder not found: {folder}")
    split_dir = folder / split
    if split == "train":
        good = split_dir / "good"
        files = list_image_files(good) if good.is_dir() else []
        if not files:
            raise DataError(f"empty train split of {name!r}: no images in {good}")
        return [SampleRecord(str(path), 0, name, "good", path.stem) for path in files]
    if not split_dir.is_dir():
        raise DataError(f"test folder of {name!r} not found: {split_dir}")
    records = []
    for defect_folder in ordered_test_folders(split_dir):
        label = 0 if defect_folder.name == "good" else 1
        for path in list_image_files(defect_folder):
            record = SampleRecord(str(path), label, name, defect_folder.name, path.stem)
            if label and not mask_path(root, record).is_file():
                raise DataError(f"mask {mask_path(root, record)} of defective image {path} not found")
            records.append(record)
    if not records:
        raise DataError(f"test split of {name!r} has no images under {split_dir}")
    return records


class MVTecDataset(FolderDataset):
    """MVTec-AD-style images of one split, as :class:`~fedpatch.data.io.Sample`.

    Args:
        root: the folder holding one folder per object.
        objects: "all" (every subfolder with a ``train/good`` folder), one name or a list.
        split: "train" or "test".
        resize: "native" keeps each file's own size (batching then needs equal sizes);
            one (W, H) for all objects; or ``{object: (W, H)}``.
    """

    def __init__(
        self,
        root: str | Path,
        objects: str | Sequence[str] = "all",
        split: Split = "train",
        resize: ResizeSpec = "native",
    ) -> None:
        self.root = Path(root)
        self.split = check_split(split)
        if not self.root.is_dir():
            raise DataError(f"dataset root not found: {self.root}")
        discovered = mvtec_objects(self.root)
        if objects == "all" and not discovered:
            raise DataError(f"no object folders with a train/good folder in {self.root}")
        self.objects = object_list(objects, discovered)
        self.target_sizes = resolve_resize(resize, self.objects, lambda name: None)
        self.samples: list[SampleRecord] = []
        for name in self.objects:
            self.samples += _list_split(self.root, name, self.split)

    def defect_specs(self, object_name: str) -> dict[int, DefectSpec]:
        """``{255: MVTEC_SPEC}``: every region of every object has that spec."""
        if object_name not in self.objects:
            raise DataError(f"object {object_name!r} is not part of this dataset ({', '.join(self.objects)})")
        return {MVTEC_SPEC.pixel_value: MVTEC_SPEC}

    def regions(self, index: int) -> list[DefectRegion]:
        """[] for a good image, else one region: the mask's pixels above 127, at native size.

        Raises DataError naming the mask if it is unreadable, differs in size from its image
        or has no pixel above the threshold.
        """
        record = self.samples[index]
        if record.label == 0:
            return []
        path = mask_path(self.root, record)
        mask = load_mask(path)
        height, width = image_size(record.path)
        if mask.shape != (height, width):
            raise DataError(
                f"mask {path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image is {width}x{height}"
            )
        region = mask > MASK_THRESHOLD
        if not region.any():
            raise DataError(f"mask {path} has no pixel above {MASK_THRESHOLD}: no defect region")
        return [DefectRegion(region, MVTEC_SPEC)]

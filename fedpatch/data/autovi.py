"""The AutoVI v1.0 layout (docs/autovi-format.md), which is also MVTec LOCO's.

```
<root>/<object>/train/good/*.png
<root>/<object>/test/good/*.png, test/<defect>/*.png
<root>/<object>/ground_truth/<defect>/<stem>/*.png   one mask per defect instance
<root>/<object>/defects_config.json
```
Construction validates what is cheap to check (folders, every defective image's
ground-truth folder, the config files) and lists the images without decoding them; masks
are read and validated when :meth:`AutoVIDataset.regions` is called.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

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
from fedpatch.data.objects import AUTOVI_OBJECTS, OBJECTS, Size, object_list
from fedpatch.data.regions import DefectRegion, DefectSpec
from fedpatch.errors import ConfigError, DataError

CONFIG_FILE = "defects_config.json"
MAX_CONFIG_BYTES = 1 << 20
"""A defects config larger than this (1 MiB) is refused unread: real ones are a few hundred bytes."""
_FIELDS = ("defect_name", "pixel_value", "saturation_threshold", "relative_saturation")


def check_split(split: str) -> Split:
    """``split`` if it is "train" or "test"; ConfigError otherwise (there is no validation split)."""
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    return split  # type: ignore[return-value]


def _entry_field(entry: dict, field: str, where: str) -> object:
    if field not in entry:
        raise DataError(f"{where}: missing field {field!r}")
    return entry[field]


def _parse_entry(entry: object, where: str) -> DefectSpec:
    """One config entry -> DefectSpec, checking each field's type and range."""
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    name, value, threshold, relative = (_entry_field(entry, field, where) for field in _FIELDS)
    if not isinstance(name, str) or not name:
        raise DataError(f"{where}: field 'defect_name' must be a non-empty string, got {name!r}")
    where = f"{where} ({name!r})"
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 255:
        raise DataError(f"{where}: field 'pixel_value' must be an integer in 1..255, got {value!r}")
    if not isinstance(relative, bool):
        raise DataError(f"{where}: field 'relative_saturation' must be true or false, got {relative!r}")
    if (
        not isinstance(threshold, (int, float))
        or isinstance(threshold, bool)
        or not math.isfinite(threshold)
        or threshold <= 0
        or (relative and threshold > 1)
    ):
        expected = "a number in (0, 1] (relative)" if relative else "a positive number of pixels (absolute)"
        raise DataError(f"{where}: field 'saturation_threshold' must be {expected}, got {threshold!r}")
    return DefectSpec(name, value, float(threshold), relative)


def read_defects_config(path: str | Path) -> dict[int, DefectSpec]:
    """Parse and validate a ``defects_config.json``: ``{pixel_value: DefectSpec}``.

    Raises DataError naming the file (and the entry and field) when it is missing, not
    JSON, not a non-empty list of entries, an entry lacks a field or has a wrong type or
    range, or two entries share a pixel value.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"defects config not found: {path}")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise DataError(f"{path} has {size:,} bytes; a defects config is a short list (limit {MAX_CONFIG_BYTES:,} bytes)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"{path} cannot be read: {exc.strerror}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        reason = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise DataError(f"{path} is not valid JSON: {reason}") from None
    if not isinstance(data, list) or not data:
        raise DataError(f"{path}: expected a non-empty JSON list of defect entries, got {data!r:.60}")
    specs: dict[int, DefectSpec] = {}
    for index, entry in enumerate(data):
        spec = _parse_entry(entry, f"{path} entry {index}")
        if spec.pixel_value in specs:
            raise DataError(
                f"{path}: pixel_value {spec.pixel_value} is used by both "
                f"{specs[spec.pixel_value].defect_name!r} and {spec.defect_name!r}"
            )
        specs[spec.pixel_value] = spec
    return specs


def _list_train(folder: Path, name: str) -> list[SampleRecord]:
    """Records of ``<folder>/train/good``; DataError if missing, empty or not alone."""
    train = folder / "train"
    good = train / "good"
    if not good.is_dir():
        raise DataError(f"empty train split of {name!r}: folder not found: {good}")
    others = [sub.name for sub in subfolders(train) if sub.name != "good"]
    if others:
        raise DataError(
            f"{train} holds folders other than good ({', '.join(others)}); training images must be defect-free"
        )
    files = list_image_files(good)
    if not files:
        raise DataError(f"empty train split of {name!r}: no images in {good}")
    return [SampleRecord(str(path), 0, name, "good", path.stem) for path in files]


def _list_test(folder: Path, name: str) -> list[SampleRecord]:
    """Records of every ``<folder>/test/<defect>``; each defective image needs its GT folder."""
    test = folder / "test"
    if not test.is_dir():
        raise DataError(f"test folder of {name!r} not found: {test}")
    records = []
    for defect_folder in ordered_test_folders(test):
        defect = defect_folder.name
        label = 0 if defect == "good" else 1
        for path in list_image_files(defect_folder):
            gt = folder / "ground_truth" / defect / path.stem
            if label and not gt.is_dir():
                raise DataError(f"ground-truth folder {gt} of defective image {path} not found")
            records.append(SampleRecord(str(path), label, name, defect, path.stem))
    if not records:
        raise DataError(f"test split of {name!r} has no images under {test}")
    return records


def _preset_size(name: str) -> Size | None:
    """What resize="native" means here: the AutoVI preset, or the file's size for other objects."""
    info = OBJECTS.get(name)
    return info.native_size if info else None


def mask_region(
    mask_path: Path, image_hw: tuple[int, int], specs: dict[int, DefectSpec], config: Path
) -> DefectRegion:
    """Read one AutoVI mask file as a region, checking size and its single non-zero value."""
    mask = load_mask(mask_path)
    if mask.shape != image_hw:
        raise DataError(
            f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image is "
            f"{image_hw[1]}x{image_hw[0]}"
        )
    values = np.flatnonzero(np.bincount(mask.ravel(), minlength=256)[1:]) + 1
    if values.size == 0:
        raise DataError(f"mask {mask_path} is empty (every pixel is 0)")
    if values.size > 1:
        raise DataError(
            f"mask {mask_path} holds several non-zero values {values.tolist()}; an AutoVI mask "
            "file holds exactly one (one file per defect instance)"
        )
    value = int(values[0])
    if value not in specs:
        raise DataError(
            f"mask {mask_path} has pixel value {value}, which no entry of {config} defines "
            f"(defined: {sorted(specs)})"
        )
    return DefectRegion(mask == value, specs[value])


class AutoVIDataset(FolderDataset):
    """AutoVI (or MVTec LOCO) images of one split, as :class:`~fedpatch.data.io.Sample`.

    Args:
        root: the folder holding one folder per object.
        objects: "all" (the six AutoVI objects, each must be present), one name or a list.
        split: "train" (``train/good`` only) or "test" (``test/good`` then each defect
            folder, alphabetically; files sorted by name).
        resize: "native" = the AutoVI presets per object, (400, 400) for the three small
            objects and (1000, 750) for the three large ones (W x H; these are the real
            files' sizes, so nothing is resized on the real data), and the file's own size
            for any other object name; or one (W, H) for every object; or
            ``{object: (W, H)}`` (see :func:`fedpatch.data.objects.resize_presets`).
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
        self.objects = object_list(objects, AUTOVI_OBJECTS)
        if not self.root.is_dir():
            raise DataError(f"dataset root not found: {self.root}")
        self.target_sizes = resolve_resize(resize, self.objects, _preset_size)
        self._specs: dict[str, dict[int, DefectSpec]] = {}
        self.samples: list[SampleRecord] = []
        for name in self.objects:
            folder = self.root / name
            if not folder.is_dir():
                raise DataError(f"object folder not found: {folder}")
            self._specs[name] = read_defects_config(folder / CONFIG_FILE)
            self.samples += _list_train(folder, name) if self.split == "train" else _list_test(folder, name)

    def defect_specs(self, object_name: str) -> dict[int, DefectSpec]:
        """The object's ``defects_config.json`` entries keyed by pixel value."""
        if object_name not in self._specs:
            raise DataError(f"object {object_name!r} is not part of this dataset ({', '.join(self.objects)})")
        return dict(self._specs[object_name])

    def regions(self, index: int) -> list[DefectRegion]:
        """One region per ``ground_truth/<defect>/<stem>/*.png`` (sorted), masks at native size.

        Raises DataError naming the mask file if it is unreadable, differs in size from its
        image, is all zero, holds more than one non-zero value, or a value the config lacks.
        """
        record = self.samples[index]
        if record.label == 0:
            return []
        folder = self.root / record.object_name
        gt_dir = folder / "ground_truth" / record.defect_type / record.stem
        mask_files = sorted(path for path in gt_dir.glob("*.png") if path.is_file())
        if not mask_files:
            raise DataError(f"no mask files (*.png) in {gt_dir} for defective image {record.path}")
        image_hw = image_size(record.path)
        specs = self._specs[record.object_name]
        return [mask_region(path, image_hw, specs, folder / CONFIG_FILE) for path in mask_files]

"""Datasets: AutoVI (and MVTec LOCO) folders, MVTec-AD-style folders, a synthetic AutoVI set.

:func:`open_dataset` picks the loader from the folder layout; both loaders yield
:class:`Sample` tuples and give ground-truth :class:`DefectRegion` lists at native size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedpatch.data.autovi import CONFIG_FILE, AutoVIDataset, read_defects_config
from fedpatch.data.io import (
    ResizeSpec,
    Sample,
    SampleRecord,
    Split,
    load_image,
    load_mask,
    subfolders,
)
from fedpatch.data.mvtec import MVTecDataset
from fedpatch.data.objects import (
    AUTOVI_OBJECTS,
    OBJECTS,
    RESIZE_LARGE,
    RESIZE_SMALL,
    ObjectInfo,
    object_info,
    resize_for_object,
    resize_presets,
)
from fedpatch.data.regions import DefectRegion, DefectSpec
from fedpatch.data.synthetic import default_dataset_path, ensure_default_dataset, generate_autovi_dataset
from fedpatch.errors import DataError

__all__ = [
    "AUTOVI_OBJECTS",
    "OBJECTS",
    "RESIZE_LARGE",
    "RESIZE_SMALL",
    "AutoVIDataset",
    "DefectRegion",
    "DefectSpec",
    "MVTecDataset",
    "ObjectInfo",
    "ResizeSpec",
    "Sample",
    "SampleRecord",
    "default_dataset_path",
    "ensure_default_dataset",
    "generate_autovi_dataset",
    "list_objects",
    "load_image",
    "load_mask",
    "object_info",
    "open_dataset",
    "read_defects_config",
    "resize_for_object",
    "resize_presets",
]


def _is_object_folder(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() or (folder / "train").is_dir() or (folder / "test").is_dir()


def list_objects(root: str | Path) -> list[str]:
    """Names of the object folders in ``root`` (with a defects config, train/ or test/), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset root not found: {root}")
    return [folder.name for folder in subfolders(root) if _is_object_folder(folder)]


def open_dataset(
    root: str | Path,
    objects: str | Sequence[str] = "all",
    split: Split = "train",
    resize: ResizeSpec = "native",
) -> AutoVIDataset | MVTecDataset:
    """Open ``root`` with the loader its layout calls for.

    AutoVI when every selected object folder has a ``defects_config.json``; MVTec-style
    when none has (that loader then checks for ``ground_truth/<defect>/<stem>_mask.png``).
    ``objects="all"`` here means every object folder present in ``root``
    (:func:`list_objects`), not necessarily all six AutoVI objects. A mix of both layouts,
    an empty root, or a root that is itself one object's folder is a DataError.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset root not found: {root}")
    if _is_object_folder(root):
        raise DataError(
            f"{root} looks like one object's folder; pass its parent {root.parent} as the root "
            f"and objects={root.name!r}"
        )
    names = list_objects(root) if objects == "all" else objects
    if not names:
        raise DataError(f"no object folders (with {CONFIG_FILE}, train/ or test/) in {root}")
    selected = [names] if isinstance(names, str) else list(names)
    with_config = [name for name in selected if (root / name / CONFIG_FILE).is_file()]
    if not with_config:
        return MVTecDataset(root, selected, split, resize)
    if len(with_config) < len(selected):
        without = [name for name in selected if name not in with_config]
        raise DataError(
            f"{root} mixes layouts: {', '.join(with_config)} have {CONFIG_FILE} (AutoVI) but "
            f"{', '.join(without)} do not"
        )
    return AutoVIDataset(root, selected, split, resize)

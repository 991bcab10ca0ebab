"""Per-site data folders for a local deployment: each SuperNode reads only its own folder.

:func:`split_into_sites` deals the images of an AutoVI-layout data root out to ``n`` site
folders, file by file: within every ``train/<folder>`` and ``test/<folder>`` the sorted
images (folder by folder, in sorted order) go round-robin to the sites (site ``k`` gets
positions ``k, k + n, ...`` of the split), so every site gets some of each split; a test
image takes its ``ground_truth/<folder>/<stem>/`` masks with it, and the per-object files
(``defects_config.json``, ``readme.md``) are copied to every site holding that object. The
sites are disjoint and together hold every image once. Files are hard-linked when the file
system allows (copied otherwise), so the split costs no space.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fedpatch.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def split_into_sites(root: str | Path, out: str | Path, n_sites: int) -> list[Path]:
    """Write ``out/site-0 .. site-<n-1>`` from ``root``; return the site folders.

    Raises ConfigError for ``n_sites < 1`` and DataError when ``root`` holds no object folder
    with a ``train`` split, or when an object's train or test split has fewer images than
    sites (a site without training images cannot fit a bank, nor score without test images).
    """
    if n_sites < 1:
        raise ConfigError(f"the number of sites must be >= 1, got {n_sites}")
    root, out = Path(root), Path(out)
    objects = sorted(p for p in root.iterdir() if (p / "train").is_dir()) if root.is_dir() else []
    if not objects:
        raise DataError(f"no object folder with a train split in {root}")
    sites = [out / f"site-{k}" for k in range(n_sites)]
    for obj in objects:
        for split in ("train", "test"):
            folders = sorted(p for p in (obj / split).iterdir() if p.is_dir()) if (obj / split).is_dir() else []
            images = [image for folder in folders for image in _images(folder)]
            if len(images) < n_sites:
                raise DataError(f"{obj / split}: {len(images)} image(s) cannot be split among {n_sites} sites")
            for i, image in enumerate(images):
                folder = image.parent
                site = sites[i % n_sites] / obj.name
                _link(image, site / split / folder.name / image.name)
                masks = obj / "ground_truth" / folder.name / image.stem
                if split == "test" and masks.is_dir():
                    for mask in sorted(masks.iterdir()):
                        _link(mask, site / "ground_truth" / folder.name / image.stem / mask.name)
        for extra in sorted(p for p in obj.iterdir() if p.is_file()):
            for site in sites:
                _link(extra, site / obj.name / extra.name)
    return sites

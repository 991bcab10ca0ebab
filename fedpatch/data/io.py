"""Reading image and mask files, and the sample types and dataset base shared by the loaders.

Every failure a user's files can cause becomes a :class:`~fedpatch.errors.DataError` whose
message names the file. Decoding is strict:

* Pillow decodes lazily and would hide a truncated file until the pixels are used, so
  :func:`load_image` and :func:`load_mask` force the decode (``Image.load()``) and turn any
  failure into a ``DataError``.
* Size limit: an image whose header declares more than :data:`MAX_IMAGE_PIXELS` (40
  megapixels; AutoVI's largest images have 0.75) is refused from its header, before any pixel
  is decoded, so a decompression bomb (a tiny file declaring a huge image) costs nothing.
  Pillow's own guard (``Image.MAX_IMAGE_PIXELS``, about 89 megapixels, which it raises
  inside ``Image.open`` above twice that) is also turned into a DataError, at its first
  level (a warning in Pillow) as well.

Conversions to RGB uint8 (:func:`load_image`):

* grey (``L``, ``1``), palette (``P``) and CMYK/YCbCr images go through Pillow's own
  conversion;
* an alpha channel (``RGBA``, ``LA``, palette transparency) is DROPPED, not composited:
  inspection cameras produce no transparency, and compositing over an arbitrary colour
  would invent pixel values the camera never recorded;
* 16-bit grey (``I;16*``, and 32-bit ``I`` holding values in [0, 65535]) is scaled as
  ``round(v * 255 / 65535)``, so 65535 becomes 255 (Pillow's own conversion clips every
  value above 255 to white). 16-bit RGB PNGs are already reduced by Pillow to their high
  byte, which is the same scaling. Floating-point images are refused.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal, NamedTuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from fedpatch.data.objects import Size
from fedpatch.data.regions import DefectRegion, DefectSpec
from fedpatch.errors import ConfigError, DataError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
"""File suffixes (lower case) taken as images when a folder is listed; others are skipped."""

ResizeSpec = Union[Literal["native"], Size, Mapping[str, Size]]
"""How a dataset sizes its images: ``"native"``, one (W, H) for all objects, or ``{object: (W, H)}``."""

Split = Literal["train", "test"]

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})

MAX_IMAGE_PIXELS = 40_000_000
"""Largest width x height decoded (40 MP: 120 MB as RGB uint8, 480 MB as a float tensor)."""


def _too_large(path: Path, what: str, size: tuple[int, int]) -> DataError:
    return DataError(
        f"{what} file {path} declares {size[0]}x{size[1]} pixels, more than fedpatch's limit of "
        f"{MAX_IMAGE_PIXELS:,} (fedpatch.data.io.MAX_IMAGE_PIXELS); refused before decoding "
        "(a corrupt header or a decompression bomb)"
    )


def _bomb(path: Path, what: str, exc: Exception) -> DataError:
    return DataError(
        f"{what} file {path} is too large to decode safely (possible decompression "
        f"bomb; Pillow's limit is Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}): {exc}"
    )


class Sample(NamedTuple):
    """One decoded image. ``sample[0]`` is the image (the model's ``fit`` relies on it)."""

    image: torch.Tensor  # float32 [3, H, W] in [0, 1], RGB, resized, not normalised
    label: int  # 0 good, 1 defective
    path: str
    object_name: str
    defect_type: str  # "good" or the test folder's name
    native_size: tuple[int, int]  # (H, W) of the file on disk = the ground-truth mask size


class SampleRecord(NamedTuple):
    """What a dataset knows about an image without decoding it."""

    path: str
    label: int
    object_name: str
    defect_type: str
    stem: str


def _decode(path: str | Path, what: str, convert: Callable[[Image.Image, Path], np.ndarray]) -> np.ndarray:
    """Open, fully decode and convert one file; any failure is a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}")
    if path.stat().st_size == 0:
        raise DataError(f"{what} file is empty (0 bytes): {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.size[0] * image.size[1] > MAX_IMAGE_PIXELS:
                    raise _too_large(path, what, image.size)
                image.load()
                return convert(image, path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb(path, what, exc) from None
    except UnidentifiedImageError:
        raise DataError(f"{what} file {path} is not an image Pillow can read") from None
    except DataError:
        raise
    except PermissionError as exc:
        raise DataError(f"{what} file {path} cannot be read: {exc.strerror}") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise DataError(f"{what} file {path} is truncated or corrupt: {exc}") from None


def _sixteen_bit_to_uint8(values: np.ndarray, path: Path) -> np.ndarray:
    """Scale 16-bit grey values to 8 bits, ``round(v * 255 / 65535)``."""
    values = values.astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise DataError(
            f"image file {path} holds 32-bit values outside [0, 65535]; only 8- and 16-bit "
            "images are supported"
        )
    return ((values * 255 + 32767) // 65535).astype(np.uint8)


def _to_rgb(image: Image.Image, path: Path) -> np.ndarray:
    """Pillow image -> uint8 [H, W, 3] RGB, with the conversions the module docstring lists."""
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = _sixteen_bit_to_uint8(np.asarray(image), path)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode == "F":
        raise DataError(f"image file {path} is floating-point (mode F), which is not supported")
    try:
        return np.array(image.convert("RGB"), dtype=np.uint8)
    except ValueError as exc:
        raise DataError(f"image file {path} has unsupported mode {image.mode}: {exc}") from None


def _to_channel0(image: Image.Image, path: Path) -> np.ndarray:
    """Pillow mask image -> uint8 [H, W]: channel 0 (palette masks: red of the shown colour)."""
    if image.mode == "F":
        raise DataError(f"mask file {path} is floating-point (mode F); masks must be 8-bit integer images")
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 255):
            raise DataError(f"mask file {path} holds values above 255; masks must be 8-bit")
        return values.astype(np.uint8)
    if image.mode in ("L", "LA", "RGB", "RGBA"):
        array = np.asarray(image)
    else:
        try:
            array = np.asarray(image.convert("RGB"))
        except ValueError as exc:
            raise DataError(f"mask file {path} has unsupported mode {image.mode}: {exc}") from None
    return np.array(array if array.ndim == 2 else array[:, :, 0], dtype=np.uint8)


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image file to uint8 ``[H, W, 3]`` RGB (see the module docstring for modes)."""
    return _decode(path, "image", _to_rgb)


def load_mask(path: str | Path) -> np.ndarray:
    """Decode a mask file to uint8 ``[H, W]``: channel 0 of a 1-, 2-, 3- or 4-channel mask."""
    return _decode(path, "mask", _to_channel0)


def image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file from its header only (no pixel decoding)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Image.DecompressionBombError as exc:
        raise _bomb(path, "image", exc) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DataError(f"image file {path} is not an image Pillow can read: {exc}") from None
    if width * height > MAX_IMAGE_PIXELS:
        raise _too_large(path, "image", (width, height))
    return height, width


def list_image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (by suffix, hidden files skipped), sorted by name."""
    return sorted(
        entry
        for entry in folder.iterdir()
        if entry.is_file() and not entry.name.startswith(".") and entry.suffix.lower() in IMAGE_EXTENSIONS
    )


def subfolders(folder: Path) -> list[Path]:
    """Non-hidden subfolders of ``folder``, sorted by name."""
    return sorted(entry for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def ordered_test_folders(test_dir: Path) -> list[Path]:
    """The folders of a test split in loading order: ``good`` first, then the defect folders by name."""
    return sorted(subfolders(test_dir), key=lambda folder: (folder.name != "good", folder.name))


def check_size(value: object, what: str) -> Size:
    """Validate a (W, H) pair of positive ints; ConfigError naming ``what`` otherwise."""
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ConfigError(f"{what} must be a (width, height) pair of positive integers, got {value!r}")
    return int(value[0]), int(value[1])


def resolve_resize(
    resize: ResizeSpec, objects: Sequence[str], native: Callable[[str], Size | None]
) -> dict[str, Size | None]:
    """``{object: (W, H) or None}`` from a :data:`ResizeSpec`; ``None`` keeps the file's size.

    ``native(object)`` says what ``"native"`` means for the dataset at hand.
    """
    if isinstance(resize, str):
        if resize != "native":
            raise ConfigError(f"resize must be 'native', a (width, height) pair or a dict, got {resize!r}")
        return {name: native(name) for name in objects}
    if isinstance(resize, Mapping):
        missing = [name for name in objects if name not in resize]
        if missing:
            raise ConfigError(f"resize has no size for object(s) {', '.join(missing)}")
        return {name: check_size(resize[name], f"resize[{name!r}]") for name in objects}
    size = check_size(resize, "resize")
    return {name: size for name in objects}


def to_tensor(image: np.ndarray, size: Size | None) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H', W'] in [0, 1], resized to ``size`` = (W, H) if given.

    Resizing is Pillow's bilinear filter, which low-pass filters when shrinking.
    """
    if size is not None and (image.shape[1], image.shape[0]) != size:
        image = np.array(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)


class FolderDataset(Dataset[Sample]):
    """Base of the two loaders: lazily decoded images listed in :attr:`samples`.

    Subclasses fill ``samples`` and ``target_sizes`` at construction (after validating the
    layout) and implement :meth:`regions` and :meth:`defect_specs`. The dataset holds only
    paths and small dicts, so it pickles cheaply into DataLoader workers.
    """

    samples: list[SampleRecord]
    target_sizes: dict[str, Size | None]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        record = self.samples[index]
        image = load_image(record.path)
        tensor = to_tensor(image, self.target_sizes[record.object_name])
        return Sample(
            image=tensor,
            label=record.label,
            path=record.path,
            object_name=record.object_name,
            defect_type=record.defect_type,
            native_size=(int(image.shape[0]), int(image.shape[1])),
        )

    def native_size(self, index: int) -> tuple[int, int]:
        """(H, W) of image ``index`` on disk, read from the file header only."""
        return image_size(self.samples[index].path)

    def regions(self, index: int) -> list[DefectRegion]:
        """The ground-truth regions of image ``index`` at native size; [] for a good image."""
        raise NotImplementedError

    def defect_specs(self, object_name: str) -> dict[int, DefectSpec]:
        """The object's defect kinds keyed by mask pixel value."""
        raise NotImplementedError

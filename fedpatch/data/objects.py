"""The six AutoVI v1.0 objects: names, native image sizes, defect folders, resize presets.

Sizes follow the AutoVI convention of the seed's configs and are written WIDTH x HEIGHT
(``(1000, 750)`` is 1000 pixels wide, 750 high), like PIL's ``Image.size``. Tensors and
masks are indexed ``[H, W]``; :attr:`ObjectInfo.native_hw` gives that order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedpatch.errors import ConfigError, DataError

Size = tuple[int, int]
"""An image size as (width, height)."""

RESIZE_SMALL: Size = (400, 400)
"""The seed's ``resize_small`` preset (W, H): engine_wiring, pipe_clip, pipe_staple."""

RESIZE_LARGE: Size = (1000, 750)
"""The seed's ``resize_large`` preset (W, H): tank_screw, underbody_pipes, underbody_screw."""


@dataclass(frozen=True)
class ObjectInfo:
    """What the v1.0 release says about one object.

    ``defect_folders`` are the defective test folders of the real release (see
    docs/autovi-format.md, "Counts"); ``multiple`` and ``operator`` are among them where the
    release has them, as folders of images with several defect instances.
    """

    name: str
    native_size: Size  # (W, H) of every image and mask of the object
    is_large: bool  # True: resized with resize_large, else resize_small
    defect_folders: tuple[str, ...]

    @property
    def native_hw(self) -> tuple[int, int]:
        """The native size as (H, W), the order of array shapes."""
        return self.native_size[1], self.native_size[0]


OBJECTS: dict[str, ObjectInfo] = {
    info.name: info
    for info in (
        ObjectInfo(
            "engine_wiring",
            RESIZE_SMALL,
            False,
            ("fastening", "multiple", "cardboard", "blue_hoop", "obstruction"),
        ),
        ObjectInfo("pipe_clip", RESIZE_SMALL, False, ("unclipped", "operator")),
        ObjectInfo("pipe_staple", RESIZE_SMALL, False, ("missing",)),
        ObjectInfo("tank_screw", RESIZE_LARGE, True, ("missing",)),
        ObjectInfo("underbody_pipes", RESIZE_LARGE, True, ("obstruction", "operator", "multiple")),
        ObjectInfo("underbody_screw", RESIZE_LARGE, True, ("missing",)),
    )
}

AUTOVI_OBJECTS: tuple[str, ...] = tuple(OBJECTS)
"""The six object names, in the release's (alphabetical) order."""


def object_info(name: str) -> ObjectInfo:
    """The :class:`ObjectInfo` of ``name``; :class:`DataError` naming it if it is not AutoVI's."""
    try:
        return OBJECTS[name]
    except KeyError:
        raise DataError(
            f"unknown AutoVI object {name!r}; expected one of {', '.join(AUTOVI_OBJECTS)}"
        ) from None


def resize_for_object(
    object_name: str, resize_small: Size = RESIZE_SMALL, resize_large: Size = RESIZE_LARGE
) -> Size:
    """The (W, H) an object's images are resized to, from a config's two presets.

    The three small objects take ``resize_small``, the three large ones ``resize_large``.
    """
    return resize_large if object_info(object_name).is_large else resize_small


def resize_presets(
    resize_small: Size = RESIZE_SMALL, resize_large: Size = RESIZE_LARGE
) -> dict[str, Size]:
    """``{object: (W, H)}`` for all six objects: the dict form of ``resize`` a YAML config feeds."""
    return {name: resize_for_object(name, resize_small, resize_large) for name in AUTOVI_OBJECTS}


def object_list(objects: str | Sequence[str], all_objects: Sequence[str]) -> list[str]:
    """``objects`` as a list: "all" -> ``all_objects``, one name -> [name]; no duplicates."""
    if isinstance(objects, str):
        return list(all_objects) if objects == "all" else [objects]
    names = list(objects)
    if not names:
        raise ConfigError("objects is an empty list")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"objects lists {', '.join(duplicates)} more than once")
    return names

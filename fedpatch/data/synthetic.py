"""A synthetic dataset in the exact AutoVI v1.0 layout: the product's embedded default data.

The real AutoVI release cannot be downloaded on the project's machines, so the library
ships a generator that writes the same tree (docs/autovi-format.md) with images drawn from
scratch: for each of the six objects a textured surface under gradient lighting, the
object's parts (cables and brackets, clipped pipes, a stapled hose, screwed straps,
parallel underbody pipes, panel screws) with small shifts, rotations and lighting changes
between good images, and defects of the object's real kinds (missing screw or staple,
unclipped pipe, open fastening, missing or wrong blue hoop, cardboard, obstructions, an
operator's glove) plus scratches, some obvious and some small or low-contrast.

Each defect instance gets its own mask file holding its kind's ``pixel_value``; the mask is
exactly the instance's visible footprint (for a missing part: where the part should be).
Images are rendered with numpy and Pillow only: parts are drawn at twice the output
resolution and box-filtered (anti-aliasing); flat parts tint the textured surface,
standing parts are laid over it with soft shadows; then the image is lit and given sensor
noise. A 1000x750 image takes about 0.1 s to render and 0.07 s to write.

Determinism: every image has its own random stream, seeded from (seed, object, split,
folder, index), so the same seed gives byte-identical files, an object's files do not
depend on which other objects are generated, and an image does not depend on how many
images its folder holds.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fedpatch.data.objects import AUTOVI_OBJECTS, OBJECTS, object_info, object_list
from fedpatch.errors import ConfigError, DataError

GENERATOR_VERSION = 1
"""Bumped whenever the generated pixels change; part of the default cache folder's name."""

DEFAULT_N_TRAIN = 20
DEFAULT_N_TEST_GOOD = 10
DEFAULT_N_TEST_DEFECTIVE = 4
"""Default counts per object (defective: per test folder). The default set holds 6 x 30 good
images plus 17 defect folders x 4 = 248 images, about 140 MB, generated in about half a
minute on one core; PatchCore fits its 120 training images in a few minutes on a CPU."""

COMPLETE_MARKER = ".fedpatch-complete"
"""Written last into a generated cache folder; a folder without it is never reused."""

_SUPERSAMPLE = 2
Color = tuple[float, float, float]
Rng = np.random.Generator


# --------------------------------------------------------------------------------------
# Defect kinds and test folders of each object
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DefectKind:
    """One ``defects_config.json`` entry; an absolute threshold is in native-size pixels."""

    name: str
    pixel_value: int
    saturation_threshold: float
    relative_saturation: bool

    def config_entry(self, scale: float) -> dict[str, object]:
        """The JSON entry; absolute thresholds scale with the pixel count (scale squared)."""
        threshold: float = self.saturation_threshold
        if not self.relative_saturation:
            threshold = max(1, round(threshold * scale * scale))
        return {
            "defect_name": self.name,
            "pixel_value": self.pixel_value,
            "saturation_threshold": threshold,
            "relative_saturation": self.relative_saturation,
        }


DEFECT_KINDS: dict[str, tuple[DefectKind, ...]] = {
    "engine_wiring": (
        DefectKind("fastening", 255, 1.0, True),
        DefectKind("blue_hoop", 254, 1.0, True),
        DefectKind("cardboard", 253, 0.5, True),
        DefectKind("obstruction", 252, 2000, False),
    ),
    "pipe_clip": (
        DefectKind("unclipped", 255, 1.0, True),
        DefectKind("glove", 254, 0.5, True),
        DefectKind("scratch", 253, 300, False),
    ),
    "pipe_staple": (
        DefectKind("missing", 255, 1.0, True),
        DefectKind("scratch", 254, 300, False),
    ),
    "tank_screw": (
        DefectKind("missing", 255, 1.0, True),
        DefectKind("scratch", 254, 800, False),
    ),
    "underbody_pipes": (
        DefectKind("obstruction", 255, 5000, False),
        DefectKind("glove", 254, 0.5, True),
        DefectKind("scratch", 253, 800, False),
    ),
    "underbody_screw": (
        DefectKind("missing", 255, 1.0, True),
        DefectKind("scratch", 254, 800, False),
    ),
}
"""Config entries. ``glove`` and ``scratch`` only occur in the ``operator``/``multiple`` folders."""

TEST_FOLDERS: dict[str, tuple[str, ...]] = {
    name: tuple(sorted(set(info.defect_folders) | {"multiple"})) for name, info in OBJECTS.items()
}
"""Defective test folders written per object: the real release's folders plus ``multiple``."""


def _folder_kinds(object_name: str, folder: str, rng: Rng) -> list[str]:
    """Defect kinds drawn into one image of ``folder``.

    A kind's own folder holds that kind; ``operator`` an operator's glove plus one of the
    object's main kinds; ``multiple`` two or three different kinds.
    """
    kinds = [kind.name for kind in DEFECT_KINDS[object_name]]
    if folder == "operator":
        main = [kind for kind in kinds if kind not in ("glove", "scratch")]
        return ["glove", main[int(rng.integers(len(main)))]]
    if folder == "multiple":
        count = int(rng.integers(2, min(3, len(kinds)) + 1))
        return [kinds[i] for i in sorted(rng.choice(len(kinds), size=count, replace=False))]
    return [folder]


# --------------------------------------------------------------------------------------
# Geometry (native-size pixel coordinates, x right, y down)
# --------------------------------------------------------------------------------------


def _circle(cx: float, cy: float, r: float, n: int = 36) -> np.ndarray:
    return _ellipse(cx, cy, r, r, 0.0, n)


def _ellipse(cx: float, cy: float, rx: float, ry: float, angle: float, n: int = 40) -> np.ndarray:
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    pts = np.stack([rx * np.cos(t), ry * np.sin(t)], axis=1)
    return _rotate(pts, angle) + (cx, cy)


def _rotate(points: np.ndarray, angle: float, center: Sequence[float] = (0.0, 0.0)) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    rel = np.asarray(points, dtype=float) - center
    return np.stack([c * rel[:, 0] - s * rel[:, 1], s * rel[:, 0] + c * rel[:, 1]], axis=1) + center


def _bezier(ctrl: Sequence[Sequence[float]]) -> np.ndarray:
    """Cubic Bezier through four control points, 32 samples."""
    p = np.asarray(ctrl, dtype=float)
    t = np.linspace(0.0, 1.0, 32)[:, None]
    return (1 - t) ** 3 * p[0] + 3 * (1 - t) ** 2 * t * p[1] + 3 * (1 - t) * t**2 * p[2] + t**3 * p[3]


def _normals(points: np.ndarray) -> np.ndarray:
    """Unit normals of a polyline (tangent turned +90 degrees), one per vertex."""
    tangent = np.gradient(points, axis=0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True) + 1e-9
    return np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)


def _rect(cx: float, cy: float, length: float, thickness: float, angle: float) -> np.ndarray:
    """Corners of a rectangle whose long side (``length``) points along ``angle``."""
    half = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * (length / 2, thickness / 2)
    return _rotate(half, angle) + (cx, cy)


def _blob(rng: Rng, cx: float, cy: float, r: float, roughness: float) -> np.ndarray:
    """A smooth irregular closed outline: radius modulated by a few random harmonics."""
    t = np.linspace(0.0, 2 * np.pi, 48, endpoint=False)
    radius = np.ones_like(t)
    for k in range(2, 6):
        radius += roughness / k * rng.uniform(0.5, 1.0) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    pts = np.stack([r * radius * np.cos(t), r * radius * np.sin(t)], axis=1)
    return _rotate(pts, rng.uniform(0, 2 * np.pi)) + (cx, cy)


def _unit(angle: float) -> np.ndarray:
    return np.array([np.cos(angle), np.sin(angle)])


def _bbox(points: np.ndarray, margin: float) -> tuple[float, float, float, float]:
    return (
        float(points[:, 0].min() - margin),
        float(points[:, 1].min() - margin),
        float(points[:, 0].max() + margin),
        float(points[:, 1].max() + margin),
    )


# --------------------------------------------------------------------------------------
# Parts: lists of shapes drawn in order, with shading built from nested shapes
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """A filled polygon (``width == 0``) or a polyline stroke of ``width`` native pixels."""

    points: np.ndarray
    fill: Color
    width: float = 0.0
    round_caps: bool = True


@dataclass
class Part:
    """Shapes drawn in order; their union is the part's footprint.

    ``standing``: the part stands off the surface: it is opaque and casts a soft shadow;
    otherwise it lies flat on the surface (a rib, a stain, a scratch) and only tints it,
    keeping the surface's texture, under every standing part. ``instance``: the
    defect instance the part belongs to (None for normal parts); a part removed by a defect
    stays in the list as a shapeless *ghost* so that its depth order is kept.
    """

    shapes: list[Shape]
    name: str = ""
    standing: bool = True
    instance: int | None = None


def _shade(colour: Color, factor: float) -> Color:
    return tuple(float(np.clip(c * factor, 0, 255)) for c in colour)  # type: ignore[return-value]


def _mix(a: Color, b: Color, t: float) -> Color:
    return tuple(float(x + (y - x) * t) for x, y in zip(a, b))  # type: ignore[return-value]


def _jitter(rng: Rng, colour: Color, amount: float = 0.05) -> Color:
    return _shade(colour, 1.0 + rng.uniform(-amount, amount))


_WHITE: Color = (255.0, 255.0, 255.0)


def _toward_light(points: np.ndarray, light: np.ndarray) -> np.ndarray:
    """The polyline's normals, flipped so that they point (on average) toward the light."""
    normals = _normals(points)
    return normals if float((normals @ light).mean()) >= 0 else -normals


def _tube(
    points: np.ndarray, width: float, colour: Color, light: np.ndarray, name: str = "", gloss: float = 0.45
) -> Part:
    """A cylinder seen from the side: dark rim, body, highlight shifted toward the light."""
    n = _toward_light(points, light)
    return Part(
        [
            Shape(points, _shade(colour, 0.45), width),
            Shape(points + n * width * 0.06, _shade(colour, 0.78), width * 0.8),
            Shape(points + n * width * 0.14, colour, width * 0.5),
            Shape(points + n * width * 0.22, _mix(colour, _WHITE, gloss), width * 0.16),
        ],
        name,
    )


def _strap(
    center: Sequence[float],
    length: float,
    thickness: float,
    angle: float,
    colour: Color,
    light: np.ndarray,
    name: str = "",
) -> Part:
    """A flat band (metal strap, cable tie, clip body) with square ends and a soft sheen."""
    axis = _unit(angle)
    ends = np.array([np.asarray(center) - axis * length / 2, np.asarray(center) + axis * length / 2])
    n = _toward_light(ends, light)
    return Part(
        [
            Shape(ends, _shade(colour, 0.62), thickness, False),
            Shape(ends + n * thickness * 0.04, _shade(colour, 0.9), thickness * 0.82, False),
            Shape(ends + n * thickness * 0.16, _mix(colour, _WHITE, 0.25), thickness * 0.32, False),
        ],
        name,
    )


def _disc(cx: float, cy: float, r: float, colour: Color, light: np.ndarray) -> list[Shape]:
    """A shaded dome: dark rim, body and a highlight offset toward the light."""
    return [
        Shape(_circle(cx, cy, r), _shade(colour, 0.55)),
        Shape(_circle(cx + light[0] * r * 0.1, cy + light[1] * r * 0.1, r * 0.8), colour),
        Shape(_circle(cx + light[0] * r * 0.35, cy + light[1] * r * 0.35, r * 0.3), _mix(colour, _WHITE, 0.4)),
    ]


def _hex_head(cx: float, cy: float, r: float, angle: float, colour: Color, light: np.ndarray) -> list[Shape]:
    """A hexagon head: six bevel facets lit by their direction, a flat top face."""
    corners = _rotate(np.stack([_unit(a) for a in np.arange(6) * np.pi / 3]) * r, angle) + (cx, cy)
    shapes = []
    for i in range(6):
        facet = np.array([[cx, cy], corners[i], corners[(i + 1) % 6]])
        direction = (corners[i] + corners[(i + 1) % 6]) / 2 - (cx, cy)
        lit = float(direction @ light) / (np.linalg.norm(direction) + 1e-9)
        shapes.append(Shape(facet, _shade(colour, 0.8 + 0.35 * lit)))
    top = _rotate(np.stack([_unit(a) for a in np.arange(6) * np.pi / 3]) * r * 0.62, angle) + (cx, cy)
    shapes.append(Shape(top, _shade(colour, 1.02)))
    return shapes


def _screw(
    at: np.ndarray,
    washer: float,
    head: float,
    angle: float,
    washer_colour: Color,
    head_colour: Color,
    light: np.ndarray,
    name: str,
) -> Part:
    """Flange washer plus hex head with a dark drive recess."""
    cx, cy = float(at[0]), float(at[1])
    recess = _rotate(_regular_star(head * 0.3), angle) + (cx, cy)
    return Part(
        _disc(cx, cy, washer, washer_colour, light)
        + _hex_head(cx, cy, head, angle, head_colour, light)
        + [Shape(recess, _shade(head_colour, 0.35))],
        name,
    )


def _regular_star(r: float) -> np.ndarray:
    """A six-pointed star (Torx-like recess) of outer radius ``r``."""
    angles = np.arange(12) * np.pi / 6
    radii = np.where(np.arange(12) % 2 == 0, r, r * 0.55)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _hole(cx: float, cy: float, r: float, rim: Color, name: str = "", standing: bool = False) -> Part:
    """An empty threaded hole: a bright rim (clean metal where a washer sat), a dark bore."""
    return Part(
        [Shape(_circle(cx, cy, r * 2.2), rim), Shape(_circle(cx, cy, r), (18.0, 18.0, 20.0))],
        name,
        standing,
    )


# --------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Surface:
    """The background material: a colour and luminance texture amplitudes."""

    colour: Color
    blotch: float  # large-scale stains and casting variation
    grain: float  # mid-scale texture
    speckle: float  # per-pixel roughness


@dataclass
class Scene:
    """A scene in native coordinates: surface, parts in depth order, and the light."""

    size: tuple[int, int]  # native (W, H)
    surface: Surface
    light: np.ndarray  # unit vector pointing toward the light, image coordinates
    parts: list[Part]
    n_background: int = 0  # parts[:n_background] lie flat on the surface
    anchors: dict[str, object] = field(default_factory=dict)  # geometry the defects need
    reserved: list[tuple[float, float, float, float]] = field(default_factory=list)  # defect boxes

    @property
    def scale_factor(self) -> float:
        """1 for the 400x400 objects, 2.5 for the 1000x750 ones: how big things are."""
        return self.size[0] / 400

    def index(self, name: str) -> int:
        return next(i for i, part in enumerate(self.parts) if part.name == name)

    def ghost(self, name: str, instance: int) -> Part:
        """Remove part ``name`` (a defect), leaving a shapeless ghost at its depth; return it."""
        i = self.index(name)
        removed = self.parts[i]
        self.parts[i] = Part([], f"{name}:removed", removed.standing, instance)
        return removed

    def insert_after(self, anchor: str, part: Part) -> None:
        """Insert ``part`` right after the part (or ghost) named ``anchor``."""
        names = [p.name for p in self.parts]
        i = names.index(anchor) if anchor in names else names.index(f"{anchor}:removed")
        self.parts.insert(i + 1, part)

    def add_on_surface(self, part: Part) -> None:
        """Insert a flat part (a scratch) above the background, below every standing part."""
        self.parts.insert(self.n_background, part)

    def reserve(self, shapes: list[Shape]) -> None:
        """Remember the bounding box of a defect, so later foreign objects avoid covering it."""
        pts = np.concatenate([s.points for s in shapes])
        self.reserved.append(_bbox(pts, max(s.width for s in shapes) / 2))

    def is_free(self, box: tuple[float, float, float, float]) -> bool:
        """Whether ``box`` overlaps no box reserved by an earlier defect of this image."""
        return all(
            box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3] for b in self.reserved
        )


def _light(rng: Rng, base_angle: float) -> np.ndarray:
    """Light direction: the object's usual direction, +-35 degrees."""
    return _unit(base_angle + np.radians(rng.uniform(-35, 35)))


_TOP_LEFT = np.radians(-135)
_TOP = np.radians(-100)


def _engine_wiring(rng: Rng) -> Scene:
    """Cast-aluminium engine side: three cables through a two-band bracket, a blue cable tie,
    a foil-wrapped bundle, a dark cavity on the right."""
    light = _light(rng, _TOP_LEFT)
    j = lambda s=6.0: rng.uniform(-s, s)  # noqa: E731 - local jitter shorthand
    scene = Scene((400, 400), Surface((150, 151, 154), 0.10, 0.06, 0.035), light, [])
    parts = scene.parts
    cavity = [
        Shape(_blob(rng, 380, 215, 112, 0.12), (96, 96, 100)),
        Shape(_blob(rng, 385, 218, 96, 0.1), (30, 30, 34)),
        Shape(_blob(rng, 392, 300, 28, 0.2), (58, 58, 64)),
    ]
    parts.append(Part(cavity, "cavity", False))
    recess = np.array([[-10, 262], [112 + j(), 252], [128, 410], [-10, 410]])
    parts.append(Part([Shape(recess, (120, 120, 124))], "recess", False))
    parts.append(_hole(32 + j(2), 302 + j(2), 11, (105, 105, 110), "bolt_hole"))
    scene.n_background = len(parts)
    plate = [
        Shape(_rect(178 + j(3), 198 + j(3), 150, 168, np.radians(j(2))), (168, 171, 176)),
        Shape(_rect(178, 198, 140, 158, 0), (178, 181, 186)),
    ]
    parts.append(Part(plate, "plate"))
    cables = [
        ("orange", [(150, -40), (138 + j(), 110 + j()), (165 + j(), 270 + j()), (170 + j(), 440)], 36,
         (222, 104, 30)),
        ("yellow", [(192, -40), (198 + j(), 120 + j()), (170 + j(), 300 + j()), (70 + j(10), 440)], 38,
         (232, 200, 44)),
        ("green", [(215, -40), (228 + j(), 140 + j()), (212 + j(), 250 + j()), (262, 300)], 30,
         (26, 128, 62)),
    ]
    for name, ctrl, width, colour in cables:
        parts.append(_tube(_bezier(ctrl), width + j(2), _jitter(rng, colour, 0.04), light, name))
    for name, cy in (("band_upper", 150.0), ("band_lower", 238.0)):
        geometry = (180 + j(3), cy + j(4), 140.0, 34.0, np.radians(-3 + j(2)))
        scene.anchors[name] = geometry
        parts.append(_strap(geometry[:2], *geometry[2:], (205, 208, 212), light, name))
    hoop = (184 + j(3), 194 + j(3), 112.0, 15.0, np.radians(-2 + j(3)))
    scene.anchors["hoop"] = hoop
    parts.append(_blue_hoop(hoop, (28, 46, 186), light))
    foil = _bezier([(236, 268), (300 + j(), 232 + j()), (362 + j(), 168 + j()), (445, 118)])
    parts.append(_foil(rng, foil, 72 + j(3), light))
    hoop_at = foil[24]
    across = float(np.arctan2(*(_normals(foil)[24][::-1])))
    parts.append(_strap(hoop_at, 84, 15, across, (28, 46, 186), light, "foil_hoop"))
    return scene


def _blue_hoop(geometry: tuple[float, ...], colour: Color, light: np.ndarray) -> Part:
    """A cable tie across the cables with its locking head on the right."""
    cx, cy, length, thickness, angle = geometry
    part = _strap((cx, cy), length, thickness, angle, colour, light, "hoop")
    head = np.array([cx, cy]) + _unit(angle) * (length / 2 + 6)
    part.shapes += [
        Shape(_rect(head[0], head[1], 18, 22, angle), _shade(colour, 0.7)),
        Shape(_rect(head[0], head[1], 12, 14, angle), _shade(colour, 0.95)),
    ]
    return part


def _foil(rng: Rng, centre: np.ndarray, width: float, light: np.ndarray) -> Part:
    """An aluminium-foil sleeve: a grey tube covered with small crinkle facets."""
    part = _tube(centre, width, (175, 176, 182), light, "foil", gloss=0.6)
    normals = _normals(centre)
    for _ in range(70):
        i = int(rng.integers(len(centre)))
        c = centre[i] + normals[i] * rng.uniform(-0.36, 0.36) * width
        tri = c + rng.uniform(-9, 9, size=(3, 2))
        part.shapes.append(Shape(tri, (rng.uniform(110, 245),) * 3))  # type: ignore[arg-type]
    return part


def _straight(
    origin: np.ndarray, angle: float, offset: float, extent: float, bend: float, phase: float, n: int = 48
) -> np.ndarray:
    """A long, gently waving centreline parallel to ``angle``, shifted by ``offset``."""
    s = np.linspace(-extent, extent, n)
    axis, normal = _unit(angle), _unit(angle + np.pi / 2)
    wave = bend * np.sin(s / extent * np.pi + phase)
    return origin + s[:, None] * axis + (offset + wave)[:, None] * normal


def _pipe_clip(rng: Rng) -> Scene:
    """Black underbody plastic: two metal pipes held by a light plastic clip."""
    light = _light(rng, _TOP)
    j = lambda s=3.0: rng.uniform(-s, s)  # noqa: E731
    scene = Scene((400, 400), Surface((50, 50, 53), 0.08, 0.10, 0.06), light, [])
    parts = scene.parts
    for offset in (-120.0, 125.0):
        line = _straight(np.array([200.0, 200.0]), np.radians(-30 + j()), offset + j(8), 320, 0, 0, 2)
        rib = [Shape(line, (60, 60, 64), 26, False), Shape(line + (0, -11), (70, 70, 75), 4, False)]
        parts.append(Part(rib, "rib", False))
    scene.n_background = len(parts)
    angle = np.radians(-18 + j(3))
    axis, normal = _unit(angle), _unit(angle + np.pi / 2)
    origin = np.array([200.0 + j(6), 205.0 + j(6)])
    along = rng.uniform(-18, 18)
    clip_at = origin + axis * along
    scene.anchors.update(angle=angle, origin=origin, clip_at=clip_at)
    clip_colour = _jitter(rng, (196, 194, 186) if rng.random() < 0.7 else (44, 44, 47), 0.04)
    scene.anchors["clip_colour"] = clip_colour
    parts.append(_strap(clip_at + normal * 8, 132, 42, angle + np.pi / 2, clip_colour, light, "clip"))
    pin = clip_at + normal * 64
    parts[-1].shapes += _disc(pin[0], pin[1], 13, _shade(clip_colour, 0.92), light)
    phase = rng.uniform(0, 2 * np.pi)
    pipes = (("pipe_a", -24.0, 20.0, (178, 180, 184)), ("pipe_b", 24.0, 16.0, (150, 153, 158)))
    for name, offset, width, colour in pipes:
        centre = _straight(origin, angle, offset + j(1.5), 320, 4 + j(2), phase)
        scene.anchors[name] = (centre, width, colour, offset)
        parts.append(_tube(centre, width, colour, light, name))
    for name in ("pipe_a", "pipe_b"):
        _, width, _, offset = scene.anchors[name]  # type: ignore[misc]
        parts.append(_jaw(clip_at + normal * offset, width, angle, clip_colour, light, "jaw_" + name[-1]))
    return scene


def _jaw(at: np.ndarray, pipe_width: float, angle: float, colour: Color, light: np.ndarray, name: str) -> Part:
    """A clip jaw closed over a pipe: an arch across it and two teeth at its sides."""
    part = _strap(at, pipe_width + 16, 14, angle + np.pi / 2, colour, light, name)
    normal = _unit(angle + np.pi / 2)
    for side in (-1, 1):
        tooth = at + normal * side * (pipe_width / 2 + 6)
        part.shapes += _disc(tooth[0], tooth[1], 6, colour, light)
    return part


def _pipe_staple(rng: Rng) -> Scene:
    """Painted body panel: a black rubber hose held by a galvanised staple, a thin steel line."""
    light = _light(rng, _TOP_LEFT)
    j = lambda s=3.0: rng.uniform(-s, s)  # noqa: E731
    scene = Scene((400, 400), Surface((172, 174, 177), 0.06, 0.04, 0.025), light, [])
    parts = scene.parts
    stamping = _ellipse(300 + j(5), 330 + j(5), 150, 60, np.radians(-8))
    parts.append(Part([Shape(stamping, (158, 160, 163), 7)], "stamping", False))
    parts.append(_hole(70 + j(3), 80 + j(3), 9, (150, 152, 155), "drain"))
    scene.n_background = len(parts)
    angle = np.radians(j(4))
    origin = np.array([200.0 + j(5), 190.0 + j(6)])
    phase = rng.uniform(0, 2 * np.pi)
    hose = _straight(origin, angle, 0, 260, 10 + j(3), phase)
    line = _straight(origin, angle, 64 + j(2), 260, 10, phase)
    parts.append(_tube(line, 14, (168, 170, 174), light, "line"))
    width = 50 + j(2)
    parts.append(_tube(hose, width, (44, 44, 47), light, "hose", gloss=0.3))
    i = int(np.argmin(np.abs(hose[:, 0] - (200 + rng.uniform(-35, 35)))))
    at, normal = hose[i], _normals(hose)[i]
    tangent_angle = float(np.arctan2(normal[1], normal[0]))
    colour = _jitter(rng, (166, 168, 170) if rng.random() < 0.6 else (52, 52, 55), 0.04)  # zinc or black
    staple = _strap(at, width + 14, 24, tangent_angle, colour, light, "staple")
    rivets = []
    for side in (-1, 1):
        foot = at + normal * side * (width / 2 + 22)
        staple.shapes += [
            Shape(_rect(foot[0], foot[1], 32, 28, tangent_angle), _shade(colour, 0.8)),
            Shape(_rect(foot[0], foot[1], 26, 22, tangent_angle), colour),
        ]
        staple.shapes += _disc(foot[0], foot[1], 6, _shade(colour, 1.1), light)
        rivets.append(foot)
    scene.anchors["rivets"] = rivets
    parts.append(staple)
    return scene


def _tank_screw(rng: Rng) -> Scene:
    """Black plastic fuel tank with moulded ribs, a hose, a steel strap with three screws."""
    light = _light(rng, _TOP_LEFT)
    j = lambda s=6.0: rng.uniform(-s, s)  # noqa: E731
    scene = Scene((1000, 750), Surface((40, 40, 43), 0.12, 0.08, 0.05), light, [])
    parts = scene.parts
    for y in (90.0, 205.0, 660.0):
        rib = np.array([[-20, y + j()], [1020, y + j()]])
        shapes = [Shape(rib, (50, 50, 54), 44, False), Shape(rib + (0, -20), (64, 64, 68), 4, False)]
        parts.append(Part(shapes, "rib", False))
    scene.n_background = len(parts)
    hose = _bezier([(770 + j(), -70), (860 + j(), 90 + j()), (930 + j(), 220 + j()), (1080, 330)])
    parts.append(_tube(hose, 92, (34, 34, 36), light, "hose", gloss=0.25))
    start, end = np.array([-60.0, 560 + j(12)]), np.array([1060.0, 300 + j(12)])
    angle = float(np.arctan2(*(end - start)[::-1]))
    mid = (start + end) / 2
    steel = _jitter(rng, (150, 152, 150), 0.04)
    strap = _strap(mid, float(np.linalg.norm(end - start)), 150, angle, steel, light, "strap")
    for side in (-1, 1):
        groove = np.array([start, end]) + _unit(angle + np.pi / 2) * side * 52
        strap.shapes.append(Shape(groove, _shade(steel, 0.72), 6, False))
    parts.append(strap)
    head_colour = _jitter(rng, (198, 172, 82) if rng.random() < 0.7 else (168, 168, 162), 0.05)
    washer_colour = _jitter(rng, (172, 172, 166), 0.05)
    for i, t in enumerate((0.24, 0.5, 0.76)):
        at = start + (end - start) * (t + rng.uniform(-0.012, 0.012))
        scene.anchors[f"screw_{i}"] = (at, 36.0, 25.0, washer_colour)
        turn = rng.uniform(0, np.pi)
        parts.append(_screw(at, 36, 25, turn, washer_colour, head_colour, light, f"screw_{i}"))
    scene.anchors["screw_names"] = ["screw_0", "screw_1", "screw_2"]
    scene.anchors["hole_rim"] = _shade(steel, 1.06)
    scene.anchors["on_strap"] = True  # an empty hole is part of the standing strap
    return scene


def _underbody_pipes(rng: Rng) -> Scene:
    """Underbody: heat shield, chassis rail, four parallel pipes held by two black clips."""
    light = _light(rng, _TOP)
    j = lambda s=6.0: rng.uniform(-s, s)  # noqa: E731
    scene = Scene((1000, 750), Surface((72, 74, 77), 0.10, 0.08, 0.05), light, [])
    scene.anchors["muddy"] = True  # road dirt splashes on good images too
    parts = scene.parts
    shield = np.array([[-20, -20], [640 + j(10), -20], [400 + j(10), 250], [-20, 330 + j(10)]])
    grid = [(x + (y % 80) / 2, y) for y in range(20, 330, 40) for x in range(20, 640, 40)]
    dots = [Shape(_circle(x, y, 6), (150, 150, 148)) for x, y in grid if _inside(shield, x, y, 12)]
    plate = [Shape(shield, (100, 100, 100)), Shape(shield * 0.985 + 4, (134, 134, 131))]
    parts.append(Part(plate + dots, "shield", False))
    scene.n_background = len(parts)
    rail = np.array([[-40.0, 650 + j()], [1040.0, 610 + j()]])
    along = float(np.arctan2(*(rail[1] - rail[0])[::-1]))
    parts.append(_strap(rail.mean(axis=0), 1100, 120, along, (60, 60, 64), light, "rail"))
    angle = np.radians(-10 + j(2))
    origin = np.array([500.0 + j(), 400.0 + j()])
    scene.anchors.update(angle=angle, origin=origin)
    phase = rng.uniform(0, 2 * np.pi)
    pipes = (
        ("line_a", -78.0, 16.0, (182, 184, 187)),
        ("line_b", -48.0, 16.0, (176, 178, 182)),
        ("fuel", 0.0, 32.0, (40, 40, 43)),
        ("conduit", 58.0, 44.0, (88, 88, 93)),
    )
    for name, offset, width, colour in pipes:
        centre = _straight(origin, angle, offset + j(2), 600, 6 + j(3), phase, 64)
        part = _tube(centre, width, colour, light, name, gloss=0.3 if colour[0] < 100 else 0.5)
        if name == "conduit":
            normals = _normals(centre)
            for k in range(0, len(centre), 2):
                ring = np.array([centre[k] - normals[k] * width * 0.45, centre[k] + normals[k] * width * 0.45])
                part.shapes.append(Shape(ring, _shade(colour, 0.6), 5, False))
        parts.append(part)
    normal = _unit(angle + np.pi / 2)
    for i, s in enumerate((-250.0, 250.0)):
        at = origin + _unit(angle) * (s + j(20))
        block = _strap(at + normal * 5, 200, 50, angle + np.pi / 2, (34, 34, 37), light, f"clip_{i}")
        bolt = at + normal * 92
        block.shapes += _hex_head(bolt[0], bolt[1], 12, rng.uniform(0, np.pi), (118, 118, 115), light)
        parts.append(block)
    return scene


def _inside(polygon: np.ndarray, x: float, y: float, margin: float) -> bool:
    """Whether (x, y) lies inside a convex polygon (clockwise or not) by at least ``margin``."""
    edges = np.roll(polygon, -1, axis=0) - polygon
    rel = np.array([x, y]) - polygon
    cross = (edges[:, 0] * rel[:, 1] - edges[:, 1] * rel[:, 0]) / np.linalg.norm(edges, axis=1)
    return bool(np.all(cross > margin) or np.all(cross < -margin))


def _underbody_screw(rng: Rng) -> Scene:
    """Textured black underbody panel with vents, a panel step and four screws in bosses."""
    light = _light(rng, _TOP_LEFT)
    j = lambda s=6.0: rng.uniform(-s, s)  # noqa: E731
    scene = Scene((1000, 750), Surface((56, 56, 59), 0.10, 0.12, 0.07), light, [])
    parts = scene.parts
    step = np.array([[-20, 560 + j(10)], [1020, 470 + j(10)], [1020, 770], [-20, 770]])
    parts.append(Part([Shape(step, (66, 66, 70)), Shape(step[:2], (92, 92, 97), 5, False)], "step", False))
    for k in range(5):
        slot = np.array([[90 + 70 * k + j(2), 70 + j(2)], [90 + 70 * k + j(2), 190 + j(2)]])
        vent = [Shape(slot, (34, 34, 37), 22), Shape(slot + (2, 2), (26, 26, 28), 14)]
        parts.append(Part(vent, f"vent_{k}", False))
    y0, tilt = 360 + j(14), np.radians(j(3))
    names, centres = [], []
    for i, x in enumerate((170.0, 400.0, 630.0, 860.0)):
        at = np.array([x + j(10), y0 + (x - 500) * np.tan(tilt) + j(6)])
        centres.append(at)
        boss = [Shape(_circle(at[0], at[1], 46), (50, 50, 53)), Shape(_circle(at[0], at[1], 42), (66, 66, 70))]
        parts.append(Part(boss, f"boss_{i}", False))
        names.append(f"screw_{i}")
    scene.n_background = len(parts)
    washer_colour, head_colour = _jitter(rng, (150, 150, 146), 0.08), _jitter(rng, (104, 104, 100), 0.08)
    for name, at in zip(names, centres):
        scene.anchors[name] = (at, 30.0, 19.0, washer_colour)
        parts.append(_screw(at, 30, 19, rng.uniform(0, np.pi), washer_colour, head_colour, light, name))
    scene.anchors["screw_names"] = names
    scene.anchors["hole_rim"] = (74.0, 74.0, 78.0)
    return scene


SCENES: dict[str, Callable[[Rng], Scene]] = {
    "engine_wiring": _engine_wiring,
    "pipe_clip": _pipe_clip,
    "pipe_staple": _pipe_staple,
    "tank_screw": _tank_screw,
    "underbody_pipes": _underbody_pipes,
    "underbody_screw": _underbody_screw,
}


# --------------------------------------------------------------------------------------
# Defects: each mutates the scene and returns the instance's footprint shapes
# --------------------------------------------------------------------------------------

Defect = Callable[[Scene, Rng, int], list[Shape]]


def _fastening(scene: Scene, rng: Rng, instance: int) -> list[Shape]:
    """One bracket band has come open: it hangs rotated about one end, off the cables."""
    name = "band_upper" if rng.random() < 0.5 else "band_lower"
    old = scene.ghost(name, instance)
    cx, cy, length, thickness, angle = scene.anchors[name]  # type: ignore[misc]
    side = 1 if rng.random() < 0.5 else -1
    pivot = np.array([cx, cy]) - side * _unit(angle) * length / 2
    turn = side * np.radians(rng.uniform(6, 30))
    centre = _rotate(np.array([[cx, cy]]), turn, pivot)[0] + (0, rng.uniform(-8, 8))
    new = _strap(centre, length, thickness, angle + turn, (205, 208, 212), scene.light, f"{name}:open")
    new.instance = instance
    scene.insert_after(name, new)
    return old.shapes[:1] + new.shapes[:1]


def _blue_hoop_defect(scene: Scene, rng: Rng, instance: int) -> list[Shape]:
    """The blue cable tie is missing, of the wrong colour, or slid along the cables."""
    old = scene.ghost("hoop", instance)
    variant = int(rng.integers(3))
    if variant == 0:
        return old.shapes
    cx, cy, length, thickness, angle = scene.anchors["hoop"]  # type: ignore[misc]
    colour: Color = (28, 46, 186)
    if variant == 1:
        wrong = [(225, 225, 220), (30, 30, 32), (190, 40, 36), (24, 30, 96)]  # white, black, red, navy
        colour = wrong[int(rng.integers(len(wrong)))]
    else:
        cy += rng.choice([-1, 1]) * rng.uniform(15, 45)
    new = _blue_hoop((cx, cy, length, thickness, angle), colour, scene.light)
    new.name, new.instance = "hoop:new", instance
    scene.insert_after("hoop", new)
    return (old.shapes if variant == 2 else []) + new.shapes


def _place(scene: Scene, rng: Rng, radius: float) -> np.ndarray:
    """A centre for a new foreign object, away from earlier defects of the image if possible."""
    width, height = scene.size
    for _ in range(30):
        c = np.array([rng.uniform(0.15, 0.85) * width, rng.uniform(0.15, 0.85) * height])
        if scene.is_free((c[0] - radius, c[1] - radius, c[0] + radius, c[1] + radius)):
            return c
    return c


def _add_on_top(scene: Scene, shapes: list[Shape], name: str, instance: int) -> list[Shape]:
    scene.parts.append(Part(shapes, name, True, instance))
    return shapes


def _cardboard(scene: Scene, rng: Rng, instance: int) -> list[Shape]:
    """A torn piece of corrugated cardboard lying on the parts."""
    length, depth = rng.uniform(35, 100), rng.uniform(25, 75)
    c = _place(scene, rng, max(length, depth) / 2)
    angle = rng.uniform(0, np.pi)
    quad = _rect(c[0], c[1], length, depth, angle) + rng.uniform(-6, 6, size=(4, 2))
    colour = _jitter(rng, (176, 140, 94), 0.08)
    shapes = [Shape(quad, colour)]
    for t in np.linspace(0.08, 0.92, int(length // 7)):
        a, b = quad[0] + (quad[1] - quad[0]) * t, quad[3] + (quad[2] - quad[3]) * t
        flute = np.array([a + (b - a) * 0.04, b - (b - a) * 0.04])
        shapes.append(Shape(flute, _shade(colour, 0.84), 2, False))
    return _add_on_top(scene, shapes, "cardboard", instance)


def _obstruction(scene: Scene, rng: Rng, instance: int) -> list[Shape]:
    """A foreign object: rubber or plastic scrap, a rag, a mud clump or a screwdriver."""
    f = scene.scale_factor
    variant = int(rng.integers(3))
    if variant == 2:
        return _add_on_top(scene, _screwdriver(scene, rng, f), "obstruction", instance)
    r = rng.uniform(9, 40) * f
    c = _place(scene, rng, r)
    colours = [(34, 34, 37), (178, 36, 30), (226, 224, 216), (128, 96, 64), (60, 88, 150)]
    colour = colours[int(rng.integers(len(colours)))]
    blob = _blob(rng, c[0], c[1], r, 0.5 if variant == 0 else 0.25)
    shapes = [Shape(blob, _shade(colour, 0.7)), Shape((blob - c) * 0.85 + c + scene.light * r * 0.08, colour)]
    for _ in range(int(rng.integers(2, 6))):
        fold = c + rng.uniform(-0.6, 0.6, size=(2, 2)) * r
        shapes.append(Shape(fold, _shade(colour, rng.choice([0.75, 1.2])), 2 * f, True))
    return _add_on_top(scene, shapes, "obstruction", instance)


def _screwdriver(scene: Scene, rng: Rng, f: float) -> list[Shape]:
    """A forgotten screwdriver: coloured handle and a steel shaft."""
    handle_len, shaft_len = rng.uniform(45, 60) * f, rng.uniform(45, 70) * f
    c = _place(scene, rng, (handle_len + shaft_len) / 2)
    axis = _unit(rng.uniform(0, 2 * np.pi))
    handle = np.array([c - axis * handle_len, c])
    shaft = np.array([c, c + axis * shaft_len])
    colour = [(200, 40, 30), (230, 190, 30), (40, 80, 180)][int(rng.integers(3))]
    steel = (190.0, 192.0, 196.0)
    return _tube(handle, 16 * f, colour, scene.light).shapes + _tube(shaft, 5 * f, steel, scene.light).shapes


def _glove(scene: Scene, rng: Rng, instance: int) -> list[Shape]:
    """An operator's gloved hand reaching in from an image edge."""
    width, height = scene.size
    r = rng.uniform(34, 44) * scene.scale_factor
    side = int(rng.integers(4))
    inward = [0.0, np.pi / 2, np.pi, -np.pi / 2][side]  # from left, top, right, bottom edge
    along = rng.uniform(0.25, 0.75)
    edge = [(0, along * height), (along * width, 0), (width, along * height), (along * width, height)][side]
    direction = inward + np.radians(rng.uniform(-30, 30))
    palm_c = np.array(edge) + _unit(direction) * r * rng.uniform(1.6, 2.4)
    colour = [(84, 124, 200), (214, 214, 208), (46, 46, 50)][int(rng.integers(3))]
    light = scene.light
    shapes = _tube(np.array([palm_c - _unit(direction) * r * 3.5, palm_c]), r * 1.5, _shade(colour, 0.92), light).shapes
    shapes += [
        Shape(_ellipse(palm_c[0], palm_c[1], r * 1.1, r * 0.95, direction), _shade(colour, 0.8)),
        Shape(_ellipse(palm_c[0], palm_c[1], r, r * 0.85, direction), colour),
    ]
    for spread, length in ((-0.42, 1.0), (-0.14, 1.15), (0.14, 1.1), (0.42, 0.9), (1.35, 0.8)):
        base = palm_c + _unit(direction + spread) * r * 0.75
        tip = base + _unit(direction + spread * 0.5) * r * length
        finger = np.array([base, (base + tip) / 2 + _unit(direction + np.pi / 2) * rng.uniform(-2, 2), tip])
        shapes += _tube(finger, r * 0.36, colour, light).shapes
    return _add_on_top(scene, shapes, "glove", instance)


def _unclipped(scene: Scene, rng: Rng, instance: int) -> list[Shape]:
    """A pipe has popped out of its clip jaw: it bulges sideways over the clip; the jaw is
    either open (sticking out) or broken off."""
    name = "pipe_a" if rng.random() < 0.5 else "pipe_b"
    centre, width, colour, offset = scene.anchors[name]  # type: ignore[misc]
    angle, clip_at = scene.anchors["angle"], scene.anchors["clip_at"]
    axis, normal = _unit(angle), _unit(angle + np.pi / 2)  # type: ignore[arg-type]
    s = (centre - clip_at) @ axis
    half_span, height = rng.uniform(40, 80), width * rng.uniform(0.35, 1.5) * np.sign(offset)
    bump = np.where(np.abs(s) < half_span, np.cos(np.clip(s / half_span, -1, 1) * np.pi / 2) ** 2, 0.0)
    moved = centre + (height * bump)[:, None] * normal
    pipe = _tube(moved, width, colour, scene.light, name)
    pipe.instance = instance
    scene.parts[scene.index(name)] = pipe
    jaw = scene.ghost(f"jaw_{name[-1]}", instance)
    lifted = [Shape(moved[bump > 0.3], colour, width), Shape(centre[bump > 0.6], colour, width)]
    if rng.random() < 0.5:
        return jaw.shapes + lifted
    jaw_at = clip_at + normal * offset  # type: ignore[operator]
    open_at = jaw_at + normal * np.sign(offset) * (width / 2 + 10) + axis * 8
    open_angle = angle + np.pi / 2 + np.radians(rng.uniform(50, 75))  # type: ignore[operator]
    open_jaw = _strap(open_at, width + 16, 14, open_angle, scene.anchors["clip_colour"], scene.light, "jaw:open")
    open_jaw.instance = instance
    scene.parts.append(open_jaw)
    return jaw.shapes + open_jaw.shapes + lifted


def _missing_staple(scene: Scene, rng: Rng, instance: int) -> list[Shape]:
    """The staple is gone: only its two rivet holes remain."""
    old = scene.ghost("staple", instance)
    rivets: list[np.ndarray] = scene.anchors["rivets"]  # type: ignore[assignment]
    holes = Part([Shape(_circle(p[0], p[1], 4), (30, 30, 32)) for p in rivets], "holes", False, instance)
    scene.insert_after("staple", holes)
    return old.shapes


def _missing_screw(scene: Scene, rng: Rng, instance: int) -> list[Shape]:
    """One screw is missing: either all of it (the bare threaded hole shows) or only its head
    (the washer is left around the hole, a subtler change). The mask is the missing part."""
    names = scene.anchors["screw_names"]
    name = names[int(rng.integers(len(names)))]  # type: ignore[arg-type]
    scene.ghost(name, instance)
    at, washer, head, washer_colour = scene.anchors[name]  # type: ignore[misc]
    if rng.random() < 0.5:
        on_strap = bool(scene.anchors.get("on_strap"))
        hole = _hole(at[0], at[1], head * 0.4, scene.anchors["hole_rim"], "hole", on_strap)  # type: ignore[arg-type]
        radius = washer
    else:
        hole = Part(_disc(at[0], at[1], washer, washer_colour, scene.light), "hole", True)
        hole.shapes.append(Shape(_circle(at[0], at[1], head * 0.4), (18, 18, 20)))
        radius = head
    hole.instance = instance
    scene.insert_after(name, hole)
    return [Shape(_circle(at[0], at[1], radius), (0, 0, 0))]


def _scratch(scene: Scene, rng: Rng, instance: int) -> list[Shape]:
    """A thin scratch on the bare surface, lighter (dark surfaces) or darker than it."""
    f = scene.scale_factor
    start = _free_point(scene, rng, 14 * f)
    length, heading = rng.uniform(50, 110) * f, rng.uniform(0, 2 * np.pi)
    turn = rng.uniform(-0.5, 0.5)
    t = np.linspace(0, 1, 10)[:, None]
    direction = heading + turn * t[:, 0]
    points = start + length * np.stack([np.cos(direction), np.sin(direction)], axis=1) * t
    base = scene.surface.colour
    contrast = rng.uniform(1.45, 2.0) if np.mean(base) < 128 else rng.uniform(0.55, 0.75)
    shapes = [Shape(points, _shade(base, contrast), rng.uniform(2.0, 3.0) * f)]
    scene.add_on_surface(Part(shapes, "scratch", False, instance))
    return shapes


def _free_point(scene: Scene, rng: Rng, margin: float) -> np.ndarray:
    """A random point of bare surface (no standing part within ``margin``), inside the frame."""
    width, height = scene.size
    step = 8
    canvas = Image.new("L", (width // step, height // step))
    draw = ImageDraw.Draw(canvas)
    for part in scene.parts:
        if part.standing:
            _draw_shapes(draw, part.shapes, np.eye(2) / step, np.zeros(2), 255, min_width=1)
    grow = 2 * int(margin // step) + 1
    occupied = np.asarray(canvas.filter(ImageFilter.MaxFilter(max(3, grow)))) > 0
    border = int(0.12 * min(width, height) / step)
    inner = np.zeros_like(occupied)
    inner[border:-border, border:-border] = True
    occupied |= ~inner
    free = np.argwhere(~occupied)
    if len(free) == 0:
        return np.array([rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height])
    y, x = free[int(rng.integers(len(free)))]
    return np.array([(x + 0.5) * step, (y + 0.5) * step])


def _clutter(scene: Scene, rng: Rng) -> None:
    """Normal dirt of a production line, in good and defective images alike: dust specks
    everywhere, now and then an inspector's paint-marker stroke. Not defects: no masks."""
    f = scene.scale_factor
    width, height = scene.size
    base = scene.surface.colour
    for _ in range(int(rng.poisson(10 * f))):
        c = (rng.uniform(0, width), rng.uniform(0, height))
        tone = rng.uniform(1.3, 1.7) if np.mean(base) < 128 else rng.uniform(0.6, 0.8)
        speck = _circle(c[0], c[1], rng.uniform(0.8, 2.2) * np.sqrt(f), 8)
        scene.add_on_surface(Part([Shape(speck, _shade(base, tone))], "dust", False))
    if rng.random() < 0.2:
        start = _free_point(scene, rng, 10 * f)
        stroke = start + np.cumsum(rng.uniform(-1, 1, size=(3, 2)) * 16 * f, axis=0)
        colour = [(235, 235, 228), (230, 200, 40), (60, 160, 220)][int(rng.integers(3))]
        scene.add_on_surface(Part([Shape(stroke, colour, 3.5 * f)], "marker", False))
    if scene.anchors.get("muddy") and rng.random() < 0.5:
        for _ in range(int(rng.integers(1, 4))):
            c = _place(scene, rng, 0)
            colour = _jitter(rng, (96, 82, 64), 0.15)
            splash = _blob(rng, c[0], c[1], rng.uniform(4, 14) * f, 0.6)
            scene.parts.append(Part([Shape(splash, colour)], "mud", False))


DEFECTS: dict[str, Defect] = {
    "fastening": _fastening,
    "blue_hoop": _blue_hoop_defect,
    "cardboard": _cardboard,
    "obstruction": _obstruction,
    "glove": _glove,
    "unclipped": _unclipped,
    "scratch": _scratch,
}
_MISSING: dict[str, Defect] = {
    "pipe_staple": _missing_staple,
    "tank_screw": _missing_screw,
    "underbody_screw": _missing_screw,
}


def _defect(object_name: str, kind: str) -> Defect:
    return _MISSING[object_name] if kind == "missing" else DEFECTS[kind]


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Camera:
    """Native scene coordinates -> output pixels: ``scale * (rotation @ p + shift)``."""

    matrix: np.ndarray  # 2x2
    shift: np.ndarray  # 2

    @staticmethod
    def jittered(rng: Rng, size: tuple[int, int]) -> Camera:
        """A small random camera move: +-2.5 degrees, +-3% shift, +-3% zoom, about the centre."""
        angle = np.radians(rng.uniform(-2.5, 2.5))
        zoom = rng.uniform(0.97, 1.03)
        c = np.array(size, dtype=float) / 2
        rot = zoom * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        shift = c - rot @ c + rng.uniform(-0.03, 0.03, size=2) * size
        return Camera(rot, shift)


def _draw_shapes(
    draw: ImageDraw.ImageDraw,
    shapes: Sequence[Shape],
    matrix: np.ndarray,
    shift: np.ndarray,
    fill: int | None = None,
    min_width: int = _SUPERSAMPLE,
) -> None:
    """Draw shapes through ``p -> matrix @ p + shift``; ``fill`` overrides their colours.

    Strokes are at least ``min_width`` canvas pixels wide (one output pixel on a
    supersampled canvas); with ``min_width=0`` strokes thinner than half a pixel are skipped
    (the shadow canvas: a wire that thin casts no visible shadow).
    """
    unit = float(np.sqrt(abs(np.linalg.det(matrix))))
    for shape in shapes:
        if len(shape.points) == 0:
            continue
        pts = shape.points @ matrix.T + shift
        colour = fill if fill is not None else tuple(int(round(c)) for c in shape.fill)
        if shape.width == 0:
            draw.polygon(pts.ravel().tolist(), fill=colour)
            continue
        width = max(min_width, int(round(shape.width * unit)))
        if width == 0:
            continue
        draw.line(pts.ravel().tolist(), fill=colour, width=width, joint="curve")
        if shape.round_caps and width > 3:
            r = width / 2
            for x, y in (pts[0], pts[-1]):
                draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)


def _smooth_noise(rng: Rng, height: int, width: int, cells_y: int, cells_x: int) -> np.ndarray:
    """Zero-mean, unit-ish noise, smooth at the scale of one of ``cells_y x cells_x`` cells."""
    coarse = rng.standard_normal((cells_y + 1, cells_x + 1), dtype=np.float32)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))


def _illumination(rng: Rng, light: np.ndarray, height: int, width: int) -> np.ndarray:
    """Lighting field [H, W]: exposure times (1 + a gradient toward the light - a vignette).

    The field is a sum of a function of x and one of y, so it costs one broadcast add.
    """
    y = np.linspace(-1, 1, height, dtype=np.float32)
    x = np.linspace(-1, 1, width, dtype=np.float32)
    gradient, vignette = rng.uniform(0.10, 0.22), rng.uniform(0.05, 0.15) / 2
    exposure = rng.uniform(0.93, 1.07)
    fx = exposure * (gradient * light[0] * x - vignette * x * x)
    fy = exposure * (1 + gradient * light[1] * y - vignette * y * y)
    return fy[:, None] + fx[None, :]


def _output_size(native: tuple[int, int], scale: float) -> tuple[int, int]:
    return max(8, round(native[0] * scale)), max(8, round(native[1] * scale))


def _pixel_map(scene: Scene, camera: Camera, out: tuple[int, int], factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Matrix and shift from native scene coordinates to pixels of a ``factor``-times canvas."""
    k = np.diag([out[0] / scene.size[0], out[1] / scene.size[1]]) * factor
    return k @ camera.matrix, k @ camera.shift


_LOW_RES = 0.25
"""Shadows and surface stains are smooth: computed at this fraction of the output size."""


def _low_frequency(scene: Scene, camera: Camera, rng: Rng, out: tuple[int, int]) -> np.ndarray:
    """Surface stains and grain times (1 - soft shadow of the standing parts), [H, W].

    Computed at :data:`_LOW_RES` of the output size and upsampled once (cheap and smooth);
    the shadow is cast away from the light.
    """
    small = (max(2, round(out[0] * _LOW_RES)), max(2, round(out[1] * _LOW_RES)))
    canvas = Image.new("L", small)
    matrix, shift = _pixel_map(scene, camera, out, _LOW_RES)
    shift = shift - scene.light * 6 * _LOW_RES * out[0] / scene.size[0]
    draw = ImageDraw.Draw(canvas)
    for part in scene.parts:
        if part.standing:
            _draw_shapes(draw, part.shapes, matrix, shift, 255, min_width=0)
    radius = max(0.5, 4.0 * _LOW_RES * out[0] / scene.size[0])
    shadow = np.asarray(canvas.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32) / 255
    surface = scene.surface
    stains = 1.0 + surface.blotch * rng.uniform(0.5, 1.8) * _smooth_noise(rng, small[1], small[0], 3, 4)
    stains += surface.grain * _smooth_noise(rng, small[1], small[0], 30, 40)
    field = stains * (1 - rng.uniform(0.35, 0.5) * shadow)
    return np.array(Image.fromarray(field).resize(out, Image.Resampling.BILINEAR))


def _visual_order(parts: list[Part]) -> list[Part]:
    """Parts in the order they are seen painted: flat ones first, then standing ones."""
    return [p for p in parts if not p.standing] + [p for p in parts if p.standing]


def render_image(scene: Scene, camera: Camera, rng: Rng, out: tuple[int, int]) -> np.ndarray:
    """Render a scene to uint8 [H, W, 3] of output size ``out`` = (W, H).

    Flat parts are painted into the surface's colour (they keep its texture), standing parts
    over it; both at twice the output size, box-filtered down (anti-aliasing). The surface
    gets its stains, grain, roughness and the standing parts' soft shadows, then the whole
    is lit and given sensor noise.
    """
    width, height = out
    big = (width * _SUPERSAMPLE, height * _SUPERSAMPLE)
    tint = np.asarray(scene.surface.colour) * (1 + rng.uniform(-0.03, 0.03, 3))
    flat = Image.new("RGB", big, tuple(int(round(c)) for c in np.clip(tint, 0, 255)))
    colour, alpha = Image.new("RGB", big), Image.new("L", big)
    matrix, shift = _pixel_map(scene, camera, out, _SUPERSAMPLE)
    draw_flat, draw_colour = ImageDraw.Draw(flat), ImageDraw.Draw(colour)
    draw_alpha = ImageDraw.Draw(alpha)
    for part in scene.parts:
        if part.standing:
            _draw_shapes(draw_colour, part.shapes, matrix, shift)
            _draw_shapes(draw_alpha, part.shapes, matrix, shift, 255)
        else:
            _draw_shapes(draw_flat, part.shapes, matrix, shift)
    surface_rgb = np.asarray(flat.reduce(_SUPERSAMPLE), dtype=np.float32)
    parts_rgb = np.asarray(colour.reduce(_SUPERSAMPLE), dtype=np.float32)
    bare = 1 - np.asarray(alpha.reduce(_SUPERSAMPLE), dtype=np.float32) / 255
    surface = _low_frequency(scene, camera, rng, out)
    surface += scene.surface.speckle * rng.standard_normal((height, width), dtype=np.float32)
    light = _illumination(rng, scene.light, height, width)
    image = (surface * bare * light)[:, :, None] * surface_rgb
    image += parts_rgb * light[:, :, None]
    noise = rng.standard_normal((height, width), dtype=np.float32) * rng.uniform(1.2, 2.2) + 0.5
    image += noise[:, :, None]
    return np.clip(image, 0, 255, out=image).astype(np.uint8)


def render_mask(
    scene: Scene, camera: Camera, instance: int, footprint: list[Shape], out: tuple[int, int]
) -> np.ndarray:
    """Bool [H, W]: the instance's footprint minus what parts painted above it hide.

    The instance sits at the depth of its first standing part (a removed part's ghost keeps
    that depth), or of its first flat part if it has no standing one (a scratch).
    """
    ss = _SUPERSAMPLE
    canvas = Image.new("L", (out[0] * ss, out[1] * ss))
    draw = ImageDraw.Draw(canvas)
    matrix, shift = _pixel_map(scene, camera, out, ss)
    _draw_shapes(draw, footprint, matrix, shift, 255)
    parts = _visual_order(scene.parts)
    own = [i for i, part in enumerate(parts) if part.instance == instance]
    standing = [i for i in own if parts[i].standing]
    depth = standing[0] if standing else own[0]  # a removed standing part sets the depth
    for part in parts[depth + 1 :]:
        if part.instance != instance:
            _draw_shapes(draw, part.shapes, matrix, shift, 0)
    coverage = np.asarray(canvas.reduce(ss))
    mask = coverage >= 128
    return mask if mask.any() else coverage > 0


# --------------------------------------------------------------------------------------
# Writing the tree
# --------------------------------------------------------------------------------------


def image_rng(seed: int, object_name: str, split: str, folder: str, index: int) -> Rng:
    """The random stream of one image file, independent of every other file's.

    Names are hashed with CRC32, which (unlike ``hash``) is stable across processes.
    """
    words = [seed, *(zlib.crc32(name.encode()) for name in (object_name, split, folder)), index]
    return np.random.default_rng(np.random.SeedSequence(words))


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def generate_image(
    object_name: str, kinds: Sequence[str], rng: Rng, scale: float
) -> tuple[np.ndarray, list[tuple[DefectKind, np.ndarray]]]:
    """One image of ``object_name`` with defect instances of ``kinds`` (empty: a good image).

    Returns the uint8 [H, W, 3] image and, per instance, its kind and bool mask; an
    instance left fully hidden by a later one is dropped. The scene, the defects and the
    camera/lighting/noise draw from three streams spawned from ``rng``, so a generator
    seeded alike renders the same scene and look with or without defects: the two images
    differ only where the defects (and their shadows) are.
    """
    scene_rng, defect_rng, look_rng = rng.spawn(3)
    scene = SCENES[object_name](scene_rng)
    _clutter(scene, scene_rng)
    footprints = []
    for i, kind in enumerate(kinds):
        shapes = _defect(object_name, kind)(scene, defect_rng, i)
        scene.reserve(shapes)
        footprints.append((kind, shapes))
    camera = Camera.jittered(look_rng, scene.size)
    out = _output_size(scene.size, scale)
    image = render_image(scene, camera, look_rng, out)
    by_name = {kind.name: kind for kind in DEFECT_KINDS[object_name]}
    masks = [
        (by_name[kind], render_mask(scene, camera, i, shapes, out)) for i, (kind, shapes) in enumerate(footprints)
    ]
    masks = [(kind, mask) for kind, mask in masks if mask.any()]
    if kinds and not masks:
        raise RuntimeError(f"generator bug: every defect of a {object_name} image is invisible")
    return image, masks


def _write_object(root: Path, object_name: str, counts: dict[str, int], scale: float, seed: int) -> None:
    """Write one object's whole tree under ``root / object_name``."""
    folder = root / object_name
    if folder.exists() and any(folder.iterdir()):
        raise DataError(f"refusing to generate into non-empty folder {folder}")
    jobs = [("train", "good", counts["train"])] + [("test", "good", counts["test_good"])]
    jobs += [("test", defect, counts["test_defective"]) for defect in TEST_FOLDERS[object_name]]
    for split, defect, count in jobs:
        (folder / split / defect).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            rng = image_rng(seed, object_name, split, defect, index)
            kinds = [] if defect == "good" else _folder_kinds(object_name, defect, rng)
            image, masks = generate_image(object_name, kinds, rng, scale)
            stem = f"{index:04d}"
            _save_png(image, folder / split / defect / f"{stem}.png")
            if masks:
                gt = folder / "ground_truth" / defect / stem
                gt.mkdir(parents=True, exist_ok=True)
                for k, (kind, mask) in enumerate(masks):
                    _save_png(mask.astype(np.uint8) * np.uint8(kind.pixel_value), gt / f"{k:03d}.png")
    config = [kind.config_entry(scale) for kind in DEFECT_KINDS[object_name]]
    (folder / "defects_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / "readme.md").write_text(_readme(object_name, counts, scale, seed), encoding="utf-8")


def _readme(object_name: str, counts: dict[str, int], scale: float, seed: int) -> str:
    width, height = _output_size(object_info(object_name).native_size, scale)
    kinds = ", ".join(f"{k.name} ({k.pixel_value})" for k in DEFECT_KINDS[object_name])
    return (
        f"# {object_name} (synthetic)\n\n"
        "Generated by fedpatch.data.synthetic (not the real AutoVI data; same folder layout).\n\n"
        f"- generator version {GENERATOR_VERSION}, seed {seed}, scale {scale}: {width}x{height} images\n"
        f"- train/good: {counts['train']}, test/good: {counts['test_good']}, "
        f"{counts['test_defective']} per defect folder ({', '.join(TEST_FOLDERS[object_name])})\n"
        f"- defect kinds (pixel value): {kinds}\n"
    )


def generate_autovi_dataset(
    root: str | Path,
    objects: str | Sequence[str] = "all",
    n_train: int = DEFAULT_N_TRAIN,
    n_test_good: int = DEFAULT_N_TEST_GOOD,
    n_test_defective: int = DEFAULT_N_TEST_DEFECTIVE,
    scale: float = 1.0,
    seed: int = 0,
) -> Path:
    """Write a synthetic dataset in the AutoVI v1.0 layout under ``root``; return ``root``.

    Per object: ``train/good``, ``test/good``, ``test/<folder>`` for each of
    :data:`TEST_FOLDERS` (``n_test_defective`` images each), ``ground_truth/<folder>/<stem>/
    NNN.png`` (one mask per defect instance), ``defects_config.json`` and ``readme.md``.
    Images are the object's native size (400x400 or 1000x750) times ``scale``. The same
    seed gives byte-identical files; an object's files do not depend on the other objects.
    An object folder that exists and is not empty is a DataError (nothing is overwritten);
    counts below 0 (train: below 1) or a scale outside (0, 4] are a ConfigError.
    """
    names = object_list(objects, AUTOVI_OBJECTS)
    for name in names:
        object_info(name)
    if n_train < 1 or n_test_good < 0 or n_test_defective < 0:
        raise ConfigError(
            f"need n_train >= 1 and non-negative test counts, got {n_train}, {n_test_good}, {n_test_defective}"
        )
    if not 0 < scale <= 4:
        raise ConfigError(f"scale must be in (0, 4], got {scale}")
    counts = {"train": n_train, "test_good": n_test_good, "test_defective": n_test_defective}
    root = Path(root)
    for name in names:
        _write_object(root, name, counts, scale, seed)
    return root


# --------------------------------------------------------------------------------------
# The default dataset, generated once into a cache folder
# --------------------------------------------------------------------------------------


def default_dataset_path(cache_dir: str | Path | None = None) -> Path:
    """Where the default set lives: ``<cache>/synthetic-autovi-v<version>``.

    ``<cache>`` is ``cache_dir``, else ``$FEDPATCH_CACHE``, else ``~/.cache/fedpatch``.
    """
    if cache_dir:
        base = Path(cache_dir)
    else:
        base = Path(os.environ.get("FEDPATCH_CACHE") or Path.home() / ".cache" / "fedpatch")
    return base / f"synthetic-autovi-v{GENERATOR_VERSION}"


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock (POSIX ``flock``) so concurrent callers generate only once."""
    try:
        import fcntl
    except ImportError:  # no flock: a concurrent caller may duplicate work, never corrupt it
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def ensure_default_dataset(cache_dir: str | Path | None = None) -> Path:
    """The default synthetic AutoVI set (all six objects, default counts, scale 1, seed 0).

    Generated on first use into :func:`default_dataset_path` (a message on stderr says
    where), into a temporary sibling folder that is renamed into place only after
    :data:`COMPLETE_MARKER` is written, so an interrupted run is never reused.
    """
    target = default_dataset_path(cache_dir)
    if (target / COMPLETE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f"{target.name}.lock"):
        if (target / COMPLETE_MARKER).is_file():
            return target
        print(f"fedpatch: generating the default synthetic AutoVI dataset in {target} (once)", file=sys.stderr)
        partial = Path(tempfile.mkdtemp(prefix=f"{target.name}.partial-", dir=target.parent))
        try:
            started = time.perf_counter()
            generate_autovi_dataset(partial)
            seconds = round(time.perf_counter() - started, 1)
            marker = {"generator_version": GENERATOR_VERSION, "seconds": seconds}
            (partial / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
            if target.exists():
                shutil.rmtree(target)
            os.replace(partial, target)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return target

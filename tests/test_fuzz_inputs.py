"""Bad input, tried systematically: a fuzz corpus generated into tmp_path plus property-based
tests (hypothesis, few examples, no deadline) for every file or record fedpatch reads.

The rule checked everywhere: a bad input gives a FedPatchError subclass (DataError,
ConfigError, ModelFileError, ReplyError, BankValidationError) whose message names the file or
field, never another exception type, a hang, or a huge allocation; and the command line turns
it into one line on stderr with exit status 2.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.numpy import save_file

from fedpatch import cli
from fedpatch.config import config_from_dict, load_config
from fedpatch.data.autovi import read_defects_config
from fedpatch.data.io import MAX_IMAGE_PIXELS, image_size, load_image, load_mask
from fedpatch.errors import BankValidationError, ConfigError, DataError, FedPatchError, ModelFileError, WeightsUnavailableError
from fedpatch.federated import RunRequest
from fedpatch.federated.errors import ReplyError
from fedpatch.patchcore import PatchCore, read_model_file

FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Images and masks
# --------------------------------------------------------------------------------------------
def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width x height`` RGB pixels (a decompression bomb
    in miniature: the few data bytes could never fill it)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


RGB = (np.random.default_rng(0).random((12, 16, 3)) * 255).astype(np.uint8)
GREY = RGB[..., 0]

# name -> (file bytes, expected outcome of load_image, expected outcome of load_mask);
# an outcome is "ok" or a fragment of the DataError message.
CORPUS: dict[str, tuple[bytes, str, str]] = {
    "zero.png": (b"", "empty (0 bytes)", "empty (0 bytes)"),
    "random.png": (bytes(np.random.default_rng(1).integers(0, 256, 600, dtype=np.uint8)), "not an image Pillow can read", "not an image Pillow can read"),
    "text.jpg": (b"this is not a jpeg\n" * 10, "not an image Pillow can read", "not an image Pillow can read"),
    "truncated.png": (_encode(Image.fromarray(RGB), "PNG")[:70], "truncated or corrupt", "truncated or corrupt"),
    "truncated.jpg": (_encode(Image.fromarray(RGB), "JPEG")[:300], "truncated or corrupt", "truncated or corrupt"),
    "truncated.tiff": (_encode(Image.fromarray(RGB), "TIFF")[:200], "truncated or corrupt", "truncated or corrupt"),
    "bomb.png": (_png_declaring(100_000, 100_000), "too large to decode safely", "too large to decode safely"),
    "over_limit.png": (_png_declaring(8_000, 8_000), "refused before decoding", "refused before decoding"),
    "zero_width.png": (_png_declaring(0, 10), "not an image Pillow can read", "not an image Pillow can read"),
    "cmyk.jpg": (_encode(Image.fromarray(RGB).convert("CMYK"), "JPEG"), "ok", "ok"),
    "sixteen.png": (_encode(Image.fromarray(GREY.astype(np.uint16) * 257), "PNG"), "ok", "values above 255"),
    "la.png": (_encode(Image.fromarray(RGB).convert("LA"), "PNG"), "ok", "ok"),
    "palette.png": (_encode(Image.fromarray(RGB).convert("P"), "PNG"), "ok", "ok"),
    "bilevel.png": (_encode(Image.fromarray(RGB).convert("1"), "PNG"), "ok", "ok"),
    "float.tiff": (_encode(Image.fromarray(GREY.astype(np.float32)), "TIFF"), "floating-point (mode F)", "floating-point (mode F)"),
    "int32.tiff": (_encode(Image.fromarray(GREY.astype(np.int32) * 100_000), "TIFF"), "outside [0, 65535]", "values above 255"),
    "rgba.tiff": (_encode(Image.fromarray(RGB).convert("RGBA"), "TIFF"), "ok", "ok"),
    "animated.gif": (_encode(Image.fromarray(RGB).convert("P"), "GIF"), "ok", "ok"),
    "webp_named.png": (_encode(Image.fromarray(RGB), "WEBP"), "ok", "ok"),
}


@pytest.fixture
def corpus(tmp_path: Path) -> dict[str, Path]:
    paths = {}
    for name, (content, _, _) in CORPUS.items():
        paths[name] = tmp_path / name
        paths[name].write_bytes(content)
    return paths


@pytest.mark.parametrize("name", list(CORPUS))
def test_image_corpus(corpus: dict[str, Path], name: str) -> None:
    path = corpus[name]
    _, image_outcome, mask_outcome = CORPUS[name]
    for loader, outcome in ((load_image, image_outcome), (load_mask, mask_outcome)):
        started = time.perf_counter()
        if outcome == "ok":
            array = loader(path)
            assert array.dtype == np.uint8 and array.shape[:2] == (12, 16)
            assert array.shape == ((12, 16, 3) if loader is load_image else (12, 16))
        else:
            with pytest.raises(DataError) as error:
                loader(path)
            assert str(path) in str(error.value) and outcome in str(error.value)
        assert time.perf_counter() - started < 5.0


def test_huge_headers_are_refused_from_the_header(corpus: dict[str, Path]) -> None:
    """Neither the 10-gigapixel nor the 64-megapixel header allocates its pixels: refused by the
    header-only size reader too, quickly."""
    assert 8_000 * 8_000 > MAX_IMAGE_PIXELS
    for name in ("bomb.png", "over_limit.png"):
        started = time.perf_counter()
        with pytest.raises(DataError, match="too large|refused before decoding") as error:
            image_size(corpus[name])
        assert str(corpus[name]) in str(error.value)
        assert time.perf_counter() - started < 1.0


def test_a_folder_named_like_an_image_and_a_missing_file(tmp_path: Path) -> None:
    (tmp_path / "folder.png").mkdir()
    for path in (tmp_path / "folder.png", tmp_path / "missing.png"):
        with pytest.raises(DataError, match=f"not found: {path}"):
            load_image(path)


def _image_file_outcome(path: Path) -> None:
    """load_image either decodes to uint8 [H, W, 3] or raises DataError naming the file."""
    try:
        array = load_image(path)
    except DataError as exc:
        assert str(path) in str(exc)
    else:
        assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3


VALID = {fmt: _encode(Image.fromarray(RGB), fmt) for fmt in ("PNG", "JPEG", "TIFF", "BMP")}


@FEW
@given(st.sampled_from(sorted(VALID)), st.data())
def test_truncated_files_never_escape_as_another_error(tmp_path: Path, fmt: str, data: st.DataObject) -> None:
    content = VALID[fmt]
    cut = data.draw(st.integers(0, len(content) - 1))
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(content[:cut])
    _image_file_outcome(path)


@FEW
@given(st.sampled_from(sorted(VALID)), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8))
def test_corrupted_bytes_never_escape_as_another_error(tmp_path: Path, fmt: str, flips: list[tuple[int, int]]) -> None:
    content = bytearray(VALID[fmt])
    for position, value in flips:
        content[position % len(content)] = value
    path = tmp_path / f"flipped.{fmt.lower()}"
    path.write_bytes(bytes(content))
    _image_file_outcome(path)


@FEW
@given(st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"BM", b"GIF89a"]), st.binary(max_size=300))
def test_random_bytes_behind_a_magic_number(tmp_path: Path, magic: bytes, tail: bytes) -> None:
    path = tmp_path / "random.png"
    path.write_bytes(magic + tail)
    _image_file_outcome(path)


# --------------------------------------------------------------------------------------------
# defects_config.json
# --------------------------------------------------------------------------------------------
ENTRY = {"defect_name": "missing", "pixel_value": 255, "saturation_threshold": 1.0, "relative_saturation": True}
BAD_DEFECT_CONFIGS: dict[str, tuple[str | bytes, str]] = {
    "empty file": ("", "not valid JSON"),
    "not json": ("{defect_name: missing}", "not valid JSON"),
    "not utf-8": (b"\xff\xfe[\x00", "not valid JSON"),
    "deeply nested": ("[" * 50_000 + "]" * 50_000, "nested too deeply"),
    "5000-digit number": ('[{"defect_name": "a", "pixel_value": ' + "9" * 5000 + "}]", "not valid JSON"),
    "top-level object": (json.dumps(ENTRY), "expected a non-empty JSON list"),
    "empty list": ("[]", "expected a non-empty JSON list"),
    "entry is a string": ('["missing"]', "entry 0: expected a JSON object"),
    "missing pixel_value": (json.dumps([{k: v for k, v in ENTRY.items() if k != "pixel_value"}]), "missing field 'pixel_value'"),
    "pixel_value string": (json.dumps([{**ENTRY, "pixel_value": "255"}]), "'pixel_value' must be an integer in 1..255"),
    "pixel_value bool": (json.dumps([{**ENTRY, "pixel_value": True}]), "'pixel_value' must be an integer in 1..255"),
    "pixel_value NaN": ('[{"defect_name": "a", "pixel_value": NaN, "saturation_threshold": 1, "relative_saturation": false}]', "'pixel_value' must be an integer"),
    "pixel_value 0": (json.dumps([{**ENTRY, "pixel_value": 0}]), "'pixel_value' must be an integer in 1..255"),
    "threshold infinite": ('[{"defect_name": "a", "pixel_value": 1, "saturation_threshold": Infinity, "relative_saturation": false}]', "'saturation_threshold'"),
    "relative as string": (json.dumps([{**ENTRY, "relative_saturation": "yes"}]), "'relative_saturation' must be true or false"),
    "duplicate pixel values": (json.dumps([ENTRY, {**ENTRY, "defect_name": "other"}]), "pixel_value 255 is used by both"),
    "larger than 1 MiB": (json.dumps([ENTRY]) + " " * (1 << 20), "limit 1,048,576 bytes"),
}


@pytest.mark.parametrize("case", list(BAD_DEFECT_CONFIGS))
def test_bad_defects_config(tmp_path: Path, case: str) -> None:
    content, expected = BAD_DEFECT_CONFIGS[case]
    path = tmp_path / "defects_config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    with pytest.raises(DataError) as error:
        read_defects_config(path)
    assert str(path) in str(error.value) and expected in str(error.value)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-300, 300) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from([*ENTRY, "x"]), inner, max_size=5),
    max_leaves=20,
)


@FEW
@given(JSON)
def test_any_json_value_as_defects_config(tmp_path: Path, value: object) -> None:
    path = tmp_path / "defects_config.json"
    path.write_text(json.dumps(value), encoding="utf-8")
    try:
        specs = read_defects_config(path)
    except DataError as exc:
        assert str(path) in str(exc)
    else:
        assert specs and all(1 <= key <= 255 for key in specs)


# --------------------------------------------------------------------------------------------
# YAML configs
# --------------------------------------------------------------------------------------------
BAD_YAML: dict[str, tuple[str | bytes, str]] = {
    "python object tag": ("model: !!python/object/apply:os.system ['touch {marker}']\n", "could not determine a constructor"),
    "python name tag": ("model:\n  backbone: !!python/name:os.system\n", "could not determine a constructor"),
    "top level list": ("- model\n- data\n", "top level must be a mapping"),
    "top level scalar": ("42\n", "top level must be a mapping"),
    "not utf-8": (b"model:\n  backbone: \xff\xfe\n", "not UTF-8"),
    "syntax error": ("model: [resnet18\n", "not valid YAML"),
    "deeply nested": ("model: " + "[" * 5000 + "]" * 5000 + "\n", "not valid YAML"),
    "duplicate key": ("model:\n  seed: 1\n  seed: 2\n", "found the key 'seed' twice"),
    "unknown section": ("modle:\n  seed: 1\n", "unknown section 'modle'"),
    "unknown key": ("model:\n  coreset_percent: 0.1\n", "unknown key 'model.coreset_percent'"),
    "section not a mapping": ("model: resnet18\n", "section 'model' must be a mapping"),
    "empty section": ("model:\n", "section 'model' must be a mapping"),
    "wrong type": ("model:\n  coreset_percentage: ten\n", "model.coreset_percentage has the wrong type"),
    "bool for int": ("model:\n  batch_size: true\n", "model.batch_size has the wrong type"),
    "1e-5 read as text": ("federated:\n  dp_delta: 1e-5\n", "write the number with a dot"),
    "out of range": ("model:\n  coreset_percentage: 1.5\n", "coreset_percentage must be in (0, 1]"),
    "nan": ("evaluation:\n  anomaly_threshold: .nan\n", "evaluation.anomaly_threshold must be finite"),
    "infinity": ("federated:\n  dirichlet_alpha: .inf\n", "federated.dirichlet_alpha must be finite"),
    "nan in a list": ("evaluation:\n  fpr_limits: [0.1, .nan]\n", "evaluation.fpr_limits must be finite"),
    "negative seed": ("model:\n  seed: -1\n", "model.seed must be in [0, 2**63)"),
    "50-digit seed": ("model:\n  seed: " + "9" * 50 + "\n", "model.seed must be in [0, 2**63)"),
    "huge resize": ("data:\n  resize_small: [100000, 100000]\n", "data.resize_small must be at most"),
    "fork bomb": ("runtime:\n  num_workers: 100000\n", "runtime.num_workers must be in [0, 64]"),
    "odd device": ("runtime:\n  device: 'cuda:abc'\n", "runtime.device must be auto, cpu or cuda[:N]"),
    "unknown privacy": ("federated:\n  privacy: encrypted\n", "federated.privacy must be none or rotation or gaussian"),
    "gaussian without epsilon": ("federated:\n  privacy: gaussian\n  clip_norm: 1.0\n", "needs federated.dp_epsilon"),
    "larger than 1 MiB": ("# padding\n" * 120_000, "at most 1,048,576 bytes"),
}


@pytest.mark.parametrize("case", list(BAD_YAML))
def test_bad_config_file(tmp_path: Path, case: str) -> None:
    marker = tmp_path / "pwned"
    content, expected = BAD_YAML[case]
    path = tmp_path / "bad.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.replace("{marker}", str(marker)).encode("utf-8"))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(path) in str(error.value) and expected in str(error.value)
    assert not marker.exists()


def test_a_missing_or_folder_config(tmp_path: Path) -> None:
    for path in (tmp_path / "missing.yaml", tmp_path):
        with pytest.raises(ConfigError, match="config file not found"):
            load_config(path)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model", "expects section.key=value"),
        ("model.seed.x=1", "must be section.key"),
        ("model.layers=!!python/object/apply:os.system ['true']", "not valid YAML"),
        ("model.layers=[a, b", "not valid YAML"),
        ("model.seed={a: 1, a: 2}", "found the key 'a' twice"),
    ],
)
def test_bad_set_overrides(override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


YAML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
SECTION_KEYS = {
    "model": ["backbone", "layers", "coreset_percentage", "seed", "batch_size", "projection_dim", "blur_sigma"],
    "data": ["resize_small", "resize", "calibration_fraction"],
    "evaluation": ["anomaly_threshold", "fpr_limits", "max_overlays"],
    "runtime": ["device", "num_workers", "progress"],
    "federated": ["partition", "global_ratio", "global_size", "privacy", "dp_epsilon", "dp_delta", "clip_norm"],
}


@FEW
@given(st.dictionaries(st.sampled_from([*SECTION_KEYS, "other"]), st.dictionaries(st.sampled_from(sorted({k for v in SECTION_KEYS.values() for k in v} | {"x"})), YAML_VALUES, max_size=3), max_size=3))
def test_any_config_mapping_is_accepted_or_a_config_error(data: dict) -> None:
    try:
        config = config_from_dict(data)
    except ConfigError:
        return
    config.validate()  # what was accepted is valid as a whole


# --------------------------------------------------------------------------------------------
# Model files
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], np.ndarray]:
    model = PatchCore("resnet18", pretrained=False, device="cpu")
    model.set_memory_bank(np.random.default_rng(0).normal(size=(10, model.feature_dim)).astype(np.float32))
    model.threshold = 1.5
    path = tmp_path_factory.mktemp("model") / "patchcore_pipe_clip.pt"
    model.save(path)
    return path, model.metadata(), model.get_memory_bank()


def _variant(folder: Path, bank: np.ndarray | None, meta: dict[str, str], **changes: str | None) -> Path:
    meta = dict(meta)
    for key, value in changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    path = folder / "patchcore_variant.pt"
    save_file({"memory_bank": bank} if bank is not None else {"other": np.zeros((2, 2), np.float32)}, str(path), metadata=meta)
    return path


def _config_with(meta: dict[str, str], **fields: object) -> str:
    return json.dumps({**json.loads(meta["config"]), **fields})


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no memory_bank tensor", "does not contain tensor memory_bank"),
        ("float64 bank", "must be a 2-D float32 array"),
        ("float16 bank", "must be a 2-D float32 array"),
        ("int32 bank", "must be a 2-D float32 array"),
        ("1-D bank", "must be a 2-D float32 array"),
        ("3-D bank", "must be a 2-D float32 array"),
        ("empty bank", "has no rows"),
        ("NaN in bank", "NaN or infinite"),
        ("bank one column short", "does not match backbone"),
        ("format missing", "unexpected format None"),
        ("format foreign", "unexpected format 'other/1'"),
        ("config missing", "header field 'config' is missing"),
        ("config not JSON", "header field 'config' is not valid JSON"),
        ("config a list", "header field 'config' must be a JSON object"),
        ("config field of wrong type", "recorded model configuration is invalid"),
        ("config layers an int", "recorded model configuration is invalid"),
        ("config unknown backbone", "recorded model configuration is invalid: unknown backbone 'evil'"),
        ("config unknown field", "unknown config field(s) ['surprise']"),
        ("feature_dim missing", "header field 'feature_dim' is missing"),
        ("feature_dim not a number", "stored feature dim abc"),
        ("threshold not JSON", "'threshold' must be null or a finite number"),
        ("threshold NaN", "'threshold' must be null or a finite number"),
        ("threshold a list", "'threshold' must be null or a finite number"),
        ("input_size zero", "'input_size' must be null or [width, height]"),
    ],
)
def test_model_file_with_wrong_content(model_file: tuple[Path, dict[str, str], np.ndarray], tmp_path: Path, case: str, expected: str) -> None:
    _, meta, bank = model_file
    variants = {
        "no memory_bank tensor": lambda: _variant(tmp_path, None, meta),
        "float64 bank": lambda: _variant(tmp_path, bank.astype(np.float64), meta),
        "float16 bank": lambda: _variant(tmp_path, bank.astype(np.float16), meta),
        "int32 bank": lambda: _variant(tmp_path, bank.astype(np.int32), meta),
        "1-D bank": lambda: _variant(tmp_path, bank[0], meta),
        "3-D bank": lambda: _variant(tmp_path, bank[None], meta),
        "empty bank": lambda: _variant(tmp_path, bank[:0], meta),
        "NaN in bank": lambda: _variant(tmp_path, np.where(np.arange(bank.size).reshape(bank.shape) == 3, np.nan, bank).astype(np.float32), meta),
        "bank one column short": lambda: _variant(tmp_path, np.ascontiguousarray(bank[:, :-1]), meta),
        "format missing": lambda: _variant(tmp_path, bank, meta, format=None),
        "format foreign": lambda: _variant(tmp_path, bank, meta, format="other/1"),
        "config missing": lambda: _variant(tmp_path, bank, meta, config=None),
        "config not JSON": lambda: _variant(tmp_path, bank, meta, config="{backbone: resnet18"),
        "config a list": lambda: _variant(tmp_path, bank, meta, config="[1, 2]"),
        "config field of wrong type": lambda: _variant(tmp_path, bank, meta, config=_config_with(meta, coreset_percentage="ten")),
        "config layers an int": lambda: _variant(tmp_path, bank, meta, config=_config_with(meta, layers=5)),
        "config unknown backbone": lambda: _variant(tmp_path, bank, meta, config=_config_with(meta, backbone="evil")),
        "config unknown field": lambda: _variant(tmp_path, bank, meta, config=_config_with(meta, surprise=1)),
        "feature_dim missing": lambda: _variant(tmp_path, bank, meta, feature_dim=None),
        "feature_dim not a number": lambda: _variant(tmp_path, bank, meta, feature_dim="abc"),
        "threshold not JSON": lambda: _variant(tmp_path, bank, meta, threshold="high"),
        "threshold NaN": lambda: _variant(tmp_path, bank, meta, threshold="NaN"),
        "threshold a list": lambda: _variant(tmp_path, bank, meta, threshold="[1]"),
        "input_size zero": lambda: _variant(tmp_path, bank, meta, input_size="[0, 5]"),
    }
    path = variants[case]()
    with pytest.raises(ModelFileError) as error:
        PatchCore.load(path, device="cpu")
    assert str(path) in str(error.value) and expected in str(error.value)


def test_model_file_naming_a_missing_weights_file(model_file: tuple[Path, dict[str, str], np.ndarray], tmp_path: Path) -> None:
    _, meta, bank = model_file
    path = _variant(tmp_path, bank, meta, config=_config_with(meta, pretrained=True, weights=str(tmp_path / "gone.pt")))
    with pytest.raises(WeightsUnavailableError, match="gone.pt"):
        PatchCore.load(path, device="cpu")


def test_model_file_with_a_lying_header(tmp_path: Path) -> None:
    """A header that declares a 40 GB tensor in a 100-byte file is refused before allocating."""
    header = json.dumps({"memory_bank": {"dtype": "F32", "shape": [100_000, 100_000], "data_offsets": [0, 40_000_000_000]}}).encode()
    cases = {
        "lying.pt": struct.pack("<Q", len(header)) + header + b"\0" * 16,
        "huge_header_length.pt": struct.pack("<Q", 2**62) + b"{" + b"x" * 100,
        "header_not_json.pt": struct.pack("<Q", 20) + b"{" + b"\xff" * 19 + b"\0" * 8,
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        started = time.perf_counter()
        with pytest.raises(ModelFileError, match=f"{path} is not a readable fedpatch model file"):
            read_model_file(path)
        assert time.perf_counter() - started < 2.0


@FEW
@given(st.data())
def test_truncated_or_corrupted_model_files(model_file: tuple[Path, dict[str, str], np.ndarray], tmp_path: Path, data: st.DataObject) -> None:
    good = model_file[0].read_bytes()
    content = bytearray(good[: data.draw(st.integers(0, len(good) - 1), label="cut")])
    for position, value in data.draw(st.lists(st.tuples(st.integers(0, len(good)), st.integers(0, 255)), max_size=4), label="flips"):
        if content:
            content[position % len(content)] = value
    path = tmp_path / "patchcore_broken.pt"
    path.write_bytes(bytes(content))
    try:
        PatchCore.load(path, device="cpu")
    except ModelFileError as exc:
        assert str(path) in str(exc)


@FEW
@given(st.binary(max_size=400))
def test_random_bytes_as_model_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "patchcore_random.pt"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=str(path)):
        PatchCore.load(path, device="cpu")


class _Payload:
    """Unpickling this creates ``marker`` (the payload of a malicious model file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_named_like_our_model_file_is_refused_everywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """A pickle (raw, and torch.save's zip) at models/patchcore_<object>.pt is refused by the loader,
    by ``fedpatch predict`` and by ``fedpatch evaluate``, and its payload never runs. The loader is
    also shown never to call an unpickler at all: they are replaced by tripwires."""
    marker = tmp_path / "pwned"
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe))).close()  # the payload is live
    assert probe.exists()

    def tripwire(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("an unpickler was called")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, tripwire)
    monkeypatch.setattr(torch, "load", tripwire)

    image = tmp_path / "image.png"
    Image.fromarray(RGB).save(image)
    models = tmp_path / "run" / "models"
    models.mkdir(parents=True)
    for writer in ("pickle", "torch.save"):
        path = models / "patchcore_pipe_clip.pt"
        if writer == "pickle":
            path.write_bytes(pickle.dumps({"memory_bank": _Payload(marker)}, protocol=4))
        else:
            torch.save({"memory_bank": torch.zeros(2, 2), "config": _Payload(marker)}, path)
        with pytest.raises(ModelFileError, match=f"{path} is a pickle/zip archive .* never unpickles"):
            PatchCore.load(path, device="cpu")
        assert cli.main(["predict", "--model", str(path), str(image), "--output-dir", str(tmp_path / "pred"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "never unpickles" in err and "Traceback" not in err
        assert not marker.exists()


# --------------------------------------------------------------------------------------------
# What a client receives from the server
# --------------------------------------------------------------------------------------------
def _record() -> dict[str, object]:
    return RunRequest.make(config_from_dict({}), ["pipe_clip"], "/data", 2).to_record()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"config-yaml": None}, "lacks config-yaml"),
        ({"round": None, "objects": None}, "lacks objects, round"),
        ({"round": "2"}, "field 'round' must be an integer >= 1, got '2'"),
        ({"round": 1.5}, "field 'round' must be an integer >= 1"),
        ({"round": True}, "field 'round' must be an integer >= 1"),
        ({"round": 0}, "field 'round' must be an integer >= 1"),
        ({"objects": ["pipe_clip"]}, "field 'objects' must be a string, got list"),
        ({"data-dir": 3}, "field 'data-dir' must be a string, got int"),
        ({"config-yaml": b"model: {}"}, "field 'config-yaml' must be a string, got bytes"),
    ],
)
def test_run_request_with_missing_or_mistyped_fields(change: dict[str, object], expected: str) -> None:
    record = _record()
    for key, value in change.items():
        if value is None:
            del record[key]
        else:
            record[key] = value
    with pytest.raises(ReplyError, match=expected):
        RunRequest.from_record(record)


@pytest.mark.parametrize(
    ("config_yaml", "expected"),
    [
        ("model: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
        ("[1, 2]\n", "top level must be a mapping"),
        ("model:\n  seed: -5\n", "model.seed must be in"),
        ("federated:\n  rotation_key: secret-of-sixteen-chars\n", "unknown key 'federated.rotation_key'"),
    ],
)
def test_run_request_with_a_bad_configuration(config_yaml: str, expected: str) -> None:
    record = {**_record(), "config-yaml": config_yaml}
    with pytest.raises(ConfigError, match=expected):
        RunRequest.from_record(record).run_config()


def test_run_request_round_trips() -> None:
    request = RunRequest.from_record(_record())
    assert request.objects == ("pipe_clip",) and request.round == 2 and request.data_dir == "/data"
    assert request.run_config() == config_from_dict({})


@pytest.fixture(scope="module")
def tiny_client(tmp_path_factory: pytest.TempPathFactory):
    from fedpatch.data.synthetic import generate_autovi_dataset
    from fedpatch.federated import open_client_data

    root = generate_autovi_dataset(tmp_path_factory.mktemp("client"), ["pipe_clip"], n_train=4, n_test_good=1, n_test_defective=1, scale=0.15, seed=2)
    config = config_from_dict(
        {"model": {"backbone": "resnet18", "pretrained": False}, "data": {"resize": [64, 64]}, "runtime": {"device": "cpu", "progress": False}}
    )
    return config, open_client_data(config, root, ["pipe_clip"], 0, 1)


@pytest.mark.parametrize(
    ("bank", "expected"),
    [
        (np.ones((5, 383), np.float32), "feature dimension 383 does not match 384"),
        (np.full((5, 384), np.nan, np.float32), "5 row(s) hold NaN or infinite values"),
        (np.ones((5, 384), np.int32), "expected a floating-point array, got dtype int32"),
        (np.ones(384, np.float32), "expected a 2-D array"),
        (np.ones((0, 384), np.float32), "the array has no rows"),
    ],
)
def test_client_refuses_a_bad_global_bank_naming_the_object(tiny_client, bank: np.ndarray, expected: str) -> None:
    from fedpatch.federated import evaluate_client

    config, data = tiny_client
    with pytest.raises(BankValidationError) as error:
        evaluate_client(config, data, {"pipe_clip": bank})
    message = str(error.value)
    assert "global bank of 'pipe_clip' sent by the server" in message and expected in message


@FEW
@given(st.integers(0, 3), st.integers(1, 3), st.sampled_from([np.float16, np.float32, np.float64, np.int8]), st.booleans())
def test_set_memory_bank_accepts_only_finite_float_banks_of_its_width(rank: int, rows: int, dtype: type, poison: bool) -> None:
    model = PatchCore("resnet18", pretrained=False, device="cpu", layers=["layer1"])  # 64-d
    shape = {0: (), 1: (64,), 2: (rows, 64), 3: (rows, 64, 1)}[rank]
    array = np.ones(shape, dtype=dtype)
    if poison and array.size and np.dtype(dtype).kind == "f":
        array.flat[0] = np.inf
    valid = rank == 2 and np.dtype(dtype).kind == "f" and not poison
    if valid:
        model.set_memory_bank(array)
        assert model.get_memory_bank().shape == (rows, 64)
    else:
        with pytest.raises(BankValidationError, match="memory bank"):
            model.set_memory_bank(array)


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------
def _one_line_error(capsys: pytest.CaptureFixture, *fragments: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith("fedpatch: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.parametrize("case", ["python object tag", "not utf-8", "duplicate key", "nan", "huge resize", "deeply nested", "top level list"])
def test_train_with_a_bad_config_file(tmp_path: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    content, expected = BAD_YAML[case]
    path = tmp_path / "bad.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.replace("{marker}", str(tmp_path / "pwned")).encode("utf-8"))
    assert cli.main(["train", "--config", str(path), "--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "out")]) == 2
    _one_line_error(capsys, str(path), expected.split("(")[0])
    assert not (tmp_path / "out").exists() and not (tmp_path / "pwned").exists()


def test_cli_bad_inputs_of_every_command(model_file: tuple[Path, dict[str, str], np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    image = tmp_path / "truncated.png"
    image.write_bytes(CORPUS["truncated.png"][0])
    random_model = tmp_path / "random.pt"
    random_model.write_bytes(b"\x00" * 64)
    out = str(tmp_path / "out")
    assert cli.main(["predict", "--model", str(random_model), str(image), "--output-dir", out]) == 2
    _one_line_error(capsys, str(random_model))
    assert cli.main(["predict", "--model", str(model_file[0]), str(image), "--output-dir", out, "--no-progress"]) == 2
    _one_line_error(capsys, str(image), "truncated or corrupt")
    maps = tmp_path / "maps" / "pipe_clip" / "good"
    maps.mkdir(parents=True)
    (maps / "000.npy").write_bytes(b"\x93NUMPY garbage")
    assert cli.main(["evaluate", "--maps-dir", str(tmp_path / "maps"), "--data-dir", str(tmp_path), "--objects", "pipe_clip", "--output-dir", out]) == 2
    _one_line_error(capsys)
    assert cli.main(["train", "--set", "model.seed=-1", "--data-dir", str(tmp_path), "--output-dir", out]) == 2
    _one_line_error(capsys, "model.seed must be in [0, 2**63)")


def test_cli_unwritable_output_folder_is_one_line(model_file: tuple[Path, dict[str, str], np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    image = tmp_path / "image.png"
    Image.fromarray(RGB).save(image)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert cli.main(["predict", "--model", str(model_file[0]), str(image), "--output-dir", str(blocker / "out"), "--no-progress"]) == 2
    _one_line_error(capsys, str(blocker))


def test_subprocess_train_with_a_python_tag_config(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(BAD_YAML["python object tag"][0].replace("{marker}", str(marker)))
    result = subprocess.run(
        [sys.executable, "-m", "fedpatch", "train", "--config", str(path), "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr and str(path) in result.stderr
    assert not marker.exists()


def test_every_error_class_is_a_fedpatch_error() -> None:
    for kind in (DataError, ConfigError, ModelFileError, ReplyError, BankValidationError, WeightsUnavailableError):
        assert issubclass(kind, FedPatchError)

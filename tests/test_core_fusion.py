"""BatchNorm folding and the channels-last layout of the fused backbone (fedpatch.fusion)."""

from __future__ import annotations

import logging

import pytest
import torch
import torchvision
from timm.layers import Conv2dSame
from torch import nn

from fedpatch.backbone import BACKBONES, FeatureExtractor
from fedpatch.fusion import SamePaddedConv2d, fold_batchnorm, slice_same_padding


def _randomise_batchnorm(module: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial statistics (random init has mean 0, var 1, gamma 1)."""
    gen = torch.Generator().manual_seed(seed)
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
            bn.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.1)
            if bn.affine:
                bn.weight.data.copy_(torch.randn(n, generator=gen))
                bn.bias.data.copy_(torch.randn(n, generator=gen))


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_fused_extractor_has_no_batchnorm_and_same_features(name: str) -> None:
    """Every backbone folds all its BatchNorms and keeps its features (run channels-last on the CPU)."""
    plain = FeatureExtractor(name, pretrained=False, fuse=False)
    fused = FeatureExtractor(name, pretrained=False)
    assert any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert not any(p.requires_grad for p in fused.parameters())
    images = torch.rand(2, 3, 72, 88)
    with torch.no_grad():
        expected, got = plain(images), fused(images)
    assert list(got) == list(expected)
    for layer in expected:
        assert got[layer].shape == expected[layer].shape
        assert _relative_error(got[layer], expected[layer]) < 1e-5


@pytest.mark.parametrize("size", [(96, 120), (97, 131), (96, 131)])
def test_fused_real_lite0_weights_match_the_unfused_network(size: tuple[int, int]) -> None:
    """Trained BatchNorm statistics (timm's BatchNormAct2d) fold exactly, and the 'same'
    padding without input copies gives the same features on even sizes (asymmetric padding),
    odd sizes (symmetric) and a mix."""
    plain = FeatureExtractor("efficientnet_lite0", pretrained=True, fuse=False)
    fused = FeatureExtractor("efficientnet_lite0", pretrained=True)
    assert sum(isinstance(m, Conv2dSame) for m in plain.modules()) == 4  # stem and three strided blocks
    assert sum(isinstance(m, SamePaddedConv2d) for m in fused.modules()) == 4
    assert not any(isinstance(m, Conv2dSame) for m in fused.modules())
    images = torch.rand(1, 3, *size)
    with torch.no_grad():
        expected, got = plain(images), fused(images)
    for layer in expected:
        assert got[layer].shape == expected[layer].shape
        assert _relative_error(got[layer], expected[layer]) < 1e-5


@pytest.mark.parametrize(("kernel", "stride", "dilation", "groups"), [(3, 2, 1, 4), (5, 2, 1, 1), (3, 3, 1, 1), (3, 1, 1, 1), (1, 2, 1, 1), (3, 2, 2, 1), (4, 2, 1, 1)])
def test_same_padded_conv_equals_timm_conv2d_same(kernel: int, stride: int, dilation: int, groups: int) -> None:
    """Every input size from 1 to 12 per axis: the same output shape and values as timm's
    padded copy (float64, so only the order of the sums could differ)."""
    gen = torch.Generator().manual_seed(kernel * 100 + stride * 10 + dilation)
    reference = Conv2dSame(4, 8, kernel, stride=stride, dilation=dilation, groups=groups).double().eval()
    ours = SamePaddedConv2d.replacing(reference)
    assert ours.weight is reference.weight and ours.bias is reference.bias
    for height in range(1, 13):
        for width in (1, 2, 7, 12):
            x = torch.randn(2, 4, height, width, generator=gen, dtype=torch.float64)
            with torch.no_grad():
                expected, got = reference(x), ours(x)
            assert got.shape == expected.shape, (height, width)
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


class _PadsWithOnes(Conv2dSame):
    """A 'same' convolution that pads with ones: the rewrite would change its output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.pad(x, (0, 1, 0, 1), value=1.0)
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def test_same_padding_rewrite_is_checked_and_refused_when_it_changes_the_output(caplog: pytest.LogCaptureFixture) -> None:
    good = nn.Sequential(Conv2dSame(3, 4, 3, stride=2), nn.ReLU()).eval()
    rewritten, replaced = slice_same_padding(good, torch.randn(1, 3, 16, 16))
    assert replaced == 1 and isinstance(rewritten[0], SamePaddedConv2d)
    assert isinstance(good[0], Conv2dSame) and not isinstance(good[0], SamePaddedConv2d)  # the original is left alone
    bad = nn.Sequential(_PadsWithOnes(3, 4, 3, stride=2)).eval()
    with caplog.at_level(logging.WARNING, logger="fedpatch.fusion"):
        result, replaced = slice_same_padding(bad, torch.randn(1, 3, 16, 16))
    assert result is bad and replaced == 0
    assert "keeping timm's padding" in caplog.text
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    assert slice_same_padding(plain, torch.randn(1, 3, 8, 8)) == (plain, 0)


def test_fold_uses_conv_bias_and_batchnorm_statistics() -> None:
    """A conv with a bias before an affine BatchNorm: folded once, same output, BN gone."""
    stage = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1, groups=4), nn.BatchNorm2d(4, affine=False))
    _randomise_batchnorm(stage, seed=1)
    stage.eval()
    x = torch.randn(2, 3, 16, 16)
    fused, folded = fold_batchnorm(stage, x)
    assert folded == 2
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in stage.modules())  # the original is left alone
    with torch.no_grad():
        assert _relative_error(fused(x), stage(x)) < 1e-5


def test_torchvision_resnet_with_trained_statistics_folds_exactly() -> None:
    model = torchvision.models.resnet18(weights=None).eval()
    _randomise_batchnorm(model, seed=2)
    x = torch.randn(1, 3, 64, 64)
    fused, folded = fold_batchnorm(model, x)
    assert folded == 20  # every conv of resnet18 (stem, 16 block convs, 3 downsamples)
    with torch.no_grad():
        assert _relative_error(fused(x), model(x)) < 1e-5


class _ConvUsedTwice(nn.Module):
    """A conv whose output feeds a BatchNorm and also a skip: folding would change the skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def test_fold_that_would_change_the_output_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    stage = _ConvUsedTwice().eval()
    _randomise_batchnorm(stage, seed=3)
    with caplog.at_level(logging.WARNING, logger="fedpatch.fusion"):
        result, folded = fold_batchnorm(stage, torch.randn(1, 3, 8, 8))
    assert result is stage and folded == 0
    assert "keeping it unfolded" in caplog.text


def test_batchnorm_not_fed_by_a_conv_is_left_alone() -> None:
    stage = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    _randomise_batchnorm(stage, seed=4)
    result, folded = fold_batchnorm(stage, torch.randn(1, 3, 8, 8))
    assert result is stage and folded == 0

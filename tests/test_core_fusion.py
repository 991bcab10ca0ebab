"""BatchNorm folding and the channels-last layout of the fused backbone (fedpatch.fusion)."""

from __future__ import annotations

import logging

import pytest
import torch
import torchvision
from torch import nn

from fedpatch.backbone import BACKBONES, FeatureExtractor
from fedpatch.fusion import fold_batchnorm


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


def test_fused_real_lite0_weights_match_the_unfused_network() -> None:
    """Trained BatchNorm statistics (timm's BatchNormAct2d, 'same' padding) fold exactly."""
    plain = FeatureExtractor("efficientnet_lite0", pretrained=True, fuse=False)
    fused = FeatureExtractor("efficientnet_lite0", pretrained=True)
    images = torch.rand(1, 3, 96, 120)
    with torch.no_grad():
        expected, got = plain(images), fused(images)
    for layer in expected:
        assert _relative_error(got[layer], expected[layer]) < 1e-5


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

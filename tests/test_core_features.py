"""Patch features: local averaging, layer aggregation, channel reduction, row order."""

from __future__ import annotations

import pytest
import torch

from fedpatch.backbone import FeatureExtractor
from fedpatch.features import aggregate_features, extract_patch_features, local_average, reduce_channels


def test_aggregate_real_backbone_maps_to_stride8_grid() -> None:
    """resnet18 layer2 (128 ch, stride 8) + layer3 (256 ch, stride 16) -> [B, 384, H/8, W/8]."""
    extractor = FeatureExtractor("resnet18", pretrained=False)
    with torch.no_grad():
        maps = extractor(torch.rand(2, 3, 96, 64))
    assert tuple(maps["layer3"].shape[-2:]) == (6, 4)
    out = aggregate_features(maps)
    assert tuple(out.shape) == (2, 128 + 256, 12, 8)
    # the layer2 channels come first and are only locally averaged (same grid)
    torch.testing.assert_close(out[:, :128], local_average(maps["layer2"], 3))


def test_local_average_interior_equals_hand_computed_mean() -> None:
    generator = torch.Generator().manual_seed(0)
    fmap = torch.rand(2, 5, 7, 6, generator=generator)
    out = local_average(fmap, 3)
    assert out.shape == fmap.shape
    for i, j in [(1, 1), (3, 2), (5, 4)]:
        expected = fmap[:, :, i - 1 : i + 2, j - 1 : j + 2].mean(dim=(-1, -2))
        torch.testing.assert_close(out[:, :, i, j], expected)


def test_local_average_border_counts_zero_padding() -> None:
    """Corner windows divide by 9 (zero padding counted), as the reference implementations do."""
    fmap = torch.ones(1, 1, 4, 4)
    out = local_average(fmap, 3)
    assert out[0, 0, 0, 0].item() == pytest.approx(4 / 9)
    assert out[0, 0, 0, 1].item() == pytest.approx(6 / 9)
    assert out[0, 0, 1, 1].item() == pytest.approx(1.0)


def test_local_average_size_one_and_invalid_sizes() -> None:
    fmap = torch.rand(1, 2, 4, 4)
    assert torch.equal(local_average(fmap, 1), fmap)
    for bad in (0, 2, -3):
        with pytest.raises(ValueError, match="positive odd"):
            local_average(fmap, bad)


def test_deeper_layer_is_bilinearly_upsampled_to_first_grid() -> None:
    """A 2x2 ramp [0, 4] upsampled to 4x4 (align_corners=False) gives rows [0, 1, 3, 4]."""
    layer2 = torch.zeros(1, 1, 4, 4)
    layer3 = torch.tensor([[0.0, 4.0], [0.0, 4.0]]).view(1, 1, 2, 2)
    out = aggregate_features({"layer2": layer2, "layer3": layer3}, neighborhood_size=1)
    assert tuple(out.shape) == (1, 2, 4, 4)
    assert torch.equal(out[0, 0], torch.zeros(4, 4))
    expected_row = torch.tensor([0.0, 1.0, 3.0, 4.0])
    for row in range(4):
        torch.testing.assert_close(out[0, 1, row], expected_row)


def test_aggregate_explicit_target_size_and_order() -> None:
    a = torch.rand(1, 3, 8, 8)
    b = torch.rand(1, 5, 4, 4)
    out = aggregate_features({"b": b, "a": a}, target_size=(8, 8), neighborhood_size=1)
    assert tuple(out.shape) == (1, 8, 8, 8)
    torch.testing.assert_close(out[:, 5:], a)  # channel order follows the mapping order


def test_aggregate_empty_mapping() -> None:
    with pytest.raises(ValueError, match="empty"):
        aggregate_features({})


def test_reduce_channels_averages_channel_groups() -> None:
    features = torch.arange(2 * 6 * 2 * 3, dtype=torch.float32).view(2, 6, 2, 3)
    out = reduce_channels(features, 3)
    assert tuple(out.shape) == (2, 3, 2, 3)
    expected = features.view(2, 3, 2, 2, 3).mean(dim=2)  # mean of channel pairs (0,1), (2,3), (4,5)
    torch.testing.assert_close(out, expected)
    assert reduce_channels(features, 6) is features


@pytest.mark.parametrize("bad", [0, 7])
def test_reduce_channels_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError, match=r"target_dim must be in \[1, 6\]"):
        reduce_channels(torch.rand(1, 6, 2, 2), bad)


def test_extract_patch_features_row_order() -> None:
    """Row ``b*H*W + i*W + j`` is the feature vector of image b at grid position (i, j)."""
    batch, channels, height, width = 2, 3, 4, 5
    features = torch.randn(batch, channels, height, width)
    rows = extract_patch_features(features)
    assert tuple(rows.shape) == (batch * height * width, channels)
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                assert torch.equal(rows[b * height * width + i * width + j], features[b, :, i, j])


def test_extract_patch_features_rank_check() -> None:
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        extract_patch_features(torch.rand(3, 4, 4))

"""Pure tensor functions that turn backbone feature maps into PatchCore patch vectors.

PatchCore describes each patch by the backbone features around it: every layer map is
averaged over a local ``neighborhood_size`` x ``neighborhood_size`` window (stride 1, so the
grid keeps its resolution), the deeper maps are bilinearly upsampled to the grid of the first
(shallowest) layer (stride 8 for layer2), and the maps are concatenated along channels. An
optional adaptive average pooling over channels reduces the dimension (as the reference
implementations do, e.g. 1536 -> 1024 for WideResNet-50-2).

Border windows count the zero padding (``count_include_pad=True``, as the reference
implementations do): border patches come out scaled down, which acts as a weak position code
so that they match border patches of the bank. Measured on the magnetic-tile sample
(efficientnet_lite0, 256x256): image AUROC 0.86-0.88 with it, 0.78 without.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F


def local_average(features: torch.Tensor, neighborhood_size: int = 3) -> torch.Tensor:
    """Average each position over its ``k x k`` neighbourhood; the grid size is unchanged."""
    if neighborhood_size < 1 or neighborhood_size % 2 == 0:
        raise ValueError(f"neighborhood_size must be a positive odd integer, got {neighborhood_size}")
    if neighborhood_size == 1:
        return features
    return F.avg_pool2d(
        features, kernel_size=neighborhood_size, stride=1, padding=neighborhood_size // 2, count_include_pad=True
    )


def aggregate_features(
    layer_features: Mapping[str, torch.Tensor],
    target_size: tuple[int, int] | None = None,
    neighborhood_size: int = 3,
) -> torch.Tensor:
    """Locally aggregate every layer map, resize to ``target_size`` (H, W) and concatenate.

    Args:
        layer_features: ``{layer: [B, C_l, h_l, w_l]}`` in the order the channels should be
            concatenated.
        target_size: the patch grid (H, W); ``None`` uses the first layer's grid.
        neighborhood_size: side of the local averaging window (odd).

    Returns:
        ``[B, sum(C_l), H, W]``.
    """
    if not layer_features:
        raise ValueError("layer_features is empty")
    maps = list(layer_features.values())
    size = tuple(target_size) if target_size is not None else tuple(maps[0].shape[-2:])
    out = []
    for fmap in maps:
        fmap = local_average(fmap, neighborhood_size)
        if tuple(fmap.shape[-2:]) != size:
            fmap = F.interpolate(fmap, size=size, mode="bilinear", align_corners=False)
        out.append(fmap)
    return torch.cat(out, dim=1)


def reduce_channels(features: torch.Tensor, target_dim: int) -> torch.Tensor:
    """Adaptive average pooling over the channel axis: ``[B, C, H, W] -> [B, target_dim, H, W]``."""
    batch, channels, height, width = features.shape
    if target_dim <= 0 or target_dim > channels:
        raise ValueError(f"target_dim must be in [1, {channels}], got {target_dim}")
    if target_dim == channels:
        return features
    flat = features.permute(0, 2, 3, 1).reshape(-1, 1, channels)
    pooled = F.adaptive_avg_pool1d(flat, target_dim)
    return pooled.reshape(batch, height, width, target_dim).permute(0, 3, 1, 2)


def extract_patch_features(features: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W] -> [B*H*W, C]``, row-major over (image, row, column)."""
    if features.ndim != 4:
        raise ValueError(f"expected [B, C, H, W], got {tuple(features.shape)}")
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])

"""Post-processing from patch scores to pixel anomaly maps and image scores.

The patch-score grid (stride 8) is bilinearly upsampled to the image's own size and smoothed
with a Gaussian of ``sigma`` pixels (4 in the PatchCore paper), truncated at 4 sigma. The image
score is the largest patch score, optionally reweighted by the paper's rule (see
``reweighted_image_score``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Normalised 1-D Gaussian of radius ``int(4 * sigma + 0.5)``."""
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, 1, H, W]`` maps; borders are reflected (replicated if tiny)."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma, maps.device)
    radius = kernel.numel() // 2
    height, width = maps.shape[-2:]
    mode = "reflect" if min(height, width) > radius else "replicate"
    padded = F.pad(maps, (radius, radius, radius, radius), mode=mode)
    out = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(out, kernel.view(1, 1, -1, 1))


def patch_scores_to_maps(patch_scores: torch.Tensor, image_size: tuple[int, int], sigma: float) -> torch.Tensor:
    """``[B, h, w]`` patch scores -> ``[B, H, W]`` pixel maps (bilinear upsampling, then blur)."""
    maps = F.interpolate(patch_scores.unsqueeze(1), size=image_size, mode="bilinear", align_corners=False)
    return gaussian_blur(maps, sigma).squeeze(1)


def reweighted_image_score(
    max_score: float,
    test_patch: np.ndarray,
    nearest_neighbours: np.ndarray,
) -> float:
    """The PatchCore paper's image score: ``s = (1 - softmax(d)[0]) * s*``.

    ``nearest_neighbours`` are the bank vectors nearest to the bank vector ``m*`` closest to the
    most anomalous test patch (``m*`` itself first); ``d`` are the distances from that test patch
    to them. When ``m*`` is itself far from its neighbours (a rare nominal patch), its softmax
    weight is small and the score is kept almost whole (the paper's up-weighting); when ``m*``
    sits in a dense part of the bank, the score is lowered by about ``1/k``.
    """
    distances = np.linalg.norm(nearest_neighbours.astype(np.float64) - test_patch.astype(np.float64), axis=1)
    shifted = distances - distances.max()
    softmax = np.exp(shifted) / np.exp(shifted).sum()
    return float((1.0 - softmax[0]) * max_score)


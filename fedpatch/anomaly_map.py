"""Post-processing from patch scores to pixel anomaly maps and image scores.

The patch-score grid (stride 8) is bilinearly upsampled to the image's own size and smoothed
with a Gaussian of ``sigma`` pixels (4 in the PatchCore paper), truncated at 4 sigma, borders
reflected. The image score is the largest patch score, optionally reweighted by the paper's
rule (see ``reweighted_image_score``).

Both steps are linear and separable, so ``patch_scores_to_maps`` applies them as two small
matrix products, ``A @ S @ C.T`` with ``A = blur_H @ upsample_H`` ([H, h]) and
``C = blur_W @ upsample_W`` ([W, w]), built once per grid and image size by running torch's
bilinear interpolation and the padded Gaussian convolution, one axis at a time, on identity
matrices. The result is the map that upsampling the whole grid and then blurring it gives
(tests/test_anomaly_map.py checks the two against each other), to float rounding, and it
never materialises a padded full-size image: on 2 CPU cores eight 1000x750 maps took 14.5 ms
instead of 318 ms (interpolate + two 33-tap convolutions), eight 256x256 maps 0.8 ms instead
of 29 ms.

Both operators are banded: an output pixel depends on the few grid cells within the blur's
reach (14 of 125 for 64 neighbouring columns of a 1000x750 map at sigma 4). Each axis is
therefore applied in bands of ``BAND`` outputs, each multiplied with only the cells it has
weight on (``_Bands``), all bands in one batched product; ``S @ C.T`` first. The skipped terms
are exact zeros, so only the summation order changes (2.5e-7 of the largest value). One
1000x750 map took 0.45-0.60 ms instead of 1.16-1.38 ms, eight 4.7-5.3 ms instead of 12.5-15.1 ms
(2 threads, side by side, two runs); small maps, where bands would skip too little, keep the two
products.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian of radius ``int(4 * sigma + 0.5)`` (float32, on the CPU)."""
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def _border_mode(height: int, width: int, sigma: float) -> str:
    """Reflect the borders, or replicate them when the map is too small to reflect."""
    return "reflect" if min(height, width) > int(4.0 * sigma + 0.5) else "replicate"


def _axis_operator(grid: int, size: int, sigma: float, mode: str, device: torch.device) -> torch.Tensor:
    """``[size, grid]``: one axis of upsample-then-blur, found by applying it to an identity."""
    eye = torch.eye(grid, dtype=torch.float64).view(grid, 1, grid, 1)  # each row: one grid cell set
    columns = F.interpolate(eye, size=(size, 1), mode="bilinear", align_corners=False)
    if sigma > 0:
        kernel = gaussian_kernel1d(sigma).double()
        radius = kernel.numel() // 2
        columns = F.conv2d(F.pad(columns, (0, 0, radius, radius), mode=mode), kernel.view(1, 1, -1, 1))
    return columns.view(grid, size).T.contiguous().float().to(device)


BAND = 64
"""Output rows (columns) per band: fewer, wider products against more zero weights (32 / 64 /
128 took 0.80 / 0.62 / 0.60 ms per 1000x750 map in a first version)."""


@dataclass(frozen=True)
class _Bands:
    """An ``[size, grid]`` axis operator as bands of ``BAND`` outputs, each with the ``width``
    consecutive grid cells outside which its weights are zero (a band at the grid's end takes
    the last ``width`` cells, its extra weights zero; the last band's rows past ``size`` are
    zero)."""

    cells: torch.Tensor  # [bands, width] int64: each band's grid cells
    weights: torch.Tensor  # [bands, BAND, width]


def _banded(operator: torch.Tensor) -> _Bands | torch.Tensor:
    """The operator in bands, or itself where bands would skip less than ``3 / 4`` of its
    products (their gathers then cost more than they save: eight 256x256 maps took 0.51 ms
    banded, 0.34 ms in one product)."""
    size, grid = operator.shape
    spans = []
    for start in range(0, size, BAND):
        cells = torch.nonzero((operator[start : start + BAND] != 0).any(dim=0)).flatten().tolist()
        spans.append((cells[0], cells[-1] + 1) if cells else (0, 0))
    width = max(last - first for first, last in spans)
    if 4 * len(spans) * BAND * width > size * grid:
        return operator
    firsts = [min(first, grid - width) for first, _ in spans]
    weights = operator.new_zeros(len(spans), BAND, width)
    for band, first in enumerate(firsts):
        rows = operator[band * BAND : (band + 1) * BAND, first : first + width]
        weights[band, : len(rows)] = rows
    cells = torch.tensor(firsts, device=operator.device)[:, None] + torch.arange(width, device=operator.device)
    return _Bands(cells, weights)


@lru_cache(maxsize=16)
def _operators(grid: tuple[int, int], image_size: tuple[int, int], sigma: float, device: str) -> tuple[_Bands | torch.Tensor, _Bands | torch.Tensor]:
    mode = _border_mode(image_size[0], image_size[1], sigma)
    rows = _axis_operator(grid[0], image_size[0], sigma, mode, torch.device(device))
    cols = _axis_operator(grid[1], image_size[1], sigma, mode, torch.device(device))
    return _banded(rows), _banded(cols)


def patch_scores_to_maps(patch_scores: torch.Tensor, image_size: tuple[int, int], sigma: float) -> torch.Tensor:
    """``[B, h, w]`` patch scores -> ``[B, H, W]`` pixel maps (bilinear upsampling, then blur).

    Computed as ``A @ (S @ C.T)``, band by band (see the module docstring). Each map is
    contiguous; with bands, the batch's maps may lie further apart than ``H * W``.
    """
    scores = patch_scores.float()
    height, width = int(image_size[0]), int(image_size[1])
    rows, cols = _operators((int(scores.shape[-2]), int(scores.shape[-1])), (height, width), float(sigma), str(scores.device))
    if isinstance(cols, _Bands):  # [B, h, bands, cells] x [bands, BAND, cells] -> [B, h, W]
        across = torch.einsum("...ykc,kxc->...ykx", scores[..., cols.cells], cols.weights).flatten(-2)[..., :width]
    else:
        across = scores @ cols.T
    if isinstance(rows, _Bands):  # [bands, BAND, cells] x [B, bands, cells, W] -> [B, H, W]
        return torch.matmul(rows.weights, across[..., rows.cells, :]).flatten(-3, -2)[..., :height, :]
    return rows @ across


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


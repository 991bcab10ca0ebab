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
reach (14 of 125 for 64 neighbouring columns of a 1000x750 map at sigma 4). The products are
therefore taken in slices of ``BAND`` output rows (columns) against only the grid cells that
slice has weight on (``_Band``), ``S @ C.T`` first. The dropped terms are exact zeros, so only the summation order changes (2.5e-7
of the largest value): eight 1000x750 maps took 3.6-4.7 ms instead of 10.5-12.7 ms (two runs
side by side, 2 threads), about what filling them and adding to them once takes (3.6 ms).
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
"""Output rows (columns) per banded product: fewer calls against more zero weights per call
(32 / 64 / 128 took 0.80 / 0.62 / 0.60 ms per 1000x750 map with the bands found per call)."""


@dataclass(frozen=True)
class _Band:
    """Output rows (or columns) ``[start, stop)`` of an axis operator and the grid cells
    ``[first, last)`` outside which their weights are all zero."""

    start: int
    stop: int
    first: int
    last: int
    weights: torch.Tensor  # [stop - start, last - first]


def _bands(operator: torch.Tensor) -> tuple[_Band, ...]:
    """An ``[size, grid]`` operator cut into slices of ``BAND`` outputs with their nonzero
    cells; one slice, the whole operator, where that skips less than ``3 / 4`` of its products
    (the calls' overhead then outweighs the saving: eight 256x256 maps, 56% skipped, took
    0.42 ms banded against 0.30 ms in one product)."""
    bands = []
    for start in range(0, operator.shape[0], BAND):
        stop = min(operator.shape[0], start + BAND)
        cells = torch.nonzero((operator[start:stop] != 0).any(dim=0)).flatten()
        first, last = (int(cells[0]), int(cells[-1]) + 1) if len(cells) else (0, 0)
        bands.append(_Band(start, stop, first, last, operator[start:stop, first:last].contiguous()))
    if 4 * sum(band.weights.numel() for band in bands) > operator.numel():
        return (_Band(0, operator.shape[0], 0, operator.shape[1], operator),)
    return tuple(bands)


@lru_cache(maxsize=16)
def _operators(grid: tuple[int, int], image_size: tuple[int, int], sigma: float, device: str) -> tuple[tuple[_Band, ...], tuple[_Band, ...]]:
    mode = _border_mode(image_size[0], image_size[1], sigma)
    rows = _axis_operator(grid[0], image_size[0], sigma, mode, torch.device(device))
    cols = _axis_operator(grid[1], image_size[1], sigma, mode, torch.device(device))
    return _bands(rows), _bands(cols)


def patch_scores_to_maps(patch_scores: torch.Tensor, image_size: tuple[int, int], sigma: float) -> torch.Tensor:
    """``[B, h, w]`` patch scores -> ``[B, H, W]`` pixel maps (bilinear upsampling, then blur).

    Computed as ``A @ (S @ C.T)``, band by band (see the module docstring).
    """
    scores = patch_scores.float()
    grid = (int(scores.shape[-2]), int(scores.shape[-1]))
    height, width = int(image_size[0]), int(image_size[1])
    rows, cols = _operators(grid, (height, width), float(sigma), str(scores.device))
    if len(cols) == 1:
        across = scores @ cols[0].weights.T  # S @ C.T: [B, h, W]
    else:
        across = scores.new_empty(*scores.shape[:-1], width)
        for band in cols:
            across[..., band.start : band.stop] = scores[..., band.first : band.last] @ band.weights.T
    if len(rows) == 1:
        return rows[0].weights @ across
    maps = scores.new_empty(*scores.shape[:-2], height, width)
    for band in rows:
        maps[..., band.start : band.stop, :] = band.weights @ across[..., band.first : band.last, :]
    return maps


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


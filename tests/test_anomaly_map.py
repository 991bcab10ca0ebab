"""Patch scores to pixel maps: the matrix form equals upsample-then-blur, borders included."""

from __future__ import annotations

import pytest
import torch

import torch.nn.functional as F

from fedpatch.anomaly_map import BAND, _axis_operator, _Bands, _operators, gaussian_kernel1d, patch_scores_to_maps


def upsample_then_blur(patch_scores: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """The direct form, as the reference: bilinear upsampling of the whole grid, then a separable
    Gaussian blur with reflected borders (replicated when the map is not wider than its radius)."""
    maps = F.interpolate(patch_scores.unsqueeze(1), size=size, mode="bilinear", align_corners=False)
    if sigma > 0:
        kernel = gaussian_kernel1d(sigma)
        radius = kernel.numel() // 2
        mode = "reflect" if min(size) > radius else "replicate"
        maps = F.pad(maps, (radius, radius, radius, radius), mode=mode)
        maps = F.conv2d(F.conv2d(maps, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))
    return maps.squeeze(1)


@pytest.mark.parametrize(
    ("grid", "size", "sigma"),
    [
        ((32, 32), (256, 256), 4.0),  # the 256x256 default
        ((94, 125), (750, 1000), 4.0),  # AutoVI tank_screw at native size
        ((8, 12), (64, 96), 4.0),  # smaller than the kernel radius on one axis: reflected
        ((2, 2), (16, 16), 4.0),  # smaller than the radius on both: replicated borders
        ((5, 7), (40, 56), 0.0),  # no blur
        ((50, 50), (400, 400), 2.5),
        ((13, 9), (101, 77), 1.0),  # odd sizes, not a multiple of the grid
        ((10, 125), (80, 1000), 4.0),  # banded columns, rows in one product
        ((150, 7), (1203, 50), 2.0),  # banded rows (the last band short), columns in one product
    ],
)
def test_matrix_form_equals_upsample_then_blur(grid: tuple[int, int], size: tuple[int, int], sigma: float) -> None:
    scores = torch.rand(3, *grid, generator=torch.Generator().manual_seed(sum(size)))
    direct = upsample_then_blur(scores, size, sigma)
    fast = patch_scores_to_maps(scores, size, sigma)
    assert fast.shape == direct.shape == (3, *size)
    assert float((fast - direct).abs().max()) <= 1e-5 * float(direct.abs().max())


def test_constant_scores_give_a_constant_map() -> None:
    """Rows of both operators sum to one: no brightening or darkening at the borders."""
    maps = patch_scores_to_maps(torch.full((1, 10, 14), 2.5), (80, 112), 4.0)
    torch.testing.assert_close(maps, torch.full((1, 80, 112), 2.5), rtol=1e-5, atol=1e-5)


def test_one_hot_patch_spreads_symmetrically_and_keeps_its_peak() -> None:
    scores = torch.zeros(1, 16, 16)
    scores[0, 7:9, 7:9] = 1.0  # a centred 2x2 block: the map is symmetric about the centre
    maps = patch_scores_to_maps(scores, (128, 128), 4.0)[0]
    torch.testing.assert_close(maps, maps.flip(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps, maps.flip(1), rtol=1e-5, atol=1e-6)
    assert int(maps.argmax()) in {63 * 128 + 63, 63 * 128 + 64, 64 * 128 + 63, 64 * 128 + 64}
    assert 0 < float(maps.max()) < 1.0 and float(maps.min()) >= 0.0


def test_large_maps_skip_the_zero_weights_and_small_ones_take_one_product() -> None:
    """At 1000x750 each band of 64 outputs is multiplied with the 14 grid cells it depends on
    (of 125 / 94), and the bands hold every nonzero weight of the operator; at 256x256 banding
    would skip too little to pay for its gathers."""
    rows, cols = _operators((94, 125), (750, 1000), 4.0, "cpu")
    for bands, size, grid in ((rows, 750, 94), (cols, 1000, 125)):
        assert isinstance(bands, _Bands)
        count = -(-size // BAND)
        assert bands.cells.shape == (count, 14) and bands.weights.shape == (count, BAND, 14)
        assert int(bands.cells.min()) == 0 and int(bands.cells.max()) == grid - 1
        rebuilt = torch.zeros(count * BAND, grid)
        for band in range(count):
            rebuilt[band * BAND : (band + 1) * BAND, bands.cells[band]] = bands.weights[band]
        operator = _axis_operator(grid, size, 4.0, "reflect", torch.device("cpu"))
        assert torch.equal(rebuilt[:size], operator) and not rebuilt[size:].any()
    small_rows, small_cols = _operators((32, 32), (256, 256), 4.0, "cpu")
    assert not isinstance(small_rows, _Bands) and small_rows.shape == small_cols.shape == (256, 32)

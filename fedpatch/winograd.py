"""3x3 convolutions computed with Winograd's minimal filtering algorithm F(4x4, 3x3) on the CPU.

Why: the backbone's forward pass is most of PatchCore's time on a CPU, and most of a ResNet's
multiply-adds are in its 3x3 stride-1 convolutions (55% of WideResNet-50-2's up to layer3).
oneDNN computes those directly, at the machine's float32 matrix-product rate, so the only way
to go faster without changing the arithmetic's precision is to do fewer multiplications.
Winograd's algorithm computes each 4x4 block of outputs from a 6x6 block of inputs with 36
products per (input, output) channel pair instead of 144: the convolution becomes 36 matrix
products (one per position of the transformed 6x6 tile) between cheap linear transforms of the
input tiles and of the filters.

Precision: the transforms add rounding, more for larger tiles. With the interpolation points
0, 1, -1, 2, -1/2 (and infinity) a float32 convolution's error was 2.6e-6 of its largest
output on random data, against 1.5e-6 for the direct convolution and 7.6e-6 for the textbook
points 0, +-1, +-2 (a one-off check on 256-channel ReLU inputs). ``WinogradConv2d`` therefore
runs only in float32 on the CPU; on GPUs (cuDNN picks its own algorithms), under autocast
(bfloat16 tiles would lose too much) and on small maps (where the transforms' per-call overhead
outweighs the saved products) it is the ordinary convolution.

Memory: the transformed filters take 4x the filter's memory (the filter is kept for the direct
path): 217 MiB for WideResNet-50-2 up to layer3, carried along unused when the extractor moves
to a GPU. The transformed input and output tiles take 2.25x an input and output band each, in
bands of at most ``BAND_BYTES`` of transformed input, whatever the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

OUTPUT_TILE = 4
"""Outputs per tile side (m): F(4x4, 3x3)."""
INPUT_TILE = OUTPUT_TILE + 2
"""Inputs per tile side (m + r - 1)."""

# Toom-Cook matrices for the points 0, 1, -1, 2, -1/2 and infinity (one column/row each):
# y = AT [(G g GT) * (BT d B)] A for a 6x6 input tile d and a 3x3 filter g (correlation, as
# torch's conv2d computes). Checked against the direct convolution in float64 by the tests.
_AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -1 / 2, 0), (0, 1, 1, 4, 1 / 4, 0), (0, 1, -1, 8, -1 / 8, 1))
_G = ((1, 0, 0), (-1 / 3, -1 / 3, -1 / 3), (1 / 3, -1 / 3, 1 / 3), (1 / 15, 2 / 15, 4 / 15), (-16 / 15, 8 / 15, -4 / 15), (0, 0, 1))
_BT = (
    (1, 3 / 2, -2, -3 / 2, 1, 0),
    (0, -1, -5 / 2, -1 / 2, 1, 0),
    (0, 1, 1 / 2, -5 / 2, 1, 0),
    (0, -1 / 2, -1, 1 / 2, 1, 0),
    (0, 2, -1, -2, 1, 0),
    (0, 1, 3 / 2, -2, -3 / 2, 1),
)
_ONES = 1
"""The column of ``_AT`` that is all ones (the point 1): a constant added to that transformed
position's product appears unchanged in all 16 outputs, which is how the bias is added."""

BAND_BYTES = 32 << 20
"""Most bytes of transformed input tiles held at once (bands of tile rows)."""
MIN_TILES = 64
"""Fewer tiles (4x4 output blocks, whole batch) than this run as a direct convolution: the
transforms are ~100 small tensor operations per call, whatever the map's size (one-off, 2
threads: 512 channels on 2 x 8x8, 8 tiles, broke even; 256 channels on 16x16, 16 tiles, ran
0.75x; 8 x 16x16, 128 tiles, 2.1x)."""
MIN_CHANNELS = 256
"""Convolutions with fewer input or output channels stay direct: at 128 channels the 36
matrix products ran at ~120 GFLOP/s against the direct convolution's ~220 and the transforms
cost as much as the products, so nothing was gained (0.87-1.32x across runs and shapes);
1.5-1.9x at 256 channels and 2.1-2.4x at 512 (one-off, 2 threads)."""


def transform_filters(weight: torch.Tensor) -> torch.Tensor:
    """Filters ``[K, C, 3, 3]`` -> their transforms ``[36, C, K]`` (computed in float64)."""
    g = torch.tensor(_G, dtype=torch.float64)
    kron = torch.kron(g, g)  # [36, 9]: row (k, l) holds G[k, i] * G[l, j] at column (i, j)
    out_channels, in_channels = weight.shape[:2]
    taps = weight.detach().double().permute(2, 3, 1, 0).reshape(9, in_channels * out_channels)
    return (kron @ taps).reshape(INPUT_TILE * INPUT_TILE, in_channels, out_channels).to(weight.dtype)


def _combine(coefficients: Sequence[float], terms: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """``sum(c * t)`` over the nonzero coefficients, one pass per term, into ``out`` if given."""
    pairs = [(float(c), t) for c, t in zip(coefficients, terms) if c != 0]
    (first_c, first), rest = pairs[0], pairs[1:]
    if out is None:
        out = first * first_c if first_c != 1 else first.clone()
    elif first_c == 1:
        out.copy_(first)
    else:
        torch.mul(first, first_c, out=out)
    for c, term in rest:
        out.add_(term, alpha=c)
    return out


def _strided(x: torch.Tensor, dim: int, start: int, count: int) -> torch.Tensor:
    """``count`` slices of ``x`` along ``dim``, ``OUTPUT_TILE`` apart from ``start``."""
    return x.narrow(dim, start, OUTPUT_TILE * (count - 1) + 1)[(slice(None),) * dim + (slice(None, None, OUTPUT_TILE),)]


def winograd_conv3x3(x: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 3x3, stride 1, padding 1 convolution of ``x`` ``[N, C, H, W]`` with transformed
    ``filters`` ``[36, C, K]`` (``transform_filters``): ``[N, K, H, W]``, channels-last."""
    n, channels, height, width = x.shape
    out_channels = filters.shape[-1]
    tile_rows, tile_cols = -(-height // OUTPUT_TILE), -(-width // OUTPUT_TILE)
    padded = x.new_zeros(n, tile_rows * OUTPUT_TILE + 2, tile_cols * OUTPUT_TILE + 2, channels)
    padded[:, 1 : height + 1, 1 : width + 1] = x.permute(0, 2, 3, 1)
    out = torch.empty(n, height, width, out_channels, dtype=x.dtype, device=x.device)
    # out[:, p::4, q::4], the outputs at position (p, q) of every tile: [N, rows_p, cols_q, K]
    phases = [[out[:, p::OUTPUT_TILE, q::OUTPUT_TILE] for q in range(OUTPUT_TILE)] for p in range(OUTPUT_TILE)]
    tile_bytes = n * tile_cols * INPUT_TILE * INPUT_TILE * channels * x.element_size()
    band = max(1, min(tile_rows, BAND_BYTES // tile_bytes))
    for first in range(0, tile_rows, band):
        rows = min(band, tile_rows - first)
        source = padded.narrow(1, first * OUTPUT_TILE, rows * OUTPUT_TILE + 2)
        # the input transform BT d B, rows then columns, into [36, N * rows * cols, C]
        row_terms = [_strided(source, 1, r, rows) for r in range(INPUT_TILE)]
        by_row = [_combine(coefficients, row_terms) for coefficients in _BT]
        tiles = x.new_empty(INPUT_TILE, INPUT_TILE, n, rows, tile_cols, channels)
        for k, transformed in enumerate(by_row):
            col_terms = [_strided(transformed, 2, s, tile_cols) for s in range(INPUT_TILE)]
            for l, coefficients in enumerate(_BT):
                _combine(coefficients, col_terms, out=tiles[k, l])
        del by_row, row_terms
        products = torch.bmm(tiles.view(INPUT_TILE * INPUT_TILE, -1, channels), filters)
        del tiles
        products = products.view(INPUT_TILE, INPUT_TILE, n, rows, tile_cols, out_channels)
        if bias is not None:
            products[_ONES, _ONES].add_(bias)
        # the output transform AT m A, rows then columns, into the band's outputs
        for p, coefficients in enumerate(_AT):
            by_row_out = _combine(coefficients, list(products))  # [6, N, rows, cols, K]
            for q, col_coefficients in enumerate(_AT):
                target = phases[p][q].narrow(1, first, max(0, min(rows, phases[p][q].shape[1] - first)))
                if target.shape[1] == 0:
                    continue
                terms = [term[:, : target.shape[1], : target.shape[2]] for term in by_row_out]
                _combine(col_coefficients, terms, out=target)
    return out.permute(0, 3, 1, 2)


class WinogradConv2d(nn.Conv2d):
    """A 3x3, stride-1, padding-1 convolution that runs Winograd's F(4x4, 3x3) on CPU float32
    inputs with at least ``MIN_TILES`` tiles, and the direct convolution otherwise.

    The filter stays the module's ``weight`` (for the direct path); its transform is a buffer
    made once from it, for a frozen backbone's weights.
    """

    winograd_filters: torch.Tensor
    min_tiles: int = MIN_TILES

    @staticmethod
    def applies_to(conv: nn.Module) -> bool:
        """Whether ``conv`` is a plain 3x3, stride-1, padding-1, ungrouped zero-padded convolution
        with at least ``MIN_CHANNELS`` input and output channels."""
        return (
            type(conv) is nn.Conv2d
            and conv.kernel_size == (3, 3)
            and conv.stride == (1, 1)
            and conv.padding == (1, 1)
            and conv.dilation == (1, 1)
            and conv.groups == 1
            and conv.padding_mode == "zeros"
            and min(conv.in_channels, conv.out_channels) >= MIN_CHANNELS
        )

    @classmethod
    def replacing(cls, conv: nn.Conv2d) -> WinogradConv2d:
        """A ``WinogradConv2d`` holding ``conv``'s weight and bias (shared, not copied)."""
        new = cls(conv.in_channels, conv.out_channels, 3, padding=1, bias=conv.bias is not None, device="meta")
        new.weight = conv.weight
        new.bias = conv.bias
        new.register_buffer("winograd_filters", transform_filters(conv.weight), persistent=False)
        return new.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tiles = x.shape[0] * -(-x.shape[-2] // OUTPUT_TILE) * -(-x.shape[-1] // OUTPUT_TILE)
        if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_autocast_enabled(x.device.type) or tiles < self.min_tiles:
            return super().forward(x)
        return winograd_conv3x3(x, self.winograd_filters, self.bias)

"""Backbone forward on the CPU: the fused extractor (BatchNorm folded, "SAME" padding without
input copies, Winograd 3x3 convolutions, channels-last) vs the plain one.

    python -m benchmarks.backbone_bench --out benchmarks/results

Same random weights, same input; each time is the median of 5 calls after 2 warm-up calls,
the better of two alternating rounds per extractor. Also reports the largest relative
difference between the two extractors' features. Two rewrites are also timed on their own,
against the fused extractor with that one rewrite undone: for backbones with "SAME"-padded
convolutions (the efficientnet_lite family) timm's padded-copy ``Conv2dSame`` put back
(``same_padding_speedup``), for those with Winograd convolutions (the ResNets' wide 3x3
convolutions) the direct ``nn.Conv2d`` put back (``winograd_speedup``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from timm.layers import Conv2dSame
from torch import nn

from fedpatch.backbone import FeatureExtractor
from fedpatch.fusion import SamePaddedConv2d, swap_modules
from fedpatch.winograd import WinogradConv2d

CONFIGS = [
    ("efficientnet_lite0", (256, 256), 8),
    ("efficientnet_lite0", (1000, 750), 2),
    ("wide_resnet50_2", (256, 256), 8),
    ("wide_resnet50_2", (1000, 750), 2),
]


def _median_seconds(extractor: FeatureExtractor, images: torch.Tensor, calls: int = 5) -> float:
    with torch.no_grad():
        extractor(images)
        extractor(images)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            extractor(images)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _put_back(extractor: FeatureExtractor, kind: type[nn.Module], rebuild: Callable[[nn.Module], nn.Module]) -> FeatureExtractor | None:
    """A copy of ``extractor`` with each ``kind`` module replaced by ``rebuild(module)``, or None
    when it has none: the fused extractor without that one rewrite."""
    swapped = swap_modules(extractor, lambda module: isinstance(module, kind), lambda module: rebuild(module).eval())
    return None if swapped is None else swapped[0]  # type: ignore[return-value]


def _timm_conv(conv: nn.Module) -> nn.Module:
    assert isinstance(conv, SamePaddedConv2d)
    timm_conv = Conv2dSame(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,  # type: ignore[arg-type]
                           dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None)  # type: ignore[arg-type]
    timm_conv.weight, timm_conv.bias = conv.weight, conv.bias
    return timm_conv


def _direct_conv(conv: nn.Module) -> nn.Module:
    assert isinstance(conv, WinogradConv2d)
    direct = nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1, bias=conv.bias is not None, device="meta")
    direct.weight, direct.bias = conv.weight, conv.bias
    return direct


def with_timm_padding(extractor: FeatureExtractor) -> FeatureExtractor | None:
    """A copy of a fused extractor whose ``SamePaddedConv2d`` modules are timm's ``Conv2dSame``
    again (same weights), or None when it has none."""
    return _put_back(extractor, SamePaddedConv2d, _timm_conv)


def with_direct_convolutions(extractor: FeatureExtractor) -> FeatureExtractor | None:
    """A copy of a fused extractor whose ``WinogradConv2d`` modules are direct ``nn.Conv2d``
    again (same weights), or None when it has none."""
    return _put_back(extractor, WinogradConv2d, _direct_conv)


def _relative_difference(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    return max(float((got[k] - expected[k]).abs().max() / expected[k].abs().max()) for k in expected)


def measure(backbone: str, size: tuple[int, int], batch: int) -> dict[str, object]:
    images = torch.rand(batch, 3, size[1], size[0], generator=torch.Generator().manual_seed(0))
    plain = FeatureExtractor(backbone, pretrained=False, fuse=False)
    fused = FeatureExtractor(backbone, pretrained=False)
    undone = {"same_padding": with_timm_padding(fused), "winograd": with_direct_convolutions(fused)}
    ablations = {rewrite: extractor for rewrite, extractor in undone.items() if extractor is not None}
    variants: list[nn.Module] = [plain, fused, *ablations.values()]
    rounds = [[_median_seconds(extractor, images) for extractor in variants] for _ in range(2)]
    best = [min(r[i] for r in rounds) for i in range(len(variants))]
    with torch.no_grad():
        expected, got = plain(images), fused(images)
    row: dict[str, object] = {"backbone": backbone, "size": f"{size[0]}x{size[1]}", "batch": batch, "plain_s": best[0], "fused_s": best[1],
                              "speedup": best[0] / best[1], "max_rel_feature_diff": _relative_difference(got, expected)}
    for seconds, (rewrite, extractor) in zip(best[2:], ablations.items()):
        with torch.no_grad():
            without = extractor(images)
        row.update({f"fused_without_{rewrite}_s": seconds, f"{rewrite}_speedup": seconds / best[1],
                    f"{rewrite}_rel_diff": _relative_difference(got, without)})
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    rows = []
    for backbone, size, batch in CONFIGS:
        rows.append(measure(backbone, size, batch))
        print(rows[-1], flush=True)
    from benchmarks.run import markdown

    args.out.mkdir(parents=True, exist_ok=True)
    text = ["# backbone forward, 2 CPU threads: fused vs plain extractor, and the fused one without its SAME-padding (lite0) or Winograd (WRN) rewrite\n", "Command: `python -m benchmarks.backbone_bench`\n", markdown(rows)]
    (args.out / "backbone.md").write_text("\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

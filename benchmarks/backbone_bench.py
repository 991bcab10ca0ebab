"""Backbone forward on the CPU: the fused extractor (BatchNorm folded, "SAME" padding without
input copies, channels-last) vs the plain one.

    python -m benchmarks.backbone_bench --out benchmarks/results

Same random weights, same input; each time is the median of 5 calls after 2 warm-up calls,
the better of two alternating rounds per extractor. Also reports the largest relative
difference between the two extractors' features. For backbones with "SAME"-padded
convolutions (the efficientnet_lite family) a third extractor, the fused one with timm's
padded-copy ``Conv2dSame`` put back, times that rewrite alone (``same_padding_speedup``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from timm.layers import Conv2dSame
from torch import nn

from fedpatch.backbone import FeatureExtractor
from fedpatch.fusion import SamePaddedConv2d

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


def with_timm_padding(extractor: FeatureExtractor) -> FeatureExtractor | None:
    """A copy of a fused extractor whose ``SamePaddedConv2d`` modules are timm's ``Conv2dSame``
    again (same weights), or None when it has none: the fused extractor without that rewrite."""
    if not any(isinstance(module, SamePaddedConv2d) for module in extractor.modules()):
        return None
    copied = copy.deepcopy(extractor)
    for parent in copied.modules():
        for name, child in parent.named_children():
            if isinstance(child, SamePaddedConv2d):
                timm_conv = Conv2dSame(child.in_channels, child.out_channels, child.kernel_size, stride=child.stride,  # type: ignore[arg-type]
                                       dilation=child.dilation, groups=child.groups, bias=child.bias is not None)  # type: ignore[arg-type]
                timm_conv.weight, timm_conv.bias = child.weight, child.bias
                setattr(parent, name, timm_conv.eval())
    return copied


def _relative_difference(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    return max(float((got[k] - expected[k]).abs().max() / expected[k].abs().max()) for k in expected)


def measure(backbone: str, size: tuple[int, int], batch: int) -> dict[str, object]:
    images = torch.rand(batch, 3, size[1], size[0], generator=torch.Generator().manual_seed(0))
    plain = FeatureExtractor(backbone, pretrained=False, fuse=False)
    fused = FeatureExtractor(backbone, pretrained=False)
    timm_padded = with_timm_padding(fused)
    variants: list[nn.Module] = [plain, fused] + ([timm_padded] if timm_padded is not None else [])
    rounds = [[_median_seconds(extractor, images) for extractor in variants] for _ in range(2)]
    best = [min(r[i] for r in rounds) for i in range(len(variants))]
    with torch.no_grad():
        expected, got = plain(images), fused(images)
    row: dict[str, object] = {"backbone": backbone, "size": f"{size[0]}x{size[1]}", "batch": batch, "plain_s": best[0], "fused_s": best[1],
                              "speedup": best[0] / best[1], "max_rel_feature_diff": _relative_difference(got, expected)}
    if timm_padded is not None:
        with torch.no_grad():
            padded = timm_padded(images)
        row.update({"fused_timm_padding_s": best[2], "same_padding_speedup": best[2] / best[1],
                    "same_padding_rel_diff": _relative_difference(got, padded)})
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
    text = ["# backbone forward, 2 CPU threads: fused vs plain extractor (and, for lite0, the fused one with timm's padded-copy SAME convolutions)\n", "Command: `python -m benchmarks.backbone_bench`\n", markdown(rows)]
    (args.out / "backbone.md").write_text("\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

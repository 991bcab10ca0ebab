"""Inference-only rewrites of a frozen backbone: BatchNorm folded into convolutions.

A frozen backbone's BatchNorm is a fixed per-channel affine map, so it can be folded into the
convolution that feeds it (``w' = w * s``, ``b' = (b - mean) * s + beta`` with
``s = gamma / sqrt(var + eps)``) and the normalisation pass over every activation disappears.
Together with the channels-last memory layout on the CPU (see ``FeatureExtractor``) and the
padding below, this made the backbone forward 1.11-1.16x (WideResNet-50-2) and 1.70-2.13x
(efficientnet_lite0) faster on 2 CPU cores (``benchmarks/backbone_bench.py``, two runs on
2026-11-24, both extractors under fedpatch's malloc settings; 1.4-2.0x and 2.6-3.3x before
those settings existed, when every freed activation was faulted in afresh), for a relative
change of the features of about 3e-6.

Which BatchNorm follows which convolution is found by running the stage once and watching the
tensors: a BatchNorm is folded when its input is the very tensor that a ``Conv2d`` just
returned. That covers torchvision's and timm's layouts (named ``convN``/``bnN`` pairs,
``Sequential`` pairs, timm's ``BatchNormAct2d``) without a table per architecture. The
rewritten stage is then checked against the original on the same input; a stage whose
features move by more than ``tolerance`` keeps its original modules.

TensorFlow-ported networks (timm's ``tf_efficientnet_lite*``) pad their strided convolutions
the "SAME" way, one more zero row/column after than before on even sizes, which timm's
``Conv2dSame`` does by copying every input into a padded tensor (``F.pad``) before the
convolution. ``slice_same_padding`` swaps those modules for ``SamePaddedConv2d``, which gets
the same windows from the convolution's own symmetric padding and drops the surplus output
rows/columns, so the largest activations of the network are neither zero-filled nor copied:
the efficientnet_lite0 forward pass ran 1.03-1.09x faster on 2 CPU cores with features equal
to 2e-6 relative (``benchmarks/backbone_bench.py``'s ``same_padding_speedup``, two runs).

Wide 3x3 stride-1 convolutions (ResNets' layer2/layer3) become ``WinogradConv2d``
(``use_winograd``, ``fedpatch.winograd``): 4x fewer multiplications on CPU float32 inputs,
WideResNet-50-2's forward pass 1.21-1.22x faster with features equal to 3e-6 relative
(``backbone_bench``'s ``winograd_speedup``, one run on 2026-11-24).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fedpatch.winograd import WinogradConv2d

LOGGER = logging.getLogger(__name__)


def _conv_bn_pairs(stage: nn.Module, example: torch.Tensor) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """The (conv, bn) pairs of ``stage`` where bn's input is the conv's output tensor."""
    conv_outputs: dict[int, tuple[nn.Module, torch.Tensor]] = {}  # holds the tensors: ids stay unique
    pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]] = []
    seen: set[int] = set()

    def after_conv(module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        conv_outputs[id(output)] = (module, output)

    def before_bn(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        entry = conv_outputs.get(id(inputs[0]))
        if entry is not None and entry[1] is inputs[0] and id(module) not in seen:
            seen.add(id(module))
            pairs.append((entry[0], module))  # type: ignore[arg-type]

    handles = []
    for module in stage.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(after_conv))
        elif isinstance(module, nn.BatchNorm2d):
            handles.append(module.register_forward_pre_hook(before_bn))
    try:
        with torch.no_grad():
            stage(example)
    finally:
        for handle in handles:
            handle.remove()
    return pairs


def _bn_remainder(bn: nn.BatchNorm2d) -> nn.Module | None:
    """What is left of ``bn`` once its affine map is folded away, or None if it cannot be folded."""
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return None
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
    if isinstance(drop, nn.Module) and isinstance(act, nn.Module):  # timm's BatchNormAct2d
        return nn.Sequential(drop, act)
    return None


def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold ``bn``'s affine map into ``conv``'s weight and bias, in place."""
    assert bn.running_mean is not None and bn.running_var is not None
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    bias = -bn.running_mean.double() * scale
    if conv.bias is not None:
        bias = bias + conv.bias.double() * scale
    if bn.bias is not None:
        bias = bias + bn.bias.double()
    weight = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.ndim - 1)))
    conv.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
    conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)


def _replace(root: nn.Module, target: nn.Module, replacement: nn.Module) -> None:
    for parent in root.modules():
        for name, child in parent.named_children():
            if child is target:
                setattr(parent, name, replacement)


def fold_batchnorm(stage: nn.Module, example: torch.Tensor, tolerance: float = 1e-4) -> tuple[nn.Module, int]:
    """A copy of ``stage`` (eval mode) with BatchNorms folded into their convolutions.

    Returns ``(stage, folded)``: the rewritten copy and how many BatchNorms it folded, or the
    original ``stage`` and 0 when nothing could be folded or the copy's output differs from the
    original's by more than ``tolerance`` (relative to the output's largest magnitude).
    """
    fused = copy.deepcopy(stage).eval()
    folded = 0
    for conv, bn in _conv_bn_pairs(fused, example):
        if conv.out_channels != bn.num_features:
            continue
        remainder = _bn_remainder(bn)
        if remainder is None:
            continue
        _fold_into(conv, bn)
        _replace(fused, bn, remainder)
        folded += 1
    if folded == 0 or not _same_output(stage, fused, example, tolerance, "BatchNorm folding", "keeping it unfolded"):
        return stage, 0
    return fused, folded


def _same_output(original: nn.Module, rewritten: nn.Module, example: torch.Tensor, tolerance: float, rewrite: str, fallback: str) -> bool:
    """Whether ``rewritten`` gives ``original``'s output on ``example`` within ``tolerance``
    (relative to the output's largest magnitude); if not, a warning naming the rewrite."""
    with torch.no_grad():
        expected, got = original(example), rewritten(example)
    error = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
    if error <= tolerance:
        return True
    LOGGER.warning("%s changed a backbone stage's output by %.2e; %s", rewrite, error, fallback)
    return False


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int, int]:
    """How one spatial axis of a "SAME" convolution is computed with symmetric padding.

    "SAME" pads ``total`` zeros, ``left = total // 2`` before and ``right = total - left``
    after, so that the output has ``ceil(size / stride)`` positions, window ``i`` starting at
    input position ``stride * i - left``. Padding ``left + stride * shift`` on both sides
    starts window ``j`` at ``stride * (j - shift) - left``: the same windows from output
    ``shift`` on, with at least ``right`` zeros after. Returns ``(padding, shift, outputs)``.
    """
    outputs = math.ceil(size / stride)
    total = max((outputs - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    left, right = total // 2, total - total // 2
    shift = -(-(right - left) // stride)
    return left + stride * shift, shift, outputs


class SamePaddedConv2d(nn.Conv2d):
    """A convolution with TensorFlow's "SAME" padding and no padded copy of its input.

    The output equals timm's ``Conv2dSame`` (the same sums of the same products); where the
    padding is asymmetric it is a view that starts ``shift`` rows/columns into the
    convolution's output (see ``_same_padding``).
    """

    @classmethod
    def replacing(cls, conv: nn.Conv2d) -> SamePaddedConv2d:
        """A ``SamePaddedConv2d`` holding ``conv``'s weight and bias (shared, not copied)."""
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,  # type: ignore[arg-type]
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, device="meta",  # type: ignore[arg-type]
        )  # fmt: skip
        new.weight = conv.weight
        new.bias = conv.bias
        return new.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (pad_h, shift_h, out_h), (pad_w, shift_w, out_w) = (
            _same_padding(size, kernel, stride, dilation)
            for size, kernel, stride, dilation in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation)
        )
        y = F.conv2d(x, self.weight, self.bias, self.stride, (pad_h, pad_w), self.dilation, self.groups)
        return y[..., shift_h : shift_h + out_h, shift_w : shift_w + out_w]


def swap_modules(root: nn.Module, is_target: Callable[[nn.Module], bool], make: Callable[[nn.Module], nn.Module]) -> tuple[nn.Module, list[nn.Module]] | None:
    """An eval-mode copy of ``root`` with each module ``is_target`` accepts replaced by
    ``make(module)``, and the replacements; None when ``root`` has no such module."""
    if not any(is_target(module) for module in root.modules()):
        return None
    copied = copy.deepcopy(root).eval()
    replacements = []
    for module in [module for module in copied.modules() if is_target(module)]:
        replacements.append(make(module))
        _replace(copied, module, replacements[-1])
    return copied, replacements


def slice_same_padding(stage: nn.Module, example: torch.Tensor, tolerance: float = 1e-4) -> tuple[nn.Module, int]:
    """A copy of ``stage`` whose timm ``Conv2dSame`` modules are ``SamePaddedConv2d``.

    Returns ``(stage, replaced)``; the original ``stage`` and 0 when it has none, or when the
    copy's output on ``example`` differs from the original's by more than ``tolerance``
    (relative to the output's largest magnitude), as ``fold_batchnorm`` does.
    """
    from timm.layers import Conv2dSame

    swapped = swap_modules(stage, lambda module: isinstance(module, Conv2dSame), SamePaddedConv2d.replacing)  # type: ignore[arg-type]
    if swapped is None or not _same_output(stage, swapped[0], example, tolerance, "the SAME-padding rewrite", "keeping timm's padding"):
        return stage, 0
    return swapped[0], len(swapped[1])


def use_winograd(stage: nn.Module, example: torch.Tensor, tolerance: float = 1e-4) -> tuple[nn.Module, int]:
    """A copy of ``stage`` whose eligible 3x3 convolutions are ``WinogradConv2d``
    (``fedpatch.winograd``: ``WinogradConv2d.applies_to``).

    Returns ``(stage, replaced)``; the original ``stage`` and 0 when it has none, or when the
    copy's output on ``example``, computed with the Winograd path whatever the example's size,
    differs from the original's by more than ``tolerance`` (as ``fold_batchnorm`` does).
    """
    swapped = swap_modules(stage, WinogradConv2d.applies_to, WinogradConv2d.replacing)  # type: ignore[arg-type]
    if swapped is None:
        return stage, 0
    rewritten, replacements = swapped
    for replacement in replacements:
        replacement.min_tiles = 0  # the probe is small: check the Winograd path itself
    try:
        same = _same_output(stage, rewritten, example, tolerance, "Winograd convolution", "keeping direct convolutions")
    finally:
        for replacement in replacements:
            del replacement.min_tiles
    if not same:
        return stage, 0
    return rewritten, len(replacements)

"""Inference-only rewrites of a frozen backbone: BatchNorm folded into convolutions.

A frozen backbone's BatchNorm is a fixed per-channel affine map, so it can be folded into the
convolution that feeds it (``w' = w * s``, ``b' = (b - mean) * s + beta`` with
``s = gamma / sqrt(var + eps)``) and the normalisation pass over every activation disappears.
Together with the channels-last memory layout on the CPU (see ``FeatureExtractor``) this
made the backbone forward 1.4-2.0x (WideResNet-50-2) and 2.6-3.3x (efficientnet_lite0)
faster on 2 CPU cores (``benchmarks/backbone_bench.py``), for a relative change of the
features of about 3e-6.

Which BatchNorm follows which convolution is found by running the stage once and watching the
tensors: a BatchNorm is folded when its input is the very tensor that a ``Conv2d`` just
returned. That covers torchvision's and timm's layouts (named ``convN``/``bnN`` pairs,
``Sequential`` pairs, timm's ``BatchNormAct2d``) without a table per architecture. The
rewritten stage is then checked against the original on the same input; a stage whose
features move by more than ``tolerance`` keeps its original modules.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

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
    if folded == 0:
        return stage, 0
    with torch.no_grad():
        expected, got = stage(example), fused(example)
    error = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
    if not error <= tolerance:
        LOGGER.warning("BatchNorm folding changed a backbone stage's output by %.2e; keeping it unfolded", error)
        return stage, 0
    return fused, folded

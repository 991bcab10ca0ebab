"""fedpatch.hardware: the CPU capability that picks the bfloat16 kernels."""

from __future__ import annotations

import pytest
import torch

from fedpatch.hardware import native_bfloat16_cpu

CHECKS = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


@pytest.mark.parametrize(("avx512_bf16", "amx", "native"), [(False, False, False), (True, False, True), (False, True, True), (True, True, True)])
def test_either_instruction_set_makes_bfloat16_native(monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool, native: bool) -> None:
    monkeypatch.setattr(torch.cpu, CHECKS[0], lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, CHECKS[1], lambda: amx, raising=False)
    assert native_bfloat16_cpu() is native


def test_a_torch_without_the_checks_counts_as_emulated(monkeypatch: pytest.MonkeyPatch) -> None:
    """Older torch builds lack the probes: bfloat16 is then treated as emulated, not assumed."""
    for name in CHECKS:
        monkeypatch.delattr(torch.cpu, name, raising=False)
    assert native_bfloat16_cpu() is False

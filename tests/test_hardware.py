"""fedpatch.hardware: the CPU capabilities that pick the bfloat16 and int8 kernels."""

from __future__ import annotations

import pytest
import torch

from fedpatch.hardware import native_bfloat16_cpu, native_int8_cpu

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


@pytest.mark.parametrize(
    ("capabilities", "native"),
    [
        ({"avx512_vnni": True}, True),
        ({"avx_vnni": True, "avx512_vnni": False}, True),
        ({"amx_int8": True}, True),
        ({"avx512_vnni": False, "avx_vnni": False, "amx_int8": False, "avx512_bf16": True}, False),
        ({}, False),
    ],
)
def test_int8_products_are_native_with_any_dot_product_instruction_set(monkeypatch: pytest.MonkeyPatch, capabilities: dict[str, bool], native: bool) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities, raising=False)
    assert native_int8_cpu() is native


def test_a_torch_without_the_capability_table_has_no_native_int8(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    assert native_int8_cpu() is False

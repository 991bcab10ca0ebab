"""What this machine's CPU can do, for the modules that choose a kernel by it.

The backbone's opt-in bfloat16 forward pass (``fedpatch.patchcore`` warns where it would be
emulated) asks whether bfloat16 products are native; the screened bank search
(``fedpatch.screened_search``) asks the same of int8 products. The questions live here so
that no module depends on another's for them.
"""

from __future__ import annotations

import torch


def native_bfloat16_cpu() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), so bfloat16 work
    is faster than float32 rather than emulated."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check is not None and check() for check in checks)


def native_int8_cpu() -> bool:
    """Whether this CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX), on
    which an int8 matrix product runs at several times the float32 rate with exact int32
    sums. (``torch.cpu._is_vnni_supported`` looks at AVX512-VNNI only, so the capability
    table is read directly.)"""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is None:
        return False
    found = capabilities()
    return any(found.get(name, False) for name in ("avx512_vnni", "avx_vnni", "amx_int8"))

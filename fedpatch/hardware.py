"""What this machine's CPU can do, for the modules that choose a kernel by it.

The backbone's opt-in bfloat16 forward pass (``fedpatch.patchcore`` warns where it would be
emulated) and the screened bank search (``fedpatch.screened_search``, used only where the
bfloat16 product is native) both ask the same question; it lives here so that neither
depends on the other's module for it.
"""

from __future__ import annotations

import torch


def native_bfloat16_cpu() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), so bfloat16 work
    is faster than float32 rather than emulated."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check is not None and check() for check in checks)

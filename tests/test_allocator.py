"""fedpatch.allocator: glibc keeps freed large blocks mapped, unless the user chose otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedpatch import PatchCore, allocator

REPO = Path(__file__).resolve().parents[1]

# 64 MiB tensors allocated, filled and freed in turn (as a backbone's layer outputs are): how
# many pages do three of them fault in once the heap has settled? (torch aligns each block, so
# glibc takes a few rounds to find a hole that fits: 3 to 7 in repeated runs; the test leaves
# it twelve.)
PROBE = """
import resource, torch
from fedpatch import allocator
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(12):
    torch.empty(64 << 18).fill_(1.0)
before = faults()
for _ in range(3):
    torch.empty(64 << 18).fill_(1.0)
print(allocator.tune(), faults() - before)
"""
PAGES_3X64_MIB = 3 * (64 << 20) // os.sysconf("SC_PAGE_SIZE")


def _probe(**env: str) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != allocator.OPT_OUT_ENV}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1])


def test_this_platform_is_glibc() -> None:
    # the CI machines are Linux/glibc: the tests below would prove nothing elsewhere
    assert sys.platform.startswith("linux") and allocator._glibc() is not None


def test_import_tunes_malloc_so_a_freed_block_is_reused_without_page_faults() -> None:
    tuned, faults = _probe()
    assert tuned
    assert faults < PAGES_3X64_MIB // 20  # the freed blocks' pages are still mapped


def test_opt_out_and_user_settings_keep_glibcs_behaviour() -> None:
    for env in ({allocator.OPT_OUT_ENV: "0"}, {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}):
        tuned, faults = _probe(**env)
        assert not tuned, env
        assert faults >= PAGES_3X64_MIB * 0.9, env  # fresh mappings: every page faults in again


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"PATH": "/bin", allocator.OPT_OUT_ENV: "1"}, None),
        ({allocator.OPT_OUT_ENV: "0"}, allocator.OPT_OUT_ENV),
        ({"MALLOC_TRIM_THRESHOLD_": "0"}, "MALLOC_TRIM_THRESHOLD_"),
        ({"MALLOC_ARENA_MAX": "2"}, "MALLOC_ARENA_MAX"),
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "GLIBC_TUNABLES"),
        ({"GLIBC_TUNABLES": "glibc.rtld.nns=2"}, None),
    ],
)
def test_user_chose_settings_names_the_variable(environ: dict[str, str], expected: str | None) -> None:
    assert allocator.user_chose_settings(environ) == expected


def test_configure_takes_only_byte_counts_that_mallopt_can_hold() -> None:
    assert allocator.configure(allocator.MMAP_THRESHOLD, allocator.TRIM_THRESHOLD)
    for bad in (-1, 0, 1 << 31):
        with pytest.raises(ValueError, match="threshold"):
            allocator.configure(bad, allocator.TRIM_THRESHOLD)
        with pytest.raises(ValueError, match="threshold"):
            allocator.configure(allocator.MMAP_THRESHOLD, bad)


def test_fit_hands_freed_memory_back_after_each_chunk_and_at_its_end(monkeypatch: pytest.MonkeyPatch) -> None:
    model = PatchCore("resnet18", pretrained=False, device="cpu", coreset_chunk_size=20, batch_size=1)
    calls = []
    monkeypatch.setattr(allocator, "release_free_memory", lambda: calls.append(1))
    model.fit([torch.rand(3, 32, 32) for _ in range(3)])  # 3 x 16 patches: chunks cut at 20 and 40
    assert len(calls) == 3  # after the 2nd and 3rd images (each completed a chunk), then at the end
    assert model.fit_stats.chunks == 3  # the partial chunk of 8 was reduced by finalize

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
# many pages do three of them fault in, before fedpatch's first call and inside its settings
# once the heap has settled? (torch aligns each block, so glibc takes a few rounds to find a
# hole that fits: 3 to 7 in repeated runs; the test leaves it twelve.) After the scope, blocks
# that fit the memory it kept still reuse it (glibc serves a request from free heap memory
# before it maps), but a larger one (200 MiB) gets a mapping of its own each time instead of
# growing the heap.
PROBE = """
import resource, torch
from fedpatch import allocator
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def three(mib=64):
    before = faults()
    for _ in range(3):
        torch.empty(mib << 18).fill_(1.0)
    return faults() - before
untouched = three()
with allocator.tuned() as active:
    for _ in range(12):
        torch.empty(64 << 18).fill_(1.0)
    inside = three()
after = three(200)
print(active, untouched, inside, after)
"""
PAGES_3X64_MIB = 3 * (64 << 20) // os.sysconf("SC_PAGE_SIZE")


def _probe(**env: str) -> tuple[bool, int, int, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != allocator.OPT_OUT_ENV}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1]), int(out[2]), int(out[3])


def test_this_platform_is_glibc() -> None:
    # the CI machines are Linux/glibc: the tests below would prove nothing elsewhere
    assert sys.platform.startswith("linux") and allocator._glibc() is not None


def test_freed_blocks_are_reused_inside_fedpatchs_calls_only() -> None:
    active, untouched, inside, after = _probe()
    assert active
    assert untouched >= PAGES_3X64_MIB * 0.9  # importing fedpatch changed nothing: fresh mappings
    assert inside < PAGES_3X64_MIB // 20  # the freed blocks' pages are still mapped
    assert after >= PAGES_3X64_MIB * 200 / 64 * 0.9  # outside: a block above 32 MiB that fits no kept
    # memory is mapped afresh, as under glibc's defaults, instead of growing the heap


def test_opt_out_and_user_settings_keep_glibcs_behaviour() -> None:
    for env in ({allocator.OPT_OUT_ENV: "0"}, {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}):
        active, _, inside, _ = _probe(**env)
        assert not active, env
        assert inside >= PAGES_3X64_MIB * 0.9, env  # fresh mappings: every page faults in again


def test_nested_scopes_switch_the_settings_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(allocator, "configure", lambda mmap, trim: calls.append(mmap) or True)
    monkeypatch.setattr(allocator, "user_chose_settings", lambda environ=None: None)
    with allocator.tuned() as outer:
        with allocator.tuned() as inner:
            assert calls == [allocator.MMAP_THRESHOLD]
        assert calls == [allocator.MMAP_THRESHOLD]  # the outer scope still holds them
    assert outer and inner
    assert calls == [allocator.MMAP_THRESHOLD, allocator.OUTSIDE_MMAP_THRESHOLD]
    monkeypatch.setattr(allocator, "user_chose_settings", lambda environ=None: allocator.OPT_OUT_ENV)
    with allocator.tuned() as active:
        assert not active
    assert len(calls) == 2  # opted out: nothing set


def test_inner_scopes_reuse_the_outer_scopes_outcome(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment is read once per outermost scope, and a value glibc refuses reads False."""
    reads: list[int] = []
    monkeypatch.setattr(allocator, "user_chose_settings", lambda environ=None: reads.append(1) and None)
    monkeypatch.setattr(allocator, "configure", lambda mmap, trim: mmap != allocator.MMAP_THRESHOLD)
    with allocator.tuned() as outer:
        with allocator.tuned() as inner, allocator.tuned() as innermost:
            pass
    assert (outer, inner, innermost) == (False, False, False)  # glibc refused the inside threshold
    assert len(reads) == 1
    calls: list[int] = []
    monkeypatch.setattr(allocator, "configure", lambda mmap, trim: calls.append(mmap) or True)
    allocator.restore_outside()
    assert calls == [allocator.OUTSIDE_MMAP_THRESHOLD] and len(reads) == 2


def test_model_calls_run_inside_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """fit and each predicted batch hold the settings; the caller's code between batches does not."""
    model = PatchCore("resnet18", pretrained=False, device="cpu", batch_size=1)
    seen: list[int] = []
    real_embed = model.embed
    monkeypatch.setattr(model, "embed", lambda images: seen.append(allocator._depth) or real_embed(images))
    model.fit([torch.rand(3, 32, 32) for _ in range(2)])
    between = [allocator._depth for _ in model.iter_predictions([torch.rand(3, 32, 32) for _ in range(2)])]
    assert seen and all(depth >= 1 for depth in seen)
    assert between == [0, 0] and allocator._depth == 0


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


def test_fit_hands_freed_memory_back_before_each_backbone_pass_and_at_its_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every batch's pass starts on a trimmed heap, whether or not the batch before completed a
    chunk (benchmarks/results/fit_memory.md: the untrimmed passes made the 300-image peak)."""
    model = PatchCore("resnet18", pretrained=False, device="cpu", coreset_chunk_size=20, batch_size=1)
    calls: list[int] = []
    monkeypatch.setattr(allocator, "release_free_memory", lambda: calls.append(1))
    model.fit([torch.rand(3, 32, 32) for _ in range(5)])  # 5 x 16 patches; the first image completes no chunk
    assert len(calls) == 6  # after each of the five images, then at the end
    assert model.fit_stats.chunks == 4  # chunks of 20 completed by the 2nd to the 5th image

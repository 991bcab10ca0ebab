"""glibc malloc settings that let large temporaries reuse freed memory.

Why: on Linux, glibc's malloc serves every block above its mmap threshold (128 KiB, raised
on the fly up to 32 MiB) with a fresh ``mmap`` and unmaps it again on ``free``. A backbone's
layer outputs on big images are tens of megabytes each, so every forward pass asked the kernel
for hundreds of megabytes of new zeroed pages and returned them right after. On 2 CPU cores
(``python -m benchmarks.allocator_bench``, ``benchmarks/results/allocator.md``), one 1000x750
image cost efficientnet_lite0's forward pass 49,800 page faults and 0.116 s, against none and
0.064 s with the settings below (1.8x); WideResNet-50-2's 129,100 faults and 0.83 s against
0.67 s (1.25x); batches of eight 256x256 images ran 2.3x (lite0) and 1.19x (WRN) faster.
PatchCore's prediction, whose search and post-processing make large temporaries too, scored
1.14-1.67x as many images per second on three of the configurations. The fourth, WRN at
256x256, read 0.875x in that run, which is noise: in one process, alternating, it scored
15.3-15.6 img/s under these settings and 15.6 with them held for the whole run.

What: blocks below ``MMAP_THRESHOLD`` (256 MiB) come from the heap, and the heap keeps up to
``TRIM_THRESHOLD`` (1 GiB) of freed memory at its top instead of handing it back, so the next
layer and the next image reuse pages that are already mapped. Blocks of 256 MiB or more (a
large bank, for one) are still mapped and unmapped on their own. The cost is resident memory
that stays allocated between batches: +72 MiB peak RSS for WideResNet-50-2 at 1000x750,
+27 MiB at 256x256, within 12 MiB either way for efficientnet_lite0 (+171 / +97 / 4 MiB in
the run before). (A freed block is reused only by a request that fits in it, and torch
aligns its blocks, so a repeating pattern of allocations grows the heap a little before it
settles: a 64 MiB tensor made and freed over and over was faulted in afresh 3 to 7 times,
then never again.)

``release_free_memory`` hands the retained memory back: ``FeatureExtractor`` calls it once
built, ``PatchCore.fit`` after each batch's patches are buffered and when it ends.
``benchmarks.fit_memory``'s 300-image fit at 1000x750 with WRN-shaped random features peaked
at 3,870 MiB without those calls, 3,446 with them (then only after each reduced coreset chunk)
and 3,371 under glibc's defaults; through the real WideResNet, 3,688 / 3,618 / 3,339 MiB.
Releasing only after a chunk let the passes in between start on a heap whose freed blocks the
coreset's work had partly taken over, so they grew it: the real fit's peak read 3,756-3,860
MiB that way and 3,505-3,645 with a release before every pass (2026-11-24), at no measurable cost
in fit time (one-off: WRN 256x256 and 1000x750, lite0 256x256). Prediction keeps the memory,
so that a caller scoring one image per call does not pay the page faults again on every call.

The settings hold only inside fedpatch's own work (``tuned``: the backbone's forward pass,
``PatchCore.fit``, each batch of a prediction), not process-wide: other code in the process
(a caller's loop between two predicted batches, another library) runs under glibc's usual
behaviour. That matters because heap-kept temporaries can grow the heap without bound in
some allocation patterns: anomalib's KCenterGreedy, run in a process where these settings
were global, reached 15 GB in 262 picks. Outside the scope the mmap threshold is a fixed
``OUTSIDE_MMAP_THRESHOLD`` (32 MiB, the ceiling glibc's own dynamic threshold climbs to; the
dynamic mode cannot be switched back on once ``mallopt`` was called), and the trim threshold
stays at ``TRIM_THRESHOLD``, so that memory kept between two batches is not handed back by
a caller's ``free`` in between. Nothing changes before fedpatch's first call.

The settings are skipped where the user chose malloc settings of their own (any ``MALLOC_*``
variable or a ``glibc.malloc`` tunable in the environment) or set
``FEDPATCH_MALLOC_TUNING=0``; on other C libraries and systems ``tuned`` does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache

MMAP_THRESHOLD = 256 << 20
TRIM_THRESHOLD = 1 << 30
OUTSIDE_MMAP_THRESHOLD = 32 << 20
OPT_OUT_ENV = "FEDPATCH_MALLOC_TUNING"
# mallopt parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


@lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (it has ``gnu_get_libc_version``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded in this process, libc's among them
    except OSError:
        return None
    if not all(hasattr(libc, name) for name in ("gnu_get_libc_version", "mallopt", "malloc_trim")):
        return None
    return libc


def user_chose_settings(environ: Mapping[str, str] = os.environ) -> str | None:
    """The environment variable by which the user set malloc's behaviour, or None."""
    if environ.get(OPT_OUT_ENV, "").strip() == "0":
        return OPT_OUT_ENV
    for name in sorted(environ):
        if name.startswith("MALLOC_"):
            return name
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    return None


def configure(mmap_threshold: int, trim_threshold: int) -> bool:
    """Set glibc's mmap and trim thresholds (bytes); False where the C library is not glibc
    or it refused a value. Process-wide: every later allocation of every thread follows them."""
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if not 0 < value < 1 << 31:  # mallopt takes a C int; glibc would read a negative one as huge
            raise ValueError(f"{name} must be in [1, 2**31 - 1] bytes, got {value}")
    libc = _glibc()
    if libc is None:
        return False
    mmap_ok = libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(mmap_threshold))
    trim_ok = libc.mallopt(ctypes.c_int(M_TRIM_THRESHOLD), ctypes.c_int(trim_threshold))
    return bool(mmap_ok and trim_ok)


def enabled() -> bool:
    """Whether ``tuned`` applies fedpatch's settings in this process (glibc, and no settings of
    the user's own)."""
    return _glibc() is not None and user_chose_settings() is None


def _configure_outside() -> bool:
    return configure(OUTSIDE_MMAP_THRESHOLD, TRIM_THRESHOLD)


def restore_outside() -> None:
    """Put back the settings fedpatch keeps outside its own calls (module docstring), where
    ``enabled``: for code that changed them with ``configure`` in between."""
    if enabled():
        _configure_outside()


_LOCK = threading.Lock()
_depth = 0
_applies = False  # whether the outermost open block found the settings enabled
_active = False  # and glibc took them


@contextmanager
def tuned() -> Iterator[bool]:
    """fedpatch's settings for the duration of the block; yields whether they are in effect.

    Blocks nest and may run on several threads: the settings hold while any block is open,
    and the outside ones (module docstring) come back when the last one closes. Only the
    outermost block reads the environment and calls ``mallopt``; the blocks inside it (every
    forward pass of a fit, for one) share its outcome. False where ``enabled`` is False or
    glibc refused a value."""
    global _depth, _applies, _active
    with _LOCK:
        if _depth == 0:
            _applies = enabled()
            _active = _applies and configure(MMAP_THRESHOLD, TRIM_THRESHOLD)
        _depth += 1
        active = _active
    try:
        yield active
    finally:
        with _LOCK:
            _depth -= 1
            if _depth == 0 and _applies:
                _configure_outside()


def release_free_memory() -> None:
    """Hand the heap's free pages back to the system (``malloc_trim``); a no-op off glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(ctypes.c_size_t(0))

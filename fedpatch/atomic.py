"""Atomic file writes: a reader (or a resumed run) never sees a half-written file.

Every writer here puts the bytes into a hidden temporary file in the SAME folder as the
target (``.<name>.<random>.tmp``), flushes and fsyncs it, then renames it over the target with
``os.replace``, which is atomic on POSIX and Windows when both paths are on one file system
(hence the same folder). If writing fails or is interrupted (an exception, Ctrl-C), the
temporary file is removed and an existing target is left untouched.

API:

- :func:`atomic_write` ``(path, write)``: ``write(handle)`` fills an open binary file handle.
- :func:`atomic_write_bytes` ``(path, data)`` / :func:`atomic_write_text` ``(path, text)``.
- :func:`atomic_write_json` ``(path, data)``: indented, key-sorted JSON; NaN/inf refused.
- :func:`atomic_save` ``(path, save)``: for writers that need a file NAME, not a handle
  (``safetensors.numpy.save_file``, ``numpy.save`` to a path): ``save(tmp_path)`` writes the
  temporary path, which is then renamed over ``path``.

All return the target path; parent folders are created.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["atomic_save", "atomic_write", "atomic_write_bytes", "atomic_write_json", "atomic_write_text"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temporary_sibling(path: Path, suffix: str = ".tmp") -> tuple[int, str]:
    """A new temporary file next to ``path`` with the permissions a plain ``open`` would give.

    ``mkstemp`` creates files readable by their owner only (0600); renamed into place, results
    would be unreadable to the rest of a team or to a container running as another user.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


def _discard(tmp: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)


def _fsync_file(tmp: str) -> None:
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` through ``write(handle)`` into a temporary sibling, then rename it in place."""
    path = Path(path)
    fd, tmp = _temporary_sibling(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise
    return path


def atomic_save(path: str | Path, save: Callable[[Path], None]) -> Path:
    """Call ``save(tmp)`` on a temporary sibling path, then rename it over ``path``.

    For libraries that only write to a file name. ``save`` must write exactly ``tmp`` (the
    file exists, empty, when ``save`` is called). ``tmp`` ends with the target's own suffix
    (``.<name>.<random>.tmp.npy`` for ``x.npy``), so writers that add a missing suffix
    (``numpy.save``) write ``tmp`` itself.
    """
    path = Path(path)
    fd, tmp = _temporary_sibling(path, f".tmp{path.suffix}")
    os.close(fd)
    try:
        save(Path(tmp))
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Atomically write ``data``."""
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Atomically write ``text`` (UTF-8 by default)."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | Path, data: object) -> Path:
    """Atomically write ``data`` as indented, key-sorted JSON (like the official evaluator).

    NaN and infinities are refused (``ValueError``): they are not JSON and would make the
    file unreadable by strict parsers.
    """
    return atomic_write_text(path, json.dumps(data, indent=4, sort_keys=True, allow_nan=False) + "\n")

"""Peak resident memory of this process, polled from /proc, with phases and a hard cap.

``ru_maxrss`` only gives the peak of the whole process life; the benchmarks want the peak of
each phase (fit, predict), so a daemon thread reads ``VmRSS`` from ``/proc/self/status``
every few milliseconds. The same thread is a watchdog: above ``cap_mb`` it calls ``on_cap``
and ends the process, so a run that would exhaust a shared machine is recorded as
"out of memory above the cap" instead of taking the machine down.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from collections.abc import Callable


def current_rss_mb() -> float:
    """Resident set size of this process now, in MiB (from /proc/self/status)."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("VmRSS not found in /proc/self/status")


def lifetime_peak_mb() -> float:
    """The kernel's peak RSS of this process (``ru_maxrss``, KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class RssMonitor:
    """Polls RSS every ``interval`` seconds; ``phase(name)`` starts a new per-phase peak.

    Args:
        cap_mb: RSS above which ``on_cap(phase, rss_mb)`` is called and the process exits
            with status 3 (``None``: no cap).
        interval: polling period in seconds.
    """

    def __init__(self, cap_mb: float | None, on_cap: Callable[[str, float], None], interval: float = 0.01) -> None:
        self.cap_mb = cap_mb
        self.on_cap = on_cap
        self.interval = interval
        self.peaks: dict[str, float] = {}
        self._phase = "start"
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def phase(self, name: str) -> None:
        """Begin phase ``name``; its peak starts from the current RSS."""
        rss = current_rss_mb()
        with self._lock:
            self._phase = name
            self.peaks[name] = max(self.peaks.get(name, 0.0), rss)

    def _poll(self) -> None:
        while True:
            rss = current_rss_mb()
            with self._lock:
                phase = self._phase
                self.peaks[phase] = max(self.peaks.get(phase, 0.0), rss)
            if self.cap_mb is not None and rss > self.cap_mb:
                self.on_cap(phase, rss)
                os._exit(3)
            time.sleep(self.interval)

    def peak(self, *phases: str) -> float:
        """Largest RSS seen during any of ``phases`` (MiB)."""
        with self._lock:
            return max((self.peaks.get(p, 0.0) for p in phases), default=0.0)

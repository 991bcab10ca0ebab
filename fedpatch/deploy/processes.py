"""Start, watch and stop the local processes of a deployment (no Flower import: only binaries).

Every process is started in its own session (``start_new_session=True``), so it leads a
process group that also holds what it starts (the SuperLink's ServerApp executor, the
SuperNodes' ClientApp executors). Stopping signals the whole group, then any descendant that
left it (found from ``/proc``), SIGTERM first and SIGKILL after a grace period, and waits
until none is alive: nothing this module started outlives :meth:`ProcessSet.stop_all`.

Each process gets each signal once. Flower's processes answer the first SIGTERM by putting
the default handler back and exiting gracefully (a SuperNode signs off from the SuperLink on
the way out); a second SIGTERM in that time kills them on the spot. When the group's members
were also signalled one by one, a SuperNode stopped mid-run died before it signed off, and the
SuperLink kept it listed until the round's timeout.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from fedpatch.errors import FedPatchError


class DeploymentError(FedPatchError, RuntimeError):
    """A process of the local deployment failed to start or the run did not finish."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _parents() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    return children


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``."""
    children = _parents()
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _group_of(pid: int) -> int | None:
    """The process group of ``pid`` (None once it has gone)."""
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


@dataclass
class Managed:
    """One started process: its name (for messages), handle and log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]
    seen: set[int] = field(default_factory=set)  # descendants seen so far (they may re-parent)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""


class ProcessSet:
    """The processes of one deployment; :meth:`stop_all` ends them all, by process id."""

    def __init__(self, log_dir: Path, env: Mapping[str, str]) -> None:
        self.log_dir = log_dir
        self.env = dict(env)
        self.managed: list[Managed] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: Sequence[str], cwd: Path | None = None) -> Managed:
        """Start ``argv`` in a new session, stdout and stderr to ``<log_dir>/<name>.log``."""
        path = self.log_dir / f"{name}.log"
        log = path.open("wb")
        try:
            process = subprocess.Popen(list(argv), env=self.env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            log.close()
            raise DeploymentError(f"cannot start {name} ({argv[0]}): {exc}") from None
        managed = Managed(name, process, path, log)
        self.managed.append(managed)
        return managed

    def get(self, name: str) -> Managed:
        for managed in self.managed:
            if managed.name == name:
                return managed
        raise KeyError(name)

    def remember_descendants(self) -> None:
        """Note every current descendant (so that re-parented ones are still stopped)."""
        for managed in self.managed:
            managed.seen |= descendants(managed.pid)

    def stop(self, managed: Managed, grace: float = 10.0) -> None:
        """Stop one process, its group and its descendants (SIGTERM, then SIGKILL)."""
        managed.seen |= descendants(managed.pid)
        pids = managed.seen | {managed.pid}
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(managed.pid, sig)  # the session's group: pgid == the leader's pid
                group: int | None = managed.pid
            except (ProcessLookupError, PermissionError):
                group = None
            for pid in pids | descendants(managed.pid):
                if alive(pid) and (group is None or _group_of(pid) != group):  # the group's members have it already
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                managed.process.poll()
                if not any(alive(p) for p in pids):
                    break
                time.sleep(0.1)
            if not any(alive(p) for p in pids):
                break
        try:
            managed.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        managed.log.close()

    def stop_all(self) -> list[int]:
        """Stop everything, newest first; return the pids still alive afterwards (none expected)."""
        self.remember_descendants()
        for managed in reversed(self.managed):
            self.stop(managed)
        return sorted(p for m in self.managed for p in m.seen | {m.pid} if alive(p))

    def wait_for_port(self, managed: Managed, port: int, timeout: float) -> None:
        """Wait until ``port`` accepts connections; fail with the process log if it exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if port_open(port):
                return
            if managed.process.poll() is not None:
                raise DeploymentError(f"{managed.name} exited with code {managed.process.returncode}:\n{managed.log_text()}")
            time.sleep(0.2)
        raise DeploymentError(f"{managed.name} did not open port {port} within {timeout:g} s:\n{managed.log_text()}")

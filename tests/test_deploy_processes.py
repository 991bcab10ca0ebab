"""``fedpatch.deploy.processes``: stopping a process tree signals each process once.

Flower's processes answer the first SIGTERM by restoring the default handler and exiting
gracefully (a SuperNode signs off from the SuperLink on the way out), so a second SIGTERM
kills them before they are done. The tree here behaves the same way: a leader, a child in its
process group and a child that left the group for a session of its own; each writes a file
when its graceful exit completes.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from fedpatch.deploy import processes
from fedpatch.deploy.processes import ProcessSet, alive

GRACEFUL = """
import os, signal, subprocess, sys, time
from pathlib import Path

out, role = Path(sys.argv[1]), sys.argv[2]

def leave(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as Flower's handler does
    time.sleep(0.5)  # signing off
    (out / f"{role}.done").write_text(str(os.getpid()))
    sys.exit(0)

signal.signal(signal.SIGTERM, leave)
if role == "leader":
    for child, own_session in (("member", False), ("outsider", True)):
        subprocess.Popen([sys.executable, sys.argv[0], str(out), child], start_new_session=own_session)
(out / f"{role}.ready").write_text(str(os.getpid()))
while True:
    time.sleep(0.05)
"""


def test_stopping_a_tree_signals_each_process_once_and_lets_every_graceful_exit_finish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "graceful.py"
    script.write_text(GRACEFUL)
    out = tmp_path / "out"
    out.mkdir()
    deliveries: list[tuple[str, int, int]] = []
    real_kill, real_killpg = os.kill, os.killpg
    monkeypatch.setattr(processes.os, "kill", lambda pid, sig: (deliveries.append(("kill", pid, sig)), real_kill(pid, sig))[1])
    monkeypatch.setattr(processes.os, "killpg", lambda pgid, sig: (deliveries.append(("killpg", pgid, sig)), real_killpg(pgid, sig))[1])

    procs = ProcessSet(tmp_path / "logs", os.environ)
    leader = procs.start("leader", [sys.executable, str(script), str(out), "leader"])
    deadline = time.monotonic() + 30
    while not all((out / f"{role}.ready").exists() for role in ("leader", "member", "outsider")):
        assert time.monotonic() < deadline and leader.process.poll() is None, leader.log_text()
        time.sleep(0.05)
    pids = {role: int((out / f"{role}.ready").read_text()) for role in ("leader", "member", "outsider")}
    assert os.getpgid(pids["member"]) == leader.pid != os.getpgid(pids["outsider"])

    procs.stop(leader)

    group = {pids["leader"], pids["member"]}
    received = {role: sum(1 for how, target, sig in deliveries if sig == signal.SIGTERM and (target == pid if how == "kill" else pid in group and target == leader.pid)) for role, pid in pids.items()}
    assert received == {"leader": 1, "member": 1, "outsider": 1}, deliveries
    assert not any(sig == signal.SIGKILL for _, _, sig in deliveries), deliveries  # nobody needed it
    assert {role: (out / f"{role}.done").exists() for role in pids} == dict.fromkeys(pids, True)
    assert leader.process.returncode == 0
    assert not any(alive(pid) for pid in pids.values())

"""The deployment topology on one machine: one SuperLink and N SuperNodes on loopback.

Not a simulation: real ``flower-superlink`` and ``flower-supernode`` processes talk over
loopback sockets exactly as they would between plants (ports picked free automatically), each
SuperNode with its own ``--node-config`` (``data-dir`` = its own folder), and the app is
submitted with ``flwr run`` through a private Flower configuration (``FLWR_HOME``) whose only
connection names this SuperLink. Optional: TLS (a local CA and server certificate from
``scripts/make_certs.sh``) and SuperNode authentication (keys from
``scripts/make_node_keys.sh``, registered with ``flwr supernode register``; the SuperLink
runs with ``--enable-supernode-auth``).

Everything started is stopped when the :class:`LocalDeployment` context exits, on success,
error or a signal (SIGTERM/SIGINT are turned into an exception for the duration).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from fedpatch.deploy.processes import DeploymentError, Managed, ProcessSet, free_port
from fedpatch.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The checkout holding the Flower app (``pyproject.toml``) and ``scripts/``."""

CONNECTION = "fedpatch-local"
"""The name of the SuperLink connection in the private Flower configuration."""


@dataclass(frozen=True)
class NodeSpec:
    """One SuperNode: its data folder and extra node-config entries (e.g. ``fault``)."""

    data_dir: Path
    extra: Mapping[str, str] = field(default_factory=dict)

    def node_config(self) -> str:
        items = {"data-dir": str(self.data_dir), **self.extra}
        return " ".join(f"{k}={json.dumps(v)}" for k, v in items.items())


@dataclass(frozen=True)
class DeploymentOptions:
    """What to start.

    Attributes:
        work_dir: logs, the private ``FLWR_HOME``, certificates and keys go here.
        nodes: one :class:`NodeSpec` per SuperNode.
        app_dir: the Flower app to submit (the directory holding ``pyproject.toml``).
        tls: serve the SuperLink over TLS with a fresh local CA (else ``--insecure``).
        node_auth: enable SuperNode authentication and register every node's key.
        unregistered: indices of nodes whose key is NOT registered (to check refusal).
        bin_dir: where the Flower executables are (default: next to this Python).
        start_timeout: seconds to wait for the SuperLink port and for the nodes to connect.
    """

    work_dir: Path
    nodes: Sequence[NodeSpec]
    app_dir: Path = REPO_ROOT
    tls: bool = False
    node_auth: bool = False
    unregistered: frozenset[int] = frozenset()
    bin_dir: Path = Path(sys.executable).parent
    start_timeout: float = 60.0


@dataclass
class RunOutcome:
    """A finished run: ``flwr run``'s exit code, wall time, the streamed log, the run's status
    as the SuperLink reports it (``finished:completed``, ``finished:failed``, ...) with its
    details, and the ServerApp's ``federation.json``."""

    returncode: int
    wall_seconds: float
    log: str
    federation: dict[str, Any] | None
    flower_status: str = "unknown"
    flower_details: str = ""

    @property
    def status(self) -> str:
        """The ServerApp's own status, or why there is none (with Flower's view of the run)."""
        if self.federation is not None:
            return str(self.federation.get("status"))
        details = f": {self.flower_details}" if self.flower_details else ""
        return f"no federation.json (Flower run status {self.flower_status}{details})"


def flower_env(home: Path, bin_dir: Path) -> dict[str, str]:
    """The environment of every Flower process: offline, private home, our binaries first.

    Flower's usage telemetry is off unless the caller's environment turns it on
    (``FLWR_TELEMETRY_ENABLED=1``): by default every Flower process posts an event with the
    host's platform and a persistent id to telemetry.flower.ai when it starts and stops, which
    a site that may not share its images would not expect of a launcher.
    """
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": os.environ.get("FLWR_TELEMETRY_ENABLED", "0"),
        "PYTHONUNBUFFERED": "1",
    }


def connection_toml(address: str, root_certificates: Path | None) -> str:
    """The Flower configuration (``$FLWR_HOME/config.toml``) naming one SuperLink."""
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "{address}"']
    lines.append(f'root-certificates = "{root_certificates}"' if root_certificates else "insecure = true")
    return "\n".join(lines) + "\n"


@contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise (so ``finally`` clauses stop the processes)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise DeploymentError(f"interrupted by signal {signal.Signals(signum).name}")

    if sys.platform == "win32" or not _main_thread():
        yield
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class LocalDeployment:
    """A SuperLink and its SuperNodes on loopback; use as a context manager.

    ``with LocalDeployment(options) as fed: outcome = fed.run(run_config, output_dir)`` starts
    everything on entry and stops everything (by process group and pid) on exit. The scripts
    it calls for TLS and node keys live in the checkout's ``scripts/`` folder.
    """

    def __init__(self, options: DeploymentOptions) -> None:
        if not options.nodes:
            raise ConfigError("a local deployment needs at least one SuperNode")
        bad = sorted(i for i in options.unregistered if not 0 <= i < len(options.nodes))
        if bad:
            raise ConfigError(f"unregistered node indices {bad} are not nodes (0..{len(options.nodes) - 1})")
        if options.unregistered and not options.node_auth:
            raise ConfigError("unregistered nodes only make sense with node_auth")
        self.options = options
        self.work = options.work_dir.resolve()
        self.home = self.work / "flwr-home"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = flower_env(self.home, options.bin_dir)
        self.processes = ProcessSet(self.work / "logs", self.env)
        self.certs: Path | None = None
        self.leftover: list[int] = []
        self.runs = 0
        self._signals = signals_raise()

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> LocalDeployment:
        self._signals.__enter__()
        try:
            self.start()
        except BaseException:
            self.close()
            self._signals.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.close()
        finally:
            self._signals.__exit__(None, None, None)

    def _bin(self, name: str) -> str:
        path = self.options.bin_dir / name
        if not path.is_file():
            raise DeploymentError(f"{name} not found in {self.options.bin_dir} (install flwr into that environment)")
        return str(path)

    def _script(self, name: str, *args: str) -> None:
        script = REPO_ROOT / "scripts" / name
        done = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=self.env)
        if done.returncode != 0:
            raise DeploymentError(f"{script.name} failed ({done.returncode}): {done.stderr.strip()}")

    def start(self) -> None:
        """Certificates and keys (if asked), the SuperLink, node registration, the SuperNodes."""
        self.home.mkdir(parents=True, exist_ok=True)
        superlink = [self._bin("flower-superlink"), "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(self.port)]
        if self.options.tls:
            self.certs = self.work / "certificates"
            self._script("make_certs.sh", str(self.certs))
            superlink += ["--ssl-ca-certfile", str(self.certs / "ca.crt"), "--ssl-certfile", str(self.certs / "server.pem"), "--ssl-keyfile", str(self.certs / "server.key")]
        else:
            superlink.append("--insecure")
        if self.options.node_auth:
            superlink.append("--enable-supernode-auth")
            self._script("make_node_keys.sh", str(self.work / "node-keys"), *[f"node-{i}" for i in range(len(self.options.nodes))])
        (self.home / "config.toml").write_text(connection_toml(self.address, self.certs / "ca.crt" if self.certs else None), encoding="utf-8")
        link = self.processes.start("superlink", superlink, cwd=self.work)
        self.processes.wait_for_port(link, self.port, self.options.start_timeout)
        for i, node in enumerate(self.options.nodes):
            if self.options.node_auth and i not in self.options.unregistered:
                self._flwr("supernode", "register", str(self.work / "node-keys" / f"node-{i}.pub"), CONNECTION)
            self.start_node(i, node)

    def start_node(self, index: int, node: NodeSpec) -> Managed:
        """Start SuperNode ``index`` (its ClientApp runtime API on its own free port)."""
        argv = [self._bin("flower-supernode"), "--superlink", self.address, "--port", str(free_port()), "--node-config", node.node_config()]
        argv += ["--root-certificates", str(self.certs / "ca.crt")] if self.certs else ["--insecure"]
        if self.options.node_auth:
            argv += ["--auth-supernode-private-key", str(self.work / "node-keys" / f"node-{index}")]
        return self.processes.start(f"supernode-{index}", argv, cwd=self.work)

    def _flwr(self, *args: str) -> str:
        return flwr_command(self._bin("flwr"), args, self.env, cwd=self.work)

    def close(self) -> None:
        """Stop every process started; ``leftover`` lists any that survived (none expected)."""
        self.leftover = self.processes.stop_all()

    # ------------------------------------------------------------------ runs
    def node(self, index: int) -> Managed:
        return self.processes.get(f"supernode-{index}")

    def node_id(self, index: int, timeout: float = 30.0) -> str:
        """The id SuperNode ``index`` got from the SuperLink (read from its log)."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(r"SuperNode ID: (\d+)", self.node(index).log_text(tail=1_000_000))
            if found:
                return found.group(1)
            if time.monotonic() > deadline:
                raise DeploymentError(f"supernode-{index} logged no SuperNode ID within {timeout:g} s:\n{self.node(index).log_text()}")
            time.sleep(0.2)

    def kill_node(self, index: int) -> None:
        """Stop SuperNode ``index`` and its ClientApp processes now (a site going offline):
        SIGTERM (the SuperNode signs off from the SuperLink), SIGKILL after 10 s."""
        self.processes.stop(self.node(index))

    def submit(self, run_config: str) -> Managed:
        """Start ``flwr run <app> <connection> --stream --run-config ...`` in the background
        (a managed process: stopped with the rest if the deployment closes first)."""
        self.runs += 1
        argv = [self._bin("flwr"), "run", str(self.options.app_dir), CONNECTION, "--stream", "--run-config", run_config]
        return self.processes.start(f"flwr-run-{self.runs}", argv, cwd=self.work)

    def wait(self, run: Managed, output_dir: Path, timeout: float, started: float) -> RunOutcome:
        """Wait for a submitted run to finish; read ``federation.json`` from ``output_dir``.

        ``flwr run --stream`` exits 0 even when the run fails, and it also returns when its log
        stream ends early (a dropped HTTP stream on a loaded machine), so the end of that
        process is not the end of the run: the run's status is then asked of the SuperLink
        (``flwr ls --run-id``) until it is ``finished:...`` or ``timeout`` passes.
        """
        deadline = started + timeout
        try:
            returncode = run.process.wait(timeout=max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            self.processes.stop(run, grace=2.0)
            raise DeploymentError(f"flwr run did not finish within {timeout:g} s:\n{run.log_text()}") from None
        log = run.log_text(tail=10_000_000)
        run_id = started_run_id(log)
        flower_status, details = ("not started", "")
        if run_id is not None:
            hint = f"SuperLink log: {self.processes.log_dir / 'superlink.log'}"
            flower_status, details = wait_until_finished(self._bin("flwr"), self.env, run_id, deadline, cwd=self.work, hint=hint)
        wall = time.monotonic() - started
        summary = output_dir / "federation.json"
        federation = json.loads(summary.read_text()) if summary.is_file() else None
        return RunOutcome(returncode, wall, log, federation, flower_status, details)

    def run(self, run_config: str, output_dir: Path, timeout: float = 600.0) -> RunOutcome:
        """Submit the app, wait for it, return the outcome (wall time from submission)."""
        started = time.monotonic()
        return self.wait(self.submit(run_config), output_dir, timeout, started)


def flwr_command(flwr: str, args: Sequence[str], env: Mapping[str, str], cwd: Path | None = None, timeout: float = 60.0) -> str:
    """Run ``flwr <args>`` and return its standard output; a failure raises with its output."""
    done = subprocess.run([flwr, *args], env=dict(env), capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if done.returncode != 0:
        raise DeploymentError(f"flwr {' '.join(args)} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout


def started_run_id(log: str) -> int | None:
    """The run id ``flwr run`` printed on submission, or None if it never started one."""
    found = re.search(r"Successfully started run (\d+)", log)
    return int(found.group(1)) if found else None


def run_status(flwr: str, env: Mapping[str, str], run_id: int, *, connection: str = CONNECTION, cwd: Path | None = None) -> tuple[str, str]:
    """The run's status (``running``, ``finished:completed``, ...) and status details, as the
    SuperLink of ``connection`` (in the Flower configuration ``env`` points to) reports them."""
    listing = json.loads(flwr_command(flwr, ["ls", connection, "--run-id", str(run_id), "--format", "json"], env, cwd))
    runs = listing.get("runs") or []
    if not runs:
        raise DeploymentError(f"the SuperLink does not know run {run_id}: {listing}")
    return str(runs[0].get("status")), str(runs[0].get("status-details") or "")


def wait_until_finished(
    flwr: str, env: Mapping[str, str], run_id: int, deadline: float, *,
    connection: str = CONNECTION, cwd: Path | None = None, poll: float = 1.0, hint: str = "",
) -> tuple[str, str]:  # fmt: skip
    """Poll :func:`run_status` until the run is ``finished:...``; raise once ``deadline``
    (a ``time.monotonic()`` value) has passed. ``hint`` (e.g. where the logs are) ends the error.

    Needed because ``flwr run --stream`` returns when its log stream ends, which is not
    always when the run ends (see :meth:`LocalDeployment.wait`).
    """
    while True:
        status, details = run_status(flwr, env, run_id, connection=connection, cwd=cwd)
        if status.startswith("finished"):
            return status, details
        if time.monotonic() > deadline:
            raise DeploymentError(f"run {run_id} is still {status} after the time limit" + (f" ({hint})" if hint else ""))
        time.sleep(poll)


def run_config_text(values: Mapping[str, str | int | float]) -> str:
    """``{"output-dir": "/x", "min-nodes": 3}`` -> ``output-dir="/x" min-nodes=3`` (TOML values)."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())



"""Deployment of the Flower app as real processes (no Flower import: it starts the binaries).

- ``processes``: start processes in their own sessions and stop them all, by process group/pid;
- ``sites``: deal a data root out to per-site folders (each SuperNode reads only its own);
- ``local``: :class:`LocalDeployment`, one SuperLink and N SuperNodes on loopback, optional TLS
  and SuperNode authentication, and ``flwr run`` through a private Flower configuration;
- ``__main__``: ``python -m fedpatch.deploy local --nodes 3 ...``.

The Docker form of the same topology is ``docker-compose.yml`` at the repository root.
"""

from __future__ import annotations

from fedpatch.deploy.local import CONNECTION, DeploymentOptions, LocalDeployment, NodeSpec, RunOutcome, connection_toml, run_config_text
from fedpatch.deploy.processes import DeploymentError, ProcessSet, free_port
from fedpatch.deploy.sites import split_into_sites

__all__ = [
    "CONNECTION",
    "DeploymentError",
    "DeploymentOptions",
    "LocalDeployment",
    "NodeSpec",
    "ProcessSet",
    "RunOutcome",
    "connection_toml",
    "free_port",
    "run_config_text",
    "split_into_sites",
]

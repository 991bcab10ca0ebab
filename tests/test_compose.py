"""docker-compose.yml and its overrides, checked without a Docker engine.

``docker-compose config`` (Debian's docker-compose 1.29; ``.ci/run`` installs it) validates and
merges the files; the tests then check the merged services against the *installed* Flower CLI:
every flag a command uses exists in that binary's ``--help``, the ports are its defaults, the
images carry the installed flwr version, and each site mounts only its own data.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SITES = 3
BINARIES = {"superlink": "flower-superlink", "supernode": "flower-supernode", "superexec": "flower-superexec"}


@cache
def flower_help(binary: str) -> str:
    done = subprocess.run([str(BIN / binary), "--help"], capture_output=True, text=True, timeout=120, env={"FLWR_DISABLE_UPDATE_CHECK": "1", "PATH": str(BIN)})
    assert done.returncode == 0, done.stderr
    return done.stdout


def flags(binary: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", flower_help(binary)))


@cache
def flwr_version() -> str:
    done = subprocess.run([str(BIN / "flower-superlink"), "--version"], capture_output=True, text=True, timeout=60, env={"FLWR_DISABLE_UPDATE_CHECK": "1"})
    return re.search(r"(\d+\.\d+\.\d+)", done.stdout + done.stderr).group(1)


def default_port(binary: str) -> str:
    text = " ".join(flower_help(binary).split())
    found = re.search(r"--port PORT Port for the Runtime HTTP API\W+(?:By default, it is set to |default: )(\d+)", text)
    assert found, f"no default port in {binary} --help"
    return found.group(1)


@cache
def compose(*overrides: str) -> dict:
    return compose_with({}, *overrides)


def compose_with(variables: dict[str, str], *overrides: str) -> dict:
    """The resolved compose configuration, with ``variables`` set (and Flower's telemetry
    switch only as given there) in docker-compose's environment."""
    assert shutil.which("docker-compose"), "docker-compose is not installed (apt-get install docker-compose; .ci/run does it)"
    files = ["docker-compose.yml", *overrides]
    argv = ["docker-compose", "--project-directory", str(REPO)] + [a for f in files for a in ("-f", str(REPO / f))] + ["config"]
    env = {k: v for k, v in os.environ.items() if k != "FLWR_TELEMETRY_ENABLED"} | variables
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert done.returncode == 0, f"docker-compose config {files} failed:\n{done.stderr}"
    return yaml.safe_load(done.stdout)


def option(command: list[str], flag: str) -> str | None:
    """The value after ``flag`` (or of ``flag=value``) in a command list."""
    for i, item in enumerate(command):
        if item == flag:
            return command[i + 1]
        if item.startswith(flag + "="):
            return item.split("=", 1)[1]
    return None


def kind(name: str) -> str:
    return "superexec" if name.startswith("superexec") else name.rstrip("0123456789-")


VARIANTS = [(), ("docker-compose.tls.yml",), ("docker-compose.gpu.yml",), ("docker-compose.tls.yml", "docker-compose.gpu.yml")]


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: "+".join(o) or "dev")
def test_every_flag_exists_in_the_installed_flower_binaries(overrides: tuple[str, ...]) -> None:
    services = compose(*overrides)["services"]
    for name, service in services.items():
        known = flags(BINARIES[kind(name)])
        used = {item.split("=", 1)[0] for item in service["command"] if item.startswith("--")}
        assert used and used <= known, f"{name}: {sorted(used - known)} not in {BINARIES[kind(name)]} --help"


def test_topology_ports_and_images_follow_the_installed_flower() -> None:
    services = compose()["services"]
    link_port, node_port = default_port("flower-superlink"), default_port("flower-supernode")
    assert (link_port, node_port) == ("8000", "9094")  # flwr 1.41: one HTTP port for Fleet/Control/Runtime
    version = flwr_version()
    link = services["superlink"]
    assert link["image"] == f"flwr/superlink:{version}"
    assert option(link["command"], "--port") == link_port and option(link["command"], "--isolation") == "process"
    assert any(str(p.get("target", p) if isinstance(p, dict) else p).endswith(link_port) for p in link["ports"])
    assert option(services["superexec-serverapp"]["command"], "--runtime-api-address") == f"superlink:{link_port}"
    nodes = sorted(n for n in services if kind(n) == "supernode")
    assert nodes == [f"supernode-{k}" for k in range(SITES)]
    assert set(services) == {"superlink", "superexec-serverapp", *nodes, *[f"superexec-clientapp-{k}" for k in range(SITES)]}
    mounts = set()
    for k in range(SITES):
        node, executor = services[f"supernode-{k}"], services[f"superexec-clientapp-{k}"]
        assert node["image"] == f"flwr/supernode:{version}"
        assert option(node["command"], "--superlink") == f"superlink:{link_port}"
        assert option(node["command"], "--port") == node_port and option(node["command"], "--isolation") == "process"
        assert option(node["command"], "--node-config") == 'data-dir="/data"'
        assert option(executor["command"], "--runtime-api-address") == f"supernode-{k}:{node_port}"
        (volume,) = executor["volumes"]
        volume = volume if isinstance(volume, str) else f"{volume['source']}:{volume['target']}:{'ro' if volume.get('read_only') else 'rw'}"
        source, target, mode = volume.rsplit(":", 2)
        assert (target, mode) == ("/data", "ro") and source.endswith(f"site-{k}")
        mounts.add(source)
    assert len(mounts) == SITES  # every site reads only its own folder
    server = services["superexec-serverapp"]
    assert any(str(v).startswith("fedpatch-outputs:/outputs") or (isinstance(v, dict) and v.get("source") == "fedpatch-outputs") for v in server["volumes"])
    assert "fedpatch-outputs" in compose()["volumes"]
    for name, service in services.items():  # the app image is built once, from the Dockerfile, for every executor
        if kind(name) == "superexec":
            assert service["build"]["dockerfile"] == "docker/Dockerfile" and service["image"].startswith("fedpatch-superexec:")


@pytest.mark.parametrize("overrides", VARIANTS)
def test_flower_telemetry_is_off_in_every_container_unless_the_deployer_turns_it_on(overrides: tuple[str, ...]) -> None:
    # Flower posts platform details and a persistent id to telemetry.flower.ai from every
    # process by default; a site's containers do not, unless FLWR_TELEMETRY_ENABLED=1 is set
    for variables, expected in (({}, "0"), ({"FLWR_TELEMETRY_ENABLED": "1"}, "1")):
        services = compose_with(variables, *overrides)["services"]
        assert {name: service.get("environment", {}).get("FLWR_TELEMETRY_ENABLED") for name, service in services.items()} == dict.fromkeys(services, expected)


def test_dev_setup_is_insecure_and_the_tls_override_is_not() -> None:
    dev = compose()["services"]
    assert all("--insecure" in s["command"] for s in dev.values())
    secure = compose("docker-compose.tls.yml")["services"]
    assert not any("--insecure" in s["command"] for s in secure.values())
    link = secure["superlink"]["command"]
    assert {option(link, f) for f in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile")} == {
        "/app/certificates/ca.crt", "/app/certificates/server.pem", "/app/certificates/server.key"
    }  # fmt: skip
    assert "--enable-supernode-auth" in link and option(link, "--database")
    for k in range(SITES):
        node = secure[f"supernode-{k}"]["command"]
        assert option(node, "--root-certificates") == "/app/certificates/ca.crt"
        assert option(node, "--auth-supernode-private-key") == f"/app/node-keys/site-{k}"
        mounted = {str(v).split(":")[1] if isinstance(v, str) else v["target"] for v in secure[f"supernode-{k}"]["volumes"]}
        assert {"/app/certificates", f"/app/node-keys/site-{k}"} <= mounted
        assert option(secure[f"superexec-clientapp-{k}"]["command"], "--root-certificates") == "/app/certificates/ca.crt"
    assert option(secure["superexec-serverapp"]["command"], "--root-certificates") == "/app/certificates/ca.crt"


def test_gpu_override_reserves_nvidia_devices_for_the_client_executors() -> None:
    services = compose("docker-compose.gpu.yml")["services"]
    for k in range(SITES):
        executor = services[f"superexec-clientapp-{k}"]
        (device,) = executor["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert executor["build"]["args"]["TORCH_INDEX_URL"] == "" and executor["image"].endswith("-gpu")
    assert "deploy" not in services["superexec-serverapp"] and "deploy" not in services["superlink"]


def test_dockerfile_installs_the_app_from_pyproject_with_the_constraints() -> None:
    text = (REPO / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG FLWR_VERSION=(\S+)$", text, re.M).group(1) == flwr_version()
    assert "FROM flwr/superexec:${FLWR_VERSION}" in text
    assert 'ENTRYPOINT ["flower-superexec"]' in text
    assert re.search(r"pip install .*-c constraints\.txt", text)
    # the native search is an optional extension: the image brings a compiler and checks it was built
    assert re.search(r"apt-get install .*\bgcc\b", text) and "find_spec('fedpatch._screen_kernel')" in text
    copied = {p for line in re.findall(r"^COPY .*$", text, re.M) for p in line.split()[2:-1]}
    packages = yaml.safe_load("x: " + re.search(r'include = (\[.*\])', (REPO / "pyproject.toml").read_text()).group(1))["x"]
    needed = {p.rstrip("*") for p in packages} | {"pyproject.toml", "constraints.txt", "configs", "README.md"}
    assert needed <= copied, f"the image misses {sorted(needed - copied)}"


def test_certificate_script_makes_a_ca_and_a_server_certificate_for_every_service(tmp_path: Path) -> None:
    out = tmp_path / "certificates"
    subprocess.run(["bash", str(REPO / "scripts" / "make_certs.sh"), str(out), "supernode-0", "IP:10.0.0.5"], check=True, capture_output=True)
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(out / "ca.crt"), str(out / "server.pem")], capture_output=True, text=True)
    assert verify.returncode == 0 and "OK" in verify.stdout
    sans = subprocess.run(["openssl", "x509", "-in", str(out / "server.pem"), "-noout", "-ext", "subjectAltName"], capture_output=True, text=True).stdout
    for name in ("DNS:localhost", "IP Address:127.0.0.1", "DNS:superlink", "DNS:supernode-0", "IP Address:10.0.0.5"):
        assert name in sans
    assert (out / "server.key").stat().st_mode & 0o077 == 0  # private keys are not world-readable
    again = subprocess.run(["bash", str(REPO / "scripts" / "make_certs.sh"), str(out)], capture_output=True, text=True)
    assert again.returncode == 1 and "already holds certificates" in again.stderr


def test_node_key_script_makes_keys_flower_accepts(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    subprocess.run(["bash", str(REPO / "scripts" / "make_node_keys.sh"), str(tmp_path), "site-0"], check=True, capture_output=True)
    private = load_ssh_private_key((tmp_path / "site-0").read_bytes(), None)
    public = load_ssh_public_key((tmp_path / "site-0.pub").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"  # what flower-supernode loads
    assert public.public_numbers() == private.public_key().public_numbers()

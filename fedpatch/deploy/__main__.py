"""``python -m fedpatch.deploy local ...``: run the federation as real processes on this machine.

Example (a tiny generated data set, three sites, TLS and SuperNode authentication on)::

    python -m fedpatch.deploy local --nodes 3 --work-dir /tmp/fedpatch-local --generate 6 \\
        --tls --node-auth --run-config 'overrides="data.resize=[64, 64]"'

Prints the wall time of the run, its status and the bytes every node sent and received, and
exits 0 only when the run completed.

``python -m fedpatch.deploy sites --data-dir ROOT --out sites --nodes 3`` only deals a data
root out to per-site folders (``sites/site-<k>``, what docker-compose.yml mounts).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from fedpatch.deploy.local import DeploymentOptions, LocalDeployment, NodeSpec, run_config_text
from fedpatch.deploy.sites import split_into_sites
from fedpatch.errors import FedPatchError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fedpatch.deploy", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    local = sub.add_parser("local", help="one SuperLink and N SuperNodes on loopback, then `flwr run`")
    local.add_argument("--nodes", type=int, default=3, help="number of SuperNodes (sites)")
    local.add_argument("--work-dir", type=Path, required=True, help="logs, Flower home, site data, outputs (created)")
    source = local.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-dir", type=Path, help="an AutoVI-layout data root, dealt out to the sites")
    source.add_argument("--generate", type=int, metavar="N_TRAIN", help="generate a tiny synthetic set with N_TRAIN training images per object")
    local.add_argument("--objects", default="engine_wiring", help="objects to generate (with --generate)")
    local.add_argument("--output-dir", type=Path, help="where the ServerApp writes (default <work-dir>/outputs)")
    local.add_argument("--run-config", default="", help="extra `flwr run --run-config` entries")
    local.add_argument("--tls", action="store_true", help="TLS with a fresh local CA (scripts/make_certs.sh)")
    local.add_argument("--node-auth", action="store_true", help="SuperNode authentication (scripts/make_node_keys.sh)")
    local.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the run")
    sites = sub.add_parser("sites", help="deal a data root out to per-site folders <out>/site-<k>")
    sites.add_argument("--data-dir", type=Path, required=True, help="an AutoVI-layout data root")
    sites.add_argument("--out", type=Path, required=True, help="where site-0 .. site-<n-1> are written")
    sites.add_argument("--nodes", type=int, default=3, help="number of sites")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "sites":
        try:
            made = split_into_sites(args.data_dir, args.out, args.nodes)
        except (FedPatchError, OSError) as exc:
            print(f"fedpatch.deploy: {exc}", file=sys.stderr)
            return 1
        print("\n".join(str(p) for p in made))
        return 0
    work = args.work_dir.resolve()
    try:
        if args.generate is not None:
            from fedpatch.data.synthetic import generate_autovi_dataset

            root = generate_autovi_dataset(work / "data", args.objects.split(","), n_train=args.generate, n_test_good=2, n_test_defective=1, scale=0.15, seed=0)
        else:
            root = args.data_dir
        sites = split_into_sites(root, work / "sites", args.nodes)
        output = (args.output_dir or work / "outputs").resolve()
        options = DeploymentOptions(work, [NodeSpec(site) for site in sites], tls=args.tls, node_auth=args.node_auth)
        run_config = f"{run_config_text({'output-dir': str(output), 'min-nodes': args.nodes})} {args.run_config}".strip()
        with LocalDeployment(options) as deployment:
            outcome = deployment.run(run_config, output, timeout=args.timeout)
    except (FedPatchError, OSError) as exc:
        print(f"fedpatch.deploy: {exc}", file=sys.stderr)
        return 1
    print(f"run {outcome.status} in {outcome.wall_seconds:.1f} s (flwr run exit {outcome.returncode}); outputs in {output}")
    communication = output / "communication.json"
    if communication.is_file():
        for client, traffic in json.loads(communication.read_text())["per_client"].items():
            print(f"  node {client}: {traffic['bytes_up']:,} bytes up, {traffic['bytes_down']:,} bytes down")
    if outcome.status != "completed":
        print(outcome.log[-3000:], file=sys.stderr)
    return 0 if outcome.status == "completed" else 1


if __name__ == "__main__":
    raise SystemExit(main())

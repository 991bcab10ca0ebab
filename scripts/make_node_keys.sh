#!/usr/bin/env bash
# Make one SuperNode authentication key pair per name (ECDSA P-384, OpenSSH format: ssh-keygen).
#
#   scripts/make_node_keys.sh OUT_DIR NAME [NAME ...]
#
# Writes OUT_DIR/NAME (private key: the SuperNode's --auth-supernode-private-key, stays on the
# site) and OUT_DIR/NAME.pub (public key: registered by the federation operator with
# `flwr supernode register OUT_DIR/NAME.pub <connection>`; a SuperLink started with
# --enable-supernode-auth refuses every node whose key was not registered).
set -euo pipefail
if [[ $# -lt 2 ]]; then
    echo "usage: $0 OUT_DIR NAME [NAME ...]" >&2
    exit 2
fi
out="$1"
shift
command -v ssh-keygen >/dev/null || { echo "make_node_keys.sh: ssh-keygen not found (package openssh-client)" >&2; exit 1; }
mkdir -p "$out"
for name in "$@"; do
    if [[ -e "$out/$name" ]]; then
        echo "make_node_keys.sh: $out/$name exists; not overwritten" >&2
        exit 1
    fi
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedpatch-$name" -f "$out/$name"
done
echo "node keys in $out: $*"

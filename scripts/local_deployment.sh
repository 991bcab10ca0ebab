#!/usr/bin/env bash
# The federation as real local processes (one flower-superlink, N flower-supernode), no Docker:
# a thin wrapper of `python -m fedpatch.deploy local` that uses the project's .venv when present.
#
#   scripts/local_deployment.sh --nodes 3 --work-dir /tmp/fedpatch-local --generate 6 [--tls] [--node-auth]
#   scripts/local_deployment.sh --nodes 3 --work-dir /tmp/fedpatch-local --data-dir /data/autovi
#
# Every process it starts is stopped when the run ends, fails or is interrupted; see
# `python -m fedpatch.deploy local --help` for all options.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python="python3"; fi
fi
export FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
cd "$root"
exec "$python" -m fedpatch.deploy local "$@"

#!/usr/bin/env bash
# Make a local certificate authority and a SuperLink server certificate signed by it (openssl).
#
#   scripts/make_certs.sh [OUT_DIR] [EXTRA_SAN ...]      (OUT_DIR default: certificates)
#
# Writes OUT_DIR/ca.key, ca.crt (give ca.crt to every SuperNode: --root-certificates, and to
# `flwr` : root-certificates in the connection), server.key and server.pem (the SuperLink:
# --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key).
# The server certificate is valid for localhost, 127.0.0.1, ::1 and the compose service name
# "superlink", plus every EXTRA_SAN given ("DNS:link.plant.example" or "IP:10.0.0.5"; a bare
# name is taken as DNS). Keys are RSA 4096; certificates last 365 days. Existing files are
# never overwritten: remove OUT_DIR to make new ones.
set -euo pipefail
out="${1:-certificates}"
shift || true
if [[ -e "$out/ca.crt" || -e "$out/server.pem" ]]; then
    echo "make_certs.sh: $out already holds certificates; remove it to make new ones" >&2
    exit 1
fi
command -v openssl >/dev/null || { echo "make_certs.sh: openssl not found" >&2; exit 1; }
sans="DNS:localhost,IP:127.0.0.1,IP:::1,DNS:superlink"
for extra in "$@"; do
    case "$extra" in
        DNS:*|IP:*) sans="$sans,$extra" ;;
        *) sans="$sans,DNS:$extra" ;;
    esac
done
mkdir -p "$out"
umask 077
openssl genrsa -out "$out/ca.key" 4096 2>/dev/null
openssl req -x509 -new -key "$out/ca.key" -sha256 -days 365 -subj "/CN=fedpatch local CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$out/ca.crt"
openssl genrsa -out "$out/server.key" 4096 2>/dev/null
openssl req -new -key "$out/server.key" -subj "/CN=superlink" -out "$out/server.csr"
ext="$(mktemp)"
trap 'rm -f "$ext"' EXIT
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' "$sans" > "$ext"
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
    -days 365 -sha256 -extfile "$ext" -out "$out/server.pem" 2>/dev/null
rm -f "$out/server.csr" "$out/ca.srl"
chmod 644 "$out/ca.crt" "$out/server.pem"
echo "certificates in $out (server names: $sans)"

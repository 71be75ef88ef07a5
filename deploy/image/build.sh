#!/usr/bin/env bash
# Builds the rtcbus image with podman, offline from image registries:
#
#   deploy/image/build.sh                      # localhost/rtcbus:dev on localhost/rtcbus-base:bookworm
#   IMAGE=localhost/rtcbus:1.0 deploy/image/build.sh
#   BASE=python:3.11-slim-bookworm deploy/image/build.sh   # where a registry is reachable
#
# With the default BASE it first runs deploy/image/base.sh (which returns at once when the base
# image exists). pip in the build reaches PyPI the way it does on this host: the host's CA
# bundle and its effective pip configuration (`pip config list`: pip.conf files and PIP_*
# variables, merged into one file) are bind-mounted read-only for the RUN steps, with the
# local paths that configuration names (a cert, a find-links directory). None of it is
# copied into a layer. `--network host`: the build's own network would be podman's bridge.
#
# Environment: IMAGE, BASE, EXTRAS (pyproject.toml extras for the image, default registry,server),
# PIP (the pip whose configuration is used; default the repository's .venv, else python3 -m pip),
# CA_BUNDLE (default $SSL_CERT_FILE, else /etc/ssl/certs/ca-certificates.crt).
set -euo pipefail
cd "$(dirname "$0")/../.."

image="${IMAGE:-localhost/rtcbus:dev}"
local_base=localhost/rtcbus-base:bookworm
base="${BASE:-$local_base}"
say() { echo "build.sh: $*" >&2; }

if ! command -v podman >/dev/null; then
    say "FAILED: podman is not installed (apt-get install podman buildah runc)"
    exit 1
fi
if [ "$base" = "$local_base" ]; then
    deploy/image/base.sh
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 700 "$work"

mounts=()
ca_bundle="${CA_BUNDLE:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}"
if [ -f "$ca_bundle" ]; then
    # Debian's path, which both the local base and python:*-slim use.
    mounts+=(-v "$ca_bundle:/etc/ssl/certs/ca-certificates.crt:ro")
fi

if [ -n "${PIP:-}" ]; then
    pip=("$PIP")
elif [ -x .venv/bin/pip ]; then
    pip=(.venv/bin/pip)
else
    pip=(python3 -m pip)
fi
: > "$work/pip.conf"
named_paths=""
if pip_settings=$("${pip[@]}" config list 2>/dev/null); then
    named_paths=$(printf '%s\n' "$pip_settings" | python3 deploy/image/pip_config.py "$work/pip.conf")
else
    say "no pip configuration from ${pip[*]}: pip in the build uses its defaults"
fi
if ! grep -qE '^(cert|client-cert) ' "$work/pip.conf" && [ -f "$ca_bundle" ]; then
    # pip's own bundle (certifi) would not know a CA the host trusts.
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >> "$work/pip.conf"
fi
chmod 644 "$work/pip.conf"  # read by root in the build; the directory stays private
mounts+=(-v "$work/pip.conf:/etc/pip.conf:ro")
while IFS= read -r path; do
    if [ -n "$path" ] && [ "$path" != "$ca_bundle" ] && [ "$path" != /etc/ssl/certs/ca-certificates.crt ]; then
        mounts+=(-v "$path:$path:ro")
    fi
done <<< "$named_paths"

version=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
revision=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)

started=$SECONDS
# --format docker: the OCI image format has no HEALTHCHECK, podman would drop it.
podman build \
    --file deploy/Dockerfile \
    --tag "$image" \
    --format docker \
    --network host \
    --build-arg BASE="$base" \
    --build-arg EXTRAS="${EXTRAS:-registry,server}" \
    --build-arg VERSION="$version" \
    --build-arg REVISION="$revision" \
    "${mounts[@]}" \
    .
say "built $image on $base in $((SECONDS - started)) s"

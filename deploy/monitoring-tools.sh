#!/bin/sh
# The tools that check deploy/compose.yaml, deploy/prometheus/ and deploy/grafana/, installed
# once into a cache and reused (tests/test_deploy_compose.py, tests/test_deploy_monitoring.py):
#
#   promtool           built from Go (github.com/prometheus/prometheus/cmd/promtool), pinned;
#   compose-spec.json  the compose specification's JSON schema, from the Go module
#                      github.com/compose-spec/compose-go/v2 (its schema/compose-spec.json).
#
# Needs Go (the module proxy is the only source). Idempotent: a tool already at its pinned
# version is left alone. Prints `NAME=PATH` for each tool, so a caller can `eval` the output.
#
#   deploy/monitoring-tools.sh            # install what is missing, print the paths
#   PROMTOOL=... COMPOSE_SPEC_SCHEMA=...  # what the tests read instead, if set
#
# podman-compose and jsonschema are Python packages in the `dev` extra (pyproject.toml); the
# podman binary podman-compose drives comes from the OS (`apt-get install -y podman runc`).
set -eu

PROMETHEUS_VERSION="${PROMETHEUS_VERSION:-v0.316.0}"   # Prometheus 3.16.0 as a Go module
COMPOSE_GO_VERSION="${COMPOSE_GO_VERSION:-v2.17.0}"

cache="${XDG_CACHE_HOME:-$HOME/.cache}/rtcbus"
bin="$cache/bin"
mkdir -p "$bin" "$cache/compose-spec"

command -v go >/dev/null 2>&1 || { echo "monitoring-tools.sh: go not found (needed to build promtool)" >&2; exit 1; }

# -- promtool -------------------------------------------------------------------------------------
# `go version -m` reads the module version the binary was built from: the pin is checked
# against the binary itself, not a stamp file that could lie.
promtool="$bin/promtool"
if ! go version -m "$promtool" 2>/dev/null | grep -q "mod[[:space:]]*github.com/prometheus/prometheus[[:space:]]*$PROMETHEUS_VERSION"; then
    echo "monitoring-tools.sh: building promtool $PROMETHEUS_VERSION into $bin" >&2
    GOBIN="$bin" go install \
        "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_VERSION"
fi
echo "PROMTOOL=$promtool"

# -- the compose specification's JSON schema ------------------------------------------------------
schema="$cache/compose-spec/compose-spec-$COMPOSE_GO_VERSION.json"
if [ ! -s "$schema" ]; then
    # The module's zip, checked against the checksum database by `go mod download`. Its Dir
    # is not used: the module needs a newer Go than this one to be extracted as a module
    # (its go.mod says so), which its schema file does not.
    zip="$(GOTOOLCHAIN=local go mod download -json "github.com/compose-spec/compose-go/v2@$COMPOSE_GO_VERSION" \
        | sed -n 's/^[[:space:]]*"Zip": "\(.*\)",*$/\1/p')"
    member="github.com/compose-spec/compose-go/v2@$COMPOSE_GO_VERSION/schema/compose-spec.json"
    [ -n "$zip" ] && [ -s "$zip" ] || {
        echo "monitoring-tools.sh: go mod download gave no zip of compose-go $COMPOSE_GO_VERSION" >&2
        exit 1
    }
    python3 -c 'import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))' \
        "$zip" "$member" > "$schema.tmp"
    python3 -c 'import json, sys; json.load(open(sys.argv[1]))' "$schema.tmp"
    mv "$schema.tmp" "$schema"
fi
echo "COMPOSE_SPEC_SCHEMA=$schema"

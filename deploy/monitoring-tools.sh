#!/bin/sh
# The tools that check deploy/compose.yaml, deploy/prometheus/ and deploy/grafana/, installed
# once into a cache and reused (tests/test_deploy_compose.py, tests/test_deploy_monitoring.py):
#
#   promtool           built from Go (github.com/prometheus/prometheus/cmd/promtool), pinned;
#   compose-spec.json  the compose specification's JSON schema, from the Go module
#                      github.com/compose-spec/compose-go/v2 (its schema/compose-spec.json).
#
#   deploy/monitoring-tools.sh    install what is missing, then print NAME=PATH lines:
#                                 PROMTOOL=...  COMPOSE_SPEC_SCHEMA=...
#
# The tests take the same names from the environment when set. Needs Go (the module proxy is
# the only source) and python3. Idempotent: a tool at its pinned version is left alone (the
# promtool binary's own build information says which version it is), so a warm run takes
# well under a second; the first build of promtool compiles Prometheus, about 7 minutes on
# 2 cores. Everything goes under ${RTCBUS_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rtcbus},
# built in a temporary directory and moved into place whole, under a lock.
#
# podman-compose and jsonschema are Python packages in the `dev` extra (pyproject.toml); the
# tests run podman-compose with --dry-run, which needs no podman binary.
set -eu

PROMETHEUS_VERSION="${PROMETHEUS_VERSION:-v0.316.0}"   # Prometheus 3.16.0, as a Go module
COMPOSE_GO_VERSION="${COMPOSE_GO_VERSION:-v2.17.0}"

cache="${RTCBUS_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rtcbus}"
bin="$cache/bin"
promtool="$bin/promtool"
schema="$cache/compose-spec/compose-spec-$COMPOSE_GO_VERSION.json"

say() { echo "monitoring-tools.sh: $*" >&2; }
die() { echo "monitoring-tools.sh: FAILED: $*" >&2; exit 1; }

promtool_current() {
    go version -m "$promtool" 2>/dev/null |
        grep -q "^[[:space:]]*mod[[:space:]]*github.com/prometheus/prometheus[[:space:]]*$PROMETHEUS_VERSION[[:space:]]"
}

command -v go >/dev/null 2>&1 || die "go is not installed (promtool and the compose schema come from Go modules)"
command -v python3 >/dev/null 2>&1 || die "python3 is not installed"

if promtool_current && [ -s "$schema" ]; then
    echo "PROMTOOL=$promtool"
    echo "COMPOSE_SPEC_SCHEMA=$schema"
    exit 0
fi

mkdir -p "$bin" "$cache/compose-spec"
if command -v flock >/dev/null 2>&1; then
    exec 9>"$cache/.monitoring-tools.lock"
    flock 9  # a concurrent run waits, then finds everything installed
fi
tmp="$(mktemp -d "$cache/.tmp.monitoring.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

# -- promtool -------------------------------------------------------------------------------------
if ! promtool_current; then
    started=$(date +%s)
    say "promtool: go install github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_VERSION (minutes the first time)"
    GOBIN="$tmp" go install "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_VERSION" >&2 ||
        die "promtool: go install github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_VERSION"
    mv -f "$tmp/promtool" "$promtool"
    promtool_current || die "promtool: $promtool does not report $PROMETHEUS_VERSION"
    say "promtool: $promtool ($(( $(date +%s) - started )) s)"
fi

# -- the compose specification's JSON schema ------------------------------------------------------
if [ ! -s "$schema" ]; then
    module="github.com/compose-spec/compose-go/v2@$COMPOSE_GO_VERSION"
    say "compose-spec.json: go mod download $module"
    # The module's zip, checked against the checksum database by `go mod download`. Its Dir is
    # not used: extracting the module needs the newer Go its go.mod asks for, which a schema
    # file does not.
    zip="$(cd "$tmp" && GOTOOLCHAIN=local go mod download -json "$module" |
        python3 -c 'import json, sys; print(json.load(sys.stdin).get("Zip", ""))')"
    [ -n "$zip" ] && [ -s "$zip" ] || die "compose-spec.json: go mod download $module gave no zip"
    python3 - "$zip" "$module/schema/compose-spec.json" "$tmp/compose-spec.json" <<'EOF' ||
import json, sys, zipfile
archive, member, target = sys.argv[1:]
data = zipfile.ZipFile(archive).read(member)
json.loads(data)  # a schema, not an error page
open(target, "wb").write(data)
EOF
        die "compose-spec.json: not in $zip"
    mv -f "$tmp/compose-spec.json" "$schema"
fi

echo "PROMTOOL=$promtool"
echo "COMPOSE_SPEC_SCHEMA=$schema"

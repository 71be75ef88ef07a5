#!/bin/sh
# The external HTTP load generator of the shim benches: oha (a Rust crate), built once with
# cargo into a cache of its own and reused afterwards. Idempotent; safe to run concurrently.
#
#   sh bench/tools.sh          install if missing, print the binary's path
#
# Environment: RTCBUS_TOOLS_DIR (default ~/.cache/rtcbus/tools), OHA_VERSION.
# wrk is not used: it builds from a git checkout (LuaJIT included), which needs more than
# crates.io; oha installs from crates.io alone.
set -eu

OHA_VERSION="${OHA_VERSION:-1.16.0}"
TOOLS_DIR="${RTCBUS_TOOLS_DIR:-$HOME/.cache/rtcbus/tools}"
OHA="$TOOLS_DIR/bin/oha"

if [ -x "$OHA" ] && "$OHA" --version 2>/dev/null | grep -q "$OHA_VERSION"; then
    echo "$OHA"
    exit 0
fi
command -v cargo >/dev/null 2>&1 || { echo "bench/tools.sh: cargo is not installed (https://rustup.rs)" >&2; exit 1; }
mkdir -p "$TOOLS_DIR"
# One build at a time; a second caller waits and then finds the binary.
exec 9>"$TOOLS_DIR/.install.lock"
flock 9
if ! { [ -x "$OHA" ] && "$OHA" --version 2>/dev/null | grep -q "$OHA_VERSION"; }; then
    CARGO_HOME="$TOOLS_DIR/cargo" cargo install oha --locked --version "$OHA_VERSION" \
        --root "$TOOLS_DIR" --quiet >&2
fi
echo "$OHA"

#!/usr/bin/env bash
# pecgate's benchmark: builds the release binary (if needed), then runs
# scripts/bench.py against a private Dovecot, direct vs through pecgate, and
# prints a Markdown table to stdout (progress on stderr). Takes a few minutes.
# Extra arguments go to bench.py, e.g.
#   scripts/bench.sh --quick              smoke run (under a minute)
#   scripts/bench.sh --messages 5000      bigger bulk folder
#   scripts/bench.sh --only bulk,rtt      a subset of the sections
# Needs: cargo, python3, dovecot-imapd, openssl. Installs nothing.
# Builds are serialised with flock on $PECGATE_BUILD_LOCK
# (default /tmp/pecgate-build.lock). Set PECGATE_BIN to bench another binary
# (no build then).
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in python3 dovecot openssl; do
    command -v "$tool" >/dev/null 2>&1 || { echo "bench: $tool not found" >&2; exit 2; }
done

if [[ -z "${PECGATE_BIN:-}" ]]; then
    echo "==> cargo build --release" >&2
    lock=()
    if command -v flock >/dev/null 2>&1; then
        lock=(flock "${PECGATE_BUILD_LOCK:-/tmp/pecgate-build.lock}")
    fi
    "${lock[@]}" cargo build --release >&2
    export PECGATE_BIN=target/release/pecgate
fi

exec python3 scripts/bench.py "$@"

#!/usr/bin/env bash
# pecgate's test command: debug build, Rust tests, then the end-to-end suite
# (Dovecot + pecgate + imaplib/mbsync/curl; see tests/e2e and tests/support).
# Extra arguments are passed to pytest, e.g. scripts/test.sh -k idle -x
# Needs: cargo, python3 with pytest, dovecot-imapd, dovecot-lmtpd, openssl,
# isync (mbsync), curl. Installs nothing.
# Set PECGATE_BUILD_LOCK=/path/to/lockfile to serialise builds with flock.
set -uo pipefail
cd "$(dirname "$0")/.."

lock=()
if [[ -n "${PECGATE_BUILD_LOCK:-}" ]]; then
    lock=(flock "$PECGATE_BUILD_LOCK")
fi

echo "==> cargo build"
"${lock[@]}" cargo build || { echo "cargo build failed" >&2; exit 1; }

status=0
echo "==> cargo test"
"${lock[@]}" cargo test || status=1

echo "==> pytest tests/e2e"
PECGATE_BIN="${PECGATE_BIN:-target/debug/pecgate}" python3 -m pytest -q tests/e2e "$@" || status=1

if [[ $status -ne 0 ]]; then
    echo "FAILED" >&2
else
    echo "all tests passed"
fi
exit $status

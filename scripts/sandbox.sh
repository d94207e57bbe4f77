#!/usr/bin/env bash
# Run pecgate for real against a private Dovecot playing the PEC provider,
# with demo data and two demo users, until Ctrl-C. Prints the settings to
# type into a mail client. Extra arguments go to the harness, e.g.
#   scripts/sandbox.sh --dir /tmp/pecgate-sandbox --tls-port 10993
# On a fresh Debian/Ubuntu it installs what is missing (scripts/install-deps.sh: apt as
# root or with sudo); a Rust toolchain (cargo) is expected.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh sandbox
if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install a Rust toolchain (https://rustup.rs) and retry" >&2
    exit 1
fi

echo "==> cargo build --release"
cargo build --release

export PECGATE_BIN=target/release/pecgate
exec python3 tests/support/harness.py sandbox "$@"

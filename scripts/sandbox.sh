#!/usr/bin/env bash
# Run pecgate for real against a private Dovecot playing the PEC provider,
# with demo data and two demo users, until Ctrl-C. Prints the settings to
# type into a mail client. Extra arguments go to the harness, e.g.
#   scripts/sandbox.sh --dir /tmp/pecgate-sandbox --tls-port 10993
# On a fresh Debian/Ubuntu it installs what is missing (needs root or sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v dovecot >/dev/null 2>&1 || missing+=(dovecot-imapd)
[[ -x /usr/lib/dovecot/lmtp ]] || missing+=(dovecot-lmtpd)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
if ((${#missing[@]})); then
    sudo=()
    if [[ $(id -u) -ne 0 ]]; then sudo=(sudo); fi
    echo "==> installing ${missing[*]}"
    "${sudo[@]}" apt-get update
    # Don't let the package start a system-wide Dovecot: the sandbox runs its own.
    DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install a Rust toolchain (https://rustup.rs) and retry" >&2
    exit 1
fi

echo "==> cargo build --release"
cargo build --release

export PECGATE_BIN=target/release/pecgate
exec python3 tests/support/harness.py sandbox "$@"

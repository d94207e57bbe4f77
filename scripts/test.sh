#!/usr/bin/env bash
# pecgate's test command: debug build, Rust tests, then the end-to-end suite
# (Dovecot + pecgate + imaplib/smtplib/swaks/mbsync/curl; see tests/e2e and tests/support).
# Extra arguments are passed to pytest, e.g. scripts/test.sh -k idle -x
# Needs a Rust toolchain (cargo); everything else (dovecot-imapd, dovecot-lmtpd, openssl,
# isync, swaks, curl, Python's pytest and prometheus_client) is installed when missing by
# scripts/install-deps.sh (apt as root or with sudo; it only checks when all is there).
# Set PECGATE_BUILD_LOCK=/path/to/lockfile to serialise builds with flock.
set -uo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh test || exit 1
if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install a Rust toolchain (https://rustup.rs) and retry" >&2
    exit 1
fi

lock=()
if [[ -n "${PECGATE_BUILD_LOCK:-}" ]]; then
    lock=(flock "$PECGATE_BUILD_LOCK")
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT

echo "==> cargo build"
"${lock[@]}" cargo build || { echo "cargo build failed" >&2; exit 1; }

status=0
echo "==> cargo test"
"${lock[@]}" cargo test 2>&1 | tee "$log" || status=1

echo "==> pytest tests/e2e"
PECGATE_BIN="${PECGATE_BIN:-target/debug/pecgate}" python3 -m pytest -q tests/e2e "$@" 2>&1 | tee -a "$log" || status=1

# One closing line over both runners.
passed=0
failed=0
skipped=0
while read -r p f i; do
    passed=$((passed + p))
    failed=$((failed + f))
    skipped=$((skipped + i))
done < <(sed -n 's/^test result: [a-zA-Z]*\. \([0-9]*\) passed; \([0-9]*\) failed; \([0-9]*\) ignored.*/\1 \2 \3/p' "$log")
# pytest's summary: "2 failed, 107 passed, 1 error in 12.3s" (any order, any subset).
py_line=$(grep -E '^[0-9]+ (passed|failed|errors?|skipped).* in [0-9.]+s' "$log" | tail -n 1)
count() { grep -Eo "[0-9]+ $1" <<<"$py_line" | grep -Eo '^[0-9]+' || echo 0; }
py_passed=$(count passed)
py_failed=$(( $(count failed) + $(count 'errors?') ))
py_skipped=$(count skipped)
passed=$((passed + ${py_passed:-0}))
failed=$((failed + ${py_failed:-0}))
skipped=$((skipped + ${py_skipped:-0}))
if [[ $status -ne 0 && $failed -eq 0 ]]; then
    failed=1  # a runner failed without a count (build error, crash): never report green
fi
echo "tests: $passed passed, $failed failed, $skipped skipped"
exit $status

#!/usr/bin/env bash
# Run every fuzz target (src/fuzz.rs, src/imap/client_session_tests.rs) for a set time each,
# optimised, with a random seed, and report cases run and what was found.
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [SEED]
# A failing input is saved under target/fuzz-crashes/ and the run stops there; replay it
# with the printed PECGATE_FUZZ_SEED. `cargo test` runs the same targets briefly with a fixed
# seed (that is CI's seeded pass).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
seed=${2:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}
echo "==> fuzzing each target for ${secs}s, PECGATE_FUZZ_SEED=${seed}"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
PECGATE_FUZZ_SECS=$secs PECGATE_FUZZ_SEED=$seed \
    cargo test --release --lib fuzz_ -- --nocapture --test-threads=1 2>&1 | tee "$log" || status=$?
echo
echo "==> summary"
grep -oE 'fuzz [a-z_0-9]+: [0-9]+ cases.*' "$log" || true
if grep -q 'input saved to' "$log"; then
    grep -E 'fuzz .* failed|input saved to' "$log"
fi
exit $status

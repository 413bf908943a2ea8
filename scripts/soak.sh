#!/usr/bin/env bash
# The long soak (issue 13): one hub on a release build under cycles of load for MINUTES
# minutes (default 10): steady subscribers, churn, resumes with `since`, slow readers, HTTP
# publishes with bursts. After each cycle every socket must be gone and RSS, open files,
# threads and the registry gauges of /metrics back at the baseline (tests/soak.rs says the
# tolerances). Not part of the default test run; the test run has a ~50 s variant (soak_short).
#
#   scripts/soak.sh [MINUTES]              # SOAK_STEADY=N for N steady sockets (default 4000)
#
# With gdb installed, each sample also records glibc's heap account (system vs in-use bytes,
# through `malloc_stats`), which tells allocator retention from live memory. The report goes to
# bench-results/soak-<date>-<time>.{txt,json}; the exit status is the test's.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

minutes="${1:-10}"
[[ "$minutes" =~ ^[0-9]+$ && "$minutes" -ge 2 ]] || { echo "usage: $0 [MINUTES >= 2]" >&2; exit 2; }
# Sockets on both ends live in this shell's children: the hub and the test process.
ulimit -n "$(ulimit -Hn)"
if command -v gdb >/dev/null; then export SOAK_HEAP_STATS=1; fi
export SOAK_MINUTES="$minutes"

target="${CARGO_TARGET_DIR:-target}"
status=0
cargo test --release --locked --test soak -- --ignored --exact soak_long --nocapture || status=$?
stamp="$(date -u +%Y%m%d-%H%M%S)"
mkdir -p bench-results
for ext in txt json; do
    if [[ -f "$target/tmp/soak-long.$ext" ]]; then
        cp "$target/tmp/soak-long.$ext" "bench-results/soak-$stamp.$ext"
    fi
done
[[ -f "bench-results/soak-$stamp.txt" ]] && cat "bench-results/soak-$stamp.txt"
exit "$status"

#!/usr/bin/env bash
# Fuzz every decoder of outside input for a bounded time (not part of the default test run).
#
#   scripts/fuzz.sh [SECONDS]      SECONDS: the whole budget, shared evenly (default 300)
#
# The targets are the property tests named `fuzz_*` in the `fuzz` submodules beside each
# decoder (src/core/ids/fuzz.rs, src/policy/origin/fuzz.rs, …). The default test run gives
# each a few hundred cases; here each runs again and again, FUZZ_BATCH cases a run (default
# 2000) with a fresh seed each time, until its share of the time is spent. Built in the
# test profile, so integer overflow panics instead of wrapping. Prints, per test, the runs,
# the inputs tried and the failures; a failure's log (seed and minimal input) is kept in
# target/fuzz/. Exit status 1 when anything failed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

total=${1:-300}
batch=${FUZZ_BATCH:-2000}
out=${CARGO_TARGET_DIR:-target}/fuzz
mkdir -p "$out"

bin=$(cargo test --lib --locked --no-run --message-format=json 2>/dev/null |
    grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | head -n1)
[ -x "$bin" ] || { echo "fuzz: cannot build the test binary" >&2; exit 2; }
# A copy, so that a build during the run cannot swap the binary under it.
cp "$bin" "$out/tests" && bin=$out/tests

mapfile -t tests < <("$bin" --list 2>/dev/null | sed -n 's/^\(.*::fuzz::fuzz_[a-z0-9_]*\): test$/\1/p' | sort)
[ "${#tests[@]}" -gt 0 ] || { echo "fuzz: no fuzz_* tests found" >&2; exit 2; }
share=$(( total / ${#tests[@]} ))
[ "$share" -ge 1 ] || share=1

echo "fuzz: ${#tests[@]} tests, ${share}s each, $batch inputs a run"
printf '%-62s %5s %10s %8s\n' test runs inputs failures | tee "$out/report.txt"
failed=0
all_inputs=0
for test in "${tests[@]}"; do
    runs=0 inputs=0 failures=0
    end=$(( SECONDS + share ))
    while [ "$SECONDS" -lt "$end" ] || [ "$runs" -eq 0 ]; do
        seed=$(( (RANDOM << 30) ^ (RANDOM << 15) ^ RANDOM ))
        log="$out/${test//::/_}.$seed.log"
        # A run that hangs (a parser gone exponential) is a failure too.
        if PROPTEST_CASES=$batch PROPTEST_RNG_SEED=$seed RUST_BACKTRACE=0 \
            timeout $(( share + 120 )) "$bin" --exact "$test" --test-threads 1 >"$log" 2>&1; then
            rm -f "$log"
            runs=$(( runs + 1 ))
            inputs=$(( inputs + batch ))
        else
            runs=$(( runs + 1 ))
            # Cases passed before the failure, plus the one that failed.
            passed=$(grep -m1 -o 'successes: [0-9]*' "$log" | grep -o '[0-9]*' || echo 0)
            inputs=$(( inputs + ${passed:-0} + 1 ))
            failures=$(( failures + 1 ))
            echo "  FAILED: $test (PROPTEST_RNG_SEED=$seed), log in $log" >&2
            grep -m1 -A3 'minimal failing input' "$log" >&2 || tail -n 5 "$log" >&2
            break
        fi
    done
    all_inputs=$(( all_inputs + inputs ))
    [ "$failures" -eq 0 ] || failed=1
    printf '%-62s %5d %10d %8d\n' "$test" "$runs" "$inputs" "$failures" | tee -a "$out/report.txt"
done
# Per target (the module whose decoder it fuzzes), for RELIABILITY.md.
echo | tee -a "$out/report.txt"
printf '%-40s %10s %8s\n' target inputs failures | tee -a "$out/report.txt"
awk 'NR > 1 && NF == 4 { sub(/::fuzz::.*/, "", $1); inputs[$1] += $3; failures[$1] += $4 }
     END { for (t in inputs) printf "%-40s %10d %8d\n", t, inputs[t], failures[t] }' \
    <(sed -n '1,/^$/p' "$out/report.txt") | sort | tee -a "$out/report.txt"
echo "fuzz: $all_inputs inputs in all; report in $out/report.txt"
exit "$failed"

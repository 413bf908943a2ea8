#!/usr/bin/env bash
# Make docs/voice.png: the voice test page (/voice-test) in Chromium with its fake microphone,
# after a few seconds of audio echoed through an embedded hub by `switchboard voice-echo`.
# Both run here on a free port with the development configuration and are stopped at the end.
# Needs what the browser tests need (scripts/ensure-test-tools). BIN=path/to/switchboard uses
# that binary instead of building the release one.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -z "${BIN:-}" ]]; then
    cargo build --release --locked --bin switchboard
    BIN=target/release/switchboard
fi
[[ -d tests/browser/node_modules ]] || npm ci --prefix tests/browser --no-audit --no-fund

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# Wait (10 s at most) for a line matching $2 in the log $1; print the line.
wait_line() {
    for _ in $(seq 100); do
        if line=$(grep -m1 -E "$2" "$1"); then echo "$line"; return 0; fi
        sleep 0.1
    done
    echo "no line matching '$2' in $1:" >&2; cat "$1" >&2; return 1
}

SWITCHBOARD__SERVER__PORT=0 SWITCHBOARD__DEMO__SIMULATE_CALLS=false "$BIN" serve >"$work/hub.log" 2>&1 &
pids+=($!)
port=$(wait_line "$work/hub.log" 'listening on http://' | sed -E 's#.*listening on http://[^:]+:([0-9]+).*#\1#')
"$BIN" voice-echo --url "http://127.0.0.1:$port" >"$work/echo.log" 2>&1 &
pids+=($!)
wait_line "$work/echo.log" 'voice-echo: ready' >/dev/null

node tests/browser/voice.mjs "http://localhost:$port" screenshot "$work"
cp "$work/voice.png" docs/voice.png
echo "wrote docs/voice.png"

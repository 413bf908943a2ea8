#!/usr/bin/env bash
# The project's whole check, as CI runs it (.ci/run) and as the README tells developers to:
# formatting, lints (warnings are errors), then every test, including the clustered ones
# that start redis-server and nginx (apt-get install -y redis-server nginx).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# --all / --workspace: the hub and the bench crate (bench/).
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The dashboard's browser test (tests/dashboard.rs) drives Debian's chromium with
# playwright-core from tests/browser (installed from its lock file; never downloads a browser).
if [[ ! -d tests/browser/node_modules ]]; then
    npm ci --prefix tests/browser --no-audit --no-fund
fi
cargo test --workspace --locked

#!/usr/bin/env bash
# The project's whole check, as CI runs it (.ci/run) and as the README tells developers to:
# installs what the tests need when it is missing (scripts/ensure-test-tools: redis-server,
# nginx, chromium, node, the npm packages of tests/browser), then formatting, lints (warnings
# are errors), then every test of the workspace, including the clustered ones that start
# redis-server and nginx and the dashboard test that drives chromium.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/ensure-test-tools
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked

//! The browser client's unit tests (`static/client.js` under a fake WebSocket, a fake fetch
//! for `/sse` and a fake clock: `tests/client/*.test.mjs`) run by Node's built-in test runner,
//! so `cargo test` covers them. Needs `node` (20+) on PATH (`scripts/ensure-test-tools`
//! installs it); without it this test fails and says so, it never skips.

use std::path::Path;
use std::process::Command;

#[test]
fn client_js_unit_tests_pass_under_node() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = Command::new("node")
        .arg("--test")
        .arg("tests/client/")
        .current_dir(root)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `node --test tests/client/` ({e}): install Node.js 20+ (scripts/ensure-test-tools)")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "node --test tests/client/ failed ({}):\n{text}",
        output.status
    );
    // An empty or misnamed folder must not pass silently.
    assert!(
        text.contains("# pass ") && !text.contains("# pass 0\n"),
        "node --test tests/client/ ran no tests:\n{text}"
    );
}

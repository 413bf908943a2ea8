//! The browser client's unit tests (`static/client.js` under a fake WebSocket, a fake fetch
//! for `/sse` and a fake clock: `tests/client/*.test.mjs`) run by Node's built-in test runner,
//! so `cargo test` covers them. Needs `node` (20+) on PATH (`scripts/ensure-test-tools`
//! installs it); without it this test fails and says so, it never skips.
//!
//! The client's TypeScript declarations (`static/client.d.ts`) are checked the same way: a
//! program using them (`tests/client/client-usage.ts`, with `@ts-expect-error` on misuses they
//! must reject) is compiled by `tsc --noEmit --strict`, the `typescript` package pinned in
//! `tests/browser/package.json` (`npm ci --prefix tests/browser`, which
//! `scripts/ensure-test-tools` runs when the lock file changed).

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

/// An application written in TypeScript against `/client.d.ts` compiles under `--strict`, and
/// the misuses the declarations must reject are rejected.
#[test]
fn client_typescript_declarations_type_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tsc = root.join("tests/browser/node_modules/typescript/bin/tsc");
    assert!(
        tsc.is_file(),
        "{} is missing: run `npm ci --prefix tests/browser` (scripts/ensure-test-tools does \
         when tests/browser/package-lock.json changed)",
        tsc.display()
    );
    let output = Command::new("node")
        .arg(&tsc)
        .args([
            "--noEmit",
            "--strict",
            "--target",
            "es2020",
            "--module",
            "nodenext",
            "--moduleResolution",
            "nodenext",
            "--lib",
            "es2022,dom",
            "tests/client/client-usage.ts",
        ])
        .current_dir(root)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `node {}` ({e}): install Node.js 20+",
                tsc.display()
            )
        });
    assert!(
        output.status.success(),
        "tsc rejected tests/client/client-usage.ts against static/client.d.ts ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

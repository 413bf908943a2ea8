//! The layer rule of `src/lib.rs`: the "# Layout" list of its module docs names the layers
//! from the bottom up, and a module may import only from itself and the layers listed before
//! it. This test reads the source tree and fails naming every `crate::…` path that reaches a
//! layer above its own, and every module `lib.rs` declares that the list leaves out.

use std::path::{Path, PathBuf};

/// One import of a later layer: where, and which layers.
#[derive(Debug, PartialEq)]
struct Violation {
    file: String,
    line: usize,
    from: String,
    to: String,
}

/// The layers in the order of the layout list in `lib.rs`'s docs (``//! - [`x`]: …``).
fn layers(lib_rs: &str) -> Vec<String> {
    lib_rs
        .lines()
        .filter_map(|l| {
            let item = l.trim().strip_prefix("//! - [`")?;
            item.split_once("`]").map(|(name, _)| name.to_string())
        })
        .collect()
}

/// The modules `lib.rs` declares (`mod x;`, `pub mod x;`).
fn declared(lib_rs: &str) -> Vec<String> {
    lib_rs
        .lines()
        .map(str::trim)
        .filter_map(|l| {
            let l = l.strip_prefix("pub ").unwrap_or(l);
            let l = l.strip_prefix("pub(crate) ").unwrap_or(l);
            l.strip_prefix("mod ")?
                .strip_suffix(';')
                .map(str::to_string)
        })
        .collect()
}

/// The top-level modules a line of code names through `crate::`, including each name of a
/// grouped `use crate::{a::X, b};`.
fn crate_modules(code: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let before = &rest[..at];
        rest = &rest[at + "crate::".len()..];
        // `$crate::` and identifiers ending in `crate` are not the crate root.
        if before
            .chars()
            .last()
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$')
        {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && depth == 0 && (c.is_alphabetic() || c == '_') => {
                        let name: String = group[i..]
                            .chars()
                            .take_while(|c| c.is_alphanumeric() || *c == '_')
                            .collect();
                        found.push(name);
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.push(name);
            }
        }
    }
    found
}

/// Every import of a later layer in `files` (path relative to `src/`, contents).
fn violations(lib_rs: &str, files: &[(String, String)]) -> Vec<Violation> {
    let order = layers(lib_rs);
    let rank = |module: &str| order.iter().position(|m| m == module);
    let mut out = Vec::new();
    for (path, text) in files {
        let top = path
            .split('/')
            .next()
            .unwrap_or(path)
            .trim_end_matches(".rs");
        let Some(own) = rank(top) else {
            continue; // lib.rs, main.rs, and binaries: above every layer
        };
        // A statement may span lines; join each `use` statement before reading it.
        let mut statement = String::new();
        let mut starts_at = 0;
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if statement.is_empty() {
                starts_at = n + 1;
            }
            statement.push_str(code);
            statement.push(' ');
            let open = statement.matches('{').count() > statement.matches('}').count();
            if statement.trim_start().starts_with("use ") && open {
                continue;
            }
            for module in crate_modules(&statement) {
                if rank(&module).is_some_and(|theirs| theirs > own) {
                    out.push(Violation {
                        file: path.clone(),
                        line: starts_at,
                        from: top.to_string(),
                        to: module,
                    });
                }
            }
            statement.clear();
        }
    }
    out
}

fn rust_files(dir: &Path, root: &Path, out: &mut Vec<(String, String)>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path: PathBuf = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, root, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let relative = path.strip_prefix(root).expect("under src/");
            let text = std::fs::read_to_string(&path).expect("readable source");
            out.push((relative.to_string_lossy().replace('\\', "/"), text));
        }
    }
}

/// No module of `src/` imports from a layer declared after it in `lib.rs`.
#[test]
fn every_module_imports_only_from_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib_rs = std::fs::read_to_string(src.join("lib.rs")).expect("src/lib.rs");
    let order = layers(&lib_rs);
    let unplaced: Vec<String> = declared(&lib_rs)
        .into_iter()
        .filter(|m| !order.contains(m))
        .collect();
    assert!(
        order.len() >= 5 && unplaced.is_empty(),
        "lib.rs's layout list (//! - [`module`]: ...) must name every module in layer order; \
         it lists {order:?} and leaves out {unplaced:?}"
    );
    let mut files = Vec::new();
    rust_files(&src, &src, &mut files);
    let found = violations(&lib_rs, &files);
    let lines: Vec<String> = found
        .iter()
        .map(|v| {
            format!(
                "src/{}:{}: layer `{}` imports `crate::{}`, a layer above it",
                v.file, v.line, v.from, v.to
            )
        })
        .collect();
    assert!(
        lines.is_empty(),
        "layer order (lib.rs): {}\n{}",
        layers(&lib_rs).join(" → "),
        lines.join("\n")
    );
}

/// The check itself catches an upward import, plain or grouped, and lets downward ones pass.
#[test]
fn the_check_catches_an_upward_import() {
    let lib_rs = "//! - [`core`]: a\n//! - [`store`]: b\n//! - [`server`]: c\npub mod core;\n";
    let files = vec![
        (
            "store/caps.rs".to_string(),
            "use crate::core::ids::X;\nuse crate::{\n    core::a,\n    server::Bound,\n};\nfn f() { crate::server::run(); } // crate::server in a comment\n".to_string(),
        ),
        ("core/mod.rs".to_string(), "use crate::core::x;\n".to_string()),
        ("lib.rs".to_string(), "use crate::server::x;\n".to_string()),
    ];
    let found = violations(lib_rs, &files);
    let at: Vec<(usize, &str)> = found.iter().map(|v| (v.line, v.to.as_str())).collect();
    assert_eq!(at, vec![(2, "server"), (6, "server")]);
}

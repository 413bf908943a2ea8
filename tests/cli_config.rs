//! The command line and configuration loading: `check-origin`, `config`, and `serve` refusing
//! an invalid configuration with one `config error:` line per problem (exit code 2).
//! These run the binary to completion; no server is left running.

mod common;

use common::*;

/// `config error: ` lines in the output.
fn config_errors(out: &CliOutput) -> Vec<String> {
    out.all()
        .lines()
        .filter_map(|l| l.find("config error: ").map(|at| l[at..].to_string()))
        .collect()
}

fn mentions_denial(text: &str) -> bool {
    let t = text.to_lowercase();
    [
        "denied",
        "not allowed",
        "not admitted",
        "refused",
        "rejected",
        "not in the allowlist",
    ]
    .iter()
    .any(|w| t.contains(w))
}

/// `check-origin http://localhost:3000` on the development config admits it and exits 0.
#[test]
fn check_origin_admits_localhost_in_development() {
    let out = run_cli(&["check-origin", "http://localhost:3000"], &[]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(
        !out.stdout.trim().is_empty(),
        "check-origin should explain why: {out}"
    );
}

/// `check-origin https://evil.example` is denied with exit 1 and an explanation naming it.
#[test]
fn check_origin_denies_unknown_origin_with_explanation() {
    let out = run_cli(&["check-origin", "https://evil.example"], &[]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stdout.contains("https://evil.example"),
        "explanation should name the origin: {out}"
    );
    assert!(
        mentions_denial(&out.stdout),
        "explanation should say it is denied: {out}"
    );
}

/// http:// against an https:// allowlist entry is denied, naming the scheme and the nearest entry.
#[test]
fn check_origin_explains_scheme_mismatch() {
    let out = run_cli(
        &["check-origin", "http://app.example.com"],
        &[
            ("SWITCHBOARD__ORIGINS__ALLOWED", "https://app.example.com"),
            ("SWITCHBOARD__ORIGINS__ALLOW_LOCALHOST", "false"),
        ],
    );
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stdout.contains("https://app.example.com"),
        "should name the nearest allowed origin: {out}"
    );
    assert!(
        out.stdout.to_lowercase().contains("scheme"),
        "should say the scheme differs: {out}"
    );
}

/// A `www.` difference is explained as such, naming the nearest entry.
#[test]
fn check_origin_explains_www_difference() {
    let out = run_cli(
        &["check-origin", "https://www.app.example.com"],
        &[
            ("SWITCHBOARD__ORIGINS__ALLOWED", "https://app.example.com"),
            ("SWITCHBOARD__ORIGINS__ALLOW_LOCALHOST", "false"),
        ],
    );
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stdout.contains("https://app.example.com"),
        "should name the nearest allowed origin: {out}"
    );
    assert!(
        out.stdout.contains("www"),
        "should point at the www. difference: {out}"
    );
}

/// A wildcard entry admits subdomains only, not the apex nor look-alike hosts.
#[test]
fn check_origin_wildcard_admits_only_subdomains() {
    let env = [
        ("SWITCHBOARD__ORIGINS__ALLOWED", "https://*.example.com"),
        ("SWITCHBOARD__ORIGINS__ALLOW_LOCALHOST", "false"),
    ];
    let cases = [
        ("https://app.example.com", 0),
        ("https://a.b.example.com", 0),
        ("https://example.com", 1),
        ("https://evil-example.com", 1),
        ("https://example.com.evil.net", 1),
        ("http://app.example.com", 1),
    ];
    let mut wrong = Vec::new();
    for (origin, want) in cases {
        let out = run_cli(&["check-origin", origin], &env);
        if out.code() != Some(want) {
            wrong.push(format!("{origin}: want exit {want}, got {out}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "wildcard decisions wrong:\n{}",
        wrong.join("\n")
    );
}

/// FRONTEND_URL (even with a trailing slash) and ALLOWED_ORIGINS join the allowlist.
#[test]
fn conventional_variables_extend_the_allowlist() {
    let env = [
        ("SWITCHBOARD__ORIGINS__ALLOW_LOCALHOST", "false"),
        ("FRONTEND_URL", "https://front.example.com/"),
        (
            "ALLOWED_ORIGINS",
            "https://a.example.com,https://b.example.com",
        ),
    ];
    for origin in [
        "https://front.example.com",
        "https://a.example.com",
        "https://b.example.com",
    ] {
        let out = run_cli(&["check-origin", origin], &env);
        assert_eq!(out.code(), Some(0), "{origin} should be admitted: {out}");
    }
    let out = run_cli(&["check-origin", "https://c.example.com"], &env);
    assert_eq!(out.code(), Some(1), "{out}");
}

/// `serve` with an allowlist entry ending in `/` stops with exit 2 and a line naming the entry.
#[test]
fn serve_refuses_origin_with_trailing_slash() {
    let out = run_cli(
        &["serve"],
        &[("SWITCHBOARD__ORIGINS__ALLOWED", "https://app.example.com/")],
    );
    assert_eq!(out.code(), Some(2), "{out}");
    let errors = config_errors(&out);
    assert!(
        errors
            .iter()
            .any(|l| l.contains("https://app.example.com/") && l.to_lowercase().contains("trailing slash")),
        "expected a `config error:` line naming https://app.example.com/ and its trailing slash; got {errors:?}\n{out}"
    );
}

/// Three different problems are all reported at once, one `config error:` line each.
#[test]
fn serve_reports_every_problem_at_once() {
    let out = run_cli(
        &["serve"],
        &[
            ("SWITCHBOARD__ORIGINS__ALLOWED", "https://app.example.com/"),
            ("SWITCHBOARD__HEARTBEAT__TIMEOUT_MS", "5"),
            ("SWITCHBOARD__LIMITS__MAX_CONNECTION_PER_USER", "3"),
        ],
    );
    assert_eq!(out.code(), Some(2), "{out}");
    let errors = config_errors(&out);
    let missing: Vec<&str> = [
        "https://app.example.com/",
        "timeout_ms",
        "max_connection_per_user",
    ]
    .into_iter()
    .filter(|needle| !errors.iter().any(|l| l.contains(needle)))
    .collect();
    assert!(
        errors.len() >= 3 && missing.is_empty(),
        "expected >= 3 `config error:` lines covering the origin, heartbeat.timeout_ms and the unknown key; \
         not mentioned: {missing:?}; lines: {errors:?}\n{out}"
    );
}

/// The production profile refuses dev login and a missing cookie key, naming both.
#[test]
fn production_profile_refuses_dev_login_and_missing_cookie_key() {
    let out = run_cli(
        &["serve"],
        &[
            ("SWITCHBOARD_ENV", "production"),
            ("SWITCHBOARD__AUTH__DEV_LOGIN", "true"),
        ],
    );
    assert_eq!(out.code(), Some(2), "{out}");
    let errors = config_errors(&out);
    assert!(
        errors.iter().any(|l| l.contains("dev_login")),
        "no config error names dev_login: {errors:?}\n{out}"
    );
    assert!(
        errors.iter().any(|l| l.contains("cookie_key")),
        "no config error names cookie_key: {errors:?}\n{out}"
    );
}

/// The production profile with the shipped files alone still demands a cookie key.
#[test]
fn production_profile_requires_cookie_key() {
    let out = run_cli(&["serve"], &[("SWITCHBOARD_ENV", "production")]);
    assert_eq!(out.code(), Some(2), "{out}");
    let errors = config_errors(&out);
    assert!(
        errors.iter().any(|l| l.contains("cookie_key")),
        "no config error names cookie_key: {errors:?}\n{out}"
    );
    assert!(
        !errors.iter().any(|l| l.contains("dev_login")),
        "production.toml should itself turn dev_login off: {errors:?}"
    );
}

/// `serve --config DIR` with no default.toml there stops with a config error naming the file.
#[test]
fn serve_with_missing_config_dir_explains() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap().to_string();
    let out = run_cli(&["serve", "--config", &path], &[]);
    assert_eq!(out.code(), Some(2), "{out}");
    let errors = config_errors(&out);
    assert!(
        errors.iter().any(|l| l.contains("default.toml")),
        "{errors:?}\n{out}"
    );
}

/// `serve --config DIR` reads that directory instead of config/ (proved by an entry only it has).
#[test]
fn serve_config_flag_reads_that_directory() {
    let dir = tempfile::tempdir().unwrap();
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml"))
            .expect("config/default.toml");
    let mut table: toml::Table = shipped.parse().expect("default.toml parses");
    table
        .entry("origins")
        .or_insert(toml::Value::Table(Default::default()))
        .as_table_mut()
        .unwrap()
        .insert(
            "allowed".into(),
            toml::Value::Array(vec!["https://only-in-tempdir.example/".into()]),
        );
    std::fs::write(
        dir.path().join("default.toml"),
        toml::to_string(&table).unwrap(),
    )
    .unwrap();
    let path = dir.path().to_str().unwrap().to_string();
    let out = run_cli(&["serve", "--config", &path], &[]);
    assert_eq!(out.code(), Some(2), "{out}");
    let errors = config_errors(&out);
    assert!(
        errors
            .iter()
            .any(|l| l.contains("https://only-in-tempdir.example/")),
        "the bad entry of DIR/default.toml should be reported: {errors:?}\n{out}"
    );
}

/// `config` prints TOML with secrets as `<redacted>` and never the secret values themselves.
#[test]
fn config_command_redacts_secrets() {
    let out = run_cli(&["config"], &[]);
    assert_eq!(out.code(), Some(0), "{out}");
    for secret in [JWT_SECRET, PUBLISH_KEY] {
        assert!(
            !out.all().contains(secret),
            "`config` output leaks {secret:?}:\n{out}"
        );
    }
    // The development cookie key shipped in default.toml is a secret too.
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml"))
            .expect("config/default.toml");
    let shipped: toml::Table = shipped.parse().expect("default.toml parses");
    if let Some(key) = shipped
        .get("auth")
        .and_then(|a| a.get("cookie_key"))
        .and_then(|k| k.as_str())
    {
        assert!(
            !out.all().contains(key),
            "`config` output leaks the cookie key:\n{out}"
        );
    }
    let printed: toml::Table = out
        .stdout
        .parse()
        .unwrap_or_else(|e| panic!("`config` stdout is not TOML: {e}\n{out}"));
    assert_eq!(
        printed["auth"]["jwt_secret"].as_str(),
        Some("<redacted>"),
        "auth.jwt_secret:\n{out}"
    );
    assert_eq!(
        printed["api"]["publish_keys"]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_str()).collect::<Vec<_>>()),
        Some(vec![Some("<redacted>")]),
        "api.publish_keys:\n{out}"
    );
    assert_eq!(
        printed["server"]["port"].as_integer(),
        Some(0),
        "env overrides should show: {out}"
    );
}

/// `config` shows a redis URL with its password redacted.
#[test]
fn config_command_redacts_redis_password() {
    let out = run_cli(
        &["config"],
        &[("REDIS_URL", "redis://user:hunter2secret@127.0.0.1:6379/0")],
    );
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(
        !out.all().contains("hunter2secret"),
        "redis password leaked:\n{out}"
    );
    assert!(out.stdout.contains("<redacted>"), "{out}");
}

/// One Redis and a Redis Cluster given together is refused with one line naming both keys;
/// a seed that is not a redis:// URL is named; seed passwords are redacted by `config`.
#[test]
fn redis_url_and_cluster_urls_together_are_refused() {
    let both = run_cli(
        &["serve"],
        &[
            ("REDIS_URL", "redis://127.0.0.1:1"),
            (
                "SWITCHBOARD__REDIS__CLUSTER_URLS",
                "redis://127.0.0.1:2,http://127.0.0.1:3",
            ),
        ],
    );
    assert_eq!(both.code(), Some(2), "{both}");
    let errors = config_errors(&both);
    assert!(
        errors
            .iter()
            .any(|e| e.contains("redis.url") && e.contains("redis.cluster_urls")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("\"http://127.0.0.1:3\"")),
        "{errors:?}"
    );
    let shown = run_cli(
        &["config"],
        &[(
            "SWITCHBOARD__REDIS__CLUSTER_URLS",
            "redis://u:hunter2secret@127.0.0.1:2,redis://127.0.0.1:3",
        )],
    );
    assert_eq!(shown.code(), Some(0), "{shown}");
    assert!(!shown.all().contains("hunter2secret"), "{shown}");
    assert!(shown.stdout.contains("redis://127.0.0.1:3"), "{shown}");
}

/// Origins are compared after normalising case and dropping the default port.
#[test]
fn check_origin_normalises_case_and_default_port() {
    let env = [
        (
            "SWITCHBOARD__ORIGINS__ALLOWED",
            "https://app.example.com,http://other.example.com:8080",
        ),
        ("SWITCHBOARD__ORIGINS__ALLOW_LOCALHOST", "false"),
    ];
    let cases = [
        ("https://app.example.com:443", 0),
        ("HTTPS://App.Example.COM", 0),
        ("http://other.example.com:8080", 0),
        ("http://other.example.com", 1),
        ("https://app.example.com:8443", 1),
    ];
    let mut wrong = Vec::new();
    for (origin, want) in cases {
        let out = run_cli(&["check-origin", origin], &env);
        if out.code() != Some(want) {
            wrong.push(format!("{origin}: want exit {want}, got {out}"));
        }
    }
    assert!(wrong.is_empty(), "normalisation:\n{}", wrong.join("\n"));
}

/// Allowlist entries with a path, or a wildcard anywhere but the leading label, stop start-up.
#[test]
fn serve_refuses_malformed_origin_entries() {
    for entry in [
        "https://app.example.com/app",
        "https://app.*.example.com",
        "https://*example.com",
        "app.example.com",
    ] {
        let out = run_cli(&["serve"], &[("SWITCHBOARD__ORIGINS__ALLOWED", entry)]);
        assert_eq!(out.code(), Some(2), "entry {entry}: {out}");
        let errors = config_errors(&out);
        assert!(
            errors.iter().any(|l| l.contains(entry)),
            "no config error names the entry {entry}: {errors:?}\n{out}"
        );
    }
}

/// A legacy origin is admitted until its date and refused after it.
#[test]
fn legacy_origins_expire_on_their_date() {
    let dir = tempfile::tempdir().unwrap();
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml"))
            .expect("config/default.toml");
    let mut table: toml::Table = shipped.parse().expect("default.toml parses");
    let legacy: toml::Value = toml::from_str::<toml::Table>(
        r#"legacy = [
            { origin = "https://old.example", until = "2999-12-31" },
            { origin = "https://retired.example", until = "2000-01-01" },
        ]"#,
    )
    .unwrap()["legacy"]
        .clone();
    table
        .entry("origins")
        .or_insert(toml::Value::Table(Default::default()))
        .as_table_mut()
        .unwrap()
        .insert("legacy".into(), legacy);
    std::fs::write(
        dir.path().join("default.toml"),
        toml::to_string(&table).unwrap(),
    )
    .unwrap();
    let path = dir.path().to_str().unwrap().to_string();
    let out = run_cli(
        &["--config", &path, "check-origin", "https://old.example"],
        &[],
    );
    assert_eq!(out.code(), Some(0), "legacy origin before its date: {out}");
    let out = run_cli(
        &["--config", &path, "check-origin", "https://retired.example"],
        &[],
    );
    assert_eq!(out.code(), Some(1), "legacy origin after its date: {out}");
}

/// A heartbeat timeout not above the interval stops start-up, naming both keys.
#[test]
fn serve_refuses_heartbeat_timeout_below_interval() {
    let out = run_cli(&["serve"], &[("SWITCHBOARD__HEARTBEAT__TIMEOUT_MS", "5")]);
    assert_eq!(out.code(), Some(2), "{out}");
    let errors = config_errors(&out);
    assert!(
        errors
            .iter()
            .any(|l| l.contains("timeout_ms") && l.contains("interval_ms")),
        "{errors:?}\n{out}"
    );
}

/// Abuse bounds that would turn a feature off by accident stop start-up, one line per key.
#[test]
fn serve_refuses_zero_abuse_bounds() {
    let out = run_cli(
        &["serve"],
        &[
            ("SWITCHBOARD__LIMITS__CLIENT_EVENT_BYTES", "0"),
            ("SWITCHBOARD__HISTORY__MAX_TOPICS_PER_ORG", "0"),
            ("SWITCHBOARD__HISTORY__REPLAY_MAX_BYTES", "10"),
        ],
    );
    assert_eq!(out.code(), Some(2), "{out}");
    let errors = config_errors(&out);
    for key in [
        "limits.client_event_bytes",
        "history.max_topics_per_org",
        "history.replay_max_bytes",
    ] {
        assert_eq!(
            errors.iter().filter(|l| l.contains(key)).count(),
            1,
            "{key}: {errors:?}\n{out}"
        );
    }
}

/// An unknown key stops start-up with a did-you-mean hint.
#[test]
fn serve_refuses_unknown_key_with_hint() {
    let out = run_cli(
        &["serve"],
        &[("SWITCHBOARD__LIMITS__MAX_CONNECTION_PER_USER", "3")],
    );
    assert_eq!(out.code(), Some(2), "{out}");
    let errors = config_errors(&out);
    assert!(
        errors.iter().any(
            |l| l.contains("max_connection_per_user") && l.contains("max_connections_per_user")
        ),
        "{errors:?}\n{out}"
    );
}

/// The conventional `PORT` and `BIND` variables win over `SWITCHBOARD__SERVER__*`.
#[test]
fn port_and_bind_variables_win() {
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let port = free.to_string();
    let hub = Hub::start(&[
        ("SWITCHBOARD__SERVER__BIND", "127.0.0.1"),
        ("BIND", "127.0.0.2"),
        ("PORT", &port),
    ]);
    assert_eq!(
        hub.addr().to_string(),
        format!("127.0.0.2:{free}"),
        "{}",
        hub.logs()
    );
}

/// The production profile refuses the demo call simulator: made-up calls must never reach a
/// real board.
#[test]
fn production_profile_refuses_the_demo_simulator() {
    let out = run_cli(
        &["serve"],
        &[
            ("SWITCHBOARD_ENV", "production"),
            ("SWITCHBOARD__DEMO__SIMULATE_CALLS", "true"),
        ],
    );
    assert_eq!(out.code(), Some(2), "{out}");
    let errors = config_errors(&out);
    assert!(
        errors.iter().any(|l| l.contains("demo.simulate_calls")),
        "no config error names demo.simulate_calls: {errors:?}\n{out}"
    );
}

/// The lines of `errors` that name `key`; each problem is one line naming its key.
fn naming<'a>(errors: &'a [String], key: &str) -> Vec<&'a String> {
    errors.iter().filter(|l| l.contains(key)).collect()
}

/// Any profile but `development` is strict: with `SWITCHBOARD_ENV=staging` (a profile file of
/// its own that changes nothing), dev login, the simulator and every secret shipped in
/// config/default.toml are refused, one `config error:` line each, naming the key.
#[test]
fn a_profile_other_than_development_refuses_dev_conveniences_and_shipped_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml"))
            .expect("config/default.toml");
    std::fs::write(dir.path().join("default.toml"), &shipped).unwrap();
    std::fs::write(dir.path().join("staging.toml"), "# nothing of its own\n").unwrap();
    let path = dir.path().to_str().unwrap().to_string();
    let table: toml::Table = shipped.parse().expect("default.toml parses");
    let shipped_jwt = table["auth"]["jwt_secret"].as_str().unwrap().to_string();
    let shipped_key = table["api"]["publish_keys"][0]
        .as_str()
        .unwrap()
        .to_string();
    let out = run_cli(
        &["serve", "--config", &path],
        &[
            ("SWITCHBOARD_ENV", "staging"),
            ("SWITCHBOARD__DEMO__SIMULATE_CALLS", "true"),
            // The harness sets its own; these are the shipped ones again.
            ("SWITCHBOARD__AUTH__JWT_SECRET", &shipped_jwt),
            ("SWITCHBOARD__API__PUBLISH_KEYS", &shipped_key),
        ],
    );
    assert_eq!(out.code(), Some(2), "{out}");
    let errors = config_errors(&out);
    for key in [
        "auth.dev_login",
        "demo.simulate_calls",
        "auth.cookie_key",
        "auth.jwt_secret",
        "api.publish_keys",
    ] {
        assert_eq!(
            naming(&errors, key).len(),
            1,
            "want one config error naming {key}: {errors:?}\n{out}"
        );
    }
}

/// The development profile on a public bind is strict too: only development AND loopback
/// allows the conveniences.
#[test]
fn development_on_a_public_bind_is_strict() {
    let out = run_cli(&["serve"], &[("BIND", "0.0.0.0")]);
    assert_eq!(out.code(), Some(2), "{out}");
    let errors = config_errors(&out);
    for key in ["auth.dev_login", "auth.cookie_key", "api.publish_keys"] {
        let lines = naming(&errors, key);
        assert_eq!(
            lines.len(),
            1,
            "want one config error naming {key}: {errors:?}\n{out}"
        );
        assert!(
            lines[0].contains("not loopback"),
            "{key}: say why it is strict: {lines:?}"
        );
    }
}

/// Outside development a publish key needs 32+ characters; development takes shorter ones.
#[test]
fn publish_keys_need_32_characters_outside_development() {
    let key = "k".repeat(31);
    let out = run_cli(
        &["serve"],
        &[
            ("SWITCHBOARD_ENV", "production"),
            ("SWITCHBOARD__API__PUBLISH_KEYS", &key),
        ],
    );
    assert_eq!(out.code(), Some(2), "{out}");
    let errors = config_errors(&out);
    let lines = naming(&errors, "api.publish_keys");
    assert!(
        lines.len() == 1 && lines[0].contains("32"),
        "want one error naming api.publish_keys and 32: {errors:?}\n{out}"
    );
    let long = "k".repeat(32);
    let out = run_cli(
        &["serve"],
        &[
            ("SWITCHBOARD_ENV", "production"),
            ("SWITCHBOARD__API__PUBLISH_KEYS", &long),
        ],
    );
    assert!(
        naming(&config_errors(&out), "api.publish_keys").is_empty(),
        "a 32-character key is enough: {out}"
    );
}

/// A JWT secret shorter than 32 bytes (HS256's key size) is refused in every profile.
#[test]
fn jwt_secret_needs_32_bytes() {
    let out = run_cli(
        &["serve"],
        &[(
            "SWITCHBOARD__AUTH__JWT_SECRET",
            "0123456789abcdef0123456789abcde",
        )],
    );
    assert_eq!(out.code(), Some(2), "{out}");
    let errors = config_errors(&out);
    let lines = naming(&errors, "auth.jwt_secret");
    assert!(
        lines.len() == 1 && lines[0].contains("32"),
        "want one error naming auth.jwt_secret and 32: {errors:?}\n{out}"
    );
}

//! Fuzz target of the loader and validator: the shipped `config/default.toml` with keys
//! retyped, removed, added or garbled, plus `SWITCHBOARD__…` and conventional variables of
//! any value. Whatever the input, loading gives settings that keep the documented invariants
//! or errors of one `config error:` line each; it never panics.

use proptest::prelude::*;

use super::*;
use crate::core::fuzzing::{config, garbage, mutated};

fn shipped() -> toml::Table {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml");
    let text = std::fs::read_to_string(path).expect("config/default.toml");
    toml::from_str(&text).expect("the shipped config is TOML")
}

fn known() -> Vec<(String, String)> {
    known_keys()
        .into_iter()
        .filter_map(|k| {
            k.split_once('.')
                .map(|(s, k)| (s.to_string(), k.to_string()))
        })
        .collect()
}

fn text_value() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "production",
            "reject_new",
            "evict_oldest",
            "close",
            "conflate",
            "none",
            "lax",
            "strict",
            "redis://127.0.0.1:6379/0",
            "redis://user:pw@h:1",
            "rediss://h",
            "unix:///tmp/r.sock",
            "https://app.example.com",
            "https://*.example.com",
            "null",
            "10.0.0.0/8",
            "::1",
            "0.0.0.0",
            "localhost",
            "voice:*:in",
            "",
            "true",
            "1e3",
        ])
        .prop_map(String::from),
        mutated("[A-Za-z0-9+/]{86}==|[a-z0-9:*]{1,12}|https://[a-z.]{1,12}/?"),
        garbage(30),
    ]
}

fn toml_value() -> impl Strategy<Value = toml::Value> {
    let leaf = prop_oneof![
        prop_oneof![
            any::<i64>(),
            Just(i64::MAX),
            Just(i64::MIN),
            Just(-1i64),
            Just(0i64),
            Just(65_536i64),
            Just(i64::from(u32::MAX) + 1),
            Just(18_446_744_073_709_552i64),
        ]
        .prop_map(toml::Value::Integer),
        any::<f64>().prop_map(toml::Value::Float),
        any::<bool>().prop_map(toml::Value::Boolean),
        text_value().prop_map(toml::Value::String),
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(toml::Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..3)
                .prop_map(|m| toml::Value::Table(m.into_iter().collect())),
        ]
    })
}

/// One change to the shipped config.
#[derive(Debug, Clone)]
enum Change {
    Set(prop::sample::Index, toml::Value),
    Remove(prop::sample::Index),
    Unknown(String, String, toml::Value),
    /// A whole section replaced by a value that is not a table.
    Flatten(prop::sample::Index, toml::Value),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        6 => (any::<prop::sample::Index>(), toml_value()).prop_map(|(i, v)| Change::Set(i, v)),
        1 => any::<prop::sample::Index>().prop_map(Change::Remove),
        1 => (mutated("server|origins|limits|bogus"), mutated("port|allowed|max_len"), toml_value())
            .prop_map(|(s, k, v)| Change::Unknown(s, k, v)),
        1 => (any::<prop::sample::Index>(), toml_value()).prop_map(|(i, v)| Change::Flatten(i, v)),
    ]
}

fn apply(table: &mut toml::Table, changes: &[Change]) {
    let keys = known();
    for change in changes {
        match change {
            Change::Set(i, value) => {
                let (section, key) = &keys[i.index(keys.len())];
                if let Some(toml::Value::Table(t)) = table.get_mut(section) {
                    t.insert(key.clone(), value.clone());
                }
            }
            Change::Remove(i) => {
                let (section, key) = &keys[i.index(keys.len())];
                if let Some(toml::Value::Table(t)) = table.get_mut(section) {
                    t.remove(key);
                }
            }
            Change::Unknown(section, key, value) => {
                let entry = table
                    .entry(section.clone())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                if let toml::Value::Table(t) = entry {
                    t.insert(key.clone(), value.clone());
                }
            }
            Change::Flatten(i, value) => {
                let (section, _) = &keys[i.index(keys.len())];
                table.insert(section.clone(), value.clone());
            }
        }
    }
}

/// Environment variables the loader reads, with values of any shape.
fn env() -> impl Strategy<Value = Vec<(String, String)>> {
    let keys = known();
    let name = prop_oneof![
        4 => prop::sample::select(keys).prop_map(|(s, k)| {
            format!("SWITCHBOARD__{}__{}", s.to_uppercase(), k.to_uppercase())
        }),
        2 => prop::sample::select(vec![
            "PORT", "BIND", "REDIS_URL", "FRONTEND_URL", "ALLOWED_ORIGINS", "SWITCHBOARD_ENV",
            "SWITCHBOARD__", "SWITCHBOARD__LIMITS", "SWITCHBOARD__X__Y__Z",
        ])
        .prop_map(String::from),
        1 => mutated("SWITCHBOARD__[A-Z]{1,8}__[A-Z_]{1,8}"),
    ];
    let value = prop_oneof![
        text_value(),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        Just("18446744073709551615".to_string()),
        Just("a,b,,c".to_string()),
    ];
    prop::collection::vec((name, value), 0..4)
}

/// What every loaded configuration promises the rest of the hub.
fn check_invariants(loaded: &Loaded) -> Result<(), TestCaseError> {
    let s = &loaded.settings;
    prop_assert!(s.heartbeat.interval_ms > 0);
    prop_assert!(s.heartbeat.timeout_ms > s.heartbeat.interval_ms);
    prop_assert!(s.auth.session_ttl_s >= 1);
    prop_assert!(s.limits.max_frame_bytes >= 256);
    prop_assert!(u128::from(s.limits.cap_lease_s) * 1000 > u128::from(s.heartbeat.interval_ms));
    // Bounded so that run-time sums cannot overflow.
    let year_s = 365 * 86_400;
    for secs in [
        s.auth.session_ttl_s,
        s.limits.cap_lease_s,
        s.history.ttl_s,
        s.shutdown.drain_timeout_s,
    ] {
        prop_assert!(secs <= year_s);
    }
    for ms in [
        s.heartbeat.interval_ms,
        s.heartbeat.timeout_ms,
        s.shutdown.reconnect_spread_ms,
    ] {
        prop_assert!(ms <= year_s * 1000);
    }
    prop_assert!(s.limits.outbound_queue <= 1 << 20);
    prop_assert!(s.history.max_len >= 1 && s.history.ttl_s >= 1);
    prop_assert!(s.shutdown.drain_timeout_s >= 1);
    prop_assert_eq!(
        loaded.compiled.client_publish.len(),
        s.auth.client_publish.len()
    );
    prop_assert_eq!(
        loaded.compiled.trusted_proxies.len(),
        s.server.trusted_proxies.len()
    );
    // The redacted dump is TOML that reads back, and shows no secret.
    let dump = s.redacted_toml();
    prop_assert!(toml::from_str::<toml::Table>(&dump).is_ok(), "{}", dump);
    if let Some(secret) = s.auth.jwt_secret.as_deref() {
        prop_assert!(!dump.contains(&format!("{secret:?}")), "{}", dump);
    }
    Ok(())
}

fn check_errors(errors: &ConfigErrors) -> Result<(), TestCaseError> {
    prop_assert!(!errors.0.is_empty());
    for line in errors.to_string().lines() {
        prop_assert!(
            line.starts_with("config error: "),
            "{:?} in {}",
            line,
            errors
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(96))]

    /// The shipped config, changed key by key, with environment on top.
    #[test]
    fn fuzz_load_changed_config(
        changes in prop::collection::vec(change(), 0..6),
        env in env(),
    ) {
        let mut table = shipped();
        apply(&mut table, &changes);
        let dir = tempfile::tempdir().expect("a temp dir");
        let text = toml::to_string(&table).expect("TOML");
        std::fs::write(dir.path().join("default.toml"), &text).expect("write");
        std::fs::write(dir.path().join("production.toml"), "").expect("write");
        match Settings::load_from(dir.path(), &env) {
            Ok(loaded) => check_invariants(&loaded)?,
            Err(errors) => check_errors(&errors)?,
        }
    }

    /// Text that is hardly TOML at all.
    #[test]
    fn fuzz_load_garbled_text(text in prop_oneof![
        mutated(Just(toml::to_string(&shipped()).expect("TOML"))),
        garbage(200),
    ]) {
        let dir = tempfile::tempdir().expect("a temp dir");
        std::fs::write(dir.path().join("default.toml"), &text).expect("write");
        match Settings::load_from(dir.path(), &[]) {
            Ok(loaded) => check_invariants(&loaded)?,
            Err(errors) => check_errors(&errors)?,
        }
    }

    /// Every number the settings hold, at any size: validation answers, never overflows.
    #[test]
    fn fuzz_validate_numbers(
        numbers in prop::collection::vec(prop_oneof![any::<u64>(), 0..3u64, Just(u64::MAX)], 16),
        production in any::<bool>(),
    ) {
        let mut s = Settings::default();
        let n = |i: usize| numbers[i];
        s.server.port = n(0) as u16;
        s.auth.session_ttl_s = n(1);
        s.heartbeat.interval_ms = n(2);
        s.heartbeat.timeout_ms = n(3);
        s.limits.max_connections_per_user = n(4) as u32;
        s.limits.cap_lease_s = n(5);
        s.limits.max_frame_bytes = n(6) as usize;
        s.limits.max_subscriptions = n(7) as usize;
        s.limits.client_msgs_per_s = n(8) as u32;
        s.limits.client_msgs_burst = n(9) as u32;
        s.limits.outbound_queue = n(10) as usize;
        s.limits.handshakes_per_ip_per_s = n(11) as u32;
        s.limits.handshake_burst = n(12) as u32;
        s.history.max_len = n(13) as usize;
        s.history.ttl_s = n(14);
        s.shutdown.drain_timeout_s = n(15);
        if production {
            s.server.profile = "production".into();
        }
        let _ = s.validate(&mut Vec::new());
    }

    /// The redacted URL never shows the password, and any text is handled.
    #[test]
    fn fuzz_redact_url(user in "[a-z]{0,6}", password in "[A-Za-z0-9!$%]{4,12}", rest in garbage(20)) {
        let url = format!("redis://{user}:{password}@host:6379/0");
        let redacted = redact_url(&url);
        prop_assert!(!redacted.contains(&format!(":{password}@")), "{}", redacted);
        let _ = redact_url(&rest);
    }

    #[test]
    fn fuzz_cookie_keys(raw in prop_oneof![mutated("[A-Za-z0-9+/]{86}=="), garbage(100)]) {
        if let Ok(bytes) = decode_cookie_key(&raw) {
            prop_assert!(bytes.len() >= 64);
        }
    }
}

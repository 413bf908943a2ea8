//! Fuzz target of the origin parser, the matcher and the `[origins]` validator: near-valid
//! origins (every scheme, separator, host, port and tail a browser or an operator might
//! write, then mutated) against properties of the policy rather than examples of it.

use proptest::prelude::*;

use super::*;
use crate::core::fuzzing::{config, garbage, mutated};

fn scheme() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "https", "https", "http", "HTTPS", "HtTp", "ws", "wss", "ftp", "", "h*ttps", "null",
    ])
    .prop_map(String::from)
}

fn label() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "example", "com", "evil", "evil-example", "example-com", "www", "app", "Example",
            "COM", "net", "xn--bcher-kva", "localhost", "127", "0", "1", "255", "256", "*", "_x",
            "-a", "a-", "",
        ])
        .prop_map(String::from),
        2 => "[a-z0-9-]{1,10}",
        1 => "[a-z]{60,66}",
    ]
}

fn host() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::collection::vec(label(), 1..5).prop_map(|labels| labels.join(".")),
        1 => prop::sample::select(vec![
            "[::1]", "[0:0:0:0:0:0:0:1]", "[::2]", "[::ffff:127.0.0.1]", "[fe80::1%25eth0]",
            "[::1", "::1", "[]", "[:::]", "[2001:DB8::1]", "127.0.0.1", "127.1", "0x7f.0.0.1",
            "127.0.0.01", "localhost.", "LOCALHOST", "user@example.com", "example.com:80@evil.net",
        ])
        .prop_map(String::from),
        1 => (0..300u16, 0..300u16, 0..300u16, 0..300u16)
            .prop_map(|(a, b, c, d)| format!("{a}.{b}.{c}.{d}")),
    ]
}

fn port() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => Just(String::new()),
        2 => prop::sample::select(vec![
            ":80", ":443", ":8080", ":0", ":65535", ":65536", ":99999", ":", ":08080", ":*", ":-1",
            ":3000",
        ])
        .prop_map(String::from),
        1 => any::<u16>().prop_map(|p| format!(":{p}")),
    ]
}

fn tail() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => Just(String::new()),
        1 => prop::sample::select(vec!["/", "/path", "?q=1", "#f", "/x?y#z", "//"])
            .prop_map(String::from),
    ]
}

/// A value shaped like an origin, then perhaps edited: what headers and entries look like.
fn origin_like() -> impl Strategy<Value = String> {
    let separator = prop::sample::select(vec!["://", "://", "://", "://", ":/", ":///", "//"]);
    let shaped = (scheme(), separator, host(), port(), tail())
        .prop_map(|(s, sep, h, p, t)| format!("{s}{sep}{h}{p}{t}"));
    prop_oneof![8 => mutated(shaped), 1 => garbage(80), 1 => Just("null".to_string())]
}

/// The normalised origin a header reads as, if it reads as one with nothing after it.
fn normalised(header: &str) -> Option<Origin> {
    let parts = read_parts(header).ok()?;
    if !parts.rest.is_empty() {
        return None;
    }
    Origin::from_parts(&parts)
}

fn policy(allowed: &[&str], allow_localhost: bool, legacy: &[(&str, &str)]) -> OriginPolicy {
    OriginPolicy::from_config(&super::tests::config(
        allowed,
        allow_localhost,
        false,
        legacy,
    ))
    .expect("valid config")
}

fn today() -> Day {
    Day::parse("2026-03-01").expect("a date")
}

fn admits(policy: &OriginPolicy, header: &str) -> bool {
    policy.check(Some(header), today()).is_allowed()
}

proptest! {
    #![proptest_config(config(256))]

    /// Reading an origin twice changes nothing: the normalised form reads as itself.
    #[test]
    fn fuzz_normalisation_is_idempotent(header in origin_like()) {
        if let Some(origin) = normalised(&header) {
            let text = origin.as_str();
            prop_assert!(!text.bytes().any(|b| b.is_ascii_uppercase()), "{}", text);
            let again = normalised(text);
            prop_assert_eq!(again.as_ref().map(Origin::as_str), Some(text), "{}", header);
            let default = format!(":{}", origin.scheme.default_port());
            prop_assert!(!text.ends_with(&default), "{}", text);
        }
    }

    /// A wildcard admits exactly the subdomains of its suffix, on its scheme and port: never
    /// the apex, `evil-example.com` or `example.com.evil.net`.
    #[test]
    fn fuzz_wildcard_admits_only_subdomains(header in origin_like()) {
        let policy = policy(&["https://*.example.com"], false, &[]);
        let expected = normalised(&header).is_some_and(|o| {
            let text = o.as_str();
            text.strip_prefix("https://")
                .and_then(|host| host.strip_suffix(".example.com"))
                .is_some_and(|labels| !labels.is_empty())
        });
        prop_assert_eq!(admits(&policy, &header), expected, "{}", header);
    }

    /// Exact entries admit their own origin in any case and with or without the default
    /// port, and nothing else; localhost admits its three hosts on any port.
    #[test]
    fn fuzz_exact_and_localhost(header in origin_like()) {
        let exact = policy(&["https://app.example.com", "http://LOCALHOST:3000"], false, &[]);
        let origin = normalised(&header);
        let expected = origin.as_ref().is_some_and(|o| {
            ["https://app.example.com", "http://localhost:3000"].contains(&o.as_str())
        });
        prop_assert_eq!(admits(&exact, &header), expected, "{}", header);

        let local = policy(&[], true, &[]);
        let expected = origin
            .as_ref()
            .is_some_and(|o| ["localhost", "127.0.0.1", "[::1]"].contains(&o.host()));
        prop_assert_eq!(admits(&local, &header), expected, "{}", header);
    }

    /// ASCII case never changes a decision (but the literal `null` is case-sensitive, as
    /// browsers send it).
    #[test]
    fn fuzz_case_never_matters(header in origin_like()) {
        if header.eq_ignore_ascii_case("null") {
            return Ok(());
        }
        let policy = policy(
            &["https://*.example.com", "http://app.example.com:8080", "null"],
            true,
            &[("https://old.example.net", "2026-03-01")],
        );
        let decision = admits(&policy, &header);
        prop_assert_eq!(admits(&policy, &header.to_ascii_uppercase()), decision, "{}", header);
        prop_assert_eq!(admits(&policy, &header.to_ascii_lowercase()), decision, "{}", header);
    }

    /// A legacy entry admits through its last day and never after.
    #[test]
    fn fuzz_legacy_until_inclusive(header in origin_like(), offset in -3i64..3) {
        let policy = policy(&[], false, &[("https://*.old.example.net", "2026-03-01")]);
        let day = Day(today().0 + offset);
        let covered = normalised(&header).is_some_and(|o| {
            o.as_str()
                .strip_prefix("https://")
                .and_then(|h| h.strip_suffix(".old.example.net"))
                .is_some_and(|l| !l.is_empty())
        });
        let decision = policy.check(Some(&header), day);
        prop_assert_eq!(decision.is_allowed(), covered && offset <= 0, "{}", header);
        if decision.is_allowed() {
            let is_legacy = matches!(decision, Decision::AllowedLegacy { .. });
            prop_assert!(is_legacy, "{:?}", decision);
        }
    }

    /// Whatever the header, a refusal is a Denied echoing it and the explanation stays short.
    #[test]
    fn fuzz_refusals_explain_briefly(header in prop_oneof![origin_like(), garbage(400)]) {
        let policy = policy(
            &["https://*.example.com", "https://www.example.org", "http://127.0.0.1:8080"],
            false,
            &[("https://old.example.net", "2020-01-01")],
        );
        match policy.check(Some(&header), today()) {
            Decision::Denied { origin, hint, .. } => {
                prop_assert_eq!(&origin, &header);
                prop_assert!(hint.is_none_or(|h| h.len() < 1000));
            }
            allowed => prop_assert!(normalised(&header).is_some(), "{:?}", allowed),
        }
        let explanation = policy.explain(&header, today());
        prop_assert!(explanation.len() < 3000, "{} bytes", explanation.len());
    }

    /// Any config: every problem is one line naming its entry, a suggested fix is itself a
    /// valid entry, and a valid config admits every entry it lists.
    #[test]
    fn fuzz_config_entries(
        allowed in prop::collection::vec(origin_like(), 0..4),
        legacy in prop::collection::vec((origin_like(), mutated("20[0-9]{2}-[01][0-9]-[0-3][0-9]")), 0..3),
    ) {
        let cfg = OriginsConfig {
            allowed: allowed.clone(),
            allow_localhost: false,
            allow_missing: false,
            legacy: legacy
                .iter()
                .map(|(origin, until)| LegacyOrigin { origin: origin.clone(), until: until.clone() })
                .collect(),
        };
        match OriginPolicy::from_config(&cfg) {
            Ok(policy) => {
                for entry in allowed.iter().filter(|e| !e.eq_ignore_ascii_case("null")) {
                    let probe = entry.replacen("*.", "sub.", 1);
                    prop_assert!(admits(&policy, &probe), "{} not admitted by its own entry", probe);
                }
            }
            Err(errors) => {
                prop_assert!(!errors.is_empty());
                for error in &errors {
                    prop_assert!(
                        error.starts_with("origins.allowed entry \"")
                            || error.starts_with("origins.legacy entry \""),
                        "{}", error
                    );
                    prop_assert!(!error.contains('\n'), "{}", error);
                }
            }
        }
        for entry in allowed.iter().chain(legacy.iter().map(|(o, _)| o)) {
            if let Err(problem) = read_entry(entry) {
                if let Some(fix) = &problem.suggestion {
                    prop_assert!(read_entry(fix).is_ok(), "{} suggested for {}", fix, entry);
                }
            }
        }
    }

    /// Dates: only real `YYYY-MM-DD` days parse, and every day prints and reads back.
    #[test]
    fn fuzz_days(text in mutated("[0-9]{4}-[0-9]{2}-[0-9]{2}"), n in any::<i64>(), secs in any::<i64>()) {
        if let Some(day) = Day::parse(&text) {
            prop_assert_eq!(day.to_string(), text);
        }
        let day = Day(n);
        if let Some(back) = Day::parse(&day.to_string()) {
            prop_assert_eq!(back, day);
        }
        let _ = Day::from_unix_seconds(secs).to_string();
    }
}

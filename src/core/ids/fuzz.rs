//! Fuzz targets of the id parsers: topics, orgs, users, channel keys, event ids, connection
//! ids and `auth.client_publish` patterns, each against a reference written from the grammar.

use proptest::prelude::*;

use super::*;
use crate::core::fuzzing::{config, garbage, mutated};

/// `[a-z0-9][a-z0-9:._-]{0,127}`, as SPEC words it.
fn is_topic(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ":._-".contains(c))
        && s.chars().count() <= 128
}

fn is_org(s: &str) -> bool {
    (1..=64).contains(&s.chars().count())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// Glob match where `*` is one or more characters other than `:`: a table over (pattern,
/// topic) positions, unlike the parser's split into literals.
fn glob(pattern: &str, topic: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), topic.chars().collect());
    // m[i][j]: pattern from i matches topic from j.
    let mut m = vec![vec![false; t.len() + 1]; p.len() + 1];
    m[p.len()][t.len()] = true;
    for i in (0..p.len()).rev() {
        for j in (0..t.len()).rev() {
            m[i][j] = if p[i] == '*' {
                t[j] != ':' && (m[i + 1][j + 1] || m[i][j + 1])
            } else {
                p[i] == t[j] && m[i + 1][j + 1]
            };
        }
    }
    m[0][0]
}

fn topic_like() -> impl Strategy<Value = String> {
    mutated("[a-z0-9][a-z0-9:._-]{0,20}|[a-z]{120,130}")
}

fn pattern_like() -> impl Strategy<Value = String> {
    mutated("[a-c0-9][a-c:*-]{0,12}")
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn fuzz_topic_grammar(raw in prop_oneof![topic_like(), garbage(140)]) {
        match Topic::parse(&raw) {
            Ok(topic) => {
                prop_assert!(is_topic(&raw), "accepted {raw:?}");
                prop_assert_eq!(topic.as_str(), raw.as_str());
            }
            Err(e) => {
                prop_assert!(!is_topic(&raw), "refused {raw:?}");
                prop_assert!(e.to_string().len() < 400, "the error echoes too much");
            }
        }
    }

    /// A channel key splits back into the org and topic it was made of, and a channel name
    /// from Redis parses only when it is exactly such a key.
    #[test]
    fn fuzz_channel_keys(
        org in mutated("[A-Za-z0-9_.-]{1,64}"),
        topic in topic_like(),
        raw in mutated("sb:[a-z0-9]{1,3}:[a-z:]{1,6}"),
    ) {
        prop_assert_eq!(OrgId::parse(&org).is_ok(), is_org(&org), "org {:?}", org);
        if let (Ok(o), Ok(t)) = (OrgId::parse(&org), Topic::parse(&topic)) {
            let key = ChannelKey::new(&o, &t);
            prop_assert_eq!(key.topic(), t.as_str());
            prop_assert_eq!(ChannelKey::parse(key.as_str()), Some((o, t)));
        }
        if let Some((o, t)) = ChannelKey::parse(&raw) {
            let key = ChannelKey::new(&o, &t);
            prop_assert_eq!(key.as_str(), raw.as_str());
        }
    }

    #[test]
    fn fuzz_user_ids(raw in prop_oneof![mutated(".{1,130}"), garbage(140)]) {
        let expected = (1..=128).contains(&raw.chars().count())
            && !raw.chars().any(char::is_control);
        prop_assert_eq!(UserId::parse(&raw).is_ok(), expected, "{:?}", raw);
    }

    /// Event ids survive their text form, text never panics the parser, and the next id is
    /// always later, whatever id came before (a publisher may hand Redis any id).
    #[test]
    fn fuzz_event_ids(
        ms in prop_oneof![any::<u64>(), Just(u64::MAX), 0..3u64],
        seq in prop_oneof![any::<u64>(), Just(u64::MAX), 0..3u64],
        now in any::<u64>(),
        raw in prop_oneof![mutated("[0-9]{1,20}-[0-9]{1,20}"), garbage(50)],
    ) {
        let id = EventId { ms, seq };
        prop_assert_eq!(EventId::parse(&id.to_string()), Some(id));
        if let Some(parsed) = EventId::parse(&raw) {
            prop_assert_eq!(EventId::parse(&parsed.to_string()), Some(parsed));
        }
        let next = EventId::next_after(id, now);
        prop_assert!(next > id || id == EventId { ms: u64::MAX, seq: u64::MAX }, "{next} after {id}");
        prop_assert!(next.ms >= now);
    }

    #[test]
    fn fuzz_conn_ids(n in any::<u64>(), raw in mutated("[0-9a-f]{8}-[0-9]{1,20}")) {
        let id = ConnId(n);
        prop_assert_eq!(ConnId::parse_local(&id.to_string()), Some(id));
        if let Some(parsed) = ConnId::parse_local(&raw) {
            prop_assert_eq!(ConnId::parse_local(&parsed.to_string()), Some(parsed));
        }
    }

    /// A pattern matches exactly the topics the glob reading of SPEC says it does.
    #[test]
    fn fuzz_topic_patterns(pattern in pattern_like(), topic in mutated("[a-c0-9][a-c:-]{0,14}")) {
        let Ok(parsed) = TopicPattern::parse(&pattern) else {
            prop_assert!(!is_topic(&pattern.replace('*', "x")), "refused {pattern:?}");
            return Ok(());
        };
        prop_assert!(is_topic(&pattern.replace('*', "x")), "accepted {pattern:?}");
        if let Ok(t) = Topic::parse(&topic) {
            prop_assert_eq!(parsed.matches(&t), glob(&pattern, &topic), "{} vs {}", pattern, topic);
        }
        // The pattern with each `*` filled by a segment always matches.
        let filled = pattern.replace('*', "seg");
        if let Ok(t) = Topic::parse(&filled) {
            prop_assert!(parsed.matches(&t), "{pattern} vs {filled}");
        }
    }
}

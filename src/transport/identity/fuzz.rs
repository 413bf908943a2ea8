//! Fuzz target of the session cookie reader: a cookie sealed as the session middleware seals
//! it reads back as its session key; any change to it, another key or another cookie name is
//! refused; any `Cookie` header at all is read without panicking; and a session's state gives
//! an identity only when every field is there and valid.

use std::collections::HashMap;

use actix_session::storage::{CookieSessionStore, SessionStore};
use base64::Engine;
use futures_util::FutureExt;
use proptest::prelude::*;

use super::*;
use crate::core::fuzzing::{config, garbage, mutated};
use crate::store::sessions::Sessions;

const NAME: &str = "sb_session";

fn key(seed: u8) -> Key {
    Key::from(&[seed; 64])
}

/// The cookie value the middleware would set: `value` sealed (encrypted and authenticated)
/// under `key` for cookie `name`, as the browser sends it back (`name=value`, encoded).
fn sealed(name: &str, value: &str, key: &Key) -> String {
    let mut jar = CookieJar::new();
    jar.private_mut(key)
        .add(Cookie::new(name.to_string(), value.to_string()));
    let cookie = jar.delta().next().expect("the added cookie").clone();
    cookie.value().to_string()
}

fn header(name: &str, sealed_value: &str) -> String {
    Cookie::new(name.to_string(), sealed_value.to_string())
        .encoded()
        .to_string()
}

fn read(headers: &[String], key: &Key) -> Result<Option<SessionKey>, SessionReadError> {
    session_key(headers.iter().map(|h| h.as_bytes()), NAME, key)
}

/// One change to the sealed bytes.
#[derive(Debug, Clone)]
enum Tamper {
    Flip(prop::sample::Index, u8),
    Drop(prop::sample::Index),
    Insert(prop::sample::Index, u8),
    Cut(prop::sample::Index),
}

fn tamper() -> impl Strategy<Value = Tamper> {
    prop_oneof![
        (any::<prop::sample::Index>(), 1..=255u8).prop_map(|(i, b)| Tamper::Flip(i, b)),
        any::<prop::sample::Index>().prop_map(Tamper::Drop),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Tamper::Insert(i, b)),
        any::<prop::sample::Index>().prop_map(Tamper::Cut),
    ]
}

fn session_value() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::collection::hash_map(garbage(8), garbage(16), 0..5)
            .prop_map(|m| serde_json::to_string(&m).expect("JSON")),
        garbage(200).prop_filter("a session key is not empty", |s| !s.is_empty()),
    ]
}

proptest! {
    #![proptest_config(config(256))]

    /// A sealed cookie reads back as what was sealed, among other cookies; a changed one,
    /// one sealed under another key, or moved to another name never does.
    #[test]
    fn fuzz_tampered_cookies_are_refused(
        value in session_value(),
        tampers in prop::collection::vec(tamper(), 1..4),
        others in prop::collection::vec("[a-z]{1,5}=[a-z0-9%]{0,8}", 0..3),
    ) {
        let good = sealed(NAME, &value, &key(1));
        let mut cookies = others.clone();
        cookies.push(header(NAME, &good));
        let read_back = read(&[cookies.join("; ")], &key(1)).expect("a cookie is there");
        prop_assert_eq!(read_back.as_ref().map(|k| k.as_ref()), Some(value.as_str()));

        let engine = base64::engine::general_purpose::STANDARD;
        let mut bytes = engine.decode(&good).expect("sealed cookies are base64");
        for t in &tampers {
            let n = bytes.len();
            match t {
                Tamper::Flip(i, b) if n > 0 => bytes[i.index(n)] ^= b,
                Tamper::Drop(i) if n > 0 => {
                    bytes.remove(i.index(n));
                }
                Tamper::Insert(i, b) => bytes.insert(i.index(n + 1), *b),
                Tamper::Cut(i) => bytes.truncate(i.index(n + 1)),
                _ => {}
            }
        }
        let tampered = engine.encode(&bytes);
        if tampered != good {
            let read_back = read(&[header(NAME, &tampered)], &key(1));
            let refused = match read_back {
                Ok(None) => true,
                // Cut to nothing: no cookie at all.
                Err(SessionReadError::NoCookie) => tampered.is_empty(),
                _ => false,
            };
            prop_assert!(refused, "tampered cookie read: {:?}", read_back);
        }
        let other_key = read(&[header(NAME, &good)], &key(2));
        prop_assert!(matches!(other_key, Ok(None)), "{:?}", other_key);
        let moved = sealed("other", &value, &key(1));
        let renamed = read(&[header(NAME, &moved)], &key(1));
        prop_assert!(matches!(renamed, Ok(None)), "{:?}", renamed);
    }

    /// Any `Cookie` headers at all: no cookie, or one that does not decrypt.
    #[test]
    fn fuzz_any_cookie_header(headers in prop::collection::vec(prop_oneof![
        garbage(120),
        mutated(Just(format!("a=b; {NAME}=abc%2F+def==; c=d"))),
        prop::collection::vec(any::<u8>(), 0..80)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ], 0..3)) {
        match read(&headers, &key(1)) {
            Err(SessionReadError::NoCookie) | Ok(None) => {}
            other => prop_assert!(false, "{:?} from {:?}", other, headers),
        }
    }

    /// The cookie store reads any session key without panicking: a state it wrote comes
    /// back whole, and anything else is an empty state.
    #[test]
    fn fuzz_cookie_store_state(
        state in prop::collection::hash_map(garbage(8), garbage(16), 0..5),
        raw in prop_oneof![garbage(200), mutated(Just(r#"{"user":"\"u1\"","exp":"1"}"#.to_string()))],
    ) {
        let text = serde_json::to_string(&state).expect("JSON");
        if let Ok(key) = SessionKey::try_from(text) {
            let loaded = Sessions::Cookie.load(&key).now_or_never().expect("no I/O");
            prop_assert_eq!(loaded.expect("readable"), Some(state));
        }
        if let Ok(key) = SessionKey::try_from(raw) {
            let loaded = Sessions::Cookie.load(&key).now_or_never().expect("no I/O");
            prop_assert!(loaded.is_ok());
            let direct = CookieSessionStore::default().load(&key).now_or_never().expect("no I/O");
            prop_assert!(direct.is_ok() || loaded.is_ok_and(|s| s.is_none_or(|s| s.is_empty())));
        }
    }

    /// A state gives an identity only with every field present and valid and `exp` ahead;
    /// `logged_out` always wins.
    #[test]
    fn fuzz_session_state(
        user in prop_oneof![mutated("u[a-z0-9]{0,8}"), garbage(10)],
        org in prop_oneof![mutated("[0-9]{1,4}"), garbage(10)],
        sid in garbage(10),
        exp in prop_oneof![any::<u64>(), Just(u64::MAX)],
        now in 0..u64::MAX,
        raw_fields in prop::collection::vec((0..5usize, prop_oneof![
            garbage(10), Just("true".to_string()), Just("1e3".to_string()), Just("-1".to_string()),
        ]), 0..3),
    ) {
        let mut state: SessionState = HashMap::new();
        state.insert(KEY_USER.into(), serde_json::to_string(&user).expect("JSON"));
        state.insert(KEY_ORG.into(), serde_json::to_string(&org).expect("JSON"));
        state.insert(KEY_SID.into(), serde_json::to_string(&sid).expect("JSON"));
        state.insert(KEY_EXP.into(), exp.to_string());
        let valid = UserId::parse(&user).is_ok() && OrgId::parse(&org).is_ok();
        match read_identity(&state, now) {
            Ok(identity) => {
                prop_assert!(valid && exp > now);
                prop_assert_eq!(identity.user.as_str(), user.as_str());
                prop_assert_eq!(identity.org.as_str(), org.as_str());
                prop_assert_eq!((identity.sid.as_str(), identity.exp), (sid.as_str(), exp));
            }
            Err(AuthFailure::Expired) => prop_assert!(valid && exp <= now),
            Err(AuthFailure::Invalid) => prop_assert!(!valid),
            Err(other) => prop_assert!(false, "{:?}", other),
        }
        // Fields overwritten with raw text: never a panic, and logged out beats the rest.
        let keys = [KEY_USER, KEY_ORG, KEY_SID, KEY_EXP, KEY_LOGGED_OUT];
        for (i, text) in raw_fields {
            state.insert(keys[i].into(), text);
        }
        let result = read_identity(&state, now);
        if state.get(KEY_LOGGED_OUT).map(String::as_str) == Some("true") {
            prop_assert!(matches!(result, Err(AuthFailure::LoggedOut)), "{:?}", result);
        }
    }
}

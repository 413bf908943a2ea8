//! Fuzz target of the token exchange's reader: a token signed with the secret gives exactly
//! its claims' user and org when they are valid ids; any change to the token, another secret
//! or another algorithm is refused; any text at all is refused without panicking.

use base64::Engine;
use hmac::{Hmac, Mac};
use jsonwebtoken::Algorithm;
use proptest::prelude::*;
use serde_json::{json, Value};

use super::*;
use crate::core::fuzzing::{apply, config, edits, garbage, mutated};

const SECRET: &str = "s3cret-s3cret-s3cret-s3cret-s3cret";

fn rules(secret: &str) -> TokenRules<'_> {
    TokenRules {
        secret,
        issuer: None,
        audience: None,
    }
}

fn signed(claims: &Value, algorithm: Algorithm, secret: &str) -> String {
    // By hand: the hub's crypto provider signs HS256 only, and other algorithms' tokens are
    // what some of these properties need.
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = json!({"alg": format!("{algorithm:?}"), "typ": "JWT"});
    let message = format!(
        "{}.{}",
        engine.encode(header.to_string()),
        engine.encode(claims.to_string())
    );
    fn mac<M: Mac + hmac::digest::KeyInit>(secret: &str, message: &str) -> Vec<u8> {
        let mut mac = <M as hmac::digest::KeyInit>::new_from_slice(secret.as_bytes())
            .expect("HMAC takes any key");
        mac.update(message.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }
    let signature = match algorithm {
        Algorithm::HS384 => mac::<Hmac<sha2::Sha384>>(secret, &message),
        Algorithm::HS512 => mac::<Hmac<sha2::Sha512>>(secret, &message),
        _ => mac::<Hmac<sha2::Sha256>>(secret, &message),
    };
    format!("{message}.{}", engine.encode(signature))
}

/// A claim value: ids as identity providers send them, and values of the wrong shape.
fn claim() -> impl Strategy<Value = Option<Value>> {
    prop::option::weighted(
        0.9,
        prop_oneof![
            4 => mutated("[a-z0-9]{1,10}").prop_map(Value::from),
            2 => any::<u64>().prop_map(Value::from),
            1 => any::<i64>().prop_map(Value::from),
            1 => any::<f64>().prop_map(Value::from),
            1 => garbage(140).prop_map(Value::from),
            1 => Just(json!({"id": 1})),
            1 => Just(Value::Null),
            1 => Just(json!(["u1"])),
        ],
    )
}

fn exp() -> impl Strategy<Value = Value> {
    let now = now_s() as i64;
    prop_oneof![
        4 => (now + 60..now + 100_000).prop_map(Value::from),
        1 => (now - 100_000..now - 10).prop_map(Value::from),
        1 => Just(Value::from(u64::MAX)),
        1 => Just(Value::from(i64::MIN)),
        1 => Just(Value::from(1e300)),
        1 => Just(Value::from((now + 60).to_string())),
        1 => Just(Value::Null),
    ]
}

/// What `claim_text` should make of a claim.
fn as_text(value: &Option<Value>) -> Option<String> {
    match value {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    }
}

proptest! {
    #![proptest_config(config(128))]

    /// A signed token gives its claims' ids exactly when every claim is valid.
    #[test]
    fn fuzz_signed_tokens(sub in claim(), org in claim(), exp in exp()) {
        let mut claims = json!({"exp": exp});
        if let Some(sub) = &sub {
            claims["sub"] = sub.clone();
        }
        if let Some(org) = &org {
            claims["org"] = org.clone();
        }
        let token = signed(&claims, Algorithm::HS256, SECRET);
        let exp_ok = exp.as_u64().is_some_and(|e| e > now_s());
        let user = as_text(&sub).filter(|s| UserId::parse(s).is_ok());
        let org_id = as_text(&org).filter(|s| OrgId::parse(s).is_ok());
        match verify_jwt(&token, &rules(SECRET)) {
            Ok((u, o)) => {
                prop_assert!(exp_ok, "exp {} accepted", exp);
                prop_assert_eq!(Some(u.as_str().to_string()), user);
                prop_assert_eq!(Some(o.as_str().to_string()), org_id);
            }
            Err(_) => prop_assert!(!exp_ok || user.is_none() || org_id.is_none(), "{}", claims),
        }
        // Another secret, another algorithm, no algorithm: refused.
        prop_assert!(verify_jwt(&token, &rules("another-secret-entirely-0123456789")).is_err());
        for algorithm in [Algorithm::HS384, Algorithm::HS512] {
            prop_assert!(verify_jwt(&signed(&claims, algorithm, SECRET), &rules(SECRET)).is_err());
        }
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let unsigned = format!(
            "{}.{}.",
            engine.encode(r#"{"alg":"none","typ":"JWT"}"#),
            engine.encode(claims.to_string())
        );
        prop_assert!(verify_jwt(&unsigned, &rules(SECRET)).is_err());
    }

    /// Any change to a good token is refused.
    #[test]
    fn fuzz_tampered_tokens(sub in "[a-z0-9]{1,10}", edits in edits(1..4)) {
        let claims = json!({"sub": sub, "org": "42", "exp": now_s() + 600});
        let token = signed(&claims, Algorithm::HS256, SECRET);
        let tampered = apply(&token, &edits);
        if tampered != token {
            prop_assert!(verify_jwt(&tampered, &rules(SECRET)).is_err(), "{} accepted", tampered);
        }
    }

    #[test]
    fn fuzz_any_token_text(token in prop_oneof![garbage(300), mutated("[A-Za-z0-9_-]{10,40}\\.[A-Za-z0-9_-]{10,40}\\.[A-Za-z0-9_-]{43}")]) {
        prop_assert!(verify_jwt(&token, &rules(SECRET)).is_err());
    }
}

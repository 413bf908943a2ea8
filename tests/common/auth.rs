//! Signing in: `dev_login` (a session cookie from `/auth/dev-login`), reading the session
//! cookie a response sets, `tamper` to break one, and `jwt`/`now_s` to mint the tokens that
//! `/auth/session` verifies.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::http::{post_json, HttpResp};
use super::process::Hub;
use super::COOKIE_NAME;

/// `POST /auth/dev-login` for `user` in `org`; returns the `sb_session=VALUE` pair.
pub async fn dev_login(hub: &Hub, user: &str, org: &str) -> String {
    let resp = post_json(
        hub,
        "/auth/dev-login",
        &[],
        &json!({"user": user, "org": org}),
    )
    .await;
    assert_eq!(resp.status, 204, "dev-login {user}@{org}: {resp}");
    session_cookie(&resp).unwrap_or_else(|| panic!("dev-login set no {COOKIE_NAME} cookie: {resp}"))
}

/// The `name=value` pair of the session cookie a response sets, if any.
pub fn session_cookie(resp: &HttpResp) -> Option<String> {
    resp.headers_all("set-cookie")
        .into_iter()
        .map(|c| c.split(';').next().unwrap_or("").trim().to_string())
        .find(|pair| {
            pair.starts_with(&format!("{COOKIE_NAME}=")) && pair.len() > COOKIE_NAME.len() + 1
        })
}

/// The full `Set-Cookie` header for the session cookie, attributes included.
pub fn session_set_cookie(resp: &HttpResp) -> Option<String> {
    resp.headers_all("set-cookie")
        .into_iter()
        .find(|c| c.starts_with(&format!("{COOKIE_NAME}=")))
}

/// The same cookie with one character in the middle of its value changed.
pub fn tamper(cookie: &str) -> String {
    let (name, value) = cookie.split_once('=').expect("name=value");
    let mut chars: Vec<char> = value.chars().collect();
    let mid = chars.len() / 2;
    let at = (mid..chars.len())
        .chain(0..mid)
        .find(|&i| chars[i].is_ascii_alphanumeric())
        .expect("an alphanumeric character in the cookie value");
    chars[at] = if chars[at] == 'A' { 'B' } else { 'A' };
    format!("{name}={}", chars.into_iter().collect::<String>())
}

pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HS256 JWT over `claims` signed with `secret`. Signed here, by hand: the hub's
/// jsonwebtoken has no crypto backend of its own (the hub installs HS256 in-process only).
pub fn jwt(secret: &str, claims: &Value) -> String {
    use base64::Engine;
    use hmac::Mac;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let signed = format!(
        "{}.{}",
        b64(br#"{"alg":"HS256","typ":"JWT"}"#),
        b64(claims.to_string().as_bytes())
    );
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(signed.as_bytes());
    format!("{signed}.{}", b64(&mac.finalize().into_bytes()))
}

//! Sessions: dev login, the JWT exchange at `POST /auth/session`, and logout closing exactly
//! the logged-out session's sockets (embedded mode: signed and encrypted cookie sessions).

mod common;

use common::*;
use std::time::Duration;

use serde_json::{json, Value};

async fn exchange(hub: &Hub, token: &str) -> HttpResp {
    post_json(hub, "/auth/session", &[], &json!({ "token": token })).await
}

fn claims(sub: &str, org: &str, exp_offset: i64) -> Value {
    json!({"sub": sub, "org": org, "exp": now_s() as i64 + exp_offset})
}

/// Dev login answers 204 and sets an HttpOnly session cookie that opens a socket as that user.
#[actix_web::test]
async fn dev_login_sets_http_only_cookie() {
    let hub = Hub::start(&[]);
    let resp = post_json(
        &hub,
        "/auth/dev-login",
        &[],
        &json!({"user": "u1", "org": "42"}),
    )
    .await;
    assert_eq!(resp.status, 204, "{resp}");
    let set =
        session_set_cookie(&resp).unwrap_or_else(|| panic!("no sb_session Set-Cookie: {resp}"));
    assert!(
        set.to_lowercase().contains("httponly"),
        "cookie is not HttpOnly: {set}"
    );
    assert!(set.contains("Path=/"), "cookie should be Path=/: {set}");
    let cookie = session_cookie(&resp).unwrap();
    let mut ws = ws_open(&hub, Some(ORIGIN), Some(&cookie)).await;
    let welcome = ws.next_json(T).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert_eq!(welcome["user"], "u1");
    assert_eq!(welcome["org"], "42");
}

/// Dev login with an org id containing ':' is 400 naming the org field.
#[actix_web::test]
async fn dev_login_rejects_bad_org() {
    let hub = Hub::start(&[]);
    let resp = post_json(
        &hub,
        "/auth/dev-login",
        &[],
        &json!({"user": "u1", "org": "a:b"}),
    )
    .await;
    assert_eq!(resp.status, 400, "{resp}");
    assert_eq!(resp.json()["field"], "org", "{resp}");
    assert!(
        session_cookie(&resp).is_none(),
        "a refused login must not set a cookie: {resp}"
    );
}

/// Dev login does not exist (404) when `auth.dev_login = false`.
#[actix_web::test]
async fn dev_login_absent_when_disabled() {
    let hub = Hub::start(&[("SWITCHBOARD__AUTH__DEV_LOGIN", "false")]);
    let resp = post_json(
        &hub,
        "/auth/dev-login",
        &[],
        &json!({"user": "u1", "org": "42"}),
    )
    .await;
    assert_eq!(resp.status, 404, "{resp}");
    assert!(session_cookie(&resp).is_none(), "{resp}");
}

/// A valid JWT is exchanged for a cookie (204) whose socket's welcome shows its sub and org.
#[actix_web::test]
async fn jwt_exchange_opens_a_session() {
    let hub = Hub::start(&[]);
    let token = jwt(JWT_SECRET, &claims("alice", "42", 3600));
    let resp = exchange(&hub, &token).await;
    assert_eq!(resp.status, 204, "{resp}");
    let set = session_set_cookie(&resp).unwrap_or_else(|| panic!("no session cookie: {resp}"));
    assert!(set.to_lowercase().contains("httponly"), "{set}");
    let cookie = session_cookie(&resp).unwrap();
    let mut ws = ws_open(&hub, Some(ORIGIN), Some(&cookie)).await;
    let welcome = ws.next_json(T).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert_eq!(
        (welcome["user"].as_str(), welcome["org"].as_str()),
        (Some("alice"), Some("42")),
        "{welcome}"
    );
}

/// Each bad token is 401 `invalid_token` with a reason a developer can act on, and no cookie.
#[actix_web::test]
async fn jwt_exchange_refusals_give_reasons() {
    let hub = Hub::start(&[]);
    let cases: [(&str, String, &str); 5] = [
        (
            "expired",
            jwt(JWT_SECRET, &claims("alice", "42", -3600)),
            "expired",
        ),
        (
            "bad signature",
            jwt("another-secret-0123456789", &claims("alice", "42", 3600)),
            "signature",
        ),
        (
            "missing org",
            jwt(JWT_SECRET, &json!({"sub": "alice", "exp": now_s() + 3600})),
            "org",
        ),
        (
            "missing sub",
            jwt(JWT_SECRET, &json!({"org": "42", "exp": now_s() + 3600})),
            "sub",
        ),
        ("garbage", "not-a-jwt".to_string(), ""),
    ];
    let mut wrong = Vec::new();
    for (what, token, needle) in cases {
        let resp = exchange(&hub, &token).await;
        let body = resp.json_or_null();
        let reason = body["reason"].as_str().unwrap_or("");
        if resp.status != 401
            || body["error"] != "invalid_token"
            || !reason.contains(needle)
            || reason.is_empty()
        {
            wrong.push(format!(
                "{what}: want 401 invalid_token with reason containing {needle:?}, got {resp}"
            ));
        }
        if session_cookie(&resp).is_some() {
            wrong.push(format!(
                "{what}: a refused token set a session cookie: {resp}"
            ));
        }
    }
    assert!(wrong.is_empty(), "JWT refusals:\n{}", wrong.join("\n"));
}

/// Logout closes that session's sockets with 4401 `logged out`, refuses the cookie afterwards,
/// and leaves another user's socket open and receiving.
#[actix_web::test]
async fn logout_closes_only_that_sessions_sockets() {
    let hub = Hub::start(&[]);
    let cookie = dev_login(&hub, "u1", "42").await;
    let mut s1 = ws_open(&hub, Some(ORIGIN), Some(&cookie)).await;
    let mut s2 = ws_open(&hub, Some(ORIGIN), Some(&cookie)).await;
    assert_eq!(s1.next_json(T).await["type"], "welcome");
    assert_eq!(s2.next_json(T).await["type"], "welcome");
    let (mut other, _, _) = connect_user(&hub, "u2", "42").await;
    other.subscribe("calls").await;

    let resp = http(
        &hub,
        "DELETE",
        "/auth/session",
        &[("cookie", &cookie)],
        None,
    )
    .await;
    assert_eq!(resp.status, 204, "{resp}");

    assert_close(
        s1.expect_close(T).await,
        4401,
        "unauthenticated: logged out",
        "first socket of the session",
    );
    assert_close(
        s2.expect_close(T).await,
        4401,
        "unauthenticated: logged out",
        "second socket of the session",
    );

    let mut again = ws_open(&hub, Some(ORIGIN), Some(&cookie)).await;
    assert_close(
        again.expect_only_close(T).await,
        4401,
        "unauthenticated: logged out",
        "the logged-out cookie replayed",
    );

    let id = publish_ok(&hub, "42", "calls", "call.status", json!({"call_id": "c1"})).await;
    let ev = other.next_json(T).await;
    assert_eq!(
        (ev["type"].as_str(), ev["id"].as_str()),
        (Some("event"), Some(id.as_str())),
        "{ev}"
    );

    // Logging out ends a session, not the user: logging in again works.
    let (mut back, _, _) = connect_user(&hub, "u1", "42").await;
    back.assert_alive().await;
}

/// Logout ends one session only: the same user's other session (another login) stays open.
#[actix_web::test]
async fn logout_spares_the_same_users_other_session() {
    let hub = Hub::start(&[]);
    let (mut phone, _, phone_cookie) = connect_user(&hub, "u1", "42").await;
    let (mut laptop, _, _) = connect_user(&hub, "u1", "42").await;
    let resp = http(
        &hub,
        "DELETE",
        "/auth/session",
        &[("cookie", &phone_cookie)],
        None,
    )
    .await;
    assert_eq!(resp.status, 204, "{resp}");
    assert_close(
        phone.expect_close(T).await,
        4401,
        "unauthenticated: logged out",
        "logged-out session",
    );
    laptop.assert_alive().await;
}

/// The browser that logged out still sends its logged-out cookie when it logs in again: the new
/// login gets a working session, as another user, and the old cookie stays logged out.
#[actix_web::test]
async fn login_again_over_a_logged_out_cookie() {
    let hub = Hub::start(&[]);
    let old = dev_login(&hub, "u1", "42").await;
    let resp = http(&hub, "DELETE", "/auth/session", &[("cookie", &old)], None).await;
    assert_eq!(resp.status, 204, "{resp}");
    let logged_out = session_cookie(&resp).unwrap_or_else(|| old.clone());

    let resp = post_json(
        &hub,
        "/auth/dev-login",
        &[("cookie", &logged_out)],
        &json!({"user": "u2", "org": "42"}),
    )
    .await;
    assert_eq!(resp.status, 204, "{resp}");
    let fresh = session_cookie(&resp).expect("the new login sets a cookie");
    let mut ws = ws_open(&hub, Some(ORIGIN), Some(&fresh)).await;
    let welcome = ws.next_json(T).await;
    assert_eq!(
        (welcome["type"].as_str(), welcome["user"].as_str()),
        (Some("welcome"), Some("u2")),
        "{welcome}"
    );
    let mut replayed = ws_open(&hub, Some(ORIGIN), Some(&logged_out)).await;
    assert_close(
        replayed.expect_only_close(T).await,
        4401,
        "unauthenticated: logged out",
        "the cookie the logout answered with",
    );
}

/// DELETE /auth/session without any session is still 204.
#[actix_web::test]
async fn logout_without_session_is_204() {
    let hub = Hub::start(&[]);
    let resp = http(&hub, "DELETE", "/auth/session", &[], None).await;
    assert_eq!(resp.status, 204, "{resp}");
}

/// The session cookie is `SameSite=Lax` by default and gains `Secure` with `auth.cookie_secure`.
#[actix_web::test]
async fn cookie_attributes_follow_config() {
    let hub = Hub::start(&[]);
    let resp = post_json(
        &hub,
        "/auth/dev-login",
        &[],
        &json!({"user": "u1", "org": "42"}),
    )
    .await;
    let set = session_set_cookie(&resp).unwrap_or_else(|| panic!("no cookie: {resp}"));
    assert!(
        set.to_lowercase().contains("samesite=lax"),
        "default SameSite should be Lax: {set}"
    );
    assert!(
        !set.to_lowercase().contains("secure;") && !set.to_lowercase().ends_with("secure"),
        "Secure without cookie_secure: {set}"
    );

    let hub = Hub::start(&[
        ("SWITCHBOARD__AUTH__COOKIE_SECURE", "true"),
        ("SWITCHBOARD__AUTH__COOKIE_SAME_SITE", "strict"),
    ]);
    let resp = post_json(
        &hub,
        "/auth/dev-login",
        &[],
        &json!({"user": "u1", "org": "42"}),
    )
    .await;
    let set = session_set_cookie(&resp).unwrap_or_else(|| panic!("no cookie: {resp}"));
    let lower = set.to_lowercase();
    assert!(
        lower.contains("secure"),
        "cookie_secure = true but no Secure: {set}"
    );
    assert!(
        lower.contains("samesite=strict"),
        "cookie_same_site = strict: {set}"
    );
}

/// A JWT whose org is not a valid org id (`a:b`) opens no session.
#[actix_web::test]
async fn jwt_with_invalid_org_is_refused() {
    let hub = Hub::start(&[]);
    let token = jwt(JWT_SECRET, &claims("alice", "a:b", 3600));
    let resp = exchange(&hub, &token).await;
    assert!(resp.status == 401 || resp.status == 400, "{resp}");
    assert!(session_cookie(&resp).is_none(), "{resp}");
}

/// A socket opened just before its session expires is closed when the session does (within
/// `auth.revocation_check_s`), with 4401 `session expired`, not left open for as long as the
/// client keeps it.
#[actix_web::test]
async fn a_socket_closes_when_its_session_expires() {
    let hub = Hub::start(&[
        ("SWITCHBOARD__AUTH__SESSION_TTL_S", "2"),
        ("SWITCHBOARD__AUTH__REVOCATION_CHECK_S", "1"),
    ]);
    let (mut ws, _, _) = connect_user(&hub, "u1", "42").await;
    assert_close(
        ws.expect_close(Duration::from_secs(5)).await,
        4401,
        "unauthenticated: session expired",
        "a socket whose session ran out",
    );
}

/// An SSE stream ends with its session too: a `close` record with 4401 `session expired`.
#[actix_web::test]
async fn an_sse_stream_ends_when_its_session_expires() {
    let hub = Hub::start(&[
        ("SWITCHBOARD__AUTH__SESSION_TTL_S", "2"),
        ("SWITCHBOARD__AUTH__REVOCATION_CHECK_S", "1"),
    ]);
    let cookie = dev_login(&hub, "u1", "42").await;
    let headers = [("origin", ORIGIN), ("cookie", cookie.as_str())];
    let mut sse = sse_stream(open_sse(&hub, "topic=calls", &headers).await);
    sse.expect_welcome().await;
    let record = sse
        .record_within(Duration::from_secs(5))
        .await
        .expect("the stream should end with a close record when the session expires");
    assert_eq!(record.event.as_deref(), Some("close"), "{record:?}");
    assert_eq!(
        (record.data["code"].as_u64(), record.data["reason"].as_str()),
        (Some(4401), Some("unauthenticated: session expired")),
        "{record:?}"
    );
}

/// Restarting an embedded hub (same cookie key) does not bring back a logged-out session:
/// a cookie copied before its logout is refused after the restart.
#[actix_web::test]
async fn a_logout_survives_a_restart() {
    let mut hub = Hub::start(&[]);
    let cookie = dev_login(&hub, "u1", "42").await;
    let resp = http(
        &hub,
        "DELETE",
        "/auth/session",
        &[("cookie", &cookie)],
        None,
    )
    .await;
    assert_eq!(resp.status, 204, "{resp}");
    hub.sigterm();
    hub.wait_exit(Duration::from_secs(15));

    let hub = Hub::start(&[]);
    let mut copied = ws_open(&hub, Some(ORIGIN), Some(&cookie)).await;
    let (code, reason) = copied.expect_only_close(T).await;
    assert_eq!(code, 4401, "the copied cookie must be refused: {reason}");
}

//! The WebSocket handshake: the welcome frame, origin and session refusals as close frames
//! with readable reasons (or HTTP answers with `reject_before_upgrade`), their metric and log
//! line, and the per-IP handshake rate limit with and without trusted proxies.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

/// The first frame is a welcome with a conn_id, the session's user and org, and the configured heartbeat.
#[actix_web::test]
async fn welcome_frame_describes_the_session() {
    let hub = Hub::start(&[
        ("SWITCHBOARD__HEARTBEAT__INTERVAL_MS", "7000"),
        ("SWITCHBOARD__HEARTBEAT__TIMEOUT_MS", "21000"),
    ]);
    let (a, welcome, cookie) = connect_user(&hub, "u1", "42").await;
    assert!(
        a.last_text.starts_with(r#"{"type":"welcome""#),
        "`type` should come first: {}",
        a.last_text
    );
    let conn_id = welcome["conn_id"].as_str().unwrap_or("");
    assert!(!conn_id.is_empty(), "conn_id: {welcome}");
    assert_eq!(welcome["user"], "u1", "{welcome}");
    assert_eq!(welcome["org"], "42", "{welcome}");
    assert_eq!(welcome["heartbeat_ms"], 7000, "{welcome}");
    let mut b = ws_open(&hub, Some(ORIGIN), Some(&cookie)).await;
    let second = b.next_json(T).await;
    assert_ne!(
        second["conn_id"], welcome["conn_id"],
        "two sockets share a conn_id"
    );
}

/// A foreign origin gets only a 4403 close naming it, is logged at WARN, and the hub keeps serving.
#[actix_web::test]
async fn foreign_origin_is_closed_4403_and_logged() {
    let hub = Hub::start(&[]);
    let cookie = dev_login(&hub, "u1", "42").await;
    let mut ws = ws_open(&hub, Some("https://evil.example"), Some(&cookie)).await;
    assert_close(
        ws.expect_only_close(T).await,
        4403,
        "origin not allowed: https://evil.example",
        "foreign origin",
    );
    let line = hub.wait_for_log(T, |l| {
        l.contains("WARN") && l.contains("https://evil.example")
    });
    assert!(
        line.is_some(),
        "no WARN line naming the refused origin:\n{}",
        hub.logs()
    );
    let (mut ok, _, _) = connect_user(&hub, "u2", "42").await;
    ok.assert_alive().await;
}

/// Look-alike origins (`localhost.evil.com`, `127.0.0.1.evil.com`, `null`, a bogus port) are refused.
#[actix_web::test]
async fn spoofed_localhost_origins_are_refused() {
    let hub = Hub::start(&[]);
    let cookie = dev_login(&hub, "u1", "42").await;
    let mut wrong = Vec::new();
    for origin in [
        "https://localhost.evil.com",
        "http://localhost.evil.com",
        "http://127.0.0.1.evil.com",
        "http://localhost:3000.evil.com",
        "http://evil.com#localhost",
        "null",
    ] {
        let mut ws = match ws_connect(&hub, Some(origin), Some(&cookie)).await {
            Ok(ws) => ws,
            Err(r) => {
                wrong.push(format!(
                    "{origin}: HTTP {} {:?} instead of an upgrade and 4403",
                    r.status, r.body
                ));
                continue;
            }
        };
        match ws.recv(T).await {
            Some(Frame::Close(4403, reason))
                if reason == format!("origin not allowed: {origin}") => {}
            other => wrong.push(format!(
                "{origin}: want close 4403 `origin not allowed: {origin}`, got {other:?}"
            )),
        }
    }
    assert!(wrong.is_empty(), "spoofed origins:\n{}", wrong.join("\n"));
}

/// Every local development origin is admitted with `allow_localhost` (any port, 127.0.0.1, [::1]).
#[actix_web::test]
async fn localhost_variants_are_admitted() {
    let hub = Hub::start(&[]);
    let cookie = dev_login(&hub, "u1", "42").await;
    let mut wrong = Vec::new();
    for origin in [
        "http://localhost:3000",
        "http://localhost:5173",
        "http://127.0.0.1:8080",
        "http://[::1]:3000",
        "http://localhost",
    ] {
        match ws_connect(&hub, Some(origin), Some(&cookie)).await {
            Err(r) => wrong.push(format!("{origin}: refused HTTP {} {:?}", r.status, r.body)),
            Ok(mut ws) => match ws.recv(T).await {
                Some(Frame::Json(v, _)) if v["type"] == "welcome" => ws.close().await,
                other => wrong.push(format!("{origin}: want welcome, got {other:?}")),
            },
        }
    }
    assert!(wrong.is_empty(), "local origins:\n{}", wrong.join("\n"));
}

/// A request without an Origin header is refused with 4403 unless `allow_missing`.
#[actix_web::test]
async fn missing_origin_is_refused_by_default() {
    let hub = Hub::start(&[]);
    let cookie = dev_login(&hub, "u1", "42").await;
    let mut ws = ws_open(&hub, None, Some(&cookie)).await;
    let (code, reason) = ws.expect_only_close(T).await;
    assert_eq!(code, 4403, "reason {reason:?}");
    assert!(
        reason.starts_with("origin not allowed"),
        "reason {reason:?}"
    );
}

/// With `origins.allow_missing = true` a client without Origin (a service) gets its welcome.
#[actix_web::test]
async fn missing_origin_admitted_when_configured() {
    let hub = Hub::start(&[("SWITCHBOARD__ORIGINS__ALLOW_MISSING", "true")]);
    let cookie = dev_login(&hub, "u1", "42").await;
    let mut ws = ws_open(&hub, None, Some(&cookie)).await;
    assert_eq!(ws.next_json(T).await["type"], "welcome");
}

/// The origin is checked before the session: a foreign origin without a cookie is 4403.
#[actix_web::test]
async fn origin_is_checked_before_session() {
    let hub = Hub::start(&[]);
    let mut ws = ws_open(&hub, Some("https://evil.example"), None).await;
    assert_close(
        ws.expect_only_close(T).await,
        4403,
        "origin not allowed: https://evil.example",
        "no cookie, bad origin",
    );
}

/// No session cookie: 4401 `unauthenticated: no session cookie`.
#[actix_web::test]
async fn no_cookie_is_closed_4401() {
    let hub = Hub::start(&[]);
    let mut ws = ws_open(&hub, Some(ORIGIN), None).await;
    assert_close(
        ws.expect_only_close(T).await,
        4401,
        "unauthenticated: no session cookie",
        "no cookie",
    );
}

/// A cookie with a changed character: 4401 `unauthenticated: invalid session`.
#[actix_web::test]
async fn tampered_cookie_is_closed_4401() {
    let hub = Hub::start(&[]);
    let cookie = dev_login(&hub, "u1", "42").await;
    let bad = tamper(&cookie);
    assert_ne!(bad, cookie);
    let mut ws = ws_open(&hub, Some(ORIGIN), Some(&bad)).await;
    assert_close(
        ws.expect_only_close(T).await,
        4401,
        "unauthenticated: invalid session",
        "tampered cookie",
    );
    // A tampered percent escape can decode to bytes that are not text: still "invalid",
    // never "no session cookie".
    let undecodable = format!("{COOKIE_NAME}=%AF%FFabc");
    let mut ws = ws_open(&hub, Some(ORIGIN), Some(&undecodable)).await;
    assert_close(
        ws.expect_only_close(T).await,
        4401,
        "unauthenticated: invalid session",
        "cookie that does not percent-decode",
    );
    let forged = format!("{COOKIE_NAME}=eyJ1c2VyIjoiYWRtaW4iLCJvcmciOiI0MyJ9");
    let mut ws = ws_open(&hub, Some(ORIGIN), Some(&forged)).await;
    assert_close(
        ws.expect_only_close(T).await,
        4401,
        "unauthenticated: invalid session",
        "forged cookie",
    );
}

/// A session past `auth.session_ttl_s`: 4401 `unauthenticated: session expired`.
#[actix_web::test]
async fn expired_session_is_closed_4401() {
    // 2 s, not 1: expiry is in whole seconds, so a 1 s session logged in at x.999 s is
    // already over when its first socket opens at (x+1).001 s.
    let hub = Hub::start(&[("SWITCHBOARD__AUTH__SESSION_TTL_S", "2")]);
    let cookie = dev_login(&hub, "u1", "42").await;
    let mut fresh = ws_open(&hub, Some(ORIGIN), Some(&cookie)).await;
    assert_eq!(
        fresh.next_json(T).await["type"],
        "welcome",
        "the cookie works before it expires"
    );
    fresh.close().await;
    // Waiting on the clock is the scenario itself: the TTL is 2 s, with whole-second expiry.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let mut ws = ws_open(&hub, Some(ORIGIN), Some(&cookie)).await;
    assert_close(
        ws.expect_only_close(T).await,
        4401,
        "unauthenticated: session expired",
        "expired session",
    );
}

/// With `reject_before_upgrade` the same refusals are HTTP 403/401/429 with JSON error bodies.
#[actix_web::test]
async fn reject_before_upgrade_answers_http() {
    let hub = Hub::start(&[
        ("SWITCHBOARD__HANDSHAKE__REJECT_BEFORE_UPGRADE", "true"),
        ("SWITCHBOARD__LIMITS__MAX_CONNECTIONS_PER_USER", "1"),
    ]);
    let cookie = dev_login(&hub, "u1", "42").await;

    let r = ws_connect(&hub, Some("https://evil.example"), Some(&cookie))
        .await
        .err()
        .expect("foreign origin upgraded");
    assert_eq!(r.status, 403, "{r:?}");
    let body = r.json();
    assert_eq!(body["error"], "origin_not_allowed", "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or("")
            .contains("https://evil.example"),
        "{body}"
    );

    let r = ws_connect(&hub, Some(ORIGIN), None)
        .await
        .err()
        .expect("no cookie upgraded");
    assert_eq!(r.status, 401, "{r:?}");
    let body = r.json();
    assert_eq!(body["error"], "unauthenticated", "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or("")
            .contains("no session cookie"),
        "{body}"
    );

    let r = ws_connect(&hub, Some(ORIGIN), Some(&tamper(&cookie)))
        .await
        .err()
        .expect("tampered cookie upgraded");
    assert_eq!(r.status, 401, "{r:?}");
    assert!(
        r.json()["detail"]
            .as_str()
            .unwrap_or("")
            .contains("invalid session"),
        "{r:?}"
    );

    let mut first = ws_open(&hub, Some(ORIGIN), Some(&cookie)).await;
    assert_eq!(first.next_json(T).await["type"], "welcome");
    let r = ws_connect(&hub, Some(ORIGIN), Some(&cookie))
        .await
        .err()
        .expect("socket over the cap upgraded");
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.json()["error"], "connection_limit", "{r:?}");
}

/// Refusals are counted in `switchboard_handshake_rejections_total` by reason.
#[actix_web::test]
async fn rejections_are_counted_by_reason() {
    let hub = Hub::start(&[]);
    let cookie = dev_login(&hub, "u1", "42").await;
    let mut ws = ws_open(&hub, Some("https://evil.example"), Some(&cookie)).await;
    ws.expect_close(T).await;
    let mut ws = ws_open(&hub, Some(ORIGIN), None).await;
    ws.expect_close(T).await;
    let mut ws = ws_open(&hub, Some(ORIGIN), Some(&tamper(&cookie))).await;
    ws.expect_close(T).await;
    let origin = r#"switchboard_handshake_rejections_total{reason="origin_not_allowed"}"#;
    let unauth = r#"switchboard_handshake_rejections_total{reason="unauthenticated"}"#;
    let (v, ok) = wait_metric(&hub, origin, T, |v| v == 1.0).await;
    assert!(ok, "{origin} = {v}, want 1");
    let (v, ok) = wait_metric(&hub, unauth, T, |v| v == 2.0).await;
    assert!(ok, "{unauth} = {v}, want 2");
    let (v, ok) = wait_metric(&hub, "switchboard_connections", T, |v| v == 0.0).await;
    assert!(
        ok,
        "switchboard_connections = {v} after three refused sockets"
    );
}

fn ws_opts_xff(cookie: &str, xff: Option<&str>) -> WsOpts {
    let opts = WsOpts::new(Some(ORIGIN), Some(cookie));
    match xff {
        Some(ip) => opts.header("x-forwarded-for", ip),
        None => opts,
    }
}

/// Opens `n` sockets quickly (distinct users, so no per-user cap gets in the way), each must be welcomed.
async fn burst(hub: &Hub, cookies: &[String], xff: Option<&str>) -> Vec<Ws> {
    let mut open = Vec::new();
    for (i, cookie) in cookies.iter().enumerate() {
        let mut ws = ws_connect_with(hub, ws_opts_xff(cookie, xff))
            .await
            .unwrap_or_else(|r| {
                panic!(
                    "handshake {} of the burst refused: HTTP {} {:?}",
                    i + 1,
                    r.status,
                    r.body
                )
            });
        assert_eq!(ws.next_json(T).await["type"], "welcome");
        open.push(ws);
    }
    open
}

async fn logins(hub: &Hub, n: usize) -> Vec<String> {
    let mut cookies = Vec::new();
    for i in 0..n {
        cookies.push(dev_login(hub, &format!("rl{i}"), "42").await);
    }
    cookies
}

const RATE_LIMITED: [(&str, &str); 2] = [
    ("SWITCHBOARD__LIMITS__HANDSHAKES_PER_IP_PER_S", "1"),
    ("SWITCHBOARD__LIMITS__HANDSHAKE_BURST", "3"),
];

/// Over the per-IP handshake budget (burst 3) the 4th quick handshake gets HTTP 429, counted.
#[actix_web::test]
async fn handshakes_over_the_ip_budget_get_429() {
    let hub = Hub::start(&RATE_LIMITED);
    let cookies = logins(&hub, 4).await;
    let _open = burst(&hub, &cookies[..3], None).await;
    let r = ws_connect(&hub, Some(ORIGIN), Some(&cookies[3]))
        .await
        .err()
        .expect("4th handshake was upgraded");
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.json_or_null()["error"], "rate_limited", "{r:?}");
    let m = metrics(&hub).await;
    let name = r#"switchboard_handshake_rejections_total{reason="rate_limited"}"#;
    assert!(metric_value(&m, name) >= 1.0, "{name} not counted:\n{m}");
}

/// Behind a trusted proxy, each X-Forwarded-For client has its own handshake budget.
#[actix_web::test]
async fn trusted_proxy_forwarded_clients_have_separate_budgets() {
    let mut env = RATE_LIMITED.to_vec();
    env.push(("SWITCHBOARD__SERVER__TRUSTED_PROXIES", "127.0.0.1"));
    let hub = Hub::start(&env);
    let cookies = logins(&hub, 5).await;
    let _open = burst(&hub, &cookies[..3], Some("10.0.0.1")).await;
    let other = ws_connect_with(&hub, ws_opts_xff(&cookies[3], Some("10.0.0.2"))).await;
    match other {
        Ok(mut ws) => assert_eq!(ws.next_json(T).await["type"], "welcome"),
        Err(r) => panic!(
            "a different forwarded client was refused: HTTP {} {:?}",
            r.status, r.body
        ),
    }
    let same = ws_connect_with(&hub, ws_opts_xff(&cookies[4], Some("10.0.0.1"))).await;
    assert_eq!(
        same.err().map(|r| r.status),
        Some(429),
        "the first forwarded client's 4th handshake"
    );
}

/// Without trusted proxies, X-Forwarded-For is ignored: a new value does not buy a new budget.
#[actix_web::test]
async fn forwarded_for_is_ignored_from_untrusted_peers() {
    let hub = Hub::start(&RATE_LIMITED);
    let cookies = logins(&hub, 4).await;
    let _open = burst(&hub, &cookies[..3], Some("10.0.0.1")).await;
    let r = ws_connect_with(&hub, ws_opts_xff(&cookies[3], Some("10.0.0.2"))).await;
    assert_eq!(
        r.err().map(|r| r.status),
        Some(429),
        "a spoofed X-Forwarded-For escaped the limit"
    );
}

/// A refused origin is refused whatever else the request says: welcome never arrives, nothing is delivered.
#[actix_web::test]
async fn refused_socket_receives_nothing() {
    let hub = Hub::start(&[]);
    let cookie = dev_login(&hub, "u1", "42").await;
    let mut ws = ws_open(&hub, Some("https://evil.example"), Some(&cookie)).await;
    // Try to subscribe straight away; the refusal must still be the only thing that comes.
    let _ = ws
        .try_send(tokio_tungstenite::tungstenite::Message::text(
            json!({"type": "subscribe", "topic": "calls"}).to_string(),
        ))
        .await;
    publish_ok(&hub, "42", "calls", "call.status", json!({"call_id": "x"})).await;
    let (code, _) = ws.expect_only_close(T).await;
    assert_eq!(code, 4403);
}

/// The WARN line of an origin refusal names the origin, the user and the nearest allowed entry.
#[actix_web::test]
async fn origin_refusal_log_names_nearest_entry() {
    let hub = Hub::start(&[("SWITCHBOARD__ORIGINS__ALLOWED", "https://app.example.com")]);
    let cookie = dev_login(&hub, "u1", "42").await;
    let mut ws = ws_open(&hub, Some("http://app.example.com"), Some(&cookie)).await;
    assert_eq!(ws.expect_only_close(T).await.0, 4403);
    let line = hub.wait_for_log(T, |l| {
        l.contains("WARN") && l.contains("http://app.example.com")
    });
    let line =
        line.unwrap_or_else(|| panic!("no WARN line for the refused origin:\n{}", hub.logs()));
    assert!(
        line.contains("https://app.example.com"),
        "WARN line lacks the nearest allowed entry: {line}"
    );
}

/// A WebSocket upgrade aimed anywhere but /ws gets a JSON 404, and a broken handshake (here an
/// old Sec-WebSocket-Version or no Sec-WebSocket-Key, and `raw_http`'s own `Connection: close`)
/// a JSON 400 that says what is wrong with it; the hub keeps serving sockets.
#[actix_web::test]
async fn malformed_upgrades_get_http_answers() {
    let hub = Hub::start(&[]);
    let upgrade =
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==";
    let wrong_path = raw_http(
        &hub,
        &format!("GET /socket HTTP/1.1\r\n{upgrade}\r\nSec-WebSocket-Version: 13"),
    )
    .await;
    assert_eq!(wrong_path.status, 404, "{wrong_path}");
    assert_eq!(wrong_path.json()["error"], "not_found", "{wrong_path}");
    // Answered before the App, yet with the headers every answer carries.
    assert_eq!(
        wrong_path.header("x-content-type-options").as_deref(),
        Some("nosniff"),
        "{wrong_path}"
    );
    assert_eq!(
        wrong_path.header("content-security-policy").as_deref(),
        Some("default-src 'none'; frame-ancestors 'none'"),
        "{wrong_path}"
    );

    let old_version = raw_http(
        &hub,
        &format!("GET /ws HTTP/1.1\r\n{upgrade}\r\nSec-WebSocket-Version: 8\r\nOrigin: {ORIGIN}"),
    )
    .await;
    assert_eq!(old_version.status, 400, "{old_version}");
    let body = old_version.json();
    assert_eq!(body["error"], "bad_request", "{old_version}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or("")
            .starts_with("bad handshake: "),
        "the answer should say what is wrong with the handshake: {old_version}"
    );

    let keyless = raw_http(
        &hub,
        &format!(
            "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nOrigin: {ORIGIN}"
        ),
    )
    .await;
    assert_eq!(keyless.status, 400, "{keyless}");
    assert_eq!(keyless.json()["error"], "bad_request", "{keyless}");

    let (mut ws, _, _) = connect_user(&hub, "u1", "42").await;
    ws.assert_alive().await;
}

/// Behind a trusted proxy, every X-Forwarded-For header counts, in order: a client that sends
/// its own header first cannot pass for someone new when the proxy adds its hop in a second.
#[actix_web::test]
async fn every_forwarded_for_header_counts() {
    let mut env = RATE_LIMITED.to_vec();
    env.push(("SWITCHBOARD__SERVER__TRUSTED_PROXIES", "127.0.0.1"));
    let hub = Hub::start(&env);
    let cookies = logins(&hub, 4).await;
    let _open = burst(&hub, &cookies[..3], Some("10.0.0.1")).await;
    let opts = ws_opts_xff(&cookies[3], Some("10.0.0.7")).header("x-forwarded-for", "10.0.0.1");
    let r = ws_connect_with(&hub, opts).await;
    assert_eq!(
        r.err().map(|r| r.status),
        Some(429),
        "a spoofed first X-Forwarded-For header bought a new budget"
    );
}

/// IPv6 clients are counted by /64: new addresses of the same /64 share its budget.
#[actix_web::test]
async fn ipv6_clients_are_limited_by_their_64() {
    let mut env = RATE_LIMITED.to_vec();
    env.push(("SWITCHBOARD__SERVER__TRUSTED_PROXIES", "127.0.0.1"));
    let hub = Hub::start(&env);
    let cookies = logins(&hub, 5).await;
    let mut open = Vec::new();
    for (i, cookie) in cookies[..3].iter().enumerate() {
        let xff = format!("2001:db8:7:7::{}", i + 1);
        open.extend(burst(&hub, std::slice::from_ref(cookie), Some(&xff)).await);
    }
    let other_64 = ws_connect_with(&hub, ws_opts_xff(&cookies[3], Some("2001:db8:7:8::1"))).await;
    match other_64 {
        Ok(mut ws) => assert_eq!(ws.next_json(T).await["type"], "welcome"),
        Err(r) => panic!("another /64 was refused: HTTP {} {:?}", r.status, r.body),
    }
    let r = ws_connect_with(&hub, ws_opts_xff(&cookies[4], Some("2001:db8:7:7::99"))).await;
    assert_eq!(
        r.err().map(|r| r.status),
        Some(429),
        "a fourth address of the same /64 got a budget of its own"
    );
}

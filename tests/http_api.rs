//! The plain HTTP surface of one embedded hub: health, readiness, metrics, `/api/publish`
//! and its errors, static files, the 426 for a proxy that drops the upgrade, and CORS.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

/// `/healthz` answers 200 `{"status":"ok"}`.
#[actix_web::test]
async fn healthz_is_ok() {
    let hub = Hub::start(&[]);
    let resp = get(&hub, "/healthz").await;
    assert_eq!(resp.status, 200, "{resp}");
    assert_eq!(resp.json(), json!({"status": "ok"}));
}

/// `/readyz` answers 200 on a serving embedded hub.
#[actix_web::test]
async fn readyz_is_ready_when_embedded() {
    let hub = Hub::start(&[]);
    let resp = get(&hub, "/readyz").await;
    assert_eq!(resp.status, 200, "{resp}");
}

/// `/metrics` is Prometheus text naming the connection gauge and the handshake rejection counter.
#[actix_web::test]
async fn metrics_lists_core_series() {
    let hub = Hub::start(&[]);
    let resp = get(&hub, "/metrics").await;
    assert_eq!(resp.status, 200, "{resp}");
    let ct = resp.header("content-type").unwrap_or_default();
    assert!(ct.starts_with("text/plain"), "content-type {ct:?}");
    let text = resp.text();
    for name in [
        "switchboard_connections",
        "switchboard_handshake_rejections_total",
    ] {
        assert!(
            text.contains(name),
            "/metrics lacks {name} on a fresh hub:\n{text}"
        );
    }
    assert_eq!(
        metric(&text, "switchboard_connections"),
        Some(0.0),
        "gauge on a fresh hub:\n{text}"
    );
}

/// The connection gauge follows sockets opening and closing.
#[actix_web::test]
async fn connections_gauge_tracks_sockets() {
    let hub = Hub::start(&[]);
    let (mut a, _, _) = connect_user(&hub, "u1", "42").await;
    let (_b, _, _) = connect_user(&hub, "u2", "42").await;
    let (v, ok) = wait_metric(&hub, "switchboard_connections", T, |v| v == 2.0).await;
    assert!(ok, "switchboard_connections = {v} with two sockets open");
    a.close().await;
    let (v, ok) = wait_metric(&hub, "switchboard_connections", T, |v| v == 1.0).await;
    assert!(
        ok,
        "switchboard_connections = {v} after one of two sockets closed"
    );
}

/// One published event delivered to two subscribers counts 1 received and 2 delivered.
#[actix_web::test]
async fn metrics_count_events_and_deliveries() {
    let hub = Hub::start(&[]);
    let (mut a, _, _) = connect_user(&hub, "u1", "42").await;
    let (mut b, _, _) = connect_user(&hub, "u2", "42").await;
    a.subscribe("calls").await;
    b.subscribe("calls").await;
    let before = metrics(&hub).await;
    let recv0 = metric_value(&before, "switchboard_events_received_total");
    let deliv0 = metric_value(&before, "switchboard_messages_delivered_total");
    publish_ok(&hub, "42", "calls", "call.status", json!({"call_id": "c1"})).await;
    assert_eq!(a.next_json(T).await["type"], "event");
    assert_eq!(b.next_json(T).await["type"], "event");
    let (v, ok) = wait_metric(&hub, "switchboard_events_received_total", T, |v| {
        v == recv0 + 1.0
    })
    .await;
    assert!(
        ok,
        "events_received_total went {recv0} -> {v} for one event"
    );
    let (v, ok) = wait_metric(&hub, "switchboard_messages_delivered_total", T, |v| {
        v == deliv0 + 2.0
    })
    .await;
    assert!(
        ok,
        "messages_delivered_total went {deliv0} -> {v} for two deliveries"
    );
    let text = metrics(&hub).await;
    assert!(
        text.contains("switchboard_delivery_seconds_count")
            || text.contains("switchboard_delivery_seconds_bucket"),
        "no delivery_seconds histogram:\n{text}"
    );
}

/// A valid publish answers 202 with an id shaped `<ms>-<seq>`, increasing per topic.
#[actix_web::test]
async fn publish_accepts_and_returns_increasing_ids() {
    let hub = Hub::start(&[]);
    let (status, body) =
        publish(&hub, "42", "calls", "call.status", json!({"call_id": "c1"})).await;
    assert_eq!(status, 202, "{body}");
    let first = body["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {body}"))
        .to_string();
    let second = publish_ok(&hub, "42", "calls", "call.status", json!({"call_id": "c1"})).await;
    let (a, b) = (parse_event_id(&first), parse_event_id(&second));
    assert!(
        a.is_some() && b.is_some(),
        "ids not <ms>-<seq>: {first:?}, {second:?}"
    );
    assert!(b > a, "ids not increasing: {first} then {second}");
}

/// Publishing without a key, or with a wrong one, is 401 `unauthorized`.
#[actix_web::test]
async fn publish_requires_the_bearer_key() {
    let hub = Hub::start(&[]);
    let body = json!({"org": "42", "topic": "calls", "event": "e", "data": {}}).to_string();
    for key in [None, Some("wrong-key-123456")] {
        let resp = publish_raw(&hub, key, &body, &[]).await;
        assert_eq!(resp.status, 401, "key {key:?}: {resp}");
        assert_eq!(resp.json()["error"], "unauthorized", "key {key:?}: {resp}");
    }
}

/// The key is checked before the body is read: a wrong key is answered at once, even when
/// the promised body never comes.
#[actix_web::test]
async fn publish_checks_the_key_before_reading_the_body() {
    let hub = Hub::start(&[]);
    let resp = raw_http(
        &hub,
        "POST /api/publish HTTP/1.1\r\nAuthorization: Bearer wrong-key-0123456789\r\n\
         Content-Type: application/json\r\nContent-Length: 100",
    )
    .await;
    assert_eq!(resp.status, 401, "{resp}");
}

/// A body slower than `api.body_timeout_ms` is 408 naming the body, not a handler held open.
#[actix_web::test]
async fn publish_times_out_a_slow_body() {
    let hub = Hub::start(&[("SWITCHBOARD__API__BODY_TIMEOUT_MS", "300")]);
    let resp = raw_http(
        &hub,
        &format!(
            "POST /api/publish HTTP/1.1\r\nAuthorization: Bearer {PUBLISH_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: 100"
        ),
    )
    .await;
    assert_eq!(resp.status, 408, "{resp}");
    assert_eq!(resp.json()["field"], "body", "{resp}");
}

/// An address that keeps presenting wrong keys is held back with 429, whatever key it
/// presents next; another address is not.
#[actix_web::test]
async fn publish_throttles_wrong_keys_per_address() {
    let hub = Hub::start(&[("SWITCHBOARD__SERVER__TRUSTED_PROXIES", "127.0.0.1,::1")]);
    let body = json!({"org": "42", "topic": "calls", "event": "e", "data": {}}).to_string();
    let from = |ip: &'static str| [("x-forwarded-for", ip)];
    let mut statuses = Vec::new();
    for _ in 0..30 {
        let resp = publish_raw(
            &hub,
            Some("wrong-key-0123456789"),
            &body,
            &from("203.0.113.7"),
        )
        .await;
        statuses.push(resp.status);
        if resp.status == 429 {
            break;
        }
    }
    assert_eq!(statuses.last(), Some(&429), "never throttled: {statuses:?}");
    assert!(
        statuses[..statuses.len() - 1].iter().all(|s| *s == 401),
        "{statuses:?}"
    );
    let right = publish_raw(&hub, Some(PUBLISH_KEY), &body, &from("203.0.113.7")).await;
    assert_eq!(
        right.status, 429,
        "the right key must not be told apart: {right}"
    );
    let other = publish_raw(&hub, Some(PUBLISH_KEY), &body, &from("203.0.113.8")).await;
    assert_eq!(other.status, 202, "another address: {other}");
}

/// Each malformed publish is 400 `bad_request` naming the offending field.
#[actix_web::test]
async fn publish_rejects_bad_input_naming_the_field() {
    let hub = Hub::start(&[]);
    let long_topic = "a".repeat(129);
    let long_org = "o".repeat(65);
    let cases: [(&str, String, &str); 10] = [
        (
            "missing event",
            json!({"org": "42", "topic": "calls", "data": {}}).to_string(),
            "event",
        ),
        (
            "129-char topic",
            json!({"org": "42", "topic": long_topic, "event": "e", "data": {}}).to_string(),
            "topic",
        ),
        (
            "65-char org",
            json!({"org": long_org, "topic": "calls", "event": "e", "data": {}}).to_string(),
            "org",
        ),
        ("JSON array body", "[]".to_string(), "body"),
        (
            "missing org",
            json!({"topic": "calls", "event": "e", "data": {}}).to_string(),
            "org",
        ),
        (
            "bad topic",
            json!({"org": "42", "topic": "Bad Topic!", "event": "e", "data": {}}).to_string(),
            "topic",
        ),
        (
            "org with colon",
            json!({"org": "a:b", "topic": "calls", "event": "e", "data": {}}).to_string(),
            "org",
        ),
        (
            "missing data",
            json!({"org": "42", "topic": "calls", "event": "e"}).to_string(),
            "data",
        ),
        (
            "missing topic",
            json!({"org": "42", "event": "e", "data": {}}).to_string(),
            "topic",
        ),
        ("malformed JSON", "{\"org\": \"42\", ".to_string(), "body"),
    ];
    let mut wrong = Vec::new();
    for (what, body, field) in cases {
        let resp = publish_raw(&hub, Some(PUBLISH_KEY), &body, &[]).await;
        let json = resp.json_or_null();
        if resp.status != 400 || json["error"] != "bad_request" || json["field"] != field {
            wrong.push(format!(
                "{what}: want 400 bad_request field={field}, got {resp}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "publish validation:\n{}",
        wrong.join("\n")
    );
}

/// `GET /` serves the dashboard HTML.
#[actix_web::test]
async fn dashboard_is_served() {
    let hub = Hub::start(&[]);
    let resp = get(&hub, "/").await;
    assert_eq!(resp.status, 200, "{resp}");
    let ct = resp.header("content-type").unwrap_or_default();
    assert!(ct.starts_with("text/html"), "content-type {ct:?}");
    assert!(
        resp.text().to_lowercase().contains("<html"),
        "not an HTML page"
    );
    assert!(
        resp.text().contains("client.js"),
        "the dashboard should load the JS client"
    );
}

/// `GET /client.js` serves JavaScript.
#[actix_web::test]
async fn client_js_is_served() {
    let hub = Hub::start(&[]);
    let resp = get(&hub, "/client.js").await;
    assert_eq!(resp.status, 200, "{resp}");
    let ct = resp.header("content-type").unwrap_or_default();
    assert!(ct.contains("javascript"), "content-type {ct:?}");
    assert!(
        resp.text().contains("WebSocket"),
        "client.js should open a WebSocket"
    );
}

/// Every answer forbids MIME sniffing and framing by other sites; the dashboard's policy lets
/// only its own scripts and styles run and its own origin be contacted, and every other
/// answer's policy lets nothing run at all.
#[actix_web::test]
async fn answers_carry_security_headers() {
    let hub = Hub::start(&[]);
    let mut missing = Vec::new();
    for path in ["/", "/client.js", "/healthz", "/metrics", "/ws", "/nowhere"] {
        let resp = get(&hub, path).await;
        let csp = resp.header("content-security-policy").unwrap_or_default();
        if resp.header("x-content-type-options").as_deref() != Some("nosniff") {
            missing.push(format!("{path}: no `X-Content-Type-Options: nosniff`"));
        }
        if !csp.contains("frame-ancestors 'none'") {
            missing.push(format!("{path}: CSP {csp:?} lacks frame-ancestors 'none'"));
        }
        if !csp.contains("default-src 'none'") {
            missing.push(format!("{path}: CSP {csp:?} lacks default-src 'none'"));
        }
        if path == "/" {
            for wanted in ["script-src 'self' 'sha256-", "connect-src 'self'"] {
                if !csp.contains(wanted) {
                    missing.push(format!("/: CSP {csp:?} lacks {wanted}"));
                }
            }
            if csp.contains("unsafe-inline") {
                missing.push(format!("/: CSP {csp:?} allows any inline script"));
            }
        } else if csp != "default-src 'none'; frame-ancestors 'none'" {
            missing.push(format!("{path}: CSP {csp:?} allows more than nothing"));
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}

/// A plain `GET /ws` (a proxy that dropped the upgrade headers) gets 426 pointing at nginx.conf.
#[actix_web::test]
async fn ws_without_upgrade_is_426_with_hint() {
    let hub = Hub::start(&[]);
    // awc hides the body of an answer carrying `Connection: upgrade`, so speak HTTP by hand.
    let resp = raw_http(&hub, &format!("GET /ws HTTP/1.1\r\nOrigin: {ORIGIN}")).await;
    assert_eq!(resp.status, 426, "{resp}");
    assert!(
        resp.text().contains("config/nginx.conf"),
        "426 body should point at config/nginx.conf: {resp}"
    );
}

/// A CORS preflight from an allowed origin is answered with that origin and credentials.
#[actix_web::test]
async fn cors_preflight_echoes_allowed_origin() {
    let hub = Hub::start(&[]);
    let resp = http(
        &hub,
        "OPTIONS",
        "/api/publish",
        &[
            ("origin", ORIGIN),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "authorization, content-type",
            ),
        ],
        None,
    )
    .await;
    assert!(resp.status == 200 || resp.status == 204, "{resp}");
    assert_eq!(
        resp.header("access-control-allow-origin").as_deref(),
        Some(ORIGIN),
        "{resp}"
    );
    assert_eq!(
        resp.header("access-control-allow-credentials").as_deref(),
        Some("true"),
        "{resp}"
    );
    let methods = resp
        .header("access-control-allow-methods")
        .unwrap_or_default();
    assert!(methods.contains("POST"), "allow-methods {methods:?}");
}

/// A CORS preflight from a foreign origin is not granted.
#[actix_web::test]
async fn cors_preflight_refuses_foreign_origin() {
    let hub = Hub::start(&[]);
    let resp = http(
        &hub,
        "OPTIONS",
        "/auth/session",
        &[
            ("origin", "https://evil.example"),
            ("access-control-request-method", "POST"),
        ],
        None,
    )
    .await;
    let granted = resp.header("access-control-allow-origin");
    assert!(
        granted.is_none() || granted.as_deref() == Some("null"),
        "preflight from https://evil.example was granted: {resp}"
    );
}

/// An actual cross-origin POST from an allowed origin carries the CORS answer headers.
#[actix_web::test]
async fn cors_simple_request_from_allowed_origin() {
    let hub = Hub::start(&[]);
    let body = json!({"org": "42", "topic": "calls", "event": "e", "data": {}}).to_string();
    let resp = publish_raw(&hub, Some(PUBLISH_KEY), &body, &[("origin", ORIGIN)]).await;
    assert_eq!(resp.status, 202, "{resp}");
    assert_eq!(
        resp.header("access-control-allow-origin").as_deref(),
        Some(ORIGIN),
        "{resp}"
    );
    assert_eq!(
        resp.header("access-control-allow-credentials").as_deref(),
        Some("true"),
        "{resp}"
    );
}

/// `/api/*` and `/auth/*` from a foreign Origin are 403 `origin_not_allowed`, even with a good key.
#[actix_web::test]
async fn foreign_origin_is_forbidden_on_api_and_auth() {
    let hub = Hub::start(&[]);
    let body = json!({"org": "42", "topic": "calls", "event": "e", "data": {}}).to_string();
    let resp = publish_raw(
        &hub,
        Some(PUBLISH_KEY),
        &body,
        &[("origin", "https://evil.example")],
    )
    .await;
    assert_eq!(resp.status, 403, "{resp}");
    assert_eq!(
        resp.json(),
        json!({"error": "origin_not_allowed", "detail": "origin not allowed: https://evil.example"})
    );
    let resp = post_json(
        &hub,
        "/auth/dev-login",
        &[("origin", "https://evil.example")],
        &json!({"user": "u1", "org": "42"}),
    )
    .await;
    assert_eq!(resp.status, 403, "dev-login from a foreign origin: {resp}");
    assert!(
        session_cookie(&resp).is_none(),
        "a refused login must not set a cookie: {resp}"
    );
}

/// The `Bearer` scheme name is case-insensitive (RFC 7235), as HTTP clients may send `bearer`.
#[actix_web::test]
async fn publish_bearer_scheme_is_case_insensitive() {
    let hub = Hub::start(&[]);
    let body = json!({"org": "42", "topic": "calls", "event": "e", "data": {}}).to_string();
    let auth = format!("bearer {PUBLISH_KEY}");
    let resp = http(
        &hub,
        "POST",
        "/api/publish",
        &[
            ("content-type", "application/json"),
            ("authorization", &auth),
        ],
        Some(body.as_bytes()),
    )
    .await;
    assert_eq!(resp.status, 202, "{resp}");
}

/// `switchboard simulate` (what `scripts/simulate-calls` runs) publishes call-status events
/// through `/api/publish` that a board of that org receives, shaped as SPEC section 4 says.
#[actix_web::test]
async fn simulate_command_feeds_a_board_through_the_api() {
    let hub = Hub::start(&[]);
    let (mut board, _, _) = connect_user(&hub, "agent", "77").await;
    board.subscribe("calls").await;
    let url = hub.base_url();
    let simulator = std::thread::spawn(move || {
        run_cli(
            &[
                "simulate",
                "--url",
                &url,
                "--key",
                PUBLISH_KEY,
                "--org",
                "77",
                "--calls-per-minute",
                "600",
                "--duration-s",
                "4",
            ],
            &[],
        )
    });
    let event = board.next_json(Duration::from_secs(10)).await;
    assert_eq!(event["type"], "event", "{event}");
    assert_eq!(event["event"], "call.status", "{event}");
    let data = &event["data"];
    assert!(data["call_id"].is_string(), "no call_id: {event}");
    let status = data["status"].as_str().unwrap_or("");
    assert!(
        ["queued", "ringing", "in-progress", "forwarding", "ended"].contains(&status),
        "status {status:?} is not a call status: {event}"
    );
    let out = simulator.join().expect("simulator thread");
    assert_eq!(out.code(), Some(0), "simulate should end by itself: {out}");
}

/// The registry gauges of `/metrics` follow the sockets: one subscribed socket is one session
/// and one channel; once it closes both are back to zero.
#[actix_web::test]
async fn registry_gauges_follow_the_sockets() {
    let hub = Hub::start(&[]);
    let (mut ws, _, _) = connect_user(&hub, "gauge", "42").await;
    ws.subscribe("calls").await;
    for (name, want) in [
        ("switchboard_registry_sessions", 1.0),
        ("switchboard_registry_channels", 1.0),
        ("switchboard_handshake_limiter_clients", 1.0),
    ] {
        let (v, ok) = wait_metric(&hub, name, T, |v| v == want).await;
        assert!(ok, "{name} = {v} with one subscribed socket, want {want}");
    }
    ws.close().await;
    for name in [
        "switchboard_registry_sessions",
        "switchboard_registry_channels",
    ] {
        let (v, ok) = wait_metric(&hub, name, T, |v| v == 0.0).await;
        assert!(ok, "{name} = {v} after the socket closed, want 0");
    }
}

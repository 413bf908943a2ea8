//! Limits a hostile or slow client runs into: frame size, subscription count, message rate,
//! per-user connection caps (both policies), slow consumers (conflate and close), and the
//! heartbeat that closes a client which stopped answering.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// A text frame over `limits.max_frame_bytes` closes the socket with 1009; one under it is fine.
#[actix_web::test]
async fn oversized_frame_closes_1009() {
    let hub = Hub::start(&[("SWITCHBOARD__LIMITS__MAX_FRAME_BYTES", "1024")]);
    let (mut ws, _, _) = connect_user(&hub, "u1", "42").await;
    let small =
        json!({"type": "publish", "topic": "voice:a:in", "data": "x".repeat(900)}).to_string();
    assert!(small.len() < 1024);
    ws.send_text(&small).await;
    ws.assert_alive().await;
    let big =
        json!({"type": "publish", "topic": "voice:a:in", "data": "x".repeat(2000)}).to_string();
    ws.send_text(&big).await;
    assert_close(
        ws.expect_close(T).await,
        1009,
        "frame too large (limit 1024 bytes)",
        "2 KB frame",
    );
}

/// The subscription after `limits.max_subscriptions` is refused `too_many_subscriptions`; leaving one frees it.
#[actix_web::test]
async fn subscriptions_are_capped() {
    let hub = Hub::start(&[("SWITCHBOARD__LIMITS__MAX_SUBSCRIPTIONS", "3")]);
    let (mut ws, _, _) = connect_user(&hub, "u1", "42").await;
    for t in ["t1", "t2", "t3"] {
        ws.subscribe(t).await;
    }
    let reply = ws
        .request(&json!({"type": "subscribe", "topic": "t4"}))
        .await;
    assert_eq!(
        (reply["type"].as_str(), reply["code"].as_str()),
        (Some("error"), Some("too_many_subscriptions")),
        "{reply}"
    );
    ws.subscribe("t1").await; // already joined: not a new subscription
    let reply = ws
        .request(&json!({"type": "unsubscribe", "topic": "t1"}))
        .await;
    assert_eq!(reply["type"], "unsubscribed");
    ws.subscribe("t4").await;
    // The refused subscription must not deliver.
    let marker = publish_ok(&hub, "42", "t4", "e", json!(1)).await;
    assert_eq!(ws.next_json(T).await["id"], marker);
}

const FLOOD_ENV: [(&str, &str); 2] = [
    ("SWITCHBOARD__LIMITS__CLIENT_MSGS_PER_S", "5"),
    ("SWITCHBOARD__LIMITS__CLIENT_MSGS_BURST", "5"),
];

/// A short burst over the message rate gets one `rate_limited` error and the socket recovers.
#[actix_web::test]
async fn message_burst_is_rate_limited_then_recovers() {
    let hub = Hub::start(&FLOOD_ENV);
    let (mut ws, _, _) = connect_user(&hub, "u1", "42").await;
    for _ in 0..7 {
        ws.send_json(&json!({"type": "ping"})).await;
    }
    let mut pongs = 0;
    let mut limited = 0;
    while let Some(frame) = ws.recv(Duration::from_millis(500)).await {
        match frame {
            Frame::Json(v, _) if v["type"] == "pong" => pongs += 1,
            Frame::Json(v, _) if v["type"] == "error" && v["code"] == "rate_limited" => {
                limited += 1
            }
            other => panic!("unexpected frame during a short burst: {other:?}"),
        }
    }
    assert!(limited == 1, "want exactly one rate_limited error for 7 quick messages (burst 5), got {limited} (pongs {pongs})");
    assert!(
        (5..=6).contains(&pongs),
        "want 5 (or 6 with a refill) pongs for 7 quick messages, got {pongs}"
    );
    // The bucket refills at 5/s; after the half-second of silence above, a message is accepted.
    ws.assert_alive().await;
}

/// A client that keeps flooding gets `rate_limited` and then a 1008 close.
#[actix_web::test]
async fn message_flood_closes_1008() {
    let hub = Hub::start(&FLOOD_ENV);
    let (mut ws, _, _) = connect_user(&hub, "u1", "42").await;
    for _ in 0..40 {
        if ws
            .try_send(Message::text(json!({"type": "ping"}).to_string()))
            .await
            .is_err()
        {
            break;
        }
    }
    let (code, reason) = ws.expect_close(T).await;
    let limited = ws
        .skipped
        .iter()
        .filter(|f| matches!(f, Frame::Json(v, _) if v["type"] == "error" && v["code"] == "rate_limited"))
        .count();
    assert!(
        limited >= 1,
        "no rate_limited error before the close; frames: {:?}",
        ws.skipped
    );
    assert_close(
        (code, reason),
        1008,
        "message rate exceeded",
        "sustained flood",
    );
}

/// A client sending steadily at ten times its message rate gets a message through at every
/// refill; it is closed 1008 all the same, once its refusals within the window outnumber the
/// burst (counting refusals in a row, each refill started the count again).
#[actix_web::test]
async fn a_steady_flood_that_trickles_through_closes_1008() {
    let hub = Hub::start(&[
        ("SWITCHBOARD__LIMITS__CLIENT_MSGS_PER_S", "5"),
        ("SWITCHBOARD__LIMITS__CLIENT_MSGS_BURST", "40"),
    ]);
    let (mut ws, _, _) = connect_user(&hub, "u1", "42").await;
    let ping = Message::text(json!({"type": "ping"}).to_string());
    // 50 messages a second, evenly: no hiccup of the test may send a burst of its own.
    let mut pace = tokio::time::interval(Duration::from_millis(20));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let mut pongs = 0;
    let close = 'flood: loop {
        pace.tick().await;
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "still open after flooding at 10x the rate for {:?} ({pongs} pongs)",
            started.elapsed()
        );
        if ws.try_send(ping.clone()).await.is_err() {
            break ws.expect_close(T).await;
        }
        // Take what has arrived, without waiting for more.
        while let Some(frame) = ws.recv(Duration::ZERO).await {
            match frame {
                Frame::Close(code, reason) => break 'flood (code, reason),
                Frame::Ended(why) => break 'flood (1006, why),
                Frame::Json(v, _) if v["type"] == "pong" => pongs += 1,
                _ => {}
            }
        }
    };
    assert_close(close, 1008, "message rate exceeded", "steady flood");
    assert!(pongs >= 40, "the burst was not served first: {pongs} pongs");
}

/// Protocol Pings count against the message budget like any message: a client flooding
/// Pings is refused, then closed 1008.
#[actix_web::test]
async fn protocol_ping_flood_closes_1008() {
    let hub = Hub::start(&FLOOD_ENV);
    let (mut ws, _, _) = connect_user(&hub, "u1", "42").await;
    for _ in 0..40 {
        if ws
            .try_send(Message::Ping(vec![7u8; 125].into()))
            .await
            .is_err()
        {
            break;
        }
    }
    assert_close(
        ws.expect_close(T).await,
        1008,
        "message rate exceeded",
        "protocol ping flood",
    );
}

/// A client that stops reading while it keeps asking (here: protocol Pings, each answered)
/// is closed as a slow consumer once the answers waiting for it pass the bound, and counted;
/// not only at the write-stall timeout (`heartbeat.timeout_ms`, 30 s).
#[actix_web::test]
async fn answers_piling_up_for_a_client_that_does_not_read_close_it_1013() {
    let ping = client_frame(0x9, true, &[7u8; 125]);
    unread_answers_close_1013(&ping, 100_000, |opcode, _| opcode == 0xA).await;
}

/// The same for the protocol's own `ping` message: its `pong` answers take a shorter way to
/// the socket than the session's other replies, and are bounded all the same.
#[actix_web::test]
async fn app_pings_piling_up_for_a_client_that_does_not_read_close_it_1013() {
    let ping = client_frame(0x1, true, br#"{"type":"ping"}"#);
    // Each answer is 17 bytes: it takes many more of them to fill the kernel's buffers.
    unread_answers_close_1013(&ping, 600_000, |opcode, payload| {
        opcode == 0x1 && payload == br#"{"type":"pong"}"#
    })
    .await;
}

/// Send `ask` (a frame the hub answers) `times` times without reading, then read: the hub
/// must have closed the socket 1013 before answering every one, and counted it. `times`
/// answers must be far more than the kernel buffers hold (on loopback the hub's send buffer
/// grows to 4 MiB), so that the hub's own bound is what is tested.
async fn unread_answers_close_1013(
    ask: &[u8],
    times: usize,
    is_answer: impl Fn(u8, &[u8]) -> bool,
) {
    // Bound: client_msgs_burst x max_frame_bytes = 25,600 bytes; a rate no flood reaches.
    let hub = Hub::start(&[
        ("SWITCHBOARD__LIMITS__MAX_FRAME_BYTES", "256"),
        ("SWITCHBOARD__LIMITS__CLIENT_MSGS_BURST", "100"),
        ("SWITCHBOARD__LIMITS__CLIENT_MSGS_PER_S", "1000000000"),
    ]);
    let cookie = dev_login(&hub, "u1", "42").await;
    let mut raw = RawWs::connect_with_recv_buffer(&hub, ORIGIN, &cookie, 4096).await;
    let asks = ask.repeat(1000);
    for _ in 0..times / 1000 {
        // Once closed, the hub no longer reads: a write may fail or stall, and that is fine.
        match tokio::time::timeout(T, raw.send_raw(&asks)).await {
            Ok(Ok(())) => {}
            _ => break,
        }
    }
    let mut answers = 0;
    let ended = loop {
        match raw.next_frame(T).await {
            None => panic!("still open {T:?} after its last frame ({answers} answers read)"),
            Some(RawFrame::Eof) => break None,
            Some(RawFrame::Frame {
                opcode: 0x8,
                payload,
            }) => break Some(payload),
            Some(RawFrame::Frame { opcode, payload }) if is_answer(opcode, &payload) => {
                answers += 1
            }
            Some(RawFrame::Frame { .. }) => {} // welcome, the hub's own pings
        }
    };
    eprintln!("{answers} answers, then {ended:?}");
    assert!(
        answers < times,
        "every ask was answered: nothing was bounded"
    );
    // The close frame arrives unless the hub's close met asks it had not read (the kernel
    // then resets the connection, and what was still on its way is lost).
    if let Some(payload) = ended {
        let code = u16::from_be_bytes([payload[0], payload[1]]);
        let reason = String::from_utf8_lossy(&payload[2..]).into_owned();
        assert_close((code, reason), 1013, "slow consumer", "answers piling up");
    }
    let (v, ok) = wait_metric(
        &hub,
        "switchboard_slow_consumer_disconnects_total",
        T,
        |v| v >= 1.0,
    )
    .await;
    assert!(ok, "switchboard_slow_consumer_disconnects_total = {v}");
}

/// `reject_new`: the socket over the per-user cap is closed 4429; closing one frees a slot; others unaffected.
#[actix_web::test]
async fn connection_cap_rejects_new() {
    let hub = Hub::start(&[("SWITCHBOARD__LIMITS__MAX_CONNECTIONS_PER_USER", "2")]);
    let cookie = dev_login(&hub, "u1", "42").await;
    let mut s1 = ws_open(&hub, Some(ORIGIN), Some(&cookie)).await;
    let mut s2 = ws_open(&hub, Some(ORIGIN), Some(&cookie)).await;
    assert_eq!(s1.next_json(T).await["type"], "welcome");
    assert_eq!(s2.next_json(T).await["type"], "welcome");
    let mut s3 = ws_open(&hub, Some(ORIGIN), Some(&cookie)).await;
    assert_close(
        s3.expect_only_close(T).await,
        4429,
        "too many connections (limit 2)",
        "third socket",
    );

    let (mut other, _, _) = connect_user(&hub, "u2", "42").await;
    other.assert_alive().await;

    s1.close().await;
    // The slot is released when the server has finished with s1; allow it a moment.
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let mut s4 = ws_open(&hub, Some(ORIGIN), Some(&cookie)).await;
        match s4.recv(T).await {
            Some(Frame::Json(v, _)) if v["type"] == "welcome" => break,
            Some(Frame::Close(4429, _)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!(
                "after closing one of two sockets, a new one got {other:?} (attempt {attempts})"
            ),
        }
    }
    s2.assert_alive().await;
}

/// `evict_oldest`: over the cap the oldest socket is closed 4409 and the new one is welcomed.
#[actix_web::test]
async fn connection_cap_evicts_oldest() {
    let hub = Hub::start(&[
        ("SWITCHBOARD__LIMITS__MAX_CONNECTIONS_PER_USER", "2"),
        ("SWITCHBOARD__LIMITS__CAP_POLICY", "evict_oldest"),
    ]);
    let cookie = dev_login(&hub, "u1", "42").await;
    let mut s1 = ws_open(&hub, Some(ORIGIN), Some(&cookie)).await;
    assert_eq!(s1.next_json(T).await["type"], "welcome");
    let mut s2 = ws_open(&hub, Some(ORIGIN), Some(&cookie)).await;
    assert_eq!(s2.next_json(T).await["type"], "welcome");
    let mut s3 = ws_open(&hub, Some(ORIGIN), Some(&cookie)).await;
    let welcome = s3.next_json(T).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert_close(
        s1.expect_close(T).await,
        4409,
        "replaced by a newer connection",
        "oldest socket",
    );
    s2.assert_alive().await;
    s3.assert_alive().await;
}

/// Publish `n` ~8 KB call-status events round-robin over 5 call ids; returns the last seq per call.
async fn flood_calls(hub: &Hub, n: usize) -> HashMap<String, u64> {
    let client = client();
    let pad = "p".repeat(8000);
    let mut last = HashMap::new();
    for seq in 0..n as u64 {
        let call_id = format!("call-{}", seq % 5);
        let data = json!({"call_id": call_id, "status": "in-progress", "seq": seq, "pad": pad});
        let (status, body) = publish_with(&client, hub, "42", "calls", "call.status", data).await;
        assert_eq!(status, 202, "publish {seq}: {body}");
        last.insert(call_id, seq);
    }
    last
}

/// A subscriber to `calls` whose socket receive buffer is small and which does not read.
async fn slow_subscriber(hub: &Hub) -> Ws {
    let cookie = dev_login(hub, "slow", "42").await;
    let mut opts = WsOpts::new(Some(ORIGIN), Some(&cookie));
    opts.recv_buffer = Some(4096);
    let mut ws = ws_connect_with(hub, opts)
        .await
        .unwrap_or_else(|r| panic!("refused: {} {}", r.status, r.body));
    assert_eq!(ws.next_json(T).await["type"], "welcome");
    ws.subscribe("calls").await;
    ws
}

/// `conflate`: a client that stops reading still ends with the latest state of every call,
/// receives fewer events than were published, and the conflation is counted.
#[actix_web::test]
async fn slow_consumer_is_conflated_to_latest_state() {
    let hub = Hub::start(&[("SWITCHBOARD__LIMITS__OUTBOUND_QUEUE", "16")]);
    let mut slow = slow_subscriber(&hub).await;
    let n = 2000;
    let last = flood_calls(&hub, n).await;

    let mut seen: HashMap<String, u64> = HashMap::new();
    let mut received = 0usize;
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen != last {
        let left = deadline.saturating_duration_since(Instant::now());
        match slow.recv(left.min(T)).await {
            Some(Frame::Json(ev, _)) if ev["type"] == "event" => {
                received += 1;
                let call = ev["data"]["call_id"].as_str().unwrap_or("?").to_string();
                let seq = ev["data"]["seq"].as_u64().unwrap_or(u64::MAX);
                if let Some(prev) = seen.get(&call) {
                    assert!(seq > *prev, "{call}: seq {seq} after {prev} (out of order or duplicate)");
                }
                seen.insert(call, seq);
            }
            other => panic!(
                "slow consumer: got {other:?} after {received} events; latest per call so far {seen:?}, want {last:?}"
            ),
        }
    }
    eprintln!("slow consumer received {received} of {n} events");
    assert!(
        received < n,
        "received all {received} of {n} events: nothing was conflated"
    );
    let m = metrics(&hub).await;
    assert!(
        metric_value(&m, "switchboard_conflated_total") > 0.0,
        "switchboard_conflated_total not above 0:\n{m}"
    );
    slow.assert_alive().await;
}

/// `slow_consumer = close`: a client that stops reading is closed with 1013 `slow consumer`.
#[actix_web::test]
async fn slow_consumer_is_closed_1013() {
    let hub = Hub::start(&[
        ("SWITCHBOARD__LIMITS__OUTBOUND_QUEUE", "16"),
        ("SWITCHBOARD__LIMITS__SLOW_CONSUMER", "close"),
    ]);
    let mut slow = slow_subscriber(&hub).await;
    let (mut healthy, _, _) = connect_user(&hub, "fast", "42").await;
    flood_calls(&hub, 2000).await;
    let (code, reason) = slow.expect_close(Duration::from_secs(30)).await;
    assert_close(
        (code, reason),
        1013,
        "slow consumer",
        "slow consumer with policy close",
    );
    let m = metrics(&hub).await;
    assert!(
        metric_value(&m, "switchboard_slow_consumer_disconnects_total") >= 1.0,
        "switchboard_slow_consumer_disconnects_total not counted:\n{m}"
    );
    healthy.assert_alive().await;
}

const HEARTBEAT_ENV: [(&str, &str); 2] = [
    ("SWITCHBOARD__HEARTBEAT__INTERVAL_MS", "200"),
    ("SWITCHBOARD__HEARTBEAT__TIMEOUT_MS", "600"),
];

/// A client that never answers protocol pings is closed (4408 or a dropped connection) and counted.
#[actix_web::test]
async fn silent_client_is_closed_by_heartbeat() {
    let hub = Hub::start(&HEARTBEAT_ENV);
    let cookie = dev_login(&hub, "u1", "42").await;
    let started = Instant::now();
    let mut raw = RawWs::connect(&hub, ORIGIN, &cookie).await;
    let mut pings = 0;
    let mut frames = Vec::new();
    let ended = loop {
        match raw.next_frame(Duration::from_secs(5)).await {
            None => panic!("silent client still open 5 s after its last frame (pings seen {pings}, frames {frames:?})"),
            Some(RawFrame::Eof) => break None,
            Some(RawFrame::Frame { opcode: 0x9, .. }) => pings += 1,
            Some(RawFrame::Frame { opcode: 0x8, payload }) => break Some(payload),
            Some(RawFrame::Frame { opcode, payload }) => frames.push((opcode, String::from_utf8_lossy(&payload).into_owned())),
        }
    };
    let elapsed = started.elapsed();
    eprintln!("silent client: {pings} pings, ended after {elapsed:?} with {ended:?}");
    assert!(pings >= 1, "no protocol ping before the close");
    assert!(
        elapsed >= Duration::from_millis(500),
        "closed after {elapsed:?}, before the 600 ms timeout"
    );
    assert!(
        elapsed < Duration::from_secs(3),
        "closed only after {elapsed:?} (timeout 600 ms)"
    );
    if let Some(payload) = ended {
        assert!(payload.len() >= 2, "close frame without a code");
        let code = u16::from_be_bytes([payload[0], payload[1]]);
        let reason = String::from_utf8_lossy(&payload[2..]).into_owned();
        assert_close((code, reason), 4408, "heartbeat timeout", "heartbeat close");
    }
    let (v, ok) = wait_metric(&hub, "switchboard_heartbeat_timeouts_total", T, |v| {
        v >= 1.0
    })
    .await;
    assert!(ok, "switchboard_heartbeat_timeouts_total = {v}");
}

/// A client that answers pings (as browsers do) outlives many heartbeat timeouts.
#[actix_web::test]
async fn responsive_client_survives_heartbeat() {
    let hub = Hub::start(&HEARTBEAT_ENV);
    let (mut ws, welcome, _) = connect_user(&hub, "u1", "42").await;
    assert_eq!(welcome["heartbeat_ms"], 200, "{welcome}");
    // Reading keeps tungstenite answering pings; nothing else must arrive meanwhile.
    ws.expect_silence(Duration::from_millis(1500)).await;
    assert!(
        ws.pings_seen >= 3,
        "only {} protocol pings in 1.5 s at a 200 ms interval",
        ws.pings_seen
    );
    ws.assert_alive().await;
}

/// A socket that vanishes without a close (a killed tab) gives its cap slot back.
#[actix_web::test]
async fn abrupt_disconnect_frees_cap_slot() {
    let hub = Hub::start(&[("SWITCHBOARD__LIMITS__MAX_CONNECTIONS_PER_USER", "1")]);
    let cookie = dev_login(&hub, "u1", "42").await;
    let mut s1 = ws_open(&hub, Some(ORIGIN), Some(&cookie)).await;
    assert_eq!(s1.next_json(T).await["type"], "welcome");
    drop(s1); // TCP closed without a close frame
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let mut s2 = ws_open(&hub, Some(ORIGIN), Some(&cookie)).await;
        match s2.recv(T).await {
            Some(Frame::Json(v, _)) if v["type"] == "welcome" => break,
            Some(Frame::Close(4429, _)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("2 s after the only socket vanished, a new one got {other:?}"),
        }
    }
}

/// The cap counts a user's sockets across sessions: two logins of one user share it.
#[actix_web::test]
async fn connection_cap_is_per_user_not_per_session() {
    let hub = Hub::start(&[("SWITCHBOARD__LIMITS__MAX_CONNECTIONS_PER_USER", "2")]);
    let a = dev_login(&hub, "u1", "42").await;
    let b = dev_login(&hub, "u1", "42").await;
    let mut s1 = ws_open(&hub, Some(ORIGIN), Some(&a)).await;
    assert_eq!(s1.next_json(T).await["type"], "welcome");
    let mut s2 = ws_open(&hub, Some(ORIGIN), Some(&b)).await;
    assert_eq!(s2.next_json(T).await["type"], "welcome");
    let mut s3 = ws_open(&hub, Some(ORIGIN), Some(&a)).await;
    assert_close(
        s3.expect_only_close(T).await,
        4429,
        "too many connections (limit 2)",
        "third socket over two sessions",
    );
}

/// `conflate` keeps the newest event per call *per topic*, and per topic for events without a
/// call id: a slow dashboard watching the board and one call's detail ends with both up to date.
#[actix_web::test]
async fn slow_consumer_conflates_per_topic() {
    let hub = Hub::start(&[("SWITCHBOARD__LIMITS__OUTBOUND_QUEUE", "16")]);
    let mut slow = slow_subscriber(&hub).await;
    slow.subscribe("call:call-0").await;
    slow.subscribe("ticker").await;
    let client = client();
    let pad = "p".repeat(8000);
    // key "topic/call_id" (or "topic/-") -> last seq published
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut published = 0usize;
    for seq in 0..2000u64 {
        let call_id = format!("call-{}", seq % 5);
        let mut targets = vec![("calls".to_string(), Some(call_id.clone()))];
        if call_id == "call-0" {
            targets.push(("call:call-0".to_string(), Some(call_id.clone())));
        }
        if seq % 10 == 0 {
            targets.push(("ticker".to_string(), None));
        }
        for (topic, call) in targets {
            let data = match &call {
                Some(c) => json!({"call_id": c, "seq": seq, "pad": pad}),
                None => json!({"seq": seq, "pad": pad}),
            };
            let (status, body) = publish_with(&client, &hub, "42", &topic, "e", data).await;
            assert_eq!(status, 202, "publish {seq} to {topic}: {body}");
            published += 1;
            last.insert(format!("{topic}/{}", call.as_deref().unwrap_or("-")), seq);
        }
    }
    let mut seen: HashMap<String, u64> = HashMap::new();
    let mut received = 0usize;
    while seen != last {
        match slow.recv(T).await {
            Some(Frame::Json(ev, _)) if ev["type"] == "event" => {
                received += 1;
                let key = format!(
                    "{}/{}",
                    ev["topic"].as_str().unwrap_or("?"),
                    ev["data"]["call_id"].as_str().unwrap_or("-")
                );
                let seq = ev["data"]["seq"].as_u64().unwrap_or(u64::MAX);
                if let Some(prev) = seen.get(&key) {
                    assert!(seq > *prev, "{key}: seq {seq} after {prev}");
                }
                seen.insert(key, seq);
            }
            other => panic!(
                "got {other:?} after {received} events; latest so far {seen:?}, want {last:?}"
            ),
        }
    }
    assert!(
        received < published,
        "received all {received} of {published}: nothing conflated"
    );
}

/// A client whose socket stops taking data altogether (a frozen tab) is dropped after
/// `heartbeat.timeout_ms`, and its connection-cap slot comes back: the same user's next
/// socket is welcomed instead of refused 4429.
#[actix_web::test]
async fn stalled_socket_is_dropped_and_frees_its_slot() {
    let hub = Hub::start(&[
        ("SWITCHBOARD__LIMITS__MAX_CONNECTIONS_PER_USER", "1"),
        ("SWITCHBOARD__HEARTBEAT__INTERVAL_MS", "200"),
        ("SWITCHBOARD__HEARTBEAT__TIMEOUT_MS", "1000"),
    ]);
    let stalled = slow_subscriber(&hub).await;
    let cookie = dev_login(&hub, "slow", "42").await;
    flood_calls(&hub, 2000).await;

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut next = ws_open(&hub, Some(ORIGIN), Some(&cookie)).await;
        let last_refusal = match next.recv(T).await {
            Some(Frame::Json(welcome, _)) if welcome["type"] == "welcome" => break,
            other => other,
        };
        assert!(
            Instant::now() < deadline,
            "the stalled socket still holds the user's only slot after 20 s: {last_refusal:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A frozen tab neither reads nor answers pings: whichever notices first ends it, the
    // writer's stall timer (frames the socket never took) or the heartbeat (nothing heard),
    // both after `heartbeat.timeout_ms`; which one wins depends on when the socket filled.
    let deadline = Instant::now() + T;
    let noticed = loop {
        let m = metrics(&hub).await;
        let noticed = metric_value(&m, "switchboard_slow_consumer_disconnects_total")
            + metric_value(&m, "switchboard_heartbeat_timeouts_total");
        if noticed >= 1.0 || Instant::now() >= deadline {
            break noticed;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        noticed >= 1.0,
        "the stalled socket was counted neither as a slow consumer nor as a heartbeat timeout"
    );
    drop(stalled);
}

//! The wire protocol on one embedded hub: subscribe/unsubscribe, event frames, app ping,
//! org isolation, recoverable errors, client publish, binary streams, and fragmented messages.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// Subscribe answers `subscribed`; a published event arrives as exactly the documented frame.
#[actix_web::test]
async fn subscribed_client_receives_event_frame() {
    let hub = Hub::start(&[]);
    let (mut ws, _, _) = connect_user(&hub, "u1", "42").await;
    let reply = ws
        .request(&json!({"type": "subscribe", "topic": "calls"}))
        .await;
    assert_eq!(reply, json!({"type": "subscribed", "topic": "calls"}));
    let data = json!({"call_id": "c1", "status": "ringing", "direction": "inbound", "from": "+15550100", "to": "+15550199"});
    let id = publish_ok(&hub, "42", "calls", "call.status", data.clone()).await;
    let ev = ws.next_json(T).await;
    assert_eq!(
        ev,
        json!({"type": "event", "topic": "calls", "id": id, "event": "call.status", "data": data})
    );
    assert!(
        ws.last_text.starts_with(r#"{"type":"event""#),
        "`type` should come first: {}",
        ws.last_text
    );
}

/// An event published without `event` is refused (400 naming the field) and reaches nobody:
/// SPEC 2 lists `event` in the body.
#[actix_web::test]
async fn an_event_without_a_name_is_refused() {
    let hub = Hub::start(&[]);
    let (mut ws, _, _) = connect_user(&hub, "u1", "42").await;
    ws.subscribe("calls").await;
    let resp = publish_raw(
        &hub,
        Some(PUBLISH_KEY),
        &json!({"org": "42", "topic": "calls", "data": 7}).to_string(),
        &[],
    )
    .await;
    assert_eq!(resp.status, 400, "{resp}");
    assert_eq!(resp.json()["field"], "event", "{resp}");
    let id = publish_ok(&hub, "42", "calls", "call.status", json!(8)).await;
    let ev = ws.next_json(T).await;
    assert_eq!(
        ev["id"].as_str(),
        Some(id.as_str()),
        "only the named event: {ev}"
    );
}

/// After unsubscribe a topic's events stop while another subscribed topic's still arrive.
#[actix_web::test]
async fn unsubscribe_stops_delivery() {
    let hub = Hub::start(&[]);
    let (mut ws, _, _) = connect_user(&hub, "u1", "42").await;
    ws.subscribe("call:a").await;
    ws.subscribe("call:b").await;
    let reply = ws
        .request(&json!({"type": "unsubscribe", "topic": "call:a"}))
        .await;
    assert_eq!(reply, json!({"type": "unsubscribed", "topic": "call:a"}));
    publish_ok(&hub, "42", "call:a", "call.status", json!({"n": 1})).await;
    let id_b = publish_ok(&hub, "42", "call:b", "call.status", json!({"n": 2})).await;
    let ev = ws.next_json(T).await;
    assert_eq!(
        (ev["topic"].as_str(), ev["id"].as_str()),
        (Some("call:b"), Some(id_b.as_str())),
        "{ev}"
    );
}

/// Unsubscribing a topic never joined is still answered `unsubscribed`.
#[actix_web::test]
async fn unsubscribe_is_idempotent() {
    let hub = Hub::start(&[]);
    let (mut ws, _, _) = connect_user(&hub, "u1", "42").await;
    let reply = ws
        .request(&json!({"type": "unsubscribe", "topic": "never"}))
        .await;
    assert_eq!(reply, json!({"type": "unsubscribed", "topic": "never"}));
}

/// Subscribing twice answers twice but delivers each event once.
#[actix_web::test]
async fn double_subscribe_delivers_once() {
    let hub = Hub::start(&[]);
    let (mut ws, _, _) = connect_user(&hub, "u1", "42").await;
    ws.subscribe("calls").await;
    ws.subscribe("calls").await;
    ws.subscribe("marker").await;
    let id1 = publish_ok(&hub, "42", "calls", "e", json!(1)).await;
    let id2 = publish_ok(&hub, "42", "marker", "e", json!(2)).await;
    let first = ws.next_json(T).await;
    let second = ws.next_json(T).await;
    assert_eq!(first["id"], id1, "{first}");
    assert_eq!(
        second["id"], id2,
        "a duplicate of the first event came instead of the marker: {second}"
    );
}

/// App-level `{"type":"ping"}` is answered `{"type":"pong"}`.
#[actix_web::test]
async fn app_ping_gets_pong() {
    let hub = Hub::start(&[]);
    let (mut ws, _, _) = connect_user(&hub, "u1", "42").await;
    let reply = ws.request(&json!({"type": "ping"})).await;
    assert_eq!(reply, json!({"type": "pong"}));
}

/// A user of org 42 never receives org 43's events on the same topic name.
#[actix_web::test]
async fn orgs_are_isolated() {
    let hub = Hub::start(&[]);
    let (mut a, _, _) = connect_user(&hub, "a", "42").await;
    let (mut b, _, _) = connect_user(&hub, "b", "43").await;
    a.subscribe("calls").await;
    b.subscribe("calls").await;
    let id43 = publish_ok(&hub, "43", "calls", "call.status", json!({"org": 43})).await;
    let id42 = publish_ok(&hub, "42", "calls", "call.status", json!({"org": 42})).await;
    let ev = a.next_json(T).await;
    assert_eq!(
        ev["id"], id42,
        "org 42's first event should be its own, got {ev}"
    );
    let ev = b.next_json(T).await;
    assert_eq!(ev["id"], id43, "org 43 did not get its own event: {ev}");
    let ev = b.recv(Duration::from_millis(200)).await;
    assert!(ev.is_none(), "org 43 got another event (org 42's?): {ev:?}");
}

/// Topic names that mimic another org's channel, or an `org` field in the message, do not leak.
#[actix_web::test]
async fn org_prefixed_topics_do_not_leak() {
    let hub = Hub::start(&[]);
    let (mut a, _, _) = connect_user(&hub, "a", "42").await;
    for topic in ["43:calls", "sb:43:calls", "42:43:calls"] {
        let reply = a
            .request(&json!({"type": "subscribe", "topic": topic}))
            .await;
        assert!(
            reply["type"] == "subscribed"
                || (reply["type"] == "error" && reply["code"] == "bad_request"),
            "subscribe {topic}: {reply}"
        );
    }
    // An org in the message is not believed: it may be ignored or refused, never obeyed.
    let reply = a
        .request(&json!({"type": "subscribe", "topic": "calls", "org": "43"}))
        .await;
    assert!(
        reply["type"] == "subscribed" || reply["type"] == "error",
        "{reply}"
    );
    a.subscribe("marker").await;

    publish_ok(
        &hub,
        "43",
        "calls",
        "call.status",
        json!({"secret": "org 43"}),
    )
    .await;
    let marker = publish_ok(&hub, "42", "marker", "e", json!("marker")).await;
    let ev = a.next_json(T).await;
    assert_eq!(
        ev["id"], marker,
        "org 42 received something before its marker: {ev}"
    );
}

/// Each malformed message gets `error`/`bad_request` and the socket keeps working afterwards.
#[actix_web::test]
async fn bad_messages_get_bad_request_and_socket_survives() {
    let hub = Hub::start(&[]);
    let (mut ws, _, _) = connect_user(&hub, "u1", "42").await;
    let long = "a".repeat(129);
    let cases: Vec<(&str, String)> = vec![
        ("malformed JSON", "{\"type\": \"subscribe\",".to_string()),
        ("not an object", "[1,2,3]".to_string()),
        ("no type", json!({"topic": "calls"}).to_string()),
        ("unknown type", json!({"type": "teleport"}).to_string()),
        ("missing topic", json!({"type": "subscribe"}).to_string()),
        (
            "uppercase topic",
            json!({"type": "subscribe", "topic": "UPPER"}).to_string(),
        ),
        (
            "129-char topic",
            json!({"type": "subscribe", "topic": long}).to_string(),
        ),
        (
            "topic starting with -",
            json!({"type": "subscribe", "topic": "-calls"}).to_string(),
        ),
        (
            "topic with space",
            json!({"type": "subscribe", "topic": "a b"}).to_string(),
        ),
        (
            "empty topic",
            json!({"type": "subscribe", "topic": ""}).to_string(),
        ),
        (
            "topic not a string",
            json!({"type": "subscribe", "topic": 42}).to_string(),
        ),
    ];
    let mut wrong = Vec::new();
    for (what, text) in &cases {
        ws.send_text(text).await;
        match ws.recv(T).await {
            Some(Frame::Json(v, _))
                if v["type"] == "error"
                    && v["code"] == "bad_request"
                    && v["message"].is_string() => {}
            other => wrong.push(format!(
                "{what} ({text}): want error bad_request with a message, got {other:?}"
            )),
        }
    }
    assert!(wrong.is_empty(), "bad inputs:\n{}", wrong.join("\n"));
    ws.assert_alive().await;
    ws.subscribe(&"a".repeat(128)).await;
    ws.subscribe("a0:b.c_d-e").await;
}

/// A client publish to `voice:abc:in` reaches another subscriber with `user` and `conn_id` added.
#[actix_web::test]
async fn client_publish_relays_with_sender_identity() {
    let hub = Hub::start(&[]);
    let (mut sender, welcome, _) = connect_user(&hub, "caller", "42").await;
    let (mut listener, _, _) = connect_user(&hub, "agent", "42").await;
    listener.subscribe("voice:abc:in").await;
    sender
        .send_json(&json!({"type": "publish", "topic": "voice:abc:in", "event": "transcript", "data": {"text": "hello"}}))
        .await;
    let ev = listener.next_json(T).await;
    assert_eq!(ev["type"], "event", "{ev}");
    assert_eq!(ev["topic"], "voice:abc:in", "{ev}");
    assert_eq!(ev["event"], "transcript", "{ev}");
    assert_eq!(ev["data"], json!({"text": "hello"}), "{ev}");
    assert_eq!(ev["user"], "caller", "{ev}");
    assert_eq!(ev["conn_id"], welcome["conn_id"], "{ev}");
    assert!(ev["id"].is_string(), "{ev}");
}

/// A client publish stays in the sender's org.
#[actix_web::test]
async fn client_publish_stays_in_org() {
    let hub = Hub::start(&[]);
    let (mut sender, _, _) = connect_user(&hub, "caller", "42").await;
    let (mut foreign, _, _) = connect_user(&hub, "spy", "43").await;
    foreign.subscribe("voice:abc:in").await;
    sender
        .send_json(&json!({"type": "publish", "topic": "voice:abc:in", "data": 1}))
        .await;
    let marker = publish_ok(&hub, "43", "voice:abc:in", "e", json!("marker")).await;
    let ev = foreign.next_json(T).await;
    assert_eq!(
        ev["id"], marker,
        "org 43 received org 42's client publish: {ev}"
    );
}

/// A client publish whose `data` exceeds `limits.client_event_bytes` is refused with
/// `bad_request` naming the limit and relays nothing; one within it is relayed.
#[actix_web::test]
async fn client_publish_over_client_event_bytes_is_refused() {
    let hub = Hub::start(&[("SWITCHBOARD__LIMITS__CLIENT_EVENT_BYTES", "1024")]);
    let (mut sender, _, _) = connect_user(&hub, "u1", "42").await;
    let (mut listener, _, _) = connect_user(&hub, "u2", "42").await;
    listener.subscribe("voice:abc:in").await;
    let big = "x".repeat(2000);
    let reply = sender
        .request(&json!({"type": "publish", "topic": "voice:abc:in", "data": {"text": big}}))
        .await;
    assert_eq!(
        (reply["type"].as_str(), reply["code"].as_str()),
        (Some("error"), Some("bad_request")),
        "{reply}"
    );
    assert!(
        reply["message"].as_str().unwrap_or("").contains("1024"),
        "{reply}"
    );
    sender
        .send_json(&json!({"type": "publish", "topic": "voice:abc:in", "data": {"text": "small"}}))
        .await;
    let ev = listener.next_json(T).await;
    assert_eq!(
        ev["data"]["text"], "small",
        "the oversized publish was relayed: {ev}"
    );
    sender.assert_alive().await;
}

/// Client publish outside `auth.client_publish` (e.g. `calls`) is `forbidden` and relays nothing.
#[actix_web::test]
async fn client_publish_to_calls_is_forbidden() {
    let hub = Hub::start(&[]);
    let (mut sender, _, _) = connect_user(&hub, "u1", "42").await;
    let (mut listener, _, _) = connect_user(&hub, "u2", "42").await;
    listener.subscribe("calls").await;
    let reply = sender
        .request(&json!({"type": "publish", "topic": "calls", "data": {"call_id": "fake", "status": "ended"}}))
        .await;
    assert_eq!(
        (reply["type"].as_str(), reply["code"].as_str()),
        (Some("error"), Some("forbidden")),
        "{reply}"
    );
    let marker = publish_ok(&hub, "42", "calls", "e", json!("marker")).await;
    let ev = listener.next_json(T).await;
    assert_eq!(ev["id"], marker, "the forbidden publish was relayed: {ev}");
    sender.assert_alive().await;
}

/// Streamed binary frames reach `binary:true` subscribers as the same bytes, and never as text.
#[actix_web::test]
async fn binary_stream_reaches_binary_subscribers() {
    let hub = Hub::start(&[]);
    let (mut sender, _, _) = connect_user(&hub, "caller", "42").await;
    let (mut bin, _, _) = connect_user(&hub, "agent", "42").await;
    let (mut text, _, _) = connect_user(&hub, "watcher", "42").await;
    let reply = bin
        .request(&json!({"type": "subscribe", "topic": "voice:abc:in", "binary": true}))
        .await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    text.subscribe("voice:abc:in").await;

    sender
        .send_json(&json!({"type": "stream", "topic": "voice:abc:in"}))
        .await;
    let audio: Vec<u8> = (0..=255u8).cycle().take(3200).collect();
    sender.send_binary(&audio).await;
    sender.send_binary(&audio[..160]).await;
    assert_eq!(bin.next_binary(T).await, audio);
    assert_eq!(bin.next_binary(T).await, &audio[..160]);

    let marker = publish_ok(&hub, "42", "voice:abc:in", "e", json!("marker")).await;
    let ev = text.next_json(T).await;
    assert_eq!(
        ev["id"], marker,
        "a text subscriber got the binary audio in some form: {ev}"
    );
    // JSON events on the topic still reach the binary subscriber, as text.
    let ev = bin.next_json(T).await;
    assert_eq!(ev["id"], marker, "binary subscriber and a JSON event: {ev}");
}

/// `stream` to a topic outside `auth.client_publish` is `forbidden`.
#[actix_web::test]
async fn stream_to_forbidden_topic_is_refused() {
    let hub = Hub::start(&[]);
    let (mut ws, _, _) = connect_user(&hub, "u1", "42").await;
    let reply = ws
        .request(&json!({"type": "stream", "topic": "calls"}))
        .await;
    assert_eq!(
        (reply["type"].as_str(), reply["code"].as_str()),
        (Some("error"), Some("forbidden")),
        "{reply}"
    );
}

/// The next text frame of `raw` as JSON, skipping the hub's pings.
async fn next_text(raw: &mut RawWs) -> serde_json::Value {
    loop {
        match raw.next_frame(T).await {
            Some(RawFrame::Frame {
                opcode: 0x1,
                payload,
            }) => return serde_json::from_slice(&payload).expect("JSON text frame"),
            Some(RawFrame::Frame { opcode: 0x9, .. }) => {}
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// A message sent in fragments (RFC 6455 section 5.4), with a Ping between them as the RFC
/// allows, is handled as the whole message: a text one split inside a UTF-8 character, and a
/// binary one streamed to a topic.
#[actix_web::test]
async fn fragmented_messages_are_assembled() {
    let hub = Hub::start(&[]);
    let (mut listener, _, _) = connect_user(&hub, "agent", "42").await;
    let reply = listener
        .request(&json!({"type": "subscribe", "topic": "voice:abc:in", "binary": true}))
        .await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    let cookie = dev_login(&hub, "caller", "42").await;
    let mut raw = RawWs::connect(&hub, ORIGIN, &cookie).await;
    assert_eq!(next_text(&mut raw).await["type"], "welcome");

    let publish = json!({"type": "publish", "topic": "voice:abc:in", "data": "é"}).to_string();
    let cut = publish.find('é').unwrap() + 1; // inside the two bytes of 'é'
    let mut frames = client_frame(0x1, false, &publish.as_bytes()[..cut]);
    frames.extend(client_frame(0x9, true, b"between"));
    frames.extend(client_frame(0x0, true, &publish.as_bytes()[cut..]));
    raw.send_raw(&frames).await.expect("send");
    let event = listener.next_json(T).await;
    assert_eq!(event["data"], "é", "{event}");

    let stream = json!({"type": "stream", "topic": "voice:abc:in"}).to_string();
    raw.send_raw(&client_frame(0x1, true, stream.as_bytes()))
        .await
        .expect("send");
    let audio: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
    let mut frames = client_frame(0x2, false, &audio[..1000]);
    frames.extend(client_frame(0x0, false, &audio[1000..2000]));
    frames.extend(client_frame(0x0, true, &audio[2000..]));
    raw.send_raw(&frames).await.expect("send");
    assert_eq!(listener.next_binary(T).await, audio);
}

/// A fragmented message is held to `limits.max_frame_bytes` as a whole: fragments each under
/// the limit but over it together close the socket with 1009, as one large frame does.
#[actix_web::test]
async fn fragmented_message_over_the_frame_limit_closes_1009() {
    let hub = Hub::start(&[("SWITCHBOARD__LIMITS__MAX_FRAME_BYTES", "1024")]);
    let cookie = dev_login(&hub, "u1", "42").await;
    let mut raw = RawWs::connect(&hub, ORIGIN, &cookie).await;
    assert_eq!(next_text(&mut raw).await["type"], "welcome");
    let mut frames = client_frame(0x1, false, &[b' '; 700]);
    frames.extend(client_frame(0x0, true, &[b' '; 700]));
    raw.send_raw(&frames).await.expect("send");
    let close = loop {
        match raw.next_frame(T).await {
            Some(RawFrame::Frame {
                opcode: 0x8,
                payload,
            }) => break payload,
            Some(RawFrame::Frame { opcode: 0x9, .. }) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    let code = u16::from_be_bytes([close[0], close[1]]);
    let reason = String::from_utf8_lossy(&close[2..]).into_owned();
    assert_close(
        (code, reason),
        1009,
        "frame too large (limit 1024 bytes)",
        "fragments over the limit",
    );
}

/// A binary frame with no stream set closes the socket with 1003.
#[actix_web::test]
async fn binary_without_stream_closes_1003() {
    let hub = Hub::start(&[]);
    let (mut ws, _, _) = connect_user(&hub, "u1", "42").await;
    ws.send_binary(&[1, 2, 3]).await;
    assert_close(
        ws.expect_only_close(T).await,
        1003,
        "binary frame without a stream",
        "binary without stream",
    );
}

/// Events for many topics and orgs interleave without crossing: each socket gets exactly its own.
#[actix_web::test]
async fn fan_out_delivers_exactly_the_entitled_events() {
    let hub = Hub::start(&[]);
    let (mut a, _, _) = connect_user(&hub, "a", "42").await;
    let (mut b, _, _) = connect_user(&hub, "b", "42").await;
    let (mut c, _, _) = connect_user(&hub, "c", "43").await;
    a.subscribe("call:1").await;
    b.subscribe("call:1").await;
    b.subscribe("call:2").await;
    c.subscribe("call:1").await;
    let mut want: [Vec<String>; 3] = Default::default();
    for i in 0..30 {
        let (org, topic) = [
            ("42", "call:1"),
            ("42", "call:2"),
            ("43", "call:1"),
            ("43", "call:2"),
        ][i % 4];
        let id = publish_ok(&hub, org, topic, "e", json!(i)).await;
        if org == "42" && topic == "call:1" {
            want[0].push(id.clone());
        }
        if org == "42" {
            want[1].push(id.clone());
        }
        if org == "43" && topic == "call:1" {
            want[2].push(id);
        }
    }
    for (i, ws) in [&mut a, &mut b, &mut c].into_iter().enumerate() {
        let mut got = Vec::new();
        for _ in 0..want[i].len() {
            let ev: Value = ws.next_json(T).await;
            got.push(ev["id"].as_str().unwrap_or("?").to_string());
        }
        assert_eq!(got, want[i], "socket {i} got the wrong events or order");
        assert!(
            ws.recv(Duration::from_millis(100)).await.is_none(),
            "socket {i} got extra events"
        );
    }
}

/// A burst published concurrently reaches every socket (they sit on both worker threads, and
/// some fall behind and queue while others are written at once) complete and in id order.
#[actix_web::test]
async fn concurrent_burst_arrives_complete_and_in_order_on_every_socket() {
    let hub = Hub::start(&[]);
    // Logins first, then the sockets back to back: connections are handed to the workers in
    // turn, so the sockets alternate between them.
    let mut cookies = Vec::new();
    for i in 0..6 {
        cookies.push(dev_login(&hub, &format!("u{i}"), "42").await);
    }
    let mut sockets = Vec::new();
    for cookie in &cookies {
        sockets.push(ws_open(&hub, Some(ORIGIN), Some(cookie)).await);
    }
    for ws in &mut sockets {
        assert_eq!(ws.next_json(T).await["type"], "welcome");
        ws.subscribe("calls").await;
    }
    let publishes = (0..200).map(|n| {
        let hub = &hub;
        async move { publish_ok(hub, "42", "calls", "call.status", json!({ "n": n })).await }
    });
    let mut want = publishes_in_waves(publishes, 16).await;
    want.sort_by_key(|id| parse_event_id(id));
    for (i, ws) in sockets.iter_mut().enumerate() {
        let mut got = Vec::new();
        for _ in 0..want.len() {
            let ev: Value = ws.next_json(T).await;
            got.push(ev["id"].as_str().unwrap_or("?").to_string());
        }
        assert_eq!(got, want, "socket {i} lost, repeated or reordered events");
    }
}

/// Run `futures` with at most `width` in flight; their answers, in completion order.
async fn publishes_in_waves<F: std::future::Future<Output = String>>(
    futures: impl Iterator<Item = F>,
    width: usize,
) -> Vec<String> {
    use futures_util::stream::StreamExt;
    futures_util::stream::iter(futures)
        .buffer_unordered(width)
        .collect()
        .await
}

/// Without history (embedded default), `since` is answered `recovered:false` and live events follow.
#[actix_web::test]
async fn since_without_history_is_not_recovered() {
    let hub = Hub::start(&[]);
    let (mut ws, _, _) = connect_user(&hub, "u1", "42").await;
    let old = publish_ok(&hub, "42", "call:abc", "call.status", json!({"n": 1})).await;
    publish_ok(&hub, "42", "call:abc", "call.status", json!({"n": 2})).await;
    let reply = ws
        .request(&json!({"type": "subscribe", "topic": "call:abc", "since": old}))
        .await;
    assert_eq!(
        reply,
        json!({"type": "subscribed", "topic": "call:abc", "recovered": false})
    );
    let live = publish_ok(&hub, "42", "call:abc", "call.status", json!({"n": 3})).await;
    assert_eq!(ws.next_json(T).await["id"], live);
}

/// With history on, `since` replays the retained events after it, in order, then live ones, no duplicates.
#[actix_web::test]
async fn since_replays_retained_events_then_live() {
    let hub = Hub::start(&[("SWITCHBOARD__HISTORY__ENABLED", "true")]);
    let (mut ws, _, _) = connect_user(&hub, "u1", "42").await;
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(publish_ok(&hub, "42", "call:abc", "call.status", json!({"n": n})).await);
    }
    publish_ok(
        &hub,
        "43",
        "call:abc",
        "call.status",
        json!({"other org": true}),
    )
    .await;
    let reply = ws
        .request(&json!({"type": "subscribe", "topic": "call:abc", "since": ids[0]}))
        .await;
    assert_eq!(
        reply,
        json!({"type": "subscribed", "topic": "call:abc", "recovered": true})
    );
    for (n, id) in ids.iter().enumerate().skip(1) {
        let ev = ws.next_json(T).await;
        assert_eq!(
            (ev["id"].as_str(), &ev["data"]),
            (Some(id.as_str()), &json!({"n": n})),
            "replayed event {n}"
        );
    }
    let live = publish_ok(&hub, "42", "call:abc", "call.status", json!({"n": 4})).await;
    assert_eq!(
        ws.next_json(T).await["id"],
        live,
        "the first event after the replay should be the live one"
    );
    assert!(
        ws.recv(std::time::Duration::from_millis(100))
            .await
            .is_none(),
        "duplicate after live event"
    );
}

/// A second `since` replay of the same topic on one connection soon after the first is
/// refused with `rate_limited` and replays nothing; a plain subscribe and other topics are
/// not affected.
#[actix_web::test]
async fn a_repeated_replay_of_a_topic_is_rate_limited() {
    let hub = Hub::start(&[("SWITCHBOARD__HISTORY__ENABLED", "true")]);
    let (mut ws, _, _) = connect_user(&hub, "u1", "42").await;
    let first = publish_ok(&hub, "42", "call:abc", "call.status", json!({"n": 0})).await;
    publish_ok(&hub, "42", "call:abc", "call.status", json!({"n": 1})).await;
    let subscribe = json!({"type": "subscribe", "topic": "call:abc", "since": first});
    let reply = ws.request(&subscribe).await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    assert_eq!(ws.next_json(T).await["data"]["n"], 1);
    let again = ws.request(&subscribe).await;
    assert_eq!(
        (again["type"].as_str(), again["code"].as_str()),
        (Some("error"), Some("rate_limited")),
        "{again}"
    );
    let other = ws
        .request(&json!({"type": "subscribe", "topic": "call:other", "since": first}))
        .await;
    assert_eq!(other["type"], "subscribed", "{other}");
    let live = publish_ok(&hub, "42", "call:abc", "call.status", json!({"n": 2})).await;
    let ev = ws.next_json(T).await;
    assert_eq!(ev["id"], live, "the refused replay sent something: {ev}");
    ws.assert_alive().await;
}

/// One connection's replays share `history.replay_max_bytes`: a second topic resumed right
/// after a first that used most of it is answered `recovered:false` with only what fits,
/// instead of every topic replaying a full budget.
#[actix_web::test]
async fn replays_of_one_connection_share_the_byte_budget() {
    let hub = Hub::start(&[
        ("SWITCHBOARD__HISTORY__ENABLED", "true"),
        ("SWITCHBOARD__HISTORY__REPLAY_MAX_BYTES", "1024"),
    ]);
    let (mut ws, _, _) = connect_user(&hub, "u1", "42").await;
    let text = "x".repeat(300);
    let mut firsts = Vec::new();
    for topic in ["call:a", "call:b"] {
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.push(publish_ok(&hub, "42", topic, "e", json!({ "t": text })).await);
        }
        firsts.push(ids[0].clone());
    }
    let a = ws
        .request(&json!({"type": "subscribe", "topic": "call:a", "since": firsts[0]}))
        .await;
    assert_eq!(a["recovered"], true, "{a}");
    for _ in 0..2 {
        assert_eq!(ws.next_json(T).await["topic"], "call:a");
    }
    let b = ws
        .request(&json!({"type": "subscribe", "topic": "call:b", "since": firsts[1]}))
        .await;
    assert_eq!(
        b,
        json!({"type": "subscribed", "topic": "call:b", "recovered": false}),
        "the second replay must fit what the first left of the budget"
    );
    let live = publish_ok(&hub, "42", "call:b", "e", json!(1)).await;
    assert_eq!(
        ws.next_json(T).await["id"],
        live,
        "nothing replayed past the budget"
    );
}

/// When history no longer reaches back to `since`, the subscribe says `recovered:false`.
#[actix_web::test]
async fn since_older_than_history_is_not_recovered() {
    let hub = Hub::start(&[
        ("SWITCHBOARD__HISTORY__ENABLED", "true"),
        ("SWITCHBOARD__HISTORY__MAX_LEN", "2"),
    ]);
    let (mut ws, _, _) = connect_user(&hub, "u1", "42").await;
    let first = publish_ok(&hub, "42", "call:abc", "call.status", json!({"n": 0})).await;
    for n in 1..5 {
        publish_ok(&hub, "42", "call:abc", "call.status", json!({"n": n})).await;
    }
    let reply = ws
        .request(&json!({"type": "subscribe", "topic": "call:abc", "since": first}))
        .await;
    assert_eq!(
        reply,
        json!({"type": "subscribed", "topic": "call:abc", "recovered": false})
    );
}

/// A `since` that is not an event id is `bad_request`.
#[actix_web::test]
async fn since_must_be_an_event_id() {
    let hub = Hub::start(&[]);
    let (mut ws, _, _) = connect_user(&hub, "u1", "42").await;
    let reply = ws
        .request(&json!({"type": "subscribe", "topic": "calls", "since": "yesterday"}))
        .await;
    assert_eq!(
        (reply["type"].as_str(), reply["code"].as_str()),
        (Some("error"), Some("bad_request")),
        "{reply}"
    );
}

/// With `demo.simulate_calls` a user of org `demo` sees call-status events shaped as documented.
#[actix_web::test]
async fn demo_simulator_feeds_the_demo_board() {
    let hub = Hub::start(&[("SWITCHBOARD__DEMO__SIMULATE_CALLS", "true")]);
    let (mut ws, _, _) = connect_user(&hub, "viewer", "demo").await;
    ws.subscribe("calls").await;
    let ev = ws.next_json(std::time::Duration::from_secs(20)).await;
    assert_eq!(
        (
            ev["type"].as_str(),
            ev["topic"].as_str(),
            ev["event"].as_str()
        ),
        (Some("event"), Some("calls"), Some("call.status")),
        "{ev}"
    );
    let data = ev["data"]
        .as_object()
        .unwrap_or_else(|| panic!("data not an object: {ev}"));
    for key in [
        "call_id",
        "status",
        "direction",
        "from",
        "to",
        "agent_id",
        "started_at",
        "ended_at",
        "ended_reason",
    ] {
        assert!(data.contains_key(key), "call-status data lacks {key}: {ev}");
    }
    let status = data["status"].as_str().unwrap_or("");
    assert!(
        ["queued", "ringing", "in-progress", "forwarding", "ended"].contains(&status),
        "status {status:?}"
    );
    let direction = data["direction"].as_str().unwrap_or("");
    assert!(
        ["inbound", "outbound"].contains(&direction),
        "direction {direction:?}"
    );
}

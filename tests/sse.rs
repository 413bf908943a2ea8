//! The Server-Sent Events fallback (`GET /sse`): the same origin and session rules as the
//! WebSocket, answered as HTTP refusals; events as `id:`/`event:`/`data:` records; and resume
//! from `Last-Event-ID` without a gap or a repeat.

mod common;

use common::*;
use serde_json::json;

/// A foreign origin gets 403 and no cookie 401, each with the JSON error the WebSocket's
/// `reject_before_upgrade` gives; nothing is streamed.
#[actix_web::test]
async fn sse_refusals_are_http_errors() {
    let hub = Hub::start(&[]);
    let cookie = dev_login(&hub, "u1", "42").await;
    match open_sse(
        &hub,
        "topic=calls",
        &[("origin", "https://evil.example"), ("cookie", &cookie)],
    )
    .await
    {
        Opened::Refused(status, body) => {
            assert_eq!(status, 403, "{body}");
            assert_eq!(body["error"], "origin_not_allowed", "{body}");
        }
        Opened::Stream(_) => panic!("a foreign origin was streamed events"),
    }
    match open_sse(&hub, "topic=calls", &[("origin", ORIGIN)]).await {
        Opened::Refused(status, body) => {
            assert_eq!(status, 401, "{body}");
            assert_eq!(body["error"], "unauthenticated", "{body}");
        }
        Opened::Stream(_) => panic!("a request without a session was streamed events"),
    }
}

/// Publish call `c1`'s `n`th status event to org 42's `calls`; returns its id.
async fn publish_call(hub: &Hub, n: u64) -> String {
    publish_ok(
        hub,
        "42",
        "calls",
        "call.status",
        json!({"call_id": "c1", "n": n}),
    )
    .await
}

/// Events arrive as records naming the event; a client that drops and comes back with
/// `Last-Event-ID` gets exactly the events it missed, in order.
#[actix_web::test]
async fn sse_streams_events_and_resumes_from_last_event_id() {
    let hub = Hub::start(&[("SWITCHBOARD__HISTORY__ENABLED", "true")]);
    let cookie = dev_login(&hub, "u1", "42").await;
    let headers = [("origin", ORIGIN), ("cookie", cookie.as_str())];
    let mut first = sse_stream(open_sse(&hub, "topic=calls", &headers).await);
    first.expect_welcome().await;

    let mut ids = Vec::new();
    for n in 1..=3 {
        ids.push(publish_call(&hub, n).await);
    }
    let mut last_cursor = String::new();
    for id in &ids {
        let record = first.next_event().await;
        assert_eq!(record.data["id"], id.as_str(), "{record:?}");
        last_cursor = record.id.expect("every event record has an id");
    }
    drop(first);

    for n in 4..=5 {
        ids.push(publish_call(&hub, n).await);
    }
    let resumed_headers = [
        ("origin", ORIGIN),
        ("cookie", cookie.as_str()),
        ("last-event-id", last_cursor.as_str()),
    ];
    let mut again = sse_stream(open_sse(&hub, "topic=calls", &resumed_headers).await);
    for (id, n) in ids[3..].iter().zip(4..) {
        let record = again.next_event().await;
        assert_eq!(
            record.data["id"],
            id.as_str(),
            "expected event {n}: {record:?}"
        );
        assert_eq!(record.data["data"]["n"], n, "{record:?}");
    }
}

/// A resume whose history exceeds what the stream can queue (`limits.outbound_queue`) sends
/// `resync` and the newest events that fit, then live ones, instead of ending the stream as
/// a slow consumer it never was.
#[actix_web::test]
async fn a_resume_larger_than_the_queue_resyncs_instead_of_closing() {
    let hub = Hub::start(&[
        ("SWITCHBOARD__HISTORY__ENABLED", "true"),
        ("SWITCHBOARD__LIMITS__OUTBOUND_QUEUE", "4"),
    ]);
    let cookie = dev_login(&hub, "u1", "42").await;
    let headers = [("origin", ORIGIN), ("cookie", cookie.as_str())];
    let mut first = sse_stream(open_sse(&hub, "topic=calls", &headers).await);
    first.expect_welcome().await;
    publish_call(&hub, 0).await;
    let cursor = first.next_event().await.id.expect("an id");
    drop(first);

    for n in 1..=10 {
        publish_call(&hub, n).await;
    }
    let resumed_headers = [
        ("origin", ORIGIN),
        ("cookie", cookie.as_str()),
        ("last-event-id", cursor.as_str()),
    ];
    let mut again = sse_stream(open_sse(&hub, "topic=calls", &resumed_headers).await);
    let mut names = Vec::new();
    loop {
        let record = again.next_record().await;
        assert_ne!(record.event.as_deref(), Some("close"), "{record:?}");
        if record.event.as_deref() == Some("call.status") {
            if record.data["data"]["n"] == 10 {
                break;
            }
        } else {
            names.push(record.event.clone().unwrap_or_default());
        }
    }
    assert!(names.iter().any(|n| n == "resync"), "{names:?}");
    let live = publish_call(&hub, 11).await;
    let record = again.next_event().await;
    assert_eq!(record.data["id"], live.as_str(), "{record:?}");
}

//! The Server-Sent Events fallback (`GET /sse`): the same origin and session rules as the
//! WebSocket, answered as HTTP refusals; events as `id:`/`event:`/`data:` records; and resume
//! from `Last-Event-ID` without a gap or a repeat.

mod common;

use std::pin::Pin;

use bytes::Bytes;
use common::*;
use futures_util::{Stream, StreamExt};
use serde_json::{json, Value};

/// One SSE record's fields.
#[derive(Debug)]
struct Record {
    id: Option<String>,
    event: Option<String>,
    data: Value,
}

/// An open `/sse` response, read record by record.
struct SseClient {
    body: Pin<Box<dyn Stream<Item = Result<Bytes, awc::error::PayloadError>>>>,
    buf: String,
}

/// What `GET /sse` answered: the open stream, or the refusal's status and JSON body.
enum Opened {
    Stream(SseClient),
    Refused(u16, Value),
}

async fn open_sse(hub: &Hub, query: &str, headers: &[(&str, &str)]) -> Opened {
    let mut req = client().get(hub.url(&format!("/sse?{query}")));
    for (k, v) in headers {
        req = req.insert_header((*k, *v));
    }
    let mut resp = req.send().await.expect("GET /sse");
    let status = resp.status().as_u16();
    if status != 200 {
        let body = resp.body().await.unwrap_or_default();
        return Opened::Refused(status, serde_json::from_slice(&body).unwrap_or(Value::Null));
    }
    Opened::Stream(SseClient {
        body: Box::pin(resp),
        buf: String::new(),
    })
}

impl SseClient {
    /// The next record that carries data; panics after `T` without one.
    async fn next_record(&mut self) -> Record {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let raw: String = self.buf.drain(..end + 2).collect();
                let mut record = Record {
                    id: None,
                    event: None,
                    data: Value::Null,
                };
                for line in raw.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        record.id = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        record.event = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        record.data = serde_json::from_str(v).unwrap_or(Value::String(v.into()));
                    }
                }
                if !record.data.is_null() {
                    return record;
                }
                continue;
            }
            let chunk = tokio::time::timeout(T, self.body.next())
                .await
                .unwrap_or_else(|_| panic!("no SSE record within {T:?}; have {:?}", self.buf))
                .expect("the SSE stream ended")
                .expect("read the SSE stream");
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

fn stream(opened: Opened) -> SseClient {
    match opened {
        Opened::Stream(s) => s,
        Opened::Refused(status, body) => panic!("/sse refused: {status} {body}"),
    }
}

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

impl SseClient {
    /// Wait for the `welcome` record: the stream is subscribed once it is sent, so an event
    /// published after this returns is this stream's to receive.
    async fn expect_welcome(&mut self) {
        let record = self.next_record().await;
        assert_eq!(record.event.as_deref(), Some("welcome"), "{record:?}");
    }

    /// The next `call.status` record (skipping the `welcome` record the stream opens with).
    async fn next_event(&mut self) -> Record {
        loop {
            let record = self.next_record().await;
            if record.event.as_deref() == Some("call.status") {
                return record;
            }
        }
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
    let mut first = stream(open_sse(&hub, "topic=calls", &headers).await);
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
    let mut again = stream(open_sse(&hub, "topic=calls", &resumed_headers).await);
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

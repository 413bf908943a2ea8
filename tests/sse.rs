//! The Server-Sent Events fallback (`GET /sse`): the same origin and session rules as the
//! WebSocket, answered as HTTP refusals; events as `id:`/`event:`/`data:` records; resume
//! from `Last-Event-ID` without a gap or a repeat; and a client that stops reading is cut off.

mod common;

use std::time::Instant;

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

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

/// `GET /sse?topic=calls` as user `u1` of org 42, by hand over a connection with a 4 KiB
/// receive buffer, read up to the `welcome` record. The test then reads no more until it
/// chooses to, so the hub's writes block soon.
async fn sse_that_stops_reading(hub: &Hub) -> TcpStream {
    let cookie = dev_login(hub, "u1", "42").await;
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut stream = socket.connect(hub.addr()).await.expect("connect");
    let request = format!(
        "GET /sse?topic=calls HTTP/1.1\r\nHost: {}\r\nOrigin: {ORIGIN}\r\nCookie: {cookie}\r\n\
         Connection: close\r\n\r\n",
        hub.addr()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("event: welcome") {
        let n = tokio::time::timeout(T, stream.read(&mut chunk))
            .await
            .expect("welcome within 5 s")
            .expect("read");
        assert!(
            n > 0,
            "ended before welcome: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&chunk[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    stream
}

/// Publish 80 events of 60 KB to org 42's `calls`: far more than the kernel buffers of a
/// loopback connection hold.
async fn publish_a_flood(hub: &Hub) {
    let client = client();
    let pad = "x".repeat(60_000);
    for n in 0..80 {
        let data = json!({"call_id": format!("c{n}"), "pad": pad});
        let (status, body) = publish_with(&client, hub, "42", "calls", "call.status", data).await;
        assert_eq!(status, 202, "publish {n}: {body}");
    }
}

/// Read until the hub ends the connection (a reset counts); panics if it lasts `T`.
async fn read_to_the_end(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 65536];
    let deadline = tokio::time::Instant::now() + T;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => panic!("the response still runs {T:?} after the client read again"),
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A client that stops reading its stream (records queued, not enough to overflow) is cut
/// off after `heartbeat.timeout_ms` without taking anything, as a WebSocket is, and counted
/// as a slow consumer; it does not hold its records (and connection) for ever.
#[actix_web::test]
async fn sse_client_that_takes_nothing_is_cut_off_after_the_stall_timeout() {
    let hub = Hub::start(&[
        ("SWITCHBOARD__HEARTBEAT__INTERVAL_MS", "200"),
        ("SWITCHBOARD__HEARTBEAT__TIMEOUT_MS", "1000"),
    ]);
    let mut stream = sse_that_stops_reading(&hub).await;
    let started = Instant::now();
    publish_a_flood(&hub).await;
    let (v, ok) = wait_metric(
        &hub,
        "switchboard_slow_consumer_disconnects_total",
        T,
        |v| v >= 1.0,
    )
    .await;
    assert!(
        ok,
        "not cut off {:?} after it stopped reading (stall timeout 1 s): slow consumers {v}",
        started.elapsed()
    );
    let got = read_to_the_end(&mut stream).await;
    let events = String::from_utf8_lossy(&got)
        .matches("event: call.status")
        .count();
    assert!(
        events < 80,
        "all 80 events arrived: the client was not cut off"
    );
}

/// A stream ended as a slow consumer (its queue of `limits.outbound_queue` records full) ends
/// its HTTP response with it, at once: the queued records are not kept for a client that
/// takes nothing, waiting to complete the response once it reads again.
#[actix_web::test]
async fn sse_slow_consumer_ends_its_response_with_the_stream() {
    let hub = Hub::start(&[
        ("SWITCHBOARD__LIMITS__OUTBOUND_QUEUE", "16"),
        // No stall timeout within the test: only the end of the stream may end the response.
        ("SWITCHBOARD__HEARTBEAT__TIMEOUT_MS", "60000"),
    ]);
    let mut stream = sse_that_stops_reading(&hub).await;
    publish_a_flood(&hub).await;
    let (v, ok) = wait_metric(
        &hub,
        "switchboard_slow_consumer_disconnects_total",
        T,
        |v| v >= 1.0,
    )
    .await;
    assert!(ok, "the stream was not ended as a slow consumer: {v}");
    let got = read_to_the_end(&mut stream).await;
    assert!(
        !got.ends_with(b"0\r\n\r\n"),
        "the response was completed after the stream ended, its queued records held for the client meanwhile: {}",
        String::from_utf8_lossy(&got[got.len().saturating_sub(300)..])
    );
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

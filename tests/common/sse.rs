//! The Server-Sent Events client: `open_sse` (the open stream, or the refusal), and
//! `SseClient`, which reads the stream record by record (`Record`).

use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::Value;

use super::http::client;
use super::process::Hub;
use super::T;

/// One SSE record's fields.
#[derive(Debug)]
pub struct Record {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: Value,
}

/// An open `/sse` response, read record by record.
pub struct SseClient {
    body: Pin<Box<dyn futures_util::Stream<Item = Result<Bytes, awc::error::PayloadError>>>>,
    buf: String,
}

/// What `GET /sse` answered: the open stream, or the refusal's status and JSON body.
pub enum Opened {
    Stream(SseClient),
    Refused(u16, Value),
}

pub async fn open_sse(hub: &Hub, query: &str, headers: &[(&str, &str)]) -> Opened {
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

/// The stream `GET /sse` opened; panics on a refusal.
pub fn sse_stream(opened: Opened) -> SseClient {
    match opened {
        Opened::Stream(s) => s,
        Opened::Refused(status, body) => panic!("/sse refused: {status} {body}"),
    }
}

impl SseClient {
    /// The next record that carries data; panics after `T` without one.
    pub async fn next_record(&mut self) -> Record {
        match self.record_within(T).await {
            Some(record) => record,
            None => panic!("no SSE record within {T:?}; have {:?}", self.buf),
        }
    }

    /// The next record that carries data, or None when `wait` passes without one.
    pub async fn record_within(&mut self, wait: Duration) -> Option<Record> {
        let deadline = tokio::time::Instant::now() + wait;
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
                    return Some(record);
                }
                continue;
            }
            let chunk = tokio::time::timeout_at(deadline, self.body.next())
                .await
                .ok()?
                .expect("the SSE stream ended")
                .expect("read the SSE stream");
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// Wait for the `welcome` record: the stream is subscribed once it is sent, so an event
    /// published after this returns is this stream's to receive.
    pub async fn expect_welcome(&mut self) {
        let record = self.next_record().await;
        assert_eq!(record.event.as_deref(), Some("welcome"), "{record:?}");
    }

    /// The next `call.status` record (skipping the `welcome` record the stream opens with).
    pub async fn next_event(&mut self) -> Record {
        loop {
            let record = self.next_record().await;
            if record.event.as_deref() == Some("call.status") {
                return record;
            }
        }
    }
}

//! One event as the hub carries it: the publish request that enters (from the HTTP API, a
//! browser, or Redis), and the [`Event`] it becomes, encoded once (JSON frame and complete
//! WebSocket frame) and shared by every socket that receives it. Pure: no I/O.

use std::sync::Arc;
use std::time::Instant;

use actix_http::ws::{OpCode, Parser};
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use serde_json::Value;

use super::ids::{ChannelKey, EventId, OrgId, Topic};
use super::wire::{encode_event, Sender};

/// A validated event on its way into the hub.
#[derive(Debug, Clone)]
pub(crate) struct PublishRequest {
    pub(crate) org: OrgId,
    pub(crate) topic: Topic,
    pub(crate) body: PublishBody,
    /// Set for events a browser published: relayed to subscribers as `user` and `conn_id`.
    pub(crate) sender: Option<EventSender>,
}

#[derive(Debug, Clone)]
pub(crate) enum PublishBody {
    Json { event: String, data: Value },
    Binary(Bytes),
}

#[derive(Debug, Clone)]
pub(crate) struct EventSender {
    pub(crate) user: String,
    pub(crate) conn_id: String,
}

impl PublishRequest {
    pub(crate) fn channel(&self) -> ChannelKey {
        ChannelKey::new(&self.org, &self.topic)
    }
}

/// One event, encoded once and shared by every socket that receives it.
#[derive(Debug)]
pub(crate) struct Event {
    pub(crate) channel: ChannelKey,
    pub(crate) id: EventId,
    /// The event name (`call.status`), for transports that label records (SSE).
    pub(crate) name: Box<str>,
    pub(crate) payload: Payload,
    /// The payload as one complete WebSocket frame (header included), written as it is to
    /// every socket that receives the event.
    pub(crate) ws_frame: Bytes,
    /// `data.call_id` when present: a slow consumer keeps only the newest event per key.
    pub(crate) conflation_key: Option<Box<str>>,
    /// When the broker received it, for `switchboard_delivery_seconds`.
    pub(crate) received_at: Instant,
}

#[derive(Debug, Clone)]
pub(crate) enum Payload {
    /// A complete `{"type":"event",...}` frame.
    Text(ByteString),
    /// Raw bytes for `binary:true` subscribers (browser-test audio).
    Binary(Bytes),
}

/// Encode an event once, for every socket that will receive it.
pub(crate) fn build_event(
    channel: ChannelKey,
    id: EventId,
    body: &PublishBody,
    sender: Option<&EventSender>,
    received_at: Instant,
) -> Arc<Event> {
    let (payload, conflation_key) = match body {
        PublishBody::Json { event, data } => {
            let frame = encode_event(
                channel.topic(),
                id,
                event,
                data,
                sender.map(|s| Sender {
                    user: &s.user,
                    conn_id: &s.conn_id,
                }),
            );
            let call_id = data
                .get("call_id")
                .and_then(Value::as_str)
                .map(|s| s.into());
            (Payload::Text(ByteString::from(frame)), call_id)
        }
        PublishBody::Binary(bytes) => (Payload::Binary(bytes.clone()), None),
    };
    let name = match body {
        PublishBody::Json { event, .. } => event.as_str().into(),
        PublishBody::Binary(_) => "binary".into(),
    };
    let ws_frame = ws_frame(&payload);
    Arc::new(Event {
        channel,
        id,
        name,
        payload,
        ws_frame,
        conflation_key,
        received_at,
    })
}

/// The complete server-to-client WebSocket frame of a payload (servers never mask).
fn ws_frame(payload: &Payload) -> Bytes {
    let (bytes, op) = match payload {
        Payload::Text(text) => (text.as_bytes(), OpCode::Text),
        Payload::Binary(bytes) => (bytes, OpCode::Binary),
    };
    let mut frame = BytesMut::with_capacity(bytes.len() + 10);
    Parser::write_message(&mut frame, &bytes[..], op, true, false);
    frame.freeze()
}

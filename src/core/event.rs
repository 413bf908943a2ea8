//! One event as the hub carries it: the publish request that enters (from the HTTP API, a
//! browser, or Redis), and the [`Event`] it becomes, encoded once (JSON frame and complete
//! WebSocket frame) and shared by every socket that receives it. Pure: no I/O.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use actix_http::ws::{OpCode, Parser};
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
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
    match body {
        PublishBody::Json { event, data } => {
            let frame = encode_event(channel.topic(), id, event, data, wire_sender(sender));
            let call_id = data.get("call_id").and_then(Value::as_str).map(Into::into);
            json_event(channel, id, event, frame, call_id, received_at)
        }
        PublishBody::Binary(bytes) => {
            let payload = Payload::Binary(bytes.clone());
            Arc::new(Event {
                channel,
                id,
                name: "binary".into(),
                ws_frame: ws_frame(&payload),
                payload,
                conflation_key: None,
                received_at,
            })
        }
    }
}

/// Encode an event whose `data` is checked JSON text (a message from Redis): the text goes
/// into the frame as it is, so the event is parsed once, to check it, and written once.
pub(crate) fn build_raw_event(
    channel: ChannelKey,
    id: EventId,
    event: &str,
    data: &RawValue,
    sender: Option<&EventSender>,
    received_at: Instant,
) -> Arc<Event> {
    let frame = encode_event(channel.topic(), id, event, data, wire_sender(sender));
    json_event(channel, id, event, frame, call_id_in(data), received_at)
}

fn wire_sender(sender: Option<&EventSender>) -> Option<Sender<'_>> {
    sender.map(|s| Sender {
        user: &s.user,
        conn_id: &s.conn_id,
    })
}

fn json_event(
    channel: ChannelKey,
    id: EventId,
    name: &str,
    frame: String,
    conflation_key: Option<Box<str>>,
    received_at: Instant,
) -> Arc<Event> {
    let payload = Payload::Text(ByteString::from(frame));
    Arc::new(Event {
        channel,
        id,
        name: name.into(),
        ws_frame: ws_frame(&payload),
        payload,
        conflation_key,
        received_at,
    })
}

/// `data.call_id` of checked JSON text, as `data.get("call_id")` of its [`Value`] reads it:
/// a string, the last one when the key repeats; none when `data` is not an object. Scans
/// the object's keys without building any of its values.
fn call_id_in(data: &RawValue) -> Option<Box<str>> {
    struct CallId(Option<Box<str>>);
    struct Text(Option<Box<str>>);

    impl<'de> Deserialize<'de> for CallId {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct Keys;
            impl<'de> Visitor<'de> for Keys {
                type Value = CallId;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<CallId, A::Error> {
                    let mut call_id = None;
                    while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                        if key == "call_id" {
                            call_id = map.next_value::<Text>()?.0;
                        } else {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                    Ok(CallId(call_id))
                }
            }
            deserializer.deserialize_map(Keys)
        }
    }

    impl<'de> Deserialize<'de> for Text {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct Any;
            impl<'de> Visitor<'de> for Any {
                type Value = Text;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("any JSON value")
                }
                fn visit_str<E: de::Error>(self, s: &str) -> Result<Text, E> {
                    Ok(Text(Some(s.into())))
                }
                fn visit_bool<E: de::Error>(self, _: bool) -> Result<Text, E> {
                    Ok(Text(None))
                }
                fn visit_i64<E: de::Error>(self, _: i64) -> Result<Text, E> {
                    Ok(Text(None))
                }
                fn visit_u64<E: de::Error>(self, _: u64) -> Result<Text, E> {
                    Ok(Text(None))
                }
                fn visit_f64<E: de::Error>(self, _: f64) -> Result<Text, E> {
                    Ok(Text(None))
                }
                fn visit_unit<E: de::Error>(self) -> Result<Text, E> {
                    Ok(Text(None))
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Text, A::Error> {
                    while seq.next_element::<IgnoredAny>()?.is_some() {}
                    Ok(Text(None))
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Text, A::Error> {
                    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                    Ok(Text(None))
                }
            }
            deserializer.deserialize_any(Any)
        }
    }

    // An error here only says `data` is not an object: the text was checked already.
    serde_json::from_str::<CallId>(data.get()).ok()?.0
}

/// The complete server-to-client WebSocket frame of a payload.
fn ws_frame(payload: &Payload) -> Bytes {
    match payload {
        Payload::Text(text) => server_frame(text.as_bytes(), OpCode::Text),
        Payload::Binary(bytes) => server_frame(bytes, OpCode::Binary),
    }
}

/// One complete, unfragmented server-to-client WebSocket frame (servers never mask).
pub(crate) fn server_frame(bytes: &[u8], op: OpCode) -> Bytes {
    let mut frame = BytesMut::with_capacity(bytes.len() + 10);
    Parser::write_message(&mut frame, bytes, op, true, false);
    frame.freeze()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::core::ids::{OrgId, Topic};

    fn channel() -> ChannelKey {
        ChannelKey::new(&OrgId::parse("1").unwrap(), &Topic::parse("calls").unwrap())
    }

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_string()).unwrap()
    }

    /// An event built from data as it arrived (from Redis) is the one built from its parsed
    /// value: the same frame once compact, the same conflation key.
    fn same_event(text: &str) -> Result<(), TestCaseError> {
        let sender = EventSender {
            user: "u".into(),
            conn_id: "c-1".into(),
        };
        let id = EventId { ms: 5, seq: 1 };
        let now = Instant::now();
        let data: Value = serde_json::from_str(text).unwrap();
        let body = PublishBody::Json {
            event: "call.status".into(),
            data,
        };
        for sender in [None, Some(&sender)] {
            let parsed = build_event(channel(), id, &body, sender, now);
            let as_is = build_raw_event(channel(), id, "call.status", &raw(text), sender, now);
            let (Payload::Text(a), Payload::Text(b)) = (&parsed.payload, &as_is.payload) else {
                panic!("text events");
            };
            let a: Value = serde_json::from_str(a).unwrap();
            let b: Value = serde_json::from_str(b).unwrap();
            prop_assert_eq!(a, b);
            prop_assert_eq!(&parsed.conflation_key, &as_is.conflation_key);
            prop_assert_eq!(&*parsed.name, &*as_is.name);
        }
        Ok(())
    }

    /// The conflation key of data as it arrived is read as the parsed value reads it: a
    /// string `call_id` only, the last of repeated keys, escapes undone, none outside an
    /// object.
    #[test]
    fn call_id_is_read_from_the_text_as_from_the_value() {
        for text in [
            r#"{"call_id":"c1","n":[1,{"call_id":"inner"}]}"#,
            r#"{"call_id":7}"#,
            r#"{"call_id":"a","call_id":"b"}"#,
            r#"{"call_id":"a","call_id":null}"#,
            r#"{"call\u005fid":"esc\"aped"}"#,
            r#"["call_id","c1"]"#,
            r#""call_id""#,
            r#"null"#,
            r#"{}"#,
        ] {
            same_event(text).unwrap();
        }
        assert_eq!(
            call_id_in(&raw(r#"{"call_id":"c1"}"#)).as_deref(),
            Some("c1")
        );
    }

    /// A frame built from data as it arrived carries that text as it is, so it is
    /// byte for byte the frame of the parsed value when the text was compact.
    #[test]
    fn compact_data_makes_the_same_frame() {
        let text = json!({"call_id": "c1", "n": 1.5, "s": "é\n"}).to_string();
        let id = EventId { ms: 5, seq: 1 };
        let now = Instant::now();
        let body = PublishBody::Json {
            event: "e".into(),
            data: serde_json::from_str(&text).unwrap(),
        };
        let parsed = build_event(channel(), id, &body, None, now);
        let as_is = build_raw_event(channel(), id, "e", &raw(&text), None, now);
        assert_eq!(parsed.ws_frame, as_is.ws_frame);
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            prop_oneof![Just("call_id".to_string()), ".{0,6}"].prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::vec(
                    (
                        prop_oneof![Just("call_id".to_string()), "[a-z_]{0,4}"],
                        inner
                    ),
                    0..4
                )
                .prop_map(|entries| Value::Object(entries.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(crate::core::fuzzing::config(256))]

        /// Any data, compact or pretty-printed (as a backend may PUBLISH it): the event built
        /// from its text equals the one built from its value.
        #[test]
        fn fuzz_raw_data_builds_the_same_event(data in json_value(), pretty in any::<bool>()) {
            let text = if pretty {
                serde_json::to_string_pretty(&data).unwrap()
            } else {
                data.to_string()
            };
            same_event(&text)?;
        }
    }
}

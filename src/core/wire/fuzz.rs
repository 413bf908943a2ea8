//! Fuzz target of the client-message decoder and the frame encoders: any text decodes to a
//! message or a typed refusal, a decoded message re-encodes to one that decodes the same, and
//! every frame the hub encodes is one JSON line.

use proptest::prelude::*;
use serde_json::{json, Map, Value};

use super::*;
use crate::core::fuzzing::{config, garbage, mutated};

/// A message as JSON again: what a client would have sent to get it.
fn to_json(message: &ClientMessage) -> Value {
    match message {
        ClientMessage::Subscribe {
            topic,
            since,
            binary,
        } => json!({"type":"subscribe","topic":topic,"since":since,"binary":binary}),
        ClientMessage::Unsubscribe { topic } => json!({"type":"unsubscribe","topic":topic}),
        ClientMessage::Publish { topic, data, event } => {
            json!({"type":"publish","topic":topic,"data":data,"event":event})
        }
        ClientMessage::Stream { topic } => json!({"type":"stream","topic":topic}),
        ClientMessage::Ping => json!({"type":"ping"}),
    }
}

/// JSON values of every shape, with huge and tiny numbers and tricky strings.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from), // NaN and infinities become null
        garbage(20).prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(garbage(8), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn text() -> impl Strategy<Value = Value> {
    prop_oneof![
        mutated("[a-z][a-z0-9:]{0,10}").prop_map(Value::from),
        garbage(12).prop_map(Value::from)
    ]
}

/// A well-formed client message, as JSON, with optional fields present or absent.
fn message() -> impl Strategy<Value = Value> {
    let opt = |v: BoxedStrategy<Value>| prop::option::of(v);
    prop_oneof![
        (
            text(),
            opt(text().boxed()),
            opt(any::<bool>().prop_map(Value::from).boxed())
        )
            .prop_map(|(topic, since, binary)| {
                let mut m = json!({"type":"subscribe","topic":topic});
                if let Some(since) = since {
                    m["since"] = since;
                }
                if let Some(binary) = binary {
                    m["binary"] = binary;
                }
                m
            }),
        text().prop_map(|topic| json!({"type":"unsubscribe","topic":topic})),
        (text(), any_json(), opt(text().boxed())).prop_map(|(topic, data, event)| {
            let mut m = json!({"type":"publish","topic":topic,"data":data});
            if let Some(event) = event {
                m["event"] = event;
            }
            m
        }),
        text().prop_map(|topic| json!({"type":"stream","topic":topic})),
        Just(json!({"type":"ping"})),
    ]
}

/// One structural change to a message that makes it wrong in a way a client might.
#[derive(Debug, Clone)]
enum Damage {
    DropField(prop::sample::Index),
    UnknownField(String, Value),
    Retype(prop::sample::Index, Value),
    RenameType(String),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        any::<prop::sample::Index>().prop_map(Damage::DropField),
        (garbage(8), any_json()).prop_map(|(k, v)| Damage::UnknownField(k, v)),
        (any::<prop::sample::Index>(), any_json()).prop_map(|(i, v)| Damage::Retype(i, v)),
        mutated("subscribe|publish|ping|stream|unsubscribe").prop_map(Damage::RenameType),
    ]
}

proptest! {
    #![proptest_config(config(256))]

    /// A well-formed message decodes, and what it decodes to re-encodes to the same JSON.
    #[test]
    fn fuzz_decode_roundtrip(message in message()) {
        let text = message.to_string();
        let decoded = ClientMessage::decode(&text);
        let decoded = match decoded {
            Ok(decoded) => decoded,
            // Only a string field may be refused, and only for not being a string.
            Err(e) => return Err(TestCaseError::fail(format!("{text}: {e}"))),
        };
        let again = to_json(&decoded);
        let decoded_again = ClientMessage::decode(&again.to_string())
            .map_err(|e| TestCaseError::fail(format!("{again}: {e}")))?;
        prop_assert_eq!(to_json(&decoded_again), again.clone());
        // Every field the client sent is kept as sent; absent ones take their defaults.
        for (key, value) in message.as_object().into_iter().flatten() {
            prop_assert_eq!(&again[key], value, "field {}", key);
        }
    }

    /// A damaged message is refused with the error kind that says what is wrong, and a
    /// refusal never panics or echoes an unbounded amount.
    #[test]
    fn fuzz_decode_damaged(message in message(), damage in damage()) {
        let mut message = message;
        let object = message.as_object_mut().expect("an object");
        let keys: Vec<String> = object.keys().cloned().collect();
        match &damage {
            Damage::DropField(i) => {
                object.remove(&keys[i.index(keys.len())]);
            }
            Damage::UnknownField(key, value) => {
                object.insert(key.clone(), value.clone());
            }
            Damage::Retype(i, value) => {
                object.insert(keys[i.index(keys.len())].clone(), value.clone());
            }
            Damage::RenameType(name) => {
                object.insert("type".into(), Value::from(name.clone()));
            }
        }
        let known = ["subscribe", "unsubscribe", "publish", "stream", "ping"];
        let text = message.to_string();
        match ClientMessage::decode(&text) {
            // Serde ignores extra fields beside a unit variant's tag: `ping` takes any.
            Ok(ClientMessage::Ping) => prop_assert_eq!(&message["type"], "ping"),
            Ok(decoded) => {
                let again = to_json(&decoded);
                for (key, value) in message.as_object().into_iter().flatten() {
                    prop_assert_eq!(&again[key], value, "{} kept {}", text, key);
                }
            }
            Err(BadFrame::Malformed(e)) => {
                return Err(TestCaseError::fail(format!("valid JSON called malformed: {text}: {e}")))
            }
            Err(BadFrame::UnknownType(name)) => {
                let given = message["type"].as_str().unwrap_or_default();
                prop_assert!(!known.contains(&given), "{} called unknown", given);
                prop_assert!(name.contains(given), "{name:?} should name {given:?}");
            }
            Err(BadFrame::Invalid(_)) => {}
        }
    }

    /// Any text at all: valid JSON is never called malformed, and only valid JSON decodes.
    /// (Invalid JSON may be refused for its first problem: `9*` is not a message before it
    /// is not JSON.)
    #[test]
    fn fuzz_decode_any_text(text in prop_oneof![
        garbage(200),
        message().prop_map(|m| m.to_string()).prop_flat_map(|t| mutated(Just(t))),
    ]) {
        let valid_json = serde_json::from_str::<Value>(&text).is_ok();
        match ClientMessage::decode(&text) {
            Err(BadFrame::Malformed(_)) => prop_assert!(!valid_json, "{}", text),
            Ok(_) => prop_assert!(valid_json, "{}", text),
            Err(BadFrame::UnknownType(_)) | Err(BadFrame::Invalid(_)) => {}
        }
    }

    /// Every frame the hub writes is one line of JSON that reads back as what was encoded
    /// (SSE puts it on one `data:` line).
    #[test]
    fn fuzz_encode_frames(
        topic in garbage(20), event in garbage(20), data in any_json(),
        user in garbage(10), conn in garbage(10), with_sender in any::<bool>(),
        ms in any::<u64>(), seq in any::<u64>(),
    ) {
        let sender = with_sender.then(|| Sender { user: &user, conn_id: &conn });
        let frame = encode_event(&topic, EventId { ms, seq }, &event, &data, sender);
        prop_assert!(!frame.contains(['\n', '\r']), "{frame}");
        prop_assert!(frame.starts_with(r#"{"type":"event","#), "{}", frame);
        let read: Value = serde_json::from_str(&frame).expect("JSON");
        prop_assert_eq!(&read["topic"], &Value::from(topic.clone()));
        prop_assert_eq!(&read["event"], &Value::from(event.clone()));
        prop_assert_eq!(&read["data"], &data);
        prop_assert_eq!(&read["id"], &Value::from(format!("{ms}-{seq}")));
        let error = ServerMessage::Error { code: ErrorCode::BadRequest, message: &event }.encode();
        prop_assert!(!error.contains(['\n', '\r']));
        let welcome = ServerMessage::Welcome {
            conn_id: conn.clone(), user: &user, org: &topic, heartbeat_ms: ms,
        }.encode();
        prop_assert!(serde_json::from_str::<Value>(&welcome).is_ok());
    }

    #[test]
    fn fuzz_event_names(name in prop_oneof![mutated("[a-z.]{1,64}"), garbage(70)]) {
        let expected = (1..=64).contains(&name.len())
            && name.chars().all(|c| c.is_ascii_graphic());
        prop_assert_eq!(validate_event_name(&name).is_ok(), expected, "{:?}", name);
    }
}

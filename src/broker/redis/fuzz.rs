//! Fuzz target of the history decoder and the event-message reader: Redis answers of any
//! shape, and answers shaped like HISTORY_LUA's with entries out of order, duplicated,
//! malformed or forged. A replay only holds entries the answer had, strictly after `since`
//! and in order, each a well-formed event; it claims recovery only when it can vouch for
//! `since`; and every well-formed entry in order is kept.

use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::core::fuzzing::{config, garbage, mutated};
use crate::core::ids::{OrgId, Topic};
use crate::core::wire::validate_event_name;

fn channel() -> ChannelKey {
    ChannelKey::new(
        &OrgId::parse("1").expect("org"),
        &Topic::parse("calls").expect("topic"),
    )
}

fn bulk(text: &str) -> RedisValue {
    RedisValue::BulkString(text.as_bytes().to_vec())
}

/// Any Redis value at all.
fn any_value() -> impl Strategy<Value = RedisValue> {
    let leaf = prop_oneof![
        Just(RedisValue::Nil),
        Just(RedisValue::Okay),
        any::<i64>().prop_map(RedisValue::Int),
        any::<f64>().prop_map(RedisValue::Double),
        any::<bool>().prop_map(RedisValue::Boolean),
        garbage(20).prop_map(|s| bulk(&s)),
        prop::collection::vec(any::<u8>(), 0..20).prop_map(RedisValue::BulkString),
        mutated("[0-9]{1,3}-[0-9]").prop_map(|s| bulk(&s)),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        prop::collection::vec(inner, 0..5).prop_map(RedisValue::Array)
    })
}

/// An event id, mostly small so that ids collide and cross `since`.
fn small_id() -> impl Strategy<Value = EventId> {
    prop_oneof![
        4 => (0..6u64, 0..3u64).prop_map(|(ms, seq)| EventId { ms, seq }),
        1 => (any::<u64>(), any::<u64>()).prop_map(|(ms, seq)| EventId { ms, seq }),
    ]
}

/// One history entry: its id text, its `m` field (or other fields), and whether it is
/// well-formed (parsable id, JSON with a valid name).
#[derive(Debug, Clone)]
struct Entry {
    id: String,
    fields: Vec<(String, Vec<u8>)>,
    well_formed: bool,
}

fn entry() -> impl Strategy<Value = Entry> {
    let name = prop_oneof![
        4 => Just(None),
        4 => Just(Some("call.status".to_string())),
        1 => mutated("[a-z.]{1,10}").prop_map(Some),
        1 => Just(Some("x\ndata: forged".to_string())),
    ];
    let id = prop_oneof![
        8 => small_id().prop_map(|id| (id.to_string(), true)),
        1 => mutated("[0-9]{1,2}-[0-9]").prop_map(|s| { let ok = EventId::parse(&s).is_some(); (s, ok) }),
    ];
    let message = (
        name,
        any::<u32>(),
        prop::option::of(("[a-z]{1,4}", "[a-z0-9-]{1,6}")),
    )
        .prop_map(|(name, n, sender)| {
            let mut m = json!({"data": {"n": n}});
            if let Some(name) = &name {
                m["event"] = json!(name);
            }
            if let Some((user, conn)) = sender {
                m["user"] = json!(user);
                m["conn_id"] = json!(conn);
            }
            let ok = name
                .as_deref()
                .is_none_or(|n| validate_event_name(n).is_ok());
            (m.to_string().into_bytes(), ok)
        });
    let field = prop_oneof![
        8 => message,
        1 => garbage(20).prop_map(|g| (g.into_bytes(), false)),
    ];
    (id, field, any::<bool>(), any::<bool>()).prop_map(
        |((id, id_ok), (m, m_ok), other_first, named_m)| {
            let key = if named_m { "m" } else { "x" };
            let mut fields = vec![(key.to_string(), m)];
            if other_first {
                fields.insert(0, ("y".to_string(), b"1".to_vec()));
            }
            Entry {
                id,
                fields,
                well_formed: id_ok && m_ok && named_m,
            }
        },
    )
}

fn encode(entry: &Entry) -> RedisValue {
    let fields = entry
        .fields
        .iter()
        .flat_map(|(k, v)| [bulk(k), RedisValue::BulkString(v.clone())])
        .collect();
    RedisValue::Array(vec![bulk(&entry.id), RedisValue::Array(fields)])
}

/// An answer shaped like HISTORY_LUA's, each slot sometimes replaced by any value.
fn answer() -> impl Strategy<Value = (Vec<RedisValue>, Vec<Entry>)> {
    let slot = |good: BoxedStrategy<RedisValue>| prop_oneof![9 => good, 1 => any_value()];
    (
        slot(prop_oneof![Just(RedisValue::Int(1)), Just(RedisValue::Int(0))].boxed()),
        slot(small_id().prop_map(|id| bulk(&id.to_string())).boxed()),
        slot((0..2i64).prop_map(RedisValue::Int).boxed()),
        slot(small_id().prop_map(|id| bulk(&id.to_string())).boxed()),
        slot((-1..8i64).prop_map(RedisValue::Int).boxed()),
        slot((0..8i64).prop_map(RedisValue::Int).boxed()),
        prop::collection::vec(entry(), 0..8),
        0..3usize,
    )
        .prop_map(|(flag, last, kept, oldest, added, length, entries, cut)| {
            let encoded = RedisValue::Array(entries.iter().map(encode).collect());
            let mut answer = vec![flag, last, kept, oldest, added, length, encoded];
            // Now and then an answer cut short.
            if cut == 0 {
                answer.truncate(answer.len() / 2);
            }
            (answer, entries)
        })
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn fuzz_history_of_any_shape(
        answer in prop::collection::vec(any_value(), 0..9),
        since in small_id(),
    ) {
        let replay = decode_history(&channel(), since, &answer);
        let mut previous = since;
        for event in &replay.events {
            prop_assert!(event.id > previous, "{} after {}", event.id, previous);
            previous = event.id;
            prop_assert!(validate_event_name(&event.name).is_ok(), "{:?}", event.name);
        }
    }

    #[test]
    fn fuzz_history_answers(answer in answer(), since in small_id()) {
        let (answer, entries) = answer;
        let replay = decode_history(&channel(), since, &answer);
        // Only ids the answer held, strictly after `since` and in the answer's order.
        let given: Vec<EventId> = entries.iter().filter_map(|e| EventId::parse(&e.id)).collect();
        let mut rest = given.iter();
        let mut previous = since;
        for event in &replay.events {
            prop_assert!(event.id > previous, "{} after {}", event.id, previous);
            previous = event.id;
            prop_assert!(rest.any(|&id| id == event.id), "{} invented or out of order", event.id);
            prop_assert!(validate_event_name(&event.name).is_ok(), "{:?}", event.name);
            prop_assert!(event.channel == channel());
        }
        // Recovery is claimed only for a stream that exists and reaches `since`.
        if replay.recovered {
            prop_assert!(matches!(answer.first(), Some(RedisValue::Int(1))));
            let last = answer
                .get(1)
                .and_then(|v| redis::from_redis_value::<String>(v).ok())
                .and_then(|s| EventId::parse(&s))
                .unwrap_or_default();
            prop_assert!(since <= last, "recovered with since {} after last {}", since, last);
        }
        // A well-formed answer keeps every well-formed entry that moves forward.
        let whole = answer.len() == 7 && matches!(answer[0], RedisValue::Int(1));
        if whole {
            let mut expected = Vec::new();
            let mut newest = since;
            for e in entries.iter().filter(|e| e.well_formed) {
                let id = EventId::parse(&e.id).expect("well-formed");
                if id > newest {
                    expected.push(id);
                    newest = id;
                }
            }
            let got: Vec<EventId> = replay.events.iter().map(|e| e.id).collect();
            prop_assert_eq!(got, expected);
        }
    }

    /// A message published straight to a channel: read or refused, never a bad name.
    #[test]
    fn fuzz_event_messages(payload in prop_oneof![
        garbage(120).prop_map(String::into_bytes),
        entry().prop_map(|e| e.fields.last().map(|(_, v)| v.clone()).unwrap_or_default()),
        mutated(Just(r#"{"id":"5-1","event":"call.status","data":{"call_id":"c1"},"user":"u","conn_id":"c"}"#.to_string()))
            .prop_map(String::into_bytes),
    ]) {
        if let Ok(message) = decode_message(&payload, u64::MAX) {
            prop_assert!(validate_event_name(&message.event).is_ok());
        }
    }
}

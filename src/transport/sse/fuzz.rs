//! Fuzz target of the `Last-Event-ID` parser: any header reads as a cursor without panicking,
//! a cursor the hub wrote reads back as itself, and a plain event id applies to every topic.

use proptest::prelude::*;

use super::*;
use crate::core::fuzzing::{config, garbage, mutated};

fn cursor() -> impl Strategy<Value = Cursor> {
    let topic = "[a-z0-9][a-z0-9:._-]{0,12}";
    let id = (any::<u64>(), any::<u64>()).prop_map(|(ms, seq)| EventId { ms, seq });
    prop::collection::btree_map(topic, id, 0..5).prop_map(|topics| Cursor { all: None, topics })
}

proptest! {
    #![proptest_config(config(256))]

    /// What the hub writes in `id:` is what it reads back from `Last-Event-ID`.
    #[test]
    fn fuzz_cursor_roundtrip(cursor in cursor(), probe in "[a-z]{1,3}") {
        let text = cursor.render();
        prop_assert!(!text.contains(['\n', '\r']), "{}", text);
        let parsed = Cursor::parse(&text);
        prop_assert_eq!(&parsed, &cursor, "{}", text);
        prop_assert_eq!(parsed.since(&probe), cursor.topics.get(&probe).copied());
    }

    /// Any header value: a cursor whose every position came from the text.
    #[test]
    fn fuzz_any_last_event_id(raw in prop_oneof![
        garbage(200),
        cursor().prop_flat_map(|c| mutated(Just(c.render()))),
        mutated("[0-9]{1,20}-[0-9]{1,20}"),
    ]) {
        let parsed = Cursor::parse(&raw);
        if let Some(all) = parsed.all {
            prop_assert!(parsed.topics.is_empty());
            prop_assert_eq!(EventId::parse(raw.trim()), Some(all));
            prop_assert_eq!(parsed.since("any"), Some(all));
        }
        for (topic, id) in &parsed.topics {
            prop_assert!(raw.contains(topic.as_str()), "{:?} not in {:?}", topic, raw);
            prop_assert_eq!(parsed.since(topic), Some(*id));
        }
    }
}

//! A session's bounded queue of events not yet handed to its socket, woken at most once per
//! batch. A socket that cannot keep up never grows the server's memory: past
//! `limits.outbound_queue` its outbox conflates (keeps the newest state per call) or asks for
//! the slow-consumer close, as `limits.slow_consumer` says (SPEC section 6).

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use futures_util::task::AtomicWaker;
use parking_lot::Mutex;

use crate::config::SlowConsumerPolicy;
use crate::core::event::{Event, Payload};
use crate::core::ids::ChannelKey;
use crate::core::metrics::metrics;

/// A session's queue of frames not yet handed to its socket.
pub(crate) struct Outbox {
    state: Mutex<OutboxState>,
    capacity: usize,
    policy: SlowConsumerPolicy,
    pub(crate) waker: AtomicWaker,
}

#[derive(Default)]
struct OutboxState {
    queue: VecDeque<Arc<Event>>,
    /// A `Flush` is on its way; no need to send another.
    wake_pending: bool,
    /// The slow-consumer close was ordered; drop everything after it.
    overflowed: bool,
}

/// What a push asks of the caller.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// Queued; a wake-up is already pending.
    Queued,
    /// Queued; send the session a `Flush`.
    Wake,
    /// The session must be closed as a slow consumer (reported once).
    Overflow,
    /// Dropped silently: the session is already closing.
    Dropped,
}

impl Outbox {
    pub(crate) fn new(capacity: usize, policy: SlowConsumerPolicy) -> Self {
        Self {
            state: Mutex::new(OutboxState::default()),
            capacity,
            policy,
            waker: AtomicWaker::new(),
        }
    }

    /// Wake this task when frames arrive (for drainers without a `Flush` mailbox). Register
    /// before draining, so a push between the two is never missed.
    pub(crate) fn register(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }

    pub(crate) fn push(&self, event: &Arc<Event>) -> Pushed {
        let mut state = self.state.lock();
        if state.overflowed {
            return Pushed::Dropped;
        }
        state.queue.push_back(event.clone());
        if state.queue.len() > self.capacity {
            let fits = match self.policy {
                SlowConsumerPolicy::Close => false,
                SlowConsumerPolicy::Conflate => {
                    let dropped = conflate(&mut state.queue);
                    metrics().conflated.inc_by(dropped as u64);
                    state.queue.len() <= self.capacity
                }
            };
            if !fits {
                state.overflowed = true;
                state.queue.clear();
                return Pushed::Overflow;
            }
        }
        if state.wake_pending {
            Pushed::Queued
        } else {
            state.wake_pending = true;
            Pushed::Wake
        }
    }

    /// Move every queued frame into `into` and clear the wake-up flag.
    pub(crate) fn drain_into(&self, into: &mut Vec<Arc<Event>>) {
        let mut state = self.state.lock();
        state.wake_pending = false;
        into.extend(state.queue.drain(..));
    }

    pub(crate) fn len(&self) -> usize {
        self.state.lock().queue.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Keep only the newest event per (channel, call) — or per channel for events without a
/// call id — preserving the order of the survivors. Returns how many were dropped.
fn conflate(queue: &mut VecDeque<Arc<Event>>) -> usize {
    let before = queue.len();
    let mut seen: HashSet<(ChannelKey, Option<Box<str>>, bool)> = HashSet::new();
    let mut keep = vec![false; before];
    for (i, event) in queue.iter().enumerate().rev() {
        let binary = matches!(event.payload, Payload::Binary(_));
        // Binary audio frames are a stream, not a state: never conflate them into each other.
        if binary {
            keep[i] = true;
            continue;
        }
        let key = (event.channel.clone(), event.conflation_key.clone(), binary);
        keep[i] = seen.insert(key);
    }
    let mut index = 0;
    queue.retain(|_| {
        let k = keep[index];
        index += 1;
        k
    });
    before - queue.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::ids::{EventId, OrgId, Topic};
    use bytes::Bytes;
    use bytestring::ByteString;
    use std::time::Instant;

    fn binary(topic: &str, seq: u64) -> Arc<Event> {
        let mut event = Arc::into_inner(event(topic, None, seq)).unwrap();
        event.payload = Payload::Binary(Bytes::from_static(b"audio"));
        Arc::new(event)
    }

    fn event(topic: &str, call: Option<&str>, seq: u64) -> Arc<Event> {
        let channel = ChannelKey::new(&OrgId::parse("1").unwrap(), &Topic::parse(topic).unwrap());
        Arc::new(Event {
            channel,
            id: EventId { ms: 1, seq },
            name: "test".into(),
            ws_frame: Bytes::new(),
            payload: Payload::Text(ByteString::from(format!("{seq}"))),
            conflation_key: call.map(Into::into),
            received_at: Instant::now(),
        })
    }

    fn drained(outbox: &Outbox) -> Vec<u64> {
        let mut out = Vec::new();
        outbox.drain_into(&mut out);
        out.iter().map(|e| e.id.seq).collect()
    }

    /// Only the first push of a batch asks for a wake-up.
    #[test]
    fn one_wake_per_batch() {
        let outbox = Outbox::new(10, SlowConsumerPolicy::Conflate);
        assert_eq!(outbox.push(&event("calls", None, 1)), Pushed::Wake);
        assert_eq!(outbox.push(&event("calls", None, 2)), Pushed::Queued);
        assert_eq!(drained(&outbox), vec![1, 2]);
        assert_eq!(outbox.push(&event("calls", None, 3)), Pushed::Wake);
    }

    /// A full queue keeps the newest state of every call, in order.
    #[test]
    fn conflation_keeps_latest_per_call() {
        let outbox = Outbox::new(3, SlowConsumerPolicy::Conflate);
        outbox.push(&event("calls", Some("a"), 1));
        outbox.push(&event("calls", Some("b"), 2));
        outbox.push(&event("calls", Some("a"), 3));
        assert_ne!(outbox.push(&event("calls", Some("b"), 4)), Pushed::Overflow);
        assert_eq!(drained(&outbox), vec![3, 4]);
    }

    /// When even the conflated queue is full, the consumer is closed once.
    #[test]
    fn overflow_when_conflation_cannot_help() {
        let outbox = Outbox::new(2, SlowConsumerPolicy::Conflate);
        outbox.push(&event("calls", Some("a"), 1));
        outbox.push(&event("calls", Some("b"), 2));
        assert_eq!(outbox.push(&event("calls", Some("c"), 3)), Pushed::Overflow);
        assert_eq!(outbox.push(&event("calls", Some("d"), 4)), Pushed::Dropped);
    }

    /// Policy `close` closes on the first event past capacity.
    #[test]
    fn close_policy() {
        let outbox = Outbox::new(1, SlowConsumerPolicy::Close);
        outbox.push(&event("calls", Some("a"), 1));
        assert_eq!(outbox.push(&event("calls", Some("a"), 2)), Pushed::Overflow);
    }

    /// Binary frames are a stream: a full queue conflates the JSON states around them and
    /// keeps every frame, and a queue of frames alone overflows rather than lose one.
    #[test]
    fn binary_frames_never_conflate() {
        let outbox = Outbox::new(3, SlowConsumerPolicy::Conflate);
        outbox.push(&binary("voice", 1));
        outbox.push(&event("voice", Some("a"), 2));
        outbox.push(&binary("voice", 3));
        assert_ne!(outbox.push(&event("voice", Some("a"), 4)), Pushed::Overflow);
        assert_eq!(drained(&outbox), vec![1, 3, 4]);

        let outbox = Outbox::new(2, SlowConsumerPolicy::Conflate);
        outbox.push(&binary("voice", 1));
        outbox.push(&binary("voice", 2));
        assert_eq!(outbox.push(&binary("voice", 3)), Pushed::Overflow);
    }

    /// After the slow-consumer close, nothing is queued or woken for again.
    #[test]
    fn an_overflowed_outbox_stays_empty() {
        let outbox = Outbox::new(1, SlowConsumerPolicy::Close);
        outbox.push(&event("calls", None, 1));
        assert_eq!(outbox.push(&event("calls", None, 2)), Pushed::Overflow);
        assert!(outbox.is_empty());
        assert_eq!(outbox.push(&event("calls", None, 3)), Pushed::Dropped);
        assert!(drained(&outbox).is_empty());
        assert_eq!(outbox.push(&event("calls", None, 4)), Pushed::Dropped);
    }

    /// Events without a call id conflate per topic.
    #[test]
    fn conflation_per_topic_without_call_id() {
        let mut q: VecDeque<_> = [
            event("a", None, 1),
            event("b", None, 2),
            event("a", None, 3),
        ]
        .into_iter()
        .collect();
        assert_eq!(conflate(&mut q), 1);
        assert_eq!(q.iter().map(|e| e.id.seq).collect::<Vec<_>>(), vec![2, 3]);
    }
}

//! A session's bounded queue of events not yet handed to its socket, woken at most once per
//! batch. A socket that cannot keep up never grows the server's memory: past
//! `limits.outbound_queue` its outbox conflates (keeps the newest state per call) or asks for
//! the slow-consumer close, as `limits.slow_consumer` says (SPEC section 6).
//!
//! Conflation costs O(1) amortised per push, because a full outbox is exactly when the hub
//! is overloaded: from the first time a queue runs over until it is drained, an index knows
//! the newest queued event of each conflation key and which queued events a newer one has
//! superseded, so running over again removes just those (each event at most once) and
//! leaves a hole in its slot; the holes are swept out when they outnumber the events.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures_util::task::AtomicWaker;
use parking_lot::Mutex;

use crate::config::SlowConsumerPolicy;
use crate::core::event::{Event, Payload};
use crate::core::metrics::metrics;

/// A session's queue of frames not yet handed to its socket.
pub(crate) struct Outbox {
    state: Mutex<OutboxState>,
    /// Whether the queue holds nothing, written under the lock whenever the queue changes:
    /// the fan-out asks this of every socket for every event, and reading it costs no lock.
    empty: AtomicBool,
    capacity: usize,
    policy: SlowConsumerPolicy,
    pub(crate) waker: AtomicWaker,
}

#[derive(Default)]
struct OutboxState {
    queue: Queue,
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
            empty: AtomicBool::new(true),
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
        state.queue.push(event.clone());
        self.empty.store(false, Ordering::Release);
        if state.queue.len() > self.capacity {
            let fits = match self.policy {
                SlowConsumerPolicy::Close => false,
                SlowConsumerPolicy::Conflate => {
                    let dropped = state.queue.conflate();
                    metrics().conflated.inc_by(dropped as u64);
                    state.queue.len() <= self.capacity
                }
            };
            if !fits {
                state.overflowed = true;
                state.queue = Queue::default();
                self.empty.store(true, Ordering::Release);
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
        state.queue.drain_into(into);
        self.empty.store(true, Ordering::Release);
    }

    pub(crate) fn len(&self) -> usize {
        self.state.lock().queue.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.empty.load(Ordering::Acquire)
    }
}

/// The events of an outbox in order, with what conflation needs to drop the superseded
/// ones without walking the queue.
#[derive(Default)]
struct Queue {
    /// Queued events in order; `None` is a hole left by one conflated away.
    slots: VecDeque<Option<Arc<Event>>>,
    /// Events queued (slots that are not holes).
    live: usize,
    /// Kept from the first conflation until the queue is drained (a queue that never runs
    /// over pays nothing for it: boxed, so it costs every session's outbox one pointer, not
    /// the index's 72 bytes).
    index: Option<Box<ConflationIndex>>,
}

#[derive(Default)]
struct ConflationIndex {
    /// Slot of the newest queued event of each key (binary frames have none).
    newest: HashMap<ConflationKey, usize>,
    /// Slots of queued events a newer one of the same key has superseded: the next
    /// conflation drops exactly these.
    superseded: Vec<usize>,
}

/// An event's conflation key, hashed and compared through the event it came from: the
/// channel and `data.call_id` (none: one state per channel).
struct ConflationKey(Arc<Event>);

impl PartialEq for ConflationKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.channel == other.0.channel && self.0.conflation_key == other.0.conflation_key
    }
}

impl Eq for ConflationKey {}

impl Hash for ConflationKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.channel.hash(state);
        self.0.conflation_key.hash(state);
    }
}

/// Binary audio frames are a stream, not a state: never conflated into each other.
fn conflates(event: &Event) -> bool {
    !matches!(event.payload, Payload::Binary(_))
}

impl Queue {
    fn len(&self) -> usize {
        self.live
    }

    fn push(&mut self, event: Arc<Event>) {
        let slot = self.slots.len();
        if let Some(index) = &mut self.index {
            index.note(slot, &event);
        }
        self.slots.push_back(Some(event));
        self.live += 1;
    }

    /// Keep only the newest event per (channel, call), or per channel for events without a
    /// call id, preserving the order of the survivors. Returns how many were dropped.
    fn conflate(&mut self) -> usize {
        let Some(index) = &mut self.index else {
            // The first time this queue runs over: index what it holds, once.
            self.index_slots();
            return self.conflate();
        };
        let dropped = index.superseded.len();
        for slot in index.superseded.drain(..) {
            self.slots[slot] = None;
        }
        self.live -= dropped;
        let holes = self.slots.len() - self.live;
        if holes > self.live.max(16) {
            self.sweep_holes();
        }
        dropped
    }

    /// Close up the holes (once they outnumber the events, so each hole is swept once) and
    /// re-index the events that stay, none of which is superseded.
    fn sweep_holes(&mut self) {
        self.slots.retain(Option::is_some);
        self.index_slots();
    }

    /// Index every queued event from scratch.
    fn index_slots(&mut self) {
        let mut index = ConflationIndex::default();
        for (slot, event) in self.slots.iter().enumerate() {
            if let Some(event) = event {
                index.note(slot, event);
            }
        }
        self.index = Some(Box::new(index));
    }

    fn drain_into(&mut self, into: &mut Vec<Arc<Event>>) {
        into.extend(self.slots.drain(..).flatten());
        self.live = 0;
        self.index = None;
    }
}

impl ConflationIndex {
    /// `event` is queued at `slot`: it supersedes the queued event of its key, if any.
    fn note(&mut self, slot: usize, event: &Arc<Event>) {
        if !conflates(event) {
            return;
        }
        if let Some(older) = self.newest.insert(ConflationKey(event.clone()), slot) {
            self.superseded.push(older);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::ids::{ChannelKey, EventId, OrgId, Topic};
    use bytes::Bytes;
    use bytestring::ByteString;
    use proptest::prelude::*;
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
        let outbox = Outbox::new(2, SlowConsumerPolicy::Conflate);
        outbox.push(&event("a", None, 1));
        outbox.push(&event("b", None, 2));
        assert_ne!(outbox.push(&event("a", None, 3)), Pushed::Overflow);
        assert_eq!(drained(&outbox), vec![2, 3]);
    }

    /// A queue that stays full while one call keeps changing conflates each push into the
    /// one slot of that call, its holes swept, and keeps the other calls' states in order.
    #[test]
    fn a_queue_kept_full_stays_in_order_and_bounded() {
        let outbox = Outbox::new(3, SlowConsumerPolicy::Conflate);
        outbox.push(&event("calls", Some("a"), 1));
        outbox.push(&event("calls", Some("b"), 2));
        outbox.push(&event("calls", Some("c"), 3));
        for seq in 4..1000 {
            assert_ne!(
                outbox.push(&event("calls", Some("b"), seq)),
                Pushed::Overflow
            );
            assert_eq!(outbox.len(), 3);
        }
        assert!(outbox.state.lock().queue.slots.len() <= 3 + 17);
        assert_eq!(drained(&outbox), vec![1, 3, 999]);
    }

    /// The outbox as it was before the conflation index: the whole queue conflated on every
    /// push past capacity. The property tests hold the indexed outbox to it.
    struct Reference {
        queue: VecDeque<Arc<Event>>,
        capacity: usize,
        policy: SlowConsumerPolicy,
        wake_pending: bool,
        overflowed: bool,
        conflated: usize,
    }

    impl Reference {
        fn push(&mut self, event: &Arc<Event>) -> Pushed {
            if self.overflowed {
                return Pushed::Dropped;
            }
            self.queue.push_back(event.clone());
            if self.queue.len() > self.capacity {
                let fits = match self.policy {
                    SlowConsumerPolicy::Close => false,
                    SlowConsumerPolicy::Conflate => {
                        self.conflated += reference_conflate(&mut self.queue);
                        self.queue.len() <= self.capacity
                    }
                };
                if !fits {
                    self.overflowed = true;
                    self.queue.clear();
                    return Pushed::Overflow;
                }
            }
            if std::mem::replace(&mut self.wake_pending, true) {
                Pushed::Queued
            } else {
                Pushed::Wake
            }
        }

        fn drain(&mut self) -> Vec<u64> {
            self.wake_pending = false;
            self.queue.drain(..).map(|e| e.id.seq).collect()
        }
    }

    /// The simple conflation: walk the queue from the newest, keep the first of each key.
    fn reference_conflate(queue: &mut VecDeque<Arc<Event>>) -> usize {
        let before = queue.len();
        let mut seen = std::collections::HashSet::new();
        let keep: Vec<bool> = queue
            .iter()
            .rev()
            .map(|e| {
                matches!(e.payload, Payload::Binary(_))
                    || seen.insert((e.channel.clone(), e.conflation_key.clone()))
            })
            .collect();
        let mut keep = keep.into_iter().rev();
        queue.retain(|_| keep.next().unwrap_or(true));
        before - queue.len()
    }

    /// One step of a property test: push an event (topic, call, binary) or drain.
    #[derive(Debug, Clone)]
    enum Step {
        Push {
            topic: u8,
            call: Option<u8>,
            binary: bool,
        },
        Drain,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            12 => (0u8..2, proptest::option::of(0u8..4), proptest::bool::weighted(0.1))
                .prop_map(|(topic, call, binary)| Step::Push { topic, call, binary }),
            1 => Just(Step::Drain),
        ]
    }

    proptest! {
        #![proptest_config(crate::core::fuzzing::config(256))]

        /// Whatever is pushed and drained, the indexed outbox answers every push, drains
        /// the same events in the same order, holds as many (and is empty when it is) and
        /// counts as many conflated as the simple one.
        #[test]
        fn fuzz_conflation_matches_the_simple_outbox(
            capacity in 1usize..6,
            close in proptest::bool::weighted(0.2),
            steps in proptest::collection::vec(step(), 0..200),
        ) {
            let policy = if close { SlowConsumerPolicy::Close } else { SlowConsumerPolicy::Conflate };
            let outbox = Outbox::new(capacity, policy);
            let mut reference = Reference {
                queue: VecDeque::new(),
                capacity,
                policy,
                wake_pending: false,
                overflowed: false,
                conflated: 0,
            };
            for (seq, step) in steps.into_iter().enumerate() {
                match step {
                    Step::Push { topic, call, binary: is_binary } => {
                        let topic = ["calls", "queues"][usize::from(topic)];
                        let e = if is_binary {
                            binary(topic, seq as u64)
                        } else {
                            event(topic, call.map(|c| ["a", "b", "c", "d"][usize::from(c)]), seq as u64)
                        };
                        let (live, before) = (outbox.len(), reference.conflated);
                        let answer = outbox.push(&e);
                        prop_assert_eq!(&answer, &reference.push(&e));
                        // What a push that fits conflated: the events it removed besides
                        // itself (one that overflows clears the queue either way).
                        if matches!(answer, Pushed::Wake | Pushed::Queued) {
                            prop_assert_eq!(live + 1 - outbox.len(), reference.conflated - before);
                        }
                    }
                    Step::Drain => prop_assert_eq!(drained(&outbox), reference.drain()),
                }
                prop_assert_eq!(outbox.len(), reference.queue.len());
                // The lock-free emptiness the fan-out reads agrees with the queue.
                prop_assert_eq!(outbox.is_empty(), reference.queue.is_empty());
                let slots = outbox.state.lock().queue.slots.len();
                prop_assert!(slots <= 2 * capacity + 17, "{} slots for {}", slots, capacity);
            }
            prop_assert_eq!(drained(&outbox), reference.drain());
        }
    }
}

//! One connection's budget for `since` replays. A replay is read once from history but
//! written to one socket, so a client could ask for the same history again and again, or for
//! every topic's at once: each connection may replay a topic again only after
//! [`REPLAY_REPEAT`], and the replays it is sent share `history.replay_max_bytes` per
//! [`REPLAY_REPEAT`] and the room left in its outbound queue. What does not fit is dropped
//! from the oldest end and the subscription is answered `recovered: false`, so the client
//! reloads state instead. Pure: the caller passes the clock.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::core::event::Event;
use crate::core::ids::ChannelKey;

/// How soon one connection may replay the same topic again, and the window in which its
/// replays share `history.replay_max_bytes`.
pub(crate) const REPLAY_REPEAT: Duration = Duration::from_secs(10);

pub(crate) struct ReplayBudget {
    /// Bytes of replayed frames the connection may still be sent (refills over
    /// [`REPLAY_REPEAT`] up to `max_bytes`).
    bytes: f64,
    max_bytes: f64,
    last: Instant,
    /// Topics replayed within the last [`REPLAY_REPEAT`], and when.
    recent: Vec<(ChannelKey, Instant)>,
}

impl ReplayBudget {
    pub(crate) fn new(max_bytes: usize, now: Instant) -> Self {
        Self {
            bytes: max_bytes as f64,
            max_bytes: max_bytes as f64,
            last: now,
            recent: Vec::new(),
        }
    }

    /// Whether `channel` may be replayed now; when it may, the replay counts from now.
    pub(crate) fn admit(&mut self, channel: &ChannelKey, now: Instant) -> bool {
        self.recent
            .retain(|(_, at)| now.saturating_duration_since(*at) < REPLAY_REPEAT);
        if self.recent.iter().any(|(c, _)| c == channel) {
            return false;
        }
        self.recent.push((channel.clone(), now));
        true
    }

    fn refill(&mut self, now: Instant) {
        let refill = now.saturating_duration_since(self.last).as_secs_f64()
            / REPLAY_REPEAT.as_secs_f64()
            * self.max_bytes;
        self.bytes = (self.bytes + refill).min(self.max_bytes);
        self.last = now;
    }

    /// The bytes a replay may read now.
    pub(crate) fn available(&mut self, now: Instant) -> usize {
        self.refill(now);
        self.bytes as usize
    }

    /// Keep the newest of `events` that fit both the byte budget and `room` more frames,
    /// spending their bytes; true when every event fitted.
    pub(crate) fn take(&mut self, events: &mut Vec<Arc<Event>>, room: usize, now: Instant) -> bool {
        self.refill(now);
        let mut fit = 0;
        for event in events.iter().rev().take(room) {
            let size = event.ws_frame.len() as f64;
            if size > self.bytes {
                break;
            }
            self.bytes -= size;
            fit += 1;
        }
        let dropped = events.len() - fit;
        events.drain(..dropped);
        dropped == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::event::Payload;
    use crate::core::ids::{EventId, OrgId, Topic};

    fn channel(topic: &str) -> ChannelKey {
        ChannelKey::new(&OrgId::parse("1").unwrap(), &Topic::parse(topic).unwrap())
    }

    /// `count` events of `size` bytes each, ids 1..=count.
    fn events(count: u64, size: usize) -> Vec<Arc<Event>> {
        (1..=count)
            .map(|ms| {
                Arc::new(Event {
                    channel: channel("calls"),
                    id: EventId { ms, seq: 0 },
                    name: "e".into(),
                    ws_frame: bytes::Bytes::from(vec![b'x'; size]),
                    payload: Payload::Text("x".into()),
                    conflation_key: None,
                    received_at: Instant::now(),
                })
            })
            .collect()
    }

    fn ids(events: &[Arc<Event>]) -> Vec<u64> {
        events.iter().map(|e| e.id.ms).collect()
    }

    /// A topic is replayed again only after REPLAY_REPEAT; other topics meanwhile are not
    /// held back.
    #[test]
    fn a_topic_is_replayed_again_only_after_the_repeat_interval() {
        let now = Instant::now();
        let mut budget = ReplayBudget::new(1000, now);
        assert!(budget.admit(&channel("calls"), now));
        assert!(budget.admit(&channel("queues"), now));
        assert!(!budget.admit(&channel("calls"), now + Duration::from_secs(1)));
        assert!(budget.admit(&channel("calls"), now + REPLAY_REPEAT));
    }

    /// The connection's replays share the byte budget: the newest that fit are kept, the
    /// rest dropped from the oldest end, and it refills over REPLAY_REPEAT.
    #[test]
    fn replays_share_the_byte_budget() {
        let now = Instant::now();
        let mut budget = ReplayBudget::new(1000, now);
        let mut first = events(3, 400);
        assert!(!budget.take(&mut first, usize::MAX, now));
        assert_eq!(ids(&first), [2, 3]);
        let mut second = events(1, 400);
        assert!(!budget.take(&mut second, usize::MAX, now));
        assert!(second.is_empty());
        assert_eq!(budget.available(now), 200);
        let mut later = events(2, 400);
        assert!(budget.take(&mut later, usize::MAX, now + REPLAY_REPEAT));
        assert_eq!(ids(&later), [1, 2]);
    }

    /// A replay takes no more frames than the outbound queue has room for.
    #[test]
    fn a_replay_fits_the_room_in_the_outbound_queue() {
        let now = Instant::now();
        let mut budget = ReplayBudget::new(1_000_000, now);
        let mut replay = events(5, 10);
        assert!(!budget.take(&mut replay, 2, now));
        assert_eq!(ids(&replay), [4, 5]);
        let mut small = events(2, 10);
        assert!(budget.take(&mut small, 2, now));
    }
}

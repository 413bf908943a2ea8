//! One connection's subscriptions and the bookkeeping that makes `since` resume exact:
//! while a channel's history is being fetched, its live events are held back; when the
//! history arrives, replay and held events go out in id order without duplicates, and live
//! events the replay already covered are skipped. Shared by both transports (WebSocket
//! session and SSE stream); pure, no I/O.

use std::sync::Arc;

use crate::protocol::{ChannelKey, EventId};
use crate::registry::Event;

#[derive(Default)]
struct Subscription {
    /// Live events held back while history is being replayed.
    held: Option<Vec<Arc<Event>>>,
    /// Events up to this id were already sent (by the replay); later duplicates are skipped.
    sent_through: Option<EventId>,
}

/// A connection holds one to a few subscriptions (at most `limits.max_subscriptions`), and
/// every live event looks its channel up here: a short vector scanned in place beats hashing
/// the channel name on each delivery.
#[derive(Default)]
pub struct Subscriptions {
    channels: Vec<(ChannelKey, Subscription)>,
}

impl Subscriptions {
    pub fn len(&self) -> usize {
        self.channels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }

    pub fn contains(&self, channel: &ChannelKey) -> bool {
        self.position(channel).is_some()
    }

    pub fn channels(&self) -> impl Iterator<Item = &ChannelKey> {
        self.channels.iter().map(|(channel, _)| channel)
    }

    fn position(&self, channel: &ChannelKey) -> Option<usize> {
        self.channels.iter().position(|(c, _)| c == channel)
    }

    fn get_mut(&mut self, channel: &ChannelKey) -> Option<&mut Subscription> {
        let i = self.position(channel)?;
        Some(&mut self.channels[i].1)
    }

    /// Subscribe (or re-subscribe), replacing any earlier state of the channel.
    fn insert(&mut self, channel: ChannelKey, subscription: Subscription) {
        match self.get_mut(&channel) {
            Some(existing) => *existing = subscription,
            None => self.channels.push((channel, subscription)),
        }
    }

    /// Subscribe for live events only.
    pub fn insert_live(&mut self, channel: ChannelKey) {
        self.insert(channel, Subscription::default());
    }

    /// Subscribe and hold live events until [`Self::finish_replay`].
    pub fn insert_replaying(&mut self, channel: ChannelKey) {
        self.insert(
            channel,
            Subscription {
                held: Some(Vec::new()),
                sent_through: None,
            },
        );
    }

    /// True when the channel was subscribed.
    pub fn remove(&mut self, channel: &ChannelKey) -> bool {
        match self.position(channel) {
            Some(i) => {
                self.channels.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// A live event from the outbox: `Some` to send it now; `None` when it is not wanted
    /// (unsubscribed, held for a replay, or already sent by one).
    pub fn admit_live(&mut self, event: Arc<Event>) -> Option<Arc<Event>> {
        let sub = self.get_mut(&event.channel)?;
        if let Some(held) = sub.held.as_mut() {
            held.push(event);
            return None;
        }
        if sub.sent_through.is_some_and(|last| event.id <= last) {
            return None;
        }
        Some(event)
    }

    /// History for `channel` arrived: the events to send, in order, without duplicates.
    /// `None` when the channel is no longer replaying (unsubscribed meanwhile).
    pub fn finish_replay(
        &mut self,
        channel: &ChannelKey,
        replayed: Vec<Arc<Event>>,
    ) -> Option<Vec<Arc<Event>>> {
        let sub = self.get_mut(channel)?;
        let held = sub.held.take()?;
        let mut out: Vec<Arc<Event>> = Vec::with_capacity(replayed.len() + held.len());
        for event in replayed.into_iter().chain(held) {
            if out.last().is_none_or(|last| event.id > last.id) {
                out.push(event);
            }
        }
        sub.sent_through = out.last().map(|e| e.id);
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{OrgId, Topic};
    use crate::registry::Payload;
    use std::time::Instant;

    fn channel() -> ChannelKey {
        ChannelKey::new(&OrgId::parse("1").unwrap(), &Topic::parse("calls").unwrap())
    }

    fn event(ms: u64) -> Arc<Event> {
        Arc::new(Event {
            channel: channel(),
            id: EventId { ms, seq: 0 },
            name: "e".into(),
            ws_frame: bytes::Bytes::new(),
            payload: Payload::Text("x".into()),
            conflation_key: None,
            received_at: Instant::now(),
        })
    }

    fn ids(events: &[Arc<Event>]) -> Vec<u64> {
        events.iter().map(|e| e.id.ms).collect()
    }

    /// Live events that overlap the replay go out once, in order, after it.
    #[test]
    fn replay_then_held_without_duplicates() {
        let mut subs = Subscriptions::default();
        subs.insert_replaying(channel());
        assert!(subs.admit_live(event(4)).is_none());
        assert!(subs.admit_live(event(5)).is_none());
        let out = subs
            .finish_replay(&channel(), vec![event(2), event(3), event(4)])
            .unwrap();
        assert_eq!(ids(&out), vec![2, 3, 4, 5]);
        // A live event the replay already covered (still queued) is skipped; newer ones pass.
        assert!(subs.admit_live(event(5)).is_none());
        assert_eq!(subs.admit_live(event(6)).map(|e| e.id.ms), Some(6));
    }

    /// Events of channels not subscribed are dropped; a replay for a channel left meanwhile is ignored.
    #[test]
    fn unsubscribed_channels() {
        let mut subs = Subscriptions::default();
        assert!(subs.admit_live(event(1)).is_none());
        subs.insert_replaying(channel());
        assert!(subs.remove(&channel()));
        assert!(subs.finish_replay(&channel(), vec![event(1)]).is_none());
    }
}

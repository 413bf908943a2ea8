//! One connection's subscriptions and the bookkeeping that makes `since` resume exact:
//! while a channel's history is being fetched, its live events are held back; when the
//! history arrives, replay and held events go out in id order without duplicates, and live
//! events the replay already covered are skipped. Held events are bounded: past the limit the
//! oldest are dropped (they precede the `subscribed` that the client has not yet received),
//! and a resume that lost some is not recovered. Shared by both transports (WebSocket
//! session and SSE stream); pure, no I/O.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::core::event::Event;
use crate::core::ids::{ChannelKey, EventId};

#[derive(Default)]
struct Subscription {
    /// Live events held back while history is being replayed (or, clustered, until Redis
    /// confirms the channel).
    held: Option<VecDeque<Arc<Event>>>,
    /// Held events were dropped for the limit.
    dropped: bool,
    /// Which request holds them: only its completion may release them, so a second
    /// subscribe to the channel while the first still waits cannot take or drop its events.
    hold: u64,
    /// Events up to this id were already sent (by the replay); later duplicates are skipped.
    sent_through: Option<EventId>,
}

/// A connection holds one to a few subscriptions (at most `limits.max_subscriptions`), and
/// every live event looks its channel up here: a short vector scanned in place beats hashing
/// the channel name on each delivery.
#[derive(Default)]
pub(crate) struct Subscriptions {
    channels: Vec<(ChannelKey, Subscription)>,
    holds_issued: u64,
    /// The most events held per channel (None: unbounded, until [`Self::limit_held`]).
    max_held: Option<usize>,
}

/// What a finished hold releases.
pub(crate) struct Finished {
    /// The events to send, in order.
    pub(crate) events: Vec<Arc<Event>>,
    /// Some held events were dropped for the limit.
    pub(crate) dropped: bool,
}

impl Subscriptions {
    pub(crate) fn len(&self) -> usize {
        self.channels.len()
    }

    /// How many live events `channel` holds now.
    pub(crate) fn held_len(&self, channel: &ChannelKey) -> usize {
        self.position(channel)
            .and_then(|i| self.channels[i].1.held.as_ref())
            .map_or(0, VecDeque::len)
    }

    /// Hold at most `max` events per channel (the connection's outbound queue: a burst that
    /// fits there must fit here too, and memory stays bounded).
    pub(crate) fn limit_held(&mut self, max: usize) {
        self.max_held = Some(max.max(1));
    }

    pub(crate) fn contains(&self, channel: &ChannelKey) -> bool {
        self.position(channel).is_some()
    }

    pub(crate) fn channels(&self) -> impl Iterator<Item = &ChannelKey> {
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
            None => {
                // Most sockets hold one subscription: room for exactly that, not the four
                // slots (~300 bytes) a first push would reserve; later growth still doubles.
                if self.channels.len() == self.channels.capacity() {
                    self.channels.reserve_exact(self.channels.len().max(1));
                }
                self.channels.push((channel, subscription));
            }
        }
    }

    /// Subscribe for live events only.
    pub(crate) fn insert_live(&mut self, channel: ChannelKey) {
        self.insert(channel, Subscription::default());
    }

    /// Subscribe and hold live events until [`Self::finish_replay`] with the returned hold.
    /// Events already held for an earlier request stay held, for this one to release.
    pub(crate) fn insert_replaying(&mut self, channel: ChannelKey) -> u64 {
        self.holds_issued += 1;
        let hold = self.holds_issued;
        match self.get_mut(&channel) {
            Some(existing) if existing.held.is_some() => existing.hold = hold,
            _ => self.insert(
                channel,
                Subscription {
                    held: Some(VecDeque::new()),
                    dropped: false,
                    hold,
                    sent_through: None,
                },
            ),
        }
        hold
    }

    /// True when the channel was subscribed.
    pub(crate) fn remove(&mut self, channel: &ChannelKey) -> bool {
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
    pub(crate) fn admit_live(&mut self, event: Arc<Event>) -> Option<Arc<Event>> {
        self.admits_live(&event).then_some(event)
    }

    /// [`Self::admit_live`] without taking the event: true to send it now. The fan-out asks
    /// this for every socket, and a clone of the event's `Arc` per socket would make both
    /// worker threads write its shared count; only an event held for a replay is cloned.
    pub(crate) fn admits_live(&mut self, event: &Arc<Event>) -> bool {
        let max_held = self.max_held;
        let Some(sub) = self.get_mut(&event.channel) else {
            return false;
        };
        if let Some(held) = sub.held.as_mut() {
            held.push_back(event.clone());
            if max_held.is_some_and(|max| held.len() > max) {
                held.pop_front();
                sub.dropped = true;
            }
            return false;
        }
        sub.sent_through.is_none_or(|last| event.id > last)
    }

    /// History for `channel` arrived (empty: none was asked for): the events to send, in
    /// order, without duplicates. `None` when `hold` no longer holds the channel
    /// (unsubscribed, or subscribed again, meanwhile).
    pub(crate) fn finish_replay(
        &mut self,
        channel: &ChannelKey,
        hold: u64,
        replayed: Vec<Arc<Event>>,
    ) -> Option<Finished> {
        let sub = self.get_mut(channel).filter(|sub| sub.hold == hold)?;
        let held = sub.held.take()?;
        let dropped = std::mem::take(&mut sub.dropped);
        if replayed.is_empty() {
            // Nothing to overlap with: the held live events go out as they came (ids of
            // binary and JSON events need not rise together).
            return Some(Finished {
                events: held.into(),
                dropped,
            });
        }
        let mut out: Vec<Arc<Event>> = Vec::with_capacity(replayed.len() + held.len());
        for event in replayed.into_iter().chain(held) {
            if out.last().is_none_or(|last| event.id > last.id) {
                out.push(event);
            }
        }
        sub.sent_through = out.last().map(|e| e.id);
        Some(Finished {
            events: out,
            dropped,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::event::Payload;
    use crate::core::ids::{OrgId, Topic};
    use std::time::Instant;

    fn channel() -> ChannelKey {
        ChannelKey::new(&OrgId::parse("1").unwrap(), &Topic::parse("calls").unwrap())
    }

    fn other_channel() -> ChannelKey {
        ChannelKey::new(
            &OrgId::parse("1").unwrap(),
            &Topic::parse("queues").unwrap(),
        )
    }

    fn event(ms: u64) -> Arc<Event> {
        event_on(channel(), ms)
    }

    fn event_on(channel: ChannelKey, ms: u64) -> Arc<Event> {
        Arc::new(Event {
            channel,
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
        let hold = subs.insert_replaying(channel());
        assert!(subs.admit_live(event(4)).is_none());
        assert!(subs.admit_live(event(5)).is_none());
        let out = subs
            .finish_replay(&channel(), hold, vec![event(2), event(3), event(4)])
            .unwrap()
            .events;
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
        let hold = subs.insert_replaying(channel());
        assert!(subs.remove(&channel()));
        assert!(subs
            .finish_replay(&channel(), hold, vec![event(1)])
            .is_none());
    }

    /// A second subscribe while the first still waits: only the second's completion
    /// releases the held events, and none of them is lost.
    #[test]
    fn a_second_subscribe_takes_over_the_held_events() {
        let mut subs = Subscriptions::default();
        let first = subs.insert_replaying(channel());
        assert!(subs.admit_live(event(4)).is_none());
        let second = subs.insert_replaying(channel());
        assert!(subs.admit_live(event(5)).is_none());
        assert!(subs.finish_replay(&channel(), first, Vec::new()).is_none());
        let out = subs
            .finish_replay(&channel(), second, vec![event(3)])
            .unwrap()
            .events;
        assert_eq!(ids(&out), vec![3, 4, 5]);
    }

    /// Without a replay, held events go out as they came, even when their ids do not rise
    /// (binary and JSON events are numbered apart), and nothing later is skipped.
    #[test]
    fn held_events_without_a_replay_pass_unfiltered() {
        let mut subs = Subscriptions::default();
        let hold = subs.insert_replaying(channel());
        assert!(subs.admit_live(event(7)).is_none());
        assert!(subs.admit_live(event(7)).is_none());
        assert!(subs.admit_live(event(6)).is_none());
        let out = subs
            .finish_replay(&channel(), hold, Vec::new())
            .unwrap()
            .events;
        assert_eq!(ids(&out), vec![7, 7, 6]);
        assert_eq!(subs.admit_live(event(5)).map(|e| e.id.ms), Some(5));
    }

    /// A replay holds only its own channel: events of the connection's other channels pass
    /// meanwhile, and its `sent_through` does not skip theirs.
    #[test]
    fn a_replay_holds_only_its_own_channel() {
        let mut subs = Subscriptions::default();
        subs.insert_live(other_channel());
        let hold = subs.insert_replaying(channel());
        assert!(subs.admit_live(event(5)).is_none());
        assert!(subs.admit_live(event_on(other_channel(), 1)).is_some());
        let out = subs
            .finish_replay(&channel(), hold, vec![event(4)])
            .unwrap()
            .events;
        assert_eq!(ids(&out), vec![4, 5]);
        assert!(subs.admit_live(event_on(other_channel(), 2)).is_some());
        assert!(subs.admit_live(event(5)).is_none());
    }

    /// Held events are bounded: past the limit the oldest are dropped, the release says so,
    /// and the next hold of the channel starts clean.
    #[test]
    fn held_events_are_bounded() {
        let mut subs = Subscriptions::default();
        subs.limit_held(3);
        let hold = subs.insert_replaying(channel());
        for ms in 1..=5 {
            assert!(subs.admit_live(event(ms)).is_none());
        }
        let out = subs.finish_replay(&channel(), hold, Vec::new()).unwrap();
        assert_eq!(ids(&out.events), vec![3, 4, 5]);
        assert!(out.dropped);
        let hold = subs.insert_replaying(channel());
        assert!(subs.admit_live(event(6)).is_none());
        let out = subs.finish_replay(&channel(), hold, Vec::new()).unwrap();
        assert_eq!(ids(&out.events), vec![6]);
        assert!(!out.dropped);
    }
}

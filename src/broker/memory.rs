//! The embedded broker: gives each event its id, keeps recent history when
//! `history.enabled` (server events only, unless `history.keep_client_events`), and hands
//! the event to the [`Registry`]. One node only; nothing leaves the process. The state lives
//! in an [`EventLog`] that a publisher takes on its own thread (an HTTP publish costs no hop
//! to another thread and back); the [`MemoryBroker`] actor answers the broker messages from
//! the same log and forgets idle channels. Each channel has a lock of its own, so publishes
//! to different channels never wait for each other.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use parking_lot::{Mutex, RwLock};

use super::{BrokerError, FetchHistory, Interest, Replay};
use crate::core::event::{build_event, Event, PublishBody, PublishRequest};
use crate::core::ids::{unix_ms, ChannelKey, EventId, OrgId};
use crate::core::metrics::metrics;
use crate::delivery::registry::Registry;

/// History limits for the embedded broker (same keys as the Redis streams use).
#[derive(Debug, Clone, Copy)]
pub(crate) struct HistoryLimits {
    pub(crate) max_len: usize,
    pub(crate) ttl: Duration,
    /// Topics of one org that may keep history at once.
    pub(crate) max_topics_per_org: usize,
    /// The most bytes of events one replay returns (the newest that fit).
    pub(crate) replay_max_bytes: usize,
    /// Whether browser-published events are kept too.
    pub(crate) keep_client_events: bool,
}

/// Every channel's last id and retained events. Each channel's own lock orders its events:
/// an event is numbered, logged and handed to the registry under it, so ids rise in the
/// order sockets receive them, and a replay sees either all of an event's effects or none.
/// Ordering is only ever promised per channel, so channels do not share a lock: the map of
/// channels is only written when a channel appears or is forgotten.
pub(crate) struct EventLog {
    registry: Arc<Registry>,
    history: Option<HistoryLimits>,
    channels: RwLock<HashMap<ChannelKey, Arc<Mutex<ChannelState>>>>,
    /// Per org, how many of its channels keep history (from their first kept event until
    /// they are forgotten as idle, as Redis keeps a stream until it expires). Taken only when
    /// a channel starts keeping history (under the channel's lock) and while idle channels
    /// are forgotten (which locks only channels nobody else holds, so never waits).
    kept: Mutex<HashMap<OrgId, usize>>,
}

#[derive(Default)]
struct ChannelState {
    last_id: EventId,
    /// The first id this process issued here: a `since` older than it may have missed events
    /// from before a restart.
    first_id: Option<EventId>,
    /// The newest event dropped from the log (by length or age).
    last_trimmed: Option<EventId>,
    log: VecDeque<Arc<Event>>,
    last_activity: Option<Instant>,
    /// Set once the channel keeps history: it counts towards this org's topics.
    kept_for: Option<OrgId>,
}

impl ChannelState {
    fn trim(&mut self, limits: HistoryLimits, now: Instant) {
        while self.log.len() > limits.max_len
            || self
                .log
                .front()
                .is_some_and(|e| now.duration_since(e.received_at) > limits.ttl)
        {
            if let Some(old) = self.log.pop_front() {
                self.last_trimmed = Some(old.id);
            }
        }
    }
}

impl EventLog {
    pub(crate) fn new(registry: Arc<Registry>, history: Option<HistoryLimits>) -> Self {
        Self {
            registry,
            history,
            channels: RwLock::default(),
            kept: Mutex::default(),
        }
    }

    /// The state of `channel`, created on its first event.
    fn channel(&self, channel: &ChannelKey) -> Arc<Mutex<ChannelState>> {
        if let Some(state) = self.channels.read().get(channel) {
            return state.clone();
        }
        self.channels
            .write()
            .entry(channel.clone())
            .or_default()
            .clone()
    }

    /// Number, log and deliver one event; embedded publishing cannot fail.
    pub(crate) fn publish(&self, request: &PublishRequest) -> EventId {
        let now = Instant::now();
        let channel = request.channel();
        let state = self.channel(&channel);
        let mut state = state.lock();
        let id = EventId::next_after(state.last_id, unix_ms());
        state.last_id = id;
        state.first_id.get_or_insert(id);
        state.last_activity = Some(now);
        let event = build_event(channel, id, &request.body, request.sender.as_ref(), now);
        metrics().events_received.inc();
        let keep = matches!(request.body, PublishBody::Json { .. });
        let history = self
            .history
            .filter(|h| request.sender.is_none() || h.keep_client_events);
        if let (Some(limits), true) = (history, keep) {
            let mut kept = state.kept_for.is_none().then(|| self.kept.lock());
            let org_topics = kept
                .as_mut()
                .map(|kept| kept.entry(request.org.clone()).or_default());
            if org_topics
                .as_ref()
                .is_some_and(|n| **n >= limits.max_topics_per_org)
            {
                log::warn!(
                    "{}: org {} already keeps history on {} topics (history.max_topics_per_org); event delivered live but not kept",
                    event.channel,
                    request.org.as_str(),
                    limits.max_topics_per_org
                );
            } else {
                if let Some(org_topics) = org_topics {
                    *org_topics += 1;
                    state.kept_for = Some(request.org.clone());
                }
                state.log.push_back(event.clone());
                state.trim(limits, now);
            }
        }
        self.registry.deliver(&event);
        id
    }

    /// The retained events of `channel` after `since`, at most `max_bytes` of them (and at
    /// most `history.replay_max_bytes`).
    pub(crate) fn replay(&self, channel: &ChannelKey, since: EventId, max_bytes: usize) -> Replay {
        let Some(limits) = self.history else {
            return Replay::default();
        };
        let Some(state) = self.channels.read().get(channel).cloned() else {
            return Replay::default();
        };
        let mut state = state.lock();
        state.trim(limits, Instant::now());
        let reaches_back = state.first_id.is_some_and(|first| since >= first)
            && state.last_trimmed.is_none_or(|trimmed| since >= trimmed)
            && since <= state.last_id;
        // The newest events after `since` that fit in the replay's bytes, oldest first.
        let mut budget = limits.replay_max_bytes.min(max_bytes);
        let mut events: Vec<Arc<Event>> = Vec::new();
        let mut cut = false;
        for event in state.log.iter().rev().take_while(|e| e.id > since) {
            let Some(left) = budget.checked_sub(event.ws_frame.len()) else {
                cut = true;
                break;
            };
            budget = left;
            events.push(event.clone());
        }
        events.reverse();
        Replay {
            events,
            recovered: reaches_back && !cut,
            // Only the pod catching up after a Redis outage asks for this; embedded has none.
            whole_stream: false,
        }
    }

    /// Forget channels with no event for longer than history keeps them (at least a minute),
    /// so a long-running hub does not keep every topic ever used.
    fn forget_idle(&self) {
        let now = Instant::now();
        let ttl = self.history.map(|h| h.ttl).unwrap_or(Duration::ZERO);
        let mut map = self.channels.write();
        let mut kept = self.kept.lock();
        map.retain(|_, state| {
            // Someone took the channel before this write lock and is about to publish or
            // replay on it: keep it, or its event would land in a state no longer listed.
            if Arc::strong_count(state) > 1 {
                return true;
            }
            let mut state = state.lock();
            if let Some(limits) = self.history {
                state.trim(limits, now);
            }
            let active = state
                .last_activity
                .is_some_and(|t| now.duration_since(t) <= ttl.max(Duration::from_secs(60)));
            if let (false, Some(org)) = (active, &state.kept_for) {
                if let Some(count) = kept.get_mut(org) {
                    *count = count.saturating_sub(1);
                }
            }
            active
        });
        kept.retain(|_, count| *count > 0);
    }
}

/// The embedded broker's actor: answers history from the shared [`EventLog`] and forgets
/// idle channels; publishes do not pass through it.
pub(crate) struct MemoryBroker {
    log: Arc<EventLog>,
}

impl MemoryBroker {
    pub(crate) fn new(log: Arc<EventLog>) -> Self {
        Self { log }
    }
}

impl Actor for MemoryBroker {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(Duration::from_secs(30), |this, _| this.log.forget_idle());
    }
}

impl Handler<Interest> for MemoryBroker {
    type Result = ();

    fn handle(&mut self, _: Interest, _: &mut Self::Context) {
        // Every event passes through the log anyway; nothing to subscribe to.
    }
}

impl Handler<FetchHistory> for MemoryBroker {
    type Result = Result<Replay, BrokerError>;

    fn handle(&mut self, msg: FetchHistory, _: &mut Self::Context) -> Self::Result {
        Ok(self.log.replay(&msg.channel, msg.since, msg.max_bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::ids::{OrgId, Topic};

    fn request(n: u32) -> PublishRequest {
        PublishRequest {
            org: OrgId::parse("1").unwrap(),
            topic: Topic::parse("calls").unwrap(),
            body: PublishBody::Json {
                event: "call.status".into(),
                data: serde_json::json!({ "n": n }),
            },
            sender: None,
        }
    }

    fn channel() -> ChannelKey {
        request(0).channel()
    }

    /// How long the tests' logs keep events.
    const TTL: Duration = Duration::from_secs(60);

    /// A log keeping `max_len` events for [`TTL`], replays of `replay_max_bytes`, with
    /// `count` events published.
    fn log_bounded(
        max_len: usize,
        replay_max_bytes: usize,
        count: u32,
    ) -> (EventLog, Vec<EventId>) {
        let limits = HistoryLimits {
            max_len,
            ttl: TTL,
            max_topics_per_org: 2,
            replay_max_bytes,
            keep_client_events: false,
        };
        let log = EventLog::new(Arc::default(), Some(limits));
        let ids = (1..=count).map(|n| log.publish(&request(n))).collect();
        (log, ids)
    }

    /// A log keeping `max_len` events for [`TTL`], with `count` events published.
    fn log_with(max_len: usize, count: u32) -> (EventLog, Vec<EventId>) {
        log_bounded(max_len, 1 << 20, count)
    }

    fn replayed(replay: &Replay) -> Vec<EventId> {
        replay.events.iter().map(|e| e.id).collect()
    }

    /// Ids rise with every publish, even many within one millisecond.
    #[test]
    fn ids_rise() {
        let (log, ids) = log_with(1000, 500);
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        assert_eq!(
            replayed(&log.replay(&channel(), ids[0], usize::MAX)),
            ids[1..]
        );
    }

    /// After an id this process issued, the later events are replayed, recovered; after the
    /// newest, nothing, still recovered.
    #[test]
    fn since_a_kept_id_is_recovered() {
        let (log, ids) = log_with(10, 3);
        let replay = log.replay(&channel(), ids[0], usize::MAX);
        assert_eq!(replayed(&replay), ids[1..]);
        assert!(replay.recovered);
        let replay = log.replay(&channel(), ids[2], usize::MAX);
        assert!(replay.events.is_empty());
        assert!(replay.recovered);
    }

    /// A `since` older than the first id this process issued (the client saw events before a
    /// restart) is not recovered, though everything kept is replayed.
    #[test]
    fn since_before_this_process_is_not_recovered() {
        let (log, ids) = log_with(10, 2);
        let before = EventId {
            ms: ids[0].ms - 1,
            seq: 0,
        };
        let replay = log.replay(&channel(), before, usize::MAX);
        assert_eq!(replayed(&replay), ids);
        assert!(!replay.recovered);
    }

    /// A `since` newer than any id issued is not recovered.
    #[test]
    fn since_in_the_future_is_not_recovered() {
        let (log, ids) = log_with(10, 2);
        let future = EventId {
            ms: ids[1].ms + 60_000,
            seq: 0,
        };
        let replay = log.replay(&channel(), future, usize::MAX);
        assert!(replay.events.is_empty());
        assert!(!replay.recovered);
    }

    /// Trimming by `max_len`: a `since` before the newest dropped event is not recovered; the
    /// newest dropped one itself is (everything after it is kept).
    #[test]
    fn since_trimmed_by_length() {
        let (log, ids) = log_with(2, 4);
        let replay = log.replay(&channel(), ids[0], usize::MAX);
        assert_eq!(replayed(&replay), ids[2..]);
        assert!(!replay.recovered);
        let replay = log.replay(&channel(), ids[1], usize::MAX);
        assert_eq!(replayed(&replay), ids[2..]);
        assert!(replay.recovered);
    }

    /// Trimming by age: events older than the TTL are dropped at the next replay, and a
    /// `since` before them is not recovered. (The log ages events by `std::time::Instant`,
    /// which tokio's paused clock does not move, so the test ages them by hand.)
    #[test]
    fn since_trimmed_by_age() {
        let (log, ids) = log_with(10, 3);
        let long_ago = Instant::now()
            .checked_sub(TTL + Duration::from_secs(1))
            .expect("the monotonic clock reaches back past the TTL");
        let state = log.channels.read().get(&channel()).unwrap().clone();
        for event in state.lock().log.iter_mut().take(2) {
            *event = Arc::new(Event {
                channel: event.channel.clone(),
                id: event.id,
                name: event.name.clone(),
                payload: event.payload.clone(),
                ws_frame: event.ws_frame.clone(),
                conflation_key: event.conflation_key.clone(),
                received_at: long_ago,
            });
        }
        let replay = log.replay(&channel(), ids[0], usize::MAX);
        assert_eq!(replayed(&replay), ids[2..]);
        assert!(!replay.recovered);
        let replay = log.replay(&channel(), ids[1], usize::MAX);
        assert_eq!(replayed(&replay), ids[2..]);
        assert!(replay.recovered);
    }

    /// Binary frames are live-only: not replayed, and they do not break recovery.
    #[test]
    fn binary_events_are_not_replayed() {
        let (log, ids) = log_with(10, 1);
        let mut binary = request(0);
        binary.body = PublishBody::Binary(bytes::Bytes::from_static(b"audio"));
        log.publish(&binary);
        let last = log.publish(&request(2));
        let replay = log.replay(&channel(), ids[0], usize::MAX);
        assert_eq!(replayed(&replay), [last]);
        assert!(replay.recovered);
    }

    /// Events a browser published are live only: not replayed, and they do not break
    /// recovery.
    #[test]
    fn client_events_are_not_kept() {
        let (log, ids) = log_with(10, 1);
        let mut from_browser = request(0);
        from_browser.sender = Some(crate::core::event::EventSender {
            user: "mallory".into(),
            conn_id: "c-1".into(),
        });
        log.publish(&from_browser);
        let last = log.publish(&request(2));
        let replay = log.replay(&channel(), ids[0], usize::MAX);
        assert_eq!(replayed(&replay), [last]);
        assert!(replay.recovered);
    }

    /// A replay holds at most `replay_max_bytes` of events: the newest that fit, not
    /// recovered, so the client reloads state instead of receiving all of history.
    #[test]
    fn a_replay_is_bounded_in_bytes() {
        // Every event here has a frame of the same size (`n` is one digit).
        let frame = log_with(10, 1)
            .0
            .replay(&channel(), EventId::default(), usize::MAX)
            .events[0]
            .ws_frame
            .len();
        let (log, ids) = log_bounded(10, frame * 3, 6);
        let replay = log.replay(&channel(), ids[0], usize::MAX);
        assert_eq!(replayed(&replay), ids[3..]);
        assert!(!replay.recovered);
        let replay = log.replay(&channel(), ids[2], usize::MAX);
        assert_eq!(replayed(&replay), ids[3..]);
        assert!(replay.recovered);
    }

    /// An org keeps history on at most `max_topics_per_org` topics (2 here): events of one
    /// more are delivered but not kept; its kept topics, and other orgs, carry on.
    #[test]
    fn history_per_org_is_bounded_by_topics() {
        let (log, _) = log_with(10, 0);
        let on = |org: &str, topic: &str, n: u32| PublishRequest {
            org: OrgId::parse(org).unwrap(),
            topic: Topic::parse(topic).unwrap(),
            ..request(n)
        };
        let kept = |org: &str, topic: &str| {
            let channel = on(org, topic, 0).channel();
            log.replay(&channel, EventId::default(), usize::MAX)
                .events
                .len()
        };
        for topic in ["a", "b", "c"] {
            log.publish(&on("1", topic, 1));
        }
        log.publish(&on("1", "a", 2));
        log.publish(&on("2", "c", 1));
        assert_eq!(
            [
                kept("1", "a"),
                kept("1", "b"),
                kept("1", "c"),
                kept("2", "c")
            ],
            [2, 1, 0, 1]
        );
    }

    /// With history off nothing is replayed and nothing is recovered.
    #[test]
    fn without_history_nothing_is_recovered() {
        let log = EventLog::new(Arc::default(), None);
        let id = log.publish(&request(1));
        log.publish(&request(2));
        let replay = log.replay(&channel(), id, usize::MAX);
        assert!(replay.events.is_empty());
        assert!(!replay.recovered);
    }
}

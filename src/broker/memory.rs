//! The embedded broker: an actor on its own thread that gives each event its id, keeps recent
//! history when `history.enabled`, and fans it out through the [`Registry`]. One node only;
//! nothing leaves the process.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::{build_event, BrokerError, FetchHistory, Interest, Publish, PublishBody, Replay};
use crate::metrics::metrics;
use crate::protocol::{unix_ms, ChannelKey, EventId};
use crate::registry::{Event, Registry};

/// History limits for the embedded broker (same keys as the Redis streams use).
#[derive(Debug, Clone, Copy)]
pub struct HistoryLimits {
    pub max_len: usize,
    pub ttl: Duration,
}

pub struct MemoryBroker {
    registry: Arc<Registry>,
    history: Option<HistoryLimits>,
    channels: HashMap<ChannelKey, ChannelState>,
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
}

impl MemoryBroker {
    pub fn new(registry: Arc<Registry>, history: Option<HistoryLimits>) -> Self {
        Self {
            registry,
            history,
            channels: HashMap::new(),
        }
    }

    fn trim(state: &mut ChannelState, limits: HistoryLimits, now: Instant) {
        while state.log.len() > limits.max_len
            || state
                .log
                .front()
                .is_some_and(|e| now.duration_since(e.received_at) > limits.ttl)
        {
            if let Some(old) = state.log.pop_front() {
                state.last_trimmed = Some(old.id);
            }
        }
    }
}

impl Actor for MemoryBroker {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Forget idle channels so a long-running hub does not keep every topic ever used.
        ctx.run_interval(Duration::from_secs(30), |this, _| {
            let now = Instant::now();
            let ttl = this.history.map(|h| h.ttl).unwrap_or(Duration::ZERO);
            this.channels.retain(|_, state| {
                if let Some(limits) = this.history {
                    Self::trim(state, limits, now);
                }
                state
                    .last_activity
                    .is_some_and(|t| now.duration_since(t) <= ttl.max(Duration::from_secs(60)))
            });
        });
    }
}

impl Handler<Publish> for MemoryBroker {
    type Result = Result<EventId, BrokerError>;

    fn handle(&mut self, msg: Publish, _: &mut Self::Context) -> Self::Result {
        let now = Instant::now();
        let request = msg.request;
        let channel = request.channel();
        let state = self.channels.entry(channel.clone()).or_default();
        let id = EventId::next_after(state.last_id, unix_ms());
        state.last_id = id;
        state.first_id.get_or_insert(id);
        state.last_activity = Some(now);
        let event = build_event(channel, id, &request.body, request.sender.as_ref(), now);
        metrics().events_received.inc();
        let keep = matches!(request.body, PublishBody::Json { .. });
        if let (Some(limits), true) = (self.history, keep) {
            state.log.push_back(event.clone());
            Self::trim(state, limits, now);
        }
        self.registry.deliver(&event);
        Ok(id)
    }
}

impl Handler<Interest> for MemoryBroker {
    type Result = ();

    fn handle(&mut self, _: Interest, _: &mut Self::Context) {
        // Every event passes through this actor anyway; nothing to subscribe to.
    }
}

impl Handler<FetchHistory> for MemoryBroker {
    type Result = Result<Replay, BrokerError>;

    fn handle(&mut self, msg: FetchHistory, _: &mut Self::Context) -> Self::Result {
        let (Some(limits), Some(state)) = (self.history, self.channels.get_mut(&msg.channel))
        else {
            return Ok(Replay::default());
        };
        Self::trim(state, limits, Instant::now());
        let since = msg.since;
        let reaches_back = state.first_id.is_some_and(|first| since >= first)
            && state.last_trimmed.is_none_or(|trimmed| since >= trimmed)
            && since <= state.last_id;
        let events = state.log.iter().filter(|e| e.id > since).cloned().collect();
        Ok(Replay {
            events,
            recovered: reaches_back,
        })
    }
}

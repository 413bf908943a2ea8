//! Pub/sub and history: where events enter the hub and how they reach this node's
//! [`Registry`](crate::delivery::registry::Registry). Two brokers answer the same messages:
//! [`memory::MemoryBroker`] (embedded, one node) and [`redis::RedisBroker`] (clustered). The
//! rest of the hub holds a [`BrokerHandle`] and never knows which one runs; publishes skip the
//! broker actor's thread (embedded: straight into the [`memory::EventLog`]; clustered:
//! straight to Redis), and the actor answers interest and history.

pub(crate) mod memory;
pub(crate) mod redis;

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::core::event::{Event, PublishRequest};
use crate::core::ids::{ChannelKey, EventId};
use crate::store::redis::CommandError;

/// Why an event was not accepted, or history not read. A publish that fails is never
/// answered with 2xx.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BrokerError {
    /// The broker knows it cannot take events now (Redis away); retry later.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// Redis did not take the command.
    #[error("broker unavailable: {0}")]
    Redis(#[from] CommandError),
    /// Redis answered a publish with something that is not an event id.
    #[error("broker unavailable: unexpected id {0:?} from Redis")]
    UnexpectedId(String),
    /// History was asked for a channel this pod has not subscribed to in time.
    #[error("{0} is not subscribed yet")]
    NotSubscribed(ChannelKey),
    /// The broker actor is gone or its mailbox is full.
    #[error("broker mailbox: {0}")]
    Mailbox(#[from] MailboxError),
}

/// This node's interest in a channel changed (first local subscriber came, or last one left).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub(crate) enum Interest {
    /// A local session joined a channel nobody here had.
    Opened,
    /// The last local subscriber left.
    Closed(ChannelKey),
}

/// Retained events of `channel` after `since`, for resume.
#[derive(Message)]
#[rtype(result = "Result<Replay, BrokerError>")]
pub(crate) struct FetchHistory {
    /// The channel to replay.
    pub(crate) channel: ChannelKey,
    /// The last event id the client saw.
    pub(crate) since: EventId,
    /// The most bytes of events to read (the connection's replay budget), within
    /// `history.replay_max_bytes`.
    pub(crate) max_bytes: usize,
}

/// The answer to [`FetchHistory`].
#[derive(Debug, Default)]
pub(crate) struct Replay {
    /// Events after `since`, oldest first.
    pub(crate) events: Vec<Arc<Event>>,
    /// False when history no longer reaches back to `since`: the client must reload state.
    pub(crate) recovered: bool,
    /// The events are every one the stream ever held after `since`: it was never trimmed
    /// and the replay was not cut. A `since` older than such a stream's first entry is not
    /// `recovered` (the stream may have expired and come back), but a caller that knows
    /// nothing was published between `since` and the stream's start can rely on it.
    pub(crate) whole_stream: bool,
}

/// Whether the broker can take events, and why not. Clustered, that takes both Redis
/// connections: the subscriber (events reach this node; judged by the canary) and the command
/// connection publishes go over (judged by the last command sent on it, the canary's publish
/// among them). Either one down is not ready, so a pod never says ready while it would refuse
/// publishes.
#[derive(Default)]
pub(crate) struct BrokerHealth {
    unavailable: AtomicBool,
    reason: Mutex<String>,
    commands_down: AtomicBool,
    commands_reason: Mutex<String>,
}

impl BrokerHealth {
    pub(crate) fn is_ready(&self) -> bool {
        !self.unavailable.load(Ordering::Acquire) && !self.commands_down.load(Ordering::Acquire)
    }

    pub(crate) fn reason(&self) -> String {
        if self.unavailable.load(Ordering::Acquire) {
            self.reason.lock().clone()
        } else {
            self.commands_reason.lock().clone()
        }
    }

    /// The subscriber delivers again.
    pub(crate) fn set_ready(&self) {
        self.unavailable.store(false, Ordering::Release);
    }

    /// The subscriber does not deliver.
    pub(crate) fn set_unavailable(&self, reason: &str) {
        *self.reason.lock() = reason.to_string();
        self.unavailable.store(true, Ordering::Release);
    }

    /// A command on the publish connection was answered (even with an error reply): it is up.
    pub(crate) fn command_answered(&self) {
        self.commands_down.store(false, Ordering::Release);
    }

    /// A command on the publish connection failed: when the connection itself failed (not
    /// Redis refusing the command), it is down until the next answer.
    pub(crate) fn command_failed(&self, error: &CommandError) {
        if error.is_connection_failure() {
            *self.commands_reason.lock() = format!("redis command connection: {error}");
            self.commands_down.store(true, Ordering::Release);
        } else {
            self.command_answered();
        }
    }
}

/// How long a subscription waits for Redis to confirm a channel new to this node before it
/// is acknowledged anyway (Redis away: the subscription takes effect when it is back).
pub(crate) const CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);

/// What the rest of the hub holds: one recipient per broker message, whichever broker runs.
#[derive(Clone)]
pub(crate) struct BrokerHandle {
    publish: PublishPath,
    pub(crate) interest: Recipient<Interest>,
    pub(crate) history: Recipient<FetchHistory>,
    pub(crate) health: Arc<BrokerHealth>,
    /// Clustered: the channels the Redis subscriber has confirmed, so events of them reach
    /// this node. None (embedded): every channel is live as soon as it is subscribed.
    live: Option<watch::Receiver<HashSet<ChannelKey>>>,
}

/// How a publish reaches the broker: on the publisher's own thread, never through the
/// broker actor's mailbox, which would cost every HTTP publish two cross-thread wake-ups.
#[derive(Clone)]
enum PublishPath {
    /// Embedded: the publisher numbers and delivers the event itself.
    Direct(Arc<memory::EventLog>),
    /// Clustered: the publisher sends the event to Redis itself.
    Redis(redis::RedisPublisher),
}

impl BrokerHandle {
    /// The handle of a broker actor answering interest and history, publishing by `publish`.
    fn of<A>(addr: &Addr<A>, publish: PublishPath, health: Arc<BrokerHealth>) -> Self
    where
        A: Actor<Context = Context<A>> + Handler<Interest> + Handler<FetchHistory>,
    {
        Self {
            publish,
            interest: addr.clone().recipient(),
            history: addr.clone().recipient(),
            health,
            live: None,
        }
    }

    /// The Redis broker: subscriptions count as made only once `live` holds their channel
    /// (its confirmed SUBSCRIBEs), and publishes go to Redis through `publisher`.
    pub(crate) fn clustered(
        addr: &Addr<redis::RedisBroker>,
        health: Arc<BrokerHealth>,
        live: watch::Receiver<HashSet<ChannelKey>>,
        publisher: redis::RedisPublisher,
    ) -> Self {
        Self {
            live: Some(live),
            ..Self::of(addr, PublishPath::Redis(publisher), health)
        }
    }

    /// Whether events of `channel` reach this node now.
    pub(crate) fn is_live(&self, channel: &ChannelKey) -> bool {
        self.live
            .as_ref()
            .is_none_or(|live| live.borrow().contains(channel))
    }

    /// Wait until events of `channel` reach this node, at most `timeout`; false when that
    /// did not happen in time (Redis away: the subscription takes effect once it is back).
    pub(crate) fn until_live(
        &self,
        channel: ChannelKey,
        timeout: Duration,
    ) -> impl Future<Output = bool> + 'static {
        let live = self.live.clone();
        async move {
            let Some(mut live) = live else {
                return true;
            };
            let confirmed = live.wait_for(|channels| channels.contains(&channel));
            let in_time = matches!(tokio::time::timeout(timeout, confirmed).await, Ok(Ok(_)));
            in_time
        }
    }

    /// The retained events of `channel` after `since`. History that cannot be read counts as
    /// not recovered (the client reloads state), and is logged.
    pub(crate) fn replay_since(
        &self,
        channel: ChannelKey,
        since: EventId,
        max_bytes: usize,
    ) -> impl Future<Output = Replay> + 'static {
        let history = self.history.clone();
        async move {
            let request = FetchHistory {
                channel: channel.clone(),
                since,
                max_bytes,
            };
            let answer = history.send(request).await.map_err(BrokerError::from);
            answer.and_then(|replay| replay).unwrap_or_else(|e| {
                log::warn!("history of {channel} unavailable: {e}");
                Replay::default()
            })
        }
    }

    /// The embedded broker: its actor answers interest and history, publishes go straight to
    /// the log both share.
    pub(crate) fn embedded(
        addr: &Addr<memory::MemoryBroker>,
        log: Arc<memory::EventLog>,
        health: Arc<BrokerHealth>,
    ) -> Self {
        Self::of(addr, PublishPath::Direct(log), health)
    }

    /// Publish and wait for acceptance (the HTTP API answers 202 only on `Ok`).
    pub(crate) async fn publish(&self, request: PublishRequest) -> Result<EventId, BrokerError> {
        if !self.health.is_ready() {
            return Err(BrokerError::Unavailable(self.health.reason()));
        }
        match &self.publish {
            PublishPath::Direct(log) => Ok(log.publish(&request)),
            PublishPath::Redis(publisher) => {
                let published = publisher.publish(request).await;
                match &published {
                    Err(BrokerError::Redis(e)) => self.health.command_failed(e),
                    _ => self.health.command_answered(),
                }
                published
            }
        }
    }

    /// Publish without waiting for the answer (a browser's binary stream frames): dropped
    /// when the broker cannot take events.
    pub(crate) fn publish_detached(&self, request: PublishRequest) {
        if !self.health.is_ready() {
            return;
        }
        match &self.publish {
            PublishPath::Direct(log) => {
                log.publish(&request);
            }
            PublishPath::Redis(publisher) => {
                let publisher = publisher.clone();
                // Spawned in order on this thread, so one socket's frames keep their order.
                actix::spawn(async move {
                    let _ = publisher.publish(request).await;
                });
            }
        }
    }
}

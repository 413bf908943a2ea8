//! The broker: where events enter the hub and how they reach the [`Registry`]. Two actors
//! implement the same messages: [`memory::MemoryBroker`] (embedded, one node) and the Redis
//! broker (clustered). The rest of the hub holds a [`BrokerHandle`] and never knows which one
//! runs; embedded publishes skip the actor's mailbox and go straight to its
//! [`memory::EventLog`]. This module also owns turning a publish request into the one shared,
//! encoded [`Event`], so both brokers encode identically.

pub mod memory;
pub mod redis;

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_http::ws::{OpCode, Parser};
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::watch;

use crate::protocol::{encode_event, ChannelKey, EventId, OrgId, Sender, Topic};
use crate::registry::{Event, Payload};

/// A validated event on its way into the hub.
#[derive(Debug, Clone)]
pub struct PublishRequest {
    pub org: OrgId,
    pub topic: Topic,
    pub body: PublishBody,
    /// Set for events a browser published: relayed to subscribers as `user` and `conn_id`.
    pub sender: Option<EventSender>,
}

#[derive(Debug, Clone)]
pub enum PublishBody {
    Json { event: String, data: Value },
    Binary(Bytes),
}

#[derive(Debug, Clone)]
pub struct EventSender {
    pub user: String,
    pub conn_id: String,
}

impl PublishRequest {
    pub fn channel(&self) -> ChannelKey {
        ChannelKey::new(&self.org, &self.topic)
    }
}

/// Why an event was not accepted. Never answered with 2xx.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerError {
    /// The broker cannot take events now (Redis away); retry later.
    Unavailable(String),
}

impl std::fmt::Display for BrokerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unavailable(why) => write!(f, "broker unavailable: {why}"),
        }
    }
}

/// Publish one event; answers its id once the broker has taken responsibility for it.
#[derive(Message)]
#[rtype(result = "Result<EventId, BrokerError>")]
pub struct Publish {
    /// The event to publish.
    pub request: PublishRequest,
}

/// This node's interest in a channel changed (first local subscriber came, or last one left).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub enum Interest {
    /// A local session joined a channel nobody here had.
    Opened(ChannelKey),
    /// The last local subscriber left.
    Closed(ChannelKey),
}

/// Retained events of `channel` after `since`, for resume.
#[derive(Message)]
#[rtype(result = "Result<Replay, BrokerError>")]
pub struct FetchHistory {
    /// The channel to replay.
    pub channel: ChannelKey,
    /// The last event id the client saw.
    pub since: EventId,
}

/// The answer to [`FetchHistory`].
#[derive(Debug, Default)]
pub struct Replay {
    /// Events after `since`, oldest first.
    pub events: Vec<Arc<Event>>,
    /// False when history no longer reaches back to `since`: the client must reload state.
    pub recovered: bool,
}

/// Whether the broker can take events, and why not.
#[derive(Default)]
pub struct BrokerHealth {
    unavailable: AtomicBool,
    reason: Mutex<String>,
}

impl BrokerHealth {
    pub fn is_ready(&self) -> bool {
        !self.unavailable.load(Ordering::Acquire)
    }

    pub fn reason(&self) -> String {
        self.reason.lock().clone()
    }

    pub fn set_ready(&self) {
        self.unavailable.store(false, Ordering::Release);
    }

    pub fn set_unavailable(&self, reason: &str) {
        *self.reason.lock() = reason.to_string();
        self.unavailable.store(true, Ordering::Release);
    }
}

/// How long a subscription waits for Redis to confirm a channel new to this node before it
/// is acknowledged anyway (Redis away: the subscription takes effect when it is back).
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);

/// What the rest of the hub holds: one recipient per broker message, whichever broker runs.
#[derive(Clone)]
pub struct BrokerHandle {
    publish: PublishPath,
    pub interest: Recipient<Interest>,
    pub history: Recipient<FetchHistory>,
    pub health: Arc<BrokerHealth>,
    /// Clustered: the channels the Redis subscriber has confirmed, so events of them reach
    /// this node. None (embedded): every channel is live as soon as it is subscribed.
    live: Option<watch::Receiver<HashSet<ChannelKey>>>,
}

/// How a publish reaches the broker.
#[derive(Clone)]
enum PublishPath {
    /// A message to the broker actor, answered when the event is accepted (clustered: once
    /// Redis took the PUBLISH).
    Mailbox(Recipient<Publish>),
    /// Embedded: the publisher numbers and delivers the event on its own thread, sparing
    /// every HTTP publish two cross-thread wake-ups.
    Direct(Arc<memory::EventLog>),
    /// Clustered: the publisher sends the event to Redis itself (the same two wake-ups).
    Redis(redis::RedisPublisher),
}

impl BrokerHandle {
    pub fn of<A>(addr: &Addr<A>, health: Arc<BrokerHealth>) -> Self
    where
        A: Actor<Context = Context<A>>
            + Handler<Publish>
            + Handler<Interest>
            + Handler<FetchHistory>,
    {
        Self {
            publish: PublishPath::Mailbox(addr.clone().recipient()),
            interest: addr.clone().recipient(),
            history: addr.clone().recipient(),
            health,
            live: None,
        }
    }

    /// The Redis broker: subscriptions count as made only once `live` holds their channel
    /// (its confirmed SUBSCRIBEs), and publishes go to Redis from the publisher's own thread
    /// through `publisher`, not through the actor.
    pub fn clustered(
        addr: &Addr<redis::RedisBroker>,
        health: Arc<BrokerHealth>,
        live: watch::Receiver<HashSet<ChannelKey>>,
        publisher: redis::RedisPublisher,
    ) -> Self {
        Self {
            publish: PublishPath::Redis(publisher),
            live: Some(live),
            ..Self::of(addr, health)
        }
    }

    /// Whether events of `channel` reach this node now.
    pub fn is_live(&self, channel: &ChannelKey) -> bool {
        self.live
            .as_ref()
            .is_none_or(|live| live.borrow().contains(channel))
    }

    /// Wait until events of `channel` reach this node, at most `timeout`; false when that
    /// did not happen in time (Redis away: the subscription takes effect once it is back).
    pub fn until_live(
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
    pub fn replay_since(
        &self,
        channel: ChannelKey,
        since: EventId,
    ) -> impl Future<Output = Replay> + 'static {
        let history = self.history.clone();
        async move {
            let request = FetchHistory {
                channel: channel.clone(),
                since,
            };
            let answer = match history.send(request).await {
                Ok(answer) => answer.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            answer.unwrap_or_else(|e| {
                log::warn!("history of {channel} unavailable: {e}");
                Replay::default()
            })
        }
    }

    /// The embedded broker: its actor answers interest and history, publishes go straight to
    /// the log both share.
    pub fn embedded(
        addr: &Addr<memory::MemoryBroker>,
        log: Arc<memory::EventLog>,
        health: Arc<BrokerHealth>,
    ) -> Self {
        Self {
            publish: PublishPath::Direct(log),
            ..Self::of(addr, health)
        }
    }

    /// Publish and wait for acceptance (the HTTP API answers 202 only on `Ok`).
    pub async fn publish(&self, request: PublishRequest) -> Result<EventId, BrokerError> {
        if !self.health.is_ready() {
            return Err(BrokerError::Unavailable(self.health.reason()));
        }
        match &self.publish {
            PublishPath::Direct(log) => Ok(log.publish(&request)),
            PublishPath::Redis(publisher) => publisher.publish(request).await,
            PublishPath::Mailbox(broker) => broker
                .send(Publish { request })
                .await
                .map_err(|e| BrokerError::Unavailable(format!("broker mailbox: {e}")))?,
        }
    }

    /// Publish without waiting for the answer (a browser's binary stream frames): dropped
    /// when the broker cannot take events.
    pub fn publish_detached(&self, request: PublishRequest) {
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
            PublishPath::Mailbox(broker) => broker.do_send(Publish { request }),
        }
    }
}

/// Encode an event once, for every socket that will receive it.
pub fn build_event(
    channel: ChannelKey,
    id: EventId,
    body: &PublishBody,
    sender: Option<&EventSender>,
    received_at: Instant,
) -> Arc<Event> {
    let (payload, conflation_key) = match body {
        PublishBody::Json { event, data } => {
            let frame = encode_event(
                channel.topic(),
                id,
                event,
                data,
                sender.map(|s| Sender {
                    user: &s.user,
                    conn_id: &s.conn_id,
                }),
            );
            let call_id = data
                .get("call_id")
                .and_then(Value::as_str)
                .map(|s| s.into());
            (Payload::Text(ByteString::from(frame)), call_id)
        }
        PublishBody::Binary(bytes) => (Payload::Binary(bytes.clone()), None),
    };
    let name = match body {
        PublishBody::Json { event, .. } => event.as_str().into(),
        PublishBody::Binary(_) => "binary".into(),
    };
    let ws_frame = ws_frame(&payload);
    Arc::new(Event {
        channel,
        id,
        name,
        payload,
        ws_frame,
        conflation_key,
        received_at,
    })
}

/// The complete server-to-client WebSocket frame of a payload (servers never mask).
fn ws_frame(payload: &Payload) -> Bytes {
    let (bytes, op) = match payload {
        Payload::Text(text) => (text.as_bytes(), OpCode::Text),
        Payload::Binary(bytes) => (bytes, OpCode::Binary),
    };
    let mut frame = BytesMut::with_capacity(bytes.len() + 10);
    Parser::write_message(&mut frame, &bytes[..], op, true, false);
    frame.freeze()
}

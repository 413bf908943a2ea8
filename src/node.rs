//! The shared state every handler and session takes: the validated settings and what was
//! compiled from them, this node's [`Registry`], the broker (in memory when embedded, Redis
//! when clustered) and the stores that match it. [`Node::start`] builds it once, from a
//! loaded configuration; the server shares it with every worker.

use std::collections::HashSet;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix_web::cookie::Key;
use ipnet::IpNet;
use tokio::sync::watch;

use crate::broker::memory::{EventLog, HistoryLimits, MemoryBroker};
use crate::broker::redis::{ControlChannel, RedisBroker, RedisPublisher, StreamHistory};
use crate::broker::{BrokerHandle, BrokerHealth};
use crate::config::{Compiled, Settings};
use crate::core::ids::TopicPattern;
use crate::delivery::registry::Registry;
use crate::policy::origin::OriginPolicy;
use crate::policy::rate::{FailureThrottle, HandshakeLimiter};
use crate::store::admission::RedisAdmission;
use crate::store::caps::{ConnectionCaps, RedisCaps};
use crate::store::redis::{CommandError, RedisCommands};
use crate::store::revocations::Revocations;
use crate::store::sessions::Sessions;

/// Wrong publish keys one client address may present at once, and how many more per second
/// (a real key has 32+ random characters: this only keeps guessers and their log lines down).
const FAILED_KEYS_BURST: u32 = 10;
const FAILED_KEYS_PER_S: u32 = 1;

/// Everything a request handler or session needs, shared by all workers.
pub(crate) struct Node {
    pub(crate) settings: Settings,
    pub(crate) origins: OriginPolicy,
    /// `server.trusted_proxies`: whose `X-Forwarded-For` is believed.
    pub(crate) trusted_proxies: Vec<IpNet>,
    /// `auth.client_publish`: the topics browsers may publish and stream to.
    pub(crate) client_publish: Vec<TopicPattern>,
    /// The key that signs and encrypts the session cookie: the WebSocket handshake reads
    /// sessions itself (it runs before the session middleware).
    pub(crate) cookie_key: Key,
    pub(crate) registry: Arc<Registry>,
    pub(crate) broker: BrokerHandle,
    pub(crate) caps: ConnectionCaps,
    pub(crate) handshakes: HandshakeLimiter,
    /// Wrong publish keys per client address (`POST /api/publish`).
    pub(crate) publish_failures: FailureThrottle,
    pub(crate) revocations: Revocations,
    /// Where the handshake reads login sessions.
    pub(crate) sessions: Sessions,
    /// Clustered on one Redis: the WebSocket handshake's session read, revocation check and
    /// cap slot in one round trip (a Redis Cluster takes them one by one).
    pub(crate) one_trip_admission: Option<RedisAdmission>,
    /// Clustered only: orders to sockets held by other pods (logout, eviction).
    pub(crate) control: Option<ControlChannel>,
    /// Set by the shutdown sequence: readiness fails and new sockets are refused.
    pub(crate) draining: AtomicBool,
}

/// Why the node could not be built.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NodeError {
    #[error("cannot use redis.url or redis.cluster_urls: {0}")]
    Redis(#[from] CommandError),
}

impl Node {
    /// Build the node: the broker actor on a thread of its own, so its work (Redis I/O when
    /// clustered) never stalls an HTTP worker, and the stores that go with it. Must run
    /// inside an actix `System`. Clustered, this waits until Redis answers.
    pub(crate) async fn start(settings: Settings, compiled: Compiled) -> Result<Self, NodeError> {
        let registry = Arc::new(Registry::new(settings.shutdown.reconnect_spread_ms));
        let health = Arc::new(BrokerHealth::default());
        let broker_thread = Arbiter::new();
        let limits = &settings.limits;
        let (broker, caps, revocations, sessions, one_trip_admission, control) = match settings
            .redis_target()
        {
            None => {
                let history = settings.history_enabled().then(|| HistoryLimits {
                    max_len: settings.history.max_len,
                    ttl: Duration::from_secs(settings.history.ttl_s),
                    max_topics_per_org: settings.history.max_topics_per_org,
                    replay_max_bytes: settings.history.replay_max_bytes,
                    keep_client_events: settings.history.keep_client_events,
                });
                let log = Arc::new(EventLog::new(registry.clone(), history));
                let broker_log = log.clone();
                let addr = MemoryBroker::start_in_arbiter(&broker_thread.handle(), move |_| {
                    MemoryBroker::new(broker_log)
                });
                (
                    BrokerHandle::embedded(&addr, log, health),
                    ConnectionCaps::in_memory(limits.max_connections_per_user, limits.cap_policy),
                    Revocations::in_memory(),
                    Sessions::Cookie,
                    None,
                    None,
                )
            }
            Some(target) => {
                let commands = RedisCommands::open(&target).await?;
                let history = settings.history_enabled().then_some(StreamHistory {
                    max_len: settings.history.max_len,
                    ttl_s: settings.history.ttl_s,
                    max_topics_per_org: settings.history.max_topics_per_org,
                    replay_max_bytes: settings.history.replay_max_bytes,
                    keep_client_events: settings.history.keep_client_events,
                });
                let broker_registry = registry.clone();
                let broker_commands = commands.clone();
                let broker_health = health.clone();
                let live_channels = watch::Sender::new(HashSet::new());
                let live = live_channels.subscribe();
                let reconnect_spread_ms = settings.shutdown.reconnect_spread_ms;
                let addr = RedisBroker::start_in_arbiter(&broker_thread.handle(), move |_| {
                    RedisBroker::new(
                        target,
                        broker_registry,
                        broker_commands,
                        broker_health,
                        history,
                        live_channels,
                        reconnect_spread_ms,
                    )
                });
                let lease = Duration::from_secs(limits.cap_lease_s);
                let caps = RedisCaps::new(commands.clone(), lease);
                let one_trip_admission = RedisAdmission::new(
                    caps.clone(),
                    limits.max_connections_per_user,
                    limits.cap_policy,
                );
                (
                    BrokerHandle::clustered(
                        &addr,
                        health,
                        live,
                        RedisPublisher::new(commands.clone(), history),
                    ),
                    ConnectionCaps::redis(limits.max_connections_per_user, limits.cap_policy, caps),
                    Revocations::Redis(commands.clone()),
                    Sessions::Redis(commands.clone()),
                    one_trip_admission,
                    Some(ControlChannel::new(commands)),
                )
            }
        };
        Ok(Self {
            handshakes: HandshakeLimiter::new(
                limits.handshakes_per_ip_per_s,
                limits.handshake_burst,
            ),
            publish_failures: FailureThrottle::new(FAILED_KEYS_PER_S, FAILED_KEYS_BURST),
            origins: compiled.origins,
            trusted_proxies: compiled.trusted_proxies,
            client_publish: compiled.client_publish,
            cookie_key: compiled.cookie_key,
            registry,
            broker,
            caps,
            revocations,
            sessions,
            one_trip_admission,
            control,
            draining: AtomicBool::new(false),
            settings,
        })
    }
}

//! The clustered broker: Redis pub/sub carries events between pods, Redis streams keep their
//! history, and Redis holds what every pod must agree on (connection-cap slots, revoked
//! sessions). One subscriber connection per pod carries every channel this pod's sessions
//! need, kept in step with the [`Registry`] by a reconciling task; a canary each pod publishes
//! to itself proves the subscription is alive, not just connected. When Redis goes away the
//! broker reports unavailable (readiness and publish answer 503), reconnects with capped
//! backoff, resubscribes and carries on; sockets stay open throughout.
//!
//! Keys and channels (SPEC section 7): events `sb:{org}:{topic}`, history `sb:{org}:{topic}:log`,
//! control `sbx:control`, canary `sbx:canary:{node}`, caps `sb:caps:{org}/{user}` (and, for a
//! minute after a cap request evicted sockets, `sb:caps:{org}/{user}:evicted:{slot}`),
//! revoked sessions `sb:revoked:{sid}`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink};
use redis::{AsyncCommands, Script, Value as RedisValue};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{watch, Notify};

use super::{
    build_event, BrokerError, BrokerHealth, EventSender, FetchHistory, Interest, Publish,
    PublishBody, PublishRequest, Replay,
};
use crate::auth::SessionState;
use crate::close::{AuthFailure, Close};
use crate::config::CapPolicy;
use crate::limits::{CapOutcome, CapsUnavailable};
use crate::metrics::metrics;
use crate::protocol::{node_id, unix_ms, ChannelKey, EventId};
use crate::registry::{Event, Registry};

/// Channel every pod listens to for orders that concern sockets anywhere (logout, eviction).
pub const CONTROL_CHANNEL: &str = "sbx:control";
/// How often a pod publishes its canary, and how late it may be before the pod is not ready.
const CANARY_EVERY: Duration = Duration::from_secs(1);
const CANARY_LATE: Duration = Duration::from_secs(3);
/// Reconnect backoff: doubles from the first value up to the cap, so an outage never spins.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// Bound on any one Redis round trip; a slower answer counts as Redis unavailable.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// First byte of a binary (voice) message on an event channel; JSON messages start with `{`.
const BINARY_MARK: u8 = 0;

/// The message on an event channel, and the `m` field of a history entry.
#[derive(Debug, Serialize, Deserialize)]
struct WireEvent {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(default)]
    event: Option<String>,
    data: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    conn_id: Option<String>,
}

/// Orders on [`CONTROL_CHANNEL`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum ControlMessage {
    /// A login session ended: close its sockets with 4401 `logged out`.
    Logout { sid: String },
    /// The cap evicted this connection: close it with 4409.
    Evict { conn: String },
}

/// Everything needed to talk to Redis for commands (not the subscriber).
///
/// The handshake's commands (session, revocation, cap slot) and the cap release go over a
/// connection of the calling thread's own, opened on its first use: a redis-rs connection is
/// driven by a task on the thread that opened it, so the shared one (opened on the main
/// thread) costs every command two cross-thread wake-ups, which profiling showed as a third
/// of a clustered handshake's CPU. Until a thread's own connection is up it uses the shared
/// one, as do publishing, history and the lease refresh.
#[derive(Clone)]
pub struct RedisCommands {
    conn: ConnectionManager,
    opener: Arc<Opener>,
}

/// What a thread needs to open its own connection; one per hub, shared by its clones.
struct Opener {
    client: redis::Client,
    config: ConnectionManagerConfig,
}

/// A thread's own connection for one hub's [`Opener`] (a process may hold several hubs, as
/// tests do); `None` while it is being opened. Gone once that hub is.
type ThreadConnection = (std::sync::Weak<Opener>, Option<ConnectionManager>);

thread_local! {
    static THREAD_CONNECTIONS: std::cell::RefCell<Vec<ThreadConnection>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// The Redis key of a login session (actix-session's store and the handshake both use it).
pub fn session_cache_key(session_key: &str) -> String {
    format!("sb:session:{session_key}")
}

impl RedisCommands {
    /// Connect, retrying with backoff until Redis answers (pods may start before Redis).
    pub async fn connect(url: &str) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(REDIS_TIMEOUT)
            .set_response_timeout(REDIS_TIMEOUT)
            .set_number_of_retries(1)
            .set_max_delay(BACKOFF_CAP.as_millis() as u64);
        let mut delay = BACKOFF_FIRST;
        loop {
            match ConnectionManager::new_with_config(client.clone(), config.clone()).await {
                Ok(conn) => {
                    return Ok(Self {
                        conn,
                        opener: Arc::new(Opener { client, config }),
                    })
                }
                Err(e) => {
                    log::warn!(
                        "waiting for Redis at {}: {e}; retrying in {delay:?}",
                        crate::config::redact_url(url)
                    );
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(BACKOFF_CAP);
                }
            }
        }
    }

    /// The connection shared by the whole process.
    pub fn manager(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// This thread's own connection, or the shared one while it is being opened (or on a
    /// thread whose runtime is not single-threaded, where a task may finish on another thread).
    fn thread_connection(&self) -> ConnectionManager {
        THREAD_CONNECTIONS.with(|connections| {
            let mut connections = connections.borrow_mut();
            connections.retain(|(opener, _)| opener.strong_count() > 0);
            let ours =
                |opener: &std::sync::Weak<Opener>| opener.as_ptr() == Arc::as_ptr(&self.opener);
            match connections.iter().find(|(opener, _)| ours(opener)) {
                Some((_, Some(own))) => return own.clone(),
                Some((_, None)) => return self.manager(),
                None => {}
            }
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                return self.manager();
            };
            if runtime.runtime_flavor() != tokio::runtime::RuntimeFlavor::CurrentThread {
                return self.manager();
            }
            let opener = Arc::downgrade(&self.opener);
            connections.push((opener.clone(), None));
            let (client, config) = (self.opener.client.clone(), self.opener.config.clone());
            runtime.spawn(async move {
                let opened = ConnectionManager::new_with_config(client, config).await;
                THREAD_CONNECTIONS.with(|connections| {
                    let mut connections = connections.borrow_mut();
                    connections.retain(|(other, _)| !other.ptr_eq(&opener));
                    match opened {
                        Ok(own) => connections.push((opener, Some(own))),
                        // Stay on the shared connection; the next command tries again.
                        Err(e) => log::debug!("cannot open this thread's Redis connection: {e}"),
                    }
                });
            });
            self.manager()
        })
    }

    /// Run an idempotent command of the handshake's (or a socket's close) on this thread's
    /// connection. Such a connection may sit idle for a while, so after Redis restarts its
    /// first command finds the old socket dead; the connection manager reconnects and the
    /// command is sent once more, as actix-session's store does.
    async fn run_idempotent<T, F, Fut>(&self, command: F) -> Result<T, String>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        match tokio::time::timeout(REDIS_TIMEOUT, command(self.thread_connection())).await {
            Ok(Err(e)) if e.is_connection_dropped() => {
                timed(command(self.thread_connection())).await
            }
            first => answered(first),
        }
    }

    /// A login session's state, read as actix-session's Redis store reads it (`GET` of its
    /// JSON). State that does not parse is empty.
    pub async fn load_session(&self, session_key: &str) -> Result<Option<SessionState>, String> {
        let key = session_cache_key(session_key);
        let raw: Option<String> = self
            .run_idempotent(|mut conn| {
                let key = key.clone();
                async move { conn.get(key).await }
            })
            .await?;
        Ok(raw.map(|raw| serde_json::from_str(&raw).unwrap_or_default()))
    }

    async fn publish_control(&self, message: &ControlMessage) -> Result<(), String> {
        let text = serde_json::to_string(message).map_err(|e| e.to_string())?;
        let mut conn = self.manager();
        timed(conn.publish::<_, _, ()>(CONTROL_CHANNEL, text)).await
    }

    /// Ask every pod to close the sockets of login session `sid`.
    pub async fn broadcast_logout(&self, sid: &str) -> Result<(), String> {
        self.publish_control(&ControlMessage::Logout {
            sid: sid.to_string(),
        })
        .await
    }

    /// Ask whichever pod holds `conn` to close it as replaced.
    pub async fn broadcast_evict(&self, conn: &str) -> Result<(), String> {
        self.publish_control(&ControlMessage::Evict {
            conn: conn.to_string(),
        })
        .await
    }

    pub async fn revoke(&self, sid: &str, ttl_s: u64) -> Result<(), String> {
        let mut conn = self.manager();
        timed(conn.set_ex::<_, _, ()>(format!("sb:revoked:{sid}"), 1, ttl_s.max(1))).await
    }

    pub async fn is_revoked(&self, sid: &str) -> Result<bool, String> {
        let key = format!("sb:revoked:{sid}");
        self.run_idempotent(|mut conn| {
            let key = key.clone();
            async move { conn.exists(key).await }
        })
        .await
    }
}

async fn timed<T>(
    fut: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, String> {
    answered(tokio::time::timeout(REDIS_TIMEOUT, fut).await)
}

fn answered<T>(
    answer: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
) -> Result<T, String> {
    match answer {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer from Redis within {REDIS_TIMEOUT:?}")),
    }
}

/// Per-user connection caps shared by every pod: a sorted set of slots scored by lease expiry,
/// changed only by Lua scripts so two pods can never both take the last slot.
#[derive(Clone)]
pub struct RedisCaps {
    commands: RedisCommands,
    lease: Duration,
    acquire: Arc<Script>,
}

/// Members are `<created-ms, 15 digits>|<conn id>` so sorting them sorts by age. KEYS[2]
/// remembers for a while whom the request evicted, so that the same request sent again (its
/// answer lost with a dropped connection) gets the same answer, evictions included.
const ACQUIRE_LUA: &str = r#"
local now = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[5]) then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[5])
  redis.call('PEXPIRE', KEYS[1], lease * 2)
  local out = {1}
  for _, conn in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do out[#out + 1] = conn end
  return out
end
local held = redis.call('ZRANGE', KEYS[1], 0, -1)
local evicted = {}
if #held >= limit then
  if ARGV[4] ~= 'evict_oldest' then
    return {0}
  end
  table.sort(held)
  local excess = #held - limit + 1
  for i = 1, excess do
    redis.call('ZREM', KEYS[1], held[i])
    evicted[#evicted + 1] = held[i]
  end
end
redis.call('ZADD', KEYS[1], now + lease, ARGV[5])
redis.call('PEXPIRE', KEYS[1], lease * 2)
if #evicted > 0 then
  redis.call('RPUSH', KEYS[2], unpack(evicted))
  redis.call('PEXPIRE', KEYS[2], 60000)
end
local out = {1}
for i = 1, #evicted do out[#out + 1] = evicted[i] end
return out
"#;

impl RedisCaps {
    pub fn new(commands: RedisCommands, lease: Duration) -> Self {
        Self {
            commands,
            lease,
            acquire: Arc::new(Script::new(ACQUIRE_LUA)),
        }
    }

    fn key(user_key: &str) -> String {
        format!("sb:caps:{user_key}")
    }

    pub async fn acquire(
        &self,
        user_key: &str,
        slot: &str,
        limit: u32,
        policy: CapPolicy,
    ) -> Result<CapOutcome, CapsUnavailable> {
        let policy = match policy {
            CapPolicy::RejectNew => "reject_new",
            CapPolicy::EvictOldest => "evict_oldest",
        };
        let key = Self::key(user_key);
        let evicted_key = format!("{key}:evicted:{slot}");
        let now = unix_ms();
        let answer: Vec<RedisValue> = self
            .commands
            .run_idempotent(|mut conn| {
                let mut invocation = self.acquire.key(&key);
                invocation.key(&evicted_key);
                invocation
                    .arg(now)
                    .arg(self.lease.as_millis() as u64)
                    .arg(limit)
                    .arg(policy)
                    .arg(slot);
                async move { invocation.invoke_async(&mut conn).await }
            })
            .await
            .map_err(CapsUnavailable)?;
        let admitted = matches!(answer.first(), Some(RedisValue::Int(1)));
        if !admitted {
            return Ok(CapOutcome::Refused { limit });
        }
        let evicted = answer
            .iter()
            .skip(1)
            .filter_map(|v| redis::from_redis_value::<String>(v).ok())
            .collect();
        Ok(CapOutcome::Admitted { evicted })
    }

    pub async fn release(&self, user_key: &str, slot: &str) {
        let key = Self::key(user_key);
        let released = self
            .commands
            .run_idempotent(|mut conn| {
                let key = key.clone();
                async move { conn.zrem::<_, _, ()>(key, slot).await }
            })
            .await;
        if let Err(e) = released {
            log::warn!("cannot release cap slot of {user_key} (its lease will expire): {e}");
        }
    }

    /// Give the lease of every slot this pod holds a fresh expiry, in one pipeline, adding the
    /// slots Redis no longer has: it may have restarted empty, or an outage longer than the
    /// lease let another pod prune them, and a live socket must keep counting against the cap.
    pub async fn refresh(&self, slots: &[(String, String)]) {
        if slots.is_empty() {
            return;
        }
        let expiry = unix_ms() + self.lease.as_millis() as u64;
        let mut pipe = redis::pipe();
        for (user_key, slot) in slots {
            let key = Self::key(user_key);
            pipe.cmd("ZADD")
                .arg(&key)
                .arg(expiry)
                .arg(slot)
                .ignore()
                .cmd("PEXPIRE")
                .arg(&key)
                .arg(self.lease.as_millis() as u64 * 2)
                .ignore();
        }
        let mut conn = self.commands.manager();
        if let Err(e) = timed(pipe.query_async::<()>(&mut conn)).await {
            log::warn!("cannot refresh {} cap lease(s): {e}", slots.len());
        }
    }

    /// Give back several slots at once, in one pipeline.
    async fn release_all(&self, slots: &[(String, String)]) {
        if slots.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for (user_key, slot) in slots {
            pipe.cmd("ZREM").arg(Self::key(user_key)).arg(slot).ignore();
        }
        let mut conn = self.commands.manager();
        if let Err(e) = timed(pipe.query_async::<()>(&mut conn)).await {
            log::warn!(
                "cannot release {} cap slot(s) (their leases will expire): {e}",
                slots.len()
            );
        }
    }
}

/// Append to history and publish in one step, so an event is never in one and not the other.
const PUBLISH_LUA: &str = r#"
local id
if ARGV[1] == '1' then
  id = redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[2], '*', 'm', ARGV[4])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
else
  local t = redis.call('TIME')
  id = t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000)) .. '-' .. redis.call('INCR', 'sbx:seq')
end
redis.call('PUBLISH', KEYS[2], '{"id":"' .. id .. '",' .. string.sub(ARGV[4], 2))
return id
"#;

/// Replay after an id, and what tells whether history still reaches back to it: the newest id
/// ever added, whether `since` itself is still kept, the oldest kept id, and how many entries
/// were ever added against how many remain (trimming is the only way entries leave).
const HISTORY_LUA: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local last, added, length = '0-0', -1, 0
for i = 1, #info, 2 do
  if info[i] == 'last-generated-id' then last = info[i + 1] end
  if info[i] == 'entries-added' then added = info[i + 1] end
  if info[i] == 'length' then length = info[i + 1] end
end
local kept = #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
local oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
local oldest_id = ''
if #oldest > 0 then oldest_id = oldest[1][1] end
local entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
return {1, last, kept, oldest_id, added, length, entries}
"#;

/// History settings for the clustered broker.
#[derive(Debug, Clone, Copy)]
pub struct StreamHistory {
    pub max_len: usize,
    pub ttl_s: u64,
}

pub struct RedisBroker {
    url: String,
    registry: Arc<Registry>,
    commands: RedisCommands,
    health: Arc<BrokerHealth>,
    history: Option<StreamHistory>,
    publisher: RedisPublisher,
    history_script: Arc<Script>,
    /// Wakes the subscription reconciler when local interest changes. Each connection gets a
    /// new one: a wake-up taken by the reconciler of a dead connection would be lost.
    interest_changed: Arc<Notify>,
    /// Channels the current subscriber connection has confirmed: a history read for `since`
    /// waits until its channel is live here, so no event falls between replay and live, and
    /// a plain subscribe is acknowledged only then (the receiving end is the hub's
    /// [`super::BrokerHandle`]).
    live_channels: watch::Sender<HashSet<ChannelKey>>,
    /// Last id seen per channel, to give ids to events published without one.
    last_ids: std::collections::HashMap<ChannelKey, EventId>,
    canary_channel: String,
    /// Unix ms of the last canary heard back; shared with the readiness check.
    last_canary_ms: Arc<AtomicU64>,
    connected: bool,
    /// The subscriber has been connected before: the next connection is a reconnect.
    was_connected: bool,
    backoff: Duration,
    /// Generation of the current subscriber connection, bumped when it ends or is replaced;
    /// a reconciler whose generation is no longer current stops.
    generation: watch::Sender<u64>,
}

impl RedisBroker {
    pub fn new(
        url: String,
        registry: Arc<Registry>,
        commands: RedisCommands,
        health: Arc<BrokerHealth>,
        history: Option<StreamHistory>,
        live_channels: watch::Sender<HashSet<ChannelKey>>,
    ) -> Self {
        health.set_unavailable("connecting to Redis");
        let publisher = RedisPublisher::new(commands.clone(), history);
        Self {
            url,
            registry,
            commands,
            health,
            history,
            publisher,
            history_script: Arc::new(Script::new(HISTORY_LUA)),
            interest_changed: Arc::new(Notify::new()),
            live_channels,
            last_ids: std::collections::HashMap::new(),
            canary_channel: format!("sbx:canary:{}", node_id()),
            last_canary_ms: Arc::new(AtomicU64::new(0)),
            connected: false,
            was_connected: false,
            backoff: BACKOFF_FIRST,
            generation: watch::Sender::new(0),
        }
    }

    fn connect(&mut self, ctx: &mut Context<Self>) {
        let url = self.url.clone();
        let fut = async move {
            let client = redis::Client::open(url.as_str()).map_err(|e| e.to_string())?;
            match tokio::time::timeout(REDIS_TIMEOUT, client.get_async_pubsub()).await {
                Ok(Ok(pubsub)) => Ok(pubsub.split()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("connection timed out".to_string()),
            }
        };
        ctx.spawn(fut.into_actor(self).map(|result, this, ctx| match result {
            Ok((sink, stream)) => this.on_connected(sink, stream, ctx),
            Err(e) => this.retry_later(&e, ctx),
        }));
    }

    fn on_connected(
        &mut self,
        sink: PubSubSink,
        stream: redis::aio::PubSubStream,
        ctx: &mut Context<Self>,
    ) {
        self.generation.send_modify(|g| *g += 1);
        self.interest_changed = Arc::new(Notify::new());
        self.live_channels.send_replace(HashSet::new());
        self.connected = true;
        self.backoff = BACKOFF_FIRST;
        if self.was_connected {
            metrics().redis_reconnects.inc();
            log::info!("redis subscriber reconnected; resubscribing every channel");
        } else {
            log::info!("redis subscriber connected");
        }
        self.was_connected = true;
        ctx.add_stream(stream);
        let fixed = vec![CONTROL_CHANNEL.to_string(), self.canary_channel.clone()];
        actix::spawn(reconcile_subscriptions(
            sink,
            fixed,
            self.registry.clone(),
            self.interest_changed.clone(),
            self.live_channels.clone(),
            self.generation.subscribe(),
        ));
        // Readiness waits for the first canary to come back through the new subscription.
    }

    fn retry_later(&mut self, why: &str, ctx: &mut Context<Self>) {
        self.connected = false;
        self.health
            .set_unavailable(&format!("redis subscriber disconnected: {why}"));
        log::warn!(
            "redis subscriber unavailable ({why}); reconnecting in {:?}",
            self.backoff
        );
        let delay = self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_CAP);
        ctx.run_later(delay, |this, ctx| this.connect(ctx));
    }

    fn on_event_message(&mut self, channel: &str, payload: &[u8]) {
        let Some((org, topic)) = ChannelKey::parse(channel) else {
            return;
        };
        let channel = ChannelKey::new(&org, &topic);
        let received_at = Instant::now();
        let (id, body, sender) = if payload.first() == Some(&BINARY_MARK) {
            let id = self.next_local_id(&channel);
            (
                id,
                PublishBody::Binary(Bytes::copy_from_slice(&payload[1..])),
                None,
            )
        } else {
            let wire: WireEvent = match serde_json::from_slice(payload) {
                Ok(w) => w,
                Err(e) => {
                    log::warn!("ignoring malformed message on {channel}: {e}");
                    return;
                }
            };
            let id = match wire.id.as_deref().and_then(EventId::parse) {
                Some(id) => {
                    let last = self.last_ids.entry(channel.clone()).or_default();
                    *last = (*last).max(id);
                    id
                }
                None => self.next_local_id(&channel),
            };
            let sender = match (wire.user, wire.conn_id) {
                (Some(user), Some(conn_id)) => Some(EventSender { user, conn_id }),
                _ => None,
            };
            let event = wire.event.unwrap_or_else(|| "message".into());
            (
                id,
                PublishBody::Json {
                    event,
                    data: wire.data,
                },
                sender,
            )
        };
        metrics().events_received.inc();
        let event = build_event(channel, id, &body, sender.as_ref(), received_at);
        self.registry.deliver(&event);
    }

    fn next_local_id(&mut self, channel: &ChannelKey) -> EventId {
        let last = self.last_ids.entry(channel.clone()).or_default();
        *last = EventId::next_after(*last, unix_ms());
        *last
    }

    fn on_control(&self, payload: &[u8]) {
        match serde_json::from_slice::<ControlMessage>(payload) {
            Ok(ControlMessage::Logout { sid }) => {
                self.registry
                    .close_session(&sid, Close::Unauthenticated(AuthFailure::LoggedOut));
            }
            Ok(ControlMessage::Evict { conn }) => {
                self.registry.close_conn(&conn, Close::Replaced);
            }
            Err(e) => log::warn!("ignoring malformed control message: {e}"),
        }
    }

    /// Publish the canary and judge readiness by when the last one came back.
    fn canary_tick(&mut self, _: &mut Context<Self>) {
        let late = unix_ms().saturating_sub(self.last_canary_ms.load(Ordering::Acquire))
            > CANARY_LATE.as_millis() as u64;
        if !self.connected {
            // retry_later already said why.
        } else if late {
            if self.health.is_ready() {
                log::warn!(
                    "redis subscription stalled: no canary for {CANARY_LATE:?}; not ready until it flows again"
                );
            }
            self.health
                .set_unavailable("redis subscription stalled (canary not received)");
        } else if !self.health.is_ready() {
            log::info!("redis subscription healthy; ready");
            self.health.set_ready();
        }
        let mut conn = self.commands.manager();
        let channel = self.canary_channel.clone();
        actix::spawn(async move {
            let _ = timed(conn.publish::<_, _, ()>(channel, unix_ms())).await;
        });
    }
}

/// Keep the subscriber's channel set equal to the registry's, until the connection ends or
/// is superseded: a reconciler left behind would hold a dead sink forever.
async fn reconcile_subscriptions(
    sink: PubSubSink,
    fixed: Vec<String>,
    registry: Arc<Registry>,
    changed: Arc<Notify>,
    live: watch::Sender<HashSet<ChannelKey>>,
    mut generation: watch::Receiver<u64>,
) {
    let mine = *generation.borrow_and_update();
    tokio::select! {
        () = keep_subscriptions(sink, fixed, registry, changed, live) => {}
        // Also when the broker is gone (sender dropped).
        _ = generation.wait_for(|current| *current != mine) => {
            log::debug!("subscriber connection {mine} superseded; its reconciler stops");
        }
    }
}

async fn keep_subscriptions(
    mut sink: PubSubSink,
    fixed: Vec<String>,
    registry: Arc<Registry>,
    changed: Arc<Notify>,
    live: watch::Sender<HashSet<ChannelKey>>,
) {
    if let Err(e) = sink.subscribe(&fixed).await {
        log::warn!("cannot subscribe control channels: {e}");
        return;
    }
    let mut subscribed: HashSet<ChannelKey> = HashSet::new();
    loop {
        let wanted: HashSet<ChannelKey> = registry.active_channels().into_iter().collect();
        let add: Vec<&str> = wanted.difference(&subscribed).map(|c| c.as_str()).collect();
        let remove: Vec<&str> = subscribed.difference(&wanted).map(|c| c.as_str()).collect();
        if !remove.is_empty() {
            // No longer live from now: a subscribe arriving while the UNSUBSCRIBE is on its
            // way must wait for the next SUBSCRIBE, not be acknowledged on the old one.
            live.send_modify(|channels| {
                for channel in subscribed.difference(&wanted) {
                    channels.remove(channel);
                }
            });
        }
        if !add.is_empty() {
            if let Err(e) = sink.subscribe(&add).await {
                log::debug!("subscriber gone while subscribing: {e}");
                return;
            }
            // Live as soon as Redis answered, not only after the UNSUBSCRIBE below.
            live.send_modify(|channels| channels.extend(wanted.difference(&subscribed).cloned()));
        }
        if !remove.is_empty() {
            if let Err(e) = sink.unsubscribe(&remove).await {
                log::debug!("subscriber gone while unsubscribing: {e}");
                return;
            }
        }
        // SUBSCRIBE has been answered: from here on every event of these channels arrives.
        live.send_replace(wanted.clone());
        subscribed = wanted;
        changed.notified().await;
    }
}

impl Actor for RedisBroker {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.connect(ctx);
        ctx.run_interval(CANARY_EVERY, Self::canary_tick);
    }
}

impl StreamHandler<redis::Msg> for RedisBroker {
    fn handle(&mut self, msg: redis::Msg, _: &mut Self::Context) {
        let channel = msg.get_channel_name();
        let payload = msg.get_payload_bytes();
        if channel == self.canary_channel {
            self.last_canary_ms.store(unix_ms(), Ordering::Release);
        } else if channel == CONTROL_CHANNEL {
            self.on_control(payload);
        } else {
            let channel = channel.to_string();
            self.on_event_message(&channel, payload);
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        // Stop the reconciler of this connection now rather than when its sink next fails.
        self.generation.send_modify(|g| *g += 1);
        self.retry_later("connection closed", ctx);
    }
}

impl Handler<Interest> for RedisBroker {
    type Result = ();

    fn handle(&mut self, interest: Interest, _: &mut Self::Context) {
        if let Interest::Closed(channel) = &interest {
            self.last_ids.remove(channel);
        }
        // The reconciler reads the registry itself; one wake-up covers any number of changes.
        self.interest_changed.notify_one();
    }
}

impl Handler<Publish> for RedisBroker {
    type Result = ResponseFuture<Result<EventId, BrokerError>>;

    fn handle(&mut self, msg: Publish, _: &mut Self::Context) -> Self::Result {
        let publisher = self.publisher.clone();
        Box::pin(async move { publisher.publish(msg.request).await })
    }
}

/// Publishing to Redis: a JSON event's history entry and its PUBLISH in one script, a binary
/// frame as a bare PUBLISH. HTTP workers publish through it themselves rather than through
/// the broker actor, sparing each publish two cross-thread wake-ups. It uses the shared
/// connection, not the thread's own: a publish is never sent twice, so it needs a connection
/// that other traffic keeps checked, or the first publish after a Redis restart would fail.
#[derive(Clone)]
pub struct RedisPublisher {
    commands: RedisCommands,
    script: Arc<Script>,
    history: Option<StreamHistory>,
}

impl RedisPublisher {
    pub fn new(commands: RedisCommands, history: Option<StreamHistory>) -> Self {
        Self {
            commands,
            script: Arc::new(Script::new(PUBLISH_LUA)),
            history,
        }
    }

    /// Publish once; `Ok` once Redis has taken the event.
    pub async fn publish(&self, request: PublishRequest) -> Result<EventId, BrokerError> {
        let channel = request.channel();
        let mut conn = self.commands.manager();
        let history = self.history;
        let message = match &request.body {
            PublishBody::Json { event, data } => {
                let sender = request.sender.as_ref();
                serde_json::to_string(&WireEvent {
                    id: None,
                    event: Some(event.clone()),
                    data: data.clone(),
                    user: sender.map(|s| s.user.clone()),
                    conn_id: sender.map(|s| s.conn_id.clone()),
                })
                .map_err(|e| BrokerError::Unavailable(e.to_string()))?
            }
            PublishBody::Binary(bytes) => {
                // Audio is live-only: straight to the channel, no history.
                let mut framed = Vec::with_capacity(bytes.len() + 1);
                framed.push(BINARY_MARK);
                framed.extend_from_slice(bytes);
                timed(conn.publish::<_, _, ()>(channel.as_str(), framed))
                    .await
                    .map_err(BrokerError::Unavailable)?;
                return Ok(EventId::default());
            }
        };
        let mut invocation = self.script.key(format!("{channel}:log"));
        invocation
            .key(channel.as_str())
            .arg(if history.is_some() { "1" } else { "0" })
            .arg(history.map_or(0, |h| h.max_len))
            .arg(history.map_or(0, |h| h.ttl_s))
            .arg(message);
        let id: String = timed(invocation.invoke_async(&mut conn))
            .await
            .map_err(BrokerError::Unavailable)?;
        EventId::parse(&id)
            .ok_or_else(|| BrokerError::Unavailable(format!("unexpected id {id:?} from Redis")))
    }
}

impl Handler<FetchHistory> for RedisBroker {
    type Result = ResponseFuture<Result<Replay, BrokerError>>;

    fn handle(&mut self, msg: FetchHistory, _: &mut Self::Context) -> Self::Result {
        let Some(history) = self.history else {
            return Box::pin(async { Ok(Replay::default()) });
        };
        let mut conn = self.commands.manager();
        let script = self.history_script.clone();
        let mut live = self.live_channels.subscribe();
        Box::pin(async move {
            // Read history only once live events flow: an event published between a read
            // made earlier and the SUBSCRIBE would be in neither. Live events the replay also
            // holds are dropped by the session's `sent_through`.
            let confirmed = live.wait_for(|channels| channels.contains(&msg.channel));
            if tokio::time::timeout(REDIS_TIMEOUT, confirmed)
                .await
                .is_err()
            {
                return Err(BrokerError::Unavailable(format!(
                    "{} is not subscribed yet",
                    msg.channel
                )));
            }
            let mut invocation = script.key(format!("{}:log", msg.channel));
            invocation.arg(msg.since.to_string()).arg(history.max_len);
            let answer: Vec<RedisValue> = timed(invocation.invoke_async(&mut conn))
                .await
                .map_err(BrokerError::Unavailable)?;
            Ok(decode_history(&msg.channel, msg.since, &answer))
        })
    }
}

/// One XRANGE entry: its id and its field/value pairs.
type StreamEntry = (String, Vec<(String, Vec<u8>)>);

fn decode_history(channel: &ChannelKey, since: EventId, answer: &[RedisValue]) -> Replay {
    let text = |v: Option<&RedisValue>| {
        v.and_then(|v| redis::from_redis_value::<String>(v).ok())
            .and_then(|s| EventId::parse(&s))
    };
    if !matches!(answer.first(), Some(RedisValue::Int(1))) {
        return Replay::default();
    }
    let int = |i: usize| {
        answer
            .get(i)
            .and_then(|v| redis::from_redis_value::<i64>(v).ok())
    };
    let last = text(answer.get(1)).unwrap_or_default();
    let since_kept = int(2) == Some(1);
    let oldest = text(answer.get(3));
    // Redis before 7.0 does not report `entries-added` (-1): then assume something was trimmed.
    let nothing_trimmed =
        matches!((int(4), int(5)), (Some(added), Some(len)) if added >= 0 && added == len);
    let reaches_back = since_kept || nothing_trimmed || oldest.is_some_and(|o| o <= since);
    let recovered = since <= last && reaches_back;
    let entries: Vec<StreamEntry> = answer
        .get(6)
        .and_then(|v| redis::from_redis_value(v).ok())
        .unwrap_or_default();
    let now = Instant::now();
    let events: Vec<Arc<Event>> = entries
        .into_iter()
        .filter_map(|(id, fields)| {
            let id = EventId::parse(&id)?;
            let (_, raw) = fields.into_iter().find(|(k, _)| k == "m")?;
            let wire: WireEvent = serde_json::from_slice(&raw).ok()?;
            let sender = match (wire.user, wire.conn_id) {
                (Some(user), Some(conn_id)) => Some(EventSender { user, conn_id }),
                _ => None,
            };
            let body = PublishBody::Json {
                event: wire.event.unwrap_or_else(|| "message".into()),
                data: wire.data,
            };
            Some(build_event(
                channel.clone(),
                id,
                &body,
                sender.as_ref(),
                now,
            ))
        })
        .collect();
    Replay { events, recovered }
}

/// Periodically re-assert the cap slots of this pod's sockets with fresh leases: a pod that
/// dies stops doing this, and its slots expire within `cap_lease_s`.
pub async fn refresh_leases(caps: RedisCaps, registry: Arc<Registry>) {
    let every = caps.lease / 3;
    let mut ticker = tokio::time::interval(every.max(Duration::from_millis(100)));
    loop {
        ticker.tick().await;
        let slots = registry.cap_slots();
        caps.refresh(&slots).await;
        // A socket that closed after the snapshot may have released its slot before the
        // refresh re-added it; it is unregistered before it releases, so it is missing from a
        // second snapshot taken now, and without this its slot would count until the lease ran
        // out. (Even a refresh that timed out may have reached Redis.)
        let live: HashSet<(String, String)> = registry.cap_slots().into_iter().collect();
        let closed: Vec<(String, String)> =
            slots.into_iter().filter(|s| !live.contains(s)).collect();
        caps.release_all(&closed).await;
    }
}

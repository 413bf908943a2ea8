//! The clustered broker: Redis pub/sub carries events between pods, Redis streams keep their
//! history, and a control channel carries orders that concern sockets on any pod (logout,
//! eviction); caps and revocations are the store's. One subscriber connection per pod carries every
//! channel this pod's sessions need, kept in step with the [`Registry`] by a reconciling task; a
//! canary each pod publishes to itself proves the subscription is alive, not just connected. When
//! Redis goes away the broker reports unavailable (readiness and publish answer 503), reconnects
//! with capped backoff, resubscribes and carries on; sockets stay open throughout. Once a
//! channel is subscribed again, its history after the last event this pod delivered (on a
//! channel that carried none yet: after its subscription was last known alive) is
//! replayed before the live events held meanwhile, so the sockets lose nothing other pods
//! accepted while this one was away; when history no longer reaches back that far, the
//! channel's sockets are told to reconnect (1012), to resume with `since`.
//!
//! Keys and channels (SPEC section 7): events `sb:{org}:{topic}`, history `sb:{org}:{topic}:log`,
//! an org's history streams `sbx:history:{org}`, control `sbx:control`, canary
//! `sbx:canary:{node}`. What arrives from Redis is checked as `/api/publish` checks a body.
//!
//! On a Redis Cluster (`redis.cluster_urls`) the same broker publishes with SPUBLISH and
//! subscribes with SSUBSCRIBE over one RESP3 cluster connection, which sends each subscription
//! to the shard owning its channel; keys carry the org as hash tag ([`KeyScheme`]). When a
//! node's connection drops, or a shard unsubscribes a channel still wanted (its slot moved),
//! the whole subscription is rebuilt and caught up from history as after an outage. The
//! canary then proves the subscription path through the shard that owns this pod's canary
//! channel; the other shards are watched by their connections (a lost one is noticed at once).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::Bytes;
use futures_util::StreamExt as _;
use redis::aio::PubSubSink;
use redis::cluster_async::ClusterConnection;
use redis::{ProtocolVersion, PushInfo, PushKind, Script, Value as RedisValue};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::sync::{watch, Notify, Semaphore};

use super::{BrokerError, BrokerHealth, FetchHistory, Interest, Replay};
use crate::config::RedisTarget;
use crate::core::close::{AuthFailure, Close};
use crate::core::event::{
    build_event, build_raw_event, Event, EventSender, PublishBody, PublishRequest,
};
use crate::core::ids::{node_id, unix_ms, ChannelKey, EventId, InvalidId};
use crate::core::metrics::metrics;
use crate::core::wire::validate_event_name;
use crate::delivery::registry::Registry;
use crate::store::redis::{
    cluster_client, hash_tag, timed, CommandError, KeyScheme, RedisCommands, RedisConn,
    BACKOFF_CAP, BACKOFF_FIRST, REDIS_TIMEOUT,
};

/// Channel every pod listens to for orders that concern sockets anywhere (logout, eviction).
pub(crate) const CONTROL_CHANNEL: &str = "sbx:control";
/// How often a pod publishes its canary, and how late it may be before the pod is not ready.
const CANARY_EVERY: Duration = Duration::from_secs(1);
const CANARY_LATE: Duration = Duration::from_secs(3);
/// First byte of a binary (voice) message on an event channel; JSON messages start with `{`.
pub(crate) const BINARY_MARK: u8 = 0;

/// The message on an event channel, and the `m` field of a history entry, as read: `data`
/// is checked JSON, kept as its text for the frame (one parse, no tree).
#[derive(Debug, Deserialize)]
struct WireEvent<'a> {
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    event: Option<Cow<'a, str>>,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    conn_id: Option<String>,
}

/// The same message as this hub publishes it (Redis gives the id), written from the
/// request's own data, not a copy of it.
#[derive(Debug, Serialize)]
struct WireEventOut<'a> {
    event: &'a str,
    data: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    conn_id: Option<&'a str>,
}

/// A message from Redis that passed [`decode_message`].
#[derive(Debug)]
struct Message<'a> {
    /// As given (the hub adds one only when absent).
    id: Option<EventId>,
    event: Cow<'a, str>,
    data: &'a RawValue,
    sender: Option<EventSender>,
}

/// How far ahead of this pod's clock an id from Redis may be (clocks of pods and Redis
/// differ a little). An id further ahead would hold every `since` and every id this pod
/// gives after it in the future.
const MAX_ID_AHEAD_MS: u64 = 60_000;

/// Why a message on an event channel (or a history entry) is not delivered. Anything may
/// PUBLISH to Redis, so what arrives is checked as `/api/publish` checks a body.
#[derive(Debug, thiserror::Error)]
enum BadMessage {
    #[error("malformed JSON: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("id {0:?} is not an event id (<ms>-<seq>)")]
    Id(String),
    #[error("id {0} is more than {MAX_ID_AHEAD_MS} ms ahead of this pod's clock")]
    IdAhead(EventId),
    #[error("event {0:?}: {1}")]
    Name(String, #[source] InvalidId),
}

/// A JSON message from an event channel or a history entry's `m`: its id when it has one
/// (kept as given; the hub adds one only when absent), the event, and its sender. `now_ms`:
/// this pod's clock, which a given id may not run ahead of by more than [`MAX_ID_AHEAD_MS`].
fn decode_message(payload: &[u8], now_ms: u64) -> Result<Message<'_>, BadMessage> {
    let wire: WireEvent = serde_json::from_slice(payload)?;
    let id = match wire.id {
        None => None,
        Some(raw) => {
            let id = EventId::parse(&raw).ok_or_else(|| BadMessage::Id(raw.into_owned()))?;
            if id.ms > now_ms.saturating_add(MAX_ID_AHEAD_MS) {
                return Err(BadMessage::IdAhead(id));
            }
            Some(id)
        }
    };
    let event = wire.event.unwrap_or(Cow::Borrowed("message"));
    if let Err(e) = validate_event_name(&event) {
        return Err(BadMessage::Name(event.into_owned(), e));
    }
    let sender = match (wire.user, wire.conn_id) {
        (Some(user), Some(conn_id)) => Some(EventSender { user, conn_id }),
        _ => None,
    };
    Ok(Message {
        id,
        event,
        data: wire.data,
        sender,
    })
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

/// Orders to sockets on whichever pod holds them, over [`CONTROL_CHANNEL`].
#[derive(Clone)]
pub(crate) struct ControlChannel {
    commands: RedisCommands,
}

impl ControlChannel {
    pub(crate) fn new(commands: RedisCommands) -> Self {
        Self { commands }
    }

    async fn send(&self, message: &ControlMessage) -> Result<(), CommandError> {
        // unwrap: two string fields always serialise.
        let text = serde_json::to_string(message).unwrap();
        let mut conn = self.commands.manager();
        let mut publish = redis::cmd(self.commands.keys().publish_command());
        publish.arg(CONTROL_CHANNEL).arg(text);
        timed(publish.exec_async(&mut conn)).await
    }

    /// Ask every pod to close the sockets of login session `sid`.
    pub(crate) async fn broadcast_logout(&self, sid: &str) -> Result<(), CommandError> {
        self.send(&ControlMessage::Logout {
            sid: sid.to_string(),
        })
        .await
    }

    /// Ask whichever pod holds `conn` to close it as replaced.
    pub(crate) async fn broadcast_evict(&self, conn: &str) -> Result<(), CommandError> {
        self.send(&ControlMessage::Evict {
            conn: conn.to_string(),
        })
        .await
    }
}

/// Append to history and publish in one step, so an event is never in one and not the other.
/// KEYS: the history stream, the event channel, the org's history index, the id sequence.
/// ARGV: keep ('1' or '0'), `max_len`, `ttl_s`, the message, the org's topic limit, the
/// publish command (PUBLISH, or SPUBLISH on a Redis Cluster, where all four keys share the
/// org's hash tag: see [`KeyScheme`]).
///
/// The index (`sbx:history:{org}`, a sorted set of the org's streams scored by when each
/// expires) bounds history per org: a stream new to an org that already keeps
/// `history.max_topics_per_org` live streams is not created, and the event goes out live
/// only. With `max_len` per stream this bounds an org's history to topics × entries × event
/// size, and costs one sorted-set lookup per publish (a byte count per org could not follow
/// streams that expire on their own).
///
/// XADD (or INCR) must be the script's first write: Redis checks a script against
/// `maxmemory` only at its first write, so a full Redis refuses the publish instead of
/// growing past its limit.
///
/// Trimming is done here rather than by `XADD MAXLEN` alone so the newest trimmed id can be
/// recorded as the stream's `max-deleted-entry-id` (Redis 7; `MAXLEN` does not set it), which
/// tells a replay whether history still reaches back to its `since`.
///
/// Answers the event id and what became of it: `kept`, `live` (history off, or a client
/// event) or `capped` (the org's topic limit).
const PUBLISH_LUA: &str = r#"
local id
local state = 'live'
if ARGV[1] == '1' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local ttl = tonumber(ARGV[3])
  local expires = redis.call('ZSCORE', KEYS[3], KEYS[1])
  local known = expires and tonumber(expires) > now
  if known or redis.call('ZCOUNT', KEYS[3], '(' .. now, '+inf') < tonumber(ARGV[5]) then
    local max = tonumber(ARGV[2])
    local len = redis.call('XLEN', KEYS[1])
    local trimmed
    if len >= max then
      local gone = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', len - max + 1)
      trimmed = gone[#gone][1]
    end
    id = redis.call('XADD', KEYS[1], 'MAXLEN', max, '*', 'm', ARGV[4])
    if trimmed then
      redis.pcall('XSETID', KEYS[1], id, 'MAXDELETEDID', trimmed)
    end
    redis.call('EXPIRE', KEYS[1], ttl)
    redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
    redis.call('ZADD', KEYS[3], now + ttl * 1000, KEYS[1])
    redis.call('PEXPIRE', KEYS[3], ttl * 1000)
    state = 'kept'
  else
    state = 'capped'
  end
end
if not id then
  local t = redis.call('TIME')
  id = t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000)) .. '-' .. redis.call('INCR', KEYS[4])
end
redis.call(ARGV[6], KEYS[2], '{"id":"' .. id .. '",' .. string.sub(ARGV[4], 2))
return {id, state}
"#;

/// Replay after an id, and what tells whether history still reaches back to it: the newest id
/// ever added, whether `since` itself is still kept, the oldest kept id, the newest trimmed
/// id (0-0: none, or Redis before 7), and whether the replay was cut short. ARGV: `since`, the most entries, the most bytes of entries: when the
/// entries after `since` exceed that, only the newest that fit are returned.
const HISTORY_LUA: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local last, deleted = '0-0', '0-0'
for i = 1, #info, 2 do
  if info[i] == 'last-generated-id' then last = info[i + 1] end
  if info[i] == 'max-deleted-entry-id' then deleted = info[i + 1] end
end
local kept = #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
local oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
local oldest_id = ''
if #oldest > 0 then oldest_id = oldest[1][1] end
local newest = redis.call('XREVRANGE', KEYS[1], '+', '(' .. ARGV[1], 'COUNT', ARGV[2])
local budget = tonumber(ARGV[3])
local fit, cut = 0, 0
for i = 1, #newest do
  local size = 0
  local fields = newest[i][2]
  for j = 2, #fields, 2 do size = size + #fields[j] end
  if size > budget then
    cut = 1
    break
  end
  budget = budget - size
  fit = i
end
local entries = {}
for i = fit, 1, -1 do entries[#entries + 1] = newest[i] end
return {1, last, kept, oldest_id, deleted, cut, entries}
"#;

/// History settings for the clustered broker.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StreamHistory {
    pub(crate) max_len: usize,
    pub(crate) ttl_s: u64,
    /// Topics of one org that may keep history at once (`history.max_topics_per_org`).
    pub(crate) max_topics_per_org: usize,
    /// The most bytes of entries one replay reads (`history.replay_max_bytes`).
    pub(crate) replay_max_bytes: usize,
    /// Whether browser-published events are kept too (`history.keep_client_events`).
    pub(crate) keep_client_events: bool,
}

pub(crate) struct RedisBroker {
    target: RedisTarget,
    /// How channels and keys are named on that Redis.
    keys: KeyScheme,
    registry: Arc<Registry>,
    commands: RedisCommands,
    health: Arc<BrokerHealth>,
    history: Option<StreamHistory>,
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
    last_ids: HashMap<ChannelKey, EventId>,
    /// Per channel, the last event from Redis (with its Redis-given id) handed to the
    /// registry: after a reconnect, the channel's history is replayed after it.
    delivered: HashMap<ChannelKey, Delivered>,
    /// Channels catching up after a reconnect, and the live events held meanwhile: they go
    /// out after the replay of what the connection missed, since a session drops an id not
    /// newer than the last it saw.
    catching_up: HashMap<ChannelKey, Vec<Arc<Event>>>,
    /// How far apart the sockets of a channel that missed events are asked to reconnect
    /// (`shutdown.reconnect_spread_ms`).
    resync_spread_ms: u64,
    /// The `run_id` of the Redis the subscriber last connected to: a new one means Redis
    /// restarted and lost what it held, sessions included.
    redis_run_id: Option<String>,
    /// Counts the Redis restarts seen (changes of `redis_run_id`).
    redis_epoch: u64,
    canary_channel: String,
    /// Unix ms of the last canary heard back; shared with the readiness check.
    last_canary_ms: Arc<AtomicU64>,
    /// When the current (or last) subscriber connection was made, Unix ms.
    connected_at_ms: u64,
    connected: bool,
    /// The subscriber has been connected before: the next connection is a reconnect.
    was_connected: bool,
    backoff: Duration,
    /// Generation of the current subscriber connection, bumped when it ends or is replaced;
    /// a reconciler whose generation is no longer current stops.
    generation: watch::Sender<u64>,
}

impl RedisBroker {
    pub(crate) fn new(
        target: RedisTarget,
        registry: Arc<Registry>,
        commands: RedisCommands,
        health: Arc<BrokerHealth>,
        history: Option<StreamHistory>,
        live_channels: watch::Sender<HashSet<ChannelKey>>,
        resync_spread_ms: u64,
    ) -> Self {
        health.set_unavailable("connecting to Redis");
        Self {
            target,
            keys: commands.keys(),
            registry,
            commands,
            health,
            history,
            history_script: Arc::new(Script::new(HISTORY_LUA)),
            interest_changed: Arc::new(Notify::new()),
            live_channels,
            last_ids: HashMap::new(),
            delivered: HashMap::new(),
            catching_up: HashMap::new(),
            resync_spread_ms,
            redis_run_id: None,
            redis_epoch: 0,
            canary_channel: format!("sbx:canary:{}", node_id()),
            last_canary_ms: Arc::new(AtomicU64::new(0)),
            connected_at_ms: 0,
            connected: false,
            was_connected: false,
            backoff: BACKOFF_FIRST,
            generation: watch::Sender::new(0),
        }
    }

    fn connect(&mut self, ctx: &mut Context<Self>) {
        let seeds = match &self.target {
            RedisTarget::Single(url) => url.clone(),
            RedisTarget::Cluster(seeds) => {
                let fut = connect_sharded(seeds.clone());
                ctx.spawn(fut.into_actor(self).map(|result, this, ctx| match result {
                    Ok((sink, pushes)) => {
                        this.on_connected(None, sink, Subscription::Sharded(pushes), ctx)
                    }
                    Err(e) => this.retry_later(&e.to_string(), ctx),
                }));
                return;
            }
        };
        let url = seeds;
        let fut = async move {
            let client = redis::Client::open(url.as_str())?;
            // Asked of the Redis the subscriber is about to use, not through the shared
            // connection, which may still be reconnecting.
            let mut conn = timed(client.get_multiplexed_async_connection()).await?;
            let info: String =
                timed(redis::cmd("INFO").arg("server").query_async(&mut conn)).await?;
            let run_id = info
                .lines()
                .find_map(|line| line.strip_prefix("run_id:"))
                .map(|id| id.trim().to_string());
            let pubsub = timed(client.get_async_pubsub()).await?;
            let (sink, stream) = pubsub.split();
            Ok::<_, CommandError>((run_id, sink, stream))
        };
        ctx.spawn(fut.into_actor(self).map(|result, this, ctx| match result {
            Ok((run_id, sink, stream)) => this.on_connected(
                run_id,
                SubscriberSink::Single(sink),
                Subscription::Single(stream),
                ctx,
            ),
            Err(e) => this.retry_later(&e.to_string(), ctx),
        }));
    }

    fn on_connected(
        &mut self,
        run_id: Option<String>,
        sink: SubscriberSink,
        subscription: Subscription,
        ctx: &mut Context<Self>,
    ) {
        self.generation.send_modify(|g| *g += 1);
        self.interest_changed = Arc::new(Notify::new());
        if self.was_connected {
            self.mark_quiet_channels();
        }
        self.connected_at_ms = unix_ms();
        self.live_channels.send_replace(HashSet::new());
        // Readiness waits for a canary through this connection, not one heard before the
        // outage: that one says nothing about the command connection since Redis came back.
        self.last_canary_ms.store(0, Ordering::Release);
        self.connected = true;
        self.backoff = BACKOFF_FIRST;
        let reconnected = self.was_connected;
        if reconnected {
            metrics().redis_reconnects.inc();
            log::info!("redis subscriber reconnected; resubscribing every channel");
            // Hold from now: live events must wait for the replay of what was missed.
            self.catching_up = self
                .delivered
                .keys()
                .map(|channel| (channel.clone(), Vec::new()))
                .collect();
        } else {
            log::info!("redis subscriber connected");
        }
        self.was_connected = true;
        if matches!((&self.redis_run_id, &run_id), (Some(old), Some(new)) if old != new) {
            self.redis_epoch += 1;
        }
        if run_id.is_some() {
            self.redis_run_id = run_id;
        }
        if reconnected {
            self.catch_up(ctx);
        }
        match subscription {
            Subscription::Single(stream) => {
                ctx.add_stream(stream);
            }
            Subscription::Sharded(pushes) => {
                // Tagged with its connection: pushes of a connection given up are ignored.
                let generation = *self.generation.borrow();
                let pushes = futures_util::stream::unfold(pushes, |mut pushes| async move {
                    pushes.recv().await.map(|push| (push, pushes))
                });
                ctx.add_stream(pushes.map(move |push| ShardPush { generation, push }));
            }
        }
        let fixed = vec![CONTROL_CHANNEL.to_string(), self.canary_channel.clone()];
        actix::spawn(reconcile_subscriptions(
            sink,
            self.keys,
            fixed,
            self.registry.clone(),
            self.interest_changed.clone(),
            self.live_channels.clone(),
            self.generation.subscribe(),
        ));
        // Readiness waits for the first canary to come back through the new subscription.
    }

    /// Channels that were subscribed on the lost connection but delivered no event yet have
    /// no last id to catch up from; without one, what was published on them while the
    /// subscriber was away would be lost without notice. Their gap starts when the lost
    /// subscription was last known alive (its last canary, else when it connected): nothing
    /// was delivered on them up to then, so nothing after it can have been. A pod clock
    /// behind Redis's may replay an event from just before a socket subscribed; one ahead
    /// cannot lose one, as events published before the drop were delivered live.
    fn mark_quiet_channels(&mut self) {
        let alive_until = self
            .last_canary_ms
            .load(Ordering::Acquire)
            .max(self.connected_at_ms);
        let quiet: Vec<ChannelKey> = self
            .live_channels
            .borrow()
            .iter()
            .filter(|channel| !self.delivered.contains_key(*channel))
            .cloned()
            .collect();
        for channel in quiet {
            self.delivered.insert(
                channel,
                Delivered {
                    id: EventId {
                        ms: alive_until,
                        seq: 0,
                    },
                    // Nothing of it was seen: no stream means nothing was published.
                    kept: false,
                    epoch: self.redis_epoch,
                    quiet: true,
                },
            );
        }
    }

    /// After a reconnect, replay on every channel this pod delivered events of what other
    /// pods published while its subscriber was away (each channel holds its live events
    /// until its replay is in; held events of an earlier connection were dropped, as the
    /// replay covers them).
    fn catch_up(&mut self, ctx: &mut Context<Self>) {
        let generation = *self.generation.borrow();
        let reader = GapReader {
            history: self.history,
            commands: self.commands.clone(),
            script: self.history_script.clone(),
            live: self.live_channels.subscribe(),
            generation: self.generation.subscribe(),
            reads: Arc::new(Semaphore::new(GAP_READS_AT_ONCE)),
        };
        for (channel, last) in &self.delivered {
            let fut = reader.clone().read(channel.clone(), last.id);
            let channel = channel.clone();
            ctx.spawn(fut.into_actor(self).map(move |gap, this, ctx| {
                if *this.generation.borrow() == generation {
                    this.gap_read(&channel, gap, ctx);
                }
            }));
        }
    }

    /// The history read of a channel catching up is in: deliver the replay and the live
    /// events held meanwhile, in id order, each once; or, when the replay cannot be complete,
    /// tell the channel's sockets to resync.
    ///
    /// After a Redis restart (since the channel's last event) history that does not reach
    /// back is not a gap this pod alone has: every pod lost it, and the restart itself cut
    /// the subscription, so what the new Redis holds is all there is to deliver. Asking
    /// sockets to reconnect then would only log them out if the sessions were lost with it.
    ///
    /// On a Redis Cluster, a shard failing over may take the subscription (a replica serves
    /// it) before its new master answers the history read: that is not history missing but
    /// the shard not back yet, so the subscriber starts over and reads again rather than ask
    /// the sockets to reconnect.
    fn gap_read(
        &mut self,
        channel: &ChannelKey,
        gap: Result<Gap, GapError>,
        ctx: &mut Context<Self>,
    ) {
        if let Err(GapError::Redis(e)) = &gap {
            if matches!(self.target, RedisTarget::Cluster(_)) && e.is_shard_unavailable() {
                let why = format!("history of {channel} unreadable: {e}");
                self.sharded_subscription_lost(&why, ctx);
                return;
            }
        }
        let Some(held) = self.catching_up.remove(channel) else {
            return;
        };
        let Some(last) = self.delivered.get(channel).copied() else {
            return;
        };
        let restarted = last.epoch != self.redis_epoch;
        let replay = match gap {
            Ok(Gap::Replay(replay))
                if replay.recovered || restarted || (last.quiet && replay.whole_stream) =>
            {
                replay.events
            }
            // Nothing of this channel is kept, and what it carried last was not meant to
            // be: a live-only topic, which simply resumes live.
            Ok(Gap::NoStream) if !last.kept || restarted => Vec::new(),
            Ok(Gap::Superseded) => return,
            outcome => {
                let why = match outcome {
                    Err(e) => e.to_string(),
                    Ok(Gap::Replay(_)) => "history no longer reaches back to it".into(),
                    _ => "no history of it is kept".into(),
                };
                let n = self.registry.resync_channel(channel, self.resync_spread_ms);
                log::warn!(
                    "{channel}: cannot replay what the subscriber missed after {}: {why}; asked its {n} socket(s) to reconnect",
                    last.id
                );
                if let Some(newest) = held.last() {
                    self.delivered.insert(
                        channel.clone(),
                        Delivered {
                            id: newest.id,
                            kept: last.kept,
                            epoch: self.redis_epoch,
                            quiet: false,
                        },
                    );
                }
                return;
            }
        };
        let mut events: Vec<Arc<Event>> = replay.into_iter().chain(held).collect();
        events.sort_by_key(|event| event.id);
        events.dedup_by_key(|event| event.id);
        let mut newest = Delivered {
            epoch: self.redis_epoch,
            ..last
        };
        for event in events.iter().filter(|event| event.id > last.id) {
            self.registry.deliver(event);
            newest.id = event.id;
            newest.quiet = false;
        }
        self.delivered.insert(channel.clone(), newest);
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

    fn on_event_message(&mut self, channel: ChannelKey, payload: &[u8]) {
        let received_at = Instant::now();
        // Whether Redis gave the id (every publish through the hub has one).
        let mut from_redis = false;
        let (event, from_client) = if payload.first() == Some(&BINARY_MARK) {
            let id = self.next_local_id(&channel);
            let body = PublishBody::Binary(Bytes::copy_from_slice(&payload[1..]));
            (build_event(channel, id, &body, None, received_at), false)
        } else {
            let message = match decode_message(payload, unix_ms()) {
                Ok(message) => message,
                Err(e) => {
                    log::warn!("ignoring message on {channel}: {e}");
                    return;
                }
            };
            let id = match message.id {
                Some(id) => {
                    let last = self.last_ids.entry(channel.clone()).or_default();
                    *last = (*last).max(id);
                    from_redis = true;
                    id
                }
                None => self.next_local_id(&channel),
            };
            let sender = message.sender.as_ref();
            let event = build_raw_event(
                channel,
                id,
                &message.event,
                message.data,
                sender,
                received_at,
            );
            (event, sender.is_some())
        };
        let id = event.id;
        metrics().events_received.inc();
        let kept = self
            .history
            .is_some_and(|h| !from_client || h.keep_client_events);
        if let Some(held) = self.catching_up.get_mut(&event.channel) {
            if held.len() < MAX_HELD {
                held.push(event);
                return;
            }
            // Its replay is taking too long to hold the channel's live events any longer.
            self.catching_up.remove(&event.channel);
            let n = self
                .registry
                .resync_channel(&event.channel, self.resync_spread_ms);
            log::warn!(
                "{}: {MAX_HELD} live events held waiting for the replay of what the subscriber missed; asked its {n} socket(s) to reconnect",
                event.channel
            );
        }
        if from_redis {
            self.delivered.insert(
                event.channel.clone(),
                Delivered {
                    id,
                    kept,
                    epoch: self.redis_epoch,
                    quiet: false,
                },
            );
        }
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
        let mut publish = redis::cmd(self.keys.publish_command());
        publish.arg(&self.canary_channel).arg(unix_ms());
        let health = self.health.clone();
        actix::spawn(async move {
            match timed(publish.exec_async(&mut conn)).await {
                Ok(()) => health.command_answered(),
                Err(e) => health.command_failed(&e),
            }
        });
    }
}

/// Keep the subscriber's channel set equal to the registry's, until the connection ends or
/// is superseded: a reconciler left behind would hold a dead sink forever.
async fn reconcile_subscriptions(
    sink: SubscriberSink,
    keys: KeyScheme,
    fixed: Vec<String>,
    registry: Arc<Registry>,
    changed: Arc<Notify>,
    live: watch::Sender<HashSet<ChannelKey>>,
    mut generation: watch::Receiver<u64>,
) {
    let mine = *generation.borrow_and_update();
    tokio::select! {
        () = keep_subscriptions(sink, keys, fixed, registry, changed, live) => {}
        // Also when the broker is gone (sender dropped).
        _ = generation.wait_for(|current| *current != mine) => {
            log::debug!("subscriber connection {mine} superseded; its reconciler stops");
        }
    }
}

async fn keep_subscriptions(
    mut sink: SubscriberSink,
    keys: KeyScheme,
    fixed: Vec<String>,
    registry: Arc<Registry>,
    changed: Arc<Notify>,
    live: watch::Sender<HashSet<ChannelKey>>,
) {
    if let Err(e) = sink.subscribe(fixed).await {
        log::warn!("cannot subscribe control channels: {e}");
        sink.lost();
        return;
    }
    let mut subscribed: HashSet<ChannelKey> = HashSet::new();
    loop {
        let wanted: HashSet<ChannelKey> = registry.active_channels().into_iter().collect();
        let names = |channels: std::collections::hash_set::Difference<'_, ChannelKey, _>| {
            channels
                .map(|c| keys.channel(c).into_owned())
                .collect::<Vec<String>>()
        };
        let add = names(wanted.difference(&subscribed));
        let remove = names(subscribed.difference(&wanted));
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
            if let Err(e) = sink.subscribe(add).await {
                log::debug!("subscriber gone while subscribing: {e}");
                sink.lost();
                return;
            }
            // Live as soon as Redis answered, not only after the UNSUBSCRIBE below.
            live.send_modify(|channels| channels.extend(wanted.difference(&subscribed).cloned()));
        }
        if !remove.is_empty() {
            if let Err(e) = sink.unsubscribe(remove).await {
                log::debug!("subscriber gone while unsubscribing: {e}");
                sink.lost();
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

impl RedisBroker {
    /// A message on any subscribed channel: the canary, an order, or an event.
    fn on_message(&mut self, channel: &str, payload: &[u8]) {
        if channel == self.canary_channel {
            self.last_canary_ms.store(unix_ms(), Ordering::Release);
        } else if channel == CONTROL_CHANNEL {
            self.on_control(payload);
        } else if let Some(channel) = self.keys.parse_channel(channel) {
            self.on_event_message(channel, payload);
        }
    }

    /// The sharded subscription lost channels (a node's connection closed, or a shard gave up
    /// slots it no longer owns): start over on a new cluster connection. Rebuilding, rather
    /// than letting the cluster client resubscribe by itself, is what tells this broker when
    /// to replay from history what the lost channels carried meanwhile, as after any outage.
    fn sharded_subscription_lost(&mut self, why: &str, ctx: &mut Context<Self>) {
        self.generation.send_modify(|g| *g += 1);
        self.retry_later(why, ctx);
    }
}

impl StreamHandler<redis::Msg> for RedisBroker {
    fn handle(&mut self, msg: redis::Msg, _: &mut Self::Context) {
        self.on_message(msg.get_channel_name(), msg.get_payload_bytes());
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        // Stop the reconciler of this connection now rather than when its sink next fails.
        self.generation.send_modify(|g| *g += 1);
        self.retry_later("connection closed", ctx);
    }
}

impl StreamHandler<ShardPush> for RedisBroker {
    fn handle(&mut self, ShardPush { generation, push }: ShardPush, ctx: &mut Self::Context) {
        if generation != *self.generation.borrow() || !self.connected {
            return;
        }
        let text = |value: Option<&RedisValue>| match value {
            Some(RedisValue::BulkString(bytes)) => Some(bytes.clone()),
            _ => None,
        };
        match push.kind {
            PushKind::SMessage | PushKind::Message => {
                if let (Some(channel), Some(payload)) =
                    (text(push.data.first()), text(push.data.get(1)))
                {
                    self.on_message(&String::from_utf8_lossy(&channel), &payload);
                }
            }
            PushKind::Disconnection => {
                self.sharded_subscription_lost("a Redis Cluster node's connection closed", ctx)
            }
            // Unasked (its channel is still wanted): the shard no longer owns the slot.
            PushKind::SUnsubscribe => {
                let Some(channel) = text(push.data.first()) else {
                    return;
                };
                let channel = String::from_utf8_lossy(&channel);
                let wanted = channel == CONTROL_CHANNEL
                    || channel == self.canary_channel
                    || self
                        .keys
                        .parse_channel(&channel)
                        .is_some_and(|key| self.registry.active_channels().contains(&key));
                if wanted {
                    self.sharded_subscription_lost(
                        &format!("Redis Cluster unsubscribed {channel} (its slot moved)"),
                        ctx,
                    );
                }
            }
            _ => {}
        }
    }

    /// A cluster connection's pushes end once it is given up, which its successor handles.
    fn finished(&mut self, _: &mut Self::Context) {}
}

impl Handler<Interest> for RedisBroker {
    type Result = ();

    fn handle(&mut self, interest: Interest, _: &mut Self::Context) {
        if let Interest::Closed(channel) = &interest {
            self.last_ids.remove(channel);
            self.delivered.remove(channel);
            self.catching_up.remove(channel);
        }
        // The reconciler reads the registry itself; one wake-up covers any number of changes.
        self.interest_changed.notify_one();
    }
}

/// A push from a sharded subscription, tagged with the connection (generation) it came on.
struct ShardPush {
    generation: u64,
    push: PushInfo,
}

/// What a subscriber connection delivers: one Redis's pub/sub messages, or a Redis
/// Cluster connection's RESP3 pushes (messages, and word of lost nodes and channels).
enum Subscription {
    Single(redis::aio::PubSubStream),
    Sharded(tokio::sync::mpsc::UnboundedReceiver<PushInfo>),
}

/// Where the reconciler subscribes: one Redis's pub/sub connection (SUBSCRIBE), or a Redis
/// Cluster connection that sends each SSUBSCRIBE to the shard owning its channel (a shard
/// then carries only its own channels' traffic, and a pod subscribes per shard).
enum SubscriberSink {
    Single(PubSubSink),
    Sharded {
        conn: ClusterConnection,
        /// The connection's own push channel, to report it lost when a command fails.
        pushes: tokio::sync::mpsc::UnboundedSender<PushInfo>,
    },
}

impl SubscriberSink {
    async fn subscribe(&mut self, channels: Vec<String>) -> redis::RedisResult<()> {
        match self {
            Self::Single(sink) => sink.subscribe(channels).await,
            Self::Sharded { conn, .. } => {
                let sent = by_slot(channels).into_iter().map(|group| {
                    let mut conn = conn.clone();
                    async move { conn.ssubscribe(group).await }
                });
                futures_util::future::try_join_all(sent).await.map(drop)
            }
        }
    }

    async fn unsubscribe(&mut self, channels: Vec<String>) -> redis::RedisResult<()> {
        match self {
            Self::Single(sink) => sink.unsubscribe(channels).await,
            Self::Sharded { conn, .. } => {
                let sent = by_slot(channels).into_iter().map(|group| {
                    let mut conn = conn.clone();
                    async move { conn.sunsubscribe(group).await }
                });
                futures_util::future::try_join_all(sent).await.map(drop)
            }
        }
    }

    /// A subscription command failed: on a cluster, tell the broker to start over (one
    /// Redis's pub/sub stream ends by itself when its connection does).
    fn lost(&self) {
        if let Self::Sharded { pushes, .. } = self {
            let _ = pushes.send(PushInfo {
                kind: PushKind::Disconnection,
                data: Vec::new(),
            });
        }
    }
}

/// Channels grouped by hash tag: one SSUBSCRIBE may name channels of one slot only.
fn by_slot(channels: Vec<String>) -> Vec<Vec<String>> {
    let mut groups: HashMap<String, Vec<String>> = HashMap::new();
    for channel in channels {
        groups
            .entry(hash_tag(&channel).to_string())
            .or_default()
            .push(channel);
    }
    groups.into_values().collect()
}

/// Open a Redis Cluster connection for sharded subscriptions: RESP3, its pushes (messages,
/// `sunsubscribe` from a shard whose slots moved, lost nodes) into a channel of its own.
async fn connect_sharded(
    seeds: Vec<String>,
) -> Result<
    (
        SubscriberSink,
        tokio::sync::mpsc::UnboundedReceiver<PushInfo>,
    ),
    CommandError,
> {
    let (pushes, received) = tokio::sync::mpsc::unbounded_channel();
    let client = cluster_client(&seeds)
        .use_protocol(ProtocolVersion::RESP3)
        .push_sender(pushes.clone())
        .build()?;
    let conn = timed(client.get_async_connection()).await?;
    Ok((SubscriberSink::Sharded { conn, pushes }, received))
}

/// Publishing to Redis: a JSON event's history entry and its PUBLISH in one script, a binary
/// frame as a bare PUBLISH. HTTP workers publish through it themselves rather than through
/// the broker actor, sparing each publish two cross-thread wake-ups. It uses the shared
/// connection, not the thread's own: a publish is never sent twice, so it needs a connection
/// that other traffic keeps checked, or the first publish after a Redis restart would fail.
#[derive(Clone)]
pub(crate) struct RedisPublisher {
    commands: RedisCommands,
    script: Arc<Script>,
    history: Option<StreamHistory>,
}

impl RedisPublisher {
    pub(crate) fn new(commands: RedisCommands, history: Option<StreamHistory>) -> Self {
        Self {
            commands,
            script: Arc::new(Script::new(PUBLISH_LUA)),
            history,
        }
    }

    /// Publish once; `Ok` once Redis has taken the event.
    pub(crate) async fn publish(&self, request: PublishRequest) -> Result<EventId, BrokerError> {
        let channel = request.channel();
        let mut conn = self.commands.manager();
        let history = self.history;
        let message = match &request.body {
            PublishBody::Json { event, data } => {
                let sender = request.sender.as_ref();
                serde_json::to_string(&WireEventOut {
                    event,
                    data,
                    user: sender.map(|s| s.user.as_str()),
                    conn_id: sender.map(|s| s.conn_id.as_str()),
                })
                // unwrap: a JSON value and plain strings always serialise.
                .unwrap()
            }
            PublishBody::Binary(bytes) => {
                // Audio is live-only: straight to the channel, no history.
                let mut framed = Vec::with_capacity(bytes.len() + 1);
                framed.push(BINARY_MARK);
                framed.extend_from_slice(bytes);
                let keys = self.commands.keys();
                let mut publish = redis::cmd(keys.publish_command());
                publish.arg(keys.channel(&channel).as_ref()).arg(framed);
                timed(publish.exec_async(&mut conn)).await?;
                return Ok(EventId::default());
            }
        };
        // Browser-published events are live only unless configured otherwise: one user must
        // not be able to pin memory in Redis that every org's sessions need.
        let keep = history.filter(|h| request.sender.is_none() || h.keep_client_events);
        let keys = self.commands.keys();
        let mut invocation = self.script.key(keys.history_stream(&channel));
        invocation
            .key(keys.channel(&channel).as_ref())
            .key(keys.history_index(&request.org))
            .key(keys.sequence(&request.org).as_ref())
            .arg(if keep.is_some() { "1" } else { "0" })
            .arg(keep.map_or(0, |h| h.max_len))
            .arg(keep.map_or(0, |h| h.ttl_s))
            .arg(message)
            .arg(keep.map_or(0, |h| h.max_topics_per_org))
            .arg(keys.publish_command());
        let (id, state): (String, String) = timed(invocation.invoke_async(&mut conn)).await?;
        if state == "capped" {
            log::warn!(
                "{channel}: org {} already keeps history on {} topics (history.max_topics_per_org); event delivered live but not kept",
                request.org.as_str(),
                keep.map_or(0, |h| h.max_topics_per_org)
            );
        }
        EventId::parse(&id).ok_or(BrokerError::UnexpectedId(id))
    }
}

impl Handler<FetchHistory> for RedisBroker {
    type Result = ResponseFuture<Result<Replay, BrokerError>>;

    fn handle(&mut self, msg: FetchHistory, _: &mut Self::Context) -> Self::Result {
        let Some(history) = self.history else {
            return Box::pin(async { Ok(Replay::default()) });
        };
        let mut conn = self.commands.manager();
        let keys = self.keys;
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
                return Err(BrokerError::NotSubscribed(msg.channel));
            }
            let history = StreamHistory {
                replay_max_bytes: history.replay_max_bytes.min(msg.max_bytes),
                ..history
            };
            read_history(&mut conn, keys, &script, &msg.channel, msg.since, history).await
        })
    }
}

/// Run [`HISTORY_LUA`] for the entries of `channel` after `since` and decode its answer.
async fn read_history(
    conn: &mut RedisConn,
    keys: KeyScheme,
    script: &Script,
    channel: &ChannelKey,
    since: EventId,
    history: StreamHistory,
) -> Result<Replay, BrokerError> {
    let mut invocation = script.key(keys.history_stream(channel));
    invocation
        .arg(since.to_string())
        .arg(history.max_len)
        .arg(history.replay_max_bytes);
    let answer: Vec<RedisValue> = timed(invocation.invoke_async(conn)).await?;
    Ok(decode_history(channel, since, &answer))
}

/// The last event of a channel this pod's subscriber handed to the registry.
#[derive(Debug, Clone, Copy)]
struct Delivered {
    /// Its id, which Redis gave (the history entry's id when it was kept).
    id: EventId,
    /// Whether it was meant to be kept (history on, and not a browser event left live only).
    kept: bool,
    /// The Redis it came from ([`RedisBroker::redis_epoch`]).
    epoch: u64,
    /// No event of the channel was seen: `id` is when its subscription was last known
    /// alive, so a stream that began after it holds all that was missed.
    quiet: bool,
}

/// What a channel missed while the subscriber was away, read once it is subscribed again.
enum Gap {
    /// History after the last delivered id (`recovered` when it reaches back to it).
    Replay(Replay),
    /// The channel has no history stream.
    NoStream,
    /// The connection ended before the channel was subscribed again; the next one reads.
    Superseded,
}

/// Why what a channel missed could not be read.
#[derive(Debug, thiserror::Error)]
enum GapError {
    #[error("history is disabled")]
    NoHistory,
    #[error("not subscribed again within {0:?}")]
    NotSubscribed(Duration),
    #[error("history unreadable: {0}")]
    Redis(#[from] CommandError),
}

/// How long a channel catching up waits for its SUBSCRIBE to be confirmed.
const GAP_SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Live events a channel catching up holds at most while its replay is read.
const MAX_HELD: usize = 10_000;
/// History reads of channels catching up in flight at once: each may bring up to
/// `history.replay_max_bytes`.
const GAP_READS_AT_ONCE: usize = 16;

/// Reads what channels missed while the subscriber was away, for one connection.
#[derive(Clone)]
struct GapReader {
    history: Option<StreamHistory>,
    commands: RedisCommands,
    script: Arc<Script>,
    live: watch::Receiver<HashSet<ChannelKey>>,
    generation: watch::Receiver<u64>,
    /// Bounds the reads in flight at once ([`GAP_READS_AT_ONCE`]).
    reads: Arc<Semaphore>,
}

impl GapReader {
    /// Once `channel` is subscribed again on the current connection, read its history after
    /// `since`: read earlier, an event published before the SUBSCRIBE took effect would be
    /// in neither the read nor the live stream.
    async fn read(self, channel: ChannelKey, since: EventId) -> Result<Gap, GapError> {
        let Self {
            history,
            commands,
            script,
            mut live,
            mut generation,
            reads,
        } = self;
        let mine = *generation.borrow_and_update();
        tokio::select! {
            confirmed = tokio::time::timeout(
                GAP_SUBSCRIBE_TIMEOUT,
                live.wait_for(|channels| channels.contains(&channel)),
            ) => match confirmed {
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return Ok(Gap::Superseded),
                Err(_) => return Err(GapError::NotSubscribed(GAP_SUBSCRIBE_TIMEOUT)),
            },
            _ = generation.wait_for(|current| *current != mine) => return Ok(Gap::Superseded),
        }
        let history = history.ok_or(GapError::NoHistory)?;
        // Never closed.
        let Ok(_turn) = reads.acquire().await else {
            return Ok(Gap::Superseded);
        };
        // Right after a reconnect the shared connection may not know yet that its socket died:
        // the read is sent once more on a dropped connection, as reading twice does no harm.
        let key = commands.keys().history_stream(&channel);
        let answer: Vec<RedisValue> = commands
            .run_idempotent(|mut conn| {
                let mut invocation = script.key(&key);
                invocation
                    .arg(since.to_string())
                    .arg(history.max_len)
                    .arg(history.replay_max_bytes);
                async move { invocation.invoke_async(&mut conn).await }
            })
            .await?;
        if !matches!(answer.first(), Some(RedisValue::Int(1))) {
            return Ok(Gap::NoStream);
        }
        Ok(Gap::Replay(decode_history(&channel, since, &answer)))
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
    let newest_trimmed = text(answer.get(4)).filter(|id| *id > EventId::default());
    let cut = int(5) == Some(1);
    // The stream holds everything after its newest trimmed entry (recorded by PUBLISH_LUA),
    // and a stream never trimmed everything from its oldest entry on. A `since` older than
    // both was never in this stream as it is (it expired and came back, or history was off),
    // so it cannot be vouched for. Redis before 7.0 records no trimmed id: the stream then
    // reaches back to its oldest entry only.
    let reaches_back = since_kept
        || oldest.is_some_and(|o| o <= since)
        || newest_trimmed.is_some_and(|t| t <= since);
    let recovered = since <= last && reaches_back && !cut;
    let entries: Vec<StreamEntry> = answer
        .get(6)
        .and_then(|v| redis::from_redis_value(v).ok())
        .unwrap_or_default();
    let now = Instant::now();
    // Replayed ids only ever go forward from `since`, whatever the answer holds.
    let mut newest = since;
    let events: Vec<Arc<Event>> = entries
        .into_iter()
        .filter_map(|(id, fields)| {
            let id = EventId::parse(&id).filter(|&id| id > newest)?;
            let (_, raw) = fields.into_iter().find(|(k, _)| k == "m")?;
            // The entry's id is the event's: an `id` inside `m` is not looked at.
            let message = match decode_message(&raw, u64::MAX) {
                Ok(message) => {
                    newest = id;
                    message
                }
                Err(e) => {
                    log::warn!("skipping history entry {id} of {channel}: {e}");
                    return None;
                }
            };
            Some(build_raw_event(
                channel.clone(),
                id,
                &message.event,
                message.data,
                message.sender.as_ref(),
                now,
            ))
        })
        .collect();
    Replay {
        events,
        recovered,
        whole_stream: newest_trimmed.is_none() && !cut,
    }
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::event::Payload;
    use crate::core::ids::{OrgId, Topic};
    use crate::store::test_redis::TestRedis;
    use futures_util::StreamExt;

    fn channel() -> ChannelKey {
        ChannelKey::new(&OrgId::parse("1").unwrap(), &Topic::parse("calls").unwrap())
    }

    fn id(raw: &str) -> EventId {
        EventId::parse(raw).unwrap()
    }

    fn bulk(text: &str) -> RedisValue {
        RedisValue::BulkString(text.as_bytes().to_vec())
    }

    /// One XRANGE entry as Redis answers it.
    fn entry(id: &str, fields: &[(&str, &str)]) -> RedisValue {
        let fields = fields
            .iter()
            .flat_map(|(k, v)| [bulk(k), bulk(v)])
            .collect();
        RedisValue::Array(vec![bulk(id), RedisValue::Array(fields)])
    }

    /// The `m` field of a history entry holding event `call.status` with `{"n": n}`.
    fn message(n: u32) -> String {
        format!(r#"{{"event":"call.status","data":{{"n":{n}}}}}"#)
    }

    fn kept(id: &str, n: u32) -> RedisValue {
        entry(id, &[("m", &message(n))])
    }

    /// HISTORY_LUA's answer for an existing stream: the newest id ever added, whether `since`
    /// itself is kept, the oldest kept id, the newest trimmed id (0-0: none), the replay not
    /// cut short, and the entries after `since`.
    fn answer(
        last: &str,
        since_kept: bool,
        oldest: &str,
        trimmed: &str,
        entries: Vec<RedisValue>,
    ) -> Vec<RedisValue> {
        vec![
            RedisValue::Int(1),
            bulk(last),
            RedisValue::Int(since_kept.into()),
            bulk(oldest),
            bulk(trimmed),
            RedisValue::Int(0),
            RedisValue::Array(entries),
        ]
    }

    fn ids(replay: &Replay) -> Vec<String> {
        replay.events.iter().map(|e| e.id.to_string()).collect()
    }

    /// The `data.n` of each replayed event.
    fn numbers(replay: &Replay) -> Vec<u64> {
        replay
            .events
            .iter()
            .map(|e| match &e.payload {
                Payload::Text(text) => {
                    let frame: Value = serde_json::from_str(text).expect("event frame");
                    frame["data"]["n"].as_u64().expect("data.n")
                }
                Payload::Binary(_) => panic!("a binary event in history"),
            })
            .collect()
    }

    /// A channel with no stream (never published, or expired) has nothing to replay and
    /// cannot vouch for `since`.
    #[test]
    fn no_stream_is_not_recovered() {
        let replay = decode_history(&channel(), id("5-0"), &[RedisValue::Int(0)]);
        assert!(replay.events.is_empty());
        assert!(!replay.recovered);
    }

    /// A trimmed stream that still holds `since` replays what follows it, recovered.
    #[test]
    fn since_still_kept_is_recovered_after_trimming() {
        let entries = vec![kept("4-0", 4), kept("5-0", 5)];
        let replay = decode_history(
            &channel(),
            id("3-0"),
            &answer("5-0", true, "3-0", "2-0", entries),
        );
        assert_eq!(ids(&replay), ["4-0", "5-0"]);
        assert_eq!(numbers(&replay), [4, 5]);
        assert!(replay.recovered);
    }

    /// A `since` that was never an entry (a binary event's id) but lies within what is kept
    /// is recovered.
    #[test]
    fn since_between_kept_entries_is_recovered() {
        let replay = decode_history(
            &channel(),
            id("3-7"),
            &answer(
                "5-0",
                false,
                "3-0",
                "2-0",
                vec![kept("4-0", 4), kept("5-0", 5)],
            ),
        );
        assert_eq!(ids(&replay), ["4-0", "5-0"]);
        assert!(replay.recovered);
    }

    /// Trimming removed entries after `since`: what is kept is replayed, not recovered.
    #[test]
    fn since_older_than_a_trimmed_stream_is_not_recovered() {
        let replay = decode_history(
            &channel(),
            id("1-0"),
            &answer(
                "5-0",
                false,
                "4-0",
                "3-0",
                vec![kept("4-0", 4), kept("5-0", 5)],
            ),
        );
        assert_eq!(ids(&replay), ["4-0", "5-0"]);
        assert!(!replay.recovered);
    }

    /// A `since` older than the first entry of a stream never trimmed was not in this stream
    /// (it expired and came back, or history was off then): what is kept is replayed, not
    /// recovered. (Redis before 7 records no trimmed id and answers the same.)
    #[test]
    fn since_before_an_untrimmed_stream_is_not_recovered() {
        let replay = decode_history(
            &channel(),
            id("1-0"),
            &answer(
                "5-0",
                false,
                "4-0",
                "0-0",
                vec![kept("4-0", 4), kept("5-0", 5)],
            ),
        );
        assert_eq!(ids(&replay), ["4-0", "5-0"]);
        assert!(!replay.recovered);
        // Yet it is the whole stream: a pod that knows nothing was published on the channel
        // before `since` (it was quiet there) can rely on it.
        assert!(replay.whole_stream);
        let trimmed = decode_history(
            &channel(),
            id("1-0"),
            &answer(
                "5-0",
                false,
                "4-0",
                "3-0",
                vec![kept("4-0", 4), kept("5-0", 5)],
            ),
        );
        assert!(!trimmed.whole_stream && !trimmed.recovered);
    }

    /// `since` is the newest trimmed entry (or lies between it and the oldest kept one):
    /// everything after it is kept, so it is recovered.
    #[test]
    fn since_at_or_after_the_newest_trimmed_id_is_recovered() {
        for since in ["3-0", "3-5"] {
            let replay = decode_history(
                &channel(),
                id(since),
                &answer(
                    "5-0",
                    false,
                    "4-0",
                    "3-0",
                    vec![kept("4-0", 4), kept("5-0", 5)],
                ),
            );
            assert_eq!(ids(&replay), ["4-0", "5-0"]);
            assert!(replay.recovered, "since {since}");
        }
    }

    /// A replay cut short by `history.replay_max_bytes` replays what it has, not recovered.
    #[test]
    fn a_replay_cut_short_is_not_recovered() {
        let mut cut = answer("5-0", true, "3-0", "0-0", vec![kept("5-0", 5)]);
        cut[5] = RedisValue::Int(1);
        let replay = decode_history(&channel(), id("3-0"), &cut);
        assert_eq!(ids(&replay), ["5-0"]);
        assert!(!replay.recovered);
    }

    /// A `since` newer than anything the stream ever had (another stream's, or forged) is not
    /// recovered, even though nothing was trimmed.
    #[test]
    fn since_after_the_last_id_is_not_recovered() {
        let replay = decode_history(
            &channel(),
            id("9-0"),
            &answer("5-0", false, "4-0", "0-0", Vec::new()),
        );
        assert!(replay.events.is_empty());
        assert!(!replay.recovered);
    }

    /// Entries with a bad id, without an `m` field, with bad JSON or a bad event name are
    /// skipped; the others are replayed in order, with their event name and sender.
    #[test]
    fn malformed_entries_are_skipped() {
        let with_sender = r#"{"event":"chat","data":{"n":6},"user":"alice","conn_id":"c-1"}"#;
        let entries = vec![
            kept("2-0", 2),
            kept("not-an-id", 3),
            entry("4-0", &[("x", &message(4))]),
            entry("5-0", &[("m", "{not json")]),
            entry("5-1", &[("m", "{\"event\":\"a\\nb\",\"data\":{\"n\":5}}")]),
            entry("6-0", &[("m", with_sender)]),
        ];
        let replay = decode_history(
            &channel(),
            id("1-0"),
            &answer("6-0", true, "1-0", "0-0", entries),
        );
        assert_eq!(ids(&replay), ["2-0", "6-0"]);
        assert_eq!(numbers(&replay), [2, 6]);
        assert_eq!(&*replay.events[1].name, "chat");
        let Payload::Text(frame) = &replay.events[1].payload else {
            panic!("a text event");
        };
        let frame: Value = serde_json::from_str(frame).unwrap();
        assert_eq!(
            (&frame["user"], &frame["conn_id"]),
            (&"alice".into(), &"c-1".into())
        );
        assert!(replay.recovered);
    }

    /// A message PUBLISHed straight to Redis keeps the id it gives (one is added only when
    /// absent) and is checked as `/api/publish` checks a body: an event name that could
    /// forge SSE records, an id that is not one, or an id far ahead of the clock (which would
    /// hold every later `since`) is refused.
    #[test]
    fn messages_from_redis_are_validated() {
        let now = 1_700_000_000_000;
        let decode = |text: &'static str| decode_message(text.as_bytes(), now);
        let given = decode(r#"{"id":"1699999999000-3","event":"e","data":1}"#)
            .expect("a given id in the past");
        assert_eq!(given.id, Some(id("1699999999000-3")));
        let absent = decode(r#"{"data":1}"#).expect("no id");
        assert_eq!(absent.id, None);
        assert_eq!(absent.event, "message");
        assert!(decode(r#"{"id":"1700000030000-0","data":1}"#).is_ok());

        let forged = decode("{\"event\":\"x\\ndata: forged\",\"data\":1}").unwrap_err();
        assert!(matches!(forged, BadMessage::Name(..)), "{forged}");
        let ahead = decode(r#"{"id":"1700000100000-0","data":1}"#).unwrap_err();
        assert!(matches!(ahead, BadMessage::IdAhead(_)), "{ahead}");
        let far = decode(r#"{"id":"18446744073709551615-18446744073709551615","data":1}"#);
        assert!(matches!(far, Err(BadMessage::IdAhead(_))));
        let bad = decode(r#"{"id":"soon","data":1}"#).unwrap_err();
        assert!(matches!(bad, BadMessage::Id(_)), "{bad}");
    }

    /// Found by fuzzing: entries out of order or not after `since` were replayed as given,
    /// and an event name with a line break reached SSE's `event:` line; both are skipped.
    #[test]
    fn replay_only_moves_forward_with_valid_names() {
        let forged = r#"{"event":"x\ndata: forged\n\nevent: y","data":{"n":5}}"#;
        let entries = vec![
            kept("1-0", 1),
            kept("3-0", 3),
            kept("2-0", 2),
            kept("3-0", 3),
            entry("5-0", &[("m", forged)]),
            kept("6-0", 6),
        ];
        let replay = decode_history(
            &channel(),
            id("1-0"),
            &answer("6-0", true, "1-0", "0-0", entries),
        );
        assert_eq!(ids(&replay), ["3-0", "6-0"]);
        assert_eq!(numbers(&replay), [3, 6]);
    }

    /// A channel's publisher and history reader on a fresh redis-server.
    struct Clustered {
        redis: TestRedis,
        publisher: RedisPublisher,
        conn: RedisConn,
        history: Option<StreamHistory>,
    }

    impl Clustered {
        async fn start(history: Option<StreamHistory>) -> Self {
            let redis = TestRedis::start();
            let commands = RedisCommands::connect(&redis.url())
                .await
                .expect("connect to the test redis-server");
            Self {
                publisher: RedisPublisher::new(commands.clone(), history),
                conn: commands.manager(),
                history,
                redis,
            }
        }

        /// History as the tests keep it: 10 entries per topic for a minute, on at most 10
        /// topics per org, replays of at most 64 KiB, client events not kept.
        const HISTORY: StreamHistory = StreamHistory {
            max_len: 10,
            ttl_s: 60,
            max_topics_per_org: 10,
            replay_max_bytes: 65_536,
            keep_client_events: false,
        };

        /// History kept up to `max_len` entries, for a minute.
        async fn with_history(max_len: usize) -> Self {
            Self::start(Some(StreamHistory {
                max_len,
                ..Self::HISTORY
            }))
            .await
        }

        fn request(body: PublishBody, sender: Option<EventSender>) -> PublishRequest {
            PublishRequest {
                org: OrgId::parse("1").unwrap(),
                topic: Topic::parse("calls").unwrap(),
                body,
                sender,
            }
        }

        /// Publish `call.status` with `{"n": n}`.
        async fn publish(&self, n: u32) -> EventId {
            let body = PublishBody::Json {
                event: "call.status".into(),
                data: serde_json::json!({ "n": n }),
            };
            self.publisher
                .publish(Self::request(body, None))
                .await
                .expect("publish")
        }

        async fn history_since(&mut self, since: EventId) -> Replay {
            let history = self.history.expect("history is kept");
            let script = Script::new(HISTORY_LUA);
            read_history(
                &mut self.conn,
                KeyScheme::Plain,
                &script,
                &channel(),
                since,
                history,
            )
            .await
            .expect("read history")
        }

        /// A pub/sub connection subscribed to the channel.
        async fn subscriber(&self) -> redis::aio::PubSub {
            let client = redis::Client::open(self.redis.url()).expect("redis url");
            let mut pubsub = client.get_async_pubsub().await.expect("pubsub connection");
            pubsub
                .subscribe(channel().as_str())
                .await
                .expect("SUBSCRIBE");
            pubsub
        }

        /// The entries of the channel's history stream: id and `m`.
        fn stream(&self) -> Vec<(String, String)> {
            let entries: Vec<StreamEntry> = redis::cmd("XRANGE")
                .arg(format!("{}:log", channel()))
                .arg("-")
                .arg("+")
                .query(&mut self.redis.conn())
                .expect("XRANGE");
            entries
                .into_iter()
                .map(|(id, fields)| {
                    let m = fields.into_iter().find(|(k, _)| k == "m").expect("m").1;
                    (id, String::from_utf8(m).expect("utf-8"))
                })
                .collect()
        }
    }

    /// The next message on a subscribed connection (bounded, so a missing one fails).
    async fn next_message(pubsub: &mut redis::aio::PubSub) -> Vec<u8> {
        let mut messages = pubsub.on_message();
        let next = tokio::time::timeout(Duration::from_secs(5), messages.next());
        let message = next
            .await
            .expect("a message within 5 s")
            .expect("pubsub open");
        message.get_payload_bytes().to_vec()
    }

    /// A JSON publish appends one history entry (kept for the TTL) and PUBLISHes the event
    /// with that entry's id as its first field, sender included (client events are kept when
    /// `keep_client_events` says so).
    #[tokio::test]
    async fn a_publish_appends_to_history_and_publishes_with_its_id_first() {
        let clustered = Clustered::start(Some(StreamHistory {
            keep_client_events: true,
            ..Clustered::HISTORY
        }))
        .await;
        let mut pubsub = clustered.subscriber().await;
        let body = PublishBody::Json {
            event: "call.status".into(),
            data: serde_json::json!({ "n": 1 }),
        };
        let sender = EventSender {
            user: "alice".into(),
            conn_id: "c-1".into(),
        };
        let id = clustered
            .publisher
            .publish(Clustered::request(body, Some(sender)))
            .await
            .expect("publish");

        let published = String::from_utf8(next_message(&mut pubsub).await).unwrap();
        assert!(
            published.starts_with(&format!(r#"{{"id":"{id}","#)),
            "{published}"
        );
        let published: Value = serde_json::from_str(&published).expect("published JSON");
        assert_eq!(published["event"], "call.status");
        assert_eq!(published["data"]["n"], 1);
        assert_eq!(
            (&published["user"], &published["conn_id"]),
            (&"alice".into(), &"c-1".into())
        );

        let stream = clustered.stream();
        assert_eq!(stream.len(), 1);
        assert_eq!(stream[0].0, id.to_string());
        let kept: Value = serde_json::from_str(&stream[0].1).expect("history JSON");
        assert_eq!(kept["data"]["n"], 1);
        let ttl: i64 = redis::cmd("TTL")
            .arg(format!("{}:log", channel()))
            .query(&mut clustered.redis.conn())
            .expect("TTL");
        assert!((1..=60).contains(&ttl), "TTL {ttl}");
    }

    /// Without history a publish keeps nothing, yet the event still carries a fresh id that
    /// rises from one publish to the next.
    #[tokio::test]
    async fn without_history_a_publish_keeps_nothing_but_still_has_an_id() {
        let clustered = Clustered::start(None).await;
        let mut pubsub = clustered.subscriber().await;
        let first = clustered.publish(1).await;
        let second = clustered.publish(2).await;
        assert!(second > first, "{first} then {second}");
        for id in [first, second] {
            let published: Value =
                serde_json::from_slice(&next_message(&mut pubsub).await).expect("published JSON");
            assert_eq!(published["id"], id.to_string());
        }
        let exists: i64 = redis::cmd("EXISTS")
            .arg(format!("{}:log", channel()))
            .query(&mut clustered.redis.conn())
            .expect("EXISTS");
        assert_eq!(exists, 0);
    }

    /// A binary frame is PUBLISHed bare behind its marker byte and kept out of history.
    #[tokio::test]
    async fn a_binary_frame_is_published_bare_and_not_kept() {
        let clustered = Clustered::with_history(10).await;
        let mut pubsub = clustered.subscriber().await;
        let body = PublishBody::Binary(Bytes::from_static(b"\x01\x02audio"));
        clustered
            .publisher
            .publish(Clustered::request(body, None))
            .await
            .expect("publish");
        assert_eq!(next_message(&mut pubsub).await, b"\x00\x01\x02audio");
        assert!(clustered.stream().is_empty());
    }

    /// History after an id returns the later entries in order, recovered; after the newest
    /// id, nothing, still recovered; after an id newer than any, nothing, not recovered.
    #[tokio::test]
    async fn history_after_an_id_returns_the_later_entries() {
        let mut clustered = Clustered::with_history(10).await;
        let mut ids = Vec::new();
        for n in 1..=3 {
            ids.push(clustered.publish(n).await);
        }
        let after_first = clustered.history_since(ids[0]).await;
        assert_eq!(numbers(&after_first), [2, 3]);
        assert_eq!(after_first.events[0].id, ids[1]);
        assert!(after_first.recovered);

        let after_last = clustered.history_since(ids[2]).await;
        assert!(after_last.events.is_empty());
        assert!(after_last.recovered);

        let future = EventId {
            ms: ids[2].ms + 60_000,
            seq: 0,
        };
        let after_future = clustered.history_since(future).await;
        assert!(after_future.events.is_empty());
        assert!(!after_future.recovered);
    }

    /// Nothing was ever published on the channel: no history, not recovered.
    #[tokio::test]
    async fn history_of_a_channel_never_published_is_not_recovered() {
        let mut clustered = Clustered::with_history(10).await;
        let replay = clustered.history_since(id("1-0")).await;
        assert!(replay.events.is_empty());
        assert!(!replay.recovered);
    }

    /// MAXLEN trimming: a `since` older than what is kept is not recovered (the kept entries
    /// are still replayed); one still kept is.
    #[tokio::test]
    async fn maxlen_trimming_makes_an_old_since_unrecovered() {
        let mut clustered = Clustered::with_history(2).await;
        let mut ids = Vec::new();
        for n in 1..=4 {
            ids.push(clustered.publish(n).await);
        }
        assert_eq!(clustered.stream().len(), 2);

        let old = clustered.history_since(ids[0]).await;
        assert_eq!(numbers(&old), [3, 4]);
        assert!(!old.recovered);

        let kept = clustered.history_since(ids[2]).await;
        assert_eq!(numbers(&kept), [4]);
        assert!(kept.recovered);
    }

    /// The client saw the newest entry MAXLEN trimmed, and every later one is kept: nothing
    /// was missed, so it is recovered (the embedded broker says so in the same case).
    #[tokio::test]
    async fn since_the_newest_trimmed_entry_is_recovered() {
        let mut clustered = Clustered::with_history(2).await;
        let mut ids = Vec::new();
        for n in 1..=4 {
            ids.push(clustered.publish(n).await);
        }
        let replay = clustered.history_since(ids[1]).await;
        assert_eq!(numbers(&replay), [3, 4]);
        assert!(replay.recovered);
    }

    /// The stream expired (no publish for its TTL; DEL does the same at once) with an entry
    /// the client had not seen, then publishing resumed: that entry is lost, so the replay
    /// must not claim `recovered` (the embedded broker does not).
    #[tokio::test]
    async fn a_stream_that_expired_and_came_back_is_not_recovered() {
        let mut clustered = Clustered::with_history(10).await;
        let seen = clustered.publish(1).await;
        let lost = clustered.publish(2).await;
        redis::cmd("DEL")
            .arg(format!("{}:log", channel()))
            .exec(&mut clustered.redis.conn())
            .expect("DEL");
        // A stream expires only after `ttl_s` without a publish, so its successor's ids start
        // in a later millisecond; so must this test's (a new stream numbers from its own 0).
        loop {
            let (s, us): (u64, u64) = redis::cmd("TIME")
                .query(&mut clustered.redis.conn())
                .expect("TIME");
            if s * 1000 + us / 1000 > lost.ms {
                break;
            }
            tokio::task::yield_now().await;
        }
        clustered.publish(3).await;
        let replay = clustered.history_since(seen).await;
        assert_eq!(numbers(&replay), [3]);
        assert!(!replay.recovered);
    }

    /// An event a browser published is PUBLISHed with its sender but kept out of history.
    #[tokio::test]
    async fn a_client_event_is_published_but_not_kept() {
        let clustered = Clustered::with_history(10).await;
        let mut pubsub = clustered.subscriber().await;
        let body = PublishBody::Json {
            event: "voice".into(),
            data: serde_json::json!({ "n": 1 }),
        };
        let sender = EventSender {
            user: "mallory".into(),
            conn_id: "c-1".into(),
        };
        clustered
            .publisher
            .publish(Clustered::request(body, Some(sender)))
            .await
            .expect("publish");
        let published: Value =
            serde_json::from_slice(&next_message(&mut pubsub).await).expect("published JSON");
        assert_eq!(published["user"], "mallory");
        assert!(clustered.stream().is_empty());
    }

    /// An org keeps history on at most `max_topics_per_org` topics at once: an event of one
    /// more topic is still published live, but no stream is created for it; topics already
    /// kept, and other orgs, carry on.
    #[tokio::test]
    async fn history_per_org_is_bounded_by_topics() {
        let clustered = Clustered::start(Some(StreamHistory {
            max_topics_per_org: 2,
            ..Clustered::HISTORY
        }))
        .await;
        let publish = |org: &str, topic: &str| {
            let request = PublishRequest {
                org: OrgId::parse(org).unwrap(),
                topic: Topic::parse(topic).unwrap(),
                body: PublishBody::Json {
                    event: "call.status".into(),
                    data: serde_json::json!({ "n": 1 }),
                },
                sender: None,
            };
            let publisher = clustered.publisher.clone();
            async move { publisher.publish(request).await.expect("publish") }
        };
        let mut pubsub = clustered.subscriber().await;
        for topic in ["a", "b", "calls"] {
            publish("1", topic).await;
        }
        // The third topic was still delivered live.
        let live: Value =
            serde_json::from_slice(&next_message(&mut pubsub).await).expect("published JSON");
        assert_eq!(live["data"]["n"], 1);
        publish("1", "a").await;
        publish("2", "calls").await;
        let exists = |key: &str| -> bool {
            redis::cmd("EXISTS")
                .arg(key)
                .query(&mut clustered.redis.conn())
                .expect("EXISTS")
        };
        assert!(exists("sb:1:a:log") && exists("sb:1:b:log"));
        assert!(!exists("sb:1:calls:log"));
        assert!(exists("sb:2:calls:log"));
        let a_len: usize = redis::cmd("XLEN")
            .arg("sb:1:a:log")
            .query(&mut clustered.redis.conn())
            .expect("XLEN");
        assert_eq!(a_len, 2);
    }

    /// A replay reads at most `replay_max_bytes` of entries: the newest that fit, not
    /// recovered, so a `since` far back cannot pull all of history at once.
    #[tokio::test]
    async fn a_replay_is_bounded_in_bytes() {
        let entry = message(1).len();
        let mut clustered = Clustered::start(Some(StreamHistory {
            replay_max_bytes: entry * 3,
            ..Clustered::HISTORY
        }))
        .await;
        let mut ids = Vec::new();
        for n in 1..=6 {
            ids.push(clustered.publish(n).await);
        }
        let far = clustered.history_since(ids[0]).await;
        assert_eq!(numbers(&far), [4, 5, 6]);
        assert!(!far.recovered);
        let near = clustered.history_since(ids[2]).await;
        assert_eq!(numbers(&near), [4, 5, 6]);
        assert!(near.recovered);
    }

    /// Redis out of memory under `noeviction` (as docker-compose.yml configures it): a
    /// publish is refused with an error (the HTTP API answers 503), and nothing already
    /// stored, sessions included, is evicted to make room.
    #[tokio::test]
    async fn a_full_redis_refuses_publishes_and_evicts_nothing() {
        let clustered = Clustered::with_history(10).await;
        let mut conn = clustered.redis.conn();
        redis::cmd("SET")
            .arg("sb:session:s1")
            .arg("alice")
            .exec(&mut conn)
            .expect("SET");
        for (key, value) in [("maxmemory-policy", "noeviction"), ("maxmemory", "1")] {
            redis::cmd("CONFIG")
                .arg("SET")
                .arg(key)
                .arg(value)
                .exec(&mut conn)
                .expect("CONFIG SET");
        }
        let body = PublishBody::Json {
            event: "call.status".into(),
            data: serde_json::json!({ "n": 1 }),
        };
        let refused = clustered
            .publisher
            .publish(Clustered::request(body, None))
            .await;
        assert!(matches!(refused, Err(BrokerError::Redis(_))), "{refused:?}");
        let session: Option<String> = redis::cmd("GET")
            .arg("sb:session:s1")
            .query(&mut conn)
            .expect("GET");
        assert_eq!(session.as_deref(), Some("alice"));
    }
}

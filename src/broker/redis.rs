//! The clustered broker: Redis pub/sub carries events between pods, Redis streams keep their
//! history, and a control channel carries orders that concern sockets on any pod (logout,
//! eviction); caps and revocations are the store's. One subscriber connection per pod carries every
//! channel this pod's sessions need, kept in step with the [`Registry`] by a reconciling task; a
//! canary each pod publishes to itself proves the subscription is alive, not just connected. When
//! Redis goes away the broker reports unavailable (readiness and publish answer 503), reconnects
//! with capped backoff, resubscribes and carries on; sockets stay open throughout.
//!
//! Keys and channels (SPEC section 7): events `sb:{org}:{topic}`, history `sb:{org}:{topic}:log`,
//! control `sbx:control`, canary `sbx:canary:{node}`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::Bytes;
use redis::aio::PubSubSink;
use redis::{AsyncCommands, Script, Value as RedisValue};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{watch, Notify};

use super::{BrokerError, BrokerHealth, FetchHistory, Interest, Replay};
use crate::core::close::{AuthFailure, Close};
use crate::core::event::{build_event, Event, EventSender, PublishBody, PublishRequest};
use crate::core::ids::{node_id, unix_ms, ChannelKey, EventId, InvalidId};
use crate::core::metrics::metrics;
use crate::core::wire::validate_event_name;
use crate::delivery::registry::Registry;
use crate::store::redis::{
    timed, CommandError, RedisCommands, BACKOFF_CAP, BACKOFF_FIRST, REDIS_TIMEOUT,
};

/// Channel every pod listens to for orders that concern sockets anywhere (logout, eviction).
pub(crate) const CONTROL_CHANNEL: &str = "sbx:control";
/// How often a pod publishes its canary, and how late it may be before the pod is not ready.
const CANARY_EVERY: Duration = Duration::from_secs(1);
const CANARY_LATE: Duration = Duration::from_secs(3);
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

/// The event name of a message that names none.
const MESSAGE: &str = "message";

/// Why a message on an event channel (or a history entry) is not an event.
#[derive(Debug, thiserror::Error)]
enum MalformedEvent {
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    Name(#[from] InvalidId),
}

impl WireEvent {
    /// Read a message a publisher put on an event channel, or a history entry. Backend
    /// services publish there directly, so the event name is checked as `/api/publish`
    /// checks it: it becomes an SSE `event:` line, where a line break would forge records.
    fn read(payload: &[u8]) -> Result<Self, MalformedEvent> {
        let wire: WireEvent = serde_json::from_slice(payload)?;
        if let Some(name) = &wire.event {
            validate_event_name(name)?;
        }
        Ok(wire)
    }
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
        timed(conn.publish::<_, _, ()>(CONTROL_CHANNEL, text)).await
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
pub(crate) struct StreamHistory {
    pub(crate) max_len: usize,
    pub(crate) ttl_s: u64,
}

pub(crate) struct RedisBroker {
    url: String,
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
    pub(crate) fn new(
        url: String,
        registry: Arc<Registry>,
        commands: RedisCommands,
        health: Arc<BrokerHealth>,
        history: Option<StreamHistory>,
        live_channels: watch::Sender<HashSet<ChannelKey>>,
    ) -> Self {
        health.set_unavailable("connecting to Redis");
        Self {
            url,
            registry,
            commands,
            health,
            history,
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
            let client = redis::Client::open(url.as_str())?;
            let pubsub = timed(client.get_async_pubsub()).await?;
            Ok::<_, CommandError>(pubsub.split())
        };
        ctx.spawn(fut.into_actor(self).map(|result, this, ctx| match result {
            Ok((sink, stream)) => this.on_connected(sink, stream, ctx),
            Err(e) => this.retry_later(&e.to_string(), ctx),
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
            let wire = match WireEvent::read(payload) {
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
            let event = wire.event.unwrap_or_else(|| MESSAGE.into());
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
                serde_json::to_string(&WireEvent {
                    id: None,
                    event: Some(event.clone()),
                    data: data.clone(),
                    user: sender.map(|s| s.user.clone()),
                    conn_id: sender.map(|s| s.conn_id.clone()),
                })
                // unwrap: a JSON value and plain strings always serialise.
                .unwrap()
            }
            PublishBody::Binary(bytes) => {
                // Audio is live-only: straight to the channel, no history.
                let mut framed = Vec::with_capacity(bytes.len() + 1);
                framed.push(BINARY_MARK);
                framed.extend_from_slice(bytes);
                timed(conn.publish::<_, _, ()>(channel.as_str(), framed)).await?;
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
        let id: String = timed(invocation.invoke_async(&mut conn)).await?;
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
            read_history(&mut conn, &script, &msg.channel, msg.since, history.max_len).await
        })
    }
}

/// Run [`HISTORY_LUA`] for the entries of `channel` after `since` and decode its answer.
async fn read_history(
    conn: &mut redis::aio::ConnectionManager,
    script: &Script,
    channel: &ChannelKey,
    since: EventId,
    max_len: usize,
) -> Result<Replay, BrokerError> {
    let mut invocation = script.key(format!("{channel}:log"));
    invocation.arg(since.to_string()).arg(max_len);
    let answer: Vec<RedisValue> = timed(invocation.invoke_async(conn)).await?;
    Ok(decode_history(channel, since, &answer))
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
    // Replayed ids only ever go forward from `since`, whatever the answer holds.
    let mut newest = since;
    let events: Vec<Arc<Event>> = entries
        .into_iter()
        .filter_map(|(id, fields)| {
            let id = EventId::parse(&id).filter(|&id| id > newest)?;
            let (_, raw) = fields.into_iter().find(|(k, _)| k == "m")?;
            let wire = WireEvent::read(&raw).ok()?;
            let event = wire.event.unwrap_or_else(|| MESSAGE.into());
            newest = id;
            let sender = match (wire.user, wire.conn_id) {
                (Some(user), Some(conn_id)) => Some(EventSender { user, conn_id }),
                _ => None,
            };
            let body = PublishBody::Json {
                event,
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
    /// itself is kept, the oldest kept id, entries ever added (-1 before Redis 7), entries kept,
    /// and the entries after `since`.
    fn answer(
        last: &str,
        since_kept: bool,
        oldest: &str,
        added: i64,
        length: i64,
        entries: Vec<RedisValue>,
    ) -> Vec<RedisValue> {
        vec![
            RedisValue::Int(1),
            bulk(last),
            RedisValue::Int(since_kept.into()),
            bulk(oldest),
            RedisValue::Int(added),
            RedisValue::Int(length),
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
            &answer("5-0", true, "3-0", 10, 3, entries),
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
                10,
                3,
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
                10,
                2,
                vec![kept("4-0", 4), kept("5-0", 5)],
            ),
        );
        assert_eq!(ids(&replay), ["4-0", "5-0"]);
        assert!(!replay.recovered);
    }

    /// A stream never trimmed (entries added == entries kept) holds everything after a
    /// `since` older than its first entry: recovered.
    #[test]
    fn since_before_a_never_trimmed_stream_is_recovered() {
        let replay = decode_history(
            &channel(),
            id("1-0"),
            &answer(
                "5-0",
                false,
                "4-0",
                2,
                2,
                vec![kept("4-0", 4), kept("5-0", 5)],
            ),
        );
        assert_eq!(ids(&replay), ["4-0", "5-0"]);
        assert!(replay.recovered);
    }

    /// Redis before 7 answers -1 for entries added: the stream counts as trimmed, so a `since`
    /// older than its first entry is not recovered.
    #[test]
    fn without_entries_added_a_since_before_the_stream_is_not_recovered() {
        let replay = decode_history(
            &channel(),
            id("1-0"),
            &answer(
                "5-0",
                false,
                "4-0",
                -1,
                2,
                vec![kept("4-0", 4), kept("5-0", 5)],
            ),
        );
        assert_eq!(ids(&replay), ["4-0", "5-0"]);
        assert!(!replay.recovered);
    }

    /// A `since` newer than anything the stream ever had (another stream's, or forged) is not
    /// recovered, even though nothing was trimmed.
    #[test]
    fn since_after_the_last_id_is_not_recovered() {
        let replay = decode_history(
            &channel(),
            id("9-0"),
            &answer("5-0", false, "4-0", 2, 2, Vec::new()),
        );
        assert!(replay.events.is_empty());
        assert!(!replay.recovered);
    }

    /// Entries with a bad id, without an `m` field, or with bad JSON are skipped; the others
    /// are replayed in order, with their event name and sender.
    #[test]
    fn malformed_entries_are_skipped() {
        let with_sender = r#"{"event":"chat","data":{"n":6},"user":"alice","conn_id":"c-1"}"#;
        let entries = vec![
            kept("2-0", 2),
            kept("not-an-id", 3),
            entry("4-0", &[("x", &message(4))]),
            entry("5-0", &[("m", "{not json")]),
            entry("6-0", &[("m", with_sender)]),
        ];
        let replay = decode_history(
            &channel(),
            id("1-0"),
            &answer("6-0", true, "1-0", 6, 6, entries),
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
            &answer("6-0", true, "1-0", 6, 6, entries),
        );
        assert_eq!(ids(&replay), ["3-0", "6-0"]);
        assert_eq!(numbers(&replay), [3, 6]);
    }

    /// Found by fuzzing: a message published straight to Redis with a line break in its
    /// event name was delivered, and SSE wrote the name into its `event:` line; such a
    /// message is malformed, as `/api/publish` would have refused it.
    #[test]
    fn a_message_with_a_bad_event_name_is_malformed() {
        let forged = br#"{"event":"x\ndata: forged","data":{}}"#;
        assert!(matches!(
            WireEvent::read(forged),
            Err(MalformedEvent::Name(InvalidId::EventName))
        ));
        assert!(WireEvent::read(br#"{"event":"call.status","data":{}}"#).is_ok());
        assert!(WireEvent::read(br#"{"data":1}"#).is_ok());
    }

    /// A channel's publisher and history reader on a fresh redis-server.
    struct Clustered {
        redis: TestRedis,
        publisher: RedisPublisher,
        conn: redis::aio::ConnectionManager,
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

        /// History kept up to `max_len` entries, for a minute.
        async fn with_history(max_len: usize) -> Self {
            Self::start(Some(StreamHistory { max_len, ttl_s: 60 })).await
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
            let max_len = self.history.expect("history is kept").max_len;
            let script = Script::new(HISTORY_LUA);
            read_history(&mut self.conn, &script, &channel(), since, max_len)
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
    /// with that entry's id as its first field, sender included.
    #[tokio::test]
    async fn a_publish_appends_to_history_and_publishes_with_its_id_first() {
        let clustered = Clustered::with_history(10).await;
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
    #[ignore = "bug: Redis history reports a spurious `recovered: false` when `since` is the newest trimmed entry"]
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
    #[ignore = "bug: Redis history claims `recovered` after the stream expired and was recreated"]
    async fn a_stream_that_expired_and_came_back_is_not_recovered() {
        let mut clustered = Clustered::with_history(10).await;
        let seen = clustered.publish(1).await;
        clustered.publish(2).await;
        redis::cmd("DEL")
            .arg(format!("{}:log", channel()))
            .exec(&mut clustered.redis.conn())
            .expect("DEL");
        clustered.publish(3).await;
        let replay = clustered.history_since(seen).await;
        assert_eq!(numbers(&replay), [3]);
        assert!(!replay.recovered);
    }
}

//! The Redis connection for commands (the broker's subscriber has its own): one shared,
//! self-reconnecting connection per process, plus one per worker thread for the handshake's
//! idempotent commands, every command bounded by [`REDIS_TIMEOUT`]. The stores of this layer
//! and the Redis broker send their commands through it, to one Redis or to a Redis Cluster
//! ([`RedisConn`]), under the key names of [`KeyScheme`].

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::config::{redact_url, RedisTarget};
use crate::core::ids::{ChannelKey, OrgId, Topic, CHANNEL_PREFIX};

/// Bound on any one Redis round trip; a slower answer counts as Redis unavailable.
pub(crate) const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// Reconnect backoff: doubles from the first value up to the cap, so an outage never spins.
pub(crate) const BACKOFF_FIRST: Duration = Duration::from_millis(100);
pub(crate) const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// Why a Redis command has no answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CommandError {
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    #[error("no answer from Redis within {0:?}")]
    Timeout(Duration),
}

impl CommandError {
    /// Whether Redis may have run the command though no answer came: it was (or may have
    /// been) sent, and then the answer timed out or the connection broke. Only a refused
    /// connection or an error answer say for sure that it did not run.
    pub(crate) fn outcome_unknown(&self) -> bool {
        match self {
            Self::Timeout(_) => true,
            Self::Redis(e) => {
                !e.is_connection_refusal()
                    && (e.is_timeout() || e.is_connection_dropped() || e.is_io_error())
            }
        }
    }

    /// Whether Redis, or on a cluster the shard that owns the key, cannot serve right now: the
    /// connection failed, or a cluster node answered that the cluster is down, that the key's
    /// shard is failing over, or still redirected it after the client's retries (its slot
    /// map catching up with a failover). Such a command may succeed once the shard is back.
    pub(crate) fn is_shard_unavailable(&self) -> bool {
        self.is_connection_failure()
            || matches!(
                self,
                Self::Redis(e) if matches!(
                    e.kind(),
                    redis::ErrorKind::ClusterDown
                        | redis::ErrorKind::Moved
                        | redis::ErrorKind::Ask
                        | redis::ErrorKind::TryAgain
                        | redis::ErrorKind::MasterDown
                        | redis::ErrorKind::ClusterConnectionNotFound
                )
            )
    }

    /// Whether the connection failed (dropped, refused, I/O, no answer in time), as opposed to
    /// Redis answering with an error: the first says nothing will get through until it is
    /// back, the second concerns one command.
    pub(crate) fn is_connection_failure(&self) -> bool {
        match self {
            Self::Timeout(_) => true,
            Self::Redis(e) => {
                e.is_connection_dropped()
                    || e.is_io_error()
                    || e.is_connection_refusal()
                    || e.is_timeout()
            }
        }
    }
}

/// How Redis keys and channels are named. One Redis keeps the names backend services already
/// publish to; a Redis Cluster puts the org in braces, a hash tag, so that every key a Lua
/// script touches for one org (an event's channel, its history stream, the org's history index
/// and id sequence; a user's cap slots and eviction record) is in one slot, as Redis Cluster
/// requires of a script. An org's traffic therefore rides on one shard: shards spread orgs,
/// not one org's topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyScheme {
    /// One Redis: `sb:<org>:<topic>`, `sbx:history:<org>`, `sbx:seq`, `sb:caps:<org>/<user>`.
    Plain,
    /// Redis Cluster: `sb:{<org>}:<topic>`, `sbx:history:{<org>}`, `sbx:seq:{<org>}`,
    /// `sb:caps:{<org>}/<user>`.
    OrgTagged,
}

impl KeyScheme {
    /// The Redis channel of an org's topic.
    pub(crate) fn channel(self, channel: &ChannelKey) -> Cow<'_, str> {
        match self {
            Self::Plain => Cow::Borrowed(channel.as_str()),
            Self::OrgTagged => {
                let rest = &channel.as_str()[CHANNEL_PREFIX.len()..];
                // An org has no ':' (OrgId's grammar), so the first one ends it.
                let (org, topic) = rest.split_once(':').unwrap_or((rest, ""));
                Cow::Owned(format!("{CHANNEL_PREFIX}{{{org}}}:{topic}"))
            }
        }
    }

    /// The org's topic a Redis channel carries; `None` for a name not of this scheme.
    pub(crate) fn parse_channel(self, name: &str) -> Option<ChannelKey> {
        let (org, topic) = match self {
            Self::Plain => ChannelKey::parse(name)?,
            Self::OrgTagged => {
                let rest = name.strip_prefix(CHANNEL_PREFIX)?.strip_prefix('{')?;
                let (org, topic) = rest.split_once("}:")?;
                (OrgId::parse(org).ok()?, Topic::parse(topic).ok()?)
            }
        };
        Some(ChannelKey::new(&org, &topic))
    }

    /// The history stream of an org's topic: its channel's name and `:log`.
    pub(crate) fn history_stream(self, channel: &ChannelKey) -> String {
        format!("{}:log", self.channel(channel))
    }

    /// The sorted set of an org's history streams, scored by when each expires.
    pub(crate) fn history_index(self, org: &OrgId) -> String {
        match self {
            Self::Plain => format!("sbx:history:{org}"),
            Self::OrgTagged => format!("sbx:history:{{{org}}}"),
        }
    }

    /// The counter that numbers events published without history: one for all orgs on one
    /// Redis (today's name), one per org on a cluster (a script may not reach another slot).
    pub(crate) fn sequence(self, org: &OrgId) -> Cow<'static, str> {
        match self {
            Self::Plain => Cow::Borrowed("sbx:seq"),
            Self::OrgTagged => Cow::Owned(format!("sbx:seq:{{{org}}}")),
        }
    }

    /// The sorted set of a user's cap slots; `user_key` is `<org>/<user>`.
    pub(crate) fn caps(self, user_key: &str) -> String {
        match (self, user_key.split_once('/')) {
            (Self::OrgTagged, Some((org, user))) => format!("sb:caps:{{{org}}}/{user}"),
            _ => format!("sb:caps:{user_key}"),
        }
    }

    /// The command that publishes on a channel: PUBLISH on one Redis, SPUBLISH (sharded, Redis
    /// 7) on a cluster, so a message travels only within the shard that owns its channel
    /// rather than to every node.
    pub(crate) fn publish_command(self) -> &'static str {
        match self {
            Self::Plain => "PUBLISH",
            Self::OrgTagged => "SPUBLISH",
        }
    }
}

/// The part of a key Redis Cluster hashes: what lies between the first `{` and the first `}`
/// after it when that is not empty, else the whole key (the cluster specification). Keys of
/// one hash tag are in one slot.
pub(crate) fn hash_tag(key: &str) -> &str {
    if let Some(open) = key.find('{') {
        if let Some(len) = key[open + 1..].find('}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// A command connection to one Redis or to a Redis Cluster; both reconnect by themselves,
/// and a cluster connection routes each command to the shard of its key and follows
/// `-MOVED` after slot migrations and failovers.
#[derive(Clone)]
pub(crate) enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(conn) => conn.req_packed_commands(cmd, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

/// Retries of one command by the cluster connection (redirects after a failover or a slot
/// migration, reconnects to a node), all within [`REDIS_TIMEOUT`].
const CLUSTER_RETRIES: u32 = 3;

/// A cluster client for `seeds` with this module's timeouts, for commands or (with a push
/// sender) for the broker's sharded subscriptions.
pub(crate) fn cluster_client(seeds: &[String]) -> ClusterClientBuilder {
    ClusterClientBuilder::new(seeds.to_vec())
        .connection_timeout(REDIS_TIMEOUT)
        .response_timeout(REDIS_TIMEOUT)
        .retries(CLUSTER_RETRIES)
        .min_retry_wait(10)
        .max_retry_wait(REDIS_TIMEOUT.as_millis() as u64 / 4)
}

/// The seed nodes of a cluster for log lines, passwords hidden.
fn redacted_seeds(seeds: &[String]) -> String {
    seeds
        .iter()
        .map(|url| redact_url(url))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Everything needed to talk to Redis for commands (not the subscriber).
///
/// The handshake's commands (session, revocation, cap slot) and the cap release go over a
/// connection of the calling thread's own, opened on its first use: a redis-rs connection is
/// driven by a task on the thread that opened it, so the shared one (opened on the main
/// thread) would cost every command two cross-thread wake-ups. Until a thread's own
/// connection is up it uses the shared one, as do publishing, history and the lease refresh.
///
/// On a Redis Cluster every command goes over the one cluster connection: it already holds a
/// connection per shard, and opening one cluster connection per thread would multiply them.
#[derive(Clone)]
pub(crate) struct RedisCommands {
    conn: RedisConn,
    /// One Redis only: what opens the threads' own connections.
    opener: Option<Arc<Opener>>,
    keys: KeyScheme,
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

impl RedisCommands {
    /// Connect to one Redis or a Redis Cluster, retrying with backoff until it answers (pods
    /// may start before Redis).
    pub(crate) async fn open(target: &RedisTarget) -> Result<Self, CommandError> {
        match target {
            RedisTarget::Single(url) => Self::connect(url).await,
            RedisTarget::Cluster(seeds) => Self::connect_cluster(seeds).await,
        }
    }

    /// Connect to a Redis Cluster through its seed nodes, retrying with backoff until the
    /// cluster answers.
    pub(crate) async fn connect_cluster(seeds: &[String]) -> Result<Self, CommandError> {
        let client: ClusterClient = cluster_client(seeds).build()?;
        let what = format!("the Redis Cluster at {}", redacted_seeds(seeds));
        let conn = until_connected(&what, || async {
            timed(client.get_async_connection()).await
        })
        .await;
        Ok(Self {
            conn: RedisConn::Cluster(conn),
            opener: None,
            keys: KeyScheme::OrgTagged,
        })
    }

    /// Connect to one Redis, retrying with backoff until it answers (pods may start before
    /// Redis).
    pub(crate) async fn connect(url: &str) -> Result<Self, CommandError> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(REDIS_TIMEOUT)
            .set_response_timeout(REDIS_TIMEOUT)
            .set_number_of_retries(1)
            .set_max_delay(BACKOFF_CAP.as_millis() as u64);
        let what = format!("Redis at {}", redact_url(url));
        let conn = until_connected(&what, || {
            ConnectionManager::new_with_config(client.clone(), config.clone())
        })
        .await;
        Ok(Self {
            conn: RedisConn::Single(conn),
            opener: Some(Arc::new(Opener { client, config })),
            keys: KeyScheme::Plain,
        })
    }

    /// The connection shared by the whole process.
    pub(crate) fn manager(&self) -> RedisConn {
        self.conn.clone()
    }

    /// Whether this is a Redis Cluster rather than one Redis.
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self.conn, RedisConn::Cluster(_))
    }

    /// How keys and channels are named on this Redis.
    pub(crate) fn keys(&self) -> KeyScheme {
        self.keys
    }

    /// This thread's own connection, or the shared one while it is being opened (or on a
    /// thread whose runtime is not single-threaded, where a task may finish on another thread).
    fn thread_connection(&self) -> RedisConn {
        let Some(own_opener) = &self.opener else {
            return self.manager();
        };
        THREAD_CONNECTIONS.with(|connections| {
            let mut connections = connections.borrow_mut();
            connections.retain(|(opener, _)| opener.strong_count() > 0);
            let ours =
                |opener: &std::sync::Weak<Opener>| opener.as_ptr() == Arc::as_ptr(own_opener);
            match connections.iter().find(|(opener, _)| ours(opener)) {
                Some((_, Some(own))) => return RedisConn::Single(own.clone()),
                Some((_, None)) => return self.manager(),
                None => {}
            }
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                return self.manager();
            };
            if runtime.runtime_flavor() != tokio::runtime::RuntimeFlavor::CurrentThread {
                return self.manager();
            }
            let opener = Arc::downgrade(own_opener);
            connections.push((opener.clone(), None));
            let (client, config) = (own_opener.client.clone(), own_opener.config.clone());
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
    pub(crate) async fn run_idempotent<T, F, Fut>(&self, command: F) -> Result<T, CommandError>
    where
        F: Fn(RedisConn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        match tokio::time::timeout(REDIS_TIMEOUT, command(self.thread_connection())).await {
            Ok(Err(e)) if e.is_connection_dropped() => {
                timed(command(self.thread_connection())).await
            }
            first => answered(first),
        }
    }
}

/// Open a connection with `open` until it succeeds, waiting with capped backoff in between
/// (pods may start before Redis); `what` names the Redis in the log lines.
async fn until_connected<C, E, F, Fut>(what: &str, open: F) -> C
where
    E: std::fmt::Display,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<C, E>>,
{
    let mut delay = BACKOFF_FIRST;
    loop {
        match open().await {
            Ok(conn) => return conn,
            Err(e) => {
                log::warn!("waiting for {what}: {e}; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(BACKOFF_CAP);
            }
        }
    }
}

/// Run one command, bounded by [`REDIS_TIMEOUT`].
pub(crate) async fn timed<T>(
    fut: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, CommandError> {
    answered(tokio::time::timeout(REDIS_TIMEOUT, fut).await)
}

fn answered<T>(
    answer: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
) -> Result<T, CommandError> {
    match answer {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(CommandError::Redis(e)),
        Err(_) => Err(CommandError::Timeout(REDIS_TIMEOUT)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel(org: &str, topic: &str) -> ChannelKey {
        ChannelKey::new(&OrgId::parse(org).unwrap(), &Topic::parse(topic).unwrap())
    }

    /// On one Redis the names backend services already use stay as they were.
    #[test]
    fn single_redis_keeps_todays_names() {
        let keys = KeyScheme::Plain;
        let calls = channel("acme", "calls:queue");
        assert_eq!(keys.channel(&calls), "sb:acme:calls:queue");
        assert_eq!(keys.history_stream(&calls), "sb:acme:calls:queue:log");
        let org = OrgId::parse("acme").unwrap();
        assert_eq!(keys.history_index(&org), "sbx:history:acme");
        assert_eq!(keys.sequence(&org), "sbx:seq");
        assert_eq!(keys.caps("acme/alice"), "sb:caps:acme/alice");
        assert_eq!(keys.publish_command(), "PUBLISH");
        assert_eq!(keys.parse_channel("sb:acme:calls:queue"), Some(calls));
    }

    /// On a cluster every key one publish script or one cap script touches hashes to the same
    /// slot (the org), whatever the topic or user holds; different orgs hash apart.
    #[test]
    fn cluster_keys_of_one_org_share_its_hash_tag() {
        let keys = KeyScheme::OrgTagged;
        let org = OrgId::parse("acme.eu-1").unwrap();
        let calls = channel("acme.eu-1", "calls:queue");
        let publish = [
            keys.channel(&calls).into_owned(),
            keys.history_stream(&calls),
            keys.history_index(&org),
            keys.sequence(&org).into_owned(),
        ];
        assert_eq!(publish[0], "sb:{acme.eu-1}:calls:queue");
        for key in &publish {
            assert_eq!(hash_tag(key), "acme.eu-1", "{key}");
        }
        // A user id may hold braces and slashes; the org's tag comes first and wins.
        let caps = keys.caps("acme.eu-1/{bob}/x");
        assert_eq!(caps, "sb:caps:{acme.eu-1}/{bob}/x");
        assert_eq!(hash_tag(&caps), "acme.eu-1");
        assert_eq!(hash_tag(&format!("{caps}:evicted:1|c")), "acme.eu-1");
        assert_ne!(
            hash_tag(&keys.channel(&channel("other", "calls"))),
            hash_tag(&publish[0])
        );
        assert_eq!(keys.publish_command(), "SPUBLISH");
    }

    /// A cluster channel name reads back as the org's topic; names of the other scheme, or
    /// with an invalid org or topic, are not events.
    #[test]
    fn cluster_channel_names_read_back() {
        let keys = KeyScheme::OrgTagged;
        let calls = channel("acme", "calls:queue");
        assert_eq!(keys.parse_channel(&keys.channel(&calls)), Some(calls));
        assert_eq!(keys.parse_channel("sb:acme:calls"), None);
        assert_eq!(keys.parse_channel("sb:{ac:me}:calls"), None);
        assert_eq!(keys.parse_channel("sb:{acme}:Calls"), None);
        assert_eq!(keys.parse_channel("sbx:canary:{n}"), None);
        assert_eq!(KeyScheme::Plain.parse_channel("sb:{acme}:calls"), None);
    }

    /// Redis refusing one command (an error reply) says nothing about the connection; a
    /// dropped connection or no answer in time says it is down.
    #[test]
    fn only_connection_failures_count_as_the_connection_down() {
        let reply = redis::RedisError::from((redis::ErrorKind::ResponseError, "OOM"));
        assert!(!CommandError::Redis(reply).is_connection_failure());
        let dropped = std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        assert!(CommandError::Redis(dropped.into()).is_connection_failure());
        assert!(CommandError::Timeout(REDIS_TIMEOUT).is_connection_failure());
    }

    /// A cluster that says it is down, or a shard failing over, is a shard not back yet; an
    /// error about the command itself is not.
    #[test]
    fn a_cluster_down_answer_counts_as_the_shard_unavailable() {
        let down = redis::RedisError::from((redis::ErrorKind::ClusterDown, "CLUSTERDOWN"));
        assert!(CommandError::Redis(down).is_shard_unavailable());
        let moved = redis::RedisError::from((redis::ErrorKind::Moved, "MOVED", "1 h:1".into()));
        assert!(CommandError::Redis(moved).is_shard_unavailable());
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(CommandError::Redis(refused.into()).is_shard_unavailable());
        let reply = redis::RedisError::from((redis::ErrorKind::ResponseError, "OOM"));
        assert!(!CommandError::Redis(reply).is_shard_unavailable());
    }

    /// A command that may have reached Redis (no answer in time, connection broken after)
    /// may still run; one on a refused connection, or answered with an error, did not.
    #[test]
    fn a_command_without_an_answer_has_an_unknown_outcome() {
        let io = |kind| CommandError::Redis(std::io::Error::from(kind).into());
        assert!(CommandError::Timeout(REDIS_TIMEOUT).outcome_unknown());
        assert!(io(std::io::ErrorKind::BrokenPipe).outcome_unknown());
        assert!(io(std::io::ErrorKind::ConnectionReset).outcome_unknown());
        assert!(!io(std::io::ErrorKind::ConnectionRefused).outcome_unknown());
        let reply = redis::RedisError::from((redis::ErrorKind::ResponseError, "OOM"));
        assert!(!CommandError::Redis(reply).outcome_unknown());
    }
}

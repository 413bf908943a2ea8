//! Login sessions as the WebSocket handshake reads them. The handshake runs before (and
//! without) actix-session's middleware, so it reads the session that middleware wrote: the
//! cookie itself when embedded, the Redis key `sb:session:{key}` when clustered (over the
//! worker thread's own connection). Decrypting the cookie is the transport's; this module
//! resolves a session key to its state. On a Redis Cluster actix-session's own Redis store
//! (which speaks to one Redis only) is replaced by [`ClusterSessionStore`].

use std::collections::HashMap;

use actix_session::storage::{
    CookieSessionStore, LoadError, SaveError, SessionKey, SessionStore, UpdateError,
};
use actix_web::cookie::time::Duration;
use rand::distr::{Alphanumeric, SampleString};
use redis::AsyncCommands;

use super::redis::{timed, CommandError, RedisCommands};

/// A login session's stored state as actix-session keeps it: JSON values by key.
pub(crate) type SessionState = HashMap<String, String>;

// The fields of a login session's state, as `/auth` writes them and the handshake reads them.
pub(crate) const KEY_USER: &str = "user";
pub(crate) const KEY_ORG: &str = "org";
pub(crate) const KEY_SID: &str = "sid";
pub(crate) const KEY_EXP: &str = "exp";
/// Embedded only: the boot the session was started in (see [`super::revocations`]).
pub(crate) const KEY_BOOT: &str = "boot";
/// Set by logout in place of the identity: a replayed cookie is then refused as `logged out`
/// rather than `invalid session`, whichever store holds it (Redis drops purged state, so
/// purging would leave nothing to tell the two apart).
pub(crate) const KEY_LOGGED_OUT: &str = "logged_out";

/// The Redis key of a login session (actix-session's store and the handshake both use it).
pub(crate) fn session_cache_key(session_key: &str) -> String {
    format!("sb:session:{session_key}")
}

/// Why a session could not be read at all (as opposed to read and found unusable).
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionReadError {
    /// No session cookie in the request.
    #[error("no session cookie")]
    NoCookie,
    /// The cookie store failed for another reason than unreadable content.
    #[error("session store: {0}")]
    Cookie(#[source] LoadError),
    /// Redis did not answer: retryable.
    #[error("session store unavailable: {0}")]
    Redis(#[from] CommandError),
}

/// Where login sessions live, as the handshake reads them.
#[derive(Clone)]
pub(crate) enum Sessions {
    /// Embedded: the signed and encrypted cookie is the session.
    Cookie,
    /// Clustered: the cookie names a session in Redis, so every pod can read it.
    Redis(RedisCommands),
}

impl Sessions {
    /// The store actix-session's middleware needs on a Redis Cluster (on one Redis it uses its
    /// own store, on the same keys).
    pub(crate) fn cluster_store(&self) -> Option<ClusterSessionStore> {
        match self {
            Self::Redis(commands) if commands.is_cluster() => {
                Some(ClusterSessionStore::new(commands.clone()))
            }
            _ => None,
        }
    }

    /// The state of the session `key` names (empty when it does not parse); `None` when the
    /// store holds no such session any more (Redis drops a session when its TTL runs out).
    pub(crate) async fn load(
        &self,
        key: &SessionKey,
    ) -> Result<Option<SessionState>, SessionReadError> {
        match self {
            Self::Cookie => match CookieSessionStore::default().load(key).await {
                Ok(state) => Ok(Some(state.unwrap_or_default())),
                Err(LoadError::Deserialization(_)) => Ok(Some(SessionState::new())),
                Err(e) => Err(SessionReadError::Cookie(e)),
            },
            Self::Redis(redis) => {
                // Read as actix-session's Redis store reads it: `GET` of its JSON.
                let redis_key = session_cache_key(key.as_ref());
                let raw: Option<String> = redis
                    .run_idempotent(|mut conn| {
                        let redis_key = redis_key.clone();
                        async move { conn.get(redis_key).await }
                    })
                    .await?;
                Ok(raw.map(|raw| serde_json::from_str(&raw).unwrap_or_default()))
            }
        }
    }
}

/// actix-session's store of login sessions over a Redis Cluster connection, with the same keys,
/// JSON and commands as its one-Redis store (`SET NX EX` for a new session, `SET XX EX` to
/// update one, falling back to a new key when it expired meanwhile), so the handshake reads
/// either the same way. A session is one key, so it needs no hash tag: the session key alone
/// spreads sessions over the shards.
#[derive(Clone)]
pub(crate) struct ClusterSessionStore {
    commands: RedisCommands,
}

/// Characters of a session key, as actix-session generates them.
const SESSION_KEY_LEN: usize = 64;

impl ClusterSessionStore {
    pub(crate) fn new(commands: RedisCommands) -> Self {
        Self { commands }
    }

    /// `SET` a session's JSON with its TTL, under `condition` (`NX`: only a new key, `XX`: only
    /// an existing one); Nil when the condition did not hold.
    async fn set(
        &self,
        key: &SessionKey,
        body: String,
        condition: &str,
        ttl: &Duration,
    ) -> Result<redis::Value, CommandError> {
        let mut conn = self.commands.manager();
        let mut set = redis::cmd("SET");
        set.arg(session_cache_key(key.as_ref()))
            .arg(body)
            .arg(condition)
            .arg("EX")
            .arg(ttl.whole_seconds());
        timed(set.query_async(&mut conn)).await
    }

    /// Store `state` under a new random key, only if no session has that key.
    async fn insert(&self, state: &SessionState, ttl: &Duration) -> Result<SessionKey, SaveError> {
        let body = serde_json::to_string(state).map_err(|e| SaveError::Serialization(e.into()))?;
        let key: SessionKey = Alphanumeric
            .sample_string(&mut rand::rng(), SESSION_KEY_LEN)
            .try_into()
            .map_err(|e| SaveError::Other(anyhow::Error::new(e)))?;
        self.set(&key, body, "NX", ttl)
            .await
            .map_err(|e| SaveError::Other(e.into()))?;
        Ok(key)
    }
}

impl SessionStore for ClusterSessionStore {
    async fn load(&self, key: &SessionKey) -> Result<Option<SessionState>, LoadError> {
        let redis_key = session_cache_key(key.as_ref());
        let raw: Option<String> = self
            .commands
            .run_idempotent(|mut conn| {
                let redis_key = redis_key.clone();
                async move { conn.get(redis_key).await }
            })
            .await
            .map_err(|e| LoadError::Other(e.into()))?;
        raw.map(|raw| serde_json::from_str(&raw))
            .transpose()
            .map_err(|e| LoadError::Deserialization(e.into()))
    }

    async fn save(&self, state: SessionState, ttl: &Duration) -> Result<SessionKey, SaveError> {
        self.insert(&state, ttl).await
    }

    async fn update(
        &self,
        key: SessionKey,
        state: SessionState,
        ttl: &Duration,
    ) -> Result<SessionKey, UpdateError> {
        let body =
            serde_json::to_string(&state).map_err(|e| UpdateError::Serialization(e.into()))?;
        let answer = self.set(&key, body, "XX", ttl).await;
        match answer.map_err(|e| UpdateError::Other(e.into()))? {
            // Expired since it was loaded: store it anew under a fresh key.
            redis::Value::Nil => self.insert(&state, ttl).await.map_err(|e| match e {
                SaveError::Serialization(e) => UpdateError::Serialization(e),
                SaveError::Other(e) => UpdateError::Other(e),
            }),
            _ => Ok(key),
        }
    }

    async fn update_ttl(&self, key: &SessionKey, ttl: &Duration) -> anyhow::Result<()> {
        let mut conn = self.commands.manager();
        let expire = conn.expire::<_, ()>(session_cache_key(key.as_ref()), ttl.whole_seconds());
        Ok(timed(expire).await?)
    }

    async fn delete(&self, key: &SessionKey) -> anyhow::Result<()> {
        let mut conn = self.commands.manager();
        Ok(timed(conn.del::<_, ()>(session_cache_key(key.as_ref()))).await?)
    }
}

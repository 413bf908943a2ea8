//! Login sessions as the WebSocket handshake reads them. The handshake runs before (and
//! without) actix-session's middleware, so it reads the session that middleware wrote: the
//! cookie itself when embedded, the Redis key `sb:session:{key}` when clustered (over the
//! worker thread's own connection). Decrypting the cookie is the transport's; this module
//! resolves a session key to its state.

use std::collections::HashMap;

use actix_session::storage::{CookieSessionStore, LoadError, SessionKey, SessionStore};
use redis::AsyncCommands;

use super::redis::{CommandError, RedisCommands};

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

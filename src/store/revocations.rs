//! Logged-out login sessions: a session id that logged out stays refused until the session
//! would have expired anyway, even if its cookie was copied. In process when embedded; in
//! Redis (`sb:revoked:{sid}`) when clustered, so every pod knows.

use std::collections::HashMap;

use parking_lot::Mutex;
use redis::AsyncCommands;

use super::redis::{timed, RedisCommands};
use crate::core::ids::now_s;

fn revoked_key(sid: &str) -> String {
    format!("sb:revoked:{sid}")
}

/// Logged-out session ids, remembered until the session would have expired anyway: in
/// process when embedded, in Redis (`sb:revoked:{sid}`) when clustered so every pod knows.
pub(crate) enum Revocations {
    Memory(Mutex<HashMap<String, u64>>),
    Redis(RedisCommands),
}

impl Revocations {
    pub(crate) async fn revoke(&self, sid: &str, exp: u64) {
        let now = now_s();
        match self {
            Self::Memory(revoked) => {
                let mut revoked = revoked.lock();
                revoked.retain(|_, until| *until > now);
                revoked.insert(sid.to_string(), exp);
            }
            Self::Redis(redis) => {
                let key = revoked_key(sid);
                let ttl_s = exp.saturating_sub(now).max(1);
                let mut conn = redis.manager();
                if let Err(e) = timed(conn.set_ex::<_, _, ()>(key, 1, ttl_s)).await {
                    log::warn!("cannot record logout of session in Redis: {e}");
                }
            }
        }
    }

    /// Whether `sid` logged out. Fails closed: an unreachable store counts as revoked.
    pub(crate) async fn is_revoked(&self, sid: &str) -> bool {
        match self {
            Self::Memory(revoked) => revoked.lock().contains_key(sid),
            Self::Redis(redis) => {
                let key = revoked_key(sid);
                let revoked = redis
                    .run_idempotent(|mut conn| {
                        let key = key.clone();
                        async move { conn.exists(key).await }
                    })
                    .await;
                revoked.unwrap_or_else(|e| {
                    log::warn!("cannot check session revocation in Redis: {e}");
                    true
                })
            }
        }
    }
}

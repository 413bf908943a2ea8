//! Logged-out login sessions: a session id that logged out stays refused until the session
//! would have expired anyway, even if its cookie was copied. In Redis (`sb:revoked:{sid}`)
//! when clustered, so every pod knows and a restart forgets nothing.
//!
//! Embedded, the list is in process and a restart would forget it, letting a cookie copied
//! before its logout work again. So an embedded node also has a boot id, recorded in every
//! session it starts (the cookie is the session, signed and encrypted), and refuses sessions
//! of another boot: restarting an embedded hub ends every session (users log in again),
//! which is what keeps a logout final without a store that outlives the process.

use std::collections::HashMap;

use parking_lot::Mutex;
use redis::AsyncCommands;

use super::redis::{timed, CommandError, RedisCommands};
use crate::core::ids::now_s;

pub(crate) fn revoked_key(sid: &str) -> String {
    format!("sb:revoked:{sid}")
}

/// Logged-out session ids, remembered until the session would have expired anyway: in
/// process when embedded, in Redis (`sb:revoked:{sid}`) when clustered so every pod knows.
pub(crate) enum Revocations {
    Memory {
        revoked: Mutex<HashMap<String, u64>>,
        /// This process's boot id: sessions of other boots are refused.
        boot: String,
    },
    Redis(RedisCommands),
}

impl Revocations {
    /// The embedded list, with a fresh boot id.
    pub(crate) fn in_memory() -> Self {
        Self::Memory {
            revoked: Mutex::default(),
            boot: format!("{:032x}", rand::random::<u128>()),
        }
    }

    /// What a new session records as its boot: embedded, this boot's id; clustered nothing
    /// (revocations are in Redis and outlive every pod).
    pub(crate) fn boot(&self) -> Option<&str> {
        match self {
            Self::Memory { boot, .. } => Some(boot),
            Self::Redis(_) => None,
        }
    }

    /// Whether a session that recorded `boot` belongs to this boot (always, clustered).
    pub(crate) fn same_boot(&self, boot: Option<&str>) -> bool {
        match self {
            Self::Memory { boot: ours, .. } => boot == Some(ours.as_str()),
            Self::Redis(_) => true,
        }
    }

    pub(crate) async fn revoke(&self, sid: &str, exp: u64) {
        let now = now_s();
        match self {
            Self::Memory { revoked, .. } => {
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
            Self::Memory { revoked, .. } => revoked.lock().contains_key(sid),
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

    /// Those of `sids` that logged out, asked in batches (the periodic re-check of the
    /// sockets a node holds). Unlike [`Self::is_revoked`] an unreachable store is an error,
    /// not a verdict: the sockets stay until the next check rather than all closing.
    pub(crate) async fn revoked_among(&self, sids: &[String]) -> Result<Vec<String>, CommandError> {
        match self {
            Self::Memory { revoked, .. } => {
                let revoked = revoked.lock();
                Ok(sids
                    .iter()
                    .filter(|sid| revoked.contains_key(*sid))
                    .cloned()
                    .collect())
            }
            Self::Redis(redis) => {
                let mut found = Vec::new();
                for batch in sids.chunks(REVOCATION_BATCH) {
                    let keys: Vec<String> = batch.iter().map(|sid| revoked_key(sid)).collect();
                    let answers: Vec<Option<u8>> = redis
                        .run_idempotent(|mut conn| {
                            let keys = keys.clone();
                            async move { conn.mget(keys).await }
                        })
                        .await?;
                    found.extend(
                        batch
                            .iter()
                            .zip(answers)
                            .filter(|(_, answer)| answer.is_some())
                            .map(|(sid, _)| sid.clone()),
                    );
                }
                Ok(found)
            }
        }
    }
}

/// Session ids per `MGET` of the periodic re-check.
const REVOCATION_BATCH: usize = 500;

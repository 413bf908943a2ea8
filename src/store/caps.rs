//! Per-user connection caps (`limits.max_connections_per_user`, `limits.cap_policy`): in
//! process when embedded; in Redis when clustered, counted across pods in a sorted set of
//! slots per user (`sb:caps:{org}/{user}`) scored by lease expiry, changed only by a Lua
//! script so two pods can never both take the last slot. A cap slot is a token
//! `<created-ms>|<conn id>`, so every store can tell the oldest socket of a user.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use redis::{AsyncCommands, Script, Value as RedisValue};

use super::redis::{timed, CommandError, KeyScheme, RedisCommands};
use crate::config::CapPolicy;
use crate::core::ids::unix_ms;

/// The result of asking for a connection slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CapOutcome {
    /// Admitted; the listed connections (oldest first) must be closed with 4409.
    Admitted { evicted: Vec<String> },
    /// The user is at `limit` and the policy is `reject_new`.
    Refused { limit: u32 },
}

/// Per-user connection caps, counted across pods when clustered.
#[derive(Clone)]
pub(crate) struct ConnectionCaps {
    limit: u32,
    policy: CapPolicy,
    store: CapStore,
}

#[derive(Clone)]
enum CapStore {
    Memory(Arc<Mutex<HashMap<String, VecDeque<String>>>>),
    Redis(RedisCaps),
}

/// The cap slot token of a connection: sorts by age, and names the connection.
pub(crate) fn slot_token(conn: &str) -> String {
    format!("{:015}|{conn}", unix_ms())
}

/// The connection a slot token names.
pub(crate) fn slot_conn(slot: &str) -> &str {
    slot.split_once('|').map_or(slot, |(_, conn)| conn)
}

/// The caps store could not be reached; the handshake fails closed.
#[derive(Debug, thiserror::Error)]
#[error("connection caps unavailable: {0}")]
pub(crate) struct CapsUnavailable(#[from] pub(crate) CommandError);

impl ConnectionCaps {
    pub(crate) fn in_memory(limit: u32, policy: CapPolicy) -> Self {
        Self {
            limit,
            policy,
            store: CapStore::Memory(Arc::default()),
        }
    }

    pub(crate) fn redis(limit: u32, policy: CapPolicy, store: RedisCaps) -> Self {
        Self {
            limit,
            policy,
            store: CapStore::Redis(store),
        }
    }

    /// The Redis store, when clustered (its leases need refreshing).
    pub(crate) fn redis_store(&self) -> Option<RedisCaps> {
        match &self.store {
            CapStore::Redis(store) => Some(store.clone()),
            CapStore::Memory(_) => None,
        }
    }

    /// Take `slot` (see [`slot_token`]) for `user_key` (org and user), applying the cap policy.
    /// Evicted entries are slot tokens too.
    pub(crate) async fn acquire(
        &self,
        user_key: &str,
        slot: &str,
    ) -> Result<CapOutcome, CapsUnavailable> {
        match &self.store {
            CapStore::Memory(users) => {
                let mut users = users.lock();
                let held = users.entry(user_key.to_string()).or_default();
                Ok(admit(held, slot, self.limit, self.policy))
            }
            CapStore::Redis(store) => store.acquire(user_key, slot, self.limit, self.policy).await,
        }
    }

    /// Give the slot back (socket closed).
    pub(crate) async fn release(&self, user_key: &str, slot: &str) {
        match &self.store {
            CapStore::Memory(users) => {
                let mut users = users.lock();
                if let Some(held) = users.get_mut(user_key) {
                    held.retain(|c| c != slot);
                    if held.is_empty() {
                        users.remove(user_key);
                    }
                }
            }
            CapStore::Redis(store) => store.release(user_key, slot).await,
        }
    }
}

/// The cap decision on one user's slots, oldest first. Shared by both stores' semantics.
fn admit(held: &mut VecDeque<String>, conn: &str, limit: u32, policy: CapPolicy) -> CapOutcome {
    let limit_usize = limit as usize;
    if held.len() < limit_usize {
        held.push_back(conn.to_string());
        return CapOutcome::Admitted {
            evicted: Vec::new(),
        };
    }
    match policy {
        CapPolicy::RejectNew => CapOutcome::Refused { limit },
        CapPolicy::EvictOldest => {
            let mut evicted = Vec::new();
            while held.len() >= limit_usize {
                match held.pop_front() {
                    Some(old) => evicted.push(old),
                    None => break,
                }
            }
            held.push_back(conn.to_string());
            CapOutcome::Admitted { evicted }
        }
    }
}

/// Per-user connection caps shared by every pod: a sorted set of slots scored by lease expiry,
/// changed only by Lua scripts so two pods can never both take the last slot.
#[derive(Clone)]
pub(crate) struct RedisCaps {
    pub(super) commands: RedisCommands,
    pub(super) lease: Duration,
    acquire: Arc<Script>,
}

/// The cap decision as a Lua function `acquire(key, evicted_key, now, lease, limit, policy,
/// slot)`, shared by [`ACQUIRE_LUA`] and the one-round-trip handshake of
/// [`super::admission`]. Members of `key` are `<created-ms, 15 digits>|<conn id>` so sorting
/// them sorts by age. `evicted_key` remembers for a while whom the request evicted, so that the
/// same request sent again (its answer lost with a dropped connection) gets the same answer,
/// evictions included. Answers `{1, evicted...}` when admitted, `{0}` when refused.
macro_rules! acquire_lua_function {
    () => {
        r#"
local function acquire(key, evicted_key, now, lease, limit, policy, slot)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZSCORE', key, slot) then
    redis.call('ZADD', key, now + lease, slot)
    redis.call('PEXPIRE', key, lease * 2)
    local out = {1}
    for _, conn in ipairs(redis.call('LRANGE', evicted_key, 0, -1)) do out[#out + 1] = conn end
    return out
  end
  local held = redis.call('ZRANGE', key, 0, -1)
  local evicted = {}
  if #held >= limit then
    if policy ~= 'evict_oldest' then
      return {0}
    end
    table.sort(held)
    local excess = #held - limit + 1
    for i = 1, excess do
      redis.call('ZREM', key, held[i])
      evicted[#evicted + 1] = held[i]
    end
  end
  redis.call('ZADD', key, now + lease, slot)
  redis.call('PEXPIRE', key, lease * 2)
  if #evicted > 0 then
    redis.call('RPUSH', evicted_key, unpack(evicted))
    redis.call('PEXPIRE', evicted_key, 60000)
  end
  local out = {1}
  for i = 1, #evicted do out[#out + 1] = evicted[i] end
  return out
end
"#
    };
}
pub(crate) use acquire_lua_function;

/// KEYS: the user's slots, the request's eviction record; ARGV: now (ms), lease (ms), limit,
/// policy, slot.
const ACQUIRE_LUA: &str = concat!(
    acquire_lua_function!(),
    "return acquire(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[5])\n"
);

/// How the Lua `acquire` function names `policy`.
pub(crate) fn policy_arg(policy: CapPolicy) -> &'static str {
    match policy {
        CapPolicy::RejectNew => "reject_new",
        CapPolicy::EvictOldest => "evict_oldest",
    }
}

/// The outcome the Lua `acquire` function answered (`{1, evicted...}` or `{0}`).
pub(crate) fn read_acquire_answer(answer: &[RedisValue], limit: u32) -> CapOutcome {
    if !matches!(answer.first(), Some(RedisValue::Int(1))) {
        return CapOutcome::Refused { limit };
    }
    let evicted = answer
        .iter()
        .skip(1)
        .filter_map(|v| redis::from_redis_value::<String>(v).ok())
        .collect();
    CapOutcome::Admitted { evicted }
}

impl RedisCaps {
    pub(crate) fn new(commands: RedisCommands, lease: Duration) -> Self {
        Self {
            commands,
            lease,
            acquire: Arc::new(Script::new(ACQUIRE_LUA)),
        }
    }

    /// The key of `user_key`'s slots.
    pub(crate) fn key(&self, user_key: &str) -> String {
        self.commands.keys().caps(user_key)
    }

    /// One pipeline per slot the commands of `slots` touch, built by `add` per slot: a Redis
    /// Cluster refuses a pipeline across slots, and the org is the hash tag of a cap key. On
    /// one Redis it is one pipeline. Sent at once; the first error is returned.
    async fn per_slot(
        &self,
        slots: &[(String, String)],
        add: impl Fn(&mut redis::Pipeline, &str, &str),
    ) -> Result<(), CommandError> {
        let mut pipelines: HashMap<&str, redis::Pipeline> = HashMap::new();
        for (user_key, slot) in slots {
            let group = match self.commands.keys() {
                KeyScheme::Plain => "",
                KeyScheme::OrgTagged => user_key.split_once('/').map_or("", |(org, _)| org),
            };
            add(pipelines.entry(group).or_default(), user_key, slot);
        }
        let sent = pipelines.into_values().map(|pipe| {
            let mut conn = self.commands.manager();
            async move { timed(pipe.query_async::<()>(&mut conn)).await }
        });
        futures_util::future::join_all(sent)
            .await
            .into_iter()
            .collect()
    }

    pub(crate) async fn acquire(
        &self,
        user_key: &str,
        slot: &str,
        limit: u32,
        policy: CapPolicy,
    ) -> Result<CapOutcome, CapsUnavailable> {
        let policy = policy_arg(policy);
        let key = self.key(user_key);
        let evicted_key = Self::evicted_key(&key, slot);
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
        Ok(read_acquire_answer(&answer, limit))
    }

    /// The eviction record of `slot`'s request in the user's slots `key` (see
    /// [`acquire_lua_function`]).
    fn evicted_key(key: &str, slot: &str) -> String {
        format!("{key}:evicted:{slot}")
    }

    pub(crate) async fn release(&self, user_key: &str, slot: &str) {
        self.release_in(&self.key(user_key), slot).await;
    }

    /// Give back `slot` from the slots under `key`.
    pub(crate) async fn release_in(&self, key: &str, slot: &str) {
        let released = self
            .commands
            .run_idempotent(|mut conn| async move { conn.zrem::<_, _, ()>(key, slot).await })
            .await;
        if let Err(e) = released {
            log::warn!("cannot release cap slot in {key} (its lease will expire): {e}");
        }
    }

    /// Give the lease of every slot this pod holds a fresh expiry, in one pipeline, adding the
    /// slots Redis no longer has: it may have restarted empty, or an outage longer than the
    /// lease let another pod prune them, and a live socket must keep counting against the cap.
    pub(crate) async fn refresh(&self, slots: &[(String, String)]) {
        if slots.is_empty() {
            return;
        }
        let expiry = unix_ms() + self.lease.as_millis() as u64;
        let refreshed = self.per_slot(slots, |pipe, user_key, slot| {
            let key = self.key(user_key);
            pipe.cmd("ZADD")
                .arg(&key)
                .arg(expiry)
                .arg(slot)
                .ignore()
                .cmd("PEXPIRE")
                .arg(&key)
                .arg(self.lease.as_millis() as u64 * 2)
                .ignore();
        });
        if let Err(e) = refreshed.await {
            log::warn!("cannot refresh {} cap lease(s): {e}", slots.len());
        }
    }

    /// Give back several slots at once, in one pipeline.
    async fn release_all(&self, slots: &[(String, String)]) {
        if slots.is_empty() {
            return;
        }
        let released = self.per_slot(slots, |pipe, user_key, slot| {
            pipe.cmd("ZREM").arg(self.key(user_key)).arg(slot).ignore();
        });
        if let Err(e) = released.await {
            log::warn!(
                "cannot release {} cap slot(s) (their leases will expire): {e}",
                slots.len()
            );
        }
    }
}

/// Periodically re-assert the cap slots of this pod's sockets with fresh leases: a pod that
/// dies stops doing this, and its slots expire within `cap_lease_s`.
/// `held` lists the `(org/user, slot)` pairs of this pod's open sockets.
pub(crate) async fn refresh_leases(caps: RedisCaps, held: impl Fn() -> Vec<(String, String)>) {
    let every = caps.lease / 3;
    let mut ticker = tokio::time::interval(every.max(Duration::from_millis(100)));
    loop {
        ticker.tick().await;
        let slots = held();
        caps.refresh(&slots).await;
        // A socket that closed after the snapshot may have released its slot before the
        // refresh re-added it; it is unregistered before it releases, so it is missing from a
        // second snapshot taken now, and without this its slot would count until the lease ran
        // out. (Even a refresh that timed out may have reached Redis.)
        let live: HashSet<(String, String)> = held().into_iter().collect();
        let closed: Vec<(String, String)> =
            slots.into_iter().filter(|s| !live.contains(s)).collect();
        caps.release_all(&closed).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_redis::TestRedis;

    /// reject_new refuses at the limit; evict_oldest names the oldest to close.
    #[test]
    fn cap_policies() {
        let mut held = VecDeque::new();
        for c in ["a", "b"] {
            assert_eq!(
                admit(&mut held, c, 2, CapPolicy::RejectNew),
                CapOutcome::Admitted { evicted: vec![] }
            );
        }
        assert_eq!(
            admit(&mut held, "c", 2, CapPolicy::RejectNew),
            CapOutcome::Refused { limit: 2 }
        );
        assert_eq!(
            admit(&mut held, "c", 2, CapPolicy::EvictOldest),
            CapOutcome::Admitted {
                evicted: vec!["a".into()]
            }
        );
        assert_eq!(held, VecDeque::from(vec!["b".to_string(), "c".to_string()]));
    }

    /// ACQUIRE_LUA on a real redis-server: the test's Redis, caps with a 30 s lease over it.
    async fn redis_caps() -> (TestRedis, RedisCaps) {
        let redis = TestRedis::start();
        let commands = RedisCommands::connect(&redis.url())
            .await
            .expect("connect to the test redis-server");
        (redis, RedisCaps::new(commands, Duration::from_secs(30)))
    }

    fn admitted(evicted: &[&str]) -> CapOutcome {
        CapOutcome::Admitted {
            evicted: evicted.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Under reject_new a user at the limit is refused, and admitted again once a slot is
    /// released.
    #[tokio::test]
    async fn reject_new_refuses_at_the_limit_until_a_slot_is_released() {
        let (redis, caps) = redis_caps().await;
        let ask = |slot: &'static str| caps.acquire("42/u", slot, 2, CapPolicy::RejectNew);
        assert_eq!(ask("1|a").await.expect("first"), admitted(&[]));
        assert_eq!(ask("2|b").await.expect("second"), admitted(&[]));
        assert_eq!(
            ask("3|c").await.expect("third"),
            CapOutcome::Refused { limit: 2 }
        );
        assert_eq!(redis.cap_slots("42/u"), ["1|a", "2|b"]);
        caps.release("42/u", "1|a").await;
        assert_eq!(ask("3|c").await.expect("after a release"), admitted(&[]));
        assert_eq!(redis.cap_slots("42/u"), ["2|b", "3|c"]);
    }

    /// Under evict_oldest the oldest slot by age (not by arrival) is named and removed.
    #[tokio::test]
    async fn evict_oldest_names_the_oldest_slot() {
        let (redis, caps) = redis_caps().await;
        let ask = |slot: &'static str| caps.acquire("42/u", slot, 2, CapPolicy::EvictOldest);
        // The younger socket's request reaches Redis first.
        assert_eq!(ask("000000000000002|b").await.expect("b"), admitted(&[]));
        assert_eq!(ask("000000000000001|a").await.expect("a"), admitted(&[]));
        assert_eq!(
            ask("000000000000003|c").await.expect("c"),
            admitted(&["000000000000001|a"])
        );
        assert_eq!(
            redis.cap_slots("42/u"),
            ["000000000000002|b", "000000000000003|c"]
        );
    }

    /// A cap request sent again (the pod's connection dropped after Redis ran it, and the pod
    /// retried) is granted the slot it already holds, rather than counting it twice: at a
    /// limit of 1 the repeat is admitted and the user's next socket is still refused; under
    /// evict_oldest the repeat reports the same eviction.
    #[tokio::test]
    async fn a_repeated_cap_request_counts_its_slot_once() {
        let (_redis, caps) = redis_caps().await;
        let ask = |slot: &'static str| caps.acquire("42/u1", slot, 1, CapPolicy::RejectNew);
        assert_eq!(ask("1|a").await.expect("first request"), admitted(&[]));
        assert_eq!(
            ask("1|a").await.expect("the same request again"),
            admitted(&[])
        );
        assert_eq!(
            ask("2|b").await.expect("another socket"),
            CapOutcome::Refused { limit: 1 }
        );

        // Under evict_oldest the repeat must name the same evicted socket, or it stays open.
        let evict = |slot: &'static str| caps.acquire("42/u2", slot, 1, CapPolicy::EvictOldest);
        assert_eq!(evict("1|c").await.expect("first socket"), admitted(&[]));
        assert_eq!(
            evict("2|d").await.expect("second socket"),
            admitted(&["1|c"])
        );
        assert_eq!(
            evict("2|d").await.expect("the same request again"),
            admitted(&["1|c"])
        );
    }

    /// A slot whose lease ran out (its pod died) no longer counts: at the limit, a new socket
    /// is admitted without evicting anyone, and the stale slot is gone.
    #[tokio::test]
    async fn expired_leases_are_pruned() {
        let (redis, caps) = redis_caps().await;
        let expired_at = unix_ms() - 1_000;
        redis::cmd("ZADD")
            .arg(KeyScheme::Plain.caps("42/u"))
            .arg(expired_at)
            .arg("1|dead")
            .exec(&mut redis.conn())
            .expect("ZADD a stale slot");
        assert_eq!(
            caps.acquire("42/u", "2|new", 1, CapPolicy::RejectNew)
                .await
                .expect("acquire"),
            admitted(&[])
        );
        assert_eq!(redis.cap_slots("42/u"), ["2|new"]);
    }

    /// Redis lost the slots (restarted empty): a lease refresh puts them back, so the cap
    /// still counts the live sockets.
    #[tokio::test]
    async fn a_refresh_restores_slots_redis_lost() {
        let (redis, caps) = redis_caps().await;
        let ask = |slot: &'static str| caps.acquire("42/u", slot, 1, CapPolicy::RejectNew);
        assert_eq!(ask("1|a").await.expect("first"), admitted(&[]));
        redis::cmd("FLUSHALL")
            .exec(&mut redis.conn())
            .expect("FLUSHALL");
        caps.refresh(&[("42/u".to_string(), "1|a".to_string())])
            .await;
        assert_eq!(
            ask("2|b").await.expect("another socket"),
            CapOutcome::Refused { limit: 1 }
        );
    }
}

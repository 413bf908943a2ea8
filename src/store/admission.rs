//! The clustered WebSocket handshake's store work in one Redis round trip: read the login
//! session the cookie names, check that its id has not logged out, and take a connection-cap
//! slot for its user, in one Lua script. Taken one by one ([`super::sessions`],
//! [`super::revocations`], [`super::caps`]) these are three round trips, each a write, a
//! wake-up and a read on both sides; one script is one. The script reads keys it is not
//! given up front (the revocation and the cap keys depend on the session), which one Redis
//! allows and a Redis Cluster does not (the three keys live in different slots), so on a
//! cluster the handshake keeps the three steps.
//!
//! The script only decides what needs Redis; the transport still reads the identity from the
//! returned state with the same code as every other path, and gives the slot back if it
//! disagrees (it cannot for a state this hub wrote).

use std::sync::Arc;

use redis::{Script, Value as RedisValue};

use super::caps::{acquire_lua_function, policy_arg, read_acquire_answer, CapOutcome, RedisCaps};
use super::redis::{CommandError, KeyScheme};
use super::revocations::revoked_key;
use super::sessions::{
    session_cache_key, SessionState, KEY_EXP, KEY_LOGGED_OUT, KEY_ORG, KEY_SID, KEY_USER,
};
use crate::config::CapPolicy;
use crate::core::ids::{now_s, unix_ms};

/// KEYS[1]: the session. ARGV: now (ms), lease (ms), limit, policy, slot, now (s), the
/// revocation key prefix, the cap key prefix, then the state's field names: user, org, sid,
/// exp, logged_out. Answers `{0}` (no such session), `{1, state}` (unusable: logged out,
/// expired or not a login), `{2, state}` (its id logged out), or `{3, state, cap key, the
/// cap answer...}`. A session's state is actix-session's JSON object of JSON texts.
const ADMIT_LUA: &str = concat!(
    acquire_lua_function!(),
    r#"
local raw = redis.call('GET', KEYS[1])
if not raw then return {0} end
local parsed, state = pcall(cjson.decode, raw)
if not parsed or type(state) ~= 'table' then return {1, raw} end
local function text(field)
  local value = state[field]
  if type(value) ~= 'string' then return nil end
  local ok, decoded = pcall(cjson.decode, value)
  if ok and type(decoded) == 'string' then return decoded end
  return nil
end
local user, org, sid = text(ARGV[9]), text(ARGV[10]), text(ARGV[11])
local exp = tonumber(state[ARGV[12]])
if state[ARGV[13]] == 'true' or not user or not org or not sid or not exp
   or exp <= tonumber(ARGV[6]) then
  return {1, raw}
end
if redis.call('EXISTS', ARGV[7] .. sid) == 1 then return {2, raw} end
local key = ARGV[8] .. org .. '/' .. user
local answer = acquire(key, key .. ':evicted:' .. ARGV[5], tonumber(ARGV[1]),
  tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[5])
local out = {3, raw, key}
for i = 1, #answer do out[#out + 1] = answer[i] end
return out
"#
);

/// What the one-trip script found.
#[derive(Debug, PartialEq)]
pub(crate) enum AdmitAnswer {
    /// The store holds no session under the key (it expired).
    NoSession,
    /// A session the script would not admit (logged out, expired, not a login): no slot was
    /// taken; the caller reads why from the state.
    Unusable(SessionState),
    /// The session's id logged out (its cookie was copied before the logout).
    Revoked(SessionState),
    /// A usable session, and the cap decision for its user under `cap_key`.
    Checked {
        state: SessionState,
        cap_key: String,
        outcome: CapOutcome,
    },
}

/// Why the script's answer could not be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AdmitError {
    #[error(transparent)]
    Redis(#[from] CommandError),
    #[error("unexpected answer from the handshake script: {0}")]
    Answer(&'static str),
}

/// The one-trip handshake on one Redis (not on a Redis Cluster), over the caps' own
/// connection, lease, key names and release.
#[derive(Clone)]
pub(crate) struct RedisAdmission {
    caps: RedisCaps,
    limit: u32,
    policy: CapPolicy,
    script: Arc<Script>,
}

impl RedisAdmission {
    /// `None` on a Redis Cluster, where one script cannot reach the three keys.
    pub(crate) fn new(caps: RedisCaps, limit: u32, policy: CapPolicy) -> Option<Self> {
        let commands = &caps.commands;
        (commands.keys() == KeyScheme::Plain && !commands.is_cluster()).then(|| Self {
            caps,
            limit,
            policy,
            script: Arc::new(Script::new(ADMIT_LUA)),
        })
    }

    /// Read the session `session_key`, check it, and take `slot` for its user. Idempotent
    /// like the cap request alone: sent again, the same slot counts once and its evictions are
    /// answered again.
    pub(crate) async fn admit(
        &self,
        session_key: &str,
        slot: &str,
    ) -> Result<AdmitAnswer, AdmitError> {
        let policy = policy_arg(self.policy);
        let key = session_cache_key(session_key);
        let (now_ms, now_s) = (unix_ms(), now_s());
        let revoked_prefix = revoked_key("");
        let caps_prefix = KeyScheme::Plain.caps("");
        let answer: Vec<RedisValue> = self
            .caps
            .commands
            .run_idempotent(|mut conn| {
                let mut invocation = self.script.key(&key);
                invocation
                    .arg(now_ms)
                    .arg(self.caps.lease.as_millis() as u64)
                    .arg(self.limit)
                    .arg(policy)
                    .arg(slot)
                    .arg(now_s)
                    .arg(&revoked_prefix)
                    .arg(&caps_prefix)
                    .arg(KEY_USER)
                    .arg(KEY_ORG)
                    .arg(KEY_SID)
                    .arg(KEY_EXP)
                    .arg(KEY_LOGGED_OUT);
                async move { invocation.invoke_async(&mut conn).await }
            })
            .await?;
        read_answer(&answer, self.limit)
    }

    /// The key of `user_key`'s cap slots, as every other cap path names it.
    pub(crate) fn cap_key(&self, user_key: &str) -> String {
        self.caps.key(user_key)
    }

    /// Give back a slot the script took under `cap_key` (the transport refused the socket
    /// after all).
    pub(crate) async fn release(&self, cap_key: &str, slot: &str) {
        self.caps.release_in(cap_key, slot).await;
    }
}

fn read_answer(answer: &[RedisValue], limit: u32) -> Result<AdmitAnswer, AdmitError> {
    let text = |i: usize| -> Result<String, AdmitError> {
        answer
            .get(i)
            .and_then(|v| redis::from_redis_value::<String>(v).ok())
            .ok_or(AdmitError::Answer("missing text"))
    };
    // A state that is not JSON is unusable, as actix-session would find it.
    let state = || -> Result<SessionState, AdmitError> {
        Ok(serde_json::from_str(&text(1)?).unwrap_or_default())
    };
    match answer.first() {
        Some(RedisValue::Int(0)) => Ok(AdmitAnswer::NoSession),
        Some(RedisValue::Int(1)) => Ok(AdmitAnswer::Unusable(state()?)),
        Some(RedisValue::Int(2)) => Ok(AdmitAnswer::Revoked(state()?)),
        Some(RedisValue::Int(3)) => Ok(AdmitAnswer::Checked {
            state: state()?,
            cap_key: text(2)?,
            outcome: read_acquire_answer(answer.get(3..).unwrap_or_default(), limit),
        }),
        _ => Err(AdmitError::Answer("unknown verdict")),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::redis::RedisCommands;
    use crate::store::test_redis::TestRedis;

    /// A login session as actix-session's Redis store writes it: JSON texts by field.
    fn login(user: &str, org: &str, sid: &str, exp: u64) -> String {
        let state: SessionState = [
            (KEY_USER, serde_json::to_string(user)),
            (KEY_ORG, serde_json::to_string(org)),
            (KEY_SID, serde_json::to_string(sid)),
            (KEY_EXP, serde_json::to_string(&exp)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.expect("json")))
        .collect();
        serde_json::to_string(&state).expect("json")
    }

    fn store(redis: &TestRedis, session_key: &str, body: &str) {
        redis::cmd("SET")
            .arg(session_cache_key(session_key))
            .arg(body)
            .query::<()>(&mut redis.conn())
            .expect("SET session");
    }

    async fn admission(limit: u32, policy: CapPolicy) -> (TestRedis, RedisAdmission) {
        let redis = TestRedis::start();
        let commands = RedisCommands::connect(&redis.url())
            .await
            .expect("connect to the test redis-server");
        let caps = RedisCaps::new(commands, Duration::from_secs(30));
        let admission = RedisAdmission::new(caps, limit, policy).expect("one Redis");
        (redis, admission)
    }

    fn checked(answer: AdmitAnswer) -> (SessionState, String, CapOutcome) {
        match answer {
            AdmitAnswer::Checked {
                state,
                cap_key,
                outcome,
            } => (state, cap_key, outcome),
            other => panic!("expected a checked session, got {other:?}"),
        }
    }

    /// A live session is read and its user's slot taken under the key every other cap path
    /// uses, in the same call.
    #[tokio::test]
    async fn a_live_session_is_read_and_its_slot_taken() {
        let (redis, admission) = admission(2, CapPolicy::RejectNew).await;
        store(&redis, "k1", &login("alice ü", "acme", "s1", now_s() + 600));
        let (state, cap_key, outcome) = checked(admission.admit("k1", "1|a").await.expect("ok"));
        assert_eq!(state.get(KEY_SID).map(String::as_str), Some("\"s1\""));
        assert_eq!(cap_key, KeyScheme::Plain.caps("acme/alice ü"));
        assert_eq!(
            outcome,
            CapOutcome::Admitted {
                evicted: Vec::new()
            }
        );
        assert_eq!(redis.cap_slots("acme/alice ü"), ["1|a"]);
        // Sent again (an answer lost), the slot counts once.
        checked(admission.admit("k1", "1|a").await.expect("again"));
        assert_eq!(redis.cap_slots("acme/alice ü"), ["1|a"]);
    }

    /// At the limit, reject_new refuses and evict_oldest names the oldest slot.
    #[tokio::test]
    async fn the_cap_policy_applies() {
        let (redis, admission) = admission(1, CapPolicy::RejectNew).await;
        store(&redis, "k1", &login("bob", "acme", "s1", now_s() + 600));
        checked(admission.admit("k1", "1|a").await.expect("first"));
        let (_, _, outcome) = checked(admission.admit("k1", "2|b").await.expect("second"));
        assert_eq!(outcome, CapOutcome::Refused { limit: 1 });
        assert_eq!(redis.cap_slots("acme/bob"), ["1|a"]);

        let evicting = RedisAdmission::new(admission.caps.clone(), 1, CapPolicy::EvictOldest)
            .expect("one Redis");
        let (_, _, outcome) = checked(evicting.admit("k1", "2|b").await.expect("evicting"));
        assert_eq!(
            outcome,
            CapOutcome::Admitted {
                evicted: vec!["1|a".to_string()]
            }
        );
        assert_eq!(redis.cap_slots("acme/bob"), ["2|b"]);
    }

    /// Sessions that must not get a socket take no slot: missing, logged out, expired, revoked,
    /// not JSON.
    #[tokio::test]
    async fn unusable_sessions_take_no_slot() {
        let (redis, admission) = admission(5, CapPolicy::RejectNew).await;
        assert_eq!(
            admission.admit("gone", "1|a").await.expect("ok"),
            AdmitAnswer::NoSession
        );

        let logged_out = serde_json::to_string(&SessionState::from([(
            KEY_LOGGED_OUT.to_string(),
            "true".to_string(),
        )]))
        .expect("json");
        store(&redis, "out", &logged_out);
        assert!(matches!(
            admission.admit("out", "1|a").await.expect("ok"),
            AdmitAnswer::Unusable(state) if state.contains_key(KEY_LOGGED_OUT)
        ));

        store(&redis, "old", &login("carol", "acme", "s2", now_s() - 1));
        assert!(matches!(
            admission.admit("old", "1|a").await.expect("ok"),
            AdmitAnswer::Unusable(_)
        ));

        store(
            &redis,
            "copied",
            &login("carol", "acme", "s3", now_s() + 600),
        );
        redis::cmd("SET")
            .arg(revoked_key("s3"))
            .arg(1)
            .query::<()>(&mut redis.conn())
            .expect("SET revoked");
        assert!(matches!(
            admission.admit("copied", "1|a").await.expect("ok"),
            AdmitAnswer::Revoked(_)
        ));

        store(&redis, "junk", "{not json");
        assert_eq!(
            admission.admit("junk", "1|a").await.expect("ok"),
            AdmitAnswer::Unusable(SessionState::new())
        );
        assert!(redis.cap_slots("acme/carol").is_empty());
    }
}

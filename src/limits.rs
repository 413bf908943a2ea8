//! Bounds on what one client can take: token buckets (client messages, handshakes per IP),
//! the client-IP rule (`X-Forwarded-For` only from `server.trusted_proxies`), and per-user
//! connection caps: in process when embedded, in Redis (`broker::redis::RedisCaps`) when
//! clustered, behind one [`ConnectionCaps`] handle. A cap slot is a token
//! `<created-ms>|<conn id>`, so every store can tell the oldest socket of a user.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use crate::config::CapPolicy;

/// A classic token bucket: `rate` tokens per second, holding at most `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate_per_s: u32, burst: u32, now: Instant) -> Self {
        Self {
            rate: rate_per_s as f64,
            burst: burst.max(1) as f64,
            tokens: burst.max(1) as f64,
            last: now,
        }
    }

    /// Take one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket has refilled completely (so it can be forgotten).
    fn is_full(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * self.rate >= self.burst
    }
}

/// One entry of `server.trusted_proxies`: an address or a CIDR block.
#[derive(Debug, Clone)]
pub struct IpMatcher {
    network: IpAddr,
    prefix: u8,
}

impl IpMatcher {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let (addr, prefix) = match raw.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (raw, None),
        };
        let network: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{raw:?} is not an IP address"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{raw:?} has a bad prefix length"))?,
            None => max,
        };
        Ok(Self { network, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// IPv4-mapped IPv6 peers (`::ffff:1.2.3.4`) count as their IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Who the client is: the peer, or the right-most untrusted `X-Forwarded-For` hop when the
/// peer is a trusted proxy. Taking the right-most untrusted hop means a client cannot spoof
/// its address by sending its own `X-Forwarded-For` through nginx.
pub fn client_ip(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[IpMatcher]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|m| m.contains(ip));
    let peer = canonical(peer);
    if !is_trusted(peer) {
        return peer;
    }
    let Some(header) = forwarded_for else {
        return peer;
    };
    let mut client = peer;
    for hop in header.rsplit(',') {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) => {
                client = canonical(ip);
                if !is_trusted(client) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    client
}

/// Handshake attempts per client IP. Bounded: full (idle) buckets are forgotten when the map grows.
pub struct HandshakeLimiter {
    rate: u32,
    burst: u32,
    buckets: Mutex<HashMap<IpAddr, TokenBucket>>,
}

/// Past this many tracked IPs, idle entries are swept on the next insert.
const MAX_TRACKED_IPS: usize = 65_536;

impl HandshakeLimiter {
    pub fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate,
            burst,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn allow(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        let mut buckets = self.buckets.lock();
        if buckets.len() >= MAX_TRACKED_IPS && !buckets.contains_key(&ip) {
            buckets.retain(|_, b| !b.is_full(now));
            if buckets.len() >= MAX_TRACKED_IPS {
                // Every tracked IP is busy: refuse new ones rather than grow without bound.
                return false;
            }
        }
        buckets
            .entry(ip)
            .or_insert_with(|| TokenBucket::new(self.rate, self.burst, now))
            .try_take(now)
    }
}

/// The result of asking for a connection slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CapOutcome {
    /// Admitted; the listed connections (oldest first) must be closed with 4409.
    Admitted { evicted: Vec<String> },
    /// The user is at `limit` and the policy is `reject_new`.
    Refused { limit: u32 },
}

/// Per-user connection caps, counted across pods when clustered.
#[derive(Clone)]
pub struct ConnectionCaps {
    limit: u32,
    policy: CapPolicy,
    store: CapStore,
}

#[derive(Clone)]
enum CapStore {
    Memory(Arc<Mutex<HashMap<String, VecDeque<String>>>>),
    Redis(crate::broker::redis::RedisCaps),
}

/// The cap slot token of a connection: sorts by age, and names the connection.
pub fn slot_token(conn: &str) -> String {
    format!("{:015}|{conn}", crate::protocol::unix_ms())
}

/// The connection a slot token names.
pub fn slot_conn(slot: &str) -> &str {
    slot.split_once('|').map_or(slot, |(_, conn)| conn)
}

/// The caps store could not be reached; the handshake fails closed.
#[derive(Debug)]
pub struct CapsUnavailable(pub String);

impl ConnectionCaps {
    pub fn in_memory(limit: u32, policy: CapPolicy) -> Self {
        Self {
            limit,
            policy,
            store: CapStore::Memory(Arc::default()),
        }
    }

    pub fn redis(limit: u32, policy: CapPolicy, store: crate::broker::redis::RedisCaps) -> Self {
        Self {
            limit,
            policy,
            store: CapStore::Redis(store),
        }
    }

    /// The Redis store, when clustered (its leases need refreshing).
    pub fn redis_store(&self) -> Option<crate::broker::redis::RedisCaps> {
        match &self.store {
            CapStore::Redis(store) => Some(store.clone()),
            CapStore::Memory(_) => None,
        }
    }

    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Take `slot` (see [`slot_token`]) for `user_key` (org and user), applying the cap policy.
    /// Evicted entries are slot tokens too.
    pub async fn acquire(&self, user_key: &str, slot: &str) -> Result<CapOutcome, CapsUnavailable> {
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
    pub async fn release(&self, user_key: &str, slot: &str) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A bucket allows its burst at once, then refills at its rate.
    #[test]
    fn token_bucket() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(2, 3, t0);
        assert!(b.try_take(t0) && b.try_take(t0) && b.try_take(t0));
        assert!(!b.try_take(t0));
        assert!(b.try_take(t0 + Duration::from_millis(500)));
        assert!(!b.try_take(t0 + Duration::from_millis(500)));
    }

    /// CIDR matching, including IPv4-mapped IPv6 peers.
    #[test]
    fn cidr() {
        let m = IpMatcher::parse("10.0.0.0/8").unwrap();
        assert!(m.contains("10.1.2.3".parse().unwrap()));
        assert!(!m.contains("11.0.0.1".parse().unwrap()));
        assert!(m.contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(IpMatcher::parse("10.0.0.0/33").is_err());
        assert!(IpMatcher::parse("nope").is_err());
        let all = IpMatcher::parse("0.0.0.0/0").unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
    }

    /// X-Forwarded-For counts only from a trusted proxy, and spoofed left-most hops are ignored.
    #[test]
    fn forwarded_for() {
        let proxy: IpAddr = "127.0.0.1".parse().unwrap();
        let trusted = vec![IpMatcher::parse("127.0.0.1").unwrap()];
        let xff = Some("6.6.6.6, 1.2.3.4");
        assert_eq!(client_ip(proxy, xff, &[]), proxy);
        assert_eq!(
            client_ip(proxy, xff, &trusted),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        let stranger: IpAddr = "9.9.9.9".parse().unwrap();
        assert_eq!(client_ip(stranger, xff, &trusted), stranger);
        assert_eq!(client_ip(proxy, Some("garbage"), &trusted), proxy);
    }

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

    /// The per-IP limiter keeps separate budgets per address.
    #[test]
    fn handshake_limiter() {
        let l = HandshakeLimiter::new(1, 2);
        let a: IpAddr = "1.1.1.1".parse().unwrap();
        let b: IpAddr = "2.2.2.2".parse().unwrap();
        assert!(l.allow(a) && l.allow(a));
        assert!(!l.allow(a));
        assert!(l.allow(b));
    }
}

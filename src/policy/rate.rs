//! Rate limits: a token bucket (a client's message budget; pure, the caller passes the clock)
//! and the per-IP handshake limiter (governor's keyed limiter, on its own clock), bounded in
//! memory. No I/O.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Instant;

use dashmap::DashMap;
use governor::clock::DefaultClock;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::{InMemoryState, StateStore};
use governor::{Quota, RateLimiter};

/// A classic token bucket: `rate` tokens per second, holding at most `burst`.
#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn new(rate_per_s: u32, burst: u32, now: Instant) -> Self {
        Self {
            rate: rate_per_s as f64,
            burst: burst.max(1) as f64,
            tokens: burst.max(1) as f64,
            last: now,
        }
    }

    /// Take one token if there is one.
    pub(crate) fn try_take(&mut self, now: Instant) -> bool {
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
}

/// Handshake attempts per client, each with `rate` per second and bursts of `burst`
/// (governor's keyed GCRA limiter). A client is an IPv4 address or an IPv6 /64
/// ([`handshake_bucket`]). Bounded: once [`MAX_TRACKED_IPS`] addresses are tracked,
/// a handshake from a new address first forgets those whose budget is full again; if every
/// one is still busy, the new address is refused rather than the map growing without bound.
/// Tracked addresses keep their own budget meanwhile.
pub(crate) struct HandshakeLimiter {
    limiter: RateLimiter<IpAddr, TrackedAddresses, DefaultClock>,
    /// The limiter's own map, read to tell tracked addresses from new ones.
    tracked: TrackedAddresses,
}

/// Past this many tracked IPs, idle entries are swept.
const MAX_TRACKED_IPS: usize = 65_536;

/// governor's per-key state in a map both the limiter and [`HandshakeLimiter`] hold.
#[derive(Clone, Default)]
struct TrackedAddresses(Arc<DashMap<IpAddr, InMemoryState>>);

impl StateStore for TrackedAddresses {
    type Key = IpAddr;

    fn measure_and_replace<T, F, E>(&self, key: &IpAddr, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.0.measure_and_replace(key, f)
    }
}

impl ShrinkableKeyedStateStore<IpAddr> for TrackedAddresses {
    fn retain_recent(&self, drop_below: Nanos) {
        self.0.retain_recent(drop_below);
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The budget an address draws on: an IPv4 address its own, an IPv6 address its /64. One
/// host (one home or one cloud instance) is routinely given a whole /64, so counting IPv6
/// addresses apart would hand a single client 2^64 budgets.
pub(crate) fn handshake_bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from_bits(
                v6.to_bits() & !u128::from(u64::MAX),
            )),
        },
        v4 => v4,
    }
}

impl HandshakeLimiter {
    pub(crate) fn new(rate: u32, burst: u32) -> Self {
        let per_s = NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        let tracked = TrackedAddresses::default();
        let quota = Quota::per_second(per_s).allow_burst(burst);
        Self {
            limiter: RateLimiter::new(quota, tracked.clone(), DefaultClock::default()),
            tracked,
        }
    }

    /// How many clients (budgets) are tracked now.
    pub(crate) fn tracked(&self) -> usize {
        self.tracked.0.len()
    }

    /// Take one handshake from `ip`'s budget ([`handshake_bucket`]) if it has one.
    pub(crate) fn allow(&self, ip: IpAddr) -> bool {
        let ip = handshake_bucket(ip);
        if self.tracked.0.len() >= MAX_TRACKED_IPS && !self.tracked.0.contains_key(&ip) {
            self.limiter.retain_recent();
            if self.tracked.0.len() >= MAX_TRACKED_IPS {
                return false;
            }
        }
        self.limiter.check_key(&ip).is_ok()
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

    /// An IPv6 /64 is one client: its addresses share one budget, the next /64 has its own,
    /// and IPv4 addresses stay apart.
    #[test]
    fn ipv6_addresses_share_their_64s_budget() {
        let l = HandshakeLimiter::new(1, 2);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(l.allow(ip("2001:db8:1:2::1")));
        assert!(l.allow(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")));
        assert!(
            !l.allow(ip("2001:db8:1:2::3")),
            "a third address of the same /64"
        );
        assert!(l.allow(ip("2001:db8:1:3::1")), "the next /64");
        assert!(l.allow(ip("1.1.1.1")) && l.allow(ip("1.1.1.2")));
        assert!(l.allow(ip("::ffff:1.1.1.1")) && !l.allow(ip("1.1.1.1")));
    }

    /// With every tracked address busy, a new address is refused while tracked ones keep
    /// their own budget.
    #[test]
    fn a_full_limiter_refuses_new_addresses_only() {
        let l = HandshakeLimiter::new(1, 2);
        let busy: Vec<IpAddr> = (0..MAX_TRACKED_IPS as u32)
            .map(|n| IpAddr::from(n.to_be_bytes()))
            .collect();
        for ip in &busy {
            assert!(l.allow(*ip));
        }
        let newcomer: IpAddr = "10.255.255.255".parse().unwrap();
        assert!(!busy.contains(&newcomer));
        assert!(!l.allow(newcomer), "a new address past the bound");
        assert!(l.allow(busy[7]), "a tracked address keeps its second token");
    }
}

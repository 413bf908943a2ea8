//! Rate limits: a token bucket (a client's message budget) and the meter of its refusals that
//! tells a flood from a burst (both pure, the caller passes the clock), and the per-IP
//! handshake limiter (governor's keyed limiter, on its own clock), bounded in
//! memory. No I/O.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// The refusals of one client's messages over a sliding window (the current fixed window
/// plus the previous one, weighted by how much of it still overlaps). A client refused more
/// than `limit` times within the window is flooding, however many of its messages trickle
/// through as the bucket refills: counting refusals in a row would restart at every refill,
/// so a client sending at any rate up to `limit` times its budget would never be caught.
#[derive(Debug, Clone)]
pub(crate) struct FloodMeter {
    window: Duration,
    limit: u32,
    started: Instant,
    current: u32,
    previous: u32,
    /// A message was allowed since the last refusal.
    allowed_since: bool,
}

/// What a refusal amounts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The first since a message was last allowed: time to tell the client.
    First,
    /// Another one, still under the limit.
    Again,
    /// More than the limit within the window: the client is flooding.
    Flooding,
}

impl FloodMeter {
    /// A meter for a budget of `rate_per_s` and `burst`: the limit is the burst, over the time
    /// the bucket takes to refill (at least a second).
    pub(crate) fn new(rate_per_s: u32, burst: u32, now: Instant) -> Self {
        let refill =
            Duration::from_secs_f64(f64::from(burst.max(1)) / f64::from(rate_per_s.max(1)));
        Self {
            window: refill.max(Duration::from_secs(1)),
            limit: burst.max(1),
            started: now,
            current: 0,
            previous: 0,
            allowed_since: true,
        }
    }

    /// Note an allowed message.
    pub(crate) fn allowed(&mut self) {
        self.allowed_since = true;
    }

    /// Note a refused message and say what it amounts to.
    pub(crate) fn refused(&mut self, now: Instant) -> Refusal {
        let elapsed = now.saturating_duration_since(self.started);
        if elapsed >= self.window * 2 {
            self.previous = 0;
            self.current = 0;
            self.started = now;
        } else if elapsed >= self.window {
            self.previous = self.current;
            self.current = 0;
            self.started += self.window;
        }
        self.current = self.current.saturating_add(1);
        let into = now.saturating_duration_since(self.started).as_secs_f64();
        let overlap = 1.0 - (into / self.window.as_secs_f64()).min(1.0);
        let recent = f64::from(self.previous) * overlap + f64::from(self.current);
        if recent > f64::from(self.limit) {
            Refusal::Flooding
        } else if std::mem::replace(&mut self.allowed_since, false) {
            Refusal::First
        } else {
            Refusal::Again
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

impl TokenBucket {
    /// The tokens there would be at `now`, taking none.
    fn tokens_at(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        (self.tokens + elapsed * self.rate).min(self.burst)
    }
}

/// Failed attempts per client IP (wrong publish keys): each failure spends a token of that
/// address's bucket, and an address with none left is refused before its next attempt is even
/// checked, so a right guess cannot be told from a wrong one while it waits. Bounded like
/// [`HandshakeLimiter`]: past [`MAX_TRACKED_IPS`] addresses, those whose bucket is full again
/// are forgotten; if none is, a new address is not tracked (it cannot be blocked, but it
/// cannot crowd out the addresses already held back either).
pub(crate) struct FailureThrottle {
    /// Refill rate and burst of each address's bucket.
    rate_per_s: u32,
    burst: u32,
    failures: parking_lot::Mutex<std::collections::HashMap<IpAddr, TokenBucket>>,
}

impl FailureThrottle {
    pub(crate) fn new(rate_per_s: u32, burst: u32) -> Self {
        Self {
            rate_per_s,
            burst,
            failures: Default::default(),
        }
    }

    /// Whether `ip` (an IPv4 address, or its IPv6 /64 as for handshakes) has used up its
    /// failures for now.
    pub(crate) fn blocked(&self, ip: IpAddr, now: Instant) -> bool {
        self.failures
            .lock()
            .get(&handshake_bucket(ip))
            .is_some_and(|bucket| bucket.tokens_at(now) < 1.0)
    }

    /// Count a failed attempt from `ip`.
    pub(crate) fn failed(&self, ip: IpAddr, now: Instant) {
        let ip = handshake_bucket(ip);
        let mut failures = self.failures.lock();
        if failures.len() >= MAX_TRACKED_IPS && !failures.contains_key(&ip) {
            failures.retain(|_, bucket| bucket.tokens_at(now) < bucket.burst);
            if failures.len() >= MAX_TRACKED_IPS {
                return;
            }
        }
        failures
            .entry(ip)
            .or_insert_with(|| TokenBucket::new(self.rate_per_s, self.burst, now))
            .try_take(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// A client sending at ten times its rate gets one message through per refill, and is
    /// flooding within the window all the same; a burst a little over the budget is not.
    #[test]
    fn a_trickling_flood_is_caught_and_a_burst_is_not() {
        let (rate, burst) = (5, 20);
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(rate, burst, t0);
        let mut meter = FloodMeter::new(rate, burst, t0);
        let every = Duration::from_millis(1000 / (10 * u64::from(rate)));
        let mut flooding_at = None;
        for n in 0..500u32 {
            let now = t0 + every * n;
            if bucket.try_take(now) {
                meter.allowed();
            } else if meter.refused(now) == Refusal::Flooding {
                flooding_at = Some(now - t0);
                break;
            }
        }
        let at = flooding_at.expect("a flood at 10x the rate is never caught");
        assert!(at < Duration::from_secs(2), "caught only after {at:?}");

        let mut bucket = TokenBucket::new(rate, burst, t0);
        let mut meter = FloodMeter::new(rate, burst, t0);
        let mut told = 0;
        for _ in 0..burst + burst / 2 {
            if !bucket.try_take(t0) {
                match meter.refused(t0) {
                    Refusal::First => told += 1,
                    Refusal::Again => {}
                    Refusal::Flooding => panic!("a burst 50% over the budget counted as a flood"),
                }
            }
        }
        assert_eq!(told, 1, "the client is told once per episode");
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

    /// Failures past the burst block an address (and only it) until a token refills.
    #[test]
    fn failure_throttle() {
        let t0 = Instant::now();
        let throttle = FailureThrottle::new(1, 2);
        let a: IpAddr = "1.1.1.1".parse().unwrap();
        let b: IpAddr = "2.2.2.2".parse().unwrap();
        assert!(!throttle.blocked(a, t0));
        throttle.failed(a, t0);
        assert!(!throttle.blocked(a, t0));
        throttle.failed(a, t0);
        assert!(throttle.blocked(a, t0));
        assert!(!throttle.blocked(b, t0));
        assert!(!throttle.blocked(a, t0 + Duration::from_secs(1)));
    }
}

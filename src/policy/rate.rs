//! Rate limits: a token bucket (a client's message budget; pure, the caller passes the clock)
//! and the per-IP handshake limiter (governor's keyed limiter, on its own clock), bounded in
//! memory. No I/O.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Instant;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

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

/// Handshake attempts per client IP, each with `rate` per second and bursts of `burst`
/// (governor's keyed GCRA limiter). Bounded: past [`MAX_TRACKED_IPS`] addresses, those whose
/// budget is full again are forgotten; if every one is still busy, new handshakes are refused
/// rather than the map growing without bound.
pub(crate) struct HandshakeLimiter {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
}

/// Past this many tracked IPs, idle entries are swept.
const MAX_TRACKED_IPS: usize = 65_536;

impl HandshakeLimiter {
    pub(crate) fn new(rate: u32, burst: u32) -> Self {
        let per_s = NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        Self {
            limiter: RateLimiter::keyed(Quota::per_second(per_s).allow_burst(burst)),
        }
    }

    pub(crate) fn allow(&self, ip: IpAddr) -> bool {
        if self.limiter.len() >= MAX_TRACKED_IPS {
            self.limiter.retain_recent();
            if self.limiter.len() >= MAX_TRACKED_IPS {
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
}

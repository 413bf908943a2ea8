//! Counters shared by every simulated client and the publishers, lock-free so that recording
//! a delivery costs a few atomic adds: a log-linear latency histogram, per-phase delivery
//! counts, per-event receipt counts (how the "as fast as it goes" pacer knows an event has
//! reached every subscriber), and the tallies of closes and protocol surprises.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::Notify;

/// Most phases a run may have.
pub const MAX_PHASES: usize = 8;

/// Receivers record into one of these per thread, so that counting a delivery never moves a
/// cache line between cores; readers add the shards up.
const SHARDS: usize = 8;
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);
thread_local! {
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Relaxed) % SHARDS;
}

/// Wall-clock nanoseconds: events carry this as `data.t`, receivers subtract it from theirs.
/// Both ends run on this machine, so clock offset is nil.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Values below this are counted exactly (one bucket per microsecond).
const LINEAR: u64 = 128;
/// Sub-buckets per power of two above `LINEAR`: relative error under 1/64.
const SUB_BITS: u32 = 6;
const BUCKETS: usize = LINEAR as usize + (64 - 7) * (1 << SUB_BITS);

/// A histogram of microsecond values, safe to record into from every thread at once.
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum: AtomicU64,
    max: AtomicU64,
}

/// Percentiles of a histogram, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

fn bucket_of(v: u64) -> usize {
    if v < LINEAR {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros(); // >= 7
    let sub = (v >> (exp - SUB_BITS)) & ((1 << SUB_BITS) - 1);
    LINEAR as usize + (exp as usize - 7) * (1 << SUB_BITS) + sub as usize
}

/// The upper bound of a bucket (what a percentile inside it reports).
fn bucket_high(i: usize) -> u64 {
    if i < LINEAR as usize {
        return i as u64;
    }
    let j = i - LINEAR as usize;
    let exp = (j >> SUB_BITS) as u32 + 7;
    let sub = (j & ((1 << SUB_BITS) - 1)) as u64;
    let low = (1u64 << exp) + (sub << (exp - SUB_BITS));
    low + (1u64 << (exp - SUB_BITS)) - 1
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            max: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn record_us(&self, v: u64) {
        self.buckets[bucket_of(v)].fetch_add(1, Relaxed);
        self.count.fetch_add(1, Relaxed);
        self.sum.fetch_add(v, Relaxed);
        self.max.fetch_max(v, Relaxed);
    }

    pub fn summary(&self) -> LatencySummary {
        Self::summary_of(&[self])
    }

    /// One summary of several histograms taken together.
    pub fn summary_of(all: &[&Histogram]) -> LatencySummary {
        let mut counts = vec![0u64; BUCKETS];
        let (mut sum, mut max) = (0u64, 0u64);
        for h in all {
            for (c, b) in counts.iter_mut().zip(h.buckets.iter()) {
                *c += b.load(Relaxed);
            }
            sum += h.sum.load(Relaxed);
            max = max.max(h.max.load(Relaxed));
        }
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return LatencySummary::default();
        }
        let pct = |q: f64| -> f64 {
            let rank = ((q * total as f64).ceil() as u64).max(1);
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return bucket_high(i) as f64 / 1000.0;
                }
            }
            0.0
        };
        LatencySummary {
            count: total,
            mean_ms: sum as f64 / total as f64 / 1000.0,
            p50_ms: pct(0.50),
            p90_ms: pct(0.90),
            p99_ms: pct(0.99),
            max_ms: max as f64 / 1000.0,
        }
    }
}

/// What one phase's events did, recorded by the receivers (the phase travels in `data.ph`).
#[derive(Default)]
pub struct PhaseCounters {
    pub delivered: AtomicU64,
    pub latency: Histogram,
}

/// One thread's share of the delivery counts, on cache lines of its own.
#[repr(align(128))]
struct Shard {
    /// Every event frame received, all phases.
    delivered: AtomicU64,
    phases: Vec<PhaseCounters>,
}

/// Everything the receivers and publishers of one run share.
pub struct Shared {
    shards: Box<[Shard]>,
    /// Receipts per event (index `data.g`); the pacer of "as fast as it goes" compares this
    /// with the topic's subscriber count.
    pub receipts: Box<[AtomicU32]>,
    /// Subscribers per topic (those that got `subscribed`).
    pub subscribers: Box<[AtomicU32]>,
    /// Events the hub accepted (202) per topic.
    pub published: Box<[AtomicU64]>,
    /// Events whose publish failed, by `g` (so the pacer does not wait for them).
    pub failed: Box<[std::sync::atomic::AtomicBool]>,
    /// Woken when an event reaches its last subscriber.
    pub event_complete: Notify,
    /// Sockets open right now (admitted and subscribed, not yet closed).
    pub live: AtomicI64,
    /// Protocol pings received (the hub's heartbeat).
    pub pings: AtomicU64,
    /// `{"type":"error"}` frames received.
    pub error_frames: AtomicU64,
    /// Event frames whose data did not parse.
    pub parse_errors: AtomicU64,
    /// Sockets the server closed before the bench asked, by close code (0: no close frame).
    pub unexpected_closes: Mutex<BTreeMap<u16, u64>>,
}

impl Shared {
    pub fn new(max_events: usize, topics: usize) -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| Shard {
                    delivered: AtomicU64::new(0),
                    phases: (0..MAX_PHASES).map(|_| PhaseCounters::default()).collect(),
                })
                .collect(),
            receipts: (0..max_events).map(|_| AtomicU32::new(0)).collect(),
            subscribers: (0..topics).map(|_| AtomicU32::new(0)).collect(),
            published: (0..topics).map(|_| AtomicU64::new(0)).collect(),
            failed: (0..max_events)
                .map(|_| std::sync::atomic::AtomicBool::new(false))
                .collect(),
            event_complete: Notify::new(),
            live: AtomicI64::new(0),
            pings: AtomicU64::new(0),
            error_frames: AtomicU64::new(0),
            parse_errors: AtomicU64::new(0),
            unexpected_closes: Mutex::new(BTreeMap::new()),
        }
    }

    /// Count one received event; `topic` is the receiver's topic.
    pub fn record_event(&self, topic: u32, g: u64, ph: usize, sent_ns: u64) {
        let now = now_ns();
        let shard = &self.shards[SHARD.with(|s| *s)];
        shard.delivered.fetch_add(1, Relaxed);
        if let Some(phase) = shard.phases.get(ph) {
            phase.delivered.fetch_add(1, Relaxed);
            phase.latency.record_us(now.saturating_sub(sent_ns) / 1000);
        }
        if let Some(r) = self.receipts.get(g as usize) {
            let n = r.fetch_add(1, Relaxed) + 1;
            if let Some(subs) = self.subscribers.get(topic as usize) {
                if n == subs.load(Relaxed) {
                    self.event_complete.notify_one();
                }
            }
        }
    }

    /// Event frames received so far, all phases.
    pub fn delivered(&self) -> u64 {
        self.shards.iter().map(|s| s.delivered.load(Relaxed)).sum()
    }

    /// Event frames of phase `ph` received so far.
    pub fn phase_delivered(&self, ph: usize) -> u64 {
        self.shards
            .iter()
            .filter_map(|s| s.phases.get(ph))
            .map(|p| p.delivered.load(Relaxed))
            .sum()
    }

    /// Publish→receive latency of phase `ph`.
    pub fn phase_latency(&self, ph: usize) -> LatencySummary {
        let all: Vec<&Histogram> = self
            .shards
            .iter()
            .filter_map(|s| s.phases.get(ph))
            .map(|p| &p.latency)
            .collect();
        Histogram::summary_of(&all)
    }

    /// Deliveries every subscriber should get for what has been accepted so far.
    pub fn expected_deliveries(&self) -> u64 {
        self.published
            .iter()
            .zip(self.subscribers.iter())
            .map(|(p, s)| p.load(Relaxed) * s.load(Relaxed) as u64)
            .sum()
    }

    pub fn total_published(&self) -> u64 {
        self.published.iter().map(|p| p.load(Relaxed)).sum()
    }

    pub fn note_close(&self, code: u16) {
        *self.unexpected_closes.lock().entry(code).or_default() += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buckets are contiguous and each value lies within its bucket's bounds.
    #[test]
    fn buckets_cover_values() {
        for v in [
            0u64,
            1,
            127,
            128,
            129,
            200,
            1000,
            12345,
            1 << 20,
            u64::MAX / 3,
        ] {
            let b = bucket_of(v);
            assert!(bucket_high(b) >= v, "{v}");
            if b > 0 {
                assert!(bucket_high(b - 1) < v, "{v}");
            }
        }
    }

    /// Percentiles land within the bucket error of the true value.
    #[test]
    fn percentiles() {
        let h = Histogram::default();
        for v in 1..=1000u64 {
            h.record_us(v * 10);
        }
        let s = h.summary();
        assert!((s.p50_ms - 5.0).abs() < 0.1, "{}", s.p50_ms);
        assert!((s.p99_ms - 9.9).abs() < 0.2, "{}", s.p99_ms);
        assert_eq!(s.max_ms, 10.0);
    }
}

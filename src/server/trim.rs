//! Handing freed heap back to the OS. glibc keeps freed memory otherwise, so a node's RSS
//! would stay at the level of its busiest moment (a reconnect storm, a churn of short-lived
//! tabs, a backlog of frames) for the rest of its life. [`TrimPolicy`] decides when, from
//! what the node did between two looks; the server runs [`trim_when_quiet`].

use std::sync::Arc;
use std::time::Duration;

use crate::core::metrics::metrics;
use crate::delivery::registry::Registry;

/// How often the heap is looked at.
const TRIM_EVERY: Duration = Duration::from_secs(2);
/// Sockets that must have gone (from the highest count since the last trim, and at least half
/// of it) for a disconnect wave.
const TRIM_MIN_GONE: usize = 1000;
/// Work since the last trim that makes a busy spell: sockets opened, or frames delivered.
const TRIM_AFTER_OPENED: u64 = 1000;
const TRIM_AFTER_DELIVERED: u64 = 100_000;
/// At most this much work in one look counts as quiet: the busy spell is over.
const QUIET_OPENED: u64 = 50;
const QUIET_DELIVERED: u64 = 1000;
/// Looks between two trims for busy spells (30 s), so traffic that comes in bursts (one
/// broadcast every few seconds) does not trim after each of them.
const BUSY_TRIM_SPACING_LOOKS: u32 = 15;

/// Give the freed heap back to the OS after a wave of sockets closes, and when a busy spell
/// (a wave of handshakes, a burst of traffic) has gone quiet. glibc keeps freed memory
/// otherwise, so a node's RSS would stay at the level of its busiest moment (a reconnect
/// storm, a churn of short-lived tabs, a backlog of frames) for the rest of its life.
pub(crate) async fn trim_when_quiet(registry: Arc<Registry>) {
    let mut ticker = tokio::time::interval(TRIM_EVERY);
    let mut policy = TrimPolicy::default();
    loop {
        ticker.tick().await;
        let delivered = metrics().messages_delivered.get();
        if policy.observe(registry.session_count(), delivered) {
            trim_heap();
        }
    }
}

/// When to trim, from what the node did between two looks. Trims happen when sockets just
/// left, or after a busy spell once a look was quiet (at most every 30 s for those), so
/// deliveries rarely meet one. Sockets opened are counted as growth in
/// the count, so churn at a steady count is not a busy spell (its disconnect waves are).
#[derive(Default)]
struct TrimPolicy {
    highest_sessions: usize,
    last_sessions: usize,
    last_delivered: u64,
    opened_since_trim: u64,
    delivered_since_trim: u64,
    busy_trim_allowed_in: u32,
}

impl TrimPolicy {
    /// Take one look (open sockets now, frames delivered in all); true: trim now.
    fn observe(&mut self, sessions: usize, delivered: u64) -> bool {
        let opened = sessions.saturating_sub(self.last_sessions) as u64;
        let sent = delivered.saturating_sub(self.last_delivered);
        (self.last_sessions, self.last_delivered) = (sessions, delivered);
        self.opened_since_trim += opened;
        self.delivered_since_trim += sent;
        self.highest_sessions = self.highest_sessions.max(sessions);
        let gone = self.highest_sessions - sessions;
        let wave_gone = gone >= TRIM_MIN_GONE && sessions <= self.highest_sessions / 2;
        let quiet = opened <= QUIET_OPENED && sent <= QUIET_DELIVERED;
        self.busy_trim_allowed_in = self.busy_trim_allowed_in.saturating_sub(1);
        let busy_spell_over = (self.opened_since_trim >= TRIM_AFTER_OPENED
            || self.delivered_since_trim >= TRIM_AFTER_DELIVERED)
            && quiet
            && self.busy_trim_allowed_in == 0;
        if !(wave_gone || busy_spell_over) {
            return false;
        }
        self.highest_sessions = sessions;
        (self.opened_since_trim, self.delivered_since_trim) = (0, 0);
        self.busy_trim_allowed_in = BUSY_TRIM_SPACING_LOOKS;
        true
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_heap() {
    extern "C" {
        fn malloc_trim(pad: usize) -> std::os::raw::c_int;
    }
    // SAFETY: glibc's malloc_trim takes the allocator's own locks and only releases memory
    // that is already free; it has no preconditions on the caller.
    unsafe {
        malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_heap() {}

#[cfg(test)]
mod tests {
    use super::TrimPolicy;

    #[test]
    fn trims_once_a_wave_of_handshakes_goes_quiet_and_not_while_it_lasts() {
        let mut policy = TrimPolicy::default();
        assert!(!policy.observe(3_000, 0), "still connecting");
        assert!(!policy.observe(5_000, 0), "still connecting");
        assert!(policy.observe(5_000, 0), "connected and quiet");
        assert!(!policy.observe(5_000, 0), "nothing freed since");
    }

    #[test]
    fn trims_after_a_burst_of_traffic_not_during_steady_traffic() {
        let mut policy = TrimPolicy::default();
        policy.observe(100, 0);
        let mut delivered = 0;
        for _ in 0..20 {
            delivered += 200_000;
            assert!(!policy.observe(100, delivered), "traffic is flowing");
        }
        assert!(policy.observe(100, delivered + 10), "the burst is over");
        assert!(!policy.observe(100, delivered + 20), "nothing new since");
    }

    #[test]
    fn bursts_every_few_seconds_trim_at_most_every_30_s() {
        let mut policy = TrimPolicy::default();
        let mut delivered = 0;
        let mut trims = 0;
        // A broadcast to 200,000 sockets every 10 s (one look in five), for 5 minutes.
        for look in 0..150 {
            if look % 5 == 0 {
                delivered += 200_000;
            }
            trims += usize::from(policy.observe(200_000, delivered));
        }
        assert!((1..=11).contains(&trims), "{trims} trims in 5 minutes");
    }

    #[test]
    fn trims_when_most_sockets_leave_even_while_the_rest_are_busy() {
        let mut policy = TrimPolicy::default();
        for _ in 0..3 {
            policy.observe(4_000, 0);
        }
        assert!(policy.observe(1_500, 1_000_000), "2,500 of 4,000 gone");
    }

    #[test]
    fn a_small_node_going_quiet_is_left_alone() {
        let mut policy = TrimPolicy::default();
        let mut delivered = 0;
        for n in [10, 20, 30, 30, 20, 30, 30, 30] {
            delivered += 100;
            assert!(!policy.observe(n, delivered));
        }
    }
}

//! The call-centre simulator behind `demo.simulate_calls` and `switchboard simulate`: a pure,
//! seeded generator of realistic `call.status` events (SPEC section 4) for a pool of agents.
//! It owns the simulated calls, the agent pool, the arrival process and the event data
//! format (RFC 3339 UTC timestamps with milliseconds); it does no I/O and keeps no clock of
//! its own. Callers drive it with [`CallSimulator::advance`] and publish what it
//! returns: each status change as two events, one on `calls` (the board) and one on
//! `call:<call_id>` (the per-call detail).
//!
//! The model: new calls arrive as a Poisson process at the configured rate, about 70% inbound.
//! Inbound calls wait in a FIFO queue (1-20 s, longer while every agent is busy), ring an
//! agent (2-8 s), talk (20 s - 4 min) and end; about 8% are abandoned while queued or ringing,
//! and callers who wait past their patience hang up. About 10% of conversations are forwarded
//! (3-10 s) to another free agent. Outbound calls ring from a free agent and are answered,
//! not answered or busy. An agent is busy from ringing until the call leaves them.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use time::format_description::BorrowedFormatItem;
use time::macros::format_description;
use time::{OffsetDateTime, PrimitiveDateTime};

/// The event name of every simulated event.
pub(crate) const CALL_STATUS_EVENT: &str = "call.status";
/// The board topic every status change is published on.
pub(crate) const BOARD_TOPIC: &str = "calls";
/// Longest stretch of simulated time one `advance` catches up on; a longer gap (a laptop that
/// slept) is skipped as if the simulation had been paused, so it never emits a flood.
pub(crate) const MAX_CATCH_UP_MS: u64 = 60_000;
/// How many calls the first `advance` puts on the board, in various states.
const SEED_CALLS: usize = 5;

/// Share of new calls that are inbound (when an agent is free to place outbound calls).
const INBOUND_SHARE: f64 = 0.70;
/// Share of inbound calls abandoned while queued or ringing.
const ABANDON_SHARE: f64 = 0.08;
/// Share of conversations forwarded to another agent.
const FORWARD_SHARE: f64 = 0.10;

/// The company's lines: inbound calls dial one of these; outbound calls come from one.
const COMPANY_LINES: [&str; 3] = ["+15550100100", "+15550100200", "+15550100300"];

/// One event to publish: topic name (valid per SPEC grammar), event name, JSON data.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SimulatedEvent {
    pub(crate) topic: String,
    pub(crate) event: String,
    pub(crate) data: serde_json::Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Queued,
    Ringing,
    InProgress,
    Forwarding,
    Ended,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Ringing => "ringing",
            Status::InProgress => "in-progress",
            Status::Forwarding => "forwarding",
            Status::Ended => "ended",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// How an inbound call is fated to be abandoned, decided when it arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Abandon {
    Never,
    WhileRinging,
    NoAnswer,
}

/// The next thing that happens to a call, at `Call::due`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The minimum queue wait is over: take a free agent, or wait for one.
    QueueReady,
    /// The caller hangs up while queued.
    QueueGiveUp,
    /// Ringing -> in-progress.
    Answer,
    /// Ringing -> ended with this reason.
    RingEnd(&'static str),
    /// In-progress -> forwarding, if another agent is free.
    Forward,
    /// Forwarding -> in-progress with the target agent.
    TransferDone,
    /// In-progress -> ended normally.
    HangUp,
}

#[derive(Debug, Clone)]
struct Call {
    id: String,
    direction: Direction,
    from: String,
    to: String,
    status: Status,
    /// The agent the call is with (ringing, in-progress, forwarding from).
    agent: Option<usize>,
    /// The agent a forwarding call is being transferred to (reserved, not yet visible).
    target: Option<usize>,
    started_at: u64,
    ended_at: Option<u64>,
    ended_reason: Option<&'static str>,
    step: Step,
    due: u64,
    /// Set while queued past the minimum wait with no agent free: FIFO order of the queue.
    waiting_since: Option<u64>,
    /// When a caller waiting for an agent gives up.
    patience_at: u64,
    abandon: Abandon,
    /// Talk time left after a transfer.
    remaining_talk: u64,
    forwarded: bool,
}

/// A deterministic call-centre simulator; see the module documentation.
pub(crate) struct CallSimulator {
    rng: StdRng,
    /// New calls per millisecond; 0 means no arrivals (and no seeded calls).
    rate_per_ms: f64,
    /// `busy[i]`: agent `i` is assigned to a call (ringing, talking, or a transfer target).
    busy: Vec<bool>,
    /// Calls not yet ended, in creation order.
    calls: Vec<Call>,
    /// Simulated time; `None` until the first `advance`.
    clock: Option<u64>,
    next_arrival: Option<u64>,
    id_key: u32,
    id_counter: u32,
}

impl CallSimulator {
    /// `calls_per_minute`: average new calls per minute; `agents`: size of the agent pool.
    ///
    /// A call keeps an agent for about two minutes on average, so a pool of about
    /// 2.5 × `calls_per_minute` agents keeps the queue short; a smaller pool shows an overloaded
    /// centre (long queues, callers hanging up, few outbound calls). A rate that is not a
    /// positive number means no calls at all. `seed` fixes every draw (ids, timings, outcomes).
    pub(crate) fn new(calls_per_minute: f64, agents: usize, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let id_key = rng.random::<u32>();
        let rate_per_ms = if calls_per_minute.is_finite() && calls_per_minute > 0.0 {
            calls_per_minute / 60_000.0
        } else {
            0.0
        };
        CallSimulator {
            rng,
            rate_per_ms,
            busy: vec![false; agents],
            calls: Vec::new(),
            clock: None,
            next_arrival: None,
            id_key,
            id_counter: 0,
        }
    }

    /// Advance simulated time to `now_ms` (unix ms; monotonic calls) and return the events that happen in between,
    /// in order. Each call status change yields TWO events with identical data: one on topic `calls` (the board)
    /// and one on topic `call:<call_id>` (per-call detail), event name `call.status`.
    ///
    /// The first call puts a few calls on the board at once. A `now_ms` earlier than the previous
    /// one returns nothing; a gap longer than [`MAX_CATCH_UP_MS`] is simulated only for its last
    /// [`MAX_CATCH_UP_MS`] (pending steps are shifted forward, so calls keep their `started_at`).
    pub(crate) fn advance(&mut self, now_ms: u64) -> Vec<SimulatedEvent> {
        let mut out = Vec::new();
        let Some(clock) = self.clock else {
            self.clock = Some(now_ms);
            self.seed_board(now_ms, &mut out);
            self.next_arrival = self.arrival_after(now_ms);
            return out;
        };
        if now_ms <= clock {
            return out;
        }
        if now_ms - clock > MAX_CATCH_UP_MS {
            self.shift(now_ms - MAX_CATCH_UP_MS - clock);
        }
        loop {
            let next_call = self
                .calls
                .iter()
                .enumerate()
                .min_by_key(|(_, c)| c.due)
                .map(|(i, c)| (i, c.due));
            match (next_call, self.next_arrival) {
                (Some((i, due)), arrival) if due <= now_ms && arrival.is_none_or(|a| due <= a) => {
                    self.step_call(i, due, &mut out);
                }
                (_, Some(arrival)) if arrival <= now_ms => {
                    self.arrive(arrival, &mut out);
                    self.next_arrival = self.arrival_after(arrival);
                }
                _ => break,
            }
        }
        self.clock = Some(now_ms);
        out
    }

    /// Calls currently not ended.
    #[cfg(test)]
    pub(crate) fn active_calls(&self) -> usize {
        self.calls.len()
    }

    /// Moves every pending step `skip` ms later: the simulation was paused for that long.
    fn shift(&mut self, skip: u64) {
        for c in &mut self.calls {
            c.due = c.due.saturating_add(skip);
            c.patience_at = c.patience_at.saturating_add(skip);
            c.waiting_since = c.waiting_since.map(|w| w.saturating_add(skip));
        }
        self.next_arrival = self.next_arrival.map(|a| a.saturating_add(skip));
    }

    /// The next arrival after `t` (exponential gap), or `None` when the rate is 0.
    fn arrival_after(&mut self, t: u64) -> Option<u64> {
        if self.rate_per_ms <= 0.0 {
            return None;
        }
        let u: f64 = self.rng.random();
        // 1 - u is in (0, 1], so the logarithm is finite and <= 0; `as` saturates huge gaps.
        let gap = -(1.0 - u).ln() / self.rate_per_ms;
        Some(t.saturating_add(gap as u64))
    }

    /// Picks a free agent at random and marks it busy.
    fn take_free_agent(&mut self) -> Option<usize> {
        let free = self.busy.iter().filter(|b| !**b).count();
        if free == 0 {
            return None;
        }
        let nth = self.rng.random_range(0..free);
        let agent = self
            .busy
            .iter()
            .enumerate()
            .filter(|(_, b)| !**b)
            .nth(nth)
            .map(|(i, _)| i)?;
        self.busy[agent] = true;
        Some(agent)
    }

    /// Frees `agent` at `t`; the longest-waiting queued caller, if any, gets them at once.
    fn release(&mut self, agent: usize, t: u64, out: &mut Vec<SimulatedEvent>) {
        if let Some(b) = self.busy.get_mut(agent) {
            *b = false;
        }
        let next = self
            .calls
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.waiting_since.map(|w| (w, i)))
            .min();
        if let Some((_, i)) = next {
            if let Some(b) = self.busy.get_mut(agent) {
                *b = true;
            }
            self.ring_inbound(i, agent, t, out);
        }
    }

    fn next_id(&mut self) -> String {
        // A bijection of the counter (offset, then murmur3's finaliser): ids look random and
        // never repeat within 2^32 calls of one simulator.
        let mut h = self.id_counter.wrapping_add(self.id_key);
        self.id_counter = self.id_counter.wrapping_add(1);
        h ^= h >> 16;
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
        h = h.wrapping_mul(0xc2b2_ae35);
        h ^= h >> 16;
        format!("c-{h:08x}")
    }

    fn customer_number(&mut self) -> String {
        format!("+1555{:07}", self.rng.random_range(0..10_000_000u32))
    }

    fn company_line(&mut self) -> String {
        COMPANY_LINES[self.rng.random_range(0..COMPANY_LINES.len())].to_string()
    }

    /// A fresh call with numbers filled in; status and step are set by the caller.
    fn new_call(&mut self, direction: Direction, started_at: u64) -> Call {
        let id = self.next_id();
        let customer = self.customer_number();
        let line = self.company_line();
        let (from, to) = match direction {
            Direction::Inbound => (customer, line),
            Direction::Outbound => (line, customer),
        };
        Call {
            id,
            direction,
            from,
            to,
            status: Status::Queued,
            agent: None,
            target: None,
            started_at,
            ended_at: None,
            ended_reason: None,
            step: Step::QueueReady,
            due: started_at,
            waiting_since: None,
            patience_at: started_at,
            abandon: Abandon::Never,
            remaining_talk: 0,
            forwarded: false,
        }
    }

    /// Puts a fresh inbound call in the queue at `t` (waits `wait_ms` before looking for an
    /// agent), with its abandonment fate drawn.
    fn enqueue(&mut self, mut call: Call, t: u64, wait_ms: u64) -> Call {
        call.status = Status::Queued;
        call.patience_at = t + self.rng.random_range(45_000..=180_000);
        call.step = Step::QueueReady;
        call.due = t + wait_ms;
        if self.rng.random_bool(ABANDON_SHARE) {
            let roll: f64 = self.rng.random();
            if roll < 0.5 {
                call.step = Step::QueueGiveUp;
                call.due = t + self.rng.random_range(1_000..=wait_ms.max(1_000));
            } else if roll < 0.75 {
                call.abandon = Abandon::WhileRinging;
            } else {
                call.abandon = Abandon::NoAnswer;
            }
        }
        call
    }

    /// A new call arrives at `t`.
    fn arrive(&mut self, t: u64, out: &mut Vec<SimulatedEvent>) {
        if !self.rng.random_bool(INBOUND_SHARE) {
            // Outbound calls are placed by a free agent; with none free the dialer holds off
            // and the slot goes to an inbound caller, so the arrival rate is honoured.
            if let Some(agent) = self.take_free_agent() {
                let mut call = self.new_call(Direction::Outbound, t);
                call.status = Status::Ringing;
                call.agent = Some(agent);
                let roll: f64 = self.rng.random();
                if roll < 0.70 {
                    call.step = Step::Answer;
                    call.due = t + self.rng.random_range(3_000..=15_000);
                } else if roll < 0.90 {
                    call.step = Step::RingEnd("no-answer");
                    call.due = t + self.rng.random_range(20_000..=30_000);
                } else {
                    call.step = Step::RingEnd("busy");
                    call.due = t + self.rng.random_range(1_000..=4_000);
                }
                emit(out, &call);
                self.calls.push(call);
                return;
            }
        }
        let call = self.new_call(Direction::Inbound, t);
        let wait = self.rng.random_range(1_000..=20_000);
        let call = self.enqueue(call, t, wait);
        emit(out, &call);
        self.calls.push(call);
    }

    /// The first `advance`: a few calls already under way, so a fresh board is not empty.
    fn seed_board(&mut self, t: u64, out: &mut Vec<SimulatedEvent>) {
        if self.rate_per_ms <= 0.0 {
            return;
        }
        let kinds = [
            (Status::InProgress, Direction::Inbound),
            (Status::InProgress, Direction::Outbound),
            (Status::Forwarding, Direction::Inbound),
            (Status::Ringing, Direction::Inbound),
            (Status::Queued, Direction::Inbound),
        ];
        for &(status, direction) in kinds.iter().cycle().take(SEED_CALLS) {
            let agent = match status {
                Status::Queued | Status::Ended => None,
                _ => self.take_free_agent(),
            };
            let target = match (status, agent) {
                (Status::Forwarding, Some(_)) => self.take_free_agent(),
                _ => None,
            };
            let call = match (status, agent, target) {
                (Status::InProgress, Some(a), _) => {
                    let age = self.rng.random_range(40_000..=180_000);
                    let mut call = self.new_call(direction, t.saturating_sub(age));
                    call.status = Status::InProgress;
                    call.agent = Some(a);
                    self.begin_talk(&mut call, t);
                    call
                }
                (Status::Forwarding, Some(a), Some(b)) => {
                    let age = self.rng.random_range(60_000..=200_000);
                    let mut call = self.new_call(direction, t.saturating_sub(age));
                    call.status = Status::Forwarding;
                    call.agent = Some(a);
                    call.target = Some(b);
                    call.remaining_talk = self.rng.random_range(20_000..=120_000);
                    call.step = Step::TransferDone;
                    call.due = t + self.rng.random_range(2_000..=6_000);
                    call
                }
                (Status::Ringing, Some(a), _) => {
                    let age = self.rng.random_range(3_000..=15_000);
                    let mut call = self.new_call(direction, t.saturating_sub(age));
                    call.status = Status::Ringing;
                    call.agent = Some(a);
                    call.step = Step::Answer;
                    call.due = t + self.rng.random_range(1_000..=5_000);
                    call
                }
                _ => {
                    // Queued by choice, or not enough free agents for the intended state.
                    for a in [agent, target].into_iter().flatten() {
                        self.busy[a] = false;
                    }
                    let age = self.rng.random_range(0..=8_000);
                    let call = self.new_call(Direction::Inbound, t.saturating_sub(age));
                    let wait = self.rng.random_range(1_000..=8_000);
                    self.enqueue(call, t, wait)
                }
            };
            emit(out, &call);
            self.calls.push(call);
        }
    }

    /// Starts (or resumes after a seed) a conversation at `t`: draws its length and whether
    /// it will be forwarded part-way.
    fn begin_talk(&mut self, call: &mut Call, t: u64) {
        // 20 s - 4 min, skewed towards shorter calls.
        let u: f64 = self.rng.random();
        let talk = 20_000 + (220_000.0 * u.powf(1.5)) as u64;
        if !call.forwarded && self.rng.random_bool(FORWARD_SHARE) {
            let first = (talk as f64 * self.rng.random_range(0.3..0.7)) as u64;
            call.remaining_talk = talk - first;
            call.step = Step::Forward;
            call.due = t + first;
        } else {
            call.step = Step::HangUp;
            call.due = t + talk;
        }
    }

    /// Queued call `i` is put through to `agent` (already marked busy) at `t`.
    fn ring_inbound(&mut self, i: usize, agent: usize, t: u64, out: &mut Vec<SimulatedEvent>) {
        let (step, due) = match self.calls[i].abandon {
            Abandon::WhileRinging => (
                Step::RingEnd("customer-hangup"),
                t + self.rng.random_range(1_000..=6_000),
            ),
            Abandon::NoAnswer => (
                Step::RingEnd("no-answer"),
                t + self.rng.random_range(15_000..=25_000),
            ),
            Abandon::Never => (Step::Answer, t + self.rng.random_range(2_000..=8_000)),
        };
        let call = &mut self.calls[i];
        call.status = Status::Ringing;
        call.agent = Some(agent);
        call.waiting_since = None;
        call.step = step;
        call.due = due;
        emit(out, call);
    }

    /// Ends call `i` at `t`, removes it and frees its agents.
    fn end_call(&mut self, i: usize, t: u64, reason: &'static str, out: &mut Vec<SimulatedEvent>) {
        let mut call = self.calls.remove(i);
        call.status = Status::Ended;
        call.ended_at = Some(t);
        call.ended_reason = Some(reason);
        emit(out, &call);
        for a in [call.agent, call.target].into_iter().flatten() {
            self.release(a, t, out);
        }
    }

    /// Performs the due step of call `i` at `t`.
    fn step_call(&mut self, i: usize, t: u64, out: &mut Vec<SimulatedEvent>) {
        match self.calls[i].step {
            Step::QueueReady => match self.take_free_agent() {
                Some(agent) => self.ring_inbound(i, agent, t, out),
                None => {
                    let call = &mut self.calls[i];
                    call.waiting_since = Some(t);
                    call.step = Step::QueueGiveUp;
                    call.due = call.patience_at.max(t);
                }
            },
            Step::QueueGiveUp => self.end_call(i, t, "customer-hangup", out),
            Step::RingEnd(reason) => self.end_call(i, t, reason, out),
            Step::Answer => {
                let mut call = self.calls[i].clone();
                call.status = Status::InProgress;
                self.begin_talk(&mut call, t);
                emit(out, &call);
                self.calls[i] = call;
            }
            Step::Forward => match self.take_free_agent() {
                Some(target) => {
                    let transfer = self.rng.random_range(3_000..=10_000);
                    let call = &mut self.calls[i];
                    call.status = Status::Forwarding;
                    call.target = Some(target);
                    call.step = Step::TransferDone;
                    call.due = t + transfer;
                    emit(out, call);
                }
                None => {
                    // Nobody free to take it: the first agent keeps the call.
                    let call = &mut self.calls[i];
                    call.step = Step::HangUp;
                    call.due = t + call.remaining_talk;
                }
            },
            Step::TransferDone => {
                let call = &mut self.calls[i];
                let previous = call.agent;
                call.agent = call.target.take().or(previous);
                call.forwarded = true;
                call.status = Status::InProgress;
                call.step = Step::HangUp;
                call.due = t + call.remaining_talk;
                emit(out, call);
                if let Some(a) = previous.filter(|a| Some(*a) != self.calls[i].agent) {
                    self.release(a, t, out);
                }
            }
            Step::HangUp => {
                let reason = if self.rng.random_bool(0.6) {
                    "customer-ended-call"
                } else {
                    "agent-ended-call"
                };
                self.end_call(i, t, reason, out);
            }
        }
    }
}

/// The agent id shown on the board for pool index `i`.
fn agent_id(i: usize) -> String {
    format!("agent-{:02}", i + 1)
}

/// The SPEC call-status data of `call` as it is now.
fn call_data(call: &Call) -> Value {
    json!({
        "call_id": call.id,
        "status": call.status.as_str(),
        "direction": call.direction.as_str(),
        "from": call.from,
        "to": call.to,
        "agent_id": call.agent.map(agent_id),
        "started_at": rfc3339_ms(call.started_at),
        "ended_at": call.ended_at.map(rfc3339_ms),
        "ended_reason": call.ended_reason,
    })
}

/// Appends the two events of `call`'s current status: board first, then per-call topic.
fn emit(out: &mut Vec<SimulatedEvent>, call: &Call) {
    let data = call_data(call);
    out.push(SimulatedEvent {
        topic: BOARD_TOPIC.to_string(),
        event: CALL_STATUS_EVENT.to_string(),
        data: data.clone(),
    });
    out.push(SimulatedEvent {
        topic: format!("call:{}", call.id),
        event: CALL_STATUS_EVENT.to_string(),
        data,
    });
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`: RFC 3339 in UTC with exactly three fractional digits.
const TIMESTAMP_FORMAT: &[BorrowedFormatItem<'_>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");

/// Formats unix milliseconds as RFC 3339 UTC with millisecond precision,
/// `YYYY-MM-DDTHH:MM:SS.mmmZ`. Times past the end of year 9999 print as its last millisecond.
pub(crate) fn rfc3339_ms(unix_ms: u64) -> String {
    let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000)
        .unwrap_or(PrimitiveDateTime::MAX.assume_utc());
    at.format(TIMESTAMP_FORMAT)
        .expect("a UTC date-time has every component of the format")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    const T0: u64 = 1_700_000_000_000;
    const HOUR: u64 = 3_600_000;

    /// Runs `sim` from `start` to `end` in `step_ms` steps; returns (advance time, event) pairs.
    fn run(
        sim: &mut CallSimulator,
        start: u64,
        end: u64,
        step_ms: u64,
    ) -> Vec<(u64, SimulatedEvent)> {
        let mut all = Vec::new();
        let mut t = start;
        loop {
            all.extend(sim.advance(t).into_iter().map(|e| (t, e)));
            if t >= end {
                return all;
            }
            t = (t + step_ms).min(end);
        }
    }

    fn s<'a>(e: &'a SimulatedEvent, key: &str) -> &'a str {
        e.data[key].as_str().unwrap_or_default()
    }

    /// Per call id, the statuses seen on the board topic, with the time first seen.
    fn histories(events: &[(u64, SimulatedEvent)]) -> BTreeMap<String, (u64, Vec<String>)> {
        let mut map: BTreeMap<String, (u64, Vec<String>)> = BTreeMap::new();
        for (t, e) in events.iter().filter(|(_, e)| e.topic == "calls") {
            let entry = map
                .entry(s(e, "call_id").to_string())
                .or_insert((*t, Vec::new()));
            entry.1.push(s(e, "status").to_string());
        }
        map
    }

    fn allowed(from: &str, to: &str) -> bool {
        matches!(
            (from, to),
            ("queued", "ringing" | "ended")
                | ("ringing", "in-progress" | "ended")
                | ("in-progress", "forwarding" | "ended")
                | ("forwarding", "in-progress" | "ended")
        )
    }

    fn valid_topic(t: &str) -> bool {
        let b = t.as_bytes();
        !b.is_empty()
            && b.len() <= 128
            && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b":._-".contains(c))
    }

    fn is_timestamp(v: &str) -> bool {
        let b = v.as_bytes();
        b.len() == 24
            && b.iter().enumerate().all(|(i, c)| match i {
                4 | 7 => *c == b'-',
                10 => *c == b'T',
                13 | 16 => *c == b':',
                19 => *c == b'.',
                23 => *c == b'Z',
                _ => c.is_ascii_digit(),
            })
    }

    /// An hour with ample agents and one with too few: every call follows the allowed transitions, starts queued (inbound) or ringing (outbound), and ends with `ended`.
    #[test]
    fn statuses_follow_allowed_transitions_and_end() {
        for (rate, agents, seed) in [(30.0, 70, 1), (30.0, 3, 2), (5.0, 8, 3)] {
            let mut sim = CallSimulator::new(rate, agents, seed);
            let events = run(&mut sim, T0, T0 + HOUR, 1_000);
            let mut seeded = 0;
            for (id, (first_seen, statuses)) in histories(&events) {
                for pair in statuses.windows(2) {
                    assert!(allowed(&pair[0], &pair[1]), "{id}: {statuses:?}");
                }
                if first_seen == T0 {
                    seeded += 1;
                    assert_ne!(statuses[0], "ended", "{id}");
                } else {
                    assert!(
                        matches!(statuses[0].as_str(), "queued" | "ringing"),
                        "{id}: {statuses:?}"
                    );
                }
                let ends = statuses.iter().filter(|s| *s == "ended").count();
                assert!(ends <= 1, "{id}: {statuses:?}");
                if first_seen + 20 * 60_000 < T0 + HOUR {
                    assert_eq!(
                        statuses.last().map(String::as_str),
                        Some("ended"),
                        "{id}: {statuses:?}"
                    );
                }
            }
            assert_eq!(seeded, SEED_CALLS);
        }
    }

    /// Every status event is published twice, on `calls` and on `call:<id>`, with identical data and event `call.status`, on valid topics.
    #[test]
    fn each_status_on_both_topics_with_equal_data() {
        let mut sim = CallSimulator::new(20.0, 10, 4);
        let events: Vec<SimulatedEvent> = run(&mut sim, T0, T0 + HOUR / 2, 700)
            .into_iter()
            .map(|(_, e)| e)
            .collect();
        assert!(events.len() > 100);
        assert_eq!(events.len() % 2, 0);
        for pair in events.chunks(2) {
            let (board, detail) = (&pair[0], &pair[1]);
            assert_eq!(board.topic, "calls");
            assert_eq!(detail.topic, format!("call:{}", s(board, "call_id")));
            assert_eq!(board.data, detail.data);
            assert!(
                valid_topic(&board.topic) && valid_topic(&detail.topic),
                "{}",
                detail.topic
            );
            assert_eq!(board.event, "call.status");
            assert_eq!(detail.event, "call.status");
        }
    }

    /// Every event carries exactly the SPEC keys, with nulls exactly where values are not yet known and well-formed ids, numbers and timestamps.
    #[test]
    fn all_keys_present_with_nulls_where_unknown() {
        let keys: BTreeSet<&str> = [
            "call_id",
            "status",
            "direction",
            "from",
            "to",
            "agent_id",
            "started_at",
            "ended_at",
            "ended_reason",
        ]
        .into_iter()
        .collect();
        let mut sim = CallSimulator::new(30.0, 5, 5);
        for (_, e) in run(&mut sim, T0, T0 + HOUR, 1_000) {
            let obj = e.data.as_object().expect("data is an object");
            assert_eq!(
                obj.keys().map(String::as_str).collect::<BTreeSet<_>>(),
                keys
            );
            let status = s(&e, "status");
            let id = s(&e, "call_id");
            assert!(id.len() == 10 && id.starts_with("c-"), "{id}");
            assert!(
                id[2..]
                    .bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)),
                "{id}"
            );
            assert!(matches!(s(&e, "direction"), "inbound" | "outbound"));
            for k in ["from", "to"] {
                let n = s(&e, k);
                assert!(
                    n.starts_with("+1555")
                        && n.len() == 12
                        && n[1..].bytes().all(|c| c.is_ascii_digit()),
                    "{n}"
                );
            }
            assert!(is_timestamp(s(&e, "started_at")));
            match status {
                "queued" => assert!(e.data["agent_id"].is_null()),
                "ringing" | "in-progress" | "forwarding" => {
                    assert!(s(&e, "agent_id").starts_with("agent-"))
                }
                "ended" => {}
                other => panic!("unknown status {other}"),
            }
            if status == "ended" {
                assert!(is_timestamp(s(&e, "ended_at")));
                assert!(s(&e, "ended_at") >= s(&e, "started_at"));
                assert!(matches!(
                    s(&e, "ended_reason"),
                    "customer-hangup"
                        | "no-answer"
                        | "busy"
                        | "customer-ended-call"
                        | "agent-ended-call"
                ));
            } else {
                assert!(e.data["ended_at"].is_null() && e.data["ended_reason"].is_null());
            }
        }
    }

    /// Two simulators with the same seed and the same advance calls produce identical events; another seed differs.
    #[test]
    fn deterministic_for_a_seed() {
        let go = |seed| {
            let mut sim = CallSimulator::new(12.0, 6, seed);
            let mut events = run(&mut sim, T0, T0 + 10 * 60_000, 333);
            events.extend(run(&mut sim, T0 + 3 * HOUR, T0 + 3 * HOUR + 60_000, 1_000));
            events
        };
        assert_eq!(go(42), go(42));
        assert_ne!(go(42), go(43));
    }

    /// Over a simulated hour at 30 calls/minute about 1800 new calls start, ~70% inbound, and every status and end reason occurs.
    #[test]
    fn rate_roughly_honoured_over_an_hour() {
        let mut sim = CallSimulator::new(30.0, 70, 6);
        let events = run(&mut sim, T0, T0 + HOUR, 1_000);
        let new_calls: Vec<&SimulatedEvent> = events
            .iter()
            .filter(|(t, e)| {
                *t > T0 && e.topic == "calls" && matches!(s(e, "status"), "queued" | "ringing")
            })
            .map(|(_, e)| e)
            .filter(|e| s(e, "status") == "queued" || s(e, "direction") == "outbound")
            .collect();
        let ids: BTreeSet<&str> = new_calls.iter().map(|e| s(e, "call_id")).collect();
        assert!(
            (1400..=2200).contains(&ids.len()),
            "{} new calls",
            ids.len()
        );
        let inbound = new_calls
            .iter()
            .filter(|e| s(e, "direction") == "inbound")
            .count();
        let share = inbound as f64 / new_calls.len() as f64;
        assert!((0.6..=0.8).contains(&share), "inbound share {share}");
        let seen: BTreeSet<&str> = events
            .iter()
            .flat_map(|(_, e)| [s(e, "status"), s(e, "ended_reason")])
            .collect();
        for want in [
            "queued",
            "ringing",
            "in-progress",
            "forwarding",
            "ended",
            "customer-hangup",
            "no-answer",
            "busy",
            "customer-ended-call",
            "agent-ended-call",
        ] {
            assert!(seen.contains(want), "never saw {want}");
        }
    }

    /// With a small, overloaded pool no agent is ever on two live calls at once, agents come from the pool, and active_calls() matches the board.
    #[test]
    fn no_agent_on_two_calls_at_once() {
        for (rate, agents, seed) in [(30.0, 3, 7), (8.0, 10, 8), (2.0, 1, 9)] {
            let mut sim = CallSimulator::new(rate, agents, seed);
            let pool: BTreeSet<String> = (0..agents).map(agent_id).collect();
            let mut live: BTreeMap<String, (String, Option<String>)> = BTreeMap::new();
            let mut t = T0;
            while t <= T0 + HOUR {
                for e in sim.advance(t).iter().filter(|e| e.topic == "calls") {
                    let id = s(e, "call_id").to_string();
                    if s(e, "status") == "ended" {
                        live.remove(&id);
                    } else {
                        let agent = e.data["agent_id"].as_str().map(str::to_string);
                        live.insert(id, (s(e, "status").to_string(), agent));
                    }
                    let with_agent: Vec<&String> =
                        live.values().filter_map(|(_, a)| a.as_ref()).collect();
                    let distinct: BTreeSet<&String> = with_agent.iter().copied().collect();
                    assert_eq!(
                        with_agent.len(),
                        distinct.len(),
                        "agent double-booked: {live:?}"
                    );
                    assert!(with_agent.iter().all(|a| pool.contains(*a)));
                    assert!(with_agent.len() <= agents);
                }
                assert_eq!(sim.active_calls(), live.len());
                t += 1_000;
            }
        }
    }

    /// After a ten-hour jump only the last 60 s are simulated: few events, all end times inside that minute; time going backwards emits nothing.
    #[test]
    fn large_time_jump_is_capped() {
        let mut sim = CallSimulator::new(60.0, 100, 10);
        sim.advance(T0);
        sim.advance(T0 + 1_000);
        let now = T0 + 10 * HOUR;
        let events = sim.advance(now);
        let new_ids: BTreeSet<&str> = events
            .iter()
            .filter(|e| {
                matches!(s(e, "status"), "queued")
                    || (s(e, "status") == "ringing" && s(e, "direction") == "outbound")
            })
            .map(|e| s(e, "call_id"))
            .collect();
        assert!(
            new_ids.len() <= 150,
            "{} new calls in the catch-up",
            new_ids.len()
        );
        assert!(events.len() <= 2_000, "{} events", events.len());
        let floor = rfc3339_ms(now - MAX_CATCH_UP_MS);
        for e in events.iter().filter(|e| s(e, "status") == "ended") {
            assert!(s(e, "ended_at") >= floor.as_str(), "{}", s(e, "ended_at"));
        }
        assert!(sim.advance(now - 5_000).is_empty());
        assert!(sim.advance(now).is_empty());
    }

    /// Timestamps are `YYYY-MM-DDTHH:MM:SS.mmmZ` and correct at known instants, leap days and year ends included.
    #[test]
    fn timestamps_are_rfc3339_millis() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_ms(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
        assert_eq!(rfc3339_ms(1_709_251_199_001), "2024-02-29T23:59:59.001Z");
        assert!(is_timestamp(&rfc3339_ms(T0)));
        assert_eq!(rfc3339_ms(253_402_300_799_999), "9999-12-31T23:59:59.999Z");
        assert_eq!(rfc3339_ms(u64::MAX), "9999-12-31T23:59:59.999Z");
    }

    /// The first advance already shows a handful of calls in several states; with no agents, or a zero rate, nothing panics.
    #[test]
    fn first_advance_seeds_a_live_board() {
        let mut sim = CallSimulator::new(10.0, 20, 11);
        let events = sim.advance(T0);
        assert_eq!(events.len(), 2 * SEED_CALLS);
        assert_eq!(sim.active_calls(), SEED_CALLS);
        let statuses: BTreeSet<&str> = events.iter().map(|e| s(e, "status")).collect();
        assert!(statuses.len() >= 3, "{statuses:?}");
        assert!(!statuses.contains("ended"));

        let mut lonely = CallSimulator::new(10.0, 0, 12);
        let events = run(&mut lonely, T0, T0 + HOUR / 4, 1_000);
        assert_eq!(
            events.iter().filter(|(t, _)| *t == T0).count(),
            2 * SEED_CALLS
        );
        assert!(events.iter().all(|(_, e)| e.data["agent_id"].is_null()));

        let mut idle = CallSimulator::new(0.0, 5, 13);
        assert!(run(&mut idle, T0, T0 + HOUR, 10_000).is_empty());
        let mut nan = CallSimulator::new(f64::NAN, 5, 13);
        assert!(run(&mut nan, T0, T0 + 60_000, 1_000).is_empty());
    }
}

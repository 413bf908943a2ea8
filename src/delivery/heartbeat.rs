//! The WebSocket heartbeat (SPEC section 6): one timer per worker thread sweeps that
//! worker's sockets every `heartbeat.interval_ms`, pings each, and has the session of any
//! socket silent for more than `heartbeat.timeout_ms` closed (4408). A socket is closed at the
//! first sweep after its timeout, so between `timeout` and `timeout + interval` after it was
//! last heard, as with a timer per socket; its first ping comes at the worker's next sweep,
//! within one interval of its welcome. One timer per worker rather than one per socket keeps
//! an idle socket's memory down (a per-socket interval cost ~130 bytes of actor state and
//! timer entry each), and the sweep gives back the frame queue of every socket that has
//! nothing pending (see [`Socket::release_idle`]).

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::time::Duration;

use crate::core::close::Close;
use crate::core::metrics::metrics;
use crate::delivery::registry::Control;
use crate::delivery::writer::Socket;

thread_local! {
    /// This worker's sweeps, one per (interval, timeout): tests run hubs of several settings
    /// in one process.
    static SWEEPS: RefCell<Vec<Rc<Sweep>>> = const { RefCell::new(Vec::new()) };
}

/// One worker's sockets under one heartbeat setting.
struct Sweep {
    interval: Duration,
    timeout: Duration,
    slots: RefCell<Slots>,
}

/// The sockets, by slot; a session gives its slot back when it ends.
#[derive(Default)]
struct Slots {
    sockets: Vec<Option<Weak<Socket>>>,
    free: Vec<usize>,
}

/// A socket's place in its worker's sweep: dropping it takes the socket out.
pub(crate) struct Beat {
    sweep: Rc<Sweep>,
    slot: usize,
}

impl Drop for Beat {
    fn drop(&mut self) {
        let mut slots = self.sweep.slots.borrow_mut();
        slots.sockets[self.slot] = None;
        slots.free.push(self.slot);
    }
}

/// Put `socket` under this worker's heartbeat. Must run on the socket's worker thread,
/// inside its runtime (the sweep is spawned there on first use).
pub(crate) fn enlist(socket: &Rc<Socket>, interval: Duration, timeout: Duration) -> Beat {
    let sweep = SWEEPS.with(|sweeps| {
        let mut sweeps = sweeps.borrow_mut();
        if let Some(sweep) = sweeps
            .iter()
            .find(|s| s.interval == interval && s.timeout == timeout)
        {
            return sweep.clone();
        }
        let sweep = Rc::new(Sweep {
            interval,
            timeout,
            slots: RefCell::default(),
        });
        sweeps.push(sweep.clone());
        actix::spawn(run(sweep.clone()));
        sweep
    });
    let slot = {
        let mut slots = sweep.slots.borrow_mut();
        let weak = Some(Rc::downgrade(socket));
        match slots.free.pop() {
            Some(slot) => {
                slots.sockets[slot] = weak;
                slot
            }
            None => {
                slots.sockets.push(weak);
                slots.sockets.len() - 1
            }
        }
    };
    Beat { sweep, slot }
}

/// Sweep every interval until the worker has no socket under this setting left.
async fn run(sweep: Rc<Sweep>) {
    let mut ticks =
        tokio::time::interval_at(tokio::time::Instant::now() + sweep.interval, sweep.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if !sweep.beat() {
            break;
        }
    }
    SWEEPS.with(|sweeps| sweeps.borrow_mut().retain(|s| !Rc::ptr_eq(s, &sweep)));
}

impl Sweep {
    /// Ping the live sockets, close the silent ones. False when no socket is left (the
    /// sweep ends; the next socket starts a new one).
    fn beat(&self) -> bool {
        let mut slots = self.slots.borrow_mut();
        if slots.free.len() == slots.sockets.len() {
            return false;
        }
        for socket in slots.sockets.iter().flatten() {
            let Some(socket) = socket.upgrade() else {
                continue;
            };
            let silent = socket.last_heard().elapsed();
            if silent <= self.timeout {
                socket.ping();
                socket.release_idle();
                continue;
            }
            let shared = socket.shared().borrow();
            if shared.closing {
                continue;
            }
            let Some(link) = &shared.link else {
                continue;
            };
            metrics().heartbeat_timeouts.inc();
            log::info!(
                "closing silent socket {}: nothing heard for {silent:?}",
                link.conn
            );
            link.control
                .do_send(Control::Close(Close::HeartbeatTimeout));
        }
        // Sockets gone since the last sweep leave their slots at the end free: trim them.
        while slots.sockets.last().is_some_and(Option::is_none) {
            slots.sockets.pop();
        }
        let len = slots.sockets.len();
        slots.free.retain(|&slot| slot < len);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SlowConsumerPolicy;
    use crate::delivery::test_support::{link, socket_pair, Buffers, Got};

    const INTERVAL: Duration = Duration::from_millis(50);
    const TIMEOUT: Duration = Duration::from_millis(150);
    const PING: &[u8] = &[0x89, 0x00];

    /// Every sweep pings the socket; one silent past the timeout has its session told to
    /// close 4408 (counted once), no earlier than the timeout and within an interval after it.
    #[actix_web::test]
    async fn sweep_pings_then_closes_the_silent() {
        let (socket, mut peer) = socket_pair(Buffers::Default).await;
        let (link, mut mailbox) = link(16, SlowConsumerPolicy::Close, false);
        socket.shared().borrow_mut().link = Some(link);
        socket.heard();
        let started = std::time::Instant::now();
        let _beat = enlist(&socket, INTERVAL, TIMEOUT);
        peer.expect(PING).await;
        peer.expect(PING).await;
        match tokio::time::timeout(Duration::from_secs(5), mailbox.recv()).await {
            Ok(Some(Got::Control(Control::Close(Close::HeartbeatTimeout)))) => {}
            other => panic!("expected the heartbeat close, got {other:?}"),
        }
        let elapsed = started.elapsed();
        assert!(
            elapsed > TIMEOUT,
            "closed after {elapsed:?}, before {TIMEOUT:?}"
        );
        assert!(
            // Within an interval of the timeout on a quiet machine; the margin is for a busy one.
            elapsed < TIMEOUT + Duration::from_secs(1),
            "closed only after {elapsed:?}"
        );
    }

    /// A socket heard from within every timeout is pinged and never closed; once its session
    /// ends (the beat dropped) the sweep lets it go.
    #[actix_web::test]
    async fn heard_socket_stays_and_leaves_with_its_session() {
        let (socket, mut peer) = socket_pair(Buffers::Default).await;
        let (link, mut mailbox) = link(16, SlowConsumerPolicy::Close, false);
        socket.shared().borrow_mut().link = Some(link);
        let beat = enlist(&socket, INTERVAL, TIMEOUT);
        for _ in 0..8 {
            peer.expect(PING).await;
            socket.heard();
        }
        assert!(mailbox.try_recv().is_err(), "a heard socket was closed");
        let sweep = beat.sweep.clone();
        drop(beat);
        let slots = sweep.slots.borrow();
        assert!(slots.sockets.iter().all(Option::is_none));
    }
}

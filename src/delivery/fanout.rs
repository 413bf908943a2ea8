//! Fan-out on each worker thread. Every socket lives on one worker (its task, its actor and
//! its write half never leave that thread), so each worker keeps its own table of which of
//! its sockets want which channel, and the broker hands an event once to each worker that
//! has subscribers of its channel, not once to each socket. The worker then walks the
//! channel's local sockets in one pass: an idle WebSocket takes the frame straight into its
//! [`Socket`] and is written at the end of the pass (all of its frames of the pass in one
//! write); a busy one, or an SSE stream, gets it through its bounded [`Outbox`] and a wake-up,
//! as before. Both worker threads share a topic's work, and a delivery to an idle socket is
//! a `send()` with no task wake-up, no lock shared with another thread and no mailbox.
//!
//! [`Outbox`]: crate::delivery::outbox::Outbox

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::core::close::Close;
use crate::core::event::{Event, Payload};
use crate::core::ids::{ChannelKey, ConnId};
use crate::core::metrics::metrics;
use crate::delivery::outbox::Pushed;
use crate::delivery::registry::{Control, SessionLink};
use crate::delivery::writer::{Offer, Socket};

/// Events taken from the worker's queue per pass at most: a burst is written with one write
/// per socket per pass (up to this many frames in it).
const MAX_PASS: usize = 32;
/// Offers, or socket writes, between two yields to the worker's other tasks: a pass over a
/// big topic takes milliseconds, and publishes, handshakes and heartbeats on this worker
/// must not wait for all of it.
const SLICE: usize = 256;

/// One local subscriber of a channel.
#[derive(Clone)]
pub(crate) struct Subscriber {
    pub(crate) link: Arc<SessionLink>,
    pub(crate) binary: bool,
    /// The WebSocket's output, for direct writes; `None` for SSE streams.
    pub(crate) socket: Option<Rc<Socket>>,
}

/// This worker's share of the node's subscriptions.
pub(crate) struct WorkerFanout {
    /// The worker's index in the registry's list of worker queues.
    pub(crate) index: usize,
    /// A pass holds a channel's list while it yields; a change meanwhile copies the list, so
    /// the pass walks the subscribers as they were when the event came.
    channels: RefCell<HashMap<ChannelKey, Rc<Vec<Subscriber>>>>,
}

thread_local! {
    /// The fan-outs of this thread, by registry (one in the server; tests may build more).
    static WORKERS: RefCell<Vec<(usize, Rc<WorkerFanout>)>> = const { RefCell::new(Vec::new()) };
}

/// This thread's fan-out for registry `registry`, if it has one.
pub(crate) fn existing(registry: usize) -> Option<Rc<WorkerFanout>> {
    WORKERS.with_borrow(|workers| {
        workers
            .iter()
            .find(|(id, _)| *id == registry)
            .map(|(_, w)| w.clone())
    })
}

/// This thread's fan-out for registry `registry`, started on first use: `enlist` records the
/// worker's queue with the registry and answers its index. Must run on a worker thread (it
/// spawns the task that drains the queue there).
pub(crate) fn current(
    registry: usize,
    enlist: impl FnOnce(UnboundedSender<Arc<Event>>) -> usize,
) -> Rc<WorkerFanout> {
    if let Some(worker) = existing(registry) {
        return worker;
    }
    let (queue, events) = unbounded_channel();
    let worker = Rc::new(WorkerFanout {
        index: enlist(queue),
        channels: RefCell::default(),
    });
    WORKERS.with_borrow_mut(|workers| workers.push((registry, worker.clone())));
    tokio::task::spawn_local(run(events, worker.clone()));
    worker
}

async fn run(mut events: UnboundedReceiver<Arc<Event>>, worker: Rc<WorkerFanout>) {
    let mut pass = Vec::with_capacity(MAX_PASS);
    let mut flush = Vec::new();
    while events.recv_many(&mut pass, MAX_PASS).await > 0 {
        worker.fan_out(&pass, &mut flush).await;
        pass.clear();
    }
}

impl WorkerFanout {
    /// Add (or replace) a subscriber; true when `conn` was not subscribed here before.
    pub(crate) fn add(&self, channel: &ChannelKey, subscriber: Subscriber) -> bool {
        let mut channels = self.channels.borrow_mut();
        let subscribers = Rc::make_mut(channels.entry(channel.clone()).or_default());
        let conn = subscriber.link.conn;
        match subscribers.iter_mut().find(|s| s.link.conn == conn) {
            Some(existing) => {
                *existing = subscriber;
                false
            }
            None => {
                subscribers.push(subscriber);
                true
            }
        }
    }

    /// Remove a subscriber; true when it was subscribed here.
    pub(crate) fn remove(&self, channel: &ChannelKey, conn: ConnId) -> bool {
        let mut channels = self.channels.borrow_mut();
        let Some(subscribers) = channels.get_mut(channel) else {
            return false;
        };
        let Some(i) = subscribers.iter().position(|s| s.link.conn == conn) else {
            return false;
        };
        Rc::make_mut(subscribers).swap_remove(i);
        if subscribers.is_empty() {
            channels.remove(channel);
        }
        true
    }

    /// Deliver a pass of events to this worker's subscribers, in order per socket, then write
    /// every socket that took some (once each). Yields every [`SLICE`] offers or writes.
    async fn fan_out(&self, pass: &[Arc<Event>], flush: &mut Vec<Rc<Socket>>) {
        let latency = metrics().delivery_seconds.local();
        let mut written = 0u64;
        let mut since_yield = 0;
        let now = Instant::now();
        for event in pass {
            let Some(subscribers) = self.channels.borrow().get(&event.channel).cloned() else {
                continue;
            };
            let binary = matches!(event.payload, Payload::Binary(_));
            let waited = now.duration_since(event.received_at).as_secs_f64();
            for subscriber in subscribers.iter() {
                if binary && !subscriber.binary {
                    continue;
                }
                since_yield += 1;
                if since_yield == SLICE {
                    since_yield = 0;
                    tokio::task::yield_now().await;
                }
                let Some(socket) = &subscriber.socket else {
                    through_outbox(&subscriber.link, event);
                    continue;
                };
                match socket.offer(event) {
                    Offer::Taken { first } => {
                        if first {
                            flush.push(socket.clone());
                        }
                        written += 1;
                        latency.observe(waited);
                    }
                    Offer::Declined => {}
                    Offer::Busy => through_outbox(&subscriber.link, event),
                }
            }
        }
        metrics().messages_delivered.inc_by(written);
        latency.flush();
        for (i, socket) in flush.drain(..).enumerate() {
            if i > 0 && i % SLICE == 0 {
                tokio::task::yield_now().await;
            }
            socket.flush_offered();
        }
    }
}

/// Queue an event in a session's outbox and wake whoever drains it.
fn through_outbox(link: &SessionLink, event: &Arc<Event>) {
    match link.outbox.push(event) {
        Pushed::Queued | Pushed::Dropped => {}
        Pushed::Wake => link.wake(),
        Pushed::Overflow => {
            metrics().slow_consumer_disconnects.inc();
            link.control.do_send(Control::Close(Close::SlowConsumer));
        }
    }
}

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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use tokio::sync::mpsc::UnboundedReceiver;
    use tokio::task::spawn_local;

    use crate::config::SlowConsumerPolicy;
    use crate::core::close::Close;
    use crate::core::ids::ChannelKey;
    use crate::delivery::registry::{Control, Registry, SessionLink};
    use crate::delivery::test_support::{
        binary, channel, event, frames, link, session, socket_pair, Buffers, Got, Peer, FILL,
    };
    use crate::delivery::writer::{drive, Bounds};

    use super::*;

    /// One WebSocket of this worker: its link, the client's end, and its session's output
    /// (the writer runs while it is held).
    struct Client {
        link: Arc<SessionLink>,
        peer: Peer,
        mailbox: UnboundedReceiver<Got>,
        session: tokio::sync::mpsc::UnboundedSender<Bytes>,
    }

    /// A WebSocket subscribed to `channel` on `registry` (`binary` as it asked), its writer
    /// running, its welcome read; its outbox holds `queue` events under `policy`.
    async fn subscribed(
        registry: &Registry,
        channel: &ChannelKey,
        binary: bool,
        buffers: Buffers,
        queue: usize,
        policy: SlowConsumerPolicy,
    ) -> Client {
        let (socket, mut peer) = socket_pair(buffers).await;
        let (link, mailbox) = link(queue, policy, false);
        {
            let mut shared = socket.shared().borrow_mut();
            shared.link = Some(link.clone());
            shared.subscriptions.insert_live(channel.clone());
        }
        registry.subscribe(channel, &link, binary, Some(socket.clone()));
        let (session, frames_of_session) = session();
        spawn_local(drive(
            frames_of_session,
            socket,
            Bounds {
                stall_after: Duration::from_secs(3600),
                max_backlog: usize::MAX,
            },
        ));
        session.send(Bytes::from_static(b"welcome")).unwrap();
        peer.expect(b"welcome").await;
        Client {
            link,
            peer,
            mailbox,
            session,
        }
    }

    /// A JSON-only WebSocket with default buffers and a roomy outbox.
    async fn plain(registry: &Registry, channel: &ChannelKey) -> Client {
        let policy = SlowConsumerPolicy::Conflate;
        subscribed(registry, channel, false, Buffers::Default, 64, policy).await
    }

    /// Events delivered to the registry reach every socket subscribed to their channel on
    /// this worker, in order, and no other socket.
    #[actix_web::test]
    async fn events_reach_the_subscribed_sockets_in_order() {
        let registry = Registry::default();
        let (calls, queues) = (channel("calls"), channel("queues"));
        let mut first = plain(&registry, &calls).await;
        let mut second = plain(&registry, &calls).await;
        let mut elsewhere = plain(&registry, &queues).await;
        let events: Vec<_> = (1..=5).map(|n| event(&calls, n, None)).collect();
        for e in &events {
            registry.deliver(e);
        }
        let queued = event(&queues, 6, None);
        registry.deliver(&queued);
        let expected = frames(&events.iter().collect::<Vec<_>>());
        first.peer.expect(&expected).await;
        second.peer.expect(&expected).await;
        elsewhere.peer.expect(&queued.ws_frame).await;
    }

    /// Binary frames reach only the sockets that asked for them; JSON events reach all.
    #[actix_web::test]
    async fn binary_frames_reach_only_binary_subscribers() {
        let registry = Registry::default();
        let voice = channel("voice");
        let policy = SlowConsumerPolicy::Conflate;
        let mut listener = subscribed(&registry, &voice, true, Buffers::Default, 64, policy).await;
        let mut viewer = plain(&registry, &voice).await;
        let (audio, status) = (binary(&voice, 1), event(&voice, 2, None));
        registry.deliver(&audio);
        registry.deliver(&status);
        listener.peer.expect(&frames(&[&audio, &status])).await;
        viewer.peer.expect(&status.ws_frame).await;
    }

    /// A socket that left the channel gets none of its later events.
    #[actix_web::test]
    async fn an_unsubscribed_socket_gets_nothing_more() {
        let registry = Registry::default();
        let calls = channel("calls");
        let mut leaving = plain(&registry, &calls).await;
        let mut staying = plain(&registry, &calls).await;
        assert!(!registry.unsubscribe(&calls, leaving.link.conn));
        let after = event(&calls, 1, None);
        registry.deliver(&after);
        // The pass that wrote `staying` has written every socket it offered the event to.
        staying.peer.expect(&after.ws_frame).await;
        drop(leaving.session);
        assert!(leaving.peer.read_to_end().await.is_empty());
    }

    /// An SSE stream (no socket to write) gets events through its outbox, woken by a Flush.
    #[actix_web::test]
    async fn an_sse_stream_gets_events_through_its_outbox() {
        let registry = Registry::default();
        let calls = channel("calls");
        let (link, mut mailbox) = link(64, SlowConsumerPolicy::Conflate, true);
        registry.subscribe(&calls, &link, false, None);
        let (a, b) = (event(&calls, 1, None), event(&calls, 2, None));
        registry.deliver(&a);
        registry.deliver(&b);
        assert!(matches!(mailbox.recv().await, Some(Got::Flush)));
        let mut queued = Vec::new();
        link.outbox.drain_into(&mut queued);
        assert_eq!(
            queued.iter().map(|e| e.id).collect::<Vec<_>>(),
            [a.id, b.id]
        );
    }

    /// The client stops reading: events wait in the outbox, behind what the socket has not
    /// taken, and conflate to the newest state per call; once the client reads, they follow.
    #[actix_web::test]
    async fn a_blocked_socket_conflates_to_the_newest_state_per_call() {
        let registry = Registry::default();
        let calls = channel("calls");
        let policy = SlowConsumerPolicy::Conflate;
        let mut slow = subscribed(&registry, &calls, false, Buffers::Small, 2, policy).await;
        let big = Bytes::from(vec![7u8; FILL]);
        slow.session.send(big.clone()).unwrap();
        let events = [
            event(&calls, 1, Some("a")),
            event(&calls, 2, Some("a")),
            event(&calls, 3, Some("a")),
            event(&calls, 4, Some("b")),
        ];
        for e in &events {
            registry.deliver(e);
        }
        passed(&registry).await;
        slow.peer.expect(&big).await;
        slow.peer.expect(&frames(&[&events[2], &events[3]])).await;
    }

    /// Under `slow_consumer = close`, a blocked socket whose outbox overflows is told to
    /// close as a slow consumer.
    #[actix_web::test]
    async fn a_slow_consumer_is_closed_when_its_outbox_overflows() {
        let registry = Registry::default();
        let calls = channel("calls");
        let policy = SlowConsumerPolicy::Close;
        let mut slow = subscribed(&registry, &calls, false, Buffers::Small, 2, policy).await;
        slow.session.send(Bytes::from(vec![7u8; FILL])).unwrap();
        for n in 1..=3 {
            registry.deliver(&event(&calls, n, None));
        }
        assert!(matches!(
            slow.mailbox.recv().await,
            Some(Got::Control(Control::Close(Close::SlowConsumer)))
        ));
    }

    /// Wait until this worker's fan-out has passed every event delivered so far: it takes
    /// events in order, so a marker event reaching an SSE subscriber comes after them.
    async fn passed(registry: &Registry) {
        let marker = channel("marker");
        let (link, mut mailbox) = link(4, SlowConsumerPolicy::Conflate, true);
        registry.subscribe(&marker, &link, false, None);
        registry.deliver(&event(&marker, 0, None));
        assert!(matches!(mailbox.recv().await, Some(Got::Flush)));
    }
}

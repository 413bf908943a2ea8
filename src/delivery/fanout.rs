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
//! A worker's queue is bounded ([`MAX_QUEUED`] events, [`MAX_QUEUED_BYTES`] of frames): a
//! worker thread that falls that far behind must not grow the hub without bound. An event
//! that does not fit is not dropped silently: the worker is told, in order, after the
//! channel's events it did queue, and asks its subscribers of that channel to reconnect and
//! resume with `since` (the drain's `reconnect` and 1012, spread over
//! `shutdown.reconnect_spread_ms`), so each one resumes from the last event it received; until
//! the worker has told them, the channel's later events skip that worker, so nobody receives
//! an event from after the gap. Both are counted (`switchboard_fanout_lagged_total`,
//! `switchboard_fanout_resyncs_total`). A socket that is slow itself never causes this: its
//! own outbox takes its backlog (conflation or the slow-consumer close).
//!
//! [`Outbox`]: crate::delivery::outbox::Outbox

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use rand::Rng;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::core::close::Close;
use crate::core::event::{Event, Payload};
use crate::core::ids::{ChannelKey, ConnId};
use crate::core::metrics::metrics;
use crate::delivery::outbox::Pushed;
use crate::delivery::registry::{Control, SessionLink};
use crate::delivery::writer::{Offer, Socket, WorkerEvent};

/// Events taken from the worker's queue per pass at most: a burst is written with one write
/// per socket per pass (up to this many frames in it).
const MAX_PASS: usize = 32;
/// Events a worker's queue holds at most. A worker keeping up has a pass or two waiting
/// ([`MAX_PASS`] events each); this takes a burst of thousands of events published at once,
/// and what a clustered pod delivers at once when it catches a channel up after a Redis
/// outage (up to 10,000 held live events after the replay of the default 1,000 kept).
pub(crate) const MAX_QUEUED: usize = 16_384;
/// Bytes of frames a worker's queue holds at most (large events reach this before the count).
pub(crate) const MAX_QUEUED_BYTES: usize = 64 << 20;

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
    /// Asked to reconnect because this worker missed events of the channel: it gets none
    /// of the channel's later events (they would come after the gap it resumes from).
    pub(crate) cut: bool,
}

/// What a worker's queue carries.
pub(crate) enum Work {
    Event(Arc<Event>),
    /// The queue had no room for an event of this channel: ask its subscribers to resync.
    Missed(ChannelKey),
}

/// The way into one worker's fan-out, from any thread: bounded by what it holds.
pub(crate) struct WorkerQueue {
    sender: UnboundedSender<Work>,
    max_events: usize,
    /// Events and frame bytes queued and not yet taken by the worker.
    queued: AtomicUsize,
    queued_bytes: AtomicUsize,
    /// Channels whose events this worker missed and whose subscribers it has not told yet;
    /// their events skip the worker until then. `missing` counts them, so a queue with none
    /// (the usual case) costs no lock per event.
    missed: Mutex<HashSet<ChannelKey>>,
    missing: AtomicUsize,
}

impl WorkerQueue {
    fn new(sender: UnboundedSender<Work>, max_events: usize) -> Self {
        Self {
            sender,
            max_events,
            queued: AtomicUsize::new(0),
            queued_bytes: AtomicUsize::new(0),
            missed: Mutex::default(),
            missing: AtomicUsize::new(0),
        }
    }

    /// Queue an event for this worker, or tell the worker it missed its channel. One
    /// channel's events come from one thread at a time (the broker numbers them under the
    /// channel's lock), so a channel's marker always follows its queued events.
    pub(crate) fn push(&self, event: &Arc<Event>) {
        if self.missing.load(Ordering::Acquire) > 0 && self.missed.lock().contains(&event.channel) {
            metrics().fanout_lagged.inc();
            return;
        }
        let bytes = event.ws_frame.len();
        let events = self.queued.fetch_add(1, Ordering::AcqRel);
        let held = self.queued_bytes.fetch_add(bytes, Ordering::AcqRel);
        if events >= self.max_events || (events > 0 && held + bytes > MAX_QUEUED_BYTES) {
            self.taken(1, bytes);
            metrics().fanout_lagged.inc();
            let mut missed = self.missed.lock();
            if missed.insert(event.channel.clone()) {
                self.missing.fetch_add(1, Ordering::AcqRel);
                // A worker's queue closes only when its thread ends, at shutdown.
                let _ = self.sender.send(Work::Missed(event.channel.clone()));
            }
            return;
        }
        let _ = self.sender.send(Work::Event(event.clone()));
    }

    /// The worker took `events` events of `bytes` bytes off the queue.
    fn taken(&self, events: usize, bytes: usize) {
        self.queued.fetch_sub(events, Ordering::AcqRel);
        self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// The worker told the channel's subscribers; its later events may come again.
    fn told(&self, channel: &ChannelKey) {
        if self.missed.lock().remove(channel) {
            self.missing.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// This worker's share of the node's subscriptions.
pub(crate) struct WorkerFanout {
    /// The worker's index in the registry's list of worker queues.
    pub(crate) index: usize,
    queue: Arc<WorkerQueue>,
    /// Reconnects asked of a channel's subscribers are spread over this many ms.
    resync_spread_ms: u64,
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

/// How a registry's workers are bounded and how they ask for resyncs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WorkerBounds {
    /// Events a worker's queue holds at most ([`MAX_QUEUED`]).
    pub(crate) max_queued: usize,
    /// `shutdown.reconnect_spread_ms`.
    pub(crate) resync_spread_ms: u64,
}

/// This thread's fan-out for registry `registry`, started on first use: `enlist` records the
/// worker's queue with the registry and answers its index. Must run on a worker thread (it
/// spawns the task that drains the queue there).
pub(crate) fn current(
    registry: usize,
    bounds: WorkerBounds,
    enlist: impl FnOnce(Arc<WorkerQueue>) -> usize,
) -> Rc<WorkerFanout> {
    if let Some(worker) = existing(registry) {
        return worker;
    }
    let (sender, work) = unbounded_channel();
    let queue = Arc::new(WorkerQueue::new(sender, bounds.max_queued));
    let worker = Rc::new(WorkerFanout {
        index: enlist(queue.clone()),
        queue,
        resync_spread_ms: bounds.resync_spread_ms,
        channels: RefCell::default(),
    });
    WORKERS.with_borrow_mut(|workers| workers.push((registry, worker.clone())));
    tokio::task::spawn_local(run(work, worker.clone()));
    worker
}

async fn run(mut work: UnboundedReceiver<Work>, worker: Rc<WorkerFanout>) {
    let mut pass = Vec::with_capacity(MAX_PASS);
    let mut flush = Vec::new();
    while work.recv_many(&mut pass, MAX_PASS).await > 0 {
        let (events, bytes) = pass.iter().fold((0, 0), |(n, b), work| match work {
            Work::Event(event) => (n + 1, b + event.ws_frame.len()),
            Work::Missed(_) => (n, b),
        });
        worker.queue.taken(events, bytes);
        worker.fan_out(&pass, &mut flush).await;
        pass.clear();
    }
}

impl WorkerFanout {
    /// Add a subscriber the caller knows is not subscribed to `channel` here yet (the
    /// registry's member map says so in O(1); a scan of this list per subscribe made a ramp
    /// of thousands of sockets on one channel quadratic).
    pub(crate) fn add_new(&self, channel: &ChannelKey, subscriber: Subscriber) {
        let mut channels = self.channels.borrow_mut();
        Rc::make_mut(channels.entry(channel.clone()).or_default()).push(subscriber);
    }

    /// Replace the subscription of a socket already subscribed to `channel` here (a second
    /// `subscribe`); false when it was not, and then nothing changes.
    pub(crate) fn replace(&self, channel: &ChannelKey, subscriber: Subscriber) -> bool {
        let mut channels = self.channels.borrow_mut();
        let Some(subscribers) = channels.get_mut(channel) else {
            return false;
        };
        let conn = subscriber.link.conn;
        let Some(i) = subscribers.iter().position(|s| s.link.conn == conn) else {
            return false;
        };
        let existing = &mut Rc::make_mut(subscribers)[i];
        // A socket already asked to resync stays cut off: it is on its way out.
        let cut = existing.cut;
        *existing = subscriber;
        existing.cut |= cut;
        true
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

    /// Ask this worker's subscribers of `channel` to reconnect and resume: the worker missed
    /// some of its events. Returns how many.
    fn resync(&self, channel: &ChannelKey) -> usize {
        let mut channels = self.channels.borrow_mut();
        let mut told = 0;
        if let Some(subscribers) = channels.get_mut(channel) {
            let mut rng = rand::rng();
            for subscriber in Rc::make_mut(subscribers).iter_mut().filter(|s| !s.cut) {
                subscriber.cut = true;
                subscriber.link.control.do_send(Control::Drain {
                    after_ms: rng.random_range(0..=self.resync_spread_ms),
                });
                told += 1;
            }
        }
        self.queue.told(channel);
        told
    }

    /// Deliver a pass of events to this worker's subscribers, in order per socket: the only
    /// event of a pass is written to each socket as it is offered; several are appended, and
    /// each socket that took some is written once at the end. Yields every [`SLICE`] offers
    /// or writes.
    async fn fan_out(&self, pass: &[Work], flush: &mut Vec<Rc<Socket>>) {
        let latency = metrics().delivery_seconds.local();
        let mut written = 0u64;
        let mut since_yield = 0;
        let now = Instant::now();
        // One event (the usual pass below thousands of events a second) is written to each
        // socket as it is offered; several are gathered per socket and written at the end.
        let alone = pass.iter().filter(|w| matches!(w, Work::Event(_))).count() == 1;
        for work in pass {
            let event = match work {
                Work::Event(event) => event,
                Work::Missed(channel) => {
                    let told = self.resync(channel);
                    metrics().fanout_resyncs.inc_by(told as u64);
                    log::warn!(
                        "{channel}: a worker's fan-out queue was full ({} events or {} bytes); asked its {told} socket(s) of the channel to reconnect and resume",
                        self.queue.max_events,
                        MAX_QUEUED_BYTES
                    );
                    continue;
                }
            };
            let Some(subscribers) = self.channels.borrow().get(&event.channel).cloned() else {
                continue;
            };
            let binary = matches!(event.payload, Payload::Binary(_));
            let waited = now.duration_since(event.received_at).as_secs_f64();
            // This worker's sockets share one handle on the event (see `Socket::offer`).
            let local = WorkerEvent::new(event);
            for subscriber in subscribers.iter() {
                if subscriber.cut || (binary && !subscriber.binary) {
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
                let offer = if alone {
                    socket.offer_alone(&local)
                } else {
                    socket.offer(&local)
                };
                match offer {
                    Offer::Taken { first: true } => flush.push(socket.clone()),
                    Offer::Taken { first: false } | Offer::Sent => {}
                    Offer::Declined => continue,
                    Offer::Busy => {
                        through_outbox(&subscriber.link, event);
                        continue;
                    }
                }
                written += 1;
                latency.observe(waited);
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
        socket: Rc<Socket>,
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
            socket.clone(),
            Bounds {
                stall_after: Duration::from_secs(3600),
                max_backlog: usize::MAX,
            },
        ));
        session.send(Bytes::from_static(b"welcome")).unwrap();
        peer.expect(b"welcome").await;
        Client {
            link,
            socket,
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

    /// A socket that subscribes again to a channel it has gets the channel's events as it
    /// last asked (here binary frames too), and counts once: one unsubscribe ends it.
    #[actix_web::test]
    async fn a_second_subscribe_replaces_the_first() {
        let registry = Registry::default();
        let voice = channel("voice");
        let mut client = plain(&registry, &voice).await;
        let again = registry.subscribe(&voice, &client.link, true, Some(client.socket.clone()));
        assert!(!again, "the channel had a subscriber on this node already");
        let (audio, status) = (binary(&voice, 1), event(&voice, 2, None));
        registry.deliver(&audio);
        registry.deliver(&status);
        client.peer.expect(&frames(&[&audio, &status])).await;
        assert!(
            registry.unsubscribe(&voice, client.link.conn),
            "one unsubscribe should leave the channel without subscribers"
        );
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

    /// A worker whose queue is full misses events: its sockets of that channel get every
    /// event it did queue, then are asked to reconnect and resume (counted), and get nothing
    /// from after the gap; a socket subscribing afterwards gets the later events.
    #[actix_web::test]
    async fn a_full_worker_queue_asks_its_sockets_to_resync() {
        let registry = Registry::with_bounds(WorkerBounds {
            max_queued: 4,
            resync_spread_ms: 0,
        });
        let calls = channel("calls");
        let mut reader = plain(&registry, &calls).await;
        let (lagged, resyncs) = (
            metrics().fanout_lagged.get(),
            metrics().fanout_resyncs.get(),
        );
        // Delivered without yielding: the worker takes none of them before the last.
        let events: Vec<_> = (1..=6).map(|n| event(&calls, n, None)).collect();
        for e in &events {
            registry.deliver(e);
        }
        reader
            .peer
            .expect(&frames(&events[..4].iter().collect::<Vec<_>>()))
            .await;
        assert!(matches!(
            reader.mailbox.recv().await,
            Some(Got::Control(Control::Drain { after_ms: 0 }))
        ));
        assert!(metrics().fanout_lagged.get() >= lagged + 2);
        assert!(metrics().fanout_resyncs.get() > resyncs);

        let mut newcomer = plain(&registry, &calls).await;
        let later = event(&calls, 7, None);
        registry.deliver(&later);
        newcomer.peer.expect(&later.ws_frame).await;
        drop(reader.session);
        assert!(reader.peer.read_to_end().await.is_empty());
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

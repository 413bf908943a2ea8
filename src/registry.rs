//! This node's live sessions: by connection (for logout, eviction and drain), and by channel
//! (for fan-out). Brokers call [`Registry::deliver`] with a shared, already-encoded
//! [`Event`]; the registry knows which worker threads have subscribers of its channel and
//! hands it once to each ([`crate::fanout`] walks that worker's sockets). A subscriber that
//! is not ready to write it at once gets it in its bounded [`Outbox`], woken at most once per
//! batch, and a socket that cannot keep up never grows the server's memory: its outbox
//! conflates or closes it (SPEC section 6).

use std::collections::{HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use bytes::Bytes;
use bytestring::ByteString;
use futures_util::task::AtomicWaker;
use parking_lot::{Mutex, RwLock};
use tokio::sync::mpsc::UnboundedSender;

use crate::close::Close;
use crate::config::SlowConsumerPolicy;
use crate::connection::Socket;
use crate::fanout::{self, Subscriber};
use crate::metrics::metrics;
use crate::protocol::{ChannelKey, ConnId, EventId};

/// One event, encoded once and shared by every socket that receives it.
#[derive(Debug)]
pub struct Event {
    pub channel: ChannelKey,
    pub id: EventId,
    /// The event name (`call.status`), for transports that label records (SSE).
    pub name: Box<str>,
    pub payload: Payload,
    /// The payload as one complete WebSocket frame (header included), written as it is to
    /// every socket that receives the event.
    pub ws_frame: Bytes,
    /// `data.call_id` when present: a slow consumer keeps only the newest event per key.
    pub conflation_key: Option<Box<str>>,
    /// When the broker received it, for `switchboard_delivery_seconds`.
    pub received_at: Instant,
}

#[derive(Debug, Clone)]
pub enum Payload {
    /// A complete `{"type":"event",...}` frame.
    Text(ByteString),
    /// Raw bytes for `binary:true` subscribers (browser-test audio).
    Binary(Bytes),
}

/// Wake a session: its outbox has frames. At most one is in flight per session.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Flush;

/// Orders to one session from outside (logout, eviction, slow consumer, drain).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub enum Control {
    /// Close now with this reason.
    Close(Close),
    /// Tell the client to come back after `after_ms`, then close with 1012.
    Drain { after_ms: u64 },
}

/// What the registry needs of a session: its outbox, how to wake whoever drains it, and the
/// session's control mailbox.
pub struct SessionLink {
    pub conn: ConnId,
    pub outbox: Outbox,
    /// `Some`: a `Flush` message wakes the drainer (an actor). `None`: the drainer polls the
    /// outbox itself and registered its task with [`Outbox::register`] (the WebSocket writer),
    /// so a delivery costs no mailbox message at all.
    pub flush: Option<Recipient<Flush>>,
    pub control: Recipient<Control>,
}

impl SessionLink {
    /// The outbox has frames and nobody was told yet.
    pub(crate) fn wake(&self) {
        match &self.flush {
            Some(flush) => flush.do_send(Flush),
            None => self.outbox.waker.wake(),
        }
    }
}

/// A session's queue of frames not yet handed to its socket.
pub struct Outbox {
    state: Mutex<OutboxState>,
    capacity: usize,
    policy: SlowConsumerPolicy,
    waker: AtomicWaker,
}

#[derive(Default)]
struct OutboxState {
    queue: VecDeque<Arc<Event>>,
    /// A `Flush` is on its way; no need to send another.
    wake_pending: bool,
    /// The slow-consumer close was ordered; drop everything after it.
    overflowed: bool,
}

/// What a push asks of the caller.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Queued; a wake-up is already pending.
    Queued,
    /// Queued; send the session a `Flush`.
    Wake,
    /// The session must be closed as a slow consumer (reported once).
    Overflow,
    /// Dropped silently: the session is already closing.
    Dropped,
}

impl Outbox {
    pub fn new(capacity: usize, policy: SlowConsumerPolicy) -> Self {
        Self {
            state: Mutex::new(OutboxState::default()),
            capacity,
            policy,
            waker: AtomicWaker::new(),
        }
    }

    /// Wake this task when frames arrive (for drainers without a `Flush` mailbox). Register
    /// before draining, so a push between the two is never missed.
    pub fn register(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }

    pub fn push(&self, event: &Arc<Event>) -> Pushed {
        let mut state = self.state.lock();
        if state.overflowed {
            return Pushed::Dropped;
        }
        state.queue.push_back(event.clone());
        if state.queue.len() > self.capacity {
            let fits = match self.policy {
                SlowConsumerPolicy::Close => false,
                SlowConsumerPolicy::Conflate => {
                    let dropped = conflate(&mut state.queue);
                    metrics().conflated.inc_by(dropped as u64);
                    state.queue.len() <= self.capacity
                }
            };
            if !fits {
                state.overflowed = true;
                state.queue.clear();
                return Pushed::Overflow;
            }
        }
        if state.wake_pending {
            Pushed::Queued
        } else {
            state.wake_pending = true;
            Pushed::Wake
        }
    }

    /// Move every queued frame into `into` and clear the wake-up flag.
    pub fn drain_into(&self, into: &mut Vec<Arc<Event>>) {
        let mut state = self.state.lock();
        state.wake_pending = false;
        into.extend(state.queue.drain(..));
    }

    pub fn len(&self) -> usize {
        self.state.lock().queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Keep only the newest event per (channel, call) — or per channel for events without a
/// call id — preserving the order of the survivors. Returns how many were dropped.
fn conflate(queue: &mut VecDeque<Arc<Event>>) -> usize {
    let before = queue.len();
    let mut seen: HashSet<(ChannelKey, Option<Box<str>>, bool)> = HashSet::new();
    let mut keep = vec![false; before];
    for (i, event) in queue.iter().enumerate().rev() {
        let binary = matches!(event.payload, Payload::Binary(_));
        // Binary audio frames are a stream, not a state: never conflate them into each other.
        if binary {
            keep[i] = true;
            continue;
        }
        let key = (event.channel.clone(), event.conflation_key.clone(), binary);
        keep[i] = seen.insert(key);
    }
    let mut index = 0;
    queue.retain(|_| {
        let k = keep[index];
        index += 1;
        k
    });
    before - queue.len()
}

struct SessionEntry {
    link: Arc<SessionLink>,
    /// `org/user`, for caps and logs.
    user_key: String,
    /// The connection-cap slot this socket holds.
    slot: String,
    /// The login session this socket belongs to (for logout).
    sid: String,
}

/// This node's sessions, by connection, and which workers have subscribers of each channel.
pub struct Registry {
    /// Tells this registry's worker fan-outs from another registry's (tests build several).
    id: usize,
    /// Per channel, how many subscribers each worker has (indexed like `workers`).
    channels: RwLock<HashMap<ChannelKey, Vec<u32>>>,
    /// Each worker's event queue, in the order the workers enlisted.
    workers: RwLock<Vec<UnboundedSender<Arc<Event>>>>,
    sessions: Mutex<HashMap<ConnId, SessionEntry>>,
}

impl Default for Registry {
    fn default() -> Self {
        static NEXT_ID: AtomicUsize = AtomicUsize::new(0);
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            channels: RwLock::default(),
            workers: RwLock::default(),
            sessions: Mutex::default(),
        }
    }
}

impl Registry {
    pub fn register(&self, link: Arc<SessionLink>, user_key: String, slot: String, sid: String) {
        self.sessions.lock().insert(
            link.conn,
            SessionEntry {
                link,
                user_key,
                slot,
                sid,
            },
        );
    }

    /// Forget a session and its subscriptions; returns the channels nobody here wants any more.
    /// Runs on the session's worker thread, like [`Self::subscribe`].
    pub fn unregister<'a>(
        &self,
        conn: ConnId,
        channels: impl Iterator<Item = &'a ChannelKey>,
    ) -> Vec<ChannelKey> {
        self.sessions.lock().remove(&conn);
        channels
            .filter(|channel| self.unsubscribe(channel, conn))
            .cloned()
            .collect()
    }

    /// Add a subscriber of this worker thread; true when this node had no subscriber of the
    /// channel before. `socket`: the WebSocket's output, which the fan-out may write directly.
    pub fn subscribe(
        &self,
        channel: &ChannelKey,
        link: &Arc<SessionLink>,
        binary: bool,
        socket: Option<Rc<Socket>>,
    ) -> bool {
        let worker = fanout::current(self.id, |queue| {
            let mut workers = self.workers.write();
            workers.push(queue);
            workers.len() - 1
        });
        let subscriber = Subscriber {
            link: link.clone(),
            binary,
            socket,
        };
        if !worker.add(channel, subscriber) {
            return false;
        }
        let mut map = self.channels.write();
        let counts = map.entry(channel.clone()).or_default();
        let first = counts.iter().all(|&n| n == 0);
        if counts.len() <= worker.index {
            counts.resize(worker.index + 1, 0);
        }
        counts[worker.index] += 1;
        first
    }

    /// Remove a subscriber of this worker thread; true when the channel has no subscriber
    /// left on this node.
    pub fn unsubscribe(&self, channel: &ChannelKey, conn: ConnId) -> bool {
        let Some(worker) = fanout::existing(self.id) else {
            return false;
        };
        if !worker.remove(channel, conn) {
            return false;
        }
        let mut map = self.channels.write();
        let Some(counts) = map.get_mut(channel) else {
            return false;
        };
        if let Some(n) = counts.get_mut(worker.index) {
            *n = n.saturating_sub(1);
        }
        if counts.iter().all(|&n| n == 0) {
            map.remove(channel);
            true
        } else {
            false
        }
    }

    /// Hand an event to every worker with a subscriber of its channel (callable from any
    /// thread); each worker delivers it to its own sockets.
    pub fn deliver(&self, event: &Arc<Event>) {
        let map = self.channels.read();
        let Some(counts) = map.get(&event.channel) else {
            return;
        };
        let workers = self.workers.read();
        for (queue, _) in workers.iter().zip(counts).filter(|(_, &n)| n > 0) {
            // A worker's queue closes only when its thread ends, at shutdown.
            let _ = queue.send(event.clone());
        }
    }

    /// Close every local socket of login session `sid`; returns how many.
    pub fn close_session(&self, sid: &str, close: Close) -> usize {
        let sessions = self.sessions.lock();
        let mut n = 0;
        for entry in sessions.values().filter(|e| e.sid == sid) {
            entry.link.control.do_send(Control::Close(close.clone()));
            n += 1;
        }
        n
    }

    /// Close one local connection by its display id; false when it is not here.
    pub fn close_conn(&self, conn: &str, close: Close) -> bool {
        let Some(conn) = ConnId::parse_local(conn) else {
            return false;
        };
        match self.sessions.lock().get(&conn) {
            Some(entry) => {
                entry.link.control.do_send(Control::Close(close));
                true
            }
            None => false,
        }
    }

    /// Every local session's control mailbox, for the drain.
    pub fn all_controls(&self) -> Vec<Recipient<Control>> {
        self.sessions
            .lock()
            .values()
            .map(|e| e.link.control.clone())
            .collect()
    }

    pub fn session_count(&self) -> usize {
        self.sessions.lock().len()
    }

    /// Channels with at least one local subscriber (resubscribed after a Redis reconnect).
    pub fn active_channels(&self) -> Vec<ChannelKey> {
        self.channels.read().keys().cloned().collect()
    }

    /// `org/user` keys of local sessions and their cap slots (lease refresh).
    pub fn cap_slots(&self) -> Vec<(String, String)> {
        self.sessions
            .lock()
            .values()
            .map(|e| (e.user_key.clone(), e.slot.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{OrgId, Topic};

    fn event(topic: &str, call: Option<&str>, seq: u64) -> Arc<Event> {
        let channel = ChannelKey::new(&OrgId::parse("1").unwrap(), &Topic::parse(topic).unwrap());
        Arc::new(Event {
            channel,
            id: EventId { ms: 1, seq },
            name: "test".into(),
            ws_frame: Bytes::new(),
            payload: Payload::Text(ByteString::from(format!("{seq}"))),
            conflation_key: call.map(Into::into),
            received_at: Instant::now(),
        })
    }

    fn drained(outbox: &Outbox) -> Vec<u64> {
        let mut out = Vec::new();
        outbox.drain_into(&mut out);
        out.iter().map(|e| e.id.seq).collect()
    }

    /// Only the first push of a batch asks for a wake-up.
    #[test]
    fn one_wake_per_batch() {
        let outbox = Outbox::new(10, SlowConsumerPolicy::Conflate);
        assert_eq!(outbox.push(&event("calls", None, 1)), Pushed::Wake);
        assert_eq!(outbox.push(&event("calls", None, 2)), Pushed::Queued);
        assert_eq!(drained(&outbox), vec![1, 2]);
        assert_eq!(outbox.push(&event("calls", None, 3)), Pushed::Wake);
    }

    /// A full queue keeps the newest state of every call, in order.
    #[test]
    fn conflation_keeps_latest_per_call() {
        let outbox = Outbox::new(3, SlowConsumerPolicy::Conflate);
        outbox.push(&event("calls", Some("a"), 1));
        outbox.push(&event("calls", Some("b"), 2));
        outbox.push(&event("calls", Some("a"), 3));
        assert_ne!(outbox.push(&event("calls", Some("b"), 4)), Pushed::Overflow);
        assert_eq!(drained(&outbox), vec![3, 4]);
    }

    /// When even the conflated queue is full, the consumer is closed once.
    #[test]
    fn overflow_when_conflation_cannot_help() {
        let outbox = Outbox::new(2, SlowConsumerPolicy::Conflate);
        outbox.push(&event("calls", Some("a"), 1));
        outbox.push(&event("calls", Some("b"), 2));
        assert_eq!(outbox.push(&event("calls", Some("c"), 3)), Pushed::Overflow);
        assert_eq!(outbox.push(&event("calls", Some("d"), 4)), Pushed::Dropped);
    }

    /// Policy `close` closes on the first event past capacity.
    #[test]
    fn close_policy() {
        let outbox = Outbox::new(1, SlowConsumerPolicy::Close);
        outbox.push(&event("calls", Some("a"), 1));
        assert_eq!(outbox.push(&event("calls", Some("a"), 2)), Pushed::Overflow);
    }

    /// Events without a call id conflate per topic.
    #[test]
    fn conflation_per_topic_without_call_id() {
        let mut q: VecDeque<_> = [
            event("a", None, 1),
            event("b", None, 2),
            event("a", None, 3),
        ]
        .into_iter()
        .collect();
        assert_eq!(conflate(&mut q), 1);
        assert_eq!(q.iter().map(|e| e.id.seq).collect::<Vec<_>>(), vec![2, 3]);
    }
}

//! This node's live sessions: by connection (for logout, eviction and drain), and by channel
//! (for fan-out). Fan-out pushes a shared, already-encoded [`Event`] into each subscriber's
//! bounded [`Outbox`] and wakes the session at most once per batch, so a burst of events costs
//! one mailbox message per socket, not one per event, and a socket that cannot keep up never
//! grows the server's memory: its outbox conflates or closes it (SPEC section 6). The session
//! actor drains its outbox into the WebSocket; brokers call [`Registry::deliver`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use bytes::Bytes;
use bytestring::ByteString;
use futures_util::task::AtomicWaker;
use parking_lot::{Mutex, RwLock};

use crate::close::Close;
use crate::config::SlowConsumerPolicy;
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
    fn wake(&self) {
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

struct Subscriber {
    link: Arc<SessionLink>,
    binary: bool,
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

/// This node's sessions, by channel and by connection.
#[derive(Default)]
pub struct Registry {
    channels: RwLock<HashMap<ChannelKey, HashMap<ConnId, Subscriber>>>,
    sessions: Mutex<HashMap<ConnId, SessionEntry>>,
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
    pub fn unregister<'a>(
        &self,
        conn: ConnId,
        channels: impl Iterator<Item = &'a ChannelKey>,
    ) -> Vec<ChannelKey> {
        self.sessions.lock().remove(&conn);
        let mut emptied = Vec::new();
        let mut map = self.channels.write();
        for channel in channels {
            if remove_subscriber(&mut map, channel, conn) {
                emptied.push(channel.clone());
            }
        }
        emptied
    }

    /// Add a subscriber; true when this node had no subscriber of the channel before.
    pub fn subscribe(&self, channel: &ChannelKey, link: &Arc<SessionLink>, binary: bool) -> bool {
        let mut map = self.channels.write();
        let subscribers = map.entry(channel.clone()).or_default();
        let first = subscribers.is_empty();
        subscribers.insert(
            link.conn,
            Subscriber {
                link: link.clone(),
                binary,
            },
        );
        first
    }

    /// Remove a subscriber; true when the channel has no subscriber left here.
    pub fn unsubscribe(&self, channel: &ChannelKey, conn: ConnId) -> bool {
        remove_subscriber(&mut self.channels.write(), channel, conn)
    }

    /// Hand an event to every local subscriber of its channel. Returns how many took it.
    pub fn deliver(&self, event: &Arc<Event>) -> usize {
        let map = self.channels.read();
        let Some(subscribers) = map.get(&event.channel) else {
            return 0;
        };
        let binary = matches!(event.payload, Payload::Binary(_));
        let mut delivered = 0;
        for subscriber in subscribers.values() {
            if binary && !subscriber.binary {
                continue;
            }
            let link = &subscriber.link;
            match link.outbox.push(event) {
                Pushed::Queued => delivered += 1,
                Pushed::Wake => {
                    delivered += 1;
                    link.wake();
                }
                Pushed::Overflow => {
                    metrics().slow_consumer_disconnects.inc();
                    link.control.do_send(Control::Close(Close::SlowConsumer));
                }
                Pushed::Dropped => {}
            }
        }
        delivered
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

fn remove_subscriber(
    map: &mut HashMap<ChannelKey, HashMap<ConnId, Subscriber>>,
    channel: &ChannelKey,
    conn: ConnId,
) -> bool {
    let Some(subscribers) = map.get_mut(channel) else {
        return false;
    };
    if subscribers.remove(&conn).is_none() {
        return false;
    }
    if subscribers.is_empty() {
        map.remove(channel);
        true
    } else {
        false
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

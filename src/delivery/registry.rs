//! This node's live sessions: by connection (for logout, eviction and drain), and by channel
//! (for fan-out, and to ask a channel's sockets to resync when this node missed its events). Brokers call [`Registry::deliver`] with a shared, already-encoded
//! [`Event`]; the registry knows which worker threads have subscribers of its channel and
//! hands it once to each ([`super::fanout`] walks that worker's sockets). A subscriber that
//! is not ready to write it at once gets it in its bounded [`Outbox`].

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::fanout::{self, Subscriber, WorkerBounds, WorkerQueue, MAX_QUEUED};
use super::outbox::Outbox;
use super::writer::Socket;
use crate::core::close::{AuthFailure, Close};
use crate::core::event::Event;
use crate::core::identity::Identity;
use crate::core::ids::{ChannelKey, ConnId};
use actix::prelude::*;
use parking_lot::{Mutex, RwLock};
use rand::Rng;

/// Wake a session: its outbox has frames. At most one is in flight per session.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Flush;

/// Orders to one session from outside (logout, eviction, slow consumer, drain).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub(crate) enum Control {
    /// Close now with this reason.
    Close(Close),
    /// Tell the client to come back after `after_ms`, then close with 1012.
    Drain { after_ms: u64 },
}

/// What the registry needs of a session: its outbox, how to wake whoever drains it, and the
/// session's control mailbox.
pub(crate) struct SessionLink {
    pub(crate) conn: ConnId,
    /// Who the session is; logout and expiry find its sockets by its `sid` and `exp`.
    pub(crate) identity: Identity,
    /// The connection-cap slot this session holds, refreshed with its lease.
    pub(crate) slot: String,
    pub(crate) outbox: Outbox,
    /// `Some`: a `Flush` message wakes the drainer (an actor). `None`: the drainer polls the
    /// outbox itself and registered its task with [`Outbox::register`] (the WebSocket writer),
    /// so a delivery costs no mailbox message at all.
    pub(crate) flush: Option<Recipient<Flush>>,
    pub(crate) control: Recipient<Control>,
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

/// This node's sessions, by connection, and which workers have subscribers of each channel.
pub(crate) struct Registry {
    /// Tells this registry's worker fan-outs from another registry's (tests build several).
    id: usize,
    /// Per channel, how many subscribers each worker has (indexed like `workers`).
    channels: RwLock<HashMap<ChannelKey, Vec<u32>>>,
    /// Each worker's event queue, in the order the workers enlisted.
    workers: RwLock<Vec<Arc<WorkerQueue>>>,
    bounds: WorkerBounds,
    /// Each session's link, which also says who it is: one shared allocation per session,
    /// not copies of its identity here.
    sessions: Mutex<HashMap<ConnId, Arc<SessionLink>>>,
    /// Per channel, the link of each local subscriber: the sockets to tell when this node
    /// missed events of the channel ([`Self::resync_channel`]). The shared link, not a clone
    /// of its control mailbox, which would cost an allocation per subscription.
    members: Mutex<HashMap<ChannelKey, HashMap<ConnId, Arc<SessionLink>>>>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new(5_000)
    }
}

impl Registry {
    /// A registry whose workers, when they miss events, spread the reconnects they ask for
    /// over `resync_spread_ms` (`shutdown.reconnect_spread_ms`).
    pub(crate) fn new(resync_spread_ms: u64) -> Self {
        Self::with_bounds(WorkerBounds {
            max_queued: MAX_QUEUED,
            resync_spread_ms,
        })
    }

    pub(crate) fn with_bounds(bounds: WorkerBounds) -> Self {
        static NEXT_ID: AtomicUsize = AtomicUsize::new(0);
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            channels: RwLock::default(),
            workers: RwLock::default(),
            bounds,
            sessions: Mutex::default(),
            members: Mutex::default(),
        }
    }

    pub(crate) fn register(&self, link: Arc<SessionLink>) {
        self.sessions.lock().insert(link.conn, link);
    }

    /// Forget a session and its subscriptions; returns the channels nobody here wants any more.
    /// Runs on the session's worker thread, like [`Self::subscribe`].
    pub(crate) fn unregister<'a>(
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
    pub(crate) fn subscribe(
        &self,
        channel: &ChannelKey,
        link: &Arc<SessionLink>,
        binary: bool,
        socket: Option<Rc<Socket>>,
    ) -> bool {
        let worker = fanout::current(self.id, self.bounds, |queue| {
            let mut workers = self.workers.write();
            workers.push(queue);
            workers.len() - 1
        });
        let subscriber = Subscriber {
            link: link.clone(),
            binary,
            socket,
            cut: false,
        };
        let known = self
            .members
            .lock()
            .entry(channel.clone())
            .or_default()
            .insert(link.conn, link.clone())
            .is_some();
        if known {
            // Subscribed already: only what it asked for (binary, socket) changes.
            let replaced = worker.replace(channel, subscriber);
            debug_assert!(replaced, "the member map and the worker's list disagree");
            return false;
        }
        worker.add_new(channel, subscriber);
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
    pub(crate) fn unsubscribe(&self, channel: &ChannelKey, conn: ConnId) -> bool {
        let Some(worker) = fanout::existing(self.id) else {
            return false;
        };
        if !worker.remove(channel, conn) {
            return false;
        }
        {
            let mut members = self.members.lock();
            if let Some(conns) = members.get_mut(channel) {
                conns.remove(&conn);
                if conns.is_empty() {
                    members.remove(channel);
                }
            }
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
    /// thread, one thread at a time per channel); each worker delivers it to its own sockets.
    pub(crate) fn deliver(&self, event: &Arc<Event>) {
        let map = self.channels.read();
        let Some(counts) = map.get(&event.channel) else {
            return;
        };
        let workers = self.workers.read();
        for (queue, _) in workers.iter().zip(counts).filter(|(_, &n)| n > 0) {
            queue.push(event);
        }
    }

    /// Close every local socket of login session `sid`; returns how many.
    pub(crate) fn close_session(&self, sid: &str, close: Close) -> usize {
        let sessions = self.sessions.lock();
        let mut n = 0;
        for link in sessions.values().filter(|l| l.identity.sid == sid) {
            link.control.do_send(Control::Close(close.clone()));
            n += 1;
        }
        n
    }

    /// Close every local socket whose login session expired by `now_s` (Unix seconds), with
    /// 4401 `session expired`; returns how many.
    pub(crate) fn close_expired(&self, now_s: u64) -> usize {
        let sessions = self.sessions.lock();
        let mut n = 0;
        for link in sessions.values().filter(|l| l.identity.exp <= now_s) {
            let expired = Close::Unauthenticated(AuthFailure::Expired);
            link.control.do_send(Control::Close(expired));
            n += 1;
        }
        n
    }

    /// Close one local connection by its display id; false when it is not here.
    pub(crate) fn close_conn(&self, conn: &str, close: Close) -> bool {
        let Some(conn) = ConnId::parse_local(conn) else {
            return false;
        };
        match self.sessions.lock().get(&conn) {
            Some(link) => {
                link.control.do_send(Control::Close(close));
                true
            }
            None => false,
        }
    }

    /// Tell every local subscriber of `channel` to reconnect after a delay spread at random
    /// over `spread_ms`, and close it with 1012, as the drain does: this node missed events
    /// of the channel it cannot replay, and a client resuming with `since` learns from
    /// whichever pod answers whether they can still be recovered. Returns how many.
    pub(crate) fn resync_channel(&self, channel: &ChannelKey, spread_ms: u64) -> usize {
        let members = self.members.lock();
        let Some(conns) = members.get(channel) else {
            return 0;
        };
        let mut rng = rand::rng();
        for link in conns.values() {
            link.control.do_send(Control::Drain {
                after_ms: rng.random_range(0..=spread_ms),
            });
        }
        conns.len()
    }

    /// Every local session's control mailbox, for the drain.
    pub(crate) fn all_controls(&self) -> Vec<Recipient<Control>> {
        self.sessions
            .lock()
            .values()
            .map(|l| l.control.clone())
            .collect()
    }

    pub(crate) fn session_count(&self) -> usize {
        self.sessions.lock().len()
    }

    /// How many channels have at least one local subscriber.
    pub(crate) fn channel_count(&self) -> usize {
        self.channels.read().len()
    }

    /// Channels with at least one local subscriber (resubscribed after a Redis reconnect).
    pub(crate) fn active_channels(&self) -> Vec<ChannelKey> {
        self.channels.read().keys().cloned().collect()
    }

    /// The login sessions of local sockets, each once (the periodic revocation re-check).
    pub(crate) fn session_ids(&self) -> Vec<String> {
        let sessions = self.sessions.lock();
        let ids: std::collections::HashSet<&String> =
            sessions.values().map(|l| &l.identity.sid).collect();
        ids.into_iter().cloned().collect()
    }

    /// `org/user` keys of local sessions and their cap slots (lease refresh).
    pub(crate) fn cap_slots(&self) -> Vec<(String, String)> {
        self.sessions
            .lock()
            .values()
            .map(|l| (l.identity.user_key(), l.slot.clone()))
            .collect()
    }
}

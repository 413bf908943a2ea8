//! One lifecycle for every admitted connection, WebSocket or SSE: attach to this node
//! (registered with the registry, so logout, eviction and drain reach it; counted; holding
//! the cap slot the handshake took), subscribe channels (live at once, or held until Redis
//! confirms the channel or until the history after `since` is read, then released in order
//! without duplicates; replays within the connection's
//! [`ReplayBudget`](crate::delivery::replay::ReplayBudget)), and detach when the
//! [`Attachment`] is dropped (every channel left, unregistered, the cap slot given back). The transports
//! only frame what this decides.

use std::cell::{OnceCell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;

use crate::broker::{Interest, Replay, CONFIRM_TIMEOUT};
use crate::core::close::Close;
use crate::core::event::Event;
use crate::core::identity::Identity;
use crate::core::ids::{ChannelKey, ConnId, EventId};
use crate::core::metrics::metrics;
use crate::core::wire::ServerMessage;
use crate::delivery::outbox::Outbox;
use crate::delivery::registry::{Control, Flush, SessionLink};
use crate::delivery::replay::ReplayBudget;
use crate::delivery::writer::{Shared, Socket};
use crate::node::Node;

/// The handshake's verdict, handed to the transport before its session starts.
pub(crate) enum Admission {
    Admitted(Admitted),
    /// Send this close and nothing else.
    Refused(Close),
}

/// A connection that passed every check, with the cap slot it was granted.
pub(crate) struct Admitted {
    pub(crate) identity: Identity,
    pub(crate) conn: ConnId,
    /// The cap slot taken for `conn`; it must be given back when the connection ends.
    pub(crate) slot: String,
}

/// An admitted connection's place in this node. Dropping it detaches the connection.
pub(crate) struct Attachment {
    node: Arc<Node>,
    /// Also who the connection is, and the cap slot it holds.
    link: Arc<SessionLink>,
    /// The subscriptions, shared with the socket's writer (WebSocket).
    shared: Shared,
    /// Made at the first `since`: most connections never resume, and a budget made later
    /// starts as full as one made at attach would have refilled to by then.
    replays: OnceCell<Rc<Replays>>,
}

/// A connection's replay state, in one allocation.
struct Replays {
    /// What `since` replays may still cost this connection.
    budget: RefCell<ReplayBudget>,
    /// One replay of this connection reads history at a time, each within what the ones
    /// before it left of the budget: many topics resumed at once (SSE with
    /// `Last-Event-ID: 0`) read no more than one full replay.
    turn: tokio::sync::Semaphore,
}

/// What a held subscription waits for: Redis to confirm the channel (`None`), or the history
/// after `since` (`Some`).
pub(crate) type Ready = Pin<Box<dyn Future<Output = Option<Replay>>>>;

/// A subscription whose live events are held back until [`Attachment::release`].
pub(crate) struct Held {
    channel: ChannelKey,
    hold: u64,
}

impl Held {
    pub(crate) fn channel(&self) -> &ChannelKey {
        &self.channel
    }
}

/// What a held subscription releases, in order: the replayed events, then the live ones
/// held meanwhile, without duplicates.
pub(crate) struct Released {
    pub(crate) events: Vec<Arc<Event>>,
    /// With `since`: whether history still reached back to it (false: reload state).
    pub(crate) recovered: Option<bool>,
}

/// What [`Attachment::subscribe`] came to.
pub(crate) enum Subscribed {
    /// Live events flow now: acknowledge at once.
    Live,
    /// This connection replayed the channel less than
    /// [`REPLAY_REPEAT`](crate::delivery::replay::REPLAY_REPEAT) ago: nothing changed.
    ReplayTooSoon,
    /// Live events are held; await `ready`, then [`Attachment::release`] the hold.
    Held(Held, Ready),
}

impl Attachment {
    /// Attach an admitted connection. `flush`: how to wake its drainer when events wait in
    /// its outbox (`None`: the drainer registered its task with the outbox, as the WebSocket
    /// writer does); `control`: where orders to it go (close, drain).
    pub(crate) fn attach(
        node: Arc<Node>,
        Admitted {
            identity,
            conn,
            slot,
        }: Admitted,
        shared: Shared,
        flush: Option<Recipient<Flush>>,
        control: Recipient<Control>,
    ) -> Self {
        let limits = &node.settings.limits;
        let link = Arc::new(SessionLink {
            conn,
            identity,
            slot,
            outbox: Outbox::new(limits.outbound_queue, limits.slow_consumer),
            flush,
            control,
        });
        {
            let mut shared = shared.borrow_mut();
            shared.link = Some(link.clone());
            shared.subscriptions.limit_held(limits.outbound_queue);
        }
        node.registry.register(link.clone());
        metrics().connections.inc();
        Self {
            node,
            link,
            shared,
            replays: OnceCell::new(),
        }
    }

    fn replays(&self) -> &Rc<Replays> {
        self.replays.get_or_init(|| {
            Rc::new(Replays {
                budget: RefCell::new(ReplayBudget::new(
                    self.node.settings.history.replay_max_bytes,
                    Instant::now(),
                )),
                turn: tokio::sync::Semaphore::new(1),
            })
        })
    }

    pub(crate) fn identity(&self) -> &Identity {
        &self.link.identity
    }

    pub(crate) fn conn(&self) -> ConnId {
        self.link.conn
    }

    pub(crate) fn link(&self) -> &Arc<SessionLink> {
        &self.link
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    /// The `welcome` message this connection starts with.
    pub(crate) fn welcome(&self) -> String {
        ServerMessage::Welcome {
            conn_id: self.link.conn.to_string(),
            user: self.identity().user.as_str(),
            org: self.identity().org.as_str(),
            heartbeat_ms: self.node.settings.heartbeat.interval_ms,
        }
        .encode()
    }

    /// Subscribe `channel`. Without `since`, on a channel whose events already reach this
    /// node, it is live at once. Otherwise its live events (already flowing into the outbox)
    /// are held until `Ready`: the history after `since` has been read, or (without it)
    /// Redis has confirmed this node's SUBSCRIBE of a channel new to it, at most
    /// [`CONFIRM_TIMEOUT`]; an event published right after an early acknowledgement would be
    /// missed otherwise. `socket`: the WebSocket's output, which the fan-out may write
    /// directly.
    pub(crate) fn subscribe(
        &self,
        channel: ChannelKey,
        since: Option<EventId>,
        binary: bool,
        socket: Option<Rc<Socket>>,
    ) -> Subscribed {
        if since.is_some()
            && !self
                .replays()
                .budget
                .borrow_mut()
                .admit(&channel, Instant::now())
        {
            return Subscribed::ReplayTooSoon;
        }
        if since.is_none() && self.node.broker.is_live(&channel) {
            self.register(&channel, binary, socket);
            self.shared.borrow_mut().subscriptions.insert_live(channel);
            return Subscribed::Live;
        }
        let ready: Ready = match since {
            Some(since) => {
                let link = self.link.clone();
                let queue = self.node.settings.limits.outbound_queue;
                let room = move || queue.saturating_sub(link.outbox.len());
                let replay = self.replay(channel.clone(), since, room);
                Box::pin(async move { Some(replay.await) })
            }
            None => {
                let confirmed = self.confirmed(channel.clone());
                let name = channel.clone();
                Box::pin(async move {
                    if !confirmed.await {
                        log::warn!(
                            "{name}: Redis has not confirmed the subscription within {CONFIRM_TIMEOUT:?}; acknowledged anyway, its events flow once Redis is back"
                        );
                    }
                    None
                })
            }
        };
        Subscribed::Held(self.subscribe_held(channel, binary, socket), ready)
    }

    /// Subscribe `channel` and hold its live events until [`Self::release`].
    pub(crate) fn subscribe_held(
        &self,
        channel: ChannelKey,
        binary: bool,
        socket: Option<Rc<Socket>>,
    ) -> Held {
        self.register(&channel, binary, socket);
        let hold = self
            .shared
            .borrow_mut()
            .subscriptions
            .insert_replaying(channel.clone());
        Held { channel, hold }
    }

    /// Resolves once events of `channel` reach this node (clustered: Redis has confirmed
    /// this node's SUBSCRIBE), or after [`CONFIRM_TIMEOUT`]; true when it was in time.
    pub(crate) fn confirmed(&self, channel: ChannelKey) -> impl Future<Output = bool> + 'static {
        self.node.broker.until_live(channel, CONFIRM_TIMEOUT)
    }

    /// The retained events of `channel` after `since`, and whether history reached back:
    /// read after this connection's earlier replays, within what they left of its replay
    /// budget, and within `room()` (the frames the transport can still queue) less the live
    /// events the channel holds meanwhile, so a release never overflows the transport's
    /// queue. The newest events are kept; a replay cut short is not recovered.
    pub(crate) fn replay(
        &self,
        channel: ChannelKey,
        since: EventId,
        room: impl Fn() -> usize + 'static,
    ) -> impl Future<Output = Replay> + 'static {
        let broker = self.node.broker.clone();
        let replays = self.replays().clone();
        let shared = self.shared.clone();
        async move {
            // Wait for the channel to be live before taking a turn, so replays waiting on an
            // absent Redis wait side by side, not one after another.
            if !broker.until_live(channel.clone(), CONFIRM_TIMEOUT).await {
                log::warn!("history of {channel} unavailable: not subscribed in time");
                return Replay::default();
            }
            // Never closed, so the permit always comes.
            let _turn = replays.turn.acquire().await;
            let max_bytes = replays.budget.borrow_mut().available(Instant::now());
            let mut replay = broker.replay_since(channel.clone(), since, max_bytes).await;
            let held = shared.borrow().subscriptions.held_len(&channel);
            let room = room().saturating_sub(held);
            if !replays
                .budget
                .borrow_mut()
                .take(&mut replay.events, room, Instant::now())
            {
                replay.recovered = false;
            }
            replay
        }
    }

    /// What a held subscription releases once it is ready; `None` when it no longer holds
    /// the channel (unsubscribed, or subscribed again, meanwhile).
    pub(crate) fn release(&self, held: &Held, replay: Option<Replay>) -> Option<Released> {
        let (replayed, recovered) = match replay {
            Some(replay) => (replay.events, Some(replay.recovered)),
            None => (Vec::new(), None),
        };
        let finished = self.shared.borrow_mut().subscriptions.finish_replay(
            &held.channel,
            held.hold,
            replayed,
        )?;
        // Live events dropped while held: a resume missed them.
        let recovered = recovered.map(|r| r && !finished.dropped);
        Some(Released {
            events: finished.events,
            recovered,
        })
    }

    /// Leave `channel`; false when it was not subscribed.
    pub(crate) fn unsubscribe(&self, channel: &ChannelKey) -> bool {
        if !self.shared.borrow_mut().subscriptions.remove(channel) {
            return false;
        }
        if self.node.registry.unsubscribe(channel, self.link.conn) {
            self.node
                .broker
                .interest
                .do_send(Interest::Closed(channel.clone()));
        }
        true
    }

    fn register(&self, channel: &ChannelKey, binary: bool, socket: Option<Rc<Socket>>) {
        if self
            .node
            .registry
            .subscribe(channel, &self.link, binary, socket)
        {
            self.node.broker.interest.do_send(Interest::Opened);
        }
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        metrics().connections.dec();
        let emptied = self.node.registry.unregister(
            self.link.conn,
            self.shared.borrow().subscriptions.channels(),
        );
        for channel in emptied {
            self.node.broker.interest.do_send(Interest::Closed(channel));
        }
        let caps = self.node.caps.clone();
        let user_key = self.identity().user_key();
        let slot = self.link.slot.clone();
        actix::spawn(async move { caps.release(&user_key, &slot).await });
    }
}

//! The WebSocket session actor: one per socket, and the only code that touches
//! `WebsocketContext`. It receives the outcome of the handshake checks (admitted, or the close
//! to send), then speaks the protocol of SPEC section 4: subscriptions (with `since` replay),
//! client publish and binary streams, app-level ping, the client message budget, and the
//! heartbeat. It decides what the socket wants (subscriptions, replay, closing) in the state
//! it shares with the socket's writer ([`crate::connection`]); live events reach the socket
//! without a message through this actor's mailbox (see [`crate::fanout`]).

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_http::error::PayloadError;
use actix_web_actors::ws::{self, CloseCode, CloseReason, WebsocketContext};
use bytes::Bytes;
use futures_util::Stream;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;

use crate::auth::Identity;
use crate::broker::{EventSender, Interest, PublishBody, PublishRequest, CONFIRM_TIMEOUT};
use crate::close::Close;
use crate::connection::{self, Shared, Socket};
use crate::limits::TokenBucket;
use crate::metrics::metrics;
use crate::protocol::{
    validate_event_name, ChannelKey, ClientMessage, ConnId, ErrorCode, EventId, ServerMessage,
    Topic,
};
use crate::registry::{Control, Event, Outbox, Payload, SessionLink};
use crate::server::Hub;

/// The handshake's verdict, handed to the session before it starts.
pub enum Admission {
    /// Checks passed; the cap `slot` for `conn` is held.
    Admitted {
        identity: Identity,
        conn: ConnId,
        slot: String,
    },
    /// Send this close frame and nothing else.
    Refused(Close),
}

/// Run one admitted (or refused) socket to its end: the session actor in its
/// `WebsocketContext`, fed from the raw connection and writing straight to it. `early` holds
/// any bytes the client sent right behind its handshake.
pub async fn run(hub: Arc<Hub>, admission: Admission, io: TcpStream, early: Bytes) {
    let codec = actix_http::ws::Codec::new().max_size(hub.settings.limits.max_frame_bytes);
    // A socket that accepts nothing for this long is gone or hostile: stop waiting on it.
    let write_stall = Duration::from_millis(hub.settings.heartbeat.timeout_ms);
    let (read, write) = io.into_split();
    let socket = Socket::new(write, Shared::default());
    let session = WsSession {
        hub,
        admission: Some(admission),
        live: None,
        socket: socket.clone(),
    };
    let input = SocketInput {
        read,
        early: Some(early),
    };
    let context = WebsocketContext::with_codec(session, input, codec);
    connection::drive(context, socket, write_stall).await;
}

/// The client's bytes as the WebSocket context wants them. Reads go through a buffer on the
/// stack and hand over only what arrived, so an idle socket holds no read buffer at all.
struct SocketInput {
    read: OwnedReadHalf,
    early: Option<Bytes>,
}

impl Stream for SocketInput {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if let Some(early) = self.early.take().filter(|b| !b.is_empty()) {
            return Poll::Ready(Some(Ok(early)));
        }
        // Uninitialised: this runs on every wake-up of the session, mostly to find nothing.
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
        let mut filled = ReadBuf::uninit(&mut buf);
        match std::pin::Pin::new(&mut self.read).poll_read(cx, &mut filled) {
            Poll::Ready(Ok(())) if filled.filled().is_empty() => Poll::Ready(None),
            Poll::Ready(Ok(())) => Poll::Ready(Some(Ok(Bytes::copy_from_slice(filled.filled())))),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(PayloadError::Io(e)))),
            Poll::Pending => Poll::Pending,
        }
    }
}

pub struct WsSession {
    hub: Arc<Hub>,
    admission: Option<Admission>,
    live: Option<Live>,
    /// The socket's output, which the worker's fan-out writes live events to; it holds the
    /// subscriptions and the closing flag this session shares with the socket's writer.
    socket: Rc<Socket>,
}

/// State of an admitted session.
struct Live {
    identity: Identity,
    link: Arc<SessionLink>,
    conn_text: String,
    slot: String,
    /// Where binary frames from the client go, set by `stream`.
    stream_to: Option<Topic>,
    last_heard: Instant,
    text_budget: TokenBucket,
    binary_budget: TokenBucket,
    /// Messages refused in a row for the rate limit; past the burst the socket is closed.
    refused_in_row: u32,
}

impl Actor for WsSession {
    type Context = WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        match self.admission.take() {
            Some(Admission::Admitted {
                identity,
                conn,
                slot,
            }) => self.begin(identity, conn, slot, ctx),
            Some(Admission::Refused(close)) => self.close(ctx, &close),
            None => ctx.stop(),
        }
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        let Some(live) = self.live.take() else {
            return;
        };
        metrics().connections.dec();
        let shared = self.socket.shared().borrow();
        let emptied = self
            .hub
            .registry
            .unregister(live.link.conn, shared.subscriptions.channels());
        for channel in emptied {
            self.hub.broker.interest.do_send(Interest::Closed(channel));
        }
        let caps = self.hub.caps.clone();
        let user_key = live.identity.user_key();
        let slot = live.slot;
        actix::spawn(async move { caps.release(&user_key, &slot).await });
    }
}

impl WsSession {
    fn begin(
        &mut self,
        identity: Identity,
        conn: ConnId,
        slot: String,
        ctx: &mut WebsocketContext<Self>,
    ) {
        let settings = &self.hub.settings;
        let address = ctx.address();
        let link = Arc::new(SessionLink {
            conn,
            outbox: Outbox::new(
                settings.limits.outbound_queue,
                settings.limits.slow_consumer,
            ),
            // The writer drains the outbox itself: no mailbox message per delivery.
            flush: None,
            control: address.recipient(),
        });
        self.socket.shared().borrow_mut().link = Some(link.clone());
        self.hub.registry.register(
            link.clone(),
            identity.user_key(),
            slot.clone(),
            identity.sid.clone(),
        );
        metrics().connections.inc();
        let now = Instant::now();
        let limits = &settings.limits;
        let conn_text = conn.to_string();
        ctx.text(
            ServerMessage::Welcome {
                conn_id: conn_text.clone(),
                user: identity.user.as_str(),
                org: identity.org.as_str(),
                heartbeat_ms: settings.heartbeat.interval_ms,
            }
            .encode(),
        );
        self.live = Some(Live {
            identity,
            link,
            conn_text,
            slot,
            stream_to: None,
            last_heard: now,
            text_budget: TokenBucket::new(limits.client_msgs_per_s, limits.client_msgs_burst, now),
            // Audio arrives as many small frames (50/s for 20 ms packets): a larger budget.
            binary_budget: TokenBucket::new(
                limits.client_msgs_per_s.saturating_mul(4),
                limits.client_msgs_burst.saturating_mul(4),
                now,
            ),
            refused_in_row: 0,
        });
        self.heartbeat(ctx);
    }

    /// Ping every interval; close a socket that has been silent past the timeout.
    fn heartbeat(&self, ctx: &mut WebsocketContext<Self>) {
        let interval = Duration::from_millis(self.hub.settings.heartbeat.interval_ms);
        let timeout = Duration::from_millis(self.hub.settings.heartbeat.timeout_ms);
        ctx.run_interval(interval, move |this, ctx| {
            let Some(live) = this.live.as_mut() else {
                return;
            };
            if live.last_heard.elapsed() > timeout {
                metrics().heartbeat_timeouts.inc();
                log::info!(
                    "closing silent socket {} of user {}: nothing heard for {:?}",
                    live.conn_text,
                    live.identity.user,
                    live.last_heard.elapsed()
                );
                this.close(ctx, &Close::HeartbeatTimeout);
            } else {
                ctx.ping(b"");
            }
        });
    }

    /// Send the close frame (once) and stop; nothing is written after it.
    fn close(&mut self, ctx: &mut WebsocketContext<Self>, close: &Close) {
        if std::mem::replace(&mut self.socket.shared().borrow_mut().closing, true) {
            return;
        }
        ctx.close(Some(CloseReason {
            code: CloseCode::from(close.code()),
            description: Some(close.reason()),
        }));
        ctx.stop();
    }

    fn reply_error(ctx: &mut WebsocketContext<Self>, code: ErrorCode, message: &str) {
        ctx.text(ServerMessage::Error { code, message }.encode());
    }

    /// Spend one message of the client's budget; false when it must be refused.
    fn within_budget(&mut self, ctx: &mut WebsocketContext<Self>, binary: bool) -> bool {
        let burst = self.hub.settings.limits.client_msgs_burst;
        let Some(live) = self.live.as_mut() else {
            return false;
        };
        let now = Instant::now();
        let bucket = if binary {
            &mut live.binary_budget
        } else {
            &mut live.text_budget
        };
        if bucket.try_take(now) {
            live.refused_in_row = 0;
            return true;
        }
        live.refused_in_row += 1;
        if live.refused_in_row == 1 {
            Self::reply_error(
                ctx,
                ErrorCode::RateLimited,
                "too many messages: slow down (further messages are dropped until you do)",
            );
        } else if live.refused_in_row > burst {
            log::warn!(
                "closing socket {} of user {}: kept flooding after rate_limited",
                live.conn_text,
                live.identity.user
            );
            self.close(ctx, &Close::MessageFlood);
        }
        false
    }

    fn on_text(&mut self, text: &str, ctx: &mut WebsocketContext<Self>) {
        if !self.within_budget(ctx, false) {
            return;
        }
        let message = match ClientMessage::decode(text) {
            Ok(m) => m,
            Err(why) => return Self::reply_error(ctx, ErrorCode::BadRequest, &why),
        };
        match message {
            ClientMessage::Ping => ctx.text(ServerMessage::Pong.encode()),
            ClientMessage::Subscribe {
                topic,
                since,
                binary,
            } => self.subscribe(&topic, since.as_deref(), binary, ctx),
            ClientMessage::Unsubscribe { topic } => self.unsubscribe(&topic, ctx),
            ClientMessage::Publish { topic, data, event } => {
                self.client_publish(&topic, data, event, ctx)
            }
            ClientMessage::Stream { topic } => match self.publishable(&topic) {
                Ok(topic) => {
                    if let Some(live) = self.live.as_mut() {
                        live.stream_to = Some(topic);
                    }
                }
                Err((code, why)) => Self::reply_error(ctx, code, &why),
            },
        }
    }

    fn subscribe(
        &mut self,
        topic: &str,
        since: Option<&str>,
        binary: bool,
        ctx: &mut WebsocketContext<Self>,
    ) {
        let max = self.hub.settings.limits.max_subscriptions;
        let Some(live) = self.live.as_mut() else {
            return;
        };
        let topic = match Topic::parse(topic) {
            Ok(t) => t,
            Err(why) => return Self::reply_error(ctx, ErrorCode::BadRequest, &why),
        };
        let since = match since.map(|s| EventId::parse(s).ok_or(s)) {
            None => None,
            Some(Ok(id)) => Some(id),
            Some(Err(raw)) => {
                return Self::reply_error(
                    ctx,
                    ErrorCode::BadRequest,
                    &format!("since {raw:?} is not an event id (<ms>-<seq>)"),
                )
            }
        };
        let channel = ChannelKey::new(&live.identity.org, &topic);
        if !self
            .socket
            .shared()
            .borrow_mut()
            .subscriptions
            .contains(&channel)
            && self.socket.shared().borrow_mut().subscriptions.len() >= max
        {
            return Self::reply_error(
                ctx,
                ErrorCode::TooManySubscriptions,
                &format!("at most {max} subscriptions per connection"),
            );
        }
        let socket = Some(self.socket.clone());
        if self
            .hub
            .registry
            .subscribe(&channel, &live.link, binary, socket)
        {
            self.hub
                .broker
                .interest
                .do_send(Interest::Opened(channel.clone()));
        }
        if since.is_none() && self.hub.broker.is_live(&channel) {
            self.socket
                .shared()
                .borrow_mut()
                .subscriptions
                .insert_live(channel);
            ctx.text(
                ServerMessage::Subscribed {
                    topic: topic.as_str(),
                    recovered: None,
                }
                .encode(),
            );
            return;
        }
        // Live events are already flowing into the outbox; hold them until the replay is out,
        // or (clustered, a channel this node has not subscribed to in Redis yet) until events
        // flow: an event published right after an early `subscribed` would be missed.
        let hold = self
            .socket
            .shared()
            .borrow_mut()
            .subscriptions
            .insert_replaying(channel.clone());
        let Some(since) = since else {
            let confirmed = self.hub.broker.until_live(channel.clone(), CONFIRM_TIMEOUT);
            ctx.spawn(confirmed.into_actor(self).map(move |confirmed, this, ctx| {
                if !confirmed {
                    log::warn!(
                        "{channel}: Redis has not confirmed the subscription within {CONFIRM_TIMEOUT:?}; acknowledged anyway, its events flow once Redis is back"
                    );
                }
                this.finish_replay(&channel, &topic, hold, Vec::new(), None, ctx);
            }));
            return;
        };
        let fetch = self.hub.broker.replay_since(channel.clone(), since);
        ctx.spawn(fetch.into_actor(self).map(move |replay, this, ctx| {
            let recovered = Some(replay.recovered);
            this.finish_replay(&channel, &topic, hold, replay.events, recovered, ctx);
        }));
    }

    /// Acknowledge a subscription that held its live events back: `subscribed` (with
    /// `recovered` when it resumed), the replayed events, then the held ones.
    fn finish_replay(
        &mut self,
        channel: &ChannelKey,
        topic: &Topic,
        hold: u64,
        replayed: Vec<Arc<Event>>,
        recovered: Option<bool>,
        ctx: &mut WebsocketContext<Self>,
    ) {
        if self.live.is_none() {
            return;
        }
        // None: unsubscribed (or resubscribed without since) while the history was on its way.
        let Some(events) = self
            .socket
            .shared()
            .borrow_mut()
            .subscriptions
            .finish_replay(channel, hold, replayed)
        else {
            return;
        };
        ctx.text(
            ServerMessage::Subscribed {
                topic: topic.as_str(),
                recovered,
            }
            .encode(),
        );
        for event in &events {
            write_event(ctx, event);
        }
        metrics().messages_delivered.inc_by(events.len() as u64);
    }

    fn unsubscribe(&mut self, topic: &str, ctx: &mut WebsocketContext<Self>) {
        let Some(live) = self.live.as_mut() else {
            return;
        };
        let topic = match Topic::parse(topic) {
            Ok(t) => t,
            Err(why) => return Self::reply_error(ctx, ErrorCode::BadRequest, &why),
        };
        let channel = ChannelKey::new(&live.identity.org, &topic);
        if self
            .socket
            .shared()
            .borrow_mut()
            .subscriptions
            .remove(&channel)
            && self.hub.registry.unsubscribe(&channel, live.link.conn)
        {
            self.hub.broker.interest.do_send(Interest::Closed(channel));
        }
        ctx.text(
            ServerMessage::Unsubscribed {
                topic: topic.as_str(),
            }
            .encode(),
        );
    }

    /// A topic this client may publish or stream to, per `auth.client_publish`.
    fn publishable(&self, topic: &str) -> Result<Topic, (ErrorCode, String)> {
        let topic = Topic::parse(topic).map_err(|why| (ErrorCode::BadRequest, why))?;
        if self.hub.client_publish.iter().any(|p| p.matches(&topic)) {
            Ok(topic)
        } else {
            Err((
                ErrorCode::Forbidden,
                format!("clients may not publish to {topic}"),
            ))
        }
    }

    fn client_publish(
        &mut self,
        topic: &str,
        data: serde_json::Value,
        event: Option<String>,
        ctx: &mut WebsocketContext<Self>,
    ) {
        let topic = match self.publishable(topic) {
            Ok(t) => t,
            Err((code, why)) => return Self::reply_error(ctx, code, &why),
        };
        let event = event.unwrap_or_else(|| "message".into());
        if let Err(why) = validate_event_name(&event) {
            return Self::reply_error(ctx, ErrorCode::BadRequest, &why);
        }
        let Some(request) = self.request(topic, PublishBody::Json { event, data }) else {
            return;
        };
        let broker = self.hub.broker.clone();
        ctx.spawn(
            async move { broker.publish(request).await }
                .into_actor(self)
                .map(|result, _, ctx| {
                    if let Err(e) = result {
                        Self::reply_error(ctx, ErrorCode::Unavailable, &e.to_string());
                    }
                }),
        );
    }

    fn request(&self, topic: Topic, body: PublishBody) -> Option<PublishRequest> {
        let live = self.live.as_ref()?;
        Some(PublishRequest {
            org: live.identity.org.clone(),
            topic,
            body,
            sender: Some(EventSender {
                user: live.identity.user.to_string(),
                conn_id: live.conn_text.clone(),
            }),
        })
    }

    fn on_binary(&mut self, bytes: Bytes, ctx: &mut WebsocketContext<Self>) {
        let Some(topic) = self.live.as_ref().and_then(|l| l.stream_to.clone()) else {
            return self.close(
                ctx,
                &Close::UnsupportedData("binary frame without a stream"),
            );
        };
        if !self.within_budget(ctx, true) {
            return;
        }
        if let Some(request) = self.request(topic, PublishBody::Binary(bytes)) {
            self.hub.broker.publish_detached(request);
        }
    }
}

fn write_event(ctx: &mut WebsocketContext<WsSession>, event: &Event) {
    match &event.payload {
        Payload::Text(frame) => ctx.text(frame.clone()),
        Payload::Binary(bytes) => ctx.binary(bytes.clone()),
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for WsSession {
    fn handle(&mut self, item: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        if let Some(live) = self.live.as_mut() {
            live.last_heard = Instant::now();
        } else {
            return;
        }
        match item {
            Ok(ws::Message::Text(text)) => self.on_text(&text, ctx),
            Ok(ws::Message::Binary(bytes)) => self.on_binary(bytes, ctx),
            Ok(ws::Message::Ping(payload)) => ctx.pong(&payload),
            Ok(ws::Message::Pong(_)) | Ok(ws::Message::Nop) => {}
            Ok(ws::Message::Close(reason)) => {
                self.socket.shared().borrow_mut().closing = true;
                ctx.close(reason);
                ctx.stop();
            }
            Ok(ws::Message::Continuation(_)) => self.close(
                ctx,
                &Close::UnsupportedData("fragmented messages are not supported"),
            ),
            Err(ws::ProtocolError::Overflow) => {
                let limit = self.hub.settings.limits.max_frame_bytes;
                self.close(ctx, &Close::FrameTooLarge { limit });
            }
            Err(e) => {
                log::debug!("protocol error on websocket: {e}");
                self.close(ctx, &Close::ProtocolError);
            }
        }
    }
}

impl Handler<Control> for WsSession {
    type Result = ();

    fn handle(&mut self, msg: Control, ctx: &mut Self::Context) {
        match msg {
            Control::Close(close) => self.close(ctx, &close),
            Control::Drain { after_ms } => {
                ctx.text(ServerMessage::Reconnect { after_ms }.encode());
                self.close(ctx, &Close::Restarting);
            }
        }
    }
}

//! The WebSocket session actor: one per socket, and the only code that touches
//! `WebsocketContext`. It receives the outcome of the handshake checks (admitted, or the close
//! to send), attaches to the node ([`super::attach`]), then speaks the protocol of SPEC
//! section 4: subscriptions (with `since` replay), client publish and binary streams,
//! app-level ping, the client message budget, and the heartbeat. Its subscriptions and closing
//! flag are shared with the socket's writer ([`crate::delivery::writer`]); live events reach
//! the socket without a message through this actor's mailbox (see
//! [`crate::delivery::fanout`]).

use std::fmt::Display;
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_http::error::PayloadError;
use actix_http::ws::{Item, OpCode};
use actix_web_actors::ws::{self, CloseCode, CloseReason, WebsocketContext};
use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;

use super::attach::{Admission, Admitted, Attachment, Held, Subscribed};
use crate::broker::Replay;
use crate::core::close::Close;
use crate::core::event::{server_frame, EventSender, PublishBody, PublishRequest};
use crate::core::ids::{ChannelKey, EventId, Topic};
use crate::core::metrics::metrics;
use crate::core::wire::{validate_event_name, ClientMessage, ErrorCode, ServerMessage};
use crate::delivery::heartbeat::{self, Beat};
use crate::delivery::registry::Control;
use crate::delivery::replay::REPLAY_REPEAT;
use crate::delivery::writer::{self, Bounds, Shared, Socket};
use crate::node::Node;
use crate::policy::rate::{FloodMeter, Refusal, TokenBucket};

/// Run one admitted (or refused) socket to its end: the session actor in its
/// `WebsocketContext`, fed from the raw connection and writing straight to it. `switching` is
/// the handshake's encoded 101 response, written ahead of the session's first frames; `early`
/// holds any bytes the client sent right behind its handshake. Everything is built before the
/// returned future (the socket's task) exists, so that task holds only the writer, not room
/// for these arguments as well.
pub(crate) fn run(
    node: Arc<Node>,
    admission: Admission,
    io: TcpStream,
    switching: Bytes,
    early: Bytes,
) -> impl Future<Output = ()> {
    let limits = &node.settings.limits;
    let codec = actix_http::ws::Codec::new().max_size(limits.max_frame_bytes);
    let bounds = Bounds {
        // A socket that accepts nothing for this long is gone or hostile: stop waiting on it.
        stall_after: Duration::from_millis(node.settings.heartbeat.timeout_ms),
        // What the session may leave waiting for a blocked socket (replies, replays): the
        // budget's burst of messages, each answered by at most a frame's worth. A client
        // that stops reading while it keeps asking is closed 1013 at this bound, not after
        // the stall timeout.
        max_backlog: (limits.client_msgs_burst as usize).saturating_mul(limits.max_frame_bytes),
    };
    // The writer already gathers what is ready into one write; Nagle's algorithm would only
    // hold a small frame back until the previous one is acknowledged (voice frames are 20 ms
    // apart, and a delayed ACK costs up to 40 ms). Best effort: a socket that refuses it works.
    let _ = io.set_nodelay(true);
    let (read, write) = io.into_split();
    let socket = Socket::new(write, Shared::default());
    socket.lead_with(switching);
    let session = WsSession {
        node,
        stage: Stage::Starting(admission),
        socket: socket.clone(),
    };
    let input = SocketInput {
        read,
        early: Some(early),
    };
    let context = WebsocketContext::with_codec(session, input, codec);
    writer::drive(context, socket, bounds)
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

pub(crate) struct WsSession {
    node: Arc<Node>,
    stage: Stage,
    /// The socket's output, which the worker's fan-out writes live events to; it holds the
    /// subscriptions and the closing flag this session shares with the socket's writer.
    socket: Rc<Socket>,
}

/// Where a session is in its life. One field, not an `Option` of each: the handshake's
/// verdict and the live state are never needed at once, and this struct sits in every
/// socket's context for as long as the socket is open.
enum Stage {
    /// Not started yet: the handshake's verdict, acted on when the actor starts.
    Starting(Admission),
    Live(Live),
    /// Refused, or stopped.
    Over,
}

/// State of an admitted session.
struct Live {
    attachment: Attachment,
    /// Where binary frames from the client go, set by `stream`.
    stream_to: Option<Topic>,
    /// This socket's place under its worker's heartbeat (pings, and the close when silent).
    _heartbeat: Beat,
    text_budget: TokenBucket,
    binary_budget: TokenBucket,
    /// Messages refused for the rate limit lately; past the burst the socket is closed.
    refusals: FloodMeter,
    /// A fragmented message being assembled (RFC 6455 section 5.4). Boxed: rare, and this
    /// struct is in every socket's context for as long as the socket is open.
    fragments: Option<Box<Fragments>>,
}

/// The fragments of one message received so far.
struct Fragments {
    binary: bool,
    bytes: BytesMut,
}

impl Actor for WsSession {
    type Context = WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        match std::mem::replace(&mut self.stage, Stage::Over) {
            Stage::Starting(Admission::Admitted(admitted)) => self.begin(admitted, ctx),
            Stage::Starting(Admission::Refused(close)) => self.close(ctx, &close),
            Stage::Live(_) | Stage::Over => ctx.stop(),
        }
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        // Dropping the attachment detaches the socket from the node.
        self.stage = Stage::Over;
    }
}

impl WsSession {
    fn live(&self) -> Option<&Live> {
        match &self.stage {
            Stage::Live(live) => Some(live),
            Stage::Starting(_) | Stage::Over => None,
        }
    }

    fn begin(&mut self, admitted: Admitted, ctx: &mut WebsocketContext<Self>) {
        // The writer drains the outbox itself: no mailbox message per delivery.
        let attachment = Attachment::attach(
            self.node.clone(),
            admitted,
            self.socket.shared().clone(),
            None,
            ctx.address().recipient(),
        );
        send_text(&self.socket, attachment.welcome());
        let now = Instant::now();
        let limits = &self.node.settings.limits;
        let heartbeat = &self.node.settings.heartbeat;
        let beat = heartbeat::enlist(
            &self.socket,
            Duration::from_millis(heartbeat.interval_ms),
            Duration::from_millis(heartbeat.timeout_ms),
        );
        self.stage = Stage::Live(Live {
            attachment,
            stream_to: None,
            _heartbeat: beat,
            text_budget: TokenBucket::new(limits.client_msgs_per_s, limits.client_msgs_burst, now),
            // Audio arrives as many small frames (50/s for 20 ms packets): a larger budget.
            binary_budget: TokenBucket::new(
                limits.client_msgs_per_s.saturating_mul(4),
                limits.client_msgs_burst.saturating_mul(4),
                now,
            ),
            refusals: FloodMeter::new(limits.client_msgs_per_s, limits.client_msgs_burst, now),
            fragments: None,
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

    fn reply_error(socket: &Socket, code: ErrorCode, message: impl Display) {
        let message = &message.to_string();
        send_text(socket, ServerMessage::Error { code, message }.encode());
    }

    /// Spend one message of the client's budget; false when it must be refused.
    fn within_budget(&mut self, ctx: &mut WebsocketContext<Self>, binary: bool) -> bool {
        let Stage::Live(live) = &mut self.stage else {
            return false;
        };
        let now = Instant::now();
        let bucket = if binary {
            &mut live.binary_budget
        } else {
            &mut live.text_budget
        };
        if bucket.try_take(now) {
            live.refusals.allowed();
            return true;
        }
        match live.refusals.refused(now) {
            Refusal::First => Self::reply_error(
                &self.socket,
                ErrorCode::RateLimited,
                "too many messages: slow down (further messages are dropped until you do)",
            ),
            Refusal::Again => {}
            Refusal::Flooding => {
                log::warn!(
                    "closing socket {} of user {}: kept flooding after rate_limited",
                    live.attachment.conn(),
                    live.attachment.identity().user
                );
                self.close(ctx, &Close::MessageFlood);
            }
        }
        false
    }

    fn on_text(&mut self, text: &str, ctx: &mut WebsocketContext<Self>) {
        if !self.within_budget(ctx, false) {
            return;
        }
        let message = match ClientMessage::decode(text) {
            Ok(m) => m,
            Err(why) => return Self::reply_error(&self.socket, ErrorCode::BadRequest, why),
        };
        match message {
            ClientMessage::Ping => send_text(&self.socket, ServerMessage::Pong.encode()),
            ClientMessage::Subscribe {
                topic,
                since,
                binary,
            } => self.subscribe(&topic, since.as_deref(), binary, ctx),
            ClientMessage::Unsubscribe { topic } => self.unsubscribe(&topic),
            ClientMessage::Publish { topic, data, event } => {
                self.client_publish(&topic, data, event, ctx)
            }
            ClientMessage::Stream { topic } => match self.publishable(&topic) {
                Ok(topic) => {
                    if let Stage::Live(live) = &mut self.stage {
                        live.stream_to = Some(topic);
                    }
                }
                Err((code, why)) => Self::reply_error(&self.socket, code, why),
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
        let max = self.node.settings.limits.max_subscriptions;
        let Stage::Live(live) = &mut self.stage else {
            return;
        };
        let topic = match Topic::parse(topic) {
            Ok(t) => t,
            Err(why) => return Self::reply_error(&self.socket, ErrorCode::BadRequest, why),
        };
        let since = match since.map(|s| EventId::parse(s).ok_or(s)) {
            None => None,
            Some(Ok(id)) => Some(id),
            Some(Err(raw)) => {
                return Self::reply_error(
                    &self.socket,
                    ErrorCode::BadRequest,
                    format!("since {raw:?} is not an event id (<ms>-<seq>)"),
                )
            }
        };
        let channel = ChannelKey::new(&live.attachment.identity().org, &topic);
        let full = {
            let subscriptions = &self.socket.shared().borrow().subscriptions;
            !subscriptions.contains(&channel) && subscriptions.len() >= max
        };
        if full {
            return Self::reply_error(
                &self.socket,
                ErrorCode::TooManySubscriptions,
                format!("at most {max} subscriptions per connection"),
            );
        }
        let socket = Some(self.socket.clone());
        match live.attachment.subscribe(channel, since, binary, socket) {
            Subscribed::Live => send_text(&self.socket,
                ServerMessage::Subscribed {
                    topic: topic.as_str(),
                    recovered: None,
                }
                .encode(),
            ),
            Subscribed::ReplayTooSoon => Self::reply_error(
                &self.socket,
                ErrorCode::RateLimited,
                format!(
                    "{topic} was replayed less than {}s ago on this connection: subscribe without since, or later",
                    REPLAY_REPEAT.as_secs()
                ),
            ),
            Subscribed::Held(held, ready) => {
                ctx.spawn(ready.into_actor(self).map(move |replay, this, _| {
                    this.acknowledge(&topic, &held, replay);
                }));
            }
        }
    }

    /// Acknowledge a subscription that held its live events back: `subscribed` (with
    /// `recovered` when it resumed), the replayed events, then the held ones.
    fn acknowledge(&mut self, topic: &Topic, held: &Held, replay: Option<Replay>) {
        let Some(live) = self.live() else {
            return;
        };
        // None: unsubscribed (or resubscribed) while it waited.
        let Some(released) = live.attachment.release(held, replay) else {
            return;
        };
        send_text(
            &self.socket,
            ServerMessage::Subscribed {
                topic: topic.as_str(),
                recovered: released.recovered,
            }
            .encode(),
        );
        for event in &released.events {
            self.socket.session_frame(event.ws_frame.clone());
        }
        metrics()
            .messages_delivered
            .inc_by(released.events.len() as u64);
    }

    fn unsubscribe(&mut self, topic: &str) {
        let Stage::Live(live) = &mut self.stage else {
            return;
        };
        let topic = match Topic::parse(topic) {
            Ok(t) => t,
            Err(why) => return Self::reply_error(&self.socket, ErrorCode::BadRequest, why),
        };
        let channel = ChannelKey::new(&live.attachment.identity().org, &topic);
        live.attachment.unsubscribe(&channel);
        send_text(
            &self.socket,
            ServerMessage::Unsubscribed {
                topic: topic.as_str(),
            }
            .encode(),
        );
    }

    /// A topic this client may publish or stream to, per `auth.client_publish`.
    fn publishable(&self, topic: &str) -> Result<Topic, (ErrorCode, String)> {
        let topic = Topic::parse(topic).map_err(|why| (ErrorCode::BadRequest, why.to_string()))?;
        if self.node.client_publish.iter().any(|p| p.matches(&topic)) {
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
            Err((code, why)) => return Self::reply_error(&self.socket, code, why),
        };
        let event = event.unwrap_or_else(|| "message".into());
        if let Err(why) = validate_event_name(&event) {
            return Self::reply_error(&self.socket, ErrorCode::BadRequest, why);
        }
        let limit = self.node.settings.limits.client_event_bytes;
        // A JSON value always serialises; were it not to, it would count as too large.
        let size = serde_json::to_vec(&data).map_or(usize::MAX, |d| d.len());
        if size > limit {
            return Self::reply_error(
                &self.socket,
                ErrorCode::BadRequest,
                format!("data is {size} bytes of JSON; client events may hold at most {limit}"),
            );
        }
        let Some(request) = self.request(topic, PublishBody::Json { event, data }) else {
            return;
        };
        let broker = self.node.broker.clone();
        ctx.spawn(
            async move { broker.publish(request).await }
                .into_actor(self)
                .map(|result, this: &mut Self, _| {
                    if let Err(e) = result {
                        Self::reply_error(&this.socket, ErrorCode::Unavailable, e);
                    }
                }),
        );
    }

    fn request(&self, topic: Topic, body: PublishBody) -> Option<PublishRequest> {
        let live = self.live()?;
        Some(PublishRequest {
            org: live.attachment.identity().org.clone(),
            topic,
            body,
            sender: Some(EventSender {
                user: live.attachment.identity().user.to_string(),
                conn_id: live.attachment.conn().to_string(),
            }),
        })
    }

    fn on_binary(&mut self, bytes: Bytes, ctx: &mut WebsocketContext<Self>) {
        let Some(topic) = self.live().and_then(|l| l.stream_to.clone()) else {
            return self.close(
                ctx,
                &Close::UnsupportedData("binary frame without a stream"),
            );
        };
        if !self.within_budget(ctx, true) {
            return;
        }
        // Browser events are bounded by `limits.client_event_bytes`, binary ones included
        // (SPEC section 7): the frame limit alone would let one page relay 64 KiB frames.
        let limit = self.node.settings.limits.client_event_bytes;
        if bytes.len() > limit {
            return Self::reply_error(
                &self.socket,
                ErrorCode::BadRequest,
                format!(
                    "binary frame of {} bytes; client events may hold at most {limit}",
                    bytes.len()
                ),
            );
        }
        if let Some(request) = self.request(topic, PublishBody::Binary(bytes)) {
            self.node.broker.publish_detached(request);
        }
    }

    /// Assemble a fragmented message and handle it as one once its last fragment is in. The
    /// whole message is held to `limits.max_frame_bytes`, like a single frame (1009 past it);
    /// the codec has already refused a fragment out of sequence.
    fn on_fragment(&mut self, item: Item, ctx: &mut WebsocketContext<Self>) {
        let limit = self.node.settings.limits.max_frame_bytes;
        let Stage::Live(live) = &mut self.stage else {
            return;
        };
        let (first, data, last) = match item {
            Item::FirstText(data) => (Some(false), data, false),
            Item::FirstBinary(data) => (Some(true), data, false),
            Item::Continue(data) => (None, data, false),
            Item::Last(data) => (None, data, true),
        };
        if let Some(binary) = first {
            live.fragments = Some(Box::new(Fragments {
                binary,
                bytes: BytesMut::new(),
            }));
        }
        let Some(fragments) = live.fragments.as_mut() else {
            return self.close(ctx, &Close::ProtocolError);
        };
        if fragments.bytes.len() + data.len() > limit {
            live.fragments = None;
            return self.close(ctx, &Close::FrameTooLarge { limit });
        }
        fragments.bytes.extend_from_slice(&data);
        if !last {
            return;
        }
        let Some(fragments) = live.fragments.take() else {
            return;
        };
        let Fragments { binary, bytes } = *fragments;
        if binary {
            self.on_binary(bytes.freeze(), ctx);
        } else {
            match std::str::from_utf8(&bytes) {
                Ok(text) => self.on_text(text, ctx),
                Err(_) => self.close(ctx, &Close::ProtocolError),
            }
        }
    }
}

/// Queue a text frame on the socket, after what the session wrote before.
fn send_text(socket: &Socket, text: impl AsRef<[u8]>) {
    socket.session_frame(server_frame(text.as_ref(), OpCode::Text));
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for WsSession {
    fn handle(&mut self, item: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        if self.live().is_none() {
            return;
        }
        self.socket.heard();
        match item {
            Ok(ws::Message::Text(text)) => self.on_text(&text, ctx),
            Ok(ws::Message::Binary(bytes)) => self.on_binary(bytes, ctx),
            // A Ping costs its answer like any message: it counts against the budget.
            Ok(ws::Message::Ping(payload)) => {
                if self.within_budget(ctx, false) {
                    ctx.pong(&payload);
                }
            }
            Ok(ws::Message::Pong(_)) | Ok(ws::Message::Nop) => {}
            Ok(ws::Message::Close(reason)) => {
                self.socket.shared().borrow_mut().closing = true;
                ctx.close(reason);
                ctx.stop();
            }
            Ok(ws::Message::Continuation(item)) => self.on_fragment(item, ctx),
            Err(ws::ProtocolError::Overflow) => {
                let limit = self.node.settings.limits.max_frame_bytes;
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
                send_text(&self.socket, ServerMessage::Reconnect { after_ms }.encode());
                self.close(ctx, &Close::Restarting);
            }
        }
    }
}

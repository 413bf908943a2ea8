//! `GET /sse?topic=calls&topic=call:abc`: the fallback transport for networks that block
//! WebSockets. Same checks as the WebSocket handshake (per-IP budget, origin, session,
//! draining, connection cap), answered as HTTP 429/403/401/503; then a stream of
//! `id:`/`event:`/`data:` records. Each record's `id:` is a cursor over every topic of the
//! stream (`calls=1700000000000-3,call:abc=1700000000000-1`), so the `Last-Event-ID` the
//! browser sends on reconnect resumes every topic exactly; a plain event id is accepted too
//! and applies to all topics, like `since`.
//!
//! Each stream is an actor attached to the node like a WebSocket session (the same
//! [`super::attach`] lifecycle); its records go through a bounded channel into the response
//! body, and a client too slow to drain it is closed as a slow consumer. actix writes a body
//! only as the socket takes it and has no write timeout, so the stream keeps a handle on its
//! connection ([`Connection`]) to end it: at once when the stream ends as a slow consumer,
//! and when the response has taken nothing for `heartbeat.timeout_ms` (like the WebSocket
//! writer's stall timeout), whether the stream still runs or only its last records wait.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_http::Extensions;
use actix_session::Session;
use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use futures_util::Stream;
use serde_json::json;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::attach::{Admission, Admitted, Attachment, Held};
use super::handshake::{admit, over_handshake_budget, HttpRefusal};
use super::identity::request_identity;
use crate::broker::{Replay, CONFIRM_TIMEOUT};
use crate::core::close::Close;
use crate::core::event::{Event, Payload};
use crate::core::ids::{ChannelKey, EventId, Topic};
use crate::core::metrics::metrics;
use crate::core::wire::ServerMessage;
use crate::delivery::registry::{Control, Flush};
use crate::node::Node;

pub(crate) async fn stream(
    req: HttpRequest,
    node: web::Data<Node>,
    session: Session,
    query: web::Query<Vec<(String, String)>>,
) -> HttpResponse {
    if let Some(refusal) = over_handshake_budget(&node, req.peer_addr(), req.headers()) {
        return refusal.into_response();
    }
    let mut topics = Vec::new();
    for (key, value) in query.into_inner() {
        if key != "topic" {
            continue;
        }
        match Topic::parse(&value) {
            Ok(t) if !topics.contains(&t) => topics.push(t),
            Ok(_) => {}
            Err(e) => {
                return HttpResponse::BadRequest()
                    .json(json!({"error":"bad_request","field":"topic","message":e.to_string()}))
            }
        }
    }
    let max = node.settings.limits.max_subscriptions;
    if topics.is_empty() || topics.len() > max {
        return HttpResponse::BadRequest().json(json!({
            "error":"bad_request","field":"topic",
            "message":format!("give 1 to {max} topics as ?topic=calls&topic=call:abc"),
        }));
    }
    let resume = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(Cursor::parse);

    let node = node.into_inner();
    let identity = request_identity(&node, &req, &session);
    let admitted = match admit(&node, req.headers(), identity, true).await {
        Admission::Admitted(admitted) => admitted,
        Admission::Refused(close) => {
            metrics().reject(close.rejection_label());
            return HttpRefusal::of_close(&close).into_response();
        }
    };

    let (records, body) = mpsc::channel::<Bytes>(node.settings.limits.outbound_queue);
    let connection = req.conn_data::<Connection>().cloned();
    let ender = Ender(connection.as_ref().map(|c| Rc::downgrade(&c.0)));
    let taken = Rc::new(Taken {
        last: Cell::new(Instant::now()),
        waiting: Cell::new(true),
    });
    let stall_after = Duration::from_millis(node.settings.heartbeat.timeout_ms);
    actix::spawn(watch_stalls(
        Rc::downgrade(&taken),
        ender.clone(),
        stall_after,
    ));
    let stream = SseStream {
        node,
        admitted: Some(admitted),
        topics,
        resume,
        records,
        connection: ender,
        attachment: None,
        cursor: Cursor::default(),
    };
    stream.start();
    let body = Body {
        records: body,
        taken,
        _connection: connection,
    };
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        // nginx: deliver each record as it comes instead of buffering the response.
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body)
}

/// The TCP connection a request came on, as a second handle to the socket, put in each
/// connection's data as it opens ([`Connection::remember`]). The response body holds it, so
/// it goes with the response; everything else holds an [`Ender`].
#[derive(Clone)]
pub(crate) struct Connection(Rc<socket2::Socket>);

impl Connection {
    /// For `HttpService::on_connect_ext`: remember the connection, if it can be duplicated.
    pub(crate) fn remember(io: &TcpStream, data: &mut Extensions) {
        match socket2::SockRef::from(io).try_clone() {
            Ok(socket) => {
                data.insert(Connection(Rc::new(socket)));
            }
            Err(e) => log::warn!(
                "cannot keep a handle on a connection; SSE streams on it cannot be cut off: {e}"
            ),
        }
    }
}

/// Ends a response's connection while the response lives (and does nothing after).
#[derive(Clone)]
struct Ender(Option<Weak<socket2::Socket>>);

impl Ender {
    /// Reset the connection: actix's blocked write fails and the response is dropped, and the
    /// kernel drops what was still unsent instead of holding it for a client that takes
    /// nothing.
    fn end(&self) {
        let Some(socket) = self.0.as_ref().and_then(Weak::upgrade) else {
            return;
        };
        let _ = socket.set_linger(Some(Duration::ZERO));
        let _ = socket.shutdown(std::net::Shutdown::Both);
    }
}

/// When the response body last handed actix a record, and whether it has nothing to hand
/// (actix is waiting on it, not on the socket).
struct Taken {
    last: Cell<Instant>,
    waiting: Cell<bool>,
}

/// The response body: the stream's records, as actix takes them.
struct Body {
    records: mpsc::Receiver<Bytes>,
    taken: Rc<Taken>,
    _connection: Option<Connection>,
}

impl Stream for Body {
    type Item = Result<Bytes, actix_web::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let polled = self.records.poll_recv(cx);
        self.taken.waiting.set(polled.is_pending());
        if let Poll::Ready(Some(_)) = polled {
            self.taken.last.set(Instant::now());
        }
        polled.map(|record| record.map(Ok))
    }
}

/// End the response once it has taken nothing for `stall_after` while actix was blocked on
/// the socket (not waiting for records). Runs until the response is gone, so it also ends
/// one whose stream has stopped but whose last records still wait for the client.
async fn watch_stalls(taken: Weak<Taken>, connection: Ender, stall_after: Duration) {
    loop {
        let wait = match taken.upgrade() {
            None => return,
            Some(taken) if taken.waiting.get() => stall_after,
            Some(taken) => match stall_after.checked_sub(taken.last.get().elapsed()) {
                Some(left) if !left.is_zero() => left,
                _ => {
                    metrics().slow_consumer_disconnects.inc();
                    log::info!("ending an SSE response that took nothing for {stall_after:?}");
                    connection.end();
                    return;
                }
            },
        };
        tokio::time::sleep(wait).await;
    }
}

/// Last event id per topic, as carried in the SSE `id:` field.
#[derive(Debug, Default, Clone, PartialEq)]
struct Cursor {
    /// Applies to topics without their own entry (a plain `Last-Event-ID`).
    all: Option<EventId>,
    topics: BTreeMap<String, EventId>,
}

impl Cursor {
    fn parse(raw: &str) -> Self {
        if let Some(id) = EventId::parse(raw.trim()) {
            return Self {
                all: Some(id),
                topics: BTreeMap::new(),
            };
        }
        let topics = raw
            .split(',')
            .filter_map(|part| {
                let (topic, id) = part.split_once('=')?;
                Some((topic.trim().to_string(), EventId::parse(id.trim())?))
            })
            .collect();
        Self { all: None, topics }
    }

    fn since(&self, topic: &str) -> Option<EventId> {
        self.topics.get(topic).copied().or(self.all)
    }

    fn render(&self) -> String {
        let parts: Vec<String> = self
            .topics
            .iter()
            .map(|(topic, id)| format!("{topic}={id}"))
            .collect();
        parts.join(",")
    }
}

struct SseStream {
    node: Arc<Node>,
    /// The handshake's grant, until the stream attaches.
    admitted: Option<Admitted>,
    topics: Vec<Topic>,
    resume: Option<Cursor>,
    records: mpsc::Sender<Bytes>,
    connection: Ender,
    /// Set once started; dropping it detaches the stream.
    attachment: Option<Attachment>,
    cursor: Cursor,
}

impl SseStream {
    /// Queue one record; a full queue means the client cannot keep up.
    fn send(&mut self, record: String, ctx: &mut Context<Self>) -> bool {
        match self.records.try_send(Bytes::from(record)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics().slow_consumer_disconnects.inc();
                self.end(&Close::SlowConsumer, ctx);
                // The client takes nothing: end its response too, rather than hold the
                // queued records for it until the stall timeout.
                self.connection.end();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                ctx.stop();
                false
            }
        }
    }

    fn send_event(&mut self, event: &Event, ctx: &mut Context<Self>) -> bool {
        let Payload::Text(frame) = &event.payload else {
            return true; // binary audio has no SSE form
        };
        self.cursor
            .topics
            .insert(event.channel.topic().to_string(), event.id);
        let record = format!(
            "id: {}\nevent: {}\ndata: {}\n\n",
            self.cursor.render(),
            event.name,
            &**frame
        );
        metrics()
            .delivery_seconds
            .observe(event.received_at.elapsed().as_secs_f64());
        self.send(record, ctx)
    }

    /// Tell the client why the stream ends, then end it.
    fn end(&mut self, close: &Close, ctx: &mut Context<Self>) {
        let record = format!(
            "event: close\ndata: {{\"type\":\"close\",\"code\":{},\"reason\":{}}}\n\n",
            close.code(),
            json!(close.reason())
        );
        let _ = self.records.try_send(Bytes::from(record));
        ctx.stop();
    }

    /// Subscribe every topic of the stream, then send `welcome`, its only sign of being
    /// subscribed. Clustered, a channel new to this node counts as subscribed once Redis has
    /// confirmed the node's SUBSCRIBE (at most [`CONFIRM_TIMEOUT`]): an event published right
    /// after `welcome` would otherwise be missed. Live events arriving meanwhile are held and
    /// follow `welcome`; a resumed topic's follow its replay, read after `welcome`.
    fn subscribe_all(&mut self, welcome: String, ctx: &mut Context<Self>) {
        let Some(attachment) = self.attachment.as_ref() else {
            return;
        };
        let org = attachment.identity().org.clone();
        let mut held = Vec::with_capacity(self.topics.len());
        let mut confirmations = Vec::new();
        for topic in &self.topics {
            let channel = ChannelKey::new(&org, topic);
            if !self.node.broker.is_live(&channel) {
                confirmations.push(attachment.confirmed(channel.clone()));
            }
            let since = self.resume.as_ref().and_then(|c| c.since(topic.as_str()));
            if let Some(since) = since {
                // Every record's cursor names the resumed topics, replayed yet or not.
                self.cursor.topics.insert(topic.to_string(), since);
            }
            held.push((
                topic.clone(),
                attachment.subscribe_held(channel, false, None),
                since,
            ));
        }
        let confirmed = futures_util::future::join_all(confirmations);
        ctx.spawn(confirmed.into_actor(self).map(move |confirmed, this, ctx| {
            if confirmed.contains(&false) {
                log::warn!(
                    "SSE stream {}: Redis has not confirmed every subscription within {CONFIRM_TIMEOUT:?}; welcomed anyway, those events flow once Redis is back",
                    this.attachment.as_ref().map(|a| a.conn().to_string()).unwrap_or_default()
                );
            }
            if !this.send(welcome, ctx) {
                return;
            }
            for (topic, held, since) in held {
                match since {
                    Some(since) => this.replay(topic, held, since, ctx),
                    None => {
                        if !this.release(&topic, &held, None, ctx) {
                            return;
                        }
                    }
                }
            }
        }));
    }

    /// Send `topic`'s events after `since` from history, then the live ones held meanwhile.
    fn replay(&mut self, topic: Topic, held: Held, since: EventId, ctx: &mut Context<Self>) {
        let Some(attachment) = self.attachment.as_ref() else {
            return;
        };
        let records = self.records.clone();
        // The records the stream can still queue, less one for a `resync` notice.
        let room = move || records.capacity().saturating_sub(1);
        let fetch = attachment.replay(held.channel().clone(), since, room);
        ctx.spawn(fetch.into_actor(self).map(move |replay, this, ctx| {
            this.release(&topic, &held, Some(replay), ctx);
        }));
    }

    /// Send what a held topic releases: a `resync` notice when history no longer reached
    /// back to the resume point, then its events. False once the stream has ended.
    fn release(
        &mut self,
        topic: &Topic,
        held: &Held,
        replay: Option<Replay>,
        ctx: &mut Context<Self>,
    ) -> bool {
        let Some(released) = self
            .attachment
            .as_ref()
            .and_then(|a| a.release(held, replay))
        else {
            return true;
        };
        if released.recovered == Some(false) {
            let notice = format!(
                "event: resync\ndata: {}\n\n",
                ServerMessage::Subscribed {
                    topic: topic.as_str(),
                    recovered: Some(false),
                }
                .encode()
            );
            if !self.send(notice, ctx) {
                return false;
            }
        }
        self.send_all(released.events, ctx)
    }

    /// Send events in order, counted as delivered; false once the stream has ended.
    fn send_all(&mut self, events: Vec<Arc<Event>>, ctx: &mut Context<Self>) -> bool {
        let sent = events
            .iter()
            .take_while(|event| self.send_event(event, ctx))
            .count();
        metrics().messages_delivered.inc_by(sent as u64);
        sent == events.len()
    }
}

impl Actor for SseStream {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let Some(admitted) = self.admitted.take() else {
            return ctx.stop();
        };
        let address = ctx.address();
        let attachment = Attachment::attach(
            self.node.clone(),
            admitted,
            Default::default(),
            Some(address.clone().recipient()),
            address.recipient(),
        );
        let welcome = format!(
            "retry: 2000\nevent: welcome\ndata: {}\n\n",
            attachment.welcome()
        );
        self.attachment = Some(attachment);
        self.subscribe_all(welcome, ctx);
        // A comment line keeps proxies from timing the stream out and tells us when the
        // client has gone (the body channel closes).
        let interval = Duration::from_millis(self.node.settings.heartbeat.interval_ms);
        ctx.run_interval(interval, |this, ctx| {
            this.send(": ping\n\n".to_string(), ctx);
        });
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        // Dropping the attachment detaches the stream from the node.
        self.attachment = None;
    }
}

impl Handler<Flush> for SseStream {
    type Result = ();

    fn handle(&mut self, _: Flush, ctx: &mut Self::Context) {
        let Some(attachment) = &self.attachment else {
            return;
        };
        let mut batch = Vec::new();
        attachment.link().outbox.drain_into(&mut batch);
        let mut shared = attachment.shared().borrow_mut();
        let wanted = batch
            .into_iter()
            .filter_map(|event| shared.subscriptions.admit_live(event))
            .collect();
        drop(shared);
        self.send_all(wanted, ctx);
    }
}

impl Handler<Control> for SseStream {
    type Result = ();

    fn handle(&mut self, msg: Control, ctx: &mut Self::Context) {
        match msg {
            Control::Close(close) => self.end(&close, ctx),
            Control::Drain { after_ms } => {
                let record = format!(
                    "retry: {after_ms}\nevent: reconnect\ndata: {}\n\n",
                    ServerMessage::Reconnect { after_ms }.encode()
                );
                let _ = self.records.try_send(Bytes::from(record));
                self.end(&Close::Restarting, ctx);
            }
        }
    }
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    /// The cursor round-trips through the `id:` field and a plain id applies to every topic.
    #[test]
    fn cursor() {
        let mut c = Cursor::default();
        c.topics.insert("calls".into(), EventId { ms: 5, seq: 1 });
        c.topics.insert("call:a".into(), EventId { ms: 7, seq: 0 });
        let parsed = Cursor::parse(&c.render());
        assert_eq!(parsed, c);
        assert_eq!(parsed.since("calls"), Some(EventId { ms: 5, seq: 1 }));
        assert_eq!(parsed.since("other"), None);
        let plain = Cursor::parse("9-2");
        assert_eq!(plain.since("anything"), Some(EventId { ms: 9, seq: 2 }));
    }
}

//! `GET /sse?topic=calls&topic=call:abc`: the fallback transport for networks that block
//! WebSockets. Same checks as the WebSocket handshake (per-IP budget, origin, session,
//! draining, connection cap), answered as HTTP 429/403/401/503; then a stream of
//! `id:`/`event:`/`data:` records. Each record's `id:` is a cursor over every topic of the
//! stream (`calls=1700000000000-3,call:abc=1700000000000-1`), so the `Last-Event-ID` the
//! browser sends on reconnect resumes every topic exactly; a plain event id is accepted too
//! and applies to all topics, like `since`.
//!
//! Each stream is an actor registered with the [`Registry`] like a WebSocket session; its
//! records go through a bounded channel into the response body, and a client too slow to
//! drain it is closed as a slow consumer.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix_session::Session;
use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use serde_json::json;
use tokio::sync::mpsc;

use crate::auth::Identity;
use crate::broker::{Interest, CONFIRM_TIMEOUT};
use crate::close::Close;
use crate::handshake::{admit, over_handshake_budget, request_identity, HttpRefusal};
use crate::metrics::metrics;
use crate::protocol::{ChannelKey, ConnId, EventId, ServerMessage, Topic};
use crate::registry::{Control, Event, Flush, Outbox, Payload, SessionLink};
use crate::server::Hub;
use crate::session::Admission;
use crate::subscriptions::Subscriptions;

pub async fn stream(
    req: HttpRequest,
    hub: web::Data<Hub>,
    session: Session,
    query: web::Query<Vec<(String, String)>>,
) -> HttpResponse {
    if let Some(refusal) = over_handshake_budget(&hub, req.peer_addr(), req.headers()) {
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
                    .json(json!({"error":"bad_request","field":"topic","message":e}))
            }
        }
    }
    let max = hub.settings.limits.max_subscriptions;
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

    let hub = hub.into_inner();
    let identity = request_identity(&hub, &req, &session);
    let (identity, conn, slot) = match admit(&hub, req.headers(), identity, true).await {
        Admission::Admitted {
            identity,
            conn,
            slot,
        } => (identity, conn, slot),
        Admission::Refused(close) => {
            metrics().reject(close.rejection_label());
            return HttpRefusal::of_close(&close).into_response();
        }
    };

    let (records, body) = mpsc::channel::<Bytes>(hub.settings.limits.outbound_queue);
    let stream = SseStream {
        hub,
        identity,
        conn,
        slot,
        topics,
        resume,
        records,
        link: None,
        subscriptions: Subscriptions::default(),
        cursor: Cursor::default(),
    };
    stream.start();
    let body = futures_util::stream::unfold(body, |mut body| async move {
        body.recv()
            .await
            .map(|record| (Ok::<_, actix_web::Error>(record), body))
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        // nginx: deliver each record as it comes instead of buffering the response.
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body)
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
    hub: Arc<Hub>,
    identity: Identity,
    conn: ConnId,
    slot: String,
    topics: Vec<Topic>,
    resume: Option<Cursor>,
    records: mpsc::Sender<Bytes>,
    link: Option<Arc<SessionLink>>,
    subscriptions: Subscriptions,
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
    /// follow `welcome` (and a resumed topic's replay).
    fn subscribe_all(&mut self, welcome: String, ctx: &mut Context<Self>) {
        let Some(link) = self.link.clone() else {
            return;
        };
        let mut held = Vec::with_capacity(self.topics.len());
        let mut confirmations = Vec::new();
        for topic in self.topics.clone() {
            let channel = ChannelKey::new(&self.identity.org, &topic);
            if self.hub.registry.subscribe(&channel, &link, false, None) {
                self.hub
                    .broker
                    .interest
                    .do_send(Interest::Opened(channel.clone()));
            }
            if !self.hub.broker.is_live(&channel) {
                confirmations.push(self.hub.broker.until_live(channel.clone(), CONFIRM_TIMEOUT));
            }
            let hold = self.subscriptions.insert_replaying(channel.clone());
            let since = self.resume.as_ref().and_then(|c| c.since(topic.as_str()));
            if let Some(since) = since {
                // Every record's cursor names the resumed topics, replayed yet or not.
                self.cursor.topics.insert(topic.to_string(), since);
            }
            held.push((topic, channel, hold, since));
        }
        let confirmed = futures_util::future::join_all(confirmations);
        ctx.spawn(confirmed.into_actor(self).map(move |confirmed, this, ctx| {
            if confirmed.contains(&false) {
                log::warn!(
                    "SSE stream {}: Redis has not confirmed every subscription within {CONFIRM_TIMEOUT:?}; welcomed anyway, those events flow once Redis is back",
                    this.conn
                );
            }
            if !this.send(welcome, ctx) {
                return;
            }
            for (topic, channel, hold, since) in held {
                match since {
                    Some(since) => this.replay(topic, channel, hold, since, ctx),
                    None => {
                        let events = this.subscriptions.finish_replay(&channel, hold, Vec::new());
                        if !this.send_all(events.unwrap_or_default(), ctx) {
                            return;
                        }
                    }
                }
            }
        }));
    }

    /// Send `topic`'s events after `since` from history, then the live ones held meanwhile.
    fn replay(
        &mut self,
        topic: Topic,
        channel: ChannelKey,
        hold: u64,
        since: EventId,
        ctx: &mut Context<Self>,
    ) {
        let fetch = self.hub.broker.replay_since(channel.clone(), since);
        ctx.spawn(fetch.into_actor(self).map(move |replay, this, ctx| {
            if !replay.recovered {
                let notice = format!(
                    "event: resync\ndata: {}\n\n",
                    ServerMessage::Subscribed {
                        topic: topic.as_str(),
                        recovered: Some(false),
                    }
                    .encode()
                );
                if !this.send(notice, ctx) {
                    return;
                }
            }
            if let Some(events) = this
                .subscriptions
                .finish_replay(&channel, hold, replay.events)
            {
                this.send_all(events, ctx);
            }
        }));
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
        let hub = self.hub.clone();
        let settings = &hub.settings;
        let address = ctx.address();
        let link = Arc::new(SessionLink {
            conn: self.conn,
            outbox: Outbox::new(
                settings.limits.outbound_queue,
                settings.limits.slow_consumer,
            ),
            flush: Some(address.clone().recipient()),
            control: address.recipient(),
        });
        self.hub.registry.register(
            link.clone(),
            self.identity.user_key(),
            self.slot.clone(),
            self.identity.sid.clone(),
        );
        self.link = Some(link);
        metrics().connections.inc();
        let welcome = format!(
            "retry: 2000\nevent: welcome\ndata: {}\n\n",
            ServerMessage::Welcome {
                conn_id: self.conn.to_string(),
                user: self.identity.user.as_str(),
                org: self.identity.org.as_str(),
                heartbeat_ms: settings.heartbeat.interval_ms,
            }
            .encode()
        );
        self.subscribe_all(welcome, ctx);
        // A comment line keeps proxies from timing the stream out and tells us when the
        // client has gone (the body channel closes).
        let interval = Duration::from_millis(settings.heartbeat.interval_ms);
        ctx.run_interval(interval, |this, ctx| {
            this.send(": ping\n\n".to_string(), ctx);
        });
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        let Some(link) = self.link.take() else {
            return;
        };
        metrics().connections.dec();
        let emptied = self
            .hub
            .registry
            .unregister(link.conn, self.subscriptions.channels());
        for channel in emptied {
            self.hub.broker.interest.do_send(Interest::Closed(channel));
        }
        let caps = self.hub.caps.clone();
        let user_key = self.identity.user_key();
        let slot = std::mem::take(&mut self.slot);
        actix::spawn(async move { caps.release(&user_key, &slot).await });
    }
}

impl Handler<Flush> for SseStream {
    type Result = ();

    fn handle(&mut self, _: Flush, ctx: &mut Self::Context) {
        let Some(link) = self.link.clone() else {
            return;
        };
        let mut batch = Vec::new();
        link.outbox.drain_into(&mut batch);
        let wanted = batch
            .into_iter()
            .filter_map(|event| self.subscriptions.admit_live(event))
            .collect();
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

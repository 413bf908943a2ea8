//! `switchboard voice-echo`: the worker that answers the voice test page (`/voice-test`). Every
//! audio frame a browser streams to `voice:<id>:in` goes back, untouched, to `voice:<id>:out`,
//! so the page hears itself and measures the round trip through the hub.
//!
//! Clustered (`redis.url` set): straight from and to Redis. One PSUBSCRIBE `sb:*:voice:*:in`
//! sees every session of every org from its first frame, with nothing to announce; each binary
//! message (the broker's marker byte first) is PUBLISHed to the matching `:out` channel as it
//! came, marker included, which is exactly what a pod's publish of a binary frame looks like.
//!
//! Embedded (no Redis to listen on): through the hub's public API, as any backend service
//! would. It signs a JWT with `auth.jwt_secret` (`POST /auth/session`), opens a WebSocket,
//! and learns of sessions on its org's `voice:lobby:in` topic, where the page announces its id
//! (`voice.session`) until the echo answers. A WebSocket session belongs to one org, so the
//! worker serves one org (`--org`); an announcement on an authenticated topic is all the hub
//! has to offer for that, where a pattern subscription across orgs would be a new privilege.
//! Each voice session then gets a socket of its own, subscribed `binary:true` to its `in`
//! topic: binary frames carry no topic, so the socket is what says which session a frame
//! belongs to, without trusting anything inside the frame. Frames go back through
//! `POST /api/publish` as binary bodies (publish key from `api.publish_keys`).

use std::cell::RefCell;
use std::collections::HashSet;
use std::rc::Rc;
use std::time::Duration;

use actix_http::ws;
use awc::BoxedSocket;
use bytestring::ByteString;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};

use crate::broker::redis::BINARY_MARK;
use crate::config::Settings;
use crate::core::ids::{unix_ms, ChannelKey, InvalidId, OrgId, Topic};
use crate::http::auth::sign_jwt;

/// The topic where pages announce their voice sessions to an embedded echo.
pub(crate) const LOBBY_TOPIC: &str = "voice:lobby:in";
/// The Redis pattern of every org's inbound voice channels.
const REDIS_PATTERN: &str = "sb:*:voice:*:in";
/// A session socket with no audio for this long is closed (the page went away).
const IDLE: Duration = Duration::from_secs(20);
/// At most this many sessions are echoed at once (embedded): each holds a socket and a login.
const MAX_SESSIONS: usize = 64;
/// Pause before the first retry after the hub or Redis went away; doubles up to the cap.
const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_CAP: Duration = Duration::from_secs(10);
/// How long one HTTP request to the hub may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// Options of `switchboard voice-echo` beyond the loaded configuration.
#[derive(Debug, Clone)]
pub struct EchoOptions {
    /// Base URL of the hub (embedded); None: `http://<server.bind>:<server.port>`.
    pub url: Option<String>,
    /// The org whose sessions an embedded echo answers.
    pub org: String,
    /// The Origin its WebSockets present (embedded); None: the hub's own URL, which a
    /// development configuration admits. Elsewhere, an entry of `origins.allowed`.
    pub origin: Option<String>,
}

/// Why the echo cannot start or lost its connection.
#[derive(Debug, thiserror::Error)]
pub enum EchoError {
    #[error("--org: {0}")]
    BadOrg(#[from] InvalidId),
    #[error(
        "embedded mode needs {0} in the configuration (the echo logs in and publishes with it)"
    )]
    Missing(&'static str),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("signing the echo's token: {0}")]
    Token(#[from] jsonwebtoken::errors::Error),
    #[error("{endpoint}: {source}")]
    Http {
        endpoint: String,
        #[source]
        source: awc::error::SendRequestError,
    },
    #[error("{endpoint} answered {status}: {body}")]
    Refused {
        endpoint: String,
        status: u16,
        body: String,
    },
    #[error("POST /auth/session set no session cookie")]
    NoCookie,
    #[error("WebSocket {url}: {detail}")]
    Connect { url: String, detail: String },
    #[error("WebSocket: {0}")]
    Socket(#[from] ws::ProtocolError),
    #[error("the hub closed the socket: {0}")]
    Closed(String),
}

/// Echo until the process ends: from Redis when the configuration is clustered, else through
/// the hub at `options.url`. Returns only when it cannot start (a bad org, missing secrets).
pub async fn run(settings: &Settings, options: EchoOptions) -> Result<(), EchoError> {
    match &settings.redis.url {
        Some(url) => run_redis(url).await,
        None => run_embedded(HubApi::new(settings, options)?).await,
    }
}

// ---- clustered: straight from and to Redis ------------------------------------------------

async fn run_redis(url: &str) -> Result<(), EchoError> {
    let client = redis::Client::open(url)?;
    let mut backoff = BACKOFF_START;
    loop {
        match echo_redis(&client).await {
            Ok(()) => backoff = BACKOFF_START,
            Err(e) => log::warn!("voice-echo: redis: {e}; again in {backoff:?}"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_CAP);
    }
}

/// One life of the Redis connections: until the subscription ends.
async fn echo_redis(client: &redis::Client) -> Result<(), EchoError> {
    let mut publisher = client.get_multiplexed_async_connection().await?;
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.psubscribe(REDIS_PATTERN).await?;
    log::info!("voice-echo: ready, echoing {REDIS_PATTERN} from redis");
    let mut messages = pubsub.on_message();
    while let Some(message) = messages.next().await {
        let payload = message.get_payload_bytes();
        // JSON events on the topic (the lobby, client publishes) are not audio.
        if payload.first() != Some(&BINARY_MARK) {
            continue;
        }
        let Some(out) = out_channel(message.get_channel_name()) else {
            continue;
        };
        // In order, one at a time: a session's frames must come back in the order they went.
        redis::AsyncCommands::publish::<_, _, ()>(&mut publisher, out.as_str(), payload).await?;
    }
    Ok(())
}

/// The `:out` channel answering an inbound voice channel (`sb:{org}:voice:{id}:in`).
fn out_channel(inbound: &str) -> Option<ChannelKey> {
    let (org, topic) = ChannelKey::parse(inbound)?;
    let out = out_topic(topic.as_str())?;
    Some(ChannelKey::new(&org, &out))
}

/// `voice:{id}:out` for `voice:{id}:in`; None for anything else, the lobby included.
fn out_topic(inbound: &str) -> Option<Topic> {
    let id = inbound.strip_prefix("voice:")?.strip_suffix(":in")?;
    if id.is_empty() || id.contains(':') || inbound == LOBBY_TOPIC {
        return None;
    }
    Topic::parse(&format!("voice:{id}:out")).ok()
}

// ---- embedded: through the hub's public API -----------------------------------------------

/// What the embedded echo needs to speak to the hub.
struct HubApi {
    base: String,
    origin: String,
    org: OrgId,
    jwt_secret: String,
    issuer: Option<String>,
    audience: Option<String>,
    publish_key: String,
    max_frame_bytes: usize,
    http: awc::Client,
    /// Sessions being echoed now, so a repeated announcement opens nothing new.
    active: RefCell<HashSet<String>>,
}

type Socket = actix_codec::Framed<BoxedSocket, ws::Codec>;

impl HubApi {
    fn new(settings: &Settings, options: EchoOptions) -> Result<Rc<Self>, EchoError> {
        let org = OrgId::parse(&options.org)?;
        let jwt_secret =
            (settings.auth.jwt_secret.clone()).ok_or(EchoError::Missing("auth.jwt_secret"))?;
        let publish_key = (settings.api.publish_keys.first().cloned())
            .ok_or(EchoError::Missing("api.publish_keys"))?;
        let base = options
            .url
            .unwrap_or_else(|| format!("http://{}:{}", settings.server.bind, settings.server.port));
        let base = base.trim_end_matches('/').to_string();
        Ok(Rc::new(Self {
            origin: options.origin.unwrap_or_else(|| base.clone()),
            base,
            org,
            jwt_secret,
            issuer: settings.auth.jwt_issuer.clone(),
            audience: settings.auth.jwt_audience.clone(),
            publish_key,
            max_frame_bytes: settings.limits.max_frame_bytes,
            http: awc::Client::builder().timeout(HTTP_TIMEOUT).finish(),
            active: RefCell::default(),
        }))
    }

    /// A welcomed WebSocket logged in as `user` of the echo's org.
    async fn open(&self, user: &str) -> Result<Socket, EchoError> {
        let cookie = self.login(user).await?;
        let url = format!("{}/ws", self.base.replacen("http", "ws", 1));
        let connected = self
            .http
            .ws(&url)
            .origin(self.origin.as_str())
            .header("Cookie", cookie)
            .max_frame_size(self.max_frame_bytes)
            .connect()
            .await;
        let (_, mut socket) = connected.map_err(|e| EchoError::Connect {
            url: url.clone(),
            detail: e.to_string(),
        })?;
        match next_text(&mut socket).await? {
            message if message["type"] == "welcome" => Ok(socket),
            other => Err(EchoError::Closed(format!("expected welcome, got {other}"))),
        }
    }

    /// Log in with a token signed by the shared secret; the session cookie (`name=value`).
    async fn login(&self, user: &str) -> Result<String, EchoError> {
        let exp = unix_ms() / 1000 + 12 * 3600;
        let mut claims = json!({"sub": user, "org": self.org.as_str(), "exp": exp});
        if let Some(issuer) = &self.issuer {
            claims["iss"] = json!(issuer);
        }
        if let Some(audience) = &self.audience {
            claims["aud"] = json!(audience);
        }
        let token = sign_jwt(&claims, &self.jwt_secret)?;
        let endpoint = format!("{}/auth/session", self.base);
        let mut response = self
            .http
            .post(&endpoint)
            .send_json(&json!({ "token": token }))
            .await
            .map_err(|source| EchoError::Http {
                endpoint: endpoint.clone(),
                source,
            })?;
        if !response.status().is_success() {
            let body = response.body().await.unwrap_or_default();
            return Err(EchoError::Refused {
                endpoint,
                status: response.status().as_u16(),
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        response
            .headers()
            .get_all(actix_web::http::header::SET_COOKIE)
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| v.split(';').next())
            .find(|pair| pair.contains('='))
            .map(str::to_string)
            .ok_or(EchoError::NoCookie)
    }

    /// Send one frame back to the page: a binary publish to its `out` topic.
    async fn publish_binary(&self, topic: &Topic, frame: bytes::Bytes) -> Result<(), EchoError> {
        // Org ids and topics are validated to characters a query carries as they are.
        let endpoint = format!(
            "{}/api/publish?org={}&topic={}",
            self.base,
            self.org.as_str(),
            topic.as_str()
        );
        let mut response = self
            .http
            .post(&endpoint)
            .bearer_auth(&self.publish_key)
            .content_type("application/octet-stream")
            .send_body(frame)
            .await
            .map_err(|source| EchoError::Http {
                endpoint: endpoint.clone(),
                source,
            })?;
        if response.status().as_u16() == 202 {
            return Ok(());
        }
        let body = response.body().await.unwrap_or_default();
        Err(EchoError::Refused {
            endpoint,
            status: response.status().as_u16(),
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}

async fn run_embedded(hub: Rc<HubApi>) -> Result<(), EchoError> {
    let mut backoff = BACKOFF_START;
    loop {
        match lobby(&hub).await {
            Ok(()) => backoff = BACKOFF_START,
            Err(e) => log::warn!("voice-echo: {}: {e}; again in {backoff:?}", hub.base),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_CAP);
    }
}

/// Listen for announcements on the lobby and start an echo per new session, until the socket
/// ends.
async fn lobby(hub: &Rc<HubApi>) -> Result<(), EchoError> {
    let mut socket = hub.open("voice-echo").await?;
    send_json(
        &mut socket,
        &json!({"type": "subscribe", "topic": LOBBY_TOPIC}),
    )
    .await?;
    loop {
        let message = next_text(&mut socket).await?;
        match message["type"].as_str() {
            Some("subscribed") => log::info!(
                "voice-echo: ready, echoing voice sessions of org {} announced on {LOBBY_TOPIC} at {}",
                hub.org.as_str(),
                hub.base
            ),
            Some("event") if message["event"] == "voice.session" => {
                let Some(id) = message["data"]["session"].as_str() else {
                    continue;
                };
                let Some(inbound) = Topic::parse(&format!("voice:{id}:in")).ok() else {
                    continue;
                };
                let Some(out) = out_topic(inbound.as_str()) else {
                    continue;
                };
                let mut active = hub.active.borrow_mut();
                if active.len() >= MAX_SESSIONS || !active.insert(id.to_string()) {
                    continue;
                }
                drop(active);
                let (hub, id) = (hub.clone(), id.to_string());
                actix_web::rt::spawn(async move {
                    log::info!("voice-echo: session {id} announced by {}", message["user"]);
                    if let Err(e) = echo_session(&hub, &id, &inbound, &out).await {
                        log::warn!("voice-echo: session {id}: {e}");
                    }
                    hub.active.borrow_mut().remove(&id);
                    log::info!("voice-echo: session {id} ended");
                });
            }
            _ => {}
        }
    }
}

/// Echo one session on a socket of its own until it has been silent for [`IDLE`].
async fn echo_session(
    hub: &HubApi,
    id: &str,
    inbound: &Topic,
    out: &Topic,
) -> Result<(), EchoError> {
    // A user per session: the per-user connection cap counts browsers, not echo sessions
    // (those are bounded by MAX_SESSIONS here).
    let mut socket = hub.open(&format!("voice-echo.{id}")).await?;
    send_json(
        &mut socket,
        &json!({"type": "subscribe", "topic": inbound.as_str(), "binary": true}),
    )
    .await?;
    loop {
        let frame = match tokio::time::timeout(IDLE, socket.next()).await {
            Err(_) => return Ok(()),
            Ok(None) => return Err(EchoError::Closed("connection ended".into())),
            Ok(Some(frame)) => frame?,
        };
        match frame {
            // In order, one at a time: the frames must come back in the order they went.
            ws::Frame::Binary(audio) => hub.publish_binary(out, audio).await?,
            ws::Frame::Ping(payload) => socket.send(ws::Message::Pong(payload)).await?,
            ws::Frame::Close(reason) => return Err(EchoError::Closed(format!("{reason:?}"))),
            _ => {}
        }
    }
}

async fn send_json(socket: &mut Socket, message: &Value) -> Result<(), EchoError> {
    let text = ByteString::from(message.to_string());
    Ok(socket.send(ws::Message::Text(text)).await?)
}

/// The next text frame as JSON, answering pings on the way.
async fn next_text(socket: &mut Socket) -> Result<Value, EchoError> {
    loop {
        match socket.next().await {
            None => return Err(EchoError::Closed("connection ended".into())),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(ws::Frame::Text(text))) => {
                return Ok(serde_json::from_slice(&text).unwrap_or(Value::Null))
            }
            Some(Ok(ws::Frame::Ping(payload))) => socket.send(ws::Message::Pong(payload)).await?,
            Some(Ok(ws::Frame::Close(reason))) => {
                return Err(EchoError::Closed(format!("{reason:?}")))
            }
            Some(Ok(_)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a session's inbound voice topic has an answer, and it is the same session's `out`.
    #[test]
    fn out_topics() {
        assert_eq!(out_topic("voice:abc:in").unwrap().as_str(), "voice:abc:out");
        assert!(out_topic("voice:lobby:in").is_none());
        assert!(out_topic("voice:a:b:in").is_none());
        assert!(out_topic("voice::in").is_none());
        assert!(out_topic("calls").is_none());
        let out = out_channel("sb:42:voice:abc:in").unwrap();
        assert_eq!(out.as_str(), "sb:42:voice:abc:out");
        assert!(out_channel("sb:42:voice:abc:in:log").is_none());
    }
}

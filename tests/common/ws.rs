//! The WebSocket test client: `WsOpts` (what the handshake sends), `ws_handshake` (usable
//! against any address, a hub or nginx), `Ws` with its connect helpers and `connect_user`
//! (log in, open, read the welcome), the `Frame` a test sees, `HttpRefusal` for a handshake
//! answered without 101, and the `TestSocket` trait whose checks every WebSocket client in the
//! tests shares.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use super::auth::dev_login;
use super::process::Hub;
use super::{ORIGIN, T};

/// A handshake the server answered with something other than 101 (status 0: no HTTP answer).
#[derive(Debug, Clone)]
pub struct HttpRefusal {
    pub status: u16,
    pub body: String,
}

impl HttpRefusal {
    pub fn json_or_null(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "refusal {} body is not JSON {:?}: {e}",
                self.status, self.body
            )
        })
    }
}

/// What a client opening a socket sends.
#[derive(Debug, Clone, Default)]
pub struct WsOpts {
    pub origin: Option<String>,
    pub cookie: Option<String>,
    pub headers: Vec<(String, String)>,
    /// SO_RCVBUF for the client socket: a small one keeps the kernel from absorbing a flood
    /// on behalf of a client that does not read.
    pub recv_buffer: Option<u32>,
}

impl WsOpts {
    pub fn new(origin: Option<&str>, cookie: Option<&str>) -> Self {
        WsOpts {
            origin: origin.map(str::to_string),
            cookie: cookie.map(str::to_string),
            ..Default::default()
        }
    }
    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }
}

/// A frame as a test sees it (protocol ping/pong are handled below this level).
#[derive(Debug, Clone)]
pub enum Frame {
    /// A text frame holding JSON, with its raw text.
    Json(Value, String),
    /// A text frame that is not JSON.
    Text(String),
    Binary(Vec<u8>),
    /// A close frame (code 1005 when it carried none).
    Close(u16, String),
    /// The connection ended without a close frame.
    Ended(String),
}

impl Frame {
    /// What a test sees of the next item of a WebSocket stream (`None`: the stream ended);
    /// `None` for protocol ping/pong, which tungstenite answers itself on its next read or
    /// write.
    pub fn read(next: Option<Result<Message, tungstenite::Error>>) -> Option<Frame> {
        Some(match next {
            None => Frame::Ended("stream ended".into()),
            Some(Err(e)) => Frame::Ended(format!("{e}")),
            Some(Ok(Message::Text(t))) => {
                let t = t.to_string();
                match serde_json::from_str::<Value>(&t) {
                    Ok(v) => Frame::Json(v, t),
                    Err(_) => Frame::Text(t),
                }
            }
            Some(Ok(Message::Binary(b))) => Frame::Binary(b.to_vec()),
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => return None,
            Some(Ok(Message::Close(Some(CloseFrame { code, reason })))) => {
                Frame::Close(u16::from(code), reason.to_string())
            }
            Some(Ok(Message::Close(None))) => Frame::Close(1005, String::new()),
        })
    }
}

/// What the tests' WebSocket clients share: [`Ws`] here, read in place, and the cluster tests'
/// client with a background reader. Each says how it receives and sends; the checks built on
/// those are written once.
#[allow(async_fn_in_trait)]
pub trait TestSocket {
    /// The next frame other than ping/pong, or None if nothing came within `timeout`.
    async fn recv(&mut self, timeout: Duration) -> Option<Frame>;

    /// The next text frame as JSON; panics on timeout, binary, close or non-JSON.
    async fn next_json(&mut self, timeout: Duration) -> Value;

    async fn send_json(&mut self, v: &Value);

    /// The very next frame must be a close; returns its code and reason.
    async fn expect_only_close(&mut self, timeout: Duration) -> (u16, String) {
        match self.recv(timeout).await {
            Some(Frame::Close(code, reason)) => (code, reason),
            Some(Frame::Ended(why)) => {
                (1006, format!("connection ended without close frame: {why}"))
            }
            None => panic!("socket still open after {timeout:?} (expected only a close frame)"),
            Some(other) => panic!("expected only a close frame, got {other:?} first"),
        }
    }

    /// Send `v` and return the next JSON frame.
    async fn request(&mut self, v: &Value) -> Value {
        self.send_json(v).await;
        self.next_json(T).await
    }

    /// Subscribe to `topic` and insist on `{"type":"subscribed","topic":topic}`.
    async fn subscribe(&mut self, topic: &str) {
        let reply = self
            .request(&json!({"type": "subscribe", "topic": topic}))
            .await;
        assert_eq!(reply["type"], "subscribed", "subscribe {topic}: {reply}");
        assert_eq!(reply["topic"], topic, "subscribe {topic}: {reply}");
    }

    /// App-level ping/pong round trip: proves the socket is open and served.
    async fn assert_alive(&mut self) {
        let reply = self.request(&json!({"type": "ping"})).await;
        assert_eq!(reply, json!({"type": "pong"}), "app ping");
    }
}

/// A client WebSocket.
pub struct Ws {
    inner: WebSocketStream<TcpStream>,
    /// Protocol pings received (each answered by tungstenite with a pong).
    pub pings_seen: usize,
    /// Raw text of the last JSON frame `next_json` returned.
    pub last_text: String,
    /// Data frames `expect_close` skipped on its way to the close.
    pub skipped: Vec<Frame>,
    closed: bool,
}

/// Open a socket to `hub` with the given Origin and Cookie headers.
pub async fn ws_connect(
    hub: &Hub,
    origin: Option<&str>,
    cookie: Option<&str>,
) -> Result<Ws, HttpRefusal> {
    ws_connect_with(hub, WsOpts::new(origin, cookie)).await
}

pub async fn ws_connect_with(hub: &Hub, opts: WsOpts) -> Result<Ws, HttpRefusal> {
    let inner = ws_handshake(hub.addr(), &opts).await?;
    Ok(Ws {
        inner,
        pings_seen: 0,
        last_text: String::new(),
        skipped: Vec::new(),
        closed: false,
    })
}

/// The client side of a WebSocket handshake with `/ws` at `addr` (a hub, or nginx in front of
/// several), bounded to 10 s; a refusal carries the HTTP status and body.
pub async fn ws_handshake(
    addr: SocketAddr,
    opts: &WsOpts,
) -> Result<WebSocketStream<TcpStream>, HttpRefusal> {
    match tokio::time::timeout(Duration::from_secs(10), ws_handshake_unbounded(addr, opts)).await {
        Ok(r) => r,
        Err(_) => Err(HttpRefusal {
            status: 0,
            body: "handshake did not finish within 10 s".into(),
        }),
    }
}

async fn ws_handshake_unbounded(
    addr: SocketAddr,
    opts: &WsOpts,
) -> Result<WebSocketStream<TcpStream>, HttpRefusal> {
    let mut req = format!("ws://{addr}/ws")
        .into_client_request()
        .expect("ws request");
    {
        let h = req.headers_mut();
        if let Some(o) = &opts.origin {
            h.insert(
                "origin",
                HeaderValue::from_str(o).expect("origin header value"),
            );
        }
        if let Some(c) = &opts.cookie {
            h.insert(
                "cookie",
                HeaderValue::from_str(c).expect("cookie header value"),
            );
        }
        for (k, v) in &opts.headers {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                HeaderValue::from_str(v).expect("header value"),
            );
        }
    }
    let socket = TcpSocket::new_v4().expect("socket");
    if let Some(size) = opts.recv_buffer {
        socket.set_recv_buffer_size(size).expect("SO_RCVBUF");
    }
    let stream = socket.connect(addr).await.map_err(|e| HttpRefusal {
        status: 0,
        body: format!("TCP connect to {addr}: {e}"),
    })?;
    match tokio_tungstenite::client_async(req, stream).await {
        Ok((inner, _resp)) => Ok(inner),
        Err(tungstenite::Error::Http(resp)) => Err(HttpRefusal {
            status: resp.status().as_u16(),
            body: resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default(),
        }),
        Err(e) => Err(HttpRefusal {
            status: 0,
            body: format!("handshake failed: {e}"),
        }),
    }
}

/// Open a socket that must succeed; panics with the refusal otherwise.
pub async fn ws_open(hub: &Hub, origin: Option<&str>, cookie: Option<&str>) -> Ws {
    ws_connect(hub, origin, cookie)
        .await
        .unwrap_or_else(|r| panic!("handshake refused: HTTP {} {:?}", r.status, r.body))
}

/// Log `user` into `org` (dev login), open a socket from the allowed origin and read its
/// welcome. Returns the socket, the welcome frame and the cookie.
pub async fn connect_user(hub: &Hub, user: &str, org: &str) -> (Ws, Value, String) {
    let cookie = dev_login(hub, user, org).await;
    let mut ws = ws_open(hub, Some(ORIGIN), Some(&cookie)).await;
    let welcome = ws.next_json(T).await;
    assert_eq!(
        welcome["type"], "welcome",
        "first frame for {user}@{org}: {welcome}"
    );
    (ws, welcome, cookie)
}

impl Ws {
    /// The next frame, which must be binary.
    pub async fn next_binary(&mut self, timeout: Duration) -> Vec<u8> {
        match self.recv(timeout).await {
            Some(Frame::Binary(b)) => b,
            None => panic!("no frame within {timeout:?} (expected a binary frame)"),
            Some(other) => panic!("expected a binary frame, got {other:?}"),
        }
    }

    /// Read until the close frame (data frames on the way are kept in `skipped`); returns
    /// its code and reason. A connection that ends without one reads as 1006.
    pub async fn expect_close(&mut self, timeout: Duration) -> (u16, String) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv(left).await {
                None => panic!(
                    "socket still open after {timeout:?} (expected a close); skipped {} frames, last: {:?}",
                    self.skipped.len(),
                    self.skipped.last()
                ),
                Some(Frame::Close(code, reason)) => return (code, reason),
                Some(Frame::Ended(why)) => return (1006, format!("connection ended without close frame: {why}")),
                Some(other) => self.skipped.push(other),
            }
        }
    }

    /// Keep reading (and so answering pings) for `d`; panics if any frame but ping/pong comes.
    pub async fn expect_silence(&mut self, d: Duration) {
        if let Some(frame) = self.recv(d).await {
            panic!("expected nothing for {d:?}, got {frame:?}");
        }
    }

    pub async fn try_send(&mut self, msg: Message) -> Result<(), tungstenite::Error> {
        tokio::time::timeout(T, self.inner.send(msg))
            .await
            .unwrap_or_else(|_| Err(tungstenite::Error::Io(std::io::ErrorKind::TimedOut.into())))
    }

    pub async fn send_text(&mut self, text: &str) {
        self.try_send(Message::text(text.to_string()))
            .await
            .unwrap_or_else(|e| panic!("sending text frame: {e}"));
    }

    pub async fn send_binary(&mut self, bytes: &[u8]) {
        self.try_send(Message::binary(bytes.to_vec()))
            .await
            .unwrap_or_else(|e| panic!("sending binary frame: {e}"));
    }

    /// Close from the client side and wait (bounded) for the server's answer.
    pub async fn close(&mut self) {
        if self.closed {
            return;
        }
        let _ = self.inner.close(None).await;
        let deadline = tokio::time::Instant::now() + T;
        while let Ok(Some(Ok(_))) = tokio::time::timeout_at(deadline, self.inner.next()).await {}
        self.closed = true;
    }
}

impl TestSocket for Ws {
    /// The next frame other than ping/pong, or None if nothing came within `timeout`.
    async fn recv(&mut self, timeout: Duration) -> Option<Frame> {
        if self.closed {
            return Some(Frame::Ended("connection already closed".into()));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = match tokio::time::timeout_at(deadline, self.inner.next()).await {
                Err(_) => return None,
                Ok(n) => n,
            };
            if let Some(Ok(Message::Ping(_))) = next {
                self.pings_seen += 1;
            }
            let Some(frame) = Frame::read(next) else {
                continue;
            };
            if matches!(frame, Frame::Close(..) | Frame::Ended(_)) {
                self.closed = true;
                // Let tungstenite finish the closing handshake; ignore how it ends.
                let _ = tokio::time::timeout(Duration::from_millis(200), self.inner.next()).await;
            }
            return Some(frame);
        }
    }

    /// The next text frame as JSON; panics on timeout, binary, close or non-JSON.
    async fn next_json(&mut self, timeout: Duration) -> Value {
        match self.recv(timeout).await {
            Some(Frame::Json(v, raw)) => {
                self.last_text = raw;
                v
            }
            None => panic!("no frame within {timeout:?} (expected a JSON text frame)"),
            Some(other) => panic!("expected a JSON text frame, got {other:?}"),
        }
    }

    async fn send_json(&mut self, v: &Value) {
        self.send_text(&v.to_string()).await;
    }
}

//! Clients that the cluster tests need beyond the common harness: a WebSocket client that
//! connects to any address (a pod or nginx) and keeps reading in a background task, so it
//! answers the hub's pings even while the test attends to other sockets (the cap tests run a
//! 200 ms heartbeat with a 1 s timeout, where an unread socket would be dropped as dead);
//! HTTP to any URL; a background publisher that records every accepted event id; and a
//! follower that stays subscribed to a topic across reconnects, resuming with `since`.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::common::{
    client, ws_handshake, Frame, HttpRefusal, HttpResp, TestSocket, WsOpts, ORIGIN, PUBLISH_KEY, T,
};

// ---------------------------------------------------------------------------------------------
// HTTP to any URL
// ---------------------------------------------------------------------------------------------

/// `method url` with `headers` and an optional body; a transport failure is an `Err`.
pub async fn http_at(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<HttpResp, String> {
    let method = awc::http::Method::from_bytes(method.as_bytes()).expect("valid method");
    let mut req = client().request(method.clone(), url);
    for (k, v) in headers {
        req = req.insert_header((*k, *v));
    }
    let sent = match body {
        Some(b) => req.send_body(b.to_vec()).await,
        None => req.send().await,
    };
    let mut resp = sent.map_err(|e| format!("{method} {url}: {e}"))?;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = resp
        .body()
        .await
        .map_err(|e| format!("{method} {url}: reading body: {e}"))?
        .to_vec();
    Ok(HttpResp {
        status,
        headers,
        body,
    })
}

/// `POST url` with a JSON body; panics on a transport failure.
pub async fn post_json_at(url: &str, headers: &[(&str, &str)], body: &Value) -> HttpResp {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    http_at("POST", url, &all, Some(body.to_string().as_bytes()))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Poll `GET base/readyz` every 50 ms until `pred(status, body)` holds; returns the last
/// answer (status 0 when there was none) and whether it held within `timeout`.
pub async fn wait_readyz(
    base: &str,
    timeout: Duration,
    pred: impl Fn(u16, &Value) -> bool,
) -> ((u16, Value), bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match http_at("GET", &format!("{base}/readyz"), &[], None).await {
            Ok(resp) => (resp.status, resp.json_or_null()),
            Err(e) => (0, Value::String(e)),
        };
        if pred(last.0, &last.1) {
            return (last, true);
        }
        if tokio::time::Instant::now() >= deadline {
            return (last, false);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// A WebSocket client with a background reader
// ---------------------------------------------------------------------------------------------

/// A WebSocket whose frames are read (and pings answered) by a local task; the test reads
/// the frames from a channel. Dropping it drops the TCP connection without a close frame,
/// like a browser tab that vanishes.
pub struct Client {
    out: mpsc::UnboundedSender<Message>,
    frames: mpsc::UnboundedReceiver<Frame>,
    closed: bool,
}

/// Open a socket to `addr` (a pod or nginx) with the given Origin and Cookie.
pub async fn connect(
    addr: SocketAddr,
    origin: Option<&str>,
    cookie: Option<&str>,
) -> Result<Client, HttpRefusal> {
    let ws = ws_handshake(addr, &WsOpts::new(origin, cookie)).await?;
    let (out, out_rx) = mpsc::unbounded_channel();
    let (frames_tx, frames) = mpsc::unbounded_channel();
    actix_web::rt::spawn(pump(ws, out_rx, frames_tx));
    Ok(Client {
        out,
        frames,
        closed: false,
    })
}

/// Open a socket that must be admitted and read its welcome; panics otherwise.
pub async fn open_welcomed(addr: SocketAddr, cookie: &str) -> (Client, Value) {
    let mut ws = connect(addr, Some(ORIGIN), Some(cookie))
        .await
        .unwrap_or_else(|r| {
            panic!(
                "handshake to {addr} refused: HTTP {} {:?}",
                r.status, r.body
            )
        });
    let welcome = ws.next_json(T).await;
    assert_eq!(
        welcome["type"], "welcome",
        "first frame from {addr}: {welcome}"
    );
    (ws, welcome)
}

/// Reads frames into `frames` and writes what `out` brings, until either side ends.
async fn pump(
    mut ws: WebSocketStream<TcpStream>,
    mut out: mpsc::UnboundedReceiver<Message>,
    frames: mpsc::UnboundedSender<Frame>,
) {
    loop {
        tokio::select! {
            next = ws.next() => {
                let Some(frame) = Frame::read(next) else {
                    continue;
                };
                let ended = matches!(frame, Frame::Close(..) | Frame::Ended(_));
                if frames.send(frame).is_err() {
                    return;
                }
                if ended {
                    // Let tungstenite answer the close; ignore how that ends.
                    let _ = tokio::time::timeout(Duration::from_millis(200), ws.next()).await;
                    return;
                }
            }
            msg = out.recv() => match msg {
                Some(msg) => {
                    if let Err(e) = ws.send(msg).await {
                        let _ = frames.send(Frame::Ended(format!("send failed: {e}")));
                        return;
                    }
                }
                // The Client was dropped: drop the connection, no close frame.
                None => return,
            },
        }
    }
}

impl Client {
    /// Read until the close frame (skipping data frames); returns its code and reason. A
    /// connection that ends without one reads as 1006.
    pub async fn expect_close(&mut self, timeout: Duration) -> (u16, String) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv(left).await {
                None => panic!("socket still open after {timeout:?} (expected a close)"),
                Some(Frame::Close(code, reason)) => return (code, reason),
                Some(Frame::Ended(why)) => {
                    return (1006, format!("connection ended without close frame: {why}"))
                }
                Some(_) => {}
            }
        }
    }

    /// Close from the client side and wait (bounded) for the server's close.
    pub async fn close(&mut self) {
        if self.closed {
            return;
        }
        let _ = self.out.send(Message::Close(None));
        let _ = self.expect_close(T).await;
    }
}

impl TestSocket for Client {
    /// The next frame other than ping/pong, or None if nothing came within `timeout`.
    async fn recv(&mut self, timeout: Duration) -> Option<Frame> {
        if self.closed {
            return Some(Frame::Ended("connection already closed".into()));
        }
        let frame = match tokio::time::timeout(timeout, self.frames.recv()).await {
            Err(_) => return None,
            Ok(None) => Frame::Ended("reader task ended".into()),
            Ok(Some(frame)) => frame,
        };
        if matches!(frame, Frame::Close(..) | Frame::Ended(_)) {
            self.closed = true;
        }
        Some(frame)
    }

    /// The next text frame as JSON; panics on timeout, close or anything else.
    async fn next_json(&mut self, timeout: Duration) -> Value {
        match self.recv(timeout).await {
            Some(Frame::Json(v, _)) => v,
            None => panic!("no frame within {timeout:?} (expected a JSON text frame)"),
            Some(other) => panic!("expected a JSON text frame, got {other:?}"),
        }
    }

    async fn send_json(&mut self, v: &Value) {
        self.out
            .send(Message::text(v.to_string()))
            .unwrap_or_else(|_| panic!("socket already gone; cannot send {v}"));
    }
}

// ---------------------------------------------------------------------------------------------
// A publisher in the background
// ---------------------------------------------------------------------------------------------

/// Publishes `{"seq":n}` events through `POST /api/publish` every `every` until stopped,
/// remembering the id of every event the hub accepted (202), in order.
pub struct Publisher {
    /// Ids of accepted events, in the order the 202s came.
    pub accepted: Rc<RefCell<Vec<String>>>,
    /// Answers other than 202 (status 0: no answer), with their bodies.
    pub refused: Rc<RefCell<Vec<(u16, String)>>>,
    stop: Rc<Cell<bool>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Publisher {
    /// Start publishing to `org`/`topic` through the hub at `base` (http://host:port).
    pub fn start(base: &str, org: &str, topic: &str, every: Duration) -> Publisher {
        let accepted = Rc::new(RefCell::new(Vec::new()));
        let refused = Rc::new(RefCell::new(Vec::new()));
        let stop = Rc::new(Cell::new(false));
        let url = format!("{base}/api/publish");
        let auth = format!("Bearer {PUBLISH_KEY}");
        let (org, topic) = (org.to_string(), topic.to_string());
        let task = {
            let (accepted, refused, stop) = (accepted.clone(), refused.clone(), stop.clone());
            actix_web::rt::spawn(async move {
                let mut seq = 0u64;
                while !stop.get() {
                    seq += 1;
                    let body = json!({"org": org, "topic": topic, "event": "call.status",
                                      "data": {"call_id": format!("c{seq}"), "seq": seq}});
                    match http_at(
                        "POST",
                        &url,
                        &[
                            ("content-type", "application/json"),
                            ("authorization", &auth),
                        ],
                        Some(body.to_string().as_bytes()),
                    )
                    .await
                    {
                        Ok(resp) if resp.status == 202 => {
                            let id = resp.json()["id"].as_str().map(str::to_string);
                            match id {
                                Some(id) => accepted.borrow_mut().push(id),
                                None => refused.borrow_mut().push((202, resp.text())),
                            }
                        }
                        Ok(resp) => refused.borrow_mut().push((resp.status, resp.text())),
                        Err(e) => refused.borrow_mut().push((0, e)),
                    }
                    tokio::time::sleep(every).await;
                }
            })
        };
        Publisher {
            accepted,
            refused,
            stop,
            task: Some(task),
        }
    }

    pub fn count(&self) -> usize {
        self.accepted.borrow().len()
    }

    /// Wait until at least `n` events were accepted (bounded by `timeout`).
    pub async fn wait_count(&self, n: usize, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.count() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {} events accepted after {timeout:?} (wanted {n}); refusals: {:?}",
                self.count(),
                self.refused.borrow()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stop after the publish in flight; returns every accepted id.
    pub async fn stop(&mut self) -> Vec<String> {
        self.stop.set(true);
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
        }
        self.accepted.borrow().clone()
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.set(true);
    }
}

/// The `id` of an event frame of `topic`, if `v` is one.
pub fn event_id<'a>(v: &'a Value, topic: &str) -> Option<&'a str> {
    if v["type"] == "event" && v["topic"] == topic {
        v["id"].as_str()
    } else {
        None
    }
}

/// Where two id sequences first differ, for a readable failure message.
pub fn first_difference(got: &[String], want: &[String]) -> String {
    let at = got
        .iter()
        .zip(want)
        .position(|(g, w)| g != w)
        .unwrap_or(got.len().min(want.len()));
    let context = |v: &[String]| v[at.saturating_sub(2)..(at + 3).min(v.len())].to_vec();
    format!(
        "got {} events, published {}; first difference at index {at}: got {:?}, published {:?}",
        got.len(),
        want.len(),
        context(got),
        context(want)
    )
}

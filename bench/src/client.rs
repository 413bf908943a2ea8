//! One simulated browser: a TCP connection from a chosen 127.0.0.x source address, the
//! WebSocket handshake with `Origin` and the session cookie, `welcome`, one `subscribe`,
//! then a receive loop that turns every event frame into a latency sample and a bit in a
//! per-socket bitmap of the topic's sequence numbers (so lost and duplicated events are
//! counted exactly), until the bench says stop or the server closes the socket.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::stats::Shared;

pub type Ws = WebSocketStream<TcpStream>;

/// Where and how every client connects.
pub struct Target {
    pub server: SocketAddr,
    pub ws_url: String,
    pub origin: String,
    /// Source addresses, used round-robin so one address's ephemeral ports never run out.
    pub sources: Vec<IpAddr>,
    pub handshake_timeout: Duration,
}

/// Small buffers: a client holds thousands of these, and events are a few hundred bytes.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

/// One client's identity and topic.
#[derive(Clone)]
pub struct ConnSpec {
    pub index: usize,
    pub topic: u32,
    pub topic_name: Arc<str>,
    /// `name=value` of the session cookie; None for the floor server.
    pub cookie: Option<Arc<str>>,
}

/// Why a connection could not be set up; the label is what the report counts.
#[derive(Debug)]
pub enum ConnectError {
    Tcp(std::io::Error),
    Http(u16),
    /// Closed by the server during setup, with its code and reason.
    Closed(u16, String),
    Timeout,
    Protocol(String),
}

impl ConnectError {
    pub fn label(&self) -> String {
        match self {
            Self::Tcp(e) => format!("tcp: {}", e.kind()),
            Self::Http(s) => format!("http {s}"),
            Self::Closed(code, reason) => format!("close {code} {reason}"),
            Self::Timeout => "timeout".into(),
            Self::Protocol(p) => format!("protocol: {p}"),
        }
    }
}

/// Open, handshake, wait for `welcome`, subscribe, wait for `subscribed`.
/// Returns the socket and the time from connect to `welcome`.
pub async fn connect(spec: &ConnSpec, target: &Target) -> Result<(Ws, Duration), ConnectError> {
    let started = Instant::now();
    let setup = async {
        let source = target.sources[spec.index % target.sources.len()];
        let socket = TcpSocket::new_v4().map_err(ConnectError::Tcp)?;
        socket
            .bind(SocketAddr::new(source, 0))
            .map_err(ConnectError::Tcp)?;
        let stream = socket
            .connect(target.server)
            .await
            .map_err(ConnectError::Tcp)?;
        stream.set_nodelay(true).map_err(ConnectError::Tcp)?;
        let mut request = target
            .ws_url
            .as_str()
            .into_client_request()
            .map_err(|e| ConnectError::Protocol(e.to_string()))?;
        let headers = request.headers_mut();
        headers.insert(
            "Origin",
            HeaderValue::from_str(&target.origin)
                .map_err(|e| ConnectError::Protocol(e.to_string()))?,
        );
        if let Some(cookie) = &spec.cookie {
            headers.insert(
                "Cookie",
                HeaderValue::from_str(cookie).map_err(|e| ConnectError::Protocol(e.to_string()))?,
            );
        }
        let (mut ws, _) =
            tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config()))
                .await
                .map_err(|e| match e {
                    WsError::Http(resp) => ConnectError::Http(resp.status().as_u16()),
                    WsError::Io(io) => ConnectError::Tcp(io),
                    other => ConnectError::Protocol(other.to_string()),
                })?;
        expect(&mut ws, "welcome").await?;
        let welcomed = started.elapsed();
        let subscribe = format!(r#"{{"type":"subscribe","topic":"{}"}}"#, spec.topic_name);
        ws.send(Message::text(subscribe))
            .await
            .map_err(|e| ConnectError::Protocol(e.to_string()))?;
        expect(&mut ws, "subscribed").await?;
        Ok((ws, welcomed))
    };
    match tokio::time::timeout(target.handshake_timeout, setup).await {
        Ok(result) => result,
        Err(_) => Err(ConnectError::Timeout),
    }
}

/// Read until a text frame of `type` arrives (pings are answered by tungstenite meanwhile).
async fn expect(ws: &mut Ws, kind: &str) -> Result<(), ConnectError> {
    let needle = format!(r#""type":"{kind}""#);
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                if t.as_str().contains(&needle) {
                    return Ok(());
                }
                if t.as_str().contains(r#""type":"error""#) {
                    return Err(ConnectError::Protocol(t.as_str().to_string()));
                }
            }
            Some(Ok(Message::Close(frame))) => {
                return Err(match frame {
                    Some(f) => ConnectError::Closed(u16::from(f.code), f.reason.to_string()),
                    None => ConnectError::Closed(1005, String::new()),
                })
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(ConnectError::Protocol(e.to_string())),
            None => return Err(ConnectError::Closed(1006, "connection ended".into())),
        }
    }
}

/// How the receive loop ends when the bench says stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Running,
    /// Send a close frame and wait (briefly) for the server's.
    Graceful,
    /// Drop the socket.
    Abrupt,
}

/// What one socket saw, for the loss and duplicate count.
#[derive(Debug, Default)]
pub struct ConnReport {
    pub connected: bool,
    pub topic: u32,
    /// Distinct events received.
    pub distinct: u64,
    pub duplicates: u64,
    /// The server closed the socket before the bench stopped it.
    pub closed_early: bool,
    /// Sequence numbers beyond the bitmap bound (not checked for duplicates).
    pub unchecked: u64,
}

/// Bitmap bound: 4 Mi sequence numbers per topic per socket (512 KiB at most).
const MAX_SEQ: u64 = 1 << 22;

/// Receive until told to stop; every event is recorded in `shared`.
pub async fn receive(
    mut ws: Ws,
    spec: ConnSpec,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<Stop>,
) -> ConnReport {
    let mut report = ConnReport {
        connected: true,
        topic: spec.topic,
        ..Default::default()
    };
    let mut seen: Vec<u64> = Vec::new();
    shared.live.fetch_add(1, Relaxed);
    // One long-lived wait for the stop signal: re-creating it per message would register and
    // deregister with the watch's shared waiter list (a mutex) on every event.
    let running = stop.clone();
    let stopped = async move {
        loop {
            let now = *stop.borrow_and_update();
            if now != Stop::Running {
                return now;
            }
            if stop.changed().await.is_err() {
                return Stop::Abrupt;
            }
        }
    };
    tokio::pin!(stopped);
    let how = loop {
        tokio::select! {
            how = &mut stopped => break how,
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => on_text(t.as_str(), &spec, &shared, &mut seen, &mut report),
                Some(Ok(Message::Ping(_))) => { shared.pings.fetch_add(1, Relaxed); }
                Some(Ok(Message::Close(frame))) => {
                    shared.note_close(frame.map_or(1005, |f| u16::from(f.code)));
                    report.closed_early = true;
                    break Stop::Abrupt;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    if *running.borrow() == Stop::Running {
                        shared.note_close(1006);
                        report.closed_early = true;
                    }
                    break Stop::Abrupt;
                }
            },
        }
    };
    shared.live.fetch_sub(1, Relaxed);
    if how == Stop::Graceful && !report.closed_early {
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            if ws.close(None).await.is_ok() {
                while let Some(Ok(_)) = ws.next().await {}
            }
        })
        .await;
    }
    report
}

fn on_text(
    text: &str,
    spec: &ConnSpec,
    shared: &Shared,
    seen: &mut Vec<u64>,
    report: &mut ConnReport,
) {
    if !text.starts_with(r#"{"type":"event""#) {
        if text.contains(r#""type":"error""#) {
            shared.error_frames.fetch_add(1, Relaxed);
        }
        return;
    }
    let Some(d) = parse_data(text) else {
        shared.parse_errors.fetch_add(1, Relaxed);
        return;
    };
    if d.seq >= MAX_SEQ {
        report.unchecked += 1;
    } else {
        let word = (d.seq / 64) as usize;
        if seen.len() <= word {
            seen.resize((word + 1).next_power_of_two(), 0);
        }
        let bit = 1u64 << (d.seq % 64);
        if seen[word] & bit != 0 {
            report.duplicates += 1;
            return;
        }
        seen[word] |= bit;
    }
    report.distinct += 1;
    shared.record_event(spec.topic, d.g, d.ph as usize, d.t);
}

/// The bench's fields of an event's `data`: per-topic sequence, global index, phase, send time.
#[derive(Debug, Default, PartialEq)]
pub struct EventData {
    pub seq: u64,
    pub g: u64,
    pub ph: u64,
    pub t: u64,
}

/// Read `{"seq":N,"g":N,"ph":N,"t":N}` (keys in any order) out of the `"data":` of a frame,
/// without a JSON parser: the bench wrote this object, the hub only relays it.
pub fn parse_data(frame: &str) -> Option<EventData> {
    let start = frame.find(r#""data":{"#)? + 8;
    let bytes = frame.as_bytes();
    let mut i = start;
    let mut d = EventData::default();
    let mut found = 0;
    while i < bytes.len() && bytes[i] != b'}' {
        if bytes[i] != b'"' {
            i += 1;
            continue;
        }
        let key_end = i + 1 + frame[i + 1..].find('"')?;
        let key = &frame[i + 1..key_end];
        i = key_end + 1;
        if bytes.get(i) != Some(&b':') {
            continue;
        }
        i += 1;
        let num_start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        let value: u64 = frame[num_start..i].parse().ok()?;
        match key {
            "seq" => d.seq = value,
            "g" => d.g = value,
            "ph" => d.ph = value,
            "t" => d.t = value,
            _ => continue,
        }
        found += 1;
    }
    (found == 4).then_some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The data fields are found in either key order, whatever precedes them.
    #[test]
    fn parses_event_data() {
        let f = r#"{"type":"event","topic":"fan","id":"1-2","event":"bench","data":{"g":7,"ph":1,"seq":3,"t":99}}"#;
        assert_eq!(
            parse_data(f),
            Some(EventData {
                seq: 3,
                g: 7,
                ph: 1,
                t: 99
            })
        );
        let f = r#"{"type":"event","data":{"seq":3,"g":7,"ph":1,"t":99},"user":"x"}"#;
        assert_eq!(parse_data(f).map(|d| d.t), Some(99));
        assert_eq!(parse_data(r#"{"type":"event","data":{"seq":3}}"#), None);
    }
}

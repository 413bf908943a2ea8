//! A client that follows one topic for a whole test run the way a well-behaved browser does:
//! it reconnects when the server says so (after the `after_ms` it was given) or when its
//! connection drops (after a short random delay, trying the next address it was given),
//! backs off while handshakes are refused, resumes with `since` = the last event id it saw,
//! and keeps every event id it received, so the test can check that it got every published
//! event exactly once and in order.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use crate::client::{connect, event_id, Client};
use crate::common::{Frame, TestSocket, ORIGIN, T};

/// What happened to one follower.
#[derive(Debug, Default)]
pub struct FollowLog {
    /// Every event id received on the topic, in order of arrival.
    pub ids: Vec<String>,
    /// The `subscribed` replies to resubscriptions made with `since`.
    pub resumes: Vec<Value>,
    /// Each server-initiated close: the `after_ms` of the `reconnect` message before it (if
    /// any), and the close code and reason.
    pub restarts: Vec<(Option<u64>, u16, String)>,
    /// Handshakes that did not end in a welcome (e.g. a draining pod's 1012), retried.
    pub bounces: Vec<String>,
    /// Connections that ended without a close frame (a killed pod, a proxy gone), resumed.
    pub drops: Vec<String>,
    /// When each connection was welcomed, the first one included.
    pub welcomed_at: Vec<Instant>,
    /// Anything a correct hub would not send.
    pub unexpected: Vec<String>,
}

/// Shared between the test and its followers.
#[derive(Default)]
pub struct Shared {
    /// Subscriptions acknowledged so far, first ones and resumed ones together.
    pub subscribed: Cell<usize>,
    /// Set by the test once publishing is over: the last event id; a follower that has it
    /// is done.
    pub last_id: RefCell<Option<String>>,
}

/// Longest pause between two refused handshakes (the delay doubles from 100 ms up to it, with
/// jitter, so a crowd refused together does not come back together).
const BOUNCE_BACKOFF_MAX: Duration = Duration::from_millis(1000);
/// A dropped connection is retried after a random delay below this, as a browser would.
const DROP_JITTER: Duration = Duration::from_millis(500);

/// Follow `topic` through the hub (or nginx) at `addrs[0]` with `cookie` until the follower
/// has received `shared.last_id`, or `deadline`. A connection that fails or drops moves the
/// follower on to the next address, round the list.
pub async fn follow(
    addrs: Vec<SocketAddr>,
    cookie: String,
    topic: String,
    shared: Rc<Shared>,
    deadline: Instant,
) -> FollowLog {
    assert!(!addrs.is_empty(), "a follower needs an address");
    let mut log = FollowLog::default();
    let mut at = 0;
    'session: loop {
        let Some(mut ws) =
            connect_until_welcome(&addrs, &mut at, &cookie, &mut log, deadline).await
        else {
            log.unexpected
                .push("deadline passed while reconnecting".into());
            return log;
        };
        let since = log.ids.last().cloned();
        let mut subscribe = json!({"type": "subscribe", "topic": topic});
        if let Some(id) = &since {
            subscribe["since"] = json!(id);
        }
        ws.send_json(&subscribe).await;
        match ws.recv(T).await {
            Some(Frame::Json(reply, _)) if reply["type"] == "subscribed" => {
                if since.is_some() {
                    log.resumes.push(reply);
                }
                shared.subscribed.set(shared.subscribed.get() + 1);
            }
            other => {
                log.unexpected
                    .push(format!("answer to {subscribe}: {other:?}"));
                continue 'session;
            }
        }
        let mut reconnect_after = None;
        loop {
            let done = shared.last_id.borrow().is_some()
                && *shared.last_id.borrow() == log.ids.last().cloned();
            if done {
                ws.close().await;
                return log;
            }
            if Instant::now() >= deadline {
                log.unexpected
                    .push("deadline passed while receiving".into());
                return log;
            }
            match ws.recv(Duration::from_millis(100)).await {
                None => {}
                Some(Frame::Json(v, _)) => {
                    if let Some(id) = event_id(&v, &topic) {
                        log.ids.push(id.to_string());
                    } else if v["type"] == "reconnect" {
                        reconnect_after = v["after_ms"].as_u64();
                    } else {
                        log.unexpected.push(v.to_string());
                    }
                }
                Some(Frame::Close(code, reason)) => {
                    log.restarts.push((reconnect_after, code, reason));
                    let wait = reconnect_after.unwrap_or(0).min(10_000);
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                    continue 'session;
                }
                Some(Frame::Ended(why)) => {
                    log.drops.push(why);
                    at = (at + 1) % addrs.len();
                    tokio::time::sleep(jitter(DROP_JITTER)).await;
                    continue 'session;
                }
                Some(other) => {
                    log.unexpected.push(format!("{other:?}"));
                    continue 'session;
                }
            }
        }
    }
}

/// Open sockets until one is welcomed (a draining pod may still upgrade and then close with
/// 1012; nginx may answer 502 while it learns that a pod is gone; a pod may refuse with 4429
/// while a dead pod's cap slots are leased), backing off from 100 ms with jitter; a failed
/// attempt moves `at` to the next address.
async fn connect_until_welcome(
    addrs: &[SocketAddr],
    at: &mut usize,
    cookie: &str,
    log: &mut FollowLog,
    deadline: Instant,
) -> Option<Client> {
    let mut backoff = Duration::from_millis(100);
    while Instant::now() < deadline {
        match connect(addrs[*at], Some(ORIGIN), Some(cookie)).await {
            Ok(mut ws) => match ws.recv(T).await {
                Some(Frame::Json(v, _)) if v["type"] == "welcome" => {
                    log.welcomed_at.push(Instant::now());
                    return Some(ws);
                }
                other => log.bounces.push(format!("{other:?}")),
            },
            Err(refusal) => log
                .bounces
                .push(format!("HTTP {} {}", refusal.status, refusal.body)),
        }
        *at = (*at + 1) % addrs.len();
        tokio::time::sleep(backoff / 2 + jitter(backoff / 2)).await;
        backoff = (backoff * 2).min(BOUNCE_BACKOFF_MAX);
    }
    None
}

/// A random duration below `max`.
fn jitter(max: Duration) -> Duration {
    max.mul_f64(rand::random::<f64>())
}

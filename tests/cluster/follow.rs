//! A client that follows one topic for a whole test run the way a well-behaved browser does:
//! it reconnects when the server says so (after the `after_ms` it was given), resumes with
//! `since` = the last event id it saw, and keeps every event id it received, so the test can
//! check that it got every published event exactly once and in order.

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

/// Follow `topic` through the hub (or nginx) at `addr` with `cookie` until the follower has
/// received `shared.last_id`, or `deadline`.
pub async fn follow(
    addr: SocketAddr,
    cookie: String,
    topic: String,
    shared: Rc<Shared>,
    deadline: Instant,
) -> FollowLog {
    let mut log = FollowLog::default();
    'session: loop {
        let Some(mut ws) = connect_until_welcome(addr, &cookie, &mut log, deadline).await else {
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
                Some(other) => {
                    log.unexpected.push(format!("{other:?}"));
                    continue 'session;
                }
            }
        }
    }
}

/// Open sockets until one is welcomed (a draining pod may still upgrade and then close with
/// 1012; nginx may answer 502 while it learns that a pod is gone), retrying every 100 ms.
async fn connect_until_welcome(
    addr: SocketAddr,
    cookie: &str,
    log: &mut FollowLog,
    deadline: Instant,
) -> Option<Client> {
    while Instant::now() < deadline {
        match connect(addr, Some(ORIGIN), Some(cookie)).await {
            Ok(mut ws) => match ws.recv(T).await {
                Some(Frame::Json(v, _)) if v["type"] == "welcome" => return Some(ws),
                other => log.bounces.push(format!("{other:?}")),
            },
            Err(refusal) => log
                .bounces
                .push(format!("HTTP {} {}", refusal.status, refusal.body)),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

//! Graceful shutdown: on SIGTERM/SIGINT every session is told to reconnect after a spread-out
//! delay, closed with 1012, and the process exits 0 within the drain timeout.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const SPREAD_MS: u64 = 1000;
const DRAIN_S: u64 = 3;

fn drain_env() -> Vec<(&'static str, String)> {
    vec![
        (
            "SWITCHBOARD__SHUTDOWN__RECONNECT_SPREAD_MS",
            SPREAD_MS.to_string(),
        ),
        (
            "SWITCHBOARD__SHUTDOWN__DRAIN_TIMEOUT_S",
            DRAIN_S.to_string(),
        ),
    ]
}

fn start_draining_hub() -> Hub {
    let env = drain_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Hub::start(&env)
}

/// SIGTERM: each of six sockets gets `reconnect` (0..=spread ms) then 1012, and the process exits 0 in time.
#[actix_web::test]
async fn sigterm_drains_sockets_and_exits_zero() {
    let mut hub = start_draining_hub();
    let mut sockets = Vec::new();
    for user in ["u1", "u2", "u3", "u4", "u5", "u6"] {
        let (mut ws, _, _) = connect_user(&hub, user, "42").await;
        ws.subscribe("calls").await;
        sockets.push(ws);
    }
    let signalled = Instant::now();
    hub.sigterm();
    let mut delays = Vec::new();
    for (i, ws) in sockets.iter_mut().enumerate() {
        let msg = ws.next_json(Duration::from_secs(DRAIN_S + 2)).await;
        assert_eq!(msg["type"], "reconnect", "socket {i}: {msg}");
        let after = msg["after_ms"]
            .as_u64()
            .unwrap_or_else(|| panic!("socket {i}: after_ms not a non-negative integer: {msg}"));
        assert!(
            after <= SPREAD_MS,
            "socket {i}: after_ms {after} above the spread {SPREAD_MS}"
        );
        delays.push(after);
        assert_eq!(
            msg.as_object().map(|o| o.len()),
            Some(2),
            "socket {i}: unexpected fields in {msg}"
        );
        assert_close(
            ws.expect_only_close(Duration::from_secs(DRAIN_S + 2)).await,
            1012,
            "server restarting",
            &format!("socket {i} after reconnect"),
        );
    }
    delays.sort_unstable();
    delays.dedup();
    assert!(
        delays.len() >= 2,
        "every session was told the same delay {delays:?}: not spread"
    );
    let status = hub.wait_exit(Duration::from_secs(DRAIN_S + 2));
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    assert!(
        signalled.elapsed() <= Duration::from_secs(DRAIN_S + 2),
        "took {:?} to exit",
        signalled.elapsed()
    );
}

/// SIGINT drains like SIGTERM: an idle hub exits 0 promptly.
#[actix_web::test]
async fn sigint_exits_zero() {
    let mut hub = start_draining_hub();
    let (mut ws, _, _) = connect_user(&hub, "u1", "42").await;
    hub.sigint();
    assert_eq!(
        ws.next_json(Duration::from_secs(DRAIN_S)).await["type"],
        "reconnect"
    );
    let status = hub.wait_exit(Duration::from_secs(DRAIN_S + 2));
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
}

/// While draining the hub is not ready and refuses new sockets (1012 after upgrade, 503 before,
/// or the listener already closed).
#[actix_web::test]
async fn draining_hub_refuses_new_work() {
    let mut hub = Hub::start(&[
        ("SWITCHBOARD__SHUTDOWN__RECONNECT_SPREAD_MS", "5000"),
        ("SWITCHBOARD__SHUTDOWN__DRAIN_TIMEOUT_S", "5"),
    ]);
    let mut held = Vec::new();
    for i in 0..4 {
        held.push(connect_user(&hub, &format!("u{i}"), "42").await.0);
    }
    let cookie = dev_login(&hub, "late", "42").await;
    hub.sigterm();
    // Once a session has been told to reconnect the hub is draining; from then on it must
    // never again claim to be ready or welcome a new socket.
    assert_eq!(
        held[0].next_json(Duration::from_secs(5)).await["type"],
        "reconnect"
    );
    match try_http(&hub, "GET", "/readyz", &[]).await {
        Ok(ready) => {
            assert_eq!(ready.status, 503, "/readyz while draining: {ready}");
            assert_eq!(
                ready.json(),
                json!({"status": "not_ready", "reason": "draining"})
            );
        }
        Err(e) => eprintln!("hub stopped answering HTTP before /readyz could be checked: {e}"),
    }
    match ws_connect(&hub, Some(ORIGIN), Some(&cookie)).await {
        Err(r) => assert!(
            r.status == 503 || r.status == 0,
            "new handshake while draining: HTTP {} {}",
            r.status,
            r.body
        ),
        Ok(mut ws) => match ws.recv(T).await {
            Some(Frame::Close(code, reason)) => assert_close(
                (code, reason),
                1012,
                "server restarting",
                "new socket while draining",
            ),
            Some(Frame::Ended(_)) => {}
            other => panic!("a socket opened while draining got {other:?}"),
        },
    }
    let status = hub.wait_exit(Duration::from_secs(7));
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
}

//! The one drain sequence, run on SIGTERM or SIGINT: readiness turns 503 and new sockets are
//! refused; every session is told `{"type":"reconnect","after_ms":N}` with N spread at random
//! over `shutdown.reconnect_spread_ms` and closed with 1012, in paced batches so a deploy does
//! not turn into a reconnect storm on the other pods; then the HTTP server stops. The whole
//! sequence ends within `shutdown.drain_timeout_s`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::ServerHandle;
use rand::seq::SliceRandom;
use rand::Rng;
use tokio::time::Instant;

use crate::delivery::registry::Control;
use crate::node::Node;

/// Sessions told to leave per batch, and the pause between batches.
const BATCH: usize = 500;
const BATCH_PAUSE: Duration = Duration::from_millis(20);
/// How often the drain looks whether every session is gone.
const POLL: Duration = Duration::from_millis(20);

/// Resolves on the first SIGTERM or SIGINT.
pub(crate) async fn signalled() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => log::info!("SIGTERM received: draining"),
                    _ = ctrl_c => log::info!("SIGINT received: draining"),
                }
            }
            Err(e) => {
                log::warn!("cannot listen for SIGTERM ({e}); only SIGINT will drain");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
        log::info!("interrupt received: draining");
    }
}

/// Drain this node and stop its server.
pub(crate) async fn drain(node: Arc<Node>, server: ServerHandle) {
    let deadline = Instant::now() + Duration::from_secs(node.settings.shutdown.drain_timeout_s);
    node.draining.store(true, Ordering::Release);
    let mut sessions = node.registry.all_controls();
    let spread = node.settings.shutdown.reconnect_spread_ms;
    log::info!(
        "draining {} session(s): reconnect spread over {spread} ms",
        sessions.len()
    );
    sessions.shuffle(&mut rand::rng());
    for batch in sessions.chunks(BATCH) {
        let mut rng = rand::rng();
        for session in batch {
            session.do_send(Control::Drain {
                after_ms: rng.random_range(0..=spread),
            });
        }
        if Instant::now() + BATCH_PAUSE >= deadline {
            break;
        }
        tokio::time::sleep(BATCH_PAUSE).await;
    }
    // Leave a second of the budget for the server itself to stop.
    let wait_until = deadline - Duration::from_secs(1).min(deadline - Instant::now());
    while node.registry.session_count() > 0 && Instant::now() < wait_until {
        tokio::time::sleep(POLL).await;
    }
    let left = node.registry.session_count();
    if left > 0 {
        log::warn!("{left} session(s) still open at the drain deadline; stopping anyway");
    }
    server.stop(true).await;
    log::info!("drained; bye");
}

//! Prometheus metrics, named as SPEC section 8 fixes them (prefix `switchboard_`). One
//! process-wide set, reached through [`metrics()`]; rendering for `GET /metrics` is here too.
//! Hot paths update counters in batches (one `inc_by` per flush, not one per frame). The
//! size gauges (registry, handshake limiter) are set when `/metrics` is read, from what
//! they count, so nothing on a hot path keeps them.

use std::sync::OnceLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

pub(crate) struct Metrics {
    registry: Registry,
    /// Open WebSocket and SSE connections on this pod.
    pub(crate) connections: IntGauge,
    /// Refused handshakes by reason (`origin_not_allowed`, `unauthenticated`, ...).
    pub(crate) handshake_rejections: IntCounterVec,
    /// Events this pod's broker received (from the API, clients or Redis).
    pub(crate) events_received: IntCounter,
    /// Frames handed to sockets.
    pub(crate) messages_delivered: IntCounter,
    /// Broker receipt to socket write, in seconds.
    pub(crate) delivery_seconds: Histogram,
    pub(crate) redis_reconnects: IntCounter,
    /// Events dropped from a slow consumer's queue because a newer state replaced them.
    pub(crate) conflated: IntCounter,
    pub(crate) slow_consumer_disconnects: IntCounter,
    pub(crate) heartbeat_timeouts: IntCounter,
    /// Events a worker thread's fan-out queue had no room for (per worker that missed one).
    pub(crate) fanout_lagged: IntCounter,
    /// Sockets asked to reconnect and resume because their worker missed their channel's
    /// events.
    pub(crate) fanout_resyncs: IntCounter,
    /// Sockets in this pod's registry (WebSocket and SSE sessions it delivers to).
    pub(crate) registry_sessions: IntGauge,
    /// Channels with at least one subscriber on this pod.
    pub(crate) registry_channels: IntGauge,
    /// Client addresses (IPv6: /64 blocks) the handshake limiter holds a budget for.
    pub(crate) handshake_limiter_clients: IntGauge,
}

pub(crate) fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new_custom(Some("switchboard".into()), None)
            // unwrap: a fixed, valid prefix.
            .unwrap();
        let counter = |name: &str, help: &str| {
            // unwrap: fixed names and help texts, registered once.
            let c = IntCounter::new(name, help).unwrap();
            registry.register(Box::new(c.clone())).unwrap();
            c
        };
        let gauge = |name: &str, help: &str| {
            // unwrap: fixed names and help texts, registered once.
            let g = IntGauge::new(name, help).unwrap();
            registry.register(Box::new(g.clone())).unwrap();
            g
        };
        let connections = gauge("connections", "Open client connections");
        let handshake_rejections = IntCounterVec::new(
            Opts::new("handshake_rejections_total", "Refused handshakes by reason"),
            &["reason"],
        )
        .unwrap();
        registry
            .register(Box::new(handshake_rejections.clone()))
            .unwrap();
        let delivery_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "delivery_seconds",
                "Time from broker receipt to the frame being written to the socket",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        )
        .unwrap();
        registry
            .register(Box::new(delivery_seconds.clone()))
            .unwrap();
        Self {
            connections,
            handshake_rejections,
            events_received: counter("events_received_total", "Events received by the broker"),
            messages_delivered: counter("messages_delivered_total", "Frames delivered to sockets"),
            delivery_seconds,
            redis_reconnects: counter("redis_reconnects_total", "Redis reconnections"),
            conflated: counter(
                "conflated_total",
                "Queued events replaced by a newer state for a slow consumer",
            ),
            slow_consumer_disconnects: counter(
                "slow_consumer_disconnects_total",
                "Sockets closed because they could not keep up",
            ),
            heartbeat_timeouts: counter(
                "heartbeat_timeouts_total",
                "Sockets closed because nothing arrived within the heartbeat timeout",
            ),
            fanout_lagged: counter(
                "fanout_lagged_total",
                "Events a worker's fan-out queue was too full to take",
            ),
            fanout_resyncs: counter(
                "fanout_resyncs_total",
                "Sockets asked to reconnect and resume because their worker's fan-out queue missed events of their channel",
            ),
            registry_sessions: gauge(
                "registry_sessions",
                "Sockets in this pod's registry (WebSocket and SSE sessions)",
            ),
            registry_channels: gauge(
                "registry_channels",
                "Channels with at least one subscriber on this pod",
            ),
            handshake_limiter_clients: gauge(
                "handshake_limiter_clients",
                "Client addresses (IPv6: /64 blocks) the handshake limiter tracks",
            ),
            registry,
        }
    }

    pub(crate) fn reject(&self, reason: &str) {
        self.handshake_rejections.with_label_values(&[reason]).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub(crate) fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            return format!("# encoding failed: {e}\n");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Touch every label the dashboards expect so they exist at zero from the start.
pub(crate) fn init() {
    let m = metrics();
    for reason in [
        "origin_not_allowed",
        "unauthenticated",
        "connection_limit",
        "rate_limited",
        "draining",
    ] {
        m.handshake_rejections.with_label_values(&[reason]);
    }
}

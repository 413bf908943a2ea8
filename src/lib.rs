//! switchboard: a real-time WebSocket hub for live call dashboards.
//!
//! Browsers hold a WebSocket (or an SSE stream) to the hub; backend services publish
//! call-status events through `POST /api/publish` or straight to Redis; the hub delivers each
//! event to exactly the sockets entitled to it, on one node (embedded) or on many pods sharing
//! one Redis (clustered).
//!
//! # Layout
//! - [`config`]: layered settings, every key's default and unit, validation.
//! - [`origin`]: the origin policy and its diagnostics (pure).
//! - [`protocol`]: ids, topic grammar, client and server messages (pure).
//! - [`close`]: every close code with its reason and reconnect advice.
//! - [`auth`]: session cookie, JWT exchange, dev login, revocation.
//! - [`limits`]: token buckets, per-IP handshake limits, per-user connection caps.
//! - [`registry`]: this node's sessions, by user and by channel (which workers want it); outboxes.
//! - [`fanout`]: each worker thread's subscribers, written in one pass per event.
//! - [`broker`]: where events come from and go to; [`broker::memory`] (embedded).
//! - [`session`]: the WebSocket session actor, the only user of `WebsocketContext`.
//! - [`connection`]: a socket's writer: drives the session's context and writes live events'
//!   shared, pre-encoded frames, vectored; the fan-out writes idle sockets directly.
//! - [`sse`]: the Server-Sent Events fallback transport, same rules as the WebSocket.
//! - [`subscriptions`]: one connection's subscriptions and exact `since` resume (pure).
//! - [`handshake`]: the checks a socket passes before its session starts.
//! - [`http`]: publish, auth, health, metrics and static routes.
//! - [`metrics`]: Prometheus metrics.
//! - [`demo`]: the call simulator (pure); [`simulate`]: the loops that publish what it makes.
//! - [`server`]: builds the actix App and runs it until shutdown.
//! - [`shutdown`]: the one drain sequence.

pub mod auth;
pub mod broker;
pub mod close;
pub mod config;
pub mod connection;
pub mod demo;
pub mod fanout;
pub mod handshake;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod origin;
pub mod protocol;
pub mod registry;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod simulate;
pub mod sse;
pub mod subscriptions;

//! switchboard: a real-time WebSocket hub for live call dashboards.
//!
//! Browsers hold a WebSocket (or an SSE stream) to the hub; backend services publish
//! call-status events through `POST /api/publish` or straight to Redis; the hub delivers each
//! event to exactly the sockets entitled to it, on one node (embedded) or on many pods sharing
//! one Redis (clustered).
//!
//! # Layout
//! Layers, from the bottom up: each module imports only from the layers listed before it
//! (`tests/layers.rs` reads this list and fails on any import from a layer after it).
//! - [`core`]: ids, the wire protocol, one encoded event, identity, close codes, metrics.
//! - [`policy`]: origin policy and its diagnostics, rate limits, client IP (pure).
//! - [`config`]: layered settings, validated once into what the rest uses.
//! - [`store`]: login sessions, revocations and connection caps, in memory or Redis.
//! - [`delivery`]: the registry, per-worker fan-out, outboxes, the socket writer,
//!   subscriptions.
//! - [`broker`]: pub/sub and history, in memory (embedded) or Redis (clustered).
//! - [`node`]: the shared state every handler takes.
//! - [`transport`]: the handshake, the one attach lifecycle, the WebSocket actor, SSE.
//! - [`http`]: publish, auth, health, metrics and static routes.
//! - [`demo`]: the call simulator and the loops that publish what it makes.
//! - [`server`]: builds and runs the App; the one drain sequence.

mod broker;
pub mod config;
pub mod core;
mod delivery;
pub mod demo;
mod http;
mod node;
pub mod policy;
pub mod server;
mod store;
mod transport;

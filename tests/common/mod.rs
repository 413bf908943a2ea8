//! The integration-test harness: starts the real `switchboard` binary as a child process (so
//! configuration loading, logging and signals are exercised exactly as in production) and
//! speaks to it only over the network: HTTP through `awc`, WebSockets through
//! `tokio-tungstenite`, and a hand-rolled raw WebSocket client for the cases where the client
//! must misbehave (never answering pings).
//!
//! Every wait here is on an event (a log line, a frame, a process exit, a metric reaching a
//! value) bounded by a timeout; a test never sleeps in place of something it could await.
//! Tests use `#[actix_web::test]` because `awc` needs actix's single-threaded runtime;
//! tokio-tungstenite runs inside it too.
//!
//! The harness is split by what a test talks to:
//!
//! - `process`: the hub as a child process (`Hub`: start, logs, signals, exit), CLI runs
//!   (`run_cli`, `CliOutput`), and stopping helper processes (`wait_child`, `terminate`).
//! - `http`: HTTP requests and their answers (`HttpResp`, `client`, `http`, `get`,
//!   `post_json`, `try_http`, `raw_http`).
//! - `auth`: dev login, the session cookie, and JWTs (`dev_login`, `session_cookie`, `jwt`).
//! - `publish`: `POST /api/publish` (`publish`, `publish_ok`, `publish_raw`).
//! - `metrics`: reading and waiting on `/metrics` samples.
//! - `nginx`: a real nginx in front of hubs (`Nginx`), and the tools, free ports and temporary
//!   directories such helper processes need (`require_tool`, `free_port`, `open_tempdir`).
//! - `ws`: the WebSocket client (`Ws`, `ws_connect`, `connect_user`, `Frame`, `TestSocket`).
//! - `raw_ws`: a hand-spoken WebSocket that never answers pings (`RawWs`).
//! - `sse`: the Server-Sent Events client (`open_sse`, `SseClient`).
//! - `checks`: close-frame and event-id checks (`assert_close`, `parse_event_id`).
//! - `redis_cluster`: a real 3+3 Redis Cluster on free ports, with failover (`RedisCluster`).
//!
//! This file holds the settings every test hub shares; everything is re-exported here, so a
//! test names any of it as `common::name`.
#![allow(dead_code)]

mod auth;
mod checks;
mod http;
mod metrics;
mod nginx;
mod process;
mod publish;
mod raw_ws;
mod redis_cluster;
mod sse;
mod ws;

// Each test crate uses only part of the harness, so some of these re-exports go unused in it.
#[allow(unused_imports)]
pub use self::{
    auth::*, checks::*, http::*, metrics::*, nginx::*, process::*, publish::*, raw_ws::*,
    redis_cluster::*, sse::*, ws::*,
};

use std::time::Duration;

/// An origin the default (development) configuration admits through `allow_localhost`.
pub const ORIGIN: &str = "http://localhost:3000";
/// The publish key every test hub accepts.
pub const PUBLISH_KEY: &str = "test-publish-key";
/// The JWT secret every test hub verifies `/auth/session` tokens with.
pub const JWT_SECRET: &str = "test-jwt-secret-0123456789abcdef-0123";
/// The default cookie name.
pub const COOKIE_NAME: &str = "sb_session";
/// Default bound on every wait for a frame or a response.
pub const T: Duration = Duration::from_secs(5);
/// Pass as an override value to remove a variable from the hub's environment.
pub const UNSET: &str = "\u{0}unset";

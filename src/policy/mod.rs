//! Decisions about a request made from its facts alone, with no I/O: which origins may open
//! a socket or call the API ([`origin`], with the diagnostics that explain a refusal), the
//! token buckets of client messages and handshakes ([`rate`]), and who the client is behind
//! trusted proxies ([`client_ip`]). `config` compiles these from the settings once (the
//! `[origins]` section's types live in [`origin`], beside the policy they describe); the
//! handshake and HTTP layers apply them.

pub(crate) mod client_ip;
pub mod origin;
pub(crate) mod rate;

//! The streaming endpoints and what every connection goes through: the handshake's checks
//! in SPEC order ([`handshake`]: upgrade headers, per-IP budget, Origin, session, draining,
//! connection cap), the session cookie read back into an identity ([`identity`]), the one
//! attach lifecycle both transports share ([`attach`]), and the two transports themselves: the
//! WebSocket session actor ([`websocket`], the only user of `WebsocketContext`) and the
//! Server-Sent Events fallback ([`sse`]).

pub(crate) mod attach;
pub(crate) mod handshake;
pub(crate) mod identity;
pub(crate) mod sse;
pub(crate) mod websocket;

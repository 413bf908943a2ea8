//! Every way switchboard ends a socket, as a named value: the close code, the reason text a
//! browser's `onclose` shows, whether the client should reconnect, and, for refusals, the HTTP
//! status and error word used when `handshake.reject_before_upgrade` answers before the
//! upgrade. Error replies that keep the socket open are `wire::ErrorCode`, not here.

use std::fmt;

/// A reason to close (or refuse) a WebSocket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Close {
    /// 4403: the Origin header is not admitted by the policy.
    OriginNotAllowed { origin: String },
    /// 4401: no usable session.
    Unauthenticated(AuthFailure),
    /// 4429: the user already holds `limit` sockets and the policy is `reject_new`.
    TooManyConnections { limit: u32 },
    /// 4409: closed to make room for a newer socket of the same user (`evict_oldest`).
    Replaced,
    /// 1012: the server is draining for a restart.
    Restarting,
    /// 1009: a client frame above `limits.max_frame_bytes`.
    FrameTooLarge { limit: usize },
    /// 1003: a binary frame with no `stream` set, or an unusable frame type.
    UnsupportedData(&'static str),
    /// 1008: the client kept flooding after being told it was rate limited.
    MessageFlood,
    /// 1013: the client cannot keep up with its events.
    SlowConsumer,
    /// 4408: nothing received for `heartbeat.timeout_ms`.
    HeartbeatTimeout,
    /// 1002: the client broke the WebSocket protocol itself.
    ProtocolError,
}

/// Why a session is not (or no longer) authenticated; the text after `unauthenticated: `.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthFailure {
    NoCookie,
    Invalid,
    Expired,
    LoggedOut,
}

impl AuthFailure {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::NoCookie => "no session cookie",
            Self::Invalid => "invalid session",
            Self::Expired => "session expired",
            Self::LoggedOut => "logged out",
        }
    }
}

impl Close {
    pub(crate) fn code(&self) -> u16 {
        match self {
            Self::OriginNotAllowed { .. } => 4403,
            Self::Unauthenticated(_) => 4401,
            Self::TooManyConnections { .. } => 4429,
            Self::Replaced => 4409,
            Self::Restarting => 1012,
            Self::FrameTooLarge { .. } => 1009,
            Self::UnsupportedData(_) => 1003,
            Self::MessageFlood => 1008,
            Self::SlowConsumer => 1013,
            Self::HeartbeatTimeout => 4408,
            Self::ProtocolError => 1002,
        }
    }

    /// The reason text of the close frame (at most 123 bytes, as the protocol allows).
    pub(crate) fn reason(&self) -> String {
        let text = match self {
            Self::OriginNotAllowed { origin } => format!("origin not allowed: {origin}"),
            Self::Unauthenticated(cause) => format!("unauthenticated: {}", cause.as_str()),
            Self::TooManyConnections { limit } => format!("too many connections (limit {limit})"),
            Self::Replaced => "replaced by a newer connection".into(),
            Self::Restarting => "server restarting".into(),
            Self::FrameTooLarge { limit } => format!("frame too large (limit {limit} bytes)"),
            Self::UnsupportedData(what) => (*what).into(),
            Self::MessageFlood => "message rate exceeded".into(),
            Self::SlowConsumer => "slow consumer".into(),
            Self::HeartbeatTimeout => "heartbeat timeout".into(),
            Self::ProtocolError => "protocol error".into(),
        };
        truncate_reason(text)
    }

    /// For a refusal answered before the upgrade: HTTP status and the `error` word.
    pub(crate) fn http_refusal(&self) -> (u16, &'static str) {
        match self {
            Self::OriginNotAllowed { .. } => (403, "origin_not_allowed"),
            Self::Unauthenticated(_) => (401, "unauthenticated"),
            Self::TooManyConnections { .. } => (429, "connection_limit"),
            Self::Restarting => (503, "draining"),
            _ => (400, "bad_request"),
        }
    }

    /// The `reason` label of `switchboard_handshake_rejections_total`.
    pub(crate) fn rejection_label(&self) -> &'static str {
        match self {
            Self::OriginNotAllowed { .. } => "origin_not_allowed",
            Self::Unauthenticated(_) => "unauthenticated",
            Self::TooManyConnections { .. } => "connection_limit",
            Self::Restarting => "draining",
            _ => "other",
        }
    }
}

impl fmt::Display for Close {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code(), self.reason())
    }
}

/// Close reasons are limited to 123 bytes; cut on a character boundary.
fn truncate_reason(mut text: String) -> String {
    const MAX: usize = 123;
    if text.len() > MAX {
        let mut cut = MAX;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented codes and reason texts, as a browser's onclose sees them.
    #[test]
    fn codes_and_reasons() {
        let origin = Close::OriginNotAllowed {
            origin: "https://evil.example".into(),
        };
        assert_eq!(origin.code(), 4403);
        assert_eq!(origin.reason(), "origin not allowed: https://evil.example");
        assert_eq!(
            Close::Unauthenticated(AuthFailure::Expired).reason(),
            "unauthenticated: session expired"
        );
        assert_eq!(
            Close::TooManyConnections { limit: 5 }.reason(),
            "too many connections (limit 5)"
        );
        assert_eq!(Close::Replaced.code(), 4409);
        assert_eq!(Close::Restarting.code(), 1012);
    }

    /// A hostile, very long origin cannot produce an oversized close frame.
    #[test]
    fn reasons_fit_a_close_frame() {
        let close = Close::OriginNotAllowed {
            origin: "é".repeat(500),
        };
        assert!(close.reason().len() <= 123);
    }
}

//! The wire protocol of SPEC section 4: client messages with their decoding errors, server
//! messages with their encoding, and the one encoding of an event frame. Pure: no I/O.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ids::{EventId, InvalidId};

/// A message from the browser. `type` selects the variant.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum ClientMessage {
    Subscribe {
        topic: String,
        #[serde(default)]
        since: Option<String>,
        #[serde(default)]
        binary: bool,
    },
    Unsubscribe {
        topic: String,
    },
    Publish {
        topic: String,
        data: Value,
        #[serde(default)]
        event: Option<String>,
    },
    Stream {
        topic: String,
    },
    Ping,
}

/// Why a text frame is not a client message; the text is the `bad_request` reply's message.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BadFrame {
    #[error("malformed JSON: {0}")]
    Malformed(#[source] serde_json::Error),
    /// The `type` names no message (the serde text names it, with the ones expected).
    #[error("unknown message type {0}")]
    UnknownType(String),
    /// Valid JSON of a known type with a missing, unknown or mistyped field.
    #[error("{0}")]
    Invalid(#[source] serde_json::Error),
}

impl ClientMessage {
    /// Decode a text frame.
    pub(crate) fn decode(text: &str) -> Result<Self, BadFrame> {
        serde_json::from_str(text).map_err(|e| {
            let msg = e.to_string();
            if let Some(rest) = msg.strip_prefix("unknown variant ") {
                // "`name`, expected one of …": the name itself may hold commas and backticks.
                let name = match rest.rsplit_once("`, expected") {
                    Some((name, _)) => format!("{name}`"),
                    None => rest.to_string(),
                };
                BadFrame::UnknownType(name)
            } else if e.is_syntax() || e.is_eof() {
                BadFrame::Malformed(e)
            } else {
                BadFrame::Invalid(e)
            }
        })
    }
}

/// The `code` of an error reply that keeps the socket open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ErrorCode {
    BadRequest,
    Forbidden,
    RateLimited,
    TooManySubscriptions,
    /// The broker cannot take events right now (Redis away); retry later.
    Unavailable,
}

/// Messages the server sends, other than events (those are encoded once per event by
/// [`encode_event`]).
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum ServerMessage<'a> {
    Welcome {
        conn_id: String,
        user: &'a str,
        org: &'a str,
        heartbeat_ms: u64,
    },
    Subscribed {
        topic: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
    },
    Unsubscribed {
        topic: &'a str,
    },
    Error {
        code: ErrorCode,
        message: &'a str,
    },
    Pong,
    Reconnect {
        after_ms: u64,
    },
}

impl ServerMessage<'_> {
    pub(crate) fn encode(&self) -> String {
        // unwrap: these types serialise infallibly (no maps with non-string keys, no NaN).
        serde_json::to_string(self).unwrap()
    }
}

/// Who sent a client-published event; relayed so subscribers can tell voices apart.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Sender<'a> {
    pub(crate) user: &'a str,
    pub(crate) conn_id: &'a str,
}

/// The one encoding of an event frame, shared by every socket that receives it. `data` is a
/// [`Value`], or the checked text of one as it arrived (a [`serde_json::value::RawValue`],
/// written as it is).
pub(crate) fn encode_event<D: Serialize + ?Sized>(
    topic: &str,
    id: EventId,
    event: &str,
    data: &D,
    sender: Option<Sender<'_>>,
) -> String {
    #[derive(Serialize)]
    struct EventFrame<'a, D: ?Sized> {
        r#type: &'static str,
        topic: &'a str,
        id: String,
        event: &'a str,
        data: &'a D,
        #[serde(skip_serializing_if = "Option::is_none")]
        user: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        conn_id: Option<&'a str>,
    }
    let frame = EventFrame {
        r#type: "event",
        topic,
        id: id.to_string(),
        event,
        data,
        user: sender.as_ref().map(|s| s.user),
        conn_id: sender.as_ref().map(|s| s.conn_id),
    };
    // unwrap: serde_json::Value, RawValue and &str always serialise.
    serde_json::to_string(&frame).unwrap()
}

/// Validate an event name: 1-64 printable ASCII characters without spaces.
pub(crate) fn validate_event_name(raw: &str) -> Result<(), InvalidId> {
    if !raw.is_empty() && raw.len() <= 64 && raw.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(InvalidId::EventName)
    }
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    /// Topic grammar accepts the documented shapes and refuses everything else.
    /// Decoding errors say what is wrong in words a developer can act on.
    #[test]
    fn decode_errors() {
        assert!(ClientMessage::decode("{")
            .unwrap_err()
            .to_string()
            .contains("malformed JSON"));
        let e = ClientMessage::decode(r#"{"type":"dance"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown message type"), "{e}");
        let e = ClientMessage::decode(r#"{"type":"subscribe"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("topic"), "{e}");
        assert!(matches!(
            ClientMessage::decode(r#"{"type":"ping"}"#),
            Ok(ClientMessage::Ping)
        ));
    }

    /// Found by fuzzing: a float in published data reached subscribers with its last digit
    /// changed (serde_json's default float parsing is not exact).
    #[test]
    fn published_floats_reach_subscribers_unchanged() {
        let text = r#"{"type":"publish","topic":"a","data":[1.1557555010587585e-135,-1.0181148613003223e166]}"#;
        let Ok(ClientMessage::Publish { data, .. }) = ClientMessage::decode(text) else {
            panic!("a publish message");
        };
        let frame = encode_event("a", EventId::default(), "m", &data, None);
        let frame: Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(frame["data"][0].as_f64(), Some(1.1557555010587585e-135));
        assert_eq!(frame["data"][1].as_f64(), Some(-1.0181148613003223e166));
    }

    /// Found by fuzzing: a type with a comma in it was cut at the comma in the reply.
    #[test]
    fn unknown_type_is_named_whole() {
        let e = ClientMessage::decode(r#"{"type":",sub, scribe`"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("unknown message type `,sub, scribe``"), "{e}");
    }

    /// Server frames carry `type` first, as the protocol promises.
    #[test]
    fn type_comes_first() {
        let s = ServerMessage::Pong.encode();
        assert_eq!(s, r#"{"type":"pong"}"#);
        let e = encode_event(
            "calls",
            EventId { ms: 1, seq: 2 },
            "call.status",
            &Value::Null,
            None,
        );
        assert_eq!(
            e,
            r#"{"type":"event","topic":"calls","id":"1-2","event":"call.status","data":null}"#
        );
    }
}

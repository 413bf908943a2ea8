//! The wire protocol and the ids it carries: validated newtypes (`OrgId`, `UserId`, `Topic`,
//! `ChannelKey`, `ConnId`, `EventId`), client messages with their decoding errors, server
//! messages with their encoding, and the topic patterns of `auth.client_publish`. Pure: no I/O,
//! no actors. A `Topic` or `OrgId` can only be built through its validator, so an unchecked
//! name never reaches the registry or Redis.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// An organisation id: `[A-Za-z0-9_.-]{1,64}`. No `:`, so `sb:{org}:{topic}` is unambiguous
/// and one org can never name a channel of another.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OrgId(Arc<str>);

impl OrgId {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let ok = !raw.is_empty()
            && raw.len() <= 64
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
        if ok {
            Ok(Self(raw.into()))
        } else {
            Err("org must be 1-64 characters of letters, digits, '_', '.' or '-'".into())
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OrgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A user id as the identity provider gives it: 1-128 characters, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserId(Arc<str>);

impl UserId {
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.is_empty() || raw.chars().count() > 128 || raw.chars().any(char::is_control) {
            Err("user must be 1-128 characters without control characters".into())
        } else {
            Ok(Self(raw.into()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A topic name within an org: `[a-z0-9][a-z0-9:._-]{0,127}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(Arc<str>);

impl Topic {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let bytes = raw.as_bytes();
        let first_ok = bytes
            .first()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        let rest_ok = bytes.iter().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b':' | b'.' | b'_' | b'-')
        });
        if first_ok && rest_ok && bytes.len() <= 128 {
            Ok(Self(raw.into()))
        } else {
            Err(format!(
                "topic {:?} does not match [a-z0-9][a-z0-9:._-]{{0,127}}",
                truncate(raw, 64)
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The Redis channel (and registry key) of one org's topic: `sb:{org}:{topic}`.
#[derive(Debug, Clone, Eq, PartialOrd, Ord)]
pub struct ChannelKey(Arc<str>);

impl std::hash::Hash for ChannelKey {
    /// By content, as equality is (the pointer check there is only a shortcut).
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl PartialEq for ChannelKey {
    /// Keys are shared `Arc`s, so the same pointer usually answers before any byte is read.
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
    }
}

pub const CHANNEL_PREFIX: &str = "sb:";

impl ChannelKey {
    pub fn new(org: &OrgId, topic: &Topic) -> Self {
        Self(format!("{CHANNEL_PREFIX}{org}:{topic}").into())
    }

    /// Split a channel name received from Redis back into org and topic, validating both.
    pub fn parse(channel: &str) -> Option<(OrgId, Topic)> {
        let rest = channel.strip_prefix(CHANNEL_PREFIX)?;
        let (org, topic) = rest.split_once(':')?;
        Some((OrgId::parse(org).ok()?, Topic::parse(topic).ok()?))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The topic part, for frames sent to clients (who never see org prefixes).
    pub fn topic(&self) -> &str {
        let rest = &self.0[CHANNEL_PREFIX.len()..];
        rest.split_once(':').map(|(_, t)| t).unwrap_or(rest)
    }
}

impl fmt::Display for ChannelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A connection id, unique across pods: this process's random node id plus a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

impl ConnId {
    pub fn next() -> Self {
        Self(NEXT_CONN.fetch_add(1, Ordering::Relaxed))
    }
}

/// This process's id, random per start, so conn ids of different pods never collide.
pub fn node_id() -> &'static str {
    static NODE: OnceLock<String> = OnceLock::new();
    NODE.get_or_init(|| format!("{:08x}", rand::random::<u32>()))
}

impl ConnId {
    /// Parse the display form back, if it names a connection of this process.
    pub fn parse_local(raw: &str) -> Option<Self> {
        let (node, seq) = raw.split_once('-')?;
        if node == node_id() {
            seq.parse().ok().map(Self)
        } else {
            None
        }
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", node_id(), self.0)
    }
}

/// An event id in Redis stream form `<unix-ms>-<seq>`; ordered, so replays can skip duplicates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct EventId {
    pub ms: u64,
    pub seq: u64,
}

impl EventId {
    pub fn parse(raw: &str) -> Option<Self> {
        let (ms, seq) = match raw.split_once('-') {
            Some((ms, seq)) => (ms, seq),
            None => (raw, "0"),
        };
        Some(Self {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }

    /// The next id after `prev` at wall-clock `now_ms`, never going backwards.
    pub fn next_after(prev: EventId, now_ms: u64) -> Self {
        if now_ms > prev.ms {
            Self { ms: now_ms, seq: 0 }
        } else {
            Self {
                ms: prev.ms,
                seq: prev.seq + 1,
            }
        }
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A pattern of `auth.client_publish`: topic grammar plus `*`, which stands for one segment
/// (one or more characters without `:`), so `voice:*:in` cannot match `voice:a:b:in`.
#[derive(Debug, Clone)]
pub struct TopicPattern {
    parts: Vec<PatternPart>,
    source: String,
}

#[derive(Debug, Clone)]
enum PatternPart {
    Literal(String),
    Segment,
}

impl TopicPattern {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let probe = raw.replace('*', "x");
        Topic::parse(&probe).map_err(|_| {
            "a pattern is a topic name where '*' stands for one segment, e.g. voice:*:in"
                .to_string()
        })?;
        let mut parts = Vec::new();
        for (i, literal) in raw.split('*').enumerate() {
            if i > 0 {
                parts.push(PatternPart::Segment);
            }
            if !literal.is_empty() {
                parts.push(PatternPart::Literal(literal.to_string()));
            }
        }
        Ok(Self {
            parts,
            source: raw.to_string(),
        })
    }

    pub fn matches(&self, topic: &Topic) -> bool {
        fn go(parts: &[PatternPart], s: &str) -> bool {
            match parts.split_first() {
                None => s.is_empty(),
                Some((PatternPart::Literal(l), rest)) => {
                    s.strip_prefix(l.as_str()).is_some_and(|r| go(rest, r))
                }
                Some((PatternPart::Segment, rest)) => {
                    let segment_len = s.find(':').unwrap_or(s.len());
                    (1..=segment_len).any(|n| go(rest, &s[n..]))
                }
            }
        }
        go(&self.parts, topic.as_str())
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }
}

/// A message from the browser. `type` selects the variant.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMessage {
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

impl ClientMessage {
    /// Decode a text frame; the error is the message for a `bad_request` reply.
    pub fn decode(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| {
            let msg = e.to_string();
            if let Some(rest) = msg.strip_prefix("unknown variant ") {
                let name = rest.split(',').next().unwrap_or(rest);
                format!("unknown message type {name}")
            } else if e.is_syntax() || e.is_eof() {
                format!("malformed JSON: {msg}")
            } else {
                msg
            }
        })
    }
}

/// The `code` of an error reply that keeps the socket open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
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
pub enum ServerMessage<'a> {
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
    pub fn encode(&self) -> String {
        // unwrap: these types serialise infallibly (no maps with non-string keys, no NaN).
        serde_json::to_string(self).unwrap()
    }
}

/// Who sent a client-published event; relayed so subscribers can tell voices apart.
#[derive(Debug, Clone, Serialize)]
pub struct Sender<'a> {
    pub user: &'a str,
    pub conn_id: &'a str,
}

/// The one encoding of an event frame, shared by every socket that receives it.
pub fn encode_event(
    topic: &str,
    id: EventId,
    event: &str,
    data: &Value,
    sender: Option<Sender<'_>>,
) -> String {
    #[derive(Serialize)]
    struct EventFrame<'a> {
        r#type: &'static str,
        topic: &'a str,
        id: String,
        event: &'a str,
        data: &'a Value,
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
    // unwrap: serde_json::Value and &str always serialise.
    serde_json::to_string(&frame).unwrap()
}

/// Validate an event name: 1-64 printable ASCII characters without spaces.
pub fn validate_event_name(raw: &str) -> Result<(), String> {
    if !raw.is_empty() && raw.len() <= 64 && raw.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err("event must be 1-64 printable characters without spaces".into())
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Topic grammar accepts the documented shapes and refuses everything else.
    #[test]
    fn topic_grammar() {
        for ok in ["calls", "call:abc", "voice:c-1:in", "0", "a.b_c-d"] {
            assert!(Topic::parse(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(129);
        for bad in ["", "Calls", "-x", ":x", "a b", "ü", &long, "a/b"] {
            assert!(Topic::parse(bad).is_err(), "{bad}");
        }
        assert!(Topic::parse(&"a".repeat(128)).is_ok());
    }

    /// Org ids cannot contain ':' so channels cannot be forged across orgs.
    #[test]
    fn org_cannot_forge_channels() {
        assert!(OrgId::parse("42").is_ok());
        assert!(OrgId::parse("a:b").is_err());
        assert!(OrgId::parse("").is_err());
        let key = ChannelKey::new(&OrgId::parse("42").unwrap(), &Topic::parse("x:y").unwrap());
        assert_eq!(key.as_str(), "sb:42:x:y");
        assert_eq!(key.topic(), "x:y");
        let (org, topic) = ChannelKey::parse("sb:42:x:y").unwrap();
        assert_eq!((org.as_str(), topic.as_str()), ("42", "x:y"));
        assert!(ChannelKey::parse("other:42:x").is_none());
    }

    /// Event ids order by time then sequence and never go backwards.
    #[test]
    fn event_ids() {
        let a = EventId::parse("1700000000000-5").unwrap();
        assert!(a < EventId::parse("1700000000001-0").unwrap());
        assert_eq!(a.to_string(), "1700000000000-5");
        assert_eq!(EventId::next_after(a, 1), EventId { ms: a.ms, seq: 6 });
        assert_eq!(EventId::parse("12").unwrap(), EventId { ms: 12, seq: 0 });
        assert!(EventId::parse("x-1").is_none());
    }

    /// `*` matches exactly one non-empty segment.
    #[test]
    fn topic_patterns() {
        let p = TopicPattern::parse("voice:*:in").unwrap();
        let t = |s| Topic::parse(s).unwrap();
        assert!(p.matches(&t("voice:abc:in")));
        assert!(!p.matches(&t("voice:a:b:in")));
        assert!(!p.matches(&t("voice::in")));
        assert!(!p.matches(&t("voice:abc:out")));
        assert!(!p.matches(&t("calls")));
        assert!(TopicPattern::parse("Voice:*").is_err());
        let any = TopicPattern::parse("chat:*").unwrap();
        assert!(any.matches(&t("chat:x")));
        assert!(!any.matches(&t("chat:x:y")));
    }

    /// Decoding errors say what is wrong in words a developer can act on.
    #[test]
    fn decode_errors() {
        assert!(ClientMessage::decode("{")
            .unwrap_err()
            .contains("malformed JSON"));
        let e = ClientMessage::decode(r#"{"type":"dance"}"#).unwrap_err();
        assert!(e.contains("unknown message type"), "{e}");
        let e = ClientMessage::decode(r#"{"type":"subscribe"}"#).unwrap_err();
        assert!(e.contains("topic"), "{e}");
        assert!(matches!(
            ClientMessage::decode(r#"{"type":"ping"}"#),
            Ok(ClientMessage::Ping)
        ));
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

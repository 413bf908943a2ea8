//! The ids the hub passes around, as validated newtypes: `OrgId`, `UserId`, `Topic`,
//! `ChannelKey`, `ConnId`, `EventId`, and the topic patterns of `auth.client_publish`. Pure:
//! no I/O. A `Topic` or `OrgId` can only be built through its validator, so an unchecked name
//! never reaches the registry or Redis; the wire messages that carry them are in
//! [`super::wire`].

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// Why a name from outside (a client frame, a token, a publish body) is not a valid id. The
/// text is what the client is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidId {
    #[error("org must be 1-64 characters of letters, digits, '_', '.' or '-'")]
    Org,
    #[error("user must be 1-128 characters without control characters")]
    User,
    #[error("topic {0:?} does not match [a-z0-9][a-z0-9:._-]{{0,127}}")]
    Topic(String),
    #[error("a pattern is a topic name where '*' stands for one segment, e.g. voice:*:in")]
    Pattern,
    #[error("event must be 1-64 printable characters without spaces")]
    EventName,
}

/// An organisation id: `[A-Za-z0-9_.-]{1,64}`. No `:`, so `sb:{org}:{topic}` is unambiguous
/// and one org can never name a channel of another.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct OrgId(Arc<str>);

impl OrgId {
    pub(crate) fn parse(raw: &str) -> Result<Self, InvalidId> {
        let ok = !raw.is_empty()
            && raw.len() <= 64
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
        if ok {
            Ok(Self(raw.into()))
        } else {
            Err(InvalidId::Org)
        }
    }

    pub(crate) fn as_str(&self) -> &str {
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
pub(crate) struct UserId(Arc<str>);

impl UserId {
    pub(crate) fn parse(raw: &str) -> Result<Self, InvalidId> {
        if raw.is_empty() || raw.chars().count() > 128 || raw.chars().any(char::is_control) {
            Err(InvalidId::User)
        } else {
            Ok(Self(raw.into()))
        }
    }

    pub(crate) fn as_str(&self) -> &str {
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
pub(crate) struct Topic(Arc<str>);

impl Topic {
    pub(crate) fn parse(raw: &str) -> Result<Self, InvalidId> {
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
            Err(InvalidId::Topic(truncate(raw, 64).to_string()))
        }
    }

    pub(crate) fn as_str(&self) -> &str {
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
pub(crate) struct ChannelKey(Arc<str>);

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

pub(crate) const CHANNEL_PREFIX: &str = "sb:";

impl ChannelKey {
    pub(crate) fn new(org: &OrgId, topic: &Topic) -> Self {
        Self(format!("{CHANNEL_PREFIX}{org}:{topic}").into())
    }

    /// Split a channel name received from Redis back into org and topic, validating both.
    pub(crate) fn parse(channel: &str) -> Option<(OrgId, Topic)> {
        let rest = channel.strip_prefix(CHANNEL_PREFIX)?;
        let (org, topic) = rest.split_once(':')?;
        Some((OrgId::parse(org).ok()?, Topic::parse(topic).ok()?))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// The topic part, for frames sent to clients (who never see org prefixes).
    pub(crate) fn topic(&self) -> &str {
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
pub(crate) struct ConnId(pub(crate) u64);

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

impl ConnId {
    pub(crate) fn next() -> Self {
        Self(NEXT_CONN.fetch_add(1, Ordering::Relaxed))
    }
}

/// This process's id, random per start, so conn ids of different pods never collide.
pub(crate) fn node_id() -> &'static str {
    static NODE: OnceLock<String> = OnceLock::new();
    NODE.get_or_init(|| format!("{:08x}", rand::random::<u32>()))
}

impl ConnId {
    /// Parse the display form back, if it names a connection of this process.
    pub(crate) fn parse_local(raw: &str) -> Option<Self> {
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
pub(crate) struct EventId {
    pub(crate) ms: u64,
    pub(crate) seq: u64,
}

impl EventId {
    pub(crate) fn parse(raw: &str) -> Option<Self> {
        let (ms, seq) = match raw.split_once('-') {
            Some((ms, seq)) => (ms, seq),
            None => (raw, "0"),
        };
        Some(Self {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }

    /// The next id after `prev` at wall-clock `now_ms`, never going backwards. `prev` may be
    /// any id a publisher handed Redis, `u64::MAX` parts included: a full sequence moves on
    /// to the next millisecond, and the greatest id of all is its own successor.
    pub(crate) fn next_after(prev: EventId, now_ms: u64) -> Self {
        if now_ms > prev.ms {
            Self { ms: now_ms, seq: 0 }
        } else if let Some(seq) = prev.seq.checked_add(1) {
            Self { ms: prev.ms, seq }
        } else {
            prev.ms
                .checked_add(1)
                .map_or(prev, |ms| Self { ms, seq: 0 })
        }
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// Now, in milliseconds since the Unix epoch.
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Now, in seconds since the Unix epoch.
pub(crate) fn now_s() -> u64 {
    unix_ms() / 1000
}

/// A pattern of `auth.client_publish`: topic grammar plus `*`, which stands for one segment
/// (one or more characters without `:`), so `voice:*:in` cannot match `voice:a:b:in`.
#[derive(Debug, Clone)]
pub(crate) struct TopicPattern {
    parts: Vec<PatternPart>,
}

#[derive(Debug, Clone)]
enum PatternPart {
    Literal(String),
    Segment,
}

impl TopicPattern {
    pub(crate) fn parse(raw: &str) -> Result<Self, InvalidId> {
        let probe = raw.replace('*', "x");
        Topic::parse(&probe).map_err(|_| InvalidId::Pattern)?;
        let mut parts = Vec::new();
        for (i, literal) in raw.split('*').enumerate() {
            if i > 0 {
                parts.push(PatternPart::Segment);
            }
            if !literal.is_empty() {
                parts.push(PatternPart::Literal(literal.to_string()));
            }
        }
        Ok(Self { parts })
    }

    /// Whether `topic` matches. The positions the parts so far can end at are carried from
    /// part to part, so the work is bounded by parts × length² whatever the pattern: trying
    /// every split in turn took exponential time for patterns like `a*-*-*-*-*-*`.
    pub(crate) fn matches(&self, topic: &Topic) -> bool {
        let s = topic.as_str();
        let mut ends = vec![false; s.len() + 1];
        ends[0] = true;
        for part in &self.parts {
            let mut next = vec![false; s.len() + 1];
            for at in (0..=s.len()).filter(|&at| ends[at]) {
                match part {
                    PatternPart::Literal(l) => {
                        if s[at..].starts_with(l.as_str()) {
                            next[at + l.len()] = true;
                        }
                    }
                    PatternPart::Segment => {
                        let segment_len = s[at..].find(':').unwrap_or(s.len() - at);
                        next[at + 1..=at + segment_len].fill(true);
                    }
                }
            }
            ends = next;
        }
        ends[s.len()]
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod fuzz;

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
        // The last seq of a millisecond (a forged id can carry it) moves on, not over.
        let last = EventId {
            ms: 5,
            seq: u64::MAX,
        };
        assert_eq!(EventId::next_after(last, 1), EventId { ms: 6, seq: 0 });
        assert!(EventId::parse("x-1").is_none());
    }

    /// Found by fuzzing: an id at the top of its sequence (a publisher may hand Redis any id)
    /// overflowed the next id's sequence; it moves on to the next millisecond instead.
    #[test]
    fn next_id_after_a_full_sequence() {
        let full = EventId {
            ms: 7,
            seq: u64::MAX,
        };
        assert_eq!(EventId::next_after(full, 0), EventId { ms: 8, seq: 0 });
        let last = EventId {
            ms: u64::MAX,
            seq: u64::MAX,
        };
        assert_eq!(EventId::next_after(last, 0), last);
    }

    /// Found by fuzzing: a pattern with many `*` in one segment took exponential time on a
    /// long topic that does not match; it answers at once now.
    #[test]
    fn many_stars_match_in_bounded_time() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let pattern = TopicPattern::parse(&format!("x{}y", "*".repeat(40))).unwrap();
            let topic = Topic::parse(&format!("x{}z", "a".repeat(120))).unwrap();
            let matched = pattern.matches(&topic);
            let _ = tx.send(matched);
        });
        let matched = rx.recv_timeout(std::time::Duration::from_secs(10));
        assert_eq!(matched, Ok(false), "no answer within 10 s");
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
}

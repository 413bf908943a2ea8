//! The origin policy: which web pages may open a socket to the hub or call `/api/*` and
//! `/auth/*`. This module owns reading and normalising origins (`scheme://host[:port]`),
//! validating the `[origins]` settings at start-up, the per-request [`Decision`], and the
//! diagnostics behind `switchboard check-origin` and the WARN line of a refusal (the nearest
//! allowed entry and how the refused origin differs from it). It is pure: no I/O, no logging,
//! and no clock except [`Day::today`], so callers pass today's date in. Loading the settings is
//! `config`'s job; logging, counting and closing on a refusal belong to the handshake and HTTP
//! layers.

use std::collections::HashSet;
use std::fmt::{self, Write as _};
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};
use time::format_description::BorrowedFormatItem;
use time::macros::format_description;
use time::{Date, OffsetDateTime};

/// The `[origins]` settings, as loaded by `config`: what this policy is compiled from.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct OriginsConfig {
    /// Exact origins (`scheme://host[:port]`) or one leading-wildcard form `https://*.example.com`.
    pub(crate) allowed: Vec<String>,
    /// Development convenience: any port of localhost, 127.0.0.1 and [::1], over http or https.
    pub(crate) allow_localhost: bool,
    /// Admit requests with no Origin header (non-browser clients).
    pub(crate) allow_missing: bool,
    /// Retired origins still admitted until a date, with a warning per connection.
    pub(crate) legacy: Vec<LegacyOrigin>,
}

/// One entry of `origins.legacy`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LegacyOrigin {
    pub(crate) origin: String,
    /// Last day (UTC, `YYYY-MM-DD`, inclusive) the origin is admitted.
    pub(crate) until: String,
}

// ---------------------------------------------------------------------------------------------
// Dates
// ---------------------------------------------------------------------------------------------

/// A UTC calendar day, counted in days since 1970-01-01; the calendar itself is the `time`
/// crate's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Day(pub(crate) i64);

const SECONDS_PER_DAY: i64 = 86_400;
/// The Julian day number of 1970-01-01, day 0 here.
const EPOCH_JULIAN_DAY: i32 = OffsetDateTime::UNIX_EPOCH.date().to_julian_day();
/// `YYYY-MM-DD`, both read and written: four-digit year, two-digit month and day.
const DATE_FORMAT: &[BorrowedFormatItem<'_>] = format_description!("[year]-[month]-[day]");

impl Day {
    /// Parses `YYYY-MM-DD` strictly: four-digit year, month 1-12, a day that exists in that
    /// month (leap years included). Anything else, padding included, is `None`.
    pub(crate) fn parse(s: &str) -> Option<Day> {
        // `[year]` would also take a leading sign ("+2026-03-03"); the setting is four digits.
        if s.len() != 10 || !s.starts_with(|c: char| c.is_ascii_digit()) {
            return None;
        }
        let date = Date::parse(s, DATE_FORMAT).ok()?;
        Some(Day(i64::from(date.to_julian_day() - EPOCH_JULIAN_DAY)))
    }

    /// The UTC day a Unix timestamp falls on (negative timestamps round towards the past).
    pub(crate) fn from_unix_seconds(secs: i64) -> Day {
        Day(secs.div_euclid(SECONDS_PER_DAY))
    }

    /// Today in UTC: the one place this module reads the clock.
    pub fn today() -> Day {
        Day::from_unix_seconds(OffsetDateTime::now_utc().unix_timestamp())
    }

    /// The calendar date, if it is one `Display` prints: 0000-01-01 ..= 9999-12-31.
    fn date(self) -> Option<Date> {
        let julian_day = self.0.checked_add(i64::from(EPOCH_JULIAN_DAY))?;
        let date = Date::from_julian_day(i32::try_from(julian_day).ok()?).ok()?;
        (0..=9999).contains(&date.year()).then_some(date)
    }
}

impl fmt::Display for Day {
    /// `YYYY-MM-DD`; a count outside the printable years (possible because the field is
    /// public) prints as the raw count instead.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(date) = self.date() else {
            return write!(f, "day {} since 1970-01-01", self.0);
        };
        f.write_str(&date.format(DATE_FORMAT).map_err(|_| fmt::Error)?)
    }
}

// ---------------------------------------------------------------------------------------------
// Reading origins
// ---------------------------------------------------------------------------------------------

/// DNS limits: a host name of at most 253 characters, labels of at most 63. They also bound the
/// work any hostile header can cause here (the nearest-entry search compares hosts).
const MAX_HOST_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;
/// How much of a hostile value is echoed back in hints and explanations.
const ECHO_LIMIT: usize = 200;
const EXTRA_ECHO_LIMIT: usize = 60;

/// The only schemes whose pages send a meaningful Origin header to a WebSocket hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Scheme {
    Http,
    Https,
}

impl Scheme {
    fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The host of a value read by [`read_parts`], still in its original case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HostPart<'a> {
    /// A DNS name or a dotted-decimal IPv4 address (validated, ASCII).
    Name(&'a str),
    /// A bracketed IPv6 address, parsed so `[0:0::1]` and `[::1]` compare equal.
    Ipv6(Ipv6Addr),
    /// `*.suffix`: only config entries may use it; a header carrying one is refused.
    Wildcard(&'a str),
}

/// A value split into origin parts, borrowing the input so the hot path allocates nothing here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Parts<'a> {
    scheme: Scheme,
    host: HostPart<'a>,
    /// The explicit port, already `None` when it was the scheme's default.
    port: Option<u16>,
    /// What followed the authority: empty for a real origin, otherwise a path, query or
    /// fragment. Kept rather than rejected so diagnostics can say "trailing slash".
    rest: &'a str,
}

/// Why a value is not an acceptable origin. `Display` gives a predicate ("has a trailing
/// slash") that reads after either `origins.allowed entry "…"` or `not an origin:`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum OriginError {
    Empty,
    Whitespace,
    ControlCharacter,
    NonAscii,
    MissingScheme,
    UnsupportedScheme(String),
    WebSocketScheme(Scheme),
    Userinfo,
    EmptyHost,
    BadHost(&'static str),
    BadPort(String),
    PortWildcard,
    MisplacedWildcard,
    WildcardTooBroad,
    WildcardEverything,
    PatternNotOrigin,
    TrailingSlash,
    Path(String),
    Query(String),
    Fragment(String),
}

impl fmt::Display for OriginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OriginError::Empty => f.write_str("is empty"),
            OriginError::Whitespace => f.write_str("contains whitespace"),
            OriginError::ControlCharacter => f.write_str("contains a control character"),
            OriginError::NonAscii => f.write_str(
                "contains non-ASCII characters (write an international domain name in its \
                 punycode form, xn--…)",
            ),
            OriginError::MissingScheme => f.write_str("has no scheme (http:// or https://)"),
            OriginError::UnsupportedScheme(scheme) => write!(
                f,
                "has scheme {scheme:?}: only http and https pages are origins here"
            ),
            OriginError::WebSocketScheme(page_scheme) => write!(
                f,
                "uses a WebSocket URL scheme: the Origin header carries the page's origin, \
                 which is {page_scheme}://…"
            ),
            OriginError::Userinfo => {
                f.write_str("has user info before '@' (an origin is scheme://host[:port])")
            }
            OriginError::EmptyHost => f.write_str("has an empty host"),
            OriginError::BadHost(reason) => write!(f, "has an invalid host: {reason}"),
            OriginError::BadPort(port) => {
                write!(f, "has an invalid port {port:?} (a port is 1 to 65535)")
            }
            OriginError::PortWildcard => f.write_str(
                "has a wildcard port: list each port, or set origins.allow_localhost = true \
                 for any port of localhost",
            ),
            OriginError::MisplacedWildcard => f.write_str(
                "has a wildcard outside a leading `*.` label of the host (only the form \
                 https://*.example.com is supported)",
            ),
            OriginError::WildcardTooBroad => f.write_str(
                "has a wildcard that is too broad: `*.` needs at least two labels after it \
                 (like https://*.example.com)",
            ),
            OriginError::WildcardEverything => f.write_str(
                "would admit every site: list the origins (a leading-label wildcard such as \
                 https://*.example.com is allowed)",
            ),
            OriginError::PatternNotOrigin => f.write_str("is a wildcard pattern, not an origin"),
            OriginError::TrailingSlash => f.write_str("has a trailing slash"),
            OriginError::Path(path) => write!(f, "has a path {path:?}"),
            OriginError::Query(query) => write!(f, "has a query {query:?}"),
            OriginError::Fragment(fragment) => write!(f, "has a fragment {fragment:?}"),
        }
    }
}

/// Splits a value into origin parts, validating every part. Never panics and never trims:
/// a header with padding is not an origin. Case is left alone (see [`Origin::from_parts`]).
fn read_parts(value: &str) -> Result<Parts<'_>, OriginError> {
    if value.is_empty() {
        return Err(OriginError::Empty);
    }
    if value.bytes().any(|b| b.is_ascii_whitespace()) {
        return Err(OriginError::Whitespace);
    }
    if value.bytes().any(|b| b.is_ascii_control()) {
        return Err(OriginError::ControlCharacter);
    }
    if !value.is_ascii() {
        return Err(OriginError::NonAscii);
    }
    if value == "*" {
        return Err(OriginError::WildcardEverything);
    }
    let Some((scheme_text, after_scheme)) = value.split_once("://") else {
        return Err(OriginError::MissingScheme);
    };
    let scheme = read_scheme(scheme_text)?;
    let authority_len = after_scheme
        .find(['/', '?', '#'])
        .unwrap_or(after_scheme.len());
    let (authority, rest) = after_scheme.split_at(authority_len);
    if authority.contains('@') {
        return Err(OriginError::Userinfo);
    }
    let (host_text, port_text) = split_host_port(authority)?;
    let host = read_host(host_text)?;
    let port = match port_text {
        Some(text) => Some(read_port(text)?),
        None => None,
    };
    Ok(Parts {
        scheme,
        host,
        port: port.filter(|&p| p != scheme.default_port()),
        rest,
    })
}

fn read_scheme(text: &str) -> Result<Scheme, OriginError> {
    if text.eq_ignore_ascii_case("https") {
        Ok(Scheme::Https)
    } else if text.eq_ignore_ascii_case("http") {
        Ok(Scheme::Http)
    } else if text.eq_ignore_ascii_case("wss") {
        Err(OriginError::WebSocketScheme(Scheme::Https))
    } else if text.eq_ignore_ascii_case("ws") {
        Err(OriginError::WebSocketScheme(Scheme::Http))
    } else if text.contains('*') {
        Err(OriginError::MisplacedWildcard)
    } else if text.is_empty() {
        Err(OriginError::MissingScheme)
    } else {
        Err(OriginError::UnsupportedScheme(clipped(
            &text.to_ascii_lowercase(),
            EXTRA_ECHO_LIMIT,
        )))
    }
}

/// `host[:port]` or `[ipv6][:port]`; the port text is returned unparsed.
fn split_host_port(authority: &str) -> Result<(&str, Option<&str>), OriginError> {
    if authority.is_empty() {
        return Err(OriginError::EmptyHost);
    }
    if let Some(after_open) = authority.strip_prefix('[') {
        let Some(close) = after_open.find(']') else {
            return Err(OriginError::BadHost("an IPv6 address needs a closing ']'"));
        };
        let (inside, after_close) = after_open.split_at(close);
        let host = &authority[..inside.len() + 2];
        let tail = &after_close[1..];
        return match tail.strip_prefix(':') {
            Some(port) => Ok((host, Some(port))),
            None if tail.is_empty() => Ok((host, None)),
            None => Err(OriginError::BadHost(
                "unexpected text after the IPv6 address",
            )),
        };
    }
    Ok(match authority.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    })
}

fn read_port(text: &str) -> Result<u16, OriginError> {
    if text.contains('*') {
        return Err(OriginError::PortWildcard);
    }
    let bad_port = || OriginError::BadPort(clipped(text, EXTRA_ECHO_LIMIT));
    // Five digits at most, so a hostile run of digits cannot overflow the parse.
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad_port());
    }
    match text.parse::<u16>() {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(bad_port()),
    }
}

fn read_host(text: &str) -> Result<HostPart<'_>, OriginError> {
    if text.is_empty() {
        return Err(OriginError::EmptyHost);
    }
    if let Some(inside) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
        return inside
            .parse::<Ipv6Addr>()
            .map(HostPart::Ipv6)
            .map_err(|_| OriginError::BadHost("not a valid IPv6 address"));
    }
    if text == "*" {
        return Err(OriginError::WildcardEverything);
    }
    if text.contains('*') {
        let Some(suffix) = text.strip_prefix("*.") else {
            return Err(OriginError::MisplacedWildcard);
        };
        if suffix.contains('*') {
            return Err(OriginError::MisplacedWildcard);
        }
        let numeric_tail = suffix
            .rsplit('.')
            .next()
            .is_some_and(|label| !label.is_empty() && label.bytes().all(|b| b.is_ascii_digit()));
        if numeric_tail || check_name(suffix)? == NameKind::Ipv4 {
            return Err(OriginError::BadHost(
                "a wildcard needs a domain name after `*.`, not an IP address",
            ));
        }
        // `*.com` would admit every .com site; two labels is the least that names someone.
        if !suffix.contains('.') {
            return Err(OriginError::WildcardTooBroad);
        }
        return Ok(HostPart::Wildcard(suffix));
    }
    check_name(text)?;
    Ok(HostPart::Name(text))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NameKind {
    DomainName,
    Ipv4,
}

/// Validates a DNS name or dotted-decimal IPv4 address the way a browser would serialise it:
/// LDH labels (plus `_`), no empty labels, no percent-encoding.
fn check_name(name: &str) -> Result<NameKind, OriginError> {
    if name.len() > MAX_HOST_LEN {
        return Err(OriginError::BadHost("longer than 253 characters"));
    }
    if let Some(bad) = name
        .bytes()
        .find(|&b| !(b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')))
    {
        return Err(OriginError::BadHost(if bad == b'%' {
            "percent-encoding is not allowed"
        } else {
            "only letters, digits, '-', '_' and '.' may appear"
        }));
    }
    let mut last_label = "";
    for label in name.split('.') {
        if label.is_empty() {
            return Err(OriginError::BadHost(
                "it has an empty label (a leading, trailing or doubled dot)",
            ));
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(OriginError::BadHost(
                "it has a label longer than 63 characters",
            ));
        }
        last_label = label;
    }
    // A numeric last label makes browsers read the host as an IPv4 address; accept only the
    // canonical dotted-decimal form they would send.
    if last_label.bytes().all(|b| b.is_ascii_digit()) {
        return name
            .parse::<Ipv4Addr>()
            .map(|_| NameKind::Ipv4)
            .map_err(|_| OriginError::BadHost("not a valid IPv4 address"));
    }
    Ok(NameKind::DomainName)
}

/// The remainder after the authority as an error, if there is one.
fn extra_error(rest: &str) -> Option<OriginError> {
    let shown = || clipped(rest, EXTRA_ECHO_LIMIT);
    match rest.as_bytes().first() {
        None => None,
        Some(b'/') if rest == "/" => Some(OriginError::TrailingSlash),
        Some(b'/') => Some(OriginError::Path(shown())),
        Some(b'?') => Some(OriginError::Query(shown())),
        Some(_) => Some(OriginError::Fragment(shown())),
    }
}

/// A normalised origin, serialised once: `scheme://host[:port]`, lowercase, default port
/// dropped, IPv6 in canonical bracketed form. The serialisation is both the exact-match key
/// and the text shown to people.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    serialised: String,
    scheme: Scheme,
    /// Byte offset where the host ends in `serialised`.
    host_end: usize,
    port: Option<u16>,
}

impl Origin {
    /// Builds the normalised form with exactly one allocation. `None` for a wildcard host.
    fn from_parts(parts: &Parts<'_>) -> Option<Origin> {
        let scheme_text = parts.scheme.as_str();
        let host_len = match parts.host {
            HostPart::Name(name) => name.len(),
            HostPart::Ipv6(_) => 41,
            HostPart::Wildcard(_) => return None,
        };
        let mut serialised = String::with_capacity(scheme_text.len() + 3 + host_len + 6);
        serialised.push_str(scheme_text);
        serialised.push_str("://");
        // Writing into a String cannot fail, so the fmt::Result is ignored.
        match parts.host {
            HostPart::Name(name) => {
                serialised.push_str(name);
                serialised.make_ascii_lowercase();
            }
            HostPart::Ipv6(address) => {
                let _ = write!(serialised, "[{address}]");
            }
            HostPart::Wildcard(_) => return None,
        }
        let host_end = serialised.len();
        if let Some(port) = parts.port {
            let _ = write!(serialised, ":{port}");
        }
        Some(Origin {
            serialised,
            scheme: parts.scheme,
            host_end,
            port: parts.port,
        })
    }

    fn as_str(&self) -> &str {
        &self.serialised
    }

    fn host(&self) -> &str {
        let host_start = self.scheme.as_str().len() + 3;
        self.serialised
            .get(host_start..self.host_end)
            .unwrap_or_default()
    }

    fn effective_port(&self) -> u16 {
        self.port.unwrap_or(self.scheme.default_port())
    }
}

/// The three loopback hosts `origins.allow_localhost` admits — and nothing that merely looks
/// like them (`localhost.evil.com`, `127.0.0.2`).
fn is_loopback(host: &str) -> bool {
    matches!(host, "localhost" | "127.0.0.1" | "[::1]")
}

/// `scheme://*.suffix[:port]`: admits any host with at least one label before `suffix`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Wildcard {
    scheme: Scheme,
    /// Lowercase, without the leading dot: `example.com`.
    suffix: String,
    port: Option<u16>,
    /// The entry as shown to people: `https://*.example.com`.
    display: String,
}

impl Wildcard {
    fn from_parts(parts: &Parts<'_>, suffix: &str) -> Wildcard {
        let suffix = suffix.to_ascii_lowercase();
        let mut display = format!("{}://*.{suffix}", parts.scheme);
        if let Some(port) = parts.port {
            let _ = write!(display, ":{port}");
        }
        Wildcard {
            scheme: parts.scheme,
            suffix,
            port: parts.port,
            display,
        }
    }

    fn covers(&self, origin: &Origin) -> bool {
        self.scheme == origin.scheme && self.port == origin.port && self.covers_host(origin.host())
    }

    /// `a.example.com` and `a.b.example.com`, never `example.com` or `evil-example.com`.
    fn covers_host(&self, host: &str) -> bool {
        host.strip_suffix(self.suffix.as_str())
            .and_then(|prefix| prefix.strip_suffix('.'))
            .is_some_and(|labels| !labels.is_empty())
    }

    fn effective_port(&self) -> u16 {
        self.port.unwrap_or(self.scheme.default_port())
    }
}

/// One entry of `origins.allowed` or `origins.legacy`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Exact(Origin),
    Wildcard(Wildcard),
}

impl Pattern {
    fn matches(&self, origin: &Origin) -> bool {
        match self {
            Pattern::Exact(exact) => exact.serialised == origin.serialised,
            Pattern::Wildcard(wildcard) => wildcard.covers(origin),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            Pattern::Exact(exact) => exact.as_str(),
            Pattern::Wildcard(wildcard) => &wildcard.display,
        }
    }
}

/// A config entry that is not a usable origin: the problem, and the fix when one is obvious.
struct EntryProblem {
    error: OriginError,
    suggestion: Option<String>,
}

impl fmt::Display for EntryProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.error)?;
        if let Some(suggestion) = &self.suggestion {
            write!(f, ": write {suggestion:?}")?;
        }
        Ok(())
    }
}

/// Reads one config entry into a pattern, or says what is wrong with it and how to fix it.
fn read_entry(entry: &str) -> Result<Pattern, EntryProblem> {
    let parts = read_parts(entry).map_err(|error| EntryProblem {
        suggestion: suggest_fix(entry, &error),
        error,
    })?;
    if let Some(error) = extra_error(parts.rest) {
        return Err(EntryProblem {
            error,
            suggestion: Some(without_rest(entry, parts.rest).to_string()),
        });
    }
    Ok(match parts.host {
        HostPart::Wildcard(suffix) => Pattern::Wildcard(Wildcard::from_parts(&parts, suffix)),
        HostPart::Name(_) | HostPart::Ipv6(_) => match Origin::from_parts(&parts) {
            Some(origin) => Pattern::Exact(origin),
            None => {
                return Err(EntryProblem {
                    error: OriginError::PatternNotOrigin,
                    suggestion: None,
                })
            }
        },
    })
}

fn without_rest<'a>(value: &'a str, rest: &str) -> &'a str {
    value
        .get(..value.len().saturating_sub(rest.len()))
        .unwrap_or(value)
}

/// The corrected entry for mistakes with one obvious fix, offered only when it is itself valid.
fn suggest_fix(entry: &str, error: &OriginError) -> Option<String> {
    let candidate = match error {
        OriginError::Whitespace => entry.trim().to_string(),
        OriginError::MissingScheme if !entry.contains("://") => {
            let host_guess = entry.split([':', '/']).next().unwrap_or_default();
            let scheme = if is_loopback(&host_guess.to_ascii_lowercase()) {
                Scheme::Http
            } else {
                Scheme::Https
            };
            format!("{scheme}://{entry}")
        }
        OriginError::WebSocketScheme(page_scheme) => {
            let (_, after_scheme) = entry.split_once("://")?;
            format!("{page_scheme}://{after_scheme}")
        }
        _ => return None,
    };
    let parts = read_parts(&candidate).ok()?;
    Some(without_rest(&candidate, parts.rest).to_string())
}

// ---------------------------------------------------------------------------------------------
// The policy
// ---------------------------------------------------------------------------------------------

const RULE_LOCALHOST: &str = "localhost (origins.allow_localhost)";
const RULE_MISSING: &str = "missing origin (origins.allow_missing)";
const RULE_NULL: &str = "literal null";
const MISSING_ORIGIN: &str = "<missing>";

/// A retired origin still admitted until `until` (inclusive).
#[derive(Debug, Clone)]
struct LegacyEntry {
    pattern: Pattern,
    until: Day,
}

/// The compiled `[origins]` settings: built once at start-up, then shared read-only by every
/// worker (it is `Send + Sync`; wrap it in an `Arc` rather than cloning per request).
#[derive(Debug, Clone)]
pub struct OriginPolicy {
    /// Normalised exact origins: admitting one is a single hash lookup.
    exact: HashSet<String>,
    /// Leading-label wildcards. A deployment has a handful, so a linear scan beats an index.
    wildcards: Vec<Wildcard>,
    /// Every origin entry of `origins.allowed`, deduplicated, in config order: the candidates
    /// for "nearest allowed entry".
    entries: Vec<Pattern>,
    /// `origins.allowed` as normalised text, `null` included, for log lines.
    allowlist: Vec<String>,
    /// `null` listed literally in `origins.allowed`.
    allow_null: bool,
    allow_localhost: bool,
    allow_missing: bool,
    legacy: Vec<LegacyEntry>,
}

/// What the policy says about one Origin header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Admitted; `rule` names what matched (e.g. `exact https://app.example.com`,
    /// `wildcard https://*.example.com`, `localhost (origins.allow_localhost)`,
    /// `missing origin (origins.allow_missing)`, `literal null`).
    Allowed { rule: String },
    /// Admitted through `origins.legacy` entry `origin` until `until` ("YYYY-MM-DD"); the caller
    /// logs a deprecation warning.
    AllowedLegacy { origin: String, until: String },
    /// Refused. `origin` is the header value as received (`<missing>` when absent); `nearest`
    /// the closest allowed entry if any, and `hint` a short phrase how it differs (e.g.
    /// `scheme differs (http vs https)`), for WARN log lines.
    Denied {
        origin: String,
        nearest: Option<String>,
        hint: Option<String>,
    },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(
            self,
            Decision::Allowed { .. } | Decision::AllowedLegacy { .. }
        )
    }
}

/// Which rule admitted an origin, before it is turned into a [`Decision`].
enum Admission<'p> {
    Exact,
    Wildcard(&'p Wildcard),
    Localhost,
    Legacy(&'p LegacyEntry),
}

impl OriginPolicy {
    /// Validate and compile the config. `Err` holds one message per problem, each naming the
    /// entry (`origins.allowed entry "…"` or `origins.legacy entry "…"`) and what is wrong.
    pub(crate) fn from_config(cfg: &OriginsConfig) -> Result<OriginPolicy, Vec<String>> {
        let mut errors = Vec::new();
        let mut policy = OriginPolicy {
            exact: HashSet::new(),
            wildcards: Vec::new(),
            entries: Vec::new(),
            allowlist: Vec::new(),
            allow_null: false,
            allow_localhost: cfg.allow_localhost,
            allow_missing: cfg.allow_missing,
            legacy: Vec::new(),
        };

        for entry in &cfg.allowed {
            if entry.eq_ignore_ascii_case("null") {
                if !policy.allow_null {
                    policy.allow_null = true;
                    policy.allowlist.push("null".to_string());
                }
                continue;
            }
            match read_entry(entry) {
                Ok(pattern) => policy.add_allowed(pattern),
                Err(problem) => errors.push(format!("origins.allowed entry {entry:?} {problem}")),
            }
        }

        for legacy in &cfg.legacy {
            let pattern = read_entry(&legacy.origin)
                .map_err(|problem| {
                    errors.push(format!(
                        "origins.legacy entry {:?} {problem}",
                        legacy.origin
                    ));
                })
                .ok();
            let until = Day::parse(&legacy.until);
            if until.is_none() {
                errors.push(format!(
                    "origins.legacy entry {:?} has an invalid until date {:?}: write a real \
                     date as YYYY-MM-DD",
                    legacy.origin, legacy.until
                ));
            }
            if let (Some(pattern), Some(until)) = (pattern, until) {
                policy.add_legacy(pattern, until);
            }
        }

        if errors.is_empty() {
            Ok(policy)
        } else {
            Err(errors)
        }
    }

    fn add_allowed(&mut self, pattern: Pattern) {
        if self.entries.contains(&pattern) {
            return;
        }
        match &pattern {
            Pattern::Exact(origin) => {
                self.exact.insert(origin.serialised.clone());
            }
            Pattern::Wildcard(wildcard) => self.wildcards.push(wildcard.clone()),
        }
        self.allowlist.push(pattern.as_str().to_string());
        self.entries.push(pattern);
    }

    /// The same origin listed twice keeps the later date: the more generous reading of a
    /// config that contradicts itself, and the one an operator extending a deadline meant.
    fn add_legacy(&mut self, pattern: Pattern, until: Day) {
        match self.legacy.iter_mut().find(|l| l.pattern == pattern) {
            Some(existing) => existing.until = existing.until.max(until),
            None => self.legacy.push(LegacyEntry { pattern, until }),
        }
    }

    /// Decide for the raw Origin header value (`None` = header absent).
    pub fn check(&self, origin: Option<&str>, today: Day) -> Decision {
        let Some(header) = origin else {
            return if self.allow_missing {
                Decision::Allowed {
                    rule: RULE_MISSING.to_string(),
                }
            } else {
                Decision::Denied {
                    origin: MISSING_ORIGIN.to_string(),
                    nearest: None,
                    hint: Some("no Origin header (origins.allow_missing is off)".to_string()),
                }
            };
        };
        if header == "null" && self.allow_null {
            return Decision::Allowed {
                rule: RULE_NULL.to_string(),
            };
        }
        let admitted = read_parts(header)
            .ok()
            .filter(|parts| parts.rest.is_empty())
            .and_then(|parts| Origin::from_parts(&parts))
            .and_then(|origin| {
                self.admission(&origin, today)
                    .map(|admission| self.decision(admission, &origin))
            });
        match admitted {
            Some(decision) => decision,
            None => {
                let diagnosis = self.diagnose(header, today);
                Decision::Denied {
                    origin: header.to_string(),
                    hint: diagnosis.hint(),
                    nearest: diagnosis.nearest,
                }
            }
        }
    }

    /// The rule that admits a normalised origin, if any. Allocates nothing.
    fn admission(&self, origin: &Origin, today: Day) -> Option<Admission<'_>> {
        if self.exact.contains(origin.as_str()) {
            return Some(Admission::Exact);
        }
        if let Some(wildcard) = self.wildcards.iter().find(|w| w.covers(origin)) {
            return Some(Admission::Wildcard(wildcard));
        }
        if self.allow_localhost && is_loopback(origin.host()) {
            return Some(Admission::Localhost);
        }
        self.legacy
            .iter()
            .filter(|legacy| legacy.until >= today && legacy.pattern.matches(origin))
            .max_by_key(|legacy| legacy.until)
            .map(Admission::Legacy)
    }

    fn decision(&self, admission: Admission<'_>, origin: &Origin) -> Decision {
        match admission {
            Admission::Exact => Decision::Allowed {
                rule: format!("exact {}", origin.as_str()),
            },
            Admission::Wildcard(wildcard) => Decision::Allowed {
                rule: format!("wildcard {}", wildcard.display),
            },
            Admission::Localhost => Decision::Allowed {
                rule: RULE_LOCALHOST.to_string(),
            },
            Admission::Legacy(legacy) => Decision::AllowedLegacy {
                origin: legacy.pattern.as_str().to_string(),
                until: legacy.until.to_string(),
            },
        }
    }

    /// Longer explanation for `switchboard check-origin`: for an admitted origin which rule
    /// matched; for a denied one, the nearest allowed entry and how it differs. Ends with the
    /// policy itself (allowlist, localhost, missing-origin and legacy settings).
    pub fn explain(&self, origin: &str, today: Day) -> String {
        let shown = echo(origin);
        let mut lines = Vec::new();
        match self.check(Some(origin), today) {
            Decision::Allowed { rule } => {
                lines.push(format!("{shown} is allowed: {rule}"));
                let normalised = read_parts(origin)
                    .ok()
                    .and_then(|parts| Origin::from_parts(&parts));
                if let Some(normalised) = normalised.filter(|n| n.as_str() != origin) {
                    lines.push(format!(
                        "(compared as {} after lowercasing and dropping the default port)",
                        normalised.as_str()
                    ));
                }
            }
            Decision::AllowedLegacy {
                origin: entry,
                until,
            } => {
                lines.push(format!(
                    "{shown} is allowed until {until} (inclusive) by origins.legacy entry {entry}"
                ));
                lines.push(
                    "every connection from it logs a deprecation warning: move the page to an \
                     allowed origin before then"
                        .to_string(),
                );
            }
            Decision::Denied { .. } => {
                lines.push(format!("{shown} is denied"));
                let diagnosis = self.diagnose(origin, today);
                if let Some(error) = &diagnosis.unreadable {
                    lines.push(format!(
                        "it is not an origin: it {error}; an Origin header is scheme://host[:port]"
                    ));
                }
                if let Some(nearest) = &diagnosis.nearest {
                    let label = if diagnosis.admissible_as_bare_origin {
                        "the bare origin would be allowed by"
                    } else {
                        "nearest allowed entry:"
                    };
                    lines.push(format!("{label} {nearest}"));
                }
                for difference in &diagnosis.differences {
                    lines.push(format!("- {}", difference.long()));
                }
                if let Some(normalised) = diagnosis
                    .normalised
                    .as_ref()
                    .filter(|_| !diagnosis.admissible_as_bare_origin)
                {
                    lines.push(format!(
                        "to admit it, add \"{normalised}\" to origins.allowed"
                    ));
                }
            }
        }
        lines.push("policy:".to_string());
        lines.extend(
            self.describe_policy(today)
                .into_iter()
                .map(|l| format!("  {l}")),
        );
        lines.join("\n")
    }

    fn describe_policy(&self, today: Day) -> Vec<String> {
        let allowed = if self.allowlist.is_empty() {
            "(empty)".to_string()
        } else {
            self.allowlist.join(", ")
        };
        let localhost = if self.allow_localhost {
            "on (http and https, any port, for localhost, 127.0.0.1 and [::1])"
        } else {
            "off"
        };
        let missing = if self.allow_missing {
            "on (requests without an Origin header are admitted)"
        } else {
            "off (requests without an Origin header are refused)"
        };
        let legacy = if self.legacy.is_empty() {
            "none".to_string()
        } else {
            self.legacy
                .iter()
                .map(|l| {
                    let state = if l.until < today {
                        "retired"
                    } else {
                        "admitted"
                    };
                    format!("{} until {} ({state})", l.pattern.as_str(), l.until)
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        vec![
            format!("origins.allowed: {allowed}"),
            format!("origins.allow_localhost: {localhost}"),
            format!("origins.allow_missing: {missing}"),
            format!("origins.legacy: {legacy}"),
        ]
    }

    /// The configured allowlist (`origins.allowed`) as normalised text, deduplicated, in config
    /// order, for log lines. Localhost and legacy admissions are not entries and not listed.
    pub(crate) fn allowlist(&self) -> Vec<String> {
        self.allowlist.clone()
    }

    /// Why a header value is refused: the cold path, so it may allocate freely. Input size is
    /// bounded by [`read_parts`] before any comparison runs.
    fn diagnose(&self, header: &str, today: Day) -> Diagnosis {
        let mut diagnosis = Diagnosis::default();
        if header == "null" {
            diagnosis.differences.push(Difference::NullNotListed);
            return diagnosis;
        }
        // Diagnose the value without its padding so the answer can say "whitespace" and
        // whether the rest would pass; the decision itself never trims.
        let trimmed = header.trim();
        let value = if trimmed.len() != header.len() && !trimmed.is_empty() {
            diagnosis.differences.push(Difference::Whitespace);
            trimmed
        } else {
            header
        };
        let parts = match read_parts(value) {
            Ok(parts) => parts,
            Err(error) => {
                diagnosis.unreadable = Some(error);
                return diagnosis;
            }
        };
        match extra_error(parts.rest) {
            Some(OriginError::TrailingSlash) => {
                diagnosis.differences.push(Difference::TrailingSlash)
            }
            Some(extra) => diagnosis.differences.push(Difference::Extra(extra)),
            None => {}
        }
        let Some(origin) = Origin::from_parts(&parts) else {
            diagnosis.unreadable = Some(OriginError::PatternNotOrigin);
            return diagnosis;
        };
        if let Some(admission) = self.admission(&origin, today) {
            diagnosis.admissible_as_bare_origin = true;
            diagnosis.nearest = Some(match admission {
                Admission::Exact => origin.as_str().to_string(),
                Admission::Localhost => RULE_LOCALHOST.to_string(),
                Admission::Wildcard(wildcard) => wildcard.display.clone(),
                Admission::Legacy(legacy) => legacy.pattern.as_str().to_string(),
            });
            return diagnosis;
        }

        let loopback_refused = !self.allow_localhost && is_loopback(origin.host());
        let candidates = self
            .entries
            .iter()
            .map(|pattern| (pattern, None))
            .chain(self.legacy.iter().map(|l| (&l.pattern, Some(l.until))));
        // Best first: closest host relation, fewest differences, allowed before legacy (a
        // retired entry is "nearest" only when it is the same origin), same scheme, most
        // similar host, then config order.
        let best = candidates
            .enumerate()
            .map(|(index, (pattern, until))| {
                let comparison = compare(&origin, pattern);
                let score = (
                    comparison.relation.rank(),
                    comparison.differences.len(),
                    until.is_some(),
                    comparison.same_scheme,
                    comparison.distance,
                    index,
                );
                (score, comparison, pattern, until)
            })
            .min_by_key(|(score, ..)| *score);
        match best {
            None => diagnosis.differences.push(if loopback_refused {
                Difference::LocalhostOff
            } else {
                Difference::EmptyAllowlist
            }),
            Some((_, comparison, pattern, until)) => {
                diagnosis.nearest = Some(pattern.as_str().to_string());
                if comparison.relation == Relation::OtherHost {
                    diagnosis.differences.push(if loopback_refused {
                        Difference::LocalhostOff
                    } else {
                        Difference::OtherHost
                    });
                } else {
                    diagnosis.differences.extend(comparison.differences);
                    if let Some(until) = until.filter(|&until| until < today) {
                        diagnosis
                            .differences
                            .push(Difference::LegacyRetired { until });
                    }
                }
            }
        }
        diagnosis.normalised = Some(origin.serialised);
        diagnosis
    }
}

// ---------------------------------------------------------------------------------------------
// Diagnostics
// ---------------------------------------------------------------------------------------------

/// How one refused value relates to the policy.
#[derive(Debug, Default)]
struct Diagnosis {
    /// Why the value could not be read as an origin at all.
    unreadable: Option<OriginError>,
    /// The allowed (or legacy) entry closest to the value.
    nearest: Option<String>,
    differences: Vec<Difference>,
    /// The value minus padding, path or slash would be admitted: the sender is at fault.
    admissible_as_bare_origin: bool,
    /// The value's origin, normalised, when it is readable and not admissible.
    normalised: Option<String>,
}

impl Diagnosis {
    fn hint(&self) -> Option<String> {
        let mut phrases: Vec<String> = self.differences.iter().map(Difference::short).collect();
        if let Some(error) = &self.unreadable {
            phrases.push(format!("not an origin: {error}"));
        }
        (!phrases.is_empty()).then(|| phrases.join("; "))
    }
}

/// One way a refused value differs from what the policy admits.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Difference {
    Whitespace,
    TrailingSlash,
    /// A path, query or fragment after the host.
    Extra(OriginError),
    Scheme {
        given: Scheme,
        allowed: Scheme,
    },
    Port {
        given: u16,
        allowed: u16,
    },
    WwwPresent,
    WwwAbsent,
    Loopback {
        given: String,
        allowed: String,
    },
    WildcardApex {
        wildcard: String,
        apex: String,
    },
    LegacyRetired {
        until: Day,
    },
    LocalhostOff,
    OtherHost,
    NullNotListed,
    EmptyAllowlist,
}

impl Difference {
    /// A phrase for the WARN line of a refusal.
    fn short(&self) -> String {
        match self {
            Difference::Whitespace => "surrounding whitespace".to_string(),
            Difference::TrailingSlash => "trailing slash".to_string(),
            Difference::Extra(extra) => extra.to_string(),
            Difference::Scheme { given, allowed } => {
                format!("scheme differs ({given} vs {allowed})")
            }
            Difference::Port { given, allowed } => format!("port differs ({given} vs {allowed})"),
            Difference::WwwPresent => "`www.` prefix present".to_string(),
            Difference::WwwAbsent => "`www.` prefix absent".to_string(),
            Difference::Loopback { given, allowed } => {
                format!("{given} vs {allowed} (origins.allow_localhost is off)")
            }
            Difference::WildcardApex { .. } => {
                "wildcard does not cover the apex domain".to_string()
            }
            Difference::LegacyRetired { until } => format!("legacy origin retired on {until}"),
            Difference::LocalhostOff => "origins.allow_localhost is off".to_string(),
            Difference::OtherHost => "different host".to_string(),
            Difference::NullNotListed => "origin null is not listed".to_string(),
            Difference::EmptyAllowlist => "origins.allowed is empty".to_string(),
        }
    }

    /// A sentence for `switchboard check-origin`.
    fn long(&self) -> String {
        match self {
            Difference::Whitespace => "surrounding whitespace: a browser's Origin header has \
                none, so the value is refused as given"
                .to_string(),
            Difference::TrailingSlash => "trailing slash: an origin is scheme://host[:port] \
                and browsers send it without a slash (a URL such as FRONTEND_URL is not an \
                origin until the slash is dropped)"
                .to_string(),
            Difference::Extra(extra) => format!(
                "the value {extra}: an origin is scheme://host[:port] and browsers never send \
                 a path, query or fragment in it"
            ),
            Difference::Scheme { given, allowed } => format!(
                "scheme differs ({given} vs {allowed}): browsers treat http:// and https:// \
                 pages as different origins"
            ),
            Difference::Port { given, allowed } => {
                format!("port differs ({given} vs {allowed}): the port is part of the origin")
            }
            Difference::WwwPresent => "`www.` prefix present: the given host starts with \
                `www.` and the allowed entry does not; they are different origins"
                .to_string(),
            Difference::WwwAbsent => "`www.` prefix absent: the allowed entry starts with \
                `www.` and the given host does not; they are different origins"
                .to_string(),
            Difference::Loopback { given, allowed } => format!(
                "{given} vs {allowed}: browsers treat localhost, 127.0.0.1 and [::1] as \
                 different origins, and origins.allow_localhost (which admits all three on any \
                 port) is off"
            ),
            Difference::WildcardApex { wildcard, apex } => format!(
                "wildcard does not cover the apex domain: {wildcard} admits subdomains of \
                 {apex}, not {apex} itself; list the apex origin separately"
            ),
            Difference::LegacyRetired { until } => format!(
                "legacy origin retired on {until}: its origins.legacy entry admitted it up to \
                 and including that day"
            ),
            Difference::LocalhostOff => "origins.allow_localhost is off: localhost, 127.0.0.1 \
                and [::1] are admitted only when listed (turn it on for development only)"
                .to_string(),
            Difference::OtherHost => "different host: no allowed entry has this host".to_string(),
            Difference::NullNotListed => "origin null (sent by sandboxed iframes, file:// pages \
                and some redirects) is refused unless origins.allowed lists \"null\" literally"
                .to_string(),
            Difference::EmptyAllowlist => {
                "origins.allowed is empty: no origin is listed".to_string()
            }
        }
    }
}

/// How close a host is to an entry's, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Relation {
    /// Same host, or covered by the wildcard.
    SameHost,
    WwwPresent,
    WwwAbsent,
    Loopback,
    WildcardApex,
    OtherHost,
}

impl Relation {
    fn rank(self) -> u8 {
        match self {
            Relation::SameHost => 0,
            Relation::WwwPresent
            | Relation::WwwAbsent
            | Relation::Loopback
            | Relation::WildcardApex => 1,
            Relation::OtherHost => 2,
        }
    }
}

/// Sorts entries of the origin's own scheme first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum SchemeOrder {
    Same,
    Different,
}

struct Comparison {
    relation: Relation,
    differences: Vec<Difference>,
    /// Among unrelated hosts, an entry of the same scheme is the likelier intended one.
    same_scheme: SchemeOrder,
    /// Edit distance between the hosts: the tie-breaker among unrelated hosts.
    distance: usize,
}

fn compare(origin: &Origin, pattern: &Pattern) -> Comparison {
    let host = origin.host();
    let (relation, scheme, port, explicit_port, distance) = match pattern {
        Pattern::Exact(allowed) => {
            let allowed_host = allowed.host();
            let relation = if host == allowed_host {
                Relation::SameHost
            } else if host.strip_prefix("www.") == Some(allowed_host) {
                Relation::WwwPresent
            } else if allowed_host.strip_prefix("www.") == Some(host) {
                Relation::WwwAbsent
            } else if is_loopback(host) && is_loopback(allowed_host) {
                Relation::Loopback
            } else {
                Relation::OtherHost
            };
            (
                relation,
                allowed.scheme,
                allowed.effective_port(),
                allowed.port,
                strsim::levenshtein(host, allowed_host),
            )
        }
        Pattern::Wildcard(wildcard) => {
            let relation = if wildcard.covers_host(host) {
                Relation::SameHost
            } else if host == wildcard.suffix {
                Relation::WildcardApex
            } else {
                Relation::OtherHost
            };
            (
                relation,
                wildcard.scheme,
                wildcard.effective_port(),
                wildcard.port,
                strsim::levenshtein(host, &wildcard.suffix),
            )
        }
    };

    let mut differences = Vec::new();
    match relation {
        Relation::WwwPresent => differences.push(Difference::WwwPresent),
        Relation::WwwAbsent => differences.push(Difference::WwwAbsent),
        Relation::Loopback => {
            if let Pattern::Exact(allowed) = pattern {
                differences.push(Difference::Loopback {
                    given: host.to_string(),
                    allowed: allowed.host().to_string(),
                });
            }
        }
        Relation::WildcardApex => differences.push(Difference::WildcardApex {
            wildcard: pattern.as_str().to_string(),
            apex: host.to_string(),
        }),
        Relation::SameHost | Relation::OtherHost => {}
    }
    if relation != Relation::OtherHost {
        if origin.scheme != scheme {
            differences.push(Difference::Scheme {
                given: origin.scheme,
                allowed: scheme,
            });
        }
        // http://h vs https://h differ in scheme only; the implied 80 vs 443 is no news.
        let some_port_explicit = origin.port.is_some() || explicit_port.is_some();
        if origin.effective_port() != port && some_port_explicit {
            differences.push(Difference::Port {
                given: origin.effective_port(),
                allowed: port,
            });
        }
    }
    Comparison {
        relation,
        differences,
        same_scheme: if origin.scheme == scheme {
            SchemeOrder::Same
        } else {
            SchemeOrder::Different
        },
        distance,
    }
}

/// At most `max_bytes` of `s`, cut on a character boundary.
fn clip(s: &str, max_bytes: usize) -> &str {
    if s.len() <= max_bytes {
        return s;
    }
    let mut end = max_bytes;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn clipped(s: &str, max_bytes: usize) -> String {
    let kept = clip(s, max_bytes);
    if kept.len() == s.len() {
        s.to_string()
    } else {
        format!("{kept}…")
    }
}

/// A value quoted for a terminal: control characters escaped, long values cut.
fn echo(value: &str) -> String {
    let kept = clip(value, ECHO_LIMIT);
    if kept.len() == value.len() {
        format!("{value:?}")
    } else {
        format!("{kept:?}… ({} bytes)", value.len())
    }
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    fn day(text: &str) -> Day {
        Day::parse(text).expect("test date is valid")
    }

    /// The `[origins]` section these lists give (the fuzz targets build theirs with it too).
    pub(super) fn config(
        allowed: &[&str],
        allow_localhost: bool,
        allow_missing: bool,
        legacy: &[(&str, &str)],
    ) -> OriginsConfig {
        OriginsConfig {
            allowed: allowed.iter().map(|s| s.to_string()).collect(),
            allow_localhost,
            allow_missing,
            legacy: legacy
                .iter()
                .map(|(origin, until)| LegacyOrigin {
                    origin: origin.to_string(),
                    until: until.to_string(),
                })
                .collect(),
        }
    }

    fn production(allowed: &[&str]) -> OriginPolicy {
        OriginPolicy::from_config(&config(allowed, false, false, &[])).expect("valid config")
    }

    fn development(allowed: &[&str]) -> OriginPolicy {
        OriginPolicy::from_config(&config(allowed, true, false, &[])).expect("valid config")
    }

    fn errors_for(allowed: &[&str]) -> Vec<String> {
        OriginPolicy::from_config(&config(allowed, false, false, &[]))
            .expect_err("config should be refused")
    }

    fn single_error(entry: &str) -> String {
        let errors = errors_for(&[entry]);
        assert_eq!(errors.len(), 1, "{errors:?}");
        errors[0].clone()
    }

    fn today() -> Day {
        day("2026-03-01")
    }

    fn admits(policy: &OriginPolicy, origin: &str) -> bool {
        policy.check(Some(origin), today()).is_allowed()
    }

    fn rule(policy: &OriginPolicy, origin: &str) -> String {
        match policy.check(Some(origin), today()) {
            Decision::Allowed { rule } => rule,
            other => panic!("{origin:?} not allowed: {other:?}"),
        }
    }

    fn denial(policy: &OriginPolicy, origin: &str) -> (Option<String>, Option<String>) {
        match policy.check(Some(origin), today()) {
            Decision::Denied {
                origin: echoed,
                nearest,
                hint,
            } => {
                assert_eq!(echoed, origin, "Denied echoes the header as received");
                (nearest, hint)
            }
            other => panic!("{origin:?} should be denied: {other:?}"),
        }
    }

    fn hint(policy: &OriginPolicy, origin: &str) -> String {
        denial(policy, origin).1.unwrap_or_default()
    }

    // --- Day -------------------------------------------------------------------------------

    /// The Unix epoch is day 0 and an ordinary date parses to the right count.
    #[test]
    fn day_parses_epoch_and_ordinary_dates() {
        assert_eq!(Day::parse("1970-01-01"), Some(Day(0)));
        assert_eq!(Day::parse("1970-01-02"), Some(Day(1)));
        assert_eq!(Day::parse("1969-12-31"), Some(Day(-1)));
        assert_eq!(Day::parse("2000-03-01"), Some(Day(11_017)));
        assert_eq!(Day::parse("2026-03-03"), Some(Day(20_515)));
    }

    /// Leap days exist only in leap years (divisible by 4, centuries only by 400).
    #[test]
    fn day_parse_knows_leap_years() {
        assert!(Day::parse("2024-02-29").is_some());
        assert!(Day::parse("2000-02-29").is_some());
        assert_eq!(Day::parse("2026-02-29"), None);
        assert_eq!(Day::parse("2100-02-29"), None);
        assert_eq!(Day::parse("2024-02-30"), None);
        assert_eq!(day("2024-03-01").0 - day("2024-02-28").0, 2);
    }

    /// Months outside 1-12 and days past the month's end are refused.
    #[test]
    fn day_parse_refuses_impossible_dates() {
        for bad in [
            "2026-00-10",
            "2026-13-01",
            "2026-01-00",
            "2026-01-32",
            "2026-04-31",
            "2026-06-31",
            "2026-09-31",
            "2026-11-31",
        ] {
            assert_eq!(Day::parse(bad), None, "{bad}");
        }
        assert!(Day::parse("2026-12-31").is_some());
    }

    /// Anything but exactly `YYYY-MM-DD` is refused, padding and other separators included.
    #[test]
    fn day_parse_refuses_other_formats() {
        for bad in [
            "",
            "2026-3-03",
            "2026/03/03",
            " 2026-03-03",
            "2026-03-03 ",
            "+026-03-03",
            "+2026-03-03",
            "2026-03-033",
            "26-03-03",
            "2026-03-0a",
            "２０２６-03-03",
            "2026-03-03T00:00:00Z",
            "-001-03-03",
        ] {
            assert_eq!(Day::parse(bad), None, "{bad:?}");
        }
    }

    /// Unix seconds map to UTC days, with negative times rounding to the earlier day.
    #[test]
    fn day_from_unix_seconds_rounds_down() {
        assert_eq!(Day::from_unix_seconds(0), Day(0));
        assert_eq!(Day::from_unix_seconds(86_399), Day(0));
        assert_eq!(Day::from_unix_seconds(86_400), Day(1));
        assert_eq!(Day::from_unix_seconds(-1), Day(-1));
        assert_eq!(Day::from_unix_seconds(1_772_582_400), day("2026-03-04"));
        // Extremes must not overflow.
        let _ = Day::from_unix_seconds(i64::MIN);
        let _ = Day::from_unix_seconds(i64::MAX);
    }

    /// Display prints YYYY-MM-DD and round-trips through parse for every day of several years.
    #[test]
    fn day_display_round_trips() {
        for n in day("1999-12-25").0..=day("2030-01-05").0 {
            let text = Day(n).to_string();
            assert_eq!(Day::parse(&text), Some(Day(n)), "{text}");
        }
        assert_eq!(day("0001-01-01").to_string(), "0001-01-01");
        assert_eq!(day("9999-12-31").to_string(), "9999-12-31");
        assert_eq!(day("0000-01-01").to_string(), "0000-01-01");
    }

    /// Days far outside the printable range display without panicking.
    #[test]
    fn day_display_handles_extremes() {
        assert!(Day(i64::MAX).to_string().contains("since 1970-01-01"));
        assert!(Day(i64::MIN).to_string().contains("since 1970-01-01"));
        assert!(Day::from_unix_seconds(i64::MIN)
            .to_string()
            .contains("since"));
    }

    /// Days order chronologically, and today's date comes from the clock.
    #[test]
    fn day_orders_and_today_is_recent() {
        assert!(day("2026-03-03") < day("2026-03-04"));
        assert!(day("2025-12-31") < day("2026-01-01"));
        assert!(Day::today() > day("2024-01-01"));
    }

    // --- Config validation -----------------------------------------------------------------

    /// The brief's own example: a trailing slash names the entry and the fix.
    #[test]
    fn config_trailing_slash_error_names_entry_and_fix() {
        assert_eq!(
            single_error("https://app.example.com/"),
            r#"origins.allowed entry "https://app.example.com/" has a trailing slash: write "https://app.example.com""#
        );
    }

    /// A path, a query or a fragment is refused, each named, with the bare origin as the fix.
    #[test]
    fn config_path_query_fragment_are_errors() {
        let path = single_error("https://app.example.com/app");
        assert!(path.contains(r#"has a path "/app""#), "{path}");
        assert!(
            path.contains(r#"write "https://app.example.com""#),
            "{path}"
        );
        let query = single_error("https://app.example.com?x=1");
        assert!(query.contains(r#"has a query "?x=1""#), "{query}");
        let fragment = single_error("https://app.example.com:8443#top");
        assert!(
            fragment.contains(r##"has a fragment "#top""##),
            "{fragment}"
        );
        assert!(
            fragment.contains(r#"write "https://app.example.com:8443""#),
            "{fragment}"
        );
    }

    /// An entry without a scheme is refused with the https (or, for localhost, http) fix.
    #[test]
    fn config_missing_scheme_is_an_error_with_fix() {
        let error = single_error("app.example.com");
        assert!(error.contains("has no scheme"), "{error}");
        assert!(
            error.contains(r#"write "https://app.example.com""#),
            "{error}"
        );
        let local = single_error("localhost:3000");
        assert!(
            local.contains(r#"write "http://localhost:3000""#),
            "{local}"
        );
        let wildcard = single_error("*.example.com");
        assert!(
            wildcard.contains(r#"write "https://*.example.com""#),
            "{wildcard}"
        );
        let relative = single_error("//app.example.com");
        assert!(relative.contains("has no scheme"), "{relative}");
    }

    /// Schemes other than http and https are refused; ws/wss get the page-scheme fix.
    #[test]
    fn config_other_schemes_are_errors() {
        let ftp = single_error("ftp://files.example.com");
        assert!(ftp.contains(r#"has scheme "ftp""#), "{ftp}");
        let extension = single_error("chrome-extension://abcdef");
        assert!(extension.contains("chrome-extension"), "{extension}");
        let wss = single_error("wss://app.example.com");
        assert!(wss.contains("WebSocket"), "{wss}");
        assert!(wss.contains(r#"write "https://app.example.com""#), "{wss}");
        let ws = single_error("ws://localhost:8080");
        assert!(ws.contains(r#"write "http://localhost:8080""#), "{ws}");
        let empty_scheme = single_error("://app.example.com");
        assert!(empty_scheme.contains("has no scheme"), "{empty_scheme}");
    }

    /// User info, an empty host and a bad port are each refused and named.
    #[test]
    fn config_userinfo_empty_host_and_bad_port_are_errors() {
        assert!(single_error("https://user:pw@app.example.com").contains("user info"));
        assert!(single_error("https://").contains("empty host"));
        assert!(single_error("https://:8443").contains("empty host"));
        for bad_port in [
            "https://app.example.com:99999",
            "https://app.example.com:0",
            "https://app.example.com:",
            "https://app.example.com:http",
            "https://app.example.com:-1",
            "https://app.example.com:80:80",
            "https://app.example.com:123456789012345678901234567890",
        ] {
            let error = single_error(bad_port);
            assert!(error.contains("invalid port"), "{bad_port}: {error}");
        }
    }

    /// Wildcards anywhere but a leading `*.` label are refused, and so is a too-broad one.
    #[test]
    fn config_misplaced_and_broad_wildcards_are_errors() {
        for misplaced in [
            "https://app.*.com",
            "https://*example.com",
            "https://*.*.example.com",
            "https://app.example.*",
            "*://app.example.com",
            "http*://app.example.com",
        ] {
            let error = single_error(misplaced);
            assert!(
                error.contains("wildcard outside a leading `*.` label"),
                "{misplaced}: {error}"
            );
        }
        assert!(single_error("*").contains("would admit every site"));
        assert!(single_error("https://*").contains("would admit every site"));
        let broad = single_error("https://*.com");
        assert!(broad.contains("too broad"), "{broad}");
        assert!(single_error("https://*.localhost").contains("too broad"));
        assert!(single_error("http://localhost:*").contains("wildcard port"));
        assert!(single_error("https://*.0.0.1").contains("not an IP address"));
        assert!(single_error("https://*.10.0.0.1").contains("not an IP address"));
    }

    /// Hosts with bad characters, empty labels, bad IP literals or non-ASCII are refused.
    #[test]
    fn config_bad_hosts_are_errors() {
        for bad_host in [
            "https://app..example.com",
            "https://.example.com",
            "https://example.com.",
            "https://app%2eexample.com",
            "https://app!.example.com",
            "http://999.0.0.1",
            "http://127.1",
            "http://[::1",
            "http://[zz::1]",
            "http://[::1]x",
        ] {
            let error = single_error(bad_host);
            assert!(error.contains("invalid host"), "{bad_host}: {error}");
        }
        assert!(single_error("https://bücher.example").contains("punycode"));
        let long_label = format!("https://{}.example.com", "a".repeat(64));
        assert!(single_error(&long_label).contains("63"));
        let long_host = format!("https://{}example.com", "abcdefghi.".repeat(30));
        assert!(single_error(&long_host).contains("253"));
    }

    /// Whitespace, control characters and the empty string are refused; padding gets a fix.
    #[test]
    fn config_whitespace_control_and_empty_are_errors() {
        let padded = single_error(" https://app.example.com ");
        assert!(padded.contains("whitespace"), "{padded}");
        assert!(
            padded.contains(r#"write "https://app.example.com""#),
            "{padded}"
        );
        assert!(single_error("https://app.exa mple.com").contains("whitespace"));
        let control = single_error("https://app.example.com\u{0}");
        assert!(control.contains("control character"), "{control}");
        assert!(control.contains(r"\0"), "entry is shown escaped: {control}");
        assert!(single_error("").contains("is empty"));
    }

    /// Several bad entries give one message each, and good entries give none.
    #[test]
    fn config_reports_every_bad_entry() {
        let errors = errors_for(&[
            "https://ok.example.com",
            "https://a.example.com/",
            "b.example.com",
            "https://*.com",
            "https://*.example.com",
            "ftp://c.example.com",
        ]);
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(errors[0].contains(r#""https://a.example.com/""#));
        assert!(errors[1].contains(r#""b.example.com""#));
        assert!(errors[2].contains(r#""https://*.com""#));
        assert!(errors[3].contains(r#""ftp://c.example.com""#));
        assert!(errors
            .iter()
            .all(|e| e.starts_with("origins.allowed entry ")));
    }

    /// Legacy entries with a bad date or a bad origin are refused and name the entry.
    #[test]
    fn config_legacy_errors_name_the_entry() {
        let errors = OriginPolicy::from_config(&config(
            &[],
            false,
            false,
            &[
                ("https://old.example", "2026-02-29"),
                ("https://old.example/", "2026-03-03"),
                ("https://ok.example", "2026-03-03"),
                ("old.example", "soon"),
            ],
        ))
        .expect_err("bad legacy entries");
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(errors[0].starts_with(
            r#"origins.legacy entry "https://old.example" has an invalid until date "2026-02-29""#
        ));
        assert!(errors[1]
            .starts_with(r#"origins.legacy entry "https://old.example/" has a trailing slash"#));
        assert!(errors[2].contains("has no scheme"));
        assert!(errors[3].contains(r#"invalid until date "soon""#));
    }

    /// Duplicates (after normalising case and default ports) appear once in the allowlist.
    #[test]
    fn config_duplicates_are_deduplicated() {
        let policy = production(&[
            "https://app.example.com",
            "HTTPS://APP.EXAMPLE.COM",
            "https://app.example.com:443",
            "https://*.example.com",
            "https://*.Example.com:443",
            "null",
            "NULL",
        ]);
        assert_eq!(
            policy.allowlist(),
            vec!["https://app.example.com", "https://*.example.com", "null"]
        );
        assert_eq!(policy.exact.len(), 1);
        assert_eq!(policy.wildcards.len(), 1);
    }

    /// The allowlist shows entries normalised: lowercase, default port dropped, IPv6 canonical.
    #[test]
    fn allowlist_is_normalised_in_config_order() {
        let policy = production(&[
            "HTTP://Dash.Example.com:80",
            "https://dash.example.com:8443",
            "http://[0:0:0:0:0:0:0:1]:3000",
            "https://*.Example.ORG",
        ]);
        assert_eq!(
            policy.allowlist(),
            vec![
                "http://dash.example.com",
                "https://dash.example.com:8443",
                "http://[::1]:3000",
                "https://*.example.org",
            ]
        );
    }

    /// An empty configuration is valid and admits nothing.
    #[test]
    fn empty_config_admits_nothing() {
        let policy = production(&[]);
        assert!(policy.allowlist().is_empty());
        assert!(!admits(&policy, "https://app.example.com"));
        assert!(!policy.check(None, today()).is_allowed());
    }

    // --- Checking --------------------------------------------------------------------------

    /// An exact entry admits its origin and names the rule.
    #[test]
    fn exact_origin_is_allowed() {
        let policy = production(&["https://app.example.com"]);
        assert_eq!(
            rule(&policy, "https://app.example.com"),
            "exact https://app.example.com"
        );
        assert!(!admits(&policy, "https://app.example.co"));
        assert!(!admits(&policy, "https://app.example.com.evil.net"));
    }

    /// Scheme and host compare case-insensitively on both sides.
    #[test]
    fn mixed_case_matches() {
        let policy = production(&["https://App.Example.com"]);
        assert!(admits(&policy, "https://app.example.com"));
        assert!(admits(&policy, "HTTPS://APP.EXAMPLE.COM"));
        assert!(admits(&policy, "hTTps://aPP.eXample.cOm"));
    }

    /// Default ports are dropped on both sides; other ports must match exactly.
    #[test]
    fn default_ports_normalise_and_other_ports_must_match() {
        let https = production(&["https://app.example.com:443"]);
        assert!(admits(&https, "https://app.example.com"));
        assert!(admits(&https, "https://app.example.com:443"));
        assert!(!admits(&https, "https://app.example.com:8443"));
        let http = production(&["http://app.example.com"]);
        assert!(admits(&http, "http://app.example.com:80"));
        assert!(!admits(&http, "http://app.example.com:443"));
        let custom = production(&["https://app.example.com:8443"]);
        assert!(admits(&custom, "https://app.example.com:8443"));
        assert!(!admits(&custom, "https://app.example.com"));
        assert!(!admits(&custom, "https://app.example.com:8444"));
    }

    /// The scheme is part of the origin: an https entry does not admit http, nor vice versa.
    #[test]
    fn scheme_must_match() {
        let policy = production(&["https://app.example.com"]);
        assert!(!admits(&policy, "http://app.example.com"));
        let plain = production(&["http://app.example.com"]);
        assert!(!admits(&plain, "https://app.example.com"));
    }

    /// A wildcard admits subdomains at any depth and names the rule.
    #[test]
    fn wildcard_admits_subdomains() {
        let policy = production(&["https://*.example.com"]);
        assert_eq!(
            rule(&policy, "https://a.example.com"),
            "wildcard https://*.example.com"
        );
        assert!(admits(&policy, "https://a.b.example.com"));
        assert!(admits(&policy, "https://WWW.Example.COM"));
        assert!(admits(&policy, "https://a.example.com:443"));
    }

    /// A wildcard never admits the apex, lookalikes, suffix tricks, another scheme or port.
    #[test]
    fn wildcard_refuses_spoofs() {
        let policy = production(&["https://*.example.com"]);
        for spoof in [
            "https://example.com",
            "https://evil-example.com",
            "https://evilexample.com",
            "https://example.com.evil.net",
            "https://a.example.com.evil.net",
            "https://a.example.co",
            "http://a.example.com",
            "https://a.example.com:8443",
            "https://.example.com",
            "https://a..example.com",
            "https://*.example.com",
            "https://a.example.com.",
            "https://a.example.com/",
            "https://a.example.com@evil.net",
            "https://evil.net#.example.com",
            "https://evil.net?.example.com",
            "https://evil.net/.example.com",
        ] {
            assert!(!admits(&policy, spoof), "{spoof} must be refused");
        }
    }

    /// A wildcard with an explicit port admits only that port.
    #[test]
    fn wildcard_with_port_must_match_port() {
        let policy = production(&["https://*.example.com:8443"]);
        assert!(admits(&policy, "https://a.example.com:8443"));
        assert!(!admits(&policy, "https://a.example.com"));
        assert!(!admits(&policy, "https://a.example.com:443"));
        let http = production(&["http://*.example.com"]);
        assert!(admits(&http, "http://a.example.com"));
        assert!(admits(&http, "http://a.example.com:80"));
        assert!(!admits(&http, "https://a.example.com"));
    }

    /// `null` is refused unless listed literally; then it is admitted with its own rule.
    #[test]
    fn null_origin_needs_literal_entry() {
        let policy = production(&["https://app.example.com"]);
        let (nearest, null_hint) = denial(&policy, "null");
        assert_eq!(nearest, None);
        assert_eq!(null_hint.as_deref(), Some("origin null is not listed"));
        let listed = production(&["null"]);
        assert_eq!(rule(&listed, "null"), "literal null");
        assert!(!admits(&listed, "NULL"));
        assert!(!admits(&listed, " null"));
    }

    /// A missing Origin header is refused unless allow_missing, and echoed as `<missing>`.
    #[test]
    fn missing_origin_needs_allow_missing() {
        let policy = production(&["https://app.example.com"]);
        match policy.check(None, today()) {
            Decision::Denied {
                origin,
                nearest,
                hint,
            } => {
                assert_eq!(origin, "<missing>");
                assert_eq!(nearest, None);
                assert!(hint.unwrap_or_default().contains("allow_missing"));
            }
            other => panic!("{other:?}"),
        }
        let lenient =
            OriginPolicy::from_config(&config(&[], false, true, &[])).expect("valid config");
        assert_eq!(
            lenient.check(None, today()),
            Decision::Allowed {
                rule: "missing origin (origins.allow_missing)".to_string()
            }
        );
        assert!(!lenient.check(Some(""), today()).is_allowed());
    }

    /// In development localhost, 127.0.0.1 and [::1] are admitted over http and https, any port.
    #[test]
    fn allow_localhost_admits_loopback_hosts_on_any_port() {
        let policy = development(&[]);
        for origin in [
            "http://localhost",
            "http://localhost:3000",
            "https://localhost:5173",
            "http://LOCALHOST:8080",
            "http://127.0.0.1:3000",
            "https://127.0.0.1",
            "http://[::1]:3000",
            "https://[::1]",
            "http://[0:0:0:0:0:0:0:1]:3000",
        ] {
            assert_eq!(
                rule(&policy, origin),
                "localhost (origins.allow_localhost)",
                "{origin}"
            );
        }
    }

    /// allow_localhost admits only the three exact loopback hosts, nothing that resembles them.
    #[test]
    fn allow_localhost_refuses_lookalikes() {
        let policy = development(&[]);
        for spoof in [
            "http://localhost.evil.com",
            "http://evil-localhost",
            "http://localhost.",
            "http://127.0.0.2",
            "http://127.0.0.1.nip.io",
            "http://[::2]",
            "http://[::ffff:127.0.0.1]",
            "http://0.0.0.0:3000",
            "http://localhost:3000/",
            "file://localhost",
            "ws://localhost:3000",
            "http://localhost:0",
            "http://localhost:65536",
        ] {
            assert!(!admits(&policy, spoof), "{spoof} must be refused");
        }
    }

    /// In production (allow_localhost off) loopback origins are refused unless listed.
    #[test]
    fn production_refuses_localhost() {
        let policy = production(&["https://app.example.com"]);
        for origin in [
            "http://localhost:3000",
            "http://127.0.0.1:3000",
            "http://[::1]:3000",
        ] {
            assert!(!admits(&policy, origin), "{origin}");
        }
        assert!(hint(&policy, "http://localhost:3000").contains("origins.allow_localhost is off"));
        let listed = production(&["http://localhost:3000"]);
        assert!(admits(&listed, "http://localhost:3000"));
        assert!(!admits(&listed, "http://localhost:3001"));
        assert!(!admits(&listed, "http://127.0.0.1:3000"));
    }

    /// A legacy origin is admitted before and on its date, refused the day after.
    #[test]
    fn legacy_origin_until_date_inclusive() {
        let policy = OriginPolicy::from_config(&config(
            &["https://app.example.com"],
            false,
            false,
            &[("https://old.example", "2026-03-03")],
        ))
        .expect("valid config");
        let legacy = Decision::AllowedLegacy {
            origin: "https://old.example".to_string(),
            until: "2026-03-03".to_string(),
        };
        assert_eq!(
            policy.check(Some("https://old.example"), day("2026-01-01")),
            legacy
        );
        assert_eq!(
            policy.check(Some("https://OLD.example:443"), day("2026-03-03")),
            legacy
        );
        match policy.check(Some("https://old.example"), day("2026-03-04")) {
            Decision::Denied { nearest, hint, .. } => {
                assert_eq!(nearest.as_deref(), Some("https://old.example"));
                assert_eq!(hint.as_deref(), Some("legacy origin retired on 2026-03-03"));
            }
            other => panic!("{other:?}"),
        }
        assert!(!policy
            .check(Some("http://old.example"), day("2026-01-01"))
            .is_allowed());
    }

    /// A legacy wildcard works like an allowed one, and a repeated entry keeps the later date.
    #[test]
    fn legacy_wildcard_and_repeated_dates() {
        let policy = OriginPolicy::from_config(&config(
            &[],
            false,
            false,
            &[
                ("https://*.old.example", "2026-03-03"),
                ("https://*.old.example", "2026-06-30"),
                ("https://*.old.example", "2026-01-01"),
            ],
        ))
        .expect("valid config");
        assert_eq!(policy.legacy.len(), 1);
        assert_eq!(
            policy.check(Some("https://a.old.example"), day("2026-06-30")),
            Decision::AllowedLegacy {
                origin: "https://*.old.example".to_string(),
                until: "2026-06-30".to_string()
            }
        );
        assert!(!policy
            .check(Some("https://old.example"), day("2026-01-01"))
            .is_allowed());
    }

    /// An origin both allowed and legacy is plainly allowed, with no deprecation.
    #[test]
    fn allowed_entry_beats_legacy() {
        let policy = OriginPolicy::from_config(&config(
            &["https://old.example"],
            false,
            false,
            &[("https://old.example", "2020-01-01")],
        ))
        .expect("valid config");
        assert_eq!(
            rule(&policy, "https://old.example"),
            "exact https://old.example"
        );
    }

    /// Headers with a path or trailing slash are refused (browsers never send one), with a hint.
    #[test]
    fn header_with_path_or_slash_is_refused() {
        let policy = production(&["https://app.example.com"]);
        let (nearest, slash) = denial(&policy, "https://app.example.com/");
        assert_eq!(nearest.as_deref(), Some("https://app.example.com"));
        assert_eq!(slash.as_deref(), Some("trailing slash"));
        let path_hint = hint(&policy, "https://app.example.com/dashboard?x=1");
        assert!(
            path_hint.contains(r#"has a path "/dashboard?x=1""#),
            "{path_hint}"
        );
    }

    /// Hostile values are refused without panicking, in check and in explain.
    #[test]
    fn hostile_input_is_denied_without_panic() {
        let policy = OriginPolicy::from_config(&config(
            &["https://app.example.com", "https://*.example.com", "null"],
            true,
            false,
            &[("https://old.example", "2026-03-03")],
        ))
        .expect("valid config");
        let huge_host = format!("https://{}.example.com", "a".repeat(100_000));
        let huge_labels = format!("https://{}example.com", "a.".repeat(50_000));
        let huge_port = format!("https://app.example.com:{}", "9".repeat(100_000));
        let huge_path = format!("https://app.example.com/{}", "x".repeat(100_000));
        let huge_junk = "\u{1F600}".repeat(50_000);
        let hostile: Vec<&str> = vec![
            "",
            " ",
            "https://",
            "https://:443",
            "https:///",
            "https://app.example.com ",
            " https://app.example.com",
            "\thttps://app.example.com",
            "https://app.example.com\r\n",
            "https://app.example.com\u{0}",
            "https://app.example.com\u{7f}",
            "https://app.example.com\u{a0}",
            "https://аpp.example.com",
            "https://app.exämple.com",
            "https://例え.example.com",
            "https://app%2eexample.com",
            "https://%61pp.example.com",
            "http://a.example.com:99999",
            "http://a.example.com:-1",
            "http://a.example.com:+443",
            "http://user@a.example.com",
            "http://user:pass@app.example.com",
            "https://app.example.com@evil.net",
            "http://[::1",
            "http://[::1]:",
            "http://[::1]x",
            "http://[]",
            "http://[fe80::1%25eth0]",
            "http://::1",
            "https://*.example.com",
            "*",
            "//app.example.com",
            "app.example.com",
            "javascript:alert(1)",
            "data:text/html,hi",
            "https:app.example.com",
            "https:/app.example.com",
            "https:\\\\app.example.com",
            "https://app.example.com\\",
            "https://app.example.com.",
            "NULL",
            "null ",
            "<missing>",
            &huge_host,
            &huge_labels,
            &huge_port,
            &huge_path,
            &huge_junk,
        ];
        for value in hostile {
            let decision = policy.check(Some(value), today());
            assert!(
                !decision.is_allowed(),
                "{:?} must be refused",
                clip(value, 80)
            );
            if let Decision::Denied { origin, hint, .. } = &decision {
                assert_eq!(origin, value);
                assert!(
                    hint.as_ref().is_none_or(|h| h.len() < 1_000),
                    "hint stays short"
                );
            }
            let explanation = policy.explain(value, today());
            assert!(explanation.contains("is denied"), "{explanation}");
            assert!(explanation.len() < 4_000, "explanation stays short");
        }
    }

    /// Whitespace padding is never trimmed away: a padded allowed origin is still refused.
    #[test]
    fn padded_values_are_not_trimmed() {
        let policy = production(&["https://app.example.com"]);
        let (nearest, padded) = denial(&policy, " https://app.example.com ");
        assert_eq!(nearest.as_deref(), Some("https://app.example.com"));
        assert_eq!(padded.as_deref(), Some("surrounding whitespace"));
    }

    /// Unreadable values carry no nearest entry and say why they are not an origin.
    #[test]
    fn unreadable_values_say_why() {
        let policy = production(&["https://app.example.com"]);
        let (nearest, why) = denial(&policy, "http://user@app.example.com");
        assert_eq!(nearest, None);
        assert!(why
            .unwrap_or_default()
            .starts_with("not an origin: has user info"));
        assert!(hint(&policy, "https://app.example.com:99999").contains("invalid port"));
        assert!(hint(&policy, "https://аpp.example.com").contains("non-ASCII"));
        assert!(hint(&policy, "https://*.example.com").contains("wildcard pattern"));
    }

    /// Denial hints name the difference from the nearest entry, and the nearest entry.
    #[test]
    fn denial_hints_name_the_difference() {
        let policy = production(&[
            "https://app.example.com",
            "https://www.shop.example",
            "https://blog.example.org",
            "https://*.corp.example",
            "https://api.example.net:8443",
        ]);
        let cases = [
            (
                "http://app.example.com",
                "https://app.example.com",
                "scheme differs (http vs https)",
            ),
            (
                "https://www.app.example.com",
                "https://app.example.com",
                "`www.` prefix present",
            ),
            (
                "https://shop.example",
                "https://www.shop.example",
                "`www.` prefix absent",
            ),
            (
                "https://app.example.com:8443",
                "https://app.example.com",
                "port differs (8443 vs 443)",
            ),
            (
                "https://api.example.net",
                "https://api.example.net:8443",
                "port differs (443 vs 8443)",
            ),
            (
                "http://app.example.com:8080",
                "https://app.example.com",
                "scheme differs (http vs https); port differs (8080 vs 443)",
            ),
            (
                "https://corp.example",
                "https://*.corp.example",
                "wildcard does not cover the apex domain",
            ),
            (
                "http://a.corp.example",
                "https://*.corp.example",
                "scheme differs (http vs https)",
            ),
            (
                "https://blog.example.com",
                "https://blog.example.org",
                "different host",
            ),
        ];
        for (given, nearest, expected) in cases {
            let (found, hint) = denial(&policy, given);
            assert_eq!(found.as_deref(), Some(nearest), "{given}");
            assert_eq!(hint.as_deref(), Some(expected), "{given}");
        }
    }

    /// localhost versus 127.0.0.1 is named when allow_localhost is off.
    #[test]
    fn denial_hint_names_localhost_vs_loopback_ip() {
        let policy = production(&["http://localhost:3000"]);
        let (nearest, ipv4) = denial(&policy, "http://127.0.0.1:3000");
        assert_eq!(nearest.as_deref(), Some("http://localhost:3000"));
        assert_eq!(
            ipv4.as_deref(),
            Some("127.0.0.1 vs localhost (origins.allow_localhost is off)")
        );
        let ipv6 = hint(&policy, "http://[::1]:3000");
        assert!(ipv6.starts_with("[::1] vs localhost"), "{ipv6}");
    }

    /// With nothing configured the hint says the allowlist is empty.
    #[test]
    fn denial_hint_for_empty_allowlist() {
        let policy = production(&[]);
        assert_eq!(
            denial(&policy, "https://app.example.com"),
            (None, Some("origins.allowed is empty".to_string()))
        );
    }

    /// is_allowed is true exactly for Allowed and AllowedLegacy.
    #[test]
    fn is_allowed_matches_variants() {
        assert!(Decision::Allowed {
            rule: "x".to_string()
        }
        .is_allowed());
        assert!(Decision::AllowedLegacy {
            origin: "x".to_string(),
            until: "2026-03-03".to_string()
        }
        .is_allowed());
        assert!(!Decision::Denied {
            origin: "x".to_string(),
            nearest: None,
            hint: None
        }
        .is_allowed());
    }

    /// The policy can be cloned and shared across actix workers.
    #[test]
    fn policy_is_clone_debug_send_sync() {
        fn assert_shareable<T: Clone + fmt::Debug + Send + Sync + 'static>() {}
        assert_shareable::<OriginPolicy>();
        assert_shareable::<Decision>();
        assert_shareable::<Day>();
    }

    // --- explain ---------------------------------------------------------------------------

    fn explained(policy: &OriginPolicy, origin: &str) -> String {
        policy.explain(origin, today())
    }

    /// An admitted origin's explanation names the rule and lists the allowlist.
    #[test]
    fn explain_allowed_names_rule_and_allowlist() {
        let policy = production(&["https://app.example.com", "https://*.example.com"]);
        let text = explained(&policy, "HTTPS://App.Example.com:443");
        assert!(
            text.starts_with(
                r#""HTTPS://App.Example.com:443" is allowed: exact https://app.example.com"#
            ),
            "{text}"
        );
        assert!(
            text.contains("compared as https://app.example.com"),
            "{text}"
        );
        assert!(
            text.contains("origins.allowed: https://app.example.com, https://*.example.com"),
            "{text}"
        );
        assert!(text.contains("origins.allow_localhost: off"), "{text}");
        assert!(text.contains("origins.legacy: none"), "{text}");
        assert!(!text.ends_with('\n'));
        let wildcard = explained(&policy, "https://a.example.com");
        assert!(wildcard.contains("is allowed: wildcard https://*.example.com"));
    }

    /// https versus http: the nearest entry and the scheme difference are both named.
    #[test]
    fn explain_scheme_difference() {
        let policy = production(&["https://app.example.com"]);
        let text = explained(&policy, "http://app.example.com");
        assert!(
            text.contains(r#""http://app.example.com" is denied"#),
            "{text}"
        );
        assert!(
            text.contains("nearest allowed entry: https://app.example.com"),
            "{text}"
        );
        assert!(text.contains("scheme differs (http vs https)"), "{text}");
        assert!(
            text.contains(r#"to admit it, add "http://app.example.com" to origins.allowed"#),
            "{text}"
        );
    }

    /// A `www.` prefix present or absent is explained against the nearest entry.
    #[test]
    fn explain_www_difference() {
        let policy = production(&["https://example.com"]);
        let present = explained(&policy, "https://www.example.com");
        assert!(
            present.contains("nearest allowed entry: https://example.com"),
            "{present}"
        );
        assert!(present.contains("`www.` prefix present"), "{present}");
        let reverse = production(&["https://www.example.com"]);
        let absent = explained(&reverse, "https://example.com");
        assert!(absent.contains("nearest allowed entry: https://www.example.com"));
        assert!(absent.contains("`www.` prefix absent"), "{absent}");
    }

    /// A port difference is explained with both ports.
    #[test]
    fn explain_port_difference() {
        let policy = production(&["http://dash.example.com:8080"]);
        let text = explained(&policy, "http://dash.example.com:3000");
        assert!(text.contains("nearest allowed entry: http://dash.example.com:8080"));
        assert!(text.contains("port differs (3000 vs 8080)"), "{text}");
    }

    /// localhost versus 127.0.0.1 is explained, mentioning that allow_localhost is off.
    #[test]
    fn explain_localhost_vs_127() {
        let policy = production(&["http://127.0.0.1:5173"]);
        let text = explained(&policy, "http://localhost:5173");
        assert!(
            text.contains("nearest allowed entry: http://127.0.0.1:5173"),
            "{text}"
        );
        assert!(text.contains("localhost vs 127.0.0.1"), "{text}");
        assert!(text.contains("origins.allow_localhost"), "{text}");
        assert!(text.contains("is off"), "{text}");
    }

    /// A trailing slash is explained as the reason, and the bare origin named as allowed.
    #[test]
    fn explain_trailing_slash() {
        let policy = production(&["https://app.example.com"]);
        let text = explained(&policy, "https://app.example.com/");
        assert!(text.contains("is denied"), "{text}");
        assert!(
            text.contains("the bare origin would be allowed by https://app.example.com"),
            "{text}"
        );
        assert!(text.contains("trailing slash"), "{text}");
        assert!(!text.contains("to admit it"), "{text}");
    }

    /// A path in the given value is explained as not part of an origin.
    #[test]
    fn explain_path() {
        let policy = development(&[]);
        let text = explained(&policy, "http://localhost:3000/app");
        assert!(text.contains(r#"has a path "/app""#), "{text}");
        assert!(text.contains("the bare origin would be allowed"), "{text}");
    }

    /// The apex of a wildcard is explained as not covered.
    #[test]
    fn explain_wildcard_apex() {
        let policy = production(&["https://*.example.com"]);
        let text = explained(&policy, "https://example.com");
        assert!(text.contains("nearest allowed entry: https://*.example.com"));
        assert!(text.contains("does not cover the apex domain"), "{text}");
    }

    /// An expired legacy origin is explained with its date; an active one as allowed until it.
    #[test]
    fn explain_legacy() {
        let policy = OriginPolicy::from_config(&config(
            &["https://new.example"],
            false,
            false,
            &[("https://old.example", "2026-03-03")],
        ))
        .expect("valid config");
        let retired = policy.explain("https://old.example", day("2026-03-10"));
        assert!(
            retired.contains("legacy origin retired on 2026-03-03"),
            "{retired}"
        );
        assert!(
            retired.contains("origins.legacy: https://old.example until 2026-03-03 (retired)"),
            "{retired}"
        );
        let active = policy.explain("https://old.example", day("2026-03-03"));
        assert!(
            active.contains("is allowed until 2026-03-03 (inclusive) by origins.legacy entry https://old.example"),
            "{active}"
        );
        assert!(active.contains("deprecation warning"), "{active}");
    }

    /// null, unreadable values and different hosts each get an explanation.
    #[test]
    fn explain_null_unreadable_and_other_host() {
        let policy = production(&["https://app.example.com"]);
        let null = explained(&policy, "null");
        assert!(null.contains(r#"lists "null" literally"#), "{null}");
        let unreadable = explained(&policy, "app.example.com");
        assert!(
            unreadable.contains("it is not an origin: it has no scheme"),
            "{unreadable}"
        );
        let other = explained(&policy, "https://evil.net");
        assert!(other.contains("nearest allowed entry: https://app.example.com"));
        assert!(other.contains("different host"), "{other}");
        let allowed_null = production(&["null"]);
        assert!(explained(&allowed_null, "null").contains("is allowed: literal null"));
    }

    /// Explanations escape control characters and cut huge values.
    #[test]
    fn explain_escapes_and_cuts_hostile_values() {
        let policy = production(&["https://app.example.com"]);
        let text = explained(&policy, "https://app.example.com\u{1b}[2J");
        assert!(!text.contains('\u{1b}'), "{text}");
        let huge = format!("https://{}", "a".repeat(10_000));
        let cut = explained(&policy, &huge);
        assert!(cut.contains("(10008 bytes)"), "{cut}");
        assert!(cut.len() < 2_000);
    }

    /// The nearest entry among several unrelated hosts is the most similar one.
    #[test]
    fn nearest_prefers_similar_hosts() {
        let policy = production(&[
            "https://zzz.unrelated.org",
            "https://dashboard.example.com",
            "https://other.example.net",
        ]);
        let (nearest, _) = denial(&policy, "https://dashbaord.example.com");
        assert_eq!(nearest.as_deref(), Some("https://dashboard.example.com"));
    }

    /// For an unrelated host the nearest entry is an allowed one of the same scheme, never a
    /// retired legacy entry.
    #[test]
    fn nearest_for_unrelated_host_prefers_allowed_same_scheme() {
        let policy = OriginPolicy::from_config(&config(
            &["http://evil.example", "https://app.example.com"],
            false,
            false,
            &[("https://evil.net", "2020-01-01")],
        ))
        .expect("valid config");
        let (nearest, hint) = denial(&policy, "https://evil.org");
        assert_eq!(nearest.as_deref(), Some("https://app.example.com"));
        assert_eq!(hint.as_deref(), Some("different host"));
        let (retired, why) = denial(&policy, "https://evil.net");
        assert_eq!(retired.as_deref(), Some("https://evil.net"));
        assert_eq!(why.as_deref(), Some("legacy origin retired on 2020-01-01"));
    }

    /// A loopback value with a path names allow_localhost as what would admit the bare origin.
    #[test]
    fn nearest_for_localhost_with_path_names_the_rule() {
        let policy = development(&[]);
        let (nearest, hint) = denial(&policy, "http://localhost:3000/");
        assert_eq!(
            nearest.as_deref(),
            Some("localhost (origins.allow_localhost)")
        );
        assert_eq!(hint.as_deref(), Some("trailing slash"));
    }
}

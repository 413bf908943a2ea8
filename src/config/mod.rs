//! Settings: the layered loader (`config/default.toml` → `config/$SWITCHBOARD_ENV.toml` →
//! `SWITCHBOARD__SECTION__KEY` → the conventional `PORT`, `BIND`, `REDIS_URL`, `FRONTEND_URL`,
//! `ALLOWED_ORIGINS`), every key's default and unit, and validation that reports every problem
//! at once. Validating compiles what the rest of the hub uses ([`Compiled`]: the origin
//! policy, trusted proxies, client publish patterns, the cookie key) once; the rules
//! themselves live in `policy`. Nothing here performs network I/O.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use actix_web::cookie::Key;
use base64::Engine;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::core::ids::TopicPattern;
use crate::policy::client_ip::parse_trusted;
use crate::policy::origin::OriginPolicy;
pub(crate) use crate::policy::origin::OriginsConfig;

/// Everything switchboard can be configured with. Each section mirrors a TOML table.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub(crate) server: ServerConfig,
    pub(crate) origins: OriginsConfig,
    pub(crate) auth: AuthConfig,
    pub(crate) api: ApiConfig,
    pub(crate) handshake: HandshakeConfig,
    pub(crate) heartbeat: HeartbeatConfig,
    pub(crate) limits: LimitsConfig,
    pub(crate) redis: RedisConfig,
    pub(crate) history: HistoryConfig,
    pub(crate) shutdown: ShutdownConfig,
    pub(crate) demo: DemoConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct ServerConfig {
    /// Address to bind; `0.0.0.0` inside containers.
    pub(crate) bind: String,
    /// TCP port; 0 picks a free one (the bound address is logged).
    pub(crate) port: u16,
    /// Peers whose `X-Forwarded-For` is believed (nginx in front). IPs or CIDR blocks.
    pub(crate) trusted_proxies: Vec<String>,
    /// HTTP worker threads; 0 means one per core.
    pub(crate) workers: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1".into(),
            port: 8080,
            trusted_proxies: Vec::new(),
            workers: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum SameSitePolicy {
    Lax,
    Strict,
    None,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct AuthConfig {
    pub(crate) cookie_name: String,
    /// Base64 of at least 64 bytes; signs and encrypts the session cookie. Required in production.
    pub(crate) cookie_key: Option<String>,
    /// `Secure` cookie attribute; defaults to on whenever `same_site = "none"` needs it.
    pub(crate) cookie_secure: bool,
    pub(crate) cookie_same_site: SameSitePolicy,
    /// Session lifetime in seconds.
    pub(crate) session_ttl_s: u64,
    /// HS256 secret for `POST /auth/session` tokens; unset disables that endpoint.
    pub(crate) jwt_secret: Option<String>,
    /// `POST /auth/dev-login`: development only, refused by the production profile.
    pub(crate) dev_login: bool,
    /// Topic patterns (`*` = one segment without `:`) a browser may publish or stream to.
    pub(crate) client_publish: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            cookie_name: "sb_session".into(),
            cookie_key: None,
            cookie_secure: false,
            cookie_same_site: SameSitePolicy::Lax,
            session_ttl_s: 86_400,
            jwt_secret: None,
            dev_login: false,
            client_publish: vec!["voice:*:in".into()],
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct ApiConfig {
    /// Bearer keys accepted by `POST /api/publish`.
    pub(crate) publish_keys: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct HandshakeConfig {
    /// Answer refused handshakes with HTTP 403/401/429 instead of a close frame after the upgrade.
    /// Off by default: browsers only show a refused upgrade as close code 1006.
    pub(crate) reject_before_upgrade: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct HeartbeatConfig {
    /// Protocol Ping period in milliseconds.
    pub(crate) interval_ms: u64,
    /// Close a socket silent for this long; must exceed `interval_ms`.
    pub(crate) timeout_ms: u64,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        Self {
            interval_ms: 10_000,
            timeout_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum CapPolicy {
    RejectNew,
    EvictOldest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum SlowConsumerPolicy {
    Conflate,
    Close,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct LimitsConfig {
    /// Sockets one user may hold across all pods.
    pub(crate) max_connections_per_user: u32,
    pub(crate) cap_policy: CapPolicy,
    /// Seconds a cap slot survives without a heartbeat refresh (frees slots of a dead pod).
    pub(crate) cap_lease_s: u64,
    /// Largest client frame in bytes; larger closes with 1009.
    pub(crate) max_frame_bytes: usize,
    /// Topics one socket may join.
    pub(crate) max_subscriptions: usize,
    /// Sustained client messages per second, and the burst allowed above it.
    pub(crate) client_msgs_per_s: u32,
    pub(crate) client_msgs_burst: u32,
    /// Messages queued for one socket before the slow-consumer policy applies.
    pub(crate) outbound_queue: usize,
    pub(crate) slow_consumer: SlowConsumerPolicy,
    /// Handshakes per client IP per second, and the burst allowed above it.
    pub(crate) handshakes_per_ip_per_s: u32,
    pub(crate) handshake_burst: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections_per_user: 5,
            cap_policy: CapPolicy::RejectNew,
            cap_lease_s: 60,
            max_frame_bytes: 65_536,
            max_subscriptions: 100,
            client_msgs_per_s: 50,
            client_msgs_burst: 100,
            outbound_queue: 1024,
            slow_consumer: SlowConsumerPolicy::Conflate,
            handshakes_per_ip_per_s: 20,
            handshake_burst: 50,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct RedisConfig {
    /// `redis://host:port/db`; unset runs embedded (one node, nothing else needed).
    pub(crate) url: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct HistoryConfig {
    /// Keep recent events for `since` resume; unset means "on when clustered".
    pub(crate) enabled: Option<bool>,
    /// Events retained per topic.
    pub(crate) max_len: usize,
    /// Seconds a topic's history outlives its last event.
    pub(crate) ttl_s: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            enabled: None,
            max_len: 1000,
            ttl_s: 600,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct ShutdownConfig {
    /// Seconds from SIGTERM to exit, whatever is still open.
    pub(crate) drain_timeout_s: u64,
    /// Clients are told to reconnect after a random delay in `0..=reconnect_spread_ms`.
    pub(crate) reconnect_spread_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            drain_timeout_s: 10,
            reconnect_spread_ms: 5_000,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct DemoConfig {
    /// Publish simulated call-status events for org `demo` inside the hub.
    pub(crate) simulate_calls: bool,
}

/// What the loader found: the settings, what was compiled from them, and warnings worth
/// printing (never fatal).
pub struct Loaded {
    pub settings: Settings,
    pub compiled: Compiled,
    pub warnings: Vec<String>,
    /// The profile named by `SWITCHBOARD_ENV`, if any.
    pub profile: Option<String>,
}

/// What start-up builds from the settings while validating them, once: the rest of the hub
/// uses these and never parses a setting again.
pub struct Compiled {
    pub origins: OriginPolicy,
    /// `server.trusted_proxies`.
    pub(crate) trusted_proxies: Vec<IpNet>,
    /// `auth.client_publish`.
    pub(crate) client_publish: Vec<TopicPattern>,
    /// Signs and encrypts the session cookie: `auth.cookie_key`, or a fresh key per process
    /// when it is unset (sessions end on restart; fine for development).
    pub(crate) cookie_key: Key,
}

/// Every problem found, one line each; start-up stops on any.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<String>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            // One line per problem, though the TOML parser's messages span several (a snippet
            // with a caret) and values may hold line breaks.
            let words: Vec<&str> = problem
                .split(['\n', '\r'])
                .map(str::trim)
                .filter(|part| !part.is_empty())
                .collect();
            write!(f, "config error: {}", words.join(" "))?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The longest duration any setting may name: one year, in seconds.
const YEAR_S: u64 = 365 * 86_400;
/// The most messages one socket's queue may hold.
const MAX_OUTBOUND_QUEUE: u64 = 1 << 20;
/// The most HTTP worker threads (each a thread with its own event loop).
const MAX_WORKERS: u64 = 1024;

/// Keys whose environment value is a comma-separated list.
const LIST_KEYS: &[&str] = &[
    "server.trusted_proxies",
    "origins.allowed",
    "auth.client_publish",
    "api.publish_keys",
];

impl Settings {
    /// Whether events go through Redis (many pods) rather than in process.
    pub fn clustered(&self) -> bool {
        self.redis.url.is_some()
    }

    pub(crate) fn history_enabled(&self) -> bool {
        self.history.enabled.unwrap_or(self.clustered())
    }

    /// Load from `dir` and the process environment.
    pub fn load(dir: &Path) -> Result<Loaded, ConfigErrors> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(dir, &env)
    }

    /// Load from `dir` and the given environment (tests pass their own).
    pub(crate) fn load_from(dir: &Path, env: &[(String, String)]) -> Result<Loaded, ConfigErrors> {
        let mut errors = Vec::new();
        let lookup = |name: &str| {
            env.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .filter(|v| !v.is_empty())
        };
        let profile = lookup("SWITCHBOARD_ENV");

        let mut builder = config::Config::builder();
        let default_file = dir.join("default.toml");
        if !default_file.exists() {
            errors.push(format!("{} not found", default_file.display()));
        } else {
            builder = builder.add_source(config::File::from(default_file));
        }
        if let Some(profile) = &profile {
            let file: PathBuf = dir.join(format!("{profile}.toml"));
            if !file.exists() {
                errors.push(format!(
                    "SWITCHBOARD_ENV={profile} but {} does not exist",
                    file.display()
                ));
            } else {
                builder = builder.add_source(config::File::from(file));
            }
        }

        let mut env_source = config::Environment::with_prefix("SWITCHBOARD")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .source(Some(settings_env(env, &mut errors)));
        for key in LIST_KEYS {
            env_source = env_source.with_list_parse_key(key);
        }
        builder = builder.add_source(env_source);

        let conventional = [
            ("PORT", "server.port"),
            ("BIND", "server.bind"),
            ("REDIS_URL", "redis.url"),
        ];
        for (var, key) in conventional {
            if let Some(value) = lookup(var) {
                builder = match builder.set_override(key, value) {
                    Ok(b) => b,
                    Err(e) => {
                        errors.push(format!("{var}: {e}"));
                        return Err(ConfigErrors(errors));
                    }
                };
            }
        }

        let raw = match builder.build() {
            Ok(raw) => raw,
            Err(e) => {
                errors.push(e.to_string());
                return Err(ConfigErrors(errors));
            }
        };

        errors.extend(unknown_keys(&raw));
        // A section that does not deserialize keeps its defaults so the rest is still checked.
        let mut settings = deserialize_sections(&raw, &mut errors);

        let mut warnings = Vec::new();
        if let Some(frontend) = lookup("FRONTEND_URL") {
            // FRONTEND_URL is conventionally a URL, often with a trailing slash; the origin is
            // what browsers send, so reduce it rather than lock everyone out over a slash.
            let trimmed = frontend.trim().trim_end_matches('/').to_string();
            if trimmed != frontend.trim() {
                warnings.push(format!(
                    "FRONTEND_URL={frontend} has a trailing slash; using origin {trimmed}"
                ));
            }
            settings.origins.allowed.push(trimmed);
        }
        if let Some(list) = lookup("ALLOWED_ORIGINS") {
            settings.origins.allowed.extend(
                list.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty()),
            );
        }

        match settings.validate(profile.as_deref(), &mut warnings) {
            Ok(compiled) if errors.is_empty() => Ok(Loaded {
                settings,
                compiled,
                warnings,
                profile,
            }),
            Ok(_) => Err(ConfigErrors(errors)),
            Err(more) => {
                errors.extend(more);
                Err(ConfigErrors(errors))
            }
        }
    }

    /// Semantic checks that serde cannot express, compiling what passes. `Err` holds one
    /// message per problem.
    fn validate(
        &self,
        profile: Option<&str>,
        warnings: &mut Vec<String>,
    ) -> Result<Compiled, Vec<String>> {
        let mut errors = Vec::new();
        let production = profile == Some("production");

        let origins = OriginPolicy::from_config(&self.origins)
            .map_err(|origin_errors| errors.extend(origin_errors))
            .ok();
        if self.server.bind.parse::<std::net::IpAddr>().is_err() && self.server.bind != "localhost"
        {
            errors.push(format!(
                "server.bind = {:?} is not an IP address",
                self.server.bind
            ));
        }
        let mut trusted_proxies = Vec::new();
        for proxy in &self.server.trusted_proxies {
            match parse_trusted(proxy) {
                Ok(net) => trusted_proxies.push(net),
                Err(e) => errors.push(format!("server.trusted_proxies entry {e}")),
            }
        }

        let mut cookie_key = None;
        match &self.auth.cookie_key {
            Some(key) => match decode_cookie_key(key) {
                Ok(bytes) => cookie_key = Some(Key::from(&bytes)),
                Err(why) => errors.push(format!("auth.cookie_key {why}")),
            },
            None if production => errors.push(
                "auth.cookie_key is required in production (64+ random bytes, base64): \
                 generate one with `openssl rand -base64 64`"
                    .into(),
            ),
            None => warnings.push(
                "auth.cookie_key is unset: using a random key, so sessions end when the process restarts"
                    .into(),
            ),
        }
        if self.auth.cookie_name.is_empty()
            || !self
                .auth
                .cookie_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            errors.push(format!(
                "auth.cookie_name = {:?} must be letters, digits, '_' or '-'",
                self.auth.cookie_name
            ));
        }
        if self.auth.session_ttl_s == 0 {
            errors.push("auth.session_ttl_s must be at least 1 second".into());
        }
        if self.auth.cookie_same_site == SameSitePolicy::None && !self.auth.cookie_secure {
            errors.push(
                "auth.cookie_same_site = \"none\" needs auth.cookie_secure = true (browsers drop the cookie otherwise)"
                    .into(),
            );
        }
        if let Some(secret) = &self.auth.jwt_secret {
            if secret.len() < 16 {
                errors.push("auth.jwt_secret must be at least 16 bytes".into());
            }
        }
        let mut client_publish = Vec::new();
        for pattern in &self.auth.client_publish {
            match TopicPattern::parse(pattern) {
                Ok(pattern) => client_publish.push(pattern),
                Err(why) => errors.push(format!("auth.client_publish entry {pattern:?}: {why}")),
            }
        }
        if production && self.auth.dev_login {
            errors.push(
                "auth.dev_login = true is refused in production: it lets anyone log in as anyone"
                    .into(),
            );
        }
        if production && self.demo.simulate_calls {
            errors.push("demo.simulate_calls = true is refused in production".into());
        }
        if production && !self.auth.cookie_secure {
            warnings.push("auth.cookie_secure is off in production: the session cookie will also travel over plain http".into());
        }
        for key in &self.api.publish_keys {
            if key.len() < 8 {
                errors.push("api.publish_keys: every key must be at least 8 characters".into());
                break;
            }
        }

        if self.heartbeat.interval_ms == 0 {
            errors.push("heartbeat.interval_ms must be above 0".into());
        }
        if self.heartbeat.timeout_ms <= self.heartbeat.interval_ms {
            errors.push(format!(
                "heartbeat.timeout_ms ({}) must be greater than heartbeat.interval_ms ({})",
                self.heartbeat.timeout_ms, self.heartbeat.interval_ms
            ));
        }

        let l = &self.limits;
        let positive: [(&str, u64); 8] = [
            (
                "limits.max_connections_per_user",
                l.max_connections_per_user as u64,
            ),
            ("limits.cap_lease_s", l.cap_lease_s),
            ("limits.max_subscriptions", l.max_subscriptions as u64),
            ("limits.client_msgs_per_s", l.client_msgs_per_s as u64),
            ("limits.client_msgs_burst", l.client_msgs_burst as u64),
            ("limits.outbound_queue", l.outbound_queue as u64),
            (
                "limits.handshakes_per_ip_per_s",
                l.handshakes_per_ip_per_s as u64,
            ),
            ("limits.handshake_burst", l.handshake_burst as u64),
        ];
        for (key, value) in positive {
            if value == 0 {
                errors.push(format!("{key} must be at least 1"));
            }
        }
        if l.max_frame_bytes < 256 {
            errors.push("limits.max_frame_bytes must be at least 256".into());
        }
        // Durations and the queue size are used in sums and allocations at run time
        // (`now + ttl`, `Instant + timeout`, a channel of `outbound_queue`): bounded here, so
        // none of those can overflow. The other sizes stay within what TOML can write, so
        // `switchboard config` can print them.
        let toml_max = i64::MAX as u64;
        let at_most: [(&str, u64, u64); 12] = [
            ("server.workers", self.server.workers as u64, MAX_WORKERS),
            ("limits.max_frame_bytes", l.max_frame_bytes as u64, toml_max),
            (
                "limits.max_subscriptions",
                l.max_subscriptions as u64,
                toml_max,
            ),
            ("history.max_len", self.history.max_len as u64, toml_max),
            ("auth.session_ttl_s", self.auth.session_ttl_s, YEAR_S),
            ("limits.cap_lease_s", l.cap_lease_s, YEAR_S),
            ("history.ttl_s", self.history.ttl_s, YEAR_S),
            (
                "shutdown.drain_timeout_s",
                self.shutdown.drain_timeout_s,
                YEAR_S,
            ),
            (
                "heartbeat.interval_ms",
                self.heartbeat.interval_ms,
                YEAR_S * 1000,
            ),
            (
                "heartbeat.timeout_ms",
                self.heartbeat.timeout_ms,
                YEAR_S * 1000,
            ),
            (
                "shutdown.reconnect_spread_ms",
                self.shutdown.reconnect_spread_ms,
                YEAR_S * 1000,
            ),
            (
                "limits.outbound_queue",
                l.outbound_queue as u64,
                MAX_OUTBOUND_QUEUE,
            ),
        ];
        for (key, value, max) in at_most {
            if value > max {
                errors.push(format!("{key} = {value} is too large (at most {max})"));
            }
        }
        if l.cap_lease_s.saturating_mul(1000) <= self.heartbeat.interval_ms {
            errors.push(format!(
                "limits.cap_lease_s ({}s) must exceed heartbeat.interval_ms ({}ms): slots are refreshed by the heartbeat",
                l.cap_lease_s, self.heartbeat.interval_ms
            ));
        }

        if let Some(url) = &self.redis.url {
            if redis::parse_redis_url(url).is_none() {
                errors.push(format!(
                    "redis.url {:?} is not a redis:// URL",
                    redact_url(url)
                ));
            }
        }
        if self.history.max_len == 0 {
            errors.push("history.max_len must be at least 1".into());
        }
        if self.history.ttl_s == 0 {
            errors.push("history.ttl_s must be at least 1".into());
        }
        if self.shutdown.drain_timeout_s == 0 {
            errors.push("shutdown.drain_timeout_s must be at least 1".into());
        }
        match origins {
            Some(origins) if errors.is_empty() => Ok(Compiled {
                origins,
                trusted_proxies,
                client_publish,
                cookie_key: cookie_key.unwrap_or_else(Key::generate),
            }),
            _ => Err(errors),
        }
    }

    /// The effective configuration as TOML, with secrets replaced by `<redacted>`.
    pub fn redacted_toml(&self) -> String {
        let mut copy = self.clone();
        let redacted = || Some("<redacted>".to_string());
        if copy.auth.cookie_key.is_some() {
            copy.auth.cookie_key = redacted();
        }
        if copy.auth.jwt_secret.is_some() {
            copy.auth.jwt_secret = redacted();
        }
        for key in &mut copy.api.publish_keys {
            *key = "<redacted>".into();
        }
        if let Some(url) = &copy.redis.url {
            copy.redis.url = Some(redact_url(url));
        }
        toml::to_string_pretty(&copy).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// Why `auth.cookie_key` is unusable; the text completes the sentence "auth.cookie_key …".
#[derive(Debug, thiserror::Error)]
enum BadCookieKey {
    #[error("is not valid base64")]
    NotBase64(#[source] base64::DecodeError),
    #[error("decodes to {0} bytes; at least 64 are needed")]
    TooShort(usize),
}

/// Decode `auth.cookie_key`: base64 of at least 64 bytes.
fn decode_cookie_key(raw: &str) -> Result<Vec<u8>, BadCookieKey> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(raw.trim())
        .map_err(BadCookieKey::NotBase64)?;
    if bytes.len() < 64 {
        return Err(BadCookieKey::TooShort(bytes.len()));
    }
    Ok(bytes)
}

/// The `SWITCHBOARD__SECTION__KEY` variables of `env`. A name with more `__` than that names
/// no setting, and is refused here: the config crate nests a table per `__` and recurses per
/// level, so a name made of thousands of them overflowed the stack.
fn settings_env(env: &[(String, String)], errors: &mut Vec<String>) -> config::Map<String, String> {
    let mut vars = config::Map::new();
    for (name, value) in env.iter().filter(|(k, _)| k.starts_with("SWITCHBOARD__")) {
        if name.matches("__").count() > 2 {
            errors.push(format!(
                "environment variable {:?} names no setting: write SWITCHBOARD__SECTION__KEY",
                clip(name, 80)
            ));
        } else {
            vars.insert(name.clone(), value.clone());
        }
    }
    vars
}

/// At most `max` characters of `text`, for echoing names of any length.
fn clip(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

/// Hide the password part of `redis://user:password@host`.
pub(crate) fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!(
                "{}{}:<redacted>{}",
                &url[..scheme_end + 3],
                user,
                &url[at..]
            )
        }
        _ => url.to_string(),
    }
}

/// Deserialize each section on its own so one bad value does not hide problems in others.
/// Unknown keys are not errors here: [`unknown_keys`] reports them with a hint.
fn deserialize_sections(raw: &config::Config, errors: &mut Vec<String>) -> Settings {
    let mut settings = Settings::default();
    macro_rules! section {
        ($name:ident) => {
            match raw.get::<Option<_>>(stringify!($name)) {
                Ok(Some(value)) => settings.$name = value,
                Ok(None) | Err(config::ConfigError::NotFound(_)) => {}
                Err(e) => errors.push(describe(stringify!($name), e)),
            }
        };
    }
    section!(server);
    section!(origins);
    section!(auth);
    section!(api);
    section!(handshake);
    section!(heartbeat);
    section!(limits);
    section!(redis);
    section!(history);
    section!(shutdown);
    section!(demo);
    settings
}

fn describe(section: &str, e: config::ConfigError) -> String {
    let text = e.to_string();
    if text.contains(section) {
        text
    } else {
        format!("[{section}]: {text}")
    }
}

/// Keys present in the merged sources that switchboard does not know, as `section.key`.
fn unknown_keys(raw: &config::Config) -> Vec<String> {
    let known = known_keys();
    let mut problems = Vec::new();
    let Ok(table) = raw
        .clone()
        .try_deserialize::<config::Map<String, config::Value>>()
    else {
        return problems;
    };
    for (section, value) in table {
        let section_known = known.iter().any(|k| k.starts_with(&format!("{section}.")));
        if !section_known {
            problems.push(format!("unknown section [{section}]"));
            continue;
        }
        if let Ok(keys) = value.into_table() {
            for key in keys.keys() {
                let full = format!("{section}.{key}");
                if !known.contains(&full) {
                    let hint = nearest_key(&full, &known)
                        .map(|k| format!(" (did you mean {k}?)"))
                        .unwrap_or_default();
                    problems.push(format!("unknown key {full}{hint}"));
                }
            }
        }
    }
    problems
}

fn known_keys() -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let value = serde_json::to_value(Settings::default()).unwrap_or_default();
    if let Some(sections) = value.as_object() {
        for (section, table) in sections {
            if let Some(table) = table.as_object() {
                for key in table.keys() {
                    keys.insert(format!("{section}.{key}"));
                }
            }
        }
    }
    keys
}

fn nearest_key<'a>(key: &str, known: &'a BTreeSet<String>) -> Option<&'a String> {
    known
        .iter()
        .map(|k| (strsim::levenshtein(key, k), k))
        .filter(|(d, _)| *d <= 3)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by fuzzing: a huge `limits.cap_lease_s` overflowed the check against the
    /// heartbeat, huge durations were accepted to overflow later (`now + ttl` at login,
    /// `Instant + timeout`), and sizes beyond TOML's integers left `switchboard config`
    /// unable to print the settings; they are refused, one line each.
    #[test]
    fn huge_values_are_refused_not_overflowed() {
        let mut s = Settings::default();
        s.limits.cap_lease_s = u64::MAX;
        s.auth.session_ttl_s = u64::MAX;
        s.heartbeat.timeout_ms = u64::MAX;
        s.limits.outbound_queue = usize::MAX;
        s.limits.max_frame_bytes = usize::MAX;
        s.server.workers = 1 << 20;
        let Err(errors) = s.validate(None, &mut Vec::new()) else {
            panic!("huge values accepted");
        };
        for key in [
            "limits.cap_lease_s",
            "auth.session_ttl_s",
            "heartbeat.timeout_ms",
            "limits.outbound_queue",
            "limits.max_frame_bytes",
            "server.workers",
        ] {
            assert!(
                errors.iter().any(|e| e.starts_with(&format!("{key} = "))),
                "{key}: {errors:?}"
            );
        }
    }

    /// Found by fuzzing: TOML syntax errors (and values holding line breaks) printed over
    /// several lines, only the first marked `config error:`.
    #[test]
    fn every_problem_prints_on_one_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("default.toml"), "[server\nport = 1\r").unwrap();
        let env = [(
            "SWITCHBOARD__LIMITS__CAP_POLICY".to_string(),
            "x\ny".to_string(),
        )];
        let Err(errors) = Settings::load_from(dir.path(), &env) else {
            panic!("broken TOML accepted");
        };
        let text = errors.to_string();
        assert_eq!(text.lines().count(), errors.0.len(), "{text}");
        assert!(
            text.lines().all(|l| l.starts_with("config error: ")),
            "{text}"
        );
    }

    /// Found by fuzzing: an environment variable named with thousands of `__` overflowed
    /// the stack (the config crate recurses once per level); it is refused in one line.
    #[test]
    fn deeply_nested_environment_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("default.toml"), "").unwrap();
        let name = format!("SWITCHBOARD__SERVER{}", "__X".repeat(5000));
        let Err(errors) = Settings::load_from(dir.path(), &[(name, "1".into())]) else {
            panic!("a name of 5000 levels accepted");
        };
        assert_eq!(errors.0.len(), 1, "{errors}");
        assert!(errors.0[0].contains("names no setting"), "{errors}");
        assert!(errors.0[0].len() < 200, "{errors}");
    }

    /// Cookie keys must be base64 of 64 bytes or more.
    #[test]
    fn cookie_keys() {
        let good = base64::engine::general_purpose::STANDARD.encode([7u8; 64]);
        assert!(decode_cookie_key(&good).is_ok());
        let short = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert!(decode_cookie_key(&short)
            .unwrap_err()
            .to_string()
            .contains("32 bytes"));
        assert!(decode_cookie_key("%%%").is_err());
    }
}

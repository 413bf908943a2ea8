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
    /// Which profile this is: `SWITCHBOARD_ENV` when set, else what the files say
    /// (`development` in config/default.toml). Only `development` on a loopback bind allows
    /// the development conveniences and shipped secrets; anything else is strict.
    pub(crate) profile: String,
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
            // Unnamed means strict: only a file (or SWITCHBOARD_ENV) can ask for development.
            profile: PRODUCTION.into(),
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
    /// Session lifetime in seconds; sockets close when it runs out.
    pub(crate) session_ttl_s: u64,
    /// Seconds between re-checks of the sessions of open sockets against the logged-out list
    /// (catches a logout whose broadcast a pod missed).
    pub(crate) revocation_check_s: u64,
    /// HS256 secret for `POST /auth/session` tokens (32+ bytes); unset disables that endpoint.
    pub(crate) jwt_secret: Option<String>,
    /// When set, tokens must carry this `iss`.
    pub(crate) jwt_issuer: Option<String>,
    /// When set, tokens must carry this `aud`.
    pub(crate) jwt_audience: Option<String>,
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
            revocation_check_s: 10,
            jwt_secret: None,
            jwt_issuer: None,
            jwt_audience: None,
            dev_login: false,
            client_publish: vec!["voice:*:in".into()],
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct ApiConfig {
    /// Bearer keys accepted by `POST /api/publish`: 32+ characters outside development.
    pub(crate) publish_keys: Vec<String>,
    /// Milliseconds a publish body may take to arrive once its key is accepted (408 after).
    pub(crate) body_timeout_ms: u64,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            publish_keys: Vec::new(),
            body_timeout_ms: 10_000,
        }
    }
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
    /// Largest `data` of an event a browser publishes, in bytes of JSON; larger is refused
    /// with a `bad_request` error.
    pub(crate) client_event_bytes: usize,
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
            client_event_bytes: 4096,
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
    /// A Redis Cluster instead, by some of its nodes (`redis://host:port` each; the others are
    /// found from them). Not together with `url`.
    pub(crate) cluster_urls: Vec<String>,
}

/// Where a clustered node's Redis is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RedisTarget {
    /// One Redis (`redis.url`).
    Single(String),
    /// A Redis Cluster, by its seed nodes (`redis.cluster_urls`).
    Cluster(Vec<String>),
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
    /// Topics of one org keeping history at once; past it, events of further topics go out
    /// live only.
    pub(crate) max_topics_per_org: usize,
    /// The most bytes of events one `since` replay sends; past it only the newest are
    /// replayed, with `recovered: false`.
    pub(crate) replay_max_bytes: usize,
    /// Keep events browsers publish (`auth.client_publish`) in history too.
    pub(crate) keep_client_events: bool,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            enabled: None,
            max_len: 1000,
            ttl_s: 600,
            max_topics_per_org: 1000,
            replay_max_bytes: 1_048_576,
            keep_client_events: false,
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

/// The profile that allows development conveniences (on a loopback bind).
pub(crate) const DEVELOPMENT: &str = "development";
const PRODUCTION: &str = "production";

/// Secrets this repository ships or shows (config/default.toml, docker-compose.yml, the
/// docs): public, so refused outside development. `(key, value, where it comes from)`.
const SHIPPED_SECRETS: &[(&str, &str, &str)] = &[
    (
        "auth.cookie_key",
        "ZGV2ZWxvcG1lbnQtb25seS1jb29raWUta2V5LWRvLW5vdC11c2UtaW4tcHJvZHVjdGlvbi0wMTIzNDU2Nzg5YWJjZGVm",
        "config/default.toml",
    ),
    (
        "auth.cookie_key",
        "RVhBTVBMRS1PTkxZLWNvb2tpZS1rZXkuIFJlcGxhY2Ugd2l0aCB0aGUgb3V0cHV0IG9mOiBvcGVuc3NsIHJhbmQgLWJhc2U2NCA2NCAobmV2ZXIgY29tbWl0IGl0KS4=",
        "docker-compose.yml",
    ),
    (
        "auth.jwt_secret",
        "dev-jwt-secret-change-me-0123456789abcdef",
        "config/default.toml",
    ),
    ("auth.jwt_secret", "dev-jwt-secret-change-me", "an earlier config/default.toml"),
    (
        "auth.jwt_secret",
        "example-jwt-secret-REPLACE-ME",
        "docker-compose.yml",
    ),
    ("api.publish_keys", "dev-publish-key", "config/default.toml"),
    (
        "api.publish_keys",
        "example-publish-key-REPLACE-ME",
        "docker-compose.yml",
    ),
];

/// Where `value` of `key` was published, if this repository ships it.
fn shipped(key: &str, value: &str) -> Option<&'static str> {
    SHIPPED_SECRETS
        .iter()
        .find(|(k, v, _)| *k == key && *v == value.trim())
        .map(|(_, _, source)| *source)
}

/// Fewest bytes of an `auth.jwt_secret`: RFC 7518 section 3.2 requires HS256 keys of at
/// least the hash size, 256 bits.
const MIN_JWT_SECRET_BYTES: usize = 32;
/// Fewest characters of an `api.publish_keys` entry outside development (`openssl rand -hex
/// 24` gives 48); development accepts [`MIN_DEV_PUBLISH_KEY_CHARS`].
const MIN_PUBLISH_KEY_CHARS: usize = 32;
const MIN_DEV_PUBLISH_KEY_CHARS: usize = 8;

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
    "redis.cluster_urls",
];

impl Settings {
    /// Whether events go through Redis (many pods) rather than in process.
    pub fn clustered(&self) -> bool {
        self.redis_target().is_some()
    }

    /// The Redis of a clustered node; `None` when embedded.
    pub(crate) fn redis_target(&self) -> Option<RedisTarget> {
        match &self.redis.url {
            Some(url) => Some(RedisTarget::Single(url.clone())),
            None if !self.redis.cluster_urls.is_empty() => {
                Some(RedisTarget::Cluster(self.redis.cluster_urls.clone()))
            }
            None => None,
        }
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
            // The profile whose file was loaded is the profile, whatever the files say.
            ("SWITCHBOARD_ENV", "server.profile"),
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

        match settings.validate(&mut warnings) {
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
    fn validate(&self, warnings: &mut Vec<String>) -> Result<Compiled, Vec<String>> {
        let mut errors = Vec::new();
        let profile = self.server.profile.as_str();
        let loopback = self.server.bind == "localhost"
            || self
                .server
                .bind
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        // Development conveniences and shipped secrets need both: a development profile
        // reachable from this machine only.
        let development = profile == DEVELOPMENT && loopback;
        let strict_because = if profile == DEVELOPMENT {
            format!("server.bind = {:?} is not loopback", self.server.bind)
        } else {
            format!("profile {profile:?} is not {DEVELOPMENT:?}")
        };

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
            Some(key) => match (decode_cookie_key(key), shipped("auth.cookie_key", key)) {
                (Ok(_), Some(source)) if !development => errors.push(format!(
                    "auth.cookie_key is the example key from {source}, which anyone can read \
                     ({strict_because}): generate one with `openssl rand -base64 64`"
                )),
                (Ok(bytes), _) => cookie_key = Some(Key::from(&bytes)),
                (Err(why), _) => errors.push(format!("auth.cookie_key {why}")),
            },
            None if !development => errors.push(format!(
                "auth.cookie_key is required ({strict_because}): 64+ random bytes, base64; \
                 generate one with `openssl rand -base64 64`"
            )),
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
        if self.auth.revocation_check_s == 0 {
            errors.push("auth.revocation_check_s must be at least 1 second".into());
        }
        if self.auth.cookie_same_site == SameSitePolicy::None && !self.auth.cookie_secure {
            errors.push(
                "auth.cookie_same_site = \"none\" needs auth.cookie_secure = true (browsers drop the cookie otherwise)"
                    .into(),
            );
        }
        if let Some(secret) = &self.auth.jwt_secret {
            if secret.len() < MIN_JWT_SECRET_BYTES {
                errors.push(format!(
                    "auth.jwt_secret must be at least {MIN_JWT_SECRET_BYTES} bytes (HS256): \
                     generate one with `openssl rand -base64 32`"
                ));
            } else if let Some(source) = shipped("auth.jwt_secret", secret).filter(|_| !development)
            {
                errors.push(format!(
                    "auth.jwt_secret is the example secret from {source}, which anyone can read \
                     ({strict_because}): generate one with `openssl rand -base64 32`"
                ));
            }
        }
        for (key, value) in [
            ("auth.jwt_issuer", &self.auth.jwt_issuer),
            ("auth.jwt_audience", &self.auth.jwt_audience),
        ] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                errors.push(format!(
                    "{key} is empty: remove it or name the expected value"
                ));
            }
        }
        let mut client_publish = Vec::new();
        for pattern in &self.auth.client_publish {
            match TopicPattern::parse(pattern) {
                Ok(pattern) => client_publish.push(pattern),
                Err(why) => errors.push(format!("auth.client_publish entry {pattern:?}: {why}")),
            }
        }
        if !development && self.auth.dev_login {
            errors.push(format!(
                "auth.dev_login = true is refused ({strict_because}): it lets anyone log in as anyone"
            ));
        }
        if !development && self.demo.simulate_calls {
            errors.push(format!(
                "demo.simulate_calls = true is refused ({strict_because}): made-up calls would reach real boards"
            ));
        }
        if !development && !self.auth.cookie_secure {
            warnings.push(format!("auth.cookie_secure is off for profile {profile:?}: the session cookie will also travel over plain http"));
        }
        let min_key = if development {
            MIN_DEV_PUBLISH_KEY_CHARS
        } else {
            MIN_PUBLISH_KEY_CHARS
        };
        if let Some(short) = self.api.publish_keys.iter().find(|k| k.len() < min_key) {
            let why = if development {
                String::new()
            } else {
                format!(" ({strict_because})")
            };
            errors.push(format!(
                "api.publish_keys: every key must be at least {min_key} characters{why}; one has {}: generate one with `openssl rand -hex 24`",
                short.len()
            ));
        } else if let Some(source) = self
            .api
            .publish_keys
            .iter()
            .find_map(|k| shipped("api.publish_keys", k))
            .filter(|_| !development)
        {
            errors.push(format!(
                "api.publish_keys holds the example key from {source}, which anyone can read \
                 ({strict_because}): generate one with `openssl rand -hex 24`"
            ));
        }

        if self.api.body_timeout_ms == 0 {
            errors.push("api.body_timeout_ms must be at least 1".into());
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
        if l.client_event_bytes == 0 {
            errors.push("limits.client_event_bytes must be at least 1".into());
        }
        // Durations and the queue size are used in sums and allocations at run time
        // (`now + ttl`, `Instant + timeout`, a channel of `outbound_queue`): bounded here, so
        // none of those can overflow. The other sizes stay within what TOML can write, so
        // `switchboard config` can print them.
        let toml_max = i64::MAX as u64;
        let at_most: [(&str, u64, u64); 17] = [
            ("server.workers", self.server.workers as u64, MAX_WORKERS),
            ("limits.max_frame_bytes", l.max_frame_bytes as u64, toml_max),
            (
                "limits.max_subscriptions",
                l.max_subscriptions as u64,
                toml_max,
            ),
            ("history.max_len", self.history.max_len as u64, toml_max),
            (
                "history.max_topics_per_org",
                self.history.max_topics_per_org as u64,
                toml_max,
            ),
            (
                "history.replay_max_bytes",
                self.history.replay_max_bytes as u64,
                toml_max,
            ),
            (
                "limits.client_event_bytes",
                l.client_event_bytes as u64,
                toml_max,
            ),
            ("auth.session_ttl_s", self.auth.session_ttl_s, YEAR_S),
            ("limits.cap_lease_s", l.cap_lease_s, YEAR_S),
            ("history.ttl_s", self.history.ttl_s, YEAR_S),
            (
                "auth.revocation_check_s",
                self.auth.revocation_check_s,
                YEAR_S,
            ),
            (
                "api.body_timeout_ms",
                self.api.body_timeout_ms,
                YEAR_S * 1000,
            ),
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
        if self.redis.url.is_some() && !self.redis.cluster_urls.is_empty() {
            errors.push(
                "redis.url and redis.cluster_urls are both set: give one Redis (url) or the seed nodes of a Redis Cluster (cluster_urls), not both".into(),
            );
        }
        for url in &self.redis.cluster_urls {
            if redis::parse_redis_url(url).is_none() {
                errors.push(format!(
                    "redis.cluster_urls: {:?} is not a redis:// URL",
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
        if self.history.max_topics_per_org == 0 {
            errors.push("history.max_topics_per_org must be at least 1".into());
        }
        if self.history.replay_max_bytes < 1024 {
            errors.push("history.replay_max_bytes must be at least 1024".into());
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
        for url in &mut copy.redis.cluster_urls {
            *url = redact_url(url);
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
        let Err(errors) = s.validate(&mut Vec::new()) else {
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
        // Development, so that the name is the only problem.
        let default = "[server]\nprofile = \"development\"\n";
        std::fs::write(dir.path().join("default.toml"), default).unwrap();
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

    /// Every secret config/default.toml ships is on the list refused outside development.
    #[test]
    fn shipped_secrets_cover_default_toml() {
        let table: toml::Table = include_str!("../../config/default.toml").parse().unwrap();
        let text = |section: &str, key: &str| table[section][key].as_str().unwrap().to_string();
        assert!(shipped("auth.cookie_key", &text("auth", "cookie_key")).is_some());
        assert!(shipped("auth.jwt_secret", &text("auth", "jwt_secret")).is_some());
        for key in table["api"]["publish_keys"].as_array().unwrap() {
            assert!(shipped("api.publish_keys", key.as_str().unwrap()).is_some());
        }
        assert_eq!(text("server", "profile"), DEVELOPMENT);
    }
}

//! Builds the node: the shared [`Hub`] state, the broker actor on its own thread (in memory
//! when embedded, Redis when clustered, with the matching session, cap and revocation stores),
//! the actix `App` with its routes and middleware (one origin policy for WebSocket, CORS and
//! the `/api` and `/auth` guard), and runs it until the shutdown sequence ends it.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix_cors::Cors;
use actix_http::{HttpService, KeepAlive};
use actix_service::{fn_service, map_config};
use actix_session::storage::{RedisSessionStore, SessionStore};
use actix_session::SessionMiddleware;
use actix_web::body::MessageBody;
use actix_web::cookie::Key;
use actix_web::dev::AppConfig;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, App, HttpResponse};
use serde_json::json;
use tokio::sync::watch;

use crate::auth::{self, Revocations, SessionBackend};
use crate::broker::memory::{EventLog, HistoryLimits, MemoryBroker};
use crate::broker::redis::{
    refresh_leases, session_cache_key, RedisBroker, RedisCaps, RedisCommands, RedisPublisher,
    StreamHistory,
};
use crate::broker::{BrokerHandle, BrokerHealth};
use crate::config::Settings;
use crate::limits::{ConnectionCaps, HandshakeLimiter, IpMatcher};
use crate::origin::{Day, OriginPolicy};
use crate::protocol::TopicPattern;
use crate::registry::Registry;
use crate::{handshake, http, metrics, shutdown, simulate, sse};

/// Everything a request handler or session needs, shared by all workers.
pub struct Hub {
    pub settings: Settings,
    pub origins: OriginPolicy,
    pub registry: Arc<Registry>,
    pub broker: BrokerHandle,
    pub caps: ConnectionCaps,
    pub handshakes: HandshakeLimiter,
    pub trusted_proxies: Vec<IpMatcher>,
    pub revocations: Revocations,
    /// Clustered only: commands to Redis for orders that concern every pod.
    pub redis: Option<RedisCommands>,
    pub client_publish: Vec<TopicPattern>,
    /// Set by the shutdown sequence: readiness fails and new sockets are refused.
    pub draining: AtomicBool,
    /// The key that signs and encrypts the session cookie: the WebSocket handshake reads
    /// sessions itself (it runs before the session middleware).
    pub cookie_key: Key,
}

/// A problem that stops start-up.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

impl Hub {
    fn new(
        settings: Settings,
        registry: Arc<Registry>,
        broker: BrokerHandle,
        caps: ConnectionCaps,
        revocations: Revocations,
        redis: Option<RedisCommands>,
    ) -> Result<Self, StartError> {
        let origins = OriginPolicy::from_config(&settings.origins)
            .map_err(|errors| StartError(errors.join("; ")))?;
        let trusted_proxies = settings
            .server
            .trusted_proxies
            .iter()
            .map(|p| IpMatcher::parse(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(StartError)?;
        let client_publish = settings
            .auth
            .client_publish
            .iter()
            .map(|p| TopicPattern::parse(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(StartError)?;
        let limits = &settings.limits;
        Ok(Self {
            caps,
            redis,
            handshakes: HandshakeLimiter::new(
                limits.handshakes_per_ip_per_s,
                limits.handshake_burst,
            ),
            origins,
            registry,
            broker,
            trusted_proxies,
            revocations,
            client_publish,
            draining: AtomicBool::new(false),
            cookie_key: auth::cookie_key(&settings.auth),
            settings,
        })
    }
}

/// Refuse `/api` and `/auth` requests from browsers on origins the policy does not admit.
/// Requests without an Origin header (services, curl) pass: they carry no ambient cookies
/// from a hostile page.
async fn origin_guard(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    if let (Some(origin), Some(hub)) = (origin, req.app_data::<web::Data<Hub>>()) {
        if !hub.origins.check(Some(&origin), Day::today()).is_allowed() {
            log::warn!(
                "{} {} refused: origin not allowed: {origin}; allowlist: [{}]",
                req.method(),
                req.path(),
                hub.origins.allowlist().join(", ")
            );
            let response = HttpResponse::Forbidden().json(json!({
                "error": "origin_not_allowed",
                "detail": format!("origin not allowed: {origin}"),
            }));
            return Ok(req.into_response(response).map_into_right_body());
        }
    }
    next.call(req)
        .await
        .map(ServiceResponse::map_into_left_body)
}

/// CORS from the same policy as the WebSocket check: one allowlist, never two.
fn cors(hub: web::Data<Hub>) -> Cors {
    Cors::default()
        .allowed_origin_fn(move |origin, _| {
            origin
                .to_str()
                .is_ok_and(|o| hub.origins.check(Some(o), Day::today()).is_allowed())
        })
        .allowed_methods(["GET", "POST", "DELETE"])
        .allowed_headers([header::AUTHORIZATION, header::CONTENT_TYPE, header::ACCEPT])
        .supports_credentials()
        .max_age(600)
}

/// A bound, not yet running server: tests and `main` learn the address before it runs.
pub struct Bound {
    server: actix_server::Server,
    pub addrs: Vec<SocketAddr>,
    hub: web::Data<Hub>,
    /// Clustered only: the cap store whose leases this pod keeps alive.
    caps_leases: Option<RedisCaps>,
}

/// Build the node and bind its listener. Must run inside an actix `System`. In clustered
/// mode this waits until Redis answers.
pub async fn bind(settings: Settings) -> Result<Bound, StartError> {
    metrics::init();
    let registry = Arc::new(Registry::default());
    let health = Arc::new(BrokerHealth::default());
    // The broker actor gets a thread of its own, so its work (Redis I/O when clustered) never
    // stalls an HTTP worker.
    let broker_thread = Arbiter::new();
    let limits = settings.limits.clone();
    let (broker, caps, revocations, redis, sessions) = match settings.redis.url.clone() {
        None => {
            let history = settings.history_enabled().then(|| HistoryLimits {
                max_len: settings.history.max_len,
                ttl: Duration::from_secs(settings.history.ttl_s),
            });
            let log = Arc::new(EventLog::new(registry.clone(), history));
            let broker_log = log.clone();
            let addr = MemoryBroker::start_in_arbiter(&broker_thread.handle(), move |_| {
                MemoryBroker::new(broker_log)
            });
            (
                BrokerHandle::embedded(&addr, log, health),
                ConnectionCaps::in_memory(limits.max_connections_per_user, limits.cap_policy),
                Revocations::Memory(Default::default()),
                None,
                SessionBackend::Cookie,
            )
        }
        Some(url) => {
            let commands = RedisCommands::connect(&url).await.map_err(StartError)?;
            let store = RedisSessionStore::builder(url.clone())
                .cache_keygen(session_cache_key)
                .build()
                .await
                .map_err(|e| StartError(format!("cannot open the Redis session store: {e}")))?;
            let history = settings.history_enabled().then_some(StreamHistory {
                max_len: settings.history.max_len,
                ttl_s: settings.history.ttl_s,
            });
            let broker_registry = registry.clone();
            let broker_commands = commands.clone();
            let broker_health = health.clone();
            let live_channels = watch::Sender::new(HashSet::new());
            let live = live_channels.subscribe();
            let addr = RedisBroker::start_in_arbiter(&broker_thread.handle(), move |_| {
                RedisBroker::new(
                    url,
                    broker_registry,
                    broker_commands,
                    broker_health,
                    history,
                    live_channels,
                )
            });
            let caps = RedisCaps::new(commands.clone(), Duration::from_secs(limits.cap_lease_s));
            (
                BrokerHandle::clustered(
                    &addr,
                    health,
                    live,
                    RedisPublisher::new(commands.clone(), history),
                ),
                ConnectionCaps::redis(limits.max_connections_per_user, limits.cap_policy, caps),
                Revocations::Redis(commands.clone()),
                Some(commands),
                SessionBackend::Redis(store),
            )
        }
    };
    let caps_leases = caps.redis_store();
    let hub = web::Data::new(Hub::new(
        settings,
        registry,
        broker,
        caps,
        revocations,
        redis,
    )?);
    let key = hub.cookie_key.clone();
    let (server, addrs) = match sessions {
        SessionBackend::Cookie => {
            let auth = hub.settings.auth.clone();
            http_server(hub.clone(), move || {
                auth::cookie_session_middleware(&auth, &key)
            })?
        }
        SessionBackend::Redis(store) => {
            let auth = hub.settings.auth.clone();
            http_server(hub.clone(), move || {
                auth::session_middleware(store.clone(), &auth, &key)
            })?
        }
    };
    Ok(Bound {
        server,
        addrs,
        hub,
        caps_leases,
    })
}

/// The actix server with every route, over a session store of either kind.
fn http_server<S, F>(
    hub: web::Data<Hub>,
    session_middleware: F,
) -> Result<(actix_server::Server, Vec<SocketAddr>), StartError>
where
    S: SessionStore + 'static,
    F: Fn() -> SessionMiddleware<S> + Send + Clone + 'static,
{
    let workers = match hub.settings.server.workers {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    let listeners = listeners(&hub.settings.server.bind, hub.settings.server.port)?;
    let addrs = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect::<Vec<_>>();
    let mut server = actix_server::Server::build()
        .workers(workers)
        .disable_signals()
        // Sockets are closed by the drain before the server stops; this only bounds stragglers.
        .shutdown_timeout(1);
    for listener in listeners {
        let hub = hub.clone();
        let session_middleware = session_middleware.clone();
        server = server
            .listen("switchboard", listener, move || {
                let app_hub = hub.clone();
                let app = App::new()
                    .app_data(app_hub.clone())
                    .wrap(session_middleware())
                    .configure(|cfg| routes(cfg, &app_hub));
                let upgrade_hub = hub.clone().into_inner();
                let upgrades = fn_service(move |(req, framed)| {
                    handshake::upgrade(upgrade_hub.clone(), req, framed)
                });
                HttpService::build()
                    .keep_alive(KeepAlive::Timeout(Duration::from_secs(5)))
                    .client_request_timeout(Duration::from_secs(5))
                    .upgrade(upgrades)
                    .finish(map_config(app, |_| AppConfig::default()))
                    .tcp()
            })
            .map_err(|e| StartError(format!("cannot serve: {e}")))?;
    }
    Ok((server.run(), addrs))
}

/// Listen on every address `bind` resolves to, with a backlog that absorbs a reconnect wave
/// (the kernel default of 128 drops SYNs when thousands of clients come back at once).
fn listeners(bind: &str, port: u16) -> Result<Vec<std::net::TcpListener>, StartError> {
    use std::net::ToSocketAddrs;
    let cannot = |e: std::io::Error| StartError(format!("cannot listen on {bind}:{port}: {e}"));
    let mut listeners = Vec::new();
    for addr in (bind, port).to_socket_addrs().map_err(cannot)? {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .map_err(cannot)?;
        socket.set_reuse_address(true).map_err(cannot)?;
        socket.bind(&addr.into()).map_err(cannot)?;
        socket.listen(2048).map_err(cannot)?;
        listeners.push(socket.into());
    }
    if listeners.is_empty() {
        return Err(StartError(format!(
            "cannot listen on {bind}:{port}: no address"
        )));
    }
    Ok(listeners)
}

fn routes(cfg: &mut web::ServiceConfig, hub: &web::Data<Hub>) {
    cfg.route("/", web::get().to(http::index))
        .route("/client.js", web::get().to(http::client_js))
        .route("/ws", web::get().to(handshake::websocket_without_upgrade))
        .route("/sse", web::get().to(sse::stream))
        .route("/healthz", web::get().to(http::healthz))
        .route("/readyz", web::get().to(http::readyz))
        .route("/metrics", web::get().to(http::metrics_text))
        .service(
            web::scope("/api")
                .wrap(cors(hub.clone()))
                .wrap(from_fn(origin_guard))
                .route("/publish", web::post().to(http::publish)),
        );
    let auth_scope = web::scope("/auth")
        .wrap(cors(hub.clone()))
        .wrap(from_fn(origin_guard))
        .route("/session", web::post().to(auth::exchange_token))
        .route("/session", web::delete().to(auth::logout));
    cfg.service(if hub.settings.auth.dev_login {
        auth_scope.route("/dev-login", web::post().to(auth::dev_login))
    } else {
        auth_scope
    });
}

/// How often the heap is looked at.
const TRIM_EVERY: Duration = Duration::from_secs(2);
/// Sockets that must have gone (from the highest count since the last trim, and at least half
/// of it) for a disconnect wave.
const TRIM_MIN_GONE: usize = 1000;
/// Work since the last trim that makes a busy spell: sockets opened, or frames delivered.
const TRIM_AFTER_OPENED: u64 = 1000;
const TRIM_AFTER_DELIVERED: u64 = 100_000;
/// At most this much work in one look counts as quiet: the busy spell is over.
const QUIET_OPENED: u64 = 50;
const QUIET_DELIVERED: u64 = 1000;
/// Looks between two trims for busy spells (30 s), so traffic that comes in bursts (one
/// broadcast every few seconds) does not trim after each of them.
const BUSY_TRIM_SPACING_LOOKS: u32 = 15;

/// Give the freed heap back to the OS after a wave of sockets closes, and when a busy spell
/// (a wave of handshakes, a burst of traffic) has gone quiet. glibc keeps freed memory
/// otherwise, so a node's RSS would stay at the level of its busiest moment (a reconnect
/// storm, a churn of short-lived tabs, a backlog of frames) for the rest of its life.
async fn trim_when_quiet(registry: Arc<Registry>) {
    let mut ticker = tokio::time::interval(TRIM_EVERY);
    let mut policy = TrimPolicy::default();
    loop {
        ticker.tick().await;
        let delivered = metrics::metrics().messages_delivered.get();
        if policy.observe(registry.session_count(), delivered) {
            trim_heap();
        }
    }
}

/// When to trim, from what the node did between two looks. Trims happen when sockets just
/// left, or after a busy spell once a look was quiet (at most every 30 s for those), so
/// deliveries rarely meet one. Sockets opened are counted as growth in
/// the count, so churn at a steady count is not a busy spell (its disconnect waves are).
#[derive(Default)]
struct TrimPolicy {
    highest_sessions: usize,
    last_sessions: usize,
    last_delivered: u64,
    opened_since_trim: u64,
    delivered_since_trim: u64,
    busy_trim_allowed_in: u32,
}

impl TrimPolicy {
    /// Take one look (open sockets now, frames delivered in all); true: trim now.
    fn observe(&mut self, sessions: usize, delivered: u64) -> bool {
        let opened = sessions.saturating_sub(self.last_sessions) as u64;
        let sent = delivered.saturating_sub(self.last_delivered);
        (self.last_sessions, self.last_delivered) = (sessions, delivered);
        self.opened_since_trim += opened;
        self.delivered_since_trim += sent;
        self.highest_sessions = self.highest_sessions.max(sessions);
        let gone = self.highest_sessions - sessions;
        let wave_gone = gone >= TRIM_MIN_GONE && sessions <= self.highest_sessions / 2;
        let quiet = opened <= QUIET_OPENED && sent <= QUIET_DELIVERED;
        self.busy_trim_allowed_in = self.busy_trim_allowed_in.saturating_sub(1);
        let busy_spell_over = (self.opened_since_trim >= TRIM_AFTER_OPENED
            || self.delivered_since_trim >= TRIM_AFTER_DELIVERED)
            && quiet
            && self.busy_trim_allowed_in == 0;
        if !(wave_gone || busy_spell_over) {
            return false;
        }
        self.highest_sessions = sessions;
        (self.opened_since_trim, self.delivered_since_trim) = (0, 0);
        self.busy_trim_allowed_in = BUSY_TRIM_SPACING_LOOKS;
        true
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_heap() {
    extern "C" {
        fn malloc_trim(pad: usize) -> std::os::raw::c_int;
    }
    // SAFETY: glibc's malloc_trim takes the allocator's own locks and only releases memory
    // that is already free; it has no preconditions on the caller.
    unsafe {
        malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_heap() {}

impl Bound {
    /// Serve until SIGTERM/SIGINT and the drain that follows.
    pub async fn run(self) -> std::io::Result<()> {
        for addr in &self.addrs {
            log::info!("listening on http://{addr}");
        }
        let hub = self.hub.clone().into_inner();
        log::info!(
            "mode: {}; origins: [{}]{}; dev login {}",
            if hub.settings.clustered() {
                "clustered"
            } else {
                "embedded"
            },
            hub.origins.allowlist().join(", "),
            if hub.settings.origins.allow_localhost {
                " + localhost"
            } else {
                ""
            },
            if hub.settings.auth.dev_login {
                "on"
            } else {
                "off"
            },
        );
        if hub.settings.demo.simulate_calls {
            actix::spawn(simulate::run_in_hub(hub.broker.clone()));
        }
        if let Some(caps) = self.caps_leases {
            actix::spawn(refresh_leases(caps, hub.registry.clone()));
        }
        actix::spawn(trim_when_quiet(hub.registry.clone()));
        let handle = self.server.handle();
        actix::spawn(async move {
            shutdown::signalled().await;
            shutdown::drain(hub, handle).await;
        });
        self.server.await
    }
}

#[cfg(test)]
mod tests {
    use super::TrimPolicy;

    #[test]
    fn trims_once_a_wave_of_handshakes_goes_quiet_and_not_while_it_lasts() {
        let mut policy = TrimPolicy::default();
        assert!(!policy.observe(3_000, 0), "still connecting");
        assert!(!policy.observe(5_000, 0), "still connecting");
        assert!(policy.observe(5_000, 0), "connected and quiet");
        assert!(!policy.observe(5_000, 0), "nothing freed since");
    }

    #[test]
    fn trims_after_a_burst_of_traffic_not_during_steady_traffic() {
        let mut policy = TrimPolicy::default();
        policy.observe(100, 0);
        let mut delivered = 0;
        for _ in 0..20 {
            delivered += 200_000;
            assert!(!policy.observe(100, delivered), "traffic is flowing");
        }
        assert!(policy.observe(100, delivered + 10), "the burst is over");
        assert!(!policy.observe(100, delivered + 20), "nothing new since");
    }

    #[test]
    fn bursts_every_few_seconds_trim_at_most_every_30_s() {
        let mut policy = TrimPolicy::default();
        let mut delivered = 0;
        let mut trims = 0;
        // A broadcast to 200,000 sockets every 10 s (one look in five), for 5 minutes.
        for look in 0..150 {
            if look % 5 == 0 {
                delivered += 200_000;
            }
            trims += usize::from(policy.observe(200_000, delivered));
        }
        assert!((1..=11).contains(&trims), "{trims} trims in 5 minutes");
    }

    #[test]
    fn trims_when_most_sockets_leave_even_while_the_rest_are_busy() {
        let mut policy = TrimPolicy::default();
        for _ in 0..3 {
            policy.observe(4_000, 0);
        }
        assert!(policy.observe(1_500, 1_000_000), "2,500 of 4,000 gone");
    }

    #[test]
    fn a_small_node_going_quiet_is_left_alone() {
        let mut policy = TrimPolicy::default();
        let mut delivered = 0;
        for n in [10, 20, 30, 30, 20, 30, 30, 30] {
            delivered += 100;
            assert!(!policy.observe(n, delivered));
        }
    }
}

//! Builds the node: the shared [`Hub`] state, the broker actor on its own thread, the actix
//! `App` with its routes and middleware (one origin policy for WebSocket, CORS and the
//! `/api` and `/auth` guard), and runs it until the shutdown sequence ends it.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix_cors::Cors;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, App, HttpResponse, HttpServer};
use serde_json::json;

use crate::auth::{self, Revocations};
use crate::broker::memory::{HistoryLimits, MemoryBroker};
use crate::broker::{BrokerHandle, BrokerHealth};
use crate::config::Settings;
use crate::limits::{ConnectionCaps, HandshakeLimiter, IpMatcher};
use crate::origin::{Day, OriginPolicy};
use crate::protocol::TopicPattern;
use crate::registry::Registry;
use crate::{handshake, http, metrics, shutdown, simulate};

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
    pub client_publish: Vec<TopicPattern>,
    /// Set by the shutdown sequence: readiness fails and new sockets are refused.
    pub draining: AtomicBool,
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
            caps: ConnectionCaps::in_memory(limits.max_connections_per_user, limits.cap_policy),
            handshakes: HandshakeLimiter::new(
                limits.handshakes_per_ip_per_s,
                limits.handshake_burst,
            ),
            origins,
            registry,
            broker,
            trusted_proxies,
            revocations: Revocations::default(),
            client_publish,
            draining: AtomicBool::new(false),
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
    server: actix_web::dev::Server,
    pub addrs: Vec<SocketAddr>,
    hub: web::Data<Hub>,
}

/// Build the node and bind its listener. Must run inside an actix `System`.
pub fn bind(settings: Settings) -> Result<Bound, StartError> {
    metrics::init();
    let registry = Arc::new(Registry::default());
    let health = Arc::new(BrokerHealth::default());
    let history = settings.history_enabled().then(|| HistoryLimits {
        max_len: settings.history.max_len,
        ttl: Duration::from_secs(settings.history.ttl_s),
    });
    // The broker gets a thread of its own so fan-out never stalls an HTTP worker.
    let broker_thread = Arbiter::new();
    let broker_registry = registry.clone();
    let broker_addr = MemoryBroker::start_in_arbiter(&broker_thread.handle(), move |_| {
        MemoryBroker::new(broker_registry, history)
    });
    let broker = BrokerHandle::of(&broker_addr, health);
    let hub = web::Data::new(Hub::new(settings, registry, broker)?);

    let workers = match hub.settings.server.workers {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    let app_hub = hub.clone();
    let server = HttpServer::new(move || {
        let hub = app_hub.clone();
        App::new()
            .app_data(hub.clone())
            .wrap(auth::cookie_session_middleware(&hub.settings.auth))
            .route("/", web::get().to(http::index))
            .route("/client.js", web::get().to(http::client_js))
            .route("/ws", web::get().to(handshake::websocket))
            .route("/healthz", web::get().to(http::healthz))
            .route("/readyz", web::get().to(http::readyz))
            .route("/metrics", web::get().to(http::metrics_text))
            .service(
                web::scope("/api")
                    .wrap(cors(hub.clone()))
                    .wrap(from_fn(origin_guard))
                    .route("/publish", web::post().to(http::publish)),
            )
            .service({
                let scope = web::scope("/auth")
                    .wrap(cors(hub.clone()))
                    .wrap(from_fn(origin_guard))
                    .route("/session", web::post().to(auth::exchange_token))
                    .route("/session", web::delete().to(auth::logout));
                if hub.settings.auth.dev_login {
                    scope.route("/dev-login", web::post().to(auth::dev_login))
                } else {
                    scope
                }
            })
    })
    .workers(workers)
    .disable_signals()
    // Sockets are closed by the drain before the server stops; this only bounds stragglers.
    .shutdown_timeout(1)
    .bind((hub.settings.server.bind.as_str(), hub.settings.server.port))
    .map_err(|e| {
        StartError(format!(
            "cannot listen on {}:{}: {e}",
            hub.settings.server.bind, hub.settings.server.port
        ))
    })?;
    let addrs = server.addrs();
    Ok(Bound {
        server: server.run(),
        addrs,
        hub,
    })
}

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
        let handle = self.server.handle();
        actix::spawn(async move {
            shutdown::signalled().await;
            shutdown::drain(hub, handle).await;
        });
        self.server.await
    }
}

//! Runs the hub: builds the [`Node`] from a loaded configuration, serves the HTTP routes
//! (behind the session middleware, whose store matches the node: the cookie itself when
//! embedded, Redis when clustered) and hands WebSocket upgrades to the handshake with the raw
//! connection, starts the node's background work (the call simulator, cap lease refresh,
//! the re-check of logged-out sessions), and runs until the one drain sequence ([`shutdown`]) ends it.

pub(crate) mod shutdown;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix_http::{HttpService, KeepAlive};
use actix_service::{fn_service, map_config};
use actix_session::storage::{CookieSessionStore, RedisSessionStore, SessionStore};
use actix_session::SessionMiddleware;
use actix_web::dev::AppConfig;
use actix_web::{web, App};

use crate::config::Loaded;
use crate::core::metrics;
use crate::demo;
use crate::http;
use crate::node::Node;
use crate::store::caps::refresh_leases;
use crate::store::sessions::session_cache_key;
use crate::transport::{handshake, sse};

/// A problem that stops start-up.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Node(Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot open the Redis session store: {0}")]
    SessionStore(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot listen on {bind}:{port}: {source}")]
    Listen {
        bind: String,
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {bind}:{port}: no address")]
    NoAddress { bind: String, port: u16 },
}

/// A bound, not yet running server: `main` learns the address before it runs.
pub struct Bound {
    server: actix_server::Server,
    pub(crate) addrs: Vec<SocketAddr>,
    node: web::Data<Node>,
}

/// Build the node and bind its listeners. Must run inside an actix `System`. In clustered
/// mode this waits until Redis answers.
pub async fn bind(loaded: Loaded) -> Result<Bound, StartError> {
    metrics::init();
    let redis_url = loaded.settings.redis.url.clone();
    let node = Node::start(loaded.settings, loaded.compiled)
        .await
        .map_err(|e| StartError::Node(e.into()))?;
    let node = web::Data::new(node);
    let key = node.cookie_key.clone();
    let auth = node.settings.auth.clone();
    let (server, addrs) = match (redis_url, node.sessions.cluster_store()) {
        // A Redis Cluster: actix-session's Redis store speaks to one Redis only.
        (None, Some(store)) => http_server(node.clone(), move || {
            http::auth::session_middleware(store.clone(), &auth, &key)
        })?,
        (None, None) => http_server(node.clone(), move || {
            http::auth::session_middleware(CookieSessionStore::default(), &auth, &key)
        })?,
        (Some(url), _) => {
            let store = RedisSessionStore::builder(url)
                .cache_keygen(session_cache_key)
                .build()
                .await
                .map_err(|e| StartError::SessionStore(e.into()))?;
            http_server(node.clone(), move || {
                http::auth::session_middleware(store.clone(), &auth, &key)
            })?
        }
    };
    Ok(Bound {
        server,
        addrs,
        node,
    })
}

/// The actix server with every route, over a session store of either kind.
fn http_server<S, F>(
    node: web::Data<Node>,
    session_middleware: F,
) -> Result<(actix_server::Server, Vec<SocketAddr>), StartError>
where
    S: SessionStore + 'static,
    F: Fn() -> SessionMiddleware<S> + Send + Clone + 'static,
{
    let workers = match node.settings.server.workers {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    let (bind, port) = (&node.settings.server.bind, node.settings.server.port);
    let listeners = listeners(bind, port)?;
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
        let node = node.clone();
        let session_middleware = session_middleware.clone();
        server = server
            .listen("switchboard", listener, move || {
                let app_node = node.clone();
                let app = App::new()
                    .app_data(app_node.clone())
                    .wrap(session_middleware())
                    .wrap(http::security_headers())
                    .configure(|cfg| http::routes(cfg, &app_node));
                let upgrade_node = node.clone().into_inner();
                let upgrades = fn_service(move |(req, framed)| {
                    handshake::upgrade(upgrade_node.clone(), req, framed)
                });
                HttpService::build()
                    .on_connect_ext(sse::Connection::remember)
                    .keep_alive(KeepAlive::Timeout(Duration::from_secs(5)))
                    .client_request_timeout(Duration::from_secs(5))
                    .upgrade(upgrades)
                    .finish(map_config(app, |_| AppConfig::default()))
                    .tcp()
            })
            .map_err(|source| StartError::Listen {
                bind: bind.clone(),
                port,
                source,
            })?;
    }
    Ok((server.run(), addrs))
}

/// Listen on every address `bind` resolves to, with a backlog that absorbs a reconnect wave
/// (the kernel default of 128 drops SYNs when thousands of clients come back at once).
fn listeners(bind: &str, port: u16) -> Result<Vec<std::net::TcpListener>, StartError> {
    use std::net::ToSocketAddrs;
    let cannot = |source: std::io::Error| StartError::Listen {
        bind: bind.to_string(),
        port,
        source,
    };
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
        return Err(StartError::NoAddress {
            bind: bind.to_string(),
            port,
        });
    }
    Ok(listeners)
}

impl Bound {
    /// Serve until SIGTERM/SIGINT and the drain that follows.
    pub async fn run(self) -> std::io::Result<()> {
        for addr in &self.addrs {
            log::info!("listening on http://{addr}");
        }
        let node: Arc<Node> = self.node.clone().into_inner();
        let settings = &node.settings;
        log::info!(
            "mode: {}; origins: [{}]{}; dev login {}",
            if settings.clustered() {
                "clustered"
            } else {
                "embedded"
            },
            node.origins.allowlist().join(", "),
            if settings.origins.allow_localhost {
                " + localhost"
            } else {
                ""
            },
            if settings.auth.dev_login { "on" } else { "off" },
        );
        if settings.demo.simulate_calls {
            actix::spawn(demo::run::run_in_hub(node.broker.clone()));
        }
        if let Some(caps) = node.caps.redis_store() {
            let registry = node.registry.clone();
            actix::spawn(refresh_leases(caps, move || registry.cap_slots()));
        }
        actix::spawn(http::auth::recheck_sessions(node.clone()));
        let handle = self.server.handle();
        actix::spawn(async move {
            shutdown::signalled().await;
            shutdown::drain(node, handle).await;
        });
        self.server.await
    }
}

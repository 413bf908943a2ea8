//! The HTTP routes: publishing ([`publish`]), login and logout ([`auth`]), health, metrics
//! and the static pages ([`status`]), with one origin policy behind CORS and the guard of
//! `/api` and `/auth` (the same policy the WebSocket handshake applies: one allowlist, never
//! two). The streaming endpoints `/ws` and `/sse` belong to [`crate::transport`]. Every
//! answer carries [`security_headers`].

pub(crate) mod auth;
pub(crate) mod publish;
pub(crate) mod status;

use actix_cors::Cors;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::{from_fn, DefaultHeaders, Next};
use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::node::Node;
use crate::policy::origin::Day;
use crate::transport;

/// Every route of the App. WebSocket upgrades never get here (the server hands them to the
/// handshake with the raw connection); `/ws` answers only requests that lack the upgrade.
pub(crate) fn routes(cfg: &mut web::ServiceConfig, node: &web::Data<Node>) {
    cfg.route("/", web::get().to(status::index))
        .route("/voice-test", web::get().to(status::voice_test))
        .route("/client.js", web::get().to(status::client_js))
        .route("/client.mjs", web::get().to(status::client_mjs))
        .route("/client.d.ts", web::get().to(status::client_dts))
        .route(
            "/ws",
            web::get().to(transport::handshake::websocket_without_upgrade),
        )
        .route("/sse", web::get().to(transport::sse::stream))
        .route("/healthz", web::get().to(status::healthz))
        .route("/readyz", web::get().to(status::readyz))
        .route("/metrics", web::get().to(status::metrics_text))
        .service(
            web::scope("/api")
                .wrap(cors(node.clone()))
                .wrap(from_fn(origin_guard))
                .route("/publish", web::post().to(publish::publish)),
        );
    let auth_scope = web::scope("/auth")
        .wrap(cors(node.clone()))
        .wrap(from_fn(origin_guard))
        .route("/session", web::post().to(auth::exchange_token))
        .route("/session", web::delete().to(auth::logout));
    cfg.service(if node.settings.auth.dev_login {
        auth_scope.route("/dev-login", web::post().to(auth::dev_login))
    } else {
        auth_scope
    });
}

/// The headers every HTTP answer carries unless its route sets its own: no MIME sniffing
/// (a JSON error echoing input is never run as script or HTML), never framed by another site,
/// and a policy under which nothing in the answer runs or loads. The dashboard page replaces
/// the policy with its own ([`status::DASHBOARD_CSP`]).
pub(crate) fn security_headers() -> DefaultHeaders {
    DefaultHeaders::new()
        .add((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .add((header::X_FRAME_OPTIONS, "DENY"))
        .add((
            header::CONTENT_SECURITY_POLICY,
            transport::handshake::NOTHING_RUNS_CSP,
        ))
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
    if let (Some(origin), Some(node)) = (origin, req.app_data::<web::Data<Node>>()) {
        if !node.origins.check(Some(&origin), Day::today()).is_allowed() {
            log::warn!(
                "{} {} refused: origin not allowed: {origin}; allowlist: [{}]",
                req.method(),
                req.path(),
                node.origins.allowlist().join(", ")
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
fn cors(node: web::Data<Node>) -> Cors {
    Cors::default()
        .allowed_origin_fn(move |origin, _| {
            origin
                .to_str()
                .is_ok_and(|o| node.origins.check(Some(o), Day::today()).is_allowed())
        })
        .allowed_methods(["GET", "POST", "DELETE"])
        .allowed_headers([header::AUTHORIZATION, header::CONTENT_TYPE, header::ACCEPT])
        .supports_credentials()
        .max_age(600)
}

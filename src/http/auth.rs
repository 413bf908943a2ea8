//! Login and logout over HTTP: the session middleware (actix-session: a signed and
//! encrypted cookie, naming a Redis session when clustered), the JWT exchange
//! `POST /auth/session`, logout `DELETE /auth/session` (which revokes the session and closes
//! its sockets on every pod), and the development login. Reading a session back into an
//! identity is the transport's ([`crate::transport::identity`]).

use actix_session::config::{CookieContentSecurity, PersistentSession};
use actix_session::storage::SessionStore;
use actix_session::{Session, SessionMiddleware};
use actix_web::cookie::{Key, SameSite};
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use crate::config::{AuthConfig, SameSitePolicy};
use crate::core::close::{AuthFailure, Close};
use crate::core::ids::{now_s, InvalidId, OrgId, UserId};
use crate::node::Node;
use crate::store::sessions::{KEY_EXP, KEY_LOGGED_OUT, KEY_ORG, KEY_SID, KEY_USER};
use crate::transport::identity::identify;

/// The session middleware over any store (the cookie itself, or Redis when clustered).
pub(crate) fn session_middleware<S: SessionStore>(
    store: S,
    auth: &AuthConfig,
    key: &Key,
) -> SessionMiddleware<S> {
    SessionMiddleware::builder(store, key.clone())
        .cookie_name(auth.cookie_name.clone())
        .cookie_http_only(true)
        .cookie_secure(auth.cookie_secure)
        .cookie_same_site(same_site(auth.cookie_same_site))
        .cookie_content_security(CookieContentSecurity::Private)
        .session_lifecycle(PersistentSession::default().session_ttl(
            actix_web::cookie::time::Duration::seconds(auth.session_ttl_s as i64),
        ))
        .build()
}

fn same_site(policy: SameSitePolicy) -> SameSite {
    match policy {
        SameSitePolicy::Lax => SameSite::Lax,
        SameSitePolicy::Strict => SameSite::Strict,
        SameSitePolicy::None => SameSite::None,
    }
}

fn start_session(node: &Node, session: &Session, user: &UserId, org: &OrgId) -> HttpResponse {
    let sid = format!("{:032x}", rand::random::<u128>());
    let exp = now_s() + node.settings.auth.session_ttl_s;
    // A fresh key and fresh state: nothing of an earlier login (or its logout) carries over.
    session.clear();
    session.renew();
    let stored = session
        .insert(KEY_USER, user.as_str())
        .and_then(|_| session.insert(KEY_ORG, org.as_str()))
        .and_then(|_| session.insert(KEY_SID, &sid))
        .and_then(|_| session.insert(KEY_EXP, exp));
    match stored {
        Ok(()) => {
            log::info!("session started for user {user} of org {org}");
            HttpResponse::NoContent().finish()
        }
        Err(e) => {
            log::error!("cannot store session for user {user}: {e}");
            HttpResponse::InternalServerError()
                .json(json!({"error":"internal","message":"cannot store session"}))
        }
    }
}

#[derive(Deserialize)]
struct TokenBody {
    token: String,
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<serde_json::Value>,
    org: Option<serde_json::Value>,
}

/// Why a token is refused; the text is the `reason` given to the caller.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TokenRefused {
    #[error("token expired")]
    Expired,
    #[error("bad signature")]
    BadSignature,
    #[error("missing claim: {0}")]
    MissingClaim(String),
    #[error("bad algorithm: only HS256 is accepted")]
    BadAlgorithm,
    #[error("malformed token")]
    Malformed(#[source] jsonwebtoken::errors::Error),
    #[error("bad claim: {claim} must be a string")]
    NotText { claim: &'static str },
    #[error("bad claim: {claim}: {source}")]
    BadClaim {
        claim: &'static str,
        source: InvalidId,
    },
}

/// Identity providers send ids as strings or numbers; both mean the same id.
fn claim_text(
    value: Option<serde_json::Value>,
    claim: &'static str,
) -> Result<String, TokenRefused> {
    match value {
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
        Some(_) => Err(TokenRefused::NotText { claim }),
        None => Err(TokenRefused::MissingClaim(claim.to_string())),
    }
}

/// Verify an HS256 token.
pub(crate) fn verify_jwt(token: &str, secret: &str) -> Result<(UserId, OrgId), TokenRefused> {
    use jsonwebtoken::errors::ErrorKind;
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.leeway = 5;
    validation.set_required_spec_claims(&["exp"]);
    let data = jsonwebtoken::decode::<Claims>(
        token,
        &jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()),
        &validation,
    )
    .map_err(|e| match e.kind() {
        ErrorKind::ExpiredSignature => TokenRefused::Expired,
        ErrorKind::InvalidSignature => TokenRefused::BadSignature,
        ErrorKind::MissingRequiredClaim(claim) => TokenRefused::MissingClaim(claim.clone()),
        ErrorKind::InvalidAlgorithm => TokenRefused::BadAlgorithm,
        _ => TokenRefused::Malformed(e),
    })?;
    let sub = claim_text(data.claims.sub, "sub")?;
    let org = claim_text(data.claims.org, "org")?;
    let user = UserId::parse(&sub).map_err(|source| TokenRefused::BadClaim {
        claim: "sub",
        source,
    })?;
    let org = OrgId::parse(&org).map_err(|source| TokenRefused::BadClaim {
        claim: "org",
        source,
    })?;
    Ok((user, org))
}

/// `POST /auth/session`: exchange a signed token for the session cookie.
pub(crate) async fn exchange_token(
    node: web::Data<Node>,
    session: Session,
    body: web::Bytes,
) -> HttpResponse {
    let Some(secret) = node.settings.auth.jwt_secret.as_deref() else {
        return HttpResponse::NotFound().json(
            json!({"error":"not_configured","message":"auth.jwt_secret is not set on this server"}),
        );
    };
    let token = match serde_json::from_slice::<TokenBody>(&body) {
        Ok(b) => b.token,
        Err(e) => {
            return HttpResponse::BadRequest().json(
                json!({"error":"bad_request","field":"token","message":format!("body must be {{\"token\":\"<JWT>\"}}: {e}")}),
            )
        }
    };
    match verify_jwt(&token, secret) {
        Ok((user, org)) => start_session(&node, &session, &user, &org),
        Err(reason) => {
            log::warn!("token exchange refused: {reason}");
            HttpResponse::Unauthorized()
                .json(json!({"error":"invalid_token","reason":reason.to_string()}))
        }
    }
}

#[derive(Deserialize)]
struct DevLoginBody {
    user: String,
    org: serde_json::Value,
}

/// `POST /auth/dev-login`: log in as anyone. Only routed when `auth.dev_login = true`.
pub(crate) async fn dev_login(
    node: web::Data<Node>,
    session: Session,
    body: web::Bytes,
) -> HttpResponse {
    let parsed = match serde_json::from_slice::<DevLoginBody>(&body) {
        Ok(b) => b,
        Err(e) => {
            return HttpResponse::BadRequest().json(
                json!({"error":"bad_request","field":"body","message":format!("body must be {{\"user\":\"u1\",\"org\":\"42\"}}: {e}")}),
            )
        }
    };
    let user = match UserId::parse(&parsed.user) {
        Ok(u) => u,
        Err(e) => {
            return HttpResponse::BadRequest()
                .json(json!({"error":"bad_request","field":"user","message":e.to_string()}))
        }
    };
    let org_text = match parsed.org {
        serde_json::Value::String(s) => s,
        serde_json::Value::Number(n) => n.to_string(),
        _ => String::new(),
    };
    let org = match OrgId::parse(&org_text) {
        Ok(o) => o,
        Err(e) => {
            return HttpResponse::BadRequest()
                .json(json!({"error":"bad_request","field":"org","message":e.to_string()}))
        }
    };
    start_session(&node, &session, &user, &org)
}

/// `DELETE /auth/session`: end the session and close its sockets everywhere.
pub(crate) async fn logout(
    node: web::Data<Node>,
    req: HttpRequest,
    session: Session,
) -> HttpResponse {
    if let Ok(identity) = identify(&node, &req, &session).await {
        node.revocations.revoke(&identity.sid, identity.exp).await;
        let closed = node.registry.close_session(
            &identity.sid,
            Close::Unauthenticated(AuthFailure::LoggedOut),
        );
        if let Some(control) = &node.control {
            if let Err(e) = control.broadcast_logout(&identity.sid).await {
                log::warn!("cannot tell other pods about the logout: {e}");
            }
        }
        log::info!(
            "user {} of org {} logged out; closed {closed} socket(s) here",
            identity.user,
            identity.org
        );
        session.clear();
        if session.insert(KEY_LOGGED_OUT, true).is_ok() {
            return HttpResponse::NoContent().finish();
        }
    }
    session.purge();
    HttpResponse::NoContent().finish()
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    fn token(claims: serde_json::Value, secret: &str) -> String {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    /// A good token yields its user and org; numeric orgs are accepted as text.
    #[test]
    fn good_token() {
        let t = token(
            json!({"sub":"u1","org":42,"exp":now_s()+60}),
            "s3cret-s3cret-s3cret",
        );
        let (user, org) = verify_jwt(&t, "s3cret-s3cret-s3cret").unwrap();
        assert_eq!((user.as_str(), org.as_str()), ("u1", "42"));
    }

    /// Each kind of bad token gets its own reason.
    #[test]
    fn bad_tokens() {
        let secret = "s3cret-s3cret-s3cret";
        let expired = token(json!({"sub":"u1","org":"1","exp":now_s()-600}), secret);
        assert_eq!(
            verify_jwt(&expired, secret).unwrap_err().to_string(),
            "token expired"
        );
        let other = token(
            json!({"sub":"u1","org":"1","exp":now_s()+60}),
            "another-secret-entirely",
        );
        assert_eq!(
            verify_jwt(&other, secret).unwrap_err().to_string(),
            "bad signature"
        );
        let no_org = token(json!({"sub":"u1","exp":now_s()+60}), secret);
        assert_eq!(
            verify_jwt(&no_org, secret).unwrap_err().to_string(),
            "missing claim: org"
        );
        let no_exp = token(json!({"sub":"u1","org":"1"}), secret);
        assert_eq!(
            verify_jwt(&no_exp, secret).unwrap_err().to_string(),
            "missing claim: exp"
        );
        let bad_org = token(json!({"sub":"u1","org":"a:b","exp":now_s()+60}), secret);
        assert!(verify_jwt(&bad_org, secret)
            .unwrap_err()
            .to_string()
            .starts_with("bad claim: org"));
        assert_eq!(
            verify_jwt("garbage", secret).unwrap_err().to_string(),
            "malformed token"
        );
    }
}

//! Who a request belongs to. Owns the session cookie (actix-session: a signed and encrypted
//! cookie when embedded), the JWT exchange `POST /auth/session`, logout `DELETE /auth/session`
//! (which also closes that session's sockets), the development login, and the revocation
//! list that makes a logged-out cookie useless even if it was copied. The WebSocket and SSE
//! handshakes read the [`Identity`] through [`identify`].

use std::collections::HashMap;

use actix_session::config::{CookieContentSecurity, PersistentSession};
use actix_session::storage::{
    CookieSessionStore, LoadError, RedisSessionStore, SessionKey, SessionStore,
};
use actix_session::{Session, SessionMiddleware};
use actix_web::cookie::{Cookie, CookieJar, Key, SameSite};
use actix_web::{web, HttpRequest, HttpResponse};
use base64::Engine;
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::json;

use crate::broker::redis::RedisCommands;
use crate::close::{AuthFailure, Close};
use crate::config::{AuthConfig, SameSitePolicy};
use crate::protocol::{OrgId, UserId};
use crate::server::Hub;

/// The authenticated owner of a request.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user: UserId,
    pub org: OrgId,
    /// The login session id (one per login, shared by that login's sockets).
    pub sid: String,
    /// Unix seconds after which the session is over.
    pub exp: u64,
}

impl Identity {
    /// `org/user`: users of different orgs are different people.
    pub fn user_key(&self) -> String {
        format!("{}/{}", self.org, self.user)
    }
}

const KEY_USER: &str = "user";
const KEY_ORG: &str = "org";
const KEY_SID: &str = "sid";
const KEY_EXP: &str = "exp";
/// Set by logout in place of the identity: a replayed cookie is then refused as `logged out`
/// rather than `invalid session`, whichever store holds it (Redis drops purged state, so
/// purging would leave nothing to tell the two apart).
const KEY_LOGGED_OUT: &str = "logged_out";

/// Decode `auth.cookie_key`: base64 of at least 64 bytes.
pub fn decode_cookie_key(raw: &str) -> Result<Vec<u8>, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(raw.trim())
        .map_err(|_| "is not valid base64".to_string())?;
    if bytes.len() < 64 {
        return Err(format!(
            "decodes to {} bytes; at least 64 are needed",
            bytes.len()
        ));
    }
    Ok(bytes)
}

/// The key that signs and encrypts the session cookie. Validation refused bad keys already;
/// unset means a fresh key per process (sessions end on restart; fine for development).
pub fn cookie_key(auth: &AuthConfig) -> Key {
    match auth.cookie_key.as_deref().map(decode_cookie_key) {
        Some(Ok(bytes)) => Key::from(&bytes),
        _ => Key::generate(),
    }
}

/// The session middleware for the embedded (cookie) store.
pub fn cookie_session_middleware(
    auth: &AuthConfig,
    key: &Key,
) -> SessionMiddleware<CookieSessionStore> {
    session_middleware(CookieSessionStore::default(), auth, key)
}

/// The session middleware over any store (the cookie itself, or Redis when clustered).
pub fn session_middleware<S: SessionStore>(
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

/// Logged-out session ids, remembered until the session would have expired anyway: in
/// process when embedded, in Redis (`sb:revoked:{sid}`) when clustered so every pod knows.
pub enum Revocations {
    Memory(Mutex<HashMap<String, u64>>),
    Redis(RedisCommands),
}

impl Revocations {
    pub async fn revoke(&self, sid: &str, exp: u64) {
        let now = now_s();
        match self {
            Self::Memory(revoked) => {
                let mut revoked = revoked.lock();
                revoked.retain(|_, until| *until > now);
                revoked.insert(sid.to_string(), exp);
            }
            Self::Redis(redis) => {
                if let Err(e) = redis.revoke(sid, exp.saturating_sub(now)).await {
                    log::warn!("cannot record logout of session in Redis: {e}");
                }
            }
        }
    }

    /// Whether `sid` logged out. Fails closed: an unreachable store counts as revoked.
    pub async fn is_revoked(&self, sid: &str) -> bool {
        match self {
            Self::Memory(revoked) => revoked.lock().contains_key(sid),
            Self::Redis(redis) => redis.is_revoked(sid).await.unwrap_or_else(|e| {
                log::warn!("cannot check session revocation in Redis: {e}");
                true
            }),
        }
    }
}

pub fn now_s() -> u64 {
    crate::protocol::unix_ms() / 1000
}

/// A login session's stored state as actix-session keeps it: JSON values by key.
pub type SessionState = HashMap<String, String>;

/// Where the session middleware keeps login sessions. The WebSocket handshake, which runs
/// before (and without) the middleware, reads them itself in [`load_session`].
#[derive(Clone)]
pub enum SessionBackend {
    /// Embedded: the signed and encrypted cookie is the session.
    Cookie,
    /// Clustered: the cookie names a session in Redis, so every pod can read it.
    Redis(RedisSessionStore),
}

/// Why a session could not be read at all (as opposed to read and found unusable).
#[derive(Debug)]
pub enum SessionReadError {
    /// No session cookie in the request.
    NoCookie,
    /// The store did not answer (Redis away): retryable.
    StoreUnavailable(String),
}

/// Load the session named by the `Cookie` headers, exactly as the session middleware would:
/// the cookie is decrypted with `auth.cookie_key`, and its content is the session key that the
/// store resolves. A cookie that fails decryption, or names nothing, is an empty state.
pub async fn load_session(
    hub: &Hub,
    cookie_headers: impl Iterator<Item = &[u8]>,
) -> Result<SessionState, SessionReadError> {
    let name = hub.settings.auth.cookie_name.as_str();
    // Parsed as actix-web parses cookies: percent-decoded, as the middleware set them. A
    // cookie of ours that does not even decode (tampered) is there, and invalid.
    let raw = cookie_headers
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|header| header.split(';'))
        .map(str::trim)
        .find(|pair| {
            pair.split_once('=')
                .is_some_and(|(n, v)| n == name && !v.is_empty())
        })
        .ok_or(SessionReadError::NoCookie)?;
    let Ok(cookie) = Cookie::parse_encoded(raw.to_string()) else {
        return Ok(SessionState::new());
    };
    let mut jar = CookieJar::new();
    jar.add_original(cookie);
    let Some(key) = jar
        .private(&hub.cookie_key)
        .get(name)
        .and_then(|c| SessionKey::try_from(c.value().to_string()).ok())
    else {
        return Ok(SessionState::new());
    };
    let Some(redis) = &hub.redis else {
        return match CookieSessionStore::default().load(&key).await {
            Ok(state) => Ok(state.unwrap_or_default()),
            Err(LoadError::Deserialization(_)) => Ok(SessionState::new()),
            Err(LoadError::Other(e)) => Err(SessionReadError::StoreUnavailable(e.to_string())),
        };
    };
    // Clustered: the session lives in Redis (the key actix-session's store writes), read over
    // this worker's own connection rather than the store's shared one.
    redis
        .load_session(key.as_ref())
        .await
        .map(Option::unwrap_or_default)
        .map_err(SessionReadError::StoreUnavailable)
}

/// The identity in a session's state, telling apart every way it can be unusable.
pub async fn identify_state(hub: &Hub, state: &SessionState) -> Result<Identity, AuthFailure> {
    let get = |key: &str| state.get(key).map(String::as_str);
    if get(KEY_LOGGED_OUT) == Some("true") {
        return Err(AuthFailure::LoggedOut);
    }
    let text = |key: &str| get(key).and_then(|v| serde_json::from_str::<String>(v).ok());
    let read = || -> Option<Identity> {
        Some(Identity {
            user: UserId::parse(&text(KEY_USER)?).ok()?,
            org: OrgId::parse(&text(KEY_ORG)?).ok()?,
            sid: text(KEY_SID)?,
            exp: serde_json::from_str(get(KEY_EXP)?).ok()?,
        })
    };
    let identity = read().ok_or(AuthFailure::Invalid)?;
    if identity.exp <= now_s() {
        return Err(AuthFailure::Expired);
    }
    if hub.revocations.is_revoked(&identity.sid).await {
        return Err(AuthFailure::LoggedOut);
    }
    Ok(identity)
}

/// The identity of a request that went through the session middleware.
pub async fn identify(
    hub: &Hub,
    req: &HttpRequest,
    session: &Session,
) -> Result<Identity, AuthFailure> {
    if req.cookie(&hub.settings.auth.cookie_name).is_none() {
        return Err(AuthFailure::NoCookie);
    }
    // A cookie that fails decryption or verification reaches us as an empty session.
    let state = session.entries().clone();
    identify_state(hub, &state).await
}

fn start_session(hub: &Hub, session: &Session, user: &UserId, org: &OrgId) -> HttpResponse {
    let sid = format!("{:032x}", rand::random::<u128>());
    let exp = now_s() + hub.settings.auth.session_ttl_s;
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

/// Identity providers send ids as strings or numbers; both mean the same id.
fn claim_text(value: serde_json::Value, name: &str) -> Result<String, String> {
    match value {
        serde_json::Value::String(s) => Ok(s),
        serde_json::Value::Number(n) => Ok(n.to_string()),
        _ => Err(format!("bad claim: {name} must be a string")),
    }
}

/// Verify an HS256 token; `Err` is the reason given to the caller.
pub fn verify_jwt(token: &str, secret: &str) -> Result<(UserId, OrgId), String> {
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
        ErrorKind::ExpiredSignature => "token expired".to_string(),
        ErrorKind::InvalidSignature => "bad signature".to_string(),
        ErrorKind::MissingRequiredClaim(claim) => format!("missing claim: {claim}"),
        ErrorKind::InvalidAlgorithm => "bad algorithm: only HS256 is accepted".to_string(),
        _ => "malformed token".to_string(),
    })?;
    let sub = claim_text(data.claims.sub.ok_or("missing claim: sub")?, "sub")?;
    let org = claim_text(data.claims.org.ok_or("missing claim: org")?, "org")?;
    let user = UserId::parse(&sub).map_err(|e| format!("bad claim: sub: {e}"))?;
    let org = OrgId::parse(&org).map_err(|e| format!("bad claim: org: {e}"))?;
    Ok((user, org))
}

/// `POST /auth/session`: exchange a signed token for the session cookie.
pub async fn exchange_token(
    hub: web::Data<Hub>,
    session: Session,
    body: web::Bytes,
) -> HttpResponse {
    let Some(secret) = hub.settings.auth.jwt_secret.as_deref() else {
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
        Ok((user, org)) => start_session(&hub, &session, &user, &org),
        Err(reason) => {
            log::warn!("token exchange refused: {reason}");
            HttpResponse::Unauthorized().json(json!({"error":"invalid_token","reason":reason}))
        }
    }
}

#[derive(Deserialize)]
struct DevLoginBody {
    user: String,
    org: serde_json::Value,
}

/// `POST /auth/dev-login`: log in as anyone. Only routed when `auth.dev_login = true`.
pub async fn dev_login(hub: web::Data<Hub>, session: Session, body: web::Bytes) -> HttpResponse {
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
                .json(json!({"error":"bad_request","field":"user","message":e}))
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
                .json(json!({"error":"bad_request","field":"org","message":e}))
        }
    };
    start_session(&hub, &session, &user, &org)
}

/// `DELETE /auth/session`: end the session and close its sockets everywhere.
pub async fn logout(hub: web::Data<Hub>, req: HttpRequest, session: Session) -> HttpResponse {
    if let Ok(identity) = identify(&hub, &req, &session).await {
        hub.revocations.revoke(&identity.sid, identity.exp).await;
        let closed = hub.registry.close_session(
            &identity.sid,
            Close::Unauthenticated(AuthFailure::LoggedOut),
        );
        if let Some(redis) = &hub.redis {
            if let Err(e) = redis.broadcast_logout(&identity.sid).await {
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
        assert_eq!(verify_jwt(&expired, secret).unwrap_err(), "token expired");
        let other = token(
            json!({"sub":"u1","org":"1","exp":now_s()+60}),
            "another-secret-entirely",
        );
        assert_eq!(verify_jwt(&other, secret).unwrap_err(), "bad signature");
        let no_org = token(json!({"sub":"u1","exp":now_s()+60}), secret);
        assert_eq!(
            verify_jwt(&no_org, secret).unwrap_err(),
            "missing claim: org"
        );
        let no_exp = token(json!({"sub":"u1","org":"1"}), secret);
        assert_eq!(
            verify_jwt(&no_exp, secret).unwrap_err(),
            "missing claim: exp"
        );
        let bad_org = token(json!({"sub":"u1","org":"a:b","exp":now_s()+60}), secret);
        assert!(verify_jwt(&bad_org, secret)
            .unwrap_err()
            .starts_with("bad claim: org"));
        assert_eq!(
            verify_jwt("garbage", secret).unwrap_err(),
            "malformed token"
        );
    }

    /// Cookie keys must be base64 of 64 bytes or more.
    #[test]
    fn cookie_keys() {
        let good = base64::engine::general_purpose::STANDARD.encode([7u8; 64]);
        assert!(decode_cookie_key(&good).is_ok());
        let short = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert!(decode_cookie_key(&short).unwrap_err().contains("32 bytes"));
        assert!(decode_cookie_key("%%%").is_err());
    }
}

//! Login and logout over HTTP: the session middleware (actix-session: a signed and
//! encrypted cookie, naming a Redis session when clustered), the JWT exchange
//! `POST /auth/session` (HS256 only, through a crypto provider of its own), logout
//! `DELETE /auth/session` (which revokes the session and closes its sockets on every pod),
//! the periodic re-check that catches a logout a pod did not hear, and the development login.
//! Reading a session back into an identity is the transport's
//! ([`crate::transport::identity`]).

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
use crate::store::sessions::{KEY_BOOT, KEY_EXP, KEY_LOGGED_OUT, KEY_ORG, KEY_SID, KEY_USER};
use crate::transport::identity::{identify, session_id};

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
        .and_then(|_| session.insert(KEY_EXP, exp))
        .and_then(|_| match node.revocations.boot() {
            Some(boot) => session.insert(KEY_BOOT, boot),
            None => Ok(()),
        });
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

/// What a token must satisfy besides its signature: `auth.jwt_secret` and, when set,
/// `auth.jwt_issuer` and `auth.jwt_audience`.
pub(crate) struct TokenRules<'a> {
    pub(crate) secret: &'a str,
    pub(crate) issuer: Option<&'a str>,
    pub(crate) audience: Option<&'a str>,
}

/// HS256, the only algorithm the hub accepts, as jsonwebtoken's crypto provider: its own
/// backends bring RSA and elliptic-curve crates along (see Cargo.toml). Any other
/// algorithm is refused before a key is even looked at.
mod hs256 {
    use hmac::{Hmac, Mac};
    use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
    use jsonwebtoken::errors::{Error, ErrorKind};
    use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
    use sha2::Sha256;

    type HmacSha256 = Hmac<Sha256>;

    pub(super) struct Hs256(HmacSha256);

    impl signature::Signer<Vec<u8>> for Hs256 {
        fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
            let mut mac = self.0.clone();
            mac.update(msg);
            Ok(mac.finalize().into_bytes().to_vec())
        }
    }

    impl signature::Verifier<Vec<u8>> for Hs256 {
        fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> Result<(), signature::Error> {
            let mut mac = self.0.clone();
            mac.update(msg);
            // `verify_slice` compares in constant time.
            mac.verify_slice(signature)
                .map_err(signature::Error::from_source)
        }
    }

    impl JwtSigner for Hs256 {
        fn algorithm(&self) -> Algorithm {
            Algorithm::HS256
        }
    }

    impl JwtVerifier for Hs256 {
        fn algorithm(&self) -> Algorithm {
            Algorithm::HS256
        }
    }

    fn mac(algorithm: &Algorithm, key: &[u8]) -> Result<Hs256, Error> {
        if *algorithm != Algorithm::HS256 {
            return Err(ErrorKind::InvalidAlgorithm.into());
        }
        HmacSha256::new_from_slice(key)
            .map(Hs256)
            .map_err(|_| ErrorKind::InvalidKeyFormat.into())
    }

    static PROVIDER: CryptoProvider = CryptoProvider {
        signer_factory: |algorithm, key: &EncodingKey| {
            Ok(Box::new(mac(algorithm, key.as_bytes())?))
        },
        verifier_factory: |algorithm, key: &DecodingKey| {
            Ok(Box::new(mac(algorithm, key.try_get_as_bytes()?)?))
        },
        key_utils: KeyUtils::new_unimplemented(),
    };

    /// Make HS256 jsonwebtoken's provider for this process; later calls change nothing.
    pub(super) fn install() {
        // Err only means it is installed already (by an earlier call).
        let _ = PROVIDER.install_default();
    }
}

/// Sign an HS256 token with `secret`: for a service that shares `auth.jwt_secret` with the
/// hub and logs in through `POST /auth/session` like any user (`switchboard voice-echo`).
pub(crate) fn sign_jwt(
    claims: &serde_json::Value,
    secret: &str,
) -> Result<String, jsonwebtoken::errors::Error> {
    hs256::install();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
}

/// Why a token is refused; the text is the `reason` given to the caller.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TokenRefused {
    #[error("token expired")]
    Expired,
    #[error("token not yet valid (nbf)")]
    NotYetValid,
    #[error("wrong issuer (iss)")]
    WrongIssuer,
    #[error("wrong audience (aud)")]
    WrongAudience,
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

/// Verify an HS256 token: signature, `exp` (required), `nbf` (when present), and the
/// issuer and audience when the rules name them.
pub(crate) fn verify_jwt(token: &str, rules: &TokenRules) -> Result<(UserId, OrgId), TokenRefused> {
    use jsonwebtoken::errors::ErrorKind;
    hs256::install();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.leeway = 5;
    validation.validate_nbf = true;
    let mut required = vec!["exp"];
    if let Some(issuer) = rules.issuer {
        validation.set_issuer(&[issuer]);
        required.push("iss");
    }
    match rules.audience {
        Some(audience) => {
            validation.set_audience(&[audience]);
            required.push("aud");
        }
        // Without a configured audience a token's `aud` cannot be checked against anything.
        None => validation.validate_aud = false,
    }
    validation.set_required_spec_claims(&required);
    let data = jsonwebtoken::decode::<Claims>(
        token,
        &jsonwebtoken::DecodingKey::from_secret(rules.secret.as_bytes()),
        &validation,
    )
    .map_err(|e| match e.kind() {
        ErrorKind::ExpiredSignature => TokenRefused::Expired,
        ErrorKind::ImmatureSignature => TokenRefused::NotYetValid,
        ErrorKind::InvalidSignature => TokenRefused::BadSignature,
        ErrorKind::MissingRequiredClaim(claim) => TokenRefused::MissingClaim(claim.clone()),
        ErrorKind::InvalidAlgorithm => TokenRefused::BadAlgorithm,
        ErrorKind::InvalidIssuer => TokenRefused::WrongIssuer,
        ErrorKind::InvalidAudience => TokenRefused::WrongAudience,
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
    let auth = &node.settings.auth;
    let Some(secret) = auth.jwt_secret.as_deref() else {
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
    let rules = TokenRules {
        secret,
        issuer: auth.jwt_issuer.as_deref(),
        audience: auth.jwt_audience.as_deref(),
    };
    match verify_jwt(&token, &rules) {
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

/// `DELETE /auth/session`: end the session and close its sockets everywhere. The session is
/// revoked by its id whatever state it is in (expired, or unverifiable while Redis is away):
/// sockets opened before it expired must close too.
pub(crate) async fn logout(
    node: web::Data<Node>,
    req: HttpRequest,
    session: Session,
) -> HttpResponse {
    let state = session.entries().clone();
    // `identify` only names who it was for the log; the id is what is revoked.
    let who = identify(&node, &req, &session).await.ok();
    if let Some((sid, exp)) = session_id(&state) {
        node.revocations.revoke(&sid, exp).await;
        let closed = node
            .registry
            .close_session(&sid, Close::Unauthenticated(AuthFailure::LoggedOut));
        if let Some(control) = &node.control {
            if let Err(e) = control.broadcast_logout(&sid).await {
                log::warn!("cannot tell other pods about the logout: {e}");
            }
        }
        match who {
            Some(identity) => log::info!(
                "user {} of org {} logged out; closed {closed} socket(s) here",
                identity.user,
                identity.org
            ),
            None => log::info!("an ended session logged out; closed {closed} socket(s) here"),
        }
        session.clear();
        if session.insert(KEY_LOGGED_OUT, true).is_ok() {
            return HttpResponse::NoContent().finish();
        }
    }
    session.purge();
    HttpResponse::NoContent().finish()
}

/// Every `auth.revocation_check_s`, close the local sockets whose session expired, and those
/// of sessions that logged out meanwhile: a pod whose subscriber was reconnecting when the
/// logout was broadcast never heard it. One sweep for the node, rather than a timer per
/// socket: a socket outlives its session by at most the period. An unreachable store skips
/// the logout check of a round (closing every socket over a Redis blip would be worse than a
/// late close).
pub(crate) async fn recheck_sessions(node: std::sync::Arc<Node>) {
    let period = std::time::Duration::from_secs(node.settings.auth.revocation_check_s);
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let expired = node.registry.close_expired(now_s());
        if expired > 0 {
            log::info!("closed {expired} socket(s) whose session expired");
        }
        let sids = node.registry.session_ids();
        if sids.is_empty() {
            continue;
        }
        match node.revocations.revoked_among(&sids).await {
            Ok(revoked) => {
                for sid in revoked {
                    let closed = node
                        .registry
                        .close_session(&sid, Close::Unauthenticated(AuthFailure::LoggedOut));
                    log::info!("closed {closed} socket(s) of a session that logged out");
                }
            }
            Err(e) => log::warn!("cannot re-check logged-out sessions: {e}"),
        }
    }
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "s3cret-s3cret-s3cret-s3cret-s3cret";

    fn token(claims: serde_json::Value, secret: &str) -> String {
        hs256::install();
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn rules(secret: &str) -> TokenRules<'_> {
        TokenRules {
            secret,
            issuer: None,
            audience: None,
        }
    }

    fn refusal(token: &str, rules: &TokenRules) -> String {
        verify_jwt(token, rules).unwrap_err().to_string()
    }

    /// A good token yields its user and org; numeric orgs are accepted as text.
    #[test]
    fn good_token() {
        let t = token(json!({"sub":"u1","org":42,"exp":now_s()+60}), SECRET);
        let (user, org) = verify_jwt(&t, &rules(SECRET)).unwrap();
        assert_eq!((user.as_str(), org.as_str()), ("u1", "42"));
    }

    /// Each kind of bad token gets its own reason.
    #[test]
    fn bad_tokens() {
        let r = rules(SECRET);
        let expired = token(json!({"sub":"u1","org":"1","exp":now_s()-600}), SECRET);
        assert_eq!(refusal(&expired, &r), "token expired");
        let other = token(
            json!({"sub":"u1","org":"1","exp":now_s()+60}),
            "another-secret-entirely-another-secret",
        );
        assert_eq!(refusal(&other, &r), "bad signature");
        let no_org = token(json!({"sub":"u1","exp":now_s()+60}), SECRET);
        assert_eq!(refusal(&no_org, &r), "missing claim: org");
        let no_exp = token(json!({"sub":"u1","org":"1"}), SECRET);
        assert_eq!(refusal(&no_exp, &r), "missing claim: exp");
        let bad_org = token(json!({"sub":"u1","org":"a:b","exp":now_s()+60}), SECRET);
        assert!(refusal(&bad_org, &r).starts_with("bad claim: org"));
        assert_eq!(refusal("garbage", &r), "malformed token");
    }

    /// A token whose `nbf` is still ahead (past the leeway) is refused; one already valid
    /// is accepted.
    #[test]
    fn not_before() {
        let r = rules(SECRET);
        let early = token(
            json!({"sub":"u1","org":"1","nbf":now_s()+600,"exp":now_s()+1200}),
            SECRET,
        );
        assert_eq!(refusal(&early, &r), "token not yet valid (nbf)");
        let valid = token(
            json!({"sub":"u1","org":"1","nbf":now_s()-1,"exp":now_s()+60}),
            SECRET,
        );
        assert!(verify_jwt(&valid, &r).is_ok());
    }

    /// With an issuer and an audience configured, a token must carry both, matching.
    #[test]
    fn issuer_and_audience() {
        let r = TokenRules {
            secret: SECRET,
            issuer: Some("https://idp.example.com"),
            audience: Some("switchboard"),
        };
        let claims = |iss: Option<&str>, aud: Option<&str>| {
            let mut c = json!({"sub":"u1","org":"1","exp":now_s()+60});
            if let Some(iss) = iss {
                c["iss"] = json!(iss);
            }
            if let Some(aud) = aud {
                c["aud"] = json!(aud);
            }
            token(c, SECRET)
        };
        let good = claims(Some("https://idp.example.com"), Some("switchboard"));
        assert!(verify_jwt(&good, &r).is_ok());
        let wrong_iss = claims(Some("https://evil.example.com"), Some("switchboard"));
        assert_eq!(refusal(&wrong_iss, &r), "wrong issuer (iss)");
        let wrong_aud = claims(Some("https://idp.example.com"), Some("billing"));
        assert_eq!(refusal(&wrong_aud, &r), "wrong audience (aud)");
        let no_iss = claims(None, Some("switchboard"));
        assert_eq!(refusal(&no_iss, &r), "missing claim: iss");
        let no_aud = claims(Some("https://idp.example.com"), None);
        assert_eq!(refusal(&no_aud, &r), "missing claim: aud");
        // Unconfigured, neither is looked at.
        assert!(verify_jwt(&wrong_aud, &rules(SECRET)).is_ok());
    }

    /// Only HS256: a token signed with HS512 under the same secret is refused.
    #[test]
    fn other_algorithms_are_refused() {
        let claims = json!({"sub":"u1","org":"1","exp":now_s()+60});
        // Signed by hand: this process's provider signs HS256 only.
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        use base64::Engine;
        use hmac::Mac;
        let head = b64(br#"{"alg":"HS512","typ":"JWT"}"#);
        let body = b64(claims.to_string().as_bytes());
        let mut mac = hmac::Hmac::<sha2::Sha512>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(format!("{head}.{body}").as_bytes());
        let sig = b64(&mac.finalize().into_bytes());
        let t = format!("{head}.{body}.{sig}");
        assert_eq!(
            refusal(&t, &rules(SECRET)),
            "bad algorithm: only HS256 is accepted"
        );
    }
}

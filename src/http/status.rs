//! Health, readiness, metrics, and the static pages: the dashboard (`/`), the voice test page
//! (`/voice-test`), and the browser client as `/client.js`, its ES module wrapper
//! `/client.mjs` and its types `/client.d.ts`, compiled into the binary so `cargo run` needs
//! no files beside it. Each page carries its own Content-Security-Policy ([`DASHBOARD_CSP`],
//! [`VOICE_CSP`]): its inline script and style are allowed by hash, nothing else runs, and it
//! connects only to its own origin.

use std::sync::atomic::Ordering;
use std::sync::LazyLock;

use actix_web::http::header;
use actix_web::{web, HttpResponse};
use base64::Engine;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::core::metrics::metrics;
use crate::node::Node;

const INDEX_HTML: &str = include_str!("../../static/index.html");
const VOICE_HTML: &str = include_str!("../../static/voice.html");
const CLIENT_JS: &str = include_str!("../../static/client.js");
const CLIENT_MJS: &str = include_str!("../../static/client.mjs");
const CLIENT_DTS: &str = include_str!("../../static/client.d.ts");

/// The dashboard's policy: scripts from this origin and the page's own inline script, its
/// inline style, `fetch` and the WebSocket to this origin only (CSP 3's `'self'` covers `ws:`
/// and `wss:` of the page's host), never framed (clickjacking the Sign out button), no
/// `<base>` rewriting. A hash instead of `'unsafe-inline'`, so an injected `<script>` does not
/// run.
pub(crate) static DASHBOARD_CSP: LazyLock<String> = LazyLock::new(|| page_csp(INDEX_HTML));

/// The voice test page's policy: the dashboard's, for its own inline blocks. The microphone
/// needs no source (Web Audio plays the echo from memory, not from a URL).
pub(crate) static VOICE_CSP: LazyLock<String> = LazyLock::new(|| page_csp(VOICE_HTML));

fn page_csp(html: &str) -> String {
    format!(
        "default-src 'none'; script-src 'self' {}; style-src {}; connect-src 'self'; \
         img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
        inline_hashes(html, "script"),
        inline_hashes(html, "style"),
    )
}

/// CSP sources (`'sha256-…'`, space-separated) for the inline `<tag>` blocks of `html`; a
/// `<script src=…>` has no inline body and is skipped. The page is the compiled-in one, so a
/// block that is never closed is a bug the tests see as a blocked script.
fn inline_hashes(html: &str, tag: &str) -> String {
    let (open, close) = (format!("<{tag}"), format!("</{tag}>"));
    let mut sources = Vec::new();
    let mut rest = html;
    while let Some(start) = rest.find(&open) {
        let after_open = &rest[start + open.len()..];
        let Some(head_end) = after_open.find('>') else {
            break;
        };
        let (attributes, body) = (&after_open[..head_end], &after_open[head_end + 1..]);
        let Some(body_end) = body.find(&close) else {
            break;
        };
        if !attributes.contains("src=") {
            let digest = Sha256::digest(&body.as_bytes()[..body_end]);
            let encoded = base64::engine::general_purpose::STANDARD.encode(digest);
            sources.push(format!("'sha256-{encoded}'"));
        }
        rest = &body[body_end + close.len()..];
    }
    sources.join(" ")
}

pub(crate) async fn index() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CONTENT_SECURITY_POLICY, DASHBOARD_CSP.as_str()))
        .body(INDEX_HTML)
}

/// `/voice-test`: streams the microphone through the hub and plays back what the echo returns.
pub(crate) async fn voice_test() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CONTENT_SECURITY_POLICY, VOICE_CSP.as_str()))
        .body(VOICE_HTML)
}

pub(crate) async fn client_js() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/javascript; charset=utf-8")
        .body(CLIENT_JS)
}

/// The ES module form: it imports `./client.js`, so both are served with a JavaScript type.
pub(crate) async fn client_mjs() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/javascript; charset=utf-8")
        .body(CLIENT_MJS)
}

/// TypeScript declarations, for editors and `tsc` in projects that use the client.
pub(crate) async fn client_dts() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; charset=utf-8")
        .body(CLIENT_DTS)
}

pub(crate) async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status":"ok"}))
}

pub(crate) async fn readyz(node: web::Data<Node>) -> HttpResponse {
    if node.draining.load(Ordering::Acquire) {
        return HttpResponse::ServiceUnavailable()
            .json(json!({"status":"not_ready","reason":"draining"}));
    }
    if !node.broker.health.is_ready() {
        return HttpResponse::ServiceUnavailable().json(
            json!({"status":"not_ready","reason":"redis_unavailable","detail":node.broker.health.reason()}),
        );
    }
    HttpResponse::Ok().json(json!({"status":"ready"}))
}

pub(crate) async fn metrics_text(node: web::Data<Node>) -> HttpResponse {
    let m = metrics();
    let size = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    m.registry_sessions.set(size(node.registry.session_count()));
    m.registry_channels.set(size(node.registry.channel_count()));
    m.handshake_limiter_clients
        .set(size(node.handshakes.tracked()));
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(m.render())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each inline block is hashed over exactly its body, and `<script src>` is left out.
    #[test]
    fn inline_blocks_are_hashed_by_body() {
        let html = "<style>a{}</style><script src=\"/x.js\"></script><script>\nrun()\n</script>";
        let hash = |body: &str| {
            let digest = Sha256::digest(body.as_bytes());
            format!(
                "'sha256-{}'",
                base64::engine::general_purpose::STANDARD.encode(digest)
            )
        };
        assert_eq!(inline_hashes(html, "script"), hash("\nrun()\n"));
        assert_eq!(inline_hashes(html, "style"), hash("a{}"));
        assert_eq!(inline_hashes("<script>never closed", "script"), "");
    }

    /// The shipped page's one inline script and one inline style are both allowed by hash.
    #[test]
    fn the_dashboard_policy_allows_its_inline_blocks_only() {
        let script = inline_hashes(INDEX_HTML, "script");
        let style = inline_hashes(INDEX_HTML, "style");
        assert_eq!(script.matches("'sha256-").count(), 1, "{script}");
        assert_eq!(style.matches("'sha256-").count(), 1, "{style}");
        assert!(!DASHBOARD_CSP.contains("unsafe"), "{}", *DASHBOARD_CSP);
        assert!(DASHBOARD_CSP.contains("frame-ancestors 'none'"));
    }

    /// The voice page's one inline script and one inline style are allowed by hash, and its
    /// policy differs from the dashboard's only by those hashes.
    #[test]
    fn the_voice_policy_allows_its_inline_blocks_only() {
        let script = inline_hashes(VOICE_HTML, "script");
        assert_eq!(script.matches("'sha256-").count(), 1, "{script}");
        assert!(VOICE_CSP.contains(&script));
        assert!(!VOICE_CSP.contains("unsafe"), "{}", *VOICE_CSP);
        assert_ne!(*VOICE_CSP, *DASHBOARD_CSP);
    }
}

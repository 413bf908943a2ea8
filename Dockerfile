# syntax=docker/dockerfile:1
# switchboard container image. Two stages: a full Rust toolchain builds the release binary,
# and a slim Debian runtime carries only the binary, its config/ and CA certificates (for
# rediss:// URLs). Used by docker-compose.yml; works the same under any orchestrator.
#
#   docker build -t switchboard .
#   docker run -p 8080:8080 -e SWITCHBOARD__AUTH__COOKIE_KEY=... -e SWITCHBOARD__AUTH__JWT_SECRET=... \
#       -e SWITCHBOARD__API__PUBLISH_KEYS=... -e ALLOWED_ORIGINS=https://app.example.com switchboard

# ---- build -------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src
# The whole workspace (see .dockerignore for what stays out): static/ is compiled into the binary.
COPY . .
# Cache mounts keep the crates.io downloads and compiled dependencies between builds, so a
# change to src/ rebuilds only switchboard. The binary is copied out of the cached target dir.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin switchboard \
    && cp target/release/switchboard /usr/local/bin/switchboard

# ---- runtime -----------------------------------------------------------------------------
FROM debian:bookworm-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin switchboard

WORKDIR /app
COPY --from=builder /usr/local/bin/switchboard /usr/local/bin/switchboard
# `switchboard serve` reads config/default.toml then config/$SWITCHBOARD_ENV.toml from here.
COPY config /app/config

# The production profile: no dev login, no demo simulator, no localhost origins, and a
# refusal to start without a cookie key, a JWT secret and publish keys of your own
# (SWITCHBOARD__AUTH__COOKIE_KEY, SWITCHBOARD__AUTH__JWT_SECRET, SWITCHBOARD__API__PUBLISH_KEYS)
# and the allowed origins (ALLOWED_ORIGINS or FRONTEND_URL). Set REDIS_URL for clustered mode.
ENV SWITCHBOARD_ENV=production \
    BIND=0.0.0.0 \
    PORT=8080 \
    RUST_LOG=info

USER switchboard
EXPOSE 8080

# Liveness without curl in the image: bash's /dev/tcp speaks one HTTP/1.0 request to /healthz.
# (Readiness, GET /readyz, is for the load balancer or orchestrator to route by.)
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${PORT:-8080} && printf 'GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]

# SIGTERM starts the drain (reconnect messages, 1012 closes, exit within
# shutdown.drain_timeout_s); give it that long before a SIGKILL (docker stop -t / compose
# stop_grace_period).
STOPSIGNAL SIGTERM
CMD ["switchboard", "serve"]

#!/usr/bin/env bash
# Run the docker-compose topology on this machine without Docker: one redis-server, three
# switchboard pods on 127.0.0.1:8081-8083 sharing it, and nginx on 127.0.0.1:8080 in front,
# configured from config/nginx.conf. Everything it starts keeps its pid file, log and data
# under .cluster/ in the repository; `stop` ends exactly those processes.
#
#   scripts/cluster.sh start    start what is not running yet (builds the release binary if missing)
#   scripts/cluster.sh status   each piece, its pid, and its /readyz
#   scripts/cluster.sh stop     stop everything started by `start`
#
# Then open http://localhost:8080/ (pod 1 simulates demo calls for every pod to show).
# Ports: REDIS_PORT (6390), NGINX_PORT (8080), POD_PORTS ("8081 8082 8083"); another binary:
# SWITCHBOARD_BIN (e.g. target/debug/switchboard). Give `stop` and `status` the same values.
# Needs redis-server and nginx: apt-get install -y redis-server nginx
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="$ROOT/.cluster"
BIN="${SWITCHBOARD_BIN:-$ROOT/target/release/switchboard}"
[[ "$BIN" == /* ]] || BIN="$PWD/$BIN"
REDIS_PORT="${REDIS_PORT:-6390}"
NGINX_PORT="${NGINX_PORT:-8080}"
read -r -a POD_PORTS <<<"${POD_PORTS:-8081 8082 8083}"
# Seconds a process may take to come up or go away.
WAIT_S=20

die() {
    echo "cluster: $*" >&2
    exit 1
}

# The nginx binary: Debian installs it in /usr/sbin, which is not always on a user's PATH.
nginx_bin() {
    command -v nginx 2>/dev/null || { [[ -x /usr/sbin/nginx ]] && echo /usr/sbin/nginx; } || true
}

require_tools() {
    local missing=()
    command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
    command -v redis-cli >/dev/null 2>&1 || missing+=(redis-cli)
    [[ -n "$(nginx_bin)" ]] || missing+=(nginx)
    if ((${#missing[@]})); then
        die "missing ${missing[*]}; install them with: apt-get install -y redis-server nginx"
    fi
}

# The pid in file $1 if that process is alive and its command line contains $2 (so a pid
# reused by an unrelated process after a reboot is not mistaken for ours).
live_pid() {
    local file="$1" name="$2" pid
    [[ -f "$file" ]] || return 1
    pid="$(<"$file")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$name" || return 1
    echo "$pid"
}

# "STATUS BODY" of GET $2 on 127.0.0.1:$1, through bash's /dev/tcp (no curl needed).
http_get() {
    local port="$1" path="$2" reply
    reply="$(
        {
            exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 1
            printf 'GET %s HTTP/1.0\r\nHost: localhost\r\n\r\n' "$path" >&3
            timeout 3 cat <&3
        } 2>/dev/null
    )" || return 1
    [[ -n "$reply" ]] || return 1
    local status body
    status="$(head -n1 <<<"$reply" | awk '{print $2}')"
    body="$(sed '1,/^\r\{0,1\}$/d' <<<"$reply" | tr -d '\r')"
    echo "$status $body"
}

# Wait until command "$@" succeeds, at most WAIT_S seconds.
wait_until() {
    local deadline=$((SECONDS + WAIT_S))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

redis_ping() {
    [[ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]]
}

pod_answers() {
    http_get "$1" /healthz | grep -q '^200 '
}

pod_ready() {
    http_get "$1" /readyz | grep -q '^200 '
}

# config/nginx.conf with loopback upstreams, our listen port, and temp/log paths under $1.
render_nginx_conf() {
    local dir="$1" servers="" port options
    # The template's own server options (max_fails, fail_timeout).
    options=$(awk '/# @upstream-servers-begin@/ { on = 1; next }
                   on && $1 == "server" { $1 = ""; $2 = ""; sub(/^ +/, ""); print; exit }' \
        "$ROOT/config/nginx.conf")
    for port in "${POD_PORTS[@]}"; do
        servers+="        server 127.0.0.1:$port ${options:-;}"$'\n'
    done
    awk -v servers="$servers" -v port="$NGINX_PORT" -v dir="$dir" '
        /# @upstream-servers-begin@/ { printf "%s", servers; skip = 1; next }
        /# @upstream-servers-end@/ { skip = 0; next }
        skip { next }
        /^ *listen 8080;/ { sub(/listen 8080;/, "listen 127.0.0.1:" port ";") }
        /# @local-paths@/ {
            sub(/# @local-paths@/, "client_body_temp_path " dir "/tmp/body; proxy_temp_path " dir \
                "/tmp/proxy; fastcgi_temp_path " dir "/tmp/fastcgi; uwsgi_temp_path " dir \
                "/tmp/uwsgi; scgi_temp_path " dir "/tmp/scgi;")
        }
        { sub(/\/dev\/stderr/, dir "/error.log"); sub(/\/dev\/stdout/, dir "/access.log"); print }
    ' "$ROOT/config/nginx.conf"
}

start_redis() {
    local dir="$STATE/redis" pid
    if pid="$(live_pid "$dir/redis.pid" redis-server)"; then
        echo "redis   already running (pid $pid, port $REDIS_PORT)"
        return
    fi
    mkdir -p "$dir"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
        --dir "$dir" --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
    wait_until redis_ping || die "redis-server did not answer on port $REDIS_PORT; see $dir/redis.log"
    echo "redis   started (pid $(<"$dir/redis.pid"), port $REDIS_PORT)"
}

start_pod() {
    local n="$1" port="$2" dir="$STATE/pod$1" pid simulate=false
    if pid="$(live_pid "$dir/switchboard.pid" switchboard)"; then
        echo "pod $n   already running (pid $pid, port $port)"
        return
    fi
    mkdir -p "$dir"
    # One pod runs the demo call simulator; its events reach every pod through Redis.
    [[ "$n" == 1 ]] && simulate=true
    (
        cd "$ROOT"
        env REDIS_URL="redis://127.0.0.1:$REDIS_PORT" PORT="$port" BIND=127.0.0.1 \
            SWITCHBOARD__SERVER__TRUSTED_PROXIES=127.0.0.1 \
            SWITCHBOARD__DEMO__SIMULATE_CALLS="$simulate" \
            RUST_LOG="${RUST_LOG:-info}" \
            nohup "$BIN" serve >>"$dir/switchboard.log" 2>&1 </dev/null &
        echo $! >"$dir/switchboard.pid"
    )
    wait_until pod_answers "$port" ||
        die "pod $n did not answer on port $port; see $dir/switchboard.log"
    echo "pod $n   started (pid $(<"$dir/switchboard.pid"), port $port)"
}

start_nginx() {
    local dir="$STATE/nginx" pid nginx
    nginx="$(nginx_bin)"
    if pid="$(live_pid "$dir/nginx.pid" nginx)"; then
        echo "nginx   already running (pid $pid, port $NGINX_PORT)"
        return
    fi
    mkdir -p "$dir/tmp"
    render_nginx_conf "$dir" >"$dir/nginx.conf"
    "$nginx" -t -q -c "$dir/nginx.conf" -p "$dir/" -e "$dir/error.log" -g "pid $dir/nginx.pid;" ||
        die "nginx rejected $dir/nginx.conf"
    "$nginx" -c "$dir/nginx.conf" -p "$dir/" -e "$dir/error.log" -g "pid $dir/nginx.pid;"
    wait_until pod_answers "$NGINX_PORT" ||
        die "nginx did not answer on port $NGINX_PORT; see $dir/error.log"
    echo "nginx   started (pid $(<"$dir/nginx.pid"), port $NGINX_PORT)"
}

cmd_start() {
    require_tools
    mkdir -p "$STATE"
    # Keep everything in .cluster/ out of git without touching the repository's .gitignore.
    [[ -f "$STATE/.gitignore" ]] || echo '*' >"$STATE/.gitignore"
    if [[ ! -x "$BIN" ]]; then
        [[ -z "${SWITCHBOARD_BIN:-}" ]] || die "SWITCHBOARD_BIN=$SWITCHBOARD_BIN is not an executable"
        echo "building $BIN (cargo build --release)"
        (cd "$ROOT" && cargo build --release)
    fi
    start_redis
    local i
    for i in "${!POD_PORTS[@]}"; do
        start_pod "$((i + 1))" "${POD_PORTS[$i]}"
    done
    # A pod listens at once but is ready only once its Redis subscription carries its canary.
    for i in "${!POD_PORTS[@]}"; do
        wait_until pod_ready "${POD_PORTS[$i]}" ||
            die "pod $((i + 1)) not ready: $(http_get "${POD_PORTS[$i]}" /readyz || echo "no answer"); see $STATE/pod$((i + 1))/switchboard.log"
    done
    start_nginx
    echo "ready: http://localhost:$NGINX_PORT/ (stop with scripts/cluster.sh stop)"
}

# SIGTERM the process in pid file $2 (named $1 in messages, matched by $3) if it is ours and
# alive; prints its pid, or nothing when there is nothing to stop.
signal_one() {
    local label="$1" file="$2" name="$3" pid
    if ! pid="$(live_pid "$file" "$name")"; then
        echo "$label not running" >&2
        rm -f "$file"
        return
    fi
    kill -TERM "$pid" 2>/dev/null || true
    echo "$pid"
}

# Wait for process $2 (label $1, pid file $3) to exit (pods drain first), SIGKILL it if it
# will not within WAIT_S, and remove its pid file.
await_exit() {
    local label="$1" pid="$2" file="$3"
    [[ -n "$pid" ]] || return 0
    local deadline=$((SECONDS + WAIT_S))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "$label (pid $pid) still running after ${WAIT_S}s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
    echo "$label stopped (pid $pid)"
}

cmd_stop() {
    local pid i file
    # nginx first (no new connections), then every pod at once (they drain in parallel,
    # their clients would reconnect to nothing anyway), then Redis.
    pid="$(signal_one "nginx  " "$STATE/nginx/nginx.pid" nginx)"
    await_exit "nginx  " "$pid" "$STATE/nginx/nginx.pid"
    local pids=()
    for i in "${!POD_PORTS[@]}"; do
        pids+=("$(signal_one "pod $((i + 1))  " "$STATE/pod$((i + 1))/switchboard.pid" switchboard)")
    done
    for i in "${!POD_PORTS[@]}"; do
        file="$STATE/pod$((i + 1))/switchboard.pid"
        await_exit "pod $((i + 1))  " "${pids[$i]}" "$file"
    done
    pid="$(signal_one "redis  " "$STATE/redis/redis.pid" redis-server)"
    await_exit "redis  " "$pid" "$STATE/redis/redis.pid"
}

# One status line: label, pid or "stopped", and the /readyz answer on port $3.
status_line() {
    local label="$1" file="$2" port="$3" name="$4" pid ready
    if pid="$(live_pid "$file" "$name")"; then
        ready="$(http_get "$port" /readyz || echo "no answer")"
        echo "$label pid $pid  port $port  /readyz: $ready"
    else
        echo "$label stopped"
    fi
}

cmd_status() {
    local pid
    if pid="$(live_pid "$STATE/redis/redis.pid" redis-server)"; then
        echo "redis   pid $pid  port $REDIS_PORT  PING: $(redis-cli -p "$REDIS_PORT" ping 2>&1 || true)"
    else
        echo "redis   stopped"
    fi
    local i
    for i in "${!POD_PORTS[@]}"; do
        status_line "pod $((i + 1))  " "$STATE/pod$((i + 1))/switchboard.pid" "${POD_PORTS[$i]}" switchboard
    done
    status_line "nginx  " "$STATE/nginx/nginx.pid" "$NGINX_PORT" nginx
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
*)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# A local Redis Cluster for trying switchboard on one (`redis.cluster_urls`): three masters
# with one replica each, on 127.0.0.1:7001-7006 (cluster bus on port + 10000), formed with
# `redis-cli --cluster create`. Each node keeps its pid file, log and node file under
# .redis-cluster/ in the repository and nothing else on disk; `stop` ends exactly those
# processes. (The test suite starts its own cluster on free ports: tests/common/redis_cluster.rs.)
#
#   scripts/redis-cluster.sh start    start the six nodes and form the cluster (once)
#   scripts/redis-cluster.sh status   each node's pid and role, and cluster_state
#   scripts/redis-cluster.sh stop     stop the nodes and forget the cluster
#
# Then run pods with e.g.
#   SWITCHBOARD__REDIS__CLUSTER_URLS=redis://127.0.0.1:7001,redis://127.0.0.1:7002 switchboard
# Ports: REDIS_CLUSTER_PORTS ("7001 7002 7003 7004 7005 7006"); give `stop` the same value.
# Needs redis-server and redis-cli 7 or later: apt-get install -y redis-server
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="$ROOT/.redis-cluster"
read -r -a PORTS <<<"${REDIS_CLUSTER_PORTS:-7001 7002 7003 7004 7005 7006}"
# Seconds the cluster may take to form.
WAIT_S=30

die() {
    echo "redis-cluster: $*" >&2
    exit 1
}

running() {
    local pidfile="$STATE/$1/redis.pid"
    [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

state_ok() {
    redis-cli -p "$1" cluster info 2>/dev/null | grep -q '^cluster_state:ok'
}

start() {
    command -v redis-server >/dev/null 2>&1 || die "redis-server missing: apt-get install -y redis-server"
    (( ${#PORTS[@]} == 6 )) || die "REDIS_CLUSTER_PORTS must list six ports"
    for port in "${PORTS[@]}"; do
        running "$port" && continue
        mkdir -p "$STATE/$port"
        redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
            --cluster-enabled yes --cluster-node-timeout 2000 \
            --dir "$STATE/$port" --pidfile "$STATE/$port/redis.pid" \
            --logfile "$STATE/$port/redis.log" --daemonize yes
    done
    for port in "${PORTS[@]}"; do
        for _ in $(seq $((WAIT_S * 10))); do
            redis-cli -p "$port" ping >/dev/null 2>&1 && break
            sleep 0.1
        done
    done
    if ! state_ok "${PORTS[0]}"; then
        local addrs=()
        for port in "${PORTS[@]}"; do addrs+=("127.0.0.1:$port"); done
        redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes >"$STATE/create.log" \
            || die "cluster create failed: see $STATE/create.log"
    fi
    for _ in $(seq $((WAIT_S * 10))); do
        state_ok "${PORTS[0]}" && break
        sleep 0.1
    done
    state_ok "${PORTS[0]}" || die "cluster_state is not ok after ${WAIT_S}s"
    local seeds=()
    for port in "${PORTS[@]:0:3}"; do seeds+=("redis://127.0.0.1:$port"); done
    echo "Redis Cluster up. SWITCHBOARD__REDIS__CLUSTER_URLS=$(IFS=,; echo "${seeds[*]}")"
}

status() {
    for port in "${PORTS[@]}"; do
        if running "$port"; then
            echo "$port: pid $(cat "$STATE/$port/redis.pid"), $(redis-cli -p "$port" role 2>/dev/null | head -1)"
        else
            echo "$port: not running"
        fi
    done
    redis-cli -p "${PORTS[0]}" cluster info 2>/dev/null | grep '^cluster_state' || true
}

stop() {
    for port in "${PORTS[@]}"; do
        if running "$port"; then
            kill "$(cat "$STATE/$port/redis.pid")"
        fi
    done
    for port in "${PORTS[@]}"; do
        for _ in $(seq $((WAIT_S * 10))); do
            running "$port" || break
            sleep 0.1
        done
        rm -rf "${STATE:?}/$port"
    done
    rm -f "$STATE/create.log"
}

case "${1:-}" in
    start) start ;;
    status) status ;;
    stop) stop ;;
    *) die "usage: $0 start|status|stop" ;;
esac

# Shared by scripts/bench.sh and scripts/bench-100k.sh (sourced, not run): a free loopback
# port, the environment of a hub under benchmark, and a throwaway redis-server.

# A loopback port nothing listens on right now, below the ephemeral range (32768 up) that
# the load clients' own sockets take.
free_port() {
  local p
  for _ in $(seq 1 100); do
    p=$((20000 + RANDOM % 12000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
  done
  echo "no free port found" >&2; exit 1
}

# A hub on a port of its own choosing, no demo traffic, and the per-IP handshake limit lifted:
# one machine plays thousands of browsers from a few addresses.
bench_hub_env=(
  SWITCHBOARD__SERVER__BIND=127.0.0.1
  SWITCHBOARD__SERVER__PORT=0
  SWITCHBOARD__DEMO__SIMULATE_CALLS=false
  SWITCHBOARD__LIMITS__HANDSHAKES_PER_IP_PER_S=1000000
  SWITCHBOARD__LIMITS__HANDSHAKE_BURST=1000000
  RUST_LOG="${RUST_LOG:-warn,switchboard::server=info}"
)

# Start a redis-server keeping nothing on disk on port $1, logging to $2, plus any further
# redis-server arguments; sets redis_pid and returns once it answers PING.
start_redis() {
  local port=$1 log=$2; shift 2
  command -v redis-server >/dev/null || { echo "redis-server is not installed" >&2; exit 1; }
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --logfile "$log" "$@" &
  redis_pid=$!
  for _ in $(seq 1 50); do
    [ "$(redis-cli -p "$port" ping 2>/dev/null)" = PONG ] && return; sleep 0.1
  done
  echo "redis-server did not start" >&2; exit 1
}

# Wait up to $1 seconds (0: don't) for a quiet machine: no compiler running, under 15% of a
# core busy over 2 s. Two shared cores make every figure noisy otherwise.
wait_for_quiet() {
  local limit=$1 waited=0 a b
  [ "$limit" -gt 0 ] || return 0
  busy_ticks() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9; exit}' /proc/stat; }
  while :; do
    a=$(busy_ticks); sleep 2; b=$(busy_ticks); waited=$((waited + 2))
    if [ $((b - a)) -lt 30 ] && ! pgrep -x 'cargo|rustc' >/dev/null; then return 0; fi
    if [ $waited -ge "$limit" ]; then
      echo "WARNING: machine still busy after ${waited}s; measuring anyway" >&2; return 0
    fi
    [ $((waited % 30)) -eq 0 ] && echo "waiting for a quiet machine (${waited}s)..." >&2
  done
}

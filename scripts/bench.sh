#!/usr/bin/env bash
# Run one benchmark scenario of issue 4 against a fresh release build of the hub, on this
# machine only (loopback), and stop everything it started.
#
#   scripts/bench.sh <idle|fanout|dashboards|churn|floor> [--redis] [--perf] [bench flags...]
#
#   --redis   clustered hub: starts a throwaway redis-server on a free port first
#   --redis-cluster[=N]  clustered hub on a throwaway Redis Cluster of N masters (default 3,
#             no replicas) on free ports, slots split evenly, given by `redis.cluster_urls`;
#             N=1 is one master holding all 16384 slots: the same cluster client, one shard
#   --perf    profile the hub with `perf record -e cpu-clock` (flat: release builds keep no frame
#             pointers; BENCH_PERF_CALLGRAPH=dwarf adds call stacks, large) for the whole run and
#             save the top of `perf report` next to the JSON
#   anything else is passed to switchboard-bench, e.g. --connections 500 --duration-s 5, or
#   --peers uws,ws (fanout: uWebSockets.js and Node ws peers beside the floor; their npm
#   packages are installed from bench/peers/package-lock.json first)
#   (see `target/release/switchboard-bench --help`).
#
# Environment: BENCH_NO_BUILD=1 skips `cargo build --release`; BENCH_HUB_BIN=path runs another
# hub binary (a build of another commit, for alternating before/after runs); BENCH_WAIT_QUIET=N waits up to
# N seconds (default 600; 0: don't) for the machine to be quiet (no cargo/rustc, little CPU
# used) before starting, because 2 shared cores make every figure noisy otherwise; RUST_LOG (default warn, plus the listening line) is the
# hub's log filter. Results: the table on stdout, JSON under bench-results/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: scripts/bench.sh <idle|fanout|dashboards|churn|floor> [--redis|--redis-cluster[=N]] [--perf] [bench flags...]" >&2; exit 2; }
[ $# -ge 1 ] || usage
scenario=$1; shift
case $scenario in idle|fanout|dashboards|churn|floor) ;; *) usage ;; esac

redis=0; perf=0; shards=0; extra=()
while [ $# -gt 0 ]; do
  case $1 in
    --redis) redis=1 ;;
    --redis-cluster) shards=3 ;;
    --redis-cluster=*) shards=${1#--redis-cluster=}
      [[ $shards =~ ^[1-9][0-9]*$ ]] || usage ;;
    --perf) perf=1 ;;
    *) extra+=("$1") ;;
  esac
  shift
done
[ $redis = 1 ] && [ "$shards" -gt 0 ] && usage
mode=embedded; [ $redis = 1 ] && mode=redis; [ "$shards" -gt 0 ] && mode=cluster$shards

if [ "${BENCH_NO_BUILD:-0}" != 1 ]; then
  # The hub (root package) and the bench (bench/, its own crate in the workspace).
  cargo build --release -p switchboard --bin switchboard -p switchboard-bench --bin switchboard-bench
fi
# Peer servers (fanout --peers): their npm packages, pinned by the lock file.
for a in "${extra[@]}"; do
  if [[ $a == --peers* ]] && [ ! -d bench/peers/node_modules ]; then
    npm ci --prefix bench/peers --no-audit --no-fund
  fi
done
hub_bin=${BENCH_HUB_BIN:-target/release/switchboard}
bench_bin=target/release/switchboard-bench

# Sockets: the hub and the bench each hold one per connection.
ulimit -n "$(ulimit -Hn)"

run_dir=$(mktemp -d /tmp/sb-bench.XXXXXX)
hub_pid=; redis_pid=; perf_pid=; cluster_pids=()
cleanup() {
  set +e
  if [ -n "$perf_pid" ] && kill -0 "$perf_pid" 2>/dev/null; then
    kill -INT "$perf_pid"; wait "$perf_pid" 2>/dev/null
  fi
  if [ -n "$hub_pid" ] && kill -0 "$hub_pid" 2>/dev/null; then
    kill -TERM "$hub_pid"
    for _ in $(seq 1 150); do kill -0 "$hub_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$hub_pid" 2>/dev/null
    wait "$hub_pid" 2>/dev/null
  fi
  if [ -n "$redis_pid" ] && kill -0 "$redis_pid" 2>/dev/null; then
    kill -TERM "$redis_pid"; wait "$redis_pid" 2>/dev/null
  fi
  for p in "${cluster_pids[@]}"; do
    kill -TERM "$p" 2>/dev/null; wait "$p" 2>/dev/null
  done
  rm -rf "$run_dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

. "$(dirname "${BASH_SOURCE[0]}")/bench-common.sh"

hub_env=("${bench_hub_env[@]}")
bench_args=()
if [ $redis = 1 ]; then
  rport=$(free_port)
  start_redis "$rport" "$run_dir/redis.log" --maxclients 1000
  hub_env+=(SWITCHBOARD__REDIS__URL="redis://127.0.0.1:$rport")
  bench_args+=(--redis-url "redis://127.0.0.1:$rport" --redis-pid "$redis_pid")
fi
if [ "$shards" -gt 0 ]; then
  # N cluster-enabled masters on free ports, slots split evenly with CLUSTER ADDSLOTSRANGE
  # and joined with CLUSTER MEET (`redis-cli --cluster create` refuses fewer than 3 masters).
  # No replicas: the bench measures the data path, and a replica only adds replication CPU.
  command -v redis-server >/dev/null || { echo "redis-server is not installed" >&2; exit 1; }
  cports=(); seeds=()
  for i in $(seq 0 $((shards - 1))); do
    cp=$(free_port)
    mkdir -p "$run_dir/node$i"
    redis-server --port "$cp" --bind 127.0.0.1 --save '' --appendonly no --maxclients 1000 \
      --cluster-enabled yes --cluster-node-timeout 2000 --dir "$run_dir/node$i" \
      --logfile "$run_dir/node$i/redis.log" &
    cluster_pids+=($!)
    cports+=("$cp"); seeds+=("redis://127.0.0.1:$cp")
  done
  for cp in "${cports[@]}"; do
    for _ in $(seq 1 50); do
      [ "$(redis-cli -p "$cp" ping 2>/dev/null)" = PONG ] && break; sleep 0.1
    done
    [ "$(redis-cli -p "$cp" ping 2>/dev/null)" = PONG ] || { echo "redis-server did not start" >&2; exit 1; }
  done
  for i in "${!cports[@]}"; do
    lo=$((16384 * i / shards)); hi=$((16384 * (i + 1) / shards - 1))
    redis-cli -p "${cports[$i]}" cluster addslotsrange "$lo" "$hi" >/dev/null
    redis-cli -p "${cports[$i]}" cluster set-config-epoch $((i + 1)) >/dev/null
    [ "$i" -gt 0 ] && redis-cli -p "${cports[$i]}" cluster meet 127.0.0.1 "${cports[0]}" >/dev/null
  done
  for _ in $(seq 1 300); do
    ok=1
    for cp in "${cports[@]}"; do
      redis-cli -p "$cp" cluster info 2>/dev/null | grep -q '^cluster_state:ok' || ok=0
      [ "$(redis-cli -p "$cp" cluster nodes 2>/dev/null | wc -l)" -eq "$shards" ] || ok=0
    done
    [ $ok = 1 ] && break; sleep 0.1
  done
  [ $ok = 1 ] || { echo "the Redis Cluster did not form" >&2; exit 1; }
  hub_env+=(SWITCHBOARD__REDIS__CLUSTER_URLS="$(IFS=,; echo "${seeds[*]}")")
  echo "Redis Cluster: $shards master(s) on ports ${cports[*]} (pids ${cluster_pids[*]})"
fi

env "${hub_env[@]}" "$hub_bin" serve >"$run_dir/hub.log" 2>&1 &
hub_pid=$!
port=
for _ in $(seq 1 300); do
  port=$(grep -o 'listening on http://127.0.0.1:[0-9]*' "$run_dir/hub.log" | head -1 | sed 's/.*://') || true
  [ -n "$port" ] && break
  kill -0 "$hub_pid" 2>/dev/null || break
  sleep 0.1
done
if [ -z "$port" ]; then
  echo "the hub did not start:" >&2; tail -20 "$run_dir/hub.log" >&2; exit 1
fi
# Clustered: wait until the hub says it can serve (Redis subscription alive).
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break; sleep 0.1
done

wait_for_quiet "${BENCH_WAIT_QUIET:-600}"

mkdir -p bench-results
stamp=$(date +%Y%m%d-%H%M%S)
name="$scenario-$mode-$stamp"
if [ $perf = 1 ]; then
  cg=(); [ -n "${BENCH_PERF_CALLGRAPH:-}" ] && cg=(--call-graph "$BENCH_PERF_CALLGRAPH" -F 199)
  perf record -e cpu-clock -F 999 "${cg[@]}" -p "$hub_pid" -o "bench-results/$name.perf.data" \
    >"$run_dir/perf.log" 2>&1 &
  perf_pid=$!
fi

echo "hub pid $hub_pid on port $port ($mode); ulimit -n $(ulimit -n)"
status=0
"$bench_bin" "$scenario" --url "http://127.0.0.1:$port" --server-pid "$hub_pid" \
  --label "$mode" --json "bench-results/$name.json" "${bench_args[@]}" "${extra[@]}" || status=$?

if [ $perf = 1 ]; then
  kill -INT "$perf_pid"; wait "$perf_pid" 2>/dev/null || true; perf_pid=
  {
    perf report -i "bench-results/$name.perf.data" --stdio --no-children --percent-limit 1 \
      --sort dso -g none 2>/dev/null | grep -v '^$'
    perf report -i "bench-results/$name.perf.data" --stdio --no-children --percent-limit 0.3 \
      --sort symbol -g none 2>/dev/null | grep -v '^$' | head -120
  } >"bench-results/$name.perf.txt" || true
  echo "perf: bench-results/$name.perf.txt (data: bench-results/$name.perf.data)"
fi
if [ $status -ne 0 ]; then
  echo "switchboard-bench exited $status; last hub log lines:" >&2
  tail -20 "$run_dir/hub.log" >&2
fi
exit $status

#!/usr/bin/env bash
# 100,000 idle sockets on this one machine (issue 15 item 6): one throwaway redis-server, N
# clustered switchboard pods sharing it (release binary, each on its own free port), and one
# switchboard-bench `idle` load client per pod, all at once. A single process may hold 20,000
# open files here (hard limit), so 100k sockets need several hub processes and several clients:
# the embedded (one-process) hub tops out near 19k sockets and is not run by this script.
#
#   scripts/bench-100k.sh [--pods N] [--connections TOTAL] [--hold-s S] [--concurrency C]
#                         [--rate R] [--source-ips K]
#
#   --pods N          pods and load clients (default 6); TOTAL/N sockets each, at most 19,000
#   --connections T   sockets in all (default 100000)
#   --hold-s S        each client holds its sockets S seconds after its own ramp (default 60),
#                     then publishes a 2 s burst at R events/s (default 10) to its topic, waits
#                     for every delivery, settles 5 s, reads its pod's RSS again, and closes
#   --concurrency C   handshakes in flight per client (default 48): the ramp is CPU bound on
#                     2 cores, more only queues
#   --source-ips K    each client connects from 127.0.0.1..K (default 32): bind() takes a port
#                     per source address from net.ipv4.ip_local_port_range (~28k)
#
# Each client logs in its own users and subscribes to its own topic (--tag cN), so a publish
# that Redis carries to every pod is received only by the sockets that expect it, and the
# bench checks lost and duplicated deliveries exactly. While the clients hold, this script
# polls every pod's /metrics (switchboard_connections) and keeps the snapshot at the highest
# total: sockets held at once, every pod's RSS, redis-server's RSS, /proc/meminfo Slab and
# /proc/net/sockstat (kernel memory for the sockets of both ends).
#
# It changes no sysctl: it prints ip_local_port_range, somaxconn and tcp_max_syn_backlog and
# stops if the port range cannot hold the sockets per source address.
# Environment: BENCH_NO_BUILD=1 skips `cargo build --release`; BENCH_HUB_BIN=path another hub
# binary; BENCH_WAIT_QUIET=N waits up to N s (default 300, 0: don't) for a quiet machine.
# Results: bench-results/100k-<stamp>/ (client-N.json, client-N.log, summary.json) and the
# summary table on stdout. Exit 1 if a socket failed, a delivery was lost or duplicated, or the
# peak total fell short of TOTAL.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}
pods=6; total=100000; hold=60; conc=48; rate=10; sources=32
while [ $# -gt 0 ]; do
  case $1 in
    --pods) pods=$2; shift ;;
    --connections) total=$2; shift ;;
    --hold-s) hold=$2; shift ;;
    --concurrency) conc=$2; shift ;;
    --rate) rate=$2; shift ;;
    --source-ips) sources=$2; shift ;;
    -h|--help) usage ;;
    *) echo "unknown argument $1" >&2; usage ;;
  esac
  shift
done
for v in "$pods" "$total" "$hold" "$conc" "$sources"; do
  [[ $v =~ ^[1-9][0-9]*$ ]] || usage
done
per=$(( (total + pods - 1) / pods ))
if [ "$per" -gt 19000 ]; then
  echo "$per sockets per pod: over the 20,000 open files of one process; use more --pods" >&2
  exit 2
fi

if [ "${BENCH_NO_BUILD:-0}" != 1 ]; then
  cargo build --release -p switchboard --bin switchboard -p switchboard-bench --bin switchboard-bench
fi
hub_bin=${BENCH_HUB_BIN:-target/release/switchboard}
bench_bin=target/release/switchboard-bench
command -v redis-server >/dev/null || { echo "redis-server is not installed" >&2; exit 1; }
ulimit -n "$(ulimit -Hn)"

read -r port_lo port_hi < /proc/sys/net/ipv4/ip_local_port_range
somaxconn=$(cat /proc/sys/net/core/somaxconn)
synbacklog=$(cat /proc/sys/net/ipv4/tcp_max_syn_backlog)
echo "sysctl: ip_local_port_range $port_lo-$port_hi, somaxconn $somaxconn, tcp_max_syn_backlog $synbacklog (unchanged)"
ports=$((port_hi - port_lo + 1))
# Every client binds to the same K source addresses: TOTAL/K ports of each address in use.
if [ $(( (total + sources - 1) / sources )) -ge "$ports" ]; then
  echo "$((total / sources)) sockets per source address exceed the $ports ephemeral ports: raise --source-ips" >&2
  exit 2
fi
if [ "$conc" -gt "$somaxconn" ]; then
  echo "--concurrency $conc is above net.core.somaxconn $somaxconn: handshakes would be dropped" >&2
  exit 2
fi

run_dir=$(mktemp -d /tmp/sb-100k.XXXXXX)
redis_pid=; pod_pids=(); client_pids=()
stop_pid() {
  local p=$1
  kill -0 "$p" 2>/dev/null || return 0
  kill -TERM "$p" 2>/dev/null
  for _ in $(seq 1 200); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$p" 2>/dev/null
  wait "$p" 2>/dev/null
}
cleanup() {
  set +e
  for p in "${client_pids[@]}"; do stop_pid "$p"; done
  for p in "${pod_pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${pod_pids[@]}"; do stop_pid "$p"; done
  [ -n "$redis_pid" ] && stop_pid "$redis_pid"
  rm -rf "$run_dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

. "$(dirname "${BASH_SOURCE[0]}")/bench-common.sh"
rss_kib() { awk '/^VmRSS:/{print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
meminfo_kib() { awk -v k="$1:" '$1==k{print $2}' /proc/meminfo; }
# TCP sockets in use and their buffer memory (pages) from /proc/net/sockstat.
sockstat() { awk '$1=="TCP:"{for(i=2;i<NF;i+=2) printf "%s=%s ", $i, $(i+1)}' /proc/net/sockstat; }

rport=$(free_port)
start_redis "$rport" "$run_dir/redis.log"

pod_ports=()
for i in $(seq 1 "$pods"); do
  env "${bench_hub_env[@]}" SWITCHBOARD__REDIS__URL="redis://127.0.0.1:$rport" \
    "$hub_bin" serve >"$run_dir/pod$i.log" 2>&1 &
  pod_pids+=($!)
done
for i in $(seq 1 "$pods"); do
  port=
  for _ in $(seq 1 300); do
    port=$(grep -o 'listening on http://127.0.0.1:[0-9]*' "$run_dir/pod$i.log" | head -1 | sed 's/.*://') || true
    [ -n "$port" ] && break
    kill -0 "${pod_pids[$((i - 1))]}" 2>/dev/null || break
    sleep 0.1
  done
  [ -n "$port" ] || { echo "pod $i did not start:" >&2; tail -20 "$run_dir/pod$i.log" >&2; exit 1; }
  for _ in $(seq 1 100); do
    curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break; sleep 0.1
  done
  curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 || { echo "pod $i not ready" >&2; exit 1; }
  pod_ports+=("$port")
done
echo "redis pid $redis_pid port $rport; pods: pids ${pod_pids[*]} ports ${pod_ports[*]}"

wait_for_quiet "${BENCH_WAIT_QUIET:-300}"

out="bench-results/100k-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"
pods_total_rss() { local s=0 p; for p in "${pod_pids[@]}"; do s=$((s + $(rss_kib "$p"))); done; echo $s; }
pods_rss_list() { local p; for p in "${pod_pids[@]}"; do printf '%s ' "$(rss_kib "$p")"; done; }
pod_conns() {
  curl -fsS -m 5 "http://127.0.0.1:$1/metrics" 2>/dev/null |
    awk '$1=="switchboard_connections"{printf "%d", $2; found=1} END{if(!found) printf "0"}'
}
before_rss="$(pods_rss_list)"; before_redis=$(rss_kib "$redis_pid")
before_slab=$(meminfo_kib Slab); before_sock="$(sockstat)"

started=$(date +%s.%N)
for i in $(seq 1 "$pods"); do
  n=$per; [ "$i" -eq "$pods" ] && n=$((total - per * (pods - 1)))
  "$bench_bin" idle --url "http://127.0.0.1:${pod_ports[$((i - 1))]}" \
    --server-pid "${pod_pids[$((i - 1))]}" --redis-pid "$redis_pid" --label "100k-pod$i" \
    --tag "c$i" --connections "$n" --duration-s "$hold" --rate "$rate" \
    --connect-concurrency "$conc" --source-ips "$sources" --threads 1 \
    --max-runtime-s $((hold + 600)) --json "$out/client-$i.json" >"$out/client-$i.log" 2>&1 &
  client_pids+=($!)
done

# Poll until every client has exited; keep the snapshot at the highest total held.
peak=0; peak_at=; full_at=; peak_line=
while :; do
  alive=0
  for p in "${client_pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=$((alive + 1)); done
  [ $alive -eq 0 ] && break
  sum=0; per_pod=()
  for port in "${pod_ports[@]}"; do c=$(pod_conns "$port"); per_pod+=("$c"); sum=$((sum + c)); done
  now=$(date +%s.%N)
  if [ "$sum" -gt "$peak" ]; then
    peak=$sum; peak_at=$now
    peak_line="conns=${per_pod[*]}|rss=$(pods_rss_list)|redis=$(rss_kib "$redis_pid")|slab=$(meminfo_kib Slab)|sunreclaim=$(meminfo_kib SUnreclaim)|sock=$(sockstat)"
    [ -z "$full_at" ] && [ "$sum" -ge "$total" ] && full_at=$now
  fi
  printf '\r%6.0fs  %d sockets held (peak %d)   ' "$(awk -v a="$now" -v b="$started" 'BEGIN{print a - b}')" "$sum" "$peak" >&2
  sleep 2
done
echo >&2
status=0
for i in "${!client_pids[@]}"; do
  wait "${client_pids[$i]}" || { status=1; echo "client $((i + 1)) exited non-zero; see $out/client-$((i + 1)).log" >&2; }
done
client_pids=()

python3 - "$out" "$pods" "$total" "$started" "${full_at:-}" "$peak" "$peak_line" \
  "$before_rss" "$before_redis" "$before_slab" "$before_sock" <<'EOF' || status=1
import json, sys, statistics as st
out, pods, total, started, full_at, peak, line, before_rss, before_redis, before_slab, before_sock = sys.argv[1:]
pods, total, peak, started = int(pods), int(total), int(peak), float(started)
snap = dict(kv.split("=", 1) for kv in line.split("|")) if line else {}
conns = [int(x) for x in snap.get("conns", "").split()]
rss = [int(x) for x in snap.get("rss", "").split()]
base = [int(x) for x in before_rss.split()]
def sock(s):
    return {k: int(v) for k, v in (kv.split("=") for kv in s.split())}
clients = []
for i in range(1, pods + 1):
    try:
        clients.append(json.load(open(f"{out}/client-{i}.json")))
    except (OSError, ValueError):
        clients.append({})
def g(d, *ks):
    for k in ks:
        d = (d or {}).get(k) if isinstance(d, dict) else None
    return d
connected = sum(g(c, "connect", "connected") or 0 for c in clients)
failed = {}
for c in clients:
    for k, v in (g(c, "connect", "failed") or {}).items():
        failed[k] = failed.get(k, 0) + v
ramp_s = max((g(c, "connect", "seconds") or 0) for c in clients)
integ = [g(c, "integrity") or {} for c in clients]
s_before, s_peak = sock(before_sock), sock(snap.get("sock", ""))
summary = {
    "pods": pods, "target": total, "connected": connected, "failed": failed,
    "peak_held_at_once": peak,
    "seconds_to_all_connected": (float(full_at) - started) if full_at else None,
    "handshakes_per_s_overall": connected / ramp_s if ramp_s else None,
    "handshakes_per_s_per_client": [round(g(c, "connect", "handshakes_per_s") or 0) for c in clients],
    "pod_connections_at_peak": conns,
    "pod_rss_before_kib": base, "pod_rss_at_peak_kib": rss,
    "pod_fresh_kib_per_socket_at_peak": [round((r - b) / n, 2) if n else None for r, b, n in zip(rss, base, conns)],
    "client_fresh_kib_per_socket": [g(c, "rss", "fresh_per_conn_kib") for c in clients],
    "client_after_traffic_kib_per_socket": [g(c, "rss", "after_traffic_per_conn_kib") for c in clients],
    "hub_rss_total_at_peak_kib": sum(rss),
    "hub_rss_total_before_kib": sum(base),
    "redis_rss_before_kib": int(before_redis), "redis_rss_at_peak_kib": int(snap.get("redis", 0) or 0),
    "slab_before_kib": int(before_slab), "slab_at_peak_kib": int(snap.get("slab", 0) or 0),
    "sunreclaim_at_peak_kib": int(snap.get("sunreclaim", 0) or 0),
    "tcp_sockstat_before": s_before, "tcp_sockstat_at_peak": s_peak,
    "delivered": sum(i.get("delivered", 0) for i in integ),
    "expected_deliveries": sum(i.get("expected_deliveries", 0) for i in integ),
    # A publish answered 503 outcome_unknown (broker slow) may still have been delivered.
    "publishes_unconfirmed": sum(sum(ph.get("events_sent", 0) for ph in c.get("phases", []))
                                 - (g(c, "integrity", "events_accepted") or 0) for c in clients),
    "lost": sum(i.get("lost", 0) for i in integ),
    "duplicated": sum(i.get("duplicated", 0) for i in integ),
    "closed_by_server": sum(i.get("sockets_closed_by_server", 0) for i in integ),
    "held_at_end": [g(c, "idle", "held_at_end") for c in clients],
    "warnings": sorted({w for c in clients for w in c.get("warnings", [])}),
}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
def med(xs):
    xs = [x for x in xs if x is not None]
    return st.median(xs) if xs else float("nan")
kib = lambda k: f"{k / 1024:.0f} MiB"
print(f"sockets: {connected}/{total} connected, peak held at once {peak}, failed {failed or 0}")
if summary["seconds_to_all_connected"]:
    print(f"all {total} held {summary['seconds_to_all_connected']:.0f} s after the clients started")
print(f"handshakes/s overall {summary['handshakes_per_s_overall'] or 0:.0f} (per client {summary['handshakes_per_s_per_client']})")
print(f"per pod at peak: connections {conns}")
print(f"  RSS KiB/socket fresh (script, at peak) {summary['pod_fresh_kib_per_socket_at_peak']}")
print(f"  RSS KiB/socket fresh (client)  {[round(x, 2) if x else x for x in summary['client_fresh_kib_per_socket']]} median {med(summary['client_fresh_kib_per_socket']):.2f}")
print(f"  RSS KiB/socket after traffic   {[round(x, 2) if x else x for x in summary['client_after_traffic_kib_per_socket']]} median {med(summary['client_after_traffic_kib_per_socket']):.2f}")
print(f"hub RSS total {kib(sum(base))} before -> {kib(sum(rss))} at peak ({(sum(rss) - sum(base)) / max(peak, 1):.2f} KiB/socket)")
print(f"redis-server RSS {kib(int(before_redis))} -> {kib(summary['redis_rss_at_peak_kib'])}")
ps = 4096 / 1024
print(f"kernel: Slab {kib(int(before_slab))} -> {kib(summary['slab_at_peak_kib'])} "
      f"(+{(summary['slab_at_peak_kib'] - int(before_slab)) / max(peak, 1):.2f} KiB/socket, both ends); "
      f"TCP inuse {s_before.get('inuse')} -> {s_peak.get('inuse')}, mem {s_before.get('mem', 0) * ps:.0f} -> {s_peak.get('mem', 0) * ps:.0f} KiB")
print(f"deliveries {summary['delivered']} (expected from confirmed publishes {summary['expected_deliveries']}), lost {summary['lost']}, duplicated {summary['duplicated']}, closed by server {summary['closed_by_server']}, publishes unconfirmed {summary['publishes_unconfirmed']}")
for w in summary["warnings"]:
    print(f"warning: {w}")
print(f"results: {out}/")
ok = connected == total and not failed and summary["lost"] == 0 and summary["duplicated"] == 0 and peak >= total
sys.exit(0 if ok else 1)
EOF
exit $status

#!/usr/bin/env bash
# Load benchmark of the policy index (issue 18): two RELEASE Arbiter servers
# side by side, one with ~100 policies of the multi-tenant shape
# (examples/shared/tenants.rs) and one with ~10k or ~100k, both holding the
# same entity data and answering the same varied requests on a handful of
# hot tenants (examples/tenant_load.rs, every answer checked), with the
# decision cache off. Runs alternate (small, large, small, large, ...); the
# script prints the median requests/s, p50 and p99 of each side and the
# ratios large/small (goals: throughput >= 0.8x, p99 <= 1.25x), then each
# server's startup-to-ready time and resident memory, and where the memory
# of the largest set goes (tenant_load memory, one process per stage).
#
#   bash benches/load/policy_index.sh
#
# Knobs (environment): LARGE="1000 10000" (tenants of the large side; 10
# policies each plus 3 guardrails), SMALL=10 (tenants of the small side),
# ROUNDS=3 DURATION=10 (seconds per run) CONCURRENCY=32, THROUGHPUT_GOAL=0.8,
# P99_GOAL=1.25, STRICT=1 (fail when a goal is missed).
set -euo pipefail

LARGE=${LARGE:-1000 10000}
SMALL=${SMALL:-10}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONCURRENCY=${CONCURRENCY:-32}
THROUGHPUT_GOAL=${THROUGHPUT_GOAL:-0.8}
P99_GOAL=${P99_GOAL:-1.25}
STRICT=${STRICT:-0}

# shellcheck source=benches/load/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need_tools curl:curl

echo "building (release): arbiter, example tenant_load" >&2
cargo build --release --quiet --bin arbiter --example tenant_load
ARBITER=$TARGET/arbiter
LOAD=$TARGET/examples/tenant_load
clear_arbiter_env

# start_server NAME DIR: starts arbiter on DIR's files; sets S_PID, S_PORT,
# S_READY (seconds from spawn to /ready) and S_RSS (KiB once ready).
start_server() {
  local name=$1 dir=$2 admin started
  take_port S_PORT
  take_port admin
  started=$(date +%s.%N)
  "$ARBITER" serve --policies "$dir/policies.cedar" --schema "$dir/schema.cedarschema" \
    --entities "$dir/entities.json" --decision-cache-size 0 \
    --listen "127.0.0.1:$S_PORT" --admin-listen "127.0.0.1:$admin" >"$WORK/$name.log" 2>&1 &
  S_PID=$!
  PIDS+=("$S_PID")
  for _ in $(seq 1200); do
    curl -fsS -o /dev/null "http://127.0.0.1:$admin/ready" 2>/dev/null && break
    kill -0 "$S_PID" 2>/dev/null || { cat "$WORK/$name.log" >&2; fail "$name exited"; }
    sleep 0.02
  done
  curl -fsS -o /dev/null "http://127.0.0.1:$admin/ready" || fail "$name is not ready after 24 s"
  S_READY=$(awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN { printf "%.2f", e - s }')
  S_RSS=$(awk '/^VmRSS:/ { print $2 }' "/proc/$S_PID/status")
}

rss() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

echo "machine: $(nproc) cores, $(awk '/^MemTotal:/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo);" \
  "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); $(date -u +%Y-%m-%dT%H:%MZ)"
SUMMARY=()
for large in $LARGE; do
  small_dir=$WORK/small-$large large_dir=$WORK/large-$large
  small_policies=$("$LOAD" write "$small_dir" "$SMALL" "$large")
  large_policies=$("$LOAD" write "$large_dir" "$large" "$large")
  echo
  echo "== $small_policies vs $large_policies ($large tenants of entity data on both sides)"
  start_server small "$small_dir"
  small_pid=$S_PID small_port=$S_PORT small_ready=$S_READY small_rss=$S_RSS
  start_server large "$large_dir"
  large_pid=$S_PID large_port=$S_PORT large_ready=$S_READY large_rss=$S_RSS

  S_RPS=() S_P50=() S_P99=() L_RPS=() L_P50=() L_P99=()
  for round in $(seq "$ROUNDS"); do
    for side in small large; do
      port=${side}_port
      line=$("$LOAD" load "127.0.0.1:${!port}" "$SMALL" "$DURATION" "$CONCURRENCY") ||
        not_ok "$side: wrong answers or errors under load"
      read -r rps p50 p99 count <<<"$line"
      printf 'round %d  %-5s %8.0f req/s  p50 %6d us  p99 %6d us  (%d requests)\n' \
        "$round" "$side" "$rps" "$p50" "$p99" "$count"
      if [[ $side == small ]]; then
        S_RPS+=("$rps") S_P50+=("$p50") S_P99+=("$p99")
      else
        L_RPS+=("$rps") L_P50+=("$p50") L_P99+=("$p99")
      fi
    done
  done
  s_rps=$(median "${S_RPS[@]}") l_rps=$(median "${L_RPS[@]}")
  s_p99=$(median "${S_P99[@]}") l_p99=$(median "${L_P99[@]}")
  throughput=$(awk -v l="$l_rps" -v s="$s_rps" 'BEGIN { printf "%.3f", l / s }')
  p99=$(awk -v l="$l_p99" -v s="$s_p99" 'BEGIN { printf "%.3f", l / s }')
  echo "median of $ROUNDS runs, $CONCURRENCY concurrent requests:"
  printf '  %-22s %10s %10s %10s %12s %12s %12s\n' side 'req/s' 'p50 (us)' 'p99 (us)' \
    'ready (s)' 'RSS ready' 'RSS after'
  printf '  %-22s %10.0f %10.0f %10.0f %12s %9d KiB %9d KiB\n' "$small_policies" "$s_rps" \
    "$(median "${S_P50[@]}")" "$s_p99" "$small_ready" "$small_rss" "$(rss "$small_pid")"
  printf '  %-22s %10.0f %10.0f %10.0f %12s %9d KiB %9d KiB\n' "$large_policies" "$l_rps" \
    "$(median "${L_P50[@]}")" "$l_p99" "$large_ready" "$large_rss" "$(rss "$large_pid")"
  per_policy=$(awk -v l="$large_rss" -v s="$small_rss" -v lp="${large_policies%% *}" \
    -v sp="${small_policies%% *}" 'BEGIN { printf "%.0f", (l - s) * 1024 / (lp - sp) }')
  echo "  throughput large/small: $throughput (goal >= $THROUGHPUT_GOAL); p99 large/small: $p99" \
    "(goal <= $P99_GOAL)"
  echo "  resident memory per added policy once ready: $per_policy bytes (same data on both sides)"
  SUMMARY+=("$large_policies vs $small_policies: throughput $throughput, p99 $p99, ready ${large_ready} s, $per_policy B/policy")
  if awk -v t="$throughput" -v tg="$THROUGHPUT_GOAL" -v p="$p99" -v pg="$P99_GOAL" \
    'BEGIN { exit !(t < tg || p > pg) }'; then
    echo "  a goal is missed" >&2
    [[ $STRICT == 1 ]] && exit 1
  fi
  stop_pids "$small_pid" "$large_pid"
  PIDS=()
done

largest=${LARGE##* }
echo
echo "== where memory goes, $largest tenants (one process per stage; KiB; glibc malloc, not the server's mimalloc;"
echo "   set: the policies parsed one by one, set+index: and indexed; parsed: as one text, as the loader does)"
printf '  %-8s %10s %10s %8s\n' stage VmRSS VmHWM seconds
for stage in text set set+index parsed whole index; do
  read -r vmrss vmhwm seconds < <("$LOAD" memory "$largest" "$stage")
  printf '  %-8s %10d %10d %8s\n' "$stage" "$vmrss" "$vmhwm" "$seconds"
done
echo
printf '%s\n' "${SUMMARY[@]}"

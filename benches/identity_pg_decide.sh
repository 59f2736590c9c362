#!/usr/bin/env bash
# Load benchmark (not run by the tests): decision latency of a release
# `arbiter serve` synced from PostgreSQL at LARGE users (default 1,000,000)
# against SMALL users (default 1,000), side by side in one run.
#
#   KEEP_DB=1 bash benches/identity_pg_decide.sh
#
# The databases are the ones of benches/identity_pg_load.sh (each user in 10
# of 1,000 leaf groups of a 3-level hierarchy, 3 attributes), made by it when
# missing and kept (arbiter_load_<USERS>; the 1M load takes minutes; drop
# them with `DROP DATABASE` when done). Two loads, each with a server per
# size, in alternating runs (small, large, small, ...):
# - hot: principals drawn from the same 1,000 users on both stores, decision
#   cache off (every request is evaluated), slice cache on (its default);
# - cold: principals drawn from all users of each store, decision and slice
#   caches off: every decision builds its slice from the store.
# Every answer is checked against the user's clearance (examples/check_load.rs).
#
# Knobs: SMALL=1000 LARGE=1000000 ROUNDS=3 DURATION=8 CONCURRENCY=16.
set -euo pipefail
SMALL=${SMALL:-1000}
LARGE=${LARGE:-1000000}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
CONCURRENCY=${CONCURRENCY:-16}

# shellcheck source=benches/load/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/load/lib.sh"
need_tools psql:postgresql-client curl:curl bc:bc

for users in "$SMALL" "$LARGE"; do
  KEEP_DB=1 LOAD_ONLY=1 USERS=$users bash benches/identity_pg_load.sh
done
echo "building (release): arbiter, example check_load" >&2
cargo build --release --quiet --bin arbiter --example check_load
LOAD=$TARGET/examples/check_load
clear_arbiter_env

# start_server USERS FLAGS...: a server synced from arbiter_load_USERS;
# sets PORT_<USERS> and pushes its pid onto PIDS.
start_server() {
  local users=$1 server_port server_admin dir
  shift
  # (take_port's own local is named `port`.)
  take_port server_port
  take_port server_admin
  dir=$WORK/$users
  mkdir -p "$dir"
  cp deploy/postgres/example.cedar "$dir/policies.cedar"
  cat >"$dir/arbiter.toml" <<TOML
policies = "policies.cedar"
[identity.postgres]
url = "postgres://postgres@127.0.0.1:5432/arbiter_load_$users"
TOML
  "$TARGET/arbiter" serve --config "$dir/arbiter.toml" --listen "127.0.0.1:$server_port" \
    --admin-listen "127.0.0.1:$server_admin" "$@" >"$dir/log" 2>&1 &
  PIDS+=($!)
  printf -v "PORT_$users" '%s' "$server_port"
  printf -v "ADMIN_$users" '%s' "$server_admin"
}

# wait_synced USERS: until the server of USERS is ready (its full sync takes
# about 40 s at 1M users).
wait_synced() {
  local admin_var="ADMIN_$1" pid
  pid=${PIDS[-1]}
  for _ in $(seq 1200); do
    curl -fsS -o /dev/null "http://127.0.0.1:${!admin_var}/ready" 2>/dev/null && return 0
    sleep 0.25
  done
  cat "$WORK/$1/log" >&2
  fail "the server of $1 users is not ready after 300 s (pid $pid)"
}

# measure MODE DRAWN_SMALL DRAWN_LARGE FLAGS...
measure() {
  local mode=$1 drawn_small=$2 drawn_large=$3 round users drawn port_var line
  shift 3
  start_server "$SMALL" "$@"
  start_server "$LARGE" "$@"
  wait_synced "$SMALL"
  wait_synced "$LARGE"
  local -a rps_small=() rps_large=() p50_small=() p50_large=() p99_small=() p99_large=()
  for users in "$SMALL" "$LARGE"; do # warm-up
    port_var="PORT_$users"
    drawn=$drawn_small
    [[ $users == "$LARGE" ]] && drawn=$drawn_large
    "$LOAD" "127.0.0.1:${!port_var}" "$drawn" 2 "$CONCURRENCY" >/dev/null ||
      not_ok "$mode warm-up against $users users"
  done
  for round in $(seq "$ROUNDS"); do
    for users in "$SMALL" "$LARGE"; do
      port_var="PORT_$users"
      drawn=$drawn_small
      [[ $users == "$LARGE" ]] && drawn=$drawn_large
      line=$("$LOAD" "127.0.0.1:${!port_var}" "$drawn" "$DURATION" "$CONCURRENCY") ||
        not_ok "$mode round $round against $users users"
      read -r rps p50 p99 count <<<"$line"
      echo "$mode round $round, $users users (principals from $drawn): $rps req/s, p50 $p50 us, p99 $p99 us ($count requests)"
      if [[ $users == "$SMALL" ]]; then
        rps_small+=("$rps") p50_small+=("$p50") p99_small+=("$p99")
      else
        rps_large+=("$rps") p50_large+=("$p50") p99_large+=("$p99")
      fi
    done
  done
  local rs rl ps pl qs ql
  rs=$(median "${rps_small[@]}") rl=$(median "${rps_large[@]}")
  ps=$(median "${p50_small[@]}") pl=$(median "${p50_large[@]}")
  qs=$(median "${p99_small[@]}") ql=$(median "${p99_large[@]}")
  echo "== $mode: median of $ROUNDS rounds, $CONCURRENCY concurrent requests"
  echo "   $SMALL users: $rs req/s, p50 $ps us, p99 $qs us"
  echo "   $LARGE users: $rl req/s, p50 $pl us, p99 $ql us"
  echo "   latency $LARGE vs $SMALL: p50 $(echo "scale=3; $pl / $ps" | bc)x, p99 $(echo "scale=3; $ql / $qs" | bc)x; throughput $(echo "scale=3; $rl / $rs" | bc)x"
  stop_pids "${PIDS[@]}"
  PIDS=()
}

measure hot 1000 1000 --decision-cache-size 0
measure cold "$SMALL" "$LARGE" --decision-cache-size 0 --slice-cache-entities 0
